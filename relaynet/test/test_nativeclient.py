"""
L{relaynet.native.NativeStream}, the client side of a native upgrade, with
a fake transport and clock: each answer the relay may give, and the limits.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from relaynet.native import MAX_ERROR_BODY, MAX_HEAD, NativeStream, nativeRequest
from relaynet.streams import ConnectTimeoutError, NoListenerError, RelayAddress, RelayConnectError, RejectedError

ADDRESS = RelayAddress("ws://relay.example:9090", "hyco")
SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: relaynet-stream\r\nConnection: Upgrade\r\n\r\n"


class Keep(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class NativeStreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.stream = NativeStream(
            Factory.forProtocol(Keep), b"GET / HTTP/1.1\r\n\r\n", ADDRESS, ADDRESS, self.clock, timeout=10
        )
        self.transport = StringTransport()
        self.stream.makeConnection(self.transport)
        self.outcome: list[Any] = []
        self.stream.opened.addBoth(self.outcome.append)

    def failure(self) -> BaseException:
        [result] = self.outcome
        return result.value  # type: ignore[no-any-return]

    def test_sendsTheRequest(self) -> None:
        self.assertEqual(self.transport.value(), b"GET / HTTP/1.1\r\n\r\n")

    def test_switchingHandsOverWithTheRest(self) -> None:
        """
        Bytes after the 101 head in the same read are the stream's first.
        """
        self.stream.dataReceived(SWITCHING[:30])
        self.assertEqual(self.outcome, [])
        self.stream.dataReceived(SWITCHING[30:] + b"early bytes")
        [user] = self.outcome
        self.assertIsInstance(user, Keep)
        self.assertEqual(user.received, b"early bytes")
        self.assertEqual(user.transport.getPeer(), ADDRESS)
        self.clock.advance(60)
        self.assertFalse(self.transport.disconnecting)

    def test_refusalWithLength(self) -> None:
        body = b'{"error": {"code": "ListenerNotFound", "message": "There are no listeners connected"}}'
        head = f"HTTP/1.1 404 Not Found\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        self.stream.dataReceived(head + body)
        error = self.failure()
        self.assertIsInstance(error, NoListenerError)
        self.assertEqual(error.reason, "There are no listeners connected")  # type: ignore[attr-defined]
        self.assertTrue(self.transport.disconnecting)

    def test_refusalUntilClose(self) -> None:
        """
        Without a length the body ends with the connection; the reason
        phrase stands in for a body that is not the JSON error.
        """
        self.stream.dataReceived(b"HTTP/1.1 451 Not here\r\n\r\nnot json")
        self.assertEqual(self.outcome, [])
        self.stream.connectionLost()
        error = self.failure()
        self.assertIsInstance(error, RejectedError)
        self.assertEqual((error.status, error.reason), (451, "Not here"))  # type: ignore[attr-defined]

    def test_errorBodyBounded(self) -> None:
        self.stream.dataReceived(b"HTTP/1.1 500 Oops\r\n\r\n" + b"x" * (MAX_ERROR_BODY + 1))
        self.assertEqual(self.failure().status, 500)  # type: ignore[attr-defined]

    def test_headBounded(self) -> None:
        self.stream.dataReceived(b"HTTP/1.1 101 Switching\r\nX: " + b"y" * MAX_HEAD)
        self.assertIsInstance(self.failure(), RelayConnectError)
        self.assertIn("too long", str(self.failure()))
        self.assertTrue(self.transport.disconnecting)

    def test_notHttp(self) -> None:
        self.stream.dataReceived(b"SSH-2.0-OpenSSH\r\n\r\n")
        self.assertIn("not HTTP", str(self.failure()))

    def test_otherProtocol(self) -> None:
        self.stream.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
        self.assertIn("another protocol", str(self.failure()))

    def test_deadline(self) -> None:
        self.clock.advance(9.9)
        self.assertEqual(self.outcome, [])
        self.clock.advance(0.2)
        self.assertIsInstance(self.failure(), ConnectTimeoutError)
        self.assertTrue(self.transport.disconnecting)

    def test_closedDuringUpgrade(self) -> None:
        self.stream.connectionLost()
        self.assertIsInstance(self.failure(), RelayConnectError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel(self) -> None:
        self.stream.opened.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.stream.dataReceived(SWITCHING)
        self.assertEqual(len(self.outcome), 1)


class NativeRequestTests(SynchronousTestCase):
    def test_request(self) -> None:
        request = nativeRequest("wss://relay.example/$hc/a/b?sb-hc-action=connect", {"X-App": "1"})
        self.assertEqual(
            request,
            b"GET /$hc/a/b?sb-hc-action=connect HTTP/1.1\r\nHost: relay.example\r\nUpgrade: relaynet-stream\r\n"
            b"Connection: Upgrade\r\nX-App: 1\r\n\r\n",
        )

    def test_headerInjection(self) -> None:
        self.assertRaises(ValueError, nativeRequest, "ws://h/$hc/a", {"X": "1\r\nEvil: 2"})
        self.assertRaises(ValueError, nativeRequest, "ws://h/$hc/a", {"Bad Name": "1"})

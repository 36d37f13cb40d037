# -*- test-case-name: relaynet.test.test_listener -*-
"""
Tests for L{relaynet.listener}: an L{HttpListener} on a
L{MemoryReactorClock}, whose WebSocket connections are answered by hand
(L{RelaySide}): raw upgrade responses and frames in, the frames the listener
writes parsed back out.

The helpers here (L{Harness}, L{RelaySide}, L{fullRequest}) are shared with
C{test_web}.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import (
    ConnectError,
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
)
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from relaynet.auth import Authorizer, Rights, Rule, SasToken, mintToken
from relaynet.listener import (
    CONTROL_BODY_LIMIT,
    FLUSH_DELAY,
    MAX_CONTROL_MESSAGE,
    STABLE_SECONDS,
    AcceptRequest,
    HttpListener,
    HybridListener,
    RelayedHttpRequest,
    RelayRefused,
    defaultRetryPolicy,
    readBody,
    sasTokenProvider,
)
from relaynet.protocols.frames import MessageReader
from relaynet.streams import RelayAddress
from relaynet.test.support import FakeTcp, Recorder, RecordingProducer, headerValue, parseFrames, reassemble

KEY_NAME = "RootManageSharedAccessKey"
KEY = "c2VjcmV0LWtleS1mb3ItbGlzdGVuZXItdGVzdHMtMTI="
NOW = 1_700_000_000
BASE = "ws://relay.test:9090"
RESOURCE = "http://relay.test:9090/hyco"
SENDER = {"address": "198.51.100.4", "port": 61544}
_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0, 1, 2, 8, 9, 10


def address(requestId: str = "r1", path: str = "hyco/x") -> str:
    return f"{BASE}/$hc/{path}?sb-hc-action=request&sb-hc-id={requestId}"


def fullRequest(
    requestId: str = "r1",
    method: str = "GET",
    target: str = "/hyco/x?a=1",
    headers: dict[str, str] | None = None,
    body: bool = False,
    remote: dict[str, Any] | None = SENDER,
) -> dict[str, Any]:
    """
    A full-form C{request} command, as the relay sends it.
    """
    command: dict[str, Any] = {
        "address": address(requestId),
        "id": requestId,
        "requestTarget": target,
        "method": method,
        "requestHeaders": headers if headers is not None else {"Host": "relay.test:9090", "Accept": "*/*"},
        "body": body,
    }
    if remote is not None:
        command["remoteEndpoint"] = remote
    return {"request": command}


def serverFrame(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """
    One unmasked frame, as the relay sends it.
    """
    head = bytes([(0x80 if fin else 0) | opcode])
    length = len(payload)
    if length < 126:
        head += bytes([length])
    elif length < 0x10000:
        head += bytes([126]) + length.to_bytes(2, "big")
    else:
        head += bytes([127]) + length.to_bytes(8, "big")
    return head + payload


class RelayTcp(FakeTcp):
    """
    The relay's end of a TCP connection: the listener hears that it ended on
    the next turn of the clock, as with a real one.
    """

    closedReason = "closed by the listener"
    vanishedReason = "the relay vanished"


class RelaySide:
    """
    The relay's end of one of the listener's WebSocket connections: it reads
    the upgrade request and the frames the listener writes, and answers with
    raw bytes.
    """

    def __init__(self, clock: MemoryReactorClock, host: str, port: int, factory: Any) -> None:
        self.clock = clock
        self.transport = RelayTcp(clock, (host, port))
        self.proto = factory.buildProtocol(self.transport.getPeer())
        self.transport.protocol = self.proto
        self.proto.makeConnection(self.transport)

    def _split(self) -> tuple[bytes, bytes]:
        head, _, rest = self.transport.value().partition(b"\r\n\r\n")
        return head, rest

    @property
    def requestLine(self) -> str:
        return self._split()[0].split(b"\r\n", 1)[0].decode("latin-1")

    def header(self, name: str) -> str | None:
        return headerValue(self._split()[0], name)

    def handshake(self, status: int = 101, reason: str = "Switching Protocols", protocol: str | None = None) -> None:
        if status == 101:
            key = self.header("Sec-WebSocket-Key") or ""
            accept = base64.b64encode(hashlib.sha1((key + _GUID).encode()).digest()).decode()
            lines = ["Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Accept: {accept}"]
            if protocol is not None:
                lines.append(f"Sec-WebSocket-Protocol: {protocol}")
        else:
            lines = ["Content-Length: 0"]
        response = "\r\n".join([f"HTTP/1.1 {status} {reason}", *lines]) + "\r\n\r\n"
        self.proto.dataReceived(response.encode("latin-1"))

    def frames(self) -> list[tuple[bool, int, bytes]]:
        return parseFrames(self._split()[1])

    def dataFrames(self) -> list[tuple[bool, int, bytes]]:
        return [frame for frame in self.frames() if frame[1] < 8]

    def messages(self) -> list[tuple[int, bytes]]:
        """
        The data messages written, reassembled: (opcode, payload).
        """
        return reassemble(self.frames())

    def commands(self) -> list[dict[str, Any]]:
        return [json.loads(payload) for opcode, payload in self.messages() if opcode == TEXT]

    def closes(self) -> list[int | None]:
        return [int.from_bytes(p[:2], "big") if p else None for _, opcode, p in self.frames() if opcode == CLOSE]

    def send(self, opcode: int, payload: bytes = b"", fin: bool = True) -> None:
        self.proto.dataReceived(serverFrame(opcode, payload, fin))

    def sendJson(self, command: Any) -> None:
        self.send(TEXT, json.dumps(command).encode())

    def answerClose(self, code: int = 1000) -> None:
        """
        Answer the listener's close and drop the connection, as a relay does.
        """
        self.send(CLOSE, code.to_bytes(2, "big"))
        self.transport.connectionGone(ConnectionDone("closed by the relay"))

    def drop(self) -> None:
        self.transport.connectionGone(ConnectionLost("the relay vanished"))


class Responder(Recorder):
    """
    A handler that answers at once.
    """

    def __init__(self, status: int = 200, headers: Any = (), chunks: tuple[bytes, ...] = (), reason: str | None = None):
        super().__init__()
        self.status, self.headers, self.chunks, self.reason = status, headers, chunks, reason

    def handleRequest(self, request: RelayedHttpRequest) -> None:
        super().handleRequest(request)
        request.respond(self.status, self.reason, self.headers)
        for chunk in self.chunks:
            request.write(chunk)
        request.finish()


class Harness:
    """
    An L{HttpListener} on a L{MemoryReactorClock}.
    """

    def __init__(self, handler: Any = None, base: str = BASE, entity: str = "hyco", ttl: int = 3600, **kwargs: Any):
        self.reactor = MemoryReactorClock()
        self.reactor.advance(NOW)
        self.handler = handler if handler is not None else Recorder()
        self.ttl = ttl
        self.tokens: list[str] = []
        self.resources: list[str] = []
        kwargs.setdefault("pingInterval", 0)  # RelaySide answers no pings
        self.listener = HttpListener(self.reactor, base, entity, self.token, self.handler, **kwargs)

    def token(self, resource: str) -> str:
        self.resources.append(resource)
        token = mintToken(resource, KEY_NAME, KEY, int(self.reactor.seconds()) + self.ttl)
        self.tokens.append(token)
        return token

    def connection(self) -> RelaySide:
        """
        The listener's next connection attempt, connected.
        """
        host, port, factory, timeout, bindAddress = self.reactor.tcpClients.pop(0)
        return RelaySide(self.reactor, host, port, factory)

    def start(self) -> Any:
        return self.listener.listen()

    def listen(self) -> RelaySide:
        listening = self.start()
        control = self.connection()
        control.handshake()
        assert listening.called, "listen() did not fire"
        self.control = control
        return control

    def rendezvous(self) -> RelaySide:
        side = self.connection()
        side.handshake()
        return side

    def settle(self) -> None:
        self.reactor.advance(0)


class Chunks(Protocol):
    """
    A body protocol that keeps each part as it comes, and may pause.
    """

    def __init__(self, pauseAfter: int | None = None) -> None:
        self.chunks: list[bytes] = []
        self.ended: Failure | None = None
        self.pauseAfter = pauseAfter

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        if self.pauseAfter is not None and len(self.chunks) >= self.pauseAfter:
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.ended = reason


def response(side: RelaySide, index: int = 0) -> dict[str, Any]:
    return side.commands()[index]["response"]


def assertCloseWaitsFor(case: SynchronousTestCase, h: Harness, control: RelaySide, other: RelaySide) -> None:
    """
    C{close()} closes C{other} with 1000 too, and fires only once the relay
    has answered the close on C{control} and then on C{other}.
    """
    closing = h.listener.close()
    case.assertEqual(other.closes(), [1000])
    control.answerClose()
    case.assertNoResult(closing)
    other.answerClose()
    case.successResultOf(closing)


class ListenTests(SynchronousTestCase):
    """
    The control channel: where it goes, with what, and when it is open.
    """

    def test_controlUrlAndToken(self) -> None:
        """
        The control channel asks for C{/$hc/{entity}} with C{listen}, a
        C{sb-hc-id} and the token in C{ServiceBusAuthorization}; C{listen()}
        fires once the relay said 101.
        """
        h = Harness(listenerId="7a3c")
        listening = h.listener.listen()
        control = h.connection()
        self.assertEqual(control.requestLine, "GET /$hc/hyco?sb-hc-action=listen&sb-hc-id=7a3c HTTP/1.1")
        self.assertEqual(control.header("ServiceBusAuthorization"), h.tokens[0])
        self.assertEqual(control.header("Host"), "relay.test:9090")
        self.assertIsNone(control.header("Sec-WebSocket-Extensions"))
        self.assertNoResult(listening)
        control.handshake()
        self.assertIsNone(self.successResultOf(listening))
        self.assertTrue(h.listener.listening)

    def test_generatedId(self) -> None:
        h = Harness()
        self.assertEqual(len(h.listener.listenerId), 36)
        self.assertTrue(h.listener.controlUrl.endswith(f"&sb-hc-id={h.listener.listenerId}"))

    def test_entityWithSlashAndTls(self) -> None:
        """
        A C{wss} relay without a port is on 443; an entity may contain C{/}.
        """
        reactor = MemoryReactorClock()
        listener = HttpListener(
            reactor, "wss://ns.servicebus.windows.net/", "/a/b/", lambda resource: "t", Recorder(), listenerId="i"
        )
        self.assertEqual(listener.controlUrl, "wss://ns.servicebus.windows.net/$hc/a/b?sb-hc-action=listen&sb-hc-id=i")
        listener.listen()
        self.assertEqual(reactor.tcpClients[0][1], 443)

    def test_refused(self) -> None:
        """
        A refused handshake fails C{listen()} with the relay's status and
        reason.
        """
        h = Harness()
        listening = h.listener.listen()
        control = h.connection()
        control.handshake(401, "The token is expired")
        h.settle()
        failure = self.failureResultOf(listening, RelayRefused)
        self.assertEqual((failure.value.status, failure.value.reason), (401, "The token is expired"))
        self.assertFalse(h.listener.listening)

    def test_connectionFailed(self) -> None:
        h = Harness()
        listening = h.listener.listen()
        host, port, factory, timeout, bind = h.reactor.tcpClients[0]
        factory.clientConnectionFailed(h.reactor.connectors[0], Failure(ConnectError("refused")))
        h.reactor.advance(1)
        self.failureResultOf(listening, ConnectError)

    def test_listenOnce(self) -> None:
        h = Harness()
        h.listen()
        self.assertRaises(RuntimeError, h.listener.listen)

    def test_close(self) -> None:
        """
        C{close()} closes the control channel with 1000 and fires when the
        relay has answered.
        """
        h = Harness()
        control = h.listen()
        closing = h.listener.close()
        self.assertEqual(control.closes(), [1000])
        self.assertNoResult(closing)
        control.answerClose()
        self.successResultOf(closing)
        self.assertFalse(h.listener.listening)
        self.assertEqual(h.reactor.getDelayedCalls(), [])

    def test_closeAlsoClosesRendezvous(self) -> None:
        h = Harness()
        control = h.listen()
        control.sendJson({"request": {"address": address("r9"), "id": "r9"}})
        assertCloseWaitsFor(self, h, control, h.rendezvous())

    def test_closeAfterRelayDropped(self) -> None:
        h = Harness()
        control = h.listen()
        control.drop()
        self.successResultOf(h.listener.close())

    def test_dropTimerOnInjectedClock(self) -> None:
        """
        A relay that answers the close but keeps the TCP connection is
        dropped after a while, by the listener's clock.
        """
        h = Harness()
        control = h.listen()
        closing = h.listener.close()
        control.send(CLOSE, (1000).to_bytes(2, "big"))
        self.assertFalse(control.transport.aborted)
        h.reactor.advance(10)
        self.assertTrue(control.transport.aborted)
        h.settle()
        self.successResultOf(closing)


class RenewTests(SynchronousTestCase):
    def renewals(self, control: RelaySide) -> list[str]:
        return [c["renewToken"]["token"] for c in control.commands() if "renewToken" in c]

    def test_renewEveryInterval(self) -> None:
        """
        A long-lived token is renewed every C{tokenRenewInterval} seconds
        with a fresh token from the provider.
        """
        h = Harness(tokenRenewInterval=100)
        control = h.listen()
        h.reactor.advance(99)
        self.assertEqual(self.renewals(control), [])
        h.reactor.advance(1)
        self.assertEqual(self.renewals(control), [h.tokens[1]])
        h.reactor.advance(100)
        self.assertEqual(self.renewals(control), h.tokens[1:3])

    def test_renewAtNinetyPercent(self) -> None:
        """
        A token that expires before the interval is renewed at 90% of its
        lifetime.
        """
        h = Harness(ttl=600)
        control = h.listen()
        h.reactor.advance(539)
        self.assertEqual(self.renewals(control), [])
        h.reactor.advance(1)
        self.assertEqual(self.renewals(control), [h.tokens[1]])
        self.assertEqual(SasToken.parse(h.tokens[1]).expiry, NOW + 540 + 600)

    def test_defaultInterval(self) -> None:
        h = Harness()
        control = h.listen()
        h.reactor.advance(45 * 60)
        self.assertEqual(len(self.renewals(control)), 1)

    def test_noRenewalAfterClose(self) -> None:
        h = Harness(tokenRenewInterval=100, reconnect=False)
        control = h.listen()
        control.drop()
        h.reactor.advance(1000)
        self.assertEqual(self.renewals(control), [])
        self.assertEqual(h.reactor.getDelayedCalls(), [])

    def test_sasTokenProvider(self) -> None:
        """
        L{sasTokenProvider} mints tokens the relay accepts, valid from the
        clock's now.
        """
        clock = MemoryReactorClock()
        clock.advance(NOW)
        provide = sasTokenProvider(KEY_NAME, KEY, clock, ttl=60)
        token = provide(RESOURCE)
        assert isinstance(token, str)
        authorizer = Authorizer([Rule(KEY_NAME, KEY)])
        checked = authorizer.authorize(token, "relay.test:9090", "hyco", Rights.LISTEN, NOW)
        self.assertEqual(checked.expiry, NOW + 60)


class ControlChannelRequestTests(SynchronousTestCase):
    """
    Full-form requests on the control channel, and responses small enough
    to go back on it.
    """

    def test_requestFields(self) -> None:
        h = Harness()
        control = h.listen()
        control.sendJson(fullRequest(headers={"Content-Type": "text/plain", "X-N": "1"}))
        [request] = h.handler.requests
        self.assertEqual((request.id, request.method, request.target), ("r1", "GET", "/hyco/x?a=1"))
        self.assertEqual(request.address, address("r1"))
        self.assertEqual(request.headers, [("Content-Type", "text/plain"), ("X-N", "1")])
        self.assertEqual(request.getHeader("content-type"), "text/plain")
        self.assertIsNone(request.getHeader("missing"))
        self.assertEqual(request.remote, ("198.51.100.4", 61544))
        self.assertEqual((request.bodyLength, request.overRendezvous), (0, False))
        self.assertEqual(self.successResultOf(readBody(request)), b"")
        verifyObject(IConsumer, request)

    def test_noRemoteEndpoint(self) -> None:
        h = Harness()
        control = h.listen()
        control.sendJson(fullRequest(remote=None))
        self.assertIsNone(h.handler.requests[0].remote)

    def test_bodyIsTheNextMessage(self) -> None:
        """
        With C{"body": true} the next message is the whole body; the handler
        gets the request when it has come, in one part.
        """
        h = Harness()
        control = h.listen()
        control.sendJson(fullRequest(method="POST", body=True))
        self.assertEqual(h.handler.requests, [])
        control.send(BINARY, b'{"qty":', fin=False)
        control.send(CONTINUATION, b"3}")
        [request] = h.handler.requests
        self.assertEqual(request.bodyLength, 9)
        chunks = Chunks()
        request.deliverBody(chunks)
        self.assertEqual(chunks.chunks, [b'{"qty":3}'])
        assert chunks.ended is not None
        self.assertTrue(chunks.ended.check(ConnectionDone))
        verifyObject(IPushProducer, chunks.transport)

    def test_readBodyTakesItWhole(self) -> None:
        """
        C{readBody} takes a body that came on the control channel whole, at
        once; it cannot be delivered again afterwards.
        """
        h = Harness()
        control = h.listen()
        control.sendJson(fullRequest(method="POST", body=True))
        control.send(BINARY, b"abc")
        [request] = h.handler.requests
        # Taken whole, not streamed to a protocol.
        patched = self.patch(request, "deliverBody", lambda protocol: self.fail("readBody went through deliverBody"))
        self.assertEqual(self.successResultOf(readBody(request)), b"abc")
        patched.restore()
        self.assertRaises(RuntimeError, request.deliverBody, Chunks())
        self.assertRaises(RuntimeError, readBody, request)

    def test_deliverBodyOnce(self) -> None:
        h = Harness()
        control = h.listen()
        control.sendJson(fullRequest())
        request = h.handler.requests[0]
        request.deliverBody(Chunks())
        self.assertRaises(RuntimeError, request.deliverBody, Chunks())

    def test_smallResponse(self) -> None:
        """
        A finished response of at most 64 KiB goes on the control channel:
        the C{response} text, then at once its body as one binary message.
        """
        h = Harness(Responder(201, [("Content-Type", "application/json")], (b'{"id":', b"17}")))
        control = h.listen()
        control.sendJson(fullRequest(method="POST"))
        frames = control.dataFrames()
        self.assertEqual([(fin, opcode) for fin, opcode, _ in frames], [(True, TEXT), (True, BINARY)])
        self.assertEqual(
            json.loads(frames[0][2]),
            {
                "response": {
                    "requestId": "r1",
                    "statusCode": 201,
                    "statusDescription": "Created",
                    "responseHeaders": {"Content-Type": "application/json"},
                    "body": True,
                }
            },
        )
        self.assertEqual(frames[1][2], b'{"id":17}')
        self.assertEqual(h.reactor.tcpClients, [])
        self.successResultOf(h.handler.requests[0].notifyFinish())

    def test_statusIsANumberHeadersAreStrings(self) -> None:
        h = Harness(Responder(418, {"X-N": 5}, (b"x",), reason="I'm a teapot"))  # type: ignore[dict-item]
        control = h.listen()
        control.sendJson(fullRequest())
        sent = response(control)
        self.assertIs(type(sent["statusCode"]), int)
        self.assertEqual(sent["statusDescription"], "I'm a teapot")
        self.assertEqual(sent["responseHeaders"], {"X-N": "5"})

    def test_headerRules(self) -> None:
        """
        Repeated headers are joined; framing and connection headers are not
        sent.
        """
        headers = [
            ("Set-Cookie", "a=1"),
            ("set-cookie", "b=2"),
            ("Transfer-Encoding", "chunked"),
            ("Connection", "close"),
            ("Content-Length", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Vary", "Accept"),
        ]
        h = Harness(Responder(200, headers, (b"x",)))
        control = h.listen()
        control.sendJson(fullRequest())
        self.assertEqual(response(control)["responseHeaders"], {"Set-Cookie": "a=1, b=2", "Vary": "Accept"})

    def test_emptyBody(self) -> None:
        """
        A response with nothing written has no body message.
        """
        h = Harness(Responder(200))
        control = h.listen()
        control.sendJson(fullRequest())
        self.assertEqual(len(control.dataFrames()), 1)
        self.assertIs(response(control)["body"], False)

    def test_head(self) -> None:
        """
        A response to HEAD has no body, whatever was written, and may keep
        its C{Content-Length}.
        """
        h = Harness(Responder(200, [("Content-Length", "5")], (b"hello",)))
        control = h.listen()
        control.sendJson(fullRequest(method="HEAD"))
        self.assertEqual(len(control.dataFrames()), 1)
        sent = response(control)
        self.assertIs(sent["body"], False)
        self.assertEqual(sent["responseHeaders"], {"Content-Length": "5"})

    def test_noBodyStatuses(self) -> None:
        for status in (204, 304):
            h = Harness(Responder(status, (), (b"ignored",)))
            control = h.listen()
            control.sendJson(fullRequest())
            self.assertEqual(len(control.dataFrames()), 1)
            self.assertIs(response(control)["body"], False)
            self.assertEqual(response(control)["statusCode"], status)

    def test_exactlyTheLimit(self) -> None:
        """
        A body of exactly 64 KiB still goes on the control channel.
        """
        body = b"z" * CONTROL_BODY_LIMIT
        h = Harness(Responder(200, (), (body[:1000], body[1000:])))
        control = h.listen()
        control.sendJson(fullRequest())
        self.assertEqual(control.messages(), [(TEXT, control.messages()[0][1]), (BINARY, body)])
        self.assertEqual(h.reactor.tcpClients, [])

    def test_responsesInAnyOrder(self) -> None:
        h = Harness()
        control = h.listen()
        control.sendJson(fullRequest("a"))
        control.sendJson(fullRequest("b"))
        first, second = h.handler.requests
        for request in (second, first):
            request.respond(200)
            request.write(request.id.encode())
            request.finish()
        self.assertEqual([c["response"]["requestId"] for c in control.commands()], ["b", "a"])
        self.assertEqual([p for op, p in control.messages() if op == BINARY], [b"b", b"a"])

    def test_misuse(self) -> None:
        h = Harness()
        control = h.listen()
        control.sendJson(fullRequest())
        request = h.handler.requests[0]
        self.assertRaises(RuntimeError, request.write, b"x")
        self.assertRaises(RuntimeError, request.finish)
        self.assertRaises(ValueError, request.respond, 99)
        self.assertRaises(ValueError, request.respond, True)
        request.respond(200)
        self.assertRaises(RuntimeError, request.respond, 200)
        request.finish()
        self.assertRaises(RuntimeError, request.finish)
        self.assertRaises(RuntimeError, request.write, b"x")

    def test_handlerRaises(self) -> None:
        """
        A handler that raises before anything went out gets a 500 sent for
        it, even if it had started a response.
        """

        class Failing:
            def handleRequest(self, request: RelayedHttpRequest) -> None:
                request.respond(200)
                request.write(b"half")
                raise ValueError("oops")

        h = Harness(Failing())
        control = h.listen()
        control.sendJson(fullRequest())
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        sent = response(control)
        self.assertEqual((sent["statusCode"], sent["body"]), (500, False))
        self.assertIn("exception", sent["statusDescription"])
        self.assertEqual(len(control.dataFrames()), 1)

    def test_ignored(self) -> None:
        """
        Unknown commands, text that is not JSON, stray empty binary
        messages and an C{accept} without an address are ignored.
        """
        h = Harness()
        control = h.listen()
        control.sendJson({"accept": {"id": "1", "connectHeaders": {}, "remoteEndpoint": SENDER}})
        control.sendJson({"message": "hi"})
        control.sendJson(["not", "an", "object"])
        control.send(TEXT, b"not json")
        control.send(BINARY, b"")
        control.sendJson({"request": {"id": "no address"}})
        control.sendJson({"request": {"address": address(), "method": "GET"}})
        self.assertEqual(h.reactor.tcpClients, [])
        self.assertEqual(h.handler.requests, [])
        self.assertEqual(control.dataFrames(), [])
        self.assertTrue(h.listener.listening)

    def test_controlLostLosesPendingResponses(self) -> None:
        h = Harness()
        control = h.listen()
        control.sendJson(fullRequest())
        request = h.handler.requests[0]
        finished = request.notifyFinish()
        control.drop()
        self.failureResultOf(finished, ConnectionLost)
        self.failureResultOf(request.notifyFinish(), ConnectionLost)
        request.respond(200)
        request.write(b"too late")
        request.finish()
        self.assertEqual(control.dataFrames(), [])


class OneWayRequestTests(SynchronousTestCase):
    """
    A relaynet relay's events and one-way messages (ids starting with
    C{evt_}) may go unanswered.
    """

    def test_oneWay(self) -> None:
        h = Harness()
        control = h.listen()
        control.sendJson(fullRequest("evt_1", "POST"))
        control.sendJson(fullRequest("r1", "POST"))
        self.assertEqual([r.oneWay for r in h.handler.requests], [True, False])

    def test_overARendezvousNot(self) -> None:
        """
        A request that came over a rendezvous is answered there, whatever
        its id.
        """
        h = Harness()
        control = h.listen()
        control.sendJson({"request": {"address": address("evt_2", "hyco/big"), "id": "evt_2"}})
        rendezvous = h.rendezvous()
        rendezvous.sendJson(fullRequest("evt_2", "POST", "/hyco/big"))
        [request] = h.handler.requests
        self.assertFalse(request.oneWay)
        self.assertRaises(RuntimeError, request.skipResponse)

    def test_skipResponse(self) -> None:
        """
        C{skipResponse} sends nothing, finishes the request and lets the
        listener forget it; no response may follow.
        """
        h = Harness()
        control = h.listen()
        control.sendJson(fullRequest("evt_1", "POST"))
        [request] = h.handler.requests
        self.assertIn(request, h.listener._inFlight)
        request.skipResponse()
        self.assertEqual(control.dataFrames(), [])
        self.assertNotIn(request, h.listener._inFlight)
        self.successResultOf(request.notifyFinish())
        self.assertRaises(RuntimeError, request.respond, 202)
        self.assertRaises(RuntimeError, request.skipResponse)

    def test_skipOnlyOneWay(self) -> None:
        """
        A request somebody waits on cannot be skipped; it is answered as
        usual afterwards.
        """
        h = Harness()
        control = h.listen()
        control.sendJson(fullRequest("r1", "POST"))
        [request] = h.handler.requests
        error = self.assertRaises(RuntimeError, request.skipResponse)
        self.assertEqual(str(error), "Only a one-way request may go unanswered.")
        request.respond(202)
        request.finish()
        self.assertEqual(response(control)["statusCode"], 202)

    def test_skipAfterRespond(self) -> None:
        h = Harness()
        control = h.listen()
        control.sendJson(fullRequest("evt_1", "POST"))
        [request] = h.handler.requests
        request.respond(202)
        self.assertRaises(RuntimeError, request.skipResponse)
        request.finish()
        self.assertEqual(response(control)["requestId"], "evt_1")


class ControlReaderTests(SynchronousTestCase):
    """
    The listener reads its control channel with a L{MessageReader} for
    unmasked frames, not autobahn's parser.
    """

    def test_installedOnOpen(self) -> None:
        h = Harness()
        h.listen()
        control = h.listener._control
        assert control is not None
        self.assertIsInstance(control.reader, MessageReader)

    @settings(max_examples=60, deadline=None)
    @given(cuts=st.lists(st.integers(min_value=1, max_value=40), max_size=12))
    def test_anyPieces(self, cuts: list[int]) -> None:
        """
        A command and its body, cut anywhere, make one request with the
        whole body; a ping among them is answered.
        """
        h = Harness()
        control = h.listen()
        wire = (
            serverFrame(TEXT, json.dumps(fullRequest(method="POST", body=True)).encode())
            + serverFrame(BINARY, b"abc", fin=False)
            + serverFrame(PING, b"hi")
            + serverFrame(CONTINUATION, b"def")
        )
        start = 0
        for cut in [*cuts, len(wire)]:
            control.proto.dataReceived(wire[start : start + cut])
            start += cut
        control.proto.dataReceived(wire[start:])
        [request] = h.handler.requests
        self.assertEqual(self.successResultOf(readBody(request)), b"abcdef")
        self.assertIn((True, PONG, b"hi"), control.frames())

    def test_tooLarge(self) -> None:
        """
        A message above C{maxMessageSize} closes the channel with 1009
        before it has all come; L{MAX_CONTROL_MESSAGE} is the default.
        """
        self.assertEqual(Harness().listener._maxMessageSize, MAX_CONTROL_MESSAGE)
        h = Harness(maxMessageSize=1000)
        control = h.listen()
        control.send(BINARY, b"x" * 600, fin=False)
        control.send(CONTINUATION, b"x" * 400)
        self.assertEqual(control.closes(), [])
        control.send(BINARY, b"x" * 600, fin=False)
        control.send(CONTINUATION, b"x" * 401)
        self.assertEqual(control.closes(), [1009])

    def test_noLimit(self) -> None:
        """
        C{maxMessageSize=0} sets no limit.
        """
        h = Harness(maxMessageSize=0)
        control = h.listen()
        control.send(BINARY, b"x" * 600, fin=False)
        control.send(CONTINUATION, b"x" * (2 * 1024 * 1024))
        self.assertEqual(control.closes(), [])

    def test_trafficStandsInForAPong(self) -> None:
        """
        As with autobahn's parser, messages from the relay cancel a pending
        ping timeout: a busy relay whose pong is late is kept, a silent one
        is dropped.
        """
        for busy in (True, False):
            h = Harness(pingInterval=5, pingTimeout=5)
            control = h.listen()
            proto = h.listener._control
            assert proto is not None
            for second in range(12):
                h.reactor.advance(1)
                if busy:
                    control.sendJson({"unknownCommand": second})
            self.assertEqual(proto.state == proto.STATE_OPEN, busy)

    def test_maskedFrameFromTheRelay(self) -> None:
        h = Harness()
        control = h.listen()
        control.proto.dataReceived(bytes([0x81, 0x80 | 2]) + b"\x00\x00\x00\x00{}")
        self.assertEqual(control.closes(), [1002])
        self.assertEqual(h.handler.requests, [])


class LargeResponseTests(SynchronousTestCase):
    """
    Responses that outgrow the control channel stream over a rendezvous.
    """

    def request(self) -> tuple[Harness, RelaySide, RelayedHttpRequest]:
        h = Harness()
        control = h.listen()
        control.sendJson(fullRequest())
        request = h.handler.requests[0]
        return h, control, request

    def test_overTheLimit(self) -> None:
        """
        More than 64 KiB buffered opens a WebSocket to the request's
        address, without a token; there the C{response} text, then the body
        as one binary message in frames, an empty final frame, and a close
        with 1000.  Nothing goes on the control channel.
        """
        h, control, request = self.request()
        request.respond(200, None, [("Content-Type", "application/octet-stream")])
        request.write(b"a" * 40000)
        self.assertEqual(h.reactor.tcpClients, [])
        request.write(b"b" * 30000)
        rendezvous = h.connection()
        self.assertEqual(rendezvous.requestLine, "GET /$hc/hyco/x?sb-hc-action=request&sb-hc-id=r1 HTTP/1.1")
        self.assertIsNone(rendezvous.header("ServiceBusAuthorization"))
        rendezvous.handshake()
        request.write(b"c" * 10)
        finished = request.notifyFinish()
        self.assertNoResult(finished)
        request.finish()
        frames = rendezvous.dataFrames()
        self.assertEqual(
            [(fin, opcode, len(payload)) for fin, opcode, payload in frames],
            [(True, TEXT, len(frames[0][2])), (False, BINARY, 40000), (False, CONTINUATION, 30000),
             (False, CONTINUATION, 10), (True, CONTINUATION, 0)],
        )
        self.assertEqual(
            json.loads(frames[0][2]),
            {
                "response": {
                    "requestId": "r1",
                    "statusCode": 200,
                    "statusDescription": "OK",
                    "responseHeaders": {"Content-Type": "application/octet-stream"},
                    "body": True,
                }
            },
        )
        self.assertEqual(rendezvous.messages()[1], (BINARY, b"a" * 40000 + b"b" * 30000 + b"c" * 10))
        self.assertEqual(rendezvous.closes(), [1000])
        self.successResultOf(finished)
        self.assertEqual(control.dataFrames(), [])
        rendezvous.answerClose()
        h.settle()
        self.successResultOf(finished)

    def test_largeWritesAreSplit(self) -> None:
        h, control, request = self.request()
        request.respond(200)
        request.write(b"q" * 200000)
        rendezvous = h.rendezvous()
        request.finish()
        sizes = [len(p) for fin, op, p in rendezvous.dataFrames()[1:]]
        self.assertEqual(sizes, [65536, 65536, 65536, 200000 - 3 * 65536, 0])

    def test_finishWhileOpening(self) -> None:
        h, control, request = self.request()
        request.respond(200)
        request.write(b"q" * 70000)
        request.finish()
        rendezvous = h.rendezvous()
        self.assertEqual([op for fin, op, p in rendezvous.dataFrames()], [TEXT, BINARY, CONTINUATION, CONTINUATION])
        self.assertEqual(rendezvous.messages()[1], (BINARY, b"q" * 70000))
        self.assertEqual(rendezvous.closes(), [1000])

    def test_flushAfterTwoSeconds(self) -> None:
        """
        A response still open two seconds after its first write goes to a
        rendezvous, so that a slow stream keeps flowing.
        """
        h, control, request = self.request()
        request.respond(200)
        h.reactor.advance(FLUSH_DELAY)
        self.assertEqual(h.reactor.tcpClients, [])
        request.write(b"tick")
        h.reactor.advance(FLUSH_DELAY - 0.1)
        self.assertEqual(h.reactor.tcpClients, [])
        h.reactor.advance(0.1)
        rendezvous = h.rendezvous()
        self.assertEqual(rendezvous.messages()[1:], [])
        self.assertEqual([(fin, op, p) for fin, op, p in rendezvous.dataFrames()[1:]], [(False, BINARY, b"tick")])
        request.write(b"tock")
        self.assertEqual(rendezvous.dataFrames()[-1], (False, CONTINUATION, b"tock"))

    def test_noFlushAfterFinish(self) -> None:
        h, control, request = self.request()
        request.respond(200)
        request.write(b"tick")
        request.finish()
        h.reactor.advance(FLUSH_DELAY * 2)
        self.assertEqual(h.reactor.tcpClients, [])
        self.assertEqual(h.reactor.getDelayedCalls()[0].getTime(), NOW + 45 * 60)

    def test_pushProducer(self) -> None:
        """
        The writer is paused while the rendezvous opens and whenever the
        socket's send buffer is full.
        """
        h, control, request = self.request()
        producer = RecordingProducer()
        request.registerProducer(producer, True)
        request.respond(200)
        request.write(b"x" * 70000)
        self.assertEqual(producer.events, ["pause"])
        rendezvous = h.rendezvous()
        self.assertEqual(producer.events, ["pause", "resume"])
        valve = rendezvous.transport.producer
        self.assertTrue(rendezvous.transport.streaming)
        valve.pauseProducing()
        self.assertEqual(producer.events, ["pause", "resume", "pause"])
        valve.resumeProducing()
        self.assertEqual(producer.events, ["pause", "resume", "pause", "resume"])
        request.unregisterProducer()
        request.finish()
        self.assertIsNone(rendezvous.transport.producer)

    def test_registeredWhilePaused(self) -> None:
        h, control, request = self.request()
        request.respond(200)
        request.write(b"x" * 70000)
        producer = RecordingProducer()
        request.registerProducer(producer, True)
        self.assertEqual(producer.events, ["pause"])
        self.assertRaises(RuntimeError, request.registerProducer, RecordingProducer(), True)

    def test_pullProducer(self) -> None:
        """
        A pull producer is asked for more after each write while the way out
        is clear.
        """
        h, control, request = self.request()
        request.respond(200)
        parts = [b"1" * 40000, b"2" * 40000, b"3" * 40000]

        class Pull:
            calls = 0

            def resumeProducing(self) -> None:
                self.calls += 1
                if parts:
                    request.write(parts.pop(0))
                else:
                    request.unregisterProducer()
                    request.finish()

            def stopProducing(self) -> None:
                pass

        pull = Pull()
        request.registerProducer(pull, False)
        self.assertEqual(pull.calls, 0)
        h.settle()
        h.settle()
        self.assertEqual(pull.calls, 2)
        h.settle()
        self.assertEqual(pull.calls, 2)  # the rendezvous is opening
        rendezvous = h.rendezvous()
        h.settle()
        h.settle()
        self.assertEqual(pull.calls, 4)
        self.assertEqual(rendezvous.messages()[1], (BINARY, b"1" * 40000 + b"2" * 40000 + b"3" * 40000))
        self.assertEqual(rendezvous.closes(), [1000])

    def test_rendezvousLost(self) -> None:
        """
        A rendezvous that goes before the response is out loses the
        response: the writer is stopped and C{notifyFinish} fails.
        """
        h, control, request = self.request()
        producer = RecordingProducer()
        request.registerProducer(producer, True)
        request.respond(200)
        request.write(b"x" * 70000)
        rendezvous = h.rendezvous()
        finished = request.notifyFinish()
        rendezvous.drop()
        self.failureResultOf(finished, ConnectionLost)
        self.assertEqual(producer.events[-1], "stop")
        request.write(b"more")
        request.finish()

    def test_rendezvousRefused(self) -> None:
        h, control, request = self.request()
        request.respond(200)
        request.write(b"x" * 70000)
        finished = request.notifyFinish()
        rendezvous = h.connection()
        rendezvous.handshake(404, "Unknown request")
        h.settle()
        failure = self.failureResultOf(finished, RelayRefused)
        self.assertEqual(failure.value.status, 404)

    def test_abortWhileStreaming(self) -> None:
        h, control, request = self.request()
        request.respond(200)
        request.write(b"x" * 70000)
        rendezvous = h.rendezvous()
        request.abort()
        self.assertTrue(rendezvous.transport.aborted)
        self.failureResultOf(request.notifyFinish(), ConnectionAborted)

    def test_handlerRaisesWhileStreaming(self) -> None:
        """
        A handler that raises once its response is on its way to a
        rendezvous breaks it off: the rendezvous is closed unanswered.
        """

        class Failing(Recorder):
            def handleRequest(self, request: RelayedHttpRequest) -> None:
                super().handleRequest(request)
                request.respond(200)
                request.write(b"x" * 70000)
                raise ValueError("oops")

        h = Harness(Failing())
        control = h.listen()
        control.sendJson(fullRequest())
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.failureResultOf(h.handler.requests[0].notifyFinish(), ConnectionAborted)
        rendezvous = h.rendezvous()
        self.assertEqual(rendezvous.dataFrames(), [])
        self.assertEqual(rendezvous.closes(), [1000])
        self.assertEqual(control.dataFrames(), [])


class RendezvousRequestTests(SynchronousTestCase):
    """
    Address-only requests: read from the rendezvous, answered there.
    """

    def arrive(self, body: bool = True, **kwargs: Any) -> tuple[Harness, RelaySide, RelaySide]:
        h = Harness(**kwargs)
        control = h.listen()
        control.sendJson({"request": {"address": address("r2", "hyco/big"), "id": "r2"}})
        rendezvous = h.connection()
        self.assertEqual(rendezvous.requestLine, "GET /$hc/hyco/big?sb-hc-action=request&sb-hc-id=r2 HTTP/1.1")
        self.assertIsNone(rendezvous.header("ServiceBusAuthorization"))
        rendezvous.handshake()
        self.assertEqual(h.handler.requests, [])
        rendezvous.sendJson(fullRequest("r2", "POST", "/hyco/big", body=body))
        return h, control, rendezvous

    def test_streamedBody(self) -> None:
        """
        The handler gets the request with its text; the body follows frame
        by frame as it arrives.
        """
        h, control, rendezvous = self.arrive()
        [request] = h.handler.requests
        self.assertEqual((request.id, request.method, request.target), ("r2", "POST", "/hyco/big"))
        self.assertEqual((request.bodyLength, request.overRendezvous), (None, True))
        chunks = Chunks()
        request.deliverBody(chunks)
        rendezvous.send(BINARY, b"one", fin=False)
        self.assertEqual(chunks.chunks, [b"one"])
        rendezvous.send(CONTINUATION, b"two", fin=False)
        self.assertEqual(chunks.chunks, [b"one", b"two"])
        self.assertIsNone(chunks.ended)
        rendezvous.send(CONTINUATION, b"", fin=True)
        assert chunks.ended is not None
        self.assertTrue(chunks.ended.check(ConnectionDone))

    def test_responseOnTheRendezvous(self) -> None:
        """
        A small response to a request that came over a rendezvous goes back
        there, not on the control channel, and the rendezvous is closed.
        """
        h, control, rendezvous = self.arrive(body=False)
        request = h.handler.requests[0]
        self.assertEqual(self.successResultOf(readBody(request)), b"")
        request.respond(201, None, {"X": "y"})
        request.write(b"ok")
        request.finish()
        self.assertEqual([(fin, op) for fin, op, p in rendezvous.dataFrames()], [(True, TEXT), (True, BINARY)])
        self.assertEqual(
            rendezvous.commands(),
            [{"response": {"requestId": "r2", "statusCode": 201, "statusDescription": "Created",
                           "responseHeaders": {"X": "y"}, "body": True}}],
        )
        self.assertEqual(rendezvous.messages()[-1], (BINARY, b"ok"))
        self.assertEqual(rendezvous.closes(), [1000])
        self.assertEqual(control.dataFrames(), [])
        self.assertEqual(h.reactor.tcpClients, [])

    def test_largeResponseOnTheSameRendezvous(self) -> None:
        h, control, rendezvous = self.arrive()
        request = h.handler.requests[0]
        request.respond(200)
        request.write(b"r" * 70000)
        self.assertEqual(h.reactor.tcpClients, [])
        request.finish()
        self.assertEqual(
            [(fin, op, len(p)) for fin, op, p in rendezvous.dataFrames()[1:]],
            [(False, BINARY, 65536), (False, CONTINUATION, 70000 - 65536), (True, CONTINUATION, 0)],
        )
        self.assertEqual(rendezvous.closes(), [1000])

    def test_pauseWhileTheHandlerIsSlow(self) -> None:
        """
        A handler that pauses the body pauses the rendezvous socket.
        """
        h, control, rendezvous = self.arrive()
        request = h.handler.requests[0]
        chunks = Chunks(pauseAfter=1)
        request.deliverBody(chunks)
        rendezvous.send(BINARY, b"one", fin=False)
        self.assertEqual(rendezvous.transport.producerState, "paused")
        rendezvous.send(CONTINUATION, b"two", fin=False)
        self.assertEqual(chunks.chunks, [b"one"])
        assert chunks.transport is not None
        chunks.pauseAfter = None
        chunks.transport.resumeProducing()  # type: ignore[attr-defined]
        self.assertEqual(chunks.chunks, [b"one", b"two"])
        self.assertEqual(rendezvous.transport.producerState, "producing")

    def test_bufferedUntilDelivered(self) -> None:
        """
        Body that comes before the handler asks for it waits; past 64 KiB
        the rendezvous socket is paused until the handler reads.
        """
        h, control, rendezvous = self.arrive()
        request = h.handler.requests[0]
        rendezvous.send(BINARY, b"a" * 40000, fin=False)
        self.assertEqual(rendezvous.transport.producerState, "producing")
        rendezvous.send(CONTINUATION, b"b" * 40000, fin=False)
        self.assertEqual(rendezvous.transport.producerState, "paused")
        rendezvous.send(CONTINUATION, b"c", fin=True)
        self.assertEqual(rendezvous.transport.producerState, "producing")
        self.assertEqual(self.successResultOf(readBody(request)), b"a" * 40000 + b"b" * 40000 + b"c")

    def test_pausedThenEndedThenResumed(self) -> None:
        h, control, rendezvous = self.arrive()
        request = h.handler.requests[0]
        chunks = Chunks(pauseAfter=1)
        request.deliverBody(chunks)
        rendezvous.send(BINARY, b"one", fin=False)
        rendezvous.send(CONTINUATION, b"two", fin=True)
        self.assertIsNone(chunks.ended)
        self.assertEqual(rendezvous.transport.producerState, "producing")
        chunks.pauseAfter = None
        chunks.transport.resumeProducing()  # type: ignore[union-attr]
        self.assertEqual(chunks.chunks, [b"one", b"two"])
        self.assertIsNotNone(chunks.ended)

    def test_bodyNotWanted(self) -> None:
        h, control, rendezvous = self.arrive()
        request = h.handler.requests[0]
        chunks = Chunks()
        request.deliverBody(chunks)
        rendezvous.send(BINARY, b"one", fin=False)
        chunks.transport.stopProducing()  # type: ignore[union-attr]
        assert chunks.ended is not None
        self.assertTrue(chunks.ended.check(ConnectionAborted))
        rendezvous.send(CONTINUATION, b"two", fin=True)
        self.assertEqual(chunks.chunks, [b"one"])

    def test_bodyBrokenOff(self) -> None:
        h, control, rendezvous = self.arrive()
        request = h.handler.requests[0]
        reading = readBody(request)
        rendezvous.send(BINARY, b"one", fin=False)
        rendezvous.drop()
        self.failureResultOf(reading, ConnectionLost)
        self.failureResultOf(request.notifyFinish(), ConnectionLost)

    def test_idFromTheCommand(self) -> None:
        """
        A request text without an id is answered with the id of the
        control channel's command.
        """
        h = Harness(Responder(200))
        control = h.listen()
        control.sendJson({"request": {"address": address("r3"), "id": "r3"}})
        rendezvous = h.rendezvous()
        command = fullRequest("r3")
        del command["request"]["id"]
        rendezvous.sendJson(command)
        self.assertEqual(response(rendezvous, 0)["requestId"], "r3")

    def test_notARequest(self) -> None:
        h = Harness()
        control = h.listen()
        control.sendJson({"request": {"address": address("r4"), "id": "r4"}})
        rendezvous = h.rendezvous()
        rendezvous.send(TEXT, b"[1, 2]")
        self.assertEqual(rendezvous.closes(), [1000])
        self.assertEqual(h.handler.requests, [])

    def test_requestTextTooLarge(self) -> None:
        h = Harness()
        control = h.listen()
        control.sendJson({"request": {"address": address("r5"), "id": "r5"}})
        rendezvous = h.rendezvous()
        rendezvous.send(TEXT, b"{" + b" " * 300000, fin=False)
        self.assertEqual(rendezvous.closes(), [1009])
        self.assertEqual(h.handler.requests, [])

    def test_rendezvousRefused(self) -> None:
        """
        A rendezvous the relay refuses (the request is gone) is logged.
        """
        h = Harness()
        control = h.listen()
        control.sendJson({"request": {"address": address("r6"), "id": "r6"}})
        rendezvous = h.connection()
        rendezvous.handshake(404, "Gone")
        h.settle()
        self.assertEqual(len(self.flushLoggedErrors(RelayRefused)), 1)
        self.assertTrue(h.listener.listening)

    def test_abortDropsTheRendezvous(self) -> None:
        h, control, rendezvous = self.arrive()
        h.handler.requests[0].abort()
        self.assertTrue(rendezvous.transport.aborted)

    def test_bodyProtocolRaises(self) -> None:
        """
        A body protocol that raises is logged and gets no more; the socket
        keeps being read.
        """

        class Raising(Chunks):
            def dataReceived(self, data: bytes) -> None:
                super().dataReceived(data)
                raise ValueError("bad protocol")

        h, control, rendezvous = self.arrive()
        request = h.handler.requests[0]
        chunks = Raising()
        request.deliverBody(chunks)
        rendezvous.send(BINARY, b"one", fin=False)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        rendezvous.send(CONTINUATION, b"two", fin=True)
        self.assertEqual(chunks.chunks, [b"one"])
        self.assertIsNone(chunks.ended)
        self.assertEqual(rendezvous.transport.producerState, "producing")
        request.respond(200)
        request.finish()
        self.assertEqual(response(rendezvous)["statusCode"], 200)


def acceptCommand(
    connectionId: str = "c1",
    path: str = "hyco/room1",
    query: str = "tenant=7&",
    headers: dict[str, str] | None = None,
    remote: dict[str, Any] | None = SENDER,
) -> dict[str, Any]:
    """
    An C{accept} command, as the relay sends it.
    """
    command: dict[str, Any] = {
        "address": f"{BASE}/$hc/{path}?{query}sb-hc-action=accept&sb-hc-id={connectionId}",
        "id": connectionId,
        "connectHeaders": headers
        if headers is not None
        else {"Host": "relay.test:9090", "Sec-WebSocket-Key": "l8fWd829IrZbEqUcLejv+Q==", "Sec-WebSocket-Version": "13"},
    }
    if remote is not None:
        command["remoteEndpoint"] = remote
    return {"accept": command}


class StatusHarness(Harness):
    """
    A L{Harness} that keeps the status changes, with back-off without
    jitter: 0, 1.5, 2.5, 4.5, 8.5, 16.5, 30.5, 30.5 ...
    """

    def __init__(self, **kwargs: Any) -> None:
        self.statuses: list[str] = []
        kwargs.setdefault("retryPolicy", defaultRetryPolicy(jitter=lambda: 0.5))
        super().__init__(onStatus=self.statuses.append, **kwargs)

    def attempts(self) -> int:
        return len(self.reactor.tcpClients)

    def reconnectAfterRefusal(self) -> None:
        """
        Listen, lose the control channel, have the first retry refused
        (503) and the next one, after the 1.5 s back-off, answered.
        """
        self.listen().drop()
        self.settle()
        self.connection().handshake(503, "Busy")
        self.settle()
        self.reactor.advance(1.5)
        self.connection().handshake()


class ReconnectTests(SynchronousTestCase):
    """
    The listener stays online: it reconnects when the control channel drops,
    with back-off between failed attempts and a fresh token for each.
    """

    def test_statusCallbacks(self) -> None:
        h = StatusHarness()
        self.assertEqual(h.listener.status, "offline")
        listening = h.start()
        self.assertEqual((h.statuses, h.listener.status), (["connecting"], "connecting"))
        h.connection().handshake()
        self.successResultOf(listening)
        self.assertEqual(h.statuses, ["connecting", "online"])
        h.listener.close()
        self.assertEqual(h.statuses, ["connecting", "online", "offline"])

    def test_reconnectAfterDrop(self) -> None:
        """
        A dropped control channel is reopened at once, with the same
        C{sb-hc-id} and a fresh token for the entity's resource URI.
        """
        h = StatusHarness(listenerId="7a3c")
        control = h.listen()
        control.drop()
        self.assertEqual(h.statuses, ["connecting", "online", "reconnecting"])
        self.assertFalse(h.listener.listening)
        h.settle()
        again = h.connection()
        self.assertEqual(again.requestLine, "GET /$hc/hyco?sb-hc-action=listen&sb-hc-id=7a3c HTTP/1.1")
        self.assertEqual(again.header("ServiceBusAuthorization"), h.tokens[1])
        self.assertEqual(h.resources, [RESOURCE, RESOURCE])
        again.handshake()
        self.assertEqual(h.statuses, ["connecting", "online", "reconnecting", "online"])
        self.assertTrue(h.listener.listening)

    def test_relayClosesWithCode(self) -> None:
        """
        A relay that closes the control channel (1008: token expired; 1011:
        the daily recycle) is reconnected to.
        """
        for code in (1001, 1008, 1011):
            h = StatusHarness()
            control = h.listen()
            control.send(CLOSE, code.to_bytes(2, "big") + b"NameRenewalFailed")
            control.transport.connectionGone(ConnectionDone())
            self.assertEqual(h.listener.status, "reconnecting")
            h.settle()
            h.connection().handshake()
            self.assertEqual(h.listener.status, "online")

    def test_backoff(self) -> None:
        """
        Failed attempts are spaced 0, 1, 2, 4, 8, 16, then 30 seconds (plus
        jitter) apart, 401 and 403 included.
        """
        h = StatusHarness()
        h.listen().drop()
        delays = []
        refusals = [(503, "Busy"), (401, "Unauthorized"), (403, "Forbidden"), (500, "Oops")] * 2
        for status, reason in refusals:
            before = h.reactor.seconds()
            h.settle()
            while not h.attempts():
                h.reactor.advance(0.5)
            delays.append(h.reactor.seconds() - before)
            h.connection().handshake(status, reason)
            h.settle()
            self.assertEqual(h.listener.status, "reconnecting")
        self.assertEqual(delays, [0, 1.5, 2.5, 4.5, 8.5, 16.5, 30.5, 30.5])

    def test_backoffResetsAfterSuccess(self) -> None:
        h = StatusHarness()
        h.reconnectAfterRefusal()
        self.assertEqual(h.listener.status, "online")
        h.reactor.advance(STABLE_SECONDS)
        h.listener._control.transport.loseConnection()  # type: ignore[union-attr]
        h.settle()
        self.assertEqual(h.listener.status, "reconnecting")
        h.settle()
        self.assertEqual(h.attempts(), 1)

    def test_noStormWhenClosedRightAfterOpening(self) -> None:
        """
        A control channel the relay closes right after opening it is not
        retried at once (which would loop), but after a back-off.
        """
        h = StatusHarness()
        h.reconnectAfterRefusal()
        self.assertEqual(h.listener.status, "online")
        h.listener._control.transport.loseConnection()  # type: ignore[union-attr]
        h.settle()
        self.assertEqual(h.listener.status, "reconnecting")
        self.assertEqual(h.attempts(), 0)
        h.reactor.advance(60)
        self.assertEqual(h.attempts(), 1)

    def test_neverTwoControlChannels(self) -> None:
        """
        An attempt that hangs is the only one until its handshake times out.
        """
        h = StatusHarness()
        h.listen().drop()
        h.settle()
        hanging = h.connection()
        h.reactor.advance(29)
        self.assertEqual(h.attempts(), 0)
        h.reactor.advance(1)  # the handshake timeout
        h.settle()
        self.assertTrue(hanging.transport.disconnecting or not hanging.transport.connected)
        self.assertEqual(h.attempts(), 0)
        h.reactor.advance(1.5)
        self.assertEqual(h.attempts(), 1)

    def test_stopOn404(self) -> None:
        """
        The relay saying the entity does not exist ends the reconnecting,
        with an error in the log.
        """
        h = StatusHarness()
        h.listen().drop()
        h.settle()
        with capturedLogs() as events:
            h.connection().handshake(404, "The entity does not exist")
            h.settle()
        self.assertEqual(h.statuses[-1], "offline")
        self.assertTrue([e for e in events if e["log_level"].name == "error" and e.get("entity") == "hyco"])
        h.reactor.advance(3600)
        self.assertEqual(h.attempts(), 0)

    def test_firstAttemptIsNotRetried(self) -> None:
        h = StatusHarness()
        listening = h.start()
        h.connection().handshake(503, "Busy")
        h.settle()
        failure = self.failureResultOf(listening, RelayRefused)
        self.assertEqual(failure.value.status, 503)
        self.assertEqual(h.statuses, ["connecting", "offline"])
        h.reactor.advance(3600)
        self.assertEqual(h.attempts(), 0)

    def test_noReconnect(self) -> None:
        h = StatusHarness(reconnect=False)
        h.listen().drop()
        h.reactor.advance(60)
        self.assertEqual((h.statuses[-1], h.attempts()), ("offline", 0))

    def test_closeWhileWaiting(self) -> None:
        h = StatusHarness()
        h.listen().drop()
        h.settle()
        h.connection().handshake(503, "Busy")
        h.settle()
        self.successResultOf(h.listener.close())
        self.assertEqual(h.statuses[-1], "offline")
        self.assertEqual(h.reactor.getDelayedCalls(), [])

    def test_closeWhileConnecting(self) -> None:
        h = StatusHarness()
        listening = h.start()
        side = h.connection()
        closing = h.listener.close()
        h.settle()
        self.failureResultOf(listening, CancelledError)
        self.assertTrue(side.transport.aborted)
        self.successResultOf(closing)
        self.assertEqual(h.statuses, ["connecting", "offline"])

    def test_asyncTokenProvider(self) -> None:
        """
        A token provider may answer later, with a L{Deferred}.
        """
        reactor = MemoryReactorClock()
        asked: list[tuple[str, Deferred[str]]] = []

        def provide(resource: str) -> Deferred[str]:
            d: Deferred[str] = Deferred()
            asked.append((resource, d))
            return d

        listener = HybridListener(reactor, "ws://relay.test:9090/", "hyco", provide, Recorder(), pingInterval=0)
        listening = listener.listen()
        self.assertEqual(reactor.tcpClients, [])
        self.assertEqual(asked[0][0], RESOURCE)
        asked[0][1].callback("SharedAccessSignature sr=x&sig=y&se=1&skn=z")
        side = RelaySide(reactor, *reactor.tcpClients[0][:3])
        self.assertEqual(side.header("ServiceBusAuthorization"), "SharedAccessSignature sr=x&sig=y&se=1&skn=z")
        side.handshake()
        self.successResultOf(listening)

    def test_tokenProviderFails(self) -> None:
        """
        A provider that fails: the first time C{listen()} fails; when
        reconnecting, the attempt is retried after the back-off.
        """
        h = StatusHarness()
        broken = [True]
        token = h.token

        def flaky(resource: str) -> str:
            if broken[0]:
                raise RuntimeError("the vault is down")
            return token(resource)

        h.listener._tokenProvider = flaky
        self.failureResultOf(h.start(), RuntimeError)

        h = StatusHarness()
        token = h.token
        h.listener._tokenProvider = flaky
        broken[0] = False
        h.listen().drop()
        broken[0] = True
        h.settle()
        self.assertEqual(h.attempts(), 0)
        broken[0] = False
        h.reactor.advance(1.5)
        h.connection().handshake()
        self.assertEqual(h.listener.status, "online")

    def test_defaultRetryPolicy(self) -> None:
        policy = defaultRetryPolicy()
        self.assertEqual(policy(0), 0)
        for attempt, low in [(1, 1), (2, 2), (3, 4), (4, 8), (5, 16), (6, 30), (50, 30)]:
            self.assertTrue(low <= policy(attempt) <= low + 1, (attempt, policy(attempt)))


class KeepAliveTests(SynchronousTestCase):
    def test_pingsEveryInterval(self) -> None:
        """
        The listener pings every C{pingInterval}; an answered ping keeps
        the channel.
        """
        h = StatusHarness(pingInterval=30)
        control = h.listen()
        h.reactor.advance(30)
        pings = [p for _, opcode, p in control.frames() if opcode == PING]
        self.assertEqual(len(pings), 1)
        control.send(PONG, pings[0])
        h.reactor.advance(40)
        self.assertTrue(h.listener.listening)
        self.assertEqual(len([f for f in control.frames() if f[1] == PING]), 2)

    def test_unansweredPingReconnects(self) -> None:
        h = StatusHarness(pingInterval=30, pingTimeout=10)
        control = h.listen()
        h.reactor.advance(30)
        h.reactor.advance(10)
        h.settle()
        self.assertTrue(control.transport.aborted or not control.transport.connected)
        self.assertEqual(h.statuses[-1], "reconnecting")
        h.settle()
        self.assertEqual(h.attempts(), 1)

    def test_answersRelayPings(self) -> None:
        h = Harness()
        control = h.listen()
        control.send(PING, b"are you there")
        self.assertIn((True, PONG, b"are you there"), control.frames())


class RenewAfterReconnectTests(SynchronousTestCase):
    def renewals(self, control: RelaySide) -> list[str]:
        return [c["renewToken"]["token"] for c in control.commands() if "renewToken" in c]

    def test_renewalPastExpiry(self) -> None:
        """
        Each token is replaced before it expires, again and again, long past
        the first token's expiry.
        """
        h = Harness(ttl=10)
        control = h.listen()
        for _ in range(100):
            h.reactor.advance(0.5)
            current = ([h.tokens[0]] + self.renewals(control))[-1]
            self.assertGreater(SasToken.parse(current).expiry, h.reactor.seconds())
        self.assertGreaterEqual(len(self.renewals(control)), 5)
        self.assertTrue(h.listener.listening)

    def test_shortLivedToken(self) -> None:
        h = Harness(ttl=2)
        control = h.listen()
        h.reactor.advance(1.7)
        self.assertEqual(self.renewals(control), [])
        h.reactor.advance(0.1)
        self.assertEqual(len(self.renewals(control)), 1)

    def test_renewalAfterReconnect(self) -> None:
        h = Harness(tokenRenewInterval=100)
        first = h.listen()
        h.reactor.advance(50)
        first.drop()
        h.settle()
        second = h.connection()
        second.handshake()
        h.reactor.advance(99)
        self.assertEqual(self.renewals(second), [])
        h.reactor.advance(1)
        self.assertEqual(self.renewals(second), [h.tokens[2]])
        self.assertEqual(self.renewals(first), [])

    def test_asyncRenewalLostWithTheChannel(self) -> None:
        """
        A renewal whose token comes after the channel it was for closed is
        not sent on the next channel.
        """
        h = Harness(tokenRenewInterval=100)
        pending: list[Deferred[str]] = []
        control = h.listen()
        def provide(resource: str) -> Deferred[str]:
            pending.append(Deferred())
            return pending[-1]

        h.listener._tokenProvider = provide
        h.reactor.advance(100)
        self.assertEqual(len(pending), 1)
        control.drop()
        h.settle()
        pending[0].callback("SharedAccessSignature late")
        self.assertEqual(self.renewals(control), [])


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class Kept(Echo):
    instances: list[Kept] = []

    def connectionMade(self) -> None:
        Kept.instances.append(self)


class Refusing(Factory):
    def buildProtocol(self, addr: Any) -> None:
        return None


def ours(events: Any) -> list[Any]:
    return [e for e in events if str(e.get("log_namespace", "")).startswith("relaynet")]


class StreamHarness(Harness):
    def __init__(self, acceptHandler: Any = None, **kwargs: Any) -> None:
        Kept.instances = []
        self.seen: list[AcceptRequest] = []
        self.decision = acceptHandler

        def decide(request: AcceptRequest) -> Any:
            self.seen.append(request)
            return self.decision(request) if callable(self.decision) else self.decision

        kwargs.setdefault("streamFactory", Factory.forProtocol(Kept))
        super().__init__(acceptHandler=decide if acceptHandler is not None else None, **kwargs)


class AcceptTests(SynchronousTestCase):
    """
    C{accept} commands: senders accepted into a protocol from the
    C{streamFactory}, or rejected.
    """

    def test_acceptRequest(self) -> None:
        h = StreamHarness(True)
        control = h.listen()
        headers = {"Host": "relay.test:9090", "Sec-WebSocket-Protocol": "chat.v2, chat.v1", "X-Custom": "abc"}
        control.sendJson(acceptCommand(headers=headers))
        [request] = h.seen
        self.assertEqual(request.id, "c1")
        self.assertEqual(request.address, f"{BASE}/$hc/hyco/room1?tenant=7&sb-hc-action=accept&sb-hc-id=c1")
        self.assertEqual(request.headers, headers)
        self.assertEqual(request.getHeader("x-custom"), "abc")
        self.assertEqual(request.remote, ("198.51.100.4", 61544))
        self.assertEqual(request.target, "/hyco/room1?tenant=7")
        self.assertEqual(request.subprotocols, ["chat.v2", "chat.v1"])

    def test_targetWithoutQuery(self) -> None:
        request = AcceptRequest.fromCommand(acceptCommand(path="a/b", query="", remote=None)["accept"])
        assert request is not None
        self.assertEqual((request.target, request.remote, request.subprotocols), ("/a/b", None, []))

    def test_acceptOpensStream(self) -> None:
        """
        An accepted sender: the listener opens a WebSocket to the address
        without a token, asking for the first subprotocol offered; the
        protocol's transport knows both ends, and bytes go both ways.
        """
        h = StreamHarness()
        control = h.listen()
        control.sendJson(acceptCommand(headers={"Sec-WebSocket-Protocol": "chat.v2, chat.v1"}))
        leg = h.connection()
        self.assertEqual(leg.requestLine, "GET /$hc/hyco/room1?tenant=7&sb-hc-action=accept&sb-hc-id=c1 HTTP/1.1")
        self.assertEqual(leg.header("Sec-WebSocket-Protocol"), "chat.v2")
        self.assertIsNone(leg.header("ServiceBusAuthorization"))
        self.assertEqual(Kept.instances, [])
        leg.handshake(protocol="chat.v2")
        [proto] = Kept.instances
        assert proto.transport is not None
        self.assertEqual(proto.transport.getPeer(), RelayAddress(BASE, "hyco", ("198.51.100.4", 61544)))
        self.assertEqual(proto.transport.getHost(), RelayAddress(BASE, "hyco"))
        leg.send(BINARY, b"ping")
        self.assertEqual(leg.messages(), [(BINARY, b"ping")])

    def test_noSubprotocol(self) -> None:
        h = StreamHarness()
        h.listen().sendJson(acceptCommand())
        self.assertIsNone(h.connection().header("Sec-WebSocket-Protocol"))

    def reject(self, decision: Any) -> tuple[StreamHarness, RelaySide]:
        h = StreamHarness(decision)
        h.listen().sendJson(acceptCommand())
        return h, h.connection()

    def test_rejectWithStatus(self) -> None:
        h, side = self.reject((451, "Not here"))
        self.assertEqual(
            side.requestLine,
            "GET /$hc/hyco/room1?tenant=7&sb-hc-action=accept&sb-hc-id=c1"
            "&sb-hc-statusCode=451&sb-hc-statusDescription=Not%20here HTTP/1.1",
        )
        with capturedLogs() as events:
            side.handshake(410, "Gone")
            h.settle()
        self.assertEqual([e for e in ours(events) if e["log_level"].name in ("warn", "error", "critical")], [])
        self.assertEqual(Kept.instances, [])

    def test_rejectFalse(self) -> None:
        h, side = self.reject(False)
        self.assertIn("&sb-hc-statusCode=400&sb-hc-statusDescription=Rejected%20by%20user%20code ", side.requestLine)

    def test_handlerRaises(self) -> None:
        def broken(request: AcceptRequest) -> bool:
            raise ZeroDivisionError()

        h, side = self.reject(broken)
        self.assertIn(
            "&sb-hc-statusCode=502&sb-hc-statusDescription=The%20listener%27s%20accept%20handler%20failed.", side.requestLine
        )
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_handlerReturnsNonsense(self) -> None:
        h, side = self.reject((42, "no"))
        self.assertIn("&sb-hc-statusCode=502&", side.requestLine)

    def test_asyncHandler(self) -> None:
        decided: Deferred[Any] = Deferred()
        h = StreamHarness(lambda request: decided)
        h.listen().sendJson(acceptCommand())
        self.assertEqual(h.reactor.tcpClients, [])
        decided.callback((403, "Nope"))
        self.assertIn("&sb-hc-statusCode=403&sb-hc-statusDescription=Nope ", h.connection().requestLine)

    def test_coroutineHandler(self) -> None:
        async def decide(request: AcceptRequest) -> bool:
            return request.remote is not None

        h = StreamHarness(decide)
        h.listen().sendJson(acceptCommand())
        self.assertNotIn("statusCode", h.connection().requestLine)

    def test_noStreamFactory(self) -> None:
        """
        A listener without a C{streamFactory} takes no streams.
        """
        h = Harness()
        h.listen().sendJson(acceptCommand())
        self.assertIn("&sb-hc-statusCode=404&sb-hc-statusDescription=This%20listener%20takes%20no%20streams ", h.connection().requestLine)

    def test_senderGone(self) -> None:
        """
        A sender that is gone by the time of the accept (the relay says
        404) costs an info line, not an error.
        """
        h = StreamHarness()
        h.listen().sendJson(acceptCommand())
        with capturedLogs() as events:
            h.connection().handshake(404, "Unknown Connection ID")
            h.settle()
        self.assertEqual([e for e in events if e["log_level"].name in ("error", "critical")], [])
        self.assertEqual(Kept.instances, [])

    def test_factoryRefuses(self) -> None:
        h = StreamHarness(streamFactory=Refusing())
        h.listen().sendJson(acceptCommand())
        leg = h.connection()
        leg.handshake()
        h.settle()
        self.assertEqual(leg.closes(), [1000])

    def test_closeClosesStreams(self) -> None:
        h = StreamHarness()
        control = h.listen()
        control.sendJson(acceptCommand())
        leg = h.connection()
        leg.handshake()
        assertCloseWaitsFor(self, h, control, leg)

    def test_streamsOutliveTheControlChannel(self) -> None:
        """
        An accepted stream keeps going while the control channel
        reconnects.
        """
        h = StreamHarness()
        control = h.listen()
        control.sendJson(acceptCommand())
        leg = h.connection()
        leg.handshake()
        control.drop()
        h.settle()
        h.connection().handshake()
        leg.send(BINARY, b"still here")
        self.assertEqual(leg.messages(), [(BINARY, b"still here")])

    def test_noHandlerAnswers501(self) -> None:
        """
        HTTP requests to a listener without a handler get 501.
        """
        reactor = MemoryReactorClock()
        listener = HybridListener(reactor, BASE, "hyco", lambda r: "t", streamFactory=Factory.forProtocol(Echo), pingInterval=0)
        listener.listen()
        control = RelaySide(reactor, *reactor.tcpClients.pop(0)[:3])
        control.handshake()
        control.sendJson(fullRequest())
        self.assertEqual(response(control)["statusCode"], 501)


class CancelListenTests(SynchronousTestCase):
    def test_cancelListen(self) -> None:
        """
        Cancelling C{listen()} closes the listener: nothing is retried.
        """
        h = StatusHarness()
        listening = h.start()
        side = h.connection()
        listening.cancel()
        self.failureResultOf(listening, CancelledError)
        h.settle()
        self.assertTrue(side.transport.aborted)
        self.assertEqual(h.statuses, ["connecting", "offline"])
        h.reactor.advance(3600)
        self.assertEqual(h.attempts(), 0)

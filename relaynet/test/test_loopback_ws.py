"""
The Hybrid Connections WebSocket actions over real sockets on 127.0.0.1,
with autobahn clients, over plain TCP and over TLS.
"""

from __future__ import annotations

import hashlib
import json
import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from relaynet.protocols.splice import Leg
from relaynet.test.support import KEY, KEY_NAME, Client, HandshakeRefused, RelayFixture, rawRequest


class _SilentClient(Client):
    """
    A listener whose machine is gone: it never answers a ping.
    """

    def onPing(self, payload: bytes) -> None:
        pass


class _LastWords(Client):
    """
    A listener that sends one more message before answering a close.
    """

    def onCloseFrame(self, code: int, reasonRaw: bytes) -> bool | None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(b"last words", isBinary=True)
        return super().onCloseFrame(code, reasonRaw)


class StreamBehaviour:
    """
    The stream pattern, end to end; mixed into a TCP and a TLS test case.
    """

    tls = False
    timeout = 30

    def relay(self, *args: str) -> RelayFixture:
        return RelayFixture(self, ["--entity", "hyco", "--entity", "a/b", *args], tls=self.tls)  # type: ignore[arg-type]

    async def test_acceptCommand(self) -> None:
        """
        The listener gets C{accept} with the rendezvous address, the id, the
        sender's headers less its token, and its address; the suffix and the
        sender's own query stay in the address.
        """
        relay = self.relay()
        control = await relay.listener("a/b")
        sender = relay.connect(
            relay.url("a/b/room1", "connect", relay.token("a/b"), query="tenant=7") + "&sb-hc-id=abc",
            headers={"X-Custom": "some value; other/here.", "ServiceBusAuthorization": relay.token("a/b")},
        )
        accept = json.loads((await control.messages.get())[0])["accept"]
        self.assertTrue(accept["address"].startswith(("wss" if self.tls else "ws") + f"://{relay.host}/$hc/a/b/room1?tenant=7&sb-hc-action=accept&sb-hc-id="))
        self.assertTrue(accept["id"].startswith("abc_G"))
        self.assertEqual(accept["connectHeaders"]["X-Custom"], "some value; other/here.")
        self.assertIn("Sec-WebSocket-Key", accept["connectHeaders"])
        self.assertIn("Host", accept["connectHeaders"])
        self.assertNotIn("Servicebusauthorization", accept["connectHeaders"])
        self.assertNotIn("ServiceBusAuthorization", accept["connectHeaders"])
        self.assertEqual(accept["remoteEndpoint"]["address"], "127.0.0.1")
        self.assertIsInstance(accept["remoteEndpoint"]["port"], int)
        accepted = relay.connect(accept["address"])
        await accepted.opened
        await sender.opened

    async def test_echo(self) -> None:
        """
        Binary and text messages pass both ways unchanged, type included.
        """
        relay = self.relay()
        sender, accepted = await relay.pair("hyco")
        for size in (0, 1, 125, 126, 65535, 65536, 1024 * 1024):
            data = os.urandom(size)
            sender.sendMessage(data, isBinary=True)
            self.assertEqual(await accepted.messages.get(), (data, True))
            accepted.sendMessage(data[::-1], isBinary=True)
            self.assertEqual(await sender.messages.get(), (data[::-1], True))
        sender.sendMessage("héllo".encode(), isBinary=False)
        self.assertEqual(await accepted.messages.get(), ("héllo".encode(), False))

    async def test_fragmentedMessage(self) -> None:
        """
        A message sent in several frames arrives as one message.
        """
        relay = self.relay()
        sender, accepted = await relay.pair("hyco")
        sender.beginMessage(isBinary=True)
        for part in (b"one", b"two", b"three"):
            sender.sendMessageFrame(part)
        sender.endMessage()
        self.assertEqual(await accepted.messages.get(), (b"onetwothree", True))

    async def test_subprotocol(self) -> None:
        """
        The listener's choice of subprotocol is what both sides get.
        """
        relay = self.relay()
        sender, accepted = await relay.pair("hyco", protocols=["chat.v2", "chat.v1"], listenerProtocol="chat.v1")
        self.assertEqual(sender.websocket_protocol_in_use, "chat.v1")
        self.assertEqual(accepted.websocket_protocol_in_use, "chat.v1")

    async def test_noExtension(self) -> None:
        """
        permessage-deflate offered by a sender is declined.
        """
        relay = self.relay()
        sender, accepted = await relay.pair("hyco")
        self.assertIsNone(sender.websocket_extensions_in_use or None)

    async def test_halfClose(self) -> None:
        """
        A sender's close reaches the listener, which may still send before
        answering it; the message and then the answer reach the sender.
        """
        relay = self.relay()
        sender, accepted = await relay.pair("hyco", acceptedClass=_LastWords)
        sender.sendClose(1000, "Shutdown")
        wasClean, code, reason = await accepted.closed
        self.assertEqual((accepted.remoteCloseCode, accepted.remoteCloseReason), (1000, "Shutdown"))
        wasClean, code, reason = await sender.closed
        self.assertTrue(wasClean)
        self.assertEqual(await sender.messages.get(), (b"last words", True))

    async def test_listenerAbortTakesSenderDown(self) -> None:
        """
        A listener leg whose TCP connection dies ends the sender's too.
        """
        relay = self.relay()
        sender, accepted = await relay.pair("hyco")
        accepted.transport.abortConnection()
        wasClean, code, reason = await sender.closed
        self.assertFalse(wasClean)

    async def test_noListener(self) -> None:
        relay = self.relay()
        refused = await _refusal(relay.connect(relay.url("hyco", "connect", relay.token("hyco"))))
        self.assertEqual(refused.status, 404)
        self.assertIn("There are no listeners connected for the endpoint", refused.reason)

    async def test_unknownEntity(self) -> None:
        relay = self.relay()
        refused = await _refusal(relay.connect(relay.url("nope", "connect", relay.token("nope"))))
        self.assertEqual((refused.status, refused.reason.split(".")[0]), (404, "Endpoint does not exist"))

    async def test_badToken(self) -> None:
        relay = self.relay()
        await relay.listener("hyco")
        bad = relay.token("hyco", key="d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktMTI=")
        refused = await _refusal(relay.connect(relay.url("hyco", "connect", bad)))
        self.assertEqual(refused.status, 401)
        refused = await _refusal(relay.connect(relay.url("hyco", "connect")))
        self.assertEqual(refused.status, 401)

    async def test_wrongEntityToken(self) -> None:
        relay = self.relay()
        await relay.listener("hyco")
        refused = await _refusal(relay.connect(relay.url("hyco", "connect", relay.token("a/b"))))
        self.assertEqual(refused.status, 403)

    async def test_anonymousSenders(self) -> None:
        relay = self.relay("--anonymous-senders", "hyco")
        control = await relay.listener("hyco")
        sender = relay.connect(relay.url("hyco", "connect"))
        accept = json.loads((await control.messages.get())[0])["accept"]
        accepted = relay.connect(accept["address"])
        await accepted.opened
        await sender.opened
        refused = await _refusal(relay.connect(relay.url("hyco", "listen")))
        self.assertEqual(refused.status, 401)

    async def test_reject(self) -> None:
        """
        Both spellings of the reject parameters give the sender the status
        and description; the listener's handshake gets 410.
        """
        relay = self.relay()
        control = await relay.listener("hyco")
        for prefix in ("sb-hc-", ""):
            sender = relay.connect(relay.url("hyco", "connect", relay.token("hyco")))
            accept = json.loads((await control.messages.get())[0])["accept"]
            rejecting = relay.connect(accept["address"] + f"&{prefix}statusCode=401&{prefix}statusDescription=Go%20away")
            self.assertEqual((await _refusal(rejecting)).status, 410)
            refused = await _refusal(sender)
            self.assertEqual((refused.status, refused.reason), (401, "Go away"))

    async def test_acceptTimeout(self) -> None:
        relay = self.relay("--accept-timeout", "0.3")
        control = await relay.listener("hyco")
        sender = relay.connect(relay.url("hyco", "connect", relay.token("hyco")))
        accept = json.loads((await control.messages.get())[0])["accept"]
        refused = await _refusal(sender)
        self.assertEqual(refused.status, 404)
        self.assertIn("accepted the connection within the allowed timeout", refused.reason)
        late = await _refusal(relay.connect(accept["address"]))
        self.assertEqual(late.status, 404)
        self.assertEqual(len(relay.relay.rendezvous), 0)

    async def test_senderLeavesWhileWaiting(self) -> None:
        """
        A sender that goes away while its listener decides frees its place
        at once, and a late accept is refused.
        """
        relay = self.relay()
        control = await relay.listener("hyco")
        sender = relay.connect(relay.url("hyco", "connect", relay.token("hyco")))
        accept = json.loads((await control.messages.get())[0])["accept"]
        sender.transport.loseConnection()
        await _refusal(sender)
        await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(len(relay.relay.rendezvous), 0)
        self.assertEqual((await _refusal(relay.connect(accept["address"]))).status, 404)

    async def test_listenerLimit(self) -> None:
        relay = self.relay("--max-listeners", "2")
        await relay.listener("hyco")
        await relay.listener("hyco")
        refused = await _refusal(relay.connect(relay.url("hyco", "listen", relay.token("hyco"))))
        self.assertEqual(refused.status, 403)
        self.assertIn("MaximumListenersPerEndpoint", refused.reason)

    async def test_spread(self) -> None:
        """
        Senders are spread over the listeners of an entity.
        """
        relay = self.relay()
        controls = [await relay.listener("hyco") for _ in range(3)]
        senders = [relay.connect(relay.url("hyco", "connect", relay.token("hyco"))) for _ in range(30)]
        await deferLater(reactor, 0.5, lambda: None)
        counts = [len(c.messages.pending) for c in controls]
        self.assertEqual(sum(counts), 30)
        self.assertTrue(all(counts), counts)
        for s in senders:
            s.opened.addErrback(lambda f: f.trap(HandshakeRefused))
            s.transport.loseConnection()

    async def test_listenerGoneIsForgotten(self) -> None:
        relay = self.relay()
        control = await relay.listener("hyco")
        control.sendClose(1000)
        await control.closed
        await deferLater(reactor, 0.05, lambda: None)
        entity = relay.relay.namespace.get("hyco")
        self.assertEqual(relay.relay.registry.listenerCount(entity), 0)

    async def test_deadListenerDropped(self) -> None:
        relay = self.relay("--ping-interval", "0.1", "--ping-timeout", "0.3")
        control = await relay.listener("hyco", protocolClass=_SilentClient)
        await control.closed
        entity = relay.relay.namespace.get("hyco")
        self.assertEqual(relay.relay.registry.listenerCount(entity), 0)

    async def test_renewToken(self) -> None:
        """
        A valid renewal keeps the channel; a bad one closes it with 1008.
        """
        relay = self.relay()
        control = await relay.listener("hyco")
        control.sendMessage(json.dumps({"renewToken": {"token": relay.token("hyco")}}).encode())
        control.sendMessage(b"not json")
        control.sendMessage(json.dumps({"message": "hi"}).encode())
        await deferLater(reactor, 0.1, lambda: None)
        self.assertFalse(control.closed.called)
        control.sendMessage(json.dumps({"renewToken": {"token": relay.token("a/b")}}).encode())
        wasClean, code, reason = await control.closed
        self.assertEqual(control.remoteCloseCode, 1008)
        self.assertIn("Token renewal failed", control.remoteCloseReason)

    async def test_oversizedControlMessage(self) -> None:
        relay = self.relay()
        control = await relay.listener("hyco")
        control.sendMessage(b"x" * 70000)
        await control.closed
        self.assertEqual(control.remoteCloseCode, 1009)
        other = await relay.listener("hyco")
        self.assertTrue(other.opened.called)

    async def test_dynamicEntity(self) -> None:
        relay = self.relay("--dynamic-entities")
        control = await relay.listener("made/on/the/fly")
        sender = relay.connect(relay.url("made/on/the/fly/x", "connect", relay.token("made/on/the/fly")))
        await control.messages.get()
        control.sendClose(1000)
        await control.closed
        await _refusal(sender)
        await deferLater(reactor, 0.05, lambda: None)
        self.assertIsNone(relay.relay.namespace.get("made/on/the/fly"))

    async def test_noDynamicEntityByDefault(self) -> None:
        relay = self.relay()
        refused = await _refusal(relay.connect(relay.url("other", "listen", relay.token("other"))))
        self.assertEqual(refused.status, 404)


class StreamOverTCPTests(StreamBehaviour, TestCase):
    async def test_backpressure(self) -> None:
        """
        A sender pushing into a listener that does not read is stopped by
        the relay: what the sender gets rid of stays bounded (kernel buffers
        and a read's worth in the relay), and once the listener reads,
        everything arrives intact.
        """
        relay = self.relay()
        sender, accepted = await relay.pair("hyco")
        accepted.transport.pauseProducing()
        pushed = hashlib.sha256()
        total = 0
        chunk = os.urandom(256 * 1024)
        pusher = _Pusher()
        sender.transport.registerProducer(pusher, True)
        limit = 256 * 1024 * 1024
        while total < limit:
            if pusher.paused:
                pusher.resumed = Deferred()
                pusher.resumed.addTimeout(1.0, reactor)
                try:
                    await pusher.resumed
                except TimeoutError:
                    break
            sender.sendMessage(chunk, isBinary=True)
            pushed.update(chunk)
            total += len(chunk)
        self.assertLess(total, 64 * 1024 * 1024, "the sender was never stopped")
        legs = [p for p in relay.service.websockets.connections if isinstance(p.role, Leg)]
        self.assertEqual(len(legs), 2)
        self.assertTrue(any(p.transport.producerPaused for p in legs))
        accepted.transport.resumeProducing()
        received = hashlib.sha256()
        got = 0
        while got < total:
            payload, isBinary = await accepted.messages.get()
            received.update(payload)
            got += len(payload)
        self.assertEqual(received.hexdigest(), pushed.hexdigest())


class _Pusher:
    """
    A producer that notes when the sender's transport asks it to pause.
    """

    paused = False
    resumed: Deferred[None] | None = None

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.resumed is not None and not self.resumed.called:
            self.resumed.callback(None)

    def stopProducing(self) -> None:
        pass


class StreamOverTLSTests(StreamBehaviour, TestCase):
    tls = True


class FrontDoorTests(TestCase):
    timeout = 30

    async def test_notWebSocket(self) -> None:
        relay = RelayFixture(self, ["--entity", "hyco"])
        status, reason, body = await rawRequest(
            relay.port, b"GET /$hc/hyco HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual((status, reason), (400, "This endpoint is only for web-socket requests"))
        self.assertIn(b'"code": "BadRequest"', body)

    async def test_unknownAction(self) -> None:
        relay = RelayFixture(self, ["--entity", "hyco"])
        refused = await _refusal(relay.connect(relay.url("hyco", "dance", relay.token("hyco"))))
        self.assertEqual((refused.status, refused.reason), (400, "Unsupported action 'dance'."))

    async def test_garbage(self) -> None:
        """
        A request that is not HTTP gets 400 and does not disturb a listener.
        """
        relay = RelayFixture(self, ["--entity", "hyco"])
        control = await relay.listener("hyco")
        status, reason, body = await rawRequest(relay.port, b"\x16\x03\x01garbage\r\n\r\n")
        self.assertEqual(status, 400)
        self.assertEqual(control.state, control.STATE_OPEN)

    async def test_missingHost(self) -> None:
        relay = RelayFixture(self, ["--entity", "hyco"])
        status, reason, body = await rawRequest(
            relay.port,
            b"GET /$hc/hyco?sb-hc-action=listen HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        self.assertEqual(status, 400)

    async def test_keyNameInLog(self) -> None:
        """
        The token of a refused request is not echoed back.
        """
        relay = RelayFixture(self, ["--entity", "hyco"])
        token = relay.token("hyco", key="d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktMTI=")
        refused = await _refusal(relay.connect(relay.url("hyco", "connect", token)))
        self.assertNotIn(token.split("sig=")[1].split("&")[0], refused.reason)
        self.assertNotIn(KEY_NAME + "=", refused.reason)


async def _refusal(client: Client) -> HandshakeRefused:
    try:
        await client.opened
    except HandshakeRefused as e:
        return e
    raise AssertionError("the handshake was not refused")


class QuickstartTests(TestCase):
    """
    The quickstart's example runs as written against a relay.
    """

    timeout = 60

    async def test_echoExample(self) -> None:
        import sys

        from twisted.internet.utils import getProcessOutputAndValue

        relay = RelayFixture(self, ["--dynamic-entities"])
        example = os.path.join(os.path.dirname(__file__), "..", "..", "doc", "examples", "echo.py")
        connection = f"Endpoint=sb://{relay.host}/;SharedAccessKeyName={KEY_NAME};SharedAccessKey={KEY}"
        out, err, code = await getProcessOutputAndValue(
            sys.executable, [example, connection, "echo"], env=dict(os.environ), reactor=reactor
        )
        self.assertEqual(code, 0, err)
        self.assertIn(b"echoed: hello through the relay", out)

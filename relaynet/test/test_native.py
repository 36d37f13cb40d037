"""
Native streams (raw bytes after an HTTP upgrade to C{relaynet-stream})
through a real relay on 127.0.0.1: the same behaviour as the WebSocket
path, for every pairing of a native or WebSocket sender with a native or
WebSocket listener, over TCP and over TLS.
"""

from __future__ import annotations

import hashlib
import os
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from relaynet.listener import HybridListener
from relaynet.protocols import zerocopy
from relaynet.protocols.websocket import HybridConnectionProtocol, atRest
from relaynet.streams import (
    AuthorizationError,
    ConnectTimeoutError,
    EndpointNotFoundError,
    NoListenerError,
    RejectedError,
    RelayAddress,
    connectStream,
)
from relaynet.test.support import KEY, KEY_NAME, RelayFixture, waitFor
from relaynet.tokens import fixedToken, fromKey


class Sink(Protocol):
    """
    Keeps what it receives, and how its connection ended.
    """

    def __init__(self) -> None:
        self.received = bytearray()
        self.ended: Deferred[Any] = Deferred()
        self.readEnded = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.ended.callback(reason.value if reason is not None else None)


@implementer(IHalfCloseableProtocol)
class HalfSink(Sink):
    """
    A sink that sees the end of its input before its connection's end,
    and then closes, as a half-closeable protocol on TCP does.
    """

    def readConnectionLost(self) -> None:
        self.readEnded = True
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass


class Echo(Protocol):
    """
    Sends back what it gets; remembers its addresses.
    """

    def connectionMade(self) -> None:
        self.factory.accepted.append(self)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


@implementer(IHalfCloseableProtocol)
class Answerer(Protocol):
    """
    Reads the whole request, and answers with its digest once the sender
    has finished sending; then closes.
    """

    def connectionMade(self) -> None:
        self.digest = hashlib.sha256()

    def dataReceived(self, data: bytes) -> None:
        self.digest.update(data)

    def readConnectionLost(self) -> None:
        self.transport.write(self.digest.hexdigest().encode("ascii"))  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass


class Slow(Protocol):
    """
    Reads nothing until told to.
    """

    def connectionMade(self) -> None:
        self.received = 0
        self.transport.pauseProducing()  # type: ignore[union-attr]
        self.factory.accepted.append(self)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)


class _Behaviour:
    """
    The behaviour suite; subclasses choose each side's transport and TLS.
    """

    senderNative = True
    listenerNative = True
    tls = False
    timeout = 60

    def setUp(self) -> None:
        self.relay = RelayFixture(self, ["--entity", "hyco", "--entity", "other", "--accept-timeout", "2"], tls=self.tls)  # type: ignore[arg-type]
        self.url = f"{'wss' if self.tls else 'ws'}://{self.relay.host}"
        self.trustRoot = None
        if self.tls:
            with open(self.relay.certPath or "", "rb") as f:
                self.trustRoot = Certificate.loadPEM(f.read())

    async def listen(self, factory: Factory, entity: str = "hyco", **kwargs: Any) -> HybridListener:
        listener = HybridListener(
            reactor, self.url, entity, fromKey(KEY_NAME, KEY, reactor), streamFactory=factory,
            trustRoot=self.trustRoot, native=self.listenerNative, **kwargs
        )
        self.addCleanup(listener.close)  # type: ignore[attr-defined]
        await listener.listen()
        return listener

    def send(self, factory: Factory, entity: str = "hyco", tokens: Any = "key", **kwargs: Any) -> Deferred[Any]:
        if tokens == "key":
            tokens = fromKey(KEY_NAME, KEY, reactor)
        return connectStream(
            reactor, self.url, entity, tokens, factory, trustRoot=self.trustRoot, native=self.senderNative, **kwargs
        )

    def echoFactory(self) -> Factory:
        factory = Factory.forProtocol(Echo)
        factory.accepted = []  # type: ignore[attr-defined]
        return factory

    async def test_echo(self) -> None:
        """
        Bytes of every size come back unchanged, and the listener's
        transport names the relay and the sender.
        """
        echo = self.echoFactory()
        await self.listen(echo)
        sink = await self.send(Factory.forProtocol(Sink))
        self.addCleanup(sink.transport.loseConnection)
        sent = b""
        for size in (1, 100, 65536, 65537, 1024 * 1024 + 3):
            payload = os.urandom(size)
            sent += payload
            sink.transport.write(payload)
        await waitFor(lambda: len(sink.received) >= len(sent))
        self.assertEqual(bytes(sink.received), sent)
        [accepted] = echo.accepted  # type: ignore[attr-defined]
        self.assertEqual(accepted.transport.getHost(), RelayAddress(self.url, "hyco"))
        peer = accepted.transport.getPeer()
        self.assertIsInstance(peer, RelayAddress)
        self.assertEqual(peer.host, "127.0.0.1")
        self.assertEqual(sink.transport.getPeer(), RelayAddress(self.url, "hyco"))

    async def test_manyStreams(self) -> None:
        """
        Concurrent streams stay apart.
        """
        await self.listen(self.echoFactory())
        sinks = [await self.send(Factory.forProtocol(Sink)) for _ in range(8)]
        payloads = [os.urandom(200000) for _ in sinks]
        for sink, payload in zip(sinks, payloads):
            self.addCleanup(sink.transport.loseConnection)
            sink.transport.write(payload)
        await waitFor(lambda: all(len(s.received) >= len(p) for s, p in zip(sinks, payloads)))
        self.assertEqual([bytes(s.received) for s in sinks], payloads)

    async def test_halfClose(self) -> None:
        """
        The sender ends its side; the listener reads to the end, answers,
        and closes; the sender gets the whole answer and a clean end.
        """
        await self.listen(Factory.forProtocol(Answerer))
        sink = await self.send(Factory.forProtocol(HalfSink))
        payload = os.urandom(3 * 1024 * 1024)
        sink.transport.write(payload)
        sink.transport.loseWriteConnection()
        reason = await sink.ended
        self.assertEqual(bytes(sink.received), hashlib.sha256(payload).hexdigest().encode("ascii"))
        self.assertIsInstance(reason, ConnectionDone)

    async def test_listenerCloses(self) -> None:
        """
        A listener that closes ends the sender's stream cleanly, after all
        it wrote.
        """
        class Closer(Protocol):
            def connectionMade(self) -> None:
                self.transport.write(b"bye" * 1000)  # type: ignore[union-attr]
                self.transport.loseConnection()  # type: ignore[union-attr]

        await self.listen(Factory.forProtocol(Closer))
        sink = await self.send(Factory.forProtocol(Sink))
        reason = await sink.ended
        self.assertEqual(bytes(sink.received), b"bye" * 1000)
        self.assertIsInstance(reason, ConnectionDone)

    async def test_backpressure(self) -> None:
        """
        A listener that does not read stops the sender: the sender's
        transport pauses its producer, and the relay holds a bounded amount
        (socket buffers and at most a pipe), not the stream.
        """
        slow = Factory.forProtocol(Slow)
        slow.accepted = []  # type: ignore[attr-defined]
        await self.listen(slow)
        sink = await self.send(Factory.forProtocol(Sink))
        self.addCleanup(sink.transport.loseConnection)
        paused: list[bool] = []

        @implementer(IPushProducer)
        class Producer:
            def pauseProducing(self) -> None:
                paused.append(True)

            def resumeProducing(self) -> None:
                paused.append(False)

            def stopProducing(self) -> None:
                pass

        sink.transport.registerProducer(Producer(), True)
        chunk = os.urandom(256 * 1024)
        written = 0
        while not (paused and paused[-1]) and written < 512 * 1024 * 1024:
            sink.transport.write(chunk)
            written += len(chunk)
            await deferLater(reactor, 0, lambda: None)
        self.assertTrue(paused and paused[-1], "the sender was never paused")
        self.assertLess(written, 64 * 1024 * 1024)
        [receiver] = slow.accepted  # type: ignore[attr-defined]
        self.assertEqual(receiver.received, 0)
        receiver.transport.resumeProducing()
        await waitFor(lambda: receiver.received >= written)
        self.assertEqual(receiver.received, written)

    async def test_relayStops(self) -> None:
        """
        A relay that stops ends its open streams: the sender's stream ends.
        """
        await self.listen(self.echoFactory())
        sink = await self.send(Factory.forProtocol(Sink))
        sink.transport.write(b"ping")
        await waitFor(lambda: len(sink.received) >= 4)
        self.relay.service.websockets.goAway()
        await sink.ended
        self.assertEqual(bytes(sink.received), b"ping")

    async def test_noListener(self) -> None:
        with self.assertRaises(NoListenerError) as e:
            await self.send(Factory.forProtocol(Sink))
        self.assertEqual(e.exception.status, 404)

    async def test_unknownEntity(self) -> None:
        with self.assertRaises(EndpointNotFoundError):
            await self.send(Factory.forProtocol(Sink), entity="nowhere")

    async def test_badToken(self) -> None:
        await self.listen(self.echoFactory())
        with self.assertRaises(AuthorizationError) as e:
            await self.send(Factory.forProtocol(Sink), tokens=fixedToken("SharedAccessSignature sr=x&sig=y&se=1&skn=z"))
        self.assertEqual(e.exception.status, 401)

    async def test_wrongKey(self) -> None:
        await self.listen(self.echoFactory())
        wrong = fromKey(KEY_NAME, "d3Jvbmcta2V5", reactor)
        with self.assertRaises(AuthorizationError):
            await self.send(Factory.forProtocol(Sink), tokens=wrong)

    async def test_rejected(self) -> None:
        await self.listen(self.echoFactory(), acceptHandler=lambda request: (451, "Not here"))
        with self.assertRaises(RejectedError) as e:
            await self.send(Factory.forProtocol(Sink))
        self.assertEqual((e.exception.status, e.exception.reason), (451, "Not here"))

    async def test_acceptTimeout(self) -> None:
        """
        A listener that never decides: the sender is answered at the
        relay's accept deadline (2 s here).
        """
        never: Deferred[bool] = Deferred()
        self.addCleanup(lambda: never.called or never.callback(False))
        await self.listen(self.echoFactory(), acceptHandler=lambda request: never)
        with self.assertRaises(ConnectTimeoutError):
            await self.send(Factory.forProtocol(Sink))

    async def test_senderLeavesWhileWaiting(self) -> None:
        """
        A sender that gives up while its listener decides frees its place;
        the listener, accepting late, is refused and the relay stays well.
        """
        decided: Deferred[bool] = Deferred()
        self.addCleanup(lambda: decided.called or decided.callback(False))
        await self.listen(self.echoFactory(), acceptHandler=lambda request: decided)
        connecting = self.send(Factory.forProtocol(Sink))
        await waitFor(lambda: len(self.relay.relay.rendezvous) == 1)
        connecting.cancel()
        with self.assertRaises(Exception):
            await connecting
        await waitFor(lambda: len(self.relay.relay.rendezvous) == 0)
        decided.callback(True)
        await deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(len(self.relay.relay.rendezvous), 0)


class NativeTCPTests(_Behaviour, TestCase):
    """
    Native on both sides, plain TCP: the relay splices in the kernel.
    """

    async def test_kernelSplice(self) -> None:
        """
        The relay hands native-to-native streams on TCP to the kernel.
        """
        started: list[Any] = []
        original = zerocopy.KernelSplice.start

        def start(self: zerocopy.KernelSplice) -> None:
            started.append(self)
            original(self)

        self.patch(zerocopy.KernelSplice, "start", start)
        await self.listen(self.echoFactory())
        sink = await self.send(Factory.forProtocol(Sink))
        self.addCleanup(sink.transport.loseConnection)
        sink.transport.write(b"x" * 1000)
        await waitFor(lambda: len(sink.received) >= 1000)
        self.assertEqual(len(started), 1 if zerocopy.available(reactor) else 0)


class NativeTLSTests(_Behaviour, TestCase):
    tls = True

    async def test_halfClose(self) -> None:
        """
        TLS has no half-close in Twisted: ending the sending side ends the
        stream; the listener still sees all that was sent.
        """
        received: list[Sink] = []

        class Receiver(Sink):
            def connectionMade(self) -> None:
                received.append(self)

        await self.listen(Factory.forProtocol(Receiver))
        sink = await self.send(Factory.forProtocol(Sink))
        sink.transport.write(b"abc")
        sink.transport.loseConnection()
        reason = await sink.ended
        self.assertIsInstance(reason, ConnectionDone)
        [listener] = received
        self.assertIsInstance(await listener.ended, ConnectionDone)
        self.assertEqual(bytes(listener.received), b"abc")


    def rawSender(self, payload: bytes, closeNotify: bool) -> None:
        """
        What a plain TLS client may do (Python's C{ssl} here): upgrade, send
        C{payload} without reading again, then close the socket at once,
        after its close_notify or without one.  The relay's answer to the
        close_notify finds the socket closed.
        """
        import ssl

        context = ssl.create_default_context(cafile=self.relay.certPath)
        context.check_hostname = False
        raw = socket.create_connection(("127.0.0.1", self.relay.port), timeout=10)
        sock = context.wrap_socket(raw)
        sock.sendall(
            f"GET /$hc/hyco?sb-hc-action=connect HTTP/1.1\r\nHost: {self.relay.host}\r\n"
            f"Upgrade: relaynet-stream\r\nConnection: Upgrade\r\n"
            f"ServiceBusAuthorization: {self.relay.token('hyco')}\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101 "), head
        sock.sendall(payload)
        if closeNotify:
            sock.setblocking(False)
            try:
                sock.unwrap()
            except ssl.SSLWantReadError:
                # Our close_notify is out; the relay's is not waited for.
                pass
        raw.close()

    async def endsAfterSending(self, closeNotify: bool) -> tuple[Sink, bytes]:
        """
        L{rawSender} sends 4 MiB to a native listener that reads nothing
        until the sender is gone (so the relay still holds bytes for it when
        the sender's end arrives); the listener's protocol, once its
        connection has ended, and what was sent.
        """
        received: list[Sink] = []

        class Receiver(Sink):
            def connectionMade(self) -> None:
                received.append(self)

        await self.listen(Factory.forProtocol(Receiver))
        payload = os.urandom(4 * 1024 * 1024)
        sending = deferToThreadish(self.rawSender, payload, closeNotify)
        await waitFor(lambda: received)
        received[0].transport.pauseProducing()  # type: ignore[union-attr]
        await sending
        await deferLater(reactor, 0.2, lambda: None)
        received[0].transport.resumeProducing()  # type: ignore[union-attr]
        await waitFor(lambda: received[0].ended.called)
        return received[0], payload

    async def test_closeNotifyThenClose(self) -> None:
        """
        A sender that sends its close_notify and closes its socket without
        waiting for the relay's (as TLS 1.3 allows) has ended cleanly: all
        it sent reaches the listener, then a clean end.
        """
        listener, payload = await self.endsAfterSending(closeNotify=True)
        self.assertEqual(hashlib.sha256(listener.received).digest(), hashlib.sha256(payload).digest())
        self.assertIsInstance(await listener.ended, ConnectionDone)

    async def test_noCloseNotify(self) -> None:
        """
        A sender that closes its socket without a close_notify has not
        ended its TLS stream, as TLS has it (the end could be anyone's):
        the relay treats it as broken and resets the listener's side.  What
        the listener got is the start of what was sent, nothing else.
        """
        listener, payload = await self.endsAfterSending(closeNotify=False)
        ended = await listener.ended
        self.assertNotIsInstance(ended, ConnectionDone)
        self.assertEqual(bytes(listener.received), payload[: len(listener.received)])


class NativeSenderWebSocketListenerTests(_Behaviour, TestCase):
    listenerNative = False


class WebSocketSenderNativeListenerTests(_Behaviour, TestCase):
    senderNative = False


class NativeSenderWebSocketListenerTLSTests(_Behaviour, TestCase):
    listenerNative = False
    tls = True
    test_halfClose = NativeTLSTests.test_halfClose


class RawWireTests(TestCase):
    """
    The upgrade on the wire, with a plain socket: what any client in any
    language would do.
    """

    timeout = 30

    def setUp(self) -> None:
        self.relay = RelayFixture(self, ["--entity", "hyco"])

    def exchange(self, request: bytes) -> bytes:
        sock = socket.create_connection(("127.0.0.1", self.relay.port), timeout=10)
        try:
            sock.sendall(request)
            answer = b""
            while True:
                data = sock.recv(65536)
                if not data:
                    return answer
                answer += data
        finally:
            sock.close()

    async def test_noListenerAnswer(self) -> None:
        """
        A refusal is an HTTP answer with the JSON error body, then a close.
        """
        token = self.relay.token("hyco")
        request = (
            f"GET /$hc/hyco?sb-hc-action=connect HTTP/1.1\r\nHost: {self.relay.host}\r\n"
            f"Upgrade: relaynet-stream\r\nConnection: Upgrade\r\nServiceBusAuthorization: {token}\r\n\r\n"
        ).encode()
        answer = await deferToThreadish(self.exchange, request)
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 404 "), head)
        self.assertIn(b'"code"', body)

    async def test_noDelay(self) -> None:
        """
        Every connection the relay takes sets TCP_NODELAY.
        """
        from relaynet.protocols.request import RelayHttpChannel

        seen: list[bool] = []
        original = RelayHttpChannel.connectionMade

        def made(channel: RelayHttpChannel) -> None:
            original(channel)
            seen.append(channel.transport.getTcpNoDelay())  # type: ignore[union-attr]

        self.patch(RelayHttpChannel, "connectionMade", made)
        await deferToThreadish(self.exchange, f"GET / HTTP/1.1\r\nHost: {self.relay.host}\r\nConnection: close\r\n\r\n".encode())
        self.assertEqual(seen, [True])

    async def test_unknownAction(self) -> None:
        request = (
            f"GET /$hc/hyco?sb-hc-action=listen HTTP/1.1\r\nHost: {self.relay.host}\r\n"
            "Upgrade: relaynet-stream\r\nConnection: Upgrade\r\n\r\n"
        ).encode()
        answer = await deferToThreadish(self.exchange, request)
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:100])
        self.assertIn(b"not 'listen'", answer)


def deferToThreadish(f: Any, *args: Any) -> Deferred[Any]:
    from twisted.internet.threads import deferToThread

    return deferToThread(f, *args)


class FootprintTests(TestCase):
    """
    What an open WebSocket costs the relay stays small (bench/idle.py
    measures it; these guard what it relies on).
    """

    timeout = 30

    def setUp(self) -> None:
        self.relay = RelayFixture(self, ["--entity", "hyco", "--entity", "idle"])

    async def test_smallAttributeTables(self) -> None:
        """
        An open control channel or leg keeps at most 42 attributes in its
        own C{__dict__}, the most CPython 3.11 keeps in its smaller table,
        and nothing of its handshake's request.  Those at rest are read from
        the class, with the value they had.
        """
        control = await self.relay.listener("idle")
        await self.relay.pair("hyco")
        self.addCleanup(lambda: control.sendClose(1000))
        connections = list(self.relay.service.websockets.connections)
        self.assertGreaterEqual(len(connections), 3)
        for proto in connections:
            self.assertLessEqual(len(proto.__dict__), 42, sorted(proto.__dict__))
            self.assertEqual((proto.info.headers, proto.info.query), ([], {}))
            self.assertNotIn("send_queue", proto.__dict__)
            self.assertNotIn("trafficStats", proto.__dict__)
            self.assertEqual([name for name, value in vars(proto).items() if atRest(name, value)], [])
            self.assertEqual(
                (proto.wasClean, proto.closeHandshakeTimeoutCall, proto.data, proto.websocket_version),
                (False, None, b"", 13),
            )

    async def test_compactAfterPings(self) -> None:
        """
        A listener's control channel that has been pinged and has answered
        is compacted again: what autobahn wrote back at rest leaves it, and
        it keeps at most 21 entries (the smallest table but one) between
        pings.
        """
        relay = RelayFixture(self, ["--entity", "pinged", "--ping-interval", "0.2", "--ping-timeout", "5"])
        seen: list[tuple[list[str], list[str]]] = []

        def look(proto: HybridConnectionProtocol) -> None:
            state = vars(proto)
            seen.append(([name for name, value in state.items() if atRest(name, value)], sorted(state)))

        original = HybridConnectionProtocol.onPong

        def onPong(proto: HybridConnectionProtocol, payload: bytes) -> None:
            original(proto, payload)
            # Once the frame is done with.
            reactor.callLater(0, look, proto)

        self.patch(HybridConnectionProtocol, "onPong", onPong)
        control = await relay.listener("pinged")
        self.addCleanup(lambda: control.sendClose(1000))
        await waitFor(lambda: len(seen) >= 3)
        for resting, names in seen:
            self.assertEqual(resting, [])
            self.assertNotIn("current_frame_masker", names)
            self.assertLessEqual(len(names), 21, names)

    async def test_closeAfterCompaction(self) -> None:
        """
        A compacted connection closes as any other: what the close writes
        goes back into its own C{__dict__}, not the class's.
        """
        control = await self.relay.listener("idle")
        [proto] = list(self.relay.service.websockets.connections)
        control.sendClose(1000)
        await control.closed
        await waitFor(lambda: proto.state == proto.STATE_CLOSED)
        self.assertEqual((proto.wasClean, proto.remoteCloseCode), (True, 1000))
        self.assertEqual((HybridConnectionProtocol.wasClean, HybridConnectionProtocol.remoteCloseCode), (False, None))


class NativePartyTests(TestCase):
    """
    L{NativeParty} with a request whose client is already gone.
    """

    def test_clientAlreadyGone(self) -> None:
        from twisted.internet.defer import fail
        from twisted.internet.error import ConnectionLost

        from relaynet.protocols.native import NativeParty

        class GoneRequest:
            def notifyFinish(self) -> Deferred[None]:
                return fail(ConnectionLost())

        party = NativeParty(GoneRequest(), None, set())  # type: ignore[arg-type]
        self.assertTrue(party.gone)
        called: list[bool] = []
        party.whenGone(lambda: called.append(True))
        self.assertEqual(called, [True])

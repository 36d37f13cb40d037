"""
relaynet.streams over a real relay on 127.0.0.1: a sender's protocol
reaches a listener, and each refusal is its own exception.
"""

from __future__ import annotations

import json

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from zope.interface import implementer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from relaynet.streams import (
    AuthorizationError,
    ConnectTimeoutError,
    EndpointNotFoundError,
    MessageProtocol,
    NoListenerError,
    RelayAddress,
    RejectedError,
    connectStream,
)
from relaynet.test.support import KEY, KEY_NAME, RelayFixture
from relaynet.tokens import fixedToken, fromKey


class Collect(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.ended: Deferred[BaseException] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure) -> None:
        self.ended.callback(reason.value)


class Messages(MessageProtocol):
    def __init__(self) -> None:
        self.messages: list[tuple[bytes, bool]] = []

    def messageReceived(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append((payload, isBinary))


class ConnectStreamTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.relay = RelayFixture(self, ["--entity", "hyco", "--accept-timeout", "0.5"])
        self.url = f"ws://{self.relay.host}"
        self.tokens = fromKey(KEY_NAME, KEY, reactor)

    async def accepting(self, extra: str = "") -> tuple[Deferred[object], object]:
        """
        A listener that takes the next sender (or rejects it, with C{extra}).
        """
        control = await self.relay.listener("hyco")
        accepted: Deferred[object] = Deferred()

        def take(message: tuple[bytes, bool]) -> None:
            accept = json.loads(message[0])["accept"]
            leg = self.relay.connect(accept["address"] + extra)
            if extra:
                leg.opened.addErrback(lambda f: None)
                accepted.callback(accept)
            else:
                leg.opened.addCallback(lambda _: accepted.callback((accept, leg)))

        control.messages.get().addCallback(take)
        return accepted, control

    async def test_bytesBothWays(self) -> None:
        accepted, _ = await self.accepting()
        proto = await connectStream(reactor, self.url, "hyco", self.tokens, Factory.forProtocol(Collect), headers={"X-App": "1"})
        accept, leg = await accepted
        self.assertEqual(accept["connectHeaders"]["X-App"], "1")
        self.assertEqual(proto.transport.getPeer(), RelayAddress(self.url, "hyco"))
        proto.transport.write(b"hello")
        self.assertEqual(await leg.messages.get(), (b"hello", True))
        leg.sendMessage(b"world", isBinary=True)
        while proto.received != b"world":
            await deferLater()
        leg.sendClose(1000)
        self.assertIsInstance(await proto.ended, ConnectionDone)

    async def test_messages(self) -> None:
        accepted, _ = await self.accepting()
        proto = await connectStream(reactor, self.url, "hyco", self.tokens, Factory.forProtocol(Messages))
        accept, leg = await accepted
        leg.sendMessage(b"text", isBinary=False)
        leg.sendMessage(b"\x00bin", isBinary=True)
        while len(proto.messages) < 2:
            await deferLater()
        self.assertEqual(proto.messages, [(b"text", False), (b"\x00bin", True)])
        await proto.whenWritable()
        proto.sendMessage(b"back", isBinary=False)
        self.assertEqual(await leg.messages.get(), (b"back", False))

    async def test_noListener(self) -> None:
        with self.assertRaises(NoListenerError) as e:
            await connectStream(reactor, self.url, "hyco", self.tokens, Factory.forProtocol(Collect))
        self.assertEqual(e.exception.status, 404)

    async def test_unknownEntity(self) -> None:
        with self.assertRaises(EndpointNotFoundError):
            await connectStream(reactor, self.url, "nope", self.tokens, Factory.forProtocol(Collect))

    async def test_badToken(self) -> None:
        await self.relay.listener("hyco")
        with self.assertRaises(AuthorizationError) as e:
            await connectStream(reactor, self.url, "hyco", fromKey(KEY_NAME, "d3Jvbmc=", reactor), Factory.forProtocol(Collect))
        self.assertEqual(e.exception.status, 401)
        with self.assertRaises(AuthorizationError):
            await connectStream(reactor, self.url, "hyco", None, Factory.forProtocol(Collect))
        with self.assertRaises(ValueError):
            fixedToken("not a token")

    async def test_rejected(self) -> None:
        accepted, _ = await self.accepting("&sb-hc-statusCode=451&sb-hc-statusDescription=Not%20here")
        with self.assertRaises(RejectedError) as e:
            await connectStream(reactor, self.url, "hyco", self.tokens, Factory.forProtocol(Collect))
        self.assertEqual((e.exception.status, e.exception.reason), (451, "Not here"))

    async def test_timedOut(self) -> None:
        await self.relay.listener("hyco")
        with self.assertRaises(ConnectTimeoutError):
            await connectStream(reactor, self.url, "hyco", self.tokens, Factory.forProtocol(Collect))


def deferLater() -> Deferred[None]:
    from twisted.internet.task import deferLater as later

    return later(reactor, 0.01, lambda: None)


class Failing(Protocol):
    def connectionMade(self) -> None:
        raise RuntimeError("the application broke")


class StreamEdgeTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.relay = RelayFixture(self, ["--entity", "hyco"])
        self.url = f"ws://{self.relay.host}"
        self.tokens = fromKey(KEY_NAME, KEY, reactor)

    async def test_cancelBeforeAccept(self) -> None:
        """
        A cancelled connectStream drops the sender at once; the relay
        forgets it and a late accept finds nothing.
        """
        control = await self.relay.listener("hyco")
        connecting = connectStream(reactor, self.url, "hyco", self.tokens, Factory.forProtocol(Collect))
        accept = json.loads((await control.messages.get())[0])["accept"]
        connecting.cancel()
        self.failureResultOf(connecting)
        while len(self.relay.relay.rendezvous):
            await deferLater()
        late = self.relay.connect(accept["address"])
        from relaynet.test.support import HandshakeRefused

        with self.assertRaises(HandshakeRefused):
            await late.opened

    async def test_connectionMadeFails(self) -> None:
        """
        A protocol whose connectionMade raises fails the connect, and the
        stream is dropped.
        """
        control = await self.relay.listener("hyco")
        connecting = connectStream(reactor, self.url, "hyco", self.tokens, Factory.forProtocol(Failing))
        accept = json.loads((await control.messages.get())[0])["accept"]
        leg = self.relay.connect(accept["address"])
        with self.assertRaises(RuntimeError):
            await connecting
        await leg.closed

    async def test_whenWritableFailsOnceLost(self) -> None:
        control = await self.relay.listener("hyco")
        connecting = connectStream(reactor, self.url, "hyco", self.tokens, Factory.forProtocol(Messages))
        accept = json.loads((await control.messages.get())[0])["accept"]
        leg = self.relay.connect(accept["address"])
        proto = await connecting
        await leg.opened
        leg.transport.abortConnection()
        while proto.transport._socket.state != proto.transport._socket.STATE_CLOSED:
            await deferLater()
        from twisted.internet.error import ConnectionLost

        with self.assertRaises(ConnectionLost):
            await proto.whenWritable()


@implementer(IHalfCloseableProtocol)
class HalfCloser(Collect):
    """
    Answers once the other side is done sending, then closes.
    """

    def readConnectionLost(self) -> None:
        self.transport.write(b"answer after your end")
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class HalfCloseTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.relay = RelayFixture(self, ["--entity", "hyco"])
        self.url = f"ws://{self.relay.host}"
        self.tokens = fromKey(KEY_NAME, KEY, reactor)

    async def pair(self, factory: Factory) -> tuple[Any, Any]:
        control = await self.relay.listener("hyco")
        connecting = connectStream(reactor, self.url, "hyco", self.tokens, factory)
        accept = json.loads((await control.messages.get())[0])["accept"]
        leg = self.relay.connect(accept["address"])
        proto = await connecting
        await leg.opened
        return proto, leg

    async def test_peerEndsFirst(self) -> None:
        """
        When the listener side closes first, a half-closeable protocol sees
        the end of input, may still write, and its answer arrives before
        the close completes.
        """
        proto, leg = await self.pair(Factory.forProtocol(HalfCloser))
        leg.sendClose(1000)
        self.assertEqual(await leg.messages.get(), (b"answer after your end", True))
        await leg.closed
        self.assertIsInstance(await proto.ended, ConnectionDone)

    async def test_loseWriteConnection(self) -> None:
        """
        Closing the sending side only: the other side sees the close, and
        what it sends afterwards still arrives.
        """
        from relaynet.test.test_loopback_ws import _LastWords

        control = await self.relay.listener("hyco")
        connecting = connectStream(reactor, self.url, "hyco", self.tokens, Factory.forProtocol(Collect))
        accept = json.loads((await control.messages.get())[0])["accept"]
        leg = self.relay.connect(accept["address"], protocolClass=_LastWords)
        proto = await connecting
        await leg.opened
        proto.transport.write(b"request")
        proto.transport.loseWriteConnection()
        await proto.ended
        self.assertEqual(proto.received, b"last words")

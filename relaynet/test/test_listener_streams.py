"""
L{relaynet.listener.HybridListener} against a real relay on 127.0.0.1:
accepting and rejecting senders, staying online across a relay restart and
past its tokens' expiry, and giving up on an entity that does not exist.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from relaynet.listener import AcceptRequest, HybridListener, RelayRefused
from relaynet.service import RelayService
from relaynet.streams import MessageProtocol, RejectedError, RelayAddress, connectStream
from relaynet.tap import Options
from relaynet.test.support import KEY, KEY_NAME, RelayFixture, waitFor
from relaynet.tokens import fromKey


class Echo(Protocol):
    """
    Sends back what it gets; keeps its transport's addresses.
    """

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.factory.accepted.append((self.transport.getHost(), self.transport.getPeer()))  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class Collect(MessageProtocol):
    def __init__(self) -> None:
        self.messages: list[tuple[bytes, bool]] = []
        self.lost = False

    def messageReceived(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append((payload, isBinary))

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


class ListenerStreamTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.relay = RelayFixture(self, ["--entity", "hyco", "--token-grace", "1"])
        self.url = f"ws://{self.relay.host}"
        self.statuses: list[str] = []
        self.echo = Factory.forProtocol(Echo)
        self.echo.accepted = []  # type: ignore[attr-defined]

    async def listen(self, entity: str = "hyco", ttl: int = 3600, **kwargs: Any) -> HybridListener:
        kwargs.setdefault("streamFactory", self.echo)
        listener = HybridListener(
            reactor, self.url, entity, fromKey(KEY_NAME, KEY, reactor, ttl=ttl), onStatus=self.statuses.append, **kwargs
        )
        self.addCleanup(listener.close)
        await listener.listen()
        return listener

    async def send(self, headers: dict[str, str] | None = None, query: str = "", **kwargs: Any) -> Collect:
        proto = await connectStream(
            reactor, self.url, "hyco" + query, fromKey(KEY_NAME, KEY, reactor), Factory.forProtocol(Collect),
            headers=headers, **kwargs
        )
        assert isinstance(proto, Collect)
        self.addCleanup(proto.transport.loseConnection)
        return proto

    async def echoes(self, proto: Collect, payload: bytes) -> None:
        proto.transport.write(payload)
        await waitFor(lambda: sum(len(p) for p, _ in proto.messages) >= len(payload))
        self.assertEqual(b"".join(p for p, _ in proto.messages), payload)
        proto.messages.clear()

    async def test_acceptAndEcho(self) -> None:
        """
        The accept handler sees the sender's headers, address and target;
        the protocol's transport knows both ends; bytes come back.
        """
        seen: list[AcceptRequest] = []

        def decide(request: AcceptRequest) -> bool:
            seen.append(request)
            return True

        listener = await self.listen(acceptHandler=decide)
        proto = await self.send(headers={"X-App": "7"}, subprotocols=["chat.v2", "chat.v1"])
        [request] = seen
        self.assertEqual(request.getHeader("X-App"), "7")
        self.assertEqual(request.target, "/hyco")
        self.assertEqual(request.subprotocols, ["chat.v2", "chat.v1"])
        assert request.remote is not None
        self.assertEqual(request.remote[0], "127.0.0.1")
        self.assertEqual(self.echo.accepted, [(RelayAddress(self.url, "hyco"), RelayAddress(self.url, "hyco", request.remote))])  # type: ignore[attr-defined]
        self.assertEqual([s.websocket_protocol_in_use for s in listener._streams], ["chat.v2"])
        await self.echoes(proto, os.urandom(100000))

    async def test_rejectWithStatus(self) -> None:
        await self.listen(acceptHandler=lambda request: (451, "Not here"))
        with self.assertRaises(RejectedError) as e:
            await self.send()
        self.assertEqual((e.exception.status, e.exception.reason), (451, "Not here"))
        self.assertEqual(self.echo.accepted, [])  # type: ignore[attr-defined]

    async def test_rejectAsync(self) -> None:
        async def decide(request: AcceptRequest) -> bool:
            await deferLater(reactor, 0.01, lambda: None)
            return request.getHeader("X-Let-Me-In") == "please"

        await self.listen(acceptHandler=decide)
        with self.assertRaises(RejectedError) as e:
            await self.send()
        self.assertEqual((e.exception.status, e.exception.reason), (400, "Rejected by user code"))
        await self.echoes(await self.send(headers={"X-Let-Me-In": "please"}), b"in")

    async def test_noStreamFactory(self) -> None:
        await self.listen(streamFactory=None)
        with self.assertRaises(RejectedError) as e:
            await self.send()
        self.assertEqual((e.exception.status, e.exception.reason), (404, "This listener takes no streams"))

    async def test_httpWithoutHandler(self) -> None:
        await self.listen()
        headers = Headers({"ServiceBusAuthorization": [self.relay.token("hyco")]})
        response = await Agent(reactor).request(b"GET", f"http://{self.relay.host}/hyco/x".encode(), headers)
        await readBody(response)
        self.assertEqual(response.code, 501)

    async def test_reconnectAfterRelayRestart(self) -> None:
        """
        The relay goes away and comes back on the same port: the listener
        reconnects by itself, and senders reach it again.
        """
        listener = await self.listen()
        await self.echoes(await self.send(), b"before")
        port = self.relay.port
        await self.relay.service.stopService()
        await waitFor(lambda: listener.status == "reconnecting")
        await deferLater(reactor, 0.3, lambda: None)  # a failed attempt or two
        options = Options()
        options.parseOptions(
            ["--listen", f"tcp:{port}:interface=127.0.0.1", "--data-dir", self.mktemp(), "--rule", f"{KEY_NAME}={KEY}",
             "--entity", "hyco"]
        )
        os.makedirs(options["data-dir"], exist_ok=True)
        self.relay.service = RelayService.fromOptions(options, reactor)
        self.relay.service.startService()
        await waitFor(lambda: listener.status == "online", timeout=20)
        self.assertEqual(self.statuses, ["connecting", "online", "reconnecting", "online"])
        await self.echoes(await self.send(), b"after")

    async def test_tokenRenewal(self) -> None:
        """
        A listener whose tokens last 2 seconds stays connected for 5 (the
        relay gives a control channel 1 second past its token's expiry).
        """
        listener = await self.listen(ttl=2)
        await deferLater(reactor, 5, lambda: None)
        self.assertEqual(self.statuses, ["connecting", "online"])
        self.assertTrue(listener.listening)
        await self.echoes(await self.send(), b"still here")

    async def test_expiredTokenIsNotRenewed(self) -> None:
        """
        Without renewal the relay closes the control channel when the token
        runs out (the test above is not vacuous), and the listener
        reconnects with a fresh token.
        """
        listener = await self.listen(ttl=2, tokenRenewInterval=1000)
        listener._renewInterval = 1000
        listener._cancelRenewal()
        await waitFor(lambda: "reconnecting" in self.statuses, timeout=10)
        await waitFor(lambda: listener.status == "online", timeout=10)
        await self.echoes(await self.send(), b"back")

    async def test_stopOn404(self) -> None:
        """
        An entity the relay does not have: C{listen()} fails with 404 and
        nothing is retried.
        """
        listener = HybridListener(reactor, self.url, "nope", fromKey(KEY_NAME, KEY, reactor), onStatus=self.statuses.append)
        with self.assertRaises(RelayRefused) as e:
            await listener.listen()
        self.assertEqual(e.exception.status, 404)
        self.assertEqual(self.statuses, ["connecting", "offline"])
        await deferLater(reactor, 1.5, lambda: None)
        self.assertEqual(self.statuses, ["connecting", "offline"])
        self.assertEqual(self.relay.service.websockets.connections, set())

    async def test_close(self) -> None:
        listener = await self.listen()
        proto = await self.send()
        await listener.close()
        await waitFor(lambda: proto.lost)
        self.assertEqual(self.statuses, ["connecting", "online", "offline"])

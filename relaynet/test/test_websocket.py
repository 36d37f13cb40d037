# -*- test-case-name: relaynet.test.test_websocket -*-
"""
Tests for L{relaynet.protocols.websocket}: the C{listen}, C{connect} and
C{accept} actions driven through L{HybridConnectionProtocol} over fake
transports and a L{Clock}, with hand-written HTTP handshakes and frames.

The helpers here (L{Harness}, L{Peer}) are shared with
C{test_splice} and C{test_service}.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from relaynet.auth import Authorizer, Rule, mintToken
from relaynet.core import HandshakeInfo, Relay, RelaySettings
from relaynet.entities import Entity, Namespace
from relaynet.protocols.control import ControlChannel
from relaynet.protocols.websocket import (
    ClockTimer,
    HybridConnectionFactory,
    HybridConnectionProtocol,
    HybridConnectionResource,
    stripRelayParameters,
    withFactoryOptions,
)
from relaynet.test.support import FakeTcp, headerValue, parseFrames, reassemble, unmask

KEY_NAME = "RootManageSharedAccessKey"
KEY = "c2VjcmV0LWtleS1mb3ItdW5pdC10ZXN0cy1vbmx5LTE="
HOST = "relay.test"
NOW = 1_700_000_000
PEER = ("203.0.113.7", 54012)
WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="

TEXT, BINARY, CLOSE, PING, PONG, CONTINUATION = 1, 2, 8, 9, 10, 0


def token(entity: str, expiry: int = NOW + 3600, key: str = KEY) -> str:
    return mintToken(f"http://{HOST}/{entity}", KEY_NAME, key, expiry)


def clientFrame(opcode: int, payload: bytes = b"", fin: bool = True, mask: bytes = b"\x37\xfa\x21\x3d") -> bytes:
    """
    One masked frame, as a client sends it.
    """
    head = bytes([(0x80 if fin else 0) | opcode])
    length = len(payload)
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 0x10000:
        head += bytes([0x80 | 126]) + length.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + length.to_bytes(8, "big")
    return head + mask + unmask(payload, mask)


class Peer:
    """
    A client of the relay at the far end of a L{FakeTcp}: it sends a raw
    upgrade request and frames, and reads what the relay wrote.
    """

    def __init__(
        self,
        factory: HybridConnectionFactory,
        clock: Clock,
        target: str,
        headers: Sequence[tuple[str, str]] = (),
        protocols: Sequence[str] = (),
        peer: tuple[str, int] = PEER,
        early: bytes = b"",
    ) -> None:
        """
        @param early: bytes sent in the same read as the upgrade request.
        """
        rawPath, _, rawQuery = target.partition("?")
        allHeaders = [
            ("Host", HOST),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", WS_KEY),
            ("Sec-WebSocket-Version", "13"),
        ]
        if protocols:
            allHeaders.append(("Sec-WebSocket-Protocol", ", ".join(protocols)))
        allHeaders.extend(headers)
        self.transport = FakeTcp(clock, peer)
        self.proto = factory.buildProtocol(self.transport.getPeer())
        self.transport.protocol = self.proto
        # What HybridConnectionResource.render finds in the request.
        self.proto.info = HandshakeInfo(
            host=HOST,
            secure=False,
            path=unquote(rawPath)[len("/$hc/") :],
            rawQuery=rawQuery,
            headers=list(allHeaders),
            query=dict(reversed(parse_qsl(rawQuery, keep_blank_values=True))),
            peerHost=peer[0],
            peerPort=peer[1],
        )
        self.proto.makeConnection(self.transport)
        head = [f"GET {target} HTTP/1.1"] + [f"{name}: {value}" for name, value in allHeaders]
        self.proto.dataReceived(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + early)

    def _split(self) -> tuple[bytes, bytes] | None:
        data = self.transport.value()
        if b"\r\n\r\n" not in data:
            return None
        head, _, rest = data.partition(b"\r\n\r\n")
        return head, rest

    @property
    def status(self) -> int | None:
        """
        The HTTP status the relay answered the upgrade with, if it has.
        """
        split = self._split()
        return None if split is None else int(split[0].split(b" ", 2)[1])

    @property
    def reason(self) -> str:
        split = self._split()
        assert split is not None, "no response"
        return split[0].split(b"\r\n", 1)[0].split(b" ", 2)[2].decode("latin-1")

    def header(self, name: str) -> str | None:
        split = self._split()
        assert split is not None, "no response"
        return headerValue(split[0], name)

    def frames(self) -> list[tuple[bool, int, bytes]]:
        split = self._split()
        return [] if split is None else parseFrames(split[1])

    def messages(self) -> list[tuple[int, bytes]]:
        """
        The data messages received, reassembled: (opcode, payload).
        """
        return reassemble(self.frames())

    def closes(self) -> list[tuple[int | None, bytes]]:
        """
        The close frames received: (code, reason).
        """
        return [
            (int.from_bytes(p[:2], "big") if len(p) >= 2 else None, p[2:])
            for _, opcode, p in self.frames()
            if opcode == CLOSE
        ]

    def commands(self) -> list[dict[str, Any]]:
        return [json.loads(payload) for opcode, payload in self.messages() if opcode == TEXT]

    def send(self, opcode: int, payload: bytes = b"", fin: bool = True) -> None:
        self.proto.dataReceived(clientFrame(opcode, payload, fin))

    def sendClose(self, code: int = 1000, reason: bytes = b"") -> None:
        self.send(CLOSE, code.to_bytes(2, "big") + reason)


class Harness:
    """
    A relay on a L{Clock} with one namespace key and the given entities.
    """

    def __init__(
        self,
        settings: RelaySettings | None = None,
        entities: Sequence[Entity] = (),
        dynamic: bool = False,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        namespace = Namespace(dynamicEntities=dynamic)
        for entity in entities or [Entity(name="hyco")]:
            namespace.declare(entity)
        settings = settings or RelaySettings()
        self.relay = Relay(
            namespace=namespace,
            authorizer=Authorizer([Rule(name=KEY_NAME, primaryKey=KEY)], graceSeconds=settings.tokenGrace),
            clock=self.clock,
            settings=settings,
        )
        self.factory = HybridConnectionFactory(self.relay)

    def connect(self, target: str, **kwargs: Any) -> Peer:
        return Peer(self.factory, self.clock, target, **kwargs)

    def listen(self, entity: str = "hyco", expiry: int = NOW + 3600, extra: str = "") -> Peer:
        return self.connect(
            f"/$hc/{entity}?sb-hc-action=listen{extra}&sb-hc-token={quote(token(entity, expiry), safe='')}"
        )

    def send(
        self,
        path: str = "hyco",
        query: str = "sb-hc-action=connect",
        entity: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
        **kwargs: Any,
    ) -> Peer:
        auth = ("ServiceBusAuthorization", token(entity or path.split("/")[0]))
        return self.connect(f"/$hc/{path}?{query}" if query else f"/$hc/{path}", headers=[auth, *headers], **kwargs)

    def rendezvous(self, address: str, extra: str = "", **kwargs: Any) -> Peer:
        """
        Go to the address of an C{accept} command, with C{extra} query text.
        """
        parts = urlsplit(address)
        return self.connect(f"{parts.path}?{parts.query}{extra}", **kwargs)

    def pair(self, protocols: Sequence[str] = (), listenerProtocols: Sequence[str] = ()) -> tuple[Peer, Peer, Peer]:
        """
        A listener, a sender, and the rendezvous socket that accepted it.
        """
        listener = self.listen()
        sender = self.send(protocols=protocols)
        accepted = self.rendezvous(listener.commands()[-1]["accept"]["address"], protocols=listenerProtocols)
        return listener, sender, accepted

    def settle(self) -> None:
        """
        Let connections the relay closed end.
        """
        self.clock.advance(0)

    def entity(self, name: str = "hyco") -> Entity:
        entity = self.relay.namespace.get(name)
        assert entity is not None
        return entity


class ListenTests(SynchronousTestCase):
    """
    C{sb-hc-action=listen}: the control channel.
    """

    def test_listenRegistersTheChannel(self) -> None:
        h = Harness()
        listener = h.listen(extra="&sb-hc-id=listener-7")
        self.assertEqual(listener.status, 101)
        self.assertEqual(h.relay.registry.listenerCount(h.entity()), 1)
        self.assertIsInstance(listener.proto.role, ControlChannel)
        self.assertEqual(listener.proto.role.listenerId, "listener-7")

    def test_listenWithoutTokenIs401(self) -> None:
        h = Harness()
        listener = h.connect("/$hc/hyco?sb-hc-action=listen")
        self.assertEqual(listener.status, 401)
        self.assertEqual(h.relay.registry.listenerCount(h.entity()), 0)

    def test_listenerLimitIs403(self) -> None:
        h = Harness(entities=[Entity(name="hyco", maxListeners=2)])
        h.listen(), h.listen()
        third = h.listen()
        self.assertEqual(third.status, 403)
        self.assertIn("MaximumListenersPerEndpoint", third.reason)
        self.assertEqual(h.relay.registry.listenerCount(h.entity()), 2)

    def test_listenerCloseUnregistersAtOnce(self) -> None:
        h = Harness()
        listener = h.listen()
        listener.sendClose(1000)
        self.assertEqual(h.relay.registry.listenerCount(h.entity()), 0)
        self.assertEqual(listener.closes(), [(1000, b"")])

    def test_listenerConnectionLostUnregisters(self) -> None:
        h = Harness()
        listener = h.listen()
        listener.transport.connectionGone()
        self.assertEqual(h.relay.registry.listenerCount(h.entity()), 0)

    def test_dynamicEntityGoesWithItsListener(self) -> None:
        h = Harness(dynamic=True)
        listener = h.listen("fresh/one")
        self.assertEqual(listener.status, 101)
        self.assertTrue(h.entity("fresh/one").dynamic)
        listener.transport.connectionGone()
        self.assertIsNone(h.relay.namespace.get("fresh/one"))

    def test_refusedDynamicListenerLeavesNoEntity(self) -> None:
        h = Harness(dynamic=True)
        listener = h.connect("/$hc/fresh?sb-hc-action=listen&sb-hc-token=garbage")
        self.assertEqual(listener.status, 401)
        self.assertIsNone(h.relay.namespace.get("fresh"))

    def test_expiredTokenClosesWith1008(self) -> None:
        h = Harness(RelaySettings(tokenGrace=300))
        listener = h.listen(expiry=NOW + 100)
        h.clock.advance(399)
        self.assertEqual(listener.closes(), [])
        h.clock.advance(1)
        [(code, reason)] = listener.closes()
        self.assertEqual(code, 1008)
        self.assertIn(b"expired", reason)
        self.assertEqual(h.relay.registry.listenerCount(h.entity()), 0)

    def test_unansweredPingsDropTheListener(self) -> None:
        h = Harness(RelaySettings(pingInterval=1, pingTimeout=2))
        listener = h.listen()
        h.clock.advance(1)
        self.assertEqual([opcode for _, opcode, _ in listener.frames()], [PING])
        h.clock.advance(2)
        self.assertTrue(listener.transport.aborted)
        h.settle()
        self.assertEqual(h.relay.registry.listenerCount(h.entity()), 0)

    def test_answeredPingsKeepTheListener(self) -> None:
        h = Harness(RelaySettings(pingInterval=1, pingTimeout=2))
        listener = h.listen()
        for _ in range(3):
            h.clock.advance(1)
            ping = [payload for _, opcode, payload in listener.frames() if opcode == PING][-1]
            listener.send(PONG, ping)
        h.clock.advance(1.5)
        self.assertFalse(listener.transport.disconnecting)
        self.assertEqual(h.relay.registry.listenerCount(h.entity()), 1)

    def test_oversizedControlMessageIsRefused(self) -> None:
        h = Harness(RelaySettings(maxControlMessage=100))
        listener = h.listen()
        listener.send(TEXT, b'{"x":"' + b"a" * 200 + b'"}')
        [(code, _)] = listener.closes()
        self.assertEqual(code, 1009)


class SenderTests(SynchronousTestCase):
    """
    C{sb-hc-action=connect}: a sender held until a listener decides.
    """

    def test_acceptCommand(self) -> None:
        h = Harness()
        listener = h.listen()
        sender = h.send(
            "hyco/room1",
            "tenant=7&sb-hc-action=connect&sb-hc-id=abc",
            headers=[("X-Custom", "some value; other/here.")],
        )
        [command] = listener.commands()
        self.assertEqual(list(command), ["accept"])
        accept = command["accept"]
        self.assertTrue(accept["id"].startswith("abc_G"))
        self.assertEqual(
            accept["address"],
            f"ws://{HOST}/$hc/hyco/room1?tenant=7&sb-hc-action=accept&sb-hc-id={quote(accept['id'], safe='')}",
        )
        headers = accept["connectHeaders"]
        self.assertIsInstance(headers, dict)
        self.assertTrue(all(isinstance(v, str) for v in headers.values()))
        self.assertEqual(headers["X-Custom"], "some value; other/here.")
        self.assertEqual(headers["Sec-WebSocket-Key"], WS_KEY)
        self.assertEqual(headers["Host"], HOST)
        self.assertNotIn("servicebusauthorization", [name.lower() for name in headers])
        self.assertEqual(accept["remoteEndpoint"], {"address": PEER[0], "port": PEER[1]})
        self.assertIsInstance(accept["remoteEndpoint"]["port"], int)
        # The sender's upgrade is held: no response at all.
        self.assertEqual(sender.transport.value(), b"")
        self.assertEqual(len(h.relay.rendezvous), 1)

    def test_missingActionMeansConnect(self) -> None:
        h = Harness()
        listener = h.listen()
        sender = h.send(query="")
        self.assertEqual(len(listener.commands()), 1)
        self.assertIsNone(sender.status)

    def test_unknownAction(self) -> None:
        h = Harness()
        peer = h.connect("/$hc/hyco?sb-hc-action=x")
        self.assertEqual((peer.status, peer.reason), (400, "Unsupported action 'x'."))

    def test_noListenersIs404(self) -> None:
        h = Harness()
        sender = h.send()
        self.assertEqual(sender.status, 404)
        self.assertIn("no listeners connected", sender.reason)
        self.assertEqual(len(h.relay.rendezvous), 0)

    def test_unknownEntityIs404(self) -> None:
        h = Harness()
        sender = h.send("nothing")
        self.assertEqual(sender.status, 404)
        self.assertIn("Endpoint does not exist", sender.reason)

    def test_longClientIdIs400(self) -> None:
        h = Harness()
        h.listen()
        sender = h.send(query="sb-hc-action=connect&sb-hc-id=" + "a" * 129)
        self.assertEqual(sender.status, 400)

    def test_fullRendezvousRefusesWithoutOffering(self) -> None:
        h = Harness(RelaySettings(maxPending=1))
        listener = h.listen()
        h.send()
        second = h.send()
        self.assertEqual(second.status, 503)
        self.assertIn("busy", second.reason)
        self.assertEqual(len(listener.commands()), 1)

    def test_acceptDeadlineIs404(self) -> None:
        h = Harness()
        h.listen()
        sender = h.send()
        h.clock.advance(29.9)
        self.assertIsNone(sender.status)
        h.clock.advance(0.1)
        self.assertEqual(sender.status, 404)
        self.assertIn("None of the connected listeners accepted", sender.reason)
        self.assertEqual(len(h.relay.rendezvous), 0)

    def test_lateAcceptIs404(self) -> None:
        h = Harness()
        listener = h.listen()
        h.send()
        h.clock.advance(30)
        late = h.rendezvous(listener.commands()[0]["accept"]["address"])
        self.assertEqual(late.status, 404)
        self.assertIn("too late", late.reason)

    def test_lostPendingSenderIsForgotten(self) -> None:
        h = Harness()
        listener = h.listen()
        sender = h.send()
        sender.transport.connectionGone()
        self.assertEqual(len(h.relay.rendezvous), 0)
        late = h.rendezvous(listener.commands()[0]["accept"]["address"])
        self.assertEqual(late.status, 404)


class AcceptTests(SynchronousTestCase):
    """
    C{sb-hc-action=accept}: the listener at the rendezvous.
    """

    def test_acceptCompletesBothHandshakes(self) -> None:
        h = Harness()
        _, sender, accepted = h.pair()
        self.assertEqual(accepted.status, 101)
        self.assertEqual(sender.status, 101)
        self.assertEqual(len(h.relay.rendezvous), 0)

    def test_listenersSubprotocolGoesToBoth(self) -> None:
        h = Harness()
        _, sender, accepted = h.pair(protocols=["chat.v2", "chat.v1"], listenerProtocols=["chat.v1"])
        self.assertEqual(accepted.header("Sec-WebSocket-Protocol"), "chat.v1")
        self.assertEqual(sender.header("Sec-WebSocket-Protocol"), "chat.v1")

    def test_noSubprotocolWhenListenerAsksNone(self) -> None:
        h = Harness()
        _, sender, _ = h.pair(protocols=["chat.v2"])
        self.assertEqual(sender.status, 101)
        self.assertIsNone(sender.header("Sec-WebSocket-Protocol"))

    def _reject(self, extra: str) -> tuple[Peer, Peer, Harness]:
        h = Harness()
        listener = h.listen()
        sender = h.send()
        rejecting = h.rendezvous(listener.commands()[0]["accept"]["address"], extra)
        return sender, rejecting, h

    def test_rejectWithRelayParameters(self) -> None:
        sender, rejecting, h = self._reject("&sb-hc-statusCode=401&sb-hc-statusDescription=Go%20away")
        self.assertEqual((sender.status, sender.reason), (401, "Go away"))
        self.assertEqual(rejecting.status, 410)
        self.assertTrue(sender.transport.disconnecting)
        self.assertEqual(len(h.relay.rendezvous), 0)

    def test_rejectWithNodeParameters(self) -> None:
        sender, rejecting, _ = self._reject("&statusCode=403&statusDescription=Not%20you")
        self.assertEqual((sender.status, sender.reason), (403, "Not you"))
        self.assertEqual(rejecting.status, 410)

    def test_rejectWithoutDescription(self) -> None:
        sender, _, _ = self._reject("&sb-hc-statusCode=503")
        self.assertEqual(sender.status, 503)
        self.assertTrue(sender.reason)

    def test_rejectDescriptionCannotAddHeaders(self) -> None:
        sender, _, _ = self._reject("&sb-hc-statusCode=400&sb-hc-statusDescription=a%0D%0AX-Evil:%201")
        self.assertEqual(sender.status, 400)
        self.assertIsNone(sender.header("X-Evil"))
        self.assertNotIn(b"\r\nX-Evil", sender.transport.value())

    def test_invalidStatusCodeIs400(self) -> None:
        for code in ["abc", "99", "1000", ""]:
            sender, rejecting, _ = self._reject(f"&sb-hc-statusCode={code}")
            self.assertEqual(rejecting.status, 400, code)
            self.assertEqual(sender.status, 400, code)

    def test_unknownIdIs404(self) -> None:
        h = Harness()
        peer = h.connect("/$hc/hyco?sb-hc-action=accept&sb-hc-id=made-up_G0")
        self.assertEqual(peer.status, 404)

    def test_failedListenerHandshakeAnswersTheSender(self) -> None:
        """
        A listener whose rendezvous handshake fails after it was matched to
        its sender leaves the sender with a 502 at once, not waiting.
        """
        h = Harness()
        listener = h.listen()
        sender = h.send()
        accepting = h.rendezvous(
            listener.commands()[0]["accept"]["address"],
            headers=[("Sec-WebSocket-Extensions", "permessage-deflate; bogus=1")],
        )
        self.assertEqual(accepting.status, 400)
        h.settle()
        self.assertEqual(sender.status, 502)
        self.assertEqual(len(h.relay.rendezvous), 0)

    def test_acceptedIdCannotBeUsedTwice(self) -> None:
        h = Harness()
        listener, _, _ = h.pair()
        again = h.rendezvous(listener.commands()[0]["accept"]["address"])
        self.assertEqual(again.status, 404)


class HelperTests(SynchronousTestCase):
    """
    The small functions the actions use.
    """

    def test_stripRelayParameters(self) -> None:
        self.assertEqual(stripRelayParameters("tenant=7&sb-hc-action=connect&sb-hc-id=abc&x=1"), "tenant=7&x=1")
        self.assertEqual(stripRelayParameters("sb-hc-action=connect&SB-HC-TOKEN=t"), "")
        self.assertEqual(stripRelayParameters(""), "")
        self.assertEqual(stripRelayParameters("a=%2F&b"), "a=%2F&b")
        # A parameter name is matched as it decodes.
        self.assertEqual(stripRelayParameters("sb%2Dhc-token=secret&x=1"), "x=1")
        self.assertEqual(stripRelayParameters("sb-hc-undefined&sb-hc-x=&foo=bar"), "sb-hc-undefined&foo=bar")

    def test_clockTimerUsesTheClock(self) -> None:
        clock, calls = Clock(), []
        ClockTimer(clock).call_later(5, calls.append, 1)
        clock.advance(4.9)
        self.assertEqual(calls, [])
        clock.advance(0.1)
        self.assertEqual(calls, [1])


class FactoryOptionsTests(SynchronousTestCase):
    """
    The relay's connections take autobahn's options from their class, not
    each a copy in its own C{__dict__}.
    """

    def test_optionsOnTheClass(self) -> None:
        """
        A relayed connection has the factory's options (the handshake
        timeout from the relay's settings, the others from
        C{setProtocolOptions}), none of them in its C{__dict__}, and its
        class keeps the protocol's name.
        """
        harness = Harness(RelaySettings(acceptTimeout=7))
        listener = harness.listen()
        # An offer of compression, declined by the factory's function,
        # which stays a plain function on the class.
        sender = harness.send(headers=[("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits")])
        accepted = harness.rendezvous(listener.commands()[-1]["accept"]["address"])
        self.assertEqual((sender.status, accepted.status), (101, 101))
        self.assertIsNone(sender.header("Sec-WebSocket-Extensions"))
        for peer in (listener, sender, accepted):
            proto = peer.proto
            self.assertIsInstance(proto, HybridConnectionProtocol)
            self.assertEqual(type(proto).__name__, "HybridConnectionProtocol")
            self.assertEqual(proto.openHandshakeTimeout, 17)
            self.assertEqual((proto.failByDrop, proto.echoCloseCodeReason), (False, True))
            copied = [name for name in HybridConnectionProtocol.CONFIG_ATTRS if name in vars(proto)]
            # A control channel sets its own message limits and pings.
            own = {"maxMessagePayloadSize", "maxFramePayloadSize", "autoPingInterval", "autoPingTimeout"}
            self.assertEqual(set(copied) - own, set())
        self.assertEqual([name for name in HybridConnectionProtocol.CONFIG_ATTRS if name in vars(sender.proto)], [])

    def test_eachFactoryItsOwn(self) -> None:
        """
        Two relays with other settings give their connections other
        options.
        """
        first = Harness(RelaySettings(acceptTimeout=1)).factory.protocol
        second = Harness(RelaySettings(acceptTimeout=2)).factory.protocol
        self.assertEqual((first.openHandshakeTimeout, second.openHandshakeTimeout), (11, 12))

    def test_functionsStayUnbound(self) -> None:
        """
        A function given as an option is called as given, not as a method.
        """

        class Factory:
            pass

        factory = Factory()
        for name in HybridConnectionProtocol.CONFIG_ATTRS:
            setattr(factory, name, None)
        factory.perMessageCompressionAccept = lambda offers: ("chose from", offers)  # type: ignore[attr-defined]
        protocol = withFactoryOptions(HybridConnectionProtocol, factory)
        self.assertEqual(protocol().perMessageCompressionAccept(["x"]), ("chose from", ["x"]))
        self.assertEqual(protocol.CONFIG_ATTRS, [])


class ResourceTests(SynchronousTestCase):
    """
    L{HybridConnectionResource} takes a C{twisted.web} connection over.
    """

    def _request(self, h: Harness, request: bytes) -> FakeTcp:
        site = Site(HybridConnectionResource(h.factory), reactor=h.clock)
        transport = FakeTcp(h.clock, PEER)
        channel = site.buildProtocol(transport.getPeer())
        transport.protocol = channel
        channel.makeConnection(transport)
        channel.dataReceived(request)
        return transport

    def test_upgradeIsTakenOver(self) -> None:
        h = Harness()
        tokenText = quote(token("hyco"), safe="")
        transport = self._request(
            h,
            (
                f"GET /$hc/hyco?sb-hc-action=listen&sb-hc-token={tokenText} HTTP/1.1\r\n"
                f"Host: {HOST}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode(),
        )
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 101 "))
        self.assertEqual(h.relay.registry.listenerCount(h.entity()), 1)
        h.send()
        [(_, opcode, payload)] = parseFrames(transport.value().partition(b"\r\n\r\n")[2])
        self.assertEqual(opcode, TEXT)
        self.assertIn("accept", json.loads(payload))

    def test_notAnUpgradeIs400(self) -> None:
        h = Harness()
        transport = self._request(h, f"GET /$hc/hyco HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 This endpoint is only for web-socket requests"))


class ThrottleTests(SynchronousTestCase):
    """
    A client address that keeps being refused waits before its next answer.
    """

    def test_repeatedFailuresAreSlowed(self) -> None:
        h = Harness()
        for _ in range(21):
            self.assertEqual(h.connect("/$hc/hyco?sb-hc-action=listen").status, 401)
        slowed = h.connect("/$hc/hyco?sb-hc-action=listen")
        self.assertIsNone(slowed.status)
        h.clock.advance(1)
        self.assertEqual(slowed.status, 401)

    def test_otherClientsNotSlowed(self) -> None:
        h = Harness()
        for _ in range(25):
            h.connect("/$hc/hyco?sb-hc-action=listen")
        other = h.connect("/$hc/hyco?sb-hc-action=listen", peer=("198.51.100.9", 4000))
        self.assertEqual(other.status, 401)
        # The slowed address is still served, a second later.
        listener = h.listen()
        self.assertIsNone(listener.status)
        h.clock.advance(1)
        self.assertEqual(listener.status, 101)

    def test_forgottenAfterTheWindow(self) -> None:
        h = Harness()
        for _ in range(25):
            h.connect("/$hc/hyco?sb-hc-action=listen")
        h.clock.advance(30)
        self.assertEqual(h.connect("/$hc/hyco?sb-hc-action=listen").status, 401)


class DirectIOTests(SynchronousTestCase):
    """
    L{DirectIO}: writes go straight to the transport unless autobahn's own
    queue is in use, which is then made on demand and keeps the order.
    """

    def setUp(self) -> None:
        from collections import deque

        from twisted.internet.testing import StringTransport

        from relaynet.protocols.websocket import DirectIO

        self.deque = deque

        class Autobahn:
            def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
                self.send_queue.append((data, sync))  # type: ignore[attr-defined]

            def _dataReceived(self, data: bytes) -> None:
                self.read = data

        class Proto(DirectIO, Autobahn):
            send_queue = ()

        self.proto = Proto()
        self.proto.transport = StringTransport()

    def test_straightThrough(self) -> None:
        self.proto.sendData(b"frame")
        self.assertEqual(self.proto.transport.value(), b"frame")
        self.proto.dataReceived(b"in")
        self.assertEqual(self.proto.read, b"in")  # type: ignore[attr-defined]

    def test_queueOnDemand(self) -> None:
        self.proto.sendData(b"sync", sync=True)
        self.assertIsInstance(self.proto.send_queue, self.deque)
        self.proto.sendData(b"after")
        self.assertEqual(list(self.proto.send_queue), [(b"sync", True), (b"after", False)])
        self.assertEqual(self.proto.transport.value(), b"")

# -*- test-case-name: relaynet.test.test_frames -*-
"""
Tests for L{relaynet.protocols.frames}: frames passed between spliced
WebSocket legs (over fake transports), the unmasking, and the direct
writes (over real sockets).
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from relaynet.core import RelaySettings
from relaynet.protocols import frames
from relaynet.protocols.frames import (
    MAX_HELD,
    MAX_PIECES,
    SMALL,
    MessageReader,
    Unmasker,
    serverHeader,
    writeNow,
)
from relaynet.protocols.splice import Leg
from relaynet.test.support import parseFrames, unmask, waitFor
from relaynet.test.test_websocket import BINARY, CLOSE, CONTINUATION, PING, PONG, TEXT, Harness, Peer, clientFrame

PROTOCOL_ERROR = 1002


def _pair() -> tuple[Harness, Peer, Peer]:
    h = Harness()
    _, sender, accepted = h.pair()
    return h, sender, accepted


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:]) if b > a]


class ServerHeaderTests(SynchronousTestCase):
    """
    L{serverHeader} uses the shortest length encoding and no mask.
    """

    def test_lengthEncodings(self) -> None:
        for length, size in [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10), (1 << 40, 10)]:
            head = serverHeader(0x82, length)
            self.assertEqual(len(head), size, length)
            self.assertEqual(head[0], 0x82)
            self.assertFalse(head[1] & 0x80)
        payload = b"x" * 70000
        self.assertEqual(parseFrames(serverHeader(0x81, len(payload)) + payload), [(True, TEXT, payload)])


class ClientFrameTests(SynchronousTestCase):
    """
    L{frames.clientFrame} masks what a client sends with a fresh key each time.
    """

    def test_maskedAndReadable(self) -> None:
        keys = set()
        for size in (0, 1, 125, 126, 300, 70000):
            payload = os.urandom(size)
            wire = b"".join(frames.clientFrame(0x82, payload))
            self.assertTrue(wire[1] & 0x80, size)
            self.assertEqual(parseFrames(wire), [(True, BINARY, payload)], size)
            header = len(serverHeader(0x82, size))
            keys.add(wire[header : header + 4])
            if size >= 4:
                self.assertNotEqual(wire[header + 4 :], payload, size)
        self.assertEqual(len(keys), 6)


class UnmaskerTests(SynchronousTestCase):
    """
    L{Unmasker} undoes a client's mask however the payload is cut.
    """

    @settings(max_examples=200, deadline=None)
    @given(
        key=st.binary(min_size=4, max_size=4),
        payload=st.binary(max_size=3000),
        cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=8),
    )
    def test_anyCuts(self, key: bytes, payload: bytes, cuts: list[int]) -> None:
        unmasker = Unmasker(key, len(payload))
        pieces = [bytes(unmasker(memoryview(c))) for c in _chunks(unmask(payload, key), cuts)]
        self.assertEqual(b"".join(pieces), payload)

    def test_largeFrameInSmallPieces(self) -> None:
        """
        A frame long enough for the compiled masker, fed a byte at a time,
        then in pieces that start at every offset of the key.
        """
        key = os.urandom(4)
        payload = os.urandom(SMALL * 4 + 3)
        masked = unmask(payload, key)
        unmasker = Unmasker(key, len(payload))
        out = [bytes(unmasker(memoryview(masked[i : i + 1]))) for i in range(len(masked))]
        self.assertEqual(b"".join(out), payload)
        unmasker = Unmasker(key, len(payload))
        out = [bytes(unmasker(memoryview(masked[i : i + 131]))) for i in range(0, len(masked), 131)]
        self.assertEqual(b"".join(out), payload)


class ForwardingTests(SynchronousTestCase):
    """
    Spliced legs pass each other's frames exactly, read in any pieces.
    """

    def test_spliceMakesEachLegItsReader(self) -> None:
        _, sender, accepted = _pair()
        self.assertIsInstance(sender.proto.reader, Leg)
        self.assertIs(sender.proto.reader, sender.proto.role)
        self.assertIs(accepted.proto.reader, accepted.proto.role)
        self.assertIs(sender.proto.role.partner, accepted.proto.role)

    @settings(max_examples=60, deadline=None)
    @given(
        frames=st.lists(
            st.tuples(
                st.sampled_from(["text", "binary", "fragmented", "ping"]),
                st.binary(max_size=300),
                st.binary(min_size=4, max_size=4),
            ),
            min_size=1,
            max_size=8,
        ),
        cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
    )
    def test_anyFramesInAnyPieces(self, frames: list[tuple[str, bytes, bytes]], cuts: list[int]) -> None:
        """
        Data frames arrive as they were sent, unmasked and with their FIN
        bits and opcodes; pings in between are answered by the relay and
        not passed on.
        """
        _, sender, accepted = _pair()
        wire = b""
        expected: list[tuple[bool, int, bytes]] = []
        pongs: list[bytes] = []
        for kind, payload, key in frames:
            if kind == "ping":
                payload = payload[:125]
                wire += clientFrame(PING, payload, mask=key)
                pongs.append(payload)
            elif kind == "fragmented":
                half = len(payload) // 2
                wire += clientFrame(BINARY, payload[:half], fin=False, mask=key)
                wire += clientFrame(PING, b"mid", mask=key)
                pongs.append(b"mid")
                wire += clientFrame(CONTINUATION, payload[half:], mask=key[::-1])
                expected += [(False, BINARY, payload[:half]), (True, CONTINUATION, payload[half:])]
            else:
                opcode = TEXT if kind == "text" else BINARY
                wire += clientFrame(opcode, payload, mask=key)
                expected.append((True, opcode, payload))
        for chunk in _chunks(wire, cuts):
            sender.proto.dataReceived(chunk)
        self.assertEqual(accepted.frames(), expected)
        self.assertEqual([p for _, opcode, p in sender.frames() if opcode == PONG], pongs)

    def test_largeFrameHeaderSplit(self) -> None:
        """
        A 64-bit length header cut after every byte still forwards the
        frame whole.
        """
        _, sender, accepted = _pair()
        payload = os.urandom(70000)
        wire = clientFrame(BINARY, payload) + clientFrame(TEXT, b"after")
        for i in range(14):
            sender.proto.dataReceived(wire[i : i + 1])
        sender.proto.dataReceived(wire[14:])
        self.assertEqual(accepted.frames(), [(True, BINARY, payload), (True, TEXT, b"after")])

    def test_headerAcrossTheProbe(self) -> None:
        """
        A read that starts inside a header, with a control frame or another
        header cut where the few bytes joined to complete the first end:
        every frame passes, every ping is answered.
        """
        for size in range(100, 260, 3):
            _, sender, accepted = _pair()
            frames = [(True, BINARY, b"hello"), (True, BINARY, bytes(size)), (True, BINARY, b"after")]
            wire = clientFrame(BINARY, b"hello") + clientFrame(BINARY, bytes(size)) + clientFrame(PING, b"p" * 100)
            wire += clientFrame(BINARY, b"after")
            sender.proto.dataReceived(wire[:1])
            sender.proto.dataReceived(wire[1:])
            self.assertEqual(accepted.frames(), frames, size)
            self.assertEqual([p for _, opcode, p in sender.frames() if opcode == PONG], [b"p" * 100], size)

    def test_controlFramesWhileClosing(self) -> None:
        """
        A side the relay passed a close to may still finish a fragmented
        message, with pings and pongs in between.
        """
        for control in (PING, PONG):
            _, sender, accepted = _pair()
            sender.proto.dataReceived(clientFrame(BINARY, b"part1", fin=False))
            accepted.send(CLOSE, (1000).to_bytes(2, "big") + b"bye")
            self.assertEqual(sender.closes(), [(1000, b"bye")])
            sender.proto.dataReceived(clientFrame(control, b"ka"))
            sender.proto.dataReceived(clientFrame(CONTINUATION, b"part2"))
            self.assertEqual(accepted.messages(), [(BINARY, b"part1part2")], control)
            sender.proto.dataReceived(clientFrame(CLOSE, (1000).to_bytes(2, "big")))
            self.assertEqual(accepted.closes(), [(1000, b"")], control)

    def test_framesThatCameWithTheHandshake(self) -> None:
        """
        Frames the listener sent in the same read as its rendezvous
        handshake pass before the ones after it, in order.
        """
        h = Harness()
        listener = h.listen()
        sender = h.send()
        address = listener.commands()[-1]["accept"]["address"]
        accepted = h.rendezvous(address, early=clientFrame(BINARY, b"first") + clientFrame(TEXT, b"second", fin=False))
        accepted.send(CONTINUATION, b"!", fin=True)
        accepted.send(BINARY, b"third")
        self.assertEqual(sender.messages(), [(BINARY, b"first"), (TEXT, b"second!"), (BINARY, b"third")])

    def test_closeInTheSameRead(self) -> None:
        """
        Data, then a close, then nothing more: the data passes, then the
        close is passed on, and autobahn reads from then on.
        """
        _, sender, accepted = _pair()
        sender.proto.dataReceived(clientFrame(BINARY, b"last") + clientFrame(CLOSE, (1000).to_bytes(2, "big") + b"bye"))
        self.assertIsNone(sender.proto.reader)
        self.assertEqual(accepted.frames(), [(True, BINARY, b"last"), (True, CLOSE, (1000).to_bytes(2, "big") + b"bye")])
        accepted.send(BINARY, b"answer")
        self.assertEqual(sender.messages(), [(BINARY, b"answer")])


class HeldWritesTests(SynchronousTestCase):
    """
    The relay's own frames to a leg wait for the end of a frame forwarded
    to it.
    """

    def _halfFrame(self) -> tuple[Harness, Peer, Peer, bytes, bytes]:
        h, sender, accepted = _pair()
        payload = os.urandom(1000)
        wire = clientFrame(BINARY, payload)
        sender.proto.dataReceived(wire[:500])
        return h, sender, accepted, payload, wire[500:]

    def test_pongWaitsForTheFrame(self) -> None:
        _, sender, accepted, payload, rest = self._halfFrame()
        before = accepted.transport.value()
        accepted.send(PING, b"are you there")
        self.assertEqual(accepted.transport.value(), before)
        sender.proto.dataReceived(rest)
        self.assertEqual(accepted.frames(), [(True, BINARY, payload), (True, PONG, b"are you there")])

    def test_closeWaitsForTheFrame(self) -> None:
        """
        The relay stopping mid-frame: the frame is finished, then the
        close is sent.
        """
        h, sender, accepted, payload, rest = self._halfFrame()
        h.factory.goAway()
        self.assertEqual(parseFrames(accepted.transport.value().partition(b"\r\n\r\n")[2][:4])[0][1], BINARY)
        self.assertEqual(accepted.closes(), [])
        sender.proto.dataReceived(rest)
        frames = accepted.frames()
        self.assertEqual(frames[0], (True, BINARY, payload))
        self.assertEqual(accepted.closes(), [(1001, b"The relay is shutting down.")])

    def test_heldPongsAreBounded(self) -> None:
        _, sender, accepted, payload, rest = self._halfFrame()
        for _ in range(MAX_HELD * 3):
            accepted.send(PING, b"x")
        self.assertEqual(len(accepted.proto._held), MAX_HELD)
        sender.proto.dataReceived(rest)
        self.assertEqual(len([1 for _, opcode, _ in accepted.frames() if opcode == PONG]), MAX_HELD)


class ViolationTests(SynchronousTestCase):
    """
    A leg that breaks RFC 6455 is closed with 1002 and dropped; nothing of
    the bad frame reaches the other side, which is dropped with it.
    """

    def _violate(self, *wire: bytes, passed: tuple[tuple[bool, int, bytes], ...] = ()) -> None:
        h, sender, accepted = _pair()
        sender.send(BINARY, b"fine")
        for data in wire:
            sender.proto.dataReceived(data)
        self.assertEqual(accepted.frames(), [(True, BINARY, b"fine"), *passed])
        self.assertEqual([c for c, _ in sender.closes()], [PROTOCOL_ERROR])
        self.assertTrue(sender.transport.disconnecting)
        h.settle()
        self.assertFalse(sender.transport.connected)
        self.assertFalse(accepted.transport.connected)

    def test_unmasked(self) -> None:
        self._violate(b"\x82\x03abc")

    def test_reservedBits(self) -> None:
        self._violate(bytes([0xC2]) + clientFrame(BINARY, b"abc")[1:])

    def test_reservedOpcode(self) -> None:
        self._violate(clientFrame(3, b"abc"))

    def test_continuationFirst(self) -> None:
        self._violate(clientFrame(CONTINUATION, b"abc"))

    def test_newMessageInsideFragmented(self) -> None:
        self._violate(clientFrame(TEXT, b"ab", fin=False), clientFrame(BINARY, b"c"), passed=((False, TEXT, b"ab"),))

    def test_longPing(self) -> None:
        self._violate(clientFrame(PING, b"p" * 126))

    def test_fragmentedPing(self) -> None:
        self._violate(clientFrame(PING, b"p", fin=False))


class _Sink(Protocol):
    def __init__(self) -> None:
        self.received = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class WriteNowTests(TestCase):
    """
    L{writeNow} over a real TCP connection on 127.0.0.1.
    """

    async def _connection(self) -> tuple[Any, _Sink]:
        server: Deferred[Any] = Deferred()

        class Accepting(Protocol):
            def connectionMade(self) -> None:
                server.callback(self.transport)

        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Accepting))
        self.addCleanup(port.stopListening)
        sink = _Sink()
        client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(Factory.forProtocol(lambda: sink))
        self.addCleanup(client.transport.loseConnection)
        transport = await server
        self.addCleanup(transport.loseConnection)
        return transport, sink

    async def test_straightToTheSocket(self) -> None:
        transport, sink = await self._connection()
        writeNow(transport, [b"head", memoryview(b"-body-"), bytearray(b"tail")])
        self.assertEqual((transport.dataBuffer, transport._tempDataLen), (b"", 0))
        await waitFor(lambda: len(sink.received) == 14)
        self.assertEqual(bytes(sink.received), b"head-body-tail")

    async def test_manyPiecesJoined(self) -> None:
        """
        More pieces than L{MAX_PIECES} (sendmsg takes at most 1024) go out
        joined, in order.
        """
        transport, sink = await self._connection()
        pieces = [bytes([i % 256]) * 3 for i in range(MAX_PIECES * 20)]
        writeNow(transport, pieces)
        await waitFor(lambda: len(sink.received) == 3 * len(pieces))
        self.assertEqual(bytes(sink.received), b"".join(pieces))

    async def test_behindBufferedBytes(self) -> None:
        """
        What the transport still holds goes first.
        """
        transport, sink = await self._connection()
        transport.write(b"a" * 1000)
        writeNow(transport, [b"b"])
        self.assertEqual(transport._tempDataLen, 1001)
        await waitFor(lambda: len(sink.received) == 1001)
        self.assertEqual(bytes(sink.received), b"a" * 1000 + b"b")

    async def test_restBufferedWhenTheSocketIsFull(self) -> None:
        """
        When the socket takes only part, the rest is buffered by the
        transport, in order, and all of it arrives.
        """
        transport, sink = await self._connection()
        sink.transport.pauseProducing()
        data = os.urandom(1 << 20)
        writeNow(transport, [data[:100], data[100:]] * 32)
        self.assertGreater(len(transport.dataBuffer) + transport._tempDataLen, 0)
        sink.transport.resumeProducing()
        await waitFor(lambda: len(sink.received) == 32 << 20, timeout=30)
        self.assertEqual(bytes(sink.received), data * 32)

    def test_otherTransportsBuffer(self) -> None:
        transport = StringTransport()
        writeNow(transport, [b"a", memoryview(b"b")] * 100)
        self.assertEqual(transport.value(), b"ab" * 100)


class MessageReaderTests(SynchronousTestCase):
    """
    A listener's control channel reads whole messages with a
    L{MessageReader}, within its size limit.
    """

    def _listener(self) -> tuple[Harness, Peer, list[tuple[bytes, bool]]]:
        h = Harness()
        listener = h.listen()
        got: list[tuple[bytes, bool]] = []
        listener.proto.role.messageReceived = lambda payload, isBinary: got.append((payload, isBinary))
        return h, listener, got

    def test_installed(self) -> None:
        _, listener, _ = self._listener()
        self.assertIsInstance(listener.proto.reader, MessageReader)

    def test_trafficStandsInForAPong(self) -> None:
        """
        As with autobahn's parser, messages from a listener cancel a
        pending ping timeout: a busy listener whose pong is late is kept,
        a silent one is dropped.
        """
        for busy in (True, False):
            h = Harness(settings=RelaySettings(pingInterval=5, pingTimeout=5))
            listener = h.listen()
            listener.proto.role.messageReceived = lambda payload, isBinary: None
            for second in range(12):
                h.clock.advance(1)
                if busy:
                    listener.send(TEXT, b'{"n":%d}' % (second,))
            self.assertEqual(listener.proto.state == listener.proto.STATE_OPEN, busy)

    @settings(max_examples=40, deadline=None)
    @given(
        messages=st.lists(st.tuples(st.booleans(), st.binary(max_size=600), st.integers(1, 3)), min_size=1, max_size=5),
        cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=10),
    )
    def test_wholeMessagesFromAnyPieces(self, messages: list[tuple[bool, bytes, int]], cuts: list[int]) -> None:
        """
        Messages in one or more fragments, with a ping among them, read in
        any pieces, arrive whole, in order, as text or binary.
        """
        _, listener, got = self._listener()
        wire = b""
        expected = []
        for binary, payload, fragments in messages:
            if not binary:
                payload = payload.hex().encode()
            opcode = BINARY if binary else TEXT
            size = -(-len(payload) // fragments) or 1
            parts = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
            for i, part in enumerate(parts):
                wire += clientFrame(opcode if i == 0 else CONTINUATION, part, fin=i == len(parts) - 1)
                if i == 0:
                    wire += clientFrame(PING, b"hi")
            expected.append((payload, binary))
        for chunk in _chunks(wire, cuts):
            listener.proto.dataReceived(chunk)
        self.assertEqual(got, expected)
        self.assertTrue(all(type(payload) is bytes for payload, _ in got))
        self.assertEqual([p for _, opcode, p in listener.frames() if opcode == PONG], [b"hi"] * len(messages))

    def test_tooBig(self) -> None:
        """
        A message above the control channel's limit, even in small
        fragments, is refused with 1009 and the channel dropped.
        """
        h, listener, got = self._listener()
        limit = h.relay.settings.maxControlMessage
        listener.proto.dataReceived(clientFrame(BINARY, b"x" * (limit // 2), fin=False))
        listener.proto.dataReceived(clientFrame(CONTINUATION, b"x" * (limit // 2 + 1)))
        self.assertEqual(got, [])
        self.assertEqual([c for c, _ in listener.closes()], [1009])
        h.settle()
        self.assertFalse(listener.transport.connected)
        self.assertEqual(h.relay.registry.listenerCount(h.entity()), 0)

    def test_textNotUtf8(self) -> None:
        h, listener, got = self._listener()
        listener.proto.dataReceived(clientFrame(TEXT, b'{"x": "\xff"}'))
        self.assertEqual(got, [])
        self.assertEqual([c for c, _ in listener.closes()], [1007])

    def test_closeHandsBackToAutobahn(self) -> None:
        h, listener, got = self._listener()
        listener.proto.dataReceived(clientFrame(TEXT, b"{}") + clientFrame(CLOSE, (1000).to_bytes(2, "big")))
        self.assertEqual(got, [(b"{}", False)])
        self.assertIsNone(listener.proto.reader)
        self.assertEqual(listener.closes(), [(1000, b"")])
        self.assertEqual(h.relay.registry.listenerCount(h.entity()), 0)

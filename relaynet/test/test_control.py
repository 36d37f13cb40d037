# -*- test-case-name: relaynet.test.test_control -*-
"""
Tests for L{relaynet.protocols.control}: a listener's control channel, with
a fake protocol, a L{Clock} and a L{MemoryRegistry}.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from relaynet.auth import Authorizer, Rights, Rule, SasToken, mintToken
from relaynet.core import HandshakeInfo, Relay, RelaySettings
from relaynet.entities import Entity, Namespace
from relaynet.logs import logLevel, setLogLevel
from relaynet.protocols.control import ControlChannel, closeReason
from relaynet.registry import IListenerChannel, MemoryRegistry
from relaynet.test.support import parseFrames

KEY_NAME = "RootManageSharedAccessKey"
KEY = "c2VjcmV0LWtleS1mb3ItdW5pdC10ZXN0cy1vbmx5LTE="
SEND_ONLY = "SendOnly"
HOST = "relay.test"
NOW = 1_700_000_000
GRACE = 300


def token(entity: str = "hyco", expiry: int = NOW + 60, keyName: str = KEY_NAME, key: str = KEY) -> str:
    return mintToken(f"http://{HOST}/{entity}", keyName, key, expiry)


class _Proto:
    """
    Records what the channel asks of its WebSocket.
    """

    STATE_OPEN = 3
    state = STATE_OPEN

    def __init__(self) -> None:
        from twisted.internet.testing import StringTransport

        self.closes: list[tuple[int | None, bytes | None]] = []
        # The outbox registers itself as this transport's producer.
        self.transport = StringTransport()

    def sendCloseFrame(self, code: int | None = None, reasonUtf8: bytes | None = None, isReply: bool = False) -> None:
        self.closes.append((code, reasonUtf8))

    @property
    def messages(self) -> list[tuple[bytes, bool]]:
        """
        The messages the channel wrote, as (payload, isBinary), each checked
        to be one whole frame.
        """
        frames = parseFrames(self.transport.value())
        assert all(fin for fin, _, _ in frames), frames
        return [(payload, opcode == 2) for _, opcode, payload in frames]


class _CountingRegistry(MemoryRegistry):
    def __init__(self) -> None:
        super().__init__()
        self.unregistered = 0

    def unregister(self, entity: Entity, channel: Any) -> bool:
        self.unregistered += 1
        return super().unregister(entity, channel)


class ChannelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.namespace = Namespace(dynamicEntities=True)
        self.entity = self.namespace.declare(Entity(name="hyco"))
        self.registry = _CountingRegistry()
        self.relay = Relay(
            namespace=self.namespace,
            authorizer=Authorizer(
                [Rule(name=KEY_NAME, primaryKey=KEY), Rule(name=SEND_ONLY, primaryKey=KEY, rights=Rights.SEND)],
                graceSeconds=GRACE,
            ),
            clock=self.clock,
            settings=RelaySettings(tokenGrace=GRACE),
            registry=self.registry,
        )

    def channel(self, entity: Entity | None = None, expiry: int = NOW + 60) -> tuple[ControlChannel, _Proto]:
        entity = entity or self.entity
        proto = _Proto()
        info = HandshakeInfo(host=HOST, secure=False, path=entity.name, rawQuery="", headers=[], query={})
        checked = SasToken.parse(token(entity.name, expiry))
        channel = ControlChannel(self.relay, proto, entity, info, checked, "listener-1")  # type: ignore[arg-type]
        self.successResultOf(Deferred.fromCoroutine(channel.register()))
        channel.opened()
        return channel, proto

    def renew(self, channel: ControlChannel, value: object) -> None:
        channel.messageReceived(json.dumps({"renewToken": {"token": value}}).encode(), False)

    def assertRenewalFailed(self, proto: _Proto) -> None:
        [(code, reason)] = proto.closes
        self.assertEqual(code, 1008)
        assert reason is not None
        self.assertTrue(reason.startswith(b"Token renewal failed"), reason)
        self.assertEqual(self.registry.listenerCount(self.entity), 0)

    def test_isAListenerChannel(self) -> None:
        channel, _ = self.channel()
        self.assertTrue(verifyObject(IListenerChannel, channel))
        self.assertEqual(channel.rendezvousBase, f"ws://{HOST}")

    def test_registered(self) -> None:
        channel, _ = self.channel()
        self.assertTrue(channel.registered)
        self.assertEqual(self.registry.listenerCount(self.entity), 1)

    def test_expiryPlusGraceCloses1008(self) -> None:
        channel, proto = self.channel(expiry=NOW + 60)
        self.clock.advance(60 + GRACE - 1)
        self.assertEqual(proto.closes, [])
        self.clock.advance(1)
        [(code, reason)] = proto.closes
        self.assertEqual(code, 1008)
        self.assertIn(b"expired", reason or b"")
        self.assertFalse(channel.registered)
        self.assertEqual(self.registry.listenerCount(self.entity), 0)

    def test_alreadyExpiredTokenClosesAtOnceAfterGrace(self) -> None:
        _, proto = self.channel(expiry=NOW - GRACE - 10)
        self.clock.advance(0)
        self.assertEqual([code for code, _ in proto.closes], [1008])

    def test_renewalPushesExpiry(self) -> None:
        channel, proto = self.channel(expiry=NOW + 60)
        self.clock.advance(30)
        self.renew(channel, token(expiry=NOW + 3600))
        self.clock.advance(60 + GRACE)
        self.assertEqual(proto.closes, [])
        self.assertTrue(channel.registered)
        self.clock.advance(3600 + GRACE - (60 + GRACE) - 30)
        self.assertEqual([code for code, _ in proto.closes], [1008])

    def test_renewalWithinGraceAccepted(self) -> None:
        channel, proto = self.channel(expiry=NOW + 60)
        self.clock.advance(100)
        self.renew(channel, token(expiry=NOW + 90))
        self.assertEqual(proto.closes, [])
        self.clock.advance(90 + GRACE - 100 - 1)
        self.assertEqual(proto.closes, [])
        self.clock.advance(1)
        self.assertEqual(len(proto.closes), 1)

    def test_renewalForOtherEntityFails(self) -> None:
        channel, proto = self.channel()
        self.renew(channel, token("other", NOW + 3600))
        self.assertRenewalFailed(proto)

    def test_renewalExpiredBeyondGraceFails(self) -> None:
        channel, proto = self.channel()
        self.renew(channel, token(expiry=NOW - GRACE - 1))
        self.assertRenewalFailed(proto)

    def test_renewalWithWrongKeyFails(self) -> None:
        channel, proto = self.channel()
        self.renew(channel, token(expiry=NOW + 3600, key="d3Jvbmcta2V5"))
        self.assertRenewalFailed(proto)

    def test_renewalWithoutListenRightFails(self) -> None:
        channel, proto = self.channel()
        self.renew(channel, token(expiry=NOW + 3600, keyName=SEND_ONLY))
        self.assertRenewalFailed(proto)

    def test_renewalWithGarbageFails(self) -> None:
        for value in ["garbage", "", 5, None]:
            with self.subTest(value=value):
                channel, proto = self.channel()
                self.renew(channel, value)
                self.assertRenewalFailed(proto)

    def test_failedRenewalStopsExpiryTimer(self) -> None:
        channel, proto = self.channel()
        self.renew(channel, "garbage")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10_000)
        self.assertEqual(len(proto.closes), 1)

    def test_ignoredMessages(self) -> None:
        channel, proto = self.channel()
        for payload, isBinary in [
            (b'{"message":"hi"}', False),
            (b'{"renewToken":"not an object"}', False),
            (b"{not json", False),
            (b"\xff\xfe", False),
            (b"[1, 2]", False),
            (b"5", False),
            (b"{}", False),
            (b"", True),
            (b'{"renewToken":{"token":"garbage"}}', True),
        ]:
            channel.messageReceived(payload, isBinary)
        self.assertEqual(proto.closes, [])
        self.assertTrue(channel.registered)

    def test_strayAnswers(self) -> None:
        """
        An answer to no pending request is dropped.  One to an event (which
        nobody waits on) is dropped silently; another is logged at debug.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.addCleanup(setLogLevel, logLevel())
        setLogLevel("debug")
        channel, proto = self.channel()
        del events[:]
        channel.messageReceived(b'{"response":{"requestId":"evt_1","statusCode":202}}', False)
        self.assertEqual([e for e in events if e.get("log_namespace") == "relaynet.protocols.control"], [])
        channel.messageReceived(b'{"response":{"requestId":"r9","statusCode":200}}', False)
        [event] = [e for e in events if e.get("log_namespace") == "relaynet.protocols.control"]
        self.assertEqual(event["log_format"], "listener {listener} answered an unknown request")
        self.assertEqual((proto.closes, channel.registered), ([], True))

    def test_lostUnregistersOnce(self) -> None:
        channel, _ = self.channel()
        channel.lost()
        channel.lost()
        self.assertEqual(self.registry.unregistered, 1)
        self.assertEqual(self.registry.listenerCount(self.entity), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_closeAfterLostDoesNotUnregisterAgain(self) -> None:
        channel, proto = self.channel()
        channel.lost()
        channel.close(1001, "going")
        self.assertEqual(self.registry.unregistered, 1)
        self.assertEqual(proto.closes, [(1001, b"going")])

    def test_lostRemovesDynamicEntityWithLastListener(self) -> None:
        entity = self.namespace.forListener("fresh")
        first, _ = self.channel(entity)
        second, _ = self.channel(entity)
        first.lost()
        self.assertIs(self.namespace.get("fresh"), entity)
        second.lost()
        self.assertIsNone(self.namespace.get("fresh"))

    def test_lostKeepsDeclaredEntity(self) -> None:
        channel, _ = self.channel()
        channel.lost()
        self.assertIs(self.namespace.get("hyco"), self.entity)

    def test_sendCommandWritesCompactJsonText(self) -> None:
        channel, proto = self.channel()
        channel.sendCommand({"accept": {"address": "ws://x/$hc/hyco?a=1", "id": "i", "n": 1}})
        self.assertEqual(proto.messages, [(b'{"accept":{"address":"ws://x/$hc/hyco?a=1","id":"i","n":1}}', False)])

    def test_commandAndBodyInOneWrite(self) -> None:
        """
        A command with a body goes out as two frames in one write, the body
        right behind its command.
        """
        channel, proto = self.channel()
        channel.sendCommand({"request": {"id": "r"}}, b"\x00body")
        self.assertEqual(proto.messages, [(b'{"request":{"id":"r"}}', False), (b"\x00body", True)])
        self.assertEqual(proto.transport.value()[:1], b"\x81")

    def test_noCommandOnceClosing(self) -> None:
        """
        A channel that is closing takes no command; the caller hears why.
        """
        from relaynet.errors import BadGateway

        channel, proto = self.channel()
        proto.state = 2
        self.assertRaises(BadGateway, channel.sendCommand, {"request": {"id": "r"}}, b"body")
        self.assertEqual(proto.transport.value(), b"")

    def test_closeReasonFitsAControlFrame(self) -> None:
        channel, proto = self.channel()
        channel.close(1008, "x" * 300)
        [(code, reason)] = proto.closes
        self.assertEqual((code, len(reason or b"")), (1008, 123))


class CloseReasonTests(SynchronousTestCase):
    def test_cutOnACharacter(self) -> None:
        """
        A long reason is cut to 123 bytes without splitting a character.
        """
        reason = closeReason("Token renewal failed: " + "é" * 100)
        self.assertLessEqual(len(reason), 123)
        self.assertTrue(reason.decode("utf-8").endswith("é"))

    def test_shortReasonKept(self) -> None:
        self.assertEqual(closeReason("gone"), b"gone")


class ServerFrameTests(SynchronousTestCase):
    """
    Commands go out as frames made by the relay itself.
    """

    def test_lengths(self) -> None:
        """
        Each length form of RFC 6455 section 5.2: the header says FIN, the
        opcode, no mask and the length; the payload follows unchanged.
        """
        import struct

        from relaynet.protocols.control import serverFrame

        for size in (0, 1, 125, 126, 65535, 65536, 70000):
            payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
            frame = serverFrame(0x2, payload)
            self.assertEqual(frame[0], 0x82)
            short = frame[1]
            self.assertEqual(short & 0x80, 0)
            if short < 126:
                length, offset = short, 2
            elif short == 126:
                length, offset = struct.unpack("!H", frame[2:4])[0], 4
            else:
                length, offset = struct.unpack("!Q", frame[2:10])[0], 10
            self.assertEqual((length, frame[offset:]), (size, payload))
            self.assertEqual(short < 126, size < 126)

    def test_sharedFraming(self) -> None:
        """
        The same event bytes sent to many channels are framed once; other
        bytes, even equal ones, are framed anew.
        """
        from relaynet.protocols.control import _LastFrames, serverFrame

        frames = _LastFrames()
        command, body = b'{"request": {}}', b"x" * 10
        first = frames.get(command, body)
        self.assertEqual(first, serverFrame(0x1, command) + serverFrame(0x2, body))
        self.assertIs(frames.get(command, body), first)
        other = frames.get(command, None)
        self.assertEqual(other, serverFrame(0x1, command))
        self.assertIsNot(frames.get(command, body), first)


class OutboxTests(SynchronousTestCase):
    """
    A subscriber's outbox queues the event's frames themselves, shared by
    every subscriber of the event, and sends them in order once it may.
    """

    class _Channel:
        def __init__(self) -> None:
            self.sent: list[bytes] = []
            self.batches: list[int] = []
            self.missed: list[int] = []

        def sendFrames(self, frames: list[bytes]) -> None:
            self.batches.append(len(frames))
            self.sent.extend(frames)

        def fellBehind(self, missed: int) -> None:
            self.missed.append(missed)

    def test_queuedFramesAreShared(self) -> None:
        from relaynet.protocols.control import _LastFrames
        from relaynet.protocols.pubsub import Outbox

        frames = _LastFrames()
        channels = [self._Channel(), self._Channel()]
        outboxes = [Outbox(channel, limit=10) for channel in channels]  # type: ignore[arg-type]
        for outbox in outboxes:
            outbox.pauseProducing()
        events = [(f'{{"request": {{"id": {i}}}}}'.encode(), bytes([i]) * 100) for i in range(3)]
        for encoded, body in events:
            for outbox in outboxes:
                self.assertTrue(outbox.offer(frames.get(encoded, body)))
        self.assertEqual([c.sent for c in channels], [[], []])
        for outbox in outboxes:
            outbox.resumeProducing()
        first, second = (c.sent for c in channels)
        self.assertEqual(len(first), 3)
        self.assertTrue(all(a is b for a, b in zip(first, second)))
        self.assertEqual([parseFrames(f) for f in first], [[(True, 1, e), (True, 2, b)] for e, b in events])

    def test_drainsInBatches(self) -> None:
        """
        A resumed outbox hands its transport about L{DRAIN_BYTES} at a
        time, in order, and stops as soon as the transport pauses it.
        """
        from relaynet.protocols.pubsub import DRAIN_BYTES, Outbox

        channel = self._Channel()
        outbox = Outbox(channel, limit=1000)  # type: ignore[arg-type]
        outbox.pauseProducing()
        events = [bytes([i]) * 1000 for i in range(200)]
        for event in events:
            self.assertTrue(outbox.offer(event))
        perBatch = -(-DRAIN_BYTES // 1000)
        pauses = []
        original = channel.sendFrames

        def sendFrames(frames: list[bytes]) -> None:
            original(frames)
            if len(channel.batches) == 1:
                # The transport's buffer is full after the first batch.
                pauses.append(len(frames))
                outbox.pauseProducing()

        channel.sendFrames = sendFrames  # type: ignore[method-assign]
        outbox.resumeProducing()
        self.assertEqual((channel.batches, pauses), ([perBatch], [perBatch]))
        outbox.resumeProducing()
        self.assertEqual(channel.sent, events)
        self.assertEqual(channel.batches, [perBatch] * 3 + [200 - 3 * perBatch])

    def test_overflowCutsOff(self) -> None:
        from relaynet.protocols.pubsub import Outbox

        channel = self._Channel()
        outbox = Outbox(channel, limit=2)  # type: ignore[arg-type]
        outbox.pauseProducing()
        self.assertTrue(outbox.offer(b"a"))
        self.assertTrue(outbox.offer(b"b"))
        self.assertFalse(outbox.offer(b"c"))
        self.assertEqual(channel.missed, [3])
        self.assertFalse(outbox.hasRoom())
        outbox.resumeProducing()
        self.assertEqual(channel.sent, [])

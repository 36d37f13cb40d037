# -*- test-case-name: relaynet.test.test_splice -*-
"""
Tests for L{relaynet.protocols.splice}: a sender and the listener's
rendezvous socket joined by the relay, over fake transports.
"""

from __future__ import annotations

from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from relaynet.core import RelaySettings
from relaynet.protocols.splice import OPEN, Leg, splice
from relaynet.test.test_websocket import BINARY, CONTINUATION, TEXT, Harness, Peer


class _Proto:
    """
    Just enough of a protocol for L{splice}: a transport and a state.
    """

    state = OPEN

    def __init__(self) -> None:
        self.transport = StringTransport()


def _pair(settings: RelaySettings | None = None) -> tuple[Harness, Peer, Peer]:
    h = Harness(settings)
    _, sender, accepted = h.pair()
    return h, sender, accepted


class SpliceTests(SynchronousTestCase):
    """
    L{splice} makes each side the other's producer.
    """

    def test_eachSideProducesForTheOther(self) -> None:
        a, b = Leg(_Proto()), Leg(_Proto())  # type: ignore[arg-type]
        splice(a, b)
        self.assertIs(a.partner, b)
        self.assertIs(b.partner, a)
        ta, tb = a.proto.transport, b.proto.transport
        self.assertTrue(ta.streaming)
        self.assertTrue(verifyObject(IPushProducer, ta.producer))
        ta.producer.pauseProducing()
        self.assertEqual((ta.producerState, tb.producerState), ("producing", "paused"))
        ta.producer.resumeProducing()
        self.assertEqual(tb.producerState, "producing")
        tb.producer.pauseProducing()
        self.assertEqual((ta.producerState, tb.producerState), ("paused", "producing"))

    def test_stopProducingLeavesTheOtherSideAlone(self) -> None:
        a, b = Leg(_Proto()), Leg(_Proto())  # type: ignore[arg-type]
        splice(a, b)
        a.proto.transport.producer.stopProducing()
        self.assertEqual(b.proto.transport.producerState, "producing")
        self.assertFalse(b.proto.transport.disconnecting)


class BackpressureTests(SynchronousTestCase):
    """
    A full send buffer on one side stops the relay reading the other.
    """

    def test_listenerFullPausesSender(self) -> None:
        _, sender, accepted = _pair()
        accepted.transport.producer.pauseProducing()
        self.assertEqual(sender.transport.producerState, "paused")
        self.assertEqual(accepted.transport.producerState, "producing")
        accepted.transport.producer.resumeProducing()
        self.assertEqual(sender.transport.producerState, "producing")

    def test_senderFullPausesListener(self) -> None:
        _, sender, accepted = _pair()
        sender.transport.producer.pauseProducing()
        self.assertEqual(accepted.transport.producerState, "paused")
        sender.transport.producer.resumeProducing()
        self.assertEqual(accepted.transport.producerState, "producing")

    def test_pausedSideResumesToReadTheCloseReply(self) -> None:
        """
        A side paused for a partner that then goes away while this side
        waits for its peer's answer to a close is read again.
        """
        _, sender, accepted = _pair()
        accepted.transport.producer.pauseProducing()
        accepted.sendClose(1000)
        self.assertEqual(sender.closes(), [(1000, b"")])
        accepted.transport.connectionGone()
        self.assertEqual(sender.transport.producerState, "producing")
        self.assertIsNone(sender.transport.producer)


class FrameTests(SynchronousTestCase):
    """
    Frames pass as they arrive, with their type.
    """

    def test_textAndBinaryKeepTheirType(self) -> None:
        _, sender, accepted = _pair()
        sender.send(TEXT, "héllo".encode())
        sender.send(BINARY, b"\x00\xff")
        accepted.send(BINARY, b"back")
        accepted.send(TEXT, b"again")
        self.assertEqual(accepted.messages(), [(TEXT, "héllo".encode()), (BINARY, b"\x00\xff")])
        self.assertEqual(sender.messages(), [(BINARY, b"back"), (TEXT, b"again")])

    def test_fragmentsPassOneByOne(self) -> None:
        _, sender, accepted = _pair()
        sender.send(TEXT, b"hel", fin=False)
        self.assertEqual(accepted.frames(), [(False, TEXT, b"hel")])
        sender.send(CONTINUATION, b"lo", fin=True)
        self.assertEqual(accepted.messages(), [(TEXT, b"hello")])

    def test_framesPassAsTheyAre(self) -> None:
        """
        Every frame arrives as the frame it was, small or large: no frame is
        split, joined, or followed by one the sender did not send.
        """
        _, sender, accepted = _pair()
        sender.send(BINARY, b"ping")
        large = bytes(range(256)) * 600
        sender.send(TEXT, large)
        sender.send(BINARY, large, fin=False)
        sender.send(CONTINUATION, b"", fin=False)
        sender.send(CONTINUATION, b"end", fin=True)
        self.assertEqual(
            accepted.frames(),
            [
                (True, BINARY, b"ping"),
                (True, TEXT, large),
                (False, BINARY, large),
                (False, CONTINUATION, b""),
                (True, CONTINUATION, b"end"),
            ],
        )

    def test_emptyMessagePasses(self) -> None:
        _, sender, accepted = _pair()
        sender.send(BINARY, b"")
        self.assertEqual(accepted.messages(), [(BINARY, b"")])

    def test_largeFramePasses(self) -> None:
        _, sender, accepted = _pair()
        payload = bytes(range(256)) * 300
        sender.send(BINARY, payload)
        self.assertEqual(accepted.messages(), [(BINARY, payload)])

    def test_pingIsAnsweredNotForwarded(self) -> None:
        _, sender, accepted = _pair()
        sender.send(9, b"are you there")
        self.assertEqual([(o, p) for _, o, p in sender.frames()], [(10, b"are you there")])
        self.assertEqual(accepted.frames(), [])


class CloseTests(SynchronousTestCase):
    """
    A close is passed on, unanswered, and its answer passed back.
    """

    def test_senderCloseIsPassedOnWithoutReply(self) -> None:
        _, sender, accepted = _pair()
        sender.sendClose(1000, b"Shutdown")
        self.assertEqual(accepted.closes(), [(1000, b"Shutdown")])
        self.assertEqual(sender.closes(), [])
        self.assertFalse(sender.transport.disconnecting)

    def test_halfClosedSideStillReceives(self) -> None:
        _, sender, accepted = _pair()
        sender.sendClose(1000, b"Shutdown")
        accepted.send(BINARY, b"last words")
        self.assertEqual(sender.messages(), [(BINARY, b"last words")])

    def test_replyIsPassedBack(self) -> None:
        h, sender, accepted = _pair()
        sender.sendClose(1000, b"Shutdown")
        accepted.sendClose(1000, b"Shutdown too")
        self.assertEqual(sender.closes(), [(1000, b"Shutdown too")])
        self.assertTrue(sender.transport.disconnecting)
        self.assertTrue(accepted.transport.disconnecting)
        h.settle()
        self.assertFalse(sender.transport.connected or accepted.transport.connected)

    def test_listenerCloseIsPassedToSender(self) -> None:
        _, sender, accepted = _pair()
        accepted.sendClose(4001, b"app says bye")
        self.assertEqual(sender.closes(), [(4001, b"app says bye")])
        self.assertEqual(accepted.closes(), [])
        sender.sendClose(4001, b"ok")
        self.assertEqual(accepted.closes(), [(4001, b"ok")])

    def test_senderAbortAbortsListener(self) -> None:
        _, sender, accepted = _pair()
        sender.transport.connectionGone()
        self.assertTrue(accepted.transport.aborted)
        self.assertEqual(accepted.closes(), [])

    def test_listenerAbortAbortsSender(self) -> None:
        _, sender, accepted = _pair()
        accepted.transport.connectionGone()
        self.assertTrue(sender.transport.aborted)
        self.assertEqual(sender.closes(), [])

    def test_halfClosedPartnerIsClosedNotAborted(self) -> None:
        """
        A side that already passed its close on ends gently when the other
        vanishes: its peer is waiting for the close, not for data.
        """
        _, sender, accepted = _pair()
        sender.sendClose(1000, b"Shutdown")
        accepted.transport.connectionGone()
        self.assertTrue(sender.transport.disconnecting)
        self.assertFalse(sender.transport.aborted)

    def test_unansweredCloseEndsBothAfterCloseTimeout(self) -> None:
        h, sender, accepted = _pair(RelaySettings(closeTimeout=5))
        sender.sendClose(1000, b"Shutdown")
        h.clock.advance(4.9)
        self.assertFalse(accepted.transport.disconnecting or sender.transport.disconnecting)
        h.clock.advance(0.1)
        self.assertTrue(accepted.transport.aborted)
        h.settle()
        self.assertTrue(sender.transport.disconnecting)
        self.assertFalse(sender.transport.connected)

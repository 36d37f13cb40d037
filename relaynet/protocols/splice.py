# -*- test-case-name: relaynet.test.test_splice -*-
"""
Splicing a sender's WebSocket to a listener's rendezvous WebSocket.

Messages pass frame by frame as they arrive, text stays text and binary stays
binary, and nothing is buffered in the relay: when one side's send buffer is
full the relay stops reading the other side (end-to-end backpressure).  Once
both sides are open, each L{Leg} reads its peer's frames itself
(L{relaynet.protocols.frames.FrameReader}); its message methods pass on what
autobahn parsed before that (frames that came with a handshake).

A close from one side is passed on to the other without being answered, so
the other side may still send (half-close); its close is then passed back,
and both connections end.  A side whose TCP connection dies without a close
takes the other side down with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.interfaces import IPushProducer, ITransport
from zope.interface import implementer

from relaynet.protocols.frames import FrameReader, serverHeader, writeNow

if TYPE_CHECKING:
    from relaynet.protocols.websocket import HybridConnectionProtocol

__all__ = ["Leg", "ReadSide", "splice"]

OPEN = WebSocketProtocol.STATE_OPEN
CLOSING = WebSocketProtocol.STATE_CLOSING


@implementer(IPushProducer)
class ReadSide:
    """
    The reading half of a transport, as a producer for the other side: it
    pauses and resumes reading, and leaves closing to the splice.
    """

    __slots__ = ("_transport",)

    def __init__(self, transport: ITransport) -> None:
        self._transport = transport

    def pauseProducing(self) -> None:
        self._transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        self._transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        pass


class Leg(FrameReader):
    """
    One side of a splice: the frames its peer sends go to the partner.

    Once both sides are open the leg reads its peer's frames itself (a
    L{FrameReader}): it writes the partner an unmasked header for each data
    frame and passes the payload on as it arrives.  Frames autobahn parsed
    before that (those that came with a handshake) come through
    L{messageBegin}, L{frameBegin}, L{frameData} and L{messageEnd}.
    """

    # Two per relayed connection, for as long as it lasts.
    __slots__ = ("partner", "halfClosed", "_binary", "_started", "_to")

    def __init__(self, proto: HybridConnectionProtocol) -> None:
        super().__init__(proto)
        self.partner: Leg | None = None
        self.halfClosed = False
        self._binary = True
        # Whether the partner's copy of the message has begun.
        self._started = False
        # Where the frame being read goes (None: dropped, the partner is
        # closing or gone).
        self._to: HybridConnectionProtocol | None = None

    @property
    def transport(self) -> Any:
        return self.proto.transport

    def _target(self) -> HybridConnectionProtocol | None:
        if self.partner is not None and self.partner.proto.state == OPEN:
            return self.partner.proto
        return None

    # Reading frames (FrameReader).

    def _begin(self, first: int, opcode: int, length: int, out: list[Any]) -> bool:
        target = self._target()
        self._to = target
        if target is not None:
            out.append(serverHeader(first, length))
            if length and target._held is None:
                target._held = []
        return True

    def _piece(self, piece: memoryview, out: list[Any]) -> None:
        if self._to is not None:
            assert self._unmask is not None
            out.append(self._unmask(piece))

    def _frameEnd(self, out: list[Any]) -> bool:
        # What the relay held for the partner meanwhile may follow.
        target, self._to = self._to, None
        if target is not None and target._held is not None:
            held, target._held = target._held, None
            out.extend(held)
        return True

    def _flush(self, out: list[Any]) -> None:
        if out and self.partner is not None:
            writeNow(self.partner.proto.transport, out)
        del out[:]

    # What autobahn parsed.

    def messageBegin(self, isBinary: bool) -> None:
        self._binary = isBinary
        self._started = False

    def frameBegin(self, length: int) -> None:
        target = self._target()
        if target is None:
            return
        if not self._started:
            target.beginMessage(isBinary=self._binary)
            self._started = True
        target.beginMessageFrame(length)
        if not length:
            target.sendMessageFrameData(b"")

    def frameData(self, payload: bytes) -> None:
        target = self._target()
        if target is not None and payload:
            target.sendMessageFrameData(payload)

    def messageEnd(self) -> None:
        target = self._target()
        if target is not None and self._started:
            target.endMessage()

    def closeFrame(self, code: int | None, reason: bytes | None) -> bool:
        """
        The peer sent a close frame.

        @return: C{True} if the splice took care of it, C{False} to let the
            protocol answer as usual.
        """
        partner = self.partner
        if partner is None:
            return False
        if self.proto.state == OPEN and partner.proto.state == OPEN:
            # The peer starts closing: pass it on and keep this side open
            # for whatever the other peer still sends.
            self.halfClosed = True
            self.proto.wasClean = True
            partner.proto.sendCloseFrame(code=code, reasonUtf8=reason)
            return True
        if partner.halfClosed and partner.proto.state == OPEN:
            # The answer to a close passed on earlier: pass it back.
            partner.proto.sendCloseFrame(code=code, reasonUtf8=reason, isReply=True)
            partner.proto.dropConnection(abort=False)
        return False

    def lost(self) -> None:
        """
        This side's connection is gone.
        """
        partner, self.partner = self.partner, None
        if partner is None:
            return
        partner.partner = None
        transport: Any = partner.proto.transport
        transport.unregisterProducer()
        if partner.proto.state == OPEN:
            # Without a close from this side, the other cannot end cleanly.
            partner.proto.dropConnection(abort=not partner.halfClosed)
        else:
            # Closing: it must read its peer's answer even if this side had
            # paused it.
            transport.resumeProducing()

def splice(a: Any, b: Any) -> None:
    """
    Join two open sides (WebSocket L{Leg}s, or the native ends of
    L{relaynet.protocols.native}): each passes what it reads to the other,
    and each stops reading while the other cannot write.
    """
    a.partner, b.partner = b, a
    ta: Any = a.transport
    tb: Any = b.transport
    ta.registerProducer(ReadSide(tb), True)
    tb.registerProducer(ReadSide(ta), True)

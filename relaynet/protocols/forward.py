# -*- test-case-name: relaynet.test.test_forward -*-
"""
Passing WebSocket frames from one leg of a relayed connection to the other
without taking messages apart.

Once two WebSocket legs are spliced, each side's incoming bytes go through
a L{FrameForwarder} instead of autobahn's parser.  For every data frame it
reads the header, writes the partner an unmasked header for the same frame
(same opcode, same FIN bit, same length) and then passes the payload on,
unmasked, piece by piece as it arrives: no frame or message is held, the
frame boundaries, text and binary, and fragmentation are kept exactly.

Control frames are handed whole (at most 131 bytes) to the leg's autobahn
protocol, which answers pings, takes pongs, and runs the closing handshake
as before (L{relaynet.protocols.splice.Leg.closeFrame}).  After a close
frame the forwarder steps aside and autobahn reads the rest.

The relay writes frames of its own to a leg (a pong, a close when it stops)
only between two of the frames forwarded to it: while a forwarded frame is
half-written, the leg holds them (L{HybridConnectionProtocol.sendData}) and
the forwarder releases them when the frame ends.

On plain TCP the forwarder writes to the partner's socket directly when
Twisted holds nothing for it (L{writeNow}), which saves a trip through the
reactor per write; otherwise, and over TLS, the transport buffers as usual
and backpressure is the splice's (L{relaynet.protocols.splice.ReadSide}).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.xormasker import create_xor_masker
from twisted.internet import tcp

if TYPE_CHECKING:
    from relaynet.protocols.splice import Leg
    from relaynet.protocols.websocket import HybridConnectionProtocol

try:
    # autobahn's compiled XOR masker (NVX), used on a buffer in place; its
    # Python wrapper copies every payload twice more.
    from _nvx_xormasker import ffi as _ffi, lib as _lib
except ImportError:  # pragma: no cover - autobahn without its NVX build
    _ffi = _lib = None

__all__ = ["FrameForwarder", "Unmasker", "writeNow"]

OPEN = WebSocketProtocol.STATE_OPEN
_CLOSE = 0x8
_DATA_OPCODES = (0x0, 0x1, 0x2)
_CONTROL_OPCODES = (0x8, 0x9, 0xA)
#: The most writes a leg holds while a forwarded frame is half-written;
#: pongs beyond it are not sent (a peer pinging that fast gets fewer).
MAX_HELD = 64
#: Writes of more pieces than this are joined first (sendmsg's iovec limit
#: is 1024; many tiny frames are cheaper joined anyway).
MAX_PIECES = 64
#: Below this, a payload piece is unmasked in Python (cheaper than a call
#: into the compiled masker).
SMALL = 128
#: Bytes of a read joined to a partial header to complete it (a control
#: frame is at most 6 + 125).
_PROBE = 256


def serverHeader(first: int, length: int) -> bytes:
    """
    An unmasked frame header with first byte C{first} (FIN, RSV, opcode) for
    a payload of C{length} bytes.
    """
    if length < 126:
        return struct.pack("!BB", first, length)
    if length < 1 << 16:
        return struct.pack("!BBH", first, 126, length)
    return struct.pack("!BBQ", first, 127, length)


class Unmasker:
    """
    Unmasks one frame's payload, piece by piece, with its 4-byte key.
    """

    __slots__ = ("key", "done", "_nvx", "_keep")

    def __init__(self, key: bytes, length: int) -> None:
        self.key = key
        self.done = 0
        self._nvx: Any = None
        self._keep: Any = None
        if length >= SMALL:
            if _lib is not None:
                self._keep = _ffi.new("uint8_t[4]", key)
                self._nvx = _ffi.gc(_lib.nvx_xormask_new(self._keep), _lib.nvx_xormask_free)
                _lib.nvx_xormask_set_impl(self._nvx, 2)
            else:  # pragma: no cover - autobahn without its NVX build
                self._keep = create_xor_masker(key, length)

    def __call__(self, piece: memoryview) -> bytes | bytearray:
        n = len(piece)
        if self._nvx is not None:
            out: bytes | bytearray = bytearray(piece)
            _lib.nvx_xormask_process(self._nvx, _ffi.from_buffer(out), n)
        elif self._keep is not None:  # pragma: no cover - autobahn without its NVX build
            out = self._keep.process(bytes(piece))
        else:
            shift = self.done & 3
            key = self.key[shift:] + self.key[:shift]
            pad = (key * (n // 4 + 1))[:n]
            out = (int.from_bytes(piece, "little") ^ int.from_bytes(pad, "little")).to_bytes(n, "little")
        self.done += n
        return out


def writeNow(transport: Any, pieces: list[Any]) -> None:
    """
    Write C{pieces} to C{transport} in order: straight to the socket when it
    is a plain TCP connection with nothing buffered, through the transport
    (which buffers what the socket does not take) otherwise.
    """
    if len(pieces) > MAX_PIECES:
        pieces = [b"".join(pieces)]
    if (
        isinstance(transport, tcp.Connection)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport.dataBuffer
        and not transport._tempDataLen
    ):
        try:
            sent = transport.socket.sendmsg(pieces)
        except OSError:
            # Full (EAGAIN) or failed: the transport finds out which.
            sent = 0
        if sent:
            rest = []
            for piece in pieces:
                size = len(piece)
                if sent >= size:
                    sent -= size
                    continue
                rest.append(memoryview(piece)[sent:] if sent else piece)
                sent = 0
            if not rest:
                return
            pieces = rest
    transport.write(b"".join(pieces))


class FrameForwarder:
    """
    The incoming side of one spliced WebSocket leg: its peer's frames go to
    the partner leg's peer.

    @ivar proto: the leg's protocol, whose C{dataReceived} feeds L{feed}.
    @ivar leg: its L{Leg}, which knows whether the partner is open.
    @ivar partner: the partner leg's protocol, to which everything goes.
    """

    __slots__ = ("proto", "leg", "partner", "_ready", "_head", "_left", "_to", "_unmask", "_inMessage", "_broken")

    def __init__(self, proto: HybridConnectionProtocol, leg: Leg, partner: HybridConnectionProtocol) -> None:
        self.proto = proto
        self.leg = leg
        self.partner = partner
        self._ready = False
        # The start of a frame header (or of a control frame) read so far.
        self._head = b""
        # Payload bytes still to come in the current frame, and whether
        # they go on (None: dropped, the partner is closing or gone).
        self._left = 0
        self._to: HybridConnectionProtocol | None = None
        self._unmask: Unmasker | None = None
        # Whether a fragmented data message is in progress.
        self._inMessage = False
        # Whether the peer broke the protocol (nothing more is read).
        self._broken = False

    def ready(self) -> bool:
        """
        Whether autobahn is between messages with nothing buffered, so that
        the forwarder can take over (it may still be reading frames that
        came with the handshake).
        """
        if not self._ready:
            proto = self.proto
            self._ready = (
                proto.state == OPEN and not proto.data and proto.current_frame is None and not proto.inside_message
            )
        return self._ready

    def feed(self, data: bytes) -> None:
        """
        Forward what the leg's peer sent.
        """
        out: list[Any] = []
        view = memoryview(data)
        going = True
        if self._head:
            # Complete the header from the first bytes only, rather than
            # copying the whole read behind it.
            head, self._head = self._head, b""
            going = self._feed(memoryview(head + bytes(view[:_PROBE])), out)
            view = view[_PROBE:]
            if not going and view and not self._broken:
                # After a close, autobahn reads the rest.
                self.proto._dataReceived(bytes(view))
        if going and view:
            self._feed(view, out)
        if out:
            writeNow(self.partner.transport, out)

    def _feed(self, view: memoryview, out: list[Any]) -> bool:
        """
        Forward the frames in C{view}, adding what goes to the partner to
        C{out}.

        @return: whether the forwarder goes on reading.
        """
        end = len(view)
        pos = 0
        while pos < end:
            left = self._left
            if left:
                n = min(left, end - pos)
                if self._to is not None:
                    assert self._unmask is not None
                    out.append(self._unmask(view[pos : pos + n]))
                pos += n
                self._left = left - n
                if not self._left:
                    self._frameDone(out)
                continue
            # A frame header.
            avail = end - pos
            if avail < 2:
                break
            first = view[pos]
            second = view[pos + 1]
            if not second & 0x80:
                self._violation("unmasked frame from a client", out)
                return False
            length = second & 0x7F
            size = 6 if length < 126 else 8 if length == 126 else 14
            if avail < size:
                break
            opcode = first & 0x0F
            if length == 126:
                length = int.from_bytes(view[pos + 2 : pos + 4], "big")
            elif length == 127:
                length = int.from_bytes(view[pos + 2 : pos + 10], "big")
            problem = self._check(first, opcode, length)
            if problem:
                self._violation(problem, out)
                return False
            if opcode in _CONTROL_OPCODES:
                if avail < size + length:
                    break
                frame = bytes(view[pos : pos + size + length])
                pos += size + length
                if not self._control(frame, opcode, out):
                    # A close: autobahn reads the rest.
                    if pos < end:
                        self.proto._dataReceived(bytes(view[pos:]))
                    return False
                continue
            self._inMessage = not first & 0x80
            key = bytes(view[pos + size - 4 : pos + size])
            pos += size
            self._begin(first, length, key, out)
        if pos < end:
            self._head = bytes(view[pos:])
        return True

    def _check(self, first: int, opcode: int, length: int) -> str | None:
        """
        What is wrong with a (masked) frame header, if anything.
        """
        if first & 0x70:
            return "reserved bits set, but no extension was agreed"
        if opcode in _CONTROL_OPCODES:
            if not first & 0x80:
                return "fragmented control frame"
            if length > 125:
                return "control frame longer than 125 bytes"
            return None
        if opcode not in _DATA_OPCODES:
            return f"reserved opcode {opcode}"
        if length >> 63:
            return "frame length above 2^63"
        if opcode == 0 and not self._inMessage:
            return "continuation frame outside a fragmented message"
        if opcode != 0 and self._inMessage:
            return "new message before the fragmented one ended"
        return None

    def _begin(self, first: int, length: int, key: bytes, out: list[Any]) -> None:
        """
        A data frame's header was read: start the partner's copy, unless the
        partner is closing or gone.
        """
        self._left = length
        target = self.leg._target()
        self._to = target
        if target is None:
            return
        out.append(serverHeader(first, length))
        if length:
            self._unmask = Unmasker(key, length)
            if target._held is None:
                target._held = []
        else:
            self._frameDone(out)

    def _frameDone(self, out: list[Any]) -> None:
        """
        The current frame was passed on whole: what the relay held for the
        partner meanwhile may follow it.
        """
        target, self._to = self._to, None
        self._unmask = None
        if target is not None and target._held is not None:
            held, target._held = target._held, None
            out.extend(held)

    def _control(self, frame: bytes, opcode: int, out: list[Any]) -> bool:
        """
        A whole control frame: autobahn answers it (pong, close handshake),
        after what came before it has gone to the partner.

        @return: whether the forwarder goes on reading (not after a close).
        """
        if out:
            writeNow(self.partner.transport, out)
            del out[:]
        going = opcode != _CLOSE
        if not going:
            self.proto.forwarder = None
        self.proto._dataReceived(frame)
        return going

    def _violation(self, reason: str, out: list[Any]) -> None:
        """
        The peer broke RFC 6455: autobahn closes the leg with 1002 and the
        connection is dropped (what follows cannot be read); the splice
        then ends the other leg.
        """
        if out:
            writeNow(self.partner.transport, out)
            del out[:]
        self._broken = True
        proto = self.proto
        proto.forwarder = None
        proto._protocol_violation(reason)
        proto.dropConnection(abort=False)


def held(proto: HybridConnectionProtocol, data: bytes) -> bool:
    """
    Hold C{data}, a frame the relay writes to C{proto}, if a forwarded frame
    to it is half-written.

    @return: whether it was held (or dropped, for a pong past L{MAX_HELD}).
    """
    queue = proto._held
    if queue is None:
        return False
    if len(queue) < MAX_HELD or data[:1] != b"\x8a":
        queue.append(data)
    return True

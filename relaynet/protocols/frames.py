# -*- test-case-name: relaynet.test.test_frames -*-
"""
Reading WebSocket frames without autobahn's parser, for the two busiest
kinds of socket on the relay and for a listener's control channel.

L{relaynet.protocols.splice.Leg}: once two WebSocket legs are spliced, each
side's incoming bytes go through its leg, a L{FrameReader}.  For every data
frame it reads the header, writes the partner an unmasked header for the
same frame (same opcode, same FIN bit, same length) and then passes the
payload on, unmasked, piece by piece as it arrives: no frame or message is
held, and the frame boundaries, text and binary, and fragmentation are kept
exactly.

L{MessageReader}: a listener's control channel reads whole messages with
one, within the channel's size limit; so does the other end of it, a
L{relaynet.listener.HybridListener}, whose reader takes the server's
unmasked frames (C{masked=False}).

Both hand control frames whole (at most 131 bytes) to the autobahn protocol,
which answers pings, takes pongs, and runs the closing handshake as before
(L{relaynet.protocols.splice.Leg.closeFrame} on legs).  After a close frame
the reader steps aside and autobahn reads the rest.  A peer that breaks
RFC 6455 is closed with 1002 (1009 for a control message that is too big,
1007 for text that is not UTF-8) and dropped.

The relay writes frames of its own to a leg (a pong, a close when it stops)
only between two of the frames forwarded to it: while a forwarded frame is
half-written, the leg holds them (L{HybridConnectionProtocol.sendData}) and
the leg forwarding to it releases them when the frame ends.

On plain TCP, L{writeNow} writes to a socket directly when Twisted holds
nothing for it, which saves a trip through the reactor per write;
otherwise, and over TLS, the transport buffers as usual, and backpressure
is the splice's (L{relaynet.protocols.splice.ReadSide}).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.xormasker import create_xor_masker
from twisted.internet import tcp

from relaynet.registry import randomPool

if TYPE_CHECKING:
    from relaynet.protocols.websocket import HybridConnectionProtocol

try:
    # autobahn's compiled XOR masker (NVX), used on a buffer in place; its
    # Python wrapper copies every payload twice more.
    from _nvx_xormasker import ffi as _ffi, lib as _lib
except ImportError:  # pragma: no cover - autobahn without its NVX build
    _ffi = _lib = None

__all__ = ["clientFrame", "FrameReader", "MessageReader", "Unmasker", "held", "serverHeader", "writeNow"]

OPEN = WebSocketProtocol.STATE_OPEN
CLOSED = WebSocketProtocol.STATE_CLOSED
PROTOCOL_ERROR = WebSocketProtocol.CLOSE_STATUS_CODE_PROTOCOL_ERROR
INVALID_PAYLOAD = WebSocketProtocol.CLOSE_STATUS_CODE_INVALID_PAYLOAD
MESSAGE_TOO_BIG = WebSocketProtocol.CLOSE_STATUS_CODE_MESSAGE_TOO_BIG
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
SMALL = 256
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


def clientFrame(first: int, payload: bytes) -> list[bytes | bytearray]:
    """
    One whole frame as a client sends it (RFC 6455 section 5.3): the header
    with a fresh masking key from the CSPRNG, then the masked payload.
    """
    length = len(payload)
    key = randomPool.take(4)
    head = serverHeader(first, length)
    head = bytes((head[0], head[1] | 0x80)) + head[2:] + key
    return [head, Unmasker(key, length)(memoryview(payload))] if length else [head]


class Unmasker:
    """
    Unmasks one frame's payload, piece by piece, with its 4-byte key (or
    masks it: the same XOR).
    """

    __slots__ = ("key", "done", "_nvx", "_nvxKey", "_fallback")

    def __init__(self, key: bytes, length: int) -> None:
        self.key = key
        self.done = 0
        # The compiled masker, and the key buffer it points into (kept
        # alive with it); or autobahn's own masker where NVX is not built.
        self._nvx: Any = None
        self._nvxKey: Any = None
        self._fallback: Any = None
        if length >= SMALL:
            if _lib is not None:
                self._nvxKey = _ffi.new("uint8_t[4]", key)
                self._nvx = _ffi.gc(_lib.nvx_xormask_new(self._nvxKey), _lib.nvx_xormask_free)
                _lib.nvx_xormask_set_impl(self._nvx, 2)
            else:  # pragma: no cover - autobahn without its NVX build
                self._fallback = create_xor_masker(key, length)

    def __call__(self, piece: memoryview) -> bytes | bytearray:
        n = len(piece)
        if self._nvx is not None:
            out: bytes | bytearray = bytearray(piece)
            _lib.nvx_xormask_process(self._nvx, _ffi.from_buffer(out), n)
        elif self._fallback is not None:  # pragma: no cover - autobahn without its NVX build
            out = self._fallback.process(bytes(piece))
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


class FrameReader:
    """
    Reads a peer's frames on an open WebSocket in place of autobahn's
    parser: the headers are checked here and each payload is handed to the
    subclass piece by piece as it arrives; control frames go whole to
    autobahn.

    @ivar proto: the protocol whose C{dataReceived} feeds L{feed}.
    """

    __slots__ = ("proto", "_masked", "_ready", "_head", "_left", "_unmask", "_inMessage", "_broken")

    def __init__(self, proto: Any, masked: bool = True) -> None:
        """
        @param proto: the autobahn protocol whose C{dataReceived} feeds
            L{feed}.
        @param masked: whether frames come masked, as from a client (the
            relay's side), or unmasked, as from a server (a listener's).
        """
        self.proto = proto
        self._masked = masked
        self._ready = False
        # The start of a frame header (or of a control frame) read so far.
        self._head = b""
        # Payload bytes still to come in the current frame.
        self._left = 0
        self._unmask: Unmasker | None = None
        # Whether a fragmented data message is in progress.
        self._inMessage = False
        # Whether the peer broke the protocol (nothing more is read).
        self._broken = False

    def ready(self) -> bool:
        """
        Whether autobahn is open and between messages with nothing
        buffered, so that the reader can take over (autobahn may still be
        reading frames that came with the handshake).
        """
        if not self._ready:
            proto = self.proto
            self._ready = (
                proto.state == OPEN and not proto.data and proto.current_frame is None and not proto.inside_message
            )
        return self._ready

    def feed(self, data: bytes) -> None:
        """
        Read what the peer sent.
        """
        proto = self.proto
        if proto.autoPingTimeoutCall is not None and proto.autoPingRestartOnAnyTraffic:
            # As autobahn does for each data frame: traffic stands in for a
            # late pong (its option autoPingRestartOnAnyTraffic).
            proto._cancelAutoPingTimeoutCall()
        out: list[Any] = []
        view = memoryview(data)
        going = True
        while self._head and view and going:
            # Complete a header (or a control frame) from the next few bytes
            # only, rather than copying the whole read behind it; again if
            # those end inside another one.
            head, self._head = self._head, b""
            going = self._feed(memoryview(head + bytes(view[:_PROBE])), out)
            view = view[_PROBE:]
            if not going and view and not self._broken:
                # Stopped at a frame boundary: autobahn reads the rest.
                proto._dataReceived(bytes(view))
        if going and view:
            self._feed(view, out)
        self._flush(out)

    def _feed(self, view: memoryview, out: list[Any]) -> bool:
        """
        Read the frames in C{view}; what goes out meanwhile is gathered in
        C{out}.

        @return: whether the reader goes on reading.
        """
        end = len(view)
        pos = 0
        while pos < end:
            left = self._left
            if left:
                n = min(left, end - pos)
                self._piece(view[pos : pos + n], out)
                pos += n
                self._left = left - n
                if not self._left and not self._frameEnd(out):
                    return self._stop(view[pos:])
                continue
            # A frame header.
            avail = end - pos
            if avail < 2:
                break
            first = view[pos]
            second = view[pos + 1]
            masked = self._masked
            if bool(second & 0x80) != masked:
                self._violation("unmasked frame from a client" if masked else "masked frame from a server", out)
                return False
            length = second & 0x7F
            size = (2 if length < 126 else 4 if length == 126 else 10) + (4 if masked else 0)
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
                    return self._stop(view[pos:])
                continue
            self._inMessage = not first & 0x80
            self._unmask = Unmasker(bytes(view[pos + size - 4 : pos + size]), length) if length and masked else None
            pos += size
            self._left = length
            if not self._begin(first, opcode, length, out):
                return False
            if not length and not self._frameEnd(out):
                return self._stop(view[pos:])
        if pos < end:
            self._head = bytes(view[pos:])
        return True

    def _stop(self, rest: memoryview) -> bool:
        """
        The reader stepped aside at a frame boundary (after a close, or once
        the connection started closing): autobahn reads the rest.
        """
        if self.proto.reader is self:
            self.proto.reader = None
        if rest and not self._broken:
            self.proto._dataReceived(bytes(rest))
        return False

    def _check(self, first: int, opcode: int, length: int) -> str | None:
        """
        What is wrong with a frame header, if anything.
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

    def _begin(self, first: int, opcode: int, length: int, out: list[Any]) -> bool:
        """
        A data frame's header was read (its unmasker is ready, if it is
        masked).

        @return: whether the reader goes on reading.
        """
        raise NotImplementedError

    def _piece(self, piece: memoryview, out: list[Any]) -> None:
        """
        Some of the current frame's payload, still masked if it is.
        """
        raise NotImplementedError

    def _frameEnd(self, out: list[Any]) -> bool:
        """
        The current data frame's payload has all been read.

        @return: whether the reader goes on reading.
        """
        raise NotImplementedError

    def _flush(self, out: list[Any]) -> None:
        """
        Send what was gathered in C{out}, if anything, and empty it.
        """
        del out[:]

    def _control(self, frame: bytes, opcode: int, out: list[Any]) -> bool:
        """
        A whole control frame: autobahn answers it (pong, close handshake),
        after what came before it has gone out.

        @return: whether the reader goes on reading (not after a close).
        """
        self._flush(out)
        going = opcode != _CLOSE
        if not going:
            self.proto.reader = None
        self.proto._dataReceived(frame)
        if going:
            self.proto.controlFrameDone()
        # Closing (a close was sent): the peer may still send, and a
        # fragmented message may still be under way; closed: nothing more.
        return going and self.proto.state != CLOSED

    def _fail(self, code: int, reason: str, out: list[Any]) -> None:
        """
        Close with C{code} and drop the connection: what follows cannot be
        read.
        """
        self._flush(out)
        self._broken = True
        proto = self.proto
        proto.reader = None
        proto._fail_connection(code, reason)
        proto.dropConnection(abort=False)

    def _violation(self, reason: str, out: list[Any]) -> None:
        """
        The peer broke RFC 6455.
        """
        self._fail(PROTOCOL_ERROR, reason, out)


class MessageReader(FrameReader):
    """
    The incoming side of a listener's control channel: whole messages, at
    most the protocol's C{maxMessagePayloadSize} bytes (1009 beyond), text
    checked for UTF-8 (1007), go to the protocol's C{onMessage}.
    """

    __slots__ = ("_parts", "_size", "_binary")

    def __init__(self, proto: Any, masked: bool = True) -> None:
        super().__init__(proto, masked)
        # The message being read (made when one is: most listeners are idle).
        self._parts: list[bytes | bytearray] | None = None
        self._size = 0
        self._binary = False

    def _begin(self, first: int, opcode: int, length: int, out: list[Any]) -> bool:
        if opcode:
            self._binary = opcode == 0x2
            self._size = 0
        self._size += length
        limit = self.proto.maxMessagePayloadSize
        if limit and self._size > limit:
            self._fail(MESSAGE_TOO_BIG, f"message exceeds payload limit of {limit} octets", out)
            return False
        return True

    def _piece(self, piece: memoryview, out: list[Any]) -> None:
        if self._parts is None:
            self._parts = []
        unmask = self._unmask
        self._parts.append(unmask(piece) if unmask is not None else bytes(piece))

    def _frameEnd(self, out: list[Any]) -> bool:
        if self._inMessage:
            return True
        parts, self._parts = self._parts, None
        payload = b"".join(parts) if parts else b""
        if not self._binary:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                self._fail(INVALID_PAYLOAD, "text message is not valid UTF-8", out)
                return False
        proto = self.proto
        proto.onMessage(payload, self._binary)
        return proto.reader is self and proto.state != CLOSED


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

"""
The wire formats the stream drivers speak, hand-rolled on plain sockets.

A driver reaches a target in one of these ways (L{openSender}):

* ``tcp``: connect to a port and that's it (``direct``, ``socat``);
* ``transit``: magic-wormhole-transit-relay's handshake, ``please relay
  TOKEN for side SIDE\\n`` answered by ``ok\\n`` once both sides are there;
* ``relaynet-ws``: a Hybrid Connections WebSocket (RFC 6455) upgrade to
  ``/$hc/ENTITY?sb-hc-action=connect`` with the SAS token in the
  C{ServiceBusAuthorization} header, then WebSocket frames;
* ``relaynet-native``: the same GET with ``Upgrade: relaynet-stream``,
  answered by ``101``, then raw bytes.

and the receiving side of a relaynet target keeps a WebSocket control channel
(``?sb-hc-action=listen``) and opens the rendezvous named by each ``accept``
command (L{ControlChannel}).

The WebSocket framing is the minimum the workloads need.  Both ends of a
relayed connection are clients to the relay, so both mask what they send; the
drivers mask with the all-zero key, which RFC 6455 allows (the key must be
unpredictable to protect proxies, which do not matter on loopback).  XOR
with zero leaves the payload as it is, so sending costs the driver nothing
but the header, and the relay still does its full unmasking work.  Frames
from the relay are unmasked (server to client).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import threading
import uuid
from typing import Any, Callable
from urllib.parse import urlsplit

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
ZERO_KEY = b"\0\0\0\0"
#: Largest HTTP response head accepted from the relay.
MAX_HEAD = 64 * 1024


class HandshakeError(Exception):
    """
    A target refused or broke a handshake.
    """


# ---------------------------------------------------------------------------
# Sockets


def tune(sock: socket.socket) -> socket.socket:
    """
    C{TCP_NODELAY} on; the kernel buffers are left to autotuning (on this
    machine C{tcp_rmem}/C{tcp_wmem} grow to 32/4 MiB), which beats a fixed
    C{SO_RCVBUF}.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def connectTcp(port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return tune(sock)


def readHead(sock: socket.socket, terminator: bytes) -> tuple[bytes, bytes]:
    """
    Read until C{terminator}; return (the head including it, the bytes read
    after it).
    """
    data = b""
    while terminator not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise HandshakeError(f"connection closed during the handshake after {data[:200]!r}")
        data += chunk
        if len(data) > MAX_HEAD:
            raise HandshakeError("handshake answer too long")
    head, _, rest = data.partition(terminator)
    return head + terminator, rest


# ---------------------------------------------------------------------------
# HTTP upgrades (relaynet)


def upgrade(sock: socket.socket, host: str, target: str, native: bool, token: str | None) -> bytes:
    """
    Send the upgrade request for C{target} (path and query) and wait for
    C{101}.  Returns the bytes that followed the response head.
    """
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}"]
    if native:
        lines += ["Upgrade: relaynet-stream", "Connection: Upgrade"]
    else:
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        lines += ["Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    if token:
        lines.append(f"ServiceBusAuthorization: {token}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    head, rest = readHead(sock, b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 101 " not in status + b" ":
        # An error status with a JSON (or HTML) body: read a little of it.
        body = rest
        try:
            sock.settimeout(1.0)
            body += sock.recv(4096)
        except OSError:
            pass
        raise HandshakeError(f"{status.decode('latin-1')}: {body[:300].decode('utf-8', 'replace')}")
    return rest


# ---------------------------------------------------------------------------
# WebSocket frames


def frameHeader(opcode: int, length: int, fin: bool = True) -> bytes:
    """
    The header of a client frame (masked with the zero key) carrying
    C{length} payload bytes.
    """
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        return struct.pack("!BB", first, 0x80 | length) + ZERO_KEY
    if length < 65536:
        return struct.pack("!BBH", first, 0x80 | 126, length) + ZERO_KEY
    return struct.pack("!BBQ", first, 0x80 | 127, length) + ZERO_KEY


def clientFrame(opcode: int, payload: bytes) -> bytes:
    """
    A whole client frame; with the zero key the payload goes as it is.
    """
    return frameHeader(opcode, len(payload)) + payload


def closeFrame(code: int = 1000) -> bytes:
    return clientFrame(OP_CLOSE, struct.pack("!H", code))


class FrameReader:
    """
    An incremental parser for frames from the relay (unmasked).

    Data messages: with C{keep}, their payloads are collected and returned
    by L{feed} when the message's final frame (FIN) has arrived (a message
    may come as several frames: the relay's WebSocket path, for one, ends
    every message with an empty continuation frame); without C{keep}, they
    are only counted in L{dataBytes} (the throughput receiver must not
    copy).  Control frames are returned as (opcode, payload), except pings,
    which are answered through C{reply}.

    @ivar dataBytes: data payload bytes seen so far.
    @ivar closed: a close frame arrived.
    """

    def __init__(self, keep: bool, reply: Callable[[bytes], None] | None = None) -> None:
        self.keep = keep
        self.reply = reply
        self.dataBytes = 0
        self.closed = False
        self._head = b""
        self._remaining = 0
        self._opcode = 0  # of the frame being read
        self._fin = True
        self._messageOpcode = OP_BINARY
        self._parts: list[bytes] = []  # the data message so far
        self._control: list[bytes] = []  # the control frame so far

    def feed(self, data: bytes | memoryview) -> list[tuple[int, bytes]]:
        """
        Parse C{data}; return the messages and control frames completed in
        it (data messages only with C{keep}).
        """
        out: list[tuple[int, bytes]] = []
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            if self._remaining:
                take = min(self._remaining, end - pos)
                if self._opcode >= OP_CLOSE:
                    self._control.append(bytes(view[pos : pos + take]))
                else:
                    self.dataBytes += take
                    if self.keep:
                        self._parts.append(bytes(view[pos : pos + take]))
                self._remaining -= take
                pos += take
                if not self._remaining:
                    self._complete(out)
                continue
            # A header: 2 to 10 bytes (no mask key from the relay), possibly
            # split across reads.
            need = 2 - len(self._head)
            if need > 0:
                self._head += bytes(view[pos : pos + need])
                pos += min(need, end - pos)
                if len(self._head) < 2:
                    break
            size = self._head[1] & 0x7F
            if self._head[1] & 0x80:
                raise HandshakeError("the relay sent a masked frame")
            full = 2 + (2 if size == 126 else 8 if size == 127 else 0)
            need = full - len(self._head)
            if need > 0:
                self._head += bytes(view[pos : pos + need])
                pos += min(need, end - pos)
                if len(self._head) < full:
                    break
            if size == 126:
                size = struct.unpack("!H", self._head[2:4])[0]
            elif size == 127:
                size = struct.unpack("!Q", self._head[2:10])[0]
            self._opcode = self._head[0] & 0x0F
            self._fin = bool(self._head[0] & 0x80)
            if OP_CONTINUATION < self._opcode < OP_CLOSE:
                self._messageOpcode = self._opcode
            self._head = b""
            self._remaining = size
            if not size:
                self._complete(out)
        return out

    def _complete(self, out: list[tuple[int, bytes]]) -> None:
        """
        A frame has been read entirely.
        """
        opcode = self._opcode
        if opcode < OP_CLOSE:
            if self._fin:
                if self.keep:
                    out.append((self._messageOpcode, b"".join(self._parts)))
                self._parts = []
            return
        payload = b"".join(self._control)
        self._control = []
        if opcode == OP_CLOSE:
            self.closed = True
            out.append((OP_CLOSE, payload))
        elif opcode == OP_PING and self.reply is not None:
            self.reply(clientFrame(OP_PONG, payload))


# ---------------------------------------------------------------------------
# Streams: one connected socket plus how to frame on it


class Stream:
    """
    One established stream, as the workloads see it.

    @ivar sock: the socket (blocking).
    @ivar ws: C{True} if the stream carries WebSocket frames.
    @ivar leftover: bytes that arrived with the handshake's answer and
        belong to the data phase.
    """

    def __init__(self, sock: socket.socket, ws: bool, leftover: bytes = b"") -> None:
        self.sock = sock
        self.ws = ws
        self.leftover = leftover
        self._sendLock = threading.Lock()

    def frame(self, payload: bytes) -> bytes:
        """
        C{payload} as it goes on the wire (one binary frame on WebSocket).
        """
        return clientFrame(OP_BINARY, payload) if self.ws else payload

    def sendRaw(self, data: bytes) -> None:
        """
        Send already framed bytes (thread-safe: a ping's pong may be sent by
        the reading thread).
        """
        with self._sendLock:
            self.sock.sendall(data)

    def reader(self, keep: bool) -> FrameReader | None:
        """
        A frame parser for what this stream receives (L{None} for raw).
        """
        return FrameReader(keep, self.sendRaw) if self.ws else None

    def finish(self) -> None:
        """
        End the sending direction: a close frame on WebSocket, a TCP
        half-close otherwise.
        """
        try:
            if self.ws:
                self.sendRaw(closeFrame())
            else:
                self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def transitToken(seed: str, index: int) -> str:
    """
    The 64-hex transit token of connection C{index} (both drivers derive
    the same sequence from the run's seed).
    """
    import hashlib

    return hashlib.sha256(f"{seed}:{index}".encode()).hexdigest()


def transitHandshake(sock: socket.socket, token: str, side: str) -> bytes:
    """
    Ask the transit relay to pair this connection; return what followed
    C{ok\\n} once it has.
    """
    sock.sendall(f"please relay {token} for side {side}\n".encode("ascii"))
    head, rest = readHead(sock, b"\n")
    if head != b"ok\n":
        raise HandshakeError(f"transit relay answered {head!r}")
    return rest


SENDER_SIDE = "5e4de45e4de45e4d"
RECEIVER_SIDE = "4ecf4ecf4ecf4ecf"


def openSender(config: dict[str, Any], index: int, timeout: float) -> Stream:
    """
    Connection C{index} of a sender to the target described by C{config}
    (keys: C{mode}, C{port}, C{token}, C{entity}, C{seed}).
    """
    mode = config["mode"]
    sock = connectTcp(config["port"], timeout)
    try:
        if mode == "tcp":
            return Stream(sock, ws=False)
        if mode == "transit":
            rest = transitHandshake(sock, transitToken(config["seed"], index), SENDER_SIDE)
            return Stream(sock, ws=False, leftover=rest)
        native = mode == "relaynet-native"
        target = f"/$hc/{config['entity']}?sb-hc-action=connect&sb-hc-id={uuid.uuid4()}"
        rest = upgrade(sock, f"127.0.0.1:{config['port']}", target, native, config["token"])
        return Stream(sock, ws=not native, leftover=rest)
    except BaseException:
        sock.close()
        raise


class ControlChannel:
    """
    A relaynet listener: the WebSocket control channel, read by a thread
    that opens the rendezvous of every C{accept} command (each in a thread
    of its own, so that concurrent accepts do not wait for each other) and
    hands the stream to C{onStream}.
    """

    def __init__(self, port: int, entity: str, token: str, native: bool, timeout: float,
                 onStream: Callable[[Stream], None], onError: Callable[[str], None]) -> None:
        self.port = port
        self.native = native
        self.timeout = timeout
        self.onStream = onStream
        self.onError = onError
        self.sock = connectTcp(port, timeout)
        rest = upgrade(self.sock, f"127.0.0.1:{port}", f"/$hc/{entity}?sb-hc-action=listen&sb-hc-id={uuid.uuid4()}", False, token)
        self.sock.settimeout(None)
        self._lock = threading.Lock()
        self.reader = FrameReader(keep=True, reply=self._send)
        self.thread = threading.Thread(target=self._run, args=(rest,), daemon=True)
        self.thread.start()

    def _send(self, data: bytes) -> None:
        with self._lock:
            self.sock.sendall(data)

    def _run(self, rest: bytes) -> None:
        data = rest
        try:
            while True:
                for opcode, payload in self.reader.feed(data):
                    if opcode == OP_TEXT:
                        command = json.loads(payload)
                        if "accept" in command:
                            threading.Thread(target=self._accept, args=(command["accept"]["address"],), daemon=True).start()
                    elif opcode == OP_CLOSE:
                        self.onError(f"control channel closed by the relay: {payload[2:].decode('utf-8', 'replace')}")
                        return
                data = self.sock.recv(65536)
                if not data:
                    self.onError("control channel connection lost")
                    return
        except OSError as e:
            self.onError(f"control channel: {e}")

    def _accept(self, address: str) -> None:
        """
        Open the rendezvous at C{address} (a ws:// URL).
        """
        try:
            url = urlsplit(address)
            sock = connectTcp(url.port or 80, self.timeout)
            target = url.path + ("?" + url.query if url.query else "")
            rest = upgrade(sock, url.netloc, target, self.native, None)
            self.onStream(Stream(sock, ws=not self.native, leftover=rest))
        except (OSError, HandshakeError) as e:
            self.onError(f"rendezvous {address}: {e}")

    def close(self) -> None:
        try:
            self._send(closeFrame())
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

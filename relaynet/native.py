# -*- test-case-name: relaynet.test.test_native -*-
"""
The client side of native streams: relayed streams whose data phase is raw
bytes on the TCP (or TLS) connection to the relay, with no WebSocket
framing.  See L{relaynet.protocols.native} for the wire format.

A native stream is chosen with C{native=True} on
L{relaynet.streams.connectStream} (a sender) or
L{relaynet.listener.HybridListener} (a listener's accepted streams), or
C{native=yes} on a C{relay:} endpoint.  The user's protocol then writes to
the connection's own transport, so half-close (C{loseWriteConnection},
L{IHalfCloseableProtocol}), producers and C{TCP_NODELAY} behave as on any
TCP connection; C{getPeer} and C{getHost} give L{RelayAddress}es.

Native streams are a relaynet extension: Azure Relay answers a native
upgrade with an error.
"""

from __future__ import annotations

import json
from typing import Any, cast
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IProtocol, IProtocolFactory, ITransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from relaynet.protocols.native import UPGRADE
from relaynet.streams import CloseWaiters, ConnectTimeoutError, RelayAddress, RelayConnectError, RejectedError, refusal

__all__ = ["NativeStream", "UPGRADE", "nativeRequest", "oneShotFactory", "swapProtocol"]

#: The most a handshake answer's head, and an error's body, may be.
MAX_HEAD = 16 * 1024
MAX_ERROR_BODY = 64 * 1024


def swapProtocol(transport: Any, proto: IProtocol) -> None:
    """
    Make C{proto} the protocol of C{transport}, a TCP transport or a TLS
    wrapper around one, from now on.
    """
    if isinstance(transport, ProtocolWrapper):
        transport.wrappedProtocol = proto
    else:
        transport.protocol = proto


def nativeRequest(url: str, headers: dict[str, str]) -> bytes:
    """
    The upgrade request for a native stream to C{url} (a C{ws://} or
    C{wss://} address under C{/$hc/}).

    @raise ValueError: a header name or value that would break the request.
    """
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {parts.netloc}",
        f"Upgrade: {UPGRADE}",
        "Connection: Upgrade",
    ]
    for name, value in headers.items():
        if not name or any(c in name for c in ":\r\n \t") or any(c in value for c in "\r\n"):
            raise ValueError(f"Header {name!r} cannot be sent.")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def oneShotFactory(proto: IProtocol) -> Factory:
    """
    A factory for one connection, to C{proto}.
    """
    factory = Factory()
    factory.noisy = False
    factory.buildProtocol = lambda addr: proto  # type: ignore[method-assign, assignment, return-value]
    return factory


class _AddressedTransport:
    """
    The connection's transport as the user's protocol sees it: the same in
    every way but its addresses, which are the relay's.
    """

    def __init__(self, transport: Any, host: RelayAddress, peer: RelayAddress) -> None:
        self._transport = transport
        self._host = host
        self._peer = peer
        # The busy methods are bound once, not looked up on every call.
        self.write = transport.write
        self.writeSequence = transport.writeSequence
        self.pauseProducing = transport.pauseProducing
        self.resumeProducing = transport.resumeProducing
        directlyProvides(self, providedBy(transport))

    def getPeer(self) -> RelayAddress:
        return self._peer

    def getHost(self) -> RelayAddress:
        return self._host

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class NativeStream(CloseWaiters, Protocol):
    """
    Asks the relay for a native stream, then gives the connection to a
    protocol from C{userFactory}.

    @ivar opened: fires with the user's protocol once the relay answered
        C{101}, or fails with a L{RelayConnectError}.
    """

    def __init__(
        self,
        userFactory: IProtocolFactory,
        request: bytes,
        host: RelayAddress,
        peer: RelayAddress,
        clock: Any,
        timeout: float,
    ) -> None:
        self.userFactory = userFactory
        self.request = request
        self.relayHost = host
        self.relayPeer = peer
        self.clock = clock
        self.timeout = timeout
        self.user: IProtocol | None = None
        self.opened: Deferred[Any] = Deferred(lambda d: self._abort())
        self._closedWaiters: list[Deferred[None]] = []
        self._buffer = b""
        self._status: int | None = None
        self._reason = ""
        self._bodyLength: int | None = None
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            setNoDelay(True)
        self._timer = self.clock.callLater(self.timeout, self._timedOut)
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if self._status is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD:
                    self._fail(RelayConnectError(0, "The relay's answer to the upgrade is too long."))
                return
            head, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
            if not self._parseHead(head):
                return
            if self._status == 101:
                self._open()
                return
        if self._bodyLength is not None and len(self._buffer) >= self._bodyLength:
            self._refused()
        elif len(self._buffer) > MAX_ERROR_BODY:
            self._refused()

    def _parseHead(self, head: bytes) -> bool:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            self._fail(RelayConnectError(0, f"The relay's answer is not HTTP: {lines[0][:80]!r}"))
            return False
        self._status = int(parts[1])
        self._reason = parts[2] if len(parts) > 2 else ""
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if self._status == 101 and headers.get("upgrade", "").lower() != UPGRADE:
            self._fail(RelayConnectError(0, "The relay switched to another protocol than relaynet-stream."))
            return False
        length = headers.get("content-length")
        self._bodyLength = int(length) if length and length.isdigit() else None
        return True

    def _open(self) -> None:
        self._cancelTimer()
        transport: Any = self.transport
        if self.opened.called:
            # Cancelled while the relay was answering.
            transport.abortConnection()
            return
        try:
            user = self.userFactory.buildProtocol(self.relayPeer)
        except Exception as e:
            transport.abortConnection()
            self.opened.errback(e)
            return
        if user is None:
            transport.loseConnection()
            self.opened.errback(RejectedError(0, "The application refused the connection."))
            return
        self.user = user
        swapProtocol(transport, cast(IProtocol, _Watched(self, user)))
        rest, self._buffer = self._buffer, b""
        try:
            user.makeConnection(cast(ITransport, _AddressedTransport(transport, self.relayHost, self.relayPeer)))
        except Exception as e:
            self.user = None
            transport.abortConnection()
            user.connectionLost(Failure(ConnectionLost("connectionMade failed")))
            self.opened.errback(e)
            return
        self.opened.callback(user)
        if rest:
            user.dataReceived(rest)

    def _refused(self) -> None:
        reason = self._reason
        try:
            error = json.loads(self._buffer)["error"]
            reason = str(error.get("message") or reason)
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
        self._fail(refusal(self._status or 0, reason))

    def _fail(self, error: Exception) -> None:
        self._cancelTimer()
        if not self.opened.called:
            self.opened.errback(error)
        if self.transport is not None:
            self.transport.loseConnection()

    def _timedOut(self) -> None:
        self._timer = None
        self._fail(ConnectTimeoutError(0, f"The relay did not open the stream within {self.timeout:g} s."))
        self.transport.abortConnection()  # type: ignore[union-attr]

    def _abort(self) -> None:
        self._cancelTimer()
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # Before the upgrade: the relay closed without a whole answer.
        self._cancelTimer()
        if not self.opened.called:
            if self._status is not None and self._status != 101:
                self._refused()
            else:
                self.opened.errback(RelayConnectError(0, "The relay closed the connection during the upgrade."))
        self._fireClosed()

    # For a listener that keeps its streams: whenClosed (CloseWaiters), and

    def closeStream(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


class _Watched:
    """
    The user's protocol as the connection sees it: the same in every way,
    but its end is also told to the L{NativeStream}, for a listener that
    waits for its streams to close.
    """

    def __init__(self, stream: NativeStream, user: IProtocol) -> None:
        self._stream = stream
        self._user = user
        self.dataReceived = user.dataReceived
        directlyProvides(self, providedBy(user))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        try:
            self._user.connectionLost(reason)
        finally:
            self._stream._fireClosed()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._user, name)

# -*- test-case-name: relaynet.test.test_streams -*-
"""
Relayed streams for Twisted protocols.

A relayed connection is a WebSocket to the relay (a sender's C{connect}, or
a listener's rendezvous).  L{StreamWebSocket} carries one, and gives an
ordinary Twisted L{Protocol} a transport over it: C{write} sends a binary
message, each message received is C{dataReceived}, and closing either side
closes the other.  A L{MessageProtocol} sees whole messages instead.

L{connectStream} is the sender: it connects a protocol to a listener
through the relay, and fails with one exception per refusal.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from typing import Any, cast
from urllib.parse import quote, urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    IConsumer,
    IDelayedCall,
    IProducer,
    IProtocolFactory,
    IPushProducer,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from relaynet.protocols.websocket import DirectIO, cancelTimers
from relaynet.tokens import TokenProvider, getToken

__all__ = [
    "RelayAddress",
    "RelayConnectError",
    "NoListenerError",
    "EndpointNotFoundError",
    "AuthorizationError",
    "RejectedError",
    "ConnectTimeoutError",
    "MessageProtocol",
    "StreamWebSocket",
    "connectStream",
    "relayEndpoint",
    "resourceUri",
]

CONNECT_TIMEOUT = 70.0
# The largest message a relayed stream takes whole (larger: closed, 1009),
# and the size a write is cut into.
MAX_MESSAGE = 16 * 1024 * 1024
MAX_WRITE = 1024 * 1024
CLOSE_TIMEOUT = 10.0
NORMAL_CLOSURE = 1000
_STATUS = re.compile(r"upgrade failed \[(\d{3})\]: (.*?)\"?\)?$", re.DOTALL)


@implementer(IAddress)
class RelayAddress:
    """
    Where a relayed stream goes: an entity on a relay, and, for the
    listener's side, the sender's own address as the relay saw it.
    """

    def __init__(self, relayUrl: str, entity: str, remote: tuple[str, int] | None = None) -> None:
        self.relayUrl = relayUrl
        self.entity = entity
        self.remote = remote

    @property
    def host(self) -> str:
        return self.remote[0] if self.remote else ""

    @property
    def port(self) -> int:
        return self.remote[1] if self.remote else 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RelayAddress) and (self.relayUrl, self.entity, self.remote) == (
            other.relayUrl,
            other.entity,
            other.remote,
        )

    def __hash__(self) -> int:
        return hash((self.relayUrl, self.entity, self.remote))

    def __repr__(self) -> str:
        return f"RelayAddress({self.relayUrl!r}, {self.entity!r}, {self.remote!r})"


class RelayConnectError(Exception):
    """
    The relay refused a connection.

    @ivar status: the HTTP status of the refusal (0 if there was none).
    @ivar reason: the relay's reason.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}" if status else reason)
        self.status = status
        self.reason = reason


class NoListenerError(RelayConnectError):
    """
    No listener is connected for the entity.
    """


class EndpointNotFoundError(RelayConnectError):
    """
    The relay has no such entity.
    """


class AuthorizationError(RelayConnectError):
    """
    The token was missing, invalid, expired, or not good for this.
    """


class RejectedError(RelayConnectError):
    """
    The listener rejected the connection, with this status and reason.
    """


class ConnectTimeoutError(RelayConnectError):
    """
    No listener accepted in time, or the relay did not answer in time.
    """


def refusal(status: int, reason: str) -> RelayConnectError:
    """
    The exception for a refused handshake.
    """
    if status in (401, 403):
        return AuthorizationError(status, reason)
    if status in (408, 504) or (status == 404 and "within the allowed timeout" in reason):
        return ConnectTimeoutError(status, reason)
    if status == 404 and "no listeners" in reason.lower():
        return NoListenerError(status, reason)
    if status == 404 and "does not exist" in reason:
        return EndpointNotFoundError(status, reason)
    return RejectedError(status, reason)


def resourceUri(relayUrl: str, entity: str) -> str:
    """
    The resource a token for C{entity} on the relay at C{relayUrl} names.
    """
    return f"http://{urlsplit(relayUrl).netloc}/{entity.strip('/')}"


def relayEndpoint(reactor: Any, url: str, trustRoot: Any = None, timeout: float = 30) -> IStreamClientEndpoint:
    """
    A client endpoint for a C{ws://} or C{wss://} URL.
    """
    parts = urlsplit(url)
    secure = parts.scheme.lower() in ("wss", "https")
    host = parts.hostname or ""
    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, host, parts.port or (443 if secure else 80), timeout=timeout)
    if secure:
        from twisted.internet.ssl import optionsForClientTLS

        endpoint = wrapClientTLS(optionsForClientTLS(host, trustRoot=trustRoot), endpoint)
    return endpoint


class MessageProtocol(Protocol):
    """
    A protocol for message-oriented work over a relayed stream: subclass it
    and override L{messageReceived}; send with L{sendMessage}.

    Flow control: L{whenWritable} fires when the stream can take more, and
    C{transport.pauseProducing()} stops the messages coming in.
    """

    transport: Any

    def messageReceived(self, payload: bytes, isBinary: bool) -> None:
        """
        One whole message from the other side.
        """

    def dataReceived(self, data: bytes) -> None:
        self.messageReceived(data, True)

    def sendMessage(self, payload: bytes, isBinary: bool = True) -> None:
        self.transport.sendMessage(payload, isBinary)

    def whenWritable(self) -> Deferred[None]:
        """
        Fires at once, or when the stream's send buffer has drained below
        its high-water mark.
        """
        return self.transport.whenWritable()


@implementer(IPushProducer)
class _WriteValve:
    """
    Registered on the WebSocket's own transport: while its send buffer is
    full, the producer writing to the stream is paused and L{whenWritable}
    waits.
    """

    def __init__(self) -> None:
        self.full = False
        self.lost = False
        self.producer: IProducer | None = None
        self._writable: list[Deferred[None]] = []

    def pauseProducing(self) -> None:
        self.full = True
        if self.producer is not None and IPushProducer.providedBy(self.producer):
            self.producer.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        self.full = False
        waiting, self._writable = self._writable, []
        for d in waiting:
            d.callback(None)
        if self.producer is not None:
            cast(Any, self.producer).resumeProducing()

    def stopProducing(self) -> None:
        # The connection is gone: nobody waits for room any more.
        self.lost = True
        waiting, self._writable = self._writable, []
        for d in waiting:
            d.errback(ConnectionLost("The relayed stream is gone."))
        if self.producer is not None:
            self.producer.stopProducing()

    def whenWritable(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self.lost:
            d.errback(ConnectionLost("The relayed stream is gone."))
        elif self.full:
            self._writable.append(d)
        else:
            d.callback(None)
        return d


@implementer(ITransport, IPushProducer, IConsumer)
class _StreamTransport:
    """
    The transport a user's protocol gets, over the WebSocket underneath.
    As with TCP, C{pauseProducing} stops reading, and a producer registered
    here is paused while the stream cannot take more.
    """

    disconnecting = False

    def __init__(self, socket: StreamWebSocket) -> None:
        self._socket = socket
        self._valve = _WriteValve()
        wire: Any = socket.transport
        wire.registerProducer(self._valve, True)
        self._wire = wire

    def write(self, data: bytes) -> None:
        # Bytes go in messages of bounded size, whatever one write holds.
        for start in range(0, len(data), MAX_WRITE):
            self.sendMessage(data[start : start + MAX_WRITE], True)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def sendMessage(self, payload: bytes, isBinary: bool = True) -> None:
        if self._socket.state == self._socket.STATE_OPEN:
            self._socket.sendMessage(payload, isBinary=isBinary)

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self.disconnecting = True
            self._socket.closeStream()

    def loseWriteConnection(self) -> None:
        """
        Close the sending side only: the other side sees the end of the
        stream, and may still answer (half-close).
        """
        self._socket.closeStream()

    def abortConnection(self) -> None:
        self.disconnecting = True
        self._socket.dropConnection(abort=True)

    def getPeer(self) -> RelayAddress:
        return self._socket.relayPeer

    def getHost(self) -> RelayAddress:
        return self._socket.relayHost

    def pauseProducing(self) -> None:
        self._wire.pauseProducing()

    def resumeProducing(self) -> None:
        self._wire.resumeProducing()

    def stopProducing(self) -> None:
        self.loseConnection()

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if self._valve.producer is not None:
            raise RuntimeError("a producer is registered already")
        self._valve.producer = producer
        if not streaming:
            cast(Any, producer).resumeProducing()

    def unregisterProducer(self) -> None:
        self._valve.producer = None

    def whenWritable(self) -> Deferred[None]:
        return self._valve.whenWritable()


class CloseWaiters:
    """
    For a connection someone may wait on until it closes (a listener waits
    for all of its own): C{isClosed}, and the L{Deferred}s of
    L{whenClosed}.  Its C{__init__} sets C{_closedWaiters}
    to an empty list.
    """

    isClosed = False
    _closedWaiters: list[Deferred[None]]

    def whenClosed(self) -> Deferred[None]:
        if self.isClosed:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._closedWaiters.append(d)
        return d

    def _fireClosed(self) -> None:
        """
        The connection has closed: fire every waiter.
        """
        self.isClosed = True
        waiters, self._closedWaiters = self._closedWaiters, []
        for d in waiters:
            d.callback(None)


class StreamWebSocket(DirectIO, WebSocketClientProtocol):  # type: ignore[misc]
    """
    A WebSocket carrying one relayed stream to a user's protocol.

    @ivar opened: fires with the user's protocol once the stream is open,
        or fails with a L{RelayConnectError}.
    """

    def __init__(self, userFactory: IProtocolFactory, host: RelayAddress, peer: RelayAddress, clock: Any) -> None:
        super().__init__()
        self.userFactory = userFactory
        self.relayHost = host
        self.relayPeer = peer
        self.clock = clock
        self.user: Any = None
        self.opened: Deferred[Any] = Deferred(lambda d: self._cancelled())
        self.cancelled = False
        self._peerClosed = False
        self._refusal: str | None = None
        self._streamTransport: _StreamTransport | None = None
        self._dropCall: IDelayedCall | None = None

    def failHandshake(self, reason: str) -> None:  # type: ignore[override]
        self._refusal = reason
        super().failHandshake(reason)

    def _cancelled(self) -> None:
        """
        Whoever waited for the stream gave up: it must not open later.
        """
        self.cancelled = True
        if self.transport is not None:
            self.dropConnection(abort=True)

    def onOpen(self) -> None:
        if self.cancelled:
            self.dropConnection(abort=True)
            return
        try:
            user = self.userFactory.buildProtocol(self.relayPeer)
        except Exception as e:
            self.dropConnection(abort=True)
            self.opened.errback(e)
            return
        if user is None:
            self.sendClose(NORMAL_CLOSURE, "The application refused the connection.")
            self.opened.errback(RejectedError(0, "The application refused the connection."))
            return
        self.user = user
        self._streamTransport = _StreamTransport(self)
        try:
            user.makeConnection(self._streamTransport)
        except Exception as e:
            self.user = None
            self.dropConnection(abort=True)
            user.connectionLost(Failure(ConnectionLost("connectionMade failed")))
            self.opened.errback(e)
            return
        self.opened.callback(user)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.user is None:
            return
        if isinstance(self.user, MessageProtocol):
            self.user.messageReceived(payload, isBinary)
        else:
            self.user.dataReceived(payload)

    def closeStream(self) -> None:
        if self.state == self.STATE_OPEN and self._peerClosed:
            # The answer to the other side's close, held until now; the relay
            # then ends the TCP connection, or we do after a while.
            self.sendCloseFrame(code=NORMAL_CLOSURE, isReply=True)
            if self._dropCall is None:
                self._dropCall = self.clock.callLater(CLOSE_TIMEOUT, self.dropConnection, True)
        elif self.state == self.STATE_OPEN:
            self.sendClose(NORMAL_CLOSURE)
        elif self.state == self.STATE_CONNECTING:
            self.dropConnection(abort=True)

    def onCloseFrame(self, code: int, reasonRaw: bytes) -> Any:
        if self.state == self.STATE_OPEN and IHalfCloseableProtocol.providedBy(self.user) and not self._peerClosed:
            # The other side is done sending; a half-closeable protocol may
            # still write, and closes when it is done.
            self._peerClosed = True
            self.wasClean = True
            self.user.readConnectionLost()
            return None
        closing = self.state == self.STATE_CLOSING
        result = super().onCloseFrame(code, reasonRaw)
        if closing and self._dropCall is None and self.transport is not None:
            # Our close was answered; the relay drops the TCP connection, or
            # we do after a while.
            self._dropCall = self.clock.callLater(CLOSE_TIMEOUT, self.dropConnection, True)
        return result

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(self._refused(reason))
            return
        if self.user is not None:
            user, self.user = self.user, None
            clean = self._peerClosed or (wasClean and code in (NORMAL_CLOSURE, 1001, None))
            ended = ConnectionDone if clean else ConnectionLost
            user.connectionLost(Failure(ended(f"relayed stream closed: {code} {reason or ''}".strip())))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        cancelTimers(self, "_dropCall")
        super().connectionLost(reason)

    def _refused(self, reason: str | None) -> RelayConnectError:
        text = self._refusal or reason or "The connection closed during the WebSocket handshake."
        match = _STATUS.search(text)
        if match:
            return refusal(int(match.group(1)), match.group(2).strip())
        if "timeout" in text.lower():
            return ConnectTimeoutError(0, text)
        return RelayConnectError(0, text)


def streamFactory(
    url: str, proto: StreamWebSocket, clock: Any, headers: dict[str, str] | None = None, protocols: list[str] | None = None,
    timeout: float = CONNECT_TIMEOUT,
) -> WebSocketClientFactory:
    """
    A one-connection WebSocket factory for a relayed stream.
    """
    from relaynet.protocols.websocket import ClockTimer

    factory = WebSocketClientFactory(url, headers=headers or {}, protocols=protocols or [])
    factory.noisy = False
    factory._batched_timer = ClockTimer(clock)
    factory.protocol = lambda: proto  # type: ignore[assignment]
    factory.setProtocolOptions(
        perMessageCompressionOffers=[],
        openHandshakeTimeout=timeout,
        closeHandshakeTimeout=CLOSE_TIMEOUT,
        serverConnectionDropTimeout=0,
        failByDrop=False,
        maxMessagePayloadSize=MAX_MESSAGE,
        maxFramePayloadSize=MAX_MESSAGE,
    )
    return factory


def connectStream(
    reactor: Any,
    relayUrl: str,
    entity: str,
    tokenProvider: TokenProvider | None,
    factory: IProtocolFactory,
    headers: dict[str, str] | None = None,
    subprotocols: list[str] | None = None,
    timeout: float = CONNECT_TIMEOUT,
    trustRoot: Any = None,
    native: bool = False,
) -> Deferred[Protocol]:
    """
    Connect a protocol from C{factory} to a listener of C{entity} through
    the relay at C{relayUrl} (C{ws://host:port} or C{wss://host}).

    @param tokenProvider: gives the Send token; C{None} for an entity that
        takes anonymous senders.
    @param headers: more headers for the listener to see.
    @param subprotocols: WebSocket subprotocols to offer the listener.
    @param native: a native stream (L{relaynet.native}): raw bytes on the
        connection to the relay, no WebSocket framing; a relaynet
        extension, which Azure Relay refuses.
    @return: fires with the connected protocol, or fails with
        L{NoListenerError}, L{EndpointNotFoundError}, L{AuthorizationError},
        L{RejectedError} or L{ConnectTimeoutError}.
    """
    if native and subprotocols:
        raise ValueError("Subprotocols are a WebSocket feature; a native stream has none.")
    return Deferred.fromCoroutine(
        _connectStream(
            reactor, relayUrl, entity, tokenProvider, factory, headers, subprotocols, timeout, trustRoot, native
        )
    )


async def _connectStream(
    reactor: Any,
    relayUrl: str,
    entity: str,
    tokenProvider: TokenProvider | None,
    factory: IProtocolFactory,
    headers: dict[str, str] | None,
    subprotocols: list[str] | None,
    timeout: float,
    trustRoot: Any,
    native: bool = False,
) -> Protocol:
    entity = entity.strip("/")
    allHeaders = dict(headers or {})
    if tokenProvider is not None:
        allHeaders["ServiceBusAuthorization"] = await getToken(tokenProvider, resourceUri(relayUrl, entity)).addTimeout(
            timeout, reactor
        )
    url = (
        f"{relayUrl.rstrip('/')}/$hc/{quote(entity, safe='/')}"
        f"?sb-hc-action=connect&sb-hc-id={uuid.uuid4()}"
    )
    address = RelayAddress(relayUrl, entity)
    if native:
        from relaynet.native import NativeStream, nativeRequest, oneShotFactory

        stream = NativeStream(factory, nativeRequest(url, allHeaders), address, address, reactor, timeout)
        await relayEndpoint(reactor, url, trustRoot, timeout).connect(oneShotFactory(stream))
        return cast(Protocol, await stream.opened)
    proto = StreamWebSocket(factory, address, address, reactor)
    wsFactory = streamFactory(url, proto, reactor, allHeaders, subprotocols, timeout)
    await relayEndpoint(reactor, url, trustRoot).connect(wsFactory)
    return await proto.opened

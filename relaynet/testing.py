# -*- test-case-name: relaynet.test.test_testing -*-
"""
An in-memory relay for your own tests: no sockets, no global reactor, and
time that moves only when the test says so.

L{MemoryRelay} runs the real relay (L{relaynet.core.Relay} behind its
C{twisted.web} front door) on a L{Clock}, and gives clients a reactor,
L{MemoryRelay.reactor}, whose C{connectTCP} reaches that relay through
in-memory transports.  Anything that takes a reactor and a relay URL works
on it unchanged: L{relaynet.streams.connectStream}, the listeners of
L{relaynet.listener} and L{relaynet.web}, L{twisted.web.client.Agent}::

    class OrdersTests(SynchronousTestCase):
        def test_echo(self) -> None:
            relay = MemoryRelay(entities=["orders"])
            d = connectStream(relay.reactor, relay.url, "orders", relay.tokens(), factory)
            relay.flush()
            self.failureResultOf(d, NoListenerError)

Nothing happens between two calls of the test: L{MemoryRelay.flush} moves
bytes, opens and closes connections and runs the timers that are due until
nothing is left to do, and L{MemoryRelay.advance} moves the clock, flushing
after each timer, as a running reactor would.

The transports behave as Twisted's TCP transports do where a protocol can
tell: writes are buffered and delivered on the next turn, C{pauseProducing}
stops delivery, a streaming producer is paused when more than 64 KiB wait
to be delivered and resumed when they have been, C{loseConnection} closes
once everything written has been delivered and C{abortConnection} drops it,
a protocol that raises from C{dataReceived} is logged and disconnected.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import (
    ConnectionAborted,
    ConnectionDone,
    ConnectionRefusedError,
    UserError,
)
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IConsumer,
    IDelayedCall,
    IHostnameResolver,
    IHostResolution,
    IProducer,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
    IResolutionReceiver,
    ITransport,
)
from twisted.internet.protocol import ClientFactory
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from relaynet import logs
from relaynet.auth import Authorizer, Rule, generateKey, mintToken
from relaynet.core import Relay, RelaySettings
from relaynet.entities import Entity, Namespace
from relaynet.frontdoor import RelaySite, makeSite
from relaynet.protocols.websocket import HybridConnectionFactory
from relaynet.streams import resourceUri
from relaynet.tokens import TokenProvider, fromKey

__all__ = [
    "RELAY_ADDRESS",
    "START_TIME",
    "HttpResponse",
    "MemoryRelay",
    "MemoryRelayReactor",
    "MemoryTransport",
    "NotSettled",
]

log = Logger(observer=logs.observer)

START_TIME = 1_700_000_000.0
"""
Where the clock of a L{MemoryRelay} starts, in seconds since the epoch.
"""

RELAY_ADDRESS = "192.0.2.1"
"""
The relay's IPv4 address on the memory network (TEST-NET-1: never routed).
"""

CLIENT_ADDRESS = "203.0.113.10"
"""
The address every client connects from (TEST-NET-3); each connection has its
own port.
"""

HIGH_WATER = 64 * 1024
"""
Bytes waiting to be delivered above which a transport pauses its streaming
producer, as a TCP transport does when its send buffer is full.
"""

MAX_ROUNDS = 10_000
"""
The rounds L{MemoryRelay.flush} makes before it gives up on settling.
"""


class NotSettled(Exception):
    """
    L{MemoryRelay.flush} went round too often without the network falling
    quiet: two protocols keep talking, or a producer never stops.
    """


@implementer(ITransport, IConsumer, IPushProducer)
class MemoryTransport:
    """
    One end of an in-memory TCP connection.

    @ivar protocol: the protocol bytes are delivered to; like a TCP
        transport's, it may be replaced (a WebSocket upgrade takes over an
        HTTP connection this way).
    @ivar peer: the transport at the other end.
    @ivar connected: whether the connection is up.
    @ivar disconnecting: C{loseConnection} or C{abortConnection} was called,
        or the connection is gone; no more data is read.
    """

    def __init__(self, network: MemoryRelayReactor, protocol: IProtocol, host: IPv4Address, peer: IPv4Address) -> None:
        self.protocol = protocol
        self.peer: MemoryTransport | None = None
        self.connected = False
        self.disconnecting = False
        self.disconnected = False
        self.connector: _Connector | None = None
        self.producer: IProducer | None = None
        self.streamingProducer = False
        self._network = network
        self._host = host
        self._peerAddress = peer
        self._outbox: deque[bytes] = deque()
        self._buffered = 0
        self._readPaused = False
        self._producerPaused = False
        self._abortReason: Failure | None = None

    def __repr__(self) -> str:
        return f"<MemoryTransport {self._host.host}:{self._host.port} -> {self._peerAddress.host}:{self._peerAddress.port}>"

    # ITransport

    def write(self, data: bytes) -> None:
        if not isinstance(data, bytes):
            raise TypeError(f"Data must be bytes, not {type(data).__name__}")
        if self.disconnected or self._abortReason is not None or not data:
            return
        self._outbox.append(data)
        self._buffered += len(data)
        if self.producer is not None and self.streamingProducer and not self._producerPaused and self._buffered > HIGH_WATER:
            self._producerPaused = True
            self.producer.pauseProducing()  # type: ignore[attr-defined]

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """
        Close once everything written so far has been delivered; read no more.
        """
        self.disconnecting = True

    def abortConnection(self) -> None:
        """
        Drop the connection on the next turn, and whatever is undelivered.
        """
        if not self.disconnected and self._abortReason is None:
            self.disconnecting = True
            self._abortReason = Failure(ConnectionAborted())
            self._outbox.clear()
            self._buffered = 0

    def getPeer(self) -> IPv4Address:
        return self._peerAddress

    def getHost(self) -> IPv4Address:
        return self._host

    # What TCP transports also offer, and clients set.

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def getTcpNoDelay(self) -> bool:
        return True

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return False

    def logPrefix(self) -> str:
        return "memory"

    # IPushProducer: the reading side.

    def pauseProducing(self) -> None:
        self._readPaused = True

    def resumeProducing(self) -> None:
        self._readPaused = False

    def stopProducing(self) -> None:
        self.loseConnection()

    # IConsumer: the writing side.

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError(
                f"Cannot register producer {producer!r}, because producer {self.producer!r} was never unregistered."
            )
        if self.disconnected:
            producer.stopProducing()
            return
        self.producer, self.streamingProducer, self._producerPaused = producer, bool(streaming), False
        if not streaming:
            producer.resumeProducing()  # type: ignore[attr-defined]

    def unregisterProducer(self) -> None:
        self.producer = None
        self._producerPaused = False

    # The network's side.

    @property
    def pending(self) -> int:
        """
        Bytes written and not yet delivered.
        """
        return self._buffered

    def _connect(self, peer: MemoryTransport) -> None:
        self.peer = peer
        self.connected = True

    def _makeConnection(self) -> None:
        try:
            self.protocol.makeConnection(self)  # type: ignore[arg-type]
        except Exception:
            log.failure("{protocol} failed in connectionMade", protocol=type(self.protocol).__name__)
            self._fail(Failure())

    def _fail(self, failure: Failure) -> None:
        if not self.disconnected and self._abortReason is None:
            self.abortConnection()
            self._abortReason = failure

    def _pump(self) -> bool:
        """
        Deliver what the peer may read now; close if it is time.

        @return: whether anything happened.
        """
        if self.disconnected:
            return False
        peer = self.peer
        assert peer is not None
        if self._abortReason is not None:
            self._end(self._abortReason, Failure(ConnectionDone("The peer aborted the connection.")))
            return True
        moved = False
        while self._outbox and not peer._readPaused and not peer.disconnecting and not self.disconnected:
            data = self._outbox.popleft()
            self._buffered -= len(data)
            moved = True
            peer._receive(data)
        if moved and not self._outbox and not self.disconnected:
            self._drained()
        if self.disconnected:
            return moved
        if self.disconnecting and not self._outbox and not (self.producer is not None and not self.streamingProducer):
            done = Failure(ConnectionDone("Connection was closed cleanly."))
            self._end(done, done)
            return True
        return moved

    def _drained(self) -> None:
        producer = self.producer
        if producer is not None and (not self.streamingProducer or self._producerPaused):
            self._producerPaused = False
            producer.resumeProducing()  # type: ignore[attr-defined]

    def _receive(self, data: bytes) -> None:
        try:
            self.protocol.dataReceived(data)
        except Exception:
            log.failure("{protocol} failed in dataReceived", protocol=type(self.protocol).__name__)
            self._fail(Failure())

    def _end(self, reason: Failure, peerReason: Failure) -> None:
        self._lost(reason)
        if self.peer is not None:
            self.peer._lost(peerReason)

    def _lost(self, reason: Failure) -> None:
        if self.disconnected:
            return
        self.disconnected = self.disconnecting = True
        self.connected = False
        self._outbox.clear()
        self._buffered = 0
        self._network._forget(self)
        producer, self.producer = self.producer, None
        if producer is not None:
            try:
                producer.stopProducing()
            except Exception:
                log.failure("a producer failed in stopProducing")
        try:
            self.protocol.connectionLost(reason)
        except Exception:
            log.failure("{protocol} failed in connectionLost", protocol=type(self.protocol).__name__)
        if self.connector is not None:
            self.connector._lost(reason)


@implementer(IConnector)
class _Connector:
    """
    A client connection being made, made, or over, as C{connectTCP} returns.
    """

    def __init__(self, network: MemoryRelayReactor, host: str, port: int, factory: ClientFactory[Any]) -> None:
        self._network = network
        self._address = IPv4Address("TCP", host, port)
        self.factory = factory
        self.state = "disconnected"
        self.transport: MemoryTransport | None = None
        self._factoryStarted = False

    def connect(self) -> None:
        """
        Start connecting: the connection is made on the next turn.
        """
        if self.state != "disconnected":
            raise RuntimeError("can't connect in this state")
        self.state = "connecting"
        if not self._factoryStarted:
            self.factory.doStart()
            self._factoryStarted = True
        self._network._connecting.append(self)
        self.factory.startedConnecting(self)  # type: ignore[arg-type]

    def stopConnecting(self) -> None:
        if self.state != "connecting":
            raise RuntimeError("we're not trying to connect")
        self._network._connecting.remove(self)
        self._failed(Failure(UserError()))

    def disconnect(self) -> None:
        if self.state == "connecting":
            self.stopConnecting()
        elif self.state == "connected" and self.transport is not None:
            self.transport.loseConnection()

    def getDestination(self) -> IAddress:
        return self._address

    def _failed(self, reason: Failure) -> None:
        self.state = "disconnected"
        self.factory.clientConnectionFailed(self, reason)  # type: ignore[arg-type]
        self._stopFactory()

    def _lost(self, reason: Failure) -> None:
        self.state = "disconnected"
        self.transport = None
        self.factory.clientConnectionLost(self, reason)  # type: ignore[arg-type]
        self._stopFactory()

    def _stopFactory(self) -> None:
        if self.state == "disconnected" and self._factoryStarted:
            self._factoryStarted = False
            self.factory.doStop()


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        """
        Resolution is synchronous: nothing to cancel.
        """


@implementer(IHostnameResolver)
class _Resolver:
    """
    Resolves the relay's host name, and IPv4 literals as themselves.
    """

    def __init__(self, names: Mapping[str, str]) -> None:
        self._names = {name.lower(): address for name, address in names.items()}

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        address = self._names.get(hostName.lower())
        if address is None:
            try:
                address = str(ipaddress.IPv4Address(hostName))
            except ValueError:
                address = None
        if address is not None and (addressTypes is None or IPv4Address in addressTypes):
            resolutionReceiver.addressResolved(IPv4Address("TCP", address, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


@implementer(IReactorTCP, IReactorTime, IReactorPluggableNameResolver)
class MemoryRelayReactor:
    """
    The reactor clients of a L{MemoryRelay} use: its time is the relay's
    L{Clock}, its name resolver knows the relay's host, and C{connectTCP} to
    the relay's address (or host name) and port connects in memory; any other
    address is refused.

    @ivar clock: the L{Clock} behind C{callLater} and C{seconds}.
    @ivar connections: the transports of the open connections, both ends.
    """

    def __init__(self, clock: Clock, hostname: str, port: int) -> None:
        self.clock = clock
        self.hostname = hostname
        self.port = port
        self.nameResolver: IHostnameResolver = _Resolver({hostname: RELAY_ADDRESS})
        self.connections: list[MemoryTransport] = []
        self._server: IProtocolFactory | None = None
        self._connecting: deque[_Connector] = deque()
        self._ports = itertools.count(49152)

    # IReactorTime

    def callLater(self, delay: float, callable: Any, *args: Any, **kw: Any) -> IDelayedCall:
        return self.clock.callLater(delay, callable, *args, **kw)

    def seconds(self) -> float:
        return self.clock.seconds()

    def getDelayedCalls(self) -> Sequence[IDelayedCall]:
        return self.clock.getDelayedCalls()

    # IReactorPluggableNameResolver

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        previous, self.nameResolver = self.nameResolver, resolver
        return previous

    # IReactorTCP

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        raise NotImplementedError("The memory network has one server: the relay.")

    def connectTCP(
        self, host: str, port: int, factory: ClientFactory[Any], timeout: float = 30, bindAddress: Any = None
    ) -> IConnector:
        """
        Connect C{factory} to the relay; the connection is made by the next
        L{MemoryRelay.flush}.
        """
        connector = _Connector(self, host, port, factory)
        connector.connect()
        return connector

    # The network.

    def serve(self, factory: IProtocolFactory) -> None:
        """
        Answer connections to the relay's address with C{factory}.
        """
        if self._server is not None:
            self._server.doStop()
        self._server = factory
        factory.doStart()

    def stopServing(self) -> None:
        """
        Refuse new connections from now on.
        """
        server, self._server = self._server, None
        if server is not None:
            server.doStop()

    def _isRelay(self, host: str, port: int) -> bool:
        return host.lower() in (RELAY_ADDRESS, self.hostname.lower()) and port == self.port

    def _establish(self, connector: _Connector) -> None:
        address = connector.getDestination()
        assert isinstance(address, IPv4Address)
        server = self._server
        if server is None or not self._isRelay(address.host, address.port):
            connector._failed(Failure(ConnectionRefusedError(address.host, address.port)))
            return
        serverAddress = IPv4Address("TCP", RELAY_ADDRESS, self.port)
        clientAddress = IPv4Address("TCP", CLIENT_ADDRESS, next(self._ports))
        serverProtocol = server.buildProtocol(clientAddress)
        clientProtocol = connector.factory.buildProtocol(serverAddress)
        if serverProtocol is None or clientProtocol is None:
            # Accepted and closed at once, as a port would.
            connector._failed(Failure(ConnectionRefusedError(address.host, address.port)))
            return
        serverSide = MemoryTransport(self, serverProtocol, serverAddress, clientAddress)
        clientSide = MemoryTransport(self, clientProtocol, clientAddress, serverAddress)
        serverSide._connect(clientSide)
        clientSide._connect(serverSide)
        clientSide.connector = connector
        connector.transport = clientSide
        connector.state = "connected"
        self.connections.extend([serverSide, clientSide])
        serverSide._makeConnection()
        clientSide._makeConnection()

    def _forget(self, transport: MemoryTransport) -> None:
        if transport in self.connections:
            self.connections.remove(transport)

    def _due(self) -> bool:
        now = self.clock.seconds()
        return any(call.getTime() <= now for call in self.clock.getDelayedCalls())

    def _step(self) -> bool:
        """
        One turn: run the timers that are due, make the connections asked
        for, and deliver what can be delivered.

        @return: whether anything happened.
        """
        progressed = False
        if self._due():
            self.clock.advance(0)
            progressed = True
        while self._connecting:
            self._establish(self._connecting.popleft())
            progressed = True
        for transport in list(self.connections):
            if transport._pump():
                progressed = True
        return progressed


class HttpResponse(NamedTuple):
    """
    A response to L{MemoryRelay.request}.
    """

    status: int
    headers: Headers
    body: bytes


@implementer(IBodyProducer)
class _Body:
    """
    A request body of known bytes.
    """

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class MemoryRelay:
    """
    A relay for tests, reached through L{reactor} at L{url}.

    @ivar relay: the relay's state (L{relaynet.core.Relay}).
    @ivar site: the relay's front door.
    @ivar websockets: the relay's WebSocket factory.
    @ivar clock: the relay's clock; move it with L{advance}.
    @ivar reactor: the reactor for the relay's clients.
    @ivar url: the relay's base URL, for listeners and senders.
    @ivar keyName: the name of the namespace's rule.
    @ivar key: the rule's key.
    """

    def __init__(
        self,
        entities: Iterable[str | Entity] = ("hyco",),
        dynamic: bool = False,
        anonymous: Iterable[str] = (),
        keyName: str = "RootManageSharedAccessKey",
        key: str | None = None,
        settings: RelaySettings | None = None,
        hostname: str = "relay.test",
        port: int = 9090,
    ) -> None:
        """
        @param entities: the hybrid connections, by name or as L{Entity}s.
        @param dynamic: listeners may make entities by listening on them.
        @param anonymous: names of entities whose senders need no token.
        @param keyName: the namespace rule's name.
        @param key: the rule's key; a random one by default.
        @param settings: limits and deadlines; the wire contract's defaults
            by default.
        @param hostname: the relay's host name, in L{url}.
        @param port: the relay's port, in L{url}.
        """
        self.clock = Clock()
        self.clock.advance(START_TIME)
        self.reactor = MemoryRelayReactor(self.clock, hostname, port)
        self.url = f"ws://{hostname}:{port}"
        self.keyName = keyName
        self.key = key if key is not None else generateKey()
        settings = settings if settings is not None else RelaySettings()
        anonymousNames = frozenset(name.lower() for name in anonymous)
        namespace = Namespace(dynamicEntities=dynamic, anonymousNames=anonymousNames)
        for declared in entities:
            entity = Entity(name=declared) if isinstance(declared, str) else declared
            entity.anonymousSenders = entity.anonymousSenders or entity.name.lower() in anonymousNames
            namespace.declare(entity)
        self.relay = Relay(
            namespace=namespace,
            authorizer=Authorizer([Rule(name=keyName, primaryKey=self.key)], graceSeconds=settings.tokenGrace),
            clock=self.reactor,
            settings=settings,
        )
        site, websockets = makeSite(self.relay)
        self.site: RelaySite = site
        self.websockets: HybridConnectionFactory = websockets
        self.reactor.serve(site)
        self._flushing = False

    # Credentials.

    def token(self, entity: str, keyName: str | None = None, key: str | None = None, ttl: int = 3600) -> str:
        """
        A SAS token for C{entity} on this relay, valid C{ttl} seconds from now
        on the relay's clock.
        """
        return mintToken(
            resourceUri(self.url, entity),
            keyName if keyName is not None else self.keyName,
            key if key is not None else self.key,
            int(self.clock.seconds()) + ttl,
        )

    def tokens(self, keyName: str | None = None, key: str | None = None, ttl: int = 3600) -> TokenProvider:
        """
        A token provider (L{relaynet.tokens}) minting tokens with this relay's
        key, or with C{keyName} and C{key}, on the relay's clock.
        """
        return fromKey(
            keyName if keyName is not None else self.keyName,
            key if key is not None else self.key,
            self.reactor,
            ttl,
        )

    # Driving.

    def flush(self, maxRounds: int = MAX_ROUNDS) -> None:
        """
        Deliver bytes, make and end connections and run the timers that are
        due, until nothing is left to do.  The clock does not move.

        @raise NotSettled: still busy after C{maxRounds} rounds.
        """
        if self._flushing:
            raise RuntimeError("flush() was called while flushing: call it from the test, not from a protocol.")
        self._flushing = True
        try:
            for _ in range(maxRounds):
                if not self.reactor._step():
                    return
        finally:
            self._flushing = False
        raise NotSettled(f"The memory network was still busy after {maxRounds} rounds.")

    def advance(self, seconds: float) -> None:
        """
        Move the clock C{seconds} ahead, stopping at each timer on the way to
        run it and flush, as a running reactor would.
        """
        if seconds < 0:
            raise ValueError("time does not go back")
        target = self.clock.seconds() + seconds
        self.flush()
        while True:
            due = [call.getTime() for call in self.clock.getDelayedCalls() if call.getTime() <= target]
            if not due:
                break
            when = min(due)
            if when > self.clock.seconds():
                self.clock.advance(when - self.clock.seconds())
                if self.clock.seconds() < when:
                    # Rounding left the clock a hair short of the timer.
                    self.clock.rightNow = when
            self.flush()
        self.clock.advance(max(0.0, target - self.clock.seconds()))
        self.flush()

    def disconnectAll(self) -> None:
        """
        Drop every connection (a network failure), and flush.
        """
        for transport in list(self.reactor.connections):
            transport.abortConnection()
        self.flush()

    # Looking in.

    def listenerCount(self, entity: str) -> int:
        """
        How many listeners are registered for C{entity}.
        """
        found = self.relay.namespace.get(entity)
        return 0 if found is None else self.relay.registry.listenerCount(found)

    @property
    def connections(self) -> int:
        """
        How many client connections to the relay are open.
        """
        return len(self.reactor.connections) // 2

    # HTTP.

    def request(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        body: bytes | None = None,
    ) -> Deferred[HttpResponse]:
        """
        Send an HTTP request to the relay's front door, as any HTTP client
        would (L{Agent} over the memory network), and flush.

        @param path: the path and query, starting with C{/}: C{/hyco/orders?x=1}.
        @param headers: request headers; add C{ServiceBusAuthorization} with
            L{token} for an entity that wants a token.
        @param body: the request body; C{None} for none.
        @return: fires with the L{HttpResponse} once it has come whole.
        """
        if not path.startswith("/"):
            raise ValueError("the path starts with /")
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        requestHeaders = Headers()
        for name, value in pairs:
            requestHeaders.addRawHeader(name, value)
        uri = f"http://{self.reactor.hostname}:{self.reactor.port}{path}"
        producer = _Body(body) if body is not None else None
        d = Agent(self.reactor).request(method.encode("ascii"), uri.encode("ascii"), requestHeaders, producer).addCallback(
            self._readResponse
        )
        self.flush()
        return d

    def _readResponse(self, response: IResponse) -> Deferred[HttpResponse]:
        def whole(body: bytes) -> HttpResponse:
            return HttpResponse(response.code, response.headers, body)

        return readBody(response).addCallback(whole)


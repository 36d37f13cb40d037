# -*- test-case-name: relaynet.test.test_websocket -*-
"""
The Hybrid Connections WebSocket actions under C{/$hc/}: C{listen} (a
listener's control channel), C{connect} (a sender), and C{accept} (a
listener taking, or rejecting, a sender at the rendezvous).

L{HybridConnectionResource} takes the connection over from C{twisted.web}
and hands it to a L{HybridConnectionProtocol}, an autobahn server protocol
whose role is settled by the action it is asked for.
"""

from __future__ import annotations

import re
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any, Callable, Protocol, TypeVar, cast
from urllib.parse import parse_qsl, quote, unquote, unquote_plus

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.util import wildcards2patterns
from autobahn.websocket.protocol import TrafficStats
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IProtocol, IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.protocols.policies import ProtocolWrapper
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from relaynet import logs
from relaynet.auth import Rights
from relaynet.core import HandshakeInfo, Relay
from relaynet.errors import BadGateway, BadRequest, Gone, ListenerTimeout, RelayError, ServerBusy, safeReason
from relaynet.protocols.control import GOING_AWAY, ControlChannel
from relaynet.protocols.frames import FrameReader, MessageReader, held
from relaynet.protocols.native import BridgeLeg, NativeParty, NativeUpgrade, isNativeUpgrade
from relaynet.protocols.pubsub import EVENT_ID_PREFIX, DiscardLeg
from relaynet.protocols.splice import Leg, splice
from relaynet.registry import IListenerChannel, newConnectionId

if TYPE_CHECKING:
    from relaynet.entities import Entity

__all__ = ["ClockTimer", "DirectIO", "cancelTimers", "HybridConnectionFactory", "HybridConnectionProtocol", "HybridConnectionResource"]

log = Logger(observer=logs.observer)

MAX_ID_LENGTH = 128
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")
# How clients usually spell the headers Twisted stores in lower case.
_SPELLING = {
    "sec-websocket-key": "Sec-WebSocket-Key",
    "sec-websocket-version": "Sec-WebSocket-Version",
    "sec-websocket-protocol": "Sec-WebSocket-Protocol",
    "sec-websocket-extensions": "Sec-WebSocket-Extensions",
}
_PRIVATE_HEADERS = {"servicebusauthorization"}
_P = TypeVar("_P")


def _deny(error: RelayError) -> ConnectionDeny:
    return ConnectionDeny(error.status, safeReason(error.reason))


def stripRelayParameters(rawQuery: str) -> str:
    """
    The query without any C{sb-hc-} parameter that has a value, the rest kept
    byte for byte.
    """
    kept = [
        p for p in rawQuery.split("&") if not ("=" in p and unquote_plus(p.partition("=")[0]).lower().startswith("sb-hc-"))
    ]
    return "&".join(kept) if any(kept) or len(kept) > 1 else ""


class Pending(Protocol):
    """
    A sender held at the rendezvous, WebSocket (L{PendingSender}) or native
    (L{relaynet.protocols.native.NativeSender}).
    """

    def deny(self, error: RelayError) -> None:
        """
        The relay refuses the sender with C{error}.
        """

    def reject(self, status: int, description: str) -> None:
        """
        The listener refused the sender.
        """

    def join(self, listener: HybridConnectionProtocol | NativeParty) -> None:
        """
        The listener is at the rendezvous: connect the two.
        """


class PendingSender:
    """
    A WebSocket sender whose upgrade is held until its listener accepts or
    rejects.
    """

    def __init__(self, proto: HybridConnectionProtocol, offered: list[str]) -> None:
        self.proto = proto
        self.offered = offered
        self.result: Deferred[str | None] = Deferred()

    def deny(self, error: RelayError) -> None:
        self.result.errback(_deny(error))

    def reject(self, status: int, description: str) -> None:
        self.result.errback(ConnectionDeny(status, safeReason(description)))

    def join(self, listener: HybridConnectionProtocol | NativeParty) -> None:
        """
        The listener is at the rendezvous, its own handshake done: open the
        sender and join the two before either can send.
        """
        sender = self.proto
        if isinstance(listener, HybridConnectionProtocol):
            sender.role = Leg(sender)
            listener.role.partner = sender.role
            sender.role.partner = listener.role
            protocol = listener.websocket_protocol_in_use
            self.result.callback(protocol if protocol in self.offered else None)
            if sender.state == sender.STATE_OPEN:
                splice(sender.role, listener.role)
                sender.reader, listener.reader = sender.role, listener.role
            else:
                listener.dropConnection(abort=True)
        else:
            sender.role = bridge = BridgeLeg(sender)
            self.result.callback(None)
            if sender.state == sender.STATE_OPEN:
                splice(bridge, listener.takeOver())
            else:
                listener.refuse(BadGateway("The sender left before the rendezvous."))


def offerSender(
    relay: Relay, info: HandshakeInfo, entity: Entity, suffix: str, pending: Pending, rendezvousId: str
) -> Deferred[IListenerChannel]:
    """
    Hold C{pending} at the rendezvous as C{rendezvousId} and offer it to one
    of C{entity}'s listeners with an C{accept} command.

    @return: fires with the listener's channel once the command is sent; or
        fails with the relay's refusal (no listener, busy).  Whether the
        listener comes is C{pending}'s business: it is joined, rejected or
        denied (at the accept deadline) later.
    """
    if not relay.rendezvous.add(
        rendezvousId,
        pending,
        relay.settings.acceptTimeout,
        lambda p: p.deny(
            ListenerTimeout(
                "None of the connected listeners accepted the connection within the allowed timeout. "
                f"TrackingId:{rendezvousId}, SystemTracker:{entity.name}"
            )
        ),
    ):
        raise ServerBusy("The relay is busy: too many connections are waiting for a listener.")
    query = stripRelayParameters(info.rawQuery)
    pathPart = quote(entity.name + suffix, safe="/;:@&=+$,!~*'()-._")
    headers = _connectHeaders(info)

    def acceptCommand(channel: IListenerChannel) -> dict[str, Any]:
        address = (
            f"{channel.rendezvousBase}/$hc/{pathPart}?{query + '&' if query else ''}"
            f"sb-hc-action=accept&sb-hc-id={quote(rendezvousId, safe='')}"
        )
        return {
            "accept": {
                "address": address,
                "id": rendezvousId,
                "connectHeaders": headers,
                "remoteEndpoint": info.remoteEndpoint(),
            }
        }

    async def deliver() -> IListenerChannel:
        try:
            channel = await relay.registry.deliver(entity, acceptCommand)
        except RelayError:
            relay.rendezvous.take(rendezvousId)
            raise
        log.debug(
            "sender {id} on {entity} offered to {listener}",
            id=rendezvousId,
            entity=entity.name,
            listener=channel.listenerId,
        )
        return channel

    return Deferred.fromCoroutine(deliver())


def _connectHeaders(info: HandshakeInfo) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in info.headers:
        if name.lower() in _PRIVATE_HEADERS:
            continue
        name = _SPELLING.get(name.lower(), name)
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def clientId(info: HandshakeInfo) -> str | None:
    """
    The client's own C{sb-hc-id}, if it gave one.

    @raise BadRequest: it is too long.
    """
    given = info.query.get("sb-hc-id")
    if given is not None and len(given) > MAX_ID_LENGTH:
        raise BadRequest(f"sb-hc-id is longer than {MAX_ID_LENGTH} characters.")
    return given


def takePending(relay: Relay, info: HandshakeInfo) -> Pending:
    """
    A listener arrived at the rendezvous of C{info}'s C{sb-hc-id}: take the
    sender waiting there.  A listener that brings a status code rejects the
    sender with it, and is itself answered 410 (L{Gone}).
    """
    rendezvousId = info.query.get("sb-hc-id", "")
    pending = relay.rendezvous.take(rendezvousId)
    if pending is None:
        raise ListenerTimeout(
            f"Unknown connection id {rendezvousId!r}. Is the listener accepting the connection too late?"
        )
    query = info.query
    status = query.get("sb-hc-statusCode", query.get("statusCode"))
    if status is not None:
        description = query.get("sb-hc-statusDescription", query.get("statusDescription", ""))
        try:
            code = int(status)
            if not 100 <= code <= 999:
                raise ValueError(code)
        except ValueError:
            pending.deny(BadRequest("The listener rejected the connection with an invalid status code."))
            raise BadRequest("sb-hc-statusCode must be an integer between 100 and 999.") from None
        pending.reject(code, description or "Rejected by the listener")
        raise Gone("The connection was rejected.")
    return pending


class DirectIO:
    """
    For autobahn protocols: reads and writes that go straight through.

    autobahn formats the arguments of a debug log line on every read and
    every write, whether debug logging is on or not; on a relay that is a
    fifth of its time when fanning out, and much of a small message's cost.
    """

    send_queue: Any
    transport: Any
    # Once set, and once autobahn is between messages, frames go through
    # this reader rather than autobahn's parser (relaynet.protocols.frames).
    reader: FrameReader | None = None

    def dataReceived(self, data: bytes) -> None:
        reader = self.reader
        if reader is not None and reader.ready():
            reader.feed(data)
        else:
            self._dataReceived(data)  # type: ignore[attr-defined]

    def controlFrameDone(self) -> None:
        """
        The reader has handed autobahn a control frame, and autobahn has
        dealt with it.
        """

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        if sync or chopsize or self.send_queue:
            # autobahn's queue, for synchronous or chopped sends.
            if not isinstance(self.send_queue, deque):
                self.send_queue = deque()
            super().sendData(data, sync, chopsize)  # type: ignore[misc]
        else:
            self.transport.write(data)


# The attributes autobahn gives every connection that, once it is open,
# normally hold the value below until it closes (the handshake's, its
# timers', the close's bookkeeping).  A 3.11 instance __dict__ of more than
# 42 entries gets a table twice the size, and autobahn sets about 60: at
# the end of onOpen, and after each ping or pong, those at this value leave
# the instance's dict, which is rebuilt small, and reads find the class's
# value instead (set on HybridConnectionProtocol below); a write puts the
# entry back.  Only immutable values: nothing can change the class's copy
# in place.  About 1 KiB less for each idle listener, 2 KiB for each
# relayed connection.
_AT_REST: dict[str, object] = {
    **dict.fromkeys(
        (
            "_perMessageCompress",
            "_wskey",
            "autoPingPending",
            "autoPingPendingCall",
            "autoPingPendingSent",
            "autoPingTimeoutCall",
            "closeHandshakeTimeoutCall",
            "control_frame_data",
            "current_frame",
            "http_headers",
            "http_request_data",
            "http_request_host",
            "http_request_params",
            "http_request_path",
            "http_request_uri",
            "http_response_data",
            "http_status_line",
            "localCloseCode",
            "localCloseReason",
            "openHandshakeTimeoutCall",
            "remoteCloseCode",
            "remoteCloseReason",
            "trackedTimings",
            "wasNotCleanReason",
            "websocket_extensions",
            "websocket_protocol_in_use",
            "websocket_protocols",
            "_pendingId",
            "_pendingSender",
        ),
        None,
    ),
    **dict.fromkeys(
        (
            "closedByMe",
            "droppedByMe",
            "failedByMe",
            "inside_message",
            "triggered",
            "wasClean",
            "wasCloseHandshakeTimeout",
            "wasMaxFramePayloadSizeExceeded",
            "wasMaxMessagePayloadSizeExceeded",
            "wasOpenHandshakeTimeout",
            "wasServerConnectionDropTimeout",
            "wasServingFlashSocketPolicyFile",
        ),
        False,
    ),
    "autoPingPendingSeq": 0,
    "send_state": 0,
    "data": b"",
    "websocket_origin": "",
    "websocket_version": 13,
}


def atRest(name: str, value: object) -> bool:
    """
    Whether attribute C{name} holds its L{_AT_REST} value (of the same type:
    C{0} is not C{False}).
    """
    if name not in _AT_REST:
        return False
    rest = _AT_REST[name]
    return type(value) is type(rest) and value == rest


class HybridConnectionProtocol(DirectIO, WebSocketServerProtocol):  # type: ignore[misc]
    """
    One WebSocket under C{/$hc/}: a control channel or one leg of a
    relayed connection.
    """

    factory: HybridConnectionFactory
    info: HandshakeInfo
    role: Any = None
    # A spliced leg's or a control channel's frames go through its reader
    # (DirectIO); frames the relay writes to a leg wait in _held while a
    # forwarded one is half-written (relaynet.protocols.frames).
    _held: list[bytes] | None = None
    _pendingId: str | None = None
    _pendingSender: Pending | None = None

    # autobahn options the relay never changes, fixed here as class
    # attributes: autobahn copies each option it does not find on the
    # protocol from the factory onto every connection.  Keeping these off
    # the instances keeps each connection's __dict__ under 86 entries while
    # it opens, the point where CPython 3.11 doubles its table (from 1.5 to
    # 3.25 KiB); once open, _AT_REST makes it smaller still (bench/idle.py).
    # Options set with factory.setProtocolOptions() do not apply to these.
    logOctets = False
    logFrames = False
    trackTimings = False
    autoFragmentSize = 0
    webStatus = False
    serveFlashSocketPolicy = False
    flashSocketPolicy = ""
    allowedOrigins = ("*",)
    allowedOriginsPatterns = tuple(wildcards2patterns(allowedOrigins))
    allowNullOrigin = True
    maxConnections = 0
    trustXForwardedFor = 0

    @property
    def relay(self) -> Relay:
        return self.factory.relay

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        if self._held is None or not held(self, data):
            super().sendData(data, sync, chopsize)

    def onConnect(self, request: ConnectionRequest) -> Deferred[Any]:  # type: ignore[override]
        return Deferred.fromCoroutine(self._connect(request))

    async def _connect(self, request: ConnectionRequest) -> Any:
        await self.factory.throttle.hold(self.info.peerHost)
        action = self.info.query.get("sb-hc-action", "connect")
        try:
            if action == "listen":
                return await self._listen()
            if action == "connect":
                return await self._sender(request)
            if action == "accept":
                return self._accept(request)
            if action == "request":
                return self._request()
            raise BadRequest(f"Unsupported action '{action}'.")
        except RelayError as e:
            self.factory.throttle.refused(self.info, e, action)
            raise _deny(e) from None
        except ConnectionDeny:
            raise
        except Exception:
            log.failure("internal error on {path}", path=self.info.path)
            raise ConnectionDeny(500, "Internal server error.") from None

    def _clientId(self) -> str | None:
        return clientId(self.info)

    async def _listen(self) -> None:
        relay = self.relay
        entity = relay.namespace.forListener(self.info.path)
        try:
            token = relay.authorize(self.info, entity, Rights.LISTEN)
            assert token is not None
            channel = ControlChannel(relay, self, entity, self.info, token, self._clientId() or newConnectionId(None))
            self.role = channel
            await channel.register()
        except RelayError:
            if relay.registry.listenerCount(entity) == 0:
                relay.namespace.listenersGone(entity)
            raise
        settings = relay.settings
        self.maxMessagePayloadSize = self.maxFramePayloadSize = settings.maxControlMessage
        self.autoPingInterval = settings.pingInterval
        self.autoPingTimeout = settings.pingTimeout
        self.reader = MessageReader(self)
        return None

    async def _sender(self, request: ConnectionRequest) -> str | None:
        relay = self.relay
        entity, suffix = relay.namespace.resolve(self.info.path)
        relay.authorize(self.info, entity, Rights.SEND)
        if entity.kind == "event":
            # A publisher: the relay itself takes its messages.
            from relaynet.protocols.pubsub import PublisherLeg

            self.role = PublisherLeg(self, entity, suffix)
            return None
        pending = PendingSender(self, list(request.protocols))
        self._pendingSender = pending
        rendezvousId = newConnectionId(self._clientId())
        self._pendingId = rendezvousId
        try:
            await offerSender(relay, self.info, entity, suffix, pending, rendezvousId)
            # The listener's arrival at the rendezvous makes this side a leg.
            return await pending.result
        finally:
            self._pendingId = self._pendingSender = None

    def _accept(self, request: ConnectionRequest) -> str | None:
        pending = takePending(self.relay, self.info)
        self.role = Leg(self)
        self._pendingSender = pending
        return request.protocols[0] if request.protocols else None

    def _request(self) -> None:
        from relaynet.protocols.request import RequestLeg

        rendezvousId = self.info.query.get("sb-hc-id", "")
        if rendezvousId.startswith(EVENT_ID_PREFIX):
            # A subscriber answering an event: nobody waits for the answer.
            self.role = DiscardLeg(self)
            return None
        exchange = self.relay.exchanges.get(rendezvousId)
        if exchange is None or exchange.leg is not None:
            raise ListenerTimeout(f"Unknown request id {rendezvousId!r}: it was answered, or timed out.")
        self.role = RequestLeg(self, exchange)
        return None

    # What autobahn keeps of the opening handshake: the request and response
    # texts and their parsed forms.  Nothing reads them once the connection
    # is open.
    _HANDSHAKE_ATTRIBUTES = (
        "http_request_data",
        "http_response_data",
        "http_status_line",
        "http_headers",
        "http_request_uri",
        "http_request_path",
        "http_request_params",
        "http_request_host",
        "_wskey",
        "websocket_protocols",
        "websocket_extensions",
    )

    def _handshakeOver(self) -> None:
        """
        Let go of what only the opening handshake needed: about 5 KiB per
        connection, which idle listeners and relayed connections would
        otherwise hold for their whole life.
        """
        for name in self._HANDSHAKE_ATTRIBUTES:
            setattr(self, name, None)
        self.info.forgetRequest()

    def _compact(self) -> None:
        """
        Rebuild the instance's C{__dict__} without the attributes at rest
        (L{_AT_REST}): a dict never shrinks as entries leave it.
        """
        self.__dict__ = {name: value for name, value in self.__dict__.items() if not atRest(name, value)}

    def controlFrameDone(self) -> None:
        # A ping answered, or a pong that ends autobahn's wait for one,
        # leaves its bookkeeping at rest again, but on the instance; and
        # the frame's unmasker, which autobahn makes anew for each frame.
        # When traffic ends the wait instead (autoPingRestartOnAnyTraffic),
        # autobahn leaves the last ping's time behind, which only the next
        # ping reads, after setting it: cleared as a matching pong clears it.
        if self.state == self.STATE_OPEN:
            self.__dict__.pop("current_frame_masker", None)
            if self.autoPingPending is None:
                self.autoPingPendingSent = None
            self._compact()

    def onOpen(self) -> None:
        from relaynet.protocols.request import RequestLeg

        self._handshakeOver()
        if isinstance(self.role, RequestLeg):
            self.role.exchange.legOpened(self)
        elif isinstance(self.role, ControlChannel):
            self.role.opened()
        elif self._pendingSender is not None and isinstance(self.role, Leg):
            # The listener is at the rendezvous: open the sender, and join
            # them before either can send.
            pending, self._pendingSender = self._pendingSender, None
            pending.join(self)
        self._compact()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isinstance(self.role, ControlChannel):
            self.role.messageReceived(payload, isBinary)

    def _streams(self) -> bool:
        """
        Whether this socket's frames stream through (a leg or a request
        rendezvous) rather than arrive as whole messages (a control channel).
        """
        return self.role is not None and not isinstance(self.role, ControlChannel)

    def onMessageBegin(self, isBinary: bool) -> None:
        if self._streams():
            self.role.messageBegin(isBinary)
        else:
            super().onMessageBegin(isBinary)

    def onMessageFrameBegin(self, length: int) -> None:
        if self._streams():
            self.role.frameBegin(length)
        else:
            super().onMessageFrameBegin(length)

    def onMessageFrameData(self, payload: bytes) -> None:
        if self._streams():
            self.role.frameData(payload)
        else:
            super().onMessageFrameData(payload)

    def onMessageFrameEnd(self) -> None:
        if not self._streams():
            super().onMessageFrameEnd()

    def onMessageEnd(self) -> None:
        if self._streams():
            self.role.messageEnd()
        else:
            super().onMessageEnd()

    def onCloseFrame(self, code: int, reasonRaw: bytes) -> bool | None:
        if self._streams() and self.role.closeFrame(code, reasonRaw):
            return None
        if isinstance(self.role, ControlChannel):
            self.role.lost()
        return super().onCloseFrame(code, reasonRaw)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._pendingSender is not None and isinstance(self.role, Leg):
            # A listener at the rendezvous whose own handshake failed.
            self._pendingSender.deny(BadGateway("The listener could not complete the rendezvous."))
            self._pendingSender = None
        if self._pendingId is not None:
            self.relay.rendezvous.take(self._pendingId)
            self._pendingId = None
        if self.role is not None:
            self.role.lost()
        self.factory.connections.discard(self)

    # Per-connection bookkeeping of autobahn's that the relay never uses,
    # shared by all connections instead (bench/idle.py: about 1 KiB of each
    # connection's cost).  autobahn queues only synchronous or chopped
    # sends, which the relay never makes, so the queue is made if it is
    # ever needed (DirectIO.sendData); and it counts octets in a
    # TrafficStats that nothing reads.
    send_queue: Any = ()
    trafficStats = TrafficStats()

    def connectionMade(self) -> None:
        super().connectionMade()
        del self.send_queue, self.trafficStats
        self.factory.connections.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        cancelTimers(self)
        self.reader = None
        super().connectionLost(reason)

    def goAway(self) -> None:
        """
        The relay is stopping: close with 1001.
        """
        if self.state == self.STATE_OPEN:
            self.sendCloseFrame(code=GOING_AWAY, reasonUtf8=b"The relay is shutting down.")
        elif self.state == self.STATE_CONNECTING:
            self.dropConnection(abort=True)


for _name, _value in _AT_REST.items():
    setattr(HybridConnectionProtocol, _name, _value)
del _name, _value


class ClockTimer:
    """
    autobahn's timer interface over an injected clock: its own batched timer
    uses the global reactor and leaves its calls pending after they are
    cancelled.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock

    def call_later(self, delay: float, func: Callable[..., Any], *args: Any, **kwargs: Any) -> IDelayedCall:
        return self._clock.callLater(delay, func, *args, **kwargs)


def cancelTimers(proto: Any, *names: str) -> None:
    """
    Cancel the timers a WebSocket protocol holds in the attributes
    C{names}, and clear them: autobahn leaves its close handshake timer
    running when the connection goes.
    """
    for name in ("closeHandshakeTimeoutCall", *names):
        call = getattr(proto, name, None)
        if call is not None:
            if call.active():
                call.cancel()
            setattr(proto, name, None)


class FailureThrottle:
    """
    Remembers recent refusals by client address; an address refused more
    than C{allowed} times within C{window} seconds waits C{delay} seconds
    before each next answer.  At most C{maxPeers} addresses are kept.
    """

    def __init__(
        self, clock: IReactorTime, window: float = 10.0, allowed: int = 20, delay: float = 1.0, maxPeers: int = 10000
    ) -> None:
        self._clock = clock
        self._window = window
        self._allowed = allowed
        self._delay = delay
        self._maxPeers = maxPeers
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, peer: str) -> deque[float] | None:
        times = self._failures.get(peer)
        if times is not None:
            horizon = self._clock.seconds() - self._window
            while times and times[0] < horizon:
                times.popleft()
            if not times:
                del self._failures[peer]
                return None
        return times

    def failed(self, peer: str) -> None:
        times = self._recent(peer)
        if times is None:
            times = self._failures[peer] = deque(maxlen=self._allowed + 1)
        times.append(self._clock.seconds())
        self._failures.move_to_end(peer)
        while len(self._failures) > self._maxPeers:
            self._failures.popitem(last=False)

    def delay(self, peer: str) -> float:
        times = self._recent(peer)
        return self._delay if times is not None and len(times) > self._allowed else 0.0

    async def hold(self, peer: str) -> None:
        """
        Wait before answering C{peer}, if it keeps being refused (hyco-ws
        reconnects at once, twice per failure).
        """
        delay = self.delay(peer)
        if delay:
            await deferLater(self._clock, delay, lambda: None)

    def refused(self, info: HandshakeInfo, error: RelayError, what: str) -> None:
        """
        Count and log the refusal of C{what} (an action) to C{info}'s client.
        """
        self.failed(info.peerHost)
        log.info(
            "refused {what} on {path} from {peer}: {error}",
            what=what,
            path=info.path,
            peer=info.peerHost,
            error=str(error),
        )


def withFactoryOptions(protocol: type[_P], factory: Any) -> type[_P]:
    """
    A subclass of C{protocol}, of the same name, with C{factory}'s autobahn
    options as class attributes (the ones C{protocol} does not fix itself),
    and no options left for autobahn to copy per connection.

    autobahn copies every option a connection does not have from its
    factory onto the connection, and pretty-prints the list for a debug log
    whether or not it is logged: a tenth of the relay's CPU for each new
    WebSocket (bench/streams.py's set-up workload: 20-30% more relayed
    WebSocket connections per second without it).  A connection may still
    set an option of its own (control channels set their message limits
    and pings).  Call it once the factory's options are set; later
    C{setProtocolOptions} calls do not reach connections.
    """
    fixed: dict[str, Any] = {"CONFIG_ATTRS": [], "__module__": protocol.__module__}
    for name in protocol.CONFIG_ATTRS:  # type: ignore[attr-defined]
        if not hasattr(protocol, name):
            value = getattr(factory, name)
            # A function as a class attribute would be bound to each connection.
            fixed[name] = staticmethod(value) if callable(value) else value
    return type(protocol.__name__, (protocol,), fixed)


class HybridConnectionFactory(WebSocketServerFactory):
    protocol = HybridConnectionProtocol  # type: ignore[assignment]

    def __init__(self, relay: Relay) -> None:
        super().__init__(server="relaynet")
        self._batched_timer = ClockTimer(relay.clock)
        self.relay = relay
        self.throttle = FailureThrottle(relay.clock)
        self.connections: set[HybridConnectionProtocol] = set()
        # Native streams once upgraded (relaynet.protocols.native.RawEnd).
        self.nativeStreams: set[Any] = set()
        settings = relay.settings
        self.setProtocolOptions(
            # Legs stream frames through, so no frame or message is held
            # whole; control channels set their own limits.
            maxFramePayloadSize=0,
            maxMessagePayloadSize=0,
            # A sender's handshake is held while its listener decides.
            openHandshakeTimeout=settings.acceptTimeout + 10,
            closeHandshakeTimeout=settings.closeTimeout,
            perMessageCompressionAccept=lambda offers: None,
            echoCloseCodeReason=True,
            # Protocol errors end with a close frame saying why.
            failByDrop=False,
        )
        self.protocol = withFactoryOptions(HybridConnectionProtocol, self)  # type: ignore[assignment]

    def goAway(self) -> None:
        for proto in list(self.connections):
            proto.goAway()
        for stream in list(self.nativeStreams):
            stream.goAway()


def _isUpgrade(request: Request) -> bool:
    upgrade = (request.getHeader("upgrade") or "").lower()
    connection = (request.getHeader("connection") or "").lower()
    return request.method == b"GET" and "websocket" in upgrade and "upgrade" in connection


class HybridConnectionResource(Resource):
    """
    C{/$hc/...}: takes each WebSocket upgrade over from C{twisted.web}.
    """

    isLeaf = True

    def __init__(self, factory: HybridConnectionFactory) -> None:
        super().__init__()
        self.factory = factory

    def render(self, request: Request) -> bytes | int:
        from relaynet.frontdoor import errorResponse

        host = request.getHeader("host") or ""
        native = isNativeUpgrade(request)
        if not native and not _isUpgrade(request):
            return errorResponse(request, BadRequest("This endpoint is only for web-socket requests"))
        if not _HOST.match(host):
            return errorResponse(request, BadRequest("The Host header is missing or not valid."))
        uri = request.uri.decode("latin-1")
        rawPath, _, rawQuery = uri.partition("?")
        path = unquote(rawPath)
        if not path.startswith("/$hc/"):
            return errorResponse(request, BadRequest("The address is not valid."))
        peer = request.getClientAddress()
        headers = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, values in request.requestHeaders.getAllRawHeaders()
            for value in values
        ]
        info = HandshakeInfo(
            host=host,
            secure=request.isSecure(),
            path=path[len("/$hc/") :],
            rawQuery=rawQuery,
            headers=headers,
            query=dict(reversed(parse_qsl(rawQuery, keep_blank_values=True))),
            peerHost=getattr(peer, "host", ""),
            peerPort=getattr(peer, "port", 0),
        )
        if native:
            NativeUpgrade(self.factory, request, info).start()
            return NOT_DONE_YET
        proto = cast(HybridConnectionProtocol, self.factory.buildProtocol(peer))
        proto.info = info
        transport = takeOverChannel(request, proto)
        head = [request.method + b" " + request.uri + b" HTTP/1.1"]
        head.extend(f"{name}: {value}".encode("latin-1") for name, value in headers)
        proto.dataReceived(b"\r\n".join(head) + b"\r\n\r\n")
        transport.resumeProducing()
        return NOT_DONE_YET


def takeOverChannel(request: Request, proto: IProtocol) -> Any:
    """
    Take C{request}'s connection from C{twisted.web} and connect C{proto}
    to it.  The transport stays paused (C{twisted.web} pauses it while it
    handles a request) until the caller resumes it.

    @return: the transport.
    """
    channel = request.channel
    transport: Any = channel.transport
    channel.setTimeout(None)
    transport.unregisterProducer()
    channel.transport = None
    if isinstance(transport, ProtocolWrapper):
        transport.wrappedProtocol = proto
    else:
        transport.protocol = proto
    proto.makeConnection(transport)
    return transport

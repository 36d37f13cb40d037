# -*- test-case-name: relaynet.test.test_native -*-
"""
Native streams: a relaynet extension whose data phase is raw bytes.

A sender, or a listener answering an C{accept} command, asks for it with an
HTTP/1.1 upgrade to C{relaynet-stream} instead of C{websocket}, on the same
address, with the same query parameters and the same tokens::

    GET /$hc/{entity}?sb-hc-action=connect&sb-hc-id=... HTTP/1.1
    Host: relay.example.com
    Upgrade: relaynet-stream
    Connection: Upgrade
    ServiceBusAuthorization: SharedAccessSignature sr=...

The relay holds the request while the listener decides, exactly as it holds
a WebSocket handshake, and answers::

    HTTP/1.1 101 Switching Protocols
    Upgrade: relaynet-stream
    Connection: Upgrade

after which the connection carries the stream's bytes, both ways, with no
framing; or it answers with the error status and the JSON error body of the
Hybrid Connections HTTP mode, and closes.  The client must not send stream
bytes before the C{101}.

The two sides choose independently: a native sender can reach a WebSocket
listener (each chunk of bytes becomes one binary message; every message's
bytes arrive in order) and the other way round.  Between two native sides
on plain TCP the relay moves the bytes in the kernel (L{zerocopy}); with
TLS on either side they pass through Python, with backpressure either way.

A TCP half-close passes through as a half-close.  TLS has no half-close in
Twisted: a TLS side that ends its stream ends its connection, and the other
side sees the end of the stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Union

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, ISSLTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from relaynet import logs
from relaynet.auth import Rights
from relaynet.core import HandshakeInfo, Relay
from relaynet.errors import BadGateway, BadRequest, RelayError
from relaynet.protocols import zerocopy
from relaynet.protocols.splice import CLOSING, OPEN, splice
from relaynet.registry import newConnectionId

if TYPE_CHECKING:
    from relaynet.protocols.websocket import HybridConnectionFactory, HybridConnectionProtocol

__all__ = ["UPGRADE", "BridgeLeg", "NativeParty", "NativeSender", "RawEnd", "isNativeUpgrade"]

log = Logger(observer=logs.observer)

#: The C{Upgrade} token of a native stream.
UPGRADE = "relaynet-stream"
SWITCHING = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: " + UPGRADE.encode("ascii") + b"\r\n"
    b"Connection: Upgrade\r\n\r\n"
)
NORMAL_CLOSURE = 1000


def isNativeUpgrade(request: Request) -> bool:
    """
    Whether C{request} asks for a native stream.
    """
    upgrade = (request.getHeader("upgrade") or "").strip().lower()
    connection = (request.getHeader("connection") or "").lower()
    return request.method == b"GET" and upgrade == UPGRADE and "upgrade" in connection


class _Refusal(RelayError):
    """
    A listener's own refusal, passed to its sender with its status.
    """

    code = "Rejected"

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


# What a native side is joined to: another native side, or a WebSocket leg.
End = Union["RawEnd", "BridgeLeg"]


@implementer(IHalfCloseableProtocol)
class RawEnd(Protocol):
    """
    One side of a native stream once upgraded: what its peer sends goes to
    the C{partner}, as bytes.

    @ivar readEnded: its peer has finished sending.
    @ivar writeEnded: the partner's peer has finished sending, and this
        side was told so.
    """

    partner: End | None = None
    readEnded = False
    writeEnded = False
    #: The kernel splice that moves this side's bytes, if one does.
    splice: zerocopy.KernelSplice | None = None

    def __init__(self, streams: set[RawEnd]) -> None:
        self.streams = streams
        streams.add(self)

    def goAway(self) -> None:
        """
        The relay is stopping: end the stream, after what is on its way.
        """
        if self.splice is not None:
            self.splice.stop()
        else:
            self.finish()

    def dataReceived(self, data: bytes) -> None:
        if self.partner is not None:
            self.partner.write(data)

    def readConnectionLost(self) -> None:
        self.readEnded = True
        if self.partner is not None:
            self.partner.endWrite()
        if self.writeEnded:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.streams.discard(self)
        _gone(self, clean=reason.check(ConnectionDone) is not None)

    # What the partner does to this side.

    def write(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def endWrite(self) -> None:
        """
        The partner's peer has finished sending: half-close, or close if
        this side's peer has finished too or the transport cannot half-close.
        """
        self.writeEnded = True
        transport: Any = self.transport
        _release(transport)
        if self.readEnded or ISSLTransport.providedBy(transport):
            transport.loseConnection()
        else:
            transport.loseWriteConnection()

    def finish(self) -> None:
        _release(self.transport)
        self.transport.loseConnection()  # type: ignore[union-attr]

    def abort(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]


class BridgeLeg:
    """
    A WebSocket leg whose partner is native: the bytes of its peer's frames,
    binary or text, go to the partner as they arrive; each chunk of bytes
    from the partner goes to its peer as one binary message.  A close frame
    is the end of the stream, a half-close the other way round.
    """

    halfClosed = False

    def __init__(self, proto: HybridConnectionProtocol) -> None:
        self.proto = proto
        self.partner: End | None = None

    @property
    def transport(self) -> Any:
        return self.proto.transport

    # Frames from the WebSocket peer (called by HybridConnectionProtocol).

    def messageBegin(self, isBinary: bool) -> None:
        pass

    def frameBegin(self, length: int) -> None:
        pass

    def frameData(self, payload: bytes) -> None:
        if self.partner is not None and payload:
            self.partner.write(payload)

    def messageEnd(self) -> None:
        pass

    def closeFrame(self, code: int | None, reason: bytes | None) -> bool:
        """
        The peer has finished sending.

        @return: C{True} if the close is held open for the partner's rest.
        """
        partner = self.partner
        if partner is None:
            return False
        if self.proto.state == OPEN:
            self.halfClosed = True
            self.proto.wasClean = True
            partner.endWrite()
            return True
        # The answer to the close this side sent: both directions are done.
        partner.endWrite()
        return False

    def lost(self) -> None:
        _gone(self, clean=bool(self.proto.wasClean))

    # What the partner does to this side.

    def write(self, data: bytes) -> None:
        if self.proto.state == OPEN:
            self.proto.sendMessage(data, isBinary=True)

    def endWrite(self) -> None:
        proto = self.proto
        if proto.state != OPEN:
            return
        if self.halfClosed:
            # The peer closed first; this is the answer.
            _release(proto.transport)
            proto.sendCloseFrame(code=NORMAL_CLOSURE, isReply=True)
            proto.dropConnection(abort=False)
        else:
            proto.sendCloseFrame(code=NORMAL_CLOSURE)

    def finish(self) -> None:
        if self.proto.state == OPEN:
            self.endWrite()
        elif self.proto.state == CLOSING:
            self.proto.transport.resumeProducing()  # type: ignore[union-attr]

    def abort(self) -> None:
        self.proto.dropConnection(abort=True)


def _gone(end: End, clean: bool) -> None:
    """
    C{end}'s connection is gone: its partner ends too, as a close if this
    one ended cleanly, else as a reset.
    """
    partner, end.partner = end.partner, None
    if partner is None:
        return
    partner.partner = None
    transport: Any = partner.transport
    transport.unregisterProducer()
    if clean:
        partner.finish()
    else:
        partner.abort()


def _release(transport: Any) -> None:
    """
    Nothing more will be written to C{transport}: unregister the other
    side's read side from it (Twisted closes nothing while a producer is
    registered), and let the other side read on, to its end.
    """
    producer = transport.producer
    if producer is not None:
        transport.unregisterProducer()
        producer.resumeProducing()


class NativeParty:
    """
    A native upgrade request on hold: a sender waiting for its listener, or
    a listener arriving at the rendezvous.  Until it is taken over it is an
    ordinary C{twisted.web} request, so a refusal is an HTTP answer.
    """

    def __init__(self, request: Request, info: HandshakeInfo, streams: set[RawEnd]) -> None:
        self.request = request
        self.info = info
        self.streams = streams
        self.gone = False
        self.done = False
        self._onGone: list[Callable[[], None]] = []
        # Fails at once if the client is already gone.
        request.notifyFinish().addErrback(self._left)

    def _left(self, failure: Failure) -> None:
        self.gone = True
        for callback in self._onGone:
            callback()
        self._onGone.clear()

    def whenGone(self, callback: Callable[[], None]) -> None:
        """
        Call C{callback} if the client leaves before the upgrade (at once
        if it has left already).
        """
        if self.gone:
            callback()
        else:
            self._onGone.append(callback)

    def refuse(self, error: RelayError) -> None:
        """
        Answer with C{error}'s status and JSON body, and close.
        """
        from relaynet.frontdoor import errorResponse

        if self.gone or self.done:
            return
        self.done = True
        self._onGone.clear()
        request = self.request
        body = errorResponse(request, error)
        request.setHeader("content-length", str(len(body)))
        # The connection was for the stream: it ends with the answer.
        request.channel.persistent = False
        request.write(body)
        request.finish()

    @property
    def plainTcp(self) -> bool:
        """
        Whether the client's connection is TCP with no TLS, whose socket the
        kernel can splice.
        """
        transport = self.request.channel.transport
        return transport is not None and not ISSLTransport.providedBy(transport) and hasattr(transport, "socket")

    def takeOver(self, greet: bool = True) -> RawEnd:
        """
        Take the connection from C{twisted.web} for a L{RawEnd}, and send the
        C{101} unless C{greet} is false (the kernel splice sends it itself).
        """
        from relaynet.protocols.websocket import takeOverChannel

        self.done = True
        self._onGone.clear()
        end = RawEnd(self.streams)
        transport = takeOverChannel(self.request, end)
        if greet:
            transport.write(SWITCHING)
            transport.resumeProducing()
        return end


class NativeSender:
    """
    A native sender held at the rendezvous (a L{websocket.Pending}).
    """

    def __init__(self, relay: Relay, party: NativeParty) -> None:
        self.relay = relay
        self.party = party

    def deny(self, error: RelayError) -> None:
        self.party.refuse(error)

    def reject(self, status: int, description: str) -> None:
        self.party.refuse(_Refusal(status, description))

    def join(self, listener: HybridConnectionProtocol | NativeParty) -> None:
        from relaynet.protocols.websocket import HybridConnectionProtocol

        if self.party.gone:
            gone = BadGateway("The sender left before the listener came.")
            if isinstance(listener, HybridConnectionProtocol):
                listener.sendCloseFrame(code=gone.closeCode, reasonUtf8=gone.reason.encode("utf-8"))
            else:
                listener.refuse(gone)
            return
        if isinstance(listener, HybridConnectionProtocol):
            listener.role = bridge = BridgeLeg(listener)
            splice(bridge, self.party.takeOver())
        elif self.party.plainTcp and listener.plainTcp and zerocopy.available(self.relay.clock):
            sender = self.party.takeOver(greet=False)
            receiver = listener.takeOver(greet=False)
            kernel = zerocopy.KernelSplice(self.relay.clock, sender.transport, receiver.transport, SWITCHING, SWITCHING)
            sender.splice = receiver.splice = kernel
            kernel.start()
        else:
            splice(self.party.takeOver(), listener.takeOver())


class NativeUpgrade:
    """
    One native upgrade request under C{/$hc/}: a sender (C{connect}) or a
    listener at the rendezvous (C{accept}).
    """

    def __init__(self, factory: HybridConnectionFactory, request: Request, info: HandshakeInfo) -> None:
        self.factory = factory
        self.relay: Relay = factory.relay
        self.info = info
        self.party = NativeParty(request, info, factory.nativeStreams)

    def start(self) -> None:
        Deferred.fromCoroutine(self._run())

    async def _run(self) -> None:
        throttle = self.factory.throttle
        info = self.info
        await throttle.hold(info.peerHost)
        action = info.query.get("sb-hc-action", "connect")
        try:
            if action == "connect":
                await self._sender()
            elif action == "accept":
                self._listener()
            else:
                raise BadRequest(f"A native stream is for 'connect' and 'accept', not '{action}'.")
        except RelayError as e:
            throttle.refused(info, e, f"native {action}")
            self.party.refuse(e)
        except Exception:
            log.failure("internal error on native {path}", path=info.path)
            self.party.refuse(RelayError("Internal server error."))

    async def _sender(self) -> None:
        from relaynet.protocols.websocket import clientId, offerSender

        relay, info = self.relay, self.info
        entity, suffix = relay.namespace.resolve(info.path)
        relay.authorize(info, entity, Rights.SEND)
        if entity.kind == "event":
            raise BadRequest("Events are published over HTTP or a WebSocket, not a native stream.")
        rendezvousId = newConnectionId(clientId(info))
        pending = NativeSender(relay, self.party)
        # A sender that leaves while its listener decides frees its place.
        self.party.whenGone(lambda: relay.rendezvous.take(rendezvousId))
        await offerSender(relay, info, entity, suffix, pending, rendezvousId)

    def _listener(self) -> None:
        from relaynet.protocols.websocket import takePending

        pending = takePending(self.relay, self.info)
        pending.join(self.party)


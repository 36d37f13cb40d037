# -*- test-case-name: relaynet.test.test_listener -*-
"""
The listener's side of Hybrid Connections: relayed HTTP requests and
relayed WebSocket streams, over autobahn, against relaynet and Azure Relay
alike.

L{HybridListener} opens the control channel::

    {baseUrl}/$hc/{entity}?sb-hc-action=listen&sb-hc-id={uuid}

with a SAS token from a L{relaynet.tokens.TokenProvider} in the
C{ServiceBusAuthorization} header, renews the token with C{renewToken}
before it expires, pings the relay, and reconnects (with a fresh token and
back-off) when the channel drops, until it is closed or the relay says the
entity does not exist.  Its status (C{connecting}, C{online},
C{reconnecting}, C{offline}) goes to an C{onStatus} callback.

C{accept} commands (WebSocket senders) go to an C{acceptHandler} as an
L{AcceptRequest}; an accepted sender's stream is opened at the command's
C{address} (a L{relaynet.streams.StreamWebSocket}) and given to a protocol
from the C{streamFactory}; a rejected one is answered at the address with
C{sb-hc-statusCode} and C{sb-hc-statusDescription}, which the relay
acknowledges with 410.

Every C{request} command becomes a L{RelayedHttpRequest} for the handler:

    - I{full form} (the command has a C{method}): the request came whole on
      the control channel; if its C{body} is true, the very next message on
      the control channel is the whole body.
    - I{address-only} form: the listener opens a WebSocket to the request's
      C{address}; the relay sends the request there as a text message and
      then, if it has one, the body as one binary message, which is handed
      on frame by frame as it arrives.  A handler that reads slowly pauses
      the rendezvous socket.

The response goes back the way the .NET listener sends it.  Writes are
buffered; if the response is finished with at most 64 KiB buffered, and the
request did not come over a rendezvous, it goes on the control channel: a
C{response} text message and, if there is a body, one binary message right
after it.  If more than 64 KiB is buffered, or the response is still open
2 seconds after its first write, the listener opens a WebSocket to the
request's address (or uses the rendezvous the request came on), sends the
C{response} as text and streams the body as one binary message, frame by
frame, pausing the writer while the socket cannot take more; then it closes
that socket with 1000.  One request per rendezvous.
"""

from __future__ import annotations

import json
import random
import re
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Union, cast
from typing import Protocol as TypingProtocol
from urllib.parse import quote, urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.application.internet import backoffPolicy
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IProducer,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES
from zope.interface import implementer

from relaynet import logs
from relaynet.auth import SasToken
from relaynet.protocols.websocket import ClockTimer, DirectIO, cancelTimers, stripRelayParameters
from relaynet.protocols.control import encodeCommand
from relaynet.protocols.frames import MessageReader, clientFrame, writeNow
from relaynet.protocols.pubsub import EVENT_ID_PREFIX
from relaynet.streams import (
    CloseWaiters,
    RelayAddress,
    RelayConnectError,
    StreamWebSocket,
    relayEndpoint,
    resourceUri,
)
from relaynet.native import NativeStream, nativeRequest, oneShotFactory
from relaynet.streams import streamFactory as makeStreamFactory
from relaynet.tokens import TokenProvider, fromKey, getToken

__all__ = [
    "AcceptRequest",
    "CONTROL_BODY_LIMIT",
    "FLUSH_DELAY",
    "HttpListener",
    "HybridListener",
    "RelayRefused",
    "RelayedHttpRequest",
    "RequestHandler",
    "readBody",
    "takeBody",
    "defaultRetryPolicy",
    "sasTokenProvider",
]

log = Logger(observer=logs.observer)

CONTROL_BODY_LIMIT = 64 * 1024
"""
The largest response body sent on the control channel.
"""

FLUSH_DELAY = 2.0
"""
Seconds a response may sit in the buffer after its first write before it
goes to a rendezvous anyway, as with .NET: streamed responses keep flowing.
"""

MAX_CONTROL_MESSAGE = 64 * 1024 * 1024
"""
The largest message a listener reads on its control channel by default
(L{HybridListener}'s C{maxMessageSize}): a command, a request body (at most
64 KiB from a relay), or an event or one-way message (as large as the
relay's C{--max-event-size}, 64 KiB unless raised).
"""

DEFAULT_TOKEN_RENEW_INTERVAL = 45 * 60.0
MAX_COMMAND_BYTES = 256 * 1024
MAX_FRAME = 64 * 1024
BODY_HIGH_WATER = 64 * 1024
CONNECT_TIMEOUT = 30.0
RENDEZVOUS_TIMEOUT = 20.0
CLOSE_TIMEOUT = 10.0
STABLE_SECONDS = 30.0
MIN_RENEW_DELAY = 5.0
MIN_RENEW_FLOOR = 1.0
NORMAL_CLOSURE = 1000
MESSAGE_TOO_BIG = 1009

# Framing and connection headers: the WebSocket message is the framing.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)
_STATUS = re.compile(r"upgrade failed \[(\d{3})\]: (.*)$", re.DOTALL)

# Where a response is.
_BUFFERING, _OPENING, _STREAMING, _DONE, _LOST = "buffering", "opening", "streaming", "done", "lost"


class RequestHandler(TypingProtocol):
    """
    What L{HybridListener} hands relayed HTTP requests to.
    """

    def handleRequest(self, request: RelayedHttpRequest) -> None:
        """
        Answer C{request}, now or later, with C{respond}, C{write} and
        C{finish}.  An exception raised here becomes a 500 response.
        """


class RelayRefused(Exception):
    """
    The relay refused a WebSocket handshake.

    @ivar status: the HTTP status, or 0 if the connection closed without one.
    @ivar reason: the reason phrase, or what autobahn said.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}" if status else reason)
        self.status = status
        self.reason = reason


def sasTokenProvider(keyName: str, key: str, clock: IReactorTime, ttl: int = 3600) -> TokenProvider:
    """
    A token provider for L{HybridListener}: each call mints a fresh token
    for the resource it is asked about.  The same as
    L{relaynet.tokens.fromKey}.

    @param ttl: the lifetime of each token, in seconds.
    """
    return fromKey(keyName, key, clock, ttl)


def takeBody(request: RelayedHttpRequest) -> bytes | None:
    """
    The whole body of C{request} now, if it has all come and nobody reads it
    yet (as a body that came on the control channel has); it can then not be
    read again.  L{None} otherwise: use L{readBody}.
    """
    return request._body.takeWhole()


def readBody(request: RelayedHttpRequest) -> Deferred[bytes]:
    """
    Read the whole body of C{request}.

    @return: a L{Deferred} that fires with the body, or fails if the body
        broke off.
    """
    whole = takeBody(request)
    if whole is not None:
        return succeed(whole)
    collector = _BodyCollector()
    request.deliverBody(collector)
    return collector.done


class _BodyCollector(Protocol):
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ConnectionDone):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


def _responseHeaders(headers: Iterable[tuple[str, str]] | Mapping[str, str], bodiless: bool) -> dict[str, str]:
    """
    The C{responseHeaders} object: one string per name, repeated headers
    joined with C{", "} (the protocol has no other way), without framing
    headers; C{Content-Length} only where no body follows (HEAD).
    """
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    joined: dict[str, str] = {}
    spelling: dict[str, str] = {}
    for name, value in pairs:
        name, value = str(name), str(value)
        lower = name.lower()
        if lower in _HOP_BY_HOP or (lower == "content-length" and not bodiless):
            continue
        if lower in spelling:
            joined[spelling[lower]] += ", " + value
        else:
            spelling[lower] = name
            joined[name] = value
    return joined


_COMPLETE = object()
# What a body taken whole (takeWhole) has in place of a protocol.
_TAKEN = Protocol()


@implementer(IPushProducer)
class _RequestBody:
    """
    A request body on its way to the handler's protocol.

    Data that comes before the handler asks for the body, or while it is
    paused, waits here; the rendezvous socket (C{source}) is paused while
    the handler is paused or more than L{BODY_HIGH_WATER} bytes wait.  A
    pause stops reading the socket; what autobahn already read still
    arrives.
    """

    def __init__(self, source: IPushProducer | None = None) -> None:
        self._source = source
        self._protocol: IProtocol | None = None
        self._queue: deque[bytes] = deque()
        self._queued = 0
        # None while the body comes; _COMPLETE once it has all come (its
        # Failure is made only for a protocol that is told), or why it
        # broke off.
        self._end: Failure | object | None = None
        self._endDelivered = False
        self._paused = False
        self._stopped = False
        self._sourcePaused = False
        self._delivering = False

    @property
    def ended(self) -> bool:
        return self._end is not None

    def attach(self, protocol: IProtocol) -> None:
        if self._protocol is not None:
            raise RuntimeError("The body is already being delivered.")
        self._protocol = protocol
        protocol.makeConnection(self)  # type: ignore[arg-type]
        self._flush()

    # From the socket.

    def dataReceived(self, data: bytes) -> None:
        if self._stopped or self._end is not None or not data:
            return
        self._queue.append(data)
        self._queued += len(data)
        self._flush()

    def finished(self, reason: Failure | None = None) -> None:
        """
        The body is complete, or (with a C{reason}) broke off.
        """
        if self._end is None:
            self._end = reason or _COMPLETE
            self._flush()

    def takeWhole(self) -> bytes | None:
        """
        The whole body at once, if it has all come and nobody reads it yet
        (as a body that came on the control channel has); L{None} otherwise.
        It can then not be delivered to a protocol.
        """
        if self._end is not _COMPLETE or self._protocol is not None:
            return None
        self._protocol = _TAKEN
        self._endDelivered = True
        whole = b"".join(self._queue)
        self._queue.clear()
        self._queued = 0
        return whole

    # IPushProducer, for the handler's protocol.

    def pauseProducing(self) -> None:
        self._paused = True
        self._steer()

    def resumeProducing(self) -> None:
        self._paused = False
        self._flush()

    def stopProducing(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._queue.clear()
        self._queued = 0
        self._steer()
        if self._protocol is not None and not self._endDelivered:
            self._endDelivered = True
            self._protocol.connectionLost(Failure(ConnectionAborted("The body was not wanted.")))

    def _flush(self) -> None:
        protocol = self._protocol
        if protocol is not None and not self._delivering:
            self._delivering = True
            try:
                while self._queue and not self._paused and not self._stopped:
                    chunk = self._queue.popleft()
                    self._queued -= len(chunk)
                    protocol.dataReceived(chunk)
                if not self._queue and self._end is not None and not self._endDelivered and not self._stopped:
                    self._endDelivered = True
                    end = self._end
                    if end is _COMPLETE:
                        end = Failure(ConnectionDone("The request body is complete."))
                    protocol.connectionLost(end)  # type: ignore[arg-type]
            except Exception:
                log.failure("the request body's protocol failed; the rest of the body is dropped")
                self._stopped, self._endDelivered = True, True
                self._queue.clear()
                self._queued = 0
            finally:
                self._delivering = False
        self._steer()

    def _steer(self) -> None:
        if self._source is None:
            return
        slow = self._queued > BODY_HIGH_WATER or (self._protocol is not None and self._paused)
        wanted = slow and self._end is None and not self._stopped
        if wanted != self._sourcePaused:
            self._sourcePaused = wanted
            if wanted:
                self._source.pauseProducing()
            else:
                self._source.resumeProducing()


@implementer(IPushProducer)
class _WriterValve:
    """
    Pauses a response's writer for every reason the way out has: a
    rendezvous that is still opening, or a socket whose send buffer is full.
    The rendezvous transport has it as its producer.

    A pull producer is asked for more after each of its writes, as a TCP
    transport would, while nothing holds the valve shut.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.producer: Any = None
        self._streaming = True
        self._reasons: set[str] = set()
        self._pullCall: IDelayedCall | None = None

    @property
    def paused(self) -> bool:
        return bool(self._reasons)

    def register(self, producer: IProducer, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError(f"Cannot register {producer!r}: {self.producer!r} is registered.")
        self.producer, self._streaming = producer, bool(streaming)
        if self._streaming:
            if self.paused:
                cast(IPushProducer, producer).pauseProducing()
        else:
            self._schedulePull()

    def unregister(self) -> None:
        self.producer = None
        self._cancelPull()

    def stop(self) -> None:
        producer = self.producer
        self.unregister()
        if producer is not None:
            producer.stopProducing()

    def wrote(self) -> None:
        if not self._streaming:
            self._schedulePull()

    def shut(self, reason: str) -> None:
        was = self.paused
        self._reasons.add(reason)
        if not was and self.producer is not None and self._streaming:
            self.producer.pauseProducing()

    def open(self, reason: str) -> None:
        if reason not in self._reasons:
            return
        self._reasons.discard(reason)
        if not self.paused and self.producer is not None:
            if self._streaming:
                self.producer.resumeProducing()
            else:
                self._schedulePull()

    def pauseProducing(self) -> None:
        self.shut("transport")

    def resumeProducing(self) -> None:
        self.open("transport")

    def stopProducing(self) -> None:
        # The socket is going: the rendezvous' onClose tells the response.
        pass

    def _schedulePull(self) -> None:
        if self._pullCall is None and self.producer is not None and not self._streaming and not self.paused:
            self._pullCall = self._clock.callLater(0, self._pull)

    def _cancelPull(self) -> None:
        if self._pullCall is not None:
            if self._pullCall.active():
                self._pullCall.cancel()
            self._pullCall = None

    def _pull(self) -> None:
        self._pullCall = None
        if self.producer is not None and not self._streaming and not self.paused:
            self.producer.resumeProducing()


@implementer(IConsumer)
class RelayedHttpRequest:
    """
    One HTTP request relayed to this listener, and its response.

    @ivar id: the request id, echoed as C{requestId} in the response.
    @ivar address: the rendezvous address of the request.
    @ivar method: the HTTP method, as the sender sent it.
    @ivar target: C{requestTarget}: the path (starting with the entity's
        name) and query, with the relay's C{sb-hc-} parameters removed.
    @ivar headers: the request headers as (name, value) pairs.
    @ivar remote: the sender's (address, port), if the relay said.
    @ivar bodyLength: the length of the body when it is known: 0 without a
        body, the length of a body that came on the control channel; L{None}
        for a body streamed over a rendezvous.
    @ivar overRendezvous: whether the request came over a rendezvous socket
        (its response then goes back over that socket).
    @ivar oneWay: whether nobody waits for the response: the request is one
        of a relaynet relay's events or one-way messages (its id starts
        with C{evt_}) and came on the control channel.  It may be left
        unanswered with L{skipResponse}; a response is dropped by the relay.
    """

    def __init__(
        self,
        listener: HybridListener,
        requestId: str,
        address: str,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        remote: tuple[str, int] | None,
        body: _RequestBody,
        bodyLength: int | None,
        rendezvous: _Rendezvous | None = None,
    ) -> None:
        self.id = requestId
        self.address = address
        self.method = method
        self.target = target
        self.headers = headers
        self.remote = remote
        self.bodyLength = bodyLength
        self.overRendezvous = rendezvous is not None
        # A relaynet relay's own request ids are hex, and Azure's are not
        # known to start with evt_ either: the prefix marks events only.
        self.oneWay = rendezvous is None and requestId.startswith(EVENT_ID_PREFIX)
        self._listener = listener
        self._clock: IReactorTime = listener.reactor
        self._body = body
        self._rendezvous = rendezvous
        self._status: int | None = None
        self._reason = ""
        self._responseHeaders: dict[str, str] = {}
        self._bodiless = False
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._state = _BUFFERING
        self._finished = False
        self._flushCall: IDelayedCall | None = None
        self._valve = _WriterValve(self._clock)
        self._valveOn: Any = None
        self._notifications: list[Deferred[None]] = []
        self._lostReason: Failure | None = None

    def __repr__(self) -> str:
        return f"<RelayedHttpRequest {self.id} {self.method} {self.target}>"

    def getHeader(self, name: str) -> str | None:
        """
        The last value of the request header C{name} (any case), or L{None}.
        """
        lower = name.lower()
        values = [value for key, value in self.headers if key.lower() == lower]
        return values[-1] if values else None

    # The request body.

    def deliverBody(self, protocol: IProtocol) -> None:
        """
        Deliver the request body to C{protocol}, as L{IResponse.deliverBody
        <twisted.web.iweb.IResponse.deliverBody>} does: C{makeConnection}
        with an L{IPushProducer} that pauses the body, C{dataReceived} for
        each part, then C{connectionLost} with L{ConnectionDone} when the
        body is complete or another failure if it broke off.  A body that
        came on the control channel arrives in one part; a request without a
        body ends at once.
        """
        self._body.attach(protocol)

    # The response.

    def respond(
        self, status: int, reason: str | None = None, headers: Iterable[tuple[str, str]] | Mapping[str, str] = ()
    ) -> None:
        """
        Start the response.

        @param status: the status code, 100 to 999.
        @param reason: the reason phrase; the standard one if L{None}.
        @param headers: (name, value) pairs or a mapping; repeated names are
            joined with C{", "}, framing headers are dropped.
        """
        if self._status is not None:
            raise RuntimeError("respond() was already called.")
        if self._finished:
            raise RuntimeError("skipResponse() was called.")
        if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 999:
            raise ValueError(f"{status!r} is not a status code between 100 and 999.")
        self._status = status
        self._reason = reason if reason is not None else RESPONSES.get(status, b"").decode("latin-1")
        self._bodiless = self.method.upper() == "HEAD" or status in (204, 304) or status < 200
        self._responseHeaders = _responseHeaders(headers, self._bodiless)

    def write(self, data: bytes) -> None:
        """
        Send part of the response body.  Ignored for HEAD, 1xx, 204 and 304
        responses and once the request is lost.
        """
        if self._status is None:
            raise RuntimeError("respond() must come before write().")
        if self._finished:
            raise RuntimeError("write() after finish().")
        if self._state == _LOST or self._bodiless or not data:
            return
        if self._state == _STREAMING:
            self._sendFrames(bytes(data))
        else:
            self._buffer.append(bytes(data))
            self._buffered += len(data)
            if self._state == _BUFFERING:
                if self._buffered > CONTROL_BODY_LIMIT:
                    self._toRendezvous()
                elif self._flushCall is None:
                    self._flushCall = self._clock.callLater(FLUSH_DELAY, self._flushTimedOut)
        self._valve.wrote()

    def finish(self) -> None:
        """
        End the response.
        """
        if self._status is None:
            raise RuntimeError("respond() must come before finish().")
        if self._finished:
            raise RuntimeError("finish() was already called.")
        self._finished = True
        self._cancelFlush()
        if self._state == _BUFFERING:
            self._sendWhole()
        elif self._state == _STREAMING:
            self._endStream()

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        """
        Let the response pause C{producer} while its way out is busy.
        """
        self._valve.register(producer, streaming)

    def unregisterProducer(self) -> None:
        self._valve.unregister()

    def notifyFinish(self) -> Deferred[None]:
        """
        @return: a L{Deferred} that fires when the whole response has been
            handed to the network, or fails if it cannot be.
        """
        if self._state == _DONE:
            return succeed(None)
        if self._state == _LOST:
            assert self._lostReason is not None
            return fail(self._lostReason)
        d: Deferred[None] = Deferred()
        self._notifications.append(d)
        return d

    def skipResponse(self) -> None:
        """
        Send no response to a L{oneWay} request: the relay wants none, and
        the answer would cost both sides a message for nothing.

        @raise RuntimeError: if the request is not one-way, or a response
            was started.
        """
        if not self.oneWay:
            raise RuntimeError("Only a one-way request may go unanswered.")
        if self._status is not None:
            raise RuntimeError("respond() was already called.")
        if self._finished:
            raise RuntimeError("skipResponse() was already called.")
        self._finished = True
        self._done()

    def abort(self) -> None:
        """
        Give up on the response: a response being streamed breaks off, one
        not yet sent is never sent, and a rendezvous the request came on is
        dropped.
        """
        if self._state in (_DONE, _LOST):
            return
        rendezvous = self._rendezvous
        self._lose(Failure(ConnectionAborted("The listener aborted the response.")))
        if rendezvous is not None:
            rendezvous.dropConnection(abort=True)

    # Inside.

    def _command(self, hasBody: bool) -> dict[str, Any]:
        return {
            "response": {
                "requestId": self.id,
                "statusCode": self._status,
                "statusDescription": self._reason,
                "responseHeaders": self._responseHeaders,
                "body": hasBody,
            }
        }

    def _sendWhole(self) -> None:
        """
        The response is finished while buffered: send it whole, with its body
        as one binary message.
        """
        body = b"".join(self._buffer) if self._buffered else None
        self._buffer, self._buffered = [], 0
        command = self._command(body is not None)
        rendezvous = self._rendezvous
        if rendezvous is None:
            if not self._listener._sendControl(command, body):
                self._lose(Failure(ConnectionLost("The control channel is closed.")))
                return
        else:
            rendezvous.sendMessage(encodeCommand(command), isBinary=False)
            if body is not None:
                rendezvous.sendMessage(body, isBinary=True)
        self._done()

    def _flushTimedOut(self) -> None:
        self._flushCall = None
        if self._state == _BUFFERING and not self._finished:
            self._toRendezvous()

    def _cancelFlush(self) -> None:
        if self._flushCall is not None:
            if self._flushCall.active():
                self._flushCall.cancel()
            self._flushCall = None

    def _toRendezvous(self) -> None:
        self._cancelFlush()
        self._state = _OPENING
        self._valve.shut("opening")
        if self._rendezvous is not None:
            self._rendezvousOpened(self._rendezvous)
        else:
            proto = _Rendezvous(self._listener, response=self)
            self._listener._openRendezvous(self.address, proto).addErrback(self._lose)

    def _rendezvousOpened(self, proto: _Rendezvous) -> None:
        if self._state != _OPENING:
            proto.sendClose(NORMAL_CLOSURE)
            return
        self._rendezvous = proto
        self._listener._forget(self)
        proto.sendMessage(encodeCommand(self._command(True)), isBinary=False)
        proto.beginMessage(isBinary=True)
        self._state = _STREAMING
        buffered, self._buffer, self._buffered = self._buffer, [], 0
        for chunk in buffered:
            self._sendFrames(chunk)
        if proto.transport is not None:
            self._valveOn = cast(Any, proto.transport)
            self._valveOn.registerProducer(self._valve, True)
        self._valve.open("opening")
        if self._finished and self._state == _STREAMING:
            self._endStream()

    def _sendFrames(self, data: bytes) -> None:
        proto = self._rendezvous
        assert proto is not None
        for start in range(0, len(data), MAX_FRAME):
            proto.sendMessageFrame(data[start : start + MAX_FRAME])

    def _endStream(self) -> None:
        proto = self._rendezvous
        assert proto is not None
        proto.endMessage()
        self._done()

    def _done(self) -> None:
        self._state = _DONE
        self._listener._forget(self)
        self._valve.unregister()
        if self._valveOn is not None:
            self._valveOn.unregisterProducer()
            self._valveOn = None
        proto = self._rendezvous
        if proto is not None and proto.state == proto.STATE_OPEN:
            proto.sendClose(NORMAL_CLOSURE)
        notifications, self._notifications = self._notifications, []
        for d in notifications:
            d.callback(None)

    def _lose(self, reason: Failure) -> None:
        """
        The response cannot be sent, or not all of it.
        """
        if self._state in (_DONE, _LOST):
            return
        log.info("response to {id} lost: {reason}", id=self.id, reason=reason.getErrorMessage())
        self._state = _LOST
        self._lostReason = reason
        self._buffer, self._buffered = [], 0
        self._cancelFlush()
        self._listener._forget(self)
        self._valve.stop()
        self._body.finished(reason)
        notifications, self._notifications = self._notifications, []
        for d in notifications:
            d.errback(reason)

    def _rendezvousLost(self, reason: Failure) -> None:
        self._body.finished(reason)
        if self._state != _DONE:
            self._lose(reason)

    def _handlerFailed(self) -> None:
        """
        The handler raised: answer 500 if nothing has been sent yet, else
        break the response off.
        """
        if self._finished:
            return
        if self._state != _BUFFERING:
            self.abort()
            return
        self._cancelFlush()
        self._buffer, self._buffered, self._status = [], 0, None
        self.respond(500, "The listener's request handler raised an exception.")
        self.finish()


class _Client(CloseWaiters, DirectIO, WebSocketClientProtocol):  # type: ignore[misc]
    """
    What the control channel and rendezvous sockets share: L{Deferred}s for
    the handshake and the end, a refused handshake's status, and a drop timer
    on the injected clock (autobahn's would use the global reactor).
    """

    def __init__(self, listener: HybridListener) -> None:
        super().__init__()
        self.listener = listener
        self.opened: Deferred[None] = Deferred()
        self._closedWaiters: list[Deferred[None]] = []
        self.wasOpen = False
        self.isClosed = False
        self._refusal: str | None = None
        self._dropCall: IDelayedCall | None = None

    def failHandshake(self, reason: str) -> None:
        self._refusal = reason
        super().failHandshake(reason)

    def onOpen(self) -> None:
        self.wasOpen = True
        self.opened.callback(None)

    def onCloseFrame(self, code: int, reasonRaw: bytes) -> Any:
        closing = self.state == self.STATE_CLOSING
        result = super().onCloseFrame(code, reasonRaw)
        if closing and self._dropCall is None and self.transport is not None:
            # The relay answered our close; it should drop the TCP now.
            self._dropCall = self.listener.reactor.callLater(CLOSE_TIMEOUT, self.dropConnection, True)
        return result

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(self._refused(reason))
        self._fireClosed()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        cancelTimers(self, "_dropCall")
        super().connectionLost(reason)

    def _refused(self, reason: str | None) -> RelayRefused:
        text = self._refusal or reason or "The connection closed during the WebSocket handshake."
        match = _STATUS.search(text)
        if match:
            return RelayRefused(int(match.group(1)), match.group(2).strip())
        return RelayRefused(0, text)


class _ControlChannel(_Client):
    """
    The listener's control channel: one JSON command per text message.
    Once open, its messages are read by a L{MessageReader} rather than
    autobahn's parser.
    """

    def onOpen(self) -> None:
        self.reader = MessageReader(self, masked=False)
        super().onOpen()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.listener._controlMessage(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        super().onClose(wasClean, code, reason)
        self.listener._controlClosed(self, code, reason)


class _Rendezvous(_Client):
    """
    A rendezvous socket: opened to read an address-only request (and send
    its response back), or to stream one large response.

    The request body is handed on frame by frame, so these sockets take
    messages of any size; only the request text is limited.
    """

    def __init__(
        self, listener: HybridListener, response: RelayedHttpRequest | None = None, requestId: str | None = None
    ) -> None:
        super().__init__(listener)
        self.request = response
        self._forResponse = response is not None
        self._fallbackId = requestId
        self._reading = "nothing" if self._forResponse else "request"
        self._text: list[bytes] | None = None
        self._textSize = 0

    def onOpen(self) -> None:
        super().onOpen()
        if self._forResponse:
            assert self.request is not None
            self.request._rendezvousOpened(self)

    def onMessageBegin(self, isBinary: bool) -> None:
        self._text = [] if self._reading == "request" else None
        self._textSize = 0

    def onMessageFrameBegin(self, length: int) -> None:
        pass

    def onMessageFrameData(self, payload: bytes) -> None:
        if self._text is not None:
            self._textSize += len(payload)
            if self._textSize > MAX_COMMAND_BYTES:
                self._text = None
                self._reading = "nothing"
                self.sendCloseFrame(code=MESSAGE_TOO_BIG, reasonUtf8=b"The request message is too large.")
                return
            self._text.append(payload)
        elif self._reading == "body" and self.request is not None:
            self.request._body.dataReceived(payload)

    def onMessageFrameEnd(self) -> None:
        pass

    def onMessageEnd(self) -> None:
        if self._text is not None:
            text, self._text = b"".join(self._text), None
            self._requestReceived(text)
        elif self._reading == "body" and self.request is not None:
            self._reading = "nothing"
            self.request._body.finished()

    def _requestReceived(self, text: bytes) -> None:
        self._reading = "nothing"
        try:
            message = json.loads(text)
            command = message.get("request", message)
            if not isinstance(command, dict):
                raise TypeError(command)
        except (ValueError, TypeError, AttributeError):
            log.warn("a rendezvous sent something other than a request")
            self.sendClose(NORMAL_CLOSURE)
            return
        hasBody = bool(command.get("body"))
        assert self.transport is not None
        body = _RequestBody(cast(IPushProducer, self.transport) if hasBody else None)
        request = self.listener._makeRequest(command, body, None if hasBody else 0, self, self._fallbackId)
        if request is None:
            self.sendClose(NORMAL_CLOSURE)
            return
        self.request = request
        if hasBody:
            self._reading = "body"
        else:
            body.finished()
        self.listener._handle(request)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        super().onClose(wasClean, code, reason)
        self.listener._rendezvousClosed(self)
        if self.request is not None and self.wasOpen:
            self.request._rendezvousLost(
                Failure(ConnectionLost(f"The rendezvous closed: {code} {reason or ''}".strip()))
            )

class _RejectSocket(_Client):
    """
    The socket that rejects a sender: the relay answers it with 410 Gone.
    """

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        super().onClose(wasClean, code, reason)
        self.listener._rendezvousClosed(self)


class _AcceptedStream(CloseWaiters, StreamWebSocket):  # type: ignore[misc]
    """
    An accepted sender's stream, which the listener keeps until it closes.
    """

    def __init__(self, listener: HybridListener, host: RelayAddress, peer: RelayAddress) -> None:
        assert listener._streamFactory is not None
        super().__init__(listener._streamFactory, host, peer, listener.reactor)
        self.listener = listener
        self.isClosed = False
        self._closedWaiters: list[Deferred[None]] = []

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        try:
            super().onClose(wasClean, code, reason)
        finally:
            self.listener._streams.discard(self)
            self._fireClosed()


class AcceptRequest:
    """
    A sender asking to connect: what an C{acceptHandler} decides on.

    @ivar id: the connection id.
    @ivar address: the rendezvous address the listener accepts or rejects at.
    @ivar headers: the sender's upgrade request headers (C{connectHeaders}).
    @ivar remote: the sender's (address, port), if the relay said.
    @ivar target: the path and query the sender connected to, without
        C{/$hc} and the C{sb-hc-} parameters: C{/hyco/room1?tenant=7}.
    @ivar subprotocols: the WebSocket subprotocols the sender offered, in
        its order; the first one is requested when accepting.
    """

    def __init__(
        self,
        id: str,
        address: str,
        headers: dict[str, str],
        remote: tuple[str, int] | None,
        target: str,
        subprotocols: list[str],
    ) -> None:
        self.id = id
        self.address = address
        self.headers = headers
        self.remote = remote
        self.target = target
        self.subprotocols = subprotocols

    def __repr__(self) -> str:
        return f"<AcceptRequest {self.id} {self.target} from {self.remote}>"

    def getHeader(self, name: str) -> str | None:
        """
        The header C{name} (any case), or L{None}.
        """
        lower = name.lower()
        for key, value in self.headers.items():
            if key.lower() == lower:
                return value
        return None

    @classmethod
    def fromCommand(cls, command: Mapping[str, Any]) -> AcceptRequest | None:
        """
        The request an C{accept} command describes, or L{None} if it has no
        usable address.
        """
        address = command.get("address")
        if not isinstance(address, str) or "://" not in address:
            return None
        raw = command.get("connectHeaders")
        headers = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
        parts = urlsplit(address)
        path = parts.path
        if path.startswith("/$hc/") or path == "/$hc":
            path = path[len("/$hc") :] or "/"
        query = stripRelayParameters(parts.query)
        request = cls(
            str(command.get("id", "")),
            address,
            headers,
            _remote(command.get("remoteEndpoint")),
            path + ("?" + query if query else ""),
            [],
        )
        offered = request.getHeader("Sec-WebSocket-Protocol") or ""
        request.subprotocols = [p.strip() for p in offered.split(",") if p.strip()]
        return request


AcceptDecision = Union[bool, "tuple[int, str]", None]
AcceptHandler = Callable[[AcceptRequest], Union[AcceptDecision, "Deferred[AcceptDecision]", Awaitable[AcceptDecision]]]
RetryPolicy = Callable[[int], float]


def _remote(endpoint: Any) -> tuple[str, int] | None:
    if isinstance(endpoint, dict) and isinstance(endpoint.get("address"), str):
        try:
            return (endpoint["address"], int(endpoint.get("port") or 0))
        except (TypeError, ValueError):
            return (endpoint["address"], 0)
    return None


def defaultRetryPolicy(jitter: Callable[[], float] = random.random) -> RetryPolicy:
    """
    The delay before reconnect attempt C{n} (counted from 0 since the last
    success): at once, then 1, 2, 4, 8, 16 and then 30 seconds, each plus up
    to a second of C{jitter}.
    """
    backoff = backoffPolicy(initialDelay=1.0, maxDelay=30.0, factor=2.0, jitter=jitter)
    return lambda attempt: 0.0 if attempt == 0 else backoff(attempt - 1)


class _NoHandler:
    """
    Answers every HTTP request with 501, for a listener without a handler.
    """

    def handleRequest(self, request: RelayedHttpRequest) -> None:
        request.respond(501, "This listener takes no HTTP requests.")
        request.finish()


class HybridListener:
    """
    A Hybrid Connections listener: relayed HTTP requests for a C{handler},
    relayed WebSocket streams for a C{streamFactory}'s protocols.

    Once online it stays online: when the control channel drops (a relay
    restart, the network, an expired token) it reconnects with a fresh
    token, backing off between failed attempts, until L{close} is called or
    the relay says the entity does not exist (404).

    @ivar listenerId: the C{sb-hc-id} of the control channel, the same on
        every reconnect.
    @ivar controlUrl: where the control channel connects.
    @ivar baseUrl: the relay, without a trailing C{/}.
    @ivar entity: the hybrid connection's name, without outer C{/}.
    @ivar resourceUri: what the tokens are for.
    @ivar status: C{"offline"} (before L{listen}, after L{close}, or given
        up), C{"connecting"} (the first attempt), C{"online"}, or
        C{"reconnecting"}.
    """

    def __init__(
        self,
        reactor: Any,
        baseUrl: str,
        entity: str,
        tokenProvider: TokenProvider,
        handler: RequestHandler | None = None,
        streamFactory: IProtocolFactory | None = None,
        acceptHandler: AcceptHandler | None = None,
        onStatus: Callable[[str], None] | None = None,
        reconnect: bool = True,
        trustRoot: Any = None,
        listenerId: str | None = None,
        pingInterval: float = 30.0,
        pingTimeout: float | None = None,
        tokenRenewInterval: float = DEFAULT_TOKEN_RENEW_INTERVAL,
        retryPolicy: RetryPolicy | None = None,
        native: bool = False,
        maxMessageSize: int = MAX_CONTROL_MESSAGE,
    ) -> None:
        """
        @param reactor: provides C{IReactorTCP}, C{IReactorTime} and
            C{IReactorPluggableNameResolver}.
        @param baseUrl: the relay, C{ws://host:port} or C{wss://host[:port]},
            such as C{ws://127.0.0.1:9090} or C{wss://ns.servicebus.windows.net}.
        @param entity: the hybrid connection's name; it may contain C{/}.
        @param tokenProvider: a L{relaynet.tokens.TokenProvider}, called with
            L{resourceUri} for each connection attempt and each renewal; its
            tokens need the Listen right.  See L{relaynet.tokens.fromKey}.
        @param handler: gets each relayed HTTP request; without one they are
            answered with 501.
        @param streamFactory: builds a protocol for each accepted sender;
            without one every sender is rejected with 404.
        @param acceptHandler: decides on each sender (an L{AcceptRequest}):
            C{True} accepts, C{False} rejects with 400, C{(status, reason)}
            rejects with those, or a L{Deferred} or coroutine of one of these.
            If it raises, the sender is rejected with 502.  Without one,
            every sender is accepted.
        @param onStatus: called with the new L{status} on every change.
        @param reconnect: whether to reconnect when the control channel
            drops; without, the listener goes C{"offline"}.
        @param trustRoot: for C{wss}, the certificate authority to trust
            (as for L{optionsForClientTLS
            <twisted.internet.ssl.optionsForClientTLS>}); the platform's by
            default.
        @param listenerId: the listener's C{sb-hc-id}; a new UUID by default.
        @param pingInterval: seconds between WebSocket pings on the control
            channel; 0 for none.
        @param pingTimeout: seconds to wait for the answer to a ping before
            the control channel is dropped (and reconnected);
            C{pingInterval} by default.
        @param tokenRenewInterval: the longest time between token renewals;
            a token that expires sooner is renewed at 90% of its lifetime.
        @param retryPolicy: the delay before reconnect attempt C{n}
            (0-based since the last success); L{defaultRetryPolicy} by
            default.
        @param native: accept senders' streams as native streams
            (L{relaynet.native}: raw bytes, no WebSocket framing), a
            relaynet extension that Azure Relay refuses.  Senders may be
            native or not either way.
        @param maxMessageSize: the largest message taken on the control
            channel, in bytes (L{MAX_CONTROL_MESSAGE}, 64 MiB, by default;
            0 for no limit).  A larger one closes the channel with 1009 and
            is lost, and the listener connects again; raise it above the
            relay's C{--max-event-size} to receive larger events.
        """
        self.reactor = reactor
        self.baseUrl = baseUrl.rstrip("/")
        self.entity = entity.strip("/")
        self.listenerId = listenerId or str(uuid.uuid4())
        self.controlUrl = (
            f"{self.baseUrl}/$hc/{quote(self.entity, safe='/')}"
            f"?sb-hc-action=listen&sb-hc-id={quote(self.listenerId, safe='')}"
        )
        self.resourceUri = resourceUri(self.baseUrl, self.entity)
        self.status = "offline"
        self._tokenProvider = tokenProvider
        self._handler: RequestHandler = handler if handler is not None else _NoHandler()
        self._streamFactory = streamFactory
        self._acceptHandler = acceptHandler
        self._onStatus = onStatus
        self._reconnect = reconnect
        self._trustRoot = trustRoot
        self._pingInterval = pingInterval
        self._pingTimeout = pingInterval if pingTimeout is None else pingTimeout
        self._renewInterval = tokenRenewInterval
        self._retryPolicy = retryPolicy or defaultRetryPolicy()
        self._control: _ControlChannel | None = None
        self._pendingBody: dict[str, Any] | None = None
        self._renewCall: IDelayedCall | None = None
        self._renewing: Deferred[None] | None = None
        self._retryCall: IDelayedCall | None = None
        self._attempt: Deferred[str] | None = None
        self._failures = 0
        self._onlineSince = 0.0
        self._lastToken: str | None = None
        self._first: Deferred[None] | None = None
        self._rendezvous: set[_Client] = set()
        self._native = native
        self._maxMessageSize = maxMessageSize
        self._streams: set[_AcceptedStream | NativeStream] = set()
        self._connecting: set[Deferred[Any]] = set()
        self._inFlight: set[RelayedHttpRequest] = set()
        self._started = False
        self._wasOnline = False
        self._closing = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.baseUrl} {self.entity} {self.status}>"

    @property
    def listening(self) -> bool:
        """
        Whether the control channel is open.
        """
        control = self._control
        return control is not None and control.state == control.STATE_OPEN

    def listen(self) -> Deferred[None]:
        """
        Open the control channel, and keep it open.

        @return: a L{Deferred} that fires once the relay has registered this
            listener, or fails with L{RelayRefused} (the relay said no, with a
            status) or a connection error if that first attempt fails; then
            the listener is C{"offline"} and does not retry.  After a first
            success it reconnects by itself.  Cancelling it closes the
            listener.
        """
        if self._started or self._closing:
            raise RuntimeError("This listener has already been started or closed.")
        self._started = True
        self._first = Deferred(lambda d: self._cancelListen())
        self._setStatus("connecting")
        self._tryConnecting()
        return self._first

    def _cancelListen(self) -> None:
        # Cancelling listen() closes the listener; close() fails listen()
        # with CancelledError.
        self.close().addErrback(lambda f: log.failure("closing a cancelled listener failed", f))

    def close(self) -> Deferred[None]:
        """
        Stop: no more reconnecting; close the control channel (1000), the
        rendezvous sockets and the accepted streams.

        @return: a L{Deferred} that fires when they are all closed.
        """
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        self._closing = True
        self._cancelRenewal()
        self._cancelRetry()
        control = self._control
        if self._attempt is not None:
            self._attempt.cancel()
        for connecting in list(self._connecting):
            connecting.cancel()
        waiting = []
        for proto in [control, *self._rendezvous]:
            if proto is None or proto.isClosed or proto.transport is None:
                continue
            waiting.append(proto.whenClosed())
            if proto.state == proto.STATE_OPEN:
                proto.sendClose(NORMAL_CLOSURE)
            elif proto.state == proto.STATE_CONNECTING:
                proto.dropConnection(abort=True)
        for stream in list(self._streams):
            if stream.transport is None:
                continue
            waiting.append(stream.whenClosed())
            stream.closeStream()
        if self._first is not None and not self._first.called:
            self._first.errback(CancelledError("The listener was closed before it was online."))
        self._setStatus("offline")
        await DeferredList(waiting)

    # Status.

    def _setStatus(self, status: str) -> None:
        if status == self.status:
            return
        self.status = status
        log.info("listener {entity} ({id}) is {status}", entity=self.entity, id=self.listenerId, status=status)
        if self._onStatus is not None:
            try:
                self._onStatus(status)
            except Exception:
                log.failure("the listener's onStatus callback failed")

    # Connecting and reconnecting.

    def _tryConnecting(self) -> None:
        self._retryCall = None
        attempt = Deferred.fromCoroutine(self._connectControl())
        self._attempt = attempt
        attempt.addCallbacks(self._connected, self._attemptFailed)

    async def _connectControl(self) -> str:
        token = await getToken(self._tokenProvider, self.resourceUri)
        proto = _ControlChannel(self)
        factory = self._factory(self.controlUrl, proto, {"ServiceBusAuthorization": token}, CONNECT_TIMEOUT)
        factory.setProtocolOptions(
            autoPingInterval=self._pingInterval or 0,
            autoPingTimeout=self._pingTimeout or 0,
            maxMessagePayloadSize=self._maxMessageSize,
        )
        self._control = proto
        try:
            await self._connect(self.controlUrl, factory)
            await proto.opened
        except BaseException:
            if self._control is proto:
                self._control = None
            if proto.transport is not None and not proto.isClosed:
                proto.dropConnection(abort=True)
            raise
        return token

    def _connected(self, token: str) -> None:
        self._attempt = None
        self._onlineSince = self.reactor.seconds()
        self._lastToken = token
        self._wasOnline = True
        log.info("listening on {entity} as {id}", entity=self.entity, id=self.listenerId)
        self._setStatus("online")
        self._scheduleRenewal(token)
        if self._first is not None and not self._first.called:
            self._first.callback(None)

    def _attemptFailed(self, failure: Failure) -> None:
        self._attempt = None
        if self._closing:
            return
        if not self._wasOnline:
            self._setStatus("offline")
            if self._first is not None and not self._first.called:
                self._first.errback(failure)
            return
        refused = failure.value if isinstance(failure.value, RelayRefused) else None
        if refused is not None and refused.status == 404:
            log.error(
                "the relay has no entity {entity}; the listener stops: {reason}",
                entity=self.entity,
                reason=refused.reason,
            )
            self._setStatus("offline")
            return
        delay = self._retryPolicy(self._failures)
        self._failures += 1
        log.warn(
            "listener {entity} could not reconnect ({reason}); next attempt in {delay:.1f} s",
            entity=self.entity,
            reason=failure.getErrorMessage(),
            delay=delay,
        )
        self._scheduleRetry(delay)

    def _scheduleRetry(self, delay: float) -> None:
        self._cancelRetry()
        self._retryCall = self.reactor.callLater(max(0.0, delay), self._tryConnecting)

    def _cancelRetry(self) -> None:
        if self._retryCall is not None:
            if self._retryCall.active():
                self._retryCall.cancel()
            self._retryCall = None

    def _controlClosed(self, proto: _ControlChannel, code: int | None, reason: str | None) -> None:
        if self._control is not proto:
            return
        self._control = None
        self._pendingBody = None
        self._cancelRenewal()
        lost = Failure(ConnectionLost("The control channel closed."))
        for request in list(self._inFlight):
            request._lose(lost)
        if not proto.wasOpen or self._closing:
            return
        log.warn("the relay closed the control channel: {code} {reason}", code=code, reason=reason)
        if self._reconnect:
            self._setStatus("reconnecting")
            if self.reactor.seconds() - self._onlineSince >= STABLE_SECONDS:
                # It had been up a while: a fresh drop, retried at once.
                self._failures = 0
            # A channel the relay keeps closing right after opening backs off
            # like a refused one, instead of reconnecting in a tight loop.
            self._scheduleRetry(self._retryPolicy(self._failures))
            self._failures += 1
        else:
            self._setStatus("offline")

    # Connections.

    def _factory(
        self, url: str, proto: _Client, headers: dict[str, str] | None, handshakeTimeout: float
    ) -> WebSocketClientFactory:
        factory = WebSocketClientFactory(url, headers=headers or {})
        factory.noisy = False  # one factory per connection: no start/stop lines
        factory._batched_timer = ClockTimer(self.reactor)
        factory.protocol = lambda: proto  # type: ignore[assignment]
        factory.setProtocolOptions(
            perMessageCompressionOffers=[],
            openHandshakeTimeout=handshakeTimeout,
            closeHandshakeTimeout=CLOSE_TIMEOUT,
            # The drop after a close handshake runs on the injected clock.
            serverConnectionDropTimeout=0,
            failByDrop=False,
        )
        return factory

    def _endpoint(self, url: str) -> IStreamClientEndpoint:
        return relayEndpoint(self.reactor, url, self._trustRoot, CONNECT_TIMEOUT)

    async def _connect(self, url: str, factory: IProtocolFactory) -> None:
        connecting = self._endpoint(url).connect(factory)
        self._connecting.add(connecting)
        try:
            await connecting
        finally:
            self._connecting.discard(connecting)

    def _openRendezvous(self, address: str, proto: _Rendezvous) -> Deferred[None]:
        """
        Open a WebSocket to a request's C{address}; it needs no token.
        """
        return Deferred.fromCoroutine(self._rendezvousTo(address, proto))

    async def _rendezvousTo(self, address: str, proto: _Client) -> None:
        if self._closing:
            raise ConnectionAborted("The listener is closing.")
        factory = self._factory(address, proto, None, RENDEZVOUS_TIMEOUT)
        self._rendezvous.add(proto)
        try:
            await self._connect(address, factory)
        except BaseException:
            self._rendezvous.discard(proto)
            raise
        await proto.opened

    def _rendezvousFailed(self, failure: Failure) -> None:
        if not failure.check(CancelledError):
            log.failure("could not open the rendezvous of a request", failure)

    def _rendezvousClosed(self, proto: _Client) -> None:
        self._rendezvous.discard(proto)

    # Accepting and rejecting senders.

    def _acceptCommand(self, command: Any) -> None:
        request = AcceptRequest.fromCommand(command) if isinstance(command, dict) else None
        if request is None:
            log.warn("ignored an accept command without a usable address")
            return
        Deferred.fromCoroutine(self._accept(request)).addErrback(self._acceptFailed, request)

    def _acceptFailed(self, failure: Failure, request: AcceptRequest) -> None:
        if failure.check(CancelledError):
            return
        if failure.check(RelayRefused, RelayConnectError, ConnectionAborted):
            log.info("could not answer sender {id}: {reason}", id=request.id, reason=failure.getErrorMessage())
        else:
            log.failure("could not answer sender {id}", failure, id=request.id)

    async def _decide(self, request: AcceptRequest) -> tuple[int, str] | None:
        """
        The accept handler's decision: L{None} to accept, or the status and
        reason to reject with.
        """
        if self._streamFactory is None:
            return (404, "This listener takes no streams")
        if self._acceptHandler is None:
            return None
        try:
            decision: Any = await maybeDeferred(self._acceptHandler, request)
        except Exception:
            log.failure("the accept handler failed on {id}", id=request.id)
            return (502, "The listener's accept handler failed.")
        if decision is True:
            return None
        if decision is False or decision is None:
            return (400, "Rejected by user code")
        if (
            isinstance(decision, tuple)
            and len(decision) == 2
            and isinstance(decision[0], int)
            and not isinstance(decision[0], bool)
            and 100 <= decision[0] <= 999
        ):
            return (decision[0], str(decision[1]))
        log.error("the accept handler returned {decision!r}, not a bool or (status, reason)", decision=decision)
        return (502, "The listener's accept handler failed.")

    async def _accept(self, request: AcceptRequest) -> None:
        rejection = await self._decide(request)
        if self._closing:
            return
        if rejection is None:
            await self._acceptStream(request)
        else:
            await self._reject(request, *rejection)

    async def _acceptStream(self, request: AcceptRequest) -> None:
        host = RelayAddress(self.baseUrl, self.entity)
        peer = RelayAddress(self.baseUrl, self.entity, request.remote)
        stream: _AcceptedStream | NativeStream
        factory: IProtocolFactory
        if self._native:
            assert self._streamFactory is not None
            native = stream = NativeStream(
                self._streamFactory, nativeRequest(request.address, {}), host, peer, self.reactor, RENDEZVOUS_TIMEOUT
            )
            native.whenClosed().addCallback(lambda _: self._streams.discard(native))
            factory = oneShotFactory(native)
        else:
            stream = _AcceptedStream(self, host, peer)
            protocols = request.subprotocols[:1]
            factory = makeStreamFactory(request.address, stream, self.reactor, None, protocols, RENDEZVOUS_TIMEOUT)
        self._streams.add(stream)
        try:
            await self._connect(request.address, factory)
        except BaseException:
            self._streams.discard(stream)
            raise
        await stream.opened
        log.debug("accepted sender {id}{how}", id=request.id, how=" natively" if self._native else "")

    async def _reject(self, request: AcceptRequest, status: int, reason: str) -> None:
        joiner = "&" if "?" in request.address else "?"
        url = (
            f"{request.address}{joiner}sb-hc-statusCode={status}"
            f"&sb-hc-statusDescription={quote(reason, safe='')}"
        )
        proto = _RejectSocket(self)
        try:
            await self._rendezvousTo(url, proto)
        except RelayRefused as e:
            if e.status == 410:
                log.debug("rejected sender {id} with {status}", id=request.id, status=status)
                return
            raise
        # The relay should have said 410; whatever it is, it is done with.
        proto.sendClose(NORMAL_CLOSURE)

    # The control channel.

    def _sendControl(self, command: dict[str, Any], body: bytes | None = None) -> bool:
        """
        Send a command, and its body as the next message.  All control
        channel writes go through here, each whole within one call, so a
        body always follows its JSON with nothing in between.

        @return: whether the control channel was open to send it.
        """
        proto = self._control
        if proto is None or proto.state != proto.STATE_OPEN:
            return False
        # Framed here and written at once: one system call, and nothing of
        # autobahn's can land between a command and its body.
        frames = clientFrame(0x81, encodeCommand(command))
        if body is not None:
            frames += clientFrame(0x82, body)
        writeNow(proto.transport, frames)
        return True

    def _controlMessage(self, payload: bytes, isBinary: bool) -> None:
        pending = self._pendingBody
        if pending is not None:
            # The body follows its request at once, whatever its type.
            self._pendingBody = None
            self._requestCommand(pending, payload)
            return
        if isBinary:
            if payload:
                log.warn("ignored a binary message of {size} bytes on the control channel", size=len(payload))
            return
        try:
            message = json.loads(payload)
        except ValueError:
            log.warn("ignored a control message that is not JSON")
            return
        if not isinstance(message, dict):
            log.warn("ignored a control message that is not a JSON object")
            return
        request = message.get("request")
        if isinstance(request, dict):
            if "method" in request and request.get("body"):
                self._pendingBody = request
            else:
                self._requestCommand(request, None)
        elif "accept" in message:
            self._acceptCommand(message["accept"])
        else:
            log.debug("ignored a control command: {names}", names=",".join(map(str, message))[:100])

    def _requestCommand(self, command: dict[str, Any], body: bytes | None) -> None:
        if "method" not in command:
            address = command.get("address")
            if not isinstance(address, str) or "://" not in address:
                log.warn("ignored a request command without a usable address")
                return
            requestId = command.get("id")
            proto = _Rendezvous(self, requestId=str(requestId) if requestId is not None else None)
            self._openRendezvous(address, proto).addErrback(self._rendezvousFailed)
            return
        requestBody = _RequestBody()
        if body is not None:
            requestBody.dataReceived(body)
        requestBody.finished()
        request = self._makeRequest(command, requestBody, len(body) if body is not None else 0, None, None)
        if request is not None:
            self._inFlight.add(request)
            self._handle(request)

    def _makeRequest(
        self,
        command: dict[str, Any],
        body: _RequestBody,
        bodyLength: int | None,
        rendezvous: _Rendezvous | None,
        fallbackId: str | None,
    ) -> RelayedHttpRequest | None:
        method = command.get("method")
        target = command.get("requestTarget")
        requestId = command.get("id", fallbackId)
        if not isinstance(method, str) or not method or not isinstance(target, str) or requestId is None:
            log.warn("ignored a request command without a method, requestTarget or id")
            return None
        rawHeaders = command.get("requestHeaders")
        headers = [(str(k), str(v)) for k, v in rawHeaders.items()] if isinstance(rawHeaders, dict) else []
        address = command.get("address")
        if not isinstance(address, str):
            address = rendezvous.factory.url if rendezvous is not None else ""
        return RelayedHttpRequest(
            self,
            str(requestId),
            address,
            method,
            target,
            headers,
            _remote(command.get("remoteEndpoint")),
            body,
            bodyLength,
            rendezvous,
        )

    def _handle(self, request: RelayedHttpRequest) -> None:
        try:
            self._handler.handleRequest(request)
        except Exception:
            log.failure("the request handler failed on {method} {target}", method=request.method, target=request.target)
            request._handlerFailed()

    def _forget(self, request: RelayedHttpRequest) -> None:
        self._inFlight.discard(request)

    # Token renewal.

    def _renewDelay(self, token: str) -> float:
        try:
            lifetime = SasToken.parse(token).expiry - self.reactor.seconds()
        except Exception:
            return self._renewInterval
        return max(MIN_RENEW_FLOOR, min(self._renewInterval, lifetime * 0.9))

    def _scheduleRenewal(self, token: str) -> None:
        self._cancelRenewal()
        self._renewCall = self.reactor.callLater(self._renewDelay(token), self._renew)

    def _cancelRenewal(self) -> None:
        if self._renewCall is not None:
            if self._renewCall.active():
                self._renewCall.cancel()
            self._renewCall = None
        if self._renewing is not None:
            renewing, self._renewing = self._renewing, None
            renewing.cancel()

    def _renew(self) -> None:
        self._renewCall = None
        renewing = Deferred.fromCoroutine(self._renewWith(self._control))
        if not renewing.called:
            self._renewing = renewing

    async def _renewWith(self, control: _ControlChannel | None) -> None:
        try:
            token = await getToken(self._tokenProvider, self.resourceUri)
        except CancelledError:
            return
        except Exception:
            log.failure("could not get a token to renew with")
            if self._control is control and control is not None:
                self._renewing = None
                self._renewCall = self.reactor.callLater(MIN_RENEW_DELAY * 12, self._renew)
            return
        self._renewing = None
        if self._control is not control:
            return
        if token == self._lastToken:
            # A fixed token cannot be renewed: look again later rather than
            # resend it.
            self._renewCall = self.reactor.callLater(MIN_RENEW_DELAY * 12, self._renew)
            return
        self._lastToken = token
        if self._sendControl({"renewToken": {"token": token}}):
            log.debug("renewed the token of {entity}", entity=self.entity)
            self._scheduleRenewal(token)


class HttpListener(HybridListener):
    """
    A L{HybridListener} for relayed HTTP requests, called as before:
    C{HttpListener(reactor, baseUrl, entity, tokenProvider, handler, ...)}.
    """

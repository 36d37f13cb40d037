# -*- test-case-name: relaynet.test.test_request -*-
"""
Request/response relaying: a sender's HTTP request to C{/{entity}/...}
goes to one listener as a C{request} command, and the listener's
C{response} comes back to the sender.

Small requests (a body of at most 64 KiB) travel on the listener's control
channel, with the body as the next binary message.  Larger or chunked ones
travel over a rendezvous WebSocket the listener opens to the request's
address, where the relay streams the body as it arrives.  Responses come back
the same ways: whole on the control channel, or streamed over a rendezvous.
Nothing is held whole: each side stops reading while the other cannot keep up.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote
from xml.sax.saxutils import escape

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
# (Imported by name: attributes of the module go through a deprecation proxy.)
from twisted.web.http import RESPONSES, HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from relaynet import logs
from relaynet.auth import Rights
from relaynet.core import HandshakeInfo, Relay
from relaynet.entities import Entity
from relaynet.errors import (
    BadGateway,
    BadRequest,
    GatewayTimeout,
    MethodNotAllowed,
    NoListeners,
    PayloadTooLarge,
    RelayError,
    safeReason,
)
from relaynet.protocols.control import encodeCommand
from relaynet.protocols.frames import writeNow
from relaynet.protocols.pubsub import entityPath
from relaynet.protocols.splice import ReadSide
from relaynet.protocols.websocket import stripRelayParameters
from relaynet.registry import IListenerChannel, newConnectionId

if TYPE_CHECKING:
    from relaynet.protocols.websocket import HybridConnectionProtocol

__all__ = ["HttpExchange", "RelayHttpChannel", "RelayRequest", "errorBody"]

log = Logger(observer=logs.observer)

CONTROL_BODY_LIMIT = 65536
# A request with this header set to true is a one-way message.
ONE_WAY_HEADER = "Relay-Oneway"
_ONE_WAY = ONE_WAY_HEADER.lower()
# How many subscribers (or listeners) an event or message was handed to.
DELIVERED_HEADER = "Relay-Delivered-To"
MAX_HEADER_BYTES = 32 * 1024
# Hop-by-hop headers (RFC 9110 7.6.1) and the relay's own credential.
_HOP_BY_HOP = frozenset({
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "close",
    "content-length",
    "servicebusauthorization",
})
_HOP_BY_HOP_BUT_LENGTH = _HOP_BY_HOP - {"content-length"}
_NO_BODY = {204, 304}
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9a-z]+$")
SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12 = "http://www.w3.org/2003/05/soap-envelope"


def soapVersion(request: Request) -> str | None:
    """
    C{"1.1"} or C{"1.2"} for a SOAP caller, else C{None}.
    """
    contentType = (request.getHeader("content-type") or "").lower()
    if contentType.startswith("application/soap+xml"):
        return "1.2"
    if contentType.startswith("text/xml") and request.getHeader("soapaction") is not None:
        return "1.1"
    return None


def errorBody(request: Request, error: RelayError) -> tuple[str, bytes]:
    """
    The content type and body of a relay-made error, in the caller's
    dialect: a SOAP 1.1 or 1.2 fault for SOAP callers, JSON for the rest.
    """
    version = soapVersion(request)
    message = escape(error.reason)
    code = escape(error.code)
    if version == "1.1":
        who = "s:Client" if error.status < 500 else "s:Server"
        return "text/xml; charset=utf-8", (
            f'<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{SOAP11}"><s:Body><s:Fault>'
            f'<faultcode>{who}</faultcode><faultstring xml:lang="en">{message}</faultstring>'
            f'<detail><RelayError xmlns="urn:relaynet"><Code>{code}</Code><Status>{error.status}</Status>'
            "</RelayError></detail></s:Fault></s:Body></s:Envelope>"
        ).encode("utf-8")
    if version == "1.2":
        who = "env:Sender" if error.status < 500 else "env:Receiver"
        return "application/soap+xml; charset=utf-8", (
            f'<?xml version="1.0" encoding="utf-8"?><env:Envelope xmlns:env="{SOAP12}"><env:Body><env:Fault>'
            f"<env:Code><env:Value>{who}</env:Value></env:Code>"
            f'<env:Reason><env:Text xml:lang="en">{message}</env:Text></env:Reason>'
            f'<env:Detail><RelayError xmlns="urn:relaynet"><Code>{code}</Code><Status>{error.status}</Status>'
            "</RelayError></env:Detail></env:Fault></env:Body></env:Envelope>"
        ).encode("utf-8")
    return "application/json", json.dumps({"error": {"code": error.code, "message": error.reason}}).encode("utf-8")


@functools.lru_cache(maxsize=64)
def _jsonText(text: str) -> bytes:
    """
    C{text} as it appears inside a JSON string (the relay's few addresses).
    """
    return json.dumps(text, ensure_ascii=False)[1:-1].encode("utf-8")


def respondWithError(request: Request, error: RelayError) -> None:
    """
    Answer C{request} with C{error} (no C{Via}: the relay made it).
    """
    contentType, body = errorBody(request, error)
    request.responseHeaders = Headers()
    request.setResponseCode(error.status, safeReason(error.reason).encode("ascii"))
    request.setHeader("content-type", contentType)
    request.setHeader("content-length", str(len(body)))
    retryAfter = getattr(error, "retryAfter", None)
    if retryAfter is not None:
        request.setHeader("retry-after", str(retryAfter))
    request.write(body)
    request.finish()


class RelayHttpChannel(HTTPChannel):
    """
    The front door's HTTP channel: TCP_NODELAY, and the local address asked
    once.  Its requests (L{RelayRequest}) are relayed as soon as their
    headers have come, before their body.
    """

    totalHeadersSize = MAX_HEADER_BYTES

    def connectionMade(self) -> None:
        super().connectionMade()
        # Requests, answers and handshakes are small and wait on each other:
        # no Nagle delay on any relay socket.
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            setNoDelay(True)

    # The local address and whether it is TLS never change on a connection,
    # but twisted.web asks for both on every request (a getsockname call).
    _host: Any = None
    _secure: bool | None = None

    def getHost(self) -> Any:
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def isSecure(self) -> bool:
        if self._secure is None:
            self._secure = super().isSecure()
        return self._secure


class RelayRequest(Request):
    """
    A request to the front door; one addressed to an entity is relayed by
    an L{HttpExchange} as it arrives.
    """

    exchange: HttpExchange | None = None
    # A relayed response carries the listener's headers, no others.
    defaultContentType = None

    def _relay(self) -> HttpExchange | None:
        """
        Start relaying this request if it is addressed to an entity: its
        headers have all come (its body may not have).
        """
        channel: Any = self.channel
        # (HTTPChannel keeps the request line here until the request ends.)
        method, uri, version = channel._command, channel._path, channel._version
        path = uri.split(b"?", 1)[0]
        if path.startswith(b"/$") or path == b"/":
            return None
        # Known now, so that a response may start before the body has come.
        self.method, self.uri, self.clientproto, self.path = method, uri, version, path
        self.site = channel.site
        relay: Relay = self.site.relay  # type: ignore[union-attr]
        self.exchange = HttpExchange(relay, self, method.decode("latin-1"), uri.decode("latin-1"))
        return self.exchange

    def gotLength(self, length: int | None) -> None:
        exchange = self._relay()
        if exchange is None:
            super().gotLength(length)
        else:
            exchange.headersReceived(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.exchange is None:
            super().handleContentChunk(data)
        else:
            self.exchange.bodyReceived(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.exchange is None:
            super().requestReceived(command, path, version)
            return
        self.exchange.requestEnded()

    def connectionLost(self, reason: Any) -> None:
        # (What notifyFinish would tell, without a Deferred per request.)
        super().connectionLost(reason)
        if self.exchange is not None:
            self.exchange.senderGone()


class HttpExchange:
    """
    One sender's request on its way to a listener, and the response on its
    way back.

    @ivar rendezvousId: the id in the request's address; the listener opens
        a rendezvous with it to read a large request or send a large
        response.
    """

    error: RelayError | None = None
    message = False
    _headers: dict[str, tuple[str, Sequence[bytes]]] | None = None
    _bodySize = 0
    channel: IListenerChannel | None = None
    leg: HybridConnectionProtocol | None = None
    responding = False
    # The response has no body (HEAD, 1xx, 204, 304), set with its head.
    _bodiless = False
    finished = False
    overRendezvous = False
    _deadline: IDelayedCall | None = None

    def __init__(self, relay: Relay, request: RelayRequest, method: str, uri: str) -> None:
        self.relay = relay
        self.request = request
        self.method = method
        self.uri = uri
        # What the listener is shown: the path and query less the relay's
        # own sb-hc- parameters.
        self.path, _, rawQuery = uri.partition("?")
        self.query = stripRelayParameters(rawQuery)
        self.requestTarget = self.path + ("?" + self.query if self.query else "")
        self.entityPath = ""
        self.rendezvousId = newConnectionId(None)
        self._body: list[bytes] = []
        self._bodyEnded = False
        self._expectedBody: int | None = 0
        self.entity: Entity | None = None
        self.suffix = ""
        self._credentialHeader: str | None = None
        self._info: HandshakeInfo | None = None

    # The sender's side.

    def headersReceived(self, length: int | None) -> None:
        self._expectedBody = length
        try:
            self._check()
            if self.message:
                self._checkMessage(length)
        except RelayError as e:
            if length == 0:
                self.error = e  # answered at once, by requestEnded
            else:
                self._fail(e)
            return
        if self.message:
            return  # read whole (it is small), then handed on
        if length is None or length > self._controlLimit():
            # Too large to carry on the control channel: the listener comes
            # to a rendezvous for it, and the body streams there.
            self.overRendezvous = True
            self._pauseSender()
            self._deliver({"request": {"address": self._address(), "id": self.rendezvousId}}, None)

    def _check(self) -> None:
        if self.method.upper() == "CONNECT":
            raise MethodNotAllowed("CONNECT is not relayed.")
        if "websocket" in (self._header("upgrade") or "").lower():
            raise BadRequest("HTTP relaying does not upgrade connections: WebSocket senders connect under /$hc/.")
        path = self.path
        self.entity, self.suffix = self.relay.namespace.resolve(unquote(path))
        self.entityPath = entityPath(self.entity.name + self.suffix)
        self.relay.authorize(self._handshakeInfo(), self.entity, Rights.SEND, token=self._token())
        oneWay = (self._header(_ONE_WAY) or "").lower() in ("1", "true", "yes")
        self.message = self.entity.kind == "event" or oneWay

    def _checkMessage(self, length: int | None) -> None:
        """
        An event or a one-way message: a POST no larger than the limit.
        """
        if self.method.upper() != "POST":
            raise MethodNotAllowed("Events and one-way messages are sent with POST.")
        limit = self.relay.settings.maxEventSize
        if length is not None and length > limit:
            raise PayloadTooLarge(f"A message may have at most {limit} bytes.")

    def _token(self) -> str | None:
        token = self._header("servicebusauthorization")
        if token is None:
            query = dict(reversed(parse_qsl(self.uri.partition("?")[2], keep_blank_values=True)))
            token = query.get("sb-hc-token") or None
        if token is None:
            authorization = self._header("authorization") or ""
            if authorization.startswith("SharedAccessSignature "):
                self._credentialHeader = "authorization"
                token = authorization
        return token

    def _handshakeInfo(self) -> HandshakeInfo:
        if self._info is not None:
            return self._info
        peer = self.request.getClientAddress()
        self._info = HandshakeInfo(
            host=self._header("host") or "",
            secure=self.request.isSecure(),
            path=self.uri,
            rawQuery="",
            headers=[],
            query={},
            peerHost=getattr(peer, "host", ""),
            peerPort=getattr(peer, "port", 0),
        )
        return self._info

    def bodyReceived(self, data: bytes) -> None:
        if self.error is not None or self.finished:
            return
        if self.message:
            self._bodySize += len(data)
            if self._bodySize > self.relay.settings.maxEventSize:
                self._fail(PayloadTooLarge(f"A message may have at most {self.relay.settings.maxEventSize} bytes."))
                return
        if self.leg is not None and self.leg.state == self.leg.STATE_OPEN:
            self.leg.beginMessageFrame(len(data))
            self.leg.sendMessageFrameData(data)
            return
        self._body.append(data)

    def requestEnded(self) -> None:
        self._bodyEnded = True
        if self.finished:
            return
        if self.error is not None:
            self._fail(self.error)
            return
        if self.overRendezvous:
            if self.leg is not None and self.leg.state == self.leg.STATE_OPEN:
                self.leg.endMessage()
            return
        if self.message:
            self._handOn(b"".join(self._body))
            return
        body = b"".join(self._body) if self._expectedBody else None
        encoded = encodeCommand(self._fullRequest(body is not None))
        limit = self._controlLimit()
        if len(encoded) > limit or (body is not None and len(body) > limit):
            # Too large for the control channel after all (long headers):
            # the listener comes to a rendezvous for it.
            self.overRendezvous = True
            self._deliver({"request": {"address": self._address(), "id": self.rendezvousId}}, None)
            return
        self._body = []
        self._deliver(encoded, body)

    def _handOn(self, body: bytes) -> None:
        """
        Hand an event to every subscriber, or a one-way message to one
        listener, and tell the sender at once: 202, and to how many.
        """
        from relaynet.protocols.pubsub import SharedCommand

        assert self.entity is not None
        makeCommand = SharedCommand(self.entityPath, self.requestTarget, self._requestHeaders(), self._remote(), True)
        registry = self.relay.registry
        if self.entity.kind == "event":
            d = registry.broadcast(self.entity, makeCommand, body)
        else:
            d = registry.deliverOneWay(self.entity, makeCommand, body).addCallback(lambda _: 1)
        d.addCallbacks(self._handedOn, self._notDelivered)

    def _handedOn(self, count: int) -> None:
        self.finished = True
        self._cleanUp()
        request = self.request
        request.setResponseCode(202)
        request.setHeader(DELIVERED_HEADER, str(count))
        request.setHeader("content-type", "application/json")
        body = json.dumps({"deliveredTo": count}).encode()
        request.setHeader("content-length", str(len(body)))
        request.write(body)
        request.finish()

    def _controlLimit(self) -> int:
        return min(CONTROL_BODY_LIMIT, self.relay.settings.maxControlMessage)

    def _senderTransport(self) -> Any:
        return self.request.channel.transport

    def _pauseSender(self) -> None:
        transport = self._senderTransport()
        if transport is not None:
            transport.pauseProducing()

    def _resumeSender(self) -> None:
        transport = self._senderTransport()
        if transport is not None:
            transport.resumeProducing()

    # Toward the listener.

    def _address(self) -> str:
        """
        The request's rendezvous address; C{{base}} stands for the relay as
        the listener reaches it until a listener is chosen.
        """
        base = self.channel.rendezvousBase if self.channel is not None else "{base}"
        query = self.query
        return (
            f"{base}/$hc/{self.entityPath}?"
            f"{query + '&' if query else ''}sb-hc-action=request&sb-hc-id={self.rendezvousId}"
        )

    def _remote(self) -> dict[str, Any]:
        peer = self.request.getClientAddress()
        return {"address": getattr(peer, "host", ""), "port": getattr(peer, "port", 0)}

    def _fullRequest(self, hasBody: bool) -> dict[str, Any]:
        return {
            "request": {
                "address": self._address(),
                "id": self.rendezvousId,
                "requestTarget": self.requestTarget,
                "method": self.method,
                "requestHeaders": self._requestHeaders(),
                "remoteEndpoint": self._remote(),
                "body": hasBody,
            }
        }

    def _readHeaders(self) -> dict[str, tuple[str, Sequence[bytes]]]:
        """
        The request's headers by lower-case name: (canonical name, values).
        Read in one pass, once: twisted.web encodes the name again on every
        lookup.
        """
        headers = self._headers
        if headers is None:
            headers = self._headers = {}
            for rawName, rawValues in self.request.requestHeaders.getAllRawHeaders():
                name = rawName.decode("latin-1")
                headers[name.lower()] = (name, rawValues)
        return headers

    def _header(self, lower: str) -> str | None:
        """
        The last value of the request header C{lower}, or L{None}.
        """
        found = self._readHeaders().get(lower)
        return found[1][-1].decode("latin-1") if found is not None else None

    def _requestHeaders(self) -> dict[str, str]:
        received = self._readHeaders()
        # Not in the wire contract, but apps on hyco-https (Express's body
        # parsers) only read a body whose length is announced.
        dropped = _HOP_BY_HOP_BUT_LENGTH if self._expectedBody else _HOP_BY_HOP
        # The headers the sender's Connection header names are hop-by-hop
        # too, and so is the header the token came in.
        _, connection = received.get("connection", ("", ()))
        named = {token.strip().lower() for value in connection for token in value.decode("latin-1").split(",")}
        if self._credentialHeader:
            named.add(self._credentialHeader)
        if named:
            if self._expectedBody:
                named.discard("content-length")
            dropped = dropped | named
        headers: dict[str, str] = {}
        for lower, (name, rawValues) in received.items():
            if lower in dropped:
                continue
            if len(rawValues) == 1:
                headers[name] = rawValues[0].decode("latin-1")
            else:
                separator = "; " if lower == "cookie" else ", "
                headers[name] = separator.join(v.decode("latin-1") for v in rawValues)
        via = f"1.1 {self._hostname()}"
        headers["Via"] = f"{headers['Via']}, {via}" if "Via" in headers else via
        return headers

    def _hostname(self) -> str:
        return self._handshakeInfo().hostname or "relaynet"

    def _deliver(self, command: dict[str, Any] | bytes, body: bytes | None) -> None:
        """
        Send C{command} to a listener; its address starts with C{{base}},
        replaced by the relay's address as the listener reaches it (in the
        encoded command, the first C{{base}} is the address's: it comes
        first).
        """
        assert self.entity is not None
        encoded = command if isinstance(command, bytes) else encodeCommand(command)

        def makeCommand(channel: IListenerChannel) -> bytes:
            self.channel = channel
            return encoded.replace(b"{base}", _jsonText(channel.rendezvousBase), 1)

        self.relay.exchanges[self.rendezvousId] = self
        self._deadline = self.relay.clock.callLater(self._timeout(), self._expired)
        d = self.relay.registry.deliver(self.entity, makeCommand, body)
        d.addCallbacks(self._delivered, self._notDelivered)

    def _delivered(self, channel: IListenerChannel) -> None:
        self.channel = channel
        channel.exchanges[self.rendezvousId] = self  # type: ignore[attr-defined]

    def _notDelivered(self, failure: Any) -> None:
        error = failure.value
        if isinstance(error, NoListeners) and not self.message:
            error = BadGateway(error.reason)
        elif not isinstance(error, RelayError):
            log.failure("cannot deliver a request", failure)
            error = RelayError("Internal server error.")
        self._fail(error)

    def _expired(self) -> None:
        """
        The exchange's one deadline passed: no response in time, or a
        response body that stalled.
        """
        self._deadline = None
        if not self.responding:
            self._fail(
                GatewayTimeout(
                    "The request was routed to the listener but the listener did not respond in the required time. "
                    f"TrackingId:{self.rendezvousId}"
                )
            )
            return
        log.info("{method} {uri}: the response body stalled", method=self.method, uri=self.path)
        if self.request.startedWriting:
            self._abort()
        else:
            self._fail(GatewayTimeout("The listener did not send its response body in the required time."))

    # The rendezvous.

    def legOpened(self, leg: HybridConnectionProtocol) -> None:
        """
        The listener opened the request's rendezvous: send it the request
        (if it came for that) and take the response from it.
        """
        self.leg = leg
        assert leg.transport is not None
        if self.overRendezvous:
            leg.sendMessage(json.dumps(self._fullRequest(True), separators=(",", ":")).encode(), isBinary=False)
            leg.beginMessage(isBinary=True)
            # A first frame even for an empty body: a message cannot start
            # with the continuation frame that ends it.
            for chunk in self._body or [b""]:
                leg.beginMessageFrame(len(chunk))
                leg.sendMessageFrameData(chunk)
            self._body = []
            if self._bodyEnded:
                leg.endMessage()
            legTransport: Any = leg.transport
            legTransport.registerProducer(ReadSide(self._senderTransport()), True)
            self._resumeSender()

    def legLost(self) -> None:
        self.leg = None
        if not self.finished:
            if self.responding:
                self._abort()
            else:
                self._fail(BadGateway("The listener left the request's rendezvous without answering."))

    # The listener's response.

    def responseReceived(self, response: dict[str, Any], overLeg: bool) -> bool:
        """
        The listener's C{response}: start answering the sender.

        @return: whether a body follows.
        """
        if self.responding or self.finished:
            return False
        try:
            code = int(response.get("statusCode"))  # type: ignore[arg-type]
            if not 200 <= code <= 999:
                # 1xx cannot end an HTTP exchange.
                raise ValueError(code)
        except (TypeError, ValueError):
            self._fail(BadGateway("The listener's response has no valid final statusCode (200 to 999)."))
            return bool(response.get("body"))
        self.responding = True
        request = self.request
        description = response.get("statusDescription")
        reason = safeReason(str(description)).encode("latin-1") if description else RESPONSES.get(code, b"")
        request.setResponseCode(code, reason)
        headers = response.get("responseHeaders")
        responseHeaders = request.responseHeaders
        # (Methods are case-sensitive: "head" is not HEAD, and has a body.)
        self._bodiless = self.method == "HEAD" or code in _NO_BODY
        for name, value in (headers.items() if isinstance(headers, dict) else []):
            lower = str(name).lower()
            if not _TOKEN.match(lower) or (lower in _HOP_BY_HOP and not (self._bodiless and lower == "content-length")):
                continue
            if isinstance(value, list):
                value = ", ".join(str(v) for v in value)
            responseHeaders.setRawHeaders(str(name), [safeReason(str(value), 8192)])
        responseHeaders.addRawHeader("Via", f"1.1 {self._hostname()}")
        if not response.get("body"):
            self._sendWhole(b"")
            return False
        if overLeg:
            assert self.leg is not None and self.leg.transport is not None
            request.registerProducer(ReadSide(self.leg.transport), True)
        # The body must come, and keep coming, within the request timeout.
        self._bodyProgressed()
        return True

    def controlBodyReceived(self, body: bytes) -> None:
        """
        The body of a response sent on the control channel, whole.
        """
        if not self.finished:
            self._sendWhole(body)

    def _sendWhole(self, body: bytes) -> None:
        """
        Send a response that is all here (it came on the control channel,
        or it has no body) with one system call, and finish the request:
        the status line and headers as twisted.web's C{Request.write} puts
        them, with the body's C{Content-Length}, then the body.
        """
        request = self.request
        headers = request.responseHeaders
        if self._bodiless:
            body = b""  # (a Content-Length from the listener stays)
        else:
            headers.setRawHeaders(b"Content-Length", [b"%d" % (len(body),)])
        pieces = [request.clientproto, b" %d " % (request.code,), request.code_message, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                pieces += (name, b": ", value, b"\r\n")
        pieces.append(b"\r\n")
        if body:
            pieces.append(body)
        # What Request.write would have noted (the access log reads them).
        request.startedWriting = 1
        request.sentLength = len(body)
        transport = request.channel.transport
        if transport is not None:
            # Before anything twisted.web writes for a pipelined request next
            # (100 Continue, 400), which finish() may start.
            writeNow(transport, pieces)
        self._finish()

    def responseData(self, data: bytes) -> None:
        if self.finished:
            return
        self._bodyProgressed()
        if self.method != "HEAD":
            self.request.write(data)

    def _bodyProgressed(self) -> None:
        """
        A streamed response body moved: it may now pause for another
        request timeout, and no longer.
        """
        if self._deadline is not None and self._deadline.active():
            # Moving a deadline later costs a field; a new one, a heap entry.
            self._deadline.reset(self._timeout())
        else:
            self._deadline = self.relay.clock.callLater(self._timeout(), self._expired)

    def _timeout(self) -> float:
        assert self.entity is not None
        return self.entity.requestTimeout or self.relay.settings.requestTimeout

    def responseEnded(self) -> None:
        if self.finished:
            return
        self.request.unregisterProducer()
        self._finish()

    def listenerLost(self) -> None:
        """
        The control channel the request went to is gone.
        """
        if self.finished or self.leg is not None:
            return
        if self.request.startedWriting:
            self._abort()
        else:
            self._fail(BadGateway("The listener went away before it answered."))

    # Endings.

    def _finish(self) -> None:
        self.finished = True
        self._cleanUp()
        if not self._bodyEnded:
            # The listener answered without reading the whole body.
            self.request.channel.persistent = False
        self.request.finish()
        if self.leg is not None:
            self.leg.sendCloseFrame(code=1000)

    def _fail(self, error: RelayError) -> None:
        if self.finished:
            return
        self.error = error
        self.finished = True
        self._cleanUp()
        log.info("{method} {uri}: {error}", method=self.method, uri=self.path, error=str(error))
        if self.leg is not None:
            self.leg.sendCloseFrame(code=1011, reasonUtf8=b"The request failed.")
        if self._bodyEnded:
            respondWithError(self.request, error)
        else:
            # Answer now rather than read a body nobody will take, and end
            # the connection after the answer; not from inside the HTTP
            # channel's own header processing, though.
            self.request.channel.persistent = False
            self.relay.clock.callLater(0, respondWithError, self.request, error)

    def _abort(self) -> None:
        """
        The response broke off: end the sender's connection so that it can
        tell, rather than finish the response short.
        """
        self.finished = True
        self._cleanUp()
        if self.leg is not None:
            self.leg.sendCloseFrame(code=1011, reasonUtf8=b"The response broke off.")
        transport = self._senderTransport()
        if transport is not None:
            transport.abortConnection()

    def senderGone(self) -> None:
        """
        The sender's connection is gone.
        """
        if not self.finished:
            self.finished = True
            self._cleanUp()
            if self.leg is not None:
                self.leg.sendCloseFrame(code=1001, reasonUtf8=b"The sender went away.")

    def _cancelDeadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _cleanUp(self) -> None:
        self._cancelDeadline()
        self._body = []
        if self.leg is not None and self.leg.transport is not None:
            # Whatever paused it, the rendezvous must read its close.
            transport: Any = self.leg.transport
            transport.unregisterProducer()
            transport.resumeProducing()
        if self.relay.exchanges.get(self.rendezvousId) is self:
            del self.relay.exchanges[self.rendezvousId]
        if self.channel is not None:
            self.channel.exchanges.pop(self.rendezvousId, None)  # type: ignore[attr-defined]


class RequestLeg:
    """
    The rendezvous of one HTTP request: the relay sends the request here if
    it was too large for the control channel, and the listener sends its
    response: a C{response} text message, then the body as one binary
    message, which streams to the sender frame by frame.
    """

    def __init__(self, proto: HybridConnectionProtocol, exchange: HttpExchange) -> None:
        self.proto = proto
        self.exchange = exchange
        self._text: list[bytes] | None = None
        self._textSize = 0
        self._expectBody = False
        self._done = False

    def messageBegin(self, isBinary: bool) -> None:
        self._text = None if isBinary else []
        self._textSize = 0

    def frameBegin(self, length: int) -> None:
        pass

    def frameData(self, payload: bytes) -> None:
        if self._text is not None:
            self._textSize += len(payload)
            if self._textSize > CONTROL_BODY_LIMIT:
                self.proto.sendCloseFrame(code=1009, reasonUtf8=b"The response message is too large.")
                self._text = None
                return
            self._text.append(payload)
        elif self._expectBody:
            self.exchange.responseData(payload)

    def messageEnd(self) -> None:
        if self._text is not None:
            self._responseText(b"".join(self._text))
            self._text = None
        elif self._expectBody:
            self._expectBody = False
            self._done = True
            self.exchange.responseEnded()

    def _responseText(self, payload: bytes) -> None:
        try:
            message = json.loads(payload)
            response = message["response"]
            if not isinstance(response, dict):
                raise TypeError(response)
        except (ValueError, KeyError, TypeError):
            log.warn("a rendezvous sent something other than a response")
            return
        self._expectBody = self.exchange.responseReceived(response, overLeg=True)
        self._done = not self._expectBody

    def closeFrame(self, code: int | None, reason: bytes | None) -> bool:
        return False

    def lost(self) -> None:
        if self.exchange.leg is self.proto:
            self.exchange.legLost()

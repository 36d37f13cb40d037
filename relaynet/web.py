# -*- test-case-name: relaynet.test.test_web -*-
"""
Relayed HTTP requests served by any C{twisted.web} resource or site.

L{WebListener} listens on a hybrid connection with a L{HybridListener} and
turns each relayed request into an ordinary L{twisted.web.server.Request}
of the given L{Site}: a WSGI application behind
L{twisted.web.wsgi.WSGIResource}, a static directory, or your own resources
work unchanged.

How: each relayed request gets a small stand-in for the
L{HTTPChannel<twisted.web.http.HTTPChannel>} the request would normally
belong to (L{_RelayedChannel}).  The request object is made by the site's
own C{requestFactory} and driven through the same calls C{HTTPChannel}
makes (headers, C{gotLength}, C{handleContentChunk},
C{requestReceived}), so twisted.web keeps all of its own behaviour: resource
traversal, HEAD, C{Content-Length}, sessions, error pages, the access log.
What the request writes back comes to the channel already split up:
C{writeHeaders} gives the status and headers, then the body arrives through
C{write}; twisted.web's chunked transfer coding is undone there (the
WebSocket message is the framing) and each part is passed on with
L{RelayedHttpRequest.write}, so a streamed response stays streamed.  Producers
registered on the request are paused and resumed by the relayed response.
No bytes are parsed as HTTP on the way in, and only the chunk framing on the
way out.

Paths: the relay gives the listener the whole request target, which starts
with the entity's name: C{/hyco/hello?x=1}.  The request keeps that as its
C{uri} and C{path}, but resource traversal starts I{below} the entity, as if
the site were mounted at C{/hyco/}: a root resource with a child C{b"hello"}
answers C{/hyco/hello}, C{request.prepath} starts with C{[b"hyco"]}, links
made with C{prePathURL()} or C{URLPath} point back through the relay, and a
WSGI application sees C{SCRIPT_NAME=/hyco} and C{PATH_INFO=/hello}.

The body of a request is read whole before the resource is asked, as
C{HTTPChannel} does (into memory or a temporary file), and a
C{Content-Length} header stating its size is added if the relay left none,
so that WSGI applications can read it.  The client address is the sender's
address as the relay reports it (C{request.getClientAddress()}); the host
is the relay's, and C{isSecure()} is true for a C{wss} relay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import Request
from twisted.web.http_headers import Headers
from twisted.web.iweb import INonQueuedRequestFactory
from twisted.web.resource import IResource
from twisted.web.server import Site

from relaynet import logs
from relaynet.auth import mintToken
from relaynet.listener import HybridListener, RelayedHttpRequest
from relaynet.tokens import TokenProvider

__all__ = ["WebListener", "sasHeaders"]

log = Logger(observer=logs.observer)

HTTP_VERSION = b"HTTP/1.1"
_NO_ADDRESS = IPv4Address("TCP", "0.0.0.0", 0)


def sasHeaders(
    resourceUri: str, keyName: str, key: str, ttl: int = 3600, clock: IReactorTime | None = None
) -> dict[str, str]:
    """
    The header that authorizes a sender, for any HTTP client::

        headers = sasHeaders("http://127.0.0.1:9090/hyco", keyName, key)
        # {"ServiceBusAuthorization": "SharedAccessSignature sr=...&sig=...&se=...&skn=..."}

    @param resourceUri: the token's scope: the entity's URL.  For relaynet
        its host must be the host the sender sends to.
    @param keyName: the rule's name.
    @param key: the rule's key.
    @param ttl: seconds until the token expires.
    @param clock: where the time comes from; the global reactor by default.
    """
    if clock is None:
        from twisted.internet import reactor as clock  # type: ignore[assignment]
    assert clock is not None
    return {"ServiceBusAuthorization": mintToken(resourceUri, keyName, key, int(clock.seconds()) + ttl)}


def _encode(text: str) -> bytes:
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def _address(host: str, port: int) -> IPv4Address | IPv6Address:
    return IPv6Address("TCP", host, port) if ":" in host else IPv4Address("TCP", host, port)


class WebListener:
    """
    Serve a hybrid connection's HTTP requests with a C{twisted.web} site.

    @ivar site: the site requests go to.
    @ivar listener: the L{HybridListener} underneath: its C{status}, and
        its reconnecting, are the web listener's.
    """

    def __init__(
        self,
        reactor: Any,
        baseUrl: str,
        entity: str,
        tokenProvider: TokenProvider,
        siteOrResource: Site | IResource,
        **listenerOptions: Any,
    ) -> None:
        """
        @param reactor: as for L{HybridListener}.
        @param baseUrl: the relay, such as C{ws://127.0.0.1:9090}.
        @param entity: the hybrid connection's name.
        @param tokenProvider: a L{relaynet.tokens.TokenProvider} whose tokens
            have the Listen right, such as L{relaynet.tokens.fromKey}.
        @param siteOrResource: a L{Site}, or the root resource of a new one.
        @param listenerOptions: more keyword arguments for
            L{HybridListener}: C{onStatus}, C{reconnect}, C{trustRoot},
            C{streamFactory} (to take WebSocket senders as well), ...
        """
        self.site = siteOrResource if isinstance(siteOrResource, Site) else Site(siteOrResource, reactor=reactor)
        self.listener = HybridListener(reactor, baseUrl, entity, tokenProvider, self, **listenerOptions)
        self._mount = [_encode(segment).lower() for segment in self.listener.entity.split("/")]
        parts = urlsplit(baseUrl)
        self._secure = parts.scheme.lower() in ("wss", "https")
        self._host = _address(parts.hostname or "", parts.port or (443 if self._secure else 80))

    def listen(self) -> Deferred[None]:
        """
        Start the site, as a port would, and listen.

        @return: a L{Deferred} that fires once the relay has the listener.
        """
        return Deferred.fromCoroutine(self._listen())

    async def _listen(self) -> None:
        self.site.doStart()
        try:
            await self.listener.listen()
        except BaseException:
            self.site.doStop()
            raise

    def close(self) -> Deferred[None]:
        """
        Stop listening and stop the site.
        """
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        try:
            await self.listener.close()
        finally:
            self.site.doStop()

    def handleRequest(self, request: RelayedHttpRequest) -> None:
        """
        Hand C{request} to the site.
        """
        _RelayedChannel(self.site, self._mount, request, self._host, self._secure).start()


class _MountedSite:
    """
    The site as a relayed request's channel shows it: resource traversal
    starts below the entity's name.  Everything else is the site's own.
    """

    def __init__(self, site: Site, mount: list[bytes]) -> None:
        self._site = site
        self._mount = mount

    def __getattr__(self, name: str) -> Any:
        return getattr(self._site, name)

    def getResourceFor(self, request: Any) -> IResource:
        depth = len(self._mount)
        if [segment.lower() for segment in request.postpath[:depth]] == self._mount:
            request.prepath, request.postpath = request.postpath[:depth], request.postpath[depth:]
        return cast(IResource, self._site.getResourceFor(request))


class _Dechunker:
    """
    Undoes the chunked transfer coding that C{twisted.web} puts on HTTP/1.1
    responses without a C{Content-Length}.
    """

    def __init__(self, deliver: Callable[[bytes], None]) -> None:
        self._deliver = deliver
        self._buffer = b""
        self._remaining = 0
        self._state = "size"

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while self._buffer:
            if self._state == "done":
                self._buffer = b""
            elif self._state == "data":
                part, self._buffer = self._buffer[: self._remaining], self._buffer[self._remaining :]
                self._remaining -= len(part)
                self._deliver(part)
                if self._remaining == 0:
                    self._state = "crlf"
            elif self._state == "crlf":
                if len(self._buffer) < 2:
                    return
                self._buffer = self._buffer[2:]
                self._state = "size"
            else:
                line, sep, rest = self._buffer.partition(b"\r\n")
                if not sep:
                    return
                self._buffer = rest
                if self._state == "size":
                    size = int(line.split(b";", 1)[0].strip(), 16)
                    self._state, self._remaining = ("data", size) if size else ("trailer", 0)
                elif not line:
                    self._state = "done"


class _Content(Protocol):
    """
    Writes a relayed body into the request's C{content}, then lets the
    request go to its resource.
    """

    def __init__(self, channel: _RelayedChannel) -> None:
        self.channel = channel
        self.length = 0

    def dataReceived(self, data: bytes) -> None:
        self.length += len(data)
        self.channel.request.handleContentChunk(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ConnectionDone):
            self.channel.process(self.length)
        else:
            log.info("a relayed request body broke off: {reason}", reason=reason.getErrorMessage())
            self.channel.relayed.abort()


class _RelayedChannel:
    """
    What a C{twisted.web} request needs of its C{HTTPChannel}, for one
    relayed request.  It is also the request's C{transport}.
    """

    def __init__(
        self, site: Site, mount: list[bytes], relayed: RelayedHttpRequest, host: IAddress, secure: bool
    ) -> None:
        self.site = _MountedSite(site, mount)
        self.factory = site
        self.transport = self
        self.relayed = relayed
        self._host = host
        self._secure = secure
        self._peer = _address(*relayed.remote) if relayed.remote is not None else _NO_ADDRESS
        self._dechunker: _Dechunker | None = None
        factory = site.requestFactory
        if INonQueuedRequestFactory.providedBy(factory):
            self.request: Request = factory(self)
        else:
            self.request = factory(self, 0)

    def start(self) -> None:
        request = self.request
        for name, value in self.relayed.headers:
            if name.lower() not in ("content-length", "transfer-encoding"):
                request.requestHeaders.addRawHeader(_encode(name), _encode(value))
        request.parseCookies()
        request.gotLength(self.relayed.bodyLength)
        self.relayed.notifyFinish().addErrback(self._lost)
        self.relayed.deliverBody(_Content(self))

    def process(self, length: int) -> None:
        """
        The whole body is in: serve the request.
        """
        request = self.request
        if length:
            request.requestHeaders.setRawHeaders(b"content-length", [b"%d" % (length,)])
        request.requestReceived(_encode(self.relayed.method), _encode(self.relayed.target), HTTP_VERSION)

    def _lost(self, reason: Failure) -> None:
        if not self.request.finished:
            self.request.connectionLost(reason)

    # What Request calls.

    def getPeer(self) -> IAddress:
        return self._peer

    def getHost(self) -> IAddress:
        return self._host

    def isSecure(self) -> bool:
        return self._secure

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Headers) -> None:
        pairs: list[tuple[str, str]] = []
        chunked = False
        for name, values in headers.getAllRawHeaders():
            if name.lower() == b"transfer-encoding":
                chunked = b"chunked" in b",".join(values).lower()
                continue
            pairs.extend((name.decode("latin-1"), value.decode("latin-1")) for value in values)
        self._dechunker = _Dechunker(self.relayed.write) if chunked else None
        self.relayed.respond(int(code), reason.decode("latin-1"), pairs)

    def write(self, data: bytes) -> None:
        if self._dechunker is not None:
            self._dechunker.feed(data)
        else:
            self.relayed.write(data)

    def writeSequence(self, data: list[bytes]) -> None:
        for part in data:
            self.write(part)

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self.relayed.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.relayed.unregisterProducer()

    def requestDone(self, request: Request) -> None:
        self.relayed.finish()

    def loseConnection(self) -> None:
        self.relayed.abort()

    abortConnection = loseConnection

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.relayed.respond(400, "Bad Request", [])
        self.relayed.finish()

    # The body has been read whole before the request is processed.

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass

# -*- test-case-name: relaynet.test.test_events -*-
"""
Clients for events (publish/subscribe) and one-way messages.

    - L{EventSubscriber}: subclass it and override C{eventReceived}; it
      listens on an event entity and gets every event published while it is
      connected.
    - L{EventPublisher}: C{publish(body)} sends one event with an HTTP POST
      and fires with the number of subscribers it was handed to.
    - L{OneWaySender}: C{send(body)} sends a one-way message to a hybrid
      entity (C{Relay-Oneway: true}); one listener gets it.
    - L{OneWayReceiver}: subclass it and override C{messageReceived}.

What the relay promises (at most once, no store-and-forward, order per
publisher and subscriber) is told in C{doc/events.rst}.
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any, cast
from urllib.parse import quote, urlsplit, urlunsplit

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from relaynet import logs
from relaynet.listener import HybridListener, RelayedHttpRequest, takeBody
from relaynet.listener import readBody as readRelayedBody
from relaynet.streams import resourceUri
from relaynet.tokens import TokenProvider, getToken

__all__ = [
    "EventPublisher",
    "EventSubscriber",
    "OneWayReceiver",
    "OneWaySender",
    "PublishError",
    "ONE_WAY_HEADER",
    "DELIVERED_HEADER",
]

log = Logger(observer=logs.observer)

ONE_WAY_HEADER = "Relay-Oneway"
DELIVERED_HEADER = "Relay-Delivered-To"


class PublishError(Exception):
    """
    The relay did not take an event or a one-way message.

    @ivar status: the HTTP status (413: too large, 404: nobody listening on
        a hybrid entity or no such entity, 503: every listener is behind,
        401/403: the token, ...).
    @ivar message: the relay's explanation, from its JSON error if it sent
        one.
    @ivar code: the relay's error code, if it sent one.
    @ivar retryAfter: seconds from C{Retry-After}, or L{None}.
    """

    def __init__(self, status: int, message: str, code: Any = None, retryAfter: float | None = None) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message
        self.code = code
        self.retryAfter = retryAfter


def _headerDict(request: RelayedHttpRequest) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in request.headers:
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


class _MessageListener:
    """
    A L{HybridListener} whose every request is one message, its body handed
    to L{_received}.  Events and one-way messages go unanswered (the relay
    wants no answer); any other request is answered with 202 at once.
    """

    _kind = "message"

    def __init__(self, reactor: Any, baseUrl: str, entity: str, tokenProvider: TokenProvider, **listenerOptions: Any) -> None:
        """
        @param listenerOptions: more keyword arguments for L{HybridListener}:
            C{onStatus}, C{reconnect}, C{trustRoot}, C{retryPolicy}, ...
        """
        self.reactor = reactor
        self.listener = HybridListener(reactor, baseUrl, entity, tokenProvider, self, **listenerOptions)

    def listen(self) -> Deferred[None]:
        """
        Subscribe: open the control channel; it is reopened by itself if it
        drops.  What is published while it is down is not seen.

        @return: a L{Deferred} that fires once the relay has the listener.
        """
        return self.listener.listen()

    def close(self) -> Deferred[None]:
        """
        Stop listening.
        """
        return self.listener.close()

    def handleRequest(self, request: RelayedHttpRequest) -> None:
        headers = _headerDict(request)
        if request.oneWay:
            request.skipResponse()
        else:
            request.respond(202)
            request.finish()
        body = takeBody(request)
        if body is not None:
            self._received(body, headers)
            return
        readRelayedBody(request).addCallbacks(
            lambda body: self._received(body, headers),
            lambda f: log.info("a {kind}'s body broke off: {reason}", kind=self._kind, reason=f.getErrorMessage()),
        )

    def _received(self, body: bytes, headers: dict[str, str]) -> None:
        try:
            self._dispatch(body, headers)
        except Exception:
            log.failure("{cls} failed on a {kind}", cls=type(self).__name__, kind=self._kind)

    def _dispatch(self, body: bytes, headers: dict[str, str]) -> None:
        raise NotImplementedError


class EventSubscriber(_MessageListener):
    """
    A subscriber to an event entity.  Subclass it and override
    L{eventReceived}::

        class Printer(EventSubscriber):
            def eventReceived(self, body, headers):
                print(headers.get("Content-Type"), body)

        Printer(reactor, "ws://127.0.0.1:9090", "news", fromKey(name, key, reactor)).listen()

    Events are not answered (the relay wants no answer); an exception in
    L{eventReceived} is logged and the subscription goes on.

    @ivar listener: the L{HybridListener} underneath (its C{status}).
    """

    _kind = "event"

    def eventReceived(self, body: bytes, headers: dict[str, str]) -> None:
        """
        An event has come.

        @param body: the event.
        @param headers: the publisher's headers (C{Content-Type}, ...).
        """

    def _dispatch(self, body: bytes, headers: dict[str, str]) -> None:
        self.eventReceived(body, headers)


class OneWayReceiver(_MessageListener):
    """
    A listener for one-way messages on a hybrid entity.  Subclass it and
    override L{messageReceived}.  Each message goes to one of the entity's
    listeners only.
    """

    def messageReceived(self, body: bytes, headers: dict[str, str]) -> None:
        """
        A one-way message has come.
        """

    def _dispatch(self, body: bytes, headers: dict[str, str]) -> None:
        self.messageReceived(body, headers)


def _httpBase(baseUrl: str) -> str:
    parts = urlsplit(baseUrl.rstrip("/"))
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme.lower(), parts.scheme.lower())
    return urlunsplit((scheme, parts.netloc, parts.path, "", ""))


def _retryAfter(response: IResponse) -> float | None:
    values = response.headers.getRawHeaders(b"retry-after")
    if not values:
        return None
    try:
        return float(values[0])
    except ValueError:
        return None


def _error(response: IResponse, body: bytes) -> PublishError:
    message = response.phrase.decode("latin-1", "replace") if response.phrase else ""
    code: Any = None
    try:
        error = json.loads(body)["error"]
        message = str(error.get("message", message))
        code = error.get("code")
    except Exception:
        text = body.decode("utf-8", "replace").strip()
        if text and len(text) < 500:
            message = text
    return PublishError(response.code, message or "The relay refused the message.", code, _retryAfter(response))


class _Poster:
    def __init__(
        self, reactor: Any, baseUrl: str, entity: str, tokenProvider: TokenProvider, agent: IAgent | None = None
    ) -> None:
        """
        @param baseUrl: the relay, C{ws://}, C{wss://}, C{http://} or
            C{https://}.
        @param entity: the entity's name.
        @param tokenProvider: tokens with the Send right.
        @param agent: the L{IAgent} to send with; an L{Agent} by default.
        """
        self.reactor = reactor
        self.entity = entity.strip("/")
        self.url = f"{_httpBase(baseUrl)}/{quote(self.entity, safe='/')}"
        self.resourceUri = resourceUri(baseUrl, self.entity)
        self._tokenProvider = tokenProvider
        self._agent: IAgent = agent if agent is not None else Agent(reactor)

    async def _post(self, body: bytes, contentType: str, headers: dict[str, str] | None) -> IResponse:
        token = await getToken(self._tokenProvider, self.resourceUri)
        allHeaders = Headers()
        for name, value in (headers or {}).items():
            allHeaders.setRawHeaders(name, [value])
        allHeaders.setRawHeaders("Content-Type", [contentType])
        allHeaders.setRawHeaders("ServiceBusAuthorization", [token])
        producer = FileBodyProducer(BytesIO(body))
        response: IResponse = await self._agent.request(b"POST", self.url.encode("ascii"), allHeaders, producer)
        answer = await readBody(response)
        if response.code != 202:
            raise _error(response, answer)
        return response


class EventPublisher(_Poster):
    """
    Publishes events to an event entity with HTTP POST::

        publisher = EventPublisher(reactor, "ws://127.0.0.1:9090", "news", fromKey(name, key, reactor))
        count = await publisher.publish(b'{"score": 3}', "application/json")
    """

    def publish(self, body: bytes, contentType: str = "application/octet-stream", headers: dict[str, str] | None = None) -> Deferred[int]:
        """
        Publish one event.

        @param headers: more headers for the subscribers to see.
        @return: a L{Deferred} that fires with the number of subscribers the
            event was handed to (C{Relay-Delivered-To}: handed on, not
            processed), or fails with L{PublishError}.
        """
        return Deferred.fromCoroutine(self._publish(body, contentType, headers))

    async def _publish(self, body: bytes, contentType: str, headers: dict[str, str] | None) -> int:
        response = await self._post(body, contentType, headers)
        values = response.headers.getRawHeaders(DELIVERED_HEADER.encode("ascii")) or [b"0"]
        return int(cast(bytes, values[0]))


class OneWaySender(_Poster):
    """
    Sends one-way messages to a hybrid entity: each goes to one listener.
    """

    def send(self, body: bytes, contentType: str = "application/octet-stream", headers: dict[str, str] | None = None) -> Deferred[None]:
        """
        Send one message.

        @return: a L{Deferred} that fires once a listener has it in its
            outbox, or fails with L{PublishError}: 404 when no listener is
            connected, 503 (with C{retryAfter}) when every listener is
            behind, 413 when it is too large.
        """
        return Deferred.fromCoroutine(self._send(body, contentType, headers))

    async def _send(self, body: bytes, contentType: str, headers: dict[str, str] | None) -> None:
        await self._post(body, contentType, {**(headers or {}), ONE_WAY_HEADER: "true"})

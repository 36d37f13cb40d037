"""
HTTP request/response relaying over real sockets on 127.0.0.1: senders are
twisted.web's Agent, the listener a small autobahn client written to the
wire contract.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer
from twisted.web.iweb import IBodyProducer

from relaynet.test.support import Client, RelayFixture

Handler = Callable[[dict[str, Any], bytes], Any]


class RendezvousClient(Client):
    """
    A listener's rendezvous for one request: reads the request if the relay
    sends one, and sends a response.
    """

    owner: "HttpListener"
    request: dict[str, Any] | None = None
    body = b""
    expectBody = False

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.expectBody and isBinary:
            self.expectBody = False
            self.owner.answer(self.request or {}, payload, self)
            return
        message = json.loads(payload)
        self.request = message["request"]
        if self.request.get("body"):
            self.expectBody = True
        else:
            self.owner.answer(self.request, b"", self)


class HttpListener(Client):
    """
    A listener that answers each relayed request with C{handler(request,
    body)}, which returns (status, headers, body, viaRendezvous) or None to
    leave the request unanswered.
    """

    handler: Handler
    fixture: RelayFixture
    _bodyFor: dict[str, Any] | None = None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._bodyFor is not None:
            request, self._bodyFor = self._bodyFor, None
            self.answer(request, payload, None)
            return
        if isBinary:
            return
        request = json.loads(payload).get("request")
        if request is None:
            return
        if "method" not in request:
            rendezvous = self.fixture.connect(request["address"], protocolClass=RendezvousClient)
            rendezvous.owner = self
        elif request["body"]:
            self._bodyFor = request
        else:
            self.answer(request, b"", None)

    def answer(self, request: dict[str, Any], body: bytes, rendezvous: Client | None) -> None:
        result = self.handler(request, body)
        if result is None:
            return
        status, headers, responseBody, viaRendezvous = result
        response = {
            "response": {
                "requestId": request["id"],
                "statusCode": status,
                "statusDescription": "",
                "responseHeaders": headers,
                "body": responseBody is not None,
            }
        }
        if rendezvous is None and not viaRendezvous:
            self.sendMessage(json.dumps(response).encode(), isBinary=False)
            if responseBody is not None:
                self.sendMessage(responseBody, isBinary=True)
            return

        def send(leg: Client) -> None:
            leg.sendMessage(json.dumps(response).encode(), isBinary=False)
            if responseBody is not None:
                leg.beginMessage(isBinary=True)
                for start in range(0, len(responseBody), 65536):
                    leg.sendMessageFrame(responseBody[start : start + 65536])
                leg.endMessage()

        if rendezvous is not None:
            send(rendezvous)
        else:
            leg = self.fixture.connect(request["address"])
            leg.opened.addCallback(send)


def echo(request: dict[str, Any], body: bytes) -> Any:
    """
    Answer with the body, and what the listener saw in headers.
    """
    headers = {"x-method": request["method"], "x-target": request["requestTarget"], "content-type": "application/octet-stream"}
    headers["x-seen-headers"] = json.dumps(sorted(request["requestHeaders"]))
    return 200, headers, body, len(body) > 65536


@implementer(IBodyProducer)
class Bytes:
    """
    A request body of C{size} bytes in chunks, of unknown length if asked.
    """

    def __init__(self, data: bytes, known: bool = True) -> None:
        self.data = data
        self.length = len(data) if known else UNKNOWN_LENGTH

    def startProducing(self, consumer: Any) -> Deferred[None]:
        for start in range(0, len(self.data), 16384):
            consumer.write(self.data[start : start + 16384])
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class HttpRelayTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.relay = RelayFixture(self, ["--entity", "hyco", "--request-timeout", "20"])
        self.agent = Agent(reactor)

    async def listen(self, handler: Handler = echo, entity: str = "hyco") -> HttpListener:
        listener = self.relay.connect(self.relay.url(entity, "listen", self.relay.token(entity)), protocolClass=HttpListener)
        listener.handler = handler
        listener.fixture = self.relay
        await listener.opened
        return listener

    async def call(
        self, method: bytes, path: str, body: bytes | None = None, headers: dict[str, str] | None = None, known: bool = True, token: bool = True
    ) -> tuple[Any, bytes]:
        allHeaders = Headers({k: [v] for k, v in (headers or {}).items()})
        if token:
            allHeaders.setRawHeaders("ServiceBusAuthorization", [self.relay.token("hyco")])
        producer = Bytes(body, known) if body is not None else None
        response = await self.agent.request(method, f"http://{self.relay.host}{path}".encode(), allHeaders, producer)
        return response, await readBody(response)

    async def test_sizesBothWays(self) -> None:
        """
        Bodies of 0 B, 1 B, 64 KiB, 64 KiB + 1 and 5 MiB go and come back
        whole, on the control channel or over a rendezvous as they must.
        """
        await self.listen()
        for size in (0, 1, 65536, 65537, 5 * 1024 * 1024):
            data = os.urandom(size)
            response, body = await self.call(b"POST", "/hyco/echo?x=1", data)
            self.assertEqual(response.code, 200, size)
            self.assertEqual(hashlib.sha256(body).hexdigest(), hashlib.sha256(data).hexdigest(), size)
            self.assertEqual(response.headers.getRawHeaders("x-target"), ["/hyco/echo?x=1"])
            self.assertIn("1.1 127.0.0.1", response.headers.getRawHeaders("via")[0])

    async def test_methods(self) -> None:
        await self.listen()
        for method in (b"GET", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"):
            response, _ = await self.call(method, "/hyco/item/7", b"x" if method in (b"PUT", b"PATCH") else None)
            self.assertEqual(response.headers.getRawHeaders("x-method"), [method.decode()])

    async def test_chunkedRequest(self) -> None:
        await self.listen()
        for size in (10, 300000):
            data = os.urandom(size)
            response, body = await self.call(b"POST", "/hyco/up", data, known=False)
            self.assertEqual(body, data)

    async def test_headersFiltered(self) -> None:
        """
        The relay's own credential and hop-by-hop headers stay behind;
        sb-hc- query parameters are dropped from the target.
        """
        await self.listen()
        response, _ = await self.call(b"GET", "/hyco/h?a=1&sb-hc-token=zzz&b=2", headers={"X-Custom": "v", "Keep-Alive": "5"})
        seen = json.loads(response.headers.getRawHeaders("x-seen-headers")[0])
        self.assertIn("X-Custom", seen)
        self.assertIn("Via", seen)
        self.assertNotIn("Servicebusauthorization", seen)
        self.assertNotIn("Keep-Alive", seen)
        self.assertEqual(response.headers.getRawHeaders("x-target"), ["/hyco/h?a=1&b=2"])

    async def test_concurrent(self) -> None:
        await self.listen()
        calls = [self.call(b"POST", f"/hyco/c/{i}", str(i).encode() * 100) for i in range(50)]
        results = await gatherResults([Deferred.fromCoroutine(c) for c in calls])
        for i, (_, body) in enumerate(results):
            self.assertEqual(body, str(i).encode() * 100)

    async def test_statusesPassThrough(self) -> None:
        def status(request: dict[str, Any], body: bytes) -> Any:
            code = int(request["requestTarget"].rsplit("/", 1)[1])
            return code, {"X-From": "listener"}, None if code in (204, 304) else b"body", False

        await self.listen(status)
        for code in (201, 204, 304, 404, 418, 500, 502, 504):
            response, body = await self.call(b"GET", f"/hyco/status/{code}")
            self.assertEqual(response.code, code)
            self.assertEqual(response.headers.getRawHeaders("x-from"), ["listener"])
            self.assertTrue(response.headers.getRawHeaders("via"))
        response, body = await self.call(b"HEAD", "/hyco/status/200")
        self.assertEqual((response.code, body), (200, b""))

    async def test_multiWriteRendezvousResponse(self) -> None:
        big = os.urandom(300000)
        await self.listen(lambda r, b: (200, {}, big, True))
        response, body = await self.call(b"GET", "/hyco/big")
        self.assertEqual(body, big)

    async def test_deadline(self) -> None:
        """
        A listener that does not answer in time gets its sender a 504 with a
        JSON error body.
        """
        self.relay.relay.namespace.get("hyco").requestTimeout = 0.5
        await self.listen(lambda r, b: None)
        response, body = await self.call(b"GET", "/hyco/slow")
        self.assertEqual(response.code, 504)
        self.assertEqual(json.loads(body)["error"]["code"], "GatewayTimeout")
        self.assertFalse(response.headers.getRawHeaders("via"))

    async def test_listenerVanishes(self) -> None:
        """
        A listener that goes away mid-request gives 502 at once.
        """
        listener: HttpListener

        def vanish(request: dict[str, Any], body: bytes) -> None:
            listener.transport.abortConnection()

        listener = await self.listen(vanish)
        started = reactor.seconds()
        response, body = await self.call(b"GET", "/hyco/x")
        self.assertEqual(response.code, 502)
        self.assertLess(reactor.seconds() - started, 1.5)

    async def test_noListener(self) -> None:
        response, body = await self.call(b"GET", "/hyco/x")
        self.assertEqual(response.code, 502)
        self.assertIn("no listeners", json.loads(body)["error"]["message"])

    async def test_soapFaults(self) -> None:
        response, body = await self.call(
            b"POST", "/hyco/svc", b"<s:Envelope/>", headers={"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '"urn:x"'}
        )
        self.assertEqual(response.code, 502)
        self.assertIn(b"http://schemas.xmlsoap.org/soap/envelope/", body)
        self.assertIn(b"<faultcode>s:Server</faultcode>", body)
        response, body = await self.call(b"POST", "/hyco/svc", b"<e/>", headers={"Content-Type": "application/soap+xml"})
        self.assertIn(b"http://www.w3.org/2003/05/soap-envelope", body)
        self.assertIn(b"env:Receiver", body)

    async def test_soapPassesThrough(self) -> None:
        envelope = b'<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body/></s:Envelope>'
        await self.listen(lambda r, b: (200, {"Content-Type": "text/xml"}, b, False))
        response, body = await self.call(b"POST", "/hyco/svc", envelope, headers={"Content-Type": "text/xml", "SOAPAction": "x"})
        self.assertEqual(body, envelope)

    async def test_badToken(self) -> None:
        await self.listen()
        response, body = await self.call(b"GET", "/hyco/x", token=False)
        self.assertEqual(response.code, 401)
        self.assertEqual(json.loads(body)["error"]["code"], "TokenMissingOrInvalid")

    async def test_unknownEntity(self) -> None:
        response, body = await self.call(b"GET", "/nope/x")
        self.assertEqual(response.code, 404)

    async def test_connectRefused(self) -> None:
        from relaynet.test.support import rawRequest

        status, reason, body = await rawRequest(self.relay.port, b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertEqual(status, 405)

    async def test_upgradeRefused(self) -> None:
        from relaynet.test.support import rawRequest

        status, reason, body = await rawRequest(
            self.relay.port,
            b"GET /hyco/x HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        )
        self.assertEqual(status, 400)


class HttpEndingsTests(TestCase):
    """
    Requests that end badly free what they held.
    """

    timeout = 30

    async def test_senderGoesAway(self) -> None:
        from relaynet.test.support import rawRequest

        relay = RelayFixture(self, ["--entity", "hyco", "--anonymous-senders", "hyco"])
        listener = relay.connect(relay.url("hyco", "listen", relay.token("hyco")), protocolClass=HttpListener)
        listener.handler = lambda r, b: None
        listener.fixture = relay
        await listener.opened
        status, _, _ = await rawRequest(
            relay.port, b"GET /hyco/wait HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", timeout=0.3
        )
        self.assertEqual(status, 0)
        await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(relay.relay.exchanges, {})
        channel = next(p.role for p in relay.service.websockets.connections if p.role is not None)
        self.assertEqual(channel.exchanges, {})

    async def test_stalledBody(self) -> None:
        """
        A response body that stops moving for the request timeout ends the
        sender's connection: the sender can tell it is short.
        """
        relay = RelayFixture(self, ["--entity", "hyco", "--anonymous-senders", "hyco", "--request-timeout", "0.5"])

        class Staller(HttpListener):
            def answer(self, request: dict[str, Any], body: bytes, rendezvous: Client | None) -> None:
                leg = self.fixture.connect(request["address"])

                def send(leg: Client) -> None:
                    response = {"response": {"requestId": request["id"], "statusCode": 200, "body": True}}
                    leg.sendMessage(json.dumps(response).encode(), isBinary=False)
                    leg.beginMessage(isBinary=True)
                    leg.sendMessageFrame(b"partial")

                leg.opened.addCallback(send)

        listener = relay.connect(relay.url("hyco", "listen", relay.token("hyco")), protocolClass=Staller)
        listener.fixture = relay
        await listener.opened
        response = await Agent(reactor).request(b"GET", f"http://{relay.host}/hyco/x".encode())
        self.assertEqual(response.code, 200)
        from twisted.web.client import ResponseFailed, PartialDownloadError

        with self.assertRaises((ResponseFailed, PartialDownloadError)):
            await readBody(response)
        self.assertEqual(relay.relay.exchanges, {})

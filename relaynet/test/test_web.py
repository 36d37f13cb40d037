# -*- test-case-name: relaynet.test.test_web -*-
"""
Tests for L{relaynet.web}: relayed requests served by C{twisted.web}
resources and a WSGI application, through a L{WebListener} on a
L{MemoryReactorClock} whose WebSocket connections are answered by hand
(the helpers of C{test_listener}).
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from twisted.web.static import Data, File
from twisted.web.wsgi import WSGIResource

from relaynet.auth import Authorizer, Rights, Rule
from relaynet.listener import FLUSH_DELAY
from relaynet.test.test_listener import (
    BINARY,
    CONTINUATION,
    KEY,
    KEY_NAME,
    NOW,
    TEXT,
    Harness,
    RelaySide,
    address,
    fullRequest,
    response,
)
from relaynet.web import WebListener, _Dechunker, sasHeaders


class WebHarness(Harness):
    """
    A L{WebListener} for C{resource} on a L{MemoryReactorClock}.
    """

    def __init__(self, resource: Any, entity: str = "hyco", base: str = "ws://relay.test:9090", **options: Any) -> None:
        super().__init__(entity=entity, base=base)
        options.setdefault("pingInterval", 0)  # RelaySide answers no pings
        self.web = WebListener(self.reactor, base, entity, self.token, resource, **options)
        self.listener = self.web.listener

    def start(self) -> Any:
        return self.web.listen()

    def get(self, target: str = "/hyco/hello", method: str = "GET", **kwargs: Any) -> RelaySide:
        """
        Send a request on the control channel; return the channel.
        """
        self.control.sendJson(fullRequest(method=method, target=target, **kwargs))
        return self.control


def body(side: RelaySide) -> bytes:
    return b"".join(payload for opcode, payload in side.messages() if opcode == BINARY)


class Hello(Resource):
    """
    Says hello and keeps the request it was asked with.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []
        self.secure: list[bool] = []
        self.urls: list[bytes] = []

    def render_GET(self, request: Request) -> bytes:
        self.requests.append(request)
        self.secure.append(request.isSecure())
        self.urls.append(request.prePathURL())
        request.setHeader(b"content-type", b"text/plain")
        return b"hello " + request.args.get(b"name", [b"world"])[0]

    def render_POST(self, request: Request) -> bytes:
        self.requests.append(request)
        assert request.content is not None
        return b"got " + request.content.read()


def helloSite() -> tuple[Resource, Hello]:
    root = Resource()
    hello = Hello()
    root.putChild(b"hello", hello)
    return root, hello


class Streamer(Resource):
    """
    Writes its parts one clock tick apart, with no Content-Length: chunked
    in twisted.web's eyes.
    """

    isLeaf = True

    def __init__(self, clock: Clock, parts: list[bytes], gap: float = 1.0) -> None:
        super().__init__()
        self.clock, self.parts, self.gap = clock, parts, gap
        self.finished: list[Any] = []

    def render_GET(self, request: Request) -> int:
        request.setHeader(b"content-type", b"text/plain")
        request.notifyFinish().addBoth(self.finished.append)
        for i, part in enumerate(self.parts):
            self.clock.callLater(i * self.gap, request.write, part)
        self.clock.callLater(len(self.parts) * self.gap, request.finish)
        return NOT_DONE_YET


class SyncThreadPool:
    """
    Runs what a WSGI resource gives its thread pool at once.
    """

    def callInThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


class SyncReactorThreads:
    """
    Runs what a WSGI application's thread hands the reactor at once.
    """

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


class ResourceTests(SynchronousTestCase):
    def test_hello(self) -> None:
        """
        A site whose root has a child C{b"hello"} answers
        C{/{entity}/hello}; the answer comes back on the control channel.
        """
        root, hello = helloSite()
        h = WebHarness(root)
        h.listen()
        control = h.get("/hyco/hello?name=relay")
        sent = response(control)
        self.assertEqual((sent["requestId"], sent["statusCode"], sent["statusDescription"]), ("r1", 200, "OK"))
        self.assertEqual(sent["responseHeaders"]["Content-Type"], "text/plain")
        self.assertIn("Server", sent["responseHeaders"])
        self.assertNotIn("Content-Length", sent["responseHeaders"])
        self.assertNotIn("Transfer-Encoding", sent["responseHeaders"])
        self.assertEqual([op for op, p in control.messages()], [TEXT, BINARY])
        self.assertEqual(body(control), b"hello relay")

    def test_whatTheResourceSees(self) -> None:
        """
        The request keeps the whole target; traversal starts below the
        entity; the client is the sender; the host is the relay.
        """
        root, hello = helloSite()
        h = WebHarness(root)
        h.listen()
        h.get("/hyco/hello?name=relay", headers={"Host": "relay.test:9090", "X-Custom": "v"})
        [request] = hello.requests
        self.assertEqual(request.method, b"GET")
        self.assertEqual((request.uri, request.path), (b"/hyco/hello?name=relay", b"/hyco/hello"))
        self.assertEqual((request.prepath, request.postpath), ([b"hyco", b"hello"], []))
        self.assertEqual(request.sitepath, [b"hyco"])
        self.assertEqual(request.getHeader(b"x-custom"), b"v")
        self.assertEqual(request.getClientAddress(), IPv4Address("TCP", "198.51.100.4", 61544))
        self.assertEqual(request.getHost().port, 9090)
        self.assertEqual(hello.secure, [False])
        self.assertEqual(hello.urls, [b"http://relay.test:9090/hyco/hello"])
        self.assertEqual(request.clientproto, b"HTTP/1.1")

    def test_secureRelay(self) -> None:
        """
        Behind a C{wss} relay, requests are secure and the host is the
        relay's, on 443 unless the URL says otherwise.
        """
        root, hello = helloSite()
        h = Harness()
        control = h.listen()
        control.sendJson(fullRequest(target="/hyco/hello"))
        secure = WebListener(h.reactor, "wss://ns.example.net", "hyco", h.token, root)
        secure.site.doStart()
        secure.handleRequest(h.handler.requests[0])
        [request] = hello.requests
        self.assertEqual(hello.secure, [True])
        self.assertEqual(request.getHost(), IPv4Address("TCP", "ns.example.net", 443))
        self.assertEqual(hello.urls, [b"https://relay.test/hyco/hello"])
        self.assertEqual(body(control), b"hello world")
        secure.site.doStop()

    def test_ipv6Sender(self) -> None:
        root, hello = helloSite()
        h = WebHarness(root)
        h.listen()
        h.get(remote={"address": "2001:db8::7", "port": 443})
        self.assertEqual(hello.requests[0].getClientAddress(), IPv6Address("TCP", "2001:db8::7", 443))

    def test_noRemoteEndpoint(self) -> None:
        root, hello = helloSite()
        h = WebHarness(root)
        h.listen()
        h.get(remote=None)
        self.assertEqual(hello.requests[0].getClientAddress(), IPv4Address("TCP", "0.0.0.0", 0))

    def test_entityWithSlash(self) -> None:
        root, hello = helloSite()
        h = WebHarness(root, entity="a/b")
        h.listen()
        control = h.get("/A/b/hello")
        self.assertEqual(body(control), b"hello world")
        self.assertEqual(hello.requests[0].prepath, [b"A", b"b", b"hello"])

    def test_entityRoot(self) -> None:
        """
        C{/{entity}/} is the site's C{/}.
        """
        root = Resource()
        root.putChild(b"", Data(b"front page", "text/plain"))
        h = WebHarness(root)
        h.listen()
        self.assertEqual(body(h.get("/hyco/")), b"front page")

    def test_notFound(self) -> None:
        root, hello = helloSite()
        h = WebHarness(root)
        h.listen()
        control = h.get("/hyco/nothing")
        self.assertEqual(response(control)["statusCode"], 404)
        self.assertIn(b"No Such Resource", body(control))

    def test_resourceRaises(self) -> None:
        class Broken(Resource):
            isLeaf = True

            def render_GET(self, request: Request) -> bytes:
                raise ValueError("broken")

        h = WebHarness(Broken())
        h.listen()
        control = h.get()
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(response(control)["statusCode"], 500)

    def test_head(self) -> None:
        """
        HEAD on a GET resource: twisted.web fakes it; no body goes back, the
        C{Content-Length} does.
        """
        root, hello = helloSite()
        h = WebHarness(root)
        h.listen()
        control = h.get(method="HEAD")
        sent = response(control)
        self.assertIs(sent["body"], False)
        self.assertEqual(sent["responseHeaders"]["Content-Length"], "11")
        self.assertEqual(len(control.dataFrames()), 1)

    def test_postForm(self) -> None:
        """
        A body that came on the control channel is the request's content,
        with its length; form bodies are parsed into C{args}.
        """
        root, hello = helloSite()
        h = WebHarness(root)
        h.listen()
        control = h.get(
            method="POST", body=True, headers={"Content-Type": "application/x-www-form-urlencoded"}
        )
        control.send(BINARY, b"name=relay&x=1")
        [request] = hello.requests
        self.assertEqual(request.args, {b"name": [b"relay"], b"x": [b"1"]})
        self.assertEqual(request.getHeader(b"content-length"), b"14")
        self.assertEqual(body(control), b"got name=relay&x=1")

    def test_badMultipart(self) -> None:
        root, hello = helloSite()
        h = WebHarness(root)
        h.listen()
        control = h.get(method="POST", body=True, headers={"Content-Type": "multipart/form-data; boundary=x"})
        control.send(BINARY, b"not multipart at all")
        self.assertEqual(response(control)["statusCode"], 400)
        self.assertEqual(hello.requests, [])

    def test_largeBodyOverRendezvous(self) -> None:
        """
        An address-only request is read from its rendezvous, body and all,
        before the resource sees it; the answer goes back there.
        """
        root, hello = helloSite()
        h = WebHarness(root)
        control = h.listen()
        control.sendJson({"request": {"address": address("r2", "hyco"), "id": "r2"}})
        rendezvous = h.rendezvous()
        rendezvous.sendJson(fullRequest("r2", "POST", "/hyco/hello", body=True))
        data = os.urandom(100_000)
        rendezvous.send(BINARY, data[:60000], fin=False)
        self.assertEqual(hello.requests, [])
        rendezvous.send(CONTINUATION, data[60000:], fin=True)
        self.assertEqual(hello.requests[0].getHeader(b"content-length"), b"100000")
        self.assertEqual(rendezvous.commands()[0]["response"]["statusCode"], 200)
        self.assertEqual(body(rendezvous), b"got " + data)
        self.assertEqual(rendezvous.closes(), [1000])
        self.assertEqual(control.dataFrames(), [])

    def test_streamedWritesWithinTwoSeconds(self) -> None:
        """
        A response written in parts and finished soon is sent whole on the
        control channel, without twisted.web's chunk framing.
        """
        h = WebHarness(Resource())
        streamer = Streamer(h.reactor, [b"one ", b"two ", b"three"], gap=0.5)
        h.web.site.resource.putChild(b"hello", streamer)
        h.listen()
        control = h.get()
        h.reactor.pump([0.5] * 4)
        self.assertEqual([op for op, p in control.messages()], [TEXT, BINARY])
        self.assertEqual(body(control), b"one two three")
        self.assertNotIn("Transfer-Encoding", response(control)["responseHeaders"])
        self.assertEqual(streamer.finished, [None])

    def test_slowStream(self) -> None:
        """
        A response still going after two seconds streams over a rendezvous,
        each write as it comes.
        """
        h = WebHarness(Resource())
        gap = FLUSH_DELAY + 0.5
        streamer = Streamer(h.reactor, [b"one ", b"two ", b"three"], gap=gap)
        h.web.site.resource.putChild(b"hello", streamer)
        control = h.listen()
        h.get()
        h.settle()
        h.reactor.advance(FLUSH_DELAY)
        rendezvous = h.rendezvous()
        self.assertEqual([p for fin, op, p in rendezvous.dataFrames()[1:]], [b"one "])
        h.reactor.advance(gap - FLUSH_DELAY)
        self.assertEqual([p for fin, op, p in rendezvous.dataFrames()[1:]], [b"one ", b"two "])
        h.reactor.pump([gap, gap])
        self.assertEqual(
            [(fin, op, p) for fin, op, p in rendezvous.dataFrames()[1:]],
            [(False, BINARY, b"one "), (False, CONTINUATION, b"two "), (False, CONTINUATION, b"three"),
             (True, CONTINUATION, b"")],
        )
        self.assertEqual(rendezvous.closes(), [1000])
        self.assertEqual(control.dataFrames(), [])

    def test_staticFile(self) -> None:
        """
        A static file is sent by a pull producer registered on the request;
        a large one streams over a rendezvous, intact.
        """
        path = self.mktemp()
        data = os.urandom(300_000)
        with open(path, "wb") as f:
            f.write(data)
        root = Resource()
        root.putChild(b"file.bin", File(path, defaultType="application/octet-stream"))
        h = WebHarness(root)
        h.listen()
        h.get("/hyco/file.bin")
        h.settle()
        h.settle()
        rendezvous = h.rendezvous()
        for _ in range(10):
            h.settle()
        self.assertEqual(response(rendezvous)["responseHeaders"]["Content-Type"], "application/octet-stream")
        self.assertEqual(body(rendezvous), data)
        self.assertEqual(rendezvous.closes(), [1000])

    def test_lostRequest(self) -> None:
        """
        When the way back goes, the request hears of it through
        C{notifyFinish}, as when an HTTP client goes away.
        """

        class Waiting(Resource):
            isLeaf = True

            def __init__(self) -> None:
                super().__init__()
                self.outcomes: list[Any] = []
                self.requests: list[Request] = []

            def render_GET(self, request: Request) -> int:
                self.requests.append(request)
                request.notifyFinish().addBoth(self.outcomes.append)
                return NOT_DONE_YET

        waiting = Waiting()
        h = WebHarness(waiting)
        control = h.listen()
        h.get()
        control.drop()
        [outcome] = waiting.outcomes
        self.assertTrue(outcome.check(ConnectionLost))
        request = waiting.requests[0]
        request.write(b"nobody listens")
        self.assertRaises(RuntimeError, request.finish)

    def test_loseConnection(self) -> None:
        class Rude(Resource):
            isLeaf = True

            def render_GET(self, request: Request) -> int:
                request.write(b"x" * 70000)
                request.loseConnection()
                return NOT_DONE_YET

        h = WebHarness(Rude())
        control = h.listen()
        h.get()
        rendezvous = h.rendezvous()
        self.assertEqual(rendezvous.dataFrames(), [])
        self.assertEqual(rendezvous.closes(), [1000])
        self.assertEqual(control.dataFrames(), [])

    def test_sessionCookieName(self) -> None:
        """
        Sessions are the site's, named after where it is mounted.
        """
        class Sessions(Resource):
            isLeaf = True

            def render_GET(self, request: Request) -> bytes:
                request.getSession()
                return b"ok"

        h = WebHarness(Sessions())
        h.listen()
        control = h.get()
        cookie = response(control)["responseHeaders"]["Set-Cookie"]
        self.assertTrue(cookie.startswith("TWISTED_SESSION_hyco="), cookie)
        for session in list(h.web.site.sessions.values()):
            session.expire()

    def test_cookies(self) -> None:
        class Cookies(Resource):
            isLeaf = True

            def render_GET(self, request: Request) -> bytes:
                return request.getCookie(b"flavour") or b"none"

        h = WebHarness(Cookies())
        h.listen()
        control = h.get(headers={"Cookie": "flavour=oat; size=big"})
        self.assertEqual(body(control), b"oat")

    def test_givenSite(self) -> None:
        """
        A L{Site} is used as it is, its request factory included, and is
        started and stopped with the listener.
        """

        class Marked(Request):
            marked = True

        root, hello = helloSite()
        site = Site(root, requestFactory=Marked)
        h = WebHarness(site)
        self.assertIs(h.web.site, site)
        self.assertEqual(site.numPorts, 0)
        control = h.listen()
        self.assertEqual(site.numPorts, 1)
        h.get()
        self.assertTrue(getattr(hello.requests[0], "marked", False))
        closing = h.web.close()
        control.answerClose()
        self.successResultOf(closing)
        self.assertEqual(site.numPorts, 0)

    def test_reconnects(self) -> None:
        """
        The listener underneath reconnects, with tokens for the entity's
        resource; its options (C{onStatus} here) pass through.
        """
        root, hello = helloSite()
        statuses: list[str] = []
        h = WebHarness(root, onStatus=statuses.append)
        h.listen().drop()
        h.settle()
        h.control = h.connection()
        h.control.handshake()
        self.assertEqual(statuses, ["connecting", "online", "reconnecting", "online"])
        self.assertEqual(h.resources, ["http://relay.test:9090/hyco"] * 2)
        self.assertEqual(body(h.get()), b"hello world")

    def test_siteStoppedIfListenFails(self) -> None:
        root, hello = helloSite()
        h = WebHarness(root)
        listening = h.web.listen()
        h.connection().handshake(401, "Unauthorized")
        h.settle()
        self.failureResultOf(listening)
        self.assertEqual(h.web.site.numPorts, 0)


def app(environ: dict[str, Any], startResponse: Any) -> Any:
    """
    A WSGI application that describes its request.
    """
    length = int(environ.get("CONTENT_LENGTH") or 0)
    received = environ["wsgi.input"].read(length)
    seen = {
        key: environ[key]
        for key in (
            "REQUEST_METHOD",
            "SCRIPT_NAME",
            "PATH_INFO",
            "QUERY_STRING",
            "CONTENT_LENGTH",
            "CONTENT_TYPE",
            "REMOTE_ADDR",
            "SERVER_NAME",
            "SERVER_PORT",
            "SERVER_PROTOCOL",
            "HTTP_X_CUSTOM",
            "wsgi.url_scheme",
        )
        if key in environ
    }
    seen["body"] = received.decode("latin-1")
    startResponse("201 Created", [("Content-Type", "application/json"), ("X-App", "wsgi")])
    text = json.dumps(seen).encode()
    return [text[:10], text[10:], b""]


class WSGITests(SynchronousTestCase):
    """
    A WSGI application behind L{WSGIResource}, unchanged.
    """

    def harness(self) -> WebHarness:
        h = WebHarness(WSGIResource(SyncReactorThreads(), SyncThreadPool(), app))  # type: ignore[arg-type]
        h.listen()
        return h

    def test_environ(self) -> None:
        h = self.harness()
        control = h.get(
            "/hyco/api/items?x=1&y=2",
            method="POST",
            body=True,
            headers={"Host": "relay.test:9090", "Content-Type": "text/plain", "X-Custom": "v"},
        )
        control.send(BINARY, b"some text")
        sent = response(control)
        self.assertEqual((sent["statusCode"], sent["statusDescription"]), (201, "Created"))
        self.assertEqual(sent["responseHeaders"]["X-App"], "wsgi")
        self.assertEqual(
            json.loads(body(control)),
            {
                "REQUEST_METHOD": "POST",
                "SCRIPT_NAME": "/hyco",
                "PATH_INFO": "/api/items",
                "QUERY_STRING": "x=1&y=2",
                "CONTENT_LENGTH": "9",
                "CONTENT_TYPE": "text/plain",
                "REMOTE_ADDR": "198.51.100.4",
                "SERVER_NAME": "relay.test",
                "SERVER_PORT": "9090",
                "SERVER_PROTOCOL": "HTTP/1.1",
                "HTTP_X_CUSTOM": "v",
                "wsgi.url_scheme": "http",
                "body": "some text",
            },
        )

    def test_noBody(self) -> None:
        h = self.harness()
        control = h.get("/hyco/")
        seen = json.loads(body(control))
        self.assertEqual((seen["SCRIPT_NAME"], seen["PATH_INFO"], seen["CONTENT_LENGTH"]), ("/hyco", "/", ""))

    def test_largeBody(self) -> None:
        """
        A WSGI application reads a body streamed over a rendezvous.
        """
        h = self.harness()
        h.control.sendJson({"request": {"address": address("r2", "hyco"), "id": "r2"}})
        rendezvous = h.rendezvous()
        rendezvous.sendJson(fullRequest("r2", "PUT", "/hyco/upload", body=True))
        rendezvous.send(BINARY, b"a" * 70000, fin=False)
        rendezvous.send(CONTINUATION, b"b" * 70000, fin=True)
        seen = json.loads(body(rendezvous))
        self.assertEqual(seen["CONTENT_LENGTH"], "140000")
        self.assertEqual(seen["body"], "a" * 70000 + "b" * 70000)


class DechunkerTests(SynchronousTestCase):
    def test_anySplit(self) -> None:
        """
        Chunked coding is undone however the bytes are split.
        """
        encoded = b"4\r\nWiki\r\n6;ext=1\r\npedia \r\nE\r\nin \r\n\r\nchunks.\r\n0\r\nTrailer: x\r\n\r\n"
        for size in (1, 2, 3, 7, len(encoded)):
            parts: list[bytes] = []
            dechunker = _Dechunker(parts.append)
            for start in range(0, len(encoded), size):
                dechunker.feed(encoded[start : start + size])
            self.assertEqual(b"".join(parts), b"Wikipedia in \r\n\r\nchunks.")


class SasHeadersTests(SynchronousTestCase):
    def test_header(self) -> None:
        clock = Clock()
        clock.advance(NOW)
        headers = sasHeaders("http://relay.test:9090/hyco", KEY_NAME, KEY, ttl=120, clock=clock)
        self.assertEqual(list(headers), ["ServiceBusAuthorization"])
        token = Authorizer([Rule(KEY_NAME, KEY)]).authorize(
            headers["ServiceBusAuthorization"], "relay.test", "hyco", Rights.SEND, NOW
        )
        self.assertEqual(token.expiry, NOW + 120)

    def test_defaultClock(self) -> None:
        headers = sasHeaders("http://relay.test/hyco", KEY_NAME, KEY)
        self.assertTrue(headers["ServiceBusAuthorization"].startswith("SharedAccessSignature sr=http%3A%2F%2F"))

"""
The examples in doc/ run as written against a relay: the HTTP tutorial's
twisted.web site and WSGI app, called through the relay.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from relaynet.test.support import KEY, KEY_NAME, NodeScript, RelayFixture
from relaynet.test.test_loopback_http import Bytes

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "doc", "examples")


class TutorialTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.relay = RelayFixture(self, ["--dynamic-entities"])
        self.connection = f"Endpoint=sb://{self.relay.host}/;SharedAccessKeyName={KEY_NAME};SharedAccessKey={KEY}"

    async def serve(self, example: str, entity: str) -> None:
        proto = NodeScript()  # any process whose stdout lines we wait on
        path = os.path.join(EXAMPLES, example)
        process = reactor.spawnProcess(
            proto, sys.executable, [sys.executable, "-u", path, self.connection, entity], env=dict(os.environ)
        )

        def stop() -> Deferred[int]:
            if not proto.ended.called:
                process.signalProcess("INT")
            return proto.ended

        self.addCleanup(stop)
        await proto.line("serving")

    async def call(self, method: bytes, path: str, entity: str, body: bytes | None = None) -> tuple[Any, bytes]:
        headers = Headers({"ServiceBusAuthorization": [self.relay.token(entity)]})
        response = await Agent(reactor).request(
            method, f"http://{self.relay.host}{path}".encode(), headers, Bytes(body) if body is not None else None
        )
        return response, await readBody(response)

    async def test_site(self) -> None:
        await self.serve("hello_site.py", "web")
        response, body = await self.call(b"GET", "/web/hello?x=1", "web")
        self.assertEqual((response.code, body), (200, b"hello 127.0.0.1, you asked for /web/hello?x=1\n"))
        self.assertEqual(response.headers.getRawHeaders("via"), ["1.1 127.0.0.1"])
        response, body = await self.call(b"POST", "/web/hello", "web", os.urandom(300000))
        self.assertEqual(body, b"got 300000 bytes\n")
        response, body = await self.call(b"GET", "/web/", "web")
        self.assertEqual(body, b"the front page\n")

    async def test_wsgi(self) -> None:
        await self.serve("hello_wsgi.py", "app")
        response, body = await self.call(b"GET", "/app/some/path?q=2", "app")
        self.assertEqual(body, b"GET SCRIPT_NAME=/app PATH_INFO=/some/path QUERY_STRING=q=2 from 127.0.0.1, 0 bytes in\n")
        response, body = await self.call(b"POST", "/app/form", "app", b"a=1&b=2")
        self.assertTrue(body.endswith(b"7 bytes in\n"), body)


class StreamExampleTests(TestCase):
    timeout = 60

    async def test_streamEcho(self) -> None:
        from twisted.internet.utils import getProcessOutputAndValue

        relay = RelayFixture(self, ["--dynamic-entities"])
        connection = f"Endpoint=sb://{relay.host}/;SharedAccessKeyName={KEY_NAME};SharedAccessKey={KEY}"
        out, err, code = await getProcessOutputAndValue(
            sys.executable, [os.path.join(EXAMPLES, "stream_echo.py"), connection, "echo"], env=dict(os.environ), reactor=reactor
        )
        self.assertEqual(code, 0, err)
        self.assertIn(b"answer: hello through the relay", out)
        self.assertIn(b"listener is online", out)

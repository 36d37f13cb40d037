"""
Unmodified Node C{hyco-https} listeners (npm 1.4.5) as subscribers of an
event entity, with events published by HTTP POST.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from relaynet.test.support import KEY, KEY_NAME, NodeScript, RelayFixture, requireNode, spawnNode
from relaynet.test.test_loopback_http import Bytes

SUBSCRIBERS = 3
EVENTS = 20


class HycoHttpsSubscriberTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        requireNode(self, "hyco-https")
        self.relay = RelayFixture(self, ["--event", "news"])

    def spawn(self, script: str, *args: str) -> NodeScript:
        return spawnNode(self, script, "--deadline", "60", *args)

    async def subscriber(self) -> NodeScript:
        proto = self.spawn(
            "hyco_https_listener.js", "--relay", f"ws://{self.relay.host}", "--entity", "news",
            "--key-name", KEY_NAME, "--key", KEY,
        )
        await proto.line("READY")
        return proto

    async def publish(self, path: str, body: bytes) -> tuple[Any, bytes]:
        headers = Headers({"ServiceBusAuthorization": [self.relay.token("news")], "Content-Type": ["text/plain"]})
        response = await Agent(reactor).request(b"POST", f"http://{self.relay.host}{path}".encode(), headers, Bytes(body))
        return response, await readBody(response)

    async def test_everyListenerGetsEveryEventInOrder(self) -> None:
        """
        Each of 3 hyco-https listeners gets all 20 events published by HTTP
        POST, in publish order; each POST answers 202 with
        C{Relay-Delivered-To: 3}.
        """
        subscribers = [await self.subscriber() for _ in range(SUBSCRIBERS)]
        paths = [f"/news/echo?n={i:02d}" for i in range(EVENTS)]
        for i, path in enumerate(paths):
            response, body = await self.publish(path, b"event %02d from python" % i)
            self.assertEqual(response.code, 202, body)
            self.assertEqual(response.headers.getRawHeaders("relay-delivered-to"), [str(SUBSCRIBERS)])
        expected = [f"REQUEST POST {path}" for path in paths]

        def seen(proto: NodeScript) -> list[str]:
            return [line for line in proto.lines if line.startswith("REQUEST ")]

        for _ in range(500):  # at most 10 s
            if all(len(seen(s)) >= EVENTS for s in subscribers):
                break
            await deferLater(reactor, 0.02, lambda: None)
        for proto in subscribers:
            self.assertEqual(seen(proto), expected, proto.stderr.decode(errors="replace")[-2000:])
            self.assertFalse(proto.ended.called, proto.stderr.decode(errors="replace")[-2000:])

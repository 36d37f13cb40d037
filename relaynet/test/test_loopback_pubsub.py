"""
Events (publish/subscribe) and one-way messages over real sockets on
127.0.0.1, with autobahn subscribers and publishers.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from relaynet.test.support import Client, RelayFixture
from relaynet.test.test_loopback_http import Bytes


class Subscriber(Client):
    """
    Keeps the bodies of the events it gets, in order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.events: list[bytes] = []
        self.requests: list[dict[str, Any]] = []
        self._expectBody = False

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._expectBody:
            self._expectBody = False
            self.events.append(payload)
            return
        if not isBinary:
            request = json.loads(payload).get("request")
            if request is not None:
                self.requests.append(request)
                self._expectBody = bool(request.get("body"))


async def settle(condition: Any, limit: float = 20) -> None:
    waited = 0.0
    while not condition() and waited < limit:
        await deferLater(reactor, 0.02, lambda: None)
        waited += 0.02


async def subscribe(relay: RelayFixture, entity: str = "news") -> Subscriber:
    subscriber = relay.connect(relay.url(entity, "listen", relay.token(entity)), protocolClass=Subscriber)
    await subscriber.opened
    return subscriber


async def post(relay: RelayFixture, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[Any, bytes]:
    allHeaders = Headers({k: [v] for k, v in (headers or {}).items()})
    allHeaders.setRawHeaders("ServiceBusAuthorization", [relay.token(path.strip("/").split("/")[0])])
    response = await Agent(reactor).request(b"POST", f"http://{relay.host}{path}".encode(), allHeaders, Bytes(body))
    return response, await readBody(response)


class EventTests(TestCase):
    timeout = 120

    def relay(self, *args: str) -> RelayFixture:
        return RelayFixture(self, ["--event", "news", "--entity", "work", *args])

    async def subscribe(self, relay: RelayFixture, entity: str = "news") -> Subscriber:
        return await subscribe(relay, entity)

    async def post(self, relay: RelayFixture, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[Any, bytes]:
        return await post(relay, path, body, headers)

    async def test_everySubscriberGetsEveryEventInOrder(self) -> None:
        """
        100 subscribers each get all of 1,000 events from a WebSocket
        publisher, in the publisher's order.
        """
        relay = self.relay()
        subscribers = [await self.subscribe(relay) for _ in range(100)]
        publisher = relay.connect(relay.url("news", "connect", relay.token("news")))
        await publisher.opened
        events = [b"event %04d " % i + b"x" * 100 for i in range(1000)]
        for event in events:
            publisher.sendMessage(event, isBinary=True)
        await settle(lambda: all(len(s.events) == 1000 for s in subscribers), 60)
        for subscriber in subscribers:
            self.assertEqual(subscriber.events, events)
        request = subscribers[0].requests[0]
        self.assertEqual((request["method"], request["requestTarget"]), ("POST", "/news"))

    async def test_httpPublish(self) -> None:
        relay = self.relay()
        subscribers = [await self.subscribe(relay) for _ in range(3)]
        response, body = await self.post(relay, "/news/sports?x=1", b'{"score": 3}', {"Content-Type": "application/json"})
        self.assertEqual(response.code, 202)
        self.assertEqual(response.headers.getRawHeaders("relay-delivered-to"), ["3"])
        self.assertEqual(json.loads(body), {"deliveredTo": 3})
        await settle(lambda: all(s.events for s in subscribers))
        for subscriber in subscribers:
            self.assertEqual(subscriber.events, [b'{"score": 3}'])
            self.assertEqual(subscriber.requests[0]["requestTarget"], "/news/sports?x=1")
            self.assertEqual(subscriber.requests[0]["requestHeaders"]["Content-Type"], "application/json")

    async def test_noSubscribers(self) -> None:
        relay = self.relay()
        response, body = await self.post(relay, "/news", b"nobody")
        self.assertEqual((response.code, json.loads(body)["deliveredTo"]), (202, 0))

    async def test_slowSubscriberCutOff(self) -> None:
        """
        A subscriber that stops reading is cut off with the number of events
        it missed; the others get everything, and the publisher is never
        held up.
        """
        relay = self.relay("--subscriber-outbox", "50")
        slow = await self.subscribe(relay)
        slow.transport.pauseProducing()
        fast = [await self.subscribe(relay) for _ in range(3)]
        events = [bytes([i % 256]) * 16384 for i in range(600)]
        for event in events[:5]:
            response, _ = await self.post(relay, "/news", event)
            self.assertEqual(response.code, 202)
        publisher = relay.connect(relay.url("news", "connect", relay.token("news")))
        await publisher.opened
        for event in events[5:]:
            publisher.sendMessage(event, isBinary=True)
        await settle(lambda: all(len(s.events) == 600 for s in fast), 60)
        for subscriber in fast:
            self.assertEqual(subscriber.events, events)
        slow.transport.resumeProducing()
        await slow.closed
        self.assertEqual(slow.remoteCloseCode, 4008)
        self.assertRegex(slow.remoteCloseReason, r"^Fell behind: \d+ events missed\.$")
        missed = int(slow.remoteCloseReason.split()[2])
        self.assertLessEqual(len(slow.events) + missed, 600)
        self.assertGreater(missed, 0)
        self.assertEqual(slow.events, events[: len(slow.events)])
        # Still answered at once while the slow one was falling behind.
        response, _ = await self.post(relay, "/news", b"after")
        self.assertEqual(response.headers.getRawHeaders("relay-delivered-to"), ["3"])

    async def test_oversized(self) -> None:
        relay = self.relay("--max-event-size", "1000")
        await self.subscribe(relay)
        response, body = await self.post(relay, "/news", b"x" * 1001)
        self.assertEqual(response.code, 413)
        publisher = relay.connect(relay.url("news", "connect", relay.token("news")))
        await publisher.opened
        publisher.sendMessage(b"y" * 1001, isBinary=True)
        await publisher.closed
        self.assertEqual(publisher.remoteCloseCode, 1009)

    async def test_onlyPost(self) -> None:
        relay = self.relay()
        response = await Agent(reactor).request(
            b"GET", f"http://{relay.host}/news".encode(), Headers({"ServiceBusAuthorization": [relay.token("news")]})
        )
        self.assertEqual(response.code, 405)
        await readBody(response)


class OneWayTests(TestCase):
    timeout = 60

    async def test_oneListenerGetsIt(self) -> None:
        relay = RelayFixture(self, ["--entity", "work"])
        listeners = [await subscribe(relay, "work") for _ in range(3)]
        for i in range(30):
            response, _ = await post(relay, "/work/job", b"job %d" % i, {"Relay-Oneway": "true"})
            self.assertEqual(response.code, 202)
        await settle(lambda: sum(len(l.events) for l in listeners) == 30)
        self.assertEqual(sorted(e for l in listeners for e in l.events), sorted(b"job %d" % i for i in range(30)))
        self.assertTrue(all(l.events for l in listeners), [len(l.events) for l in listeners])

    async def test_noListener(self) -> None:
        relay = RelayFixture(self, ["--entity", "work"])
        response, body = await post(relay, "/work", b"x", {"Relay-Oneway": "1"})
        self.assertEqual(response.code, 404)

    async def test_saturated(self) -> None:
        """
        When every listener's outbox is full, the sender gets 503 with
        Retry-After at once.
        """
        relay = RelayFixture(self, ["--entity", "work", "--subscriber-outbox", "2"])
        listener = await subscribe(relay, "work")
        listener.transport.pauseProducing()
        codes = []
        for _ in range(400):
            response, _ = await post(relay, "/work", b"z" * 60000, {"Relay-Oneway": "1"})
            codes.append(response.code)
            if response.code == 503:
                self.assertEqual(response.headers.getRawHeaders("retry-after"), ["1"])
                break
        self.assertEqual(codes[-1], 503)
        self.assertTrue(all(code == 202 for code in codes[:-1]))

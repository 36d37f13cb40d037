"""
Tests for L{relaynet.events}, against a real relay on 127.0.0.1.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from relaynet.events import EventPublisher, EventSubscriber, OneWayReceiver, OneWaySender, PublishError, _Poster
from relaynet.protocols.control import ControlChannel
from relaynet.protocols.pubsub import EVENT_ID_PREFIX
from relaynet.test.support import KEY, KEY_NAME, RelayFixture
from relaynet.tokens import fromKey


async def settle(condition: object, limit: float = 20) -> None:
    waited = 0.0
    while not condition() and waited < limit:  # type: ignore[operator]
        await deferLater(reactor, 0.02, lambda: None)
        waited += 0.02


class Collector(EventSubscriber):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.events: list[tuple[bytes, dict[str, str]]] = []

    def eventReceived(self, body: bytes, headers: dict[str, str]) -> None:
        self.events.append((body, headers))


class Failing(Collector):
    """
    Raises on every other event.
    """

    def eventReceived(self, body: bytes, headers: dict[str, str]) -> None:
        super().eventReceived(body, headers)
        if len(self.events) % 2:
            raise ValueError("boom")


class Worker(OneWayReceiver):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.messages: list[bytes] = []

    def messageReceived(self, body: bytes, headers: dict[str, str]) -> None:
        self.messages.append(body)


class Base(TestCase):
    timeout = 60

    def start(self, *args: str) -> RelayFixture:
        self.relay = RelayFixture(self, ["--event", "news", "--entity", "work", *args])
        self.base = f"ws://{self.relay.host}"
        self.tokens = fromKey(KEY_NAME, KEY, reactor)
        return self.relay

    def startRecording(self) -> list[dict[str, Any]]:
        """
        Start the relay, and record the responses its control channels get.
        """
        self.start()
        answers: list[dict[str, Any]] = []
        original = ControlChannel._response

        def recording(channel: ControlChannel, response: dict[str, Any]) -> None:
            answers.append(response)
            original(channel, response)

        self.patch(ControlChannel, "_response", recording)
        return answers

    async def listening(self, cls: type, entity: str) -> object:
        listener = cls(reactor, self.base, entity, self.tokens)
        await listener.listen()
        self.addCleanup(listener.close)
        return listener


class EventTests(Base):
    async def test_inOrder(self) -> None:
        """
        Every subscriber gets every event, in order, with the publisher's
        content type; C{publish} fires with the number of subscribers.
        """
        self.start()
        subscribers = [await self.listening(Collector, "news") for _ in range(3)]
        publisher = EventPublisher(reactor, self.base, "news", self.tokens)
        events = [b"event %d" % i for i in range(50)]
        for event in events:
            self.assertEqual(await publisher.publish(event, "text/plain"), 3)
        await settle(lambda: all(len(s.events) == 50 for s in subscribers))  # type: ignore[attr-defined]
        for s in subscribers:
            self.assertEqual([b for b, _ in s.events], events)  # type: ignore[attr-defined]
            self.assertEqual(s.events[0][1].get("Content-Type"), "text/plain")  # type: ignore[attr-defined]

    async def test_extraHeaders(self) -> None:
        self.start()
        subscriber = await self.listening(Collector, "news")
        publisher = EventPublisher(reactor, self.base, "news", self.tokens)
        await publisher.publish(b"{}", "application/json", {"X-Topic": "sports"})
        await settle(lambda: subscriber.events)  # type: ignore[attr-defined]
        body, headers = subscriber.events[0]  # type: ignore[attr-defined]
        self.assertEqual((body, headers.get("X-Topic"), headers.get("Content-Type")), (b"{}", "sports", "application/json"))

    async def test_noSubscribers(self) -> None:
        self.start()
        publisher = EventPublisher(reactor, self.base, "news", self.tokens)
        self.assertEqual(await publisher.publish(b"nobody"), 0)

    async def test_failingSubscriberKeepsGoing(self) -> None:
        """
        An exception in C{eventReceived} is logged; the subscription goes on.
        """
        self.start()
        subscriber = await self.listening(Failing, "news")
        publisher = EventPublisher(reactor, self.base, "news", self.tokens)
        for i in range(4):
            self.assertEqual(await publisher.publish(b"%d" % i), 1)
        await settle(lambda: len(subscriber.events) == 4)  # type: ignore[attr-defined]
        self.assertEqual([b for b, _ in subscriber.events], [b"0", b"1", b"2", b"3"])  # type: ignore[attr-defined]
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 2)

    async def test_eventsUnanswered(self) -> None:
        """
        A subscriber sends no answer to an event: the relay wants none.
        """
        answers = self.startRecording()
        subscriber = await self.listening(Collector, "news")
        publisher = EventPublisher(reactor, self.base, "news", self.tokens)
        for i in range(5):
            await publisher.publish(b"%d" % i)
        await settle(lambda: len(subscriber.events) == 5)  # type: ignore[attr-defined]
        await deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(len(subscriber.events), 5)  # type: ignore[attr-defined]
        self.assertEqual(answers, [])
        self.assertEqual(subscriber.listener._inFlight, set())  # type: ignore[attr-defined]

    async def test_slowSubscriber(self) -> None:
        """
        A subscriber that stops reading does not hold up the others.
        """
        self.start("--subscriber-outbox", "20")
        slow = await self.listening(Collector, "news")
        slow.listener._control.transport.pauseProducing()  # type: ignore[attr-defined]
        fast = [await self.listening(Collector, "news") for _ in range(2)]
        publisher = EventPublisher(reactor, self.base, "news", self.tokens)
        events = [bytes([i % 256]) * 16384 for i in range(300)]
        for event in events:
            self.assertGreaterEqual(await publisher.publish(event), 2)
        await settle(lambda: all(len(s.events) == 300 for s in fast), 40)  # type: ignore[attr-defined]
        for s in fast:
            self.assertEqual([b for b, _ in s.events], events)  # type: ignore[attr-defined]
        control = slow.listener._control  # type: ignore[attr-defined]
        if control is not None and control.transport is not None:
            control.transport.resumeProducing()

    async def test_oversized(self) -> None:
        self.start("--max-event-size", "100")
        await self.listening(Collector, "news")
        publisher = EventPublisher(reactor, self.base, "news", self.tokens)
        self.assertEqual(await publisher.publish(b"x" * 100), 1)
        error = await self.assertFailure(publisher.publish(b"x" * 101), PublishError)
        self.assertEqual(error.status, 413)
        self.assertIn("100", error.message)


    async def test_largeEvent(self) -> None:
        """
        An event larger than a megabyte, allowed by the relay's
        C{--max-event-size}, reaches a subscriber whole on its control
        channel, which stays up.
        """
        self.start("--max-event-size", str(2 * 1024 * 1024))
        subscriber = await self.listening(Collector, "news")
        control = subscriber.listener._control  # type: ignore[attr-defined]
        publisher = EventPublisher(reactor, self.base, "news", self.tokens)
        event = os.urandom(1536 * 1024)
        self.assertEqual(await publisher.publish(event), 1)
        await settle(lambda: subscriber.events, 10)  # type: ignore[attr-defined]
        self.assertEqual([b for b, _ in subscriber.events], [event])  # type: ignore[attr-defined]
        self.assertIs(subscriber.listener._control, control)  # type: ignore[attr-defined]

class OneWayTests(Base):
    async def test_exactlyOnce(self) -> None:
        """
        Each message reaches exactly one of two receivers.
        """
        self.start()
        workers = [await self.listening(Worker, "work") for _ in range(2)]
        sender = OneWaySender(reactor, self.base, "work", self.tokens)
        sent = [b"job %d" % i for i in range(40)]
        for body in sent:
            self.assertIsNone(await sender.send(body))
        await settle(lambda: sum(len(w.messages) for w in workers) >= 40)  # type: ignore[attr-defined]
        await deferLater(reactor, 0.2, lambda: None)
        got = [m for w in workers for m in w.messages]  # type: ignore[attr-defined]
        self.assertEqual(sorted(got), sorted(sent))

    async def test_answersOnlyWhatIsWaitedOn(self) -> None:
        """
        One-way messages go unanswered; an ordinary request to the same
        receiver is answered 202.  Its answer comes after wherever the
        one-way messages' answers would have been, on the same control
        channel.
        """
        answers = self.startRecording()
        worker = await self.listening(Worker, "work")
        sender = OneWaySender(reactor, self.base, "work", self.tokens)
        for i in range(3):
            await sender.send(b"one-way %d" % i)
        await settle(lambda: len(worker.messages) == 3)  # type: ignore[attr-defined]
        response = await _Poster(reactor, self.base, "work", self.tokens)._post(b"plain", "text/plain", None)
        self.assertEqual(response.code, 202)
        self.assertEqual(worker.messages, [b"one-way 0", b"one-way 1", b"one-way 2", b"plain"])  # type: ignore[attr-defined]
        [answer] = answers
        self.assertEqual(answer["statusCode"], 202)
        self.assertFalse(answer["requestId"].startswith(EVENT_ID_PREFIX))

    async def test_noReceiver(self) -> None:
        self.start()
        sender = OneWaySender(reactor, self.base, "work", self.tokens)
        error = await self.assertFailure(sender.send(b"x"), PublishError)
        self.assertEqual(error.status, 404)

    async def test_saturated(self) -> None:
        """
        When every receiver is behind, the sender gets 503 with
        C{retryAfter}.
        """
        self.start("--subscriber-outbox", "2")
        worker = await self.listening(Worker, "work")
        control = worker.listener._control  # type: ignore[attr-defined]
        control.transport.pauseProducing()
        sender = OneWaySender(reactor, self.base, "work", self.tokens)
        error = None
        for _ in range(300):
            try:
                await sender.send(b"x" * 60000)
            except PublishError as e:
                error = e
                break
        control.transport.resumeProducing()
        assert error is not None
        self.assertEqual(error.status, 503)
        self.assertIsNotNone(error.retryAfter)

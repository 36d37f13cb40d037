# -*- test-case-name: relaynet.test.test_registry -*-
"""
Tests for L{relaynet.registry}.
"""

from __future__ import annotations

import os
import re
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from relaynet.entities import Entity
from relaynet.errors import NoListeners, QuotaExceeded
from relaynet.registry import (
    IListenerChannel,
    IListenerRegistry,
    MemoryRegistry,
    RendezvousTable,
    RandomPool,
    newConnectionId,
)


@implementer(IListenerChannel)
class _Channel:
    rendezvousBase = "ws://relay.test"

    def __init__(self, listenerId: str) -> None:
        self.listenerId = listenerId
        self.sent: list[dict[str, Any]] = []
        self.bodies: list[bytes | None] = []
        self.room = True

    def sendCommand(self, command: dict[str, Any], body: bytes | None = None) -> None:
        self.sent.append(command)
        self.bodies.append(body)

    def offer(self, command: dict[str, Any], body: bytes | None = None) -> bool:
        if not self.room:
            return False
        self.sendCommand(command, body)
        return True

    def hasRoom(self) -> bool:
        return self.room


class MemoryRegistryTests(SynchronousTestCase):
    def test_interfaces(self) -> None:
        self.assertTrue(verifyObject(IListenerRegistry, MemoryRegistry()))
        self.assertTrue(verifyObject(IListenerChannel, _Channel("a")))

    def test_registerUpToMaximum(self) -> None:
        registry, entity = MemoryRegistry(), Entity(name="hyco", maxListeners=2)
        self.successResultOf(registry.register(entity, _Channel("a")))
        self.successResultOf(registry.register(entity, _Channel("b")))
        error = self.failureResultOf(registry.register(entity, _Channel("c")), QuotaExceeded).value
        self.assertEqual(error.status, 403)
        self.assertIn("MaximumListenersPerEndpoint", error.reason)
        self.assertEqual(registry.listenerCount(entity), 2)

    def test_limitIsPerEntity(self) -> None:
        registry = MemoryRegistry()
        one, two = Entity(name="one", maxListeners=1), Entity(name="two", maxListeners=1)
        self.successResultOf(registry.register(one, _Channel("a")))
        self.successResultOf(registry.register(two, _Channel("b")))
        self.assertEqual((registry.listenerCount(one), registry.listenerCount(two)), (1, 1))

    def test_entitiesMatchCaseInsensitively(self) -> None:
        registry, channel = MemoryRegistry(), _Channel("a")
        self.successResultOf(registry.register(Entity(name="HyCo"), channel))
        self.assertEqual(registry.listenerCount(Entity(name="hyco")), 1)

    def test_unregisterSaysWhenEmpty(self) -> None:
        registry, entity = MemoryRegistry(), Entity(name="hyco")
        a, b = _Channel("a"), _Channel("b")
        registry.register(entity, a), registry.register(entity, b)
        self.assertFalse(registry.unregister(entity, a))
        self.assertTrue(registry.unregister(entity, b))
        self.assertEqual(registry.listenerCount(entity), 0)

    def test_unregisterUnknownIgnored(self) -> None:
        registry, entity = MemoryRegistry(), Entity(name="hyco")
        registry.register(entity, _Channel("a"))
        self.assertFalse(registry.unregister(entity, _Channel("stranger")))
        self.assertEqual(registry.listenerCount(entity), 1)
        self.assertTrue(registry.unregister(Entity(name="other"), _Channel("x")))

    def test_unregisterFreesAPlace(self) -> None:
        registry, entity = MemoryRegistry(), Entity(name="hyco", maxListeners=1)
        a = _Channel("a")
        registry.register(entity, a)
        registry.unregister(entity, a)
        self.successResultOf(registry.register(entity, _Channel("b")))

    def test_deliverWithoutListeners(self) -> None:
        registry, entity = MemoryRegistry(), Entity(name="hyco")
        made: list[Any] = []
        error = self.failureResultOf(registry.deliver(entity, made.append), NoListeners).value
        self.assertEqual(error.status, 404)
        self.assertIn("no listeners connected", error.reason)
        self.assertEqual(made, [])

    def test_deliverAfterLastListenerLeft(self) -> None:
        registry, entity = MemoryRegistry(), Entity(name="hyco")
        a = _Channel("a")
        registry.register(entity, a)
        registry.unregister(entity, a)
        self.failureResultOf(registry.deliver(entity, lambda c: {}), NoListeners)

    def test_deliverToTheChosenListener(self) -> None:
        offered: list[list[IListenerChannel]] = []

        def choose(channels: list[IListenerChannel]) -> IListenerChannel:
            offered.append(list(channels))
            return channels[1]

        registry, entity = MemoryRegistry(choose), Entity(name="hyco")
        a, b = _Channel("a"), _Channel("b")
        registry.register(entity, a), registry.register(entity, b)
        chosen = self.successResultOf(
            registry.deliver(entity, lambda channel: {"accept": {"for": channel.listenerId}})
        )
        self.assertIs(chosen, b)
        self.assertEqual(offered, [[a, b]])
        self.assertEqual(b.sent, [{"accept": {"for": "b"}}])
        self.assertEqual(a.sent, [])

    def test_deliverWithBody(self) -> None:
        """
        A body given to deliver goes with the command to the same listener.
        """
        registry, entity = MemoryRegistry(), Entity(name="hyco")
        channel = _Channel("a")
        registry.register(entity, channel)
        self.successResultOf(registry.deliver(entity, lambda c: {"request": {}}, b"payload"))
        self.assertEqual((channel.sent, channel.bodies), ([{"request": {}}], [b"payload"]))


class MessageDeliveryTests(SynchronousTestCase):
    """
    Events to every listener, one-way messages to one with room.
    """

    def test_broadcastCountsWhoTookIt(self) -> None:
        registry, entity = MemoryRegistry(), Entity(name="news", kind="event")
        full, a, b = _Channel("full"), _Channel("a"), _Channel("b")
        full.room = False
        for channel in (full, a, b):
            registry.register(entity, channel)
        count = self.successResultOf(registry.broadcast(entity, lambda c: {"request": {"for": c.listenerId}}, b"e"))
        self.assertEqual(count, 2)
        self.assertEqual((a.sent, b.sent, full.sent), ([{"request": {"for": "a"}}], [{"request": {"for": "b"}}], []))

    def test_oneWayToOneWithRoom(self) -> None:
        registry, entity = MemoryRegistry(), Entity(name="work")
        full, free = _Channel("full"), _Channel("free")
        full.room = False
        registry.register(entity, full), registry.register(entity, free)
        for _ in range(10):
            self.assertIs(self.successResultOf(registry.deliverOneWay(entity, lambda c: {"request": {}}, b"m")), free)
        self.assertEqual(len(free.sent), 10)

    def test_oneWayAllFullIs503(self) -> None:
        registry, entity = MemoryRegistry(), Entity(name="work")
        full = _Channel("full")
        full.room = False
        registry.register(entity, full)
        failure = self.failureResultOf(registry.deliverOneWay(entity, lambda c: {}, None))
        self.assertEqual(failure.value.status, 503)

    def test_oneWayNoListenerIs404(self) -> None:
        failure = self.failureResultOf(MemoryRegistry().deliverOneWay(Entity(name="work"), lambda c: {}, None))
        self.assertEqual(failure.value.status, 404)


class RendezvousTableTests(SynchronousTestCase):
    def test_takeBeforeDeadline(self) -> None:
        clock, expired = Clock(), []
        table: RendezvousTable[str] = RendezvousTable(clock, limit=10)
        self.assertTrue(table.add("id1", "sender", 30, expired.append))
        self.assertEqual(len(table), 1)
        self.assertEqual(table.take("id1"), "sender")
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(60)
        self.assertEqual(expired, [])
        self.assertEqual(len(table), 0)

    def test_takeTwiceOrUnknown(self) -> None:
        table: RendezvousTable[str] = RendezvousTable(Clock(), limit=10)
        table.add("id1", "sender", 30, lambda w: None)
        table.take("id1")
        self.assertIsNone(table.take("id1"))
        self.assertIsNone(table.take("nope"))

    def test_expiryCallsBackOnceAndRemoves(self) -> None:
        clock, expired = Clock(), []
        table: RendezvousTable[str] = RendezvousTable(clock, limit=10)
        table.add("id1", "sender", 30, expired.append)
        clock.advance(29.9)
        self.assertEqual(expired, [])
        clock.advance(0.1)
        self.assertEqual(expired, ["sender"])
        self.assertEqual(len(table), 0)
        self.assertIsNone(table.take("id1"))
        clock.advance(100)
        self.assertEqual(expired, ["sender"])

    def test_eachWaiterHasItsOwnDeadline(self) -> None:
        clock, expired = Clock(), []
        table: RendezvousTable[str] = RendezvousTable(clock, limit=10)
        table.add("a", "first", 10, expired.append)
        table.add("b", "second", 20, expired.append)
        clock.advance(10)
        self.assertEqual(expired, ["first"])
        self.assertEqual(table.take("b"), "second")

    def test_limitRefusesAdds(self) -> None:
        clock, expired = Clock(), []
        table: RendezvousTable[str] = RendezvousTable(clock, limit=2)
        self.assertTrue(table.add("a", "1", 30, expired.append))
        self.assertTrue(table.add("b", "2", 30, expired.append))
        self.assertFalse(table.add("c", "3", 30, expired.append))
        self.assertEqual(len(table), 2)
        self.assertEqual(len(clock.getDelayedCalls()), 2)
        self.assertIsNone(table.take("c"))
        table.take("a")
        self.assertTrue(table.add("c", "3", 30, expired.append))


class NewConnectionIdTests(SynchronousTestCase):
    def test_keepsClientIdPrefix(self) -> None:
        self.assertTrue(newConnectionId("7a3c-tracking").startswith("7a3c-tracking_G"))

    def test_differentEachCall(self) -> None:
        ids = {newConnectionId("same") for _ in range(1000)}
        self.assertEqual(len(ids), 1000)

    def test_randomPartIsLong(self) -> None:
        """
        The id is the only credential of an accept: its random part has at
        least 80 bits.
        """
        suffix = newConnectionId("client").split("_G", 1)[1]
        self.assertGreaterEqual(len(suffix) * 4, 80)
        self.assertTrue(re.fullmatch(r"[0-9a-f]+", suffix))

    def test_withoutClientId(self) -> None:
        first, second = newConnectionId(None), newConnectionId(None)
        self.assertIn("_G", first)
        self.assertNotEqual(first.split("_G")[0], second.split("_G")[0])
        self.assertNotEqual(first, second)


class RandomPoolTests(SynchronousTestCase):
    """
    L{RandomPool} hands out each pooled random byte once.
    """

    def test_poolRefillsAndNeverRepeats(self) -> None:
        draw = RandomPool(size=64).hex
        values = [draw(12) for _ in range(200)]
        self.assertTrue(all(re.fullmatch(r"[0-9a-f]{24}", v) for v in values))
        self.assertEqual(len(set(values)), 200)
        self.assertEqual(len(draw(100)), 200)
        self.assertEqual(len(RandomPool(size=8).take(5) + RandomPool(size=8).take(20)), 25)

    def test_forkedChildStartsAfresh(self) -> None:
        """
        A child forked with bytes left in the pool does not hand out the
        parent's next values.
        """
        draw = RandomPool().hex
        draw(1)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.write(write, draw(16).encode())
            finally:
                os._exit(0)
        os.close(write)
        self.addCleanup(os.close, read)
        os.waitpid(pid, 0)
        child = os.read(read, 64).decode()
        self.assertEqual(len(child), 32)
        self.assertNotEqual(child, draw(16))

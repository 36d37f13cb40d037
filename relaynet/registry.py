# -*- test-case-name: relaynet.test.test_registry -*-
"""
Where listeners are: the listener registry, and the senders waiting for a
listener to come to the rendezvous.

The protocols only see L{IListenerRegistry}; the in-memory
L{MemoryRegistry} serves one node, and a shared one (Redis) can take its place
for a cluster without touching them.
"""

from __future__ import annotations

import os
import random
from typing import Any, Callable, Generic, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import Attribute, Interface, implementer

from relaynet.entities import Entity
from relaynet.errors import NoListeners, QuotaExceeded, ServerBusy

__all__ = [
    "IListenerChannel",
    "IListenerRegistry",
    "MemoryRegistry",
    "RendezvousTable",
    "newConnectionId",
]


class IListenerChannel(Interface):
    """
    A listener's control channel, as the registry sees it.
    """

    listenerId = Attribute("The id the listener gave (C{sb-hc-id}) or one made for it.")
    rendezvousBase = Attribute("Scheme and authority of the relay as the listener reaches it, e.g. wss://relay:443.")

    def offer(command: dict[str, Any] | bytes, body: bytes | None = None) -> bool:
        """
        Queue a command (as a dict, or already encoded) and its body in the
        listener's outbox.

        @return: C{False} if the outbox was full.
        """

    def hasRoom() -> bool:
        """
        Whether the listener's outbox can take another message.
        """

    def sendCommand(command: dict[str, Any] | bytes, body: bytes | None = None) -> None:
        """
        Send one JSON command (C{accept} or C{request}, a dict or already
        encoded) to the listener, and C{body}, if given, as the binary
        message right after it.
        """


class IListenerRegistry(Interface):
    """
    The listeners of every entity.
    """

    def register(entity: Entity, channel: IListenerChannel) -> Deferred[None]:
        """
        Add a listener to C{entity}.

        @return: a L{Deferred} that fails with L{QuotaExceeded} when the
            entity already has its maximum of listeners.
        """

    def unregister(entity: Entity, channel: IListenerChannel) -> bool:
        """
        Remove a listener; a listener not registered is ignored.

        @return: C{True} if the entity has no listeners left.
        """

    def deliver(
        entity: Entity, makeCommand: Callable[[IListenerChannel], dict[str, Any] | bytes], body: bytes | None = None
    ) -> Deferred[IListenerChannel]:
        """
        Send a command to one listener of C{entity}, chosen at random.

        @param makeCommand: makes the command for the listener chosen (its
            rendezvous address depends on where the listener is).

        @return: a L{Deferred} firing with the listener chosen, or failing
            with L{NoListeners}.
        """

    def listenerCount(entity: Entity) -> int:
        """
        How many listeners C{entity} has.
        """

    def broadcast(
        entity: Entity, makeCommand: Callable[[IListenerChannel], dict[str, Any] | bytes], body: bytes | None
    ) -> Deferred[int]:
        """
        Offer a command to every listener of C{entity} (an event).

        @return: how many took it.
        """

    def deliverOneWay(
        entity: Entity, makeCommand: Callable[[IListenerChannel], dict[str, Any] | bytes], body: bytes | None
    ) -> Deferred[IListenerChannel]:
        """
        Offer a command to one listener with room for it, chosen at random.

        @return: the listener, or a failure: L{NoListeners}, or
            L{ServerBusy} if every listener's outbox is full.
        """


@implementer(IListenerRegistry)
class MemoryRegistry:
    """
    The listeners of one relay node, in memory.
    """

    def __init__(self, choose: Callable[[list[IListenerChannel]], IListenerChannel] = random.choice) -> None:
        self._listeners: dict[str, list[IListenerChannel]] = {}
        self._choose = choose

    def register(self, entity: Entity, channel: IListenerChannel) -> Deferred[None]:
        channels = self._listeners.setdefault(entity.key, [])
        if len(channels) >= entity.listenerLimit:
            return fail(
                QuotaExceeded(
                    f"The number of listeners for {entity.name} reached its maximum "
                    f"(MaximumListenersPerEndpoint: {entity.listenerLimit})."
                )
            )
        channels.append(channel)
        return succeed(None)

    def unregister(self, entity: Entity, channel: IListenerChannel) -> bool:
        channels = self._listeners.get(entity.key, [])
        if channel in channels:
            channels.remove(channel)
        if channels:
            return False
        self._listeners.pop(entity.key, None)
        return True

    def deliver(
        self, entity: Entity, makeCommand: Callable[[IListenerChannel], dict[str, Any] | bytes], body: bytes | None = None
    ) -> Deferred[IListenerChannel]:
        channels = self._listeners.get(entity.key)
        if not channels:
            return fail(NoListeners(f"There are no listeners connected for the endpoint. SystemTracker:{entity.name}"))
        channel = self._choose(channels)
        try:
            channel.sendCommand(makeCommand(channel), body)
        except Exception as e:
            return fail(e)
        return succeed(channel)

    def listenerCount(self, entity: Entity) -> int:
        return len(self._listeners.get(entity.key, ()))

    def broadcast(
        self, entity: Entity, makeCommand: Callable[[IListenerChannel], dict[str, Any] | bytes], body: bytes | None
    ) -> Deferred[int]:
        taken = 0
        for channel in list(self._listeners.get(entity.key, ())):
            taken += bool(channel.offer(makeCommand(channel), body))
        return succeed(taken)

    def deliverOneWay(
        self, entity: Entity, makeCommand: Callable[[IListenerChannel], dict[str, Any] | bytes], body: bytes | None
    ) -> Deferred[IListenerChannel]:
        channels = list(self._listeners.get(entity.key, ()))
        if not channels:
            return fail(NoListeners(f"There are no listeners connected for the endpoint. SystemTracker:{entity.name}"))
        random.shuffle(channels)
        for channel in channels:
            if channel.hasRoom() and channel.offer(makeCommand(channel), body):
                return succeed(channel)
        return fail(ServerBusy(f"Every listener of {entity.name} is behind: try again later."))


class RandomPool:
    """
    Random bytes from the operating system's CSPRNG, read 4 KiB at a time
    rather than with a system call for each (every relayed request needs
    some).  Each byte is handed out once; a forked child starts afresh.
    """

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._pool = bytearray()
        os.register_at_fork(after_in_child=self._pool.clear)

    def take(self, nbytes: int) -> bytes:
        pool = self._pool
        if len(pool) < nbytes:
            pool[:] = os.urandom(max(self._size, nbytes))
        chunk = bytes(pool[:nbytes])
        del pool[:nbytes]
        return chunk

    def hex(self, nbytes: int) -> str:
        return self.take(nbytes).hex()


randomPool = RandomPool()
randomHex = randomPool.hex


def newConnectionId(clientId: str | None) -> str:
    """
    An unguessable rendezvous id: the client's own tracking id, if any, with
    a random suffix in the service's C{_G} style.
    """
    return f"{clientId or randomHex(16)}_G{randomHex(12)}"


T = TypeVar("T")


class RendezvousTable(Generic[T]):
    """
    Senders waiting for their listener, by rendezvous id, each with a
    deadline.
    """

    def __init__(self, clock: IReactorTime, limit: int) -> None:
        self._clock = clock
        self._limit = limit
        self._waiting: dict[str, tuple[T, IDelayedCall]] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, rendezvousId: str, waiter: T, timeout: float, expired: Callable[[T], None]) -> bool:
        """
        Hold C{waiter} until it is taken or C{timeout} seconds pass, when
        C{expired(waiter)} is called.

        @return: C{False} if the table is full and nothing was added.
        """
        if len(self._waiting) >= self._limit:
            return False

        def expire() -> None:
            del self._waiting[rendezvousId]
            expired(waiter)

        self._waiting[rendezvousId] = (waiter, self._clock.callLater(timeout, expire))
        return True

    def take(self, rendezvousId: str) -> T | None:
        """
        Remove and return the waiter, or C{None} if unknown or expired.
        """
        entry = self._waiting.pop(rendezvousId, None)
        if entry is None:
            return None
        waiter, call = entry
        call.cancel()
        return waiter

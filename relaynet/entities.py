# -*- test-case-name: relaynet.test.test_entities -*-
"""
Hybrid connections (entities) and the namespace that holds them.

Entity names are matched case-insensitively, may contain C{/}, and a request
path is resolved to the longest entity name that is a prefix of it on a
segment boundary; the rest is the suffix handed to the listener.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from relaynet.auth import Rule
from relaynet.errors import BadRequest, EndpointNotFound

__all__ = ["Entity", "Namespace", "validEntityName"]

MAX_NAME_LENGTH = 260
DEFAULT_MAX_LISTENERS = 25


def validEntityName(name: str) -> str:
    """
    Check an entity name and return it without surrounding slashes.

    @raise ValueError: if the name is empty, too long, or has empty
        segments or characters that cannot stand in a URL path.
    """
    stripped = name.strip("/")
    if not stripped or len(stripped) > MAX_NAME_LENGTH:
        raise ValueError(f"entity name {name!r} must have 1 to {MAX_NAME_LENGTH} characters")
    for segment in stripped.split("/"):
        if not segment or segment in (".", "..") or segment.startswith("$"):
            raise ValueError(f"entity name {name!r} has an invalid segment {segment!r}")
        if any(c in segment for c in "?#%\\ ") or not segment.isprintable():
            raise ValueError(f"entity name {name!r} has a character not allowed in names")
    return stripped


@dataclass
class Entity:
    """
    A hybrid connection.

    @ivar dynamic: made by the arrival of a listener, removed with the last.
    @ivar anonymousSenders: senders need no token
        (C{requiresClientAuthorization} false).
    @ivar maxListeners: the most listeners it takes at once; C{None} for
        the namespace's default.
    @ivar requestTimeout: seconds its listeners have to answer an HTTP
        request; C{None} for the relay's default.
    @ivar kind: C{"hybrid"}, or C{"event"} for publish/subscribe: every
        listener is a subscriber of every event.
    """

    name: str
    maxListeners: int | None = None
    anonymousSenders: bool = False
    rules: Sequence[Rule] = ()
    dynamic: bool = False
    requestTimeout: float | None = None
    kind: str = "hybrid"

    @property
    def key(self) -> str:
        return self.name.lower()

    @property
    def listenerLimit(self) -> int:
        return DEFAULT_MAX_LISTENERS if self.maxListeners is None else self.maxListeners


@dataclass
class Namespace:
    """
    The entities of one relay namespace.

    @ivar dynamicEntities: listeners may create entities on the fly.
    @ivar anonymousNames: lower-cased names of entities whose senders need
        no token, applied to dynamic entities as they appear.
    """

    maxListeners: int = DEFAULT_MAX_LISTENERS
    maxSubscribers: int = 10000
    dynamicEntities: bool = False
    anonymousNames: frozenset[str] = frozenset()
    _entities: dict[str, Entity] = field(default_factory=dict)

    def declare(self, entity: Entity) -> Entity:
        entity.name = validEntityName(entity.name)
        if entity.kind not in ("hybrid", "event"):
            raise ValueError(f"entity kind {entity.kind!r} is neither 'hybrid' nor 'event'")
        if entity.maxListeners is None:
            entity.maxListeners = self.maxSubscribers if entity.kind == "event" else self.maxListeners
        self._entities[entity.key] = entity
        return entity

    def entities(self) -> Iterable[Entity]:
        return self._entities.values()

    def get(self, name: str) -> Entity | None:
        return self._entities.get(name.strip("/").lower())

    def forListener(self, path: str) -> Entity:
        """
        The entity a listener at C{path} registers with: the exact name, made
        on the spot when dynamic entities are on.

        @raise EndpointNotFound: no such entity.
        """
        entity = self.get(path)
        if entity is not None:
            return entity
        if not self.dynamicEntities:
            raise EndpointNotFound(f"Endpoint does not exist. SystemTracker:{path}")
        try:
            name = validEntityName(path)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        return self.declare(
            Entity(
                name=name,
                maxListeners=self.maxListeners,
                anonymousSenders=name.lower() in self.anonymousNames,
                dynamic=True,
            )
        )

    def resolve(self, path: str) -> tuple[Entity, str]:
        """
        Split a sender's path into the entity with the longest matching name
        and the suffix after it (empty or starting with C{/}).

        @raise EndpointNotFound: no entity name is a prefix of C{path}.
        """
        trimmed = path.lstrip("/")
        segments = trimmed.split("/")
        for end in range(len(segments), 0, -1):
            name = "/".join(segments[:end])
            entity = self._entities.get(name.lower())
            if entity is not None:
                return entity, trimmed[len(name) :]
        raise EndpointNotFound(f"Endpoint does not exist. SystemTracker:{path}")

    def listenersGone(self, entity: Entity) -> None:
        """
        The last listener of C{entity} left: forget it if it was dynamic.
        """
        if entity.dynamic and self._entities.get(entity.key) is entity:
            del self._entities[entity.key]

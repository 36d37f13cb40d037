# -*- test-case-name: relaynet.test.test_core -*-
"""
The relay's state, free of I/O: settings, the namespace, the authorizer,
the listener registry and the senders waiting at a rendezvous.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IReactorTime

from relaynet.auth import Authorizer, Rights, SasToken
from relaynet.entities import Entity, Namespace
from relaynet.registry import IListenerRegistry, MemoryRegistry, RendezvousTable

__all__ = ["RelaySettings", "Relay"]


@dataclass
class RelaySettings:
    """
    Limits and deadlines, with the defaults of the wire contract.

    @ivar acceptTimeout: seconds a sender waits for a listener to accept.
    @ivar requestTimeout: seconds a listener has to answer an HTTP request,
        and the longest pause in a response body.
    @ivar pingInterval: seconds between pings on a listener's control
        channel; a listener that leaves a ping unanswered for
        C{pingTimeout} seconds is dropped.
    @ivar tokenGrace: seconds an established control channel survives past
        its token's expiry while the listener renews it.
    @ivar maxControlMessage: the largest message a listener may send on its
        control channel, and the largest command the relay sends there.
    @ivar closeTimeout: seconds a half-closed relayed connection may wait
        for the other side's close.
    @ivar maxPending: senders that may wait for a rendezvous at once.
    @ivar maxEventSize: the largest event or one-way message, in bytes.
    @ivar subscriberOutbox: events or one-way messages that may wait for a
        slow listener before it is cut off.
    """

    acceptTimeout: float = 30.0
    requestTimeout: float = 60.0
    pingInterval: float = 30.0
    pingTimeout: float = 60.0
    tokenGrace: int = 300
    maxControlMessage: int = 65536
    closeTimeout: float = 60.0
    maxPending: int = 10000
    maxEventSize: int = 65536
    subscriberOutbox: int = 1000


@dataclass(slots=True)
class HandshakeInfo:
    """
    What the relay needs to know of a client's opening request.

    @ivar host: the C{Host} header as sent.
    @ivar secure: the request came over TLS.
    @ivar headers: the request headers as (name, value) pairs, in order.
    @ivar query: the decoded query parameters, first value of each.
    """

    host: str
    secure: bool
    path: str
    rawQuery: str
    headers: list[tuple[str, str]]
    query: dict[str, str]
    peerHost: str = ""
    peerPort: int = 0

    def forgetRequest(self) -> None:
        """
        Drop the request's headers and query once the handshake is over.

        Only deciding the handshake reads them (the action, the token, the
        ids, the headers passed on to a listener); an open connection keeps
        the host and the peer, and an idle one should not carry about 2 KiB
        of request text for nothing.
        """
        self.rawQuery = ""
        self.headers = []
        self.query = {}

    def header(self, name: str) -> str | None:
        lower = name.lower()
        for key, value in self.headers:
            if key.lower() == lower:
                return value
        return None

    @property
    def token(self) -> str | None:
        """
        The SAS token: the C{ServiceBusAuthorization} header first, then
        the C{sb-hc-token} query parameter.
        """
        return self.header("ServiceBusAuthorization") or self.query.get("sb-hc-token")

    @property
    def hostname(self) -> str:
        host = self.host
        if host.startswith("["):
            return host[: host.find("]") + 1]
        return host.rsplit(":", 1)[0] if ":" in host else host

    @property
    def baseUrl(self) -> str:
        return f"{'wss' if self.secure else 'ws'}://{self.host}"

    def remoteEndpoint(self) -> dict[str, Any]:
        return {"address": self.peerHost, "port": self.peerPort}


@dataclass
class Relay:
    """
    One relay namespace and everything its protocols share.
    """

    namespace: Namespace
    authorizer: Authorizer
    clock: IReactorTime
    settings: RelaySettings = field(default_factory=RelaySettings)
    registry: IListenerRegistry = field(default_factory=MemoryRegistry)
    rendezvous: RendezvousTable[Any] = field(init=False)
    exchanges: dict[str, Any] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.rendezvous = RendezvousTable(self.clock, self.settings.maxPending)

    def authorize(
        self, info: HandshakeInfo, entity: Entity, needed: Rights, token: str | None = None, grace: bool = False
    ) -> SasToken | None:
        """
        Check that the client may act on C{entity} with C{needed}.

        @return: the token checked, or C{None} for an anonymous sender.
        @raise relaynet.errors.RelayError: 401 or 403.
        """
        if needed == Rights.SEND and entity.anonymousSenders:
            return None
        return self.authorizer.authorize(
            token if token is not None else info.token,
            info.hostname,
            entity.name,
            needed,
            self.clock.seconds(),
            entity.rules,
            grace=grace,
        )

    def listenerLeft(self, entity: Entity, channel: Any) -> None:
        if self.registry.unregister(entity, channel):
            self.namespace.listenersGone(entity)

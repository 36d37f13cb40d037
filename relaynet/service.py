# -*- test-case-name: relaynet.test.test_service -*-
"""
The relay as a Twisted service: its ports, its namespace and its keys.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from relaynet import logs
from relaynet.auth import Authorizer, Rule, generateKey, mintToken
from relaynet.core import Relay, RelaySettings
from relaynet.entities import Namespace
from relaynet.frontdoor import makeSite

__all__ = ["RelayService", "loadOrCreateKey"]

log = Logger(observer=logs.observer)

ROOT_RULE = "RootManageSharedAccessKey"
KEY_FILE = "namespace-key.json"


def loadOrCreateKey(dataDir: str) -> tuple[Rule, bool]:
    """
    The namespace rule kept in C{dataDir}, made (with a new random key) if
    there is none yet.

    @return: the rule, and whether it was just made.
    """
    path = os.path.join(dataDir, KEY_FILE)
    try:
        with open(path) as f:
            stored = json.load(f)
        return Rule(name=stored["name"], primaryKey=stored["key"]), False
    except FileNotFoundError:
        pass
    rule = Rule(name=ROOT_RULE, primaryKey=generateKey())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"name": rule.name, "key": rule.primaryKey}, f)
    return rule, True


class RelayService(MultiService):
    """
    A relay serving one namespace on any number of server endpoints.
    """

    def __init__(
        self, relay: Relay, reactor: Any, endpoints: list[str], keyRule: Rule | None = None, accessLog: bool = False
    ) -> None:
        super().__init__()
        self.relay = relay
        self.site, self.websockets = makeSite(relay, accessLog)
        self.keyRule = keyRule
        self.ports: list[IListeningPort] = []
        self._reactor = reactor
        self._starting = False
        self._startFailures: list[Failure] = []
        self._endpoints = [serverFromString(reactor, description) for description in endpoints]

    @classmethod
    def fromOptions(cls, config: Any, reactor: IReactorTime) -> RelayService:
        settings: RelaySettings = config["settings"]
        rules: list[Rule] = list(config["rules"])
        keyRule = None
        if not rules:
            keyRule, made = loadOrCreateKey(config["data-dir"])
            rules.append(keyRule)
            if made:
                log.info("made a namespace key in {dir}", dir=config["data-dir"])
        anonymous = frozenset(config["anonymous-senders"])
        namespace = Namespace(
            maxListeners=config["max-listeners"],
            maxSubscribers=config["max-subscribers"],
            dynamicEntities=bool(config["dynamic-entities"]),
            anonymousNames=anonymous,
        )
        for entity in config["entities"]:
            entity.anonymousSenders = entity.anonymousSenders or entity.key in anonymous
            namespace.declare(entity)
        relay = Relay(
            namespace=namespace,
            authorizer=Authorizer(rules, graceSeconds=settings.tokenGrace, hostnames=config["hostnames"]),
            clock=reactor,
            settings=settings,
        )
        return cls(relay, reactor, config["listen"], keyRule, accessLog=bool(config["access-log"]))

    def startService(self) -> None:
        """
        Listen on every endpoint; an endpoint that fails at once (a port in
        use, a bad certificate) fails the start.
        """
        super().startService()
        self._starting, failures = True, self._startFailures
        try:
            for endpoint in self._endpoints:
                endpoint.listen(self.site).addCallbacks(self._listening, self._cannotListen)
        finally:
            self._starting = False
        if failures:
            failures[0].raiseException()

    def _cannotListen(self, failure: Failure) -> None:
        if self._starting:
            self._startFailures.append(failure)
            return
        log.failure("relaynet cannot listen", failure)
        self._reactor.callWhenRunning(self._reactor.stop)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.ports.append(port)
        address: Any = port.getHost()
        host = getattr(address, "host", "localhost")
        hostPort = f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"
        log.info("relaynet serving on {host}", host=hostPort)
        if self.keyRule is not None:
            self._showKey(hostPort)
        return port

    def _showKey(self, hostPort: str) -> None:
        rule = self.keyRule
        assert rule is not None
        expiry = int(self._reactor.seconds()) + 3600
        token = mintToken(f"http://{hostPort}/echo", rule.name, rule.primaryKey, expiry)
        from urllib.parse import quote

        log.info(
            "connection string: Endpoint=sb://{hostPort}/;SharedAccessKeyName={name};SharedAccessKey={key}",
            hostPort=hostPort,
            name=rule.name,
            key=rule.primaryKey,
        )
        log.info(
            "example (valid 1 h): a listener on entity 'echo' connects to "
            "ws://{hostPort}/$hc/echo?sb-hc-action=listen&sb-hc-token={token} "
            "and a sender to ws://{hostPort}/$hc/echo?sb-hc-token={token}",
            hostPort=hostPort,
            token=quote(token, safe=""),
        )

    def stopService(self) -> Deferred[Any]:
        self.websockets.goAway()
        super().stopService()
        ports, self.ports = self.ports, []
        return gatherResults([maybeDeferred(port.stopListening) for port in ports])

# -*- test-case-name: relaynet.test.test_service -*-
"""
Tests for L{relaynet.service}: the relay as a Twisted service, on a
L{MemoryReactorClock}, with fake connections.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import quote

from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from relaynet.auth import Rights, mintToken
from relaynet.logs import logLevel, setLogLevel
from relaynet.service import KEY_FILE, ROOT_RULE, RelayService, loadOrCreateKey
from relaynet.tap import Options
from relaynet.test.test_websocket import HOST, KEY, KEY_NAME, NOW, Peer, token


class _Refusing(MemoryReactorClock):
    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        raise CannotListenError(interface, port, OSError("in use"))


def _service(reactor: MemoryReactorClock, *args: str) -> RelayService:
    options = Options()
    options.parseOptions(["--listen", "tcp:9090", "--entity", "hyco", *args])
    return RelayService.fromOptions(options, reactor)


class _Relay:
    """
    A started service and fake clients of it.
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        self.reactor = MemoryReactorClock()
        self.service = _service(self.reactor, "--rule", f"{KEY_NAME}={KEY}", "--data-dir", case.mktemp())
        self.service.startService()

    def connect(self, target: str, **kwargs: Any) -> Peer:
        return Peer(self.service.websockets, self.reactor, target, **kwargs)  # type: ignore[arg-type]

    def listen(self) -> Peer:
        return self.connect(f"/$hc/hyco?sb-hc-action=listen&sb-hc-token={quote(token('hyco'), safe='')}")

    def send(self) -> Peer:
        return self.connect("/$hc/hyco", headers=[("ServiceBusAuthorization", token("hyco"))])


class StopTests(SynchronousTestCase):
    def test_stopClosesControlChannelsWith1001(self) -> None:
        relay = _Relay(self)
        listener = relay.listen()
        self.assertEqual(listener.status, 101)
        relay.service.stopService()
        [(code, reason)] = listener.closes()
        self.assertEqual(code, 1001)
        self.assertTrue(reason)
        listener.sendClose(1001)
        entity = relay.service.relay.namespace.get("hyco")
        self.assertEqual(relay.service.relay.registry.listenerCount(entity), 0)

    def test_stopDropsWaitingSenders(self) -> None:
        relay = _Relay(self)
        relay.listen()
        sender = relay.send()
        relay.service.stopService()
        self.assertTrue(sender.transport.aborted)
        relay.reactor.advance(0)
        self.assertEqual(len(relay.service.relay.rendezvous), 0)

    def test_stopClosesRelayedConnectionsWith1001(self) -> None:
        relay = _Relay(self)
        listener = relay.listen()
        sender = relay.send()
        address = listener.commands()[0]["accept"]["address"]
        accepted = relay.connect(address.split(HOST, 1)[1])
        self.assertEqual((sender.status, accepted.status), (101, 101))
        relay.service.stopService()
        self.assertEqual([code for code, _ in sender.closes()], [1001])
        self.assertEqual([code for code, _ in accepted.closes()], [1001])

    def test_stopStopsListening(self) -> None:
        relay = _Relay(self)
        self.assertEqual(len(relay.service.ports), 1)
        self.successResultOf(relay.service.stopService())
        self.assertEqual(relay.service.ports, [])
        self.assertFalse(relay.service.running)


class StartTests(SynchronousTestCase):
    def test_listensWithTheSite(self) -> None:
        reactor = MemoryReactorClock()
        service = _service(reactor, "--rule", "r=k", "--data-dir", self.mktemp())
        service.startService()
        self.addCleanup(service.stopService)
        [(port, factory, _, _)] = reactor.tcpServers
        self.assertEqual(port, 9090)
        self.assertIs(factory, service.site)

    def test_endpointThatCannotListenFailsTheStart(self) -> None:
        service = _service(_Refusing(), "--rule", "r=k", "--data-dir", self.mktemp())
        self.assertRaises(CannotListenError, service.startService)

    def test_madeKeyIsShown(self) -> None:
        reactor, dataDir = MemoryReactorClock(), self.mktemp()
        os.makedirs(dataDir)
        service = _service(reactor, "--data-dir", dataDir)
        with capturedLogs() as events:
            service.startService()
        self.addCleanup(service.stopService)
        assert service.keyRule is not None
        shown = [e for e in events if e.get("key") == service.keyRule.primaryKey]
        self.assertEqual(len(shown), 1)
        self.assertEqual(shown[0]["name"], ROOT_RULE)

    def test_givenKeyIsNotShown(self) -> None:
        """
        A key given on the command line is in no log event, debug ones
        included.
        """
        self.addCleanup(setLogLevel, logLevel())
        setLogLevel("debug")
        reactor = MemoryReactorClock()
        service = _service(reactor, "--rule", f"{KEY_NAME}={KEY}", "--data-dir", self.mktemp())
        with capturedLogs() as events:
            service.startService()
        self.addCleanup(service.stopService)
        self.assertFalse([e for e in events if KEY in repr(e)])


class FromOptionsTests(SynchronousTestCase):
    def test_authorizerUsesTheRules(self) -> None:
        reactor = MemoryReactorClock()
        relay = _service(reactor, "--rule", f"{KEY_NAME}={KEY}", "--data-dir", self.mktemp()).relay
        checked = relay.authorizer.authorize(token("hyco"), HOST, "hyco", Rights.LISTEN, NOW)
        self.assertEqual(checked.keyName, KEY_NAME)
        self.assertEqual(relay.settings.tokenGrace, 300)

    def test_hostnamesAccepted(self) -> None:
        relay = _service(
            MemoryReactorClock(), "--rule", f"{KEY_NAME}={KEY}", "--hostname", "public.example", "--data-dir", self.mktemp()
        ).relay
        publicToken = mintToken("http://public.example/hyco", KEY_NAME, KEY, NOW + 60)
        checked = relay.authorizer.authorize(publicToken, "127.0.0.1:9090", "hyco", Rights.LISTEN, NOW)
        self.assertEqual(checked.expiry, NOW + 60)

    def test_anonymousSendersAppliedToDeclaredEntities(self) -> None:
        relay = _service(
            MemoryReactorClock(), "--rule", "r=k", "--anonymous-senders", "HYCO", "--data-dir", self.mktemp()
        ).relay
        entity = relay.namespace.get("hyco")
        self.assertTrue(entity.anonymousSenders)
        self.assertIsNone(relay.authorize(None, entity, Rights.SEND))  # type: ignore[arg-type]


class KeyFileTests(SynchronousTestCase):
    def test_madeThenLoaded(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        made, isNew = loadOrCreateKey(directory)
        self.assertTrue(isNew)
        self.assertEqual(made.name, ROOT_RULE)
        self.assertEqual(len(made.primaryKey), 44)
        loaded, isNew = loadOrCreateKey(directory)
        self.assertFalse(isNew)
        self.assertEqual(loaded, made)

    def test_existingFileUsed(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        with open(os.path.join(directory, KEY_FILE), "w") as f:
            json.dump({"name": "mine", "key": "k"}, f)
        rule, isNew = loadOrCreateKey(directory)
        self.assertEqual((rule.name, rule.primaryKey, isNew), ("mine", "k", False))

    def test_keysDiffer(self) -> None:
        one, two = self.mktemp(), self.mktemp()
        os.makedirs(one), os.makedirs(two)
        self.assertNotEqual(loadOrCreateKey(one)[0].primaryKey, loadOrCreateKey(two)[0].primaryKey)

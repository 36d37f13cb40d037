# -*- test-case-name: relaynet.test.test_tap -*-
"""
Tests for L{relaynet.tap}: the options of C{twistd relaynet} and the service
they make, on a L{MemoryReactorClock}.
"""

from __future__ import annotations

import json
import os
import stat

from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from relaynet.auth import ALL_RIGHTS, Rights, Rule
from relaynet.core import RelaySettings
from relaynet.logs import logLevel, setLogLevel
from relaynet.service import KEY_FILE, ROOT_RULE
from relaynet.tap import DEFAULT_LISTEN, Options, makeService


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


class OptionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        # makeService sets relaynet's log level for the process.
        self.addCleanup(setLogLevel, logLevel())

    def test_defaults(self) -> None:
        options = parse()
        self.assertEqual(options["listen"], [DEFAULT_LISTEN])
        self.assertEqual(options["data-dir"], "relaynet-data")
        self.assertEqual(options["max-listeners"], 25)
        self.assertEqual(options["settings"], RelaySettings())
        self.assertFalse(options["dynamic-entities"])
        self.assertEqual((options["rules"], options["entities"], options["anonymous-senders"]), ([], [], []))

    def test_listenRepeatable(self) -> None:
        options = parse("--listen", "tcp:1", "--listen", "ssl:2:privateKey=k:certKey=c")
        self.assertEqual(options["listen"], ["tcp:1", "ssl:2:privateKey=k:certKey=c"])

    def test_rule(self) -> None:
        options = parse("--rule", "root=a2V5==", "--rule", "other=x")
        self.assertEqual(options["rules"], [Rule(name="root", primaryKey="a2V5=="), Rule(name="other", primaryKey="x")])
        self.assertEqual(options["rules"][0].rights, ALL_RIGHTS)

    def test_badRule(self) -> None:
        for text in ["root", "=key", "root="]:
            with self.subTest(text=text):
                self.assertRaises(usage.UsageError, parse, "--rule", text)

    def test_entity(self) -> None:
        options = parse("--entity", "orders", "--entity", "/site/a/printers/")
        self.assertEqual([e.name for e in options["entities"]], ["orders", "site/a/printers"])

    def test_badEntity(self) -> None:
        for name in ["a//b", "$hc", "a b", ""]:
            with self.subTest(name=name):
                self.assertRaises(usage.UsageError, parse, "--entity", name)

    def test_dynamicEntities(self) -> None:
        self.assertTrue(parse("--dynamic-entities")["dynamic-entities"])

    def test_accessLog(self) -> None:
        """
        The access log is off unless asked for, on the command line or in
        the config file, and the relay's site follows.
        """
        self.assertFalse(parse()["access-log"])
        self.assertTrue(parse("--access-log")["access-log"])
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("access-log = true\n")
        self.assertTrue(parse("--config", path)["access-log"])
        with open(path, "w") as f:
            f.write('access-log = "yes"\n')
        self.assertRaises(usage.UsageError, parse, "--config", path)
        for args, expected in (([], False), (["--access-log"], True)):
            options = parse("--data-dir", self.mktemp(), *args)
            os.makedirs(options["data-dir"])
            service = makeService(options, MemoryReactorClock())
            self.assertIs(service.site.accessLog, expected)

    def test_anonymousSenders(self) -> None:
        options = parse("--anonymous-senders", "/Public/Echo/", "--anonymous-senders", "x")
        self.assertEqual(options["anonymous-senders"], ["public/echo", "x"])

    def test_hostnameRepeatable(self) -> None:
        self.assertEqual(parse("--hostname", "a.example", "--hostname", "b.example")["hostnames"], ["a.example", "b.example"])
        self.assertEqual(parse()["hostnames"], [])

    def test_dataDir(self) -> None:
        self.assertEqual(parse("--data-dir", "/var/lib/relay")["data-dir"], "/var/lib/relay")
        self.assertEqual(parse("-d", "here")["data-dir"], "here")

    def test_maxListeners(self) -> None:
        self.assertEqual(parse("--max-listeners", "3")["max-listeners"], 3)
        for text in ["0", "-1", "x", "2.5"]:
            with self.subTest(text=text):
                self.assertRaises(usage.UsageError, parse, "--max-listeners", text)

    def test_settings(self) -> None:
        settings = parse(
            "--accept-timeout", "5.5",
            "--ping-interval", "10",
            "--ping-timeout", "25",
            "--token-grace", "7",
            "--close-timeout", "3",
            "--max-pending", "9",
        )["settings"]
        self.assertEqual(
            settings,
            RelaySettings(
                acceptTimeout=5.5, pingInterval=10.0, pingTimeout=25.0, tokenGrace=7, closeTimeout=3.0, maxPending=9
            ),
        )
        self.assertIsInstance(settings.tokenGrace, int)
        self.assertIsInstance(settings.pingInterval, float)

    def test_settingsMustBePositive(self) -> None:
        for option in ["--accept-timeout", "--ping-interval", "--token-grace", "--close-timeout", "--max-pending"]:
            with self.subTest(option=option):
                self.assertRaises(usage.UsageError, parse, option, "0")

    def test_logLevel(self) -> None:
        self.assertEqual(parse()["log-level"], "info")
        self.assertEqual(parse("--log-level", "debug")["log-level"], "debug")
        error = self.assertRaises(usage.UsageError, parse, "--log-level", "loud")
        self.assertIn("--log-level must be one of debug, info, warn, error, critical, not 'loud'", str(error))

    def test_pingTimeoutMustExceedInterval(self) -> None:
        self.assertRaises(usage.UsageError, parse, "--ping-interval", "30", "--ping-timeout", "30")
        self.assertRaises(usage.UsageError, parse, "--ping-interval", "30", "--ping-timeout", "20")
        self.assertRaises(usage.UsageError, parse, "--ping-interval", "90")
        self.assertEqual(parse("--ping-interval", "30", "--ping-timeout", "31")["settings"].pingTimeout, 31.0)


class ConfigFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        # makeService sets relaynet's log level for the process.
        self.addCleanup(setLogLevel, logLevel())

    def config(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_listsAddToCommandLine(self) -> None:
        path = self.config(
            'listen = ["tcp:2"]\n'
            'anonymous-senders = ["/Public/"]\n'
            'entity = ["from/file"]\n'
            'hostname = ["public.example"]\n'
            '[[rule]]\nname = "fromfile"\nkey = "k1"\n'
        )
        options = parse(
            "--listen", "tcp:1", "--rule", "cli=k0", "--entity", "cli", "--anonymous-senders", "x",
            "--hostname", "cli.example", "--config", path,
        )
        self.assertEqual(options["listen"], ["tcp:1", "tcp:2"])
        self.assertEqual([r.name for r in options["rules"]], ["cli", "fromfile"])
        self.assertEqual([e.name for e in options["entities"]], ["cli", "from/file"])
        self.assertEqual(options["anonymous-senders"], ["x", "public"])
        self.assertEqual(options["hostnames"], ["cli.example", "public.example"])

    def test_singleValuesFillIn(self) -> None:
        path = self.config(
            'data-dir = "/from/file"\nmax-listeners = 4\naccept-timeout = 12\n'
            "token-grace = 9\ndynamic-entities = true\n"
        )
        options = parse("--config", path)
        self.assertEqual(options["data-dir"], "/from/file")
        self.assertEqual(options["max-listeners"], 4)
        self.assertEqual(options["settings"].acceptTimeout, 12)
        self.assertEqual(options["settings"].tokenGrace, 9)
        self.assertTrue(options["dynamic-entities"])

    def test_logLevelFromFile(self) -> None:
        self.assertEqual(parse("--config", self.config('log-level = "warn"\n'))["log-level"], "warn")
        error = self.assertRaises(usage.UsageError, parse, "--config", self.config('log-level = "loud"\n'))
        self.assertIn("--log-level must be one of", str(error))

    def test_commandLineWinsForSingleValues(self) -> None:
        path = self.config('data-dir = "/from/file"\nmax-listeners = 4\naccept-timeout = 12\n')
        options = parse("--data-dir", "cli", "--max-listeners", "2", "--accept-timeout", "3", "--config", path)
        self.assertEqual((options["data-dir"], options["max-listeners"]), ("cli", 2))
        self.assertEqual(options["settings"].acceptTimeout, 3.0)

    def test_noListenAnywhereMeansDefault(self) -> None:
        options = parse("--config", self.config('data-dir = "d"\n'))
        self.assertEqual(options["listen"], [DEFAULT_LISTEN])

    def test_rulesWithRights(self) -> None:
        path = self.config(
            '[[rule]]\nname = "a"\nkey = "k"\nsecondary-key = "k2"\nrights = ["Listen", "Send"]\n'
            '[[rule]]\nname = "b"\nkey = "k"\nrights = "Send"\n'
            '[[rule]]\nname = "c"\nkey = "k"\n'
        )
        a, b, c = parse("--config", path)["rules"]
        self.assertEqual(a, Rule(name="a", primaryKey="k", secondaryKey="k2", rights=Rights.LISTEN | Rights.SEND))
        self.assertEqual(b.rights, Rights.SEND)
        self.assertEqual(c.rights, ALL_RIGHTS)

    def test_entityTables(self) -> None:
        path = self.config(
            '[[entity]]\nname = "orders"\nmax-listeners = 5\n'
            '[[entity]]\nname = "/site/a/"\nanonymous-senders = true\n'
            '[[entity.rule]]\nname = "own"\nkey = "k"\nrights = ["Listen"]\n'
        )
        orders, site = parse("--config", path)["entities"]
        self.assertEqual((orders.name, orders.maxListeners, orders.anonymousSenders), ("orders", 5, False))
        self.assertEqual((site.name, site.anonymousSenders), ("site/a", True))
        self.assertEqual(site.rules, (Rule(name="own", primaryKey="k", rights=Rights.LISTEN),))

    def test_unknownKeysNamed(self) -> None:
        path = self.config('listen = ["tcp:1"]\nlisten-on = "x"\nspeed = 3\n')
        error = self.assertRaises(usage.UsageError, parse, "--config", path)
        self.assertIn("listen-on", str(error))
        self.assertIn("speed", str(error))

    def test_unknownRuleAndEntityKeysNamed(self) -> None:
        rule = self.config('[[rule]]\nname = "a"\nkey = "k"\nrigths = "Send"\n')
        self.assertIn("rigths", str(self.assertRaises(usage.UsageError, parse, "--config", rule)))
        entity = self.config('[[entity]]\nname = "a"\nmax-listener = 3\n')
        self.assertIn("max-listener", str(self.assertRaises(usage.UsageError, parse, "--config", entity)))

    def test_badValues(self) -> None:
        for text in [
            "max-listeners = 0\n",
            "accept-timeout = -1\n",
            'accept-timeout = "soon"\n',
            '[[rule]]\nname = "a"\n',
            '[[rule]]\nname = "a"\nkey = "k"\nrights = "Everything"\n',
            'entity = ["a//b"]\n',
            "ping-interval = 60\nping-timeout = 30\n",
            # Values of the wrong kind are refused, not converted.
            "max-listeners = 2.5\n",
            "max-listeners = true\n",
            "token-grace = 0.5\n",
            'dynamic-entities = "false"\n',
            '[[entity]]\nname = "a"\nanonymous-senders = "false"\n',
            '[[entity]]\nname = "a"\nmax-listeners = 0\n',
            'listen = "tcp:1"\n',
            'anonymous-senders = "abc"\n',
            '[[rule]]\nname = "a"\nkey = "k"\nrights = []\n',
            '[[rule]]\nname = "a"\nkey = "k"\nrights = ""\n',
            "log-level = 10\n",
        ]:
            with self.subTest(text=text):
                self.assertRaises(usage.UsageError, parse, "--config", self.config(text))

    def test_entityLimitOverNamespaceDefault(self) -> None:
        """
        An entity's own max-listeners holds even when it equals the built-in
        default and the namespace default is another.
        """
        options = parse(
            "--max-listeners", "5", "--config", self.config('[[entity]]\nname = "big"\nmax-listeners = 25\n'), "--entity", "small"
        )
        service = makeService(options, MemoryReactorClock())
        namespace = service.relay.namespace
        self.assertEqual((namespace.get("big").maxListeners, namespace.get("small").maxListeners), (25, 5))

    def test_unreadableFile(self) -> None:
        self.assertRaises(usage.UsageError, parse, "--config", self.mktemp())
        self.assertRaises(usage.UsageError, parse, "--config", self.config("listen = [\n"))


class MakeServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        # makeService sets relaynet's log level for the process.
        self.addCleanup(setLogLevel, logLevel())

    def test_listensOnTheEndpoints(self) -> None:
        reactor = MemoryReactorClock()
        options = parse(
            "--listen", "tcp:9091:interface=127.0.0.2", "--listen", "tcp:9092", "--data-dir", self.mktemp()
        )
        service = makeService(options, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual([(port, interface) for port, _, _, interface in reactor.tcpServers], [(9091, "127.0.0.2"), (9092, "")])
        self.assertIs(reactor.tcpServers[0][1], reactor.tcpServers[1][1])

    def test_setsTheLogLevel(self) -> None:
        """
        The service sets relaynet's log level: C{info} unless asked.
        """
        makeService(parse("--log-level", "debug", "--data-dir", self.mktemp()), MemoryReactorClock())
        self.assertEqual(logLevel(), LogLevel.debug)
        makeService(parse("--data-dir", self.mktemp()), MemoryReactorClock())
        self.assertEqual(logLevel(), LogLevel.info)

    def test_makesAKeyFileOnce(self) -> None:
        dataDir = self.mktemp()
        options = parse("--listen", "tcp:9091", "--data-dir", dataDir)
        first = makeService(options, MemoryReactorClock())
        path = os.path.join(dataDir, KEY_FILE)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path) as f:
            stored = json.load(f)
        self.assertEqual(stored["name"], ROOT_RULE)
        self.assertEqual(first.keyRule, Rule(name=ROOT_RULE, primaryKey=stored["key"]))  # type: ignore[attr-defined]
        second = makeService(parse("--listen", "tcp:9091", "--data-dir", dataDir), MemoryReactorClock())
        self.assertEqual(second.keyRule, first.keyRule)  # type: ignore[attr-defined]

    def test_noKeyFileWithARule(self) -> None:
        dataDir = self.mktemp()
        service = makeService(parse("--rule", "r=k", "--data-dir", dataDir), MemoryReactorClock())
        self.assertFalse(os.path.exists(os.path.join(dataDir, KEY_FILE)))
        self.assertIsNone(service.keyRule)  # type: ignore[attr-defined]

    def test_optionsReachTheRelay(self) -> None:
        reactor = MemoryReactorClock()
        service = makeService(
            parse(
                "--rule", "r=k",
                "--data-dir", self.mktemp(),
                "--entity", "orders",
                "--anonymous-senders", "Orders",
                "--max-listeners", "3",
                "--dynamic-entities",
                "--accept-timeout", "7",
            ),
            reactor,
        )
        relay = service.relay  # type: ignore[attr-defined]
        orders = relay.namespace.get("orders")
        self.assertEqual((orders.maxListeners, orders.anonymousSenders), (3, True))
        self.assertTrue(relay.namespace.dynamicEntities)
        self.assertEqual(relay.namespace.maxListeners, 3)
        self.assertEqual(relay.settings.acceptTimeout, 7.0)
        self.assertIs(relay.clock, reactor)


class PluginTests(SynchronousTestCase):
    def test_twistdFindsRelaynet(self) -> None:
        makers = [p for p in getPlugins(IServiceMaker) if p.tapname == "relaynet"]
        self.assertEqual(len(makers), 1)
        self.assertIsInstance(makers[0].options(), Options)

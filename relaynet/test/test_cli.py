"""
The C{relaynet} command, run in this process with the real reactor against
a real relay on 127.0.0.1 (L{RelayFixture}), and as a real subprocess for
C{--help}, exit codes, signals and stdio.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import LogLevel
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from relaynet import cli
from relaynet.auth import Authorizer, Rights, Rule
from relaynet.errors import Forbidden
from relaynet.logs import logLevel, setLogLevel
from relaynet.service import RelayService
from relaynet.streams import NoListenerError, connectStream
from relaynet.tap import Options
from relaynet.test.support import KEY, KEY_NAME, RelayFixture, watchJoins
from relaynet.tokens import fromKey

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONNECTIONS = 20
EACH = 50 * 1024 * 1024
CHUNK = 64 * 1024


def wait(seconds: float = 0.01) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


async def waitFor(condition: Any, timeout: float = 15, what: str = "a condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await wait()


# Sources and sinks of random bytes that hash what they send and receive.


@implementer(IPushProducer)
class Flow(Protocol):
    """
    Sends C{size} random bytes as fast as its transport takes them (a push
    producer), hashes what it sends and what it receives; closes once both
    are done if C{closeWhenDone}.
    """

    def __init__(self, size: int, expect: int, closeWhenDone: bool, pool: bytes) -> None:
        self.size, self.expect, self.closeWhenDone = size, expect, closeWhenDone
        self.pool = pool
        self.sent = 0
        self.received = 0
        self.sentHash = hashlib.sha256()
        self.receivedHash = hashlib.sha256()
        self.paused = False
        self.ended: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.sent < self.size and self.transport is not None:
            offset = (self.sent * 7919) % (len(self.pool) - CHUNK)
            chunk = self.pool[offset : offset + min(CHUNK, self.size - self.sent)]
            self.sent += len(chunk)
            self.sentHash.update(chunk)
            self.transport.write(chunk)
        self._maybeClose()

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.receivedHash.update(data)
        self._maybeClose()

    def _maybeClose(self) -> None:
        if self.closeWhenDone and self.sent >= self.size and self.received >= self.expect and self.transport:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.ended.callback(None)

    @property
    def digests(self) -> tuple[str, str]:
        return self.sentHash.hexdigest(), self.receivedHash.hexdigest()


class FlowFactory(Factory):
    def __init__(self, size: int, expect: int, closeWhenDone: bool, pool: bytes) -> None:
        self.args = (size, expect, closeWhenDone, pool)
        self.flows: list[Flow] = []

    def buildProtocol(self, addr: Any) -> Flow:
        flow = Flow(*self.args)
        flow.factory = self
        self.flows.append(flow)
        return flow


# Running the command in this process.


class Running:
    """
    One C{relaynet} command running in this process.
    """

    def __init__(self, argv: Sequence[str], environ: Mapping[str, str]) -> None:
        self.stdout, self.stderr = io.StringIO(), io.StringIO()
        self.stopping: Deferred[None] = Deferred()
        self.done = Deferred.fromCoroutine(
            cli.run(reactor, argv, environ, self.stdout, self.stderr, self.stopping)
        )
        self.code: int | None = None
        self.done.addCallback(self._exited)

    def _exited(self, code: int) -> int:
        self.code = code
        return code

    async def waitForLine(self, pattern: str, timeout: float = 15) -> re.Match[str]:
        found: list[re.Match[str]] = []

        def seen() -> bool:
            match = re.search(pattern, self.stderr.getvalue())
            if match:
                found.append(match)
            if self.code is not None and not match:
                raise AssertionError(f"exited with {self.code}: {self.stderr.getvalue()!r}")
            return bool(match)

        await waitFor(seen, timeout, repr(pattern))
        return found[0]

    async def stop(self) -> int:
        if not self.stopping.called:
            self.stopping.callback(None)
        return await self.done


class CliCase(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.relay = RelayFixture(self, ["--entity", "hyco", "--accept-timeout", "2"])
        self.url = f"ws://{self.relay.host}"
        directory = self.mktemp()
        os.makedirs(directory)
        self.keyFile = os.path.join(directory, "key")
        with open(self.keyFile, "w") as f:
            f.write(KEY + "\n")
        self.environ = {cli.ENV_KEY: KEY}

    def start(self, *argv: str, environ: Mapping[str, str] | None = None) -> Running:
        running = Running(list(argv), self.environ if environ is None else environ)

        async def stop() -> None:
            await running.stop()

        self.addCleanup(stop)
        return running

    async def runCli(self, *argv: str, environ: Mapping[str, str] | None = None) -> tuple[int, str, str]:
        running = self.start(*argv, environ=environ)
        code = await running.done
        return code, running.stdout.getvalue(), running.stderr.getvalue()

    def assertOneLine(self, text: str, *fragments: str) -> None:
        self.assertEqual(text.count("\n"), 1, text)
        self.assertTrue(text.startswith("relaynet "), text)
        self.assertNotIn("Traceback", text)
        for fragment in fragments:
            self.assertIn(fragment, text)

    async def forwarding(self, target: str, *more: str) -> tuple[Running, Running, int]:
        """
        C{forward --serve} to C{target}, and C{forward --local} on a free
        port; the local port.
        """
        serve = self.start("forward", "--serve", "--relay", self.url, "--entity", "hyco", "--target", target, *more)
        await serve.waitForLine("serving 'hyco'")
        local = self.start("forward", "--relay", self.url, "--entity", "hyco", "--local", "127.0.0.1:0", *more)
        port = int((await local.waitForLine(r"forwarding 127\.0\.0\.1:(\d+)")).group(1))
        return serve, local, port


# Options, without a relay.


class OptionsTests(SynchronousTestCase):
    def parse(self, argv: Sequence[str], environ: Mapping[str, str] | None = None) -> cli.Relay:
        options = cli.Options(environ or {})
        options.parseOptions(list(argv))
        return options.subOptions.relay

    def test_relayUrls(self) -> None:
        self.assertEqual(cli.relayUrl("sb://ns.example.com/"), "wss://ns.example.com")
        self.assertEqual(cli.relayUrl("sb://127.0.0.1:9090/", noTls=True), "ws://127.0.0.1:9090")
        self.assertEqual(cli.relayUrl("ws://127.0.0.1:9090", noTls=True), "ws://127.0.0.1:9090")
        self.assertEqual(cli.relayUrl("wss://[::1]:443", noTls=True), "wss://[::1]:443")
        self.assertEqual(cli.relayUrl("https://relay.example.com"), "wss://relay.example.com")
        for bad in ["ftp://host", "host:9090", "ws://", "ws://host:99999", "ws://host/path", "ws://u@host"]:
            self.assertRaises(ValueError, cli.relayUrl, bad)

    def test_hostPorts(self) -> None:
        self.assertEqual(cli.parseHostPort("2222", "127.0.0.1"), ("127.0.0.1", 2222))
        self.assertEqual(cli.parseHostPort("0.0.0.0:2222", "127.0.0.1"), ("0.0.0.0", 2222))
        self.assertEqual(cli.parseHostPort("[::1]:22"), ("::1", 22))
        self.assertEqual(cli.parseHostPort("db.internal:5432"), ("db.internal", 5432))
        for bad in ["22", "host", "host:", "host:70000", ":22"]:
            self.assertRaises(ValueError, cli.parseHostPort, bad)

    def test_connectionString(self) -> None:
        """
        C{RELAYNET_CONNECTION_STRING} gives the relay (sb:// is wss://), the
        rule, the key and the entity; options and other variables win.
        """
        environ = {
            cli.ENV_CONNECTION_STRING: "Endpoint=sb://relay.example.com:9443/;SharedAccessKeyName=ops;"
            "SharedAccessKey=c2VjcmV0;EntityPath=printers"
        }
        relay = self.parse(["connect"], environ)
        self.assertEqual((relay.url, relay.entity, relay.keyName, relay.key, relay.token),
                         ("wss://relay.example.com:9443", "printers", "ops", "c2VjcmV0", None))
        self.assertEqual(self.parse(["connect", "--no-tls"], environ).url, "ws://relay.example.com:9443")
        relay = self.parse(["connect", "--relay", "ws://127.0.0.1:9090", "-e", "other"], environ)
        self.assertEqual((relay.url, relay.entity, relay.key), ("ws://127.0.0.1:9090", "other", "c2VjcmV0"))
        token = "SharedAccessSignature sr=x&sig=y%3D&se=1&skn=ops"
        relay = self.parse(["connect"], {**environ, cli.ENV_TOKEN: token})
        self.assertEqual((relay.key, relay.token), (None, token))
        relay = self.parse(["connect", "-e", "x"], {cli.ENV_CONNECTION_STRING: f"Endpoint=sb://h/;SharedAccessSignature={token}"})
        self.assertEqual((relay.url, relay.entity, relay.key, relay.token), ("wss://h", "x", None, token))

    def test_secretsNeverOnTheCommandLine(self) -> None:
        """
        There is no option that takes a key or a token itself.
        """
        for option in ["--key", "--token", "--shared-access-key"]:
            self.assertRaises(usage.UsageError, self.parse, ["token", "-r", "ws://h:1", option, "x"])

    def test_native(self) -> None:
        """
        C{--native} is a flag of connect, listen and forward (both sides),
        off by default; token has none.
        """
        environ = {cli.ENV_KEY: "k"}
        for argv in (["connect"], ["listen"], ["forward", "--local", "0"], ["forward", "--serve", "-t", "h:1"]):
            for flags, expected in (([], False), (["--native"], True)):
                options = cli.Options(environ)
                options.parseOptions([*argv, "-r", "ws://h:1", "-e", "e", *flags])
                self.assertIs(bool(options.subOptions["native"]), expected, argv + flags)
        self.assertRaises(usage.UsageError, self.parse, ["token", "-r", "ws://h:1", "--native"], environ)

    def test_badCombinations(self) -> None:
        environ = {cli.ENV_KEY: "k"}
        bad = [
            (["connect", "--entity", "e"], environ),  # no relay
            (["connect", "--relay", "ws://h:1"], environ),  # no entity
            (["forward", "-r", "ws://h:1", "-e", "e"], environ),  # neither --local nor --serve
            (["forward", "-r", "ws://h:1", "-e", "e", "--serve", "--local", "1"], environ),
            (["forward", "-r", "ws://h:1", "-e", "e", "--local", "localhost:22"], environ),
            (["forward", "-r", "ws://h:1", "-e", "e", "--serve", "--target", "h:1"], {}),  # no key
            (["listen", "-r", "ws://h:1", "-e", "e"], {}),  # no key
            (["token", "-r", "ws://h:1", "-e", "e"], {cli.ENV_TOKEN: "SharedAccessSignature a"}),  # no key
            (["connect", "-r", "ws://h:1", "-e", "e"], {cli.ENV_KEY: "k", cli.ENV_TOKEN: "SharedAccessSignature a"}),
            (["connect", "-r", "ws://h:1", "-e", "e"], {cli.ENV_TOKEN: "not a token"}),
            (["connect", "-r", "ws://h:1", "-e", "e", "--key-file", "/nonexistent"], environ),
            (["connect", "-r", "ws://h:1", "-e", "e", "--ca-cert", "/nonexistent"], environ),
            (["connect", "-e", "e"], {cli.ENV_CONNECTION_STRING: "garbage"}),
            (["token", "-r", "ws://h:1", "--ttl", "0"], environ),
        ]
        for argv, env in bad:
            self.assertRaises(usage.UsageError, self.parse, argv, env)


# token


class LogToTests(SynchronousTestCase):
    """
    C{_logTo}: C{--verbose} lets relaynet's debug events through too.
    """

    def setUp(self) -> None:
        self.addCleanup(setLogLevel, logLevel())
        self.begun: list[Any] = []
        self.patch(cli.globalLogBeginner, "beginLoggingTo", lambda observers, **kwargs: self.begun.append(observers))
        setLogLevel("info")

    def test_verbose(self) -> None:
        cli._logTo(io.StringIO(), True)
        self.assertEqual((logLevel(), len(self.begun)), (LogLevel.debug, 1))

    def test_quiet(self) -> None:
        cli._logTo(io.StringIO(), False)
        self.assertEqual((logLevel(), len(self.begun)), (LogLevel.info, 1))


class TokenTests(CliCase):
    async def test_tokenVerifies(self) -> None:
        """
        The token is signed with the key from --key-file and is valid for
        the entity, for --ttl seconds.
        """
        code, out, err = await self.runCli("token", "--relay", self.url, "--entity", "hyco", "--ttl", "600",
                                        "--key-file", self.keyFile, environ={})
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.count("\n"), 1)
        authorizer = Authorizer([Rule(KEY_NAME, KEY)])
        now = reactor.seconds()
        token = authorizer.authorize(out.strip(), self.relay.host, "hyco", Rights.LISTEN | Rights.SEND, now)
        self.assertTrue(now + 590 < token.expiry <= now + 601)
        self.assertRaises(Forbidden, authorizer.authorize, out.strip(), self.relay.host, "other", Rights.SEND, now)

    async def test_namespaceToken(self) -> None:
        """
        Without --entity the token is for the whole namespace; the key comes
        from a connection string and the rule name from --key-name.
        """
        environ = {cli.ENV_CONNECTION_STRING: f"Endpoint=sb://{self.relay.host}/;SharedAccessKeyName=x;SharedAccessKey=k2"}
        code, out, err = await self.runCli("token", "--key-name", "other", environ=environ)
        self.assertEqual(code, 0, err)
        authorizer = Authorizer([Rule("other", "k2")])
        authorizer.authorize(out.strip(), self.relay.host, "any/thing", Rights.SEND, reactor.seconds())

    async def test_tokenFileServes(self) -> None:
        """
        A token printed by C{token} serves a listener as --token-file.
        """
        _code, out, _err = await self.runCli("token", "-r", self.url, "-e", "hyco")
        path = os.path.join(os.path.dirname(self.keyFile), "token")
        with open(path, "w") as f:
            f.write(out)
        serve = self.start("forward", "--serve", "-r", self.url, "-e", "hyco", "--target", "127.0.0.1:1",
                           "--token-file", path, environ={})
        await serve.waitForLine("serving 'hyco' on ws://")
        self.assertEqual(await serve.stop(), 0)

    async def test_noKey(self) -> None:
        code, out, err = await self.runCli("token", "-r", self.url, "-e", "hyco", environ={})
        self.assertEqual((code, out), (2, ""))
        self.assertOneLine(err, "relaynet token: a key is needed", "--help")


# forward


class ForwardTests(CliCase):
    timeout = 120

    async def sinkSource(self, size: int, expect: int) -> tuple[FlowFactory, int]:
        """
        A local server that sends C{size} random bytes to each connection
        and hashes what it gets.
        """
        factory = FlowFactory(size, expect, False, os.urandom(4 * 1024 * 1024))
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        return factory, port.getHost().port

    async def test_manyConnectionsBothWays(self) -> None:
        """
        20 connections at once each move 50 MiB in each direction (1000 MiB
        each way in all) through forward, the relay and forward --serve;
        every byte arrives, in order, on both ends.
        """
        server, target = await self.sinkSource(EACH, EACH)
        serve, local, port = await self.forwarding(f"127.0.0.1:{target}")
        pool = os.urandom(4 * 1024 * 1024)
        clients = [Flow(EACH, EACH, True, pool) for _ in range(CONNECTIONS)]
        started = time.monotonic()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        for client in clients:
            await endpoint.connect(Factory.forProtocol(lambda client=client: client))
        for client in clients:
            await client.ended
        await waitFor(lambda: len(server.flows) == CONNECTIONS and all(f.ended.called for f in server.flows))
        elapsed = time.monotonic() - started
        self.assertEqual(sorted((c.sent, c.received) for c in clients), [(EACH, EACH)] * CONNECTIONS)
        self.assertEqual(sorted((f.sent, f.received) for f in server.flows), [(EACH, EACH)] * CONNECTIONS)
        # Each client's upload is some server connection's download and
        # the other way round.
        self.assertEqual(
            sorted(c.digests for c in clients), sorted(tuple(reversed(f.digests)) for f in server.flows)
        )
        total = CONNECTIONS * EACH
        sys.stderr.write(
            f"\n  forward: {CONNECTIONS} x {EACH >> 20} MiB each way in {elapsed:.1f} s: "
            f"{total / elapsed / 1e6:.1f} MB/s each way, {2 * total / elapsed / 1e6:.1f} MB/s in all\n"
        )
        self.assertEqual((await serve.stop(), await local.stop()), (0, 0))
        self.assertEqual((serve.stderr.getvalue().count("\n"), local.stderr.getvalue().count("\n")), (1, 1))

    test_manyConnectionsBothWays.timeout = 60  # type: ignore[attr-defined]

    async def stalled(self, reader: Flow, writer: Flow, size: int, readerTransport: Any) -> int:
        """
        With C{reader} not reading, wait until C{writer} can write no more;
        check it is paused with less than half of C{size} out; then let
        everything through.  What was out while stalled.
        """
        await waitFor(lambda: writer.sent > 0)
        last = -1
        while writer.sent != last:
            last = writer.sent
            await wait(0.5)
        self.assertTrue(writer.paused)
        self.assertLess(writer.sent, size // 2, f"{writer.sent >> 20} MiB went out while nobody read")
        readerTransport.resumeProducing()
        return last

    async def test_backpressureDown(self) -> None:
        """
        While the local client does not read, the target's writes are
        paused all the way back: what is in flight stays bounded; then it
        all arrives.
        """
        size = 48 * 1024 * 1024
        server, target = await self.sinkSource(size, 0)
        _serve, _local, port = await self.forwarding(f"127.0.0.1:{target}")
        client = Flow(0, size, True, b"")
        connected = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(lambda: client))
        connected.transport.pauseProducing()
        await waitFor(lambda: server.flows)
        inFlight = await self.stalled(client, server.flows[0], size, connected.transport)
        await client.ended
        self.assertEqual((client.received, client.receivedHash.hexdigest()), (size, server.flows[0].sentHash.hexdigest()))
        sys.stderr.write(f"\n  down: {inFlight / 2**20:.1f} MiB in flight while stalled\n")

    async def test_backpressureUp(self) -> None:
        """
        While the target does not read, the local client's writes are
        paused all the way back.
        """
        size = 48 * 1024 * 1024
        server, target = await self.sinkSource(0, size)
        _serve, _local, port = await self.forwarding(f"127.0.0.1:{target}")
        client = Flow(size, 0, False, os.urandom(4 * 1024 * 1024))
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(lambda: client))
        await waitFor(lambda: server.flows)
        flow = server.flows[0]
        flow.transport.pauseProducing()
        inFlight = await self.stalled(flow, client, size, flow.transport)
        await waitFor(lambda: flow.received == size)
        self.assertEqual(flow.receivedHash.hexdigest(), client.sentHash.hexdigest())
        sys.stderr.write(f"\n  up: {inFlight / 2**20:.1f} MiB in flight while stalled\n")

    async def test_eitherSideEnds(self) -> None:
        """
        The target closing ends the local connection, after what it sent;
        the local client closing ends the target's connection.
        """
        server, target = await self.sinkSource(1000, 0)
        server.args = (1000, 0, True, os.urandom(CHUNK * 2))  # the target closes once it has sent
        _serve, _local, port = await self.forwarding(f"127.0.0.1:{target}")
        client = Flow(0, 10**9, False, b"")
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(lambda: client))
        await client.ended
        self.assertEqual(client.received, 1000)

        server.args = (0, 10**9, False, b"")
        client = Flow(5000, 0, True, os.urandom(CHUNK * 2))
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(lambda: client))
        await client.ended
        await waitFor(lambda: len(server.flows) == 2 and server.flows[1].ended.called)
        self.assertEqual(server.flows[1].received, 5000)

    async def throughForward(self, port: int, server: FlowFactory, size: int) -> None:
        """
        One connection to the local port moves C{size} bytes each way;
        every byte arrives, in order.
        """
        client = Flow(size, size, True, os.urandom(CHUNK * 4))
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(lambda: client))
        await client.ended
        await waitFor(lambda: server.flows and server.flows[-1].ended.called)
        self.assertEqual((client.sent, client.received), (size, size))
        self.assertEqual(client.digests, tuple(reversed(server.flows[-1].digests)))

    async def test_native(self) -> None:
        """
        forward --native on both sides: the relay joins native streams, and
        the bytes pass both ways unchanged.
        """
        joins = watchJoins(self)
        size = 4 * 1024 * 1024
        server, target = await self.sinkSource(size, size)
        serve, local, port = await self.forwarding(f"127.0.0.1:{target}", "--native")
        await self.throughForward(port, server, size)
        self.assertEqual(joins, ["NativeParty"])
        self.assertEqual((await serve.stop(), await local.stop()), (0, 0))

    async def test_nativeLocalWebSocketServe(self) -> None:
        """
        forward --local --native reaches a forward --serve without it: the
        relay bridges the native stream to the WebSocket listener.
        """
        joins = watchJoins(self)
        size = 1024 * 1024
        server, target = await self.sinkSource(size, size)
        serve = self.start("forward", "--serve", "-r", self.url, "-e", "hyco", "--target", f"127.0.0.1:{target}")
        await serve.waitForLine("serving 'hyco'")
        local = self.start("forward", "-r", self.url, "-e", "hyco", "--local", "127.0.0.1:0", "--native")
        port = int((await local.waitForLine(r"forwarding 127\.0\.0\.1:(\d+)")).group(1))
        await self.throughForward(port, server, size)
        self.assertEqual(joins, ["HybridConnectionProtocol"])

    async def test_targetRefuses(self) -> None:
        """
        A target that refuses closes the relayed stream, and so the local
        connection; forward --serve says so in one line and goes on.
        """
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
        closed = port.getHost().port
        await port.stopListening()
        serve, _local, localPort = await self.forwarding(f"127.0.0.1:{closed}")
        for _ in range(2):
            client = Flow(10, 0, False, os.urandom(CHUNK * 2))
            await TCP4ClientEndpoint(reactor, "127.0.0.1", localPort).connect(Factory.forProtocol(lambda c=client: c))
            await client.ended
        await serve.waitForLine(f"cannot connect to 127.0.0.1:{closed}: .*refused")
        self.assertEqual(serve.stderr.getvalue().count("cannot connect"), 2)
        self.assertIsNone(serve.code)

    async def test_noListener(self) -> None:
        """
        Without a listener, each local connection is closed, with one line
        that says why; forward goes on.
        """
        local = self.start("forward", "-r", self.url, "-e", "hyco", "--local", "0")
        port = int((await local.waitForLine(r"forwarding 127\.0\.0\.1:(\d+)")).group(1))
        client = Flow(10, 0, False, os.urandom(CHUNK * 2))
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(lambda: client))
        await client.ended
        line = (await local.waitForLine(r"connection from 127\.0\.0\.1:\d+ closed: .*\n")).group(0)
        self.assertIn("no listener is connected to 'hyco'", line)
        self.assertIsNone(local.code)

    async def test_cleanShutdown(self) -> None:
        """
        A stop (SIGINT or SIGTERM in main) closes the local port, the
        connections and the listener, and exits 0.
        """
        server, target = await self.sinkSource(0, 10**9)
        serve, local, port = await self.forwarding(f"127.0.0.1:{target}")
        clients = [Flow(1000, 10**9, False, os.urandom(CHUNK * 2)) for _ in range(3)]
        for client in clients:
            await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(lambda c=client: c))
        await waitFor(lambda: sum(f.received for f in server.flows) == 3000)
        self.assertEqual(await serve.stop(), 0)
        for client in clients:
            await client.ended
        await waitFor(lambda: all(f.ended.called for f in server.flows))
        with self.assertRaises(NoListenerError):
            await connectStream(reactor, self.url, "hyco", fromKey(KEY_NAME, KEY, reactor), Factory.forProtocol(Protocol))
        self.assertEqual(await local.stop(), 0)
        with self.assertRaises(ConnectionRefusedError):
            await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(Protocol))

    async def test_relayRestart(self) -> None:
        """
        forward --serve stays up while the relay restarts, says so, and
        forwards again once it is back.
        """
        server, target = await self.sinkSource(1000, 1000)
        serve, local, port = await self.forwarding(f"127.0.0.1:{target}")
        relayPort = self.relay.port
        await self.relay.service.stopService()
        await serve.waitForLine("lost the relay; reconnecting to ws://")
        options = Options()
        options.parseOptions(["--listen", f"tcp:{relayPort}:interface=127.0.0.1", "--data-dir", self.mktemp(),
                              "--rule", f"{KEY_NAME}={KEY}", "--entity", "hyco"])
        os.makedirs(options["data-dir"])
        self.relay.service = RelayService.fromOptions(options, reactor)
        self.relay.service.startService()
        await serve.waitForLine("listening on 'hyco' on ws://.* again", timeout=30)
        client = Flow(1000, 1000, True, os.urandom(CHUNK * 2))
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(lambda: client))
        await client.ended
        self.assertEqual(client.digests, tuple(reversed(server.flows[0].digests)))

    async def test_badKey(self) -> None:
        wrong = {cli.ENV_KEY: "d3Jvbmc="}
        code, _out, err = await self.runCli("forward", "--serve", "-r", self.url, "-e", "hyco", "-t", "127.0.0.1:1",
                                        environ=wrong)
        self.assertEqual(code, 1)
        self.assertOneLine(err, "relaynet forward: the relay refused the credentials for 'hyco'", "401")

    async def test_unreachableRelay(self) -> None:
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
        closed = port.getHost().port
        await port.stopListening()
        code, _out, err = await self.runCli("forward", "--serve", "-r", f"ws://127.0.0.1:{closed}", "-e", "hyco",
                                        "-t", "127.0.0.1:1")
        self.assertEqual(code, 1)
        self.assertOneLine(err, f"cannot reach the relay at ws://127.0.0.1:{closed}")

    async def test_localPortTaken(self) -> None:
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
        self.addCleanup(port.stopListening)
        code, _out, err = await self.runCli("forward", "-r", self.url, "-e", "hyco", "--local", str(port.getHost().port))
        self.assertEqual(code, 1)
        self.assertOneLine(err, "cannot listen on")


class TlsForwardTests(CliCase):
    def setUp(self) -> None:
        super().setUp()
        self.relay = RelayFixture(self, ["--entity", "hyco"], tls=True)
        self.url = f"wss://{self.relay.host}"

    async def test_overTls(self) -> None:
        """
        With --ca-cert, forwarding works through a wss:// relay; without it
        the relay's certificate is not trusted: one line, exit 1.
        """
        code, _out, err = await self.runCli("forward", "--serve", "-r", self.url, "-e", "hyco", "-t", "127.0.0.1:1")
        self.assertEqual(code, 1)
        self.assertOneLine(err, f"relaynet forward: the TLS handshake with the relay at {self.url} failed", "--ca-cert")

        server = FlowFactory(100_000, 100_000, False, os.urandom(CHUNK * 4))
        listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server)
        self.addCleanup(listening.stopListening)
        _serve, _local, port = await self.forwarding(f"127.0.0.1:{listening.getHost().port}",
                                                   "--ca-cert", self.relay.certPath or "")
        client = Flow(100_000, 100_000, True, os.urandom(CHUNK * 4))
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(lambda: client))
        await client.ended
        await waitFor(lambda: server.flows and server.flows[0].ended.called)
        self.assertEqual(client.digests, tuple(reversed(server.flows[0].digests)))


# connect, in this process (it fails before it touches stdio)


class ConnectRefusedTests(CliCase):
    async def test_noListener(self) -> None:
        code, _out, err = await self.runCli("connect", "-r", self.url, "-e", "hyco")
        self.assertEqual(code, 1)
        self.assertOneLine(err, "relaynet connect: no listener is connected to 'hyco' on ws://", "404")

    async def test_unknownEntity(self) -> None:
        code, _out, err = await self.runCli("connect", "-r", self.url, "-e", "nope")
        self.assertEqual(code, 1)
        self.assertOneLine(err, "relaynet connect: there is no entity 'nope'")

    async def test_badKeyListen(self) -> None:
        code, _out, err = await self.runCli("listen", "-r", self.url, "-e", "hyco", environ={cli.ENV_KEY: "d3Jvbmc="})
        self.assertEqual(code, 1)
        self.assertOneLine(err, "relaynet listen: the relay refused the credentials")


# Real subprocesses.


class Process(ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        self.ended.callback(value.exitCode if value.exitCode is not None else -(value.signal or 0))

    async def waitFor(self, pattern: bytes, stream: str = "err", timeout: float = 20) -> None:
        await waitFor(lambda: re.search(pattern, getattr(self, stream)) or self.ended.called, timeout, repr(pattern))
        if not re.search(pattern, getattr(self, stream)):
            raise AssertionError(f"exited without {pattern!r}: out={self.out!r} err={self.err!r}")


class SubprocessTests(CliCase):
    def spawn(self, *argv: str) -> tuple[Process, Any]:
        process = Process()
        environ = dict(os.environ, PYTHONPATH=ROOT, **self.environ)
        transport = reactor.spawnProcess(
            process, sys.executable, [sys.executable, "-m", "relaynet.cli", *argv], env=environ, path=ROOT,
        )

        async def kill() -> None:
            if not process.ended.called:
                transport.signalProcess("KILL")
                await process.ended

        self.addCleanup(kill)
        return process, transport

    async def test_help(self) -> None:
        process, _ = self.spawn("forward", "--help")
        self.assertEqual(await process.ended, 0)
        self.assertIn(b"Usage: relaynet forward [options]", process.out)
        self.assertIn(b"--serve", process.out)
        self.assertEqual(process.err, b"")

    async def test_errorExit(self) -> None:
        process, _ = self.spawn("connect", "--relay", self.url, "--entity", "hyco")
        self.assertEqual(await process.ended, 1)
        self.assertEqual(process.out, b"")
        self.assertOneLine(process.err.decode(), "no listener is connected to 'hyco'")

        process, _ = self.spawn("forward", "--entity", "hyco", "--local", "0")
        self.assertEqual(await process.ended, 2)
        self.assertOneLine(process.err.decode(), "--relay is required")

    async def test_sigterm(self) -> None:
        """
        SIGTERM stops forward --serve cleanly, with a connection open: the
        relayed stream and the target's connection are closed, the listener
        is gone, and the exit status is 0.
        """
        target = FlowFactory(0, 10**9, False, b"")
        listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(target)
        self.addCleanup(listening.stopListening)
        process, transport = self.spawn("forward", "--serve", "-r", self.url, "-e", "hyco",
                                        "-t", f"127.0.0.1:{listening.getHost().port}")
        await process.waitFor(b"serving 'hyco'")
        tokens = fromKey(KEY_NAME, KEY, reactor)
        sender = Flow(1000, 10**9, False, os.urandom(CHUNK * 2))
        await connectStream(reactor, self.url, "hyco", tokens, Factory.forProtocol(lambda: sender))
        await waitFor(lambda: target.flows and target.flows[0].received == 1000)
        transport.signalProcess("TERM")
        self.assertEqual(await process.ended, 0)
        self.assertEqual(process.err.count(b"\n"), 1, process.err)
        await sender.ended
        await target.flows[0].ended
        with self.assertRaises(NoListenerError):
            await connectStream(reactor, self.url, "hyco", tokens, Factory.forProtocol(Protocol))

    async def test_listenAndConnect(self) -> None:
        """
        A short exchange through two stdio processes: connect's input ends
        at once but its connection stays open; listen, with -N, closes the
        connection at the end of its input; both exit 0.
        """
        listen, listenTransport = self.spawn("listen", "-r", self.url, "-e", "hyco", "-N")
        await listen.waitFor(b"listening on 'hyco'")
        connect, connectTransport = self.spawn("connect", "-r", self.url, "-e", "hyco")
        connectTransport.write(b"ping\n")
        connectTransport.closeStdin()
        await listen.waitFor(b"ping\n", "out")
        listenTransport.write(b"pong\n")
        listenTransport.closeStdin()
        self.assertEqual(await connect.ended, 0, connect.err)
        self.assertEqual(await listen.ended, 0, listen.err)
        self.assertEqual((listen.out, connect.out), (b"ping\n", b"pong\n"))
        self.assertEqual(connect.err, b"")

    async def test_listenAndConnectNative(self) -> None:
        """
        listen --native and connect --native: bytes pass both ways, and
        both exit 0.
        """
        joins = watchJoins(self)
        listen, listenTransport = self.spawn("listen", "-r", self.url, "-e", "hyco", "-N", "--native")
        await listen.waitFor(b"listening on 'hyco'")
        connect, connectTransport = self.spawn("connect", "-r", self.url, "-e", "hyco", "--native")
        payload = os.urandom(256 * 1024)
        connectTransport.write(payload)
        connectTransport.closeStdin()
        await listen.waitFor(re.escape(payload), "out")
        listenTransport.write(b"pong\n")
        listenTransport.closeStdin()
        self.assertEqual(await connect.ended, 0, connect.err)
        self.assertEqual(await listen.ended, 0, listen.err)
        self.assertEqual((listen.out, connect.out), (payload, b"pong\n"))
        self.assertEqual(connect.err, b"")
        self.assertEqual(joins, ["NativeParty"])

    async def test_listenOneAtATime(self) -> None:
        """
        listen --keep-open takes one connection at a time: another sender is
        refused (503) while it lasts; the next one after it is taken.
        """
        listen, listenTransport = self.spawn("listen", "-r", self.url, "-e", "hyco", "--keep-open")
        await listen.waitFor(b"listening on 'hyco'")
        first, firstTransport = self.spawn("connect", "-r", self.url, "-e", "hyco", "--close-on-eof")
        firstTransport.write(b"one\n")
        await listen.waitFor(b"one\n", "out")
        second, _ = self.spawn("connect", "-r", self.url, "-e", "hyco")
        self.assertEqual(await second.ended, 1)
        self.assertOneLine(second.err.decode(), "the listener of 'hyco' on ws://", "rejected the connection (503")
        firstTransport.closeStdin()
        self.assertEqual(await first.ended, 0, first.err)
        third, thirdTransport = self.spawn("connect", "-r", self.url, "-e", "hyco", "-N")
        thirdTransport.write(b"two\n")
        await listen.waitFor(b"one\ntwo\n", "out")
        listenTransport.write(b"back\n")
        await third.waitFor(b"back\n", "out")
        thirdTransport.closeStdin()
        self.assertEqual(await third.ended, 0, third.err)
        listenTransport.signalProcess("INT")
        self.assertEqual(await listen.ended, 0, listen.err)
        self.assertEqual(listen.err.count(b"\n"), 1, listen.err)

    async def test_connectStopped(self) -> None:
        """
        SIGTERM stops connect cleanly: its connection is closed, both exit 0.
        """
        listen, _ = self.spawn("listen", "-r", self.url, "-e", "hyco")
        await listen.waitFor(b"listening on 'hyco'")
        connect, connectTransport = self.spawn("connect", "-r", self.url, "-e", "hyco")
        connectTransport.write(b"hi\n")
        await listen.waitFor(b"hi\n", "out")
        connectTransport.signalProcess("TERM")
        self.assertEqual((await connect.ended, connect.err), (0, b""))
        self.assertEqual(await listen.ended, 0, listen.err)

"""
Microsoft's unmodified Node client, npm C{hyco-ws} 1.0.5, through relaynet:
its listener and its sender, run as real processes against a relay on
127.0.0.1.  C{make test} installs them (C{relaynet/test/node}).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from relaynet.test.support import KEY, KEY_NAME, RelayFixture

NODE_DIR = os.path.join(os.path.dirname(__file__), "node")
NODE = shutil.which("node")


class NodeScript(ProcessProtocol):
    """
    One of the harness scripts: its stdout lines, and its exit code.
    """

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.stderr = b""
        self.ended: Deferred[int] = Deferred()
        self._buffer = b""
        self._waiting: list[tuple[str, Deferred[str]]] = []

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            text = line.decode("utf-8", "replace").strip()
            self.lines.append(text)
            for entry in list(self._waiting):
                if text.startswith(entry[0]):
                    self._waiting.remove(entry)
                    entry[1].callback(text)

    def errReceived(self, data: bytes) -> None:
        self.stderr = (self.stderr + data)[-20000:]

    def processEnded(self, reason: Failure) -> None:
        code = reason.value.exitCode if isinstance(reason.value, (ProcessDone, ProcessTerminated)) else -1
        for prefix, d in self._waiting:
            d.errback(AssertionError(f"script ended ({code}) before {prefix!r}: {self.stderr.decode(errors='replace')}"))
        self._waiting = []
        self.ended.callback(code if code is not None else -1)

    def line(self, prefix: str, timeout: float = 30) -> Deferred[str]:
        """
        The first line (already seen or still to come) starting with
        C{prefix}.
        """
        for text in self.lines:
            if text.startswith(prefix):
                d: Deferred[str] = Deferred()
                d.callback(text)
                return d
        d = Deferred()
        self._waiting.append((prefix, d))
        return d.addTimeout(timeout, reactor)


class HycoWsInteropTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        if NODE is None or not os.path.isdir(os.path.join(NODE_DIR, "node_modules", "hyco-ws")):
            self.fail("the Node clients are not installed: run `make node-deps` (make test does)")
        self.relay = RelayFixture(self, ["--entity", "hyco", "--entity", "site/a"])

    def spawn(self, script: str, entity: str, *args: str, deadline: int = 60) -> NodeScript:
        proto = NodeScript()
        argv = [
            NODE,
            os.path.join(NODE_DIR, script),
            "--relay",
            f"ws://{self.relay.host}",
            "--entity",
            entity,
            "--key-name",
            KEY_NAME,
            "--key",
            KEY,
            "--deadline",
            str(deadline),
            *args,
        ]
        process = reactor.spawnProcess(proto, NODE, argv, env=dict(os.environ), path=NODE_DIR)

        def stop() -> Deferred[int]:
            if not proto.ended.called:
                process.signalProcess(signal.SIGTERM)
            return proto.ended

        self.addCleanup(stop)
        return proto

    async def listener(self, entity: str = "hyco", *args: str) -> NodeScript:
        listener = self.spawn("hyco_ws_listener.js", entity, *args)
        await listener.line("READY")
        return listener

    async def send(self, entity: str, *args: str) -> tuple[int, list[dict[str, Any]], NodeScript]:
        sender = self.spawn("hyco_ws_sender.js", entity, *args)
        code = await sender.ended
        results = [json.loads(line) for line in sender.lines if line.startswith("{")]
        return code, results, sender

    def assertAllOk(self, code: int, results: list[dict[str, Any]], sender: NodeScript, count: int) -> None:
        self.assertEqual(code, 0, f"{sender.lines} {sender.stderr.decode(errors='replace')}")
        self.assertEqual(len(results), count)
        self.assertTrue(all(r["ok"] for r in results), results)
        self.assertEqual(sender.lines[-1], f"DONE ok={count} failed=0")

    async def test_binaryEcho(self) -> None:
        """
        Binary messages from 1 byte to 1 MiB come back byte for byte.
        """
        await self.listener()
        code, results, sender = await self.send("hyco", "--sizes", "1,100,65535,65536,65537,1048576")
        self.assertAllOk(code, results, sender, 1)
        self.assertEqual(results[0]["messages"], 6)
        self.assertEqual(results[0]["bytes"], 1 + 100 + 65535 + 65536 + 65537 + 1048576)

    async def test_textEcho(self) -> None:
        await self.listener()
        code, results, sender = await self.send("hyco", "--text", "--sizes", "1,1000,65536,1048576")
        self.assertAllOk(code, results, sender, 1)

    async def test_entityWithSlashAndQueryToken(self) -> None:
        await self.listener("site/a")
        code, results, sender = await self.send("site/a", "--token-in-query", "--sizes", "10,20000")
        self.assertAllOk(code, results, sender, 1)

    async def test_concurrentSenders(self) -> None:
        """
        Several senders at once, each with its own relayed connection.
        """
        await self.listener()
        code, results, sender = await self.send("hyco", "--connections", "8", "--sizes", "1,4096,300000")
        self.assertAllOk(code, results, sender, 8)
        self.assertEqual(sorted(r["conn"] for r in results), list(range(8)))

    async def test_twoListeners(self) -> None:
        await self.listener()
        await self.listener()
        code, results, sender = await self.send("hyco", "--connections", "6", "--sizes", "1,1000")
        self.assertAllOk(code, results, sender, 6)

    async def test_listenerDisconnects(self) -> None:
        """
        A listener process that dies with a connection open ends the
        sender's connection, and the relay forgets it: the next sender is
        told there is no listener.
        """
        listener = await self.listener("hyco", "--mode", "drop-after", "1")
        code, results, sender = await self.send("hyco", "--sizes", "1,1000000,1000000,1000000,1000000")
        await listener.ended
        self.assertEqual(code, 1)
        self.assertFalse(results[0]["ok"])
        code, results, sender = await self.send("hyco", "--expect-fail", "--expect-status", "404")
        self.assertEqual(code, 0, sender.lines)
        self.assertIn("no listeners", results[0]["reason"])

    async def test_badSenderToken(self) -> None:
        await self.listener()
        forged = "SharedAccessSignature sr=http%3A%2F%2F127.0.0.1%2Fhyco&sig=AAAA&se=9999999999&skn=" + KEY_NAME
        code, results, sender = await self.send("hyco", "--token-override", forged, "--expect-fail", "--expect-status", "401")
        self.assertEqual(code, 0, sender.lines)
        self.assertIn("REFUSED 401", sender.lines)
        code, results, sender = await self.send("hyco", "--no-token", "--expect-fail", "--expect-status", "401")
        self.assertEqual(code, 0, sender.lines)

    async def test_badListenerToken(self) -> None:
        listener = self.spawn("hyco_ws_listener.js", "hyco", "--token-override", "SharedAccessSignature garbage", "--expect-fail")
        self.assertEqual(await listener.line("REFUSED"), "REFUSED 401")
        self.assertEqual(await listener.ended, 0)

"""
Microsoft's unmodified Node client, npm C{hyco-ws} 1.0.5, through relaynet:
its listener and its sender, run as real processes against a relay on
127.0.0.1.  C{make test} installs them (C{relaynet/test/node}).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import TestCase

from relaynet.test.support import KEY, KEY_NAME, NodeScript, RelayFixture, requireNode, spawnNode


class HycoWsCase(TestCase):
    """
    A relay with the entities C{hyco} and C{site/a}, and the C{hyco-ws}
    Node scripts to run against it.
    """

    timeout = 120

    def setUp(self) -> None:
        requireNode(self, "hyco-ws")
        self.relay = RelayFixture(self, ["--entity", "hyco", "--entity", "site/a"])

    def spawn(self, script: str, entity: str, *args: str, deadline: int = 60) -> NodeScript:
        return spawnNode(
            self,
            script,
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
        )

    async def send(self, entity: str, *args: str) -> tuple[int, list[dict[str, Any]], NodeScript]:
        sender = self.spawn("hyco_ws_sender.js", entity, *args)
        code = await sender.ended
        results = [json.loads(line) for line in sender.lines if line.startswith("{")]
        return code, results, sender

    def assertAllOk(self, code: int, results: list[dict[str, Any]], sender: NodeScript, count: int) -> None:
        self.assertEqual(code, 0, f"{sender.lines} {sender.stderr.decode(errors='replace')}")
        self.assertEqual(len(results), count)
        self.assertTrue(all(r["ok"] for r in results), results)


class HycoWsInteropTests(HycoWsCase):
    async def listener(self, entity: str = "hyco", *args: str) -> NodeScript:
        listener = self.spawn("hyco_ws_listener.js", entity, *args)
        await listener.line("READY")
        return listener

    def assertAllOk(self, code: int, results: list[dict[str, Any]], sender: NodeScript, count: int) -> None:
        super().assertAllOk(code, results, sender, count)
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

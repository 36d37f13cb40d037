"""
Microsoft's unmodified Node HTTP listener, npm C{hyco-https} 1.4.5 (plain
and with an Express app on it), behind relaynet, called by plain Node and
Python HTTP clients.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from relaynet.test.support import KEY, KEY_NAME, NodeScript, RelayFixture, requireNode, spawnNode
from relaynet.test.test_loopback_http import Bytes


def pattern(size: int) -> bytes:
    """
    The harness's deterministic body: byte i is i % 251.
    """
    return bytes(range(251)) * (size // 251) + bytes(range(size % 251))


class HycoHttpsInterop:
    app = "plain"
    appArgs: tuple[str, ...] = ()
    timeout = 120

    def setUp(self) -> None:
        requireNode(self, "hyco-https")  # type: ignore[arg-type]
        self.relay = RelayFixture(self, ["--entity", "web", "--request-timeout", "3"])  # type: ignore[arg-type]

    def spawn(self, script: str, *args: str) -> NodeScript:
        return spawnNode(self, script, "--deadline", "60", *args)  # type: ignore[arg-type]

    async def listener(self) -> NodeScript:
        proto = self.spawn(
            "hyco_https_listener.js", "--relay", f"ws://{self.relay.host}", "--entity", "web",
            "--key-name", KEY_NAME, "--key", KEY, "--app", self.app, *self.appArgs,
        )
        await proto.line("READY")
        return proto

    async def node(self, path: str, *args: str) -> list[dict[str, Any]]:
        """
        Call the relay with the harness's plain Node HTTP client.
        """
        proto = self.spawn(
            "http_sender.js", "--url", f"http://{self.relay.host}/web{path}", "--entity", "web",
            "--key-name", KEY_NAME, "--key", KEY, *args,
        )
        code = await proto.ended
        results = [json.loads(line) for line in proto.lines if line.startswith("{")]
        assert code == 0, (proto.lines, proto.stderr)
        return results

    async def python(self, method: bytes, path: str, body: bytes | None = None) -> tuple[Any, bytes]:
        headers = Headers({"ServiceBusAuthorization": [self.relay.token("web")]})
        response = await Agent(reactor).request(
            method, f"http://{self.relay.host}/web{path}".encode(), headers, Bytes(body) if body is not None else None
        )
        return response, await readBody(response)

    async def test_echoSizes(self) -> None:
        """
        Bodies of 0, 1, 64 KiB, 64 KiB + 1 and 5 MiB go to the listener and
        come back whole; so does a chunked request.
        """
        await self.listener()
        for size in (0, 1, 65536, 65537, 5 * 1024 * 1024):
            [result] = await self.node("/echo", "--body-size", str(size))
            self.assertEqual((result["status"], result["bodyLength"]), (200, size))  # type: ignore[attr-defined]
            self.assertEqual(result["bodySha256"], hashlib.sha256(pattern(size)).hexdigest())  # type: ignore[attr-defined]
        [result] = await self.node("/echo", "--body-size", "200000", "--chunked")
        self.assertEqual(result["bodySha256"], hashlib.sha256(pattern(200000)).hexdigest())  # type: ignore[attr-defined]

    async def test_downloads(self) -> None:
        await self.listener()
        for size in (10, 65536, 65537, 5 * 1024 * 1024):
            response, body = await self.python(b"GET", f"/bytes/{size}")
            self.assertEqual(body, pattern(size))  # type: ignore[attr-defined]
            self.assertTrue(response.headers.getRawHeaders("via"))  # type: ignore[attr-defined]

    async def test_pythonPost(self) -> None:
        await self.listener()
        data = b"x" * 100000
        response, body = await self.python(b"POST", "/info?q=1", data)
        info = json.loads(body)
        self.assertEqual((info["method"], info["bodyLength"]), ("POST", 100000))  # type: ignore[attr-defined]
        self.assertEqual(info["url"], "/web/info?q=1")  # type: ignore[attr-defined]

    async def test_statuses(self) -> None:
        await self.listener()
        for code in (201, 204, 304, 404, 418, 500, 502, 504):
            [result] = await self.node(f"/status/{code}")
            self.assertEqual(result["status"], code)  # type: ignore[attr-defined]
        response, body = await self.python(b"HEAD", "/info")
        self.assertEqual((response.code, body), (200, b""))  # type: ignore[attr-defined]

    async def test_concurrent(self) -> None:
        await self.listener()
        results = await self.node("/echo", "--body-size", "3000", "--concurrency", "10", "--count", "30")
        self.assertEqual(len(results), 30)  # type: ignore[attr-defined]
        self.assertTrue(all(r["status"] == 200 and r["bodyLength"] == 3000 for r in results), results)  # type: ignore[attr-defined]

    async def test_deadline(self) -> None:
        await self.listener()
        response, body = await self.python(b"GET", "/slow/5000")
        self.assertEqual(response.code, 504)  # type: ignore[attr-defined]
        self.assertEqual(json.loads(body)["error"]["code"], "GatewayTimeout")  # type: ignore[attr-defined]


class PlainHycoHttpsTests(HycoHttpsInterop, TestCase):
    async def test_headerQuirks(self) -> None:
        """
        Lower-cased names and a number for a value come out as headers.
        """
        await self.listener()
        response, body = await self.python(b"GET", "/headers")
        self.assertEqual((response.code, body), (200, b"ok"))
        self.assertEqual(response.headers.getRawHeaders("x-number"), ["5"])
        self.assertTrue(response.headers.getRawHeaders("set-cookie"))


class ExpressHycoHttpsTests(HycoHttpsInterop, TestCase):
    """
    An Express app on hyco-https.  hyco-https 1.4.5 loses the request's
    C{handleBody} when Express swaps the request's prototype, so a body on
    the control channel crashes an unmodified Express listener
    (azure-relay-node issue 30); the app pins the request first.
    """

    app = "express"
    appArgs = ("--pin-request",)

    async def test_expressJson(self) -> None:
        await self.listener()
        response, body = await self.python(b"GET", "/info")
        self.assertEqual(response.code, 200)
        self.assertIn("x-powered-by", [k.decode().lower() for k, _ in response.headers.getAllRawHeaders()])


class UnmodifiedExpressTests(TestCase):
    """
    An unmodified Express app on hyco-https serves requests without a body
    and requests whose body comes over a rendezvous.
    """

    timeout = 60

    setUp = HycoHttpsInterop.setUp
    spawn = HycoHttpsInterop.spawn
    listener = HycoHttpsInterop.listener
    python = HycoHttpsInterop.python
    app = "express"
    appArgs: tuple[str, ...] = ()

    async def test_getAndLargePost(self) -> None:
        await self.listener()
        response, body = await self.python(b"GET", "/info")
        self.assertEqual(json.loads(body)["method"], "GET")
        response, body = await self.python(b"POST", "/echo", b"y" * 70000)
        self.assertEqual(body, b"y" * 70000)

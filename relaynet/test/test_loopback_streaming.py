"""
100 MiB up and 100 MiB down through a relay running as its own process,
whose memory is read from /proc: bodies stream, they are not held.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from relaynet.test.support import KEY, KEY_NAME, RelayFixture
from relaynet.test.test_loopback_http import Bytes, HttpListener

SIZE = 100 * 1024 * 1024
BUDGET = 32 * 1024 * 1024
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class RelayProcess(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.serving: Deferred[int] = Deferred()
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        match = re.search(rb"relaynet serving on 127\.0\.0\.1:(\d+)", self.output)
        if match and not self.serving.called:
            self.serving.callback(int(match.group(1)))

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if not self.serving.called:
            self.serving.errback(AssertionError(self.output.decode(errors="replace")))
        self.ended.callback(None)


def memory(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


class ProcessFixture(RelayFixture):
    """
    A RelayFixture whose relay is a separate twistd process.
    """

    def __init__(self, case: TestCase, port: int, pid: int) -> None:
        self.tls = False
        self.port = port
        self.host = f"127.0.0.1:{port}"
        self.pid = pid
        self.clients = []
        self.certPath = None
        case.addCleanup(self._dropClients)

    async def _dropClients(self) -> None:
        for client in self.clients:
            if client.transport is not None and not client.closed.called:
                client.transport.abortConnection()
        await deferLater(reactor, 0.1, lambda: None)


class StreamingTests(TestCase):
    timeout = 240

    async def test_hundredMiBBothWays(self) -> None:
        process = RelayProcess()
        dataDir = self.mktemp()
        os.makedirs(dataDir)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        args = [twistd, "-n", "--pidfile=", "relaynet", "--listen", "tcp:0:interface=127.0.0.1",
                "--rule", f"{KEY_NAME}={KEY}", "--entity", "big", "--data-dir", dataDir]
        env = dict(os.environ, PYTHONPATH=ROOT)
        transport = reactor.spawnProcess(process, twistd, args, env=env, path=ROOT)

        def stop() -> Deferred[None]:
            if not process.ended.called:
                transport.signalProcess("TERM")
            return process.ended

        self.addCleanup(stop)
        port = await process.serving
        fixture = ProcessFixture(self, port, transport.pid)

        payload = os.urandom(SIZE)
        digest = hashlib.sha256(payload).hexdigest()

        def handler(request: dict[str, Any], body: bytes) -> Any:
            if request["method"] == "POST":
                return 200, {}, hashlib.sha256(body).hexdigest().encode(), False
            return 200, {"content-type": "application/octet-stream"}, payload, True

        listener = fixture.connect(fixture.url("big", "listen", fixture.token("big")), protocolClass=HttpListener)
        listener.handler = handler
        listener.fixture = fixture
        await listener.opened
        before = memory(transport.pid, "VmRSS")

        headers = Headers({"ServiceBusAuthorization": [fixture.token("big")]})
        agent = Agent(reactor)
        response = await agent.request(b"POST", f"http://{fixture.host}/big/up".encode(), headers, Bytes(payload))
        self.assertEqual((response.code, (await readBody(response)).decode()), (200, digest))

        response = await agent.request(b"GET", f"http://{fixture.host}/big/down".encode(), headers)
        body = await readBody(response)
        self.assertEqual(hashlib.sha256(body).hexdigest(), digest)

        peak = memory(transport.pid, "VmHWM")
        self.assertLess(peak - before, BUDGET, f"relay grew from {before >> 20} MiB to a peak of {peak >> 20} MiB")

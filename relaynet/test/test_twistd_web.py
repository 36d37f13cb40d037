# -*- test-case-name: relaynet.test.test_twistd_web -*-
"""
C{twistd web --listen relay:...} as a real process: the relay: endpoint
plugin is found by twistd, and a directory it serves is reached through a
relay on 127.0.0.1, over the relay's HTTP path and over a relayed stream.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

import relaynet
from relaynet.test.support import KEY, RelayFixture
from relaynet.test.test_endpoints import RelayedStreams, escape

REPO = os.path.dirname(os.path.dirname(os.path.abspath(relaynet.__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
REGISTER_TIMEOUT = 30.0


class Output(ProcessProtocol):
    """
    Keeps what the process writes; C{ended} fires with how it ended.
    """

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[BaseException] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(reason.value)


class TwistdWebTests(TestCase):
    timeout = 90

    def setUp(self) -> None:
        if not os.access(TWISTD, os.X_OK):
            raise SkipTest(f"no twistd next to {sys.executable}")
        self.relay = RelayFixture(self, ["--entity", "web"])
        self.directory = os.path.abspath(self.mktemp())
        self.docs = os.path.join(self.directory, "docs")
        os.makedirs(self.docs)
        self.keyFile = os.path.join(self.directory, "listen.key")
        with open(self.keyFile, "w") as f:
            f.write(KEY + "\n")
        with open(os.path.join(self.docs, "hello.txt"), "wb") as f:
            f.write(b"hello through the relay\n")
        self.big = os.urandom(300000)
        with open(os.path.join(self.docs, "big.bin"), "wb") as f:
            f.write(self.big)
        self.description = f"relay:web:url=ws\\://127.0.0.1\\:{self.relay.port}:keyFile={escape(self.keyFile)}"

    def twistd(self) -> Output:
        """
        Start C{twistd -n web --listen relay:... --path DOCS}; it is
        stopped after the test if it is still running.
        """
        output = Output()
        args = [TWISTD, "-n", "--pidfile=", "web", "--listen", self.description, "--path", self.docs]
        env = dict(os.environ, PYTHONPATH=REPO)
        process = reactor.spawnProcess(output, TWISTD, args, env=env, path=self.directory)

        async def stop() -> None:
            if not output.ended.called:
                process.signalProcess("KILL")
                await output.ended

        self.addCleanup(stop)
        return output

    async def get(self, path: str) -> tuple[int, bytes]:
        """
        GET C{path} through the relay's HTTP path.
        """
        headers = Headers({"ServiceBusAuthorization": [self.relay.token("web")]})
        response = await Agent(reactor).request(b"GET", f"http://{self.relay.host}{path}".encode(), headers)
        return response.code, await readBody(response)

    async def registered(self, output: Output) -> None:
        """
        Wait, a bounded time, until the site answers through the relay.
        """
        for _ in range(int(REGISTER_TIMEOUT / 0.2)):
            if output.ended.called:
                self.fail(f"twistd ended early:\n{output.output.decode(errors='replace')}")
            code, _ = await self.get("/web/hello.txt")
            if code == 200:
                return
            await deferLater(reactor, 0.2, lambda: None)
        self.fail(f"twistd did not register in {REGISTER_TIMEOUT} s:\n{output.output.decode(errors='replace')}")

    async def test_serveDirectory(self) -> None:
        output = self.twistd()
        await self.registered(output)

        self.assertEqual(await self.get("/web/hello.txt"), (200, b"hello through the relay\n"))
        self.assertEqual(await self.get("/web/big.bin"), (200, self.big))
        code, _ = await self.get("/web/missing.txt")
        self.assertEqual(code, 404)

        streams = Agent.usingEndpointFactory(reactor, RelayedStreams(clientFromString(reactor, self.description)))
        response = await streams.request(b"GET", b"http://web/hello.txt")
        self.assertEqual((response.code, await readBody(response)), (200, b"hello through the relay\n"))
        response = await streams.request(b"GET", b"http://web/big.bin")
        self.assertEqual((response.code, await readBody(response)), (200, self.big))

        process: Any = output.transport
        process.signalProcess("TERM")
        ended = await output.ended
        text = output.output.decode(errors="replace")
        # twistd stops cleanly, then ends itself with the signal it got.
        self.assertIsInstance(ended, (ProcessDone, ProcessTerminated), text)
        self.assertIn(getattr(ended, "signal", None), (None, 15), text)
        self.assertIn(getattr(ended, "exitCode", None), (None, 0), text)
        self.assertIn("Server Shut Down", text)
        self.assertIn("listening on web", text)
        self.assertNotIn("Traceback", text)

"""
crossbar's side of ``bench/rpc.py``: autobahn (Twisted) WAMP clients, each
role its own process, run with the repository's ``.venv`` Python (the same
autobahn and Twisted as relaynet's clients).

``--role callee``
    One session in realm C{bench} that registers C{bench.echo}, which
    returns its argument (the same echo as relaynet's listener).

``--role caller``
    C{--count} sessions, each its own WebSocket connection (as relaynet's
    callers are separate HTTP connections), each calling C{bench.echo} with
    C{--size} random bytes, one call in flight per session, timed by
    L{rpc_loop.runCallers}.

Both use the msgpack serializer, which carries the payload as raw bytes as
relaynet does (JSON would base64 it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, BENCH)  # common
sys.path.insert(0, os.path.join(BENCH, "drivers"))  # crossbar_harness, rpc_loop

from common import emit, fail, watchdog
from crossbar_harness import REALM

PROCEDURE = "bench.echo"

# Set when the reactor shuts down: losing the router is expected then.
stopping = False


def _stopping() -> None:
    global stopping
    stopping = True


def connectSession(reactor: Any, url: str, makeSession: Any) -> Any:
    """
    Connect one WAMP session over WebSocket (msgpack); the L{Deferred}
    fires with the protocol once the TCP connection is up.
    """
    from autobahn.twisted.websocket import WampWebSocketClientFactory
    from autobahn.wamp.serializer import MsgPackSerializer
    from twisted.internet.endpoints import TCP4ClientEndpoint

    factory = WampWebSocketClientFactory(makeSession, url=url, serializers=[MsgPackSerializer()])
    factory.setProtocolOptions(autoPingInterval=0, openHandshakeTimeout=30, closeHandshakeTimeout=10)
    port = int(url.split(":")[2].split("/")[0])
    return TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=30).connect(factory)


def runCallee(args: argparse.Namespace) -> None:
    from autobahn.twisted.wamp import ApplicationSession
    from autobahn.wamp.types import ComponentConfig
    from twisted.internet import reactor

    class Callee(ApplicationSession):
        async def onJoin(self, details: Any) -> None:
            await self.register(lambda payload: payload, PROCEDURE)
            emit(event="listening")

        def onDisconnect(self) -> None:
            if not stopping:
                fail("the callee lost the router")

    reactor.addSystemEventTrigger("before", "shutdown", _stopping)
    connectSession(reactor, args.url, lambda: Callee(ComponentConfig(REALM))).addErrback(
        lambda f: fail(f"the callee could not connect: {f.getErrorMessage()}")
    )
    watchdog(reactor, args.deadline)
    reactor.run()


def runCaller(args: argparse.Namespace) -> None:
    from autobahn.twisted.wamp import ApplicationSession
    from autobahn.wamp.types import ComponentConfig
    from rpc_loop import runCallers
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    payload = os.urandom(args.size)
    reactor.addSystemEventTrigger("before", "shutdown", _stopping)

    class Caller(ApplicationSession):
        """
        A session; C{joined} fires once it is in the realm.
        """

        def __init__(self) -> None:
            super().__init__(ComponentConfig(REALM))
            self.joined: Deferred[Any] = Deferred()

        def onJoin(self, details: Any) -> None:
            self.joined.callback(self)

        def onDisconnect(self) -> None:
            if not stopping:
                fail("a caller lost the router")

    class EchoCall:
        """
        What L{rpc_loop.runCallers} drives: C{call()} is one call of
        C{bench.echo} on the session.
        """

        def __init__(self, session: Caller) -> None:
            self.session = session

        def call(self) -> Any:
            return self.session.call(PROCEDURE, payload)

    def connectOne() -> Deferred[Any]:
        session = Caller()
        d = connectSession(reactor, args.url, lambda: session)
        d.addCallback(lambda _: session.joined)
        d.addCallback(EchoCall)
        return d

    runCallers(reactor, connectOne, args.count, payload, args.warmup, args.seconds, args.deadline)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["callee", "caller"], required=True)
    parser.add_argument("--url", required=True, help="the router, ws://127.0.0.1:PORT/ws")
    parser.add_argument("--deadline", type=float, default=time.time() + 600, help="wall clock time to give up at")
    parser.add_argument("--count", type=int, default=1, help="callers: sessions, one call in flight each")
    parser.add_argument("--size", type=int, default=64, help="callers: payload bytes")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    if args.role == "callee":
        runCallee(args)
    else:
        runCaller(args)


if __name__ == "__main__":
    main()

"""
crossbar's side of ``bench/pubsub.py``: autobahn (Twisted) WAMP clients,
each role its own process, run with the repository's ``.venv`` Python.  They
speak the same JSON lines to the orchestrator as ``bench/fanout.py``'s
roles, so that ``pubsub.py`` drives both targets alike.

``--role subscribers``
    C{--count} sessions (one WebSocket connection each) subscribed to
    C{bench.news}.  Each counts the events it gets and checks that their
    8-byte sequence numbers come in order and that each payload is
    C{EVENT_SIZE} bytes.  Emits C{ready} once every session is subscribed,
    then C{progress} every 0.2 s (C{min}, C{max}, C{errors}, C{closed},
    C{last}, C{cpu}).

``--role publisher``
    One session that, on C{GO} from stdin, publishes C{--events} events of
    C{EVENT_SIZE} bytes (sequence number + random filler) as fast as its
    connection takes them: fire-and-forget (C{acknowledge=False}, the WAMP
    default), and a streaming producer on its TCP transport so that it
    pauses while the kernel's send buffer is full, as ``fanout.py``'s
    publisher does.  Emits C{open}, then C{done} (C{sent}, C{started},
    C{written}, C{cpu}).

Both use the msgpack serializer: the payload travels as raw bytes.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import time
from typing import Any

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, BENCH)  # common
sys.path.insert(0, os.path.join(BENCH, "drivers"))  # crossbar_harness, rpc_loop

from common import Pump, emit, fail, onStdinLine, ownCpu, watchdog
from crossbar_harness import REALM
from wamp_rpc import connectSession

TOPIC = "bench.news"
EVENT_SIZE = 1024
PROGRESS_INTERVAL = 0.2

stopping = False


def _stopping() -> None:
    global stopping
    stopping = True


def runSubscribers(args: argparse.Namespace) -> None:
    from autobahn.twisted.wamp import ApplicationSession
    from autobahn.wamp.types import ComponentConfig
    from twisted.internet import reactor
    from twisted.internet.task import LoopingCall

    subs: list[Any] = []

    class Subscriber(ApplicationSession):
        count = 0
        errors = 0
        last = 0.0
        closed = False

        async def onJoin(self, details: Any) -> None:
            await self.subscribe(self.received, TOPIC)
            subs.append(self)
            if len(subs) == args.count:
                emit(event="ready")

        def received(self, payload: bytes) -> None:
            (seq,) = struct.unpack(">Q", payload[:8])
            if seq != self.count or len(payload) != EVENT_SIZE:
                self.errors += 1
            self.count = seq + 1
            self.last = time.time()

        def onDisconnect(self) -> None:
            self.closed = True
            if not stopping and self not in subs:
                fail("a subscriber could not join")

    def report() -> None:
        emit(
            event="progress",
            min=min((s.count for s in subs), default=0),
            max=max((s.count for s in subs), default=0),
            errors=sum(s.errors for s in subs),
            closed=sum(1 for s in subs if s.closed),
            last=max((s.last for s in subs), default=0.0),
            cpu=ownCpu(),
        )

    reactor.addSystemEventTrigger("before", "shutdown", _stopping)
    watchdog(reactor, args.deadline)
    for _ in range(args.count):
        connectSession(reactor, args.url, lambda: Subscriber(ComponentConfig(REALM))).addErrback(
            lambda f: fail(f"a subscriber could not connect: {f.getErrorMessage()}")
        )
    LoopingCall(report).start(PROGRESS_INTERVAL)
    reactor.run()


def runPublisher(args: argparse.Namespace) -> None:
    from autobahn.twisted.wamp import ApplicationSession
    from autobahn.wamp.types import ComponentConfig
    from twisted.internet import reactor
    from twisted.internet.interfaces import IPushProducer
    from zope.interface import implementer

    filler = os.urandom(EVENT_SIZE - 8)

    @implementer(IPushProducer)
    class Publisher(Pump, ApplicationSession):
        sent = 0
        finished = False

        def onJoin(self, details: Any) -> None:
            emit(event="open")

        def producerTransport(self) -> Any:
            # The TCP transport under the WebSocket: pauseProducing() is
            # called when its send buffer fills up.
            return self._transport.transport

        def pump(self) -> None:
            stop = self.t0 + args.seconds
            while not self.paused and not self.finished:
                if self.sent >= args.events or (self.sent % 256 == 0 and time.time() > stop):
                    self.finished = True
                    self.producerTransport().unregisterProducer()
                    emit(event="done", sent=self.sent, started=self.t0, written=time.time(), pauses=self.pauses,
                         cpu=ownCpu() - self.cpu0)
                    return
                self.publish(TOPIC, struct.pack(">Q", self.sent) + filler)
                self.sent += 1

        def onDisconnect(self) -> None:
            if not stopping and not self.finished:
                fail("the publisher lost the router")

    publisher = Publisher(ComponentConfig(REALM))

    def command(line: str) -> None:
        if line == "GO":
            publisher.go()

    reactor.addSystemEventTrigger("before", "shutdown", _stopping)
    onStdinLine(command)
    watchdog(reactor, args.deadline)
    connectSession(reactor, args.url, lambda: publisher).addErrback(
        lambda f: fail(f"the publisher could not connect: {f.getErrorMessage()}")
    )
    reactor.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["subscribers", "publisher"], required=True)
    parser.add_argument("--url", required=True, help="the router, ws://127.0.0.1:PORT/ws")
    parser.add_argument("--deadline", type=float, default=time.time() + 600, help="wall clock time to give up at")
    parser.add_argument("--count", type=int, default=25, help="subscribers: sessions in this process")
    parser.add_argument("--events", type=int, default=10000, help="publisher: events to publish")
    parser.add_argument("--seconds", type=float, default=60.0, help="publisher: stop publishing after this long")
    args = parser.parse_args()
    if args.role == "subscribers":
        runSubscribers(args)
    else:
        runPublisher(args)


if __name__ == "__main__":
    main()

"""
Fan-out benchmark: one publisher, many subscribers of an event entity.

Processes besides this one: the relay (``twistd -n relaynet --event news``),
one publisher (``--role publisher``: a WebSocket sender on the event entity,
a streaming producer on its own transport, sending 1 KiB binary messages
that start with an 8-byte sequence number) and 1-4 subscriber processes
(``--role subscribers``: ``relaynet.events.EventSubscriber``s, as a user
would subscribe, counting the events they get and checking the sequence
numbers).  The publisher stops after
``--events`` events or ``--seconds`` seconds, whichever comes first; every
subscriber must then get every event sent, in order.

This process samples the relay's VmRSS every 0.2 s.  Exit status: 0 good,
1 a subscriber missed an event or got one out of order, 2 deadline passed,
4 anything else.  Results go to ``bench/out/fanout.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common
from backpressure import (
    EXIT_DATA,
    EXIT_DEADLINE,
    EXIT_ERROR,
    EXIT_OK,
    SAMPLE_INTERVAL,
    clientFactory,
    connect,
    fatal,
    machine,
    ownPeakRss,
    resetPeak,
    revision,
)
from common import (
    KEY_NAME,
    OUT_DIR,
    Deadline,
    Pump,
    emit,
    onStdinLine,
    ownCpu,
    readStatus,
    watchdog,
)

ENTITY = "news"
EVENT_SIZE = 1024
MiB = 1024 * 1024


def url(args: argparse.Namespace, action: str) -> str:
    from urllib.parse import quote

    from relaynet.auth import mintToken

    host = f"127.0.0.1:{args.port}"
    token = mintToken(f"http://{host}/{ENTITY}", KEY_NAME, args.key, int(time.time()) + 3600)
    return f"ws://{host}/$hc/{ENTITY}?sb-hc-action={action}&sb-hc-token={quote(token, safe='')}"


def runSubscribers(args: argparse.Namespace) -> None:
    from twisted.internet import reactor
    from twisted.internet.task import LoopingCall

    from relaynet.events import EventSubscriber
    from relaynet.tokens import fromKey

    class Subscriber(EventSubscriber):
        count = 0
        errors = 0
        last = 0.0

        def eventReceived(self, body: bytes, headers: dict[str, str]) -> None:
            (seq,) = struct.unpack(">Q", body[:8])
            if seq != self.count or len(body) != EVENT_SIZE:
                self.errors += 1
            self.count = seq + 1
            self.last = time.time()

    provider = fromKey(KEY_NAME, args.key, reactor)
    subs = [Subscriber(reactor, f"ws://127.0.0.1:{args.port}", ENTITY, provider, reconnect=False)
            for _ in range(args.count)]
    online: list[Subscriber] = []

    def subscribed(_: None, sub: Subscriber) -> None:
        online.append(sub)
        if len(online) == len(subs):
            emit(event="ready")

    def report() -> None:
        emit(
            event="progress",
            min=min((s.count for s in subs), default=0),
            max=max((s.count for s in subs), default=0),
            errors=sum(s.errors for s in subs),
            # Without reconnect=True a dropped subscriber goes offline.
            closed=sum(1 for s in online if s.listener.status != "online"),
            last=max((s.last for s in subs), default=0.0),
            peakRss=ownPeakRss(),
            cpu=ownCpu(),
        )

    watchdog(reactor, args.deadline)
    for sub in subs:
        sub.listen().addCallbacks(subscribed, fatal, callbackArgs=(sub,))
    LoopingCall(report).start(SAMPLE_INTERVAL)
    reactor.run()


def runPublisher(args: argparse.Namespace) -> None:
    from autobahn.twisted.websocket import WebSocketClientProtocol
    from twisted.internet import reactor
    from twisted.internet.interfaces import IPushProducer
    from zope.interface import implementer

    filler = os.urandom(EVENT_SIZE - 8)

    @implementer(IPushProducer)
    class Publisher(Pump, WebSocketClientProtocol):
        sent = 0
        finished = False

        def onOpen(self) -> None:
            emit(event="open")

        def pump(self) -> None:
            stop = self.t0 + args.seconds
            # Paced: at most rate events per second so far (0: as fast as
            # the publisher's own connection takes them).
            allowed = int((time.time() - self.t0) * args.rate) + 1 if args.rate else None
            while not self.paused and not self.finished and self.state == self.STATE_OPEN:
                if allowed is not None and self.sent >= allowed and self.sent < args.events:
                    reactor.callLater(0.002, self.pump)
                    return
                if self.sent >= args.events or (self.sent % 256 == 0 and time.time() > stop):
                    self.finished = True
                    self.transport.unregisterProducer()  # type: ignore[union-attr]
                    emit(event="done", sent=self.sent, started=self.t0, written=time.time(), pauses=self.pauses,
                         cpu=ownCpu() - self.cpu0, peakRss=ownPeakRss())
                    return
                self.sendMessage(struct.pack(">Q", self.sent) + filler, isBinary=True)
                self.sent += 1

        def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
            if not self.finished:
                emit(event="error", error=f"publisher closed: {code} {reason}")
                os._exit(EXIT_ERROR)

    publisher = Publisher()

    def command(line: str) -> None:
        if line == "GO":
            publisher.go()

    onStdinLine(command)
    watchdog(reactor, args.deadline)
    target = url(args, "connect")
    connect(reactor, target, clientFactory(target, lambda: publisher))
    reactor.run()


def orchestrate(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    python = common.findPython(args.python)
    os.makedirs(OUT_DIR, exist_ok=True)
    relayLog = os.path.join(OUT_DIR, "fanout-relay.log")
    children = common.Children()
    relay: common.Relay | None = None
    samples: list[int] = []
    result: dict[str, Any] = {
        "benchmark": "fanout", "machine": machine(), "revision": revision(), "ok": False,
        "config": {"events": args.events, "seconds": args.seconds, "subscribers": args.subscribers,
                   "processes": args.processes, "eventSize": EVENT_SIZE, "outbox": args.outbox, "timeout": args.timeout},
    }
    status = EXIT_ERROR

    def sample() -> None:
        assert relay is not None
        try:
            samples.append(readStatus(relay.pid)["VmRSS"])
        except (OSError, KeyError):
            pass

    try:
        open(relayLog, "wb").close()  # this run's log only
        relay = common.Relay(children, python=python, entityArgs=("--event", ENTITY),
                             extraArgs=("--subscriber-outbox", str(args.outbox)), log=relayLog,
                             timeout=deadline - time.monotonic())
        idle = readStatus(relay.pid)["VmRSS"]
        roleArgs = ["--port", str(relay.port), "--key", relay.key, "--deadline", str(time.time() + args.timeout)]
        me = [python, os.path.abspath(__file__)]
        per = [args.subscribers // args.processes + (i < args.subscribers % args.processes) for i in range(args.processes)]
        groups = [common.JsonLines(f"subscribers{i}", children.start(
                      me + ["--role", "subscribers", "--count", str(n), *roleArgs], stdout=subprocess.PIPE))
                  for i, n in enumerate(per)]
        for group in groups:
            group.waitUntil("ready", deadline)
        publisher = common.JsonLines("publisher", children.start(
            me + ["--role", "publisher", "--events", str(args.events), "--rate", str(args.rate),
                  "--seconds", str(args.seconds), *roleArgs], stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        publisher.waitUntil("open", deadline)
        time.sleep(0.5)
        start = readStatus(relay.pid)["VmRSS"]
        resetPeak(relay.pid)
        relayCpu0 = common.cpuSeconds(relay.pid)
        publisher.send("GO")
        done = publisher.waitUntil("done", deadline, tick=sample)
        sent = done["sent"]
        latest: dict[int, dict[str, Any]] = {}
        while True:
            sample()
            for i, group in enumerate(groups):
                while not group.events.empty():
                    event = group.events.get()
                    if event.get("event") == "error":
                        raise RuntimeError(f"subscribers{i}: {event.get('error')}")
                    latest[i] = event
                if group.proc.poll() is not None:
                    raise RuntimeError(f"subscribers{i} exited ({group.proc.returncode})")
            finished = len(latest) == len(groups) and all(
                e["min"] >= sent or e["errors"] or e["closed"] for e in latest.values())
            if finished:
                break
            if time.monotonic() > deadline:
                raise Deadline("the subscribers did not get every event before the deadline")
            time.sleep(SAMPLE_INTERVAL)
        status_ = readStatus(relay.pid)
        peak = max(status_.get("VmHWM", 0), max(samples, default=0))
        seconds = max(e["last"] for e in latest.values()) - done["started"]
        good = all(e["min"] == sent and e["max"] == sent and not e["errors"] and not e["closed"] for e in latest.values())
        result.update({
            "ok": good, "sent": sent, "seconds": seconds,
            "eventsPerSecond": sent / seconds, "deliveriesPerSecond": sent * args.subscribers / seconds,
            "publisherWriteSeconds": done["written"] - done["started"], "publisherPauses": done["pauses"],
            "relay": {"idleRss": idle, "startRss": start, "peakRss": peak, "endRss": status_["VmRSS"],
                      "growth": peak - start, "cpu": common.cpuSeconds(relay.pid) - relayCpu0},
            "subscriberProcesses": latest, "publisher": done, "samples": samples,
        })
        r = result["relay"]
        print(f"events sent          {sent} x {EVENT_SIZE} B to {args.subscribers} subscribers in {args.processes} processes")
        print(f"seconds              {seconds:.2f} (publisher wrote for {result['publisherWriteSeconds']:.2f})")
        print(f"events/s             {result['eventsPerSecond']:,.0f}")
        print(f"deliveries/s         {result['deliveriesPerSecond']:,.0f}" + ("" if good else "  (NOT all delivered: the rate is above what the subscribers take)"))
        print(f"relay RSS MiB        idle {idle / MiB:.1f}  start {start / MiB:.1f}  peak {peak / MiB:.1f}  end {r['endRss'] / MiB:.1f}")
        print(f"relay growth MiB     {r['growth'] / MiB:.1f}   relay CPU s {r['cpu']:.1f}")
        print(f"every subscriber got every event in order: {good}")
        status = EXIT_OK if good else EXIT_DATA
    except Deadline as e:
        print(f"deadline: {e}", file=sys.stderr)
        result["error"] = str(e)
        status = EXIT_DEADLINE
    except (Exception, SystemExit) as e:  # noqa: BLE001
        print(f"error: {e!r}", file=sys.stderr)
        result["error"] = repr(e)
        status = EXIT_ERROR
    finally:
        children.stopAll()
        if relay is not None:
            relay.stop()  # its data directory
        outPath = args.json or os.path.join(OUT_DIR, "fanout.json")
        with open(outPath, "w") as f:
            json.dump(result, f, indent=2)
        print(f"results: {os.path.relpath(outPath)}")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10000, help="events to publish (default: 10000)")
    parser.add_argument("--seconds", type=float, default=30.0, help="stop publishing after this long (default: 30)")
    parser.add_argument("--subscribers", type=int, default=100, help="subscribers (default: 100)")
    parser.add_argument("--processes", type=int, default=4, help="subscriber processes, 1-4 (default: 4)")
    parser.add_argument("--rate", type=float, default=500.0,
                        help="events per second the publisher sends, 0 for as fast as it can (default: 500)")
    parser.add_argument("--outbox", type=int, default=1000, help="the relay's --subscriber-outbox (default: 1000)")
    parser.add_argument("--timeout", type=float, default=180.0, help="overall deadline in seconds (default: 180)")
    parser.add_argument("--json", default=None, help="where to write the results (default: bench/out/fanout.json)")
    parser.add_argument("--python", default=None, help="the Python with twisted and autobahn (default: .venv/bin/python)")
    parser.add_argument("--role", choices=["orchestrator", "subscribers", "publisher"], default="orchestrator", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "subscribers":
        runSubscribers(args)
        return 0
    if args.role == "publisher":
        runPublisher(args)
        return 0
    if not 1 <= args.processes <= 4 or args.subscribers < args.processes or args.events <= 0 or args.seconds <= 0:
        parser.error("need 1-4 processes, at least one subscriber per process, positive --events and --seconds")
    common.installSignalHandlers()
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())

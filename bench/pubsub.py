"""
Event fan-out: relaynet event entity vs crossbar pub/sub.  One publisher,
100 subscribers in 4 processes, 1 KiB events.

relaynet
    The relay (``twistd -n relaynet --event news --subscriber-outbox N``)
    with ``fanout.py``'s own roles: ``fanout.py --role subscribers`` (25
    ``relaynet.events.EventSubscriber``s per process) and ``fanout.py --role
    publisher`` (a WebSocket sender on the event entity; each message is
    one event).

crossbar
    A crossbar router (``bench/.venv-peers/bin/crossbar``) with
    ``crossbar/wamp_pubsub.py --role subscribers`` (25 WAMP sessions per
    process, msgpack) and ``--role publisher`` (``acknowledge=False``).

Pacing: none.  The publisher sends ``--events`` events as fast as its own
connection takes them (both publishers are streaming producers on their
TCP transports), and the figure is deliveries per second = events x
subscribers / (time of the last event received by any subscriber - time
the publisher started).  Nothing may be lost: relaynet's subscriber outbox
is raised above the number of events (crossbar's router has no limit), so
both servers queue what the subscribers cannot take yet, and a run counts
only if every subscriber got every event, in order.  Each figure is the
median of ``--runs`` runs, alternating between the targets.

Results: ``bench/out/pubsub.json``; logs ``bench/out/pubsub-relay.log`` and
``bench/out/pubsub-crossbar.log``.  Exit status: 0 good, 1 an event lost or
out of order, 2 deadline, 4 anything else.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from functools import partial
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "drivers"))

import common
from crossbar_harness import (
    CROSSBAR_MISSING,
    TARGETS,
    LineChild,
    Router,
    addComparisonArguments,
    busySeconds,
    crossbarBin,
    disturbedNote,
    exitStatus,
    leastDisturbed,
    otherLoadPercent,
    quietMachine,
    report,
    retriesFor,
)

WORKLOAD = "pubsub"
TITLE = "Event fan-out: 1 publisher, 100 subscribers, 1 KiB events (relaynet event entity vs crossbar pub/sub)"
EVENT_SIZE = 1024  # fanout.py's and wamp_pubsub.py's


class LostEvents(Exception):
    """
    A subscriber missed an event, got one out of order, or was cut off.
    """


class Target:
    name: str

    def subscribersArgv(self, count: int, deadline: float) -> list[str]:
        raise NotImplementedError

    def publisherArgv(self, events: int, deadline: float) -> list[str]:
        raise NotImplementedError

    def serverPids(self) -> list[int]:
        raise NotImplementedError

    def serverCpu(self) -> float:
        return common.totalCpuSeconds(self.serverPids())


class RelaynetTarget(Target):
    name = "relaynet"

    def __init__(self, children: common.Children, python: str, outbox: int) -> None:
        self.python = python
        self.relay = common.Relay(children, python=python, entityArgs=("--event", "news"),
                                  extraArgs=("--subscriber-outbox", str(outbox)),
                                  log=os.path.join(common.OUT_DIR, "pubsub-relay.log"))
        self.script = os.path.join(HERE, "fanout.py")

    def common(self, deadline: float) -> list[str]:
        return ["--port", str(self.relay.port), "--key", self.relay.key, "--deadline", str(deadline)]

    def subscribersArgv(self, count: int, deadline: float) -> list[str]:
        return [self.python, self.script, "--role", "subscribers", "--count", str(count), *self.common(deadline)]

    def publisherArgv(self, events: int, deadline: float) -> list[str]:
        return [self.python, self.script, "--role", "publisher", "--events", str(events), "--rate", "0",
                "--seconds", "600", *self.common(deadline)]

    def serverPids(self) -> list[int]:
        return [self.relay.pid]


class CrossbarTarget(Target):
    name = "crossbar"

    def __init__(self, children: common.Children, python: str, crossbar: str, timeout: float) -> None:
        self.python = python
        self.router = Router(children, crossbar, os.path.join(common.OUT_DIR, "pubsub-crossbar.log"), timeout=timeout)
        self.script = os.path.join(HERE, "crossbar", "wamp_pubsub.py")

    def subscribersArgv(self, count: int, deadline: float) -> list[str]:
        return [self.python, self.script, "--role", "subscribers", "--count", str(count), "--url", self.router.url,
                "--deadline", str(deadline)]

    def publisherArgv(self, events: int, deadline: float) -> list[str]:
        return [self.python, self.script, "--role", "publisher", "--events", str(events), "--seconds", "600",
                "--url", self.router.url, "--deadline", str(deadline)]

    def serverPids(self) -> list[int]:
        return self.router.pids()


def measure(children: common.Children, target: Target, args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    """
    One run: fresh subscriber processes and a fresh publisher against
    C{target}; returns the figures.
    """
    busy = quietMachine()
    local = min(deadline, time.monotonic() + args.run_timeout)
    wallDeadline = time.time() + (local - time.monotonic())
    per = [args.subscribers // args.processes + (i < args.subscribers % args.processes) for i in range(args.processes)]
    groups: list[LineChild] = []
    publisher: LineChild | None = None
    try:
        for i, n in enumerate(per):
            groups.append(LineChild(children, f"{target.name} subscribers{i}", target.subscribersArgv(n, wallDeadline)))
        for group in groups:
            group.waitUntil("ready", local)
        publisher = LineChild(children, f"{target.name} publisher", target.publisherArgv(args.events, wallDeadline),
                              stdin=subprocess.PIPE)
        publisher.waitUntil("open", local)
        time.sleep(0.5)  # let the connections settle
        machine0 = busySeconds()
        cpu0 = {"server": target.serverCpu(), "publisher": common.cpuSeconds(publisher.proc.pid),
                "subscribers": sum(common.cpuSeconds(g.proc.pid) for g in groups)}
        publisher.send("GO")
        done = publisher.waitUntil("done", local)
        sent = done["sent"]
        while True:
            latest = [group.drain() for group in groups]
            if all(p is not None and (p["min"] >= sent or p["errors"] or p["closed"]) for p in latest):
                break
            if time.monotonic() > local:
                raise common.Deadline(f"{target.name}: the subscribers did not get every event in time")
            time.sleep(0.05)
        machine1 = busySeconds()
        cpu1 = {"server": target.serverCpu(), "publisher": common.cpuSeconds(publisher.proc.pid),
                "subscribers": sum(common.cpuSeconds(g.proc.pid) for g in groups)}
    finally:
        for child in [publisher, *groups]:
            if child is not None:
                children.stop(child.proc)
    progress = [p for p in latest if p is not None]
    if any(p["errors"] or p["closed"] or p["min"] != sent or p["max"] != sent for p in progress):
        raise LostEvents(f"{target.name}: not every subscriber got every one of the {sent} events in order: {progress}")
    seconds = max(p["last"] for p in progress) - done["started"]
    deliveries = sent * args.subscribers
    cpu = {k: cpu1[k] - cpu0[k] for k in cpu0}
    # What other work on the machine took meanwhile, in % of one CPU (the
    # window starts at GO and ends up to 50 ms after the last delivery).
    other = otherLoadPercent(machine0, machine1, sum(cpu.values()), seconds)
    return {
        "target": target.name, "machineBusyBefore": busy, "otherLoadPercent": other,
        "events": sent, "deliveries": deliveries, "seconds": seconds,
        "deliveriesPerSecond": deliveries / seconds, "publisherWriteSeconds": done["written"] - done["started"],
        "serverCpuMicrosPerDelivery": 1e6 * cpu["server"] / deliveries,
        "cpuSeconds": cpu, "cpuPercent": {k: 100 * v / seconds for k, v in cpu.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.addStandardArguments(parser, timeout=600.0)
    parser.add_argument("--events", type=int, default=None, help="events per run (default: 10000; --quick: 2000)")
    parser.add_argument("--subscribers", type=int, default=100, help="subscribers (default: 100)")
    parser.add_argument("--processes", type=int, default=4, help="subscriber processes (default: 4)")
    parser.add_argument("--run-timeout", type=float, default=150.0, help="deadline of one run in seconds (default: 150)")
    addComparisonArguments(parser, retries=1)
    args = parser.parse_args(argv)
    args.events = args.events or (2000 if args.quick else 10000)
    if not 1 <= args.processes <= args.subscribers or args.events <= 0:
        parser.error("need 1 to --subscribers processes and a positive --events")
    runs = common.runsFor(args)
    args.retries = retriesFor(args, 1)
    python = common.findPython(args.python)
    crossbar = crossbarBin(args.crossbar)
    deadline = time.monotonic() + args.timeout
    common.installSignalHandlers()
    os.makedirs(common.OUT_DIR, exist_ok=True)

    measurements: list[dict[str, Any]] = []
    notes: dict[str, str] = {}
    status = common.EXIT_OK
    try:
        with common.Children() as children:
            # An outbox larger than the run, so that the relay never cuts a
            # slow subscriber off (crossbar has no such limit).
            targets: list[Target] = [RelaynetTarget(children, python, outbox=args.events + 1000)]
            if crossbar is None:
                notes["crossbar"] = CROSSBAR_MISSING
                print(f"note: {notes['crossbar']}", file=sys.stderr)
            else:
                targets.append(CrossbarTarget(children, python, crossbar, timeout=max(1.0, min(60.0, deadline - time.monotonic()))))
            for run in range(runs):
                for target in targets:
                    m = leastDisturbed(partial(measure, children, target, args, deadline), args.retries)
                    m["run"] = run + 1
                    measurements.append(m)
                    shares = ", ".join(f"{k} {v:.0f}%" for k, v in m["cpuPercent"].items())
                    print(f"run {run + 1}/{runs}  {target.name:<8}  {m['events']} events in {m['seconds']:.2f} s  "
                          f"{m['deliveriesPerSecond']:9,.0f} deliveries/s  server {m['serverCpuMicrosPerDelivery']:.1f} µs CPU"
                          f"/delivery  (publisher wrote for {m['publisherWriteSeconds']:.2f} s)   CPU: {shares}, "
                          f"other work {m['otherLoadPercent']:.0f}%" + ("  DISTURBED" if m["disturbed"] else ""), flush=True)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - reported; the children are gone by now
        status = exitStatus(e, LostEvents)

    case = f"{args.subscribers} subscribers, 1 KiB"
    rows = []
    for name in TARGETS:
        mine = [m for m in measurements if m["target"] == name]
        note = notes.get(name) if not mine else disturbedNote(mine)
        rows.append(common.makeRow(case, name, "deliveries/s", "deliveries/s", "higher",
                                   [m["deliveriesPerSecond"] for m in mine], note))
        rows.append(common.makeRow(case, name, "server CPU per delivery", "µs", "lower",
                                   [m["serverCpuMicrosPerDelivery"] for m in mine], note))
    report(WORKLOAD, TITLE, rows, args.json, extra={
        "config": {"events": args.events, "eventBytes": EVENT_SIZE, "subscribers": args.subscribers,
                   "subscriberProcesses": args.processes, "runs": runs, "pacing": "unpaced, nothing lost",
                   "relaynetSubscriberOutbox": args.events + 1000, "crossbarPublish": "acknowledge=False, msgpack"},
        "measurements": measurements,
        "exitStatus": status,
    })
    return status


if __name__ == "__main__":
    sys.exit(main())

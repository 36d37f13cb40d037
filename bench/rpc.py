"""
Request/response: relaynet HTTP through the relay vs crossbar WAMP RPC.

relaynet
    The relay (``twistd -n relaynet --entity bench``), a listener process
    (``drivers/rpc_relaynet.py --role listener``: a HybridListener whose
    handler echoes the request body) and a caller process (``--role
    caller``): N keep-alive HTTP/1.1 connections POSTing 64 bytes to
    ``http://127.0.0.1:PORT/bench`` with a SAS token header.

crossbar
    A crossbar router (``bench/.venv-peers/bin/crossbar``, config
    ``bench/crossbar/config.json``), a callee process
    (``crossbar/wamp_rpc.py --role callee``: registers ``bench.echo``,
    which returns its argument) and a caller process (``--role caller``): N
    WAMP sessions (msgpack over WebSocket) calling ``bench.echo`` with 64
    bytes.

Both callers run the same closed loop (``drivers/rpc_loop.py``): each of
the N connections keeps one call in flight, for a warm-up and then a
measuring window.  Figures per case (1 and 16 in flight) and target: calls
per second, p50 and p99 latency, each the median of ``--runs`` runs.  The
runs alternate between the targets.  The CPU share of each process in the
window is printed and kept in the JSON, to show which process is the limit.

Results: ``bench/out/rpc.json``; logs ``bench/out/rpc-relay.log`` and
``bench/out/rpc-crossbar.log``.  Exit status: 0 good, 1 a wrong answer or a
failed call, 2 deadline, 4 anything else.
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

WORKLOAD = "rpc"
TITLE = "Request/response: relaynet HTTP through the relay vs crossbar WAMP RPC (64 B echo)"


class Target:
    """
    One side of the comparison: its server processes, and how to start a
    caller process against it.
    """

    name: str
    serverPids: dict[str, int]

    def callerArgv(self, count: int, args: argparse.Namespace, deadline: float) -> list[str]:
        raise NotImplementedError

    def serverCpu(self) -> dict[str, float]:
        cpu = {}
        for role, pid in self.serverPids.items():
            cpu[role] = common.cpuSeconds(pid)
        return cpu


class RelaynetTarget(Target):
    name = "relaynet"

    def __init__(self, children: common.Children, python: str, deadline: float) -> None:
        self.python = python
        self.relay = common.Relay(children, python=python, log=os.path.join(common.OUT_DIR, "rpc-relay.log"))
        self.script = os.path.join(HERE, "drivers", "rpc_relaynet.py")
        listener = LineChild(children, "relaynet listener", [
            python, self.script, "--role", "listener", "--port", str(self.relay.port), "--key", self.relay.key,
            "--deadline", str(time.time() + (deadline - time.monotonic())),
        ])
        listener.waitUntil("listening", min(deadline, time.monotonic() + 30))
        self.serverPids = {"relay": self.relay.pid, "listener": listener.proc.pid}

    def callerArgv(self, count: int, args: argparse.Namespace, deadline: float) -> list[str]:
        return [self.python, self.script, "--role", "caller", "--port", str(self.relay.port), "--key", self.relay.key,
                "--count", str(count), "--size", str(args.size), "--warmup", str(args.warmup),
                "--seconds", str(args.seconds), "--deadline", str(deadline)]


class CrossbarTarget(Target):
    name = "crossbar"

    def __init__(self, children: common.Children, python: str, crossbar: str, deadline: float) -> None:
        self.python = python
        self.router = Router(children, crossbar, os.path.join(common.OUT_DIR, "rpc-crossbar.log"),
                             timeout=max(1.0, min(60.0, deadline - time.monotonic())))
        self.script = os.path.join(HERE, "crossbar", "wamp_rpc.py")
        callee = LineChild(children, "crossbar callee", [
            python, self.script, "--role", "callee", "--url", self.router.url,
            "--deadline", str(time.time() + (deadline - time.monotonic())),
        ])
        callee.waitUntil("listening", min(deadline, time.monotonic() + 30))
        self.calleePid = callee.proc.pid
        self.serverPids = {"callee": callee.proc.pid}

    def serverCpu(self) -> dict[str, float]:
        # The router is the controller plus its worker process(es).
        return {"router": self.router.cpuSeconds(), **super().serverCpu()}

    def callerArgv(self, count: int, args: argparse.Namespace, deadline: float) -> list[str]:
        return [self.python, self.script, "--role", "caller", "--url", self.router.url,
                "--count", str(count), "--size", str(args.size), "--warmup", str(args.warmup),
                "--seconds", str(args.seconds), "--deadline", str(deadline)]


def measure(children: common.Children, target: Target, count: int, args: argparse.Namespace,
            deadline: float) -> dict[str, Any]:
    """
    One run: a fresh caller process with C{count} connections against
    C{target}.  Returns the caller's figures and every process's CPU share
    in the measuring window.
    """
    busy = quietMachine()
    local = min(deadline, time.monotonic() + args.warmup + args.seconds + 60)
    caller = LineChild(children, f"{target.name} caller", target.callerArgv(count, args, time.time() + (local - time.monotonic())),
                       stdin=subprocess.PIPE)
    try:
        caller.waitUntil("ready", local)
        caller.send("GO")
        caller.waitUntil("measuring", local)
        before, machine0 = target.serverCpu(), busySeconds()
        done = caller.waitUntil("done", local)
        after, machine1 = target.serverCpu(), busySeconds()
    finally:
        children.stop(caller.proc)
    if done["wrong"] or done["failures"]:
        raise AnswerError(f"{target.name}: {done['wrong']} wrong answers, {done['failures']} failed calls")
    window = done["seconds"]
    cpu = {role: 100 * (after[role] - before[role]) / window for role in before}
    cpu["caller"] = 100 * done["cpu"] / window
    # What other work on the machine took meanwhile, in % of one CPU.
    ours = sum(after[role] - before[role] for role in before) + done["cpu"]
    other = otherLoadPercent(machine0, machine1, ours, window)
    # The server proper (relay or router), without the listener or callee.
    server = "relay" if "relay" in cpu else "router"
    serverMicros = 1e6 * (after[server] - before[server]) / done["calls"]
    return {"target": target.name, "inFlight": count, "callsPerSecond": done["callsPerSecond"],
            "serverCpuMicrosPerCall": serverMicros, "machineBusyBefore": busy, "otherLoadPercent": other,
            "p50ms": 1000 * done["p50"], "p99ms": 1000 * done["p99"], "meanMs": 1000 * done["mean"],
            "calls": done["calls"], "seconds": window, "cpuPercent": cpu}


class AnswerError(Exception):
    """
    A call failed or came back with the wrong payload.
    """


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.addStandardArguments(parser, timeout=600.0)
    parser.add_argument("--size", type=int, default=64, help="request and response payload bytes (default: 64)")
    parser.add_argument("--in-flight", default="1,16",
                        help="comma-separated numbers of concurrent callers, one call in flight each (default: 1,16)")
    parser.add_argument("--seconds", type=float, default=None, help="measuring window per run (default: 5; --quick: 2)")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up before each window (default: 1; --quick: 0.5)")
    addComparisonArguments(parser, retries=2)
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (2.0 if args.quick else 5.0)
    args.warmup = args.warmup or (0.5 if args.quick else 1.0)
    counts = [int(n) for n in args.in_flight.split(",") if n.strip()]
    runs = common.runsFor(args)
    args.retries = retriesFor(args, 2)
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
            targets: list[Target] = [RelaynetTarget(children, python, deadline)]
            if crossbar is None:
                notes["crossbar"] = CROSSBAR_MISSING
                print(f"note: {notes['crossbar']}", file=sys.stderr)
            else:
                targets.append(CrossbarTarget(children, python, crossbar, deadline))
            # Alternate the targets within each run, so that a slow spell of
            # the machine does not land on one target only.
            for run in range(runs):
                for count in counts:
                    for target in targets:
                        m = leastDisturbed(partial(measure, children, target, count, args, deadline), args.retries)
                        m["run"] = run + 1
                        measurements.append(m)
                        shares = ", ".join(f"{role} {share:.0f}%" for role, share in m["cpuPercent"].items())
                        print(f"run {run + 1}/{runs}  {target.name:<8}  {count:>2} in flight  "
                              f"{m['callsPerSecond']:8,.0f} calls/s  p50 {m['p50ms']:6.2f} ms  p99 {m['p99ms']:6.2f} ms"
                              f"  server {m['serverCpuMicrosPerCall']:.0f} µs CPU/call"
                              f"   CPU: {shares}, other work {m['otherLoadPercent']:.0f}%"
                              + ("  DISTURBED" if m["disturbed"] else ""), flush=True)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - reported; the children are gone by now
        status = exitStatus(e, AnswerError)

    rows = []
    for count in counts:
        case = f"{count} in flight"
        for name in TARGETS:
            mine = [m for m in measurements if m["target"] == name and m["inFlight"] == count]
            note = notes.get(name) if not mine else disturbedNote(mine)
            rows.append(common.makeRow(case, name, "calls/s", "calls/s", "higher", [m["callsPerSecond"] for m in mine], note))
            rows.append(common.makeRow(case, name, "p50 latency", "ms", "lower", [m["p50ms"] for m in mine], note))
            rows.append(common.makeRow(case, name, "p99 latency", "ms", "lower", [m["p99ms"] for m in mine], note))
            rows.append(common.makeRow(case, name, "server CPU per call", "µs", "lower",
                                       [m["serverCpuMicrosPerCall"] for m in mine], note))
    report(WORKLOAD, TITLE, rows, args.json, extra={
        "config": {"payloadBytes": args.size, "inFlight": counts, "runs": runs, "warmupSeconds": args.warmup,
                   "windowSeconds": args.seconds, "serializer": "msgpack (crossbar)"},
        "measurements": measurements,
        "exitStatus": status,
    })
    return status


if __name__ == "__main__":
    sys.exit(main())

"""
Idle-scale benchmark: how much relay memory does one idle listener, or one
idle relayed connection, cost?

The goal is at most 10 KiB of relay memory per idle listener or idle relayed
connection, with 10,000 idle listeners and 5,000 idle relayed connections.

For each case and run this process starts a fresh relay (``twistd -n
relaynet`` on 127.0.0.1 and a free port), opens a small warm-up batch of the
case's connections, waits for the relay's VmRSS to settle and takes that as
the baseline.  Client processes (``bench/drivers/idle_client.py``, at most
``CLIENT_SOCKETS`` sockets each) then raise the number of open connections
step by step; at each step, once every client reports its connections open
and the relay's RSS is stable again,

    KiB per connection = (RSS at the step - baseline RSS) / connections

Cases:

* ``N idle listeners``: control channels (``sb-hc-action=listen``);
* ``N idle relayed connections`` over WebSocket (sender and listener
  rendezvous both WebSockets, spliced by the relay; two relay sockets each);
* the same over the relay's native raw path (``Upgrade: relaynet-stream``)
  when the relay accepts it, otherwise reported as unsupported;
* for context, magic-wormhole-transit-relay holding connections waiting for
  a partner, and joined pairs (``--peers`` to choose its virtualenv).

Every wait has a deadline; every child is killed on exit (and by
``PR_SET_PDEATHSIG`` if this process is killed).  Exit status: 0 good,
2 deadline passed, 4 anything else.  Results go to ``bench/out/idle.json``.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import common
from common import (
    EXIT_ERROR,
    EXIT_OK,
    OUT_DIR,
    Children,
    JsonLines,
    freePort,
    waitForPort,
)

DRIVER = os.path.join(HERE, "drivers", "idle_client.py")

KiB = 1024
MiB = 1024 * 1024
GOAL_KIB = 10.0
# Sockets per client process, below the 20,000 fds a process may have here.
CLIENT_SOCKETS = 9000
# Connections opened (and kept) before the baseline is taken, so that
# what the first connection loads once (code paths, caches, allocator
# arenas) is not charged to the connections measured.
WARMUP = 50
# The relay's RSS is stable when it moved by less than this between two
# samples SETTLE_INTERVAL apart.
SETTLE_BYTES = 64 * KiB
SETTLE_INTERVAL = 0.5
# How long a server may take to listen, and a child to stop.
START_TIMEOUT = 30.0
STOP_GRACE = 5.0

CASE_KEYS = ["listeners", "relayed-ws", "relayed-native", "transit-waiting", "transit-pairs"]


class Unsupported(Exception):
    pass


@dataclass
class Case:
    """
    One kind of idle connection, measured at C{steps} connections.

    @ivar label: the row's case, with C{{n}} for the number of connections.
    @ivar mode: the client driver's C{--mode}.
    @ivar socketsPer: client sockets per connection counted.
    """

    key: str
    label: str
    target: str
    mode: str
    transport: str
    steps: list[int]
    socketsPer: int


# ---------------------------------------------------------------------------
# Processes


class Client(JsonLines):
    """
    A client driver's events; its C{unsupported} event (the relay refused
    the native upgrade) raises L{Unsupported}.
    """

    def check(self, event: dict[str, Any]) -> None:
        super().check(event)
        if event.get("event") == "unsupported":
            raise Unsupported(event.get("status", ""))


def startTimeout(deadline: float) -> float:
    """
    Seconds a server may take to listen: L{START_TIMEOUT}, or less if the
    (monotonic) C{deadline} comes first.
    """
    return min(START_TIMEOUT, deadline - time.monotonic())


def freshLog(log: str) -> str:
    """
    Empty the log file C{log} (each case's log holds its last run only).
    """
    open(log, "wb").close()
    return log


def rss(pid: int) -> int:
    """
    VmRSS of process C{pid}, in bytes.
    """
    return common.readStatus(pid)["VmRSS"]


def settledRss(pid: int, deadline: float) -> int:
    """
    The relay's RSS once it no longer moves (or the last sample, after at
    most 10 s of waiting).
    """
    last = rss(pid)
    giveUp = min(deadline, time.monotonic() + 10)
    while time.monotonic() < giveUp:
        time.sleep(SETTLE_INTERVAL)
        now = rss(pid)
        if abs(now - last) < SETTLE_BYTES:
            return now
        last = now
    return last


# ---------------------------------------------------------------------------
# Servers


@dataclass
class Server:
    """
    A relay (ours or the peer) running for one case.

    @ivar stop: stops it and removes what it left behind.
    """

    proc: subprocess.Popen[bytes]
    port: int
    key: str
    entities: list[str]
    stop: Callable[[], None]

    @property
    def pid(self) -> int:
        return self.proc.pid


def startRelaynet(children: Children, python: str, processes: int, deadline: float, log: str) -> Server:
    """
    A relay with one entity per client process, each taking any number of
    listeners (C{--max-listeners}; the default is 25).
    """
    entities = [f"idle{i}" for i in range(processes)]
    relay = common.Relay(
        children, python=python, entityArgs=[arg for entity in entities for arg in ("--entity", entity)],
        extraArgs=["--max-listeners", "20000"], log=freshLog(log), timeout=startTimeout(deadline),
    )
    return Server(relay.proc, relay.port, relay.key, entities, relay.stop)


def startListening(children: Children, name: str, argv: Sequence[str], port: int, env: dict[str, str],
                   deadline: float, log: str) -> subprocess.Popen[bytes]:
    """
    Start the server C{argv} and wait until it listens on C{port}; stop it
    if it does not.
    """
    proc = children.start(argv, log=freshLog(log), env=env)
    try:
        waitForPort(port, proc, startTimeout(deadline), name)
    except BaseException:
        children.stop(proc, STOP_GRACE)
        raise
    return proc


def startTransit(children: Children, peers: str, deadline: float, log: str) -> Server:
    port = freePort()
    argv = [os.path.join(peers, "bin", "twistd"), "-n", "--pidfile=", "transitrelay", f"--port=tcp:{port}:interface=127.0.0.1"]
    peerEnv = {k: v for k, v in common.childEnv().items() if k != "PYTHONPATH"}
    proc = startListening(children, "transit", argv, port, peerEnv, deadline, log)
    return Server(proc, port, "", [""], lambda: children.stop(proc, STOP_GRACE))


def findPeers(requested: str | None) -> str | None:
    """
    A virtualenv with magic-wormhole-transit-relay, or C{None}.
    """
    for venv in [requested] if requested else [os.path.join(HERE, ".venv-peers"), "/tmp/peers"]:
        if venv and os.path.exists(os.path.join(venv, "bin", "twistd")):
            probe = subprocess.run(
                [os.path.join(venv, "bin", "python"), "-c", "import wormhole_transit_relay"],
                capture_output=True,
                timeout=60,
                check=False,
            )
            if probe.returncode == 0:
                return venv
    return None


# ---------------------------------------------------------------------------
# One case


def runCase(case: Case, args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    """
    Measure C{case} once, on a fresh server.

    @return: the baseline, and per step the RSS and KiB per connection.
    """
    top = max(case.steps)
    processes = max(1, math.ceil((top + WARMUP) * case.socketsPer / CLIENT_SOCKETS))
    log = os.path.join(OUT_DIR, f"idle-{case.key}.log")
    children = Children()
    if case.target == "transit":
        server = startTransit(children, args.peers, deadline, log)
    else:
        server = startRelaynet(children, args.python, processes, deadline, log)
    clients: list[Client] = []
    try:
        cold = settledRss(server.pid, deadline)
        for i in range(processes):
            argv = [
                args.python, DRIVER, "--mode", case.mode, "--transport", case.transport,
                "--port", str(server.port), "--key", server.key, "--entity", server.entities[i % len(server.entities)],
                "--window", str(args.window), "--deadline", str(time.time() + (deadline - time.monotonic())),
            ]
            proc = children.start(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            clients.append(Client(f"client {i}", proc))
        for client in clients:
            client.waitUntil("listening", deadline)

        def openTo(total: int) -> float:
            """
            Raise the open connections to C{total}, spread over the clients.
            """
            t0 = time.monotonic()
            share, extra = divmod(total, processes)
            for i, client in enumerate(clients):
                client.send(f"TARGET {share + (i < extra)}")
            for client in clients:
                client.waitUntil("ready", deadline)
            return time.monotonic() - t0

        openTo(WARMUP)
        baseline = settledRss(server.pid, deadline)
        steps = []
        for n in case.steps:
            seconds = openTo(WARMUP + n)
            now = settledRss(server.pid, deadline)
            perConnection = (now - baseline) / n / KiB
            steps.append({"connections": n, "rss": now, "kibPerConnection": perConnection, "openSeconds": seconds})
            print(
                f"  {case.label.format(n=n):<40} {case.target:<16} RSS {now / MiB:8.1f} MiB"
                f"  {perConnection:6.2f} KiB/conn  (opened in {seconds:.1f} s)",
                flush=True,
            )
        return {"coldRss": cold, "baselineRss": baseline, "warmup": WARMUP, "clientProcesses": processes, "steps": steps}
    finally:
        for client in clients:
            children.stop(client.proc, STOP_GRACE)
        server.stop()
        children.stopAll()  # anything started but not yet in hand


# ---------------------------------------------------------------------------
# The whole benchmark


def cases(args: argparse.Namespace) -> list[Case]:
    if args.quick:
        listenerSteps = relayedSteps = [100, 500]
    else:
        listenerSteps, relayedSteps = [1000, 5000, 10000], [1000, 2500, 5000]
    chosen = [
        Case("listeners", "{n} idle listeners", "relaynet-ws", "listeners", "ws", listenerSteps, 1),
        Case("relayed-ws", "{n} idle relayed connections", "relaynet-ws", "relayed", "ws", relayedSteps, 2),
        Case("relayed-native", "{n} idle relayed connections", "relaynet-native", "relayed", "native", relayedSteps, 2),
    ]
    if args.peers:
        chosen += [
            Case("transit-waiting", "{n} idle connections waiting for a partner", "transit", "transit-waiting", "ws",
                 listenerSteps, 1),
            Case("transit-pairs", "{n} idle relayed connections", "transit", "transit-pairs", "ws", relayedSteps, 2),
        ]
    return [case for case in chosen if not args.cases or case.key in args.cases]


def table(rows: list[dict[str, Any]]) -> str:
    head = ["case", "target", "KiB per connection (median)", "runs", "goal"]
    body = [
        [
            row["case"],
            row["target"],
            f"{row['value']:.2f}",
            ", ".join(f"{v:.2f}" for v in row["runs"]),
            "" if row["target"] == "transit" else ("ok" if row["value"] <= GOAL_KIB else "OVER 10 KiB"),
        ]
        for row in rows
    ]
    widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def orchestrate(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    os.makedirs(OUT_DIR, exist_ok=True)
    result: dict[str, Any] = {
        "workload": "idle",
        "title": "Relay memory per idle connection",
        "machine": common.machine(),
        "config": {"runs": args.runs, "warmup": WARMUP, "window": args.window, "goalKiB": GOAL_KIB},
        "rows": [],
        "details": {},
    }
    status = EXIT_ERROR
    try:
        measured: dict[str, list[dict[str, Any]]] = {}
        skipped: dict[str, str] = {}
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs}", flush=True)
            for case in cases(args):
                if case.key in skipped:
                    continue
                try:
                    once = runCase(case, args, deadline)
                    measured.setdefault(case.key, []).append(once)
                except Unsupported as e:
                    skipped[case.key] = f"the relay does not accept it: {e}"
                    print(f"  {case.key}: skipped ({skipped[case.key]})", flush=True)
        for case in cases(args):
            if case.key not in measured:
                continue
            runs = measured[case.key]
            for i, n in enumerate(case.steps):
                values = [r["steps"][i]["kibPerConnection"] for r in runs]
                result["rows"].append(common.makeRow(case.label.format(n=n), case.target, "KiB per connection", "KiB", "lower", values))
        result["details"] = {"runs": measured, "skipped": skipped}
        print()
        print(table(result["rows"]))
        for key, why in skipped.items():
            print(f"{key}: skipped, {why}")
        status = EXIT_OK
    except (Exception, KeyboardInterrupt, SystemExit) as e:  # noqa: BLE001 - reported; the children are already killed
        status = common.failureStatus(result, e, args.timeout)
    finally:
        result["exitStatus"] = status
        common.dumpResult(args.json, result)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per case; the median is reported (default: 3)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run: 100 and 500 connections, one run")
    parser.add_argument("--json", default=os.path.join(OUT_DIR, "idle.json"), help="results (default: bench/out/idle.json)")
    parser.add_argument("--python", default=None, help="Python with relaynet's dependencies (default: .venv/bin/python)")
    parser.add_argument("--peers", default=None,
                        help="virtualenv with magic-wormhole-transit-relay (default: bench/.venv-peers or /tmp/peers, if there)")
    parser.add_argument("--no-peers", action="store_true", help="skip the transit relay")
    parser.add_argument("--cases", nargs="+", metavar="CASE", choices=CASE_KEYS,
                        help=f"only these cases (default: all): {', '.join(CASE_KEYS)}")
    parser.add_argument("--window", type=int, default=32, help="handshakes in flight per client process (default: 32)")
    parser.add_argument("--timeout", type=float, default=900.0, help="deadline for everything, in seconds (default: 900)")
    args = parser.parse_args(argv)
    if args.quick and "--runs" not in (argv if argv is not None else sys.argv[1:]):
        args.runs = 1
    if args.runs < 1 or args.window < 1 or args.timeout <= 0:
        parser.error("--runs, --window and --timeout must be positive")
    args.python = common.findPython(args.python)
    args.peers = None if args.no_peers else findPeers(args.peers)
    common.installSignalHandlers()
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())

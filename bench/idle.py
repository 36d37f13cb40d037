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
import base64
import ctypes
import json
import math
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OUT_DIR = os.path.join(HERE, "out")
DRIVER = os.path.join(HERE, "drivers", "idle_client.py")

KEY_NAME = "BenchRule"
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

EXIT_OK, EXIT_DEADLINE, EXIT_ERROR = 0, 2, 4
CASE_KEYS = ["listeners", "relayed-ws", "relayed-native", "transit-waiting", "transit-pairs"]


class Deadline(Exception):
    pass


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


_libc: Any = None
try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover
    pass


def _dieWithParent() -> None:
    # PR_SET_PDEATHSIG = 1: the child gets SIGKILL if this process dies.
    if _libc is not None:
        _libc.prctl(1, signal.SIGKILL, 0, 0, 0)


class Child:
    """
    A child process; with C{lines}, its stdout JSON lines go to a queue.
    """

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: str | None = None) -> None:
        self.name = name
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        out: Any = subprocess.PIPE
        if log is not None:
            out = open(log, "wb")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE if log is None else subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if log is not None else None,
            # Only a prctl() call, before any reader thread for this child.
            preexec_fn=_dieWithParent,  # noqa: PLW1509
        )
        if log is None:
            threading.Thread(target=self._read, daemon=True).start()
        else:
            out.close()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").strip()
            if line.startswith("{"):
                try:
                    self.events.put(json.loads(line))
                except ValueError:
                    pass

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode("ascii") + b"\n")
        self.proc.stdin.flush()

    def wait(self, event: str, deadline: float) -> dict[str, Any]:
        """
        The next C{event} line; raise on an error line, on exit, or at the
        deadline.
        """
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Deadline(f"{self.name}: no {event!r} before the deadline")
            try:
                got = self.events.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.proc.poll() is not None and self.events.empty():
                    raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before {event!r}") from None
                continue
            if got.get("event") == "error":
                raise RuntimeError(f"{self.name}: {got.get('error')}")
            if got.get("event") == "unsupported":
                raise Unsupported(got.get("status", ""))
            if got.get("event") == event:
                return got

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def freePort() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def waitForPort(port: int, server: Child, deadline: float) -> None:
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited ({server.proc.returncode}) before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise Deadline(f"{server.name} did not listen before the deadline")


def rss(pid: int) -> int:
    """
    VmRSS of process C{pid}, in bytes.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KiB
    raise RuntimeError(f"no VmRSS for {pid}")


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


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


# ---------------------------------------------------------------------------
# Servers


class Server:
    """
    A relay (ours or the peer) running for one case.
    """

    def __init__(self, child: Child, port: int, key: str, entities: list[str], dataDir: str | None) -> None:
        self.child, self.port, self.key, self.entities, self.dataDir = child, port, key, entities, dataDir

    @property
    def pid(self) -> int:
        return self.child.proc.pid

    def stop(self) -> None:
        self.child.kill()
        if self.dataDir:
            shutil.rmtree(self.dataDir, ignore_errors=True)


def startRelaynet(python: str, env: dict[str, str], processes: int, deadline: float, log: str) -> Server:
    """
    A relay with one entity per client process, each taking any number of
    listeners (C{--max-listeners}; the default is 25).
    """
    twistd = os.path.join(os.path.dirname(python), "twistd")
    key = base64.b64encode(os.urandom(32)).decode("ascii")
    entities = [f"idle{i}" for i in range(processes)]
    dataDir = tempfile.mkdtemp(prefix="relaynet-idle-")
    port = freePort()
    argv = [twistd, "-n", "--pidfile=", "relaynet", "--listen", f"tcp:{port}:interface=127.0.0.1"]
    argv += ["--rule", f"{KEY_NAME}={key}", "--max-listeners", "20000", "--data-dir", dataDir]
    for entity in entities:
        argv += ["--entity", entity]
    server = Server(Child("relay", argv, env, log=log), port, key, entities, dataDir)
    try:
        waitForPort(port, server.child, min(deadline, time.monotonic() + 30))
    except BaseException:
        server.stop()
        raise
    return server


def startTransit(peers: str, env: dict[str, str], deadline: float, log: str) -> Server:
    twistd = os.path.join(peers, "bin", "twistd")
    port = freePort()
    argv = [twistd, "-n", "--pidfile=", "transitrelay", f"--port=tcp:{port}:interface=127.0.0.1"]
    peerEnv = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    server = Server(Child("transit", argv, peerEnv, log=log), port, "", [""], None)
    try:
        waitForPort(port, server.child, min(deadline, time.monotonic() + 30))
    except BaseException:
        server.stop()
        raise
    return server


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


def runCase(case: Case, args: argparse.Namespace, env: dict[str, str], deadline: float) -> dict[str, Any]:
    """
    Measure C{case} once, on a fresh server.

    @return: the baseline, and per step the RSS and KiB per connection.
    """
    top = max(case.steps)
    processes = max(1, math.ceil((top + WARMUP) * case.socketsPer / CLIENT_SOCKETS))
    log = os.path.join(OUT_DIR, f"idle-{case.key}.log")
    if case.target == "transit":
        server = startTransit(args.peers, env, deadline, log)
    else:
        server = startRelaynet(args.python, env, processes, deadline, log)
    clients: list[Child] = []
    try:
        cold = settledRss(server.pid, deadline)
        for i in range(processes):
            argv = [
                args.python, DRIVER, "--mode", case.mode, "--transport", case.transport,
                "--port", str(server.port), "--key", server.key, "--entity", server.entities[i % len(server.entities)],
                "--window", str(args.window), "--deadline", str(time.time() + (deadline - time.monotonic())),
            ]
            clients.append(Child(f"client {i}", argv, env))
        for client in clients:
            client.wait("listening", deadline)

        def openTo(total: int) -> float:
            """
            Raise the open connections to C{total}, spread over the clients.
            """
            t0 = time.monotonic()
            share, extra = divmod(total, processes)
            for i, client in enumerate(clients):
                client.send(f"TARGET {share + (i < extra)}")
            for client in clients:
                client.wait("ready", deadline)
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
            client.kill()
        server.stop()


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
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    result: dict[str, Any] = {
        "workload": "idle",
        "title": "Relay memory per idle connection",
        "machine": machine(),
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
                    once = runCase(case, args, env, deadline)
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
                result["rows"].append(
                    {
                        "case": case.label.format(n=n),
                        "target": case.target,
                        "metric": "KiB per connection",
                        "unit": "KiB",
                        "better": "lower",
                        "value": statistics.median(values),
                        "runs": values,
                    }
                )
        result["details"] = {"runs": measured, "skipped": skipped}
        print()
        print(table(result["rows"]))
        for key, why in skipped.items():
            print(f"{key}: skipped, {why}")
        status = EXIT_OK
    except Deadline as e:
        result["error"] = f"deadline: {e}"
        print(f"DEADLINE PASSED ({args.timeout} s): {e}", file=sys.stderr)
        status = EXIT_DEADLINE
    except (KeyboardInterrupt, SystemExit) as e:
        result["error"] = f"interrupted: {e!r}"
    except Exception as e:  # noqa: BLE001 - reported; the children are already killed
        result["error"] = f"{type(e).__name__}: {e}"
        print(f"ERROR: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        result["exitStatus"] = status
        out = args.json
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"results: {os.path.relpath(out)}")
    return status


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(f"signal {signum}")


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
    if args.python is None:
        venv = os.path.join(REPO, ".venv", "bin", "python")
        args.python = venv if os.path.exists(venv) else sys.executable
    args.peers = None if args.no_peers else findPeers(args.peers)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())

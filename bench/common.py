"""
Helpers shared by the benchmark suite's workload scripts (``streams.py``,
``rpc.py``, ``pubsub.py``, ``idle.py``, ``backpressure.py``, ``fanout.py``)
and by ``suite.py``.

Every workload script:

* accepts the standard flags (L{addStandardArguments}: ``--runs``,
  ``--quick``, ``--json``, ``--python``, ``--timeout``);
* starts its servers as children (L{Children}: each child is killed on exit,
  and by ``PR_SET_PDEATHSIG`` if the script itself dies);
* measures each figure ``--runs`` times and reports the median
  (L{makeRow});
* prints a table (L{printTable}) and writes ``bench/out/<workload>.json``
  (L{writeResults}) in this schema::

    {"workload": str, "title": str,
     "machine": {"cpus": int, "cpu": str, "python": str, "kernel": str},
     "script": str, "command": str,                        # who wrote it
     "ratios": [[relaynet target, peer target], ...]      # optional
     "rows": [{"case": str, "target": str, "metric": str, "unit": str,
               "better": "higher" | "lower", "value": float | null,
               "runs": [float, ...], "note": str}]}        # note optional

  A row whose value could not be measured has C{"value": null} and says why
  in C{"note"}.  C{"ratios"} lists the ratio columns the tables show
  (numerator target / denominator target); without it every target whose
  name starts with ``relaynet`` is divided by every other target.

The role processes those scripts start share the helpers at the end
(L{emit}, L{fail}, L{watchdog}, L{onStdinLine}, L{ownCpu}, L{Pump}).

This module imports nothing outside the standard library, except
L{sasToken} (which imports relaynet lazily) and the children's helpers
(which import Twisted lazily).
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import ctypes.util
import json
import math
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OUT_DIR = os.path.join(HERE, "out")
PEERS_VENV = os.path.join(HERE, ".venv-peers")

#: The relay's SAS rule and entity (a Hybrid Connection) in every workload.
KEY_NAME = "BenchRule"
ENTITY = "bench"

EXIT_OK, EXIT_FAILED, EXIT_DEADLINE, EXIT_ERROR = 0, 1, 2, 4


class Deadline(Exception):
    """
    A wait ran past its deadline.
    """


# ---------------------------------------------------------------------------
# Children


def _loadLibc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


_libc = _loadLibc()


def dieWithParent() -> None:
    """
    C{preexec_fn} for children: SIGKILL when this process dies
    (C{PR_SET_PDEATHSIG}, Linux).
    """
    if _libc is not None:
        _libc.prctl(1, signal.SIGKILL, 0, 0, 0)


class Children:
    """
    The child processes of one script.  Use as a context manager: on exit
    (normal, exception or SIGTERM via L{installSignalHandlers}) every child
    still running is terminated, then killed.
    """

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: Sequence[str], *, log: str | None = None, env: dict[str, str] | None = None,
              stdin: Any = subprocess.DEVNULL, stdout: Any = None, cwd: str = REPO,
              cpus: set[int] | None = None) -> subprocess.Popen[bytes]:
        """
        Start C{argv}.  With C{log}, stdout and stderr go to that file
        (appended); otherwise stdout is C{stdout} and stderr is inherited.
        With C{cpus}, the child and every thread and process it makes run on
        those CPUs only.
        """

        def prepare() -> None:
            dieWithParent()
            if cpus:
                os.sched_setaffinity(0, cpus)

        logFile = open(log, "ab") if log else None  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=env if env is not None else childEnv(),
                stdin=stdin,
                stdout=logFile if logFile else stdout,
                stderr=subprocess.STDOUT if logFile else None,
                preexec_fn=prepare,  # noqa: PLW1509 - only prctl() and sched_setaffinity()
            )
        finally:
            if logFile:
                logFile.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
        """
        Terminate C{proc} (SIGTERM, then SIGKILL after C{grace} seconds).
        """
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(grace)
        if proc in self.procs:
            self.procs.remove(proc)

    def stopAll(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopAll()


class JsonLines:
    """
    Reads a child's stdout as JSON lines (events such as
    C{{"event": "ready"}}) into a queue, in a thread; other lines go to our
    stderr.  Start the child with C{stdout=subprocess.PIPE}.
    """

    def __init__(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        import queue
        import threading

        self.name = name
        self.proc = proc
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                sys.stderr.write(f"[{self.name}] {line}\n")
                continue
            self.events.put(event)

    def wait(self, event: str, timeout: float) -> dict[str, Any]:
        """
        The next event called C{event}, within C{timeout} seconds (see
        L{waitUntil}).
        """
        return self.waitUntil(event, time.monotonic() + timeout, _within=f"within {timeout:.0f} s")

    def waitUntil(self, event: str, deadline: float, tick: Callable[[], None] | None = None,
                  _within: str = "before the deadline") -> dict[str, Any]:
        """
        The next event called C{event}.  An C{error} event, the child's exit
        or the (monotonic) C{deadline} raise.  C{tick}, if given, is called
        at least every 0.2 s while waiting (to sample something meanwhile).
        """
        import queue

        while True:
            if tick is not None:
                tick()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Deadline(f"{self.name}: no {event!r} {_within}")
            try:
                got = self.events.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                if self.proc.poll() is not None and self.events.empty():
                    raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before {event!r}") from None
                continue
            self.check(got)
            if got.get("event") == event:
                return got

    def check(self, event: dict[str, Any]) -> None:
        """
        Raise if C{event} says the child failed: by default an C{error}
        event.  Subclasses add their own failure events.
        """
        if event.get("event") == "error":
            raise RuntimeError(f"{self.name}: {event.get('error')}")

    def send(self, line: str) -> None:
        """
        Write a line to the child's stdin (started with C{stdin=PIPE}).
        """
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()


def installSignalHandlers() -> None:
    """
    Turn SIGTERM and SIGHUP into C{SystemExit}, so that C{finally} blocks
    and L{Children.__exit__} run.
    """

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)


def failureStatus(result: dict[str, Any], error: BaseException, timeout: float) -> int:
    """
    Note in C{result["error"]} why a script's measurement ended early, say
    so on stderr (not for an interruption), and return the exit status:
    L{EXIT_DEADLINE} for L{Deadline}, otherwise L{EXIT_ERROR}.

    @param timeout: the script's C{--timeout}, for the deadline message.
    """
    if isinstance(error, Deadline):
        result["error"] = f"deadline: {error}"
        print(f"DEADLINE PASSED ({timeout} s): {error}", file=sys.stderr)
        return EXIT_DEADLINE
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        result["error"] = f"interrupted: {error!r}"
        return EXIT_ERROR
    result["error"] = f"{type(error).__name__}: {error}"
    print(f"ERROR: {type(error).__name__}: {error}", file=sys.stderr)
    return EXIT_ERROR


def dumpResult(path: str, result: dict[str, Any]) -> None:
    """
    Write C{result} as indented JSON to C{path} (creating its directory)
    and print where it went.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"results: {os.path.relpath(path)}")


def childEnv() -> dict[str, str]:
    """
    The environment for children: the repository on C{PYTHONPATH},
    unbuffered output.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def findPython(requested: str | None = None) -> str:
    """
    The interpreter with twisted, autobahn and relaynet: C{requested}, else
    the repository's C{.venv}, else this one.
    """
    if requested:
        return requested
    venv = os.path.join(REPO, ".venv", "bin", "python")
    return venv if os.path.exists(venv) else sys.executable


def peersBin(name: str) -> str | None:
    """
    The path of C{name} in C{bench/.venv-peers/bin}, or L{None} when the
    peers venv (C{make bench-peers}) does not have it.
    """
    path = os.path.join(PEERS_VENV, "bin", name)
    return path if os.access(path, os.X_OK) else None


# ---------------------------------------------------------------------------
# Ports


def freePort() -> int:
    """
    A TCP port on 127.0.0.1 that is free right now.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def waitForPort(port: int, proc: subprocess.Popen[bytes] | None, timeout: float, what: str = "server") -> None:
    """
    Wait until 127.0.0.1:C{port} accepts connections; raise if C{proc}
    exits first or C{timeout} seconds pass.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}) before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise Deadline(f"{what} did not listen on {port} within {timeout:.0f} s")


# ---------------------------------------------------------------------------
# The relay


class Relay:
    """
    A relaynet relay (C{twistd -n relaynet}) on 127.0.0.1 and a free port,
    with one SAS rule (L{KEY_NAME}) and a random key.

    @ivar port: its port.
    @ivar key: the rule's key.
    @ivar proc: its process.
    """

    def __init__(self, children: Children, *, python: str | None = None, entityArgs: Sequence[str] = ("--entity", ENTITY),
                 extraArgs: Sequence[str] = (), log: str | None = None, timeout: float = 30.0,
                 cpus: set[int] | None = None) -> None:
        """
        Start the relay and wait until it listens (three attempts, in case
        the free port is taken in between).

        @param entityArgs: how the entities are declared, e.g.
            C{("--entity", "bench")} or C{("--event", "news")}.
        @param log: the relay's log file (appended to; default
            C{bench/out/suite-relay.log}).
        @param cpus: the CPUs the relay may run on (default: any).
        """
        self.children = children
        self.python = findPython(python)
        self.key = base64.b64encode(os.urandom(32)).decode("ascii")
        self.dataDir = tempfile.mkdtemp(prefix="relaynet-bench-")
        os.makedirs(OUT_DIR, exist_ok=True)
        self.log = log or os.path.join(OUT_DIR, "suite-relay.log")
        twistd = os.path.join(os.path.dirname(self.python), "twistd")
        head = [twistd] if os.path.exists(twistd) else [self.python, "-c", "from twisted.scripts.twistd import run; run()"]
        for attempt in range(3):
            self.port = freePort()
            argv = head + [
                "-n", "--pidfile=", "relaynet",
                "--listen", f"tcp:{self.port}:interface=127.0.0.1",
                "--rule", f"{KEY_NAME}={self.key}",
                *entityArgs,
                "--data-dir", self.dataDir,
                *extraArgs,
            ]
            self.proc = children.start(argv, log=self.log, cpus=cpus)
            try:
                waitForPort(self.port, self.proc, timeout, "the relay")
                return
            except (RuntimeError, Deadline):
                children.stop(self.proc)
                if attempt == 2:
                    raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def token(self, entity: str = ENTITY, lifetime: int = 3600) -> str:
        """
        A SAS token for C{entity} on this relay.
        """
        return sasToken(self.port, self.key, entity, lifetime)

    def stop(self) -> None:
        import shutil

        self.children.stop(self.proc)
        shutil.rmtree(self.dataDir, ignore_errors=True)


def sasToken(port: int, key: str, entity: str = ENTITY, lifetime: int = 3600) -> str:
    """
    A SAS token (C{SharedAccessSignature sr=...}) for C{entity} on the relay
    at 127.0.0.1:C{port}, signed with rule L{KEY_NAME} and C{key}.
    """
    from relaynet.auth import mintToken

    return mintToken(f"http://127.0.0.1:{port}/{entity}", KEY_NAME, key, int(time.time()) + lifetime)


# ---------------------------------------------------------------------------
# Measuring


def cpuSeconds(pid: int, children: bool = False) -> float:
    """
    User plus system CPU seconds of process C{pid} (/proc/PID/stat); with
    C{children}, plus those of its children that have exited and been
    waited for (socat's forked connection handlers, for instance).
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def totalCpuSeconds(pids: Iterable[int]) -> float:
    """
    The CPU seconds (L{cpuSeconds}) of the processes C{pids} together; those
    gone already count nothing.
    """
    total = 0.0
    for pid in pids:
        try:
            total += cpuSeconds(pid)
        except OSError:
            pass
    return total


def childPids(pid: int) -> list[int]:
    """
    The live children of C{pid} (Linux 3.5+, /proc/PID/task/*/children).
    """
    pids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return pids


def readStatus(pid: int) -> dict[str, int]:
    """
    The memory fields of /proc/PID/status (VmRSS, VmHWM, ...), in bytes.
    """
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "VmData"):
                fields[name] = int(value.split()[0]) * 1024
    return fields


def median(values: Iterable[float | None]) -> float | None:
    """
    The median of the values that are not L{None} (L{None} if none are).
    """
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def percentile(sortedValues: Sequence[float], p: float) -> float:
    """
    The C{p}-th percentile (0-100, nearest rank) of already sorted values.
    """
    if not sortedValues:
        raise ValueError("no values")
    rank = max(0, min(len(sortedValues) - 1, math.ceil(p / 100 * len(sortedValues)) - 1))
    return sortedValues[rank]


def machine() -> dict[str, Any]:
    """
    What the figures were measured on.
    """
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "tcpCongestionControl": congestionControl(),
    }


# ---------------------------------------------------------------------------
# TCP congestion control

_CONGESTION = "/proc/sys/net/ipv4/tcp_congestion_control"
_AVAILABLE = "/proc/sys/net/ipv4/tcp_available_congestion_control"


def congestionControl() -> str | None:
    """
    The congestion control new TCP connections get on this machine
    (C{net.ipv4.tcp_congestion_control}), or L{None} where it cannot be
    read.
    """
    try:
        with open(_CONGESTION) as f:
            return f.read().strip()
    except OSError:
        return None


class CongestionControlUnavailable(Exception):
    """
    The congestion control asked for cannot be set here.
    """


class UsingCongestionControl:
    """
    A context in which new TCP connections use congestion control C{name}:
    on entry it sets C{net.ipv4.tcp_congestion_control} if the machine's
    differs (which needs root), and on exit it puts the machine's back.

    Every target and driver connects after the change, so all of them use
    C{name}; it is the one way to give the same setting to peers that have
    no option for it (socat, the transit relay).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.previous: str | None = None

    def __enter__(self) -> UsingCongestionControl:
        current = congestionControl()
        if current is None:
            raise CongestionControlUnavailable(f"{_CONGESTION} cannot be read: not Linux?")
        if current == self.name:
            return self
        try:
            with open(_AVAILABLE) as f:
                available = f.read().split()
        except OSError:
            available = []
        if self.name not in available:
            raise CongestionControlUnavailable(
                f"TCP congestion control {self.name!r} is not available here (available: {' '.join(available) or 'unknown'})")
        try:
            with open(_CONGESTION, "w") as f:
                f.write(self.name)
        except OSError as e:
            raise CongestionControlUnavailable(
                f"setting net.ipv4.tcp_congestion_control to {self.name} needs root: {e.strerror}") from e
        self.previous = current
        print(f"TCP congestion control set to {self.name} for this run (the machine's is {current})", flush=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            with open(_CONGESTION, "w") as f:
                f.write(self.previous)
            print(f"TCP congestion control back to {self.previous}", flush=True)
            self.previous = None


# ---------------------------------------------------------------------------
# Rows, tables and JSON


def makeRow(case: str, target: str, metric: str, unit: str, better: str, runs: Sequence[float | None],
            note: str | None = None) -> dict[str, Any]:
    """
    One result row; its value is the median of C{runs} (runs that could not
    be measured are L{None} and left out of the median).
    """
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', not {better!r}")
    row: dict[str, Any] = {
        "case": case,
        "target": target,
        "metric": metric,
        "unit": unit,
        "better": better,
        "value": median(runs),
        "runs": [r for r in runs if r is not None],
    }
    if note:
        row["note"] = note
    return row


def defaultRatios(targets: Sequence[str]) -> list[tuple[str, str]]:
    """
    Every relaynet target (name starting with C{relaynet}) over every other
    target.
    """
    ours = [t for t in targets if t.startswith("relaynet")]
    peers = [t for t in targets if not t.startswith("relaynet")]
    return [(a, b) for a in ours for b in peers]


def tableData(rows: Sequence[dict[str, Any]], targets: Sequence[str] | None = None,
              ratios: Sequence[Sequence[str]] | None = None) -> tuple[list[str], list[list[str]]]:
    """
    The rows as a table: one line per (case, metric), one column per target,
    then one column per ratio C{a/b}.  Returns (header, lines).
    """
    if targets is None:
        targets = []
        for row in rows:
            if row["target"] not in targets:
                targets.append(row["target"])
    present = set(row["target"] for row in rows)
    pairs = [(a, b) for a, b in (ratios if ratios is not None else defaultRatios(targets)) if a in present and b in present]
    keys: list[tuple[str, str]] = []
    values: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["case"], row["metric"])
        if key not in keys:
            keys.append(key)
        values[(row["case"], row["metric"], row["target"])] = row
    header = ["case", "metric", *targets, *(f"{a} / {b}" for a, b in pairs)]
    lines = []
    for case, metric in keys:
        unit = next((values[(case, metric, t)]["unit"] for t in targets if (case, metric, t) in values), "")
        better = next((values[(case, metric, t)]["better"] for t in targets if (case, metric, t) in values), "")
        label = f"{metric} ({unit})" if unit and unit != metric else metric
        label += " ↑" if better == "higher" else " ↓"
        line = [case, label]
        for t in targets:
            found = values.get((case, metric, t))
            line.append(formatValue(found["value"]) if found is not None else "")
        for a, b in pairs:
            ra, rb = values.get((case, metric, a)), values.get((case, metric, b))
            if ra and rb and ra["value"] is not None and rb["value"]:
                line.append(f"{ra['value'] / rb['value']:.2f}")
            else:
                line.append("")
        lines.append(line)
    return header, lines


def formatValue(value: float | None) -> str:
    """
    A figure with three significant digits or so (n/a for L{None}).
    """
    if value is None:
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def printTable(rows: Sequence[dict[str, Any]], targets: Sequence[str] | None = None,
               ratios: Sequence[Sequence[str]] | None = None, file: Any = None) -> None:
    """
    Print the rows as an aligned text table (see L{tableData}).  An arrow
    after the metric says whether higher or lower is better.
    """
    header, lines = tableData(rows, targets, ratios)
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    out = file or sys.stdout
    for i, line in enumerate([header, *lines]):
        cells = [cell.ljust(w) if j < 2 else cell.rjust(w) for j, (cell, w) in enumerate(zip(line, widths))]
        print("  ".join(cells).rstrip(), file=out)
        if i == 0:
            print("  ".join("-" * w for w in widths), file=out)
    notes = [f"{row['target']} / {row['case']} / {row['metric']}: {row['note']}" for row in rows if row.get("note")]
    for note in notes:
        print(f"  note: {note}", file=out)
    out.flush()


def markdownTable(rows: Sequence[dict[str, Any]], targets: Sequence[str] | None = None,
                  ratios: Sequence[Sequence[str]] | None = None) -> str:
    """
    The same table as L{printTable}, in Markdown.
    """
    header, lines = tableData(rows, targets, ratios)
    text = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|"]
    text += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(text)


def writeResults(workload: str, title: str, rows: Sequence[dict[str, Any]], *, path: str | None = None,
                 ratios: Sequence[Sequence[str]] | None = None, targets: Sequence[str] | None = None,
                 extra: dict[str, Any] | None = None) -> str:
    """
    Write C{bench/out/<workload>.json} (or C{path}) in the suite's schema;
    return the path.  C{extra} adds top-level keys (configuration, notes).
    """
    result: dict[str, Any] = {
        "workload": workload,
        "title": title,
        "machine": machine(),
        "script": os.path.basename(sys.argv[0]),
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, REPO) if sys.executable.startswith(REPO) else sys.executable, *sys.argv]),
        "rows": list(rows),
    }
    if targets is not None:
        result["targets"] = list(targets)
    if ratios is not None:
        result["ratios"] = [list(pair) for pair in ratios]
    result.update(extra or {})
    path = path or os.path.join(OUT_DIR, f"{workload}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    return path


# ---------------------------------------------------------------------------
# Command line


def addStandardArguments(parser: argparse.ArgumentParser, timeout: float = 900.0) -> None:
    """
    The flags every workload script takes (and C{suite.py} passes on).
    """
    parser.add_argument("--runs", type=int, default=3, help="runs per figure; the median is reported (default: 3)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run: small sizes, 1 run")
    parser.add_argument("--json", default=None, help="where to write the results (default: bench/out/<workload>.json)")
    parser.add_argument("--python", default=None, help="the Python with twisted, autobahn and relaynet (default: .venv/bin/python)")
    parser.add_argument("--timeout", type=float, default=timeout, help=f"deadline for the whole script in seconds (default: {timeout:.0f})")


def runsFor(args: argparse.Namespace) -> int:
    """
    How many runs per figure: C{--runs}, or 1 with C{--quick}.
    """
    return 1 if args.quick else max(1, args.runs)


# ---------------------------------------------------------------------------
# The children's side: the role processes the workload scripts start (their
# own roles, the drivers, the crossbar clients).  Twisted is imported lazily.


def emit(**fields: Any) -> None:
    """
    One JSON line on stdout, for the orchestrator (read by L{JsonLines}).
    """
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def ownCpu() -> float:
    """
    User plus system CPU seconds of this process.
    """
    t = os.times()
    return t.user + t.system


def fail(message: str, status: int = EXIT_ERROR) -> None:
    """
    Report an error to the orchestrator and exit at once.
    """
    emit(event="error", error=message)
    os._exit(status)


def watchdog(reactor: Any, deadline: float) -> None:
    """
    Exit at the (wall clock) C{deadline}, or as soon as the orchestrator is
    gone.
    """
    from twisted.internet.task import LoopingCall

    parent = os.getppid()

    def check() -> None:
        if time.time() > deadline:
            sys.stderr.write(f"{os.getpid()}: deadline passed, exiting\n")
            os._exit(EXIT_DEADLINE)
        if os.getppid() != parent:
            os._exit(EXIT_ERROR)

    LoopingCall(check).start(0.5)


def onStdinLine(callback: Callable[[str], None], onClose: Callable[[], None] | None = None) -> None:
    """
    Call C{callback} with each line the orchestrator writes on stdin
    (stripped), and C{onClose}, if given, when the orchestrator closes it.
    """
    from twisted.internet import stdio
    from twisted.protocols.basic import LineReceiver

    class Commands(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            callback(line.decode("ascii", "replace").strip())

        def connectionLost(self, reason: Any = None) -> None:
            if onClose is not None:
                onClose()

    stdio.StandardIO(Commands())


class Pump:
    """
    The C{IPushProducer} side of a sender that, from L{go} on, writes in a
    loop, C{pump()}, for as long as its transport takes the data: the transport pauses it
    (counted in C{pauses}) when its buffer is full, and resumes it.  Mix it
    in before the protocol class and declare C{@implementer(IPushProducer)}
    on the subclass.
    """

    paused = True
    pauses = 0
    started = False

    def go(self) -> None:
        """
        Start sending (once): note the time (C{t0}) and this process's CPU
        seconds (C{cpu0}), register on L{producerTransport} as a streaming
        producer, and pump.
        """
        if self.started:
            return
        self.started = True
        self.t0 = time.time()
        self.cpu0 = ownCpu()
        self.producerTransport().registerProducer(self, True)
        self.paused = False
        self.pump()

    def producerTransport(self) -> Any:
        """
        The transport that takes the data, and pauses this producer.
        """
        return self.transport  # type: ignore[attr-defined]

    def pump(self) -> None:
        raise NotImplementedError

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        self.pump()

    def stopProducing(self) -> None:
        self.paused = True

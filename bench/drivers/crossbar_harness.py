"""
What ``bench/rpc.py`` and ``bench/pubsub.py`` share, on top of
``bench/common.py``:

* L{Router}: a crossbar router (``bench/.venv-peers/bin/crossbar``) on a
  free port, configured from ``bench/crossbar/config.json``;
* L{LineChild}: a child process that reports JSON lines on stdout, read by a
  thread into a queue, with L{LineChild.wait} (every wait has a deadline);
* for the child processes (the drivers): L{emit}, L{watchdog},
  L{onStdinLine}, L{ownCpu}.

Only the standard library at import time: the child helpers import Twisted
lazily.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import common

CROSSBAR_DIR = os.path.join(BENCH, "crossbar")
REALM = "bench"


# ---------------------------------------------------------------------------
# The orchestrator's side


def crossbarBin(requested: str | None = None) -> str | None:
    """
    The crossbar executable: C{requested}, else the peers venv's
    (C{make bench-peers}); L{None} if there is none.
    """
    if requested:
        return requested if os.access(requested, os.X_OK) else None
    return common.peersBin("crossbar")


def childPids(pid: int) -> list[int]:
    """
    The direct children of C{pid}, from /proc/PID/task/*/children.
    """
    pids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids.extend(int(p) for p in f.read().split())
    except OSError:
        pass
    return pids


def _cpuTimes() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields), idle


def busySeconds() -> float:
    """
    CPU seconds the whole machine has spent busy since boot (all CPUs,
    from /proc/stat).  The difference over a run, minus the CPU seconds of
    the run's own processes, is what other work took meanwhile.
    """
    total, idle = _cpuTimes()
    return (total - idle) / os.sysconf("SC_CLK_TCK")


def machineBusy(seconds: float = 0.5) -> float:
    """
    How busy the whole machine is, in percent of all its CPUs, over the
    next C{seconds}: the benchmarks run on a shared machine, so each run
    checks that nothing else is eating the CPUs before it starts.
    """
    total0, idle0 = _cpuTimes()
    time.sleep(seconds)
    total1, idle1 = _cpuTimes()
    total = total1 - total0
    return 100.0 * (1 - (idle1 - idle0) / total) if total > 0 else 0.0


def quietMachine(limit: float = 15.0, wait: float = 20.0) -> float:
    """
    Wait up to C{wait} seconds for the machine to be less than C{limit}
    percent busy; return the last reading (with a warning on stderr if it
    stayed busy: the run goes ahead, its figures are suspect).
    """
    end = time.monotonic() + wait
    busy = machineBusy()
    while busy > limit and time.monotonic() < end:
        busy = machineBusy()
    if busy > limit:
        sys.stderr.write(f"warning: the machine is {busy:.0f}% busy with other work before this run\n")
    return busy


class Router:
    """
    A crossbar node (controller and one router worker) on 127.0.0.1 and a
    free port, realm C{bench}, anonymous access to C{bench.*}.

    @ivar port: the WebSocket port.
    @ivar url: C{ws://127.0.0.1:PORT/ws}.
    """

    def __init__(self, children: common.Children, crossbar: str, log: str, timeout: float = 60.0) -> None:
        self.children = children
        self.cbdir = tempfile.mkdtemp(prefix="relaynet-bench-crossbar-")
        with open(os.path.join(CROSSBAR_DIR, "config.json")) as f:
            template = f.read()
        self.port = common.freePort()
        with open(os.path.join(self.cbdir, "config.json"), "w") as f:
            f.write(template.replace('"$PORT"', str(self.port)))
        self.url = f"ws://127.0.0.1:{self.port}/ws"
        self.proc = children.start(
            [crossbar, "start", "--cbdir", self.cbdir, "--config", "config.json", "--loglevel", "warn"],
            log=log,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        # The controller starts the worker, which opens the port: several
        # seconds on a busy machine.
        common.waitForPort(self.port, self.proc, timeout, "the crossbar router")
        self.workers = childPids(self.proc.pid)

    def pids(self) -> list[int]:
        """
        The controller and its workers (the router worker does the work).
        """
        return [self.proc.pid, *self.workers]

    def cpuSeconds(self) -> float:
        """
        CPU seconds of the controller and the workers together.
        """
        total = 0.0
        for pid in self.pids():
            try:
                total += common.cpuSeconds(pid)
            except OSError:
                pass
        return total

    def stop(self) -> None:
        """
        SIGTERM to the controller (it stops its workers); then SIGKILL to
        any worker still there.
        """
        self.children.stop(self.proc, grace=10.0)
        for pid in self.workers:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        shutil.rmtree(self.cbdir, ignore_errors=True)


class LineChild:
    """
    A child process whose stdout is JSON lines (its stderr is inherited).
    Lines that are not JSON are copied to stderr.
    """

    def __init__(self, children: common.Children, name: str, argv: list[str], stdin: Any = subprocess.DEVNULL) -> None:
        self.name = name
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.latest: dict[str, Any] | None = None
        self.proc = children.start(argv, stdin=stdin, stdout=subprocess.PIPE)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                self.events.put(json.loads(line))
            except ValueError:
                sys.stderr.write(f"[{self.name}] {line}\n")

    def send(self, line: str) -> None:
        """
        Write one line to the child's stdin.
        """
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode("ascii") + b"\n")
        self.proc.stdin.flush()

    def wait(self, event: str, deadline: float, tick: Callable[[], None] | None = None) -> dict[str, Any]:
        """
        The next event called C{event}.  An C{error} event, the child's exit
        or the (monotonic) C{deadline} raise.
        """
        while True:
            if tick is not None:
                tick()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise common.Deadline(f"{self.name}: no {event!r} before the deadline")
            try:
                got = self.events.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                if self.proc.poll() is not None and self.events.empty():
                    raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before {event!r}") from None
                continue
            if got.get("event") == "error":
                raise RuntimeError(f"{self.name}: {got.get('error')}")
            if got.get("event") == event:
                return got

    def drain(self) -> dict[str, Any] | None:
        """
        Read every event waiting; remember and return the latest
        C{progress} one.  Raises on an C{error} event or an exit.
        """
        while not self.events.empty():
            got = self.events.get()
            if got.get("event") == "error":
                raise RuntimeError(f"{self.name}: {got.get('error')}")
            if got.get("event") == "progress":
                self.latest = got
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode})")
        return self.latest


# ---------------------------------------------------------------------------
# The children's side


def emit(**fields: Any) -> None:
    """
    One JSON line on stdout, for the orchestrator.
    """
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def ownCpu() -> float:
    t = os.times()
    return t.user + t.system


def fail(message: str, status: int = common.EXIT_ERROR) -> None:
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
            os._exit(common.EXIT_DEADLINE)
        if os.getppid() != parent:
            os._exit(common.EXIT_ERROR)

    LoopingCall(check).start(0.5)


def onStdinLine(callback: Callable[[str], None]) -> None:
    """
    Call C{callback} with each line the orchestrator writes on stdin.
    """
    from twisted.internet import stdio
    from twisted.protocols.basic import LineReceiver

    class Commands(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            callback(line.decode("ascii", "replace").strip())

    stdio.StandardIO(Commands())

"""
What ``bench/rpc.py`` and ``bench/pubsub.py`` share, on top of
``bench/common.py``:

* L{Router}: a crossbar router (``bench/.venv-peers/bin/crossbar``) on a
  free port, configured from ``bench/crossbar/config.json``;
* L{LineChild}: a child process that reports JSON lines on stdout
  (L{common.JsonLines}, started by L{common.Children}), with
  L{LineChild.drain} for its C{progress} events;
* the machine's load (L{quietMachine}, L{busySeconds}) and the runs it
  disturbed (L{leastDisturbed}, L{disturbedNote});
* the two scripts' command line, exit status and report
  (L{addComparisonArguments}, L{exitStatus}, L{report}).

The child processes (the drivers and the crossbar clients) use the
children's helpers of ``common.py`` (L{common.emit}, L{common.watchdog},
...).  Only the standard library at import time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
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
        self.workers = common.childPids(self.proc.pid)

    def pids(self) -> list[int]:
        """
        The controller and its workers (the router worker does the work).
        """
        return [self.proc.pid, *self.workers]

    def cpuSeconds(self) -> float:
        """
        CPU seconds of the controller and the workers together.
        """
        return common.totalCpuSeconds(self.pids())

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


class LineChild(common.JsonLines):
    """
    A child process whose stdout is JSON lines (its stderr is inherited),
    started by C{children}.  Lines that are not JSON are copied to stderr.
    """

    def __init__(self, children: common.Children, name: str, argv: list[str], stdin: Any = subprocess.DEVNULL) -> None:
        super().__init__(name, children.start(argv, stdin=stdin, stdout=subprocess.PIPE))
        self.latest: dict[str, Any] | None = None

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
# The runs and the report of rpc.py and pubsub.py

TARGETS = ("relaynet", "crossbar")
OTHER_LOAD_LIMIT = 15.0  # % of one CPU taken by processes not ours during a run
CROSSBAR_MISSING = "crossbar not installed: run `make bench-peers` (bench/.venv-peers)"


def otherLoadPercent(busy0: float, busy1: float, ours: float, seconds: float) -> float:
    """
    What other work on the machine took during a run of C{seconds}, in % of
    one CPU: the machine's busy seconds (L{busySeconds} before and after)
    less C{ours}, the CPU seconds of the run's own processes.
    """
    return max(0.0, 100 * (busy1 - busy0 - ours) / seconds)


def leastDisturbed(measure: Callable[[], dict[str, Any]], retries: int) -> dict[str, Any]:
    """
    C{measure()}, again (up to C{retries} times) while other work on this
    shared machine took more than L{OTHER_LOAD_LIMIT} % of a CPU during the
    run (its C{otherLoadPercent}); the least disturbed attempt is kept, and
    marked if it was still disturbed.
    """
    attempts = []
    for _ in range(1 + retries):
        m = measure()
        attempts.append(m)
        if m["otherLoadPercent"] <= OTHER_LOAD_LIMIT:
            break
        print(f"  (other work took {m['otherLoadPercent']:.0f}% of a CPU during this run; measuring again)", flush=True)
    best = min(attempts, key=lambda m: m["otherLoadPercent"])
    best["attempts"] = len(attempts)
    best["disturbed"] = best["otherLoadPercent"] > OTHER_LOAD_LIMIT
    return best


def disturbedNote(measurements: list[dict[str, Any]]) -> str | None:
    """
    A row's note when other work on the machine disturbed some of its runs.
    """
    disturbed = sum(1 for m in measurements if m["disturbed"])
    if not disturbed:
        return None
    return (f"{disturbed} of {len(measurements)} runs disturbed: other work took more than "
            f"{OTHER_LOAD_LIMIT:.0f}% of a CPU meanwhile")


def addComparisonArguments(parser: argparse.ArgumentParser, retries: int) -> None:
    """
    C{--retries} (default C{retries}, 0 with C{--quick}: see
    L{retriesFor}) and C{--crossbar}.
    """
    parser.add_argument("--retries", type=int, default=None,
                        help=f"measure a run again up to this often while other work disturbs it (default: {retries}; --quick: 0)")
    parser.add_argument("--crossbar", default=None, help="the crossbar executable (default: bench/.venv-peers/bin/crossbar)")


def retriesFor(args: argparse.Namespace, default: int) -> int:
    """
    C{--retries}, else 0 with C{--quick}, else C{default}.
    """
    if args.retries is not None:
        return args.retries
    return 0 if args.quick else default


def exitStatus(error: BaseException, failed: type[Exception]) -> int:
    """
    Say on stderr what ended the runs early, and return the exit status
    for it: a deadline, a C{failed} check, or anything else.
    """
    if isinstance(error, common.Deadline):
        print(f"deadline: {error}", file=sys.stderr)
        return common.EXIT_DEADLINE
    if isinstance(error, failed):
        print(f"failed: {error}", file=sys.stderr)
        return common.EXIT_FAILED
    print(f"error: {error!r}", file=sys.stderr)
    return common.EXIT_ERROR


def report(workload: str, title: str, rows: Sequence[dict[str, Any]], path: str | None, extra: dict[str, Any]) -> None:
    """
    Print the table of C{rows} and write them (C{bench/out/<workload>.json},
    or C{path}).
    """
    print()
    print(title)
    common.printTable(rows, targets=list(TARGETS))
    path = common.writeResults(workload, title, rows, path=path, targets=list(TARGETS), extra=extra)
    print(f"results: {os.path.relpath(path)}")

"""
The benchmark suite: every workload script against its peers, then
``bench/RESULTS.md``.

Runs each workload script that exists in ``bench/`` (``streams.py``,
``rpc.py``, ``pubsub.py``, ``idle.py``, in that order) as a subprocess with
the same ``--runs``/``--quick`` flags, collects the JSON files each wrote to
``bench/out/`` (schema in ``bench/common.py``), and writes ``bench/RESULTS.md``:
the machine, the command, and per workload a table with one row per case
and metric, one column per target, and the ratio columns relaynet / peer.

    .venv/bin/python bench/suite.py                       # everything, median of 3 runs
    .venv/bin/python bench/suite.py --quick               # a smoke run: small sizes, 1 run
    .venv/bin/python bench/suite.py --only streams --quick

After ``streams.py``, stream throughput is measured once more under the
TCP congestion control of ``--congestion-control`` (cubic) if the machine
uses another, with it set for the whole machine during that run (root only;
otherwise the report says it was not measured): see ``bench/README.md`` for
why bbr on loopback hides what a hop costs.

Then socat and relaynet's native path are measured once more for
throughput and round trips with ``streams.py --pin`` (each target on a CPU
of its own, the drivers on the others; ``--no-pin`` skips it): on two
CPUs, where the scheduler puts three busy processes moves a single
stream's figures by a third from run to run.

Exit status: 0 if every script exited 0, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

SCRIPTS = ["streams", "rpc", "pubsub", "idle"]
RESULTS = os.path.join(common.HERE, "RESULTS.md")


def collect(script: str, since: float, taken: Sequence[str] = ()) -> list[dict[str, Any]]:
    """
    The result files in C{bench/out/} that C{script} (e.g. C{rpc}) wrote
    since C{since} (wall clock) and that follow the suite's schema, oldest
    first.  A file is C{script}'s if its C{script} or C{command} field names
    C{script.py}, or, without either, if its name starts with C{script}.
    """
    found = []
    for name in os.listdir(common.OUT_DIR):
        path = os.path.join(common.OUT_DIR, name)
        if not name.endswith(".json") or os.path.getmtime(path) < since or path in taken:
            continue
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if not (isinstance(data, dict) and "workload" in data and isinstance(data.get("rows"), list)):
            continue
        if "script" in data or "command" in data:
            mine = data.get("script") == f"{script}.py" or f"{script}.py" in str(data.get("command", ""))
        else:
            mine = name.startswith(script)
        if mine:
            data["_path"] = path
            found.append((os.path.getmtime(path), data))
    return [data for _, data in sorted(found, key=lambda item: item[0])]


def runScript(name: str, args: argparse.Namespace, children: common.Children, extra: Sequence[str] = (),
              label: str | None = None, taken: Sequence[str] = ()) -> dict[str, Any]:
    """
    Run C{bench/NAME.py} (with C{extra} arguments); return its exit status,
    duration and results (leaving out the files in C{taken}, an earlier
    run's), under C{label} (a heading; default C{NAME.py}).
    """
    python = common.findPython(args.python)
    argv = [python, os.path.join(common.HERE, f"{name}.py"), "--runs", str(args.runs), *extra]
    if args.quick:
        argv.append("--quick")
    if args.python:
        argv += ["--python", args.python]
    print(f"\n=== {name}: {' '.join(shlex.quote(os.path.relpath(a, common.REPO) if a.startswith(common.REPO) else a) for a in argv)}",
          flush=True)
    since = time.time() - 1
    started = time.monotonic()
    proc = children.start(argv, env=common.childEnv(), stdin=subprocess.DEVNULL)
    try:
        status = proc.wait(args.script_timeout)
    except subprocess.TimeoutExpired:
        print(f"{name}: still running after {args.script_timeout:.0f} s, stopped", flush=True)
        children.stop(proc)
        status = None
    else:
        children.stop(proc)
    return {
        "name": name,
        "label": label or f"`{name}.py`",
        "status": status,
        "seconds": time.monotonic() - started,
        "results": collect(name, since, taken),
    }


def markdown(report: list[dict[str, Any]], command: str, missing: list[str]) -> str:
    m = common.machine()
    lines = [
        "# Benchmark results",
        "",
        f"Written by `bench/suite.py` on {datetime.date.today().isoformat()}; see `bench/README.md` for what each "
        "workload measures. Each figure is the median of the runs shown; ↑ marks a metric where higher is better, "
        "↓ one where lower is better. Ratio columns divide a relaynet figure by a peer's (for ↑ metrics > 1 means "
        "relaynet is ahead, for ↓ metrics < 1 does).",
        "",
        f"* Machine: {m['cpus']} CPUs ({m['cpu'] or 'unknown model'}), Linux {m['kernel']}, Python {m['python']}, "
        f"TCP congestion control {m['tcpCongestionControl'] or 'unknown'} (a table that names another ran with it set "
        "for the whole machine: see `bench/README.md`)",
        f"* Command: `{command}`",
    ]
    if missing:
        lines.append(f"* Not run: {', '.join(name if ' ' in name else f'`{name}.py` (not present)' for name in missing)}")
    for script in report:
        status = "timed out" if script["status"] is None else f"exit status {script['status']}"
        lines += ["", f"## {script['label']}", "", f"{script['seconds']:.0f} s, {status}."]
        if not script["results"]:
            lines += ["", "No results were written."]
        for result in script["results"]:
            runs = sorted({len(row["runs"]) for row in result["rows"] if row.get("runs")})
            lines += ["", f"### {result.get('title') or result['workload']}", ""]
            lines.append(f"`{os.path.relpath(result['_path'], common.REPO)}`"
                         + (f", {'/'.join(map(str, runs))} run(s) per figure" if runs else ""))
            lines += ["", common.markdownTable(result["rows"], result.get("targets"), result.get("ratios"))]
            notes = sorted({f"{row['target']}: {row['note']}" for row in result["rows"] if row.get("note")})
            notes += [f"{target} skipped: {why}" for target, why in (result.get("skipped") or {}).items()]
            notes += [f"failed: {failure}" for failure in result.get("failures") or []]
            if notes:
                lines += [""] + [f"* {note}" for note in notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=SCRIPTS, help="run only this workload script (repeatable)")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure, passed on (default: 3)")
    parser.add_argument("--quick", action="store_true", help="passed on: small sizes, 1 run")
    parser.add_argument("--python", default=None, help="passed on: the Python with relaynet (default: .venv/bin/python)")
    parser.add_argument("--script-timeout", type=float, default=1800.0, help="stop a script after this long (default: 1800 s)")
    parser.add_argument("--output", default=RESULTS, help="the Markdown report (default: bench/RESULTS.md)")
    parser.add_argument("--no-pin", action="store_true",
                        help="skip the second pass of socat against the native path with each target on a CPU of its own")
    parser.add_argument("--congestion-control", default="cubic", metavar="NAME",
                        help="after streams.py, measure stream throughput again under this TCP congestion control, if the "
                             "machine uses another (needs root; `none`: do not; default: cubic)")
    args = parser.parse_args(argv)
    common.installSignalHandlers()
    os.makedirs(common.OUT_DIR, exist_ok=True)
    names = args.only or SCRIPTS
    present = [n for n in names if os.path.exists(os.path.join(common.HERE, f"{n}.py"))]
    missing = [n for n in names if n not in present]
    for name in missing:
        print(f"skipping {name}: bench/{name}.py does not exist", flush=True)
    if common.peersBin("python") is None:
        print("note: bench/.venv-peers is missing (`make bench-peers`): peer targets will be skipped", flush=True)
    command = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, common.REPO)
                                                  if sys.executable.startswith(common.REPO) else sys.executable,
                                                  os.path.relpath(os.path.abspath(__file__), common.REPO), *sys.argv[1:]])
    machineControl = common.congestionControl()
    control = args.congestion_control if args.congestion_control not in ("none", machineControl) else None
    if control is not None and "streams" in present and os.geteuid() != 0:
        print(f"note: stream throughput under {control} needs root (the machine uses {machineControl}): not measured", flush=True)
        missing.append(f"streams.py under TCP {control} (needs root)")
        control = None
    report: list[dict[str, Any]] = []
    with common.Children() as children:
        for name in present:
            passes: list[tuple[list[str], str | None]] = [([], None)]
            if name == "streams" and control is not None:
                passes.append((["--workloads", "throughput", "--congestion-control", control],
                               f"`streams.py`, throughput under TCP congestion control {control}"))
            if name == "streams" and not args.no_pin:
                passes.append((["--targets", "socat,relaynet-native", "--workloads", "throughput,rpc", "--pin"],
                               "`streams.py --pin`: socat and the native path, each on a CPU of its own"))
            for extra, label in passes:
                # A later pass of the same script leaves the files already reported to the earlier ones.
                taken = [result["_path"] for script in report for result in script["results"]]
                report.append(runScript(name, args, children, extra, label=label, taken=taken))
    with open(args.output, "w") as f:
        f.write(markdown(report, command, missing))
    print(f"\nwrote {os.path.relpath(args.output, common.REPO)}")
    for script in report:
        print(f"  {script['name']}: {'timed out' if script['status'] is None else 'exit ' + str(script['status'])}, "
              f"{len(script['results'])} result file(s), {script['seconds']:.0f} s")
    return 0 if report and all(s["status"] == 0 for s in report) else 1


if __name__ == "__main__":
    sys.exit(main())

"""
Stream workloads: relaynet side by side with its peers.

Targets, each started and stopped here on 127.0.0.1 and a free port:

``direct``
    The sender connects straight to the receiver: the physical limit.
``socat``
    ``socat -b 131072 TCP-LISTEN:P,fork,reuseaddr,nodelay
    TCP:127.0.0.1:Q,nodelay`` in front of the receiver (a forked C process
    per connection, 128 KiB copy buffer).
``transit``
    magic-wormhole-transit-relay (``twistd -n transitrelay`` from
    ``bench/.venv-peers``): both ends connect and say ``please relay TOKEN
    for side SIDE``, the relay pairs them and pipes bytes.  It has no
    listener to notify, so its receiver connects *before* the sender with
    the token the sender will use.
``relaynet-ws``
    The Hybrid Connections WebSocket path: the receiver keeps a control
    channel, the sender connects, the relay sends ``accept``, the receiver
    opens the rendezvous; data goes in WebSocket frames (64 KiB binary
    frames for throughput, one frame per message otherwise), masked by the
    drivers with the zero key.
``relaynet-native``
    The same rendezvous with ``Upgrade: relaynet-stream`` on both legs: raw
    bytes after ``101``.  Skipped (with a message) while the relay does not
    answer that upgrade.

Workloads (each its own table and JSON file in ``bench/out/``):

``throughput`` (``stream-throughput.json``)
    1 GiB (``--bytes``) or 30 s (``--seconds``), whichever comes first,
    from a sender to a receiver that drains it: over 1 stream, and over 16
    concurrent streams sharing the same total.  MB/s (10^6 bytes/s) from the
    sender's first write to the receiver's last byte, and the target's CPU
    seconds per GB (utime + stime of the relay/socat/transit process and
    its reaped children, from /proc/PID/stat).
``rpc`` (``stream-rpc.json``)
    64-byte requests echoed as 64-byte replies over established streams: 1
    stream with 1 request in flight, and 16 streams with 1 in flight each
    (not pipelined).  Round trips/s, p50 and p99 latency in µs, and the
    target's CPU µs per round trip.
``setup`` (``stream-setup.json``)
    Connect, have the listener accept, send 1 byte and get it echoed, close:
    one connection at a time, and 16 concurrently.  Connections/s, p50 and
    p99 latency (connect to echo) in ms, and the target's CPU ms per
    connection.

TCP congestion control: every connection uses the machine's
(``net.ipv4.tcp_congestion_control``, recorded with the results) unless
``--congestion-control NAME`` is given; then the script sets it for its
run, for every target and driver alike (root only), puts the machine's back
afterwards, and names its files and titles after it
(``stream-throughput-cubic.json``).  It matters on loopback: with ``bbr``
and no ``fq`` qdisc, TCP's own pacing reorders segments between the sending
process and the pacing timer, and the spurious retransmissions that follow
bound every relayed target well below what the hop costs (on the machine of
``RESULTS.md``, about 2.5 times below cubic's figures for socat and
relaynet alike).

Placement: with three busy processes (relay, sender, receiver) on a
two-CPU machine, where the scheduler puts them moves a single stream's
figures by a third or more, for every target alike, from run to run.
``--pin`` fixes it: each target (the relay, socat and its forks, the
transit relay, with all their threads) runs on the last CPU and the drivers
on the others, the same for every target; files and titles say so
(``stream-rpc-pinned.json``).

Every figure is the median of ``--runs`` runs (3).  The drivers
(``bench/drivers/peer.py``) are separate processes using the standard
library only; see their docstring for what each does.  Ratio columns divide
a relaynet figure by a peer's, whatever the direction: for throughput > 1
is better than the peer, for latency and CPU < 1 is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import Children, Deadline, JsonLines, Relay, makeRow  # noqa: E402

TARGETS = ["direct", "socat", "transit", "relaynet-ws", "relaynet-native"]
RATIOS = [
    ("relaynet-native", "direct"),
    ("relaynet-native", "socat"),
    ("relaynet-native", "transit"),
    ("relaynet-ws", "socat"),
    ("relaynet-ws", "transit"),
]
WORKLOADS = ["throughput", "rpc", "setup"]
SOCAT_BUFFER = 131072
DRIVER = os.path.join(common.HERE, "drivers", "peer.py")
MiB = 1024 * 1024


class Unavailable(Exception):
    """
    A target cannot be measured on this machine (reported, then skipped).
    """


# ---------------------------------------------------------------------------
# Targets


class Target:
    """
    A running target: how the drivers reach it and which process does the
    relaying (for its CPU time; L{None} for C{direct}).
    """

    name: str
    pid: int | None = None
    sender: dict[str, Any]
    receiver: dict[str, Any]

    def cpu(self) -> float | None:
        if self.pid is None:
            return None
        # socat's forked handlers are counted once they have been reaped.
        settle = time.monotonic() + 2.0
        while common.childPids(self.pid) and time.monotonic() < settle:
            time.sleep(0.02)
        return common.cpuSeconds(self.pid, children=True)

    def stop(self) -> None:
        pass


def startTarget(name: str, children: Children, args: argparse.Namespace) -> Target:
    target = Target()
    target.name = name
    seed = os.urandom(8).hex()
    if name == "direct":
        port = common.freePort()
        target.receiver = {"mode": "tcp", "listenPort": port}
        target.sender = {"mode": "tcp", "port": port}
    elif name == "socat":
        socat = shutil.which("socat")
        if socat is None:
            raise Unavailable("socat is not installed (apt-get install -y socat)")
        inner, outer = common.freePort(), common.freePort()
        proc = children.start(
            [socat, "-b", str(SOCAT_BUFFER), f"TCP-LISTEN:{outer},bind=127.0.0.1,fork,reuseaddr,nodelay",
             f"TCP:127.0.0.1:{inner},nodelay"],
            log=os.path.join(common.OUT_DIR, "streams-socat.log"), cpus=args.targetCpus,
        )
        common.waitForPort(outer, proc, 10, "socat")
        target.pid = proc.pid
        target.receiver = {"mode": "tcp", "listenPort": inner}
        target.sender = {"mode": "tcp", "port": outer}
        target.stop = lambda: children.stop(proc)  # type: ignore[method-assign]
    elif name == "transit":
        twistd = common.peersBin("twistd")
        if twistd is None or not _hasTransit():
            raise Unavailable("bench/.venv-peers has no magic-wormhole-transit-relay: run `make bench-peers`")
        port = common.freePort()
        proc = children.start(
            [twistd, "-n", "--pidfile=", "transitrelay", f"--port=tcp:{port}:interface=127.0.0.1"],
            log=os.path.join(common.OUT_DIR, "streams-transit.log"),
            env=dict(os.environ, PYTHONUNBUFFERED="1"), cpus=args.targetCpus,
        )
        common.waitForPort(port, proc, 30, "the transit relay")
        target.pid = proc.pid
        target.receiver = {"mode": "transit", "port": port, "seed": seed}
        target.sender = {"mode": "transit", "port": port, "seed": seed}
        target.stop = lambda: children.stop(proc)  # type: ignore[method-assign]
    else:
        relay = Relay(children, python=args.python, log=os.path.join(common.OUT_DIR, "streams-relay.log"), cpus=args.targetCpus)
        if name == "relaynet-native" and not nativeSupported(relay):
            relay.stop()
            raise Unavailable("the relay does not answer `Upgrade: relaynet-stream` yet (native fast path missing)")
        token = relay.token()
        mode = name
        target.pid = relay.pid
        target.receiver = {"mode": mode, "port": relay.port, "token": token, "entity": common.ENTITY}
        target.sender = dict(target.receiver)
        target.stop = relay.stop  # type: ignore[method-assign]
    return target


def _hasTransit() -> bool:
    import glob

    return bool(glob.glob(os.path.join(common.PEERS_VENV, "lib", "python*", "site-packages", "wormhole_transit_relay")))


def nativeSupported(relay: Relay) -> bool:
    """
    Whether the relay knows ``Upgrade: relaynet-stream``: a native sender
    with a wrong token must be refused as unauthorized (401), which only a
    relay that parsed the request as a native connect does.  Any other
    answer (400, 404, a WebSocket refusal) means the path is not there.
    """
    import socket

    request = (
        f"GET /$hc/{common.ENTITY}?sb-hc-action=connect&sb-hc-id=probe HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{relay.port}\r\nUpgrade: relaynet-stream\r\nConnection: Upgrade\r\n"
        "ServiceBusAuthorization: SharedAccessSignature sr=x&sig=x&se=1&skn=x\r\n\r\n"
    ).encode()
    try:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as sock:
            sock.sendall(request)
            answer = sock.recv(4096)
    except OSError:
        return False
    status = answer.split(b"\r\n", 1)[0]
    return b" 401 " in status or b" 403 " in status


# ---------------------------------------------------------------------------
# One run


def driver(children: Children, name: str, role: str, workload: str, config: dict[str, Any], args: argparse.Namespace) -> JsonLines:
    python = sys.executable
    proc = children.start(
        [python, DRIVER, "--role", role, "--workload", workload, "--config", json.dumps(config)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cpus=args.driverCpus,
    )
    return JsonLines(f"{name} {role}", proc)


def oneRun(children: Children, target: Target, workload: str, params: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """
    Start a receiver and a sender for one measurement, and return the
    figures (see L{measure}).
    """
    lifetime = args.runTimeout
    base = {"timeout": 30.0, "lifetime": lifetime, **params}
    receiver = driver(children, target.name, "receiver", workload, {**target.receiver, **base}, args)
    sender = None
    try:
        receiver.wait("ready", 30)
        sender = driver(children, target.name, "sender", workload, {**target.sender, **base}, args)
        sender.wait("connected", 60)
        if workload != "setup":
            receiver.wait("accepted", 30)
        time.sleep(0.1)  # let the accept path settle before the CPU reading
        cpu0 = target.cpu()
        sender.send("GO")
        sent = sender.wait("done", lifetime)
        got = receiver.wait("done", 30) if workload != "setup" else None
        cpu1 = target.cpu()
        return measure(workload, params, sent, got, None if cpu0 is None or cpu1 is None else cpu1 - cpu0)
    finally:
        for child in (sender, receiver):
            if child is not None:
                children.stop(child.proc)


def measure(workload: str, params: dict[str, Any], sent: dict[str, Any], got: dict[str, Any] | None,
            cpu: float | None) -> dict[str, Any]:
    """
    The figures of one run, from the drivers' reports and the target's CPU
    seconds (L{None} for C{direct}).
    """
    figures: dict[str, Any] = {"senderCpu": sent["cpu"], "targetCpu": cpu}
    if workload == "throughput":
        assert got is not None
        if got["bytes"] != sent["bytes"]:
            raise RuntimeError(f"bytes sent per stream {sent['bytes']} but received {got['bytes']}")
        total = sum(got["bytes"])
        seconds = got["end"] - sent["start"]
        figures.update(bytes=total, seconds=seconds, receiverCpu=got["cpu"])
        figures["MB/s"] = total / seconds / 1e6
        figures["cpu/GB"] = cpu / (total / 1e9) if cpu is not None else None
    elif workload == "rpc":
        n = sent["roundTrips"]
        figures.update(roundTrips=n, seconds=sent["seconds"], receiverCpu=got["cpu"] if got else None)
        figures["rt/s"] = n / sent["seconds"]
        figures["p50"] = sent["latencies"]["p50"]
        figures["p99"] = sent["latencies"]["p99"]
        figures["cpu/rt"] = cpu / n * 1e6 if cpu is not None and n else None
    else:
        n = sent["connections"]
        figures.update(connections=n, seconds=sent["seconds"])
        figures["conn/s"] = n / sent["seconds"]
        figures["p50"] = sent["latencies"]["p50"] / 1000
        figures["p99"] = sent["latencies"]["p99"] / 1000
        figures["cpu/conn"] = cpu / n * 1e3 if cpu is not None and n else None
    return figures


# ---------------------------------------------------------------------------
# The workloads

# (case, driver parameters) per workload; the sizes come from the flags.


def cases(workload: str, args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    if workload == "throughput":
        return [
            ("1 stream", {"streams": 1, "bytes": args.bytes, "seconds": args.seconds}),
            ("16 streams", {"streams": 16, "bytes": args.bytes, "seconds": args.seconds}),
        ]
    if workload == "rpc":
        return [
            ("1 stream, 1 in flight", {"streams": 1, "seconds": args.rpc_seconds, "count": 10**7}),
            ("16 streams, 1 in flight each", {"streams": 16, "seconds": args.rpc_seconds, "count": 10**7}),
        ]
    return [
        ("sequential", {"concurrency": 1, "seconds": args.setup_seconds, "count": args.connections}),
        ("16 concurrent", {"concurrency": 16, "seconds": args.setup_seconds, "count": args.connections}),
    ]


#: (figure key, metric, unit, better) per workload.
METRICS = {
    "throughput": [("MB/s", "throughput", "MB/s", "higher"), ("cpu/GB", "target CPU", "s/GB", "lower")],
    "rpc": [
        ("rt/s", "round trips", "/s", "higher"),
        ("p50", "p50 latency", "µs", "lower"),
        ("p99", "p99 latency", "µs", "lower"),
        ("cpu/rt", "target CPU", "µs/round trip", "lower"),
    ],
    "setup": [
        ("conn/s", "connections", "/s", "higher"),
        ("p50", "p50 latency", "ms", "lower"),
        ("p99", "p99 latency", "ms", "lower"),
        ("cpu/conn", "target CPU", "ms/connection", "lower"),
    ],
}

TITLES = {
    "throughput": "Stream throughput: one sender, one draining receiver",
    "rpc": "Small-message round trips: 64 B request, 64 B reply",
    "setup": "Connection set-up: connect, accept, first byte echoed",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.addStandardArguments(parser, timeout=1200)
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated (default: {','.join(TARGETS)})")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated (default: {','.join(WORKLOADS)})")
    parser.add_argument("--bytes", type=int, default=None, help="throughput: bytes per case, split over its streams (default: 1 GiB; --quick 256 MiB)")
    parser.add_argument("--seconds", type=float, default=30.0, help="throughput: at most this long per run (default: 30)")
    parser.add_argument("--rpc-seconds", type=float, default=None, help="round trips: seconds per run (default: 3; --quick 1)")
    parser.add_argument("--setup-seconds", type=float, default=None, help="set-up: at most this long per run (default: 3; --quick 1)")
    parser.add_argument("--connections", type=int, default=5000, help="set-up: at most this many connections per run (default: 5000)")
    parser.add_argument("--pin", action="store_true",
                        help="run each target (relay, socat, transit relay) on the last CPU and the drivers on the "
                             "others, the same for every target, instead of wherever the scheduler puts them")
    parser.add_argument("--congestion-control", default=None, metavar="NAME",
                        help="run under this TCP congestion control (e.g. cubic; sets net.ipv4.tcp_congestion_control "
                             "for the run, root only; default: the machine's)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.bytes = args.bytes or (256 * MiB if quick else 1024 * MiB)
    # Whole 1 MiB writes on each of 16 streams.
    args.bytes = max(16 * MiB, args.bytes // (16 * MiB) * 16 * MiB)
    args.rpc_seconds = args.rpc_seconds or (1.0 if quick else 3.0)
    args.setup_seconds = args.setup_seconds or (1.0 if quick else 3.0)
    args.runTimeout = args.seconds + 60
    runs = common.runsFor(args)
    targets = [t for t in args.targets.split(",") if t]
    workloads = [w for w in args.workloads.split(",") if w]
    for name in targets:
        if name not in TARGETS:
            parser.error(f"unknown target {name!r}")
    for name in workloads:
        if name not in WORKLOADS:
            parser.error(f"unknown workload {name!r}")
    args.targetCpus = args.driverCpus = None
    suffix = ""
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            parser.error("--pin needs at least two CPUs")
        args.targetCpus, args.driverCpus = {cpus[-1]}, set(cpus[:-1])
        suffix = "-pinned"
    common.installSignalHandlers()
    os.makedirs(common.OUT_DIR, exist_ok=True)
    if args.congestion_control is None:
        return measureAll(args, runs, targets, workloads, suffix=suffix)
    try:
        with common.UsingCongestionControl(args.congestion_control):
            return measureAll(args, runs, targets, workloads, suffix=f"-{args.congestion_control}{suffix}")
    except common.CongestionControlUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return common.EXIT_ERROR


def measureAll(args: argparse.Namespace, runs: int, targets: list[str], workloads: list[str], suffix: str) -> int:
    """
    Run every workload against every target; print and write the tables
    (C{suffix} goes after each file's name and, spelled out, each title).
    """
    control = common.congestionControl()
    deadline = time.monotonic() + args.timeout

    # results[workload][(case, target)] = list of per-run figures
    results: dict[str, dict[tuple[str, str], list[dict[str, Any]]]] = {w: {} for w in workloads}
    skipped: dict[str, str] = {}
    failures: list[str] = []
    started = time.monotonic()
    with Children() as children:
        for name in targets:
            try:
                target = startTarget(name, children, args)
            except Unavailable as e:
                print(f"SKIPPED {name}: {e}", flush=True)
                skipped[name] = str(e)
                continue
            try:
                for workload in workloads:
                    for case, params in cases(workload, args):
                        for run in range(runs):
                            if time.monotonic() > deadline:
                                raise Deadline(f"--timeout {args.timeout:.0f} s passed")
                            try:
                                figures = oneRun(children, target, workload, params, args)
                            except (RuntimeError, Deadline, OSError) as e:
                                failures.append(f"{name} / {workload} / {case} / run {run + 1}: {e}")
                                print(f"FAILED {failures[-1]}", flush=True)
                                break
                            results[workload].setdefault((case, name), []).append(figures)
                            print(f"{workload:<10} {case:<30} {name:<16} run {run + 1}: {describe(workload, figures)}", flush=True)
            finally:
                target.stop()
    print(f"\n{time.monotonic() - started:.0f} s in all", flush=True)

    for workload in workloads:
        rows = []
        for case, _ in cases(workload, args):
            for name in targets:
                runsHere = results[workload].get((case, name))
                if not runsHere:
                    continue
                for key, metric, unit, better in METRICS[workload]:
                    values = [r[key] for r in runsHere]
                    note = "no relaying process" if key.startswith("cpu") and name == "direct" else None
                    rows.append(makeRow(case, name, metric, unit, better, values, note=note))
        extra = {
            "config": {"runs": runs, "quick": args.quick, **{k: v for k, v in vars(args).items() if k in (
                "bytes", "seconds", "rpc_seconds", "setup_seconds", "connections")}, "socatBuffer": SOCAT_BUFFER,
                "tcpCongestionControl": control,
                "pinned": {"target": sorted(args.targetCpus), "drivers": sorted(args.driverCpus)} if args.pin else None},
            "skipped": skipped,
            "failures": [f for f in failures if f" / {workload} / " in f],
            "details": {f"{case} | {name}": figs for (case, name), figs in results[workload].items()},
        }
        conditions = [f"TCP congestion control {control}"] if args.congestion_control else []
        if args.pin:
            conditions.append(f"target on CPU {','.join(map(str, sorted(args.targetCpus)))}, "
                              f"drivers on CPU {','.join(map(str, sorted(args.driverCpus)))}")
        title = TITLES[workload] + (f" ({'; '.join(conditions)})" if conditions else "")
        path = common.writeResults(f"stream-{workload}{suffix}", title, rows, ratios=RATIOS, targets=targets, extra=extra,
                                   path=None if not args.json else f"{args.json.removesuffix('.json')}-{workload}{suffix}.json")
        print(f"\n{title} (median of {runs}; ratios are relaynet / peer; TCP congestion control {control})")
        common.printTable(rows, targets=[t for t in targets if t not in skipped], ratios=RATIOS)
        print(f"results: {os.path.relpath(path)}")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    for failure in failures:
        print(f"failed: {failure}")
    return common.EXIT_FAILED if failures else common.EXIT_OK


def describe(workload: str, f: dict[str, Any]) -> str:
    """
    One run's figures, for the progress lines.
    """
    cpu = "" if f.get("targetCpu") is None else f", target CPU {f['targetCpu']:.2f} s"
    drivers = f"drivers CPU sender {f['senderCpu']:.2f} s" + (f" receiver {f['receiverCpu']:.2f} s" if f.get("receiverCpu") is not None else "")
    if workload == "throughput":
        return f"{f['bytes'] / MiB:.0f} MiB in {f['seconds']:.2f} s = {f['MB/s']:.0f} MB/s{cpu}; {drivers}"
    if workload == "rpc":
        return f"{f['roundTrips']} in {f['seconds']:.2f} s = {f['rt/s']:.0f}/s, p50 {f['p50']:.0f} µs, p99 {f['p99']:.0f} µs{cpu}; {drivers}"
    return f"{f['connections']} in {f['seconds']:.2f} s = {f['conn/s']:.0f}/s, p50 {f['p50']:.2f} ms, p99 {f['p99']:.2f} ms{cpu}; {drivers}"


if __name__ == "__main__":
    sys.exit(main())

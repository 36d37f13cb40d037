"""
Backpressure benchmark: does the relay stay small when a fast sender meets a
slow listener?

Three OS processes besides this one:

* the relay, ``twistd -n relaynet`` on 127.0.0.1 and a free port;
* a listener (this file, ``--role listener``) that opens a control channel,
  accepts one sender at the rendezvous and reads it SLOWLY: a token bucket
  pauses and resumes its transport (``pauseProducing``/``resumeProducing``)
  so it drains at ``--rate`` MB/s;
* a sender (this file, ``--role sender``) that pushes ``--bytes`` bytes in
  64 KiB binary messages as fast as its own transport lets it (it is a
  streaming producer registered on its transport, so it stops writing when
  its send buffer is full and does not grow either).

While the data flows this process samples the relay's VmRSS from
/proc/PID/status every 0.2 s, and reads VmHWM at the end (after resetting it
through /proc/PID/clear_refs once the listener and sender are connected).
The listener must receive exactly the bytes the sender sent (same count,
same SHA-256, same number of binary messages).

Every wait has a deadline (``--timeout``, default 600 s); every child is
killed on exit.  Exit status: 0 good, 1 data check failed, 2 deadline
passed, 3 relay over the memory budget (only with ``--enforce-budget``),
4 anything else.

Results go to ``bench/out/backpressure.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import common
from common import (
    ENTITY,
    KEY_NAME,
    OUT_DIR,
    REPO,
    Pump,
    emit,
    onStdinLine,
    ownCpu,
    readStatus,
    watchdog,
)

MESSAGE_SIZE = 64 * 1024
BUDGET_BYTES = 8 * 1024 * 1024  # the baseline: 8 MiB of growth
MiB = 1024 * 1024
POOL_SIZE = 1024 * 1024
SAMPLE_INTERVAL = 0.2

EXIT_OK, EXIT_DATA, EXIT_DEADLINE, EXIT_BUDGET, EXIT_ERROR = 0, 1, 2, 3, 4

# ---------------------------------------------------------------------------
# Shared by the roles


def pool(seed: int) -> bytes:
    """
    The pseudo-random bytes messages are cut from (the same in both roles).
    """
    import random

    return random.Random(seed).randbytes(POOL_SIZE + MESSAGE_SIZE)


def message(data: bytes, index: int, size: int) -> bytes:
    """
    Message C{index}: its number, then C{size - 8} bytes of the pool at an
    offset that moves with the number (so reordered or repeated messages
    change the digest).
    """
    offset = (index * 4099) % POOL_SIZE
    head = struct.pack(">Q", index)
    return (head + data[offset : offset + size - len(head)])[:size]


def ownPeakRss() -> int:
    return readStatus(os.getpid()).get("VmHWM", 0)


def clientFactory(url: str, protocol: Any) -> Any:
    from autobahn.twisted.websocket import WebSocketClientFactory

    factory = WebSocketClientFactory(url)
    factory.protocol = protocol
    factory.setProtocolOptions(
        perMessageCompressionOffers=[],
        openHandshakeTimeout=30,
        closeHandshakeTimeout=30,
        maxFramePayloadSize=0,
        maxMessagePayloadSize=0,
    )
    return factory


def connect(reactor: Any, url: str, factory: Any) -> None:
    from twisted.internet.endpoints import TCP4ClientEndpoint

    hostPort = url.split("/")[2]
    host, _, port = hostPort.rpartition(":")
    TCP4ClientEndpoint(reactor, host, int(port), timeout=30).connect(factory).addErrback(fatal)


def fatal(failure: Any) -> None:
    sys.stderr.write(f"{os.getpid()}: {failure.getTraceback()}\n")
    emit(event="error", error=str(failure.value))
    os._exit(EXIT_ERROR)


def roleUrl(args: argparse.Namespace, action: str) -> str:
    from urllib.parse import quote

    from relaynet.auth import mintToken

    host = f"127.0.0.1:{args.port}"
    token = mintToken(f"http://{host}/{ENTITY}", KEY_NAME, args.key, int(time.time()) + 3600)
    return f"ws://{host}/$hc/{ENTITY}?sb-hc-action={action}&sb-hc-token={quote(token, safe='')}"


# ---------------------------------------------------------------------------
# The listener


def runListener(args: argparse.Namespace) -> None:
    from autobahn.twisted.websocket import WebSocketClientProtocol
    from twisted.internet import reactor
    from twisted.internet.task import LoopingCall

    rate = args.rate * 1e6  # bytes per second
    # The bucket holds 50 ms of reading (at least 256 KiB): with a 5 ms
    # tick a smaller one would cap the rate at bucket / 5 ms.
    burst = max(4 * MESSAGE_SIZE, rate * 0.05)
    state: dict[str, Any] = {"control": None}

    class SlowReader(WebSocketClientProtocol):
        """
        The rendezvous socket: reads at C{rate} bytes a second at most.
        """

        def connectionMade(self) -> None:
            super().connectionMade()
            self.digest = hashlib.sha256()
            self.received = 0
            self.messages = 0
            self.textMessages = 0
            self.wrongSizes = 0
            self.first: float | None = None
            self.last: float | None = None
            self.budget = float(burst)
            self.paused = False
            self.pauses = 0
            self.stamp = time.monotonic()
            self.ticker = LoopingCall(self.tick)
            self.ticker.start(0.005)

        def dataReceived(self, data: bytes) -> None:
            if self.state == self.STATE_OPEN:
                self.budget -= len(data)
            super().dataReceived(data)
            if self.budget <= 0 and not self.paused and self.transport is not None:
                self.paused = True
                self.pauses += 1
                transport: Any = self.transport
                transport.pauseProducing()

        def tick(self) -> None:
            now = time.monotonic()
            self.budget = min(self.budget + rate * (now - self.stamp), float(burst))
            self.stamp = now
            if self.paused and self.budget > 0 and self.transport is not None:
                self.paused = False
                transport: Any = self.transport
                transport.resumeProducing()

        def onOpen(self) -> None:
            emit(event="accepted", t=time.time())

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            now = time.time()
            if self.first is None:
                self.first = now
            self.last = now
            self.digest.update(payload)
            self.received += len(payload)
            self.messages += 1
            if not isBinary:
                self.textMessages += 1
            if len(payload) != MESSAGE_SIZE and self.received != args.bytes:
                self.wrongSizes += 1

        def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
            if self.ticker.running:
                self.ticker.stop()
            emit(
                event="done",
                bytes=self.received,
                sha256=self.digest.hexdigest(),
                messages=self.messages,
                textMessages=self.textMessages,
                wrongSizes=self.wrongSizes,
                first=self.first,
                last=self.last,
                closed=time.time(),
                wasClean=wasClean,
                code=code,
                reason=reason,
                pauses=self.pauses,
                peakRss=ownPeakRss(),
                cpu=ownCpu(),
            )
            control = state["control"]
            if control is not None and control.state == control.STATE_OPEN:
                control.sendClose(1000)
            reactor.callLater(0.5, reactor.stop)

    class Control(WebSocketClientProtocol):
        def onOpen(self) -> None:
            state["control"] = self
            emit(event="listening", t=time.time())

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            command = json.loads(payload)
            if "accept" in command:
                address = command["accept"]["address"]
                connect(reactor, address, clientFactory(address, SlowReader))

        def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
            if state.get("control") is None:
                emit(event="error", error=f"control channel refused: {code} {reason}")
                os._exit(EXIT_ERROR)

    watchdog(reactor, args.deadline)
    url = roleUrl(args, "listen")
    connect(reactor, url, clientFactory(url, Control))
    reactor.run()


# ---------------------------------------------------------------------------
# The sender


def runSender(args: argparse.Namespace) -> None:
    from autobahn.twisted.websocket import WebSocketClientProtocol
    from twisted.internet import reactor
    from twisted.internet.interfaces import IPushProducer
    from zope.interface import implementer

    data = pool(args.seed)
    total = args.bytes

    @implementer(IPushProducer)
    class Pusher(Pump, WebSocketClientProtocol):
        """
        Sends C{total} bytes as 64 KiB messages while its transport takes
        them: a streaming producer on its own transport.
        """

        sent = 0
        index = 0
        finished = False

        def onOpen(self) -> None:
            self.digest = hashlib.sha256()
            emit(event="open", t=time.time())

        def pump(self) -> None:
            while not self.paused and self.sent < total and self.state == self.STATE_OPEN:
                size = min(MESSAGE_SIZE, total - self.sent)
                payload = message(data, self.index, size)
                self.digest.update(payload)
                self.index += 1
                self.sent += size
                # May call pauseProducing() from inside, when the
                # transport's buffer goes over its limit.
                self.sendMessage(payload, isBinary=True)
            if self.sent >= total and not self.finished:
                self.finished = True
                self.tSent = time.time()
                transport: Any = self.transport
                transport.unregisterProducer()
                self.sendClose(1000)

        def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
            if not hasattr(self, "digest"):
                emit(event="error", error=f"sender refused: {code} {reason}")
                os._exit(EXIT_ERROR)
            emit(
                event="done",
                bytes=self.sent,
                sha256=self.digest.hexdigest(),
                messages=self.index,
                started=getattr(self, "t0", None),
                allWritten=getattr(self, "tSent", None),
                closed=time.time(),
                wasClean=wasClean,
                code=code,
                reason=reason,
                pauses=self.pauses,
                peakRss=ownPeakRss(),
                cpu=ownCpu() - self.cpu0,
            )
            reactor.callLater(0.2, reactor.stop)

    pusher = Pusher()

    def command(line: str) -> None:
        if line == "GO":
            pusher.go()

    onStdinLine(command)
    watchdog(reactor, args.deadline)
    url = roleUrl(args, "connect")
    factory = clientFactory(url, lambda: pusher)
    connect(reactor, url, factory)
    reactor.run()


# ---------------------------------------------------------------------------
# The orchestrator


def resetPeak(pid: int) -> bool:
    """
    Reset VmHWM to the current RSS (Linux >= 4.0).
    """
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def machine() -> dict[str, Any]:
    """
    L{common.machine}, with the number of CPUs as C{nproc} (this script's
    JSON schema).
    """
    described = common.machine()
    return {"nproc": described.pop("cpus"), **described}


def revision() -> dict[str, Any]:
    """
    The relaynet commit measured, and the files that differ from it
    (read-only git commands).
    """
    def git(*argv: str) -> str:
        try:
            return subprocess.run(
                ["git", "--no-optional-locks", *argv], cwd=REPO, capture_output=True, text=True, timeout=10, check=False
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "relaynet", "twisted").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip() or None, "uncommittedRelayFiles": dirty}


def orchestrate(args: argparse.Namespace) -> int:
    start = time.monotonic()
    deadline = start + args.timeout
    wallDeadline = time.time() + args.timeout
    python = common.findPython(args.python)
    os.makedirs(OUT_DIR, exist_ok=True)
    children = common.Children()
    relay: common.Relay | None = None
    samples: list[tuple[float, int]] = []
    relayLog = os.path.join(OUT_DIR, "relay.log")
    result: dict[str, Any] = {
        "benchmark": "backpressure",
        "machine": machine(),
        "revision": revision(),
        "config": {
            "bytes": args.bytes,
            "messageSize": MESSAGE_SIZE,
            "listenerRateMBps": args.rate,
            "timeout": args.timeout,
            "budgetBytes": BUDGET_BYTES,
            "sampleInterval": SAMPLE_INTERVAL,
        },
        "ok": False,
    }
    status = EXIT_ERROR

    def sample() -> None:
        now = time.monotonic()
        if samples and now - samples[-1][0] - start < SAMPLE_INTERVAL:
            return
        assert relay is not None
        try:
            rss = readStatus(relay.pid)["VmRSS"]
        except (OSError, KeyError):
            return
        samples.append((now - start, rss))

    try:
        # The relay, logging this run only.
        open(relayLog, "wb").close()
        relay = common.Relay(children, python=python, log=relayLog, timeout=min(30.0, deadline - time.monotonic()))
        print(f"relay pid {relay.pid} on 127.0.0.1:{relay.port} (log: {os.path.relpath(relayLog)})", flush=True)
        idle = readStatus(relay.pid)

        roleArgs = [
            "--port", str(relay.port), "--key", relay.key, "--bytes", str(args.bytes),
            "--rate", str(args.rate), "--seed", str(args.seed), "--deadline", str(wallDeadline),
        ]
        me = os.path.abspath(__file__)
        listener = common.JsonLines("listener", children.start([python, me, "--role", "listener", *roleArgs],
                                                               stdout=subprocess.PIPE))
        listener.waitUntil("listening", deadline)
        sender = common.JsonLines("sender", children.start([python, me, "--role", "sender", *roleArgs],
                                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        listener.waitUntil("accepted", deadline)
        sender.waitUntil("open", deadline)

        # Warm-up over: both legs are spliced.  Let the relay settle, take
        # the baseline, and reset its high-water mark.
        time.sleep(0.5)
        before = readStatus(relay.pid)
        relayCpu0 = common.cpuSeconds(relay.pid)
        peakReset = resetPeak(relay.pid)
        samples.append((time.monotonic() - start, before["VmRSS"]))
        goWall = time.time()
        goMono = time.monotonic()
        sender.send("GO")
        print(f"sending {args.bytes} bytes; listener drains at {args.rate} MB/s", flush=True)

        got = listener.waitUntil("done", deadline, tick=sample)
        sent = sender.waitUntil("done", deadline, tick=sample)
        elapsedMono = time.monotonic() - goMono
        after = readStatus(relay.pid)
        relayCpu = common.cpuSeconds(relay.pid) - relayCpu0
        samples.append((time.monotonic() - start, after["VmRSS"]))

        peakSampled = max(rss for _, rss in samples)
        peak = max(peakSampled, after["VmHWM"]) if peakReset else peakSampled
        growth = peak - before["VmRSS"]
        seconds = (got["last"] or got["closed"]) - goWall
        ratio = growth / BUDGET_BYTES

        problems = []
        if got["bytes"] != args.bytes:
            problems.append(f"listener received {got['bytes']} bytes, expected {args.bytes}")
        if sent["bytes"] != args.bytes:
            problems.append(f"sender sent {sent['bytes']} bytes, expected {args.bytes}")
        if got["sha256"] != sent["sha256"]:
            problems.append(f"SHA-256 differs: listener {got['sha256']} sender {sent['sha256']}")
        if got["messages"] != sent["messages"] or got["textMessages"] or got["wrongSizes"]:
            problems.append(
                f"messages: listener {got['messages']} ({got['textMessages']} text, {got['wrongSizes']} wrong size), "
                f"sender {sent['messages']}"
            )

        result.update(
            {
                "relay": {
                    "pid": relay.pid,
                    "rssIdle": idle["VmRSS"],
                    "rssStart": before["VmRSS"],
                    "rssEnd": after["VmRSS"],
                    "rssPeakSampled": peakSampled,
                    "vmHWM": after["VmHWM"],
                    "peakResetAtStart": peakReset,
                    "rssPeak": peak,
                    "growth": growth,
                    "rssAnonStart": before.get("RssAnon"),
                    "rssAnonEnd": after.get("RssAnon"),
                },
                "transfer": {
                    "bytes": got["bytes"],
                    "seconds": seconds,
                    "MBps": got["bytes"] / seconds / 1e6 if seconds > 0 else None,
                    "MiBps": got["bytes"] / seconds / MiB if seconds > 0 else None,
                    "secondsUntilBothClosed": elapsedMono,
                    "sha256": got["sha256"],
                    "senderSha256": sent["sha256"],
                    "messages": got["messages"],
                    "listenerPauses": got["pauses"],
                    "senderPauses": sent["pauses"],
                    "senderAllWrittenAfter": (sent["allWritten"] - goWall) if sent.get("allWritten") else None,
                    "closeCodes": {"listener": got["code"], "sender": sent["code"]},
                },
                "peakRss": {"listener": got["peakRss"], "sender": sent["peakRss"]},
                # CPU seconds during the transfer (the listener's includes its start).
                "cpuSeconds": {"relay": relayCpu, "sender": sent["cpu"], "listener": got["cpu"]},
                "ratio": ratio,
                "withinBudget": ratio < 1.0,
                "dataOk": not problems,
                "problems": problems,
                "samples": [[round(t, 3), rss] for t, rss in samples],
            }
        )
        result["ok"] = not problems

        def mib(n: int) -> str:
            return f"{n / MiB:8.2f} MiB"

        rows = [
            ("bytes moved", f"{got['bytes']} ({got['bytes'] / MiB:.1f} MiB, {got['messages']} messages)"),
            ("seconds", f"{seconds:.2f}"),
            ("MB/s", f"{got['bytes'] / seconds / 1e6:.2f}  ({got['bytes'] / seconds / MiB:.2f} MiB/s)"),
            ("relay RSS idle", mib(idle["VmRSS"]) + "  (before any client)"),
            ("relay RSS start", mib(before["VmRSS"]) + "  (listener and sender connected)"),
            (
                "relay RSS peak",
                mib(peak) + f"  (VmHWM since start{'' if peakReset else ' not resettable: sampled'}; "
                f"max sampled VmRSS {peakSampled / MiB:.2f} MiB)",
            ),
            ("relay RSS end", mib(after["VmRSS"])),
            ("growth", mib(growth) + "  (peak - start)"),
            ("sender peak RSS", mib(sent["peakRss"])),
            ("listener peak RSS", mib(got["peakRss"])),
            (
                "CPU seconds",
                (
                    f"relay {relayCpu:.1f}, sender {sent['cpu']:.1f}, listener {got['cpu']:.1f}"
                    f"  (of {seconds:.1f} s wall, {result['machine']['nproc']} CPUs)"
                ),
            ),
            ("SHA-256", got["sha256"] + ("  (matches sender)" if got["sha256"] == sent["sha256"] else "  (DIFFERS)")),
        ]
        width = max(len(name) for name, _ in rows)
        print()
        for name, value in rows:
            print(f"{name:<{width}}  {value}")
        print(f"ratio growth/baseline = {ratio:.3f}")
        print(f"  (baseline = budget of {BUDGET_BYTES // MiB} MiB relay RSS growth; < 1.0 means within budget: "
              f"{'WITHIN BUDGET' if ratio < 1.0 else 'OVER BUDGET'})")
        if problems:
            print("DATA CHECK FAILED:")
            for p in problems:
                print("  " + p)
            status = EXIT_DATA
        elif ratio >= 1.0 and args.enforce_budget:
            status = EXIT_BUDGET
        else:
            status = EXIT_OK
            print("data check: OK (same byte count, SHA-256 and message count on both ends)")
    except (Exception, KeyboardInterrupt, SystemExit) as e:  # noqa: BLE001 - reported, and the children still killed
        status = common.failureStatus(result, e, args.timeout)
    finally:
        children.stopAll()
        if relay is not None:
            relay.stop()  # its data directory
        result["exitStatus"] = status
        common.dumpResult(args.json or os.path.join(OUT_DIR, "backpressure.json"), result)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bytes", type=int, default=1024 * MiB, help="bytes to send (default: 1 GiB)")
    parser.add_argument("--rate", type=float, default=20.0, help="the listener's drain rate in MB/s (10^6 bytes; default: 20)")
    parser.add_argument("--timeout", type=float, default=600.0, help="overall deadline in seconds (default: 600)")
    parser.add_argument("--json", default=None, help="where to write the results (default: bench/out/backpressure.json)")
    parser.add_argument("--python", default=None, help="the Python with twisted and autobahn (default: .venv/bin/python)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the payload bytes")
    parser.add_argument("--enforce-budget", action="store_true", help="exit 3 when the relay grows by 8 MiB or more")
    # Internal: the child roles.
    parser.add_argument("--role", choices=["orchestrator", "listener", "sender"], default="orchestrator", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bytes <= 0 or args.rate <= 0 or args.timeout <= 0:
        parser.error("--bytes, --rate and --timeout must be positive")
    if args.role == "listener":
        runListener(args)
        return 0
    if args.role == "sender":
        runSender(args)
        return 0
    common.installSignalHandlers()
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())

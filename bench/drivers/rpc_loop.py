"""
The closed-loop caller that ``bench/rpc.py`` runs against both targets, so
that relaynet and crossbar are timed by the very same code.

A caller process connects C{count} callers (each an object whose C{call()}
sends one request and returns a L{Deferred} firing with the response
payload), emits C{ready}, and waits for C{GO} on stdin.  Then each caller
keeps exactly one request in flight: the next one is sent from the
callback of the previous one.  After C{warmup} seconds the process emits
C{measuring} and starts recording; after C{seconds} more it emits C{done}
with the number of completed calls, their latencies (p50, p99, mean) and
its own CPU seconds in the window, and exits.

Latency is the time from C{call()} to its callback, measured with
C{time.perf_counter}.  Every response payload is compared with the request's;
a mismatch or a failed call is counted, and any of them fails the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import common
from common import emit, fail, onStdinLine, ownCpu, watchdog


class _Loop:
    """
    One caller's loop: one request in flight at a time.
    """

    def __init__(self, run: _Run, caller: Any) -> None:
        self.run = run
        self.caller = caller

    def next(self) -> None:
        run = self.run
        if run.stopped:
            return
        started = time.perf_counter()
        d = self.caller.call()
        d.addCallbacks(self.answered, self.failed, callbackArgs=(started,))

    def answered(self, payload: Any, started: float) -> None:
        run = self.run
        if run.recording:
            run.latencies.append(time.perf_counter() - started)
            if payload != run.payload:
                run.wrong += 1
        self.next()

    def failed(self, failure: Any) -> None:
        self.run.failures += 1
        fail(f"a call failed: {failure.getErrorMessage()}")


class _Run:
    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.stopped = False
        self.recording = False
        self.latencies: list[float] = []
        self.wrong = 0
        self.failures = 0


def runCallers(
    reactor: Any,
    connectOne: Callable[[], Any],
    count: int,
    payload: bytes,
    warmup: float,
    seconds: float,
    deadline: float,
) -> None:
    """
    Connect C{count} callers with C{connectOne()} (a L{Deferred} firing with
    a caller), then run the loops on C{GO}; runs the reactor.
    """
    from twisted.internet.defer import gatherResults

    run = _Run(payload)
    callers: list[Any] = []

    def connected(result: list[Any]) -> None:
        callers.extend(result)
        emit(event="ready", callers=len(callers))

    def go() -> None:
        loops = [_Loop(run, caller) for caller in callers]
        for loop in loops:
            loop.next()
        reactor.callLater(warmup, startRecording)

    def startRecording() -> None:
        run.recording = True
        run.t0 = time.perf_counter()
        run.cpu0 = ownCpu()
        emit(event="measuring")
        reactor.callLater(seconds, stop)

    def stop() -> None:
        run.recording = False
        run.stopped = True
        elapsed = time.perf_counter() - run.t0
        cpu = ownCpu() - run.cpu0
        latencies = sorted(run.latencies)
        if not latencies:
            fail("no call completed in the measuring window")
        emit(
            event="done",
            calls=len(latencies),
            seconds=elapsed,
            callsPerSecond=len(latencies) / elapsed,
            p50=common.percentile(latencies, 50),
            p99=common.percentile(latencies, 99),
            mean=sum(latencies) / len(latencies),
            wrong=run.wrong,
            failures=run.failures,
            cpu=cpu,
        )
        # Let the last line go out; the orchestrator ends the process too.
        reactor.callLater(0.1, reactor.stop)

    def command(line: str) -> None:
        if line == "GO" and callers:
            go()

    watchdog(reactor, deadline)
    onStdinLine(command)
    d = gatherResults([connectOne() for _ in range(count)], consumeErrors=True)
    d.addCallbacks(connected, lambda f: fail(f"connecting the callers failed: {f.getErrorMessage()}"))
    reactor.run()

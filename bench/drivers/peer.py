"""
One end of the stream workloads: ``--role sender`` or ``--role receiver``.

Run by ``bench/streams.py``, never by hand: the configuration comes as JSON
in ``--config``, progress and results go to stdout as JSON lines, and the
sender starts its measured phase when it reads ``GO`` on stdin.

Workloads (``--workload``):

``throughput``
    The sender opens C{streams} streams, then each (one thread per stream)
    writes C{bytes} bytes in 1 MiB writes (on WebSocket: 16 binary frames of
    64 KiB, pre-built) until done or C{seconds} pass, and ends its direction
    (TCP half-close, or a close frame).  The receiver drains each stream
    into a 1 MiB buffer with C{recv_into} and counts (WebSocket: parses the
    frame headers, never copies payloads) until the end.
``rpc``
    The sender opens C{streams} streams and keeps one 64-byte request
    outstanding on each (one thread, C{selectors}); the receiver echoes
    every byte (WebSocket: every frame) back.  Latency is measured per
    request from the send to the complete reply.
``setup``
    C{concurrency} sender threads each loop: connect, wait until the
    target has paired the stream (the relay's ``101``, transit's ``ok``),
    send 1 byte, wait for its echo (the measured latency ends here), then
    close the stream cleanly.  The receiver handles every stream in a
    thread of its own.

Every blocking call has a timeout, every loop a bound, and the process exits
C{lifetime} seconds after it started, or when its parent dies.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import selectors
import socket
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from drivers.wire import (  # noqa: E402
    OP_BINARY,
    OP_CLOSE,
    RECEIVER_SIDE,
    ControlChannel,
    HandshakeError,
    Stream,
    connectTcp,
    frameHeader,
    openSender,
    transitHandshake,
    transitToken,
)

CHUNK = 1024 * 1024
FRAME = 64 * 1024
RPC_SIZE = 64
_emitLock = threading.Lock()


def emit(**fields: Any) -> None:
    """
    One JSON line for the orchestrator.
    """
    with _emitLock:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()


def fail(message: str) -> None:
    emit(event="error", error=message)
    os._exit(4)


def watchdog(deadline: float) -> None:
    """
    Exit at the deadline or when the orchestrator is gone.
    """
    parent = os.getppid()

    def run() -> None:
        while True:
            time.sleep(0.25)
            if time.monotonic() > deadline:
                sys.stderr.write(f"driver {os.getpid()}: deadline passed\n")
                os._exit(2)
            if os.getppid() != parent:
                os._exit(4)

    threading.Thread(target=run, daemon=True).start()


def cpu() -> float:
    t = os.times()
    return t.user + t.system


def waitGo(deadline: float) -> None:
    """
    Block until the orchestrator writes C{GO}.
    """
    line = sys.stdin.readline()
    if line.strip() != "GO":
        fail(f"expected GO, got {line!r}")


def drainUntilEnd(stream: Stream, timeout: float) -> None:
    """
    After ending our direction: read (and drop) until the peer's end, so the
    stream closes cleanly; a close frame gets its answer.
    """
    reader = stream.reader(keep=False)
    stream.sock.settimeout(timeout)
    try:
        if reader is not None:
            reader.feed(stream.leftover)
            if reader.closed:
                return
        while True:
            data = stream.sock.recv(65536)
            if not data:
                return
            if reader is not None:
                reader.feed(data)
                if reader.closed:
                    return
    except OSError:
        pass


# ---------------------------------------------------------------------------
# Receiving side: where streams come from


class Acceptor:
    """
    Where the receiver's streams come from: a listening socket (C{tcp}), a
    relaynet control channel, or transit connections made ahead with the
    tokens the sender will use.  Each new stream goes to C{onStream}
    (called in a thread that may block on it).
    """

    def __init__(self, config: dict[str, Any], onStream: Any, ahead: int) -> None:
        self.config = config
        self.onStream = onStream
        mode = config["mode"]
        timeout = config["timeout"]
        if mode == "tcp":
            self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.server.bind(("127.0.0.1", config["listenPort"]))
            self.server.listen(1024)
            threading.Thread(target=self._acceptLoop, daemon=True).start()
        elif mode == "transit":
            # Transit has no listener: this side connects first, with the
            # tokens the sender will use in the same order.
            self.nextIndex = 0
            self.indexLock = threading.Lock()
            for _ in range(ahead):
                threading.Thread(target=self._transitLoop, daemon=True).start()
        else:
            self.control = ControlChannel(
                config["port"], config["entity"], config["token"], mode == "relaynet-native", timeout, onStream, fail
            )

    def _acceptLoop(self) -> None:
        while True:
            try:
                sock, _ = self.server.accept()
            except OSError as e:
                fail(f"accept: {e}")
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self.onStream, args=(Stream(sock, ws=False),), daemon=True).start()

    def _transitLoop(self) -> None:
        while True:
            with self.indexLock:
                index = self.nextIndex
                self.nextIndex += 1
            try:
                sock = connectTcp(self.config["port"], self.config["timeout"])
                sock.settimeout(None)  # waits for its sender as long as it takes
                rest = transitHandshake(sock, transitToken(self.config["seed"], index), RECEIVER_SIDE)
            except (OSError, HandshakeError) as e:
                fail(f"transit: {e}")
                return
            self.onStream(Stream(sock, ws=False, leftover=rest))


def takeStreams(config: dict[str, Any], count: int, deadline: float) -> list[Stream]:
    """
    Wait for C{count} streams (throughput and rpc).
    """
    arrived: queue.Queue[Stream] = queue.Queue()
    # Transit: connect exactly the streams the sender will open, no more.
    Acceptor(config, arrived.put, ahead=count)
    emit(event="ready")
    streams = []
    for _ in range(count):
        remaining = deadline - time.monotonic()
        try:
            streams.append(arrived.get(timeout=max(0.01, remaining)))
        except queue.Empty:
            fail(f"only {len(streams)} of {count} streams arrived before the deadline")
    emit(event="accepted", streams=count)
    return streams


def receiveThroughput(config: dict[str, Any], deadline: float) -> None:
    streams = takeStreams(config, config["streams"], deadline)
    results: list[dict[str, Any]] = [{} for _ in streams]

    def drain(i: int, stream: Stream) -> None:
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        reader = stream.reader(keep=False)
        sock = stream.sock
        sock.settimeout(max(1.0, deadline - time.monotonic()))
        count = 0
        if reader is not None:
            reader.feed(stream.leftover)
        else:
            count = len(stream.leftover)
        try:
            while True:
                n = sock.recv_into(buffer)
                if not n:
                    break
                if reader is None:
                    count += n
                else:
                    reader.feed(view[:n])
                    if reader.closed:
                        break
        except OSError as e:
            results[i] = {"error": str(e)}
            return
        end = time.monotonic()
        if reader is not None:
            count = reader.dataBytes
            stream.finish()  # the close frame's answer
        else:
            stream.finish()  # our half-close (transit has closed already)
        stream.close()
        results[i] = {"bytes": count, "end": end}

    threads = [threading.Thread(target=drain, args=(i, s), daemon=True) for i, s in enumerate(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.01, deadline - time.monotonic()))
    errors = [r.get("error", "unfinished") for r in results if "bytes" not in r]
    if errors:
        fail(f"receiver: {errors[0]}")
    emit(event="done", bytes=[r["bytes"] for r in results], end=max(r["end"] for r in results), cpu=cpu())


def receiveRpc(config: dict[str, Any], deadline: float) -> None:
    """
    Echo everything back, for all streams, in one C{selectors} loop.
    """
    streams = takeStreams(config, config["streams"], deadline)
    selector = selectors.DefaultSelector()
    readers = {}
    for stream in streams:
        stream.sock.setblocking(False)
        readers[stream.sock] = (stream, stream.reader(keep=True))
        selector.register(stream.sock, selectors.EVENT_READ)
    echoed = 0

    def echo(stream: Stream, reader: Any, data: bytes) -> bool:
        """
        Echo C{data}; return C{True} at the stream's end.
        """
        nonlocal echoed
        if reader is None:
            if not data:
                stream.finish()
                return True
            sendAll(stream.sock, data)
            echoed += len(data)
            return False
        if not data:
            return True
        out = []
        for opcode, payload in reader.feed(data):
            if opcode == OP_CLOSE:
                out.append(frameHeader(OP_CLOSE, len(payload)) + payload)
            else:
                out.append(frameHeader(OP_BINARY, len(payload)) + payload)
                echoed += len(payload)
        if out:
            sendAll(stream.sock, b"".join(out))
        return reader.closed

    for stream, reader in list(readers.values()):
        if stream.leftover and echo(stream, reader, stream.leftover):
            selector.unregister(stream.sock)
    open_ = len(selector.get_map())
    while open_ and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.5):
            stream, reader = readers[key.fileobj]
            try:
                data = stream.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if echo(stream, reader, data):
                selector.unregister(stream.sock)
                stream.close()
                open_ -= 1
    emit(event="done", echoedBytes=echoed, cpu=cpu())


def sendAll(sock: socket.socket, data: bytes) -> None:
    """
    C{sendall} on a non-blocking socket (the echoes are tiny: a full send
    buffer is unexpected, so a short poll is good enough).
    """
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            time.sleep(0.0001)
            continue
        view = view[sent:]


def receiveSetup(config: dict[str, Any], deadline: float) -> None:
    """
    Echo the first message of every stream, then wait for its end.
    """
    def handle(stream: Stream) -> None:
        reader = stream.reader(keep=True)
        sock = stream.sock
        sock.settimeout(max(1.0, deadline - time.monotonic()))
        data = stream.leftover
        try:
            # The first message: 1 byte (raw) or one frame (WebSocket).
            while True:
                if reader is None:
                    if data:
                        sock.sendall(data)
                        break
                else:
                    frames = reader.feed(data)
                    if frames:
                        sock.sendall(b"".join(frameHeader(OP_BINARY, len(p)) + p for _, p in frames))
                        break
                data = sock.recv(65536)
                if not data:
                    raise HandshakeError("closed before the first message")
            while not (reader is not None and reader.closed):
                data = sock.recv(65536)
                if not data:
                    break
                if reader is not None:
                    reader.feed(data)
            stream.finish()
        except (OSError, HandshakeError) as e:
            sys.stderr.write(f"receiver: {e}\n")
        finally:
            stream.close()

    Acceptor(config, handle, ahead=config["concurrency"] + 2)
    emit(event="ready")
    while time.monotonic() < deadline:
        time.sleep(1.0)


# ---------------------------------------------------------------------------
# Sending side


def openStreams(config: dict[str, Any], count: int) -> list[Stream]:
    streams = []
    for i in range(count):
        try:
            streams.append(openSender(config, i, config["timeout"]))
        except (OSError, HandshakeError) as e:
            fail(f"stream {i}: {e}")
    return streams


def sendThroughput(config: dict[str, Any], deadline: float) -> None:
    streams = openStreams(config, config["streams"])
    emit(event="connected")
    perStream = config["bytes"] // len(streams)
    if streams[0].ws:
        header = frameHeader(OP_BINARY, FRAME)
        payload = b"\x5a" * FRAME
        chunk = (header + payload) * (CHUNK // FRAME)
        payloadPerChunk = CHUNK
    else:
        chunk = b"\x5a" * CHUNK
        payloadPerChunk = CHUNK
    sent = [0] * len(streams)
    errors: list[str] = []
    waitGo(deadline)
    start = time.monotonic()
    stop = min(start + config["seconds"], deadline - 5)

    def push(i: int, stream: Stream) -> None:
        sock = stream.sock
        sock.settimeout(max(1.0, deadline - time.monotonic()))
        try:
            while sent[i] < perStream and time.monotonic() < stop:
                sock.sendall(chunk)
                sent[i] += payloadPerChunk
            stream.finish()
            drainUntilEnd(stream, max(1.0, deadline - time.monotonic()))
        except OSError as e:
            errors.append(f"stream {i}: {e}")
        finally:
            stream.close()

    threads = [threading.Thread(target=push, args=(i, s), daemon=True) for i, s in enumerate(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.01, deadline - time.monotonic()))
    if errors:
        fail(errors[0])
    emit(event="done", start=start, bytes=sent, cpu=cpu())


def sendRpc(config: dict[str, Any], deadline: float) -> None:
    streams = openStreams(config, config["streams"])
    emit(event="connected")
    request = b"\x33" * RPC_SIZE
    selector = selectors.DefaultSelector()
    state = {}
    for stream in streams:
        stream.sock.setblocking(False)
        if stream.leftover:
            fail("data before the first request")
        state[stream.sock] = {"stream": stream, "reader": stream.reader(keep=True), "got": 0, "sent": 0.0,
                              "wire": stream.frame(request)}
        selector.register(stream.sock, selectors.EVENT_READ)
    latencies: list[float] = []
    waitGo(deadline)
    start = time.monotonic()
    stop = min(start + config["seconds"], deadline - 5)
    limit = config["count"]
    for s in state.values():
        s["sent"] = time.monotonic()
        sendAll(s["stream"].sock, s["wire"])
    outstanding = len(state)
    while outstanding and time.monotonic() < deadline - 2:
        for key, _ in selector.select(timeout=0.5):
            s = state[key.fileobj]
            try:
                data = key.fileobj.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                fail("a stream ended during the round trips")
            reader = s["reader"]
            if reader is None:
                s["got"] += len(data)
                replies = s["got"] // RPC_SIZE
                s["got"] -= replies * RPC_SIZE
            else:
                replies = sum(1 for opcode, _ in reader.feed(data) if opcode != OP_CLOSE)
            for _ in range(replies):
                now = time.monotonic()
                latencies.append(now - s["sent"])
                if now < stop and len(latencies) < limit:
                    s["sent"] = now
                    sendAll(key.fileobj, s["wire"])
                else:
                    outstanding -= 1
    elapsed = time.monotonic() - start
    for stream in streams:
        stream.sock.setblocking(True)
        stream.finish()
        drainUntilEnd(stream, 5.0)
        stream.close()
    latencies.sort()
    emit(event="done", roundTrips=len(latencies), seconds=elapsed, latencies=summarise(latencies), cpu=cpu())


def summarise(latencies: list[float]) -> dict[str, float]:
    """
    p50, p99 and max of sorted latencies, in microseconds (nearest rank).
    """
    import math

    def pick(p: float) -> float:
        return latencies[max(0, math.ceil(p / 100 * len(latencies)) - 1)] * 1e6

    return {"p50": pick(50), "p99": pick(99), "max": latencies[-1] * 1e6} if latencies else {}


def sendSetup(config: dict[str, Any], deadline: float) -> None:
    concurrency = config["concurrency"]
    limit = config["count"]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = [0]
    emit(event="connected")
    waitGo(deadline)
    start = time.monotonic()
    stop = min(start + config["seconds"], deadline - 5)

    def loop() -> None:
        while time.monotonic() < stop and not errors:
            with lock:
                index = counter[0]
                if index >= limit:
                    return
                counter[0] += 1
            began = time.monotonic()
            try:
                stream = openSender(config, index, config["timeout"])
            except (OSError, HandshakeError) as e:
                errors.append(f"connection {index}: {e}")
                return
            try:
                stream.sendRaw(stream.frame(b"!"))
                reader = stream.reader(keep=True)
                data = stream.leftover
                while True:
                    if reader is None and data:
                        break
                    if reader is not None and any(op != OP_CLOSE for op, _ in reader.feed(data)):
                        break
                    data = stream.sock.recv(65536)
                    if not data:
                        raise HandshakeError("closed before the echo")
                took = time.monotonic() - began
                stream.finish()
                drainUntilEnd(stream, 5.0)
            except (OSError, HandshakeError) as e:
                errors.append(f"connection {index}: {e}")
                return
            finally:
                stream.close()
            with lock:
                latencies.append(took)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.01, deadline - time.monotonic()))
    elapsed = time.monotonic() - start
    if errors:
        fail(errors[0])
    latencies.sort()
    emit(event="done", connections=len(latencies), seconds=elapsed, latencies=summarise(latencies), cpu=cpu())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["sender", "receiver"], required=True)
    parser.add_argument("--workload", choices=["throughput", "rpc", "setup"], required=True)
    parser.add_argument("--config", required=True, help="JSON: mode, port(s), token, entity, seed, sizes, timeout (per connect), lifetime")
    args = parser.parse_args()
    config = json.loads(args.config)
    deadline = time.monotonic() + config["lifetime"]
    watchdog(deadline)
    run = {
        ("sender", "throughput"): sendThroughput,
        ("sender", "rpc"): sendRpc,
        ("sender", "setup"): sendSetup,
        ("receiver", "throughput"): receiveThroughput,
        ("receiver", "rpc"): receiveRpc,
        ("receiver", "setup"): receiveSetup,
    }[(args.role, args.workload)]
    run(config, deadline)


if __name__ == "__main__":
    main()

"""
The relay's own Python per relayed HTTP call, in one process, without
sockets: what to measure a change to the HTTP path with, when the
two-core machine's noise (10-20% between runs of ``rpc.py``) hides it.

Each call: the sender's keep-alive connection sends a 64-byte POST, the
relay sends the listener its ``request`` command, the listener's
``response`` and body come back on the control channel, and the sender's
connection gets the answer.  The relay's transports are in-memory
(L{relaynet.test.support.FakeTcp}); only the relay's own calls are timed
(CPU time), not the test peers that make and read the frames.

The baseline is twisted.web serving the same POST from a static resource
on the same kind of transport: the ratio says how many plain twisted.web
requests one relayed call costs (two messages in, two out).

    .venv/bin/python bench/httppath.py            # 20,000 calls, best of 5
    .venv/bin/python bench/httppath.py --calls 5000 --rounds 3

Exit status: 0, or 1 if an answer was wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

BODY = b"x" * 64


def relayed(calls: int) -> float:
    """
    CPU seconds of the relay's calls for C{calls} relayed requests.
    """
    from relaynet.test.support import parseFrames
    from relaynet.test.test_request import HttpHarness, httpRequest
    from relaynet.test.test_websocket import clientFrame

    h = HttpHarness()
    listener = h.listen()
    sender = h.sender()
    request = httpRequest(
        "POST", "/hyco", headers=[("Content-Type", "application/octet-stream"), ("Content-Length", "64")], body=BODY
    )
    listenerOut, senderOut = listener.transport, sender.transport
    listenerOut.clear()
    senderOut.clear()
    answer = json.dumps({"response": {"statusCode": 200, "responseHeaders": {"Content-Type": "text/plain"}, "body": True}})
    clock = time.process_time
    timed = 0.0
    for _ in range(calls):
        start = clock()
        sender.channel.dataReceived(request)
        timed += clock() - start
        _, _, command = parseFrames(listenerOut.value())[0]
        listenerOut.clear()
        requestId = json.loads(command)["request"]["id"]
        frames = clientFrame(0x1, answer.replace('{"statusCode"', f'{{"requestId":"{requestId}","statusCode"', 1).encode())
        frames += clientFrame(0x2, BODY)
        start = clock()
        listener.proto.dataReceived(frames)
        timed += clock() - start
        if not senderOut.value().endswith(b"\r\n\r\n" + BODY):
            raise AssertionError(f"a wrong answer: {senderOut.value()!r}")
        senderOut.clear()
    return timed


def served(calls: int) -> float:
    """
    CPU seconds of twisted.web's calls for C{calls} requests to a static
    resource.
    """
    from twisted.internet.testing import MemoryReactorClock
    from twisted.web.resource import Resource
    from twisted.web.server import Site
    from twisted.web.static import Data

    from relaynet.test.support import FakeTcp

    root = Resource()
    root.putChild(b"hyco", Data(BODY, "text/plain"))
    # (Data answers GET; POST goes to render_GET through render_POST.)
    root.children[b"hyco"].render_POST = root.children[b"hyco"].render_GET  # type: ignore[attr-defined]
    clock = MemoryReactorClock()
    site = Site(root, reactor=clock)
    transport = FakeTcp(clock, ("127.0.0.1", 40000))
    channel = site.buildProtocol(transport.getPeer())
    transport.protocol = channel
    channel.makeConnection(transport)
    request = (
        b"POST /hyco HTTP/1.1\r\nHost: relay.test\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: 64\r\n\r\n" + BODY
    )
    cpu = time.process_time
    timed = 0.0
    for _ in range(calls):
        start = cpu()
        channel.dataReceived(request)
        timed += cpu() - start
        if not transport.value().endswith(BODY):
            raise AssertionError(f"a wrong answer: {transport.value()!r}")
        transport.clear()
    return timed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000, help="calls per round (default: 20000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the best is reported (default: 5)")
    args = parser.parse_args(argv)
    try:
        relay = min(relayed(args.calls) for _ in range(args.rounds)) / args.calls
        web = min(served(args.calls) for _ in range(args.rounds)) / args.calls
    except AssertionError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"relayed HTTP call, relay's Python:  {1e6 * relay:7.1f} us")
    print(f"twisted.web static resource:        {1e6 * web:7.1f} us")
    print(f"ratio relayed / twisted.web:        {relay / web:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

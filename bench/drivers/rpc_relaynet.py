"""
relaynet's side of ``bench/rpc.py``: two roles, each run as its own process.

``--role listener``
    A L{relaynet.listener.HybridListener} on the entity C{bench} whose
    handler answers every request with 200 and the request's own body
    (an echo).  Small requests and responses travel on the listener's
    control channel, the relay's fast path.

``--role caller``
    C{--count} keep-alive HTTP/1.1 connections to
    C{http://127.0.0.1:PORT/bench}, each POSTing C{--size} bytes with a SAS
    token in the C{ServiceBusAuthorization} header, one request in flight
    per connection, timed by L{rpc_loop.runCallers}.  The client is a small
    protocol written for the benchmark (the request's bytes are built once;
    the response is split by C{Content-Length}) rather than
    C{twisted.web.client.Agent}, which costs several times more CPU per
    request and would make the caller, not the relay, the limit.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # common
sys.path.insert(0, HERE)  # rpc_loop

import common
from common import emit, fail, watchdog


def runListener(args: argparse.Namespace) -> None:
    from twisted.internet import reactor

    from relaynet.listener import HybridListener, RelayedHttpRequest, readBody
    from relaynet.tokens import fromKey

    class Echo:
        """
        Answers each request with its own body.
        """

        def handleRequest(self, request: RelayedHttpRequest) -> None:
            readBody(request).addCallbacks(
                lambda body: self.answer(request, body),
                lambda f: request.abort(),
            )

        def answer(self, request: RelayedHttpRequest, body: bytes) -> None:
            request.respond(200, None, [("Content-Type", "application/octet-stream")])
            request.write(body)
            request.finish()

    listener = HybridListener(
        reactor,
        f"ws://127.0.0.1:{args.port}",
        common.ENTITY,
        fromKey(common.KEY_NAME, args.key, reactor),
        Echo(),
        reconnect=False,
    )
    listener.listen().addCallbacks(
        lambda _: emit(event="listening"),
        lambda f: fail(f"the listener could not listen: {f.getErrorMessage()}"),
    )
    watchdog(reactor, args.deadline)
    reactor.run()


def runCaller(args: argparse.Namespace) -> None:
    from rpc_loop import runCallers
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.internet.protocol import Factory, Protocol

    payload = os.urandom(args.size)
    token = common.sasToken(args.port, args.key)
    request = (
        f"POST /{common.ENTITY} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{args.port}\r\n"
        f"ServiceBusAuthorization: {token}\r\n"
        "Content-Type: application/octet-stream\r\n"
        f"Content-Length: {len(payload)}\r\n"
        "\r\n"
    ).encode("latin-1") + payload

    class HttpCaller(Protocol):
        """
        One keep-alive connection; C{call()} sends the request and fires
        with the response body once all of it (by C{Content-Length}) is in.
        """

        def connectionMade(self) -> None:
            self.buffer = b""
            self.waiting: Deferred[bytes] | None = None

        def call(self) -> Deferred[bytes]:
            self.waiting = Deferred()
            assert self.transport is not None
            self.transport.write(request)
            return self.waiting

        def dataReceived(self, data: bytes) -> None:
            self.buffer += data
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1")
            lines = head.split("\r\n")
            status = lines[0].split(" ", 2)
            length = None
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "connection" and value.strip().lower() == "close":
                    fail("the relay closes the connection after each response (no keep-alive)")
                elif name == "transfer-encoding":
                    fail(f"unexpected Transfer-Encoding: {value.strip()}")
            if length is None:
                fail(f"a response without Content-Length: {head!r}")
            assert length is not None
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            if status[1] != "200":
                fail(f"the relay answered {head.splitlines()[0]!r}: {body[:300]!r}")
            waiting, self.waiting = self.waiting, None
            if waiting is None:
                fail("a response nobody asked for")
            assert waiting is not None
            waiting.callback(body)

        def connectionLost(self, reason: Any = None) -> None:
            if self.waiting is not None:
                fail(f"the connection to the relay was lost: {reason.getErrorMessage() if reason else ''}")

    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", args.port, timeout=30)

    def connectOne() -> Deferred[Any]:
        return endpoint.connect(Factory.forProtocol(HttpCaller))

    runCallers(reactor, connectOne, args.count, payload, args.warmup, args.seconds, args.deadline)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["listener", "caller"], required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--deadline", type=float, default=time.time() + 600, help="wall clock time to give up at")
    parser.add_argument("--count", type=int, default=1, help="callers: connections, one request in flight each")
    parser.add_argument("--size", type=int, default=64, help="callers: request (and response) body bytes")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    if args.role == "listener":
        runListener(args)
    else:
        runCaller(args)


if __name__ == "__main__":
    main()

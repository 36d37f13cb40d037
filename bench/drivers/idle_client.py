"""
Client side of the idle-scale benchmark (``bench/idle.py``): one process
that opens many idle connections to a relay and holds them.

The orchestrator starts it with a ``--mode`` and raises its number of open
connections step by step: it writes ``TARGET n`` lines on the driver's
stdin, and the driver answers with a JSON line on stdout
(``{"event": "ready", "count": n, ...}``) once ``n`` connections are open.
Nothing is sent on an open connection; the driver only answers the relay's
WebSocket pings (autobahn does that), so the relay holds idle connections.

Modes:

* ``listeners``: ``n`` control channels (``sb-hc-action=listen``) on
  ``--entity``.
* ``relayed``: one control channel on ``--entity``, then ``n`` senders
  (``sb-hc-action=connect``); the control channel takes each ``accept``
  command and opens the rendezvous.  A connection counts once the sender's
  upgrade is answered, which the relay does only after the listener's
  rendezvous is open and the two are spliced.  ``--transport ws`` uses
  WebSocket upgrades; ``--transport native`` asks for ``Upgrade:
  relaynet-stream`` on both legs (the relay's raw fast path) and reports
  ``unsupported`` if the relay does not answer 101.
* ``transit-waiting``: ``n`` TCP connections to a magic-wormhole transit
  relay, each asking to be relayed with its own token, so each waits for a
  partner that never comes.
* ``transit-pairs``: ``n`` pairs of TCP connections with the same token and
  different sides; a pair counts once both got the relay's ``ok``.

At most ``--window`` handshakes are in flight at once, so the relay's
listen backlog never overflows.  The driver exits at ``--deadline`` (a Unix
time) or when the orchestrator goes away.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import secrets
import sys
import time
from typing import Any, Callable
from urllib.parse import quote, urlsplit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # common

import common
from common import emit, onStdinLine, watchdog


def fail(message: str) -> None:
    """
    L{common.fail}, saying so on stderr too.
    """
    sys.stderr.write(f"idle_client {os.getpid()}: {message}\n")
    common.fail(message)


class Opener:
    """
    Opens connections one after the other, at most C{window} in flight,
    until C{target} are open; reports C{ready} when they are.

    @param start: called with a callback to open one connection; the
        connection calls it once when it is open.
    """

    def __init__(self, reactor: Any, window: int, start: Callable[[Callable[[], None]], None]) -> None:
        self._reactor = reactor
        self._window = window
        self._start = start
        self.target = 0
        self.opened = 0
        self.inFlight = 0
        self.lost = 0
        self._t0 = time.monotonic()
        self._reported = 0

    def raiseTo(self, target: int) -> None:
        self.target = target
        self._t0 = time.monotonic()
        self._fill()

    def _fill(self) -> None:
        while self.opened + self.inFlight < self.target and self.inFlight < self._window:
            self.inFlight += 1
            self._start(self._opened)
        if self.opened >= self.target and not self.inFlight and self._reported != self.target:
            self._reported = self.target
            emit(event="ready", count=self.opened, lost=self.lost, seconds=time.monotonic() - self._t0)

    def _opened(self) -> None:
        self.inFlight -= 1
        self.opened += 1
        # Not from inside the protocol callback that reported it.
        self._reactor.callLater(0, self._fill)

    def connectionLost(self, wasOpen: bool) -> None:
        """
        An open connection went: idle connections are not supposed to.
        """
        if wasOpen:
            self.lost += 1
            fail(f"an idle connection was closed ({self.lost} so far)")


def relayUrl(args: argparse.Namespace, action: str) -> str:
    host = f"127.0.0.1:{args.port}"
    token = common.sasToken(args.port, args.key, args.entity)
    return f"ws://{host}/$hc/{args.entity}?sb-hc-action={action}&sb-hc-token={quote(token, safe='')}"


def wsFactory(url: str) -> Any:
    from autobahn.twisted.websocket import WebSocketClientFactory

    factory = WebSocketClientFactory(url)
    factory.setProtocolOptions(perMessageCompressionOffers=[], openHandshakeTimeout=60, closeHandshakeTimeout=10)
    return factory


def tcpConnect(reactor: Any, port: int, factory: Any) -> None:
    from twisted.internet.endpoints import TCP4ClientEndpoint

    def refused(failure: Any) -> None:
        fail(f"cannot connect: {failure.getErrorMessage()}")

    TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=60).connect(factory).addErrback(refused)


def rawUpgrade(reactor: Any, port: int, target: str, opened: Callable[[], None], opener: Opener) -> None:
    """
    Open one connection with C{GET target} and C{Upgrade: relaynet-stream}
    (the relay's raw fast path), and hold it once answered with 101.
    """
    from twisted.internet.protocol import Factory, Protocol

    class RawStream(Protocol):
        head = b""
        open = False

        def connectionMade(self) -> None:
            self.transport.write(
                f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                "Upgrade: relaynet-stream\r\nConnection: Upgrade\r\n\r\n".encode("latin-1")
            )

        def dataReceived(self, data: bytes) -> None:
            if self.open:
                return  # idle: nothing is expected, and nothing is kept
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            status = self.head.split(b"\r\n", 1)[0]
            if not status.startswith(b"HTTP/1.1 101"):
                emit(event="unsupported", status=status.decode("latin-1"))
                os._exit(0)
            self.open = True
            self.head = b""
            opened()

        def connectionLost(self, reason: Any = None) -> None:
            opener.connectionLost(self.open)

    tcpConnect(reactor, port, Factory.forProtocol(RawStream))


def runRelaynet(args: argparse.Namespace, reactor: Any) -> Opener:
    from autobahn.twisted.websocket import WebSocketClientProtocol

    class Held(WebSocketClientProtocol):
        """
        An idle WebSocket: tells C{whenOpen} it is open, then only answers
        pings.
        """

        whenOpen: Callable[[], None] = staticmethod(lambda: None)
        isOpen = False

        def onOpen(self) -> None:
            self.isOpen = True
            self.whenOpen()

        def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
            if not self.isOpen:
                fail(f"handshake refused: {code} {reason}")
            opener.connectionLost(True)

    class Control(Held):
        """
        A listener's control channel; in C{relayed} mode it accepts every
        sender at the rendezvous.
        """

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            command = json.loads(payload)
            if "accept" not in command:
                return
            address = command["accept"]["address"]
            if args.transport == "native":
                parts = urlsplit(address)
                rawUpgrade(reactor, args.port, f"{parts.path}?{parts.query}", lambda: None, opener)
            else:
                wsConnect(wsFactory(address), Held, lambda: None)

    def wsConnect(factory: Any, protocolClass: type, whenOpen: Callable[[], None]) -> None:
        proto = protocolClass()
        proto.whenOpen = whenOpen
        proto.factory = factory
        tcpConnect(reactor, args.port, _OneProtocol(proto))

    listenFactory = wsFactory(relayUrl(args, "listen"))
    connectUrl = relayUrl(args, "connect")
    senderFactory = wsFactory(connectUrl)

    def startListener(opened: Callable[[], None]) -> None:
        wsConnect(listenFactory, Control, opened)

    def startSender(opened: Callable[[], None]) -> None:
        if args.transport == "native":
            rawUpgrade(reactor, args.port, connectUrl.split(f":{args.port}", 1)[1], opened, opener)
        else:
            wsConnect(senderFactory, Held, opened)

    if args.mode == "listeners":
        opener = Opener(reactor, args.window, startListener)
        emit(event="listening")
    else:
        # One listener takes every sender of this process.
        opener = Opener(reactor, args.window, startSender)
        wsConnect(listenFactory, Control, lambda: emit(event="listening"))
    return opener


class _OneProtocol:
    """
    A client factory for one protocol made beforehand: autobahn's protocols
    need their (shared) WebSocket factory as C{factory}, and each of ours
    carries its own C{whenOpen}.
    """

    def __init__(self, proto: Any) -> None:
        self._proto = proto

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass

    def buildProtocol(self, addr: Any) -> Any:
        return self._proto


def runTransit(args: argparse.Namespace, reactor: Any) -> Opener:
    from twisted.internet.protocol import Factory, Protocol

    class Side(Protocol):
        """
        One end asking the transit relay to be joined with its partner
        (the one with the same token); C{alone} ends have none.
        """

        def __init__(self, token: str, alone: bool, opened: Callable[[], None]) -> None:
            self.token, self.alone, self.opened = token, alone, opened
            self.open = False
            self.head = b""

        def connectionMade(self) -> None:
            self.transport.write(f"please relay {self.token} for side {secrets.token_hex(8)}\n".encode("ascii"))
            if self.alone:
                # Waiting: nothing will come until a partner does.
                self.open = True
                self.opened()

        def dataReceived(self, data: bytes) -> None:
            if self.open:
                return
            self.head += data
            if self.head.startswith(b"ok\n"):
                self.open = True
                self.head = b""
                self.opened()
            elif b"\n" in self.head:
                fail(f"transit relay answered {self.head!r}")

        def connectionLost(self, reason: Any = None) -> None:
            opener.connectionLost(self.open)

    def start(opened: Callable[[], None]) -> None:
        token = secrets.token_hex(32)
        if args.mode == "transit-waiting":
            tcpConnect(reactor, args.port, Factory.forProtocol(functools.partial(Side, token, True, opened)))
            return
        waiting = [2]

        def sidePaired() -> None:
            waiting[0] -= 1
            if not waiting[0]:
                opened()

        for _ in range(2):
            tcpConnect(reactor, args.port, Factory.forProtocol(functools.partial(Side, token, False, sidePaired)))

    opener = Opener(reactor, args.window, start)
    emit(event="listening")
    return opener


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["listeners", "relayed", "transit-waiting", "transit-pairs"], required=True)
    parser.add_argument("--transport", choices=["ws", "native"], default="ws")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", default="")
    parser.add_argument("--entity", default="idle")
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--deadline", type=float, required=True)
    args = parser.parse_args()

    from twisted.internet import reactor

    opener = runTransit(args, reactor) if args.mode.startswith("transit") else runRelaynet(args, reactor)

    def command(line: str) -> None:
        verb, _, count = line.partition(" ")
        if verb == "TARGET":
            opener.raiseTo(int(count))

    # The orchestrator closing our stdin means we are done.
    onStdinLine(command, onClose=lambda: os._exit(0))
    watchdog(reactor, args.deadline)
    # Without Twisted's handlers, SIGTERM ends the process at once instead
    # of closing every connection (which would read as lost connections).
    reactor.run(installSignalHandlers=False)


if __name__ == "__main__":
    main()

"""
Helpers for the loopback tests: a relay on 127.0.0.1 with port 0, a
throwaway certificate, and WebSocket clients made with autobahn.

Also what the unit tests that speak WebSocket by hand share: a fake TCP
transport (L{FakeTcp}), a producer and a request handler that note what
they are given (L{RecordingProducer}, L{Recorder}), and frame parsing
(L{parseFrames}, L{reassemble}, L{headerValue}); and, for the interop
tests, the Node harness scripts' runner (L{NodeScript}, L{requireNode},
L{spawnNode}).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
from typing import Any
from urllib.parse import quote

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.task import deferLater
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost, ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from relaynet.auth import mintToken
from relaynet.listener import RelayedHttpRequest
from relaynet.protocols.websocket import ClockTimer
from relaynet.service import RelayService
from relaynet.tap import Options

KEY_NAME = "RootManageSharedAccessKey"
KEY = "c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seS0xMjM0NTY="
_STATUS = re.compile(r"upgrade failed \[(\d{3})\]: (.*)\"\)$")


class FakeTcp(StringTransport):
    """
    A L{StringTransport} that ends like a TCP connection: the protocol hears
    of it on the next turn of the clock.  Like a TCP transport it lets a
    protocol unregister a producer it never registered.

    @ivar aborted: the connection was aborted.
    @cvar closedReason: why the connection ended when it was closed.
    @cvar vanishedReason: why it ended when L{connectionGone} is told none.
    """

    aborted = False
    closedReason = "closed by the relay"
    vanishedReason = "the peer vanished"

    def __init__(self, clock: IReactorTime, peer: tuple[str, int]) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", *peer), lenient=True)
        self.clock = clock
        self.protocol: Any = None
        self._ending = False

    def loseConnection(self) -> None:
        self._end(ConnectionDone(self.closedReason))

    def abortConnection(self) -> None:
        self.aborted = True
        self._end(ConnectionAborted())

    def _end(self, reason: Exception) -> None:
        self.disconnecting = True
        if not self._ending:
            self._ending = True
            self.clock.callLater(0, self.connectionGone, reason)

    def connectionGone(self, reason: Exception | None = None) -> None:
        """
        Tell the protocol the connection is gone (now, if the peer vanished).
        """
        if self.connected:
            self.connected = False
            self.protocol.connectionLost(Failure(reason or ConnectionLost(self.vanishedReason)))

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None


@implementer(IPushProducer)
class RecordingProducer:
    """
    A streaming producer that notes what it is told.
    """

    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


class Recorder:
    """
    A listener's request handler that keeps its requests for the test to
    answer.
    """

    def __init__(self) -> None:
        self.requests: list[RelayedHttpRequest] = []

    def handleRequest(self, request: RelayedHttpRequest) -> None:
        self.requests.append(request)


def unmask(payload: bytes, mask: bytes) -> bytes:
    """
    C{payload} XORed with the 4-byte C{mask} (masking and unmasking alike).
    """
    key = (mask * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(len(payload), "big")


def parseFrames(data: bytes) -> list[tuple[bool, int, bytes]]:
    """
    Split what one end of a WebSocket wrote into (fin, opcode, payload)
    frames, unmasked.
    """
    frames = []
    while data:
        fin, opcode = bool(data[0] & 0x80), data[0] & 0x0F
        masked, length, at = data[1] & 0x80, data[1] & 0x7F, 2
        if length == 126:
            length, at = int.from_bytes(data[2:4], "big"), 4
        elif length == 127:
            length, at = int.from_bytes(data[2:10], "big"), 10
        mask = b""
        if masked:
            mask, at = data[at : at + 4], at + 4
        payload = data[at : at + length]
        frames.append((fin, opcode, unmask(payload, mask) if mask else payload))
        data = data[at + length :]
    return frames


def reassemble(frames: list[tuple[bool, int, bytes]]) -> list[tuple[int, bytes]]:
    """
    The data messages in C{frames}, reassembled: (opcode, payload).  Control
    frames are passed over.
    """
    done: list[tuple[int, bytes]] = []
    current: list[Any] | None = None
    for fin, opcode, payload in frames:
        if opcode >= 8:
            continue
        if current is None:
            current = [opcode, b""]
        current[1] += payload
        if fin:
            done.append((current[0], current[1]))
            current = None
    return done


def headerValue(head: bytes, name: str) -> str | None:
    """
    The header C{name} (any case) in an HTTP message head, or L{None}.
    """
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.decode("latin-1").partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


def makeCertificate(directory: str) -> tuple[str, str]:
    """
    Write a throwaway self-signed certificate for 127.0.0.1 and localhost.

    @return: the paths of the key and the certificate (PEM).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    keyPath, certPath = os.path.join(directory, "key.pem"), os.path.join(directory, "cert.pem")
    with open(keyPath, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    with open(certPath, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return keyPath, certPath


class RelayFixture:
    """
    A running relay for one test.
    """

    def __init__(self, case: TestCase, args: list[str], tls: bool = False) -> None:
        self.tls = tls
        directory = case.mktemp()
        os.makedirs(directory)
        self.certPath = None
        if tls:
            keyPath, self.certPath = makeCertificate(directory)
            listen = f"ssl:0:interface=127.0.0.1:privateKey={keyPath}:certKey={self.certPath}"
        else:
            listen = "tcp:0:interface=127.0.0.1"
        options = Options()
        options.parseOptions(["--listen", listen, "--data-dir", directory, "--rule", f"{KEY_NAME}={KEY}", *args])
        self.service = RelayService.fromOptions(options, reactor)
        self.clients: list[Client] = []
        self.service.startService()
        case.addCleanup(self.stop)
        self.port = self.service.ports[0].getHost().port
        self.host = f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        """
        Drop every client, wait (a little) for the relay to see them go,
        and stop it.
        """
        for client in self.clients:
            if client.transport is not None and not client.closed.called:
                client.transport.abortConnection()
        for _ in range(100):
            if not self.service.websockets.connections and all(c.closed.called or c.transport is None for c in self.clients):
                break
            await deferLater(reactor, 0.01, lambda: None)
        await self.service.stopService()

    @property
    def relay(self) -> Any:
        return self.service.relay

    def url(self, entity: str, action: str | None = "listen", token: str | None = None, query: str = "") -> str:
        scheme = "wss" if self.tls else "ws"
        params = [p for p in [query, action and f"sb-hc-action={action}", token and f"sb-hc-token={quote(token, safe='')}"] if p]
        return f"{scheme}://{self.host}/$hc/{entity}" + ("?" + "&".join(params) if params else "")

    def token(self, entity: str, key: str = KEY, keyName: str = KEY_NAME, ttl: int = 3600) -> str:
        return mintToken(f"http://{self.host}/{entity}", keyName, key, int(reactor.seconds()) + ttl)

    def connect(
        self,
        url: str,
        headers: dict[str, str] | None = None,
        protocols: list[str] | None = None,
        protocolClass: type[Client] | None = None,
    ) -> Client:
        factory = WebSocketClientFactory(url, headers=headers or {}, protocols=protocols or [])
        factory._batched_timer = ClockTimer(reactor)
        client: Client = (protocolClass or Client)()
        factory.protocol = lambda: client
        factory.setProtocolOptions(perMessageCompressionOffers=[], openHandshakeTimeout=10, closeHandshakeTimeout=10)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", int(url.split("/")[2].split(":")[1]))
        if url.startswith("wss:"):
            with open(self.certPath or "", "rb") as f:
                authority = Certificate.loadPEM(f.read())
            endpoint = wrapClientTLS(optionsForClientTLS("localhost", authority), endpoint)
        connecting = endpoint.connect(factory)
        connecting.addErrback(client.opened.errback)
        self.clients.append(client)
        return client

    async def listener(self, entity: str, **kwargs: Any) -> Client:
        client = self.connect(self.url(entity, "listen", self.token(entity)), **kwargs)
        await client.opened
        return client

    async def pair(
        self,
        entity: str,
        protocols: list[str] | None = None,
        listenerProtocol: str | None = None,
        acceptedClass: type[Client] | None = None,
    ) -> tuple[Client, Client]:
        """
        A sender and the listener-side rendezvous socket that accepted it.
        """
        control = await self.listener(entity)
        sender = self.connect(self.url(entity, "connect", self.token(entity)), protocols=protocols)
        accept = json.loads((await control.messages.get())[0])["accept"]
        accepted = self.connect(
            accept["address"], protocols=[listenerProtocol] if listenerProtocol else [], protocolClass=acceptedClass
        )
        await accepted.opened
        await sender.opened
        control.sendClose(1000)
        return sender, accepted


class HandshakeRefused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class Client(WebSocketClientProtocol):
    """
    A test client: whole messages go to C{messages}; C{opened} and
    C{closed} fire with the handshake and the close.
    """

    def __init__(self) -> None:
        super().__init__()
        self.opened: Deferred[Client] = Deferred()
        self.closed: Deferred[tuple[bool, int | None, str | None]] = Deferred()
        self.messages: DeferredQueue[tuple[bytes, bool]] = DeferredQueue()

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.put((payload, isBinary))

    def connectionLost(self, reason: Any) -> None:
        if self.closeHandshakeTimeoutCall is not None:
            self.closeHandshakeTimeoutCall.cancel()
            self.closeHandshakeTimeoutCall = None
        super().connectionLost(reason)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            match = _STATUS.search(reason or "")
            if match:
                self.opened.errback(HandshakeRefused(int(match.group(1)), match.group(2)))
            else:
                self.opened.errback(HandshakeRefused(0, reason or ""))
        self.closed.callback((wasClean, code, reason))


class RawHttp(Protocol):
    """
    Send one request and keep the response head.
    """

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object) -> None:
        self.done.callback(self.received)


async def rawRequest(port: int, request: bytes, timeout: float = 10) -> tuple[int, str, bytes]:
    """
    Send C{request} as it is and return the status, reason and the whole
    response once the relay has closed the connection.
    """
    proto = RawHttp(request)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    connected = await endpoint.connect(Factory.forProtocol(lambda: proto))
    call = reactor.callLater(timeout, connected.transport.loseConnection)
    response = await proto.done
    if call.active():
        call.cancel()
    statusLine = response.split(b"\r\n", 1)[0].decode("latin-1")
    _, status, reason = (statusLine.split(" ", 2) + ["", ""])[:3]
    return int(status or 0), reason, response


async def waitFor(condition: Any, timeout: float = 20) -> None:
    """
    Wait (polling every 10 ms) until C{condition()} is true; fail the test
    after C{timeout} seconds.
    """
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("timed out")


def watchJoins(case: TestCase) -> list[str]:
    """
    Record, for each native sender the relay (in this process) joins to
    its listener, what the listener is: C{"NativeParty"} for a native
    listener, C{"HybridConnectionProtocol"} for a WebSocket one.  WebSocket
    senders are not recorded.  The patch is undone when C{case} ends.
    """
    from relaynet.protocols.native import NativeSender

    joins: list[str] = []
    original = NativeSender.join

    def join(sender: NativeSender, listener: Any) -> None:
        joins.append(type(listener).__name__)
        original(sender, listener)

    case.patch(NativeSender, "join", join)
    return joins


NODE_DIR = os.path.join(os.path.dirname(__file__), "node")
NODE = shutil.which("node")


class NodeScript(ProcessProtocol):
    """
    One of the harness scripts: its stdout lines, and its exit code.
    """

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.stderr = b""
        self.ended: Deferred[int] = Deferred()
        self._buffer = b""
        self._waiting: list[tuple[str, Deferred[str]]] = []

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            text = line.decode("utf-8", "replace").strip()
            self.lines.append(text)
            for entry in list(self._waiting):
                if text.startswith(entry[0]):
                    self._waiting.remove(entry)
                    entry[1].callback(text)

    def errReceived(self, data: bytes) -> None:
        self.stderr = (self.stderr + data)[-20000:]

    def processEnded(self, reason: Failure) -> None:
        code = reason.value.exitCode if isinstance(reason.value, (ProcessDone, ProcessTerminated)) else -1
        for prefix, d in self._waiting:
            d.errback(AssertionError(f"script ended ({code}) before {prefix!r}: {self.stderr.decode(errors='replace')}"))
        self._waiting = []
        self.ended.callback(code if code is not None else -1)

    def line(self, prefix: str, timeout: float = 30) -> Deferred[str]:
        """
        The first line (already seen or still to come) starting with
        C{prefix}.
        """
        for text in self.lines:
            if text.startswith(prefix):
                d: Deferred[str] = Deferred()
                d.callback(text)
                return d
        d = Deferred()
        self._waiting.append((prefix, d))
        return d.addTimeout(timeout, reactor)


def requireNode(case: TestCase, package: str) -> None:
    """
    Fail C{case} unless Node and the npm C{package} the harness scripts
    use are installed.
    """
    if NODE is None or not os.path.isdir(os.path.join(NODE_DIR, "node_modules", package)):
        case.fail("the Node clients are not installed: run `make node-deps` (make test does)")


def spawnNode(case: TestCase, script: str, *args: str) -> NodeScript:
    """
    Run the harness script C{script} with C{args}; it is stopped (C{TERM})
    when C{case} ends, if it has not ended by then.
    """
    node = NODE
    assert node is not None
    proto = NodeScript()
    argv = [node, os.path.join(NODE_DIR, script), *args]
    process = reactor.spawnProcess(proto, node, argv, env=dict(os.environ), path=NODE_DIR)

    def stop() -> Deferred[int]:
        if not proto.ended.called:
            process.signalProcess(signal.SIGTERM)
        return proto.ended

    case.addCleanup(stop)
    return proto

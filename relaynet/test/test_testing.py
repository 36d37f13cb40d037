"""
Tests for L{relaynet.testing}: the real relay in memory, reached by the real
clients (L{connectStream}, L{HybridListener}, L{WebListener}, an HTTP
L{Agent}) without a socket or the global reactor.
"""

from __future__ import annotations

import os
import re
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import (
    ConnectionDone,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.internet.interfaces import (
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from zope.interface.verify import verifyObject

from relaynet.listener import (
    AcceptRequest,
    HybridListener,
    RelayedHttpRequest,
    RelayRefused,
)
from relaynet.streams import (
    AuthorizationError,
    ConnectTimeoutError,
    EndpointNotFoundError,
    NoListenerError,
    RejectedError,
    connectStream,
    relayEndpoint,
)
from relaynet.test import support
from relaynet.test.support import RecordingProducer
from relaynet.testing import HIGH_WATER, MemoryRelay, NotSettled
from relaynet.web import WebListener


class Collect(Protocol):
    """
    Keeps what it receives, and how it ended.
    """

    def __init__(self) -> None:
        self.received = b""
        self.ended: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.ended = reason


class Echo(Collect):
    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.transport.write(data)


class Recorder(support.Recorder):
    """
    A handler that keeps its requests and answers every one with its method
    and target.
    """

    def handleRequest(self, request: RelayedHttpRequest) -> None:
        super().handleRequest(request)
        request.respond(200, headers={"Content-Type": "text/plain"})
        request.write(f"{request.method} {request.target}".encode())
        request.finish()


class Silent:
    """
    A handler that never answers.
    """

    def handleRequest(self, request: RelayedHttpRequest) -> None:
        pass


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"hello from " + request.path


class GlobalReactorUntouched:
    """
    Fails the test if it left anything on the global reactor: a delayed call,
    a reader or a writer.
    """

    def setUp(self) -> None:
        from twisted.internet import reactor

        self._global: Any = reactor
        self._before = self._snapshot()
        self.addCleanup(self._check)  # type: ignore[attr-defined]

    def _snapshot(self) -> tuple[set[Any], set[Any], set[Any]]:
        reactor = self._global
        return set(reactor.getDelayedCalls()), set(reactor.getReaders()), set(reactor.getWriters())

    def _check(self) -> None:
        calls, readers, writers = (now - before for now, before in zip(self._snapshot(), self._before))
        self.assertEqual((calls, readers, writers), (set(), set(), set()))  # type: ignore[attr-defined]


class MemoryRelayTestCase(GlobalReactorUntouched, SynchronousTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.relay = MemoryRelay(entities=["hyco", "open"], anonymous=["open"])

    def listener(self, entity: str = "hyco", **kwargs: Any) -> HybridListener:
        """
        A listener that is online, closed at the end of the test.
        """
        listener = HybridListener(self.relay.reactor, self.relay.url, entity, self.relay.tokens(), **kwargs)
        d = listener.listen()
        self.relay.flush()
        self.successResultOf(d)
        self.addCleanup(self.closed, listener)
        return listener

    def closed(self, listener: HybridListener) -> None:
        d = listener.close()
        self.relay.flush()
        self.successResultOf(d)

    def connect(self, entity: str = "hyco", protocol: type[Protocol] = Collect, **kwargs: Any) -> Deferred[Protocol]:
        d = connectStream(
            self.relay.reactor, self.relay.url, entity, kwargs.pop("tokens", self.relay.tokens()),
            Factory.forProtocol(protocol), **kwargs
        )
        self.relay.flush()
        return d


class ReactorTests(MemoryRelayTestCase):
    """
    The reactor clients get.
    """

    def test_guardSeesTheGlobalReactor(self) -> None:
        """
        The check every test here ends with fails for a call left on the
        global reactor.
        """
        call = self._global.callLater(100, lambda: None)
        try:
            self.assertRaises(self.failureException, self._check)
        finally:
            call.cancel()

    def test_interfaces(self) -> None:
        reactor = self.relay.reactor
        self.assertTrue(verifyObject(IReactorTCP, reactor))
        self.assertTrue(verifyObject(IReactorTime, reactor))
        self.assertTrue(verifyObject(IReactorPluggableNameResolver, reactor))

    def test_clockIsTheRelays(self) -> None:
        start = self.relay.reactor.seconds()
        self.relay.advance(12.5)
        self.assertEqual(self.relay.reactor.seconds(), start + 12.5)
        self.assertIs(self.relay.relay.clock, self.relay.reactor)

    def test_url(self) -> None:
        self.assertEqual(self.relay.url, "ws://relay.test:9090")

    def test_otherHostsDoNotResolve(self) -> None:
        d = HostnameEndpoint(self.relay.reactor, "example.com", 80).connect(Factory.forProtocol(Protocol))
        self.relay.flush()
        self.failureResultOf(d, DNSLookupError)

    def test_otherPortsAreRefused(self) -> None:
        d = HostnameEndpoint(self.relay.reactor, "relay.test", 80).connect(Factory.forProtocol(Protocol))
        # HostnameEndpoint gives up when its next attempt is due.
        self.relay.advance(1)
        self.failureResultOf(d, ConnectionRefusedError)

    def test_relayEndpoint(self) -> None:
        """
        L{relayEndpoint} reaches the relay, and closing ends both sides.
        """
        d = relayEndpoint(self.relay.reactor, self.relay.url).connect(Factory.forProtocol(Collect))
        self.assertNoResult(d)
        self.relay.flush()
        proto = self.successResultOf(d)
        self.assertEqual(self.relay.connections, 1)
        proto.transport.loseConnection()
        self.relay.flush()
        self.assertEqual(self.relay.connections, 0)
        assert isinstance(proto, Collect) and proto.ended is not None
        self.assertIsInstance(proto.ended.value, ConnectionDone)

    def test_cancelConnecting(self) -> None:
        d = relayEndpoint(self.relay.reactor, self.relay.url).connect(Factory.forProtocol(Collect))
        d.cancel()
        self.relay.flush()
        self.failureResultOf(d)
        self.assertEqual(self.relay.connections, 0)

    def test_notSettled(self) -> None:
        """
        Two protocols that never stop talking make L{flush} give up.
        """
        self.listener(streamFactory=Factory.forProtocol(Echo))
        sender = self.successResultOf(self.connect(protocol=Echo))
        sender.transport.write(b"ping")
        self.assertRaises(NotSettled, self.relay.flush, maxRounds=50)
        sender.transport.abortConnection()
        self.relay.flush()


class StreamTests(MemoryRelayTestCase):
    """
    Senders and listeners of relayed streams.
    """

    def test_bytesBothWays(self) -> None:
        """
        A sender's bytes reach the listener's protocol and come back.
        """
        accepted: list[Echo] = []

        class Server(Factory):
            def buildProtocol(self, addr: Any) -> Echo:
                accepted.append(Echo())
                return accepted[-1]

        self.listener(streamFactory=Server())
        self.assertEqual(self.relay.listenerCount("hyco"), 1)
        sender = self.successResultOf(self.connect())
        assert isinstance(sender, Collect)
        sender.transport.write(b"hello")
        self.relay.flush()
        self.assertEqual(accepted[0].received, b"hello")
        self.assertEqual(sender.received, b"hello")
        sender.transport.loseConnection()
        self.relay.flush()
        assert sender.ended is not None and accepted[0].ended is not None
        self.assertIsInstance(sender.ended.value, ConnectionDone)
        self.assertIsInstance(accepted[0].ended.value, ConnectionDone)

    def test_largeTransfer(self) -> None:
        """
        A megabyte passes through the splice, with backpressure on the way.
        """
        accepted: list[Collect] = []

        class Server(Factory):
            def buildProtocol(self, addr: Any) -> Collect:
                accepted.append(Collect())
                return accepted[-1]

        self.listener(streamFactory=Server())
        sender = self.successResultOf(self.connect())
        data = os.urandom(1024 * 1024)
        for at in range(0, len(data), 16 * 1024):
            sender.transport.write(data[at : at + 16 * 1024])
        self.relay.flush()
        self.assertEqual(accepted[0].received, data)

    def test_noListener(self) -> None:
        self.failureResultOf(self.connect(), NoListenerError)

    def test_noSuchEntity(self) -> None:
        self.failureResultOf(self.connect("nothing"), EndpointNotFoundError)

    def test_wrongKey(self) -> None:
        self.listener(streamFactory=Factory.forProtocol(Echo))
        wrong = self.relay.tokens(key="d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk=")
        failure = self.failureResultOf(self.connect(tokens=wrong), AuthorizationError)
        self.assertEqual(failure.value.status, 401)

    def test_wrongKeyListener(self) -> None:
        listener = HybridListener(
            self.relay.reactor, self.relay.url, "hyco", self.relay.tokens(key="d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk=")
        )
        d = listener.listen()
        self.relay.flush()
        self.assertEqual(self.failureResultOf(d, RelayRefused).value.status, 401)
        self.assertEqual(self.relay.listenerCount("hyco"), 0)

    def test_anonymous(self) -> None:
        self.listener("open", streamFactory=Factory.forProtocol(Echo))
        sender = self.successResultOf(self.connect("open", tokens=None))
        sender.transport.write(b"x")
        self.relay.flush()
        assert isinstance(sender, Collect)
        self.assertEqual(sender.received, b"x")

    def test_rejected(self) -> None:
        """
        An C{acceptHandler} that says no is a L{RejectedError} for the
        sender, with its status and reason.
        """
        seen: list[AcceptRequest] = []

        def decide(request: AcceptRequest) -> tuple[int, str]:
            seen.append(request)
            return (409, "Not you")

        self.listener(streamFactory=Factory.forProtocol(Echo), acceptHandler=decide)
        failure = self.failureResultOf(self.connect(headers={"X-Tenant": "7"}), RejectedError)
        self.assertEqual((failure.value.status, failure.value.reason), (409, "Not you"))
        self.assertEqual(seen[0].getHeader("x-tenant"), "7")

    def test_acceptTimeout(self) -> None:
        """
        A listener that never decides leaves the sender waiting until the
        relay's accept timeout, 30 seconds.
        """
        self.listener(streamFactory=Factory.forProtocol(Echo), acceptHandler=lambda request: Deferred())
        d = self.connect()
        self.relay.advance(29)
        self.assertNoResult(d)
        self.relay.advance(1)
        self.failureResultOf(d, ConnectTimeoutError)

    def test_listenerReconnects(self) -> None:
        """
        After the network drops every connection, the listener comes back
        by itself when its retry is due.
        """
        statuses: list[str] = []
        self.listener(streamFactory=Factory.forProtocol(Echo), onStatus=statuses.append, retryPolicy=lambda n: 5.0)
        self.relay.disconnectAll()
        self.assertEqual(self.relay.listenerCount("hyco"), 0)
        self.relay.advance(5)
        self.assertEqual(self.relay.listenerCount("hyco"), 1)
        self.assertEqual(statuses, ["connecting", "online", "reconnecting", "online"])

    def test_pingsKeepTheListener(self) -> None:
        """
        An hour of relay and listener pings and a token renewal: the
        listener stays registered, on one control channel.
        """
        self.listener(streamFactory=Factory.forProtocol(Echo))
        self.relay.advance(3600)
        self.assertEqual(self.relay.listenerCount("hyco"), 1)
        self.assertEqual(self.relay.connections, 1)


class EndpointTests(MemoryRelayTestCase):
    """
    The C{relay:} endpoints on the memory network.
    """

    def test_listenAndConnect(self) -> None:
        from relaynet.endpoints import RelayClientEndpoint, RelayServerEndpoint

        server = RelayServerEndpoint(self.relay.reactor, self.relay.url, "hyco", self.relay.tokens())
        listening = server.listen(Factory.forProtocol(Echo))
        self.relay.flush()
        port = self.successResultOf(listening)
        client = RelayClientEndpoint(self.relay.reactor, self.relay.url, "hyco", self.relay.tokens())
        connecting = client.connect(Factory.forProtocol(Collect))
        self.relay.flush()
        sender = self.successResultOf(connecting)
        assert isinstance(sender, Collect)
        sender.transport.write(b"through an endpoint")
        self.relay.flush()
        self.assertEqual(sender.received, b"through an endpoint")
        stopping = port.stopListening()
        self.relay.flush()
        self.successResultOf(stopping)
        self.assertEqual(self.relay.listenerCount("hyco"), 0)


class HttpTests(MemoryRelayTestCase):
    """
    HTTP requests through the relay's front door.
    """

    def test_handler(self) -> None:
        handler = Recorder()
        self.listener(handler=handler)
        status, headers, body = self.successResultOf(
            self.relay.request("POST", "/hyco/orders?x=1", {"ServiceBusAuthorization": self.relay.token("hyco")}, b"{}")
        )
        self.assertEqual((status, body), (200, b"POST /hyco/orders?x=1"))
        self.assertEqual(headers.getRawHeaders("content-type"), ["text/plain"])
        self.assertEqual(handler.requests[0].remote, ("203.0.113.10", handler.requests[0].remote[1]))

    def test_largeBodiesBothWays(self) -> None:
        """
        Bodies over 64 KiB go over rendezvous sockets, both ways.
        """

        class Reverse:
            def handleRequest(self, request: RelayedHttpRequest) -> None:
                from relaynet.listener import readBody

                def answer(body: bytes) -> None:
                    request.respond(200)
                    request.write(body[::-1])
                    request.finish()

                readBody(request).addCallback(answer)

        self.listener(handler=Reverse())
        data = os.urandom(300 * 1024)
        response = self.successResultOf(
            self.relay.request("PUT", "/hyco/blob", {"ServiceBusAuthorization": self.relay.token("hyco")}, data)
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, data[::-1])

    def test_webListener(self) -> None:
        """
        A twisted.web resource answers through a L{WebListener}.
        """
        web = WebListener(self.relay.reactor, self.relay.url, "hyco", self.relay.tokens(), Hello())
        d = web.listen()
        self.relay.flush()
        self.successResultOf(d)
        response = self.successResultOf(
            self.relay.request("GET", "/hyco/greeting", {"ServiceBusAuthorization": self.relay.token("hyco")})
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b"hello from /hyco/greeting")
        d = web.close()
        self.relay.flush()
        self.successResultOf(d)

    def test_noListener(self) -> None:
        response = self.successResultOf(
            self.relay.request("GET", "/hyco/x", {"ServiceBusAuthorization": self.relay.token("hyco")})
        )
        self.assertEqual(response.status, 502)

    def test_noToken(self) -> None:
        self.listener(handler=Recorder())
        response = self.successResultOf(self.relay.request("GET", "/hyco/x"))
        self.assertEqual(response.status, 401)

    def test_requestTimeout(self) -> None:
        """
        A handler that never answers: the relay answers 504 after its
        request timeout.
        """

        self.listener(handler=Silent())
        d = self.relay.request("GET", "/hyco/x", {"ServiceBusAuthorization": self.relay.token("hyco")})
        self.relay.advance(59)
        self.assertNoResult(d)
        self.relay.advance(1)
        self.assertEqual(self.successResultOf(d).status, 504)


class TransportTests(MemoryRelayTestCase):
    """
    The transports act as TCP transports do where a protocol can tell.
    """

    def connected(self) -> Protocol:
        d = relayEndpoint(self.relay.reactor, self.relay.url).connect(Factory.forProtocol(Collect))
        self.relay.flush()
        return self.successResultOf(d)

    def test_writesNeedBytes(self) -> None:
        proto = self.connected()
        self.assertRaises(TypeError, proto.transport.write, "text")

    def test_producerPausedWhenFull(self) -> None:
        """
        A streaming producer is paused while more than L{HIGH_WATER} bytes
        wait (here, because the relay stops reading a request body until the
        listener comes for it), and resumed once they have gone.
        """
        self.listener(handler=Silent())
        proto = self.connected()
        transport: Any = proto.transport
        producer = RecordingProducer()
        events = producer.events
        transport.registerProducer(producer, True)
        head = (
            "POST /hyco/upload HTTP/1.1\r\nHost: relay.test:9090\r\nContent-Length: 200000\r\n"
            f"ServiceBusAuthorization: {self.relay.token('hyco')}\r\n\r\n"
        )
        transport.write(head.encode("ascii"))
        transport.write(b"x" * HIGH_WATER)
        self.assertEqual(events, ["pause"])
        self.assertGreater(transport.pending, HIGH_WATER)
        self.relay.flush()
        self.assertEqual(events, ["pause", "resume"])
        self.assertEqual(transport.pending, 0)
        transport.unregisterProducer()
        transport.abortConnection()
        self.relay.flush()

    def test_producerTwice(self) -> None:
        proto = self.connected()
        transport: Any = proto.transport
        transport.unregisterProducer()
        transport.registerProducer(RecordingProducer(), True)
        self.assertRaises(RuntimeError, transport.registerProducer, RecordingProducer(), True)

    def test_raisingProtocolIsDropped(self) -> None:
        """
        A protocol that raises in C{dataReceived} is logged and disconnected,
        as by a reactor.
        """

        class Broken(Collect):
            def dataReceived(self, data: bytes) -> None:
                raise ZeroDivisionError()

        d = relayEndpoint(self.relay.reactor, self.relay.url).connect(Factory.forProtocol(Broken))
        self.relay.flush()
        proto = self.successResultOf(d)
        proto.transport.write(b"GET / HTTP/1.1\r\nHost: relay.test:9090\r\n\r\n")
        self.relay.flush()
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        assert isinstance(proto, Collect)
        self.assertIsNotNone(proto.ended)
        self.assertEqual(self.relay.connections, 0)


class DocumentationTests(SynchronousTestCase):
    """
    The example in C{doc/testing.rst} runs.
    """

    def test_example(self) -> None:
        here = os.path.dirname(os.path.abspath(__file__))
        path = os.path.join(here, "..", "..", "doc", "testing.rst")
        if not os.path.exists(path):
            raise self.skipTest("no doc/testing.rst here")
        with open(path) as f:
            text = f.read()
        match = re.search(r"\.\. example-start\n\n\.\. code-block:: python\n\n(.*?)\n\.\. example-end", text, re.DOTALL)
        assert match is not None, "doc/testing.rst has no example"
        source = "\n".join(line[4:] for line in match.group(1).splitlines())
        namespace: dict[str, Any] = {"__name__": "relaynet_testing_example"}
        exec(compile(source, path, "exec"), namespace)
        from twisted.trial.reporter import TestResult
        from twisted.trial.runner import TestLoader

        suite = TestLoader().loadClass(namespace["OrderTests"])
        result = TestResult()
        suite.run(result)
        self.assertEqual((result.errors, result.failures, result.skips), ([], [], []))
        self.assertEqual(result.successes, suite.countTestCases())
        self.assertGreater(result.successes, 0)

# -*- test-case-name: relaynet.test.test_endpoints -*-
"""
Tests for L{relaynet.endpoints}: the C{relay:} string parsers, found as
plugins by L{serverFromString} and L{clientFromString}, and the endpoints
end to end over a real relay on 127.0.0.1.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import (
    IListeningPort,
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import IPlugin, getPlugins
from twisted.protocols.basic import LineReceiver
from twisted.protocols.wire import Echo
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.web.static import Data
from zope.interface import implementer
from zope.interface.verify import verifyObject

from relaynet.auth import mintToken
from relaynet.endpoints import (
    DEFAULT_KEY_NAME,
    RelayClientEndpoint,
    RelayClientParser,
    RelayListeningPort,
    RelayServerEndpoint,
    RelayServerParser,
    normaliseRelayUrl,
)
from relaynet.listener import RelayRefused
from relaynet.streams import AuthorizationError, NoListenerError, RelayAddress, RelayConnectError, RejectedError
from relaynet.test.test_streams import Collect
from relaynet.test.support import KEY, KEY_NAME, RelayFixture, makeCertificate, watchJoins
from relaynet.tokens import getToken

TOKEN = "SharedAccessSignature sr=http%3A%2F%2F127.0.0.1%3A9090%2Fhyco&sig=abc&se=99&skn=r"


def escape(text: str) -> str:
    """
    C{text} as a value in an endpoint string: colons and backslashes
    escaped.
    """
    return text.replace("\\", "\\\\").replace(":", "\\:")


class Files:
    """
    Files and environment variables for a test, removed after it.
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        self.case = case
        self.directory = case.mktemp()
        os.makedirs(self.directory)

    def write(self, name: str, content: str | bytes) -> str:
        path = os.path.join(self.directory, name)
        with open(path, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
        return path

    def env(self, value: str) -> str:
        name = "RELAYNET_TEST_" + uuid.uuid4().hex.upper()
        os.environ[name] = value
        self.case.addCleanup(os.environ.pop, name, None)
        return name


class PluginTests(SynchronousTestCase):
    """
    The parsers are plugins that Twisted's endpoint lookup finds.
    """

    def test_found(self) -> None:
        servers = [p for p in getPlugins(IStreamServerEndpointStringParser) if p.prefix == "relay"]
        clients = [p for p in getPlugins(IStreamClientEndpointStringParserWithReactor) if p.prefix == "relay"]
        self.assertEqual([type(p) for p in servers], [RelayServerParser])
        self.assertEqual([type(p) for p in clients], [RelayClientParser])

    def test_interfaces(self) -> None:
        verifyObject(IPlugin, RelayServerParser())
        verifyObject(IStreamServerEndpointStringParser, RelayServerParser())
        verifyObject(IPlugin, RelayClientParser())
        verifyObject(IStreamClientEndpointStringParserWithReactor, RelayClientParser())

    def test_globalReactor(self) -> None:
        """
        C{serverFromString(reactor, "relay:...")} works as an application
        would call it.
        """
        key = Files(self).write("key", KEY)
        endpoint = serverFromString(reactor, f"relay:hyco:url=ws\\://127.0.0.1\\:9090:keyFile={escape(key)}")
        self.assertIsInstance(endpoint, RelayServerEndpoint)
        verifyObject(IStreamServerEndpoint, endpoint)
        client = clientFromString(reactor, "relay:hyco:url=ws\\://127.0.0.1\\:9090")
        self.assertIsInstance(client, RelayClientEndpoint)
        verifyObject(IStreamClientEndpoint, client)


class ParseTests(SynchronousTestCase):
    """
    Every parameter of a C{relay:} description, parsed through
    L{serverFromString} and L{clientFromString}.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.files = Files(self)
        self.keyFile = self.files.write("key", f"  {KEY}\n\n")

    def server(self, description: str) -> RelayServerEndpoint:
        endpoint = serverFromString(self.reactor, description)
        assert isinstance(endpoint, RelayServerEndpoint)
        return endpoint

    def client(self, description: str) -> RelayClientEndpoint:
        endpoint = clientFromString(self.reactor, description)
        assert isinstance(endpoint, RelayClientEndpoint)
        return endpoint

    def token(self, endpoint: RelayServerEndpoint | RelayClientEndpoint) -> str:
        assert endpoint.tokenProvider is not None
        return self.successResultOf(getToken(endpoint.tokenProvider, f"http://127.0.0.1:9090/{endpoint.entity}"))

    def expected(self, entity: str, keyName: str = DEFAULT_KEY_NAME) -> str:
        return mintToken(f"http://127.0.0.1:9090/{entity}", keyName, KEY, 3600)

    def test_server(self) -> None:
        """
        The entity, the url and a key file, with the default rule name;
        the key is stripped of whitespace.
        """
        endpoint = self.server(f"relay:hyco:url=ws\\://127.0.0.1\\:9090:keyFile={escape(self.keyFile)}")
        self.assertEqual((endpoint.relayUrl, endpoint.entity, endpoint.trustRoot), ("ws://127.0.0.1:9090", "hyco", None))
        self.assertEqual(self.token(endpoint), self.expected("hyco"))

    def test_entityWithSlashes(self) -> None:
        endpoint = self.server(f"relay:/teams/a/orders/:url=ws\\://127.0.0.1\\:9090:keyFile={escape(self.keyFile)}")
        self.assertEqual(endpoint.entity, "teams/a/orders")
        self.assertEqual(self.token(endpoint), self.expected("teams/a/orders"))

    def test_keyName(self) -> None:
        endpoint = self.client(f"relay:hyco:url=ws\\://127.0.0.1\\:9090:keyName=sender:keyFile={escape(self.keyFile)}")
        self.assertEqual(self.token(endpoint), self.expected("hyco", "sender"))

    def test_keyEnv(self) -> None:
        name = self.files.env(f" {KEY}\n")
        endpoint = self.server(f"relay:hyco:url=ws\\://127.0.0.1\\:9090:keyName=listen:keyEnv={name}")
        self.assertEqual(self.token(endpoint), self.expected("hyco", "listen"))

    def test_tokenFileReadEachTime(self) -> None:
        """
        A token file is read for every token, so that another process can
        rotate it.
        """
        path = self.files.write("token", TOKEN + "\n")
        endpoint = self.server(f"relay:hyco:url=ws\\://127.0.0.1\\:9090:tokenFile={escape(path)}")
        self.assertEqual(self.token(endpoint), TOKEN)
        self.files.write("token", TOKEN.replace("se=99", "se=100"))
        self.assertEqual(self.token(endpoint), TOKEN.replace("se=99", "se=100"))
        self.files.write("token", "gone")
        assert endpoint.tokenProvider is not None
        self.failureResultOf(getToken(endpoint.tokenProvider, "http://127.0.0.1:9090/hyco"), ValueError)

    def test_tokenEnv(self) -> None:
        name = self.files.env(TOKEN)
        endpoint = self.client(f"relay:hyco:url=ws\\://127.0.0.1\\:9090:tokenEnv={name}")
        self.assertEqual(self.token(endpoint), TOKEN)

    def test_anonymousClient(self) -> None:
        """
        A client with no key or token sends none.
        """
        endpoint = self.client("relay:hyco:url=ws\\://127.0.0.1\\:9090")
        self.assertIsNone(endpoint.tokenProvider)
        self.assertTrue(endpoint.anonymous)
        self.assertEqual(endpoint.timeout, 70.0)

    def test_timeout(self) -> None:
        self.assertEqual(self.client("relay:hyco:url=ws\\://127.0.0.1\\:9090:timeout=2.5").timeout, 2.5)

    def test_urls(self) -> None:
        """
        ws and wss stay; sb means wss; the port is kept only if given.
        """
        for url, expected in [
            ("ws://127.0.0.1:9090", "ws://127.0.0.1:9090"),
            ("ws://127.0.0.1:9090/", "ws://127.0.0.1:9090"),
            ("WSS://Relay.Example.com", "wss://relay.example.com"),
            ("wss://relay.example.com:8443/", "wss://relay.example.com:8443"),
            ("sb://ns.servicebus.windows.net/", "wss://ns.servicebus.windows.net"),
            ("sb://ns.example.com:5671", "wss://ns.example.com:5671"),
            ("ws://[::1]:9090", "ws://[::1]:9090"),
        ]:
            self.assertEqual(self.client(f"relay:hyco:url={escape(url)}").relayUrl, expected, url)
            self.assertEqual(normaliseRelayUrl(url), expected)

    def test_caCert(self) -> None:
        _, certPath = makeCertificate(self.files.directory)
        endpoint = self.server(f"relay:hyco:url=wss\\://127.0.0.1\\:9443:keyFile={escape(self.keyFile)}:caCert={escape(certPath)}")
        self.assertIsInstance(endpoint.trustRoot, Certificate)
        with open(certPath, "rb") as f:
            self.assertEqual(endpoint.trustRoot.dump(), Certificate.loadPEM(f.read()).dump())
        client = self.client(f"relay:hyco:url=sb\\://127.0.0.1:caCert={escape(certPath)}")
        self.assertIsInstance(client.trustRoot, Certificate)

    def test_pythonApi(self) -> None:
        """
        The endpoints check what they are given as the parsers do.
        """
        endpoint = RelayClientEndpoint(self.reactor, "sb://ns.example.com", "/a/b/", None, headers={"X": "1"}, timeout=5)
        self.assertEqual((endpoint.relayUrl, endpoint.entity, endpoint.headers), ("wss://ns.example.com", "a/b", {"X": "1"}))
        with self.assertRaises(ValueError):
            RelayClientEndpoint(self.reactor, "ws://h:1", "a", None, timeout=0)
        with self.assertRaises(ValueError):
            RelayServerEndpoint(self.reactor, "http://h:1", "a", lambda r: TOKEN)
        with self.assertRaises(ValueError):
            RelayServerEndpoint(self.reactor, "ws://h:1", "a", None)  # type: ignore[arg-type]
        with self.assertRaises(ValueError):
            RelayServerEndpoint(self.reactor, "ws://h:1", "$hc", lambda r: TOKEN)

    def assertRefused(self, description: str, *fragments: str, server: bool = True) -> None:
        parse = serverFromString if server else clientFromString
        with self.assertRaises(ValueError, msg=description) as e:
            parse(self.reactor, description)
        for fragment in fragments:
            self.assertIn(fragment, str(e.exception), description)

    def test_inlineSecrets(self) -> None:
        """
        A key or token written in the string is refused, with a pointer to
        keyFile and keyEnv.
        """
        url = "url=ws\\://127.0.0.1\\:9090"
        for description in [
            f"relay:hyco:{url}:key={KEY}",
            f"relay:hyco:{url}:sharedAccessKey={KEY}",
            f"relay:hyco:{url}:SharedAccessKey={KEY}",
            f"relay:hyco:{url}:token=x",
            f"relay:hyco:{url}:sasToken=x",
            f"relay:hyco:{url}:password=x",
            f"relay:hyco:{url}:connectionString=x",
            f"relay:hyco:url=Endpoint=sb\\://ns/;SharedAccessKeyName=r;SharedAccessKey={KEY}",
            f"relay:hyco:{url}:keyName=SharedAccessSignature sr=x",
        ]:
            for server in (True, False):
                self.assertRefused(description, "keyFile", "keyEnv", server=server)

    def test_badFields(self) -> None:
        key = f"keyFile={escape(self.keyFile)}"
        url = "url=ws\\://127.0.0.1\\:9090"
        self.assertRefused(f"relay:{key}:{url}", "entity's name is missing")
        self.assertRefused(f"relay:hyco:{key}", "url is missing")
        self.assertRefused(f"relay:hyco:url=ws://127.0.0.1:9090:{key}", "escape", "url=ws\\://")
        self.assertRefused(f"relay:hyco:{url}:{key}:bogus=1", "unknown parameter bogus=", "keyFile")
        self.assertRefused(f"relay:hyco:{url}:keyfile={escape(self.keyFile)}", "did you mean keyFile=")
        self.assertRefused(f"relay:hyco:{url}:{key}:timeout=5", "timeout= is for client endpoints")
        self.assertRefused(f"relay:hyco:{url}:{key}:keyName=", "keyName= needs a value")
        self.assertRefused(f"relay:hyco:{url}:keyName=a b:{key}", "keyName 'a b' is not a rule name")

    def test_badEntities(self) -> None:
        key = f"keyFile={escape(self.keyFile)}"
        url = "url=ws\\://127.0.0.1\\:9090"
        for entity in ["$hc", "a//b", "a b", "a/../b", "/", "x" * 300]:
            self.assertRefused(f"relay:{entity}:{url}:{key}", "relay: entity name")

    def test_badUrls(self) -> None:
        key = f"keyFile={escape(self.keyFile)}"
        for url, fragment in [
            ("http://127.0.0.1:9090", "must start with ws://, wss:// or sb://"),
            ("tcp:127.0.0.1:9090", "must start with ws://, wss:// or sb://"),
            ("127.0.0.1", "must start with ws://, wss:// or sb://"),
            ("ws://", "has no host"),
            ("ws://127.0.0.1:99999", "not a valid URL"),
            ("ws://127.0.0.1:port", "not a valid URL"),
            ("ws://127.0.0.1:9090/$hc/hyco", "no path, query or fragment"),
            ("ws://127.0.0.1:9090?x=1", "no path, query or fragment"),
            ("ws://user:pw@127.0.0.1:9090", "user name or password"),
        ]:
            self.assertRefused(f"relay:hyco:url={escape(url)}:{key}", fragment)
            with self.assertRaises(ValueError):
                normaliseRelayUrl(url)

    def test_badCredentials(self) -> None:
        url = "url=ws\\://127.0.0.1\\:9090"
        missing = escape(os.path.join(self.files.directory, "missing"))
        empty = escape(self.files.write("empty", " \n"))
        binary = escape(self.files.write("binary", b"\xff\xfe\x00"))
        notToken = escape(self.files.write("nottoken", "sr=x&sig=y"))
        self.assertRefused(f"relay:hyco:{url}", "server endpoint needs a credential with the Listen right")
        self.assertRefused(f"relay:hyco:{url}:keyName=r", "keyName= needs the rule's key", server=False)
        self.assertRefused(
            f"relay:hyco:{url}:keyFile={escape(self.keyFile)}:tokenEnv=X", "one of keyFile, keyEnv, tokenFile or tokenEnv"
        )
        self.assertRefused(f"relay:hyco:{url}:keyFile={missing}", "cannot read keyFile", "No such file")
        self.assertRefused(f"relay:hyco:{url}:keyFile={empty}", "is empty")
        self.assertRefused(f"relay:hyco:{url}:keyFile={binary}", "is not text")
        self.assertRefused(f"relay:hyco:{url}:keyEnv=RELAYNET_TEST_UNSET_{uuid.uuid4().hex}", "is not set")
        self.assertRefused(f"relay:hyco:{url}:keyEnv={self.files.env('  ')}", "is empty")
        self.assertRefused(f"relay:hyco:{url}:tokenFile={missing}", "cannot read tokenFile")
        self.assertRefused(f"relay:hyco:{url}:tokenFile={notToken}", "does not hold a SAS token")
        self.assertRefused(f"relay:hyco:{url}:tokenEnv={self.files.env('abc')}", "does not hold a SAS token")
        self.assertRefused(f"relay:hyco:{url}:tokenEnv={self.files.env(TOKEN)}:keyName=r", "keyName= goes with keyFile")

    def test_badCaCert(self) -> None:
        wss = "url=wss\\://127.0.0.1\\:9443"
        missing = escape(os.path.join(self.files.directory, "missing.pem"))
        notPem = escape(self.files.write("bad.pem", "not a certificate"))
        _, certPath = makeCertificate(self.files.directory)
        self.assertRefused(f"relay:hyco:{wss}:caCert={missing}", "cannot read caCert", server=False)
        self.assertRefused(f"relay:hyco:{wss}:caCert={notPem}", "is not a PEM certificate", server=False)
        self.assertRefused(f"relay:hyco:url=ws\\://h\\:1:caCert={escape(certPath)}", "caCert= is for a wss://", server=False)

    def test_native(self) -> None:
        """
        C{native=} takes yes, no, true or false in any case, on both
        sides; it is off by default.
        """
        base = "relay:hyco:url=ws\\://127.0.0.1\\:9090"
        key = f"keyFile={escape(self.keyFile)}"
        self.assertFalse(self.client(base).native)
        self.assertFalse(self.server(f"{base}:{key}").native)
        for value, expected in [("yes", True), ("no", False), ("YES", True), ("No", False), ("true", True),
                                ("False", False), ("TRUE", True)]:
            self.assertIs(self.client(f"{base}:native={value}").native, expected, value)
            self.assertIs(self.server(f"{base}:{key}:native={value}").native, expected, value)
        self.assertTrue(RelayClientEndpoint(self.reactor, "ws://h:1", "a", None, native=True).native)
        self.assertTrue(RelayServerEndpoint(self.reactor, "ws://h:1", "a", lambda r: TOKEN, native=True).native)

    def test_badNative(self) -> None:
        """
        Any other value of C{native=} is refused, naming the option.
        """
        base = "relay:hyco:url=ws\\://127.0.0.1\\:9090"
        key = f"keyFile={escape(self.keyFile)}"
        for value in ["1", "0", "on", "off", "y", "n", "maybe", " yes", "yes ", "native"]:
            self.assertRefused(f"{base}:native={value}", f"native={value} must be yes or no", server=False)
            self.assertRefused(f"{base}:{key}:native={value}", f"native={value} must be yes or no")
        self.assertRefused(f"{base}:{key}:native=", "native= needs a value")
        self.assertRefused(f"{base}:{key}:Native=yes", "did you mean native=?")

    def test_badTimeouts(self) -> None:
        for value, fragment in [("soon", "is not a number"), ("0", "positive"), ("-1", "positive"), ("inf", "positive"), ("nan", "positive")]:
            self.assertRefused(f"relay:hyco:url=ws\\://h\\:1:timeout={value}", fragment, server=False)


class Serving:
    """
    A stand-in for what a L{RelayListeningPort} runs.
    """

    def __init__(self) -> None:
        self.listener: Any = object()
        self.closing: Deferred[None] = Deferred()
        self.closed = 0

    def listen(self) -> Deferred[None]:
        return succeed(None)

    def close(self) -> Deferred[None]:
        self.closed += 1
        return self.closing


class ListeningPortTests(SynchronousTestCase):
    def test_port(self) -> None:
        serving = Serving()
        address = RelayAddress("ws://127.0.0.1:9090", "hyco")
        port = RelayListeningPort(serving, Factory(), address)  # type: ignore[arg-type]
        verifyObject(IListeningPort, port)
        self.assertEqual(port.getHost(), address)
        port.startListening()
        first, second = port.stopListening(), port.stopListening()
        self.assertNoResult(first)
        serving.closing.callback(None)
        self.assertIsNone(self.successResultOf(first))
        self.assertIsNone(self.successResultOf(second))
        self.assertIsNone(self.successResultOf(port.stopListening()))
        self.assertEqual(serving.closed, 1)
        self.assertRaises(RuntimeError, port.startListening)

    def test_closeFailed(self) -> None:
        serving = Serving()
        port = RelayListeningPort(serving, Factory(), RelayAddress("ws://h:1", "a"))  # type: ignore[arg-type]
        first = port.stopListening()
        serving.closing.errback(RuntimeError("boom"))
        self.failureResultOf(first, RuntimeError)
        self.failureResultOf(port.stopListening(), RuntimeError)


# End to end, over a relay on 127.0.0.1.


class Counted(Factory):
    """
    A factory that counts its starts and stops, as ports make them.
    """

    protocol = Echo
    starts = stops = 0

    def startFactory(self) -> None:
        self.starts += 1

    def stopFactory(self) -> None:
        self.stops += 1


class Greeting(LineReceiver):
    """
    Says who it is talking to.
    """

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.sendLine(f"hello {peer.host} via {peer.entity}".encode())


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("timed out waiting")


async def connectWhenListening(endpoint: IStreamClientEndpoint, timeout: float = 10.0) -> Collect:
    """
    Connect a L{Collect} as soon as a listener is there.
    """
    for _ in range(int(timeout / 0.05)):
        try:
            proto = await endpoint.connect(Factory.forProtocol(Collect))
        except NoListenerError:
            await deferLater(reactor, 0.05, lambda: None)
        else:
            assert isinstance(proto, Collect)
            return proto
    raise AssertionError("no listener came")


@implementer(IAgentEndpointFactory)
class RelayedStreams:
    """
    An Agent's connections as relayed streams, whatever the URL's host.
    """

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self.endpoint = endpoint

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        return self.endpoint


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"hello from " + request.uri


def helloSite() -> Site:
    root = Resource()
    root.putChild(b"hello", Hello())
    root.putChild(b"data", Data(b"x" * 200000, "application/octet-stream"))
    return Site(root)


class EndToEndTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.relay = RelayFixture(
            self,
            ["--entity", "hyco", "--entity", "web", "--entity", "teams/orders", "--entity", "open",
             "--anonymous-senders", "open", "--accept-timeout", "2"],
        )
        self.url = f"ws://{self.relay.host}"
        self.files = Files(self)
        self.keyFile = self.files.write("key", KEY + "\n")

    def description(self, entity: str, credential: str | None = None, **more: str) -> str:
        if credential is None:
            credential = f"keyFile={escape(self.keyFile)}"
        fields = [f"relay:{entity}", f"url={escape(self.url)}", credential, *(f"{k}={escape(v)}" for k, v in more.items())]
        return ":".join(field for field in fields if field)

    async def listen(self, entity: str, factory: Any, credential: str | None = None, **more: str) -> RelayListeningPort:
        port = await serverFromString(reactor, self.description(entity, credential, **more)).listen(factory)
        self.addCleanup(port.stopListening)
        assert isinstance(port, RelayListeningPort)
        return port

    async def test_echo(self) -> None:
        """
        A server endpoint serves an ordinary factory; a client endpoint
        connects an ordinary protocol to it.
        """
        factory = Counted()
        port = await self.listen("teams/orders", factory)
        verifyObject(IListeningPort, port)
        self.assertEqual(port.getHost(), RelayAddress(self.url, "teams/orders"))
        self.assertEqual((port.status, factory.starts, factory.numPorts), ("online", 1, 1))
        client = clientFromString(reactor, self.description("teams/orders"))
        proto = await client.connect(Factory.forProtocol(Collect))
        self.assertIsInstance(proto, Collect)
        proto.transport.write(b"hello ")
        proto.transport.write(b"relay")
        await until(lambda: proto.received == b"hello relay")
        proto.transport.loseConnection()
        self.assertIsInstance(await proto.ended, ConnectionDone)
        await port.stopListening()
        self.assertEqual((factory.stops, factory.numPorts, port.status), (1, 0, "offline"))
        with self.assertRaises(NoListenerError):
            await client.connect(Factory.forProtocol(Collect))

    async def echoed(self, client: IStreamClientEndpoint) -> None:
        """
        Connect a L{Collect} with C{client} to an echo server; bytes of
        several sizes come back byte for byte; a close ends the stream
        cleanly.
        """
        proto = await client.connect(Factory.forProtocol(Collect))
        assert isinstance(proto, Collect)
        transport: Any = proto.transport
        sent = b""
        for size in (1, 1000, 65536, 65537, 1024 * 1024 + 3):
            payload = os.urandom(size)
            sent += payload
            transport.write(payload)
        await until(lambda: len(proto.received) >= len(sent), timeout=30)
        self.assertEqual(proto.received, sent)
        self.assertEqual(transport.getPeer(), RelayAddress(self.url, "hyco"))
        transport.loseConnection()
        self.assertIsInstance(await proto.ended, ConnectionDone)

    async def test_native(self) -> None:
        """
        A C{native=yes} server endpoint serves an echo protocol; a
        C{native=yes} client endpoint connects to it.  The relay joins a
        native sender to a native listener.
        """
        joins = watchJoins(self)
        factory = Counted()
        port = await self.listen("hyco", factory, native="yes")
        client = clientFromString(reactor, self.description("hyco", native="yes"))
        assert isinstance(client, RelayClientEndpoint)
        self.assertTrue(client.native)
        await self.echoed(client)
        self.assertEqual(joins, ["NativeParty"])

    async def test_nativeClientWebSocketServer(self) -> None:
        """
        A C{native=yes} client endpoint reaches a server endpoint without
        C{native}: the relay bridges the native sender to the WebSocket
        listener.
        """
        joins = watchJoins(self)
        await self.listen("hyco", Counted())
        await self.echoed(clientFromString(reactor, self.description("hyco", native="yes")))
        self.assertEqual(joins, ["HybridConnectionProtocol"])

    async def test_peerAddress(self) -> None:
        """
        The server's protocol sees the sender's address as the relay saw it.
        """
        await self.listen("hyco", Factory.forProtocol(Greeting))
        proto = await clientFromString(reactor, self.description("hyco")).connect(Factory.forProtocol(Collect))
        await until(lambda: proto.received.endswith(b"\r\n"))
        self.assertEqual(proto.received, b"hello 127.0.0.1 via hyco\r\n")

    async def test_anonymousSender(self) -> None:
        """
        A client with no credential sends no token: fine for an entity that
        takes anonymous senders, refused by the others.
        """
        await self.listen("open", Factory.forProtocol(Echo))
        await self.listen("hyco", Factory.forProtocol(Echo))
        proto = await clientFromString(reactor, self.description("open", "")).connect(Factory.forProtocol(Collect))
        proto.transport.write(b"anyone")
        await until(lambda: proto.received == b"anyone")
        proto.transport.loseConnection()
        await proto.ended
        with self.assertRaises(AuthorizationError):
            await clientFromString(reactor, self.description("hyco", "")).connect(Factory.forProtocol(Collect))

    async def test_tokens(self) -> None:
        """
        A listener with a token file, a sender with a token in the
        environment.
        """
        tokenFile = self.files.write("listen.token", self.relay.token("hyco"))
        await self.listen("hyco", Factory.forProtocol(Echo), f"tokenFile={escape(tokenFile)}")
        name = self.files.env(self.relay.token("hyco"))
        proto = await clientFromString(reactor, self.description("hyco", f"tokenEnv={name}")).connect(Factory.forProtocol(Collect))
        proto.transport.write(b"tok")
        await until(lambda: proto.received == b"tok")
        proto.transport.loseConnection()
        await proto.ended

    async def test_acceptHandler(self) -> None:
        """
        An accept handler given in Python decides on each sender.
        """
        endpoint = RelayServerEndpoint(
            reactor, self.url, "hyco", lambda r: self.relay.token("hyco"), acceptHandler=lambda request: (451, "Go away")
        )
        port = await endpoint.listen(Factory.forProtocol(Echo))
        self.addCleanup(port.stopListening)
        with self.assertRaises(RejectedError) as e:
            await clientFromString(reactor, self.description("hyco")).connect(Factory.forProtocol(Collect))
        self.assertEqual((e.exception.status, e.exception.reason), (451, "Go away"))

    async def test_cancelConnect(self) -> None:
        """
        Cancelling a connection attempt drops it at once: the relay forgets
        the sender, a late accept finds nothing, and neither side builds a
        protocol.
        """
        decisions: list[Deferred[bool]] = []
        served: list[Collect] = []

        def decide(request: Any) -> Deferred[bool]:
            decisions.append(Deferred())
            return decisions[-1]

        endpoint = RelayServerEndpoint(reactor, self.url, "hyco", lambda r: self.relay.token("hyco"), acceptHandler=decide)
        port = await endpoint.listen(Factory.forProtocol(lambda: served.append(Collect()) or served[-1]))
        self.addCleanup(port.stopListening)
        built: list[Any] = []
        client = clientFromString(reactor, self.description("hyco"))
        connecting = client.connect(Factory.forProtocol(lambda: built.append(Collect()) or built[-1]))
        await until(lambda: bool(decisions))
        connecting.cancel()
        self.failureResultOf(connecting, CancelledError)
        await until(lambda: len(self.relay.relay.rendezvous) == 0)
        decisions[0].callback(True)
        await deferLater(reactor, 0.3, lambda: None)
        self.assertEqual((built, served), ([], []))

    async def test_refused(self) -> None:
        """
        listen() fails with the relay's refusal, and leaves nothing
        listening and the factory stopped.
        """
        factory = Counted()
        wrongKey = self.files.write("wrong", "d3Jvbmcta2V5")
        with self.assertRaises(RelayRefused) as e:
            await serverFromString(reactor, self.description("hyco", f"keyFile={escape(wrongKey)}")).listen(factory)
        self.assertEqual(e.exception.status, 401)
        with self.assertRaises(RelayRefused) as e:
            await serverFromString(reactor, self.description("nowhere")).listen(factory)
        self.assertEqual(e.exception.status, 404)
        self.assertEqual((factory.starts, factory.stops, factory.numPorts), (2, 2, 0))

    async def test_unreachable(self) -> None:
        factory = Counted()
        endpoint = RelayServerEndpoint(reactor, "ws://127.0.0.1:1", "hyco", lambda r: "SharedAccessSignature x")
        with self.assertRaises(ConnectionRefusedError):
            await endpoint.listen(factory)
        self.assertEqual(factory.numPorts, 0)

    async def test_cancel(self) -> None:
        """
        Cancelling listen() closes the listener.
        """
        factory = Counted()
        listening = serverFromString(reactor, self.description("hyco")).listen(factory)
        listening.cancel()
        self.failureResultOf(listening, CancelledError)
        await deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(factory.numPorts, 0)
        with self.assertRaises(NoListenerError):
            await clientFromString(reactor, self.description("hyco")).connect(Factory.forProtocol(Collect))

    async def test_service(self) -> None:
        """
        Under a L{StreamServerEndpointService}, as twistd runs it: started,
        serving, stopped; and stopped before it was online.
        """
        factory = Counted()
        service = StreamServerEndpointService(serverFromString(reactor, self.description("hyco")), factory)
        service.startService()
        proto = await connectWhenListening(clientFromString(reactor, self.description("hyco")))
        proto.transport.write(b"svc")
        await until(lambda: proto.received == b"svc")
        await service.stopService()
        await proto.ended
        self.assertEqual(factory.numPorts, 0)
        early = StreamServerEndpointService(serverFromString(reactor, self.description("hyco")), factory)
        early.startService()
        await early.stopService()
        self.assertEqual(factory.numPorts, 0)

    async def test_site(self) -> None:
        """
        A site served with serverFromString answers plain HTTP clients
        through the relay's HTTP path, mounted at /ENTITY/, and Twisted
        clients over relayed streams, at its own paths.
        """
        site = helloSite()
        await self.listen("web", site)
        agent = Agent(reactor)
        headers = Headers({"ServiceBusAuthorization": [self.relay.token("web")]})
        response = await agent.request(b"GET", f"http://{self.relay.host}/web/hello?x=1".encode(), headers)
        self.assertEqual((response.code, await readBody(response)), (200, b"hello from /web/hello?x=1"))
        response = await agent.request(b"GET", f"http://{self.relay.host}/web/data".encode(), headers)
        self.assertEqual(await readBody(response), b"x" * 200000)

        streams = Agent.usingEndpointFactory(reactor, RelayedStreams(clientFromString(reactor, self.description("web"))))
        response = await streams.request(b"GET", b"http://web/hello?y=2")
        self.assertEqual((response.code, await readBody(response)), (200, b"hello from /hello?y=2"))
        response = await streams.request(b"GET", b"http://web/data")
        self.assertEqual(await readBody(response), b"x" * 200000)
        response = await streams.request(b"GET", b"http://web/missing")
        self.assertEqual(response.code, 404)
        await readBody(response)

    async def test_siteStopsWithPort(self) -> None:
        site = helloSite()
        port = await self.listen("web", site)
        self.assertEqual(site.numPorts, 1)
        await port.stopListening()
        self.assertEqual(site.numPorts, 0)


class TlsTests(TestCase):
    timeout = 60

    async def test_caCert(self) -> None:
        """
        A wss relay with its own certificate authority, named by caCert.
        """
        relay = RelayFixture(self, ["--entity", "hyco"], tls=True)
        assert relay.certPath is not None
        files = Files(self)
        key = files.write("key", KEY)
        description = (
            f"relay:hyco:url=wss\\://127.0.0.1\\:{relay.port}:keyName={KEY_NAME}:keyFile={escape(key)}"
            f":caCert={escape(relay.certPath)}"
        )
        port = await serverFromString(reactor, description).listen(Factory.forProtocol(Echo))
        self.addCleanup(port.stopListening)
        proto = await clientFromString(reactor, description + ":timeout=10").connect(Factory.forProtocol(Collect))
        proto.transport.write(b"secure")
        await until(lambda: proto.received == b"secure")
        proto.transport.loseConnection()
        await proto.ended
        untrusted = description.split(":caCert=")[0]
        with self.assertRaises(RelayConnectError) as e:
            await clientFromString(reactor, untrusted).connect(Factory.forProtocol(Collect))
        self.assertIn("certificate verify failed", str(e.exception))

# -*- test-case-name: relaynet.test.test_endpoints -*-
"""
C{relay:} endpoints: a Twisted server listens, and a Twisted client
connects, through a Hybrid Connections relay, as if over TCP.

L{RelayServerEndpoint} listens with a L{HybridListener
<relaynet.listener.HybridListener>}: every relayed stream a sender opens
becomes a connection of the listening factory's protocol.  If the factory
is a L{twisted.web.server.Site}, the entity's relayed HTTP requests (plain
HTTP clients sending to C{http://RELAY/ENTITY/...}) go to the same site.
L{RelayClientEndpoint} connects with L{connectStream
<relaynet.streams.connectStream>}.  Either may use native streams
(L{relaynet.native}: raw bytes on the connection to the relay, no WebSocket
framing), a relaynet extension that Azure Relay refuses.

The string parsers are C{twistd} and L{serverFromString
<twisted.internet.endpoints.serverFromString>} /
L{clientFromString <twisted.internet.endpoints.clientFromString>}
plugins with the prefix C{relay}::

    relay:ENTITY:url=ws\\://127.0.0.1\\:9090[:keyName=RULE]
        [:keyFile=PATH | :keyEnv=VAR | :tokenFile=PATH | :tokenEnv=VAR]
        [:caCert=PATH][:timeout=SECONDS][:native=yes|no]

Secrets come from files or environment variables only.  C{timeout} is for
client endpoints only.  C{native=yes} makes a client endpoint open native
streams, and a server endpoint accept its streams as native streams; the
other side of a stream may be native or not either way.  C{native} takes
C{yes}, C{no}, C{true} or C{false} (in any case); the default is C{no}.

This module imports only Twisted and zope at the top: C{twistd} and every
program that looks up endpoint plugins import it.  relaynet's own modules
are imported when an endpoint is made or used.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from typing import Protocol as TypingProtocol
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import IPlugin
from zope.interface import implementer

if TYPE_CHECKING:
    from relaynet.listener import HybridListener
    from relaynet.streams import RelayAddress
    from relaynet.tokens import TokenProvider

__all__ = [
    "DEFAULT_KEY_NAME",
    "RelayClientEndpoint",
    "RelayClientParser",
    "RelayListeningPort",
    "RelayServerEndpoint",
    "RelayServerParser",
    "normaliseRelayUrl",
]

DEFAULT_KEY_NAME = "RootManageSharedAccessKey"
CONNECT_TIMEOUT = 70.0
TOKEN_PREFIX = "SharedAccessSignature "
_PENDING = object()

_SECRETS = ("keyFile", "keyEnv", "tokenFile", "tokenEnv")
_SERVER_PARAMETERS = ("url", "keyName", *_SECRETS, "caCert", "native")
_CLIENT_PARAMETERS = (*_SERVER_PARAMETERS, "timeout")
# Names under which someone might try to pass a secret inline.
_INLINE_SECRETS = frozenset(
    {"key", "sharedaccesskey", "accesskey", "token", "sastoken", "sas", "sharedaccesssignature", "signature", "sig",
     "secret", "password", "connectionstring"}
)
_INLINE_MARKERS = ("sharedaccesskey=", "sharedaccesssignature ")
_SYNTAX = (
    "relay:ENTITY:url=ws\\://HOST\\:PORT[:keyName=RULE]"
    "[:keyFile=PATH|:keyEnv=VAR|:tokenFile=PATH|:tokenEnv=VAR][:caCert=PATH][:timeout=SECONDS][:native=yes|no]"
)
_YES = ("yes", "true")
_NO = ("no", "false")


def normaliseRelayUrl(url: str) -> str:
    """
    The relay's base URL as the listener and sender connect to it.

    C{ws://host[:port]} and C{wss://host[:port]} stay as they are (less a
    trailing C{/}); a namespace address C{sb://host[:port]}, as in a
    connection string's C{Endpoint=}, becomes C{wss://host[:port]}.

    @raise ValueError: for any other scheme, no host, a bad port, or a
        path, query, fragment or user name.
    """
    text = url.strip()
    if any(marker in text.lower() for marker in _INLINE_MARKERS):
        raise ValueError(
            "relay: url must be the relay's address only, not a connection string or token: "
            "put the key in keyFile=PATH or keyEnv=VAR"
        )
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"relay: url {url!r} is not a valid URL ({e}); escape its colons: url=ws\\://HOST\\:PORT") from None
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss", "sb"):
        raise ValueError(f"relay: url {url!r} must start with ws://, wss:// or sb://")
    if not parts.hostname:
        raise ValueError(f"relay: url {url!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"relay: url {url!r} must not contain a user name or password")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(
            f"relay: url {url!r} must be the relay's address only (no path, query or fragment); "
            "the entity is the first field: relay:ENTITY:url=..."
        )
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    return f"{'wss' if scheme == 'sb' else scheme}://{host}" + (f":{port}" if port is not None else "")


@implementer(IStreamClientEndpoint)
class RelayClientEndpoint:
    """
    Connects a protocol to a listener of an entity, through the relay, over
    a relayed stream: a WebSocket the relay splices to the listener's, or
    with C{native=True} a native stream (L{relaynet.native}), whose bytes
    travel on the connection to the relay with no WebSocket framing.

    Connecting fails with the exceptions of L{relaynet.streams}:
    L{NoListenerError <relaynet.streams.NoListenerError>},
    L{EndpointNotFoundError <relaynet.streams.EndpointNotFoundError>},
    L{AuthorizationError <relaynet.streams.AuthorizationError>},
    L{RejectedError <relaynet.streams.RejectedError>} or
    L{ConnectTimeoutError <relaynet.streams.ConnectTimeoutError>}.
    """

    def __init__(
        self,
        reactor: Any,
        relayUrl: str,
        entity: str,
        tokenProvider: TokenProvider | None,
        headers: Mapping[str, str] | None = None,
        timeout: float = CONNECT_TIMEOUT,
        trustRoot: Any = None,
        native: bool = False,
    ) -> None:
        """
        @param reactor: provides C{IReactorTCP}, C{IReactorTime} and
            C{IReactorPluggableNameResolver}.
        @param relayUrl: the relay, C{ws://host:port}, C{wss://host[:port]}
            or C{sb://host[:port]} (which means C{wss}).
        @param entity: the hybrid connection's name; it may contain C{/}.
        @param tokenProvider: gives tokens with the Send right (see
            L{relaynet.tokens}); L{None} sends none, for an entity that
            takes anonymous senders.
        @param headers: more headers for the listener to see.
        @param timeout: seconds to wait for a listener to accept.
        @param trustRoot: for C{wss}, the certificate authority to trust, as
            for L{optionsForClientTLS <twisted.internet.ssl.optionsForClientTLS>};
            the platform's by default.
        @param native: open native streams: raw bytes on the connection to
            the relay, no WebSocket framing.  A relaynet extension: Azure
            Relay refuses it.  The listener may be native or not.
        """
        if not timeout > 0 or not math.isfinite(timeout):
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        self._reactor = reactor
        self.relayUrl = normaliseRelayUrl(relayUrl)
        self.entity = _entityName(entity)
        self.tokenProvider = tokenProvider
        self.headers = dict(headers or {})
        self.timeout = float(timeout)
        self.trustRoot = trustRoot
        self.native = bool(native)

    @property
    def anonymous(self) -> bool:
        """
        Whether this endpoint sends no token.
        """
        return self.tokenProvider is None

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """
        Connect a protocol from C{protocolFactory} to a listener.

        @return: fires with the protocol once a listener has accepted.
        """
        from relaynet.streams import connectStream

        guard = _Guard(protocolFactory)
        connecting = connectStream(
            self._reactor,
            self.relayUrl,
            self.entity,
            self.tokenProvider,
            guard,
            headers=self.headers,
            timeout=self.timeout,
            trustRoot=self.trustRoot,
            native=self.native,
        )

        def cancel(result: Deferred[IProtocol]) -> None:
            guard.refusing = True
            connecting.cancel()

        result: Deferred[IProtocol] = Deferred(cancel)
        connecting.chainDeferred(result)  # type: ignore[arg-type]
        return result

    def __repr__(self) -> str:
        return f"<RelayClientEndpoint {self.entity!r} on {self.relayUrl}>"


@implementer(IProtocolFactory)
class _Guard:
    """
    The factory a relayed stream builds its protocol with: once the
    connection attempt is cancelled, it builds none, and a stream that a
    listener accepts too late is closed.
    """

    def __init__(self, factory: IProtocolFactory) -> None:
        self._factory = factory
        self.refusing = False

    def buildProtocol(self, addr: Any) -> IProtocol | None:
        if self.refusing:
            return None
        return self._factory.buildProtocol(addr)

    def doStart(self) -> None:
        self._factory.doStart()

    def doStop(self) -> None:
        self._factory.doStop()


@implementer(IListeningPort)
class RelayListeningPort:
    """
    A listener registered with the relay, as a listening port.

    @ivar listener: the L{HybridListener <relaynet.listener.HybridListener>}
        underneath; it reconnects by itself if the relay drops it.
    @ivar factory: the factory whose protocols get the relayed streams.
    """

    def __init__(self, serving: _Serving, factory: IProtocolFactory, address: RelayAddress) -> None:
        self.listener = serving.listener
        self.factory = factory
        self._serving = serving
        self._address = address
        self._stopping: Deferred[None] | None = None
        self._waiting: list[Deferred[None]] = []
        self._outcome: Any = _PENDING

    @property
    def status(self) -> str:
        """
        The listener's status: C{"online"}, C{"reconnecting"}, ... (see
        L{HybridListener <relaynet.listener.HybridListener>}).
        """
        return self.listener.status

    def startListening(self) -> None:
        """
        Nothing to do: the port is listening once C{listen()} has given it.

        @raise RuntimeError: if it has been stopped; listen on the endpoint
            again instead.
        """
        if self._stopping is not None:
            raise RuntimeError("A stopped relay port cannot be restarted: call the endpoint's listen() again.")

    def stopListening(self) -> Deferred[None]:
        """
        Close the listener: its control channel, its rendezvous sockets and
        the streams it accepted (unlike a TCP port's connections, they do
        not outlive it); then stop the factory.

        @return: fires once all of them are closed; every call gets the
            same outcome.
        """
        if self._stopping is None:
            self._stopping = Deferred.fromCoroutine(self._stop())
            self._stopping.addBoth(self._stopped)
        waiter: Deferred[None] = Deferred()
        if self._outcome is _PENDING:
            self._waiting.append(waiter)
        else:
            waiter.callback(self._outcome)
        return waiter

    async def _stop(self) -> None:
        await self._serving.close()

    def _stopped(self, result: Any) -> None:
        # None, or the Failure of close(): every caller gets it.
        self._outcome = result
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(result)

    def getHost(self) -> RelayAddress:
        """
        The relay and entity this port listens on.
        """
        return self._address

    def __repr__(self) -> str:
        return f"<RelayListeningPort {self._address.entity!r} on {self._address.relayUrl}>"


@implementer(IStreamServerEndpoint)
class RelayServerEndpoint:
    """
    Listens on an entity of a relay: each relayed stream a sender opens is
    a connection for the listening factory's protocol.

    If the factory is a L{twisted.web.server.Site}, the site also answers
    the entity's relayed HTTP requests (senders that send plain HTTP to
    C{http://RELAY/ENTITY/...}), mounted at C{/ENTITY/}, as
    L{relaynet.web.WebListener} serves it.  Over a relayed stream, the
    sender speaks HTTP to the site directly, and its paths are the site's.
    """

    def __init__(
        self,
        reactor: Any,
        relayUrl: str,
        entity: str,
        tokenProvider: TokenProvider,
        acceptHandler: Any = None,
        trustRoot: Any = None,
        native: bool = False,
    ) -> None:
        """
        @param reactor: provides C{IReactorTCP}, C{IReactorTime} and
            C{IReactorPluggableNameResolver}.
        @param relayUrl: the relay, C{ws://host:port}, C{wss://host[:port]}
            or C{sb://host[:port]} (which means C{wss}).
        @param entity: the hybrid connection's name; it may contain C{/}.
        @param tokenProvider: gives tokens with the Listen right (see
            L{relaynet.tokens}).
        @param acceptHandler: decides whether to accept each sender, as for
            L{HybridListener <relaynet.listener.HybridListener>}; all are
            accepted by default.
        @param trustRoot: for C{wss}, the certificate authority to trust;
            the platform's by default.
        @param native: accept senders' streams as native streams: raw
            bytes on the listener's connection to the relay, no WebSocket
            framing.  A relaynet extension: Azure Relay refuses it.  Senders
            may be native or not.  Relayed HTTP requests to a site are not
            affected.
        """
        if tokenProvider is None:
            raise ValueError("a relay server endpoint needs a token provider with the Listen right")
        self._reactor = reactor
        self.relayUrl = normaliseRelayUrl(relayUrl)
        self.entity = _entityName(entity)
        self.tokenProvider = tokenProvider
        self.acceptHandler = acceptHandler
        self.trustRoot = trustRoot
        self.native = bool(native)

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        """
        Register a listener with the relay, and start the factory.

        @return: fires with a L{RelayListeningPort} once the relay has
            registered the listener, or fails with the relay's refusal
            (L{RelayRefused <relaynet.listener.RelayRefused>}, with its
            status) or a connection error; then nothing is left listening.
            Cancelling it closes the listener.
        """
        from twisted.web.server import Site

        from relaynet.listener import HybridListener
        from relaynet.streams import RelayAddress
        from relaynet.web import WebListener

        serving: _Serving
        if isinstance(protocolFactory, Site):
            serving = WebListener(
                self._reactor,
                self.relayUrl,
                self.entity,
                self.tokenProvider,
                protocolFactory,
                streamFactory=protocolFactory,
                acceptHandler=self.acceptHandler,
                trustRoot=self.trustRoot,
                native=self.native,
            )
        else:
            listener = HybridListener(
                self._reactor,
                self.relayUrl,
                self.entity,
                self.tokenProvider,
                streamFactory=protocolFactory,
                acceptHandler=self.acceptHandler,
                trustRoot=self.trustRoot,
                native=self.native,
            )
            serving = _StreamListener(listener, protocolFactory)
        port = RelayListeningPort(serving, protocolFactory, RelayAddress(self.relayUrl, self.entity))
        return Deferred.fromCoroutine(self._listen(serving, port))  # type: ignore[arg-type]

    async def _listen(self, serving: _Serving, port: RelayListeningPort) -> RelayListeningPort:
        try:
            await serving.listen()
        except BaseException:
            # Refused, failed or cancelled: leave nothing connecting.  The
            # factory has been stopped already.
            await serving.listener.close()
            raise
        return port

    def __repr__(self) -> str:
        return f"<RelayServerEndpoint {self.entity!r} on {self.relayUrl}>"


class _Serving(TypingProtocol):
    """
    What a L{RelayListeningPort} runs: a L{WebListener
    <relaynet.web.WebListener>} for a site, a L{_StreamListener} for
    anything else.
    """

    listener: HybridListener

    def listen(self) -> Deferred[None]:
        """
        Start the factory and listen; if that fails, stop the factory.
        """

    def close(self) -> Deferred[None]:
        """
        Stop listening, then stop the factory.
        """


class _StreamListener:
    """
    A L{HybridListener <relaynet.listener.HybridListener>} for the
    streams of any protocol factory, started and stopped as a port does.
    """

    def __init__(self, listener: HybridListener, factory: IProtocolFactory) -> None:
        self.listener = listener
        self.factory = factory

    def listen(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._listen())

    async def _listen(self) -> None:
        self.factory.doStart()
        try:
            await self.listener.listen()
        except BaseException:
            self.factory.doStop()
            raise

    def close(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        try:
            await self.listener.close()
        finally:
            self.factory.doStop()


def _entityName(name: str) -> str:
    from relaynet.entities import validEntityName

    try:
        return validEntityName(name)
    except ValueError as e:
        raise ValueError(f"relay: {e}") from None


# The string parsers.


@dataclass
class _Parsed:
    url: str
    entity: str
    tokenProvider: TokenProvider | None
    trustRoot: Any
    timeout: float
    native: bool


def _parse(reactor: Any, rawArgs: tuple[object, ...], rawKwargs: dict[str, object], server: bool) -> _Parsed:
    """
    Check and convert a C{relay:} description's fields.

    @raise ValueError: saying what is wrong and how to write it.
    """
    args = tuple(str(arg) for arg in rawArgs)
    kwargs = {name: str(value) for name, value in rawKwargs.items()}
    known = _SERVER_PARAMETERS if server else _CLIENT_PARAMETERS
    for name in kwargs:
        _checkName(name, known, server)
    for value in [*args, *kwargs.values()]:
        if any(marker in value.lower() for marker in _INLINE_MARKERS):
            raise ValueError(
                "relay: a key or token must not be written in the endpoint string (it would show in process "
                "lists and shell history): use keyFile=PATH or keyEnv=VAR (or tokenFile=PATH or tokenEnv=VAR)"
            )
    if not args:
        raise ValueError(f"relay: the entity's name is missing: {_SYNTAX}")
    if len(args) > 1:
        raise ValueError(
            f"relay: unexpected field {args[1]!r} after the entity {args[0]!r}; a value with colons in it, "
            f"such as the url, must escape them with a backslash: url=ws\\://HOST\\:PORT ({_SYNTAX})"
        )
    if "url" not in kwargs:
        raise ValueError(f"relay: url is missing: {_SYNTAX}")
    for name, value in kwargs.items():
        if not value.strip():
            raise ValueError(f"relay: {name}= needs a value")
    url = normaliseRelayUrl(kwargs["url"])
    entity = _entityName(args[0])
    tokens = _tokenProvider(reactor, kwargs, server)
    trustRoot = _trustRoot(url, kwargs.get("caCert"))
    timeout = _timeout(kwargs.get("timeout"))
    native = _native(kwargs.get("native"))
    return _Parsed(url, entity, tokens, trustRoot, timeout, native)


def _checkName(name: str, known: tuple[str, ...], server: bool) -> None:
    if name in known:
        return
    if name.lower() in _INLINE_SECRETS:
        raise ValueError(
            f"relay: {name}= would put a secret in the endpoint string, where process lists and shell "
            "history show it: put the key in a file (keyFile=PATH) or an environment variable (keyEnv=VAR), "
            "or a token in tokenFile=PATH or tokenEnv=VAR"
        )
    if name == "timeout" and server:
        raise ValueError("relay: timeout= is for client endpoints; a relay server endpoint reconnects by itself")
    for candidate in known:
        if candidate.lower() == name.lower():
            raise ValueError(f"relay: unknown parameter {name}=; did you mean {candidate}=?")
    raise ValueError(f"relay: unknown parameter {name}=; the parameters are {', '.join(known)}")


def _tokenProvider(reactor: Any, kwargs: dict[str, str], server: bool) -> TokenProvider | None:
    from relaynet import tokens

    given = [name for name in _SECRETS if name in kwargs]
    if len(given) > 1:
        raise ValueError(f"relay: give one of keyFile, keyEnv, tokenFile or tokenEnv, not {' and '.join(given)}")
    if not given:
        if "keyName" in kwargs:
            raise ValueError("relay: keyName= needs the rule's key: add keyFile=PATH or keyEnv=VAR")
        if server:
            raise ValueError(
                "relay: a server endpoint needs a credential with the Listen right: "
                "keyFile=PATH, keyEnv=VAR, tokenFile=PATH or tokenEnv=VAR"
            )
        return None
    source = given[0]
    if source in ("tokenFile", "tokenEnv") and "keyName" in kwargs:
        raise ValueError(f"relay: keyName= goes with keyFile or keyEnv; a token from {source} names its own rule")
    if source == "keyFile":
        key = _readFile(kwargs["keyFile"], "keyFile").strip()
        if not key:
            raise ValueError(f"relay: keyFile {kwargs['keyFile']!r} is empty")
        return tokens.fromKey(_keyName(kwargs.get("keyName")), key, reactor)
    if source == "keyEnv":
        key = _environment(kwargs["keyEnv"], "keyEnv").strip()
        return tokens.fromKey(_keyName(kwargs.get("keyName")), key, reactor)
    if source == "tokenEnv":
        return tokens.fixedToken(_checkToken(_environment(kwargs["tokenEnv"], "tokenEnv"), f"tokenEnv {kwargs['tokenEnv']}"))
    path = kwargs["tokenFile"]
    _readToken(path)

    def fromFile(resource: str) -> str:
        return _readToken(path)

    return tokens.fromCallable(fromFile)


def _keyName(name: str | None) -> str:
    if name is None:
        return DEFAULT_KEY_NAME
    if any(c.isspace() for c in name) or not name.isprintable() or any(c in name for c in "&=%"):
        raise ValueError(f"relay: keyName {name!r} is not a rule name")
    return name


def _readFile(path: str, what: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"relay: cannot read {what} {path!r}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"relay: {what} {path!r} is not text") from None


def _environment(name: str, what: str) -> str:
    value = os.environ.get(name)
    if value is None:
        raise ValueError(f"relay: environment variable {name} ({what}) is not set")
    if not value.strip():
        raise ValueError(f"relay: environment variable {name} ({what}) is empty")
    return value


def _checkToken(text: str, where: str) -> str:
    token = text.strip()
    if not token.startswith(TOKEN_PREFIX):
        raise ValueError(f"relay: {where} does not hold a SAS token (the whole 'SharedAccessSignature sr=...' text)")
    return token


def _readToken(path: str) -> str:
    """
    The token in C{path}, read afresh: another process may rotate it.
    """
    return _checkToken(_readFile(path, "tokenFile"), f"tokenFile {path!r}")


def _trustRoot(url: str, path: str | None) -> Any:
    if path is None:
        return None
    if not url.startswith("wss:"):
        raise ValueError(f"relay: caCert= is for a wss:// (or sb://) relay, and the url is {url}")
    from twisted.internet.ssl import Certificate

    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise ValueError(f"relay: cannot read caCert {path!r}: {e.strerror or e}") from None
    try:
        return Certificate.loadPEM(pem)
    except Exception:
        raise ValueError(f"relay: caCert {path!r} is not a PEM certificate") from None


def _timeout(text: str | None) -> float:
    if text is None:
        return CONNECT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"relay: timeout={text} is not a number of seconds") from None
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"relay: timeout={text} must be a positive number of seconds")
    return value


def _native(text: str | None) -> bool:
    if text is None:
        return False
    value = text.lower()
    if value in _YES:
        return True
    if value in _NO:
        return False
    raise ValueError(f"relay: native={text} must be yes or no (or true or false)")


@implementer(IPlugin, IStreamServerEndpointStringParser)
class RelayServerParser:
    """
    C{relay:ENTITY:url=...:keyFile=PATH[:native=yes]}: listen on an entity
    of a relay; with C{native=yes}, accept streams as native streams.
    """

    prefix = "relay"

    def parseStreamServer(self, reactor: Any, *args: object, **kwargs: object) -> RelayServerEndpoint:
        parsed = _parse(reactor, args, kwargs, server=True)
        assert parsed.tokenProvider is not None
        return RelayServerEndpoint(
            reactor, parsed.url, parsed.entity, parsed.tokenProvider, trustRoot=parsed.trustRoot, native=parsed.native
        )


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class RelayClientParser:
    """
    C{relay:ENTITY:url=...[:keyFile=PATH][:native=yes]}: connect to a
    listener of an entity through a relay; with no credential, send no
    token; with C{native=yes}, over a native stream.
    """

    prefix = "relay"

    def parseStreamClient(self, reactor: Any, *args: object, **kwargs: object) -> RelayClientEndpoint:
        parsed = _parse(reactor, args, kwargs, server=False)
        return RelayClientEndpoint(
            reactor,
            parsed.url,
            parsed.entity,
            parsed.tokenProvider,
            timeout=parsed.timeout,
            trustRoot=parsed.trustRoot,
            native=parsed.native,
        )

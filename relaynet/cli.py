# -*- test-case-name: relaynet.test.test_cli -*-
"""
The C{relaynet} command: SAS tokens, TCP forwarding and netcat-style stdio
through a relay that speaks the Hybrid Connections protocol.

    relaynet token   --relay URL --entity NAME [--ttl SECONDS]
    relaynet forward --relay URL --entity NAME --local [HOST:]PORT [--native]
    relaynet forward --relay URL --entity NAME --serve --target HOST:PORT [--native]
    relaynet listen  --relay URL --entity NAME [--native]
    relaynet connect --relay URL --entity NAME [--native]

Keys and tokens come from files or the environment, never from the command
line: C{--key-file} or C{RELAYNET_KEY}, C{--token-file} or
C{RELAYNET_TOKEN}, or a connection string in C{RELAYNET_CONNECTION_STRING}.

Exit codes: 0 done (or stopped by SIGINT/SIGTERM), 1 a failure (refused,
unreachable relay), 2 bad options.  Every expected failure is one line on
standard error.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, NoReturn, TypeVar, cast

from twisted.internet import error as netError
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredQueue,
    maybeDeferred,
)
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
)
from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    IListeningPort,
    IPushProducer,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import react
from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogEvent,
    LogLevel,
    PredicateResult,
    formatEvent,
    globalLogBeginner,
)
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from relaynet.auth import mintToken
from relaynet.listener import AcceptHandler, AcceptRequest, HybridListener, RelayRefused
from relaynet.logs import setLogLevel
from relaynet.streams import (
    AuthorizationError,
    ConnectTimeoutError,
    EndpointNotFoundError,
    NoListenerError,
    RejectedError,
    RelayConnectError,
    connectStream,
    resourceUri,
)
from relaynet.tap import positiveNumber
from relaynet.tokens import TokenProvider, fixedToken, fromKey

__all__ = ["main", "run", "RelayOptions", "parseConnectionString", "relayUrl", "parseHostPort"]

_T = TypeVar("_T")

ENV_KEY = "RELAYNET_KEY"
ENV_TOKEN = "RELAYNET_TOKEN"
ENV_CONNECTION_STRING = "RELAYNET_CONNECTION_STRING"
DEFAULT_KEY_NAME = "RootManageSharedAccessKey"
DEFAULT_TTL = 3600
CONNECT_TIMEOUT = 70.0
TARGET_TIMEOUT = 30.0
SHUTDOWN_GRACE = 5.0
"""
Seconds open connections have to close cleanly at shutdown before they are
aborted.
"""

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CommandFailed(Exception):
    """
    An expected failure: its message is the one line the user sees.
    """


class _HelpShown(Exception):
    """
    C{--help}: the text to show on standard output, then exit 0.
    """


# Parsing addresses, keys and connection strings.


def parseConnectionString(text: str) -> dict[str, str]:
    """
    Split C{Endpoint=sb://host/;SharedAccessKeyName=...;SharedAccessKey=...}
    into its fields, with lower-cased names.

    @raise ValueError: if a part is not C{name=value}.
    """
    fields: dict[str, str] = {}
    for part in text.strip().split(";"):
        if not part.strip():
            continue
        name, equals, value = part.partition("=")
        if not equals or not name.strip():
            raise ValueError("expected name=value parts separated by ';'")
        fields[name.strip().lower()] = value.strip()
    if "endpoint" not in fields:
        raise ValueError("it has no Endpoint=sb://HOST/")
    return fields


def relayUrl(text: str, noTls: bool = False) -> str:
    """
    The C{ws://} or C{wss://} base URL of a relay address.

    C{sb://host[:port]} means C{wss://host[:port]}, as in Microsoft's
    clients, or C{ws://host[:port]} with C{noTls}; C{http} and C{https} mean
    C{ws} and C{wss}.

    @raise ValueError: for another scheme, no host, a bad port, or a path.
    """
    match = re.fullmatch(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#@]+)/?", text.strip())
    if match is None:
        raise ValueError(f"the relay {text!r} is not a ws://HOST:PORT, wss://HOST or sb://HOST address")
    scheme, netloc = match.group(1).lower(), match.group(2)
    scheme = {"sb": "ws" if noTls else "wss", "http": "ws", "https": "wss"}.get(scheme, scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"the relay {text!r} is not a ws://, wss:// or sb:// address")
    hostPort = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+)(?::(\d{1,5}))?", netloc)
    if hostPort is None or (hostPort.group(2) is not None and not 0 < int(hostPort.group(2)) < 65536):
        raise ValueError(f"the relay {text!r} has a bad host or port")
    return f"{scheme}://{netloc}"


def parseHostPort(text: str, defaultHost: str | None = None) -> tuple[str, int]:
    """
    Parse C{HOST:PORT}, C{[IPv6]:PORT} or, with a C{defaultHost}, C{PORT}.

    @raise ValueError: if it is none of these.
    """
    match = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]|([^:\[\]]+)):(\d{1,5})|(\d{1,5})", text.strip())
    if match is None or (match.group(4) is not None and defaultHost is None):
        raise ValueError(f"{text!r} is not HOST:PORT" if defaultHost is None else f"{text!r} is not [HOST:]PORT")
    host = match.group(1) or match.group(2) or cast(str, defaultHost)
    port = int(match.group(3) or match.group(4))
    if port > 65535:
        raise ValueError(f"{text!r} has a port above 65535")
    return host, port


def _readSecret(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except OSError as e:
        raise usage.UsageError(f"cannot read the {what} file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise usage.UsageError(f"the {what} file {path} is not UTF-8 text") from None
    if not text:
        raise usage.UsageError(f"the {what} file {path} is empty")
    return text


@dataclass(frozen=True)
class Relay:
    """
    Where to connect and how to authorize, from the options, the
    environment and a connection string.

    @ivar url: the relay's base URL, C{ws://host:port} or C{wss://host[:port]}.
    @ivar entity: the hybrid connection; C{""} for the namespace (tokens).
    @ivar keyName: the SAS rule that signs tokens.
    @ivar key: the rule's key, or C{None}.
    @ivar token: a ready SAS token to use as it is, or C{None}.
    @ivar trustRoot: the certificate authority for C{wss}, or C{None} for
        the platform's.
    """

    url: str
    entity: str
    keyName: str
    key: str | None = field(repr=False)
    token: str | None = field(repr=False)
    trustRoot: Any = None

    def tokens(self, clock: Any, ttl: int = DEFAULT_TTL) -> TokenProvider | None:
        """
        The token provider: the fixed token, fresh tokens signed with the
        key, or C{None} (no token: only for anonymous senders).
        """
        if self.token is not None:
            return fixedToken(self.token)
        if self.key is not None:
            return fromKey(self.keyName, self.key, clock, ttl)
        return None

    @property
    def where(self) -> str:
        return f"'{self.entity}' on {self.url}"


# Options.


class _Options(usage.Options):
    def opt_help(self) -> NoReturn:
        """
        Display this help and exit.
        """
        raise _HelpShown(str(self))

    def opt_version(self) -> NoReturn:
        """
        Display the version of relaynet and exit.
        """
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version("relaynet")
        except PackageNotFoundError:
            text = "unknown"
        raise _HelpShown(f"relaynet {text}")


class RelayOptions(_Options):
    """
    What every command takes: the relay, the entity, and a key or a token.
    """

    entityRequired = True
    credentialsRequired = False
    optFlags = [
        ["no-tls", None, "An sb:// relay address means ws:// (a relay without TLS), not wss://."],
        ["verbose", "v", "Log what the relay client does, on standard error."],
    ]
    optParameters = [
        [
            "relay",
            "r",
            None,
            "The relay: ws://HOST:PORT, wss://HOST[:PORT] or sb://HOST[:PORT] "
            f"(default: the Endpoint of ${ENV_CONNECTION_STRING}).",
        ],
        ["entity", "e", None, f"The hybrid connection (default: the EntityPath of ${ENV_CONNECTION_STRING})."],
        ["key-name", None, None, f"The SAS rule that signs tokens (default: {DEFAULT_KEY_NAME})."],
        ["key-file", None, None, f"A file holding the rule's key (or set ${ENV_KEY})."],
        ["token-file", None, None, f"A file holding a SAS token, used as it is (or set ${ENV_TOKEN})."],
        ["ca-cert", None, None, "A PEM file: the certificate authority to trust for wss:// (default: the system's)."],
    ]

    relay: Relay

    @property
    def environ(self) -> Mapping[str, str]:
        return cast(Mapping[str, str], getattr(self.parent, "environ", os.environ))

    def postOptions(self) -> None:
        environ = self.environ
        fields: dict[str, str] = {}
        if environ.get(ENV_CONNECTION_STRING):
            try:
                fields = parseConnectionString(environ[ENV_CONNECTION_STRING])
            except ValueError as e:
                raise usage.UsageError(f"${ENV_CONNECTION_STRING} is not a connection string: {e}") from None
        address = self["relay"] or fields.get("endpoint")
        if not address:
            raise usage.UsageError(f"--relay is required (or set ${ENV_CONNECTION_STRING})")
        try:
            url = relayUrl(address, self["no-tls"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        entity = (self["entity"] or fields.get("entitypath") or "").strip("/")
        if self.entityRequired and not entity:
            raise usage.UsageError("--entity is required")
        key, token = self._secret(environ, fields)
        if self.credentialsRequired and key is None and token is None:
            raise usage.UsageError(
                f"a listener needs a key (--key-file or ${ENV_KEY}) or a token (--token-file or ${ENV_TOKEN})"
            )
        self.relay = Relay(
            url=url,
            entity=entity,
            keyName=self["key-name"] or fields.get("sharedaccesskeyname") or DEFAULT_KEY_NAME,
            key=key,
            token=token,
            trustRoot=self._trustRoot(),
        )

    def _secret(self, environ: Mapping[str, str], fields: dict[str, str]) -> tuple[str | None, str | None]:
        """
        The key or the token: the files named on the command line first,
        then the environment, then the connection string.
        """
        if self["key-file"] and self["token-file"]:
            raise usage.UsageError("give --key-file or --token-file, not both")
        if self["key-file"]:
            return _readSecret(self["key-file"], "key"), None
        if self["token-file"]:
            return None, self._checkedToken(_readSecret(self["token-file"], "token"), self["token-file"])
        if environ.get(ENV_KEY) and environ.get(ENV_TOKEN):
            raise usage.UsageError(f"set ${ENV_KEY} or ${ENV_TOKEN}, not both")
        if environ.get(ENV_KEY):
            return environ[ENV_KEY].strip(), None
        if environ.get(ENV_TOKEN):
            return None, self._checkedToken(environ[ENV_TOKEN].strip(), f"${ENV_TOKEN}")
        if fields.get("sharedaccesssignature"):
            return None, self._checkedToken(fields["sharedaccesssignature"], f"${ENV_CONNECTION_STRING}")
        return fields.get("sharedaccesskey") or None, None

    @staticmethod
    def _checkedToken(token: str, source: str) -> str:
        if not token.startswith("SharedAccessSignature "):
            raise usage.UsageError(f"{source} does not hold a SAS token ('SharedAccessSignature sr=...')")
        return token

    def _trustRoot(self) -> Any:
        path = self["ca-cert"]
        if not path:
            return None
        from twisted.internet.ssl import Certificate

        try:
            with open(path, "rb") as f:
                return Certificate.loadPEM(f.read())
        except OSError as e:
            raise usage.UsageError(f"cannot read the CA certificate {path}: {e.strerror or e}") from None
        except Exception:
            raise usage.UsageError(f"{path} is not a PEM certificate") from None


_NATIVE_FLAG = [
    "native",
    None,
    "Use native streams: raw bytes on the connection to the relay, no WebSocket framing "
    "(a relaynet extension; Azure Relay refuses it). The other side may use either kind.",
]


class TokenOptions(RelayOptions):
    """
    C{relaynet token}.
    """

    entityRequired = False
    longdesc = (
        "Print a SAS token for the entity (for the whole namespace without --entity), "
        f"signed with the key from --key-file or ${ENV_KEY}."
    )
    optParameters: list[list[Any]] = [["ttl", None, DEFAULT_TTL, "Seconds the token is valid.", positiveNumber(int)]]

    def postOptions(self) -> None:
        super().postOptions()
        if self.relay.key is None:
            raise usage.UsageError(f"a key is needed to sign a token: --key-file or ${ENV_KEY}")


class ForwardOptions(RelayOptions):
    """
    C{relaynet forward}.
    """

    longdesc = (
        "Forward TCP connections through the relay. Without --serve: listen on a local port "
        "and carry each connection to the entity's listener. With --serve: be that listener, "
        "and connect each relayed connection to --target. An end of input on either side ends "
        "the whole connection."
    )
    optFlags = [["serve", "s", "Be the listener: connect relayed connections to --target."], _NATIVE_FLAG]
    optParameters: list[list[Any]] = [
        ["local", "l", None, "[HOST:]PORT to listen on; HOST defaults to 127.0.0.1."],
        ["target", "t", None, "With --serve: HOST:PORT to connect each relayed connection to."],
        ["timeout", None, CONNECT_TIMEOUT, "Seconds to wait for the relay and a listener.", positiveNumber(float)],
    ]

    local: tuple[str, int]
    target: tuple[str, int]

    def postOptions(self) -> None:
        self.credentialsRequired = bool(self["serve"])
        super().postOptions()
        try:
            if self["serve"]:
                if self["local"] or not self["target"]:
                    raise usage.UsageError("--serve takes --target HOST:PORT, not --local")
                self.target = parseHostPort(self["target"])
            else:
                if self["target"] or not self["local"]:
                    raise usage.UsageError("forward takes --local [HOST:]PORT (or --serve --target HOST:PORT)")
                self.local = parseHostPort(self["local"], "127.0.0.1")
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        if not self["serve"] and not (isIPAddress(self.local[0]) or isIPv6Address(self.local[0])):
            raise usage.UsageError(f"--local takes an IP address to listen on, not {self.local[0]!r}")


class _StdioOptions(RelayOptions):
    optFlags = [
        [
            "close-on-eof",
            "N",
            "Close the connection at the end of standard input (by default it stays open "
            "until the other side closes it).",
        ],
        _NATIVE_FLAG,
    ]


class ListenOptions(_StdioOptions):
    """
    C{relaynet listen}.
    """

    credentialsRequired = True

    longdesc = (
        "Be the entity's listener and join one relayed connection at a time to standard input "
        "and output; others are refused while it lasts. Exit when it ends, unless --keep-open."
    )
    optFlags = [["keep-open", "k", "After a connection ends, wait for the next."]]


class ConnectOptions(_StdioOptions):
    """
    C{relaynet connect}.
    """

    longdesc = (
        "Connect to the entity's listener through the relay and join the connection to "
        "standard input and output."
    )
    optParameters: list[list[Any]] = [
        ["timeout", None, CONNECT_TIMEOUT, "Seconds to wait for the relay and a listener.", positiveNumber(float)],
    ]


class Options(_Options):
    """
    The C{relaynet} command line.
    """

    longdesc = (
        "Tokens, TCP forwarding and netcat-style pipes through a Hybrid Connections relay. "
        f"Keys and tokens come from files or ${ENV_KEY}, ${ENV_TOKEN} or "
        f"${ENV_CONNECTION_STRING}; see 'relaynet COMMAND --help'."
    )
    subCommands = [
        ["token", None, TokenOptions, "Print a SAS token."],
        ["forward", None, ForwardOptions, "Forward TCP connections through the relay (or serve them)."],
        ["listen", None, ListenOptions, "Be a listener, joined to standard input and output."],
        ["connect", None, ConnectOptions, "Connect to a listener, joined to standard input and output."],
    ]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.environ = os.environ if environ is None else environ

    def getSynopsis(self) -> str:
        return "Usage: relaynet" if self.subCommand else "Usage: relaynet COMMAND [options]"

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("a command is required: token, forward, listen or connect")


# One line per failure.


def _oneLine(text: str) -> str:
    return " ".join(text.split())


def describe(exc: BaseException, relay: Relay) -> str:
    """
    One line for an expected failure to reach or use the relay.
    """
    if isinstance(exc, (RelayConnectError, RelayRefused)) and not exc.status:
        return _oneLine(_withoutStatus(str(exc), relay))
    if isinstance(exc, NoListenerError):
        text = f"no listener is connected to {relay.where} ({exc})"
    elif isinstance(exc, EndpointNotFoundError) or (isinstance(exc, RelayRefused) and exc.status == 404):
        text = f"there is no entity {relay.where} ({exc})"
    elif isinstance(exc, AuthorizationError) or (isinstance(exc, RelayRefused) and exc.status in (401, 403)):
        text = f"the relay refused the credentials for {relay.where} ({exc})"
    elif isinstance(exc, RejectedError):
        text = f"the listener of {relay.where} rejected the connection ({exc})"
    elif isinstance(exc, ConnectTimeoutError):
        text = f"timed out connecting to {relay.where} ({exc})"
    elif isinstance(exc, (RelayConnectError, RelayRefused)):
        text = f"the relay refused the connection to {relay.where} ({exc})"
    elif isinstance(exc, (netError.ConnectError, netError.ConnectionLost, CancelledError, TimeoutError)):
        text = f"cannot reach the relay at {relay.url}: {exc or type(exc).__name__}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return _oneLine(text)


def _withoutStatus(text: str, relay: Relay) -> str:
    """
    A connection to the relay that ended before the relay answered.
    """
    if "SSL" in text or "certificate" in text:
        return f"the TLS handshake with the relay at {relay.url} failed ({text}); see --ca-cert"
    if "timeout" in text.lower():
        hint = "; if the relay has no TLS, use ws:// or --no-tls" if relay.url.startswith("wss:") else ""
        return f"the relay at {relay.url} did not answer in time ({text}){hint}"
    return f"the connection to the relay at {relay.url} failed ({text})"


_EXPECTED = (
    RelayConnectError,
    RelayRefused,
    netError.ConnectError,
    netError.ConnectionLost,
    netError.CannotListenError,
    CancelledError,
    TimeoutError,
    OSError,
)


class Console:
    """
    Where a command's own messages go: one line each on standard error,
    prefixed with the command.
    """

    def __init__(self, command: str, out: IO[str], err: IO[str]) -> None:
        self.command = command
        self.out = out
        self.err = err

    def say(self, text: str) -> None:
        self.err.write(f"relaynet {self.command}: {_oneLine(text)}\n")
        self.err.flush()


# Splicing two connections together.


class _End(Protocol):
    """
    One side of a forwarded connection.  It does not read until its partner
    is connected; what comes before is kept for it.
    """

    def __init__(self, pair: _Pair) -> None:
        self.pair = pair
        self.early: list[bytes] = []
        self.connected = False
        self.gone = False

    def connectionMade(self) -> None:
        self.connected = True
        cast(Any, self.transport).pauseProducing()
        self.pair.made(self)

    def dataReceived(self, data: bytes) -> None:
        if not self.pair.joined:
            self.early.append(data)
        else:
            partner = self.pair.partner(self)
            if not partner.gone:
                cast(Any, partner.transport).write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.gone = True
        self.pair.lost(self)

    def close(self, abort: bool = False) -> None:
        if self.connected and not self.gone:
            transport: Any = self.transport
            if abort:
                transport.abortConnection()
            else:
                transport.loseConnection()


class _Pair:
    """
    A forwarded connection: the side that came first (a local TCP
    connection, or a relayed stream) and the one connected for it.

    Once both are connected they are spliced as a TCP proxy does: each
    transport has the other as its producer, so when one cannot write the
    other stops reading.  When either ends, the other is closed after what
    it was given is written.
    """

    def __init__(self, connectSecond: Callable[[_Pair], Deferred[Any]], onDone: Callable[[_Pair], None]) -> None:
        self.first = _End(self)
        self.second = _End(self)
        self.joined = False
        self.closing = False
        self.secondFailed = False
        self.connecting: Deferred[Any] | None = None
        self._connectSecond = connectSecond
        self._onDone = onDone
        self.done: Deferred[None] = Deferred()

    def partner(self, end: _End) -> _End:
        return self.second if end is self.first else self.first

    def made(self, end: _End) -> None:
        if self.closing or self.first.gone:
            end.close()
        elif end is self.first:
            self.connecting = self._connectSecond(self)
            self.connecting.addErrback(self._failed)
        else:
            self._join()

    def _failed(self, failure: Failure) -> None:
        self.secondFailed = True
        self.closing = True
        self.first.close()
        self._check()

    def _join(self) -> None:
        a, b = self.first, self.second
        ta: Any = a.transport
        tb: Any = b.transport
        ta.registerProducer(tb, True)
        tb.registerProducer(ta, True)
        self.joined = True
        for source, sink in ((a, b), (b, a)):
            early, source.early = source.early, []
            for chunk in early:
                cast(Any, sink.transport).write(chunk)
        ta.resumeProducing()
        tb.resumeProducing()

    def lost(self, end: _End) -> None:
        other = self.partner(end)
        if other.connected and not other.gone:
            if self.joined:
                cast(Any, other.transport).unregisterProducer()
            other.close()
        elif end is self.first:
            self.cancel()
        self._check()

    def cancel(self) -> None:
        """
        Stop connecting the second side.
        """
        self.closing = True
        if self.connecting is not None and not self.connecting.called:
            self.connecting.cancel()

    def close(self, abort: bool = False) -> Deferred[None]:
        """
        Close both sides; fires when they are closed.
        """
        self.cancel()
        self.first.close(abort)
        self.second.close(abort)
        self._check()
        d: Deferred[None] = Deferred()
        self.done.addBoth(lambda _: d.callback(None))
        return d

    def _check(self) -> None:
        firstDone = self.first.gone or not self.first.connected
        secondDone = self.second.gone or self.secondFailed or (self.connecting is None and self.closing)
        if firstDone and secondDone and not self.done.called:
            self.done.callback(None)
            self._onDone(self)


class _PairSet(Factory):
    """
    Makes the first side of each forwarded connection, and closes them all
    at shutdown.
    """

    def __init__(self, reactor: Any, connectSecond: Callable[[_Pair], Deferred[Any]]) -> None:
        self.reactor = reactor
        self.connectSecond = connectSecond
        self.pairs: set[_Pair] = set()
        self.stopped = False

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        if self.stopped:
            return None
        pair = _Pair(self.connectSecond, self.pairs.discard)
        self.pairs.add(pair)
        return pair.first

    async def close(self) -> None:
        """
        Close every connection: cleanly, or after L{SHUTDOWN_GRACE} seconds
        by force.
        """
        self.stopped = True
        pairs = list(self.pairs)
        closed = DeferredList([pair.close() for pair in pairs])
        if not await _race(self.reactor, closed, SHUTDOWN_GRACE):
            closed = DeferredList([pair.close(abort=True) for pair in pairs])
            await _race(self.reactor, closed, SHUTDOWN_GRACE)


async def _race(reactor: Any, d: Deferred[Any], timeout: float) -> bool:
    """
    Wait for C{d}, at most C{timeout} seconds; whether it fired.  C{d}
    keeps its result.
    """
    done: Deferred[bool] = Deferred()

    def fired(result: object) -> object:
        if not done.called:
            done.callback(True)
        return result

    d.addBoth(fired)
    timer = reactor.callLater(timeout, _fire, done, False)
    result = await done
    if timer.active():
        timer.cancel()
    return result


def _fire(d: Deferred[Any], result: object = None) -> None:
    if not d.called:
        d.callback(result)


def _passing(result: object, d: Deferred[Any]) -> object:
    """
    A callback that fires C{d} and passes the result on.
    """
    _fire(d)
    return result


class _Stopped:
    """
    What L{_unlessStopped} gives when the stop came first.
    """


STOPPED = _Stopped()


async def _unlessStopped(d: Deferred[_T], stopping: Deferred[None], cancel: bool = False) -> _T | _Stopped:
    """
    Wait for C{d}, or for C{stopping}: the result of C{d} (or its
    exception), or L{STOPPED}.  C{d}'s result is used up; with C{cancel},
    C{d} is cancelled if the stop comes first.
    """
    done: Deferred[tuple[bool, object]] = Deferred()

    def fired(result: object, first: bool) -> object:
        if not done.called:
            done.callback((first, result))
        return None if first else result

    d.addBoth(fired, True)
    stopping.addBoth(fired, False)
    first, result = await done
    if not first:
        if cancel:
            d.cancel()
        return STOPPED
    if isinstance(result, Failure):
        result.raiseException()
    return cast(_T, result)


def _secondFactory(pair: _Pair) -> Factory:
    return Factory.forProtocol(lambda: pair.second)


# The commands.


async def _token(reactor: Any, options: TokenOptions, console: Console, stopping: Deferred[None]) -> int:
    relay = options.relay
    assert relay.key is not None
    uri = resourceUri(relay.url, relay.entity) if relay.entity else resourceUri(relay.url, "").rstrip("/")
    console.out.write(mintToken(uri, relay.keyName, relay.key, int(reactor.seconds()) + options["ttl"]) + "\n")
    console.out.flush()
    return EXIT_OK


async def _forward(reactor: Any, options: ForwardOptions, console: Console, stopping: Deferred[None]) -> int:
    if options["serve"]:
        return await _serveForward(reactor, options, console, stopping)
    return await _localForward(reactor, options, console, stopping)


async def _localForward(reactor: Any, options: ForwardOptions, console: Console, stopping: Deferred[None]) -> int:
    relay = options.relay
    tokens = relay.tokens(reactor)

    def connectSecond(pair: _Pair) -> Deferred[Any]:
        connecting = connectStream(
            reactor, relay.url, relay.entity, tokens, _secondFactory(pair), timeout=options["timeout"],
            trustRoot=relay.trustRoot, native=options["native"],
        )
        return connecting.addErrback(failed, pair)

    def failed(failure: Failure, pair: _Pair) -> Failure:
        if not pair.closing:
            console.say(f"connection from {_peer(pair.first.transport)} closed: {describe(failure.value, relay)}")
        return failure

    host, port = options.local
    endpoint = (TCP6ServerEndpoint if isIPv6Address(host) else TCP4ServerEndpoint)(reactor, port, interface=host)
    pairs = _PairSet(reactor, connectSecond)
    try:
        listening: IListeningPort = await endpoint.listen(pairs)
    except netError.CannotListenError as e:
        raise CommandFailed(f"cannot listen on {options['local']}: {e.socketError}") from None
    bound: Any = listening.getHost()
    shown = f"[{bound.host}]" if ":" in bound.host else bound.host
    console.say(f"forwarding {shown}:{bound.port} to {relay.where}")
    await stopping
    pairs.stopped = True
    await maybeDeferred(listening.stopListening)
    await pairs.close()
    return EXIT_OK


async def _serveForward(reactor: Any, options: ForwardOptions, console: Console, stopping: Deferred[None]) -> int:
    relay = options.relay
    host, port = options.target

    def connectSecond(pair: _Pair) -> Deferred[Any]:
        endpoint = HostnameEndpoint(reactor, host, port, timeout=TARGET_TIMEOUT)
        return endpoint.connect(_secondFactory(pair)).addErrback(failed, pair)

    def failed(failure: Failure, pair: _Pair) -> Failure:
        if not pair.closing:
            console.say(f"cannot connect to {options['target']}: {_oneLine(str(failure.value))}")
        return failure

    pairs = _PairSet(reactor, connectSecond)
    listener, watch = _listener(reactor, relay, pairs, console, native=options["native"])
    await _startListening(listener, relay)
    console.say(f"serving {relay.where}: connections go to {options['target']}")
    await _unlessStopped(watch.offline, stopping)
    code = await _closeListener(listener, watch)
    await pairs.close()
    return code


def _peer(transport: Any) -> str:
    address = transport.getPeer() if transport is not None else None
    host, port = getattr(address, "host", ""), getattr(address, "port", 0)
    return f"{host}:{port}" if host else "a relayed sender"


class _Watch:
    """
    Says when a listener loses the relay and when it is back; C{offline}
    fires if it gives up by itself (the relay says the entity is gone).
    """

    def __init__(self, relay: Relay, console: Console) -> None:
        self.relay = relay
        self.console = console
        self.wasOnline = False
        self.closing = False
        self.offline: Deferred[None] = Deferred()

    def status(self, name: str) -> None:
        if name == "reconnecting":
            self.console.say(f"lost the relay; reconnecting to {self.relay.url}")
        elif name == "online":
            if self.wasOnline:
                self.console.say(f"listening on {self.relay.where} again")
            self.wasOnline = True
        elif name == "offline" and self.wasOnline and not self.closing and not self.offline.called:
            self.offline.callback(None)


def _listener(
    reactor: Any,
    relay: Relay,
    factory: Factory,
    console: Console,
    decide: AcceptHandler | None = None,
    native: bool = False,
) -> tuple[HybridListener, _Watch]:
    """
    A listener for C{relay} whose relayed streams come from C{factory};
    with C{native}, it accepts them as native streams.
    """
    watch = _Watch(relay, console)
    tokens = relay.tokens(reactor)
    assert tokens is not None  # the options insist on a key or a token
    listener = HybridListener(
        reactor, relay.url, relay.entity, tokens, streamFactory=factory, acceptHandler=decide,
        onStatus=watch.status, trustRoot=relay.trustRoot, native=native,
    )
    return listener, watch


async def _startListening(listener: HybridListener, relay: Relay) -> None:
    try:
        await listener.listen()
    except _EXPECTED as e:
        raise CommandFailed(describe(e, relay)) from None


async def _closeListener(listener: HybridListener, watch: _Watch) -> int:
    """
    Close the listener; the exit code: a failure if it had given up.
    """
    watch.closing = True
    await listener.close()
    if watch.offline.called:
        watch.console.say(f"no longer listening on {watch.relay.where}: the relay gave up on it")
        return EXIT_FAILED
    return EXIT_OK


# Standard input and output.


@implementer(IPushProducer)
class _ReadSide:
    """
    The reading half of a transport as a producer: it pauses and resumes
    reading, and leaves closing to its owner.
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def pauseProducing(self) -> None:
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class _Stdio(Protocol):
    """
    Standard input and output, joined to one relayed stream at a time.

    Each side is the other's producer: a full stdout pauses the stream, a
    full stream pauses stdin.  Stdin is not read while no stream is
    joined.
    """

    def __init__(self, closeOnEof: bool) -> None:
        self.closeOnEof = closeOnEof
        self.stream: _StdioStream | None = None
        self.inputEnded = False
        self.outputGone = False
        self.gone: Deferred[None] = Deferred()
        self._early: list[bytes] = []

    def connectionMade(self) -> None:
        if self.stream is None:
            cast(Any, self.transport).pauseProducing()

    def attach(self, stream: _StdioStream) -> None:
        self.stream = stream
        own: Any = self.transport
        other: Any = stream.transport
        own.registerProducer(other, True)
        # Stdin outlives the stream (listen --keep-open): the stream may
        # pause and resume reading it, not close it.
        other.registerProducer(_ReadSide(own), True)
        early, self._early = self._early, []
        for chunk in early:
            other.write(chunk)
        if self.inputEnded:
            self._endOfInput()
        else:
            own.resumeProducing()
        other.resumeProducing()

    def detach(self, stream: _StdioStream) -> None:
        if self.stream is not stream:
            return
        self.stream = None
        own: Any = self.transport
        if own is not None:
            own.unregisterProducer()
            own.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.stream is None:
            self._early.append(data)
        else:
            cast(Any, self.stream.transport).write(data)

    def readConnectionLost(self) -> None:
        self.inputEnded = True
        if self.stream is not None:
            self._endOfInput()

    def _endOfInput(self) -> None:
        if self.closeOnEof and self.stream is not None:
            transport: Any = self.stream.transport
            transport.unregisterProducer()
            transport.loseConnection()

    def writeConnectionLost(self) -> None:
        # Whoever read our output has gone (| head): nothing more to do.
        self.outputGone = True
        if self.stream is not None:
            cast(Any, self.stream.transport).loseConnection()
        cast(Any, self.transport).loseConnection()
        _fire(self.gone)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.outputGone = True
        if self.stream is not None:
            cast(Any, self.stream.transport).loseConnection()
        if not self.gone.called:
            self.gone.callback(None)


class _StdioStream(Protocol):
    """
    A relayed stream joined to L{_Stdio} once it is connected.

    @ivar ended: fires with the reason the stream ended, as an exception.
    """

    def __init__(self, stdio: _Stdio, onConnected: Callable[[_StdioStream], None] | None = None) -> None:
        self.stdio = stdio
        self.onConnected = onConnected
        self.ended: Deferred[BaseException] = Deferred()

    def connectionMade(self) -> None:
        cast(Any, self.transport).pauseProducing()
        if self.onConnected is not None:
            self.onConnected(self)

    def dataReceived(self, data: bytes) -> None:
        if not self.stdio.outputGone:
            cast(Any, self.stdio.transport).write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.stdio.detach(self)
        self.ended.callback(reason.value)


def _stdio(proto: _Stdio, reactor: Any) -> Any:
    from twisted.internet.stdio import StandardIO

    return StandardIO(proto, reactor=reactor)


async def _closeStdio(stdio: Any, proto: _Stdio, reactor: Any) -> None:
    """
    Close stdio once stdout is flushed (at most L{SHUTDOWN_GRACE} seconds).
    """
    stdio.loseConnection()
    await _race(reactor, proto.gone, SHUTDOWN_GRACE)


def _streamResult(reason: BaseException, console: Console) -> int:
    if isinstance(reason, netError.ConnectionDone):
        return EXIT_OK
    console.say(f"the connection broke off: {_oneLine(str(reason))}")
    return EXIT_FAILED


async def _connect(reactor: Any, options: ConnectOptions, console: Console, stopping: Deferred[None]) -> int:
    relay = options.relay
    proto = _Stdio(options["close-on-eof"])
    stream = _StdioStream(proto)
    connecting = connectStream(
        reactor, relay.url, relay.entity, relay.tokens(reactor), Factory.forProtocol(lambda: stream),
        timeout=options["timeout"], trustRoot=relay.trustRoot, native=options["native"],
    )
    try:
        if await _unlessStopped(connecting, stopping, cancel=True) is STOPPED:
            return EXIT_OK
    except _EXPECTED as e:
        raise CommandFailed(describe(e, relay)) from None
    stdio = _stdio(proto, reactor)
    proto.attach(stream)
    ended = await _unlessStopped(stream.ended, stopping)
    if isinstance(ended, _Stopped):
        cast(Any, stream.transport).loseConnection()
        await _race(reactor, stream.ended, SHUTDOWN_GRACE)
        code = EXIT_OK
    else:
        code = _streamResult(ended, console)
    await _closeStdio(stdio, proto, reactor)
    return code


class _OneAtATime(Factory):
    """
    The stream factory of C{listen}: one stream at a time, joined to stdio;
    others are refused while it lasts.
    """

    def __init__(self, proto: _Stdio) -> None:
        self.proto = proto
        self.current: _StdioStream | None = None
        self.arrivals: DeferredQueue[_StdioStream] = DeferredQueue()
        self.stopped = False

    @property
    def busy(self) -> bool:
        return self.stopped or self.proto.outputGone or (self.current is not None and not self.current.ended.called)

    def decide(self, request: AcceptRequest) -> bool | tuple[int, str]:
        """
        The accept handler: refuse senders while busy.
        """
        return (503, "The listener is busy with another connection.") if self.busy else True

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        if self.busy:
            return None
        self.current = _StdioStream(self.proto, self._connected)
        return self.current

    def _connected(self, stream: _StdioStream) -> None:
        self.proto.attach(stream)
        self.arrivals.put(stream)


async def _listen(reactor: Any, options: ListenOptions, console: Console, stopping: Deferred[None]) -> int:
    relay = options.relay
    proto = _Stdio(options["close-on-eof"])
    factory = _OneAtATime(proto)
    listener, watch = _listener(reactor, relay, factory, console, factory.decide, native=options["native"])
    await _startListening(listener, relay)
    stdio = _stdio(proto, reactor)
    console.say(f"listening on {relay.where}")
    code = EXIT_OK
    ending: Deferred[None] = Deferred()
    stopping.addBoth(_passing, ending)
    watch.offline.addBoth(_passing, ending)
    while True:
        stream = await _unlessStopped(factory.arrivals.get(), ending, cancel=True)
        if isinstance(stream, _Stopped):
            break
        ended = await _unlessStopped(stream.ended, ending)
        if isinstance(ended, _Stopped):
            break
        code = _streamResult(ended, console)
        if not options["keep-open"] or proto.outputGone:
            break
    factory.stopped = True
    code = max(code, await _closeListener(listener, watch))
    current = factory.current
    if current is not None and not current.ended.called:
        cast(Any, current.transport).loseConnection()
        await _race(reactor, current.ended, SHUTDOWN_GRACE)
    await _closeStdio(stdio, proto, reactor)
    return code


_COMMANDS: dict[str, Callable[..., Any]] = {
    "token": _token,
    "forward": _forward,
    "listen": _listen,
    "connect": _connect,
}


# Running it.


async def run(
    reactor: Any,
    argv: Sequence[str],
    environ: Mapping[str, str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    stopping: Deferred[None] | None = None,
    startLogging: Callable[[bool], None] | None = None,
) -> int:
    """
    Run the command line C{argv} (without the program name).

    @param environ: where C{RELAYNET_*} come from; C{os.environ} by default.
    @param stopping: fires to stop a command that runs until stopped
        (C{forward}, C{listen}, C{connect}): it closes its listener and
        connections and returns.
    @param startLogging: called once the options are parsed, with whether
        C{--verbose} was given.
    @return: the exit code.
    """
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    options = Options(environ)
    try:
        options.parseOptions(list(argv))
    except _HelpShown as shown:
        out.write(f"{shown}\n")
        return EXIT_OK
    except usage.UsageError as e:
        command = f"relaynet {options.subCommand}" if options.subCommand else "relaynet"
        err.write(f"{command}: {_oneLine(str(e))} (see '{command} --help')\n")
        return EXIT_USAGE
    sub = cast(RelayOptions, options.subOptions)
    if startLogging is not None:
        startLogging(bool(sub["verbose"]))
    console = Console(cast(str, options.subCommand), out, err)
    if stopping is None:
        stopping = Deferred()
    try:
        return cast(int, await _COMMANDS[console.command](reactor, sub, console, stopping))
    except CommandFailed as e:
        console.say(str(e))
    except _EXPECTED as e:
        console.say(describe(e, sub.relay))
    return EXIT_FAILED


def _logTo(err: IO[str], verbose: bool) -> None:
    """
    Send the log to standard error, one line an event: relaynet's warnings
    and everyone's errors, or everything with C{--verbose}.
    """

    def write(event: LogEvent) -> None:
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += f": {failure.getErrorMessage()}"
            text += "\n" + failure.getTraceback() if verbose else " (--verbose shows the traceback)"
        err.write(f"relaynet: {text if verbose else _oneLine(text)}\n")
        err.flush()

    def wanted(event: LogEvent) -> PredicateResult:
        level = event.get("log_level", LogLevel.info)
        ours = str(event.get("log_namespace", "")).startswith("relaynet")
        if verbose or level >= LogLevel.error or (ours and level >= LogLevel.warn):
            return PredicateResult.yes
        return PredicateResult.no

    if verbose:
        setLogLevel(LogLevel.debug)
    observer = FilteringLogObserver(cast(ILogObserver, write), [cast(ILogFilterPredicate, wanted)])
    globalLogBeginner.beginLoggingTo([observer], discardBuffer=True, redirectStandardIO=False)


async def _main(reactor: Any, argv: list[str]) -> None:
    stopping: Deferred[None] = Deferred()
    finished: Deferred[None] = Deferred()

    def shutdown() -> Deferred[None]:
        # SIGINT, SIGTERM or the end of the command: stop, and let the
        # reactor wait until the command has closed what it opened.
        if not stopping.called:
            stopping.callback(None)
        return finished

    reactor.addSystemEventTrigger("before", "shutdown", shutdown)
    try:
        code = await run(
            reactor, argv, os.environ, sys.stdout, sys.stderr, stopping, lambda verbose: _logTo(sys.stderr, verbose)
        )
    finally:
        finished.callback(None)
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """
    The C{relaynet} console script.
    """
    react(_main, [list(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()

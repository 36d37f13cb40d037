# -*- test-case-name: relaynet.test.test_tap -*-
"""
C{twistd relaynet}: options and the service they make.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from typing import Any

from twisted.application.service import IService
from twisted.internet.interfaces import IReactorTime
from twisted.python import usage

from relaynet.auth import Rights, Rule
from relaynet.core import RelaySettings
from relaynet.entities import Entity, validEntityName
from relaynet.logs import LEVEL_NAMES, setLogLevel

__all__ = ["Options", "makeService"]

DEFAULT_LISTEN = "tcp:9090:interface=127.0.0.1"

# Settings that the command line and the config file share: option name,
# attribute of RelaySettings, type.
_SETTINGS = [
    ("accept-timeout", "acceptTimeout", float, "Seconds a sender waits for a listener to accept"),
    ("request-timeout", "requestTimeout", float, "Seconds a listener has to answer an HTTP request"),
    ("ping-interval", "pingInterval", float, "Seconds between pings on a listener's control channel"),
    ("ping-timeout", "pingTimeout", float, "Seconds without an answer to a ping before a listener is dropped"),
    ("token-grace", "tokenGrace", int, "Seconds a control channel outlives its token while it may renew it"),
    ("close-timeout", "closeTimeout", float, "Seconds a half-closed connection waits for the other side's close"),
    ("max-pending", "maxPending", int, "Senders that may wait for a listener at once"),
    ("max-event-size", "maxEventSize", int, "The largest event or one-way message, in bytes"),
    ("subscriber-outbox", "subscriberOutbox", int, "Messages that may wait for a slow listener before it is cut off"),
]


def positiveNumber(kind: type) -> Callable[[str], Any]:
    """
    A C{usage.Options} coercer to a positive C{kind} (C{int} or C{float}).
    """

    def coerce(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise ValueError(f"{text} is not a positive number")
        return value

    coerce.coerceDoc = "Must be positive."  # type: ignore[attr-defined]
    return coerce


def _parseRule(text: str) -> Rule:
    name, sep, key = text.partition("=")
    if not sep or not name or not key:
        raise usage.UsageError(f"--rule takes NAME=KEY, not {text!r}")
    return Rule(name=name, primaryKey=key)


class Options(usage.Options):
    """
    The relay's options; a C{--config} file carries the same settings.
    """

    synopsis = "[options]"
    longdesc = (
        "Run a relay that speaks the Azure Relay Hybrid Connections protocol. "
        "With no --rule, a namespace key (rule RootManageSharedAccessKey) is made "
        "on first start, kept in the data directory and printed with a connection string."
    )

    optFlags = [
        ["dynamic-entities", None, "An entity comes into being with its first listener and goes with its last."],
        ["access-log", None, "Log one line per HTTP request (off by default: under load it costs about 6% of the relay's CPU)."],
    ]
    optParameters = [
        ["config", "c", None, "A TOML file with the same settings as these options."],
        ["data-dir", "d", None, "Directory for the relay's own files (default: relaynet-data)."],
        ["max-listeners", None, None, "Listeners per entity (default: 25)", positiveNumber(int)],
        ["max-subscribers", None, None, "Subscribers per event entity (default: 10000)", positiveNumber(int)],
        ["log-level", None, None, "The least important of relaynet's log events to write: debug, info, warn, error or critical (default: info)."],
    ] + [
        [name, None, None, f"{doc} (default: {getattr(RelaySettings, attr)})", positiveNumber(kind)]
        for name, attr, kind, doc in _SETTINGS
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["rules"] = []
        self["entities"] = []
        self["anonymous-senders"] = []
        self["hostnames"] = []

    def opt_listen(self, endpoint: str) -> None:
        """
        A server endpoint to serve on (repeatable), e.g. tcp:9090 or
        ssl:9443:privateKey=key.pem:certKey=cert.pem (default: tcp:9090:interface=127.0.0.1).
        """
        self["listen"].append(endpoint)

    def opt_rule(self, text: str) -> None:
        """
        NAME=KEY: a namespace-wide SAS rule with Listen, Send and Manage (repeatable).
        """
        self["rules"].append(_parseRule(text))

    def opt_entity(self, name: str) -> None:
        """
        Declare a hybrid connection; NAME may contain / (repeatable).
        """
        try:
            self["entities"].append(Entity(name=validEntityName(name)))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def opt_event(self, name: str) -> None:
        """
        Declare an event entity (publish/subscribe); NAME may contain / (repeatable).
        """
        try:
            self["entities"].append(Entity(name=validEntityName(name), kind="event"))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def opt_anonymous_senders(self, name: str) -> None:
        """
        Senders to entity NAME need no token (repeatable).
        """
        self["anonymous-senders"].append(name.strip("/").lower())

    def opt_hostname(self, name: str) -> None:
        """
        A name clients know the relay by (repeatable): tokens for it are
        accepted whatever Host header a request carries, as behind a proxy.
        """
        self["hostnames"].append(name)

    def postOptions(self) -> None:
        if self["config"]:
            self._readConfig(self["config"])
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if self["data-dir"] is None:
            self["data-dir"] = "relaynet-data"
        if self["max-listeners"] is None:
            self["max-listeners"] = 25
        if self["max-subscribers"] is None:
            self["max-subscribers"] = 10000
        if self["log-level"] is None:
            self["log-level"] = "info"
        if self["log-level"] not in LEVEL_NAMES:
            raise usage.UsageError(f"--log-level must be one of {', '.join(LEVEL_NAMES)}, not {self['log-level']!r}")
        self["settings"] = RelaySettings(
            **{attr: self[name] for name, attr, _, _ in _SETTINGS if self[name] is not None}
        )
        if self["settings"].pingTimeout <= self["settings"].pingInterval:
            raise usage.UsageError("--ping-timeout must be longer than --ping-interval")

    def _readConfig(self, path: str) -> None:
        try:
            with open(path, "rb") as f:
                config = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise usage.UsageError(f"cannot read config file {path}: {e}") from None
        try:
            applyConfig(self, config)
        except (KeyError, TypeError, ValueError) as e:
            raise usage.UsageError(f"config file {path}: {e}") from None


def _value(table: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    """
    C{table[name]}, which must be of C{kind} (an int is a float too, a bool
    is no number), or C{default} when absent.
    """
    if name not in table:
        return default
    value = table[name]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    fits = number if kind is float else (number and isinstance(value, int)) if kind is int else isinstance(value, kind)
    if not fits:
        raise ValueError(f"{name} must be {_KINDS[kind]}, not {value!r}")
    if kind in (int, float) and value <= 0:
        raise ValueError(f"{name} must be positive, not {value!r}")
    return value


def _required(table: dict[str, Any], name: str, kind: type) -> Any:
    if name not in table:
        raise ValueError(f"{name} is missing")
    return _value(table, name, kind)


def _strings(table: dict[str, Any], name: str) -> list[str]:
    values = _value(table, name, list, [])
    if not all(isinstance(v, str) for v in values):
        raise ValueError(f"{name} must be a list of strings")
    return values


_KINDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string", list: "a list"}


def _ruleFromTable(table: dict[str, Any]) -> Rule:
    unknown = set(table) - {"name", "key", "secondary-key", "rights"}
    if unknown:
        raise ValueError(f"unknown rule settings {sorted(unknown)}")
    rights = table.get("rights", "Listen,Send,Manage")
    return Rule(
        name=_required(table, "name", str),
        primaryKey=_required(table, "key", str),
        secondaryKey=_value(table, "secondary-key", str),
        rights=Rights.parse(rights if isinstance(rights, str) else ",".join(_strings(table, "rights"))),
    )


def _entityFromConfig(item: str | dict[str, Any]) -> Entity:
    if isinstance(item, str):
        return Entity(name=validEntityName(item))
    unknown = set(item) - {"name", "kind", "max-listeners", "anonymous-senders", "request-timeout", "rule"}
    if unknown:
        raise ValueError(f"unknown entity settings {sorted(unknown)}")
    if item.get("kind", "hybrid") not in ("hybrid", "event"):
        raise ValueError(f"kind must be 'hybrid' or 'event', not {item['kind']!r}")
    return Entity(
        name=validEntityName(_required(item, "name", str)),
        maxListeners=_value(item, "max-listeners", int),
        anonymousSenders=_value(item, "anonymous-senders", bool, False),
        requestTimeout=_value(item, "request-timeout", float),
        kind=_value(item, "kind", str, "hybrid"),
        rules=tuple(_ruleFromTable(r) for r in _value(item, "rule", list, [])),
    )


def applyConfig(options: Options, config: dict[str, Any]) -> None:
    """
    Merge a parsed config file into C{options}: lists add to what the
    command line gave, and single values fill in what it did not.
    """
    known = {"listen", "rule", "entity", "event", "anonymous-senders", "hostname", "dynamic-entities", "access-log", "data-dir", "max-listeners", "max-subscribers", "log-level"}
    known.update(name for name, _, _, _ in _SETTINGS)
    unknown = set(config) - known
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}")
    options["listen"].extend(_strings(config, "listen"))
    options["rules"].extend(_ruleFromTable(r) for r in _value(config, "rule", list, []))
    options["entities"].extend(_entityFromConfig(e) for e in _value(config, "entity", list, []))
    options["entities"].extend(Entity(name=validEntityName(n), kind="event") for n in _strings(config, "event"))
    options["hostnames"].extend(_strings(config, "hostname"))
    options["anonymous-senders"].extend(n.strip("/").lower() for n in _strings(config, "anonymous-senders"))
    if _value(config, "dynamic-entities", bool, False):
        options["dynamic-entities"] = True
    if _value(config, "access-log", bool, False):
        options["access-log"] = True
    kinds = {"data-dir": str, "log-level": str, "max-listeners": int, "max-subscribers": int, **{name: kind for name, _, kind, _ in _SETTINGS}}
    for name, kind in kinds.items():
        if options[name] is None:
            options[name] = _value(config, name, kind)


def makeService(config: Options, reactor: IReactorTime | None = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor  # type: ignore[assignment]
    from relaynet.service import RelayService

    os.makedirs(config["data-dir"], exist_ok=True)
    setLogLevel(config["log-level"])
    return RelayService.fromOptions(config, reactor)

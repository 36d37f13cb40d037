# -*- test-case-name: relaynet.test.test_auth -*-
"""
Shared Access Signature (SAS) tokens, authorization rules and rights.

A token looks like this::

    SharedAccessSignature sr={resource}&sig={signature}&se={expiry}&skn={rule}

Clients send it in the C{ServiceBusAuthorization} header or in the
C{sb-hc-token} query parameter.  The query value must be form-decoded exactly
once, which C{twisted.web} already does for C{request.args}; after that it is
the same text as the header, so this module takes both forms as they are.

The signature covers the I{raw}, still URL-encoded, C{sr} text: every client
library encodes the resource URI differently, and hashing what was sent is
the only check that works for all of them.  The scope check then decodes
C{sr} and compares hosts and paths loosely (see L{normaliseScope}).

Nothing here does I/O or reads the clock: callers pass C{now}.
"""

from __future__ import annotations

import base64
import datetime
import enum
import hashlib
import hmac
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence
from urllib.parse import quote, unquote

from relaynet.errors import Forbidden, Unauthorized

__all__ = [
    "Rights",
    "ALL_RIGHTS",
    "Rule",
    "SasToken",
    "generateKey",
    "mintToken",
    "normaliseScope",
    "Authorizer",
]

_SCHEME = "SharedAccessSignature"
_FIELDS = ("sr", "sig", "se", "skn")
_SCHEMES = frozenset({"http", "https", "sb", "ws", "wss"})
_URI = re.compile(r"(?:(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://)?(?P<host>[^/?#]*)(?P<path>[^?#]*)")
_PORT = re.compile(r":[0-9]*$")
_EXPIRY = re.compile(r"0|[1-9][0-9]*")


class Rights(enum.Flag):
    """
    The claims an authorization rule can grant.
    """

    LISTEN = enum.auto()
    SEND = enum.auto()
    MANAGE = enum.auto()

    @classmethod
    def parse(cls, text: str) -> Rights:
        """
        Parse rights separated by commas or whitespace, in any case, such as
        C{"Listen,Send"} or C{"listen send manage"}.

        @raise ValueError: if C{text} names no right or an unknown one.
        """
        rights = cls(0)
        names = [name for name in re.split(r"[\s,]+", text) if name]
        if not names:
            raise ValueError(f"no rights given in {text!r}")
        for name in names:
            try:
                rights |= cls[name.upper()]
            except KeyError:
                raise ValueError(f"unknown right {name!r}; expected Listen, Send or Manage") from None
        return rights


ALL_RIGHTS = Rights.LISTEN | Rights.SEND | Rights.MANAGE


def _effective(rights: Rights) -> Rights:
    """
    C{rights} with what C{Manage} implies.
    """
    return ALL_RIGHTS if Rights.MANAGE in rights else rights


def _describe(rights: Rights) -> str:
    """
    Name C{rights} the way Azure does: C{"Listen, Send"}.
    """
    return ", ".join(str(right.name).capitalize() for right in Rights if right in rights)


@dataclass(frozen=True)
class Rule:
    """
    A shared access authorization rule of a namespace or of one entity.

    @ivar name: the rule name, sent as C{skn}; matched case-insensitively.
    @ivar primaryKey: the key text; its UTF-8 bytes are the HMAC key.
    @ivar secondaryKey: an optional second key, for rotation.
    @ivar rights: what tokens signed with this rule may do.
    """

    name: str
    primaryKey: str
    secondaryKey: str | None = None
    rights: Rights = ALL_RIGHTS

    def grants(self, needed: Rights) -> bool:
        """
        Whether this rule grants every right in C{needed}; C{Manage} implies
        C{Listen} and C{Send}.
        """
        return needed in _effective(self.rights)


def _malformed(detail: str) -> Unauthorized:
    return Unauthorized(f"Malformed token: {detail}")


def _fields(text: str) -> dict[str, str]:
    """
    Split a token into its fields, with lower-cased names.

    @raise Unauthorized: if C{text} is not a SAS token.
    """
    parts = text.split(None, 1)
    if len(parts) != 2 or parts[0].lower() != _SCHEME.lower():
        raise _malformed(f"expected '{_SCHEME} sr=...&sig=...&se=...&skn=...'.")
    fields: dict[str, str] = {}
    for pair in parts[1].strip().split("&"):
        name, equals, value = pair.partition("=")
        if not equals:
            raise _malformed("expected name=value pairs separated by '&'.")
        if name.lower() in fields:
            raise _malformed(f"the field {name!r} appears twice.")
        fields[name.lower()] = value
    missing = [name for name in _FIELDS if not fields.get(name)]
    if missing:
        raise _malformed(f"missing {', '.join(missing)}.")
    return fields


@dataclass(frozen=True)
class SasToken:
    """
    A parsed SAS token.  Parsing checks the form only, not the signature.

    @ivar resource: the C{sr} field exactly as sent, still URL-encoded.
    @ivar signature: the C{sig} field, percent-decoded: base64 text.
    @ivar expiry: the C{se} field: seconds since the epoch, UTC.
    @ivar keyName: the C{skn} field: the name of the rule that signed it.
    """

    resource: str
    signature: str
    expiry: int
    keyName: str

    @classmethod
    def parse(cls, text: str) -> SasToken:
        """
        Parse a token as .NET does: the scheme word in any case, then
        C{&}-separated pairs, each split on its first C{=}, with field
        names in any case.  Whitespace after the scheme word belongs to the
        fields: a signature whose C{+} became a space still parses.

        @raise Unauthorized: "Malformed token: ..." if C{text} is not a
            SAS token or its resource is not a relay address.
        """
        fields = _fields(text)
        if not _EXPIRY.fullmatch(fields["se"]):
            raise _malformed("se must be a decimal integer of seconds since 1970-01-01 UTC.")
        token = cls(fields["sr"], unquote(fields["sig"]), int(fields["se"]), fields["skn"])
        try:
            normaliseScope(token.resourceUri)
        except ValueError as e:
            raise _malformed(str(e)) from None
        return token

    @property
    def resourceUri(self) -> str:
        """
        The resource URI: C{sr}, percent-decoded once.
        """
        return unquote(self.resource)


def _sign(resource: str, expiry: str, key: str) -> str:
    """
    The base64 HMAC-SHA256 of C{resource + "\\n" + expiry} with C{key}.
    """
    message = f"{resource}\n{expiry}".encode("utf-8")
    return base64.b64encode(hmac.new(key.encode("utf-8"), message, hashlib.sha256).digest()).decode("ascii")


def generateKey() -> str:
    """
    Make a new random rule key like the portal's: 32 random bytes in
    standard base64, 44 characters.
    """
    return base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def mintToken(resourceUri: str, keyName: str, key: str, expiry: int) -> str:
    """
    Make a SAS token exactly as the client libraries do.

    @param resourceUri: the scope, such as C{http://ns.example.com/hyco}.
    @param keyName: the name of the rule whose key signs.
    @param key: the key text of that rule.
    @param expiry: when the token expires, in seconds since the epoch.
    """
    resource = quote(resourceUri, safe="")
    signature = quote(_sign(resource, str(expiry), key), safe="")
    return f"{_SCHEME} sr={resource}&sig={signature}&se={expiry}&skn={keyName}"


def _normaliseHost(host: str) -> str:
    return _PORT.sub("", host).lower()


def _normalisePath(path: str) -> str:
    segments = [segment for segment in path.partition("?")[0].lower().split("/") if segment]
    if segments[:1] == ["$hc"]:
        del segments[0]
    return "/".join(segments)


def normaliseScope(uri: str) -> tuple[str, str]:
    """
    Reduce a resource URI to what a token's scope depends on.

    @param uri: a decoded resource URI; its scheme, if any, must be C{http},
        C{https}, C{sb}, C{ws} or C{wss}.
    @return: the host, lower-cased and without its port, and the path,
        lower-cased, without C{$hc/}, query, leading or trailing C{/}:
        C{""} for the namespace root.
    @raise ValueError: for another scheme, or a scheme without a host.
    """
    match = _URI.match(uri)
    assert match is not None  # every part of the pattern is optional
    scheme, host = match["scheme"], _normaliseHost(match["host"])
    if scheme is not None and (scheme.lower() not in _SCHEMES or not host):
        raise ValueError(f"the resource {uri[:200]!r} is not an http, https, sb, ws or wss URI with a host.")
    return host, _normalisePath(match["path"])


def _covers(scope: str, path: str) -> bool:
    return scope == "" or path == scope or path.startswith(scope + "/")


#: How many tokens that passed an authorizer keeps, to pass them again cheaply.
PASSED_CACHE = 4096


class Authorizer:
    """
    Checks SAS tokens against a namespace's rules.
    """

    def __init__(self, rules: Sequence[Rule], graceSeconds: int = 300, hostnames: Sequence[str] = ()) -> None:
        """
        @param rules: the namespace-level rules.
        @param graceSeconds: how long after its expiry a token is still
            accepted to renew an established listener control channel.
        @param hostnames: names of the namespace that tokens may be for
            whatever the request's C{Host} (a relay behind a proxy).
        """
        self._rules = tuple(rules)
        self._graceSeconds = graceSeconds
        self._hostnames = frozenset(_normaliseHost(h) for h in hostnames)
        # Tokens that passed, by what they passed for: a client sends the
        # same token with every request, and checking it again (parsing,
        # HMAC, scope) was a tenth of the relay's time per HTTP request.
        # Only the expiry is checked again each time.
        self._passed: OrderedDict[tuple[str, str, str, Rights], tuple[SasToken, Sequence[Rule]]] = OrderedDict()

    def authorize(
        self,
        tokenText: str | None,
        host: str,
        entityPath: str,
        needed: Rights,
        now: float,
        entityRules: Sequence[Rule] = (),
        grace: bool = False,
    ) -> SasToken:
        """
        Check that C{tokenText} allows C{needed} on C{entityPath}.

        @param tokenText: the token from the header or the form-decoded
            query parameter, or C{None} if the client sent none.
        @param host: the request's C{Host}, with or without a port; C{""}
            skips the host check.
        @param entityPath: the name of the hybrid connection; it may contain
            C{/}.
        @param needed: the rights the action requires.
        @param now: the current time, in seconds since the epoch.
        @param entityRules: the entity's own rules, consulted before the
            namespace's.
        @param grace: allow a token that expired within the grace period, for
            a C{renewToken} on an established control channel.
        @return: the checked token.
        @raise Unauthorized: the token is missing, malformed, signed by an
            unknown rule or a wrong key, or expired.
        @raise Forbidden: the token is valid, but not for this host, this
            entity or this action.
        """
        if not tokenText:
            raise Unauthorized(
                "The token is missing: send a SAS token in the ServiceBusAuthorization header "
                "or the sb-hc-token query parameter."
            )
        key = (tokenText, host, entityPath, needed)
        passed = self._passed.get(key)
        if passed is not None and passed[1] is entityRules:
            self._passed.move_to_end(key)
            token = passed[0]
        else:
            token = self._check(tokenText, host, entityPath, needed, entityRules)
            self._passed[key] = (token, entityRules)
            if len(self._passed) > PASSED_CACHE:
                self._passed.popitem(last=False)
        if token.expiry < now - (self._graceSeconds if grace else 0):
            when = datetime.datetime.fromtimestamp(token.expiry, datetime.timezone.utc)
            raise Unauthorized(f"The token is expired. Expiration time: '{when:%Y-%m-%dT%H:%M:%SZ}'")
        return token

    def _check(
        self, tokenText: str, host: str, entityPath: str, needed: Rights, entityRules: Sequence[Rule]
    ) -> SasToken:
        """
        Everything L{authorize} checks but the expiry.
        """
        token = SasToken.parse(tokenText)
        rule = self._verify(token, entityRules)
        action = _describe(needed)
        scopeHost, scopePath = normaliseScope(token.resourceUri)
        if host and scopeHost != _normaliseHost(host) and scopeHost not in self._hostnames:
            raise Forbidden(f"Token is not valid for this host for this action: {action}. It is for '{scopeHost}'.")
        if not _covers(scopePath, _normalisePath(entityPath)):
            raise Forbidden(
                f"Token is not valid for this path for this action: {action}. "
                f"It is for '{token.resourceUri[:200]}'."
            )
        if not rule.grants(needed):
            raise Forbidden(
                f"Authorization failed for specified action: {_describe(needed & ~_effective(rule.rights))}. "
                f"The rule '{rule.name}' grants {_describe(rule.rights) or 'nothing'}."
            )
        return token

    def _verify(self, token: SasToken, entityRules: Sequence[Rule]) -> Rule:
        """
        Find the rule that signed C{token} and check the signature.

        @raise Unauthorized: if the rule is unknown or the signature wrong.
        """
        name = token.keyName.lower()
        rule = next((r for r in (*entityRules, *self._rules) if r.name.lower() == name), None)
        if rule is None:
            raise Unauthorized(f"The token's rule is unknown: there is no authorization rule named '{token.keyName}'.")
        keys = [key for key in (rule.primaryKey, rule.secondaryKey) if key]
        candidates = [token.signature]
        if " " in token.signature:
            candidates.append(token.signature.replace(" ", "+"))
        for key in keys:
            expected = _sign(token.resource, str(token.expiry), key).encode("ascii")
            if any(hmac.compare_digest(expected, c.encode("utf-8")) for c in candidates):
                return rule
        raise Unauthorized("The token has an invalid signature.")

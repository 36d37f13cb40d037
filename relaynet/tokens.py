# -*- test-case-name: relaynet.test.test_tokens -*-
"""
Token providers: where a client gets the SAS token it shows the relay.

A provider is a callable taking the resource URI (C{http://host/entity})
and returning the whole C{SharedAccessSignature ...} text, or a L{Deferred}
of it.  Three are made here: from a rule name and key, from a fixed token,
and from any callable.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Union, cast

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime

from relaynet.auth import mintToken

__all__ = ["TokenProvider", "fromKey", "fixedToken", "fromCallable", "getToken"]

TokenProvider = Callable[[str], Union[str, Awaitable[str]]]


def fromKey(keyName: str, key: str, clock: IReactorTime, ttl: int = 3600) -> TokenProvider:
    """
    Mint a token for each request, valid C{ttl} seconds, with the rule
    C{keyName} and its C{key}.
    """
    if ttl <= 0:
        raise ValueError("ttl must be positive")

    def provide(resource: str) -> str:
        return mintToken(resource, keyName, key, int(clock.seconds()) + ttl)

    return provide


def fixedToken(token: str) -> TokenProvider:
    """
    Always the same token (one made elsewhere; it is not renewed).
    """
    if not token.startswith("SharedAccessSignature "):
        raise ValueError("a SAS token starts with 'SharedAccessSignature '")
    return lambda resource: token


def fromCallable(function: Callable[[str], str | Awaitable[str]]) -> TokenProvider:
    """
    Ask C{function(resourceUri)} for each token: a vault client, a file
    that another process rotates, an HTTP call.
    """
    return function


def getToken(provider: TokenProvider, resource: str) -> Deferred[str]:
    """
    The provider's token for C{resource}, as a L{Deferred}.
    """

    def call() -> Any:
        result = provider(resource)
        if isinstance(result, Deferred):
            return result
        if hasattr(result, "__await__"):
            return Deferred.fromCoroutine(result)  # type: ignore[arg-type]
        return result

    return cast("Deferred[str]", maybeDeferred(call))

# -*- test-case-name: relaynet.test.test_errors -*-
"""
The errors relaynet gives its clients.

Each L{RelayError} knows how to show itself in every dialect a client may
speak: an HTTP status with a reason phrase (WebSocket handshakes and HTTP
requests), an error code for the JSON error body of HTTP relaying, and a
WebSocket close code for connections that are already open.
"""

from __future__ import annotations

import re

__all__ = [
    "RelayError",
    "BadRequest",
    "Unauthorized",
    "Forbidden",
    "EndpointNotFound",
    "NoListeners",
    "QuotaExceeded",
    "ListenerTimeout",
    "Gone",
    "PolicyViolation",
    "BadGateway",
    "PayloadTooLarge",
    "GatewayTimeout",
    "MethodNotAllowed",
    "ServerBusy",
    "safeReason",
]

_UNSAFE = re.compile(r"[^\x20-\x7e]")


def safeReason(text: str, limit: int = 512) -> str:
    """
    Make C{text} safe for an HTTP reason phrase: printable ASCII only, no
    CR or LF, at most C{limit} characters.
    """
    return _UNSAFE.sub("?", text)[:limit]


class RelayError(Exception):
    """
    A refusal with a reason.

    @cvar status: the HTTP status of the refusal.
    @cvar code: the C{error.code} of the JSON error body in HTTP mode.
    @cvar closeCode: the WebSocket close code for an open connection.
    """

    status = 500
    code = "InternalServerError"
    closeCode = 1011

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


class BadRequest(RelayError):
    status = 400
    code = "BadRequest"
    closeCode = 1002


class Unauthorized(RelayError):
    status = 401
    code = "TokenMissingOrInvalid"
    closeCode = 1008


class Forbidden(RelayError):
    status = 403
    code = "Forbidden"
    closeCode = 1008


class QuotaExceeded(Forbidden):
    code = "QuotaExceeded"


class EndpointNotFound(RelayError):
    status = 404
    code = "EndpointNotFound"
    closeCode = 1001


class NoListeners(EndpointNotFound):
    code = "ListenerNotFound"


class ListenerTimeout(EndpointNotFound):
    code = "ListenerTimeout"


class Gone(RelayError):
    status = 410
    code = "Gone"
    closeCode = 1001


class PolicyViolation(RelayError):
    status = 400
    code = "PolicyViolation"
    closeCode = 1008


class BadGateway(RelayError):
    status = 502
    code = "BadGateway"
    closeCode = 1011


class ServerBusy(RelayError):
    status = 503
    code = "ServerBusy"
    closeCode = 1013
    retryAfter = 1


class GatewayTimeout(RelayError):
    status = 504
    code = "GatewayTimeout"
    closeCode = 1011


class MethodNotAllowed(RelayError):
    status = 405
    code = "MethodNotAllowed"
    closeCode = 1008


class PayloadTooLarge(RelayError):
    status = 413
    code = "PayloadTooLarge"
    closeCode = 1009

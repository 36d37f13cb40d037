# -*- test-case-name: relaynet.test.test_frontdoor -*-
"""
The relay's one HTTP(S) front door: WebSocket actions under C{/$hc/},
everything else is HTTP addressed to an entity.
"""

from __future__ import annotations

import json

from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from relaynet.core import Relay
from relaynet.errors import BadRequest, RelayError, safeReason
from relaynet.protocols.websocket import HybridConnectionFactory, HybridConnectionResource

__all__ = ["FrontDoor", "RelaySite", "errorResponse"]

MAX_HEADER_BYTES = 32 * 1024


def errorResponse(request: Request, error: RelayError) -> bytes:
    """
    Answer C{request} with C{error}: its status and reason, and the JSON
    error body of the Hybrid Connections HTTP mode.
    """
    request.setResponseCode(error.status, safeReason(error.reason).encode("ascii"))
    request.setHeader("content-type", "application/json")
    if request.getHeader("upgrade") is not None:
        # An upgrade that failed leaves nothing to keep the connection for.
        request.setHeader("connection", "close")
    return json.dumps({"error": {"code": error.code, "message": error.reason}}).encode("utf-8")


class FrontDoor(Resource):
    """
    The root resource.
    """

    def __init__(self, relay: Relay, websockets: HybridConnectionFactory) -> None:
        super().__init__()
        self.relay = relay
        self.putChild(b"$hc", HybridConnectionResource(websockets))

    def getChild(self, path: bytes, request: Request) -> IResource:
        return _HttpNotYet(self.relay)


class _HttpNotYet(Resource):
    """
    HTTP requests to entities: this relay serves only WebSocket actions.
    """

    isLeaf = True

    def __init__(self, relay: Relay) -> None:
        super().__init__()
        self.relay = relay

    def render(self, request: Request) -> bytes:
        path = request.path.decode("latin-1")
        try:
            entity, _ = self.relay.namespace.resolve(path)
        except RelayError as e:
            return errorResponse(request, e)
        return errorResponse(
            request,
            BadRequest(f"HTTP requests are not relayed to {entity.name}: connect with a WebSocket under /$hc/."),
        )


class _Channel(HTTPChannel):
    totalHeadersSize = MAX_HEADER_BYTES


class RelaySite(Site):
    """
    A site with room for the header block the wire contract allows.
    """

    protocol = _Channel  # type: ignore[assignment]

    def __init__(self, resource: IResource, **kwargs: object) -> None:
        super().__init__(resource, **kwargs)  # type: ignore[arg-type]
        self.displayTracebacks = False


def makeSite(relay: Relay) -> tuple[RelaySite, HybridConnectionFactory]:
    websockets = HybridConnectionFactory(relay)
    return RelaySite(FrontDoor(relay, websockets), reactor=relay.clock), websockets

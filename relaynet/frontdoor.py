# -*- test-case-name: relaynet.test.test_frontdoor -*-
"""
The relay's one HTTP(S) front door: WebSocket actions under C{/$hc/},
everything else is HTTP addressed to an entity.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from relaynet.core import Relay
from relaynet.errors import EndpointNotFound, RelayError, safeReason
from relaynet.protocols.request import RelayHttpChannel, RelayRequest
from relaynet.protocols.websocket import HybridConnectionFactory, HybridConnectionResource

__all__ = ["FrontDoor", "RelaySite", "errorResponse"]

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
        # Requests to entities never get here: RelayRequest relays them.
        return _NotFound()


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return errorResponse(request, EndpointNotFound("There is nothing here."))


class RelaySite(Site):
    """
    The front door's site: requests to entities are relayed as they arrive
    (L{RelayRequest}), the rest go to L{FrontDoor}.
    """

    protocol = RelayHttpChannel  # type: ignore[assignment]
    requestFactory = RelayRequest

    def __init__(self, relay: Relay, resource: IResource, accessLog: bool = False, **kwargs: object) -> None:
        super().__init__(resource, **kwargs)  # type: ignore[arg-type]
        self.relay = relay
        self.accessLog = accessLog
        self.displayTracebacks = False

    def log(self, request: Any) -> None:
        # One line per request is worth its cost only to those who ask.
        if self.accessLog:
            super().log(request)


def makeSite(relay: Relay, accessLog: bool = False) -> tuple[RelaySite, HybridConnectionFactory]:
    websockets = HybridConnectionFactory(relay)
    return RelaySite(relay, FrontDoor(relay, websockets), accessLog, reactor=relay.clock), websockets

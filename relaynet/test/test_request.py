# -*- test-case-name: relaynet.test.test_request -*-
"""
Tests for L{relaynet.protocols.request}: HTTP requests to C{/{entity}}
relayed to a listener and its responses relayed back, driven over fake
transports and a L{Clock}.

Senders are raw HTTP/1.1 bytes fed to the front door's L{RelaySite}; the
listener's control channel and rendezvous sockets are L{Peer}s from
C{test_websocket}.  The same flows over real sockets are in
C{test_loopback_http}.
"""

from __future__ import annotations

import io
import itertools
import json
import random
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote
from xml.etree import ElementTree

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from relaynet.core import RelaySettings
from relaynet.entities import Entity
from relaynet.frontdoor import FrontDoor, RelaySite
from relaynet.registry import MemoryRegistry
from relaynet.test.support import FakeTcp
from relaynet.test.test_websocket import (
    BINARY,
    CONTINUATION,
    HOST,
    TEXT,
    Harness,
    Peer,
    token,
)

SENDER = ("198.51.100.4", 61544)
VIA = f"1.1 {HOST}"
SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12 = "http://www.w3.org/2003/05/soap-envelope"


def httpRequest(
    method: str = "GET",
    target: str = "/hyco",
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    entity: str | None = "hyco",
) -> bytes:
    """
    The bytes of an HTTP/1.1 request, with a C{Host} header and, unless
    C{entity} is C{None}, a C{ServiceBusAuthorization} token for C{entity}.
    """
    lines = [f"{method} {target} HTTP/1.1", f"Host: {HOST}"]
    if entity is not None:
        lines.append(f"ServiceBusAuthorization: {token(entity)}")
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class HttpResponse:
    """
    What the relay wrote to a sender, parsed as one HTTP response.
    """

    def __init__(self, data: bytes) -> None:
        head, _, self.rest = data.partition(b"\r\n\r\n")
        statusLine, *lines = head.decode("latin-1").split("\r\n")
        _, status, self.reason = (statusLine.split(" ", 2) + [""])[:3]
        self.status = int(status)
        self.headers: list[tuple[str, str]] = []
        for line in lines:
            name, _, value = line.partition(":")
            self.headers.append((name.strip(), value.strip()))

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def header(self, name: str) -> str | None:
        values = self.values(name)
        assert len(values) <= 1, f"{name} appears {len(values)} times"
        return values[0] if values else None

    @property
    def chunked(self) -> bool:
        return (self.header("transfer-encoding") or "").lower() == "chunked"

    @property
    def body(self) -> bytes:
        """
        The body as far as it came, with the chunked framing taken off.
        """
        if not self.chunked:
            length = self.header("content-length")
            return self.rest if length is None else self.rest[: int(length)]
        body, rest = b"", self.rest
        while b"\r\n" in rest:
            size, _, rest = rest.partition(b"\r\n")
            length = int(size, 16)
            if length == 0 or len(rest) < length:
                break
            body, rest = body + rest[:length], rest[length + 2 :]
        return body

    @property
    def complete(self) -> bool:
        if self.chunked:
            return self.rest.endswith(b"0\r\n\r\n")
        length = self.header("content-length")
        return length is not None and len(self.rest) >= int(length)

    def json(self) -> Any:
        return json.loads(self.body)


class Sender:
    """
    A sender's HTTP connection to the relay's front door over a
    L{FakeTcp}.
    """

    def __init__(self, site: RelaySite, clock: Clock, data: bytes = b"", peer: tuple[str, int] = SENDER) -> None:
        self.transport = FakeTcp(clock, peer)
        self.channel = site.buildProtocol(self.transport.getPeer())
        assert self.channel is not None
        self.transport.protocol = self.channel
        self.channel.makeConnection(self.transport)
        if data:
            self.send(data)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    @property
    def response(self) -> HttpResponse | None:
        data = self.transport.value()
        return HttpResponse(data) if b"\r\n\r\n" in data else None

    def answered(self) -> HttpResponse:
        response = self.response
        assert response is not None, "no response"
        return response


class HttpHarness(Harness):
    """
    A L{Harness} with the relay's front door in front of it.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.site = RelaySite(self.relay, FrontDoor(self.relay, self.factory), reactor=self.clock)

    def request(self, *args: Any, peer: tuple[str, int] = SENDER, **kwargs: Any) -> Sender:
        return Sender(self.site, self.clock, httpRequest(*args, **kwargs), peer)

    def sender(self, data: bytes = b"") -> Sender:
        return Sender(self.site, self.clock, data)


def lastRequest(peer: Peer) -> dict[str, Any]:
    """
    The last C{request} command C{peer} received.
    """
    request = peer.commands()[-1]["request"]
    assert isinstance(request, dict)
    return request


def respond(peer: Peer, requestId: str, data: bytes | None = None, **fields: Any) -> None:
    """
    Send a C{response} for C{requestId} from C{peer}, then C{data}, if
    given, as one binary message.  C{fields} add to or replace the
    response's fields: C{body=True} without C{data} leaves the body to the
    caller.
    """
    response: dict[str, Any] = {"requestId": requestId, "statusCode": 200, "body": data is not None}
    response.update(fields)
    peer.send(TEXT, json.dumps({"response": response}).encode())
    if data is not None:
        peer.send(BINARY, data)


class ControlChannelRequestTests(SynchronousTestCase):
    """
    Requests with a body of at most 64 KiB go whole on the listener's
    control channel: the C{request} command in full, then the body.
    """

    def test_noBodyIsFullFormWithBodyFalse(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        h.request("GET", "/hyco")
        [(opcode, payload)] = listener.messages()
        self.assertEqual(opcode, TEXT)
        request = json.loads(payload)["request"]
        self.assertEqual(request["method"], "GET")
        self.assertIs(request["body"], False)
        self.assertEqual(
            set(request), {"address", "id", "requestTarget", "method", "requestHeaders", "remoteEndpoint", "body"}
        )

    def test_addressFilledInOnce(self) -> None:
        """
        The address names the relay as the listener reached it; text like
        the placeholder the relay uses for it, elsewhere in the request,
        is left alone.
        """
        h = HttpHarness()
        listener = h.listen()
        h.request("GET", "/hyco?x={base}", headers=[("X-Template", "{base}/a \u00e9")])
        [(_, payload)] = listener.messages()
        request = json.loads(payload)["request"]
        self.assertEqual(request["address"], f"ws://{HOST}/$hc/hyco?x={{base}}&sb-hc-action=request&sb-hc-id={request['id']}")
        self.assertEqual(request["requestHeaders"]["X-Template"], "{base}/a \u00e9")
        self.assertEqual(request["requestTarget"], "/hyco?x={base}")

    def test_emptyBodyIsBodyFalse(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        h.request("POST", headers=[("Content-Length", "0")])
        [(_, payload)] = listener.messages()
        request = json.loads(payload)["request"]
        self.assertEqual(request["method"], "POST")
        self.assertIs(request["body"], False)

    def test_bodyIsTheNextBinaryMessage(self) -> None:
        for size in (1, 65536):
            h = HttpHarness()
            listener = h.listen()
            body = bytes(random.Random(size).randrange(256) for _ in range(size))
            h.request("POST", headers=[("Content-Length", str(size))], body=body)
            messages = listener.messages()
            self.assertEqual([opcode for opcode, _ in messages], [TEXT, BINARY], size)
            request = json.loads(messages[0][1])["request"]
            self.assertEqual(request["method"], "POST", size)
            self.assertIs(request["body"], True, size)
            self.assertEqual(messages[1][1], body, size)

    def test_bodyInPiecesIsStillOneMessage(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        sender = h.sender(httpRequest("PUT", headers=[("Content-Length", "6")]) + b"abc")
        self.assertEqual(listener.messages(), [])
        sender.send(b"def")
        self.assertEqual(listener.messages()[1:], [(BINARY, b"abcdef")])

    def test_requestTargetKeepsPathAndQueryWithoutRelayParameters(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        tokenText = quote(token("hyco"), safe="")
        h.request(
            "GET",
            f"/hyco/orders/7?x=1&sb-hc-token={tokenText}&sb-hc-undefined&y=&sb-hc-id=5&a=1&a=2",
            entity=None,
        )
        request = lastRequest(listener)
        self.assertEqual(request["requestTarget"], "/hyco/orders/7?x=1&sb-hc-undefined&y=&a=1&a=2")
        self.assertEqual(
            request["address"],
            f"ws://{HOST}/$hc/hyco/orders/7?x=1&sb-hc-undefined&y=&a=1&a=2"
            f"&sb-hc-action=request&sb-hc-id={request['id']}",
        )

    def test_requestTargetWithOnlyRelayParameters(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        h.request("GET", "/hyco/orders?sb-hc-id=abc")
        self.assertEqual(lastRequest(listener)["requestTarget"], "/hyco/orders")

    def test_hostKeptAndViaAdded(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        h.request("GET")
        headers = lastRequest(listener)["requestHeaders"]
        self.assertEqual(headers["Host"], HOST)
        self.assertEqual(headers["Via"], VIA)

    def test_viaExtended(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        h.request("GET", headers=[("Via", "1.0 proxy.example")])
        self.assertEqual(lastRequest(listener)["requestHeaders"]["Via"], f"1.0 proxy.example, {VIA}")

    def test_repeatedHeadersJoined(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        h.request(
            "GET",
            headers=[
                ("X-Custom", "requestValue1"),
                ("Cookie", "a=1"),
                ("X-Custom", "requestValue2"),
                ("Cookie", "b=2"),
            ],
        )
        headers = lastRequest(listener)["requestHeaders"]
        self.assertEqual(headers["X-Custom"], "requestValue1, requestValue2")
        self.assertEqual(headers["Cookie"], "a=1; b=2")

    def test_hopByHopHeadersRemoved(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        h.request(
            "GET",
            headers=[
                ("Connection", "keep-alive, X-Hop"),
                ("Keep-Alive", "timeout=5"),
                ("TE", "trailers"),
                ("Upgrade", "h2c"),
                ("Proxy-Connection", "keep-alive"),
                ("Trailer", "X-Checksum"),
                ("X-Hop", "1"),
                ("X-Kept", "2"),
            ],
        )
        headers = lastRequest(listener)["requestHeaders"]
        names = {name.lower() for name in headers}
        for name in ["connection", "keep-alive", "te", "upgrade", "proxy-connection", "trailer", "x-hop"]:
            self.assertNotIn(name, names)
        self.assertEqual(headers["X-Kept"], "2")

    def test_serviceBusAuthorizationRemoved(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        h.request("GET")
        names = {name.lower() for name in lastRequest(listener)["requestHeaders"]}
        self.assertNotIn("servicebusauthorization", names)
        self.assertIn("host", names)

    def test_authorizationRemovedWhenItWasTheCredential(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        sender = h.request("GET", headers=[("Authorization", token("hyco"))], entity=None)
        self.assertIsNone(sender.response)
        names = {name.lower() for name in lastRequest(listener)["requestHeaders"]}
        self.assertNotIn("authorization", names)

    def test_authorizationKeptOtherwise(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        h.request("GET", headers=[("Authorization", "Bearer abc.def")])
        self.assertEqual(lastRequest(listener)["requestHeaders"]["Authorization"], "Bearer abc.def")
        # A SAS token there is the application's when another was the credential.
        h.request("GET", headers=[("Authorization", token("other"))])
        self.assertEqual(lastRequest(listener)["requestHeaders"]["Authorization"], token("other"))

    def test_remoteEndpoint(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        h.request("GET", peer=("192.0.2.9", 40001))
        endpoint = lastRequest(listener)["remoteEndpoint"]
        self.assertEqual(endpoint, {"address": "192.0.2.9", "port": 40001})
        self.assertIsInstance(endpoint["port"], int)

    def test_headerValuesAreStrings(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        h.request("POST", headers=[("Content-Length", "2"), ("X-N", "5"), ("X-N", "6"), ("Accept", "*/*")], body=b"{}")
        headers = lastRequest(listener)["requestHeaders"]
        self.assertIsInstance(headers, dict)
        self.assertEqual(headers["X-N"], "5, 6")
        self.assertTrue(all(isinstance(v, str) for v in headers.values()), headers)
        # Kept when the length is known, for listeners' body parsers.
        self.assertEqual(headers["Content-Length"], "2")


class RendezvousRequestTests(SynchronousTestCase):
    """
    Larger and chunked requests: the listener is sent only an address, and
    the relay hands it the request there.
    """

    def _addressOnly(self, h: HttpHarness, listener: Peer, data: bytes) -> tuple[Sender, dict[str, Any]]:
        sender = h.sender(data)
        [(opcode, payload)] = listener.messages()
        self.assertEqual(opcode, TEXT)
        command = json.loads(payload)
        self.assertEqual(list(command), ["request"])
        return sender, command["request"]

    def test_largeBodyIsAddressOnly(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        _, request = self._addressOnly(h, listener, httpRequest("POST", headers=[("Content-Length", "65537")]))
        self.assertEqual(set(request), {"address", "id"})
        self.assertEqual(request["address"], f"ws://{HOST}/$hc/hyco?sb-hc-action=request&sb-hc-id={request['id']}")

    def test_chunkedBodyIsAddressOnly(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        _, request = self._addressOnly(
            h, listener, httpRequest("POST", headers=[("Transfer-Encoding", "chunked")]) + b"5\r\nhello\r\n0\r\n\r\n"
        )
        self.assertNotIn("method", request)
        self.assertNotIn("body", request)

    def test_senderPausedUntilTheRendezvousOpens(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        sender, request = self._addressOnly(
            h, listener, httpRequest("POST", headers=[("Content-Length", "65537")]) + b"a" * 1000
        )
        self.assertEqual(sender.transport.producerState, "paused")
        rendezvous = h.rendezvous(request["address"])
        self.assertEqual(rendezvous.status, 101)
        self.assertEqual(sender.transport.producerState, "producing")

    def test_requestAndBodyDeliveredAtTheRendezvous(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        body = b"a" * 40000 + b"b" * 25537
        sender, request = self._addressOnly(
            h,
            listener,
            httpRequest("PUT", "/hyco/big?q=1&sb-hc-id=x", headers=[("Content-Length", "65537"), ("X-App", "1")])
            + body[:40000],
        )
        sender.send(body[40000:])
        rendezvous = h.rendezvous(request["address"])
        [(textOpcode, text), (binaryOpcode, delivered)] = rendezvous.messages()
        self.assertEqual((textOpcode, binaryOpcode), (TEXT, BINARY))
        full = json.loads(text)["request"]
        self.assertEqual(full["id"], request["id"])
        self.assertEqual(full["method"], "PUT")
        self.assertEqual(full["requestTarget"], "/hyco/big?q=1")
        self.assertIs(full["body"], True)
        self.assertEqual(full["requestHeaders"]["X-App"], "1")
        self.assertEqual(full["requestHeaders"]["Via"], VIA)
        self.assertEqual(full["requestHeaders"]["Content-Length"], "65537")
        self.assertEqual(full["remoteEndpoint"], {"address": SENDER[0], "port": SENDER[1]})
        self.assertEqual(delivered, body)
        dataFrames = [(fin, opcode) for fin, opcode, _ in rendezvous.frames() if opcode < 8][1:]
        self.assertGreater(len(dataFrames), 1)
        self.assertEqual(dataFrames[0], (False, BINARY))
        self.assertEqual([fin for fin, _ in dataFrames], [False] * (len(dataFrames) - 1) + [True])
        # Nothing more on the control channel.
        self.assertEqual(len(listener.messages()), 1)

    def test_chunkedBodyStreamsAfterTheRendezvousOpens(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        sender, request = self._addressOnly(
            h, listener, httpRequest("POST", headers=[("Transfer-Encoding", "chunked")]) + b"5\r\nhello\r\n"
        )
        rendezvous = h.rendezvous(request["address"])
        full = json.loads(rendezvous.messages()[0][1])["request"]
        names = {name.lower() for name in full["requestHeaders"]}
        self.assertNotIn("transfer-encoding", names)
        self.assertNotIn("content-length", names)
        self.assertEqual([(fin, op, p) for fin, op, p in rendezvous.frames()][1:], [(False, BINARY, b"hello")])
        sender.send(b"6\r\n world\r\n")
        self.assertEqual(rendezvous.frames()[-1], (False, CONTINUATION, b" world"))
        self.assertEqual(len(rendezvous.messages()), 1)
        sender.send(b"0\r\n\r\n")
        self.assertEqual(rendezvous.messages()[1], (BINARY, b"hello world"))
        self.assertTrue(rendezvous.frames()[-1][0])

    def test_fullRendezvousPausesTheSender(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        sender, request = self._addressOnly(
            h, listener, httpRequest("POST", headers=[("Transfer-Encoding", "chunked")]) + b"5\r\nhello\r\n"
        )
        rendezvous = h.rendezvous(request["address"])
        producer = rendezvous.transport.producer
        self.assertIsNotNone(producer)
        producer.pauseProducing()
        self.assertEqual(sender.transport.producerState, "paused")
        producer.resumeProducing()
        self.assertEqual(sender.transport.producerState, "producing")

    def test_responseOnTheRendezvous(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        sender, request = self._addressOnly(
            h, listener, httpRequest("POST", headers=[("Transfer-Encoding", "chunked")]) + b"1\r\nx\r\n0\r\n\r\n"
        )
        rendezvous = h.rendezvous(request["address"])
        respond(rendezvous, request["id"], b"done", statusCode=201)
        response = sender.answered()
        self.assertEqual(response.status, 201)
        self.assertEqual(response.body, b"done")
        self.assertTrue(response.complete)
        self.assertEqual(rendezvous.closes(), [(1000, b"")])
        self.assertEqual(h.relay.exchanges, {})

    def test_secondRendezvousRefused(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        _, request = self._addressOnly(h, listener, httpRequest("POST", headers=[("Content-Length", "70000")]))
        self.assertEqual(h.rendezvous(request["address"]).status, 101)
        self.assertEqual(h.rendezvous(request["address"]).status, 404)


class ControlChannelResponseTests(SynchronousTestCase):
    """
    C{response} commands on the control channel, with the body as the next
    binary message.
    """

    def _exchange(self, method: str = "GET") -> tuple[HttpHarness, Peer, Sender, str]:
        h = HttpHarness()
        listener = h.listen()
        sender = h.request(method)
        return h, listener, sender, lastRequest(listener)["id"]

    def test_statusAndDescription(self) -> None:
        _, listener, sender, rid = self._exchange()
        respond(listener, rid, b"{}", statusCode=201, statusDescription="Created It")
        response = sender.answered()
        self.assertEqual((response.status, response.reason), (201, "Created It"))

    def test_responseInOneWrite(self) -> None:
        """
        A response that comes whole on the control channel, with a body or
        without, reaches the sender's connection in one write.
        """
        for body in (b"some body", None):
            _, listener, sender, rid = self._exchange()
            writes: list[bytes] = []
            original = sender.transport.write
            sender.transport.write = lambda data: (writes.append(data), original(data))  # type: ignore[method-assign]
            respond(listener, rid, body)
            response = sender.answered()
            self.assertEqual(len(writes), 1, body)
            self.assertEqual(response.body, body or b"")
            self.assertTrue(writes[0].startswith(b"HTTP/1.1 200 OK\r\n"), writes[0])

    def test_lowerCaseHeadHasABody(self) -> None:
        """
        Methods are case-sensitive: C{head} is not C{HEAD}, and its response
        carries its body and length.
        """
        _, listener, sender, rid = self._exchange("head")
        respond(listener, rid, b"hello")
        response = sender.answered()
        self.assertEqual((response.header("content-length"), response.body), ("5", b"hello"))

    def test_accessLogLine(self) -> None:
        """
        With the access log on, a relayed response is logged with its
        status and the bytes of its body, as twisted.web logs its own.
        """
        h, listener, sender, rid = self._exchange()
        logFile = io.StringIO()
        h.site.accessLog = True
        h.site.logFile = logFile
        respond(listener, rid, b"some body", statusCode=201)
        self.assertEqual(sender.answered().status, 201)
        [line] = logFile.getvalue().splitlines()
        self.assertIn('HTTP/1.1" 201 9 ', line)

    def test_pipelinedRequestAnswersFollow(self) -> None:
        """
        What twisted.web writes itself for a pipelined request (100
        Continue, or 400 for a bad one) follows the response before it.
        """
        for second, first in (
            (httpRequest("POST", headers=[("Expect", "100-continue"), ("Content-Length", "3")]), b"HTTP/1.1 100"),
            (b"BROKEN\r\n\r\n", b"HTTP/1.1 400"),
        ):
            h = HttpHarness()
            listener = h.listen()
            sender = h.sender(httpRequest("GET") + second)
            respond(listener, lastRequest(listener)["id"], b"first answer")
            data = sender.transport.value()
            self.assertTrue(data.startswith(b"HTTP/1.1 200 OK\r\n"), data)
            head, _, rest = data.partition(b"\r\n\r\n")
            self.assertTrue(rest.startswith(b"first answer" + first), data)

    def test_statusCodeAsNumericString(self) -> None:
        _, listener, sender, rid = self._exchange()
        respond(listener, rid, b"x", statusCode="202")
        self.assertEqual(sender.answered().status, 202)

    def test_standardReasonWhenNoDescription(self) -> None:
        _, listener, sender, rid = self._exchange()
        respond(listener, rid, b"", statusCode=404)
        self.assertEqual(sender.answered().reason, "Not Found")
        _, listener, sender, rid = self._exchange()
        respond(listener, rid, b"", statusCode=503, statusDescription="")
        self.assertEqual(sender.answered().reason, "Service Unavailable")

    def test_gatewayStatusesFromTheListenerPassThrough(self) -> None:
        for code in (418, 502, 504):
            _, listener, sender, rid = self._exchange()
            respond(listener, rid, b"mine", statusCode=code)
            response = sender.answered()
            self.assertEqual((response.status, response.body), (code, b"mine"))
            self.assertEqual(response.header("via"), VIA)

    def test_reasonCannotAddHeaders(self) -> None:
        _, listener, sender, rid = self._exchange()
        respond(listener, rid, b"", statusDescription="Fine\r\nX-Evil: 1")
        self.assertEqual(sender.answered().values("x-evil"), [])
        self.assertNotIn(b"\r\nX-Evil", sender.transport.value())

    def test_responseHeaders(self) -> None:
        _, listener, sender, rid = self._exchange()
        respond(
            listener,
            rid,
            b"[1]",
            responseHeaders={"content-type": "application/json", "x-count": 5, "x-request-id": "abc"},
        )
        response = sender.answered()
        self.assertEqual(response.header("Content-Type"), "application/json")
        self.assertEqual(response.header("X-Count"), "5")
        self.assertEqual(response.header("X-Request-Id"), "abc")
        self.assertEqual(response.body, b"[1]")

    def test_relayOwnsTheFraming(self) -> None:
        _, listener, sender, rid = self._exchange()
        respond(
            listener,
            rid,
            b"12345",
            responseHeaders={"content-length": "999", "transfer-encoding": "chunked", "connection": "close"},
        )
        response = sender.answered()
        self.assertEqual(response.values("content-length"), ["5"])
        self.assertIsNone(response.header("transfer-encoding"))
        self.assertIsNone(response.header("connection"))
        self.assertEqual(response.rest, b"12345")
        # The connection stays for the sender's next request.
        self.assertFalse(sender.transport.disconnecting)

    def test_emptyBodyHasContentLengthZero(self) -> None:
        _, listener, sender, rid = self._exchange()
        respond(listener, rid, b"")
        response = sender.answered()
        self.assertEqual(response.values("content-length"), ["0"])
        self.assertEqual(response.rest, b"")

    def test_viaAdded(self) -> None:
        _, listener, sender, rid = self._exchange()
        respond(listener, rid, b"x", responseHeaders={"x-a": "1"})
        self.assertEqual(sender.answered().values("via"), [VIA])

    def test_bodyInSeveralFrames(self) -> None:
        _, listener, sender, rid = self._exchange()
        respond(listener, rid, responseHeaders={"content-type": "application/json"}, body=True)
        self.assertEqual(sender.transport.value(), b"")
        listener.send(BINARY, b'{"id":', fin=False)
        listener.send(CONTINUATION, b"17}", fin=False)
        self.assertEqual(sender.transport.value(), b"")
        listener.send(CONTINUATION, b"", fin=True)
        response = sender.answered()
        self.assertEqual(response.header("content-length"), "9")
        self.assertEqual(response.body, b'{"id":17}')

    def test_strayEmptyBinaryAfterBodyFalseIgnored(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        first = h.request("GET")
        firstId = lastRequest(listener)["id"]
        second = h.request("GET", "/hyco/2")
        secondId = lastRequest(listener)["id"]
        respond(listener, firstId, statusCode=204, body=False)
        listener.send(BINARY, b"")  # what hyco-https sends after body:false
        respond(listener, secondId, b"second")
        self.assertEqual(first.answered().status, 204)
        self.assertEqual(first.answered().rest, b"")
        response = second.answered()
        self.assertEqual((response.status, response.body), (200, b"second"))
        self.assertEqual(h.relay.exchanges, {})

    def test_headGetsNoBody(self) -> None:
        _, listener, sender, rid = self._exchange(method="HEAD")
        respond(listener, rid, b"abc", responseHeaders={"content-length": "1234", "content-type": "a/b"})
        response = sender.answered()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.rest, b"")
        self.assertTrue(sender.transport.value().endswith(b"\r\n\r\n"))
        self.assertEqual(response.header("content-type"), "a/b")
        # The length a GET would have had, as the listener said.
        self.assertEqual(response.header("content-length"), "1234")

    def test_noContentAndNotModified(self) -> None:
        for code in (204, 304):
            _, listener, sender, rid = self._exchange()
            respond(listener, rid, statusCode=code, responseHeaders={"etag": '"v1"'}, body=False)
            response = sender.answered()
            self.assertEqual(response.status, code)
            self.assertEqual(response.header("etag"), '"v1"')
            self.assertIsNone(response.header("transfer-encoding"))
            self.assertEqual(response.rest, b"")

    def test_unknownRequestIdIgnored(self) -> None:
        _, listener, sender, rid = self._exchange()
        respond(listener, "made-up_G0", b"not yours", statusCode=500)
        self.assertEqual(sender.transport.value(), b"")
        respond(listener, rid, b"yours")
        response = sender.answered()
        self.assertEqual((response.status, response.body), (200, b"yours"))

    def test_secondResponseIgnored(self) -> None:
        _, listener, sender, rid = self._exchange()
        respond(listener, rid, b"first")
        before = sender.transport.value()
        respond(listener, rid, b"second", statusCode=500)
        self.assertEqual(sender.transport.value(), before)

    def test_invalidStatusCodeIs502(self) -> None:
        for code in ["abc", "", 100, 101, 199, 99, 1000, None, [200]]:
            h, listener, sender, rid = self._exchange()
            respond(listener, rid, b"body", statusCode=code)
            response = sender.answered()
            self.assertEqual(response.status, 502, code)
            self.assertEqual(response.header("content-type"), "application/json", code)
            self.assertEqual(response.json()["error"]["code"], "BadGateway", code)
            self.assertIsNone(response.header("via"), code)
            self.assertEqual(h.relay.exchanges, {}, code)

    def test_missingStatusCodeIs502(self) -> None:
        _, listener, sender, rid = self._exchange()
        listener.send(TEXT, json.dumps({"response": {"requestId": rid, "body": False}}).encode())
        self.assertEqual(sender.answered().status, 502)

    def test_bodyOfAFailedResponseIsNotTheNextBody(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        first = h.request("GET")
        firstId = lastRequest(listener)["id"]
        second = h.request("GET")
        respond(listener, firstId, b"junk", statusCode="abc")
        respond(listener, lastRequest(listener)["id"], b"good")
        self.assertEqual(first.answered().status, 502)
        self.assertEqual(second.answered().body, b"good")

    def test_keepAliveConnectionCarriesANextRequest(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        sender = h.request("GET", "/hyco/1")
        respond(listener, lastRequest(listener)["id"], b"one")
        sender.send(httpRequest("GET", "/hyco/2"))
        request = lastRequest(listener)
        self.assertEqual(request["requestTarget"], "/hyco/2")
        respond(listener, request["id"], b"two")
        self.assertTrue(sender.transport.value().endswith(b"\r\n\r\ntwo"))


class RendezvousResponseTests(SynchronousTestCase):
    """
    Responses the listener sends over a rendezvous, streamed to the sender.
    """

    def _openRendezvous(
        self, settings: RelaySettings | None = None, method: str = "GET"
    ) -> tuple[HttpHarness, Peer, Sender, Peer, str]:
        h = HttpHarness(settings=settings)
        listener = h.listen()
        sender = h.request(method)
        request = lastRequest(listener)
        rendezvous = h.rendezvous(request["address"])
        self.assertEqual(rendezvous.status, 101)
        return h, listener, sender, rendezvous, request["id"]

    def test_requestIsNotSentAgain(self) -> None:
        _, listener, _, rendezvous, _ = self._openRendezvous()
        self.assertEqual(rendezvous.messages(), [])
        self.assertEqual(len(listener.messages()), 1)

    def test_bodyStreamsChunked(self) -> None:
        h, _, sender, rendezvous, rid = self._openRendezvous()
        respond(
            rendezvous,
            rid,
            responseHeaders={"content-type": "text/plain", "content-length": "11"},
            body=True,
            statusDescription="Fine",
        )
        rendezvous.send(BINARY, b"hello ", fin=False)
        response = sender.answered()
        self.assertEqual((response.status, response.reason), (200, "Fine"))
        self.assertTrue(response.chunked)
        self.assertIsNone(response.header("content-length"))
        self.assertEqual(response.header("content-type"), "text/plain")
        self.assertEqual(response.header("via"), VIA)
        self.assertEqual(response.body, b"hello ")
        self.assertFalse(response.complete)
        self.assertEqual(rendezvous.closes(), [])
        rendezvous.send(CONTINUATION, b"world", fin=False)
        self.assertEqual(sender.answered().body, b"hello world")
        self.assertEqual(rendezvous.closes(), [])
        rendezvous.send(CONTINUATION, b"", fin=True)
        response = sender.answered()
        self.assertTrue(response.complete)
        self.assertEqual(response.body, b"hello world")
        self.assertEqual(rendezvous.closes(), [(1000, b"")])
        self.assertEqual(h.relay.exchanges, {})
        self.assertFalse(sender.transport.disconnecting)

    def test_bodyFalseClosesTheRendezvous(self) -> None:
        _, _, sender, rendezvous, rid = self._openRendezvous()
        respond(rendezvous, rid, statusCode=204, body=False)
        self.assertEqual(sender.answered().status, 204)
        self.assertEqual(rendezvous.closes(), [(1000, b"")])

    def test_headOverTheRendezvousGetsNoBody(self) -> None:
        _, _, sender, rendezvous, rid = self._openRendezvous(method="HEAD")
        respond(rendezvous, rid, responseHeaders={"content-length": "5"}, body=True)
        rendezvous.send(BINARY, b"12345")
        response = sender.answered()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.rest, b"")
        self.assertEqual(rendezvous.closes(), [(1000, b"")])

    def test_pausedSenderPausesTheRendezvous(self) -> None:
        _, _, sender, rendezvous, rid = self._openRendezvous()
        respond(rendezvous, rid, body=True)
        rendezvous.send(BINARY, b"x" * 1000, fin=False)
        self.assertEqual(rendezvous.transport.producerState, "producing")
        sender.channel.pauseProducing()  # the sender's send buffer is full
        self.assertEqual(rendezvous.transport.producerState, "paused")
        sender.channel.resumeProducing()
        self.assertEqual(rendezvous.transport.producerState, "producing")

    def test_responseEndResumesThePausedRendezvous(self) -> None:
        _, _, sender, rendezvous, rid = self._openRendezvous()
        respond(rendezvous, rid, body=True)
        sender.channel.pauseProducing()
        rendezvous.send(BINARY, b"end")
        self.assertEqual(rendezvous.closes(), [(1000, b"")])
        # It must read the listener's answer to the close.
        self.assertEqual(rendezvous.transport.producerState, "producing")

    def test_listenerLeavesWithoutAnswering(self) -> None:
        h, _, sender, rendezvous, _ = self._openRendezvous()
        rendezvous.transport.connectionGone()
        response = sender.answered()
        self.assertEqual(response.status, 502)
        self.assertEqual(response.json()["error"]["code"], "BadGateway")
        self.assertEqual(h.relay.exchanges, {})

    def test_listenerLeavesMidBody(self) -> None:
        h, _, sender, rendezvous, rid = self._openRendezvous()
        respond(rendezvous, rid, body=True)
        rendezvous.send(BINARY, b"part", fin=False)
        rendezvous.transport.connectionGone()
        self.assertTrue(sender.transport.aborted)
        self.assertFalse(sender.answered().complete)
        self.assertEqual(h.relay.exchanges, {})

    def test_controlChannelLossLeavesTheRendezvous(self) -> None:
        _, listener, sender, rendezvous, rid = self._openRendezvous()
        listener.transport.connectionGone()
        self.assertIsNone(sender.response)
        respond(rendezvous, rid, b"still here")
        self.assertEqual(sender.answered().body, b"still here")


class DeadlineTests(SynchronousTestCase):
    """
    A listener has C{requestTimeout} seconds to answer, and a response
    body may pause no longer than that.
    """

    def _assert504(self, sender: Sender) -> None:
        response = sender.answered()
        self.assertEqual(response.status, 504)
        self.assertEqual(response.header("content-type"), "application/json")
        error = response.json()["error"]
        self.assertEqual(error["code"], "GatewayTimeout")
        self.assertIn("did not respond in the required time", error["message"])
        self.assertIsNone(response.header("via"))

    def test_noResponseIs504(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        sender = h.request("GET")
        h.clock.advance(59.9)
        self.assertIsNone(sender.response)
        h.clock.advance(0.1)
        self._assert504(sender)
        self.assertEqual(h.relay.exchanges, {})
        self.assertEqual(listener.proto.role.exchanges, {})

    def test_settingsTimeout(self) -> None:
        h = HttpHarness(settings=RelaySettings(requestTimeout=7))
        h.listen()
        sender = h.request("GET")
        h.clock.advance(6.9)
        self.assertIsNone(sender.response)
        h.clock.advance(0.1)
        self._assert504(sender)

    def test_entityTimeout(self) -> None:
        h = HttpHarness(
            settings=RelaySettings(requestTimeout=20),
            entities=[Entity(name="hyco", requestTimeout=5), Entity(name="other")],
        )
        h.listen(), h.listen("other")
        quick = h.request("GET", "/hyco")
        slow = h.request("GET", "/other", entity="other")
        h.clock.advance(4.9)
        self.assertIsNone(quick.response)
        h.clock.advance(0.1)
        self._assert504(quick)
        h.clock.advance(14.9)
        self.assertIsNone(slow.response)
        h.clock.advance(0.1)
        self._assert504(slow)

    def test_responseInTimeCancelsTheDeadline(self) -> None:
        h = HttpHarness(settings=RelaySettings(requestTimeout=5))
        listener = h.listen()
        sender = h.request("GET")
        h.clock.advance(4.9)
        respond(listener, lastRequest(listener)["id"], b"ok")
        h.clock.advance(100)
        self.assertEqual(sender.answered().status, 200)
        self.assertEqual(sender.answered().body, b"ok")

    def test_lateResponseIgnored(self) -> None:
        h = HttpHarness(settings=RelaySettings(requestTimeout=5))
        listener = h.listen()
        sender = h.request("GET")
        h.clock.advance(5)
        before = sender.transport.value()
        respond(listener, lastRequest(listener)["id"], b"late")
        self.assertEqual(sender.transport.value(), before)
        self.assertEqual(sender.answered().status, 504)

    def test_unopenedRendezvousIs504(self) -> None:
        h = HttpHarness(settings=RelaySettings(requestTimeout=5))
        listener = h.listen()
        sender = h.sender(httpRequest("POST", headers=[("Content-Length", "70000")]) + b"x" * 100)
        h.clock.advance(5)
        self._assert504(sender)
        self.assertEqual(h.relay.exchanges, {})
        # The body was never read: the connection ends after the answer.
        self.assertTrue(sender.transport.disconnecting)
        self.assertEqual(h.rendezvous(lastRequest(listener)["address"]).status, 404)

    def test_silentRendezvousIs504(self) -> None:
        h = HttpHarness(settings=RelaySettings(requestTimeout=5))
        listener = h.listen()
        sender = h.request("GET")
        rendezvous = h.rendezvous(lastRequest(listener)["address"])
        h.clock.advance(5)
        self._assert504(sender)
        [(code, _)] = rendezvous.closes()
        self.assertEqual(code, 1011)

    def test_stalledBodyAbortsTheSender(self) -> None:
        h = HttpHarness(settings=RelaySettings(requestTimeout=10))
        listener = h.listen()
        sender = h.request("GET")
        rid = lastRequest(listener)["id"]
        rendezvous = h.rendezvous(lastRequest(listener)["address"])
        respond(rendezvous, rid, body=True)
        for piece in (b"abc", b"def", b"ghi"):
            h.clock.advance(9.9)
            rendezvous.send(BINARY if piece == b"abc" else CONTINUATION, piece, fin=False)
        self.assertFalse(sender.transport.aborted)
        self.assertEqual(sender.answered().body, b"abcdefghi")
        h.clock.advance(9.9)
        self.assertFalse(sender.transport.aborted)
        h.clock.advance(0.1)
        self.assertTrue(sender.transport.aborted)
        self.assertFalse(sender.answered().complete)
        [(code, _)] = rendezvous.closes()
        self.assertEqual(code, 1011)
        self.assertEqual(h.relay.exchanges, {})

    def test_bodyAnnouncedButNeverSent(self) -> None:
        """
        A response on the control channel that announces a body and never
        sends it gets a 504 one request timeout after the response, not
        after the request.
        """
        h = HttpHarness(settings=RelaySettings(requestTimeout=10))
        listener = h.listen()
        sender = h.request("GET")
        h.clock.advance(6)
        respond(listener, lastRequest(listener)["id"], body=True)
        h.clock.advance(9.9)
        self.assertIsNone(sender.response)
        h.clock.advance(0.1)
        response = sender.answered()
        self.assertEqual(response.status, 504)
        self.assertIn("did not send its response body", response.json()["error"]["message"])
        self.assertEqual(h.relay.exchanges, {})


class LostConnectionTests(SynchronousTestCase):
    """
    Either side going away before the exchange is over.
    """

    def test_listenerCloseIs502AtOnce(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        sender = h.request("GET")
        listener.sendClose(1000)
        response = sender.answered()
        self.assertEqual(response.status, 502)
        self.assertEqual(response.json()["error"]["code"], "BadGateway")
        self.assertIsNone(response.header("via"))
        self.assertEqual(h.relay.exchanges, {})

    def test_listenerVanishesIs502AtOnce(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        senders = [h.request("GET"), h.request("GET")]
        listener.transport.connectionGone()
        self.assertEqual([s.answered().status for s in senders], [502, 502])
        self.assertEqual(h.relay.exchanges, {})

    def test_otherListenersRequestsUnaffected(self) -> None:
        h = HttpHarness()
        turns = itertools.count()
        h.relay.registry = MemoryRegistry(choose=lambda channels: channels[next(turns) % len(channels)])
        first, second = h.listen(), h.listen()
        senders = [h.request("GET", f"/hyco/{i}") for i in range(6)]
        self.assertEqual([len(first.messages()), len(second.messages())], [3, 3])
        first.transport.connectionGone()
        self.assertEqual([s.answered().status for s in senders[::2]], [502] * 3)
        self.assertEqual([s.response for s in senders[1::2]], [None] * 3)
        for command in second.commands():
            respond(second, command["request"]["id"], b"ok")
        self.assertEqual([s.answered().body for s in senders[1::2]], [b"ok"] * 3)
        self.assertEqual(h.relay.exchanges, {})

    def test_senderGoneBeforeTheAnswer(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        sender = h.request("GET")
        rid = lastRequest(listener)["id"]
        self.assertIn(rid, h.relay.exchanges)
        self.assertIn(rid, listener.proto.role.exchanges)
        sender.transport.connectionGone()
        self.assertEqual(h.relay.exchanges, {})
        self.assertEqual(listener.proto.role.exchanges, {})
        # The deadline went with it.
        h.clock.advance(60)
        self.assertEqual(sender.transport.value(), b"")
        # A response now is dropped, and its body with it.
        respond(listener, rid, b"too late")
        self.assertEqual(sender.transport.value(), b"")
        self.assertEqual(listener.closes(), [])

    def test_senderGoneClosesTheRendezvous(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        sender = h.sender(httpRequest("POST", headers=[("Transfer-Encoding", "chunked")]) + b"5\r\nhello\r\n")
        rendezvous = h.rendezvous(lastRequest(listener)["address"])
        rid = lastRequest(listener)["id"]
        self.assertIn(rid, h.relay.exchanges)
        sender.transport.connectionGone()
        self.assertEqual(h.relay.exchanges, {})
        self.assertEqual(listener.proto.role.exchanges, {})
        [(code, _)] = rendezvous.closes()
        self.assertEqual(code, 1001)

    def test_senderGoneMidResponse(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        sender = h.request("GET")
        rid = lastRequest(listener)["id"]
        rendezvous = h.rendezvous(lastRequest(listener)["address"])
        respond(rendezvous, rid, body=True)
        rendezvous.send(BINARY, b"part", fin=False)
        sender.channel.pauseProducing()
        sender.transport.connectionGone()
        [(code, _)] = rendezvous.closes()
        self.assertEqual(code, 1001)
        self.assertEqual(rendezvous.transport.producerState, "producing")
        self.assertEqual(h.relay.exchanges, {})

    def test_senderGoneBeforeTheRendezvous(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        sender = h.sender(httpRequest("POST", headers=[("Content-Length", "70000")]))
        sender.transport.connectionGone()
        self.assertEqual(h.relay.exchanges, {})
        self.assertEqual(h.rendezvous(lastRequest(listener)["address"]).status, 404)


class ErrorTests(SynchronousTestCase):
    """
    Errors the relay makes itself: no C{Via}, in the caller's dialect.
    """

    def _soap(self, response: HttpResponse, namespace: str) -> ElementTree.Element:
        body = ElementTree.fromstring(response.body).find(f"{{{namespace}}}Body")
        assert body is not None
        fault = body.find(f"{{{namespace}}}Fault")
        assert fault is not None
        return fault

    def test_jsonByDefault(self) -> None:
        h = HttpHarness()
        response = h.request("GET").answered()
        self.assertEqual(response.header("content-type"), "application/json")
        self.assertEqual(response.header("content-length"), str(len(response.body)))
        error = response.json()["error"]
        self.assertEqual(set(error), {"code", "message"})
        self.assertIsNone(response.header("via"))

    def test_noListenerIs502(self) -> None:
        h = HttpHarness()
        response = h.request("GET").answered()
        self.assertEqual(response.status, 502)
        self.assertEqual(response.json()["error"]["code"], "BadGateway")
        self.assertIn("no listeners", response.json()["error"]["message"])
        self.assertEqual(h.relay.exchanges, {})

    def test_noListenerForALargeRequestIs502(self) -> None:
        h = HttpHarness()
        sender = h.sender(httpRequest("POST", headers=[("Content-Length", "70000")]) + b"x" * 10)
        h.clock.advance(0)
        self.assertEqual(sender.answered().status, 502)
        self.assertTrue(sender.transport.disconnecting)

    def test_unknownEntityIs404(self) -> None:
        h = HttpHarness()
        h.listen()
        response = h.request("GET", "/nothing/here").answered()
        self.assertEqual(response.status, 404)
        self.assertEqual(response.json()["error"]["code"], "EndpointNotFound")

    def test_badTokenIs401(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        response = h.request("GET", headers=[("ServiceBusAuthorization", "garbage")], entity=None).answered()
        self.assertEqual(response.status, 401)
        self.assertEqual(response.json()["error"]["code"], "TokenMissingOrInvalid")
        self.assertEqual(listener.messages(), [])

    def test_missingTokenIs401(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        response = h.request("GET", entity=None).answered()
        self.assertEqual(response.status, 401)
        self.assertEqual(listener.messages(), [])

    def test_tokenForAnotherEntityIs403(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        response = h.request("GET", entity="other").answered()
        self.assertEqual(response.status, 403)
        self.assertEqual(response.json()["error"]["code"], "Forbidden")
        self.assertEqual(listener.messages(), [])

    def test_anonymousSendersNeedNoToken(self) -> None:
        h = HttpHarness(entities=[Entity(name="hyco", anonymousSenders=True)])
        listener = h.listen()
        sender = h.request("GET", entity=None)
        self.assertIsNone(sender.response)
        self.assertEqual(lastRequest(listener)["method"], "GET")

    def test_connectIs405(self) -> None:
        for target in ("/hyco", f"{HOST}:443"):
            h = HttpHarness()
            listener = h.listen()
            response = h.request("CONNECT", target).answered()
            self.assertEqual(response.status, 405, target)
            self.assertEqual(response.json()["error"]["code"], "MethodNotAllowed", target)
            self.assertEqual(listener.messages(), [], target)

    def test_webSocketUpgradeOutsideHcIs400(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        response = h.request(
            "GET",
            "/hyco",
            headers=[("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Version", "13")],
        ).answered()
        self.assertEqual(response.status, 400)
        self.assertEqual(response.json()["error"]["code"], "BadRequest")
        self.assertEqual(listener.messages(), [])

    def test_errorBeforeTheBodyEndsTheConnection(self) -> None:
        h = HttpHarness()
        sender = h.sender(httpRequest("POST", "/nothing", headers=[("Content-Length", "10")]) + b"abc")
        h.clock.advance(0)
        self.assertEqual(sender.answered().status, 404)
        self.assertTrue(sender.transport.disconnecting)

    def test_soap11ClientFault(self) -> None:
        h = HttpHarness()
        sender = h.request(
            "POST",
            "/no%3Cthing%3E%26",
            headers=[("Content-Type", "text/xml; charset=utf-8"), ("SOAPAction", '"urn:x"'), ("Content-Length", "4")],
            body=b"<a/>",
        )
        h.clock.advance(0)
        response = sender.answered()
        self.assertEqual(response.status, 404)
        self.assertEqual(response.header("content-type"), "text/xml; charset=utf-8")
        self.assertIsNone(response.header("via"))
        fault = self._soap(response, SOAP11)
        self.assertEqual(fault.findtext("faultcode"), "s:Client")
        self.assertIn("/no<thing>&", fault.findtext("faultstring") or "")
        self.assertIn(b"/no&lt;thing&gt;&amp;", response.body)
        self.assertEqual(fault.findtext("detail/{urn:relaynet}RelayError/{urn:relaynet}Code"), "EndpointNotFound")

    def test_soap11ServerFault(self) -> None:
        h = HttpHarness()
        response = h.request("GET", headers=[("Content-Type", "text/xml"), ("SOAPAction", "urn:x")]).answered()
        self.assertEqual(response.status, 502)
        self.assertEqual(self._soap(response, SOAP11).findtext("faultcode"), "s:Server")

    def test_soap12Faults(self) -> None:
        for target, status, who in (("/no%3Cthing%3E", 404, "env:Sender"), ("/hyco", 502, "env:Receiver")):
            h = HttpHarness()
            headers = [("Content-Type", "application/soap+xml; charset=utf-8")]
            response = h.request("GET", target, headers=headers).answered()
            self.assertEqual(response.status, status)
            self.assertEqual(response.header("content-type"), "application/soap+xml; charset=utf-8")
            self.assertIsNone(response.header("via"))
            fault = self._soap(response, SOAP12)
            self.assertEqual(fault.findtext(f"{{{SOAP12}}}Code/{{{SOAP12}}}Value"), who)
            self.assertTrue(fault.findtext(f"{{{SOAP12}}}Reason/{{{SOAP12}}}Text"))
            if status == 404:
                self.assertIn("/no<thing>", fault.findtext(f"{{{SOAP12}}}Reason/{{{SOAP12}}}Text") or "")
                self.assertIn(b"/no&lt;thing&gt;", response.body)

    def test_textXmlWithoutSoapActionIsJson(self) -> None:
        h = HttpHarness()
        response = h.request("GET", "/nothing", headers=[("Content-Type", "text/xml")]).answered()
        self.assertEqual(response.header("content-type"), "application/json")
        self.assertEqual(response.json()["error"]["code"], "EndpointNotFound")

    def test_timeoutInSoap(self) -> None:
        h = HttpHarness(settings=RelaySettings(requestTimeout=1))
        h.listen()
        sender = h.request("GET", headers=[("Content-Type", "text/xml"), ("SOAPAction", "urn:x")])
        h.clock.advance(1)
        response = sender.answered()
        self.assertEqual(response.status, 504)
        self.assertEqual(self._soap(response, SOAP11).findtext("faultcode"), "s:Server")


class ConcurrencyTests(SynchronousTestCase):
    """
    Many requests on one control channel at once.
    """

    def test_fiftyAnsweredOutOfOrder(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        senders = [h.request("GET", f"/hyco/item/{i}") for i in range(50)]
        requests = [command["request"] for command in listener.commands()]
        self.assertEqual(len(requests), 50)
        self.assertEqual(len({r["id"] for r in requests}), 50)
        self.assertEqual(len(listener.proto.role.exchanges), 50)
        order = list(range(50))
        random.Random(7).shuffle(order)
        for i in order:
            request = requests[i]
            respond(listener, request["id"], request["requestTarget"].encode(), responseHeaders={"x-i": i})
            self.assertEqual(senders[i].answered().body, f"/hyco/item/{i}".encode())
        for i, sender in enumerate(senders):
            response = sender.answered()
            self.assertEqual(response.body, f"/hyco/item/{i}".encode())
            self.assertEqual(response.header("x-i"), str(i))
        self.assertEqual(h.relay.exchanges, {})
        self.assertEqual(listener.proto.role.exchanges, {})


class FoundByReviewTests(SynchronousTestCase):
    """
    Cases found in review of HTTP relaying, each once a bug.
    """

    def _exchange(self, method: str = "GET") -> tuple[HttpHarness, Peer, Sender, str]:
        h = HttpHarness()
        listener = h.listen()
        sender = h.request(method)
        return h, listener, sender, lastRequest(listener)["id"]

    def test_rendezvousRequestHasTheRealAddress(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        h.sender(httpRequest("POST", headers=[("Content-Length", "65537")]))
        address = lastRequest(listener)["address"]
        rendezvous = h.rendezvous(address)
        full = json.loads(rendezvous.messages()[0][1])["request"]
        self.assertEqual(full["address"], address)
        self.assertNotIn("{base}", full["address"])

    def test_emptyStreamedBodyIsOneBinaryMessage(self) -> None:
        h = HttpHarness()
        listener = h.listen()
        h.sender(httpRequest("POST", headers=[("Transfer-Encoding", "chunked")]) + b"0\r\n\r\n")
        rendezvous = h.rendezvous(lastRequest(listener)["address"])
        data = [(fin, opcode) for fin, opcode, _ in rendezvous.frames() if opcode < 8]
        self.assertEqual(data[0], (True, TEXT))
        self.assertEqual(data[1], (False, BINARY))
        self.assertEqual(data[-1][0], True)
        self.assertEqual(rendezvous.messages()[1], (BINARY, b""))

    def test_controlBodyThatNeverComesTimesOut(self) -> None:
        h, listener, sender, rid = self._exchange()
        respond(listener, rid, None, body=True)
        h.clock.advance(h.relay.settings.requestTimeout + 1)
        self.assertEqual(sender.answered().status, 504)
        self.assertEqual(h.relay.exchanges, {})

    def test_listenerGoneBeforeControlBody(self) -> None:
        h, listener, sender, rid = self._exchange()
        respond(listener, rid, None, body=True)
        listener.transport.loseConnection()
        h.settle()
        self.assertEqual(sender.answered().status, 502)

    def test_badHeaderNamesSkipped(self) -> None:
        h, listener, sender, rid = self._exchange()
        respond(listener, rid, b"ok", responseHeaders={"bad name": "1", "": "v", "x\r\ny": "1", "X-Good": "yes"})
        response = sender.answered()
        self.assertEqual((response.status, response.header("X-Good")), (200, "yes"))
        self.assertIsNone(response.header("bad name"))

    def test_noContentTypeAdded(self) -> None:
        h, listener, sender, rid = self._exchange()
        respond(listener, rid, b"12345", statusCode=201)
        self.assertIsNone(sender.answered().header("Content-Type"))

    def test_bodyFalseIsContentLengthZero(self) -> None:
        h, listener, sender, rid = self._exchange()
        respond(listener, rid, None, statusCode=450)
        response = sender.answered()
        self.assertEqual((response.status, response.header("Content-Length")), (450, "0"))
        self.assertFalse(response.chunked)

    def test_longHeadersGoOverARendezvous(self) -> None:
        """
        A request whose command would not fit on the control channel is
        sent as an address-only request instead.
        """
        h = HttpHarness(settings=RelaySettings(maxControlMessage=16384))
        listener = h.listen()
        h.request("GET", headers=[("X-Long-1", "é" * 5000), ("X-Long-2", "é" * 5000)])
        request = lastRequest(listener)
        self.assertEqual(set(request), {"address", "id"})
        rendezvous = h.rendezvous(request["address"])
        full = json.loads(rendezvous.messages()[0][1])["request"]
        self.assertIn("X-Long-1", full["requestHeaders"])


class ChannelAddressTests(SynchronousTestCase):
    """
    L{RelayHttpChannel} looks up its local address and TLS once per
    connection, not once per request.
    """

    def test_askedOnce(self) -> None:
        from twisted.internet.testing import StringTransport

        from relaynet.protocols.request import RelayHttpChannel

        asked: list[str] = []

        class Counting(StringTransport):
            def getHost(self) -> Any:
                asked.append("host")
                return super().getHost()

        channel = RelayHttpChannel()
        channel.makeConnection(Counting())
        first = channel.getHost()
        self.assertIs(channel.getHost(), first)
        self.assertFalse(channel.isSecure())
        self.assertFalse(channel.isSecure())
        self.assertEqual(asked, ["host"])

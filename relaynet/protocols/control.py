# -*- test-case-name: relaynet.test.test_control -*-
"""
A listener's control channel.

The relay sends C{accept} commands on it; the listener sends C{renewToken}.
The channel lives while its token does: past the token's expiry (and the
grace period) without a renewal it is closed with code 1008.
"""

from __future__ import annotations

import datetime
import json
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from zope.interface import implementer

from relaynet import logs
from relaynet.auth import Rights, SasToken
from relaynet.core import HandshakeInfo, Relay
from relaynet.entities import Entity
from relaynet.errors import BadGateway, BadRequest, RelayError
from relaynet.protocols.frames import serverHeader, writeNow
from relaynet.protocols.pubsub import EVENT_ID_PREFIX, FELL_BEHIND, Outbox
from relaynet.registry import IListenerChannel

if TYPE_CHECKING:
    from relaynet.protocols.websocket import HybridConnectionProtocol

__all__ = ["ControlChannel", "closeReason", "encodeCommand"]

log = Logger(observer=logs.observer)

POLICY_VIOLATION = 1008
GOING_AWAY = 1001


#: Compact JSON, made once: json.dumps with options makes an encoder a call.
_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def encodeCommand(command: dict[str, Any]) -> bytes:
    """
    A command as the UTF-8 JSON text the control channel carries.
    """
    return _encoder.encode(command).encode("utf-8")


def closeReason(text: str) -> bytes:
    """
    C{text} as a close frame's reason: UTF-8, cut to the 123 bytes a close
    frame has room for without splitting a character.
    """
    return text.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")


@implementer(IListenerChannel)
class ControlChannel:
    """
    The relay's side of one listener's control channel.

    @ivar listenerId: the listener's C{sb-hc-id}, or one made for it.
    @ivar rendezvousBase: the scheme and host the listener reached the relay
        by, where it is sent to accept connections.
    """

    def __init__(
        self,
        relay: Relay,
        proto: HybridConnectionProtocol,
        entity: Entity,
        info: HandshakeInfo,
        token: SasToken,
        listenerId: str,
    ) -> None:
        self.relay = relay
        self.proto = proto
        self.entity = entity
        self.info = info
        self.listenerId = listenerId
        self.rendezvousBase = info.baseUrl
        self.registered = False
        # Made with the first message offered (see _openOutbox).
        self.outbox: Outbox | None = None
        self._open = False
        # HTTP requests sent on this channel and not yet answered, by id.
        self.exchanges: dict[str, Any] = {}
        self._bodyFor: Any = None
        # Of the token only its expiry matters once it is checked.
        self._tokenExpiry = token.expiry
        self._expiry: IDelayedCall | None = None

    def __repr__(self) -> str:
        return f"<ControlChannel {self.entity.name} {self.listenerId}>"

    async def register(self) -> None:
        await self.relay.registry.register(self.entity, self)
        self.registered = True

    def opened(self) -> None:
        log.info(
            "listener {listener} on {entity} up from {peer}",
            listener=self.listenerId,
            entity=self.entity.name,
            peer=self.info.peerHost,
        )
        self._scheduleExpiry()
        self._open = True

    def _openOutbox(self) -> Outbox | None:
        """
        The outbox, made when the first event or one-way message is offered
        (C{None} until the channel is open).

        Most listeners never get one, and an idle listener should not hold
        an empty queue (about 1 KiB).  From then on the outbox is this
        transport's producer: a full send buffer holds the messages back.
        """
        if self.outbox is None and self._open:
            self.outbox = Outbox(self, self.relay.settings.subscriberOutbox)
            transport: Any = self.proto.transport
            transport.registerProducer(self.outbox, True)
        return self.outbox

    def _scheduleExpiry(self) -> None:
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        clock = self.relay.clock
        delay = self._tokenExpiry + self.relay.settings.tokenGrace - clock.seconds()
        self._expiry = clock.callLater(max(delay, 0), self._expired)

    def _expired(self) -> None:
        self._expiry = None
        when = datetime.datetime.fromtimestamp(self._tokenExpiry, datetime.timezone.utc)
        self.close(POLICY_VIOLATION, f"The token expired at {when:%Y-%m-%dT%H:%M:%SZ} and was not renewed.")

    def close(self, code: int, reason: str) -> None:
        """
        Close the channel from the relay's side.
        """
        self.lost()
        log.info(
            "closing listener {listener} on {entity}: {code} {reason}",
            listener=self.listenerId,
            entity=self.entity.name,
            code=code,
            reason=reason,
        )
        self.proto.sendCloseFrame(code=code, reasonUtf8=closeReason(reason))

    def offer(self, command: dict[str, Any] | bytes, body: bytes | None = None) -> bool:
        encoded = command if isinstance(command, bytes) else encodeCommand(command)
        outbox = self._openOutbox()
        return outbox is not None and outbox.offer(_frames.get(encoded, body))

    def hasRoom(self) -> bool:
        # An outbox not made yet is empty.
        return self.outbox.hasRoom() if self.outbox is not None else self._open

    def sendFrames(self, frames: list[bytes]) -> None:
        if self.proto.state == self.proto.STATE_OPEN:
            # Whole frames, straight to the transport: a control channel
            # sends whole messages only, so nothing can be half-sent.
            self.proto.transport.writeSequence(frames)  # type: ignore[union-attr]

    def fellBehind(self, missed: int) -> None:
        """
        The outbox overflowed: cut the listener off, saying why.
        """
        # The close follows what is already on its way; the close timeout
        # ends the connection if the listener never reads that far.
        self.close(FELL_BEHIND, f"Fell behind: {missed} events missed.")

    def sendCommand(self, command: dict[str, Any] | bytes, body: bytes | None = None) -> None:
        encoded = command if isinstance(command, bytes) else encodeCommand(command)
        limit = self.relay.settings.maxControlMessage
        if len(encoded) > limit or (body is not None and len(body) > limit):
            raise BadRequest(f"The request is too large for the listener's control channel ({limit} bytes).")
        if self.proto.state != self.proto.STATE_OPEN:
            raise BadGateway("The listener's control channel is closing.")
        # The command and its body go out together, in one write: listeners
        # take the very next message as the body.
        frames = [serverHeader(0x81, len(encoded)), encoded]
        if body is not None:
            frames += [serverHeader(0x82, len(body)), body]
        writeNow(self.proto.transport, frames)

    def messageReceived(self, payload: bytes, isBinary: bool) -> None:
        exchange, self._bodyFor = self._bodyFor, None
        if isBinary:
            if exchange is not None:
                exchange.controlBodyReceived(payload)
            # Otherwise a stray body: hyco-https sends an empty one after
            # body:false.
            return
        if exchange is not None:
            exchange.controlBodyReceived(b"")
        try:
            message = json.loads(payload)
        except ValueError:
            log.warn("listener {listener} sent a message that is not JSON", listener=self.listenerId)
            return
        if isinstance(message, dict) and isinstance(message.get("renewToken"), dict):
            self._renew(message["renewToken"].get("token"))
        elif isinstance(message, dict) and isinstance(message.get("response"), dict):
            self._response(message["response"])
        else:
            kind = next(iter(message), None) if isinstance(message, dict) else type(message).__name__
            log.warn("listener {listener} sent an unknown command {kind!r}", listener=self.listenerId, kind=kind)

    def _response(self, response: dict[str, Any]) -> None:
        requestId = str(response.get("requestId"))
        exchange = self.exchanges.get(requestId)
        if exchange is None:
            # An event's answer (nobody waits for it), a request answered
            # already or timed out, or a sender that left: its body, if any,
            # is dropped as a stray.
            if not requestId.startswith(EVENT_ID_PREFIX):
                log.debug("listener {listener} answered an unknown request", listener=self.listenerId)
            return
        if exchange.responseReceived(response, overLeg=False):
            self._bodyFor = exchange

    def _renew(self, token: object) -> None:
        try:
            if not isinstance(token, str):
                raise RelayError("renewToken has no token string")
            checked = self.relay.authorize(self.info, self.entity, Rights.LISTEN, token=token, grace=True)
        except RelayError as e:
            self.close(POLICY_VIOLATION, f"Token renewal failed: {e.reason}")
            return
        assert checked is not None
        self._tokenExpiry = checked.expiry
        self._scheduleExpiry()
        log.debug("listener {listener} renewed its token", listener=self.listenerId)

    def lost(self) -> None:
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None
        exchanges, self.exchanges = self.exchanges, {}
        for exchange in exchanges.values():
            exchange.listenerLost()
        if self.registered:
            self.registered = False
            self.relay.listenerLeft(self.entity, self)
            log.info("listener {listener} on {entity} gone", listener=self.listenerId, entity=self.entity.name)


def serverFrame(opcode: int, payload: bytes) -> bytes:
    """
    One whole, unmasked WebSocket frame (RFC 6455 section 5.2), as a server
    sends it.
    """
    return serverHeader(0x80 | opcode, len(payload)) + payload


class _LastFrames:
    """
    The frames of the last command offered, kept so that an event fanned
    out to many subscribers is framed once rather than once per subscriber,
    and their outboxes hold the very same C{bytes}.
    """

    def __init__(self) -> None:
        self._key: tuple[bytes, bytes | None] | None = None
        self._frames = b""

    def get(self, encoded: bytes, body: bytes | None) -> bytes:
        key = self._key
        if key is None or key[0] is not encoded or key[1] is not body:
            frames = serverFrame(0x1, encoded)
            if body is not None:
                frames += serverFrame(0x2, body)
            self._key, self._frames = (encoded, body), frames
        return self._frames


_frames = _LastFrames()

# -*- test-case-name: relaynet.test.test_pubsub -*-
"""
Events (publish/subscribe) and one-way messages.

An event entity's listeners are its subscribers.  Each event a publisher
sends reaches every subscriber connected at that moment, in the publisher's
order, as an ordinary C{request} on the subscriber's control channel, so an
unmodified C{hyco-https} listener is a working subscriber.  A one-way
message on a hybrid entity goes the same way to one listener.

Each subscriber has a bounded outbox: events wait there while its
connection cannot take more.  A subscriber whose outbox overflows is
disconnected with a reason saying how many events it missed; it never
slows the publisher or the other subscribers.
"""

from __future__ import annotations

import functools
from collections import deque
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from relaynet import logs
from relaynet.registry import randomHex

if TYPE_CHECKING:
    from relaynet.protocols.control import ControlChannel

__all__ = ["Outbox", "eventCommand", "entityPath", "SharedCommand", "DiscardLeg", "PublisherLeg", "EVENT_ID_PREFIX"]

log = Logger(observer=logs.observer)

EVENT_ID_PREFIX = "evt_"
FELL_BEHIND = 4008
#: At most about this many bytes of queued messages go to the transport in
#: one write; it pauses the outbox once its own buffer is full.
DRAIN_BYTES = 64 * 1024


@implementer(IPushProducer)
class Outbox:
    """
    A subscriber's queue of messages waiting for its connection.

    Registered as the producer of the control channel's transport: while
    the transport's buffer is full, messages wait here, at most C{limit}.
    """

    def __init__(self, channel: ControlChannel, limit: int) -> None:
        self._channel = channel
        self._limit = limit
        self._queue: deque[bytes] = deque()
        self._paused = False
        self.overflowed = False

    def offer(self, frames: bytes) -> bool:
        """
        Send a command's frames (the command, then its body if it has one)
        now, or queue them.  Subscribers of one event are offered the very
        same C{bytes}, so a queued event costs each outbox one reference.

        @return: C{False} if the outbox is full (the subscriber has been cut
            off).
        """
        if self.overflowed:
            return False
        if len(self._queue) >= self._limit:
            self.overflowed = True
            missed = len(self._queue) + 1
            self._queue.clear()
            self._channel.fellBehind(missed)
            return False
        self._queue.append(frames)
        self._drain()
        return True

    def hasRoom(self) -> bool:
        return not self.overflowed and len(self._queue) < self._limit

    def _drain(self) -> None:
        queue = self._queue
        while queue and not self._paused:
            # Many at a time: the transport's checks and its pause (once its
            # buffer is full) cost a call per batch rather than per event.
            batch, size = [], 0
            while queue and size < DRAIN_BYTES:
                frames = queue.popleft()
                batch.append(frames)
                size += len(frames)
            self._channel.sendFrames(batch)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._drain()

    def stopProducing(self) -> None:
        self._paused = True
        self._queue.clear()


@functools.lru_cache(maxsize=1024)
def entityPath(name: str) -> str:
    """
    An entity's name (and suffix) as it goes in a rendezvous address.
    """
    return quote(name, safe="/;:@&=+$,!~*()-._")


def eventCommand(
    base: str, entityPath: str, requestTarget: str, headers: dict[str, str], remote: dict[str, Any], hasBody: bool
) -> dict[str, Any]:
    """
    The C{request} a subscriber gets for one event (or a listener for one
    one-way message): a POST with the publisher's headers.
    """
    eventId = f"{EVENT_ID_PREFIX}{randomHex(16)}"
    return {
        "request": {
            "address": f"{base}/$hc/{entityPath}?sb-hc-action=request&sb-hc-id={eventId}",
            "id": eventId,
            "requestTarget": requestTarget,
            "method": "POST",
            "requestHeaders": headers,
            "remoteEndpoint": remote,
            "body": hasBody,
        }
    }


class SharedCommand:
    """
    Makes the command for one event once per relay address its
    subscribers use (normally one), encoded, so that fanning an event out
    to many subscribers costs one encoding, and their outboxes share it.
    """

    def __init__(
        self, entityPath: str, requestTarget: str, headers: dict[str, str], remote: dict[str, Any], hasBody: bool
    ) -> None:
        self._args = (entityPath, requestTarget, headers, remote, hasBody)
        self._encoded: dict[str, bytes] = {}

    def __call__(self, channel: Any) -> bytes:
        base = channel.rendezvousBase
        encoded = self._encoded.get(base)
        if encoded is None:
            from relaynet.protocols.control import encodeCommand

            encoded = self._encoded[base] = encodeCommand(eventCommand(base, *self._args))
        return encoded


class DiscardLeg:
    """
    A rendezvous a subscriber opens to answer an event: its answer is read
    and dropped, and the socket closed once it has been given.
    """

    def __init__(self, proto: Any) -> None:
        self.proto = proto
        self._text = False
        self._expectBody = False

    def messageBegin(self, isBinary: bool) -> None:
        self._text = not isBinary

    def frameBegin(self, length: int) -> None:
        pass

    def frameData(self, payload: bytes) -> None:
        pass

    def messageEnd(self) -> None:
        if self._text and not self._expectBody:
            # The response; a body may follow.  Close after it either way.
            self._expectBody = True
            return
        if self.proto.state == self.proto.STATE_OPEN:
            self.proto.sendCloseFrame(code=1000)

    def closeFrame(self, code: int | None, reason: bytes | None) -> bool:
        return False

    def lost(self) -> None:
        pass


class PublisherLeg:
    """
    A WebSocket sender on an event entity: each message it sends is one
    event, handed to every subscriber connected at that moment.
    """

    def __init__(self, proto: Any, entity: Any, suffix: str) -> None:
        self.proto = proto
        self.relay = proto.relay
        self.entity = entity
        self.suffix = suffix
        self._parts: list[bytes] = []
        self._size = 0
        self._isBinary = True
        self._tooLarge = False

    def messageBegin(self, isBinary: bool) -> None:
        self._parts, self._size, self._isBinary, self._tooLarge = [], 0, isBinary, False

    def frameBegin(self, length: int) -> None:
        pass

    def frameData(self, payload: bytes) -> None:
        if self._tooLarge:
            return
        self._size += len(payload)
        limit = self.relay.settings.maxEventSize
        if self._size > limit:
            self._tooLarge = True
            self._parts = []
            self.proto.sendCloseFrame(code=1009, reasonUtf8=f"An event may have at most {limit} bytes.".encode())
            return
        self._parts.append(payload)

    def messageEnd(self) -> None:
        if self._tooLarge:
            return
        info = self.proto.info
        body = b"".join(self._parts)
        self._parts = []
        headers = {
            "Content-Type": "application/octet-stream" if self._isBinary else "text/plain; charset=utf-8",
            "Content-Length": str(len(body)),
            "Via": f"1.1 {info.hostname}",
        }
        name = self.entity.name + self.suffix
        self.relay.registry.broadcast(
            self.entity, SharedCommand(entityPath(name), "/" + name, headers, info.remoteEndpoint(), True), body
        )

    def closeFrame(self, code: int | None, reason: bytes | None) -> bool:
        return False

    def lost(self) -> None:
        self._parts = []

"""
relaynet's own clients with Microsoft's Node client (npm C{hyco-ws} 1.0.5)
through relaynet on 127.0.0.1: a L{HybridListener} echoing to the
C{hyco_ws_sender.js} script, and L{connectStream} reaching the
C{hyco_ws_listener.js} echo listener, checked byte for byte.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import DeferredQueue
from twisted.internet.protocol import Factory

from relaynet.listener import HybridListener
from relaynet.streams import MessageProtocol, connectStream
from relaynet.test.support import KEY, KEY_NAME
from relaynet.test.test_interop_hyco_ws import HycoWsCase
from relaynet.tokens import fromKey


class MessageEcho(MessageProtocol):
    """
    Sends each message back as it came: text as text, binary as binary.
    """

    def messageReceived(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(payload, isBinary)


class Queue(MessageProtocol):
    def __init__(self) -> None:
        self.received: DeferredQueue[tuple[bytes, bool]] = DeferredQueue()

    def messageReceived(self, payload: bytes, isBinary: bool) -> None:
        self.received.put((payload, isBinary))


class InteropBase(HycoWsCase):
    """
    A relay with the entities C{hyco} and C{site/a}, and the Node scripts
    run as in the hyco-ws interop tests.
    """


class RelaynetListenerHycoSenderTests(InteropBase):
    """
    A relaynet listener, hyco-ws senders.
    """

    async def listen(self, entity: str = "hyco", **kwargs: Any) -> HybridListener:
        self.statuses: list[str] = []
        listener = HybridListener(
            reactor,
            f"ws://{self.relay.host}",
            entity,
            fromKey(KEY_NAME, KEY, reactor),
            streamFactory=Factory.forProtocol(MessageEcho),
            onStatus=self.statuses.append,
            **kwargs,
        )
        self.addCleanup(listener.close)
        await listener.listen()
        return listener

    async def test_binaryEcho(self) -> None:
        await self.listen()
        code, results, sender = await self.send("hyco", "--sizes", "1,1000,65536,1048576")
        self.assertAllOk(code, results, sender, 1)
        self.assertEqual(results[0]["messages"], 4)
        self.assertEqual(results[0]["bytes"], 1 + 1000 + 65536 + 1048576)

    async def test_textEcho(self) -> None:
        await self.listen()
        code, results, sender = await self.send("hyco", "--text", "--sizes", "1,1000,65536,1048576")
        self.assertAllOk(code, results, sender, 1)

    async def test_concurrentSenders(self) -> None:
        await self.listen()
        code, results, sender = await self.send("hyco", "--connections", "6", "--sizes", "1,4096,300000")
        self.assertAllOk(code, results, sender, 6)

    async def test_entityWithSlashAndQueryToken(self) -> None:
        await self.listen("site/a")
        code, results, sender = await self.send("site/a", "--token-in-query", "--sizes", "10,20000")
        self.assertAllOk(code, results, sender, 1)

    async def test_rejected(self) -> None:
        """
        A rejection reaches the Node sender as its status.
        """
        await self.listen(acceptHandler=lambda request: (403, "Not you"))
        code, results, sender = await self.send("hyco", "--expect-fail", "--expect-status", "403")
        self.assertEqual(code, 0, sender.lines)
        self.assertEqual(results[0]["reason"], "Not you")


class RelaynetSenderHycoListenerTests(InteropBase):
    """
    relaynet senders, a hyco-ws listener.
    """

    async def connect(self, entity: str = "hyco") -> Queue:
        await self.spawn("hyco_ws_listener.js", entity).line("READY")
        proto = await connectStream(
            reactor, f"ws://{self.relay.host}", entity, fromKey(KEY_NAME, KEY, reactor), Factory.forProtocol(Queue)
        )
        assert isinstance(proto, Queue)
        self.addCleanup(proto.transport.loseConnection)
        return proto

    async def echoes(self, proto: Queue, sizes: list[int], isBinary: bool) -> None:
        for size in sizes:
            payload = os.urandom(size) if isBinary else bytes(0x20 + b % 95 for b in os.urandom(size))
            await proto.whenWritable()
            proto.sendMessage(payload, isBinary)
            echoed, echoedBinary = await proto.received.get()
            self.assertEqual((len(echoed), echoedBinary), (size, isBinary))
            self.assertTrue(echoed == payload, f"the echo of {size} bytes differs")

    async def test_binaryEcho(self) -> None:
        proto = await self.connect()
        await self.echoes(proto, [1, 1000, 65536, 1048576], True)

    async def test_textEcho(self) -> None:
        proto = await self.connect()
        await self.echoes(proto, [1, 1000, 65536, 1048576], False)

    async def test_entityWithSlash(self) -> None:
        proto = await self.connect("site/a")
        await self.echoes(proto, [5, 70000], True)

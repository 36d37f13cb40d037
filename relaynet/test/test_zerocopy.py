"""
L{relaynet.protocols.zerocopy.KernelSplice} on real TCP connections on
127.0.0.1: two clients whose server-side transports are spliced.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from relaynet.protocols import zerocopy


class Held(Protocol):
    """
    A server-side connection waiting to be spliced; it must never see data.
    """

    def connectionMade(self) -> None:
        self.lost: Deferred[None] = Deferred()
        self.data = b""
        self.factory.held.append(self)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        # Connections are closed by the reactor thread, never the loop's.
        self.lostIn = threading.current_thread()
        self.lost.callback(None)


def readAll(sock: socket.socket, limit: int = 1 << 30) -> bytes:
    received = bytearray()
    while len(received) < limit:
        data = sock.recv(1 << 20)
        if not data:
            break
        received += data
    return bytes(received)


class KernelSpliceTests(TestCase):
    timeout = 60

    async def setUp(self) -> None:
        if not zerocopy.available(reactor):
            raise SkipTest("splice(2) is not available here")
        factory = Factory.forProtocol(Held)
        factory.held = []  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.first = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.second = socket.create_connection(("127.0.0.1", port.getHost().port))
        for sock in (self.first, self.second):
            sock.settimeout(20)
            self.addCleanup(sock.close)
        for _ in range(500):
            if len(factory.held) == 2:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.held: list[Held] = factory.held  # type: ignore[attr-defined]
        self.splice = zerocopy.KernelSplice(
            reactor, self.held[0].transport, self.held[1].transport, b"hello first\n", b"hello second\n"
        )
        self.splice.start()

    async def test_greetingsThenBytes(self) -> None:
        """
        Each side gets its greeting first, then the other side's bytes,
        unchanged, both ways at once.
        """
        up, down = os.urandom(3 * 1024 * 1024 + 5), os.urandom(2 * 1024 * 1024 + 7)

        def talk(sock: socket.socket, payload: bytes) -> bytes:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            return readAll(sock)

        first = deferToThread(talk, self.first, up)
        second = deferToThread(talk, self.second, down)
        self.assertEqual(await first, b"hello first\n" + down)
        self.assertEqual(await second, b"hello second\n" + up)
        await self.held[0].lost
        await self.held[1].lost
        self.assertEqual((self.held[0].data, self.held[1].data), (b"", b""))

    async def test_halfClose(self) -> None:
        """
        One side ends its output and waits: the other sees the end, answers
        and the answer arrives after the end was passed on.
        """
        self.first.sendall(b"question")
        self.first.shutdown(socket.SHUT_WR)

        def answer() -> bytes:
            heard = readAll(self.second)
            self.second.sendall(b"answer to " + heard[len(b"hello second\n") :])
            self.second.shutdown(socket.SHUT_WR)
            return heard

        self.assertEqual(await deferToThread(answer), b"hello second\nquestion")
        self.assertEqual(await deferToThread(readAll, self.first), b"hello first\nanswer to question")
        await self.held[0].lost

    async def test_backpressure(self) -> None:
        """
        A side that does not read stops the other: at most the socket
        buffers and one pipe are in flight, and nothing is lost.
        """
        self.first.setblocking(False)
        chunk = os.urandom(1 << 16)
        sent = 0
        for _ in range(2000):
            try:
                sent += self.first.send(chunk)
            except BlockingIOError:
                await deferLater(reactor, 0.05, lambda: None)
                try:
                    sent += self.first.send(chunk)
                except BlockingIOError:
                    break
            await deferLater(reactor, 0, lambda: None)
        self.assertLess(sent, 64 * 1024 * 1024, "the sender was never held back")
        self.first.setblocking(True)
        self.first.shutdown(socket.SHUT_WR)
        received = await deferToThread(readAll, self.second)
        self.assertEqual(len(received), len(b"hello second\n") + sent)

    async def test_resetEndsBoth(self) -> None:
        """
        A connection that is reset takes the other down, and the pipes go.
        """
        self.first.sendall(b"some")
        await deferLater(reactor, 0.05, lambda: None)
        self.first.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.first.close()
        await self.held[1].lost
        self.assertTrue(self.splice.over)
        for flow in self.splice.flows:
            self.assertIsNone(flow.pipe)


class SpliceLoopTests(KernelSpliceTests):
    """
    The L{zerocopy.SpliceLoop} thread watches the spliced sockets.
    """

    async def test_oneLoopForgetsEndedSplices(self) -> None:
        """
        Every splice shares one loop thread; once a splice has ended its
        sockets are no longer watched, and the connections were closed on
        the reactor thread.
        """
        loop = self.splice.loop
        self.assertIs(zerocopy.spliceLoop(reactor), loop)
        self.assertEqual([t.name for t in threading.enumerate()].count("relaynet-splice"), 1)
        fds = {s.fd for s in self.splice.sockets}
        with loop.lock:
            self.assertTrue(fds & set(loop._sockets))
        for sock in (self.first, self.second):
            sock.shutdown(socket.SHUT_WR)
        await self.held[0].lost
        await self.held[1].lost
        with loop.lock:
            self.assertFalse(fds & set(loop._sockets))
        self.assertEqual({h.lostIn for h in self.held}, {threading.main_thread()})

    async def test_staleEventsAreHarmless(self) -> None:
        """
        An event for a socket with nothing to move (as when a stale event
        arrives for a reused descriptor) moves nothing and ends nothing.
        """
        with self.splice.loop.lock:
            for sock in self.splice.sockets:
                sock.doRead()
                sock.doWrite()
        self.assertFalse(self.splice.over)
        self.first.sendall(b"still here")
        self.first.shutdown(socket.SHUT_WR)
        self.assertEqual(await deferToThread(readAll, self.second), b"hello second\nstill here")


class SmallAndBulkTests(KernelSpliceTests):
    """
    Small traffic goes through memory; bulk through a pipe, until it is
    small again.
    """

    async def test_pipesOnlyForBulk(self) -> None:
        taken: list[Any] = []
        take = zerocopy._pool.take

        def counting() -> Any:
            taken.append(1)
            return take()

        self.patch(zerocopy._pool, "take", counting)
        flow = self.splice.flows[0]

        async def through(payload: bytes, expected: bytes) -> None:
            await deferToThread(self.first.sendall, payload)
            got = bytearray()
            while len(got) < len(expected):
                got += await deferToThread(self.second.recv, 1 << 20)
            self.assertEqual(bytes(got), expected)

        await through(b"small", b"hello second\nsmall")
        self.assertEqual((taken, flow.small), ([], True))
        bulk = os.urandom(8 << 20)
        await through(bulk, bulk)
        self.assertTrue(taken)
        before = len(taken)
        for _ in range(3):
            await through(b"small again", b"small again")
        self.assertTrue(flow.small)
        self.assertLessEqual(len(taken), before + 1)


class SpliceFailureTests(KernelSpliceTests):
    """
    A splice that fails in the loop ends both its connections; the loop
    goes on for the others.
    """

    async def _endsAlone(self, payload: bytes = b"trigger") -> None:
        loop = self.splice.loop
        await deferToThread(self.first.sendall, payload)
        await self.held[0].lost
        await self.held[1].lost
        self.assertTrue(self.splice.over)
        self.assertTrue(loop._thread.is_alive())
        self.assertIs(zerocopy.spliceLoop(reactor), loop)

    async def test_unexpectedError(self) -> None:
        def broken(flow: Any) -> None:
            raise RuntimeError("a bug in a flow")

        self.patch(zerocopy._Flow, "readable", broken)
        await self._endsAlone()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_loopFails(self) -> None:
        """
        If the loop itself fails, its splices end, and the next splice
        starts a new loop.
        """

        class Broken(BaseException):
            pass

        def broken(flow: Any) -> None:
            raise Broken()

        loop = self.splice.loop
        self.patch(zerocopy._Flow, "readable", broken)
        self.first.sendall(b"trigger")
        await self.held[0].lost
        await self.held[1].lost
        self.assertTrue(self.splice.over)
        await deferToThread(loop._thread.join, 10)
        self.assertFalse(loop._thread.is_alive())
        self.assertIsNot(zerocopy.spliceLoop(reactor), loop)
        self.assertEqual(len(self.flushLoggedErrors(Broken)), 1)

    async def test_noDescriptorForAPipe(self) -> None:
        def exhausted() -> Any:
            raise OSError(errno.EMFILE, "Too many open files")

        self.patch(zerocopy._pool, "take", exhausted)
        # More than one read's buffer: bulk goes through a pipe.
        await self._endsAlone(os.urandom(256 * 1024))


class PipePoolTests(TestCase):
    def test_keepsAtMost(self) -> None:
        if not zerocopy.available(reactor):
            raise SkipTest("splice(2) is not available here")
        pool = zerocopy.PipePool(keep=2)
        pipes = [pool.take() for _ in range(4)]
        for pipe in pipes:
            pool.give(pipe)
        self.assertEqual(len(pool._free), 2)
        self.assertIs(pool.take(), pipes[1])
        for pipe in pipes[2:]:
            self.assertRaises(OSError, os.fstat, pipe.read)
        for pipe in pipes[:2]:
            pipe.close()


class KernelSpliceStopTests(KernelSpliceTests):
    """
    L{KernelSplice.stop}: the relay is stopping.
    """

    async def test_stop(self) -> None:
        """
        Both connections end as closes, not resets, and the pipes go.
        """
        self.first.sendall(b"on its way")
        await deferLater(reactor, 0.05, lambda: None)
        self.splice.stop()
        self.assertEqual(await deferToThread(readAll, self.second), b"hello second\non its way")
        self.assertEqual(await deferToThread(readAll, self.first), b"hello first\n")
        await self.held[0].lost
        await self.held[1].lost
        for flow in self.splice.flows:
            self.assertIsNone(flow.pipe)

# -*- test-case-name: relaynet.test.test_zerocopy -*-
"""
Moving a native stream's bytes between two TCP sockets in the kernel.

Linux's C{splice(2)} moves bytes from a socket into a pipe and from the
pipe into another socket without copying them through the process.  A
L{KernelSplice} owns two sockets that Twisted has stopped watching, and for
each direction moves what the source has, as far as the destination takes
it, one pipe-full at a time:

    - when the destination is full, the bytes wait in the pipe and the
      source is not read until the destination is writable again, so the
      only buffer is the pipe (backpressure, as on the Python path);
    - an end of stream is passed on as a half-close (C{shutdown(SHUT_WR)})
      once the pipe is empty; when both directions have ended, both
      connections close;
    - an error on either socket resets both.

Pipes are lent from a small pool only while bytes are in flight, so an idle
stream holds no pipe and no file descriptor beyond its two sockets.

The spliced sockets are watched by one L{SpliceLoop}: a thread with its own
C{epoll} set that does nothing but move bytes.  Going through Twisted's
reactor cost about 20 microseconds of dispatch per event (twice a small
message's two C{splice} calls), most of a round trip's time through the
relay; the loop's own cost is a few.  The thread holds Python's GIL only
while it handles an event (the system calls release it), and everything it
shares with the reactor thread is under one lock; closing the connections
is left to the reactor thread.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import sys
import threading
from typing import Any

from twisted.internet.interfaces import IReactorFDSet, IReactorThreads
from twisted.logger import Logger
from twisted.python.failure import Failure

from relaynet import logs

__all__ = ["KernelSplice", "PipePool", "SpliceLoop", "available"]

log = Logger(observer=logs.observer)

_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
#: The pipe size asked for: the most one splice call moves.
PIPE_SIZE = 1 << 20
#: The most pipe-fulls one readable event moves.
ROUNDS = 8


def available(reactor: Any) -> bool:
    """
    Whether C{reactor} can stop watching file descriptors and take calls
    from threads, and the platform has C{splice(2)} and C{epoll}.
    """
    return (
        sys.platform.startswith("linux")
        and hasattr(os, "splice")
        and hasattr(select, "epoll")
        and IReactorFDSet.providedBy(reactor)
        and IReactorThreads.providedBy(reactor)
    )


class _Pipe:
    def __init__(self) -> None:
        self.read, self.write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.size = fcntl.fcntl(self.write, fcntl.F_SETPIPE_SZ, PIPE_SIZE)  # type: ignore[attr-defined]
        except OSError:
            # Above /proc/sys/fs/pipe-max-size for an unprivileged process.
            self.size = fcntl.fcntl(self.write, fcntl.F_GETPIPE_SZ)  # type: ignore[attr-defined]

    def close(self) -> None:
        os.close(self.read)
        os.close(self.write)


class PipePool:
    """
    Empty pipes to lend, keeping at most C{keep} of them between uses.
    """

    def __init__(self, keep: int = 16) -> None:
        self.keep = keep
        self._free: list[_Pipe] = []

    def take(self) -> _Pipe:
        return self._free.pop() if self._free else _Pipe()

    def give(self, pipe: _Pipe) -> None:
        """
        Take back an empty pipe.
        """
        if len(self._free) < self.keep:
            self._free.append(pipe)
        else:
            pipe.close()


_pool = PipePool()
#: The first read of an event (L{_Flow.readable}); used by the loop's
#: thread only.
_small = bytearray(16384)
#: A splice that moves less than this switches a flow back to reading into
#: memory (bulk traffic seldom does, while its sink keeps up).
BACK_TO_SMALL = 4096


class _Flow:
    """
    One direction of a splice: from C{source}'s socket to C{sink}'s.

    @ivar pending: bytes to send to the sink before any more are read (at
        first the C{101}; then what the sink did not take of a read).
    @ivar inPipe: bytes read from the source and not yet in the sink.
    """

    def __init__(self, owner: KernelSplice, source: _Socket, sink: _Socket, greeting: bytes) -> None:
        self.owner = owner
        self.source = source
        self.sink = sink
        self.pending = greeting
        self.pipe: _Pipe | None = None
        self.inPipe = 0
        # Whether reads are small (into memory) or bulk (spliced).
        self.small = True
        self.ended = False
        self.done = False

    def start(self) -> None:
        if self._drain():
            self.source.want(read=True)

    def readable(self) -> None:
        """
        The source has bytes, or its end: move them, a pipe-full at a time,
        until the source has no more for now or the sink is full (at most
        L{ROUNDS} pipe-fulls, so that one busy stream does not keep others
        waiting).

        While the traffic is small, an event's first read goes into memory
        instead: a small message (request/response traffic) costs the
        kernel less as a C{recv} and a C{send} than as two splices through
        a pipe.  A read that fills the buffer means bulk, which goes on
        through the pipe until a splice moves less than L{BACK_TO_SMALL}.
        """
        if self.done or not self._drain():
            return
        if self.small:
            self._readSmall()
        else:
            self._splice()

    def _readSmall(self) -> None:
        try:
            size = self.source.sock.recv_into(_small)
            if size:
                view = memoryview(_small)[:size]
                try:
                    sent = self.sink.sock.send(view)
                except BlockingIOError:
                    sent = 0
                if sent < size:
                    self.pending = bytes(view[sent:])
                    self._waitForSink()
                    return
        except BlockingIOError:
            return
        except OSError as e:
            self.owner.fail(e)
            return
        if not size:
            self._sourceEnded()
        elif size == len(_small):
            self.small = False
            self._splice()

    def _splice(self) -> None:
        for _ in range(ROUNDS):
            try:
                pipe = self.pipe or _pool.take()
            except OSError as e:
                # No descriptors left for a pipe.
                self.owner.fail(e)
                return
            try:
                moved = os.splice(self.source.fd, pipe.write, pipe.size, flags=_FLAGS)
            except BlockingIOError:
                moved = -1
            except OSError as e:
                self.pipe = pipe
                self.owner.fail(e)
                return
            if moved < 0:
                if self.pipe is None:
                    _pool.give(pipe)
                return
            self.pipe = pipe
            if moved == 0:
                self._sourceEnded()
                return
            self.inPipe += moved
            if moved < BACK_TO_SMALL:
                self.small = True
            # On while the sink takes it all and the source fills the pipe
            # (less is most likely all it had: the loop says when there is
            # more).
            if not self._drain() or moved < pipe.size:
                return

    def _sourceEnded(self) -> None:
        """
        The source half-closed: what is left goes to the sink, then its end.
        """
        self.ended = True
        self.source.want(read=False)
        self._drain()

    def _waitForSink(self) -> None:
        """
        The sink is full: read no more until it is writable.
        """
        self.source.want(read=False)
        self.sink.want(write=True)

    def writable(self) -> None:
        """
        The sink can take more: empty the pipe into it, then read again.
        """
        if not self.done and self._drain() and not self.ended:
            self.source.want(read=True)

    def _drain(self) -> bool:
        """
        Send the greeting and the pipe's bytes to the sink.

        @return: whether all went; if not, the source is not read until
            the sink is writable.
        """
        try:
            while self.pending:
                sent = self.sink.sock.send(self.pending)
                self.pending = self.pending[sent:]
            while self.inPipe:
                assert self.pipe is not None
                self.inPipe -= os.splice(self.pipe.read, self.sink.fd, self.inPipe, flags=_FLAGS)
        except BlockingIOError:
            self._waitForSink()
            return False
        except OSError as e:
            self.owner.fail(e)
            return False
        self.sink.want(write=False)
        if self.pipe is not None:
            _pool.give(self.pipe)
            self.pipe = None
        if self.ended:
            self._finish()
        return True

    def _finish(self) -> None:
        self.done = True
        try:
            self.sink.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                self.owner.fail(e)
                return
        self.owner.flowDone()

    def discard(self) -> None:
        """
        The splice failed: the pipe's bytes are of no use to anyone.
        """
        if self.pipe is not None:
            self.pipe.close()
            self.pipe = None
        self.done = True


class _Socket:
    """
    One spliced socket as the loop sees it: readable means its flow out
    may go on, writable that its flow in may.
    """

    outbound: _Flow
    inbound: _Flow

    def __init__(self, owner: KernelSplice, transport: Any) -> None:
        self.owner = owner
        self.transport = transport
        self.sock: socket.socket = transport.socket
        self.fd = transport.fileno()
        self.reading = False
        self.writing = False

    def doRead(self) -> None:
        self.outbound.readable()

    def doWrite(self) -> None:
        self.inbound.writable()

    def want(self, read: bool | None = None, write: bool | None = None) -> None:
        changed = False
        if read is not None and read != self.reading:
            self.reading, changed = read, True
        if write is not None and write != self.writing:
            self.writing, changed = write, True
        if changed:
            self.owner.loop.watch(self)

    def release(self) -> None:
        self.want(read=False, write=False)


class SpliceLoop:
    """
    The thread that watches every spliced socket of a process and moves
    their bytes (L{_Flow}); started with the first splice, stopped with the
    reactor.

    @ivar lock: held by the thread while it handles events, and by the
        reactor thread while it starts or stops a splice.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.lock = threading.Lock()
        self._epoll = select.epoll()
        self._sockets: dict[int, _Socket] = {}
        self._wake, self._waker = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._closed = False
        self._epoll.register(self._wake, select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name="relaynet-splice", daemon=True)
        self._thread.start()
        reactor.addSystemEventTrigger("after", "shutdown", self.stop)

    def inLoop(self) -> bool:
        return threading.get_ident() == self._thread.ident

    def watch(self, sock: _Socket) -> None:
        """
        Watch C{sock} for what it wants now (nothing: forget it).  Called
        with the lock held.
        """
        mask = (select.EPOLLIN if sock.reading else 0) | (select.EPOLLOUT if sock.writing else 0)
        known = self._sockets.get(sock.fd) is sock
        if mask and known:
            self._epoll.modify(sock.fd, mask)
        elif mask:
            self._sockets[sock.fd] = sock
            self._epoll.register(sock.fd, mask)
        elif known:
            del self._sockets[sock.fd]
            try:
                self._epoll.unregister(sock.fd)
            except OSError:
                # Already gone from the set (closed): nothing to forget.
                pass

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            # Not expected: every splice it had is ended rather than left
            # hanging, and the next splice starts a new loop.
            self.reactor.callFromThread(log.failure, "the splice loop failed", failure=Failure())
            self._forget()
            with self.lock:
                for owner in {sock.owner for sock in list(self._sockets.values())}:
                    owner.fail(ConnectionAbortedError("the splice loop failed"))
        finally:
            self._close()

    def _loop(self) -> None:
        poll, lock, sockets = self._epoll.poll, self.lock, self._sockets
        readable = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
        writable = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
        while True:
            events = poll()
            with lock:
                for fd, event in events:
                    if fd == self._wake:
                        return
                    # An event may be stale (its socket forgotten since, or
                    # its number taken by a new one): a flow that finds
                    # nothing to move does nothing.
                    sock = sockets.get(fd)
                    try:
                        if sock is not None and sock.reading and event & readable:
                            sock.doRead()
                        sock = sockets.get(fd)
                        if sock is not None and sock.writing and event & writable:
                            sock.doWrite()
                    except Exception as e:
                        # A splice that fails in a way the flows do not
                        # expect ends; the others go on.
                        self.reactor.callFromThread(log.failure, "splice failed", failure=Failure())
                        if sock is not None:
                            sock.owner.fail(e)

    def stop(self) -> None:
        """
        End the thread (the splices it had are left as they are).
        """
        self._forget()
        with self.lock:
            if not self._closed:
                os.write(self._waker, b"x")

    def _forget(self) -> None:
        """
        Splices from now on start another loop.
        """
        global _loop
        if _loop is self:
            _loop = None

    def _close(self) -> None:
        with self.lock:
            self._closed = True
        for close in (self._epoll.close, lambda: os.close(self._wake), lambda: os.close(self._waker)):
            try:
                close()
            except OSError:
                pass


_loop: SpliceLoop | None = None


def spliceLoop(reactor: Any) -> SpliceLoop:
    """
    The process's L{SpliceLoop}, started if need be.
    """
    global _loop
    if _loop is None:
        _loop = SpliceLoop(reactor)
    return _loop


class KernelSplice:
    """
    Two TCP connections joined in the kernel.

    @param transports: Twisted TCP transports, each already connected to a
        protocol that ignores them from now on; the splice stops Twisted
        watching them and, when done, closes them through Twisted, so
        their protocols see C{connectionLost}.
    @param greetings: bytes to send on the first and the second connection
        before any spliced bytes (the C{101} of each).
    """

    def __init__(self, reactor: Any, first: Any, second: Any, firstGreeting: bytes = b"", secondGreeting: bytes = b"") -> None:
        self.reactor = reactor
        self.loop = spliceLoop(reactor)
        self.sockets = (_Socket(self, first), _Socket(self, second))
        a, b = self.sockets
        self.flows = (_Flow(self, a, b, secondGreeting), _Flow(self, b, a, firstGreeting))
        a.outbound = b.inbound = self.flows[0]
        b.outbound = a.inbound = self.flows[1]
        self.over = False

    def start(self) -> None:
        for s in self.sockets:
            s.transport.stopReading()
            s.transport.stopWriting()
            s.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.loop.lock:
            try:
                for flow in self.flows:
                    if not self.over:
                        flow.start()
            except OSError as e:
                # The loop could not watch a socket (out of descriptors or
                # epoll watches): end both rather than leave them unread.
                self.fail(e)

    def flowDone(self) -> None:
        if all(flow.done for flow in self.flows) and not self.over:
            self._end(clean=True)

    def fail(self, error: BaseException) -> None:
        if self.over:
            return
        for flow in self.flows:
            flow.discard()
        self._end(clean=False, error=error)

    def stop(self) -> None:
        """
        End both connections now, as closes rather than resets; bytes still
        in a pipe are dropped.
        """
        with self.loop.lock:
            if self.over:
                return
            for flow in self.flows:
                flow.discard()
            self._end(clean=True)

    def _end(self, clean: bool, error: BaseException | None = None) -> None:
        """
        Stop watching both sockets (the lock is held), and have the reactor
        thread close them.
        """
        self.over = True
        for s in self.sockets:
            s.release()
        if self.loop.inLoop():
            self.reactor.callFromThread(self._close, clean, error)
        else:
            self._close(clean, error)

    def _close(self, clean: bool, error: BaseException | None) -> None:
        if error is not None:
            log.debug("kernel splice ends: {error}", error=error)
        for s in self.sockets:
            if clean:
                s.transport.loseConnection()
            else:
                s.transport.abortConnection()

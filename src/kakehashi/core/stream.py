"""Connections as the pump sees them: a socket, optionally with TLS on top.

kakehashi owns its sockets instead of using asyncio transports, because the byte
pump must be able to ``os.splice`` between two plain sockets (kernel to kernel).
TLS is driven on the same socket: by OpenSSL on the fd itself (:class:`DirectTLSConn`,
the fast path, with a true half-close both ways), or by ``ssl.SSLObject`` over memory
BIOs (:class:`TLSConn`: bytes already read ahead, ``KAKEHASHI_FAST_PATH=off``); either
way a STARTTLS-style upgrade of a live connection reuses the TCP connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
import stat
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any

from kakehashi.core import tlsmismatch, trace, wire

if TYPE_CHECKING:  # (core.tls imports cryptography: not on every stream's import path)
    from kakehashi.core.tls import SessionCache, SessionKey

#: ``KAKEHASHI_FAST_PATH=off`` turns the fast paths off (TLS through memory BIOs
#: instead of on the socket): for comparison and as a fallback
FAST_PATH = os.environ.get("KAKEHASHI_FAST_PATH", "on") != "off"

#: the plaintext of one TLS record at most: a write longer than this is several records
TLS_RECORD = 16 * 1024
#: Cork a TCP socket (``TCP_CORK``) around a TLS write of several records
#: (:meth:`DirectTLSConn.send_all`). OpenSSL writes each 16 KiB record with a system
#: call of its own, and under ``TCP_NODELAY`` the kernel pushes what it has after each
#: (autocorking merges some): a 256 KiB write crossed loopback as 8.2-8.9 segments, ACKs
#: included, each taken, acknowledged and woken for by the peer. Corked, the records
#: of one write leave in full-sized segments (64 KiB on loopback) and the tail at the
#: uncork: 6.3-6.5. A TLS-in, TLS-out loop (the on-demand edge's work, issue 12) took
#: 1-6 % less CPU per GB and moved 8-14 % more MB/s in three alternated pairs; the
#: on-demand row with read-ahead too: docs/benchmarks.md. ``KAKEHASHI_TLS_CORK=off``
#: turns it off (tests run both).
TLS_CORK = os.environ.get("KAKEHASHI_TLS_CORK", "on") != "off" and hasattr(socket, "TCP_CORK")
#: OpenSSL's read-ahead on a bulk stream's TLS (:meth:`DirectTLSConn.read_ahead`): one
#: ``read`` per record instead of two (header, then body), measured on the on-demand
#: edge (186,094 -> 105,878 reads in 5 s for about 105,000 records) and its inner relay
#: (189,267 -> 113,137). With the cork, in three runs of 15 interleaved rounds: the
#: edge and inner relay 3-10 % less CPU per GB and 3-10 % more MB/s per round than
#: before (docs/benchmarks.md). ``KAKEHASHI_TLS_READ_AHEAD=off`` turns it off (tests
#: run both).
TLS_READ_AHEAD = os.environ.get("KAKEHASHI_TLS_READ_AHEAD", "on") != "off"

#: OpenSSL's ``SSL_OP_IGNORE_UNEXPECTED_EOF`` (OpenSSL 3; Python names it only from
#: 3.12): a TCP FIN without close_notify reads as the end of the stream. Without it
#: OpenSSL 3 fails the read with UNEXPECTED_EOF_WHILE_READING, a fatal state in which
#: every later write fails too - the reply of a half-closed tunnel would be lost.
OP_IGNORE_UNEXPECTED_EOF = getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 1 << 7)

log = logging.getLogger("kakehashi.stream")

RECV_CHUNK = 256 * 1024
#: reads for control messages: large enough for any control frame, small enough
#: to stay below malloc's mmap threshold (a 256 KiB read per keepalive costs an
#: mmap/munmap pair and page faults)
SMALL_CHUNK = 16 * 1024


class ConnClosed(Exception):
    """The peer went away in the middle of something that needed more bytes."""


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


#: Linux copies TCP_NODELAY from a listening socket to the connections it accepts
#: (the accepted socket is a clone of the listener's), so a listener that sets it
#: once spares a setsockopt per connection; elsewhere each connection sets it
NODELAY_INHERITED = sys.platform.startswith("linux")


class Conn:
    """A plain non-blocking stream socket driven by the running loop."""

    plain = True
    _watching = False  # a persistent readable callback is registered (watch_readable)
    #: the fd this connection's reader (:meth:`_readable`) is registered on, -1 if none
    _reader_fd = -1
    #: readiness reported since the last read wait with nobody waiting (:meth:`_readable`)
    _idle_wakes = 0

    def __init__(self, sock: socket.socket, *, accepted: tuple | None = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        """``accepted``: the peer address ``accept`` returned, for a socket that a
        :class:`Listener` made non-blocking and tuned already (the accept path does
        per connection only what it must); ``loop``: the running loop, if known."""
        self.sock = sock
        self.loop = loop or asyncio.get_running_loop()
        self._closed = False
        if accepted is not None:
            self.peer = accepted
        else:
            _tune(sock)
            try:
                self.peer = sock.getpeername()
            except OSError:
                self.peer = None
        self.tls_version: str | None = None
        self._pushback = b""
        #: futures of tasks waiting for this socket (value: readable?); ``close`` wakes
        #: them, because a task waiting on a closed fd would otherwise wait forever
        self._waits: dict[asyncio.Future[None], bool] = {}

    @property
    def encrypted(self) -> bool:
        return not self.plain

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        return self.sock.fileno()

    async def recv_into(self, buf: memoryview | bytearray) -> int:
        """Read what has arrived into ``buf``, waiting (:meth:`wait_readable`) only when
        nothing has: not the loop's ``sock_recv_into``, which registers and removes a
        reader around each wait (see :meth:`_wait`)."""
        if self._pushback:
            return self._take_pushback(buf)
        while True:
            try:
                return self.sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                await self._wait(readable=True)

    async def recv(self, n: int = RECV_CHUNK) -> bytes:
        if self._pushback:
            data, self._pushback = self._pushback[:n], self._pushback[n:]
            return data
        while True:
            try:
                return self.sock.recv(n)
            except (BlockingIOError, InterruptedError):
                await self._wait(readable=True)

    def unread(self, data: bytes) -> None:
        """Put bytes back in front of the stream (after sniffing a protocol)."""
        self._pushback = data + self._pushback

    def _take_pushback(self, buf: memoryview | bytearray) -> int:
        n = min(len(buf), len(self._pushback))
        buf[:n] = self._pushback[:n]
        self._pushback = self._pushback[n:]
        return n

    def peek_now(self, n: int) -> bytes:
        """Up to ``n`` bytes that have arrived, left in place (``MSG_PEEK``); b"" when
        none have, at EOF, or when this is not a plain socket of its own."""
        if not self.plain or self._pushback or self._closed:
            return b""
        try:
            return self.sock.recv(n, socket.MSG_PEEK)
        except OSError:  # BlockingIOError included: nothing yet
            return b""

    def skip_now(self, n: int) -> None:
        """Drop ``n`` bytes that :meth:`peek_now` showed (they are in the socket's
        buffer, so this never waits)."""
        while n > 0:
            got = len(self.sock.recv(n))
            if not got:
                raise ConnClosed("the stream ended inside bytes it had shown")
            n -= got

    @property
    def has_pushback(self) -> bool:
        return bool(self._pushback)

    @property
    def pushback_size(self) -> int:
        return len(self._pushback)

    def take_pushback(self, n: int) -> bytes:
        data, self._pushback = self._pushback[:n], self._pushback[n:]
        return data

    async def _recv_via_buffer(self, n: int = RECV_CHUNK) -> bytes:
        """``recv`` for subclasses whose reads go through ``recv_into``."""
        buf = bytearray(n)
        got = await self.recv_into(buf)
        return bytes(buf[:got])

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._send_raw(data)

    async def _send_raw(self, data: bytes | bytearray | memoryview) -> None:
        """Send everything on the socket; ConnClosed if another task closes it meanwhile.

        The writer is often not the socket's owner (the relay forwards one link's
        frames into another), so the wait must be one :meth:`close` can end.
        """
        view = memoryview(data).cast("B")
        while view:
            try:
                view = view[self.sock.send(view):]
            except (BlockingIOError, InterruptedError):
                await self._wait(readable=False)

    async def wait_readable(self) -> None:
        await self._wait(readable=True)

    async def wait_writable(self) -> None:
        await self._wait(readable=False)

    async def _wait(self, *, readable: bool) -> None:
        """Wait until the socket is readable (writable); ConnClosed if :meth:`close`
        comes first.

        A read wait leaves the reader registered when it ends: the next wait, usually
        right after the read that follows, finds it in place. Registering and removing
        it around each wait cost six ``epoll_ctl`` under uvloop (three of them failing:
        its poll handle is made and closed each time), about 40 per process and relay
        session setup (issue 12). The registration goes when the socket turns readable
        with nobody waiting (:meth:`_readable`: a level-triggered reader would
        otherwise wake the loop until someone reads, and a link paused for
        backpressure must not be read), on :meth:`close` and on a hand-over of the
        socket (:meth:`drop_reader`)."""
        if self._closed:
            raise ConnClosed("connection closed")
        if readable in self._waits.values():  # the loop keeps one callback per direction
            raise RuntimeError(f"another task already waits for this socket to be "
                               f"{'readable' if readable else 'writable'}")
        fd = self.sock.fileno()
        fut: asyncio.Future[None] = self.loop.create_future()
        self._waits[fut] = readable
        if readable:
            # (again each time, at no system call when in place: another user of the
            # fd, such as the gateway's fast lane, may have replaced or removed it)
            self.loop.add_reader(fd, self._readable)
            self._reader_fd = fd
            self._idle_wakes = 0
            try:
                await fut
            finally:
                self._waits.pop(fut, None)
            return

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        self.loop.add_writer(fd, ready)
        try:
            await fut
        finally:
            if self._waits.pop(fut, None) is not None and not self._closed:
                self.loop.remove_writer(fd)

    def watch_readable(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` whenever the socket is readable, until
        :meth:`unwatch_readable` or :meth:`close` (which unregisters it before the fd
        goes: a registration left on a closed fd number would swallow the events of
        the next connection that gets that number).

        A watch already in place only changes hands: the loop keeps calling
        :meth:`_readable`, which calls the current callback. A kept-alive upstream
        changes watchers several times per client connection (the pool, a fast lane,
        the pool again); re-registering each time cost a loop handle and its checks
        per change, measured with one request per connection."""
        self._on_readable = callback
        if not self._watching:
            fd = self.sock.fileno()
            self.loop.add_reader(fd, self._readable)
            self._reader_fd = fd
            self._watching = True

    def _readable(self) -> None:
        """The one reader this connection registers: the watcher's callback, else the
        waiting read's wake-up, else nobody reads now, so the registration goes."""
        if self._watching:
            self._on_readable()
            return
        for fut, readable in self._waits.items():
            if readable:
                if not fut.done():
                    fut.set_result(None)
                return
        # The first such call may be stale: the selector loop collects readiness
        # before it runs the woken reader, which then reads what was there. A socket
        # that still has bytes nobody waits for is reported again at once.
        self._idle_wakes += 1
        if self._idle_wakes > 1:
            self.drop_reader()

    def unwatch_readable(self) -> None:
        """End the watch. The registration stays for a read wait that usually follows
        (a paired relay link, a pooled upstream taken by a request) and goes when
        the socket is readable with nobody waiting (:meth:`_readable`)."""
        self._watching = False

    def drop_reader(self) -> None:
        """Remove this connection's reader now: before its fd closes or another object
        takes the socket over."""
        self._watching = False
        fd, self._reader_fd = self._reader_fd, -1
        if fd >= 0:
            self.loop.remove_reader(fd)

    def _wake_waiters(self) -> None:
        """Unregister and fail every wait on this socket (before its fd is closed)."""
        if not self._waits:
            return
        fd = self.sock.fileno()
        waits, self._waits = self._waits, {}
        for fut, readable in waits.items():
            if not readable:
                self.loop.remove_writer(fd)
            if not fut.done():
                fut.set_exception(ConnClosed("connection closed"))

    def cut(self) -> None:
        """End both directions now without closing the fd (its owner still does that).

        For a stream that cannot go on, such as a frame cut short: the peer sees the
        end at once, and this side's reader wakes to EOF.
        """
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    async def shutdown_write(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.drop_reader()
            self._wake_waiters()
            with contextlib.suppress(OSError):
                self.sock.close()

    def abort(self) -> None:
        """Close with RST so the peer learns at once (used on protocol violations)."""
        if not self._closed:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
            self.close()


async def _wait_fd(loop: asyncio.AbstractEventLoop, fd: int, *, readable: bool) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if readable:
        loop.add_reader(fd, ready)
    else:
        loop.add_writer(fd, ready)
    try:
        await fut
    finally:
        if readable:
            loop.remove_reader(fd)
        else:
            loop.remove_writer(fd)


class TLSConn(Conn):
    """TLS over a socket we keep owning (so STARTTLS reuses the same TCP connection)."""

    plain = False

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        initial: bytes = b"",
        session: ssl.SSLSession | None = None,
    ) -> None:
        super().__init__(sock)
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(
            self._in, self._out, server_side=server_side, server_hostname=server_hostname,
            session=session,
        )
        if initial:
            self._in.write(initial)
        self._send_lock = asyncio.Lock()
        self._eof = False
        #: the receive buffer of a busy connection (see ``_fill_now``)
        self._bulk_buf: bytearray | None = None

    #: the handshake resumed a session (a TLS 1.3 ticket) instead of running in full
    resumed = False
    #: where :meth:`keep_session` puts this connection's session (``start_tls``'s
    #: ``sessions``) and under which server
    _sessions: tuple[SessionCache, ssl.SSLContext, SessionKey | None] | None = None

    @property
    def ssl_object(self) -> ssl.SSLObject:
        return self._obj

    def keep_session(self) -> None:
        """Keep this connection's session for the next connection to the same server
        (when it was opened with ``sessions``). Call it once the peer's first bytes
        were read: a TLS 1.3 server sends its tickets after the handshake."""
        if self._sessions is not None:
            cache, context, key = self._sessions
            cache.keep(context, key, self.ssl_object)

    async def handshake(self) -> None:
        while not self._handshake_step():
            await self._flush()
            if not await self._fill():
                # raised outside any ``except`` block: no chained SSLWantReadError whose
                # traceback would keep this connection's frames (and its SSL object)
                # alive until the cyclic garbage collector happens to run
                raise ConnClosed("connection closed during TLS handshake")
        await self._flush()
        self.tls_version = self._obj.version()

    def _handshake_step(self) -> bool:
        """One handshake step: True when done, False when it needs the peer's bytes."""
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def _fill_now(self, want: int) -> int | None:
        """Move what the socket holds now (up to ``want`` bytes) into the TLS input:
        the byte count, 0 at EOF, None if nothing is there.

        A bulk stream reads through one buffer kept for the connection (allocated the
        first time a large read brings more than a small chunk), so a large read
        costs no allocation; a quiet connection (an idle agent) keeps no buffer.
        """
        buf = self._bulk_buf
        try:
            if buf is None:
                data = self.sock.recv(min(max(want, SMALL_CHUNK), RECV_CHUNK))
                n = len(data)
            else:
                n = self.sock.recv_into(buf, min(max(want, SMALL_CHUNK), RECV_CHUNK))
        except (BlockingIOError, InterruptedError):
            return None
        if not n:
            self._in.write_eof()
            self._eof = True
            return 0
        if buf is None:
            self._in.write(data)
            if n > SMALL_CHUNK:
                self._bulk_buf = bytearray(RECV_CHUNK)  # the stream proved busy
        else:
            self._in.write(memoryview(buf)[:n])
        return n

    async def _fill(self, want: int = SMALL_CHUNK) -> bool:
        while (n := self._fill_now(want)) is None:
            await self.wait_readable()
        return n > 0

    async def _flush(self) -> None:
        async with self._send_lock:
            while self._out.pending:
                await self._send_raw(self._out.read())

    async def recv_into(self, buf: memoryview | bytearray) -> int:
        """Decrypt into ``buf``: as many records as the socket holds now (up to the
        buffer's size), so a bulk transfer costs one call per large chunk, not one
        per 16 KiB record.

        Once the socket has ended (a TCP half-close without close_notify) and the
        TLS input is empty, nothing more is read: a read then raises SSLEOFError,
        which leaves the SSL object in a fatal state in which every later *write*
        fails too, and the other direction of a half-closed tunnel (the reply)
        would be lost."""
        if self._pushback:
            return self._take_pushback(buf)
        view = memoryview(buf)
        size = len(view)
        got = 0
        read = self._obj.read
        while got < size:
            if self._input_ended():
                return got  # the peer's raw EOF: see the docstring
            try:
                n = read(size - got, view[got:] if got else view)
            except ssl.SSLWantReadError:
                if self._out.pending:
                    await self._flush()
                if self._eof:
                    return got
                if got:
                    # more now without waiting, else hand over what we have
                    if not self._fill_now(size - got):
                        return got
                elif not await self._fill(size):
                    return 0
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return got
            if not n:
                return got
            got += n
        return got

    async def recv(self, n: int = RECV_CHUNK) -> bytes:
        """Up to ``n`` decrypted bytes, without zero-filling a buffer per record."""
        if self._pushback:
            data, self._pushback = self._pushback[:n], self._pushback[n:]
            return data
        while True:
            if self._input_ended():
                return b""  # no read after the peer's raw EOF (see recv_into)
            try:
                return self._obj.read(n)
            except ssl.SSLWantReadError:
                if self._out.pending:
                    await self._flush()
                if self._eof or not await self._fill(n):
                    return b""
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        write = self._obj.write
        while view:
            n = write(view[:RECV_CHUNK])
            view = view[n:]
            if self._out.pending >= RECV_CHUNK:
                await self._flush()
        await self._flush()

    def _input_ended(self) -> bool:
        """The socket has ended and no TLS bytes wait: reading now would only raise
        SSLEOFError and break the connection for writes too (see recv_into)."""
        return self._eof and not self._in.pending

    def _drain_plaintext(self) -> None:
        """Move every record OpenSSL can decrypt now into the pushback buffer.

        Python sends a close_notify only through ``SSL_shutdown`` called twice, and
        the second call processes the next record: application data there is lost
        (``APPLICATION_DATA_AFTER_CLOSE_NOTIFY``) and the stream is broken. With the
        input drained first it finds at most part of a record, which it keeps.
        """
        parts = []
        while not self._input_ended():
            try:
                data = self._obj.read(RECV_CHUNK)
            except ssl.SSLError:
                break
            if not data:
                break
            parts.append(data)
        if parts:
            self._pushback += b"".join(parts)

    async def shutdown_write(self) -> None:
        self._drain_plaintext()  # the other direction goes on (half-close)
        with contextlib.suppress(ssl.SSLError, OSError):
            self._obj.unwrap()
        with contextlib.suppress(OSError, ConnectionError):
            await self._flush()
        await super().shutdown_write()


class _CloseNotify:
    """Sends a TLS close_notify on a socket-driven SSL object *without* reading.

    Python 3.11 offers only ``SSLSocket.unwrap``/``_sslobj.shutdown``, which call
    ``SSL_shutdown`` twice: the first call sends close_notify, the second reads the
    socket for the peer's close_notify, and an application record found there is
    fatal (APPLICATION_DATA_AFTER_CLOSE_NOTIFY: OpenSSL expects such records through
    ``SSL_read``). On a half-closed stream the peer is still sending, so a record
    arriving in that instant was lost and the stream broken. ``SSL_shutdown`` called
    once (through ctypes, from the libssl that ``_ssl`` is linked against) sends the
    alert and reads nothing; later ``SSL_read`` calls take the peer's records.

    Reaching the ``SSL *`` needs CPython's layout of ``_ssl._SSLSocket``
    (``PyObject_HEAD``, the weak reference to its socket, then ``SSL *``), so the
    pointer is taken only when both neighbours check out: the word before it is a weak
    reference to this very socket, and ``SSL_get_fd`` of it is this socket's fd.
    Otherwise :func:`half_close_ready` is False and streams that need a half-close
    keep the memory-BIO driver.
    """

    SSL_ERROR_WANT_WRITE = 3

    def __init__(self) -> None:
        import _ssl
        import ctypes

        lib = ctypes.CDLL(_ssl.__file__)  # dlsym finds libssl's symbols through it
        self.shutdown = lib.SSL_shutdown
        self.shutdown.argtypes, self.shutdown.restype = [ctypes.c_void_p], ctypes.c_int
        self.get_error = lib.SSL_get_error
        self.get_error.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self.get_error.restype = ctypes.c_int
        self.get_fd = lib.SSL_get_fd
        self.get_fd.argtypes, self.get_fd.restype = [ctypes.c_void_p], ctypes.c_int
        self.clear = lib.ERR_clear_error
        self.clear.argtypes, self.clear.restype = [], None
        self.ctrl = lib.SSL_ctrl
        self.ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        self.ctrl.restype = ctypes.c_long
        self._words = ctypes.c_void_p * 4

    def pointer(self, sslsock: ssl.SSLSocket) -> int | None:
        """The ``SSL *`` of ``sslsock`` if the layout checks out, else None."""
        import weakref

        obj = getattr(sslsock, "_sslobj", None)
        if obj is None:  # not connected, or closed (the SSL object is gone)
            return None
        words = self._words.from_address(id(obj))
        if words[2] not in {id(ref) for ref in weakref.getweakrefs(sslsock)}:
            return None
        ptr = words[3]
        if not ptr or self.get_fd(ptr) != sslsock.fileno():
            return None
        return int(ptr)

    def send(self, ptr: int) -> bool | None:
        """One ``SSL_shutdown``: True when the alert is out, None when it waits for
        room in the socket buffer (call again when writable), False on failure."""
        ret = self.shutdown(ptr)
        if ret >= 0:
            return True
        err = self.get_error(ptr, ret)
        self.clear()  # leave no error behind for the next call through ``_ssl``
        return None if err == self.SSL_ERROR_WANT_WRITE else False


#: ``SSL_CTRL_SET_READ_AHEAD`` (``SSL_set_read_ahead`` is a macro over ``SSL_ctrl``)
_SSL_CTRL_SET_READ_AHEAD = 41

_close_notify: _CloseNotify | None = None
_half_close_ready: bool | None = None


def half_close_ready() -> bool:
    """Whether a :class:`DirectTLSConn` can half-close here (probed once): OpenSSL 3
    (a bare TCP FIN must read as EOF, see ``OP_IGNORE_UNEXPECTED_EOF``) and the
    one-call close_notify of :class:`_CloseNotify`."""
    global _close_notify, _half_close_ready
    if _half_close_ready is None:
        _half_close_ready = False
        if ssl.OPENSSL_VERSION_INFO >= (3, 0):
            try:
                helper = _CloseNotify()
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                a, b = socket.socketpair()
                with a, b, ctx.wrap_socket(a, server_hostname="probe",
                                           do_handshake_on_connect=False) as probe:
                    _half_close_ready = helper.pointer(probe) is not None
                _close_notify = helper if _half_close_ready else None
            except (OSError, AttributeError, ValueError, ssl.SSLError):
                _half_close_ready = False
    return _half_close_ready


class DirectTLSConn(TLSConn):
    """TLS driven on the socket itself (OpenSSL reads and writes the fd): no memory
    BIOs, so no copy into and out of them per record and no buffer per read.

    It half-closes like a TCP stream in both directions (a CONNECT tunnel inside TLS
    carries the target's reply after the client has ended its side):

    * the peer's end, close_notify or a bare TCP FIN, reads as EOF and leaves the
      connection able to write (``OP_IGNORE_UNEXPECTED_EOF`` on the context);
    * :meth:`shutdown_write` sends close_notify with one ``SSL_shutdown`` (see
      :class:`_CloseNotify`) and a TCP FIN, and reads go on until the peer's end.

    Where the one-call close_notify is not available (:func:`half_close_ready`), only
    framed streams (relay links, whose end is an EOF frame or a close) take this
    driver, and :meth:`shutdown_write` falls back to Python's double ``SSL_shutdown``,
    which may drop records the peer still has in flight.
    ``KAKEHASHI_FAST_PATH=off`` makes every connection a :class:`TLSConn`.
    """

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        initial: bytes = b"",
        session: ssl.SSLSession | None = None,
    ) -> None:
        if initial:
            raise ValueError("a direct TLS connection reads its first bytes from the socket")
        if not context.options & OP_IGNORE_UNEXPECTED_EOF and ssl.OPENSSL_VERSION_INFO >= (3, 0):
            context.options |= OP_IGNORE_UNEXPECTED_EOF  # (idempotent on shared contexts)
        Conn.__init__(self, sock)
        self._ssl = context.wrap_socket(
            sock, server_side=server_side, server_hostname=server_hostname,
            do_handshake_on_connect=False, suppress_ragged_eofs=True, session=session)
        self.sock = self._ssl  # ``sock`` was detached: the fd now belongs to ``_ssl``
        self._obj = self._ssl._sslobj  # type: ignore[attr-defined]  # the C object
        self._send_lock = asyncio.Lock()
        self._eof = False
        self._write_ended = False
        #: this side's close_notify is out and it writes plain TCP (leaving TLS)
        self._plain_out = False
        #: OpenSSL reads ahead (:meth:`read_ahead`): this stream cannot leave TLS
        self._read_ahead = False
        #: long writes are corked (:data:`TLS_CORK`): a TCP socket, and not turned off
        self._corkable = TLS_CORK and self._ssl.family in (socket.AF_INET, socket.AF_INET6)

    @property
    def ssl_object(self) -> ssl.SSLSocket:  # type: ignore[override]
        return self._ssl

    # -- leaving TLS (the relay's session cipher; STARTTLS in reverse) ---------------
    # Each side sends close_notify at a point both agree on, writes plain TCP after it,
    # and reads TLS records until the peer's close_notify; every byte behind that is
    # plain TCP. OpenSSL reads a record's header and then exactly its body (Python
    # never turns read-ahead on), so the bytes behind the peer's close_notify stay in
    # the kernel for the plain connection (tests/unit/test_leave_tls checks it).

    @property
    def can_leave_tls(self) -> bool:
        """Whether this connection can leave TLS in place (the one-call close_notify of
        :class:`_CloseNotify` is available, and nothing has ended yet)."""
        return (half_close_ready() and not self._closed and not self._write_ended
                and not self._read_ahead)

    @property
    def left_tls_write(self) -> bool:
        return self._plain_out

    async def leave_tls_write(self) -> None:
        """Send close_notify, then write plain TCP (reads stay TLS until the peer's
        close_notify). The caller holds the framing's write lock: nothing is in the
        middle of a frame."""
        async with self._send_lock:
            if self._plain_out:
                return
            if self._write_ended or self._closed:
                raise ConnClosed("connection ended before it could leave TLS")
            helper = _close_notify if half_close_ready() else None
            ptr = helper.pointer(self._ssl) if helper is not None else None
            if helper is None or ptr is None:
                raise ConnClosed("this connection cannot leave TLS (no one-call close_notify)")
            while True:
                sent = helper.send(ptr)
                if sent:
                    break
                if sent is False:
                    raise ConnClosed("close_notify could not be sent")
                await self._wait(readable=False)
            self._plain_out = True
            trace.event("close_notify sent")

    @property
    def tls_ended_by_peer(self) -> bool:
        """The peer's close_notify (or a bare TCP end) was read: nothing more comes
        through TLS."""
        return self._eof and not self._pushback

    def left_tls(self) -> Conn:
        """The plain connection on this socket once both close_notify are through
        (:meth:`leave_tls_write` done, the peer's read). This object gives the socket
        up; the returned :class:`Conn` owns it."""
        if not (self._plain_out and self._eof) or self._closed:
            raise ValueError("TLS has not ended in both directions")
        self.drop_reader()
        fd = self._ssl.detach()  # the SSL object goes; the fd stays open
        self._closed = True  # ownership moved (as in start_tls)
        conn = Conn(socket.socket(fileno=fd))
        conn._pushback, self._pushback = self._pushback, b""
        return conn

    def write_now(self, data: bytes) -> bool | None:
        """One TLS write without waiting, for a small message on the setup path (no
        task, no loop round trip): True when the record is out; False when nothing was
        written (a write in progress, past this side's close_notify, too long for one
        write); None when OpenSSL took part of it and wants *the same write* retried
        (:meth:`send_all` with the same bytes) before any other write."""
        if self._send_lock.locked() or self._plain_out or self._write_ended \
                or self._closed or len(data) > RECV_CHUNK:
            return False
        try:
            self._obj.write(data)  # all of it: no partial writes in this mode
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return None
        return True

    def leave_tls_now(self) -> bool:
        """:meth:`leave_tls_write` without waiting: True when the close_notify is out
        (this side writes plain TCP from here on); False when it could not go out
        at once (nothing is lost: :meth:`leave_tls_write` goes on with it)."""
        if self._send_lock.locked() or self._write_ended or self._closed:
            return False
        if self._plain_out:
            return True
        helper = _close_notify if half_close_ready() else None
        ptr = helper.pointer(self._ssl) if helper is not None else None
        if helper is None or ptr is None or not helper.send(ptr):
            return False
        self._plain_out = True
        trace.event("close_notify sent")
        return True

    async def _send_plain(self, view: memoryview) -> None:
        while view:
            try:
                view = view[socket.socket.send(self._ssl, view):]
            except (BlockingIOError, InterruptedError):
                await self._wait(readable=False)

    async def handshake(self) -> None:
        while True:
            closed = False
            try:
                self._obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                want_read = True
            except ssl.SSLWantWriteError:
                want_read = False
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError):
                closed = True
                want_read = True
            if closed:
                # raised outside the ``except`` block (see TLSConn.handshake)
                raise ConnClosed("connection closed during TLS handshake")
            await self._wait(readable=want_read)
        self.tls_version = self._obj.version()

    def _input_ended(self) -> bool:
        return self._eof  # OpenSSL reads the socket itself: nothing is held back

    def read_ahead(self) -> bool:
        """Let OpenSSL read as much as its buffer takes per ``recv`` (``SSL_set_read_ahead``)
        instead of a record's header and then its body: half the read system calls of a
        bulk stream. Only for a stream read to its end by :meth:`recv_into` alone (the
        pump's :func:`~kakehashi.core.pump.copy_raw`): records read ahead sit in
        OpenSSL's buffer, where a readiness wait does not see them (``recv_into`` takes
        them before it waits), and bytes behind a close_notify would no longer stay in
        the kernel, so such a stream can never leave TLS (:meth:`left_tls`). True when
        it is on (:data:`TLS_READ_AHEAD`, and the ``SSL *`` reachable)."""
        if not TLS_READ_AHEAD or self._closed or self._plain_out:
            return False
        helper = _close_notify if half_close_ready() else None
        ptr = helper.pointer(self._ssl) if helper is not None else None
        if helper is None or ptr is None:
            return False
        helper.ctrl(ptr, _SSL_CTRL_SET_READ_AHEAD, 1, None)
        self._read_ahead = True
        return True

    async def recv_into(self, buf: memoryview | bytearray) -> int:
        """Decrypt into ``buf`` as many records as the socket holds now."""
        if self._pushback:
            return self._take_pushback(buf)
        view = memoryview(buf)
        size = len(view)
        got = 0
        read = self._obj.read
        while got < size and not self._eof:
            try:
                n = read(size - got, view[got:] if got else view)
            except ssl.SSLWantReadError:
                if got:
                    return got
                await self._wait(readable=True)
                continue
            except ssl.SSLWantWriteError:  # a key update waits for room to answer
                if got:
                    return got
                await self._wait(readable=False)
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                n = 0
            if not n:
                self._eof = True
                trace.event("close_notify read")
                break
            got += n
        return got

    async def recv(self, n: int = RECV_CHUNK) -> bytes:
        if self._pushback:
            data, self._pushback = self._pushback[:n], self._pushback[n:]
            return data
        while not self._eof:
            try:
                data = self._obj.read(n)
            except ssl.SSLWantReadError:
                await self._wait(readable=True)
                continue
            except ssl.SSLWantWriteError:
                await self._wait(readable=False)
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                data = b""
            if not data:
                self._eof = True
                trace.event("close_notify read")
            return data
        return b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        write = self._obj.write
        async with self._send_lock:  # OpenSSL wants a retried write to be the same
            if self._plain_out:  # past this side's close_notify (leaving TLS)
                await self._send_plain(view)
                return
            # several records: corked, so they leave in full segments (see TLS_CORK)
            corked = len(view) > TLS_RECORD and self._cork(True)
            try:
                while view:
                    piece = view[:RECV_CHUNK]
                    while True:
                        try:
                            write(piece)  # all of it: no partial writes in this mode
                            break
                        except ssl.SSLWantWriteError:
                            await self._wait(readable=False)
                        except ssl.SSLWantReadError:  # renegotiation: not in TLS 1.3
                            await self._wait(readable=False)
                    view = view[len(piece):]
            finally:
                if corked:  # the tail goes out now, not after the kernel's 200 ms
                    self._cork(False)

    def _cork(self, on: bool) -> bool:
        """Set or clear ``TCP_CORK`` (:data:`TLS_CORK`); False where it is off, the
        socket is not TCP or already closed."""
        if not self._corkable or self._closed:
            return False
        try:
            socket.socket.setsockopt(self._ssl, socket.IPPROTO_TCP, socket.TCP_CORK, on)
        except OSError:  # (closed under us, or a socket that cannot cork)
            self._corkable = False
            return False
        return True

    async def shutdown_write(self) -> None:
        """End this side: close_notify, then a TCP FIN; reading goes on (see the
        class note for where the one-call close_notify is not available)."""
        async with self._send_lock:  # after any write in progress, never inside one
            if self._write_ended or self._closed:
                return
            self._write_ended = True
            if not self._plain_out:  # (past our close_notify a second one would read)
                await self._send_close_notify()
            with contextlib.suppress(OSError):
                socket.socket.shutdown(self._ssl, socket.SHUT_WR)

    async def _send_close_notify(self) -> None:
        helper = _close_notify if half_close_ready() else None
        ptr = helper.pointer(self._ssl) if helper is not None and not self._closed else None
        if helper is None or ptr is None:
            self._drain_plaintext()  # narrows, cannot close, the window of the class note
            with contextlib.suppress(ssl.SSLError, OSError, ValueError):
                self._obj.shutdown()
            return
        while helper.send(ptr) is None:  # the socket buffer is full: wait for room
            try:
                await self._wait(readable=False)
            except ConnClosed:
                return
            if self._closed:
                return

    def cut(self) -> None:
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self._ssl, socket.SHUT_RDWR)


def keep_alive(conn: Conn, interval: float) -> None:
    """TCP keepalive on ``conn``'s socket, probing after ``interval`` seconds of silence
    (three probes): liveness where no message of ours may travel (a relay link under
    the session cipher carries nothing but the terminals' sealed frames)."""
    sock = conn.sock
    secs = max(1, int(interval))
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, secs)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, secs)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


async def start_tls(
    conn: Conn,
    context: ssl.SSLContext,
    *,
    server_side: bool,
    server_hostname: str | None = None,
    initial: bytes = b"",
    timeout: float = 15.0,
    framed: bool = False,
    sessions: SessionCache | None = None,
) -> TLSConn:
    """Upgrade a plain connection in place (the socket is reused, not reopened).

    The fast path, a :class:`DirectTLSConn`, is taken unless bytes were already read
    ahead (only memory BIOs can take those) or ``KAKEHASHI_FAST_PATH=off``. Where it
    cannot half-close (:func:`half_close_ready`), it is taken only for ``framed``
    streams (kakehashi frames: a relay link, which never needs a TLS half-close).

    ``sessions`` (a client's): offer the session kept for this server (its name and
    address) and count the handshake there; the caller keeps the new connection's
    session with :meth:`TLSConn.keep_session` once it has read the server's first
    bytes. The result's ``resumed`` says whether the handshake resumed, either side.
    """
    if not conn.plain:
        raise ValueError("connection is already encrypted")
    if conn.has_pushback:  # bytes read ahead (say behind a CONNECT reply) are TLS records
        initial = conn.take_pushback(conn.pushback_size) + initial
    direct = FAST_PATH and not initial and (framed or half_close_ready())
    # ``asyncio.timeout``, not ``wait_for``: wait_for runs the handshake in a task of
    # its own, and a failed handshake's exception then references that task through
    # its traceback while the task references the exception - a cycle that kept the
    # SSL object and its buffers of every connection that closed early alive until
    # the cyclic garbage collector happened to run (and the heap stayed fragmented).
    deadline = asyncio.get_running_loop().time() + timeout
    async with asyncio.timeout_at(deadline):
        if server_side and not initial:
            # A server allocates no TLS state before the client's first bytes: a
            # flood of connections that open and close silently costs a socket each,
            # not an SSL object with its buffers.
            # (the direct path only peeks: OpenSSL reads them from the socket)
            first = await (_peek(conn, SMALL_CHUNK) if direct else conn.recv(SMALL_CHUNK))
            if not first:
                raise ConnClosed("connection closed before the TLS handshake")
            if not tlsmismatch.is_client_hello(first):
                # a plaintext client on a TLS port: tell it now rather than let it
                # wait for a handshake that will never come
                refuse(conn, tlsmismatch.plaintext_refusal(first))
                raise ConnClosed("the peer does not speak TLS (told it so)")
            if not direct:
                initial = first
    if server_side and initial and not tlsmismatch.is_client_hello(initial):
        refuse(conn, tlsmismatch.plaintext_refusal(initial))
        raise ConnClosed("the peer does not speak TLS (told it so)")
    kind = DirectTLSConn if direct else TLSConn
    key = offered = None
    if sessions is not None and not server_side:
        key = sessions.key(server_hostname, conn.peer)
        offered = sessions.offer(context, key)
    conn.drop_reader()  # the TLS object registers its own
    tls = kind(
        conn.sock, context, server_side=server_side, server_hostname=server_hostname,
        initial=initial, session=offered,
    )
    conn._closed = True  # ownership of the socket moved to ``tls``
    try:
        async with asyncio.timeout_at(deadline):
            await tls.handshake()
    except BaseException:
        tls.close()
        if offered is not None:
            sessions.forget(key, offered)  # type: ignore[union-attr]  # next try: full
        raise
    if sessions is not None and not server_side:
        tls.resumed = sessions.handshake_done(tls.ssl_object, key, offered)
        tls._sessions = (sessions, context, key)
    else:
        tls.resumed = bool(tls.ssl_object.session_reused)
    return tls


async def _peek(conn: Conn, n: int) -> bytes:
    """The first bytes waiting on a plain socket, left there."""
    while True:
        try:
            return conn.sock.recv(n, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            await conn.wait_readable()


def refuse(conn: Conn, reply: bytes) -> None:
    """Answer a peer that speaks the wrong protocol with ``reply`` and close.

    What the peer already sent is read first, so the close is a FIN and the reply
    arrives; closing with unread input would send a reset, which can make the peer's
    kernel throw the reply away before the peer reads it.
    """
    with contextlib.suppress(OSError):
        conn.sock.send(reply)  # a few bytes: they fit in the empty send buffer
        while conn.sock.recv(SMALL_CHUNK):
            pass  # until BlockingIOError (nothing more now) or EOF
    with contextlib.suppress(OSError):
        conn.sock.shutdown(socket.SHUT_WR)
    conn.close()


async def open_tcp(host: str, port: int, *, timeout: float = 10.0) -> Conn:
    """Connect to host:port, trying each resolved address (happy path first)."""
    loop = asyncio.get_running_loop()
    literal = _literal_address(host, port)
    if literal is not None:  # no resolver round trip (a thread hop) for an address
        infos = [literal]
    else:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout
        )
    last: Exception | None = None
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            if not _connect_at_once(sock, addr):
                await asyncio.wait_for(_connect(loop, sock), timeout)
            refuse_self_connect(sock)
            return Conn(sock)
        except (OSError, TimeoutError) as exc:
            sock.close()
            last = exc
    raise ConnectionError(f"cannot connect to {host}:{port}: {last}") from last


def refuse_self_connect(sock: socket.socket) -> None:
    """Raise ECONNREFUSED if a connect reached its own socket.

    A TCP connect to a port of this host where nothing listens, when that port lies
    in the ephemeral range, can be given the same port as its source: the kernel's
    simultaneous open then "connects" the socket to itself and every byte sent comes
    straight back. A gateway would read its own request as the origin's answer (a
    502 "unsupported HTTP version"), an agent would echo a session to its requester.
    Nothing listened there, so the caller is told exactly that.
    """
    if sock.getsockname() == sock.getpeername():
        raise OSError(errno.ECONNREFUSED, "connection refused (the connect reached "
                      "itself: nothing listens there)")


def _connect_at_once(sock: socket.socket, addr: tuple) -> bool:
    """Start a non-blocking connect; True if it is already established.

    ``loop.sock_connect`` resolves the address again (in uvloop through the thread
    pool even for a literal IP): a third of a millisecond on every session setup. A
    loopback or LAN handshake has often finished by the time ``connect`` returns
    EINPROGRESS; then no readiness wait (a registration and a loop round trip) is
    needed, which is what an agent pays on every session it accepts.
    """
    err = sock.connect_ex(addr)
    if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
        try:
            sock.getpeername()
        except OSError:
            return False  # still in progress (or failed: SO_ERROR says after the wait)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))
    return True


async def _connect(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Wait for a connect that :func:`_connect_at_once` started to finish."""
    await _wait_fd(loop, sock.fileno(), readable=False)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def _literal_address(host: str, port: int) -> tuple | None:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return (family, socket.SOCK_STREAM, 0, "", (host, port))
    return None


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """Parse ``host:port``, ``[v6]:port`` or ``host`` (with a default port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port_s = text.split(":")
    else:
        host, port_s = text, ""
    if not port_s:
        if default_port is None:
            raise ValueError(f"{text!r}: expected HOST:PORT")
        return host or "127.0.0.1", default_port
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"{text!r}: port must be a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{text!r}: port out of range")
    return host or "0.0.0.0", port


#: connections a listener accepts per wake-up at most (then other callbacks run)
ACCEPT_BATCH = 64


class Held:
    """A connection that its handler serves from readiness callbacks, without a task
    (see :meth:`Listener.__init__`'s ``start_now``).

    The handler calls :meth:`end` once it is done with the connection (the listener
    closes it and counts it out) or :meth:`to_task` to go on by coroutine, and sets
    :attr:`abort`: what ends it at once when the listener closes.
    """

    __slots__ = ("abort", "conn", "listener", "peer")

    def __init__(self, listener: Listener, conn: Conn, peer: str) -> None:
        self.listener = listener
        self.conn = conn
        self.peer = peer
        self.abort: Callable[[], None] | None = None

    @property
    def active(self) -> bool:
        """Still served from callbacks (not ended, not moved to a task)."""
        return self in self.listener.held

    def end(self) -> None:
        self.listener._end_held(self)

    def to_task(self, work: Awaitable[None]) -> None:
        """Go on serving the connection by coroutine, in a task of the listener's."""
        self.listener._to_task(self, work)


#: a handler's way to take a new connection without a task: returns the coroutine to
#: run as the connection's task, or None when it serves the connection from
#: callbacks (it then ends the :class:`Held` it was given)
StartNow = Callable[[Conn, Held], "Awaitable[None] | None"]


class Listener:
    """A TCP accept loop handing each connection to ``handler`` in its own task.

    ``max_connections`` (0: no limit) stops accepting while that many are being
    served, so a flood waits in the kernel's backlog instead of exhausting file
    descriptors and memory; ``max_per_client`` (0: no limit) closes a new
    connection at once when its address already has that many, so one client
    cannot take every slot.

    A handler with a ``start_now`` attribute (a :data:`StartNow`) is offered each
    connection from a callback, instead of a task: a connection served entirely from
    readiness callbacks then costs no task (with one request per connection the
    task, its steps and the coroutine frames it resumes were a measurable part of
    each connection's cost). It counts against the limits like any other.
    """

    def __init__(
        self,
        host: str,
        port: int,
        handler: Callable[[Conn], Awaitable[None]],
        *,
        backlog: int = 4096,
        max_connections: int = 0,
        max_per_client: int = 0,
    ) -> None:
        self.handler = handler
        self.start_now: StartNow | None = getattr(handler, "start_now", None)
        #: connections served from callbacks (no task), by their Held
        self.held: set[Held] = set()
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.per_client: dict[str, int] = {}
        self.refused = 0  # connections closed by max_per_client
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, type_, proto, _, addr = infos[0]
        sock = socket.socket(family, type_, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        #: what each accepted socket needs (see _accept_one): the options it inherits
        #: are set here once, the rest per connection
        self._inet = family in (socket.AF_INET, socket.AF_INET6)
        self._nodelay_each = self._inet
        if self._inet and NODELAY_INHERITED:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._nodelay_each = False
        self._family, self._type, self._proto = int(family), int(type_), int(proto)
        sock.bind(addr)
        sock.listen(backlog)
        sock.setblocking(False)
        self.sock = sock
        self.tasks: set[asyncio.Task[None]] = set()
        self._accepting = False  # the listening socket is registered with the loop
        self._closing = False

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._resume_accepting()

    # Accepting runs from a readiness callback registered once, taking every
    # connection the backlog holds (up to ACCEPT_BATCH) per wake-up: awaiting
    # sock_accept for each connection registered and unregistered the listening
    # socket with the loop every time (a libuv handle and half a dozen epoll_ctl
    # calls per connection, measured with one request per connection).
    def _resume_accepting(self) -> None:
        if self._accepting or self._closing:
            return
        if self.max_connections and self.active >= self.max_connections:
            return  # _done resumes when a slot frees; the backlog holds the rest
        self._loop.add_reader(self.sock.fileno(), self._on_acceptable)
        self._accepting = True

    def _pause_accepting(self) -> None:
        if self._accepting:
            self._accepting = False
            self._loop.remove_reader(self.sock.fileno())

    def _on_acceptable(self) -> None:
        loop = self._loop
        for _ in range(ACCEPT_BATCH):
            if self.max_connections and self.active >= self.max_connections:
                self._pause_accepting()
                return
            try:
                client, addr = self._accept_one()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: back off, keep serving
                self._pause_accepting()
                if self.sock.fileno() >= 0:
                    loop.call_later(0.1 if exc.errno else 0, self._resume_accepting)
                return
            peer = str(addr[0]) if isinstance(addr, tuple) else ""
            if self.max_per_client and self.per_client.get(peer, 0) >= self.max_per_client:
                self.refused += 1
                client.close()
                continue
            self.per_client[peer] = self.per_client.get(peer, 0) + 1
            conn = Conn(client, accepted=addr, loop=loop)
            if self.start_now is None:
                self._start_task(self._run(conn, peer))
                continue
            held = Held(self, conn, peer)
            self.held.add(held)  # (before the start: it may end or move on at once)
            # offered at the end of this loop pass, as a task would start: the
            # client's first bytes, sent right after its connect, are there by then
            loop.call_soon(self._offer, held)

    def _offer(self, held: Held) -> None:
        """Offer a new connection to the handler's ``start_now``."""
        if held not in self.held:  # (the listener closed meanwhile)
            return
        assert self.start_now is not None
        try:
            work = self.start_now(held.conn, held)
        except Exception:  # a bug must cost one connection, not the listener
            log.exception("connection from %s failed at its start", held.peer)
            self._end_held(held)
            return
        if work is not None:
            held.abort = None
            self.held.discard(held)
            self._start_task(self._run_work(held.conn, held.peer, work))

    @property
    def active(self) -> int:
        """Connections being served (with a task or from callbacks)."""
        return len(self.tasks) + len(self.held)

    def _start_task(self, work: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _end_held(self, held: Held) -> None:
        held.abort = None  # (it refers back to its handler's state: no cycle left)
        if held in self.held:
            self.held.discard(held)
            self._count_out(held.conn, held.peer)
            if not self._accepting:
                self._resume_accepting()

    def _to_task(self, held: Held, work: Awaitable[None]) -> None:
        held.abort = None  # (the task is cancelled instead)
        if held not in self.held:  # ended meanwhile (the listener closed)
            if isinstance(work, Coroutine):
                work.close()
            return
        self.held.discard(held)  # (the task holds the slot from here)
        self._start_task(self._run_work(held.conn, held.peer, work))

    def _accept_one(self) -> tuple[socket.socket, Any]:
        """``socket.accept`` without its per-call lookups (the listener's family and
        type converted to enums each time), made non-blocking and tuned: the
        options a listener's connections do not inherit, and TCP_NODELAY only where
        they do not inherit it (see NODELAY_INHERITED)."""
        fd, addr = self.sock._accept()  # type: ignore[attr-defined]
        client = socket.socket(self._family, self._type, self._proto, fileno=fd)
        try:
            client.setblocking(False)
            if self._nodelay_each:
                with contextlib.suppress(OSError):
                    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            client.close()
            raise
        return client, addr

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not self._accepting:
            self._resume_accepting()

    async def _run(self, conn: Conn, peer: str) -> None:
        try:
            await self.handler(conn)
        finally:
            self._count_out(conn, peer)

    async def _run_work(self, conn: Conn, peer: str, work: Awaitable[None]) -> None:
        try:
            await work
        finally:
            self._count_out(conn, peer)

    def _count_out(self, conn: Conn, peer: str) -> None:
        """A connection is over: closed, and its client's count goes down."""
        conn.close()
        left = self.per_client.get(peer, 1) - 1
        if left > 0:
            self.per_client[peer] = left
        else:
            self.per_client.pop(peer, None)

    async def close(self) -> None:
        self._closing = True
        self._pause_accepting()
        self.sock.close()
        for held in list(self.held):
            if held.abort is not None:
                held.abort()
            held.end()  # (if its abort did not)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


class WriteLock(asyncio.Lock):
    """The lock that keeps whole frames whole on one connection, which can also be
    taken without waiting (:meth:`FramedConn.send_now`)."""

    def try_acquire(self) -> bool:
        """Take the lock now if nobody holds it or waits for it. (A waiter that
        ``release`` woke but that has not run yet owns the next turn: asyncio.Lock
        keeps its waiters in ``_waiters``.)"""
        if self.locked() or self._waiters:
            return False
        self._locked = True
        return True


class FramedConn:
    """A connection carrying kakehashi frames, parsed by :class:`wire.FrameDecoder`.

    This class only moves bytes from the socket into the decoder (``decoder``);
    every header and preamble check is the decoder's. Reads are buffered during the
    control phase; when the pump splices payloads the header is read with exact-size
    receives so payload bytes stay in the kernel (the pump reports them with
    :meth:`spliced`). Writes of whole frames are serialised by ``write_lock``
    because the pump and the control logic both write to the same connection.
    """

    def __init__(self, conn: Conn, limits: wire.Limits = wire.DEFAULT_LIMITS) -> None:
        self.conn = conn
        self.decoder = wire.FrameDecoder(limits)
        self.write_lock = WriteLock()
        #: the task sending the rest of a frame :meth:`send_now` wrote only in part
        self._rest: asyncio.Task[None] | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.last_rx = asyncio.get_running_loop().time()
        self._stalls = 0

    @property
    def limits(self) -> wire.Limits:
        return self.decoder.limits

    @property
    def stalled(self) -> bool:
        """Someone waits for the *other side* of a transfer through this connection
        (backpressure), so silence from it is not a dead peer: its reader delivering
        to a slow consumer, or a frame waiting for the peer to take it."""
        return self._stalls > 0

    @contextlib.contextmanager
    def stalling(self) -> Iterator[None]:
        """Mark a wait on backpressure; nested and concurrent marks add up, and the
        end of each counts as a sign of life (the transfer moved)."""
        self._stalls += 1
        try:
            yield
        finally:
            self._stalls -= 1
            self.last_rx = self.conn.loop.time()

    @property
    def buffered(self) -> int:
        return self.decoder.buffered

    def take_buffer(self) -> bytes:
        return self.decoder.take_buffer()

    def received(self, data: bytes) -> None:
        """Bytes read from the socket by someone else (the relay's readable callback)."""
        self.decoder.feed(data)
        self.last_rx = self.conn.loop.time()

    async def _fill(self, need: int, *, exact: bool) -> bool:
        """Ensure ``need`` bytes are buffered; False on clean EOF before any of them."""
        decoder = self.decoder
        while (have := decoder.buffered) < need:
            missing = need - have
            if exact and self.conn.plain:
                chunk = await self.conn.recv(missing)
            else:
                chunk = await self.conn.recv(min(max(missing, SMALL_CHUNK), RECV_CHUNK))
            if not chunk:
                if decoder.buffered:
                    raise ConnClosed("connection closed in the middle of a frame")
                return False
            decoder.feed(chunk)
            self.last_rx = self.conn.loop.time()
        return True

    async def read_preamble(self) -> None:
        self.decoder.expect_preamble()
        # an exact read: what follows the preamble may be for another reader (TLS)
        if not await self._fill(len(wire.PREAMBLE), exact=True):
            raise ConnClosed("connection closed before the preamble")
        self.decoder.read_preamble()  # four bytes: consumed, or WireError

    async def read_header(self, *, exact: bool = False) -> tuple[wire.FrameType, int] | None:
        """Read and check one frame header; None on clean EOF between frames."""
        if not await self._fill(wire.HEADER_SIZE, exact=exact):
            return None
        header = self.decoder.next_header()
        assert header is not None
        self.bytes_in += wire.HEADER_SIZE + header[1]
        return header

    async def read_payload(self, length: int) -> bytes:
        if not await self._fill(length, exact=False) and length:
            raise ConnClosed("connection closed in the middle of a frame")
        return self.decoder.take_payload(length)

    async def read_payload_into(self, view: memoryview) -> int:
        """Up to ``len(view)`` bytes of the current frame's payload into ``view``:
        what the decoder already holds first, then straight from the connection
        (a TLS connection decrypts into ``view``), so a bulk payload is not copied
        through the decoder's buffer. ConnClosed if the stream ends inside the frame.
        """
        decoder = self.decoder
        n = min(len(view), decoder.payload_left)
        if not n:
            return 0
        if decoder.buffered:
            data = decoder.take_payload(n)
            view[: len(data)] = data
            return len(data)
        got = await self.conn.recv_into(view[:n])
        if not got:
            raise ConnClosed("connection closed in the middle of a frame")
        decoder.skip(got)  # the header was checked; its payload bypassed the decoder
        self.last_rx = self.conn.loop.time()
        return got

    def take_buffered_payload(self, length: int) -> bytes:
        """Payload bytes already read into user space (before switching to splice)."""
        return self.decoder.take_payload(length)

    def spliced(self, n: int) -> None:
        """``n`` payload bytes of the current frame went from the socket by splice."""
        self.decoder.skip(n)

    async def read_frame(self) -> wire.Frame | None:
        header = await self.read_header()
        if header is None:
            return None
        ftype, length = header
        return wire.Frame(ftype, await self.read_payload(length))

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        async with self.write_lock:
            await self.conn.send_all(data)
            self.bytes_out += len(data)

    def send_now(self, data: bytes, rest_timeout: float) -> bool:
        """Send ``data`` (whole frames) at once if nobody else is writing: True when
        it is out or on its way, False when nothing was written (the caller queues it).

        A small control message almost always fits in the socket buffer, so the
        caller saves a task and a loop round trip. When the socket takes only part of
        it, the write lock stays taken and a task sends the rest (within
        ``rest_timeout``, else the connection is cut: a frame cut short leaves the
        stream unusable). Everything written after a partial write - a data frame
        the pump forwards, the next message - queues behind it on the lock, so
        nothing lands inside the frame. Plain sockets and TLS driven on the socket
        (:class:`DirectTLSConn`, whose interrupted write the task retries whole, as
        OpenSSL wants) qualify; TLS through memory BIOs does not.
        """
        lock = self.write_lock
        conn = self.conn
        if not (conn.plain or isinstance(conn, DirectTLSConn)) or conn.closed \
                or not lock.try_acquire():
            return False
        if isinstance(conn, DirectTLSConn):
            done = conn.write_now(data)
            if done is None:  # in part: the same write again, the lock held meanwhile
                self._rest = asyncio.create_task(self._send_rest(memoryview(data),
                                                                 rest_timeout))
                return True
            lock.release()
            if done:
                self.bytes_out += len(data)
            return done
        try:
            sent = self.conn.sock.send(data)
        except OSError:  # (BlockingIOError included) the queued send meets it again
            sent = 0
        if sent == len(data) or not sent:
            lock.release()
            self.bytes_out += sent
            return bool(sent)
        self.bytes_out += sent
        self._rest = asyncio.create_task(self._send_rest(memoryview(data)[sent:],
                                                         rest_timeout))
        return True

    async def _send_rest(self, rest: memoryview, timeout: float) -> None:
        """The rest of a partial :meth:`send_now`, with the write lock held."""
        try:
            async with asyncio.timeout(timeout):
                await self.conn.send_all(rest)
            self.bytes_out += len(rest)
        except (OSError, ConnClosed, TimeoutError):
            self.conn.cut()  # the reader sees the end, and its cleanup closes the link
        finally:
            self.write_lock.release()

    async def flushed(self) -> None:
        """Wait until what :meth:`send_now` accepted has been written (or failed)."""
        rest = self._rest
        if rest is not None and not rest.done():
            await asyncio.shield(rest)

    def leave_tls_now(self) -> bool:
        """Send close_notify now if nobody is writing (:meth:`DirectTLSConn.leave_tls_now`):
        True when it is out; False leaves it to :meth:`DirectTLSConn.leave_tls_write`."""
        conn = self.conn
        if not isinstance(conn, DirectTLSConn) or not self.write_lock.try_acquire():
            return False
        try:
            return conn.leave_tls_now()
        finally:
            self.write_lock.release()

    async def send_frame(self, ftype: wire.FrameType, payload: bytes = b"") -> None:
        await self.send(wire.encode_header(ftype, len(payload)) + payload)


class FdConn(Conn):
    """Standard input/output (or any two fds) as a connection, for ProxyCommand use.

    Always takes the buffered path of the pump (stdin may be a tty, a pipe or a file).
    A pipe or a tty cannot be peeked at (``MSG_PEEK`` is for sockets), so
    :meth:`peek_now` reads what has arrived into the pushback, which every read takes
    first; an end of input met there is kept and reported after those bytes.
    """

    plain = False
    #: :meth:`peek_now` read the end of the input: :meth:`recv_into` reports it (once,
    #: as the fd did) when the pushback is empty
    _eof_read = False

    def __init__(self, rfd: int, wfd: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.rfd, self.wfd = rfd, wfd
        self._closed = False
        self.peer = None
        self.tls_version = None
        self._pushback = b""
        self.sock = None  # type: ignore[assignment]
        self._saved = {}
        for fd in {rfd, wfd}:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                self._saved[fd] = os.get_blocking(fd)
                os.set_blocking(fd, False)

    @property
    def encrypted(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.rfd

    async def recv_into(self, buf: memoryview | bytearray) -> int:
        """What :meth:`peek_now` read ahead first, then the end it met, then the fd."""
        if self._pushback:
            return self._take_pushback(buf)
        if self._eof_read:
            self._eof_read = False
            return 0
        while True:
            try:
                return os.readv(self.rfd, [buf])
            except BlockingIOError:
                await _wait_fd(self.loop, self.rfd, readable=True)

    recv = Conn._recv_via_buffer

    def peek_now(self, n: int) -> bytes:
        """Up to ``n`` bytes that have arrived, without waiting: read into the pushback
        (a pipe or a tty has no ``MSG_PEEK``), so they are still the stream's next bytes
        whether or not :meth:`skip_now` drops some; a second call shows the same bytes
        and whatever came since. b"" when nothing has arrived or the input has ended."""
        if self._closed:
            return b""
        while len(self._pushback) < n and not self._eof_read:
            try:
                data = os.read(self.rfd, n - len(self._pushback))
            except OSError:  # BlockingIOError included: nothing more yet; an error
                break        # recurs on the next read, which reports it
            if not data:
                self._eof_read = True
                break
            self._pushback += data
        return self._pushback[:n]

    def skip_now(self, n: int) -> None:
        """Drop the first ``n`` bytes that :meth:`peek_now` showed (they went early)."""
        if n > len(self._pushback):
            raise ConnClosed("asked to skip more bytes than were shown")
        self._pushback = self._pushback[n:]

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.wfd, view):]
            except BlockingIOError:
                await _wait_fd(self.loop, self.wfd, readable=False)

    async def shutdown_write(self) -> None:
        if self.wfd >= 0:
            with contextlib.suppress(OSError):
                os.set_blocking(self.wfd, self._saved.pop(self.wfd, True))
                os.close(self.wfd)
            self.wfd = -1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd, blocking in self._saved.items():
            with contextlib.suppress(OSError):
                os.set_blocking(fd, blocking)

    def abort(self) -> None:
        self.close()

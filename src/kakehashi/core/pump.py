"""The byte pump: the only place in kakehashi that copies bytes between sockets.

Legs (one direction each):

* :func:`copy_raw` - plain stream to plain stream (gateway tunnels, local forwards);
* :func:`raw_to_frames` - an application socket into DATA frames (agent side);
* :func:`forward_frames` - frames from a kakehashi connection into a sink: a
  :class:`RawSink` (agent side, back to the application) or a :class:`FramedSink`
  (the relay, to the paired connection, payload unchanged).

When both ends are plain sockets on Linux the payload moves with ``os.splice``
through a pipe (kernel to kernel, Python never sees the bytes). Otherwise (TLS,
end-to-end sealing, other platforms) a preallocated buffer is used. Memory is
bounded: at most one pipe (<= 1 MiB, in the kernel) or one buffer per leg - a sealed
leg two (plaintext and sealed, each up to :data:`SEALED_CHUNK` once the stream is
busy, 16 KiB before) - and a slow reader stops the writer (backpressure through TCP),
never a growing queue.
Half-close is honoured: EOF one way does not end the other way.

Every leg gives the event loop a turn after :data:`FAIR_SLICE` bytes (:class:`Slice`):
a read that finds data and a write that finds room do not suspend, so a busy leg
would otherwise keep the process to itself for as long as its peer keeps up, and the
other sessions in the process (an interactive echo beside bulk) wait that long.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from kakehashi.core import trace, wire
from kakehashi.core.stream import (
    RECV_CHUNK,
    SMALL_CHUNK,
    Conn,
    ConnClosed,
    DirectTLSConn,
    FramedConn,
)

F_SETPIPE_SZ = 1031
F_GETPIPE_SZ = 1032
PIPE_SIZE = 1 << 20
SPLICE_AVAILABLE = sys.platform == "linux" and hasattr(os, "splice")
_SPLICE_FLAGS = (getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2))

#: Set KAKEHASHI_NO_SPLICE=1 to force the buffered path (benchmarks, debugging).
SPLICE_ENABLED = SPLICE_AVAILABLE and os.environ.get("KAKEHASHI_NO_SPLICE") != "1"
#: an application stream is copied until one read fills this much, then spliced
SPLICE_AFTER = SMALL_CHUNK
#: the payload of a sealed frame once the stream proved busy (a read filled the first,
#: small buffer): as large as the wire allows. What a sealed leg costs per frame
#: (Python, a wake-up, a seal, a send; the relay's header and splices) outweighs the
#: cache misses of a large buffer by far: e2e over plaintext hops measured 3.3-4.0
#: CPU s/GB over three processes with 256 KiB frames, 5.2 with 64 KiB, 2.3-2.6 with
#: 1 MiB (issue 12).
SEALED_CHUNK = wire.DEFAULT_LIMITS.max_data

#: the bytes a leg moves before it lets the loop run the other tasks
#: (``asyncio.sleep(0)``, 3.5 microseconds under uvloop; a bulk chunk of
#: RECV_CHUNK, a spliced pipe or a sealed frame each end a slice). A read that finds data
#: waiting and a write that finds room return without suspending, so under load (the
#: peer keeps up) a leg could move a whole 64 MiB transfer in one step of its task: an
#: echo beside 8 bulk sessions in the same relay waited 0.3-1.4 s (issue 12). An echo
#: still waits for every busy leg of the process to run one slice, so the slice bounds
#: that wait: relay over TLS hops, 8 bulk sessions and an echo, echo p50/p99 about
#: 80/190 ms with 1 MiB, 35/90 ms with 256 KiB, no better with 64 KiB and less bulk.
#: KAKEHASHI_FAIR_SLICE=<bytes> sets it, 0 lets legs run until they wait.
FAIR_SLICE = int(os.environ.get("KAKEHASHI_FAIR_SLICE") or RECV_CHUNK) or RECV_CHUNK
FAIR_ENABLED = os.environ.get("KAKEHASHI_FAIR_SLICE") != "0"


class Slice:
    """A leg's budget of bytes between two turns it gives the loop.

    ``spent(n)`` says whether the budget ran out; the leg then awaits :meth:`yield_`
    (kept out of the hot path: no coroutine per chunk).
    """

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = FAIR_SLICE

    def spent(self, n: int) -> bool:
        self.left -= n
        if self.left > 0:
            return False
        self.left = FAIR_SLICE
        return FAIR_ENABLED

    @staticmethod
    async def yield_() -> None:
        await asyncio.sleep(0)


class Pipe:
    """A kernel pipe used as the splice buffer of one leg."""

    def __init__(self, size: int = PIPE_SIZE) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.w, F_SETPIPE_SZ, size)
        except OSError:
            pass  # unprivileged limit: keep the default size
        self.size = fcntl.fcntl(self.w, F_GETPIPE_SZ)

    def close(self) -> None:
        """Close both ends and forget their numbers: a splice still under way in a leg
        that held this pipe across an await (a sink closed meanwhile) then fails with
        EBADF instead of moving bytes into whatever pipe or socket reuses the numbers."""
        fds, self.r, self.w = (self.r, self.w), -1, -1
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


def can_splice(*conns: Conn) -> bool:
    return SPLICE_ENABLED and all(c.plain and not c.has_pushback for c in conns)


async def _bounded(wait: Awaitable[object], idle: float | None) -> None:
    """One wait for a socket, at most ``idle`` seconds (TimeoutError) when given."""
    if idle is None:
        await wait
    else:
        await asyncio.wait_for(wait, idle)


async def splice_in(src: Conn, pipe: Pipe, n: int, idle: float | None = None) -> int:
    """Move up to ``n`` bytes from ``src`` into an empty pipe; 0 means EOF."""
    while True:
        try:
            return os.splice(src.fileno(), pipe.w, n, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            await _bounded(src.wait_readable(), idle)


async def splice_out(pipe: Pipe, dst: Conn, n: int, idle: float | None = None) -> None:
    """Drain exactly ``n`` bytes from the pipe into ``dst``."""
    while n:
        try:
            n -= os.splice(pipe.r, dst.fileno(), n, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            await _bounded(dst.wait_writable(), idle)


async def _send_header(dst: Conn, header: bytes) -> None:
    """Send a frame header without a loop round trip when the socket has room.

    No MSG_MORE here: a corked header followed by a splice can sit in the kernel for
    the 200 ms cork timer, which is what a small interactive frame cannot afford.
    """
    if dst.plain:
        try:
            sent = dst.sock.send(header)
        except BlockingIOError:
            sent = 0
        if sent < len(header):
            await dst.send_all(header[sent:])
    else:
        await dst.send_all(header)


@dataclass
class Transfer:
    """Bytes moved by one leg (for logs, metrics and the session record)."""

    bytes: int = 0


async def copy_raw(src: Conn, dst: Conn, counter: Transfer | None = None) -> int:
    """Copy ``src`` to ``dst`` until EOF, then half-close ``dst``."""
    counter = counter or Transfer()
    fair = Slice()
    if can_splice(src, dst):
        pipe = Pipe()
        try:
            while n := await splice_in(src, pipe, pipe.size):
                await splice_out(pipe, dst, n)
                counter.bytes += n
                if fair.spent(n):
                    await fair.yield_()
        finally:
            pipe.close()
    else:
        # small until the stream proves busy: an idle interactive connection (an SSH
        # session held open for hours) then costs 16 KiB per direction, not 256 KiB
        size = SMALL_CHUNK
        view = memoryview(bytearray(size))
        while n := await src.recv_into(view):
            await dst.send_all(view[:n])
            counter.bytes += n
            if fair.spent(n):
                await fair.yield_()
            if n == size < RECV_CHUNK:  # the buffer was filled: a bulk transfer
                size = RECV_CHUNK
                view = memoryview(bytearray(size))
                if isinstance(src, DirectTLSConn):  # read to its end here, by recv_into
                    src.read_ahead()
    await dst.shutdown_write()
    return counter.bytes


async def copy_length(src: Conn, dst: Conn, n: int, counter: Transfer | None = None, *,
                      idle: float | None = None) -> int:
    """Copy exactly ``n`` bytes (a Content-Length body); ConnClosed if ``src`` ends early.

    ``idle``: the longest wait for either side (TimeoutError), so a stalled sender or
    a receiver that stopped reading cannot hold both connections forever, while a
    slow but steady body of any size still gets through.
    """
    counter = counter or Transfer()
    fair = Slice()
    left = n
    if can_splice(src, dst):
        pipe = Pipe()
        try:
            while left:
                got = await splice_in(src, pipe, min(left, pipe.size), idle)
                if not got:
                    raise ConnClosed(f"peer closed with {left} of {n} bytes missing")
                await splice_out(pipe, dst, got, idle)
                left -= got
                counter.bytes += got
                if fair.spent(got):
                    await fair.yield_()
        finally:
            pipe.close()
        return n
    buf = bytearray(min(RECV_CHUNK, max(n, 1)))
    view = memoryview(buf)
    while left:
        got = await _recv_bounded(src, view[: min(left, len(buf))], idle)
        if not got:
            raise ConnClosed(f"peer closed with {left} of {n} bytes missing")
        await _bounded(dst.send_all(view[:got]), idle)
        left -= got
        counter.bytes += got
        if fair.spent(got):
            await fair.yield_()
    return n


async def _recv_bounded(src: Conn, view: memoryview, idle: float | None) -> int:
    if idle is None:
        return await src.recv_into(view)
    return await asyncio.wait_for(src.recv_into(view), idle)


async def copy_until_eof(src: Conn, dst: Conn, counter: Transfer | None = None, *,
                         idle: float | None = None) -> int:
    """Copy until ``src`` ends, without half-closing ``dst`` (a close-delimited body);
    ``idle`` as for :func:`copy_length`."""
    counter = counter or Transfer()
    fair = Slice()
    buf = bytearray(RECV_CHUNK)
    view = memoryview(buf)
    while got := await _recv_bounded(src, view, idle):
        await _bounded(dst.send_all(view[:got]), idle)
        counter.bytes += got
        if fair.spent(got):
            await fair.yield_()
    return counter.bytes


async def pump_raw(a: Conn, b: Conn, ab: Transfer | None = None,
                   ba: Transfer | None = None) -> tuple[int, int]:
    """Both directions between two plain streams until both have ended. The bytes
    moved each way are also counted in ``ab``/``ba`` when given, so a caller still
    knows them when a side fails (a reset) and this raises."""
    ab, ba = ab or Transfer(), ba or Transfer()
    tasks = [
        asyncio.ensure_future(copy_raw(a, b, ab)),
        asyncio.ensure_future(copy_raw(b, a, ba)),
    ]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        await asyncio.gather(*pending)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return ab.bytes, ba.bytes


class Sealing(Protocol):
    """End-to-end sealing of DATA payloads (``crypto.E2ESession``): one sealed message
    per frame, opened only whole, into buffers the pump reuses."""

    overhead: int

    def seal_into(self, plaintext: memoryview, out: memoryview) -> None: ...

    def open_into(self, ciphertext: memoryview, out: memoryview) -> None: ...

    def seal(self, plaintext: bytes, *, aad: bytes = b"") -> bytes: ...

    def open(self, ciphertext: bytes, *, aad: bytes = b"") -> bytes: ...


#: associated data of a sealed end of stream: an empty message bound to its type, so
#: a sealed DATA payload cannot pass for the end nor the end for data, and the
#: per-direction counter binds it to its place (nothing may follow it)
SEALED_END_AAD = b"kakehashi: end of stream"


def seal_end(sealing: Sealing) -> bytes:
    """The body of an authenticated EOF frame (:data:`wire.SEALED_EOF_SIZE` bytes)."""
    return sealing.seal(b"", aad=SEALED_END_AAD)


class UnsealedEnd(wire.WireError):
    def __init__(self) -> None:
        super().__init__("unsealed-end", "the end of a sealed stream was not authenticated "
                                         "(truncated or forged)")


#: associated data of a sealed close with a reason (:func:`seal_close`): distinct from
#: the end's, so a terminal that predates it fails the check (an abort) rather than
#: taking the close for a clean end
SEALED_CLOSE_AAD = b"kakehashi: session closed with a reason"

class PeerClosed(wire.WireError):
    """The peer closed a sealed stream with a reason (:func:`seal_close`), authenticated
    like its data: the stream carried nothing it did not mean to, and this is why."""

    def __init__(self, reason: str) -> None:
        super().__init__("peer-closed", reason)
        self.reason = reason


def seal_close(sealing: Sealing, reason: str) -> bytes:
    """The body of an authenticated EOF frame that closes the stream for ``reason``
    instead of ending it (a relay session whose target could not reach its service
    after it accepted: the reason reaches the requester as a refusal's would)."""
    text = reason.encode()[:wire.CLOSE_REASON_MAX] or b"closed"
    return sealing.seal(text, aad=SEALED_CLOSE_AAD)


def open_end(sealing: Sealing, body: bytes) -> None:
    """Check an EOF frame's ``body`` against :func:`seal_end`: UnsealedEnd if it is
    missing or not empty, :class:`PeerClosed` if it is a valid :func:`seal_close`,
    ``crypto.E2EError`` if it fails authentication."""
    if not body:
        raise UnsealedEnd()
    try:
        opened = sealing.open(body, aad=SEALED_END_AAD)
    except Exception as not_an_end:
        try:  # a failed open does not advance the counter: try the close's binding
            why = sealing.open(body, aad=SEALED_CLOSE_AAD)
        except Exception:
            raise not_an_end from None
        raise PeerClosed(why.decode(errors="replace") or "closed") from None
    if opened:
        raise UnsealedEnd()


async def raw_to_frames(
    src: Conn,
    dst: FramedConn,
    *,
    sealing: Sealing | None = None,
    max_data: int = wire.DEFAULT_LIMITS.max_data,
    counter: Transfer | None = None,
    end_sealed: bool = False,
) -> int:
    """Read an application stream and send it as DATA frames, then an EOF frame
    (``end_sealed``: one that carries :func:`seal_end`, for streams whose hops have no
    integrity of their own).

    Cancelling this (the session ended while the application was still sending)
    never leaves half a frame on ``dst``: the frame being written is finished
    first, so the link's next message (the release) is read as a message.
    """
    counter = counter or Transfer()
    # Reads are copied (the header in front of the payload in one buffer, sealed
    # straight into it: one write per frame, no allocation per frame) until one fills
    # the buffer; a splice-capable stream then moves the rest through a pipe, a sealed
    # one moves to buffers of SEALED_CHUNK. Small interactive writes (a session's first
    # bytes) so cost one recv and one send, not a pipe's creation, a splice in, a
    # header and a splice out - and the peer gets header and payload in one segment,
    # so it reads the frame in one go too; an idle sealed session holds small buffers.
    splice = sealing is None and can_splice(src, dst.conn)
    overhead = sealing.overhead if sealing else 0
    room = min(SPLICE_AFTER if splice or sealing else RECV_CHUNK, max_data - overhead)
    grow_to = min(SEALED_CHUNK, max_data - overhead) if sealing else room
    buf, plain = _frame_buffers(room, sealing)
    fair = Slice()
    while n := await src.recv_into(plain):
        trace.event("app read")
        size = n + overhead
        if sealing:
            sealing.seal_into(plain[:n], buf[wire.HEADER_SIZE: wire.HEADER_SIZE + size])
        buf[: wire.HEADER_SIZE] = wire.encode_header(wire.FrameType.DATA, size)
        frame = buf[: wire.HEADER_SIZE + size]
        async with dst.write_lock:
            sent = _send_at_once(dst, frame)
            if sent < len(frame):
                await _whole_frame(dst, _send_frame_bytes(dst, frame[sent:]))
        counter.bytes += n
        if fair.spent(n):
            await fair.yield_()  # outside the write lock: the link's other writers go
        if n == room:
            if splice:
                break  # a bulk stream: splice from here on
            if grow_to > room:  # a bulk sealed stream: long frames from here on
                room = grow_to
                buf, plain = _frame_buffers(room, sealing)
    else:
        splice = False  # the stream ended
    if splice:
        pipe = Pipe()
        chunk = min(pipe.size, max_data)
        try:
            while n := await splice_in(src, pipe, chunk):
                async with dst.write_lock:
                    await _whole_frame(dst, _splice_frame(dst, pipe, n))
                counter.bytes += n
                if fair.spent(n):
                    await fair.yield_()
        finally:
            pipe.close()
    body = seal_end(sealing) if end_sealed and sealing is not None else b""
    await dst.send_frame(wire.FrameType.EOF, body)
    return counter.bytes


def _frame_buffers(room: int, sealing: Sealing | None) -> tuple[memoryview, memoryview]:
    """The frame buffer (header, then ``room`` + ``overhead`` bytes of payload) and
    where a read goes: the payload itself when nothing is sealed, else a buffer of its
    own that is sealed into the frame."""
    buf = memoryview(bytearray(wire.HEADER_SIZE + room + (sealing.overhead if sealing else 0)))
    plain = memoryview(bytearray(room)) if sealing else buf[wire.HEADER_SIZE:][:room]
    return buf, plain


#: how long a cancelled sender may still take to finish the frame it started
FRAME_FINISH_TIMEOUT = 10.0


async def _splice_frame(dst: FramedConn, pipe: Pipe, n: int) -> None:
    await _send_header(dst.conn, wire.encode_header(wire.FrameType.DATA, n))
    await splice_out(pipe, dst.conn, n)
    dst.bytes_out += n + wire.HEADER_SIZE


def _send_at_once(dst: FramedConn, data: memoryview) -> int:
    """As much of ``data`` as a plain socket takes now (the caller holds the write
    lock): a frame that fits needs no task to guard its write against cancellation,
    as nothing is left to finish."""
    conn = dst.conn
    if not conn.plain or conn.closed:
        return 0
    try:
        sent = conn.sock.send(data)
    except (BlockingIOError, InterruptedError):
        return 0
    except OSError:
        return 0  # the guarded write below meets the error and reports it
    dst.bytes_out += sent
    return sent


async def _send_frame_bytes(dst: FramedConn, data: memoryview) -> None:
    await dst.conn.send_all(data)
    dst.bytes_out += len(data)


async def _whole_frame(dst: FramedConn, write: Awaitable[None]) -> None:
    """Write one frame (the caller holds ``dst.write_lock``) so that a cancel waits
    for the frame to be whole; one that cannot be finished in time cuts ``dst``.

    While the write waits for the peer to take bytes, the link counts as stalled, not
    dead: a slow consumer at the far end backs up to here, and the peer (the relay)
    says nothing meanwhile because it is blocked on that consumer.
    """
    task = asyncio.ensure_future(write)
    with dst.stalling():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                try:
                    await asyncio.wait_for(task, FRAME_FINISH_TIMEOUT)
                except BaseException:
                    dst.conn.cut()
            raise


class ChunkBuffer:
    """The buffer a sink moves payloads through when it cannot splice.

    A short frame (a keystroke, a control-sized payload) gets a buffer of its own
    size; the first long one allocates one buffer of ``room`` bytes that the sink
    keeps, so a bulk transfer reuses it and a quiet session holds none. A frame that
    must be held whole and is larger than ``room`` (a peer may send up to the wire
    limit) gets a buffer for that frame only, so what a session keeps stays bounded.
    """

    def __init__(self, room: int = RECV_CHUNK) -> None:
        self.room = room
        self._big: memoryview | None = None

    def get(self, length: int) -> memoryview:
        """A buffer for ``length`` bytes, or of ``room`` bytes for a long frame."""
        if length <= SMALL_CHUNK:
            return memoryview(bytearray(length))
        if self._big is None:
            self._big = memoryview(bytearray(self.room))
        return self._big

    def whole(self, length: int) -> memoryview:
        """A buffer that holds ``length`` bytes at once."""
        if length > self.room:
            return memoryview(bytearray(length))
        return self.get(length)


class FrameSink:
    """Where :func:`forward_frames` puts DATA payloads and EOF marks."""

    #: whether the sink can take a payload by splice from a plain source
    splices: bool = False
    #: whether a long payload should be left in the kernel behind an exactly read
    #: header: the sink splices it, or reads it whole into a buffer of its own
    reads_payload_itself: bool = False

    async def data(self, src: FramedConn, length: int) -> None:
        raise NotImplementedError

    async def eof(self, body: bytes = b"") -> None:
        """The sender's EOF; ``body``: its seal (:func:`seal_end`) or empty."""
        raise NotImplementedError

    def close(self) -> None:
        """Release kernel resources (pipes)."""


class RawSink(FrameSink):
    """Deliver payloads to an application socket (optionally opening sealed payloads)."""

    def __init__(self, dst: Conn, *, sealing: Sealing | None = None,
                 end_sealed: bool = False) -> None:
        self.dst = dst
        self.sealing = sealing
        #: the end must be authenticated (:func:`seal_end`): an EOF without a valid
        #: seal is a truncation, not an end
        self.end_sealed = end_sealed and sealing is not None
        self.splices = sealing is None and can_splice(dst)
        # a sealed payload is read whole into a buffer of its own: read it straight
        # there, not through the link's read buffer (a copy of up to RECV_CHUNK each)
        self.reads_payload_itself = self.splices or sealing is not None
        self._pipe: Pipe | None = None
        # room for a whole sealed frame as raw_to_frames makes them
        room = SEALED_CHUNK if sealing is not None else RECV_CHUNK + 64
        self._chunks = ChunkBuffer(room)
        self._opened = ChunkBuffer(room)
        self.counter = Transfer()

    async def data(self, src: FramedConn, length: int) -> None:
        self.counter.bytes += length
        with src.stalling():  # a slow application is not a dead relay
            await self._deliver(src, length)
        trace.event("app written")

    async def _deliver(self, src: FramedConn, length: int) -> None:
        if self.sealing is not None:  # a sealed payload opens only whole
            sealed = self._chunks.whole(length)[:length]
            filled = 0
            while filled < length:
                filled += await src.read_payload_into(sealed[filled:])
            size = max(length - self.sealing.overhead, 0)  # too short: open_into says so
            opened = self._opened.whole(size)[:size]
            self.sealing.open_into(sealed, opened)
            await self.dst.send_all(opened)
            return
        if src.buffered:
            head = src.take_buffered_payload(length)
            await self.dst.send_all(head)
            length -= len(head)
        if not length:
            return
        if self.splices and src.conn.plain:
            pipe = self._pipe = self._pipe or Pipe()
            while length:
                n = await splice_in(src.conn, pipe, min(length, pipe.size))
                if not n:
                    raise ConnClosed("connection closed in the middle of a frame")
                src.spliced(n)
                await splice_out(pipe, self.dst, n)
                length -= n
        else:
            while length:
                view = self._chunks.get(length)
                n = await src.read_payload_into(view[: min(length, len(view))])
                await self.dst.send_all(view[:n])
                length -= n

    async def eof(self, body: bytes = b"") -> None:
        if self.end_sealed:
            open_end(self.sealing, body)  # type: ignore[arg-type]
        elif body:
            raise wire.WireError("bad-frame", "a sealed end on a stream that is not sealed")
        await self.dst.shutdown_write()

    def close(self) -> None:
        if self._pipe:
            self._pipe.close()
            self._pipe = None


class FramedSink(FrameSink):
    """Forward frames unchanged to the paired connection (the relay's data path).

    Header and payload go out under the peer's write lock as one frame. If the peer
    connection is gone, payloads are read and dropped so the sender's stream stays
    in step until it releases the connection.
    """

    def __init__(self, dst: FramedConn) -> None:
        self.dst = dst
        self._pipe: Pipe | None = None
        self._chunks = ChunkBuffer(wire.HEADER_SIZE + RECV_CHUNK)
        self.dead = False
        #: the sender's EOF went to the peer (its direction of the session is over)
        self.ended = False

    @property
    def splices(self) -> bool:  # type: ignore[override]
        """Looked up per frame: the peer's connection may leave TLS during a session."""
        return can_splice(self.dst.conn)

    @property
    def reads_payload_itself(self) -> bool:  # type: ignore[override]
        return self.splices

    def _lost(self) -> None:
        self.dead = True
        self.close()

    async def data(self, src: FramedConn, length: int) -> None:
        if self.dead or self.dst.conn.closed:
            await discard_payload(src, length)
            return
        trace.event("frame in")
        header = wire.encode_header(wire.FrameType.DATA, length)
        head = src.take_buffered_payload(length) if src.buffered else b""
        rest = length - len(head)
        splice = self.splices and src.conn.plain
        if not splice and length <= SMALL_CHUNK:
            # a short frame is read whole first, so the peer's lock is never held
            # while waiting for the sender
            payload = head + (await src.read_payload(rest) if rest else b"")
            with src.stalling():  # waiting on the peer now, not on the sender
                try:
                    await self.dst.send(header + payload)
                except (OSError, ConnClosed):
                    self._lost()
                except BaseException:  # cancelled (the sender's link is being closed)
                    self._cut()  # possibly in the middle of the frame
                    raise
            return
        # A pipe holds a bounded number of *segments*, not bytes, and a buffer is
        # bounded too: a long frame cannot be assumed to fit, so it streams through
        # in pieces under the peer's lock.
        with src.stalling():  # the peer's lock and room for the header: the peer's pace
            await self.dst.write_lock.acquire()
        try:
            whole = False
            try:
                if not splice:
                    if not await self._stream(src, header + head, rest):
                        return
                    rest = 0
                else:
                    try:
                        with src.stalling():
                            await _send_header(self.dst.conn, header + head)
                    except (OSError, ConnClosed):
                        self._lost()
                        await discard_payload(src, rest)
                        return
                while rest:
                    pipe = self._pipe = self._pipe or Pipe()
                    n = await splice_in(src.conn, pipe, rest)
                    if not n:
                        raise ConnClosed("connection closed in the middle of a frame")
                    src.spliced(n)
                    rest -= n
                    with src.stalling():
                        try:
                            await splice_out(pipe, self.dst.conn, n)
                        except (OSError, ConnClosed):
                            self._lost()
                            await discard_payload(src, rest)
                            return
                whole = True
                self.dst.bytes_out += length + wire.HEADER_SIZE
            finally:
                if not whole and not self.dead:
                    # The sender failed or was cancelled (its link closed by the
                    # keepalive watchdog, say) after the peer got this frame's header:
                    # whatever came next would be read as the rest of the payload.
                    self._cut()
        finally:
            self.dst.write_lock.release()

    async def _stream(self, src: FramedConn, first: bytes, rest: int) -> bool:
        """Copy a long frame (``first``: its header and what was buffered) through one
        reused buffer, decrypting into it and encrypting from it when either side is
        TLS; each piece goes out as soon as it is read. False if the peer was lost
        (the rest of the payload is then read and dropped)."""
        view = self._chunks.whole(max(len(first), RECV_CHUNK))
        filled = len(first)
        view[:filled] = first
        while True:
            if rest:
                room = min(rest, len(view) - filled)
                n = await src.read_payload_into(view[filled: filled + room])
                rest -= n
                filled += n
            with src.stalling():  # waiting on the peer now, not on the sender
                try:
                    await self.dst.conn.send_all(view[:filled])
                except (OSError, ConnClosed):
                    self._lost()
                    await discard_payload(src, rest)
                    return False
            if not rest:
                return True
            filled = 0

    def _cut(self) -> None:
        """The peer's stream cannot go on: cut it off now rather than feed it a
        corrupt frame (it sees the end at once; its owner closes it)."""
        self.dst.conn.cut()
        self._lost()

    async def eof(self, body: bytes = b"") -> None:
        if self.dead or self.dst.conn.closed:
            return
        # marked before the write: a write that waits for room yields, and the peer may
        # have the EOF, end its side and close before this task runs again
        self.ended = True
        try:
            await self.dst.send_frame(wire.FrameType.EOF, body)
        except (OSError, ConnClosed):
            self._lost()

    def close(self) -> None:
        if self._pipe:
            self._pipe.close()
            self._pipe = None


class DiscardSink(FrameSink):
    """Read and drop payloads (a terminal waiting for the relay's release reply)."""

    async def data(self, src: FramedConn, length: int) -> None:
        await discard_payload(src, length)

    async def eof(self, body: bytes = b"") -> None:
        return None


async def discard_payload(src: FramedConn, length: int) -> None:
    while length:
        chunk = min(length, RECV_CHUNK)
        await src.read_payload(chunk)
        length -= chunk


ControlHandler = Callable[[bytes], Awaitable[bool]]
SinkLookup = Callable[[], FrameSink | None]


class UnexpectedData(wire.WireError):
    def __init__(self) -> None:
        super().__init__("unexpected-data", "data frame on a connection that is not paired")


async def forward_frames(src: FramedConn, sink: SinkLookup, on_ctrl: ControlHandler) -> str:
    """Read frames from ``src`` until EOF or until ``on_ctrl`` returns True.

    ``sink`` is looked up per frame, so the control logic can pair or release the
    connection between two frames (the relay's data path switches without a copy).
    Returns ``"eof"`` or ``"stop"``.

    A header is read exactly (its payload left in the kernel for the sink to splice,
    or to read whole into its own buffer) only after a long DATA frame: a bulk
    stream's frames are long. After a short one,
    or a control message, the read takes whatever is there, so a short frame (a
    session's first bytes, an echo) arrives with its header in one ``recv`` and goes
    on as one ``send`` - no pipe, no second segment for the peer to wake up for.
    """
    bulk = False
    fair = Slice()
    while True:
        current = sink()
        exact = bulk and current is not None and current.reads_payload_itself and src.conn.plain
        header = await src.read_header(exact=exact)
        if header is None:
            return "eof"
        ftype, length = header
        current = sink()  # the pairing may have changed while we waited
        if ftype is wire.FrameType.CTRL:
            bulk = False
            payload = await src.read_payload(length)
            if await on_ctrl(payload):
                return "stop"
        elif current is None:
            raise UnexpectedData()
        elif ftype is wire.FrameType.DATA:
            bulk = length > SMALL_CHUNK
            await current.data(src, length)
            if fair.spent(length):
                await fair.yield_()  # between frames: no lock held, no frame half sent
        else:
            await current.eof(await src.read_payload(length) if length else b"")

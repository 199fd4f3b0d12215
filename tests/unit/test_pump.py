"""The byte pump and the connection waits it relies on, over real socket pairs."""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import termios

import pytest

from kakehashi.core import pump, wire
from kakehashi.core.pump import SPLICE_ENABLED, FramedSink, forward_frames
from kakehashi.core.stream import Conn, ConnClosed, FramedConn
from tests.support.wait import async_wait_until

# Each case is an ``async def _name`` run by ``test_name`` below on both loops.


def _readable_bytes(sock: socket.socket) -> int:
    """Bytes waiting in ``sock``'s receive buffer (not consumed)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


async def _never_ctrl(payload: bytes) -> bool:
    raise AssertionError(f"unexpected control frame {payload!r}")


async def _close_wakes_a_task_waiting_to_send() -> None:
    """The relay forwards into a peer's socket that the peer's own task may close."""
    mine, theirs = _pair()
    conn = Conn(mine)
    sender = asyncio.create_task(conn.send_all(b"x" * (16 << 20)))  # more than fits
    # the buffers are full and the sender waits for room
    await async_wait_until(lambda: conn._waits, what="the sender waiting to send")
    assert not sender.done()
    conn.close()
    with pytest.raises(ConnClosed):
        await asyncio.wait_for(sender, 2)
    theirs.close()


async def _close_wakes_a_task_waiting_to_read() -> None:
    mine, theirs = _pair()
    conn = Conn(mine)
    waiter = asyncio.create_task(conn.wait_readable())
    await async_wait_until(lambda: conn._waits, what="the reader waiting")
    conn.close()
    with pytest.raises(ConnClosed):
        await asyncio.wait_for(waiter, 2)
    theirs.close()


async def _a_waited_socket_can_be_waited_on_again() -> None:
    """A finished wait unregisters itself (a stale registration would break the next)."""
    mine, theirs = _pair()
    conn = Conn(mine)
    for _ in range(3):
        waiter = asyncio.create_task(conn.wait_readable())
        await asyncio.sleep(0)  # one turn of the loop: the waiter registers
        theirs.send(b"!")
        await asyncio.wait_for(waiter, 2)
        mine.recv(1)
    conn.close()
    theirs.close()


async def _a_frame_cut_short_cuts_the_peer_off() -> None:
    """A sender dying mid-frame must not leave the peer waiting for the rest.

    The peer already has the header; anything sent after it (an End message, say)
    would be read as payload. Seen in CI as a forward that never ended after its
    agent was killed.
    """
    src_mine, src_theirs = _pair()
    dst_mine, dst_theirs = _pair()
    src = FramedConn(Conn(src_mine))
    dst = FramedConn(Conn(dst_mine))
    sink = FramedSink(dst)
    src_theirs.sendall(wire.encode_header(wire.FrameType.DATA, 1 << 20) + b"y" * 1000)
    src_theirs.close()  # dies with most of the frame unsent
    with pytest.raises(ConnClosed):
        await asyncio.wait_for(forward_frames(src, lambda: sink, _never_ctrl), 2)
    received = b""
    dst_theirs.setblocking(True)
    dst_theirs.settimeout(2)
    while chunk := dst_theirs.recv(1 << 16):
        received += chunk
    assert received == wire.encode_header(wire.FrameType.DATA, 1 << 20) + b"y" * 1000
    with pytest.raises(OSError):  # and nothing more can be written to the peer
        await dst.send_frame(wire.FrameType.EOF)
    dst.conn.close()
    src.conn.close()


async def _a_frame_cut_by_cancellation_cuts_the_peer_off() -> None:
    """The relay's keepalive watchdog aborts a silent sender's link and cancels its
    reader, which may be in the middle of forwarding a frame (seen in review: the
    peer then read the relay's next messages as payload)."""
    src_mine, src_theirs = _pair()
    dst_mine, dst_theirs = _pair()
    src = FramedConn(Conn(src_mine))
    sink = FramedSink(FramedConn(Conn(dst_mine)))
    src_theirs.sendall(wire.encode_header(wire.FrameType.DATA, 1 << 20) + b"z" * 1000)
    reader = asyncio.create_task(forward_frames(src, lambda: sink, _never_ctrl))
    # the frame is open on the peer's side (header and 1000 bytes there), the sender silent
    await async_wait_until(lambda: _readable_bytes(dst_theirs) >= wire.HEADER_SIZE + 1000,
                           what="the partial frame at the peer")
    src.conn.abort()
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    dst_theirs.setblocking(True)
    dst_theirs.settimeout(2)
    received = b""
    while chunk := dst_theirs.recv(1 << 16):  # the end, right after the partial frame
        received += chunk
    assert received == wire.encode_header(wire.FrameType.DATA, 1 << 20) + b"z" * 1000
    sink.dst.conn.close()
    src_theirs.close()


async def _closing_a_watched_socket_leaves_its_fd_number_clean() -> None:
    """The relay serves idle links from a persistent readable callback. A link closed
    by the watchdog must take that registration along: the next connection to get the
    same fd number was never read (seen in review: a handshake that timed out)."""
    mine, theirs = _pair()
    conn = Conn(mine)
    conn.watch_readable(lambda: None)
    fd = mine.fileno()
    conn.close()
    theirs.close()
    a, b = _pair()  # the lowest free number is reused: one of these gets ``fd``
    assert fd in (a.fileno(), b.fileno()), "the fd number was not reused; the case is moot"
    reused = a if a.fileno() == fd else b
    other = b if reused is a else a
    fresh = Conn(reused)
    waiter = asyncio.create_task(fresh.wait_readable())
    await async_wait_until(lambda: fresh._waits, what="the reader waiting")
    other.send(b"!")
    await asyncio.wait_for(waiter, 2)
    fresh.close()
    other.close()


async def _whole_frames_pass_unchanged() -> None:
    src_mine, src_theirs = _pair()
    dst_mine, dst_theirs = _pair()
    src = FramedConn(Conn(src_mine))
    sink = FramedSink(FramedConn(Conn(dst_mine)))
    frames = (wire.encode_header(wire.FrameType.DATA, 5) + b"hello"
              + wire.encode_header(wire.FrameType.EOF, 0))
    src_theirs.sendall(frames)
    src_theirs.shutdown(socket.SHUT_WR)
    assert await asyncio.wait_for(forward_frames(src, lambda: sink, _never_ctrl), 2) == "eof"
    dst_theirs.setblocking(True)
    dst_theirs.settimeout(2)
    assert dst_theirs.recv(100) == frames
    for s in (src_theirs, dst_theirs):
        s.close()
    src.conn.close()
    sink.dst.conn.close()


def test_close_wakes_a_task_waiting_to_send(run) -> None:
    run(_close_wakes_a_task_waiting_to_send())


def test_close_wakes_a_task_waiting_to_read(run) -> None:
    run(_close_wakes_a_task_waiting_to_read())


def test_a_waited_socket_can_be_waited_on_again(run) -> None:
    run(_a_waited_socket_can_be_waited_on_again())


@pytest.mark.skipif(not SPLICE_ENABLED, reason="the cut-short frame case is the splice path")
def test_a_frame_cut_short_cuts_the_peer_off(run) -> None:
    run(_a_frame_cut_short_cuts_the_peer_off())


@pytest.mark.skipif(not SPLICE_ENABLED, reason="the cut-short frame case is the splice path")
def test_a_frame_cut_by_cancellation_cuts_the_peer_off(run) -> None:
    run(_a_frame_cut_by_cancellation_cuts_the_peer_off())


def test_closing_a_watched_socket_leaves_its_fd_number_clean(run) -> None:
    run(_closing_a_watched_socket_leaves_its_fd_number_clean())


def test_whole_frames_pass_unchanged(run) -> None:
    run(_whole_frames_pass_unchanged())


async def _sealed_payloads_of_any_size_open_whole() -> None:
    """End-to-end frames go through the sealed path (sealed into and opened from reused
    buffers): short, bulk and larger-than-the-buffer frames open intact in order and the
    application sees them in order; a payload too short for its tag is refused."""
    import os

    from kakehashi.core import crypto
    from kakehashi.core.pump import RawSink, raw_to_frames
    from tests.unit.test_crypto import _pair as e2e_pair

    sender, receiver = e2e_pair()
    app_in, app_in_peer = _pair()
    link_a, link_b = _pair()
    app_out, app_out_peer = _pair()
    data = os.urandom(3 << 20)  # short frames, then long ones
    big = os.urandom(600_000)  # one frame sealed by hand, of a size the pump does not make
    framed_b = FramedConn(Conn(link_b))
    sink = RawSink(Conn(app_out), sealing=receiver)

    async def feed_app() -> None:
        peer = Conn(app_in_peer)
        await peer.send_all(data)
        await peer.shutdown_write()

    async def collect() -> bytes:
        peer = Conn(app_out_peer)
        got = bytearray()
        while chunk := await peer.recv(1 << 20):
            got += chunk
        return bytes(got)

    async def send_link() -> None:
        framed_a = FramedConn(Conn(link_a))
        await raw_to_frames(Conn(app_in), framed_a, sealing=sender)  # ends with EOF
        await framed_a.send_frame(wire.FrameType.DATA, sender.seal(big))
        await framed_a.send_frame(wire.FrameType.DATA, b"abc")  # shorter than a tag

    collected = asyncio.create_task(collect())
    tasks = [asyncio.create_task(feed_app()), asyncio.create_task(send_link())]
    with pytest.raises(crypto.E2EError):
        while True:
            header = await framed_b.read_header()
            assert header is not None
            ftype, length = header
            if ftype is wire.FrameType.DATA:  # (the EOF after ``data`` is passed on below)
                await sink.data(framed_b, length)
    await asyncio.gather(*tasks)
    await sink.eof()
    assert await collected == data + big
    sink.close()


def test_sealed_payloads_of_any_size_open_whole(run) -> None:
    run(_sealed_payloads_of_any_size_open_whole())


class _FullReads:
    """An application stream that always has data: every read fills the buffer it is
    given (as a busy socket with a large receive buffer would), until ``data`` ends."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)

    async def recv_into(self, view: memoryview) -> int:
        n = min(len(view), len(self.data))
        view[:n] = self.data[:n]
        self.data = self.data[n:]
        return n


async def _a_busy_sealed_stream_moves_to_long_frames() -> None:
    """A sealed stream starts with short frames (an interactive session keeps small
    buffers) and, once a read fills one, seals frames as long as the wire allows: the
    sealed path's cost is per frame (issue 12). Every frame opens, in order."""
    import os

    from tests.unit.test_crypto import _pair as e2e_pair

    sender, receiver = e2e_pair()
    link_a, link_b = _pair()
    most = wire.DEFAULT_LIMITS.max_data  # a whole sealed frame, tag included
    data = os.urandom(pump.SMALL_CHUNK + 3 * (most - sender.overhead) + 5)
    framed_b = FramedConn(Conn(link_b))
    sent = asyncio.create_task(pump.raw_to_frames(_FullReads(data), FramedConn(Conn(link_a)),
                                                  sealing=sender))  # type: ignore[arg-type]
    lengths, opened = [], bytearray()
    while (header := await framed_b.read_header()) is not None:
        ftype, length = header
        if ftype is wire.FrameType.EOF:
            break
        lengths.append(length)
        opened += receiver.open(await framed_b.read_payload(length))
    assert await sent == len(data) and bytes(opened) == data
    assert lengths == [pump.SMALL_CHUNK + sender.overhead, most, most, most,
                       5 + sender.overhead]
    link_a.close()
    link_b.close()


def test_a_busy_sealed_stream_moves_to_long_frames(run) -> None:
    run(_a_busy_sealed_stream_moves_to_long_frames())


async def _a_sealed_payload_is_read_straight_into_the_sinks_buffer() -> None:
    """After a long sealed frame the next header is read alone, so the payload goes
    from the socket straight into the sink's buffer, not through the link's read
    buffer first (a copy of up to RECV_CHUNK per frame, issue 12)."""
    import os

    from kakehashi.core.pump import RawSink
    from tests.unit.test_crypto import _pair as e2e_pair

    sender, receiver = e2e_pair()
    link_a, link_b = _pair()
    app_out, app_out_peer = _pair()
    payloads = [os.urandom(40_000) for _ in range(3)]
    link_a.setblocking(True)  # written here, before anything runs
    for payload in payloads:  # all three frames wait in the socket before any is read
        sealed = sender.seal(payload)
        link_a.sendall(wire.encode_header(wire.FrameType.DATA, len(sealed)) + sealed)
    link_a.sendall(wire.encode_header(wire.FrameType.EOF, 0))
    link_a.shutdown(socket.SHUT_WR)  # then the link ends
    buffered_at_data: list[int] = []

    class Watching(RawSink):
        async def data(self, src: FramedConn, length: int) -> None:
            buffered_at_data.append(src.buffered)
            await super().data(src, length)

    sink = Watching(Conn(app_out), sealing=receiver)
    assert await forward_frames(FramedConn(Conn(link_b)), lambda: sink, _never_ctrl) == "eof"
    got = bytearray()
    while len(got) < 120_000:
        got += app_out_peer.recv(1 << 20)
    assert bytes(got) == b"".join(payloads)
    # the first header came with whatever followed it; after a long frame, nothing
    assert buffered_at_data[1:] == [0, 0]
    sink.close()
    for s in (link_a, link_b, app_out, app_out_peer):
        s.close()


def test_a_sealed_payload_is_read_straight_into_the_sinks_buffer(run) -> None:
    run(_a_sealed_payload_is_read_straight_into_the_sinks_buffer())


async def _small_writes_go_as_one_frame_then_bulk_is_spliced() -> None:
    """A session's first bytes (an interactive write) go out as one frame written
    whole, header and payload together, with no splice pipe made; once a read fills
    the copy buffer the stream is bulk and the rest is spliced; everything arrives
    intact and in order, then the EOF frame."""
    import os

    from kakehashi.core import pump

    made: list[pump.Pipe] = []

    class CountingPipe(pump.Pipe):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

    app, app_peer = _pair()
    link_a, link_b = _pair()
    framed_b = FramedConn(Conn(link_b))
    bulk = os.urandom(4 << 20)
    original = pump.Pipe
    pump.Pipe = CountingPipe  # type: ignore[misc]
    try:
        sender = asyncio.create_task(pump.raw_to_frames(Conn(app), FramedConn(Conn(link_a))))
        peer = Conn(app_peer)
        await peer.send_all(b"x")
        await async_wait_until(lambda: _readable_bytes(link_b) >= wire.HEADER_SIZE + 1,
                               what="the first frame on the link")
        # header and payload were written together: the whole frame is there at once
        assert _readable_bytes(link_b) == wire.HEADER_SIZE + 1
        assert await framed_b.read_header() == (wire.FrameType.DATA, 1)
        assert await framed_b.read_payload(1) == b"x"
        assert made == []  # no pipe for a small write
        async def feed() -> None:
            await peer.send_all(bulk)
            await peer.shutdown_write()

        feeder = asyncio.create_task(feed())
        got = bytearray()
        while True:
            header = await framed_b.read_header()
            assert header is not None
            ftype, length = header
            if ftype is wire.FrameType.EOF:
                break
            assert ftype is wire.FrameType.DATA
            got += await framed_b.read_payload(length)
        assert bytes(got) == bulk
        await feeder
        assert await sender == 1 + len(bulk)
        if pump.SPLICE_ENABLED:
            assert len(made) == 1  # the bulk part went through one pipe
    finally:
        pump.Pipe = original  # type: ignore[misc]
        for s in (app, app_peer, link_a, link_b):
            s.close()


def test_small_writes_go_as_one_frame_then_bulk_is_spliced(run) -> None:
    run(_small_writes_go_as_one_frame_then_bulk_is_spliced())


@pytest.mark.skipif(not pump.SPLICE_AVAILABLE, reason="no splice(2) here")
def test_a_closed_pipe_moves_nothing_into_the_pipe_that_reuses_its_numbers():
    """A sink's leg keeps its pipe across awaits; if the sink is closed meanwhile, the
    leg's next splice must fail, not write into a new session's pipe that was given
    the same descriptor numbers."""
    import os

    a, b = socket.socketpair()
    try:
        old = pump.Pipe()
        numbers = (old.r, old.w)
        old.close()
        new = pump.Pipe()  # the lowest free numbers: the old ones
        try:
            assert (new.r, new.w) == numbers
            a.sendall(b"another session's bytes")
            with pytest.raises(OSError):
                os.splice(b.fileno(), old.w, 64, flags=pump._SPLICE_FLAGS)
            with pytest.raises(BlockingIOError):
                os.read(new.r, 64)  # nothing arrived in the new pipe
        finally:
            new.close()
    finally:
        a.close()
        b.close()


async def _a_short_frame_is_forwarded_whole_without_a_pipe() -> None:
    """The relay forwarding a short frame between two spliceable links (a session's
    first bytes, an echo) reads it with its header in one go and writes it as one
    segment: no splice pipe, and the receiver never sees the header alone (which
    costs it a second wake-up for the payload). A long frame after it is still
    spliced; a short one after that goes whole again."""
    made: list[pump.Pipe] = []

    class CountingPipe(pump.Pipe):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

    src_a, src_b = _pair()  # the sender's link: frames are written into src_a
    dst_a, dst_b = _pair()  # the paired link: frames come out at dst_b
    sink = FramedSink(FramedConn(Conn(dst_a)))
    original = pump.Pipe
    pump.Pipe = CountingPipe  # type: ignore[misc]
    src = FramedConn(Conn(src_b))
    forwarder = asyncio.create_task(forward_frames(src, lambda: sink, _never_ctrl))
    try:
        src_a.sendall(wire.encode_header(wire.FrameType.DATA, 1) + b"x")
        await async_wait_until(lambda: _readable_bytes(dst_b) >= wire.HEADER_SIZE + 1,
                               what="the forwarded frame")
        assert dst_b.recv(64) == wire.encode_header(wire.FrameType.DATA, 1) + b"x"
        assert made == []  # the relay made no pipe for one byte
        big = bytes(range(256)) * 256  # 64 KiB: a bulk frame
        src_a.setblocking(True)
        src_a.sendall(wire.encode_header(wire.FrameType.DATA, len(big)) + big)
        src_a.sendall(wire.encode_header(wire.FrameType.DATA, 2) + b"yz")
        src_a.sendall(wire.encode_header(wire.FrameType.EOF, 0))
        src_a.shutdown(socket.SHUT_WR)
        out = FramedConn(Conn(dst_b))
        assert await out.read_header() == (wire.FrameType.DATA, len(big))
        assert await out.read_payload(len(big)) == big
        assert await out.read_header() == (wire.FrameType.DATA, 2)
        assert await out.read_payload(2) == b"yz"
        assert await out.read_header() == (wire.FrameType.EOF, 0)
        assert await asyncio.wait_for(forwarder, 5) == "eof"
        if pump.SPLICE_ENABLED:
            assert len(made) == 1  # the long frame went through one pipe
    finally:
        pump.Pipe = original  # type: ignore[misc]
        forwarder.cancel()
        sink.close()
        for s in (src_a, src_b, dst_a, dst_b):
            s.close()


def test_a_short_frame_is_forwarded_whole_without_a_pipe(run) -> None:
    run(_a_short_frame_is_forwarded_whole_without_a_pipe())


class _Ready:
    """A stream that never makes its caller wait: ``total`` bytes are always there to
    read (then EOF), and a write always finds room (it counts what it took). Under load
    a real socket behaves so for as long as its peer keeps up."""

    plain = False
    has_pushback = False
    closed = False

    def __init__(self, data: bytes = b"") -> None:
        self.loop = asyncio.get_running_loop()
        self._data = memoryview(data)
        self.taken = 0
        self.received = 0
        self.ended = False

    async def recv_into(self, buf: memoryview | bytearray) -> int:
        n = min(len(buf), len(self._data) - self.taken)
        buf[:n] = self._data[self.taken: self.taken + n]
        self.taken += n
        return n

    async def recv(self, n: int) -> bytes:
        data = bytes(self._data[self.taken: self.taken + n])
        self.taken += len(data)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.received += len(data)

    async def shutdown_write(self) -> None:
        self.ended = True


class _ReadySocket:
    """The ``sock`` of a plain :class:`_Ready`: every send is taken whole."""

    def __init__(self, owner: _Ready) -> None:
        self.owner = owner

    def send(self, data: memoryview) -> int:
        self.owner.received += len(data)
        return len(data)


FAIR_TOTAL = 16 * pump.FAIR_SLICE


def _frames(total: int, size: int = 64 << 10) -> bytes:
    payload = b"f" * size
    frame = wire.encode_header(wire.FrameType.DATA, size) + payload
    return frame * (total // size) + wire.encode_header(wire.FrameType.EOF, 0)


async def _leg_lets_others_run(leg: str, fair: bool) -> None:
    """A leg whose input always has data and whose output always has room gives the
    loop a turn before it has moved everything (issue 12: an echo beside 8 bulk
    sessions in the same relay and agent waited 0.4-1.1 s for such legs)."""
    pump.FAIR_ENABLED = fair
    dst = _Ready()
    if leg == "copy_raw":
        src = _Ready(b"r" * FAIR_TOTAL)
        work = pump.copy_raw(src, dst)  # type: ignore[arg-type]
    elif leg == "raw_to_frames":
        src = _Ready(b"r" * FAIR_TOTAL)
        dst.plain = True  # type: ignore[misc]  # sent at once, no guard task
        dst.sock = _ReadySocket(dst)  # type: ignore[attr-defined]
        work = pump.raw_to_frames(src, FramedConn(dst))  # type: ignore[arg-type]
    else:
        src = _Ready(_frames(FAIR_TOTAL))
        sink = pump.RawSink(dst)  # type: ignore[arg-type]
        work = forward_frames(FramedConn(src), lambda: sink,  # type: ignore[arg-type]
                              _never_ctrl)
    moved_when_other_ran: list[int] = []

    async def other() -> None:  # an echo's callback, ready while the leg runs
        moved_when_other_ran.append(dst.received)

    task = asyncio.ensure_future(work)  # scheduled first, so it runs first
    probe = asyncio.ensure_future(other())
    await task
    await probe
    assert src.taken == len(src._data) and dst.received >= FAIR_TOTAL  # all of it
    if fair:
        assert moved_when_other_ran[0] < FAIR_TOTAL // 2, moved_when_other_ran
    else:  # KAKEHASHI_NO_FAIR_SLICE=1: runs until it waits (here: to the end)
        assert moved_when_other_ran[0] >= FAIR_TOTAL


@pytest.mark.parametrize("fair", [True, False], ids=["fair", "no-fair-slice"])
@pytest.mark.parametrize("leg", ["copy_raw", "raw_to_frames", "forward_frames"])
def test_a_leg_that_never_waits_lets_other_tasks_run(run, monkeypatch, leg: str,
                                                      fair: bool) -> None:
    monkeypatch.setattr(pump, "FAIR_ENABLED", pump.FAIR_ENABLED)  # restored after
    run(_leg_lets_others_run(leg, fair))

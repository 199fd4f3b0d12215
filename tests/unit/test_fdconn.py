"""core.stream.FdConn: early data from stdin (``relay pipe``) over real pipes.

A pipe cannot be peeked at, so ``peek_now`` reads what has arrived into the
connection's pushback; ``skip_now`` drops what went early. Whatever is peeked, skipped
or not, the pump must then see exactly the remaining bytes, in order, and the end of
input where it was - even when the end was read while peeking.
"""

from __future__ import annotations

import asyncio
import os
import pty
import tty
from collections.abc import Iterator

import pytest

from kakehashi.core import wire
from kakehashi.core.pump import raw_to_frames
from kakehashi.core.stream import Conn, FdConn, FramedConn
from tests.support.wait import async_wait_until
from tests.unit.test_pump import _pair


class Fds:
    """stdin's pipe and stdout's; closes at the end only what the test left open (a
    number closed twice could by then be another test's socket)."""

    def __init__(self) -> None:
        self.in_r, self.in_w = os.pipe()
        self.out_r, self.out_w = os.pipe()
        self.open = {self.in_r, self.in_w, self.out_r, self.out_w}

    def end_input(self) -> None:
        os.close(self.in_w)
        self.open.discard(self.in_w)

    def close(self) -> None:
        for fd in self.open:
            os.close(fd)


@pytest.fixture
def fds() -> Iterator[Fds]:
    f = Fds()
    yield f
    f.close()


async def _pumped(conn: FdConn) -> bytes:
    """Everything the pump reads from ``conn`` until its end, as the link receives it."""
    link_a, link_b = _pair()
    framed_a, framed_b = FramedConn(Conn(link_a)), FramedConn(Conn(link_b))
    sent = asyncio.create_task(raw_to_frames(conn, framed_a))
    got = bytearray()
    while True:
        header = await framed_b.read_header()
        assert header is not None
        ftype, length = header
        if ftype is not wire.FrameType.DATA:  # the end of input, passed on
            break
        got += await framed_b.read_payload(length)
    await sent
    framed_a.conn.close()
    framed_b.conn.close()
    return bytes(got)


async def _peek_then_pump(f: Fds) -> None:
    conn = FdConn(f.in_r, f.out_w)
    assert conn.peek_now(100) == b""  # nothing yet: no wait, no end
    os.write(f.in_w, b"ssh banner\r\n")
    assert conn.peek_now(100) == b"ssh banner\r\n"
    os.write(f.in_w, b"more")
    assert conn.peek_now(6) == b"ssh ba"  # at most what was asked for
    assert conn.peek_now(100) == b"ssh banner\r\nmore"  # the same, and what came since
    conn.skip_now(4)  # the relay forwarded fewer bytes than were shown
    os.write(f.in_w, b" and the rest")
    f.end_input()
    assert await _pumped(conn) == b"banner\r\nmore and the rest"
    conn.close()


def test_peeked_bytes_not_skipped_come_first_then_the_pipe(run, fds) -> None:
    run(_peek_then_pump(fds))


async def _eof_while_peeking(f: Fds, skip: int) -> None:
    conn = FdConn(f.in_r, f.out_w)
    os.write(f.in_w, b"hello")
    f.end_input()
    assert conn.peek_now(100) == b"hello"  # and the end, read behind them
    assert conn.peek_now(100) == b"hello"
    conn.skip_now(skip)
    # the end is kept: the pump sees the bytes left and then the end, not a wait
    assert await asyncio.wait_for(_pumped(conn), 15) == b"hello"[skip:]
    conn.close()


@pytest.mark.parametrize("skip", [0, 2, 5])
def test_an_end_read_while_peeking_comes_after_the_bytes(run, fds, skip) -> None:
    run(_eof_while_peeking(fds, skip))


async def _recv_sees_the_rest(f: Fds) -> None:
    conn = FdConn(f.in_r, f.out_w)
    data = bytes(range(256)) * 40  # more than is peeked
    os.write(f.in_w, data)
    assert conn.peek_now(4096) == data[:4096]
    conn.skip_now(1000)
    got = b""
    while len(got) < len(data) - 1000:
        got += await conn.recv(1500)
    assert got == data[1000:]
    f.end_input()
    assert await conn.recv() == b""
    conn.close()


def test_recv_sees_exactly_the_rest_in_order(run, fds) -> None:
    run(_recv_sees_the_rest(fds))


async def _skip_past_shown(f: Fds) -> None:
    from kakehashi.core.stream import ConnClosed

    conn = FdConn(f.in_r, f.out_w)
    os.write(f.in_w, b"abc")
    assert conn.peek_now(10) == b"abc"
    with pytest.raises(ConnClosed):
        conn.skip_now(4)
    conn.skip_now(3)
    os.write(f.in_w, b"d")
    assert await conn.recv() == b"d"
    conn.close()


def test_skipping_more_than_was_shown_is_refused(run, fds) -> None:
    run(_skip_past_shown(fds))


async def _regular_file(path: str, out_w: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        conn = FdConn(fd, out_w)
        assert conn.peek_now(3) == b"fil"
        conn.skip_now(1)
        assert await _pumped(conn) == b"ile contents"
        conn.close()
    finally:
        os.close(fd)


def test_a_regular_file_is_peeked_and_read_in_order(run, fds, tmp_path) -> None:
    path = tmp_path / "input"
    path.write_bytes(b"file contents")
    run(_regular_file(str(path), fds.out_w))


async def _tty(slave: int, master: int, out_w: int) -> None:
    conn = FdConn(slave, out_w)
    assert conn.peek_now(100) == b""
    os.write(master, b"typed")
    await async_wait_until(lambda: conn.peek_now(100) == b"typed", what="the typed bytes")
    conn.skip_now(2)
    os.write(master, b" more")
    got = b""
    while len(got) < len(b"ped more"):
        got += await conn.recv()
    assert got == b"ped more"
    conn.close()


def test_a_tty_is_peeked_and_read_in_order(run, fds) -> None:
    """A terminal (raw mode, as ssh sets it) has no MSG_PEEK either."""
    master, slave = pty.openpty()
    try:
        tty.setraw(slave)
        run(_tty(slave, master, fds.out_w))
    finally:
        os.close(master)
        os.close(slave)

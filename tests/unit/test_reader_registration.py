"""How often a connection registers its socket with the loop's poller (issue 12).

Registering and removing a reader around each wait for a readable socket cost six
``epoll_ctl`` per wait under uvloop, about 40 per process and relay session setup.
A connection now keeps its reader between waits and drops it only when the socket
turns readable with nobody waiting (a leg paused for backpressure is not read).

Counted on the selector loop, whose registrations go through ``loop._selector``
(uvloop's happen in C); the connection uses the same loop API on both.
"""

from __future__ import annotations

import asyncio
import selectors
import socket
from typing import Any

import pytest

from kakehashi.core import pump
from kakehashi.core.stream import Conn, ConnClosed
from tests.support.wait import async_wait_until

ROUNDS = 12


class CountingSelector:
    """The loop's selector, counting each time an fd is added to it."""

    def __init__(self, inner: selectors.BaseSelector) -> None:
        self.inner = inner
        self.registered: dict[int, int] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        self.registered[fd] = self.registered.get(fd, 0) + 1
        return self.inner.register(fileobj, events, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _counting_loop() -> tuple[asyncio.AbstractEventLoop, CountingSelector]:
    sel = CountingSelector(selectors.DefaultSelector())
    return asyncio.SelectorEventLoop(sel), sel  # type: ignore[arg-type]


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def _run(case: Any) -> None:
    loop, sel = _counting_loop()
    with asyncio.Runner(loop_factory=lambda: loop) as runner:
        runner.run(case(sel))


def _registered(sel: CountingSelector, fd: int) -> bool:
    try:
        return bool(sel.inner.get_key(fd).events & selectors.EVENT_READ)
    except KeyError:
        return False


def _read_pending(conn: Conn, sel: CountingSelector) -> bool:
    """A task waits to read ``conn``: through the connection, or (before issue 12,
    in ``recv``) through the loop's own ``sock_recv``."""
    if conn._waits:
        return True
    try:
        handle = sel.inner.get_key(conn.sock.fileno()).data[0]
    except KeyError:
        return False
    return handle is not None and "sock_recv" in repr(handle)


def test_reads_that_each_wait_register_the_socket_once() -> None:
    async def case(sel: CountingSelector) -> None:
        mine, theirs = _pair()
        conn = Conn(mine)
        buf = bytearray(16)
        for i in range(ROUNDS):
            reader = asyncio.create_task(conn.recv_into(buf))
            await async_wait_until(lambda: _read_pending(conn, sel), what="the read waiting")
            theirs.send(bytes([i]))
            assert await asyncio.wait_for(reader, 5) == 1
        assert sel.registered.get(mine.fileno()) == 1, sel.registered
        conn.close()
        theirs.close()

    _run(case)


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "buffered"])
def test_a_pump_leg_registers_its_source_once(monkeypatch: pytest.MonkeyPatch,
                                              splice: bool) -> None:
    if splice and not pump.SPLICE_AVAILABLE:
        pytest.skip("no splice here")
    monkeypatch.setattr(pump, "SPLICE_ENABLED", splice)

    async def case(sel: CountingSelector) -> None:
        src_mine, src_theirs = _pair()
        dst_mine, dst_theirs = _pair()
        src, dst = Conn(src_mine), Conn(dst_mine)
        leg = asyncio.create_task(pump.copy_raw(src, dst))
        for i in range(ROUNDS):  # one message at a time, each read after a wait
            await async_wait_until(lambda: _read_pending(src, sel), what="the leg waiting to read")
            src_theirs.send(bytes([i]) * 10)
            await async_wait_until(lambda: _peek(dst_theirs) == 10, what="the message out")
            assert dst_theirs.recv(10) == bytes([i]) * 10
        src_theirs.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(leg, 5)
        assert sel.registered.get(src_mine.fileno()) == 1, sel.registered
        for s in (src_theirs, dst_theirs):
            s.close()
        src.close()
        dst.close()

    _run(case)


def _peek(sock: socket.socket) -> int:
    try:
        return len(sock.recv(100, socket.MSG_PEEK))
    except BlockingIOError:
        return 0


async def _one_waited_read(conn: Conn, sel: CountingSelector, theirs: socket.socket,
                           data: bytes) -> None:
    """A read that waits for ``data``, which the peer sends once it waits."""
    reader = asyncio.create_task(conn.recv(16))
    await async_wait_until(lambda: _read_pending(conn, sel), what="the read waiting")
    theirs.send(data)
    assert await asyncio.wait_for(reader, 5) == data


def test_a_socket_nobody_reads_is_not_watched() -> None:
    """A leg that stops reading (its peer's output is full) must not keep a reader:
    the loop would wake for it until someone reads, and the bytes must stay in the
    kernel for TCP's backpressure."""
    async def case(sel: CountingSelector) -> None:
        mine, theirs = _pair()
        conn = Conn(mine)
        await _one_waited_read(conn, sel, theirs, b"a")
        theirs.send(b"b")  # nobody waits for it
        await async_wait_until(lambda: not _registered(sel, mine.fileno()),
                               what="the reader dropped")
        assert mine.recv(16) == b"b"  # still there, unread
        conn.close()
        theirs.close()

    _run(case)


def test_closing_or_handing_over_drops_the_reader() -> None:
    async def case(sel: CountingSelector) -> None:
        mine, theirs = _pair()
        conn = Conn(mine)
        await _one_waited_read(conn, sel, theirs, b"a")
        fd = mine.fileno()
        assert _registered(sel, fd)
        conn.drop_reader()  # (start_tls and left_tls do this before the hand-over)
        assert not _registered(sel, fd)
        reader = asyncio.create_task(conn.recv(16))
        await async_wait_until(lambda: _read_pending(conn, sel), what="the read waiting again")
        conn.close()
        assert not _registered(sel, fd)
        theirs.close()
        with pytest.raises(ConnClosed):
            await reader

    _run(case)

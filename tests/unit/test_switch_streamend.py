"""The StreamEnd adapter: one multiplexed stream of a gateway seen as a Conn-like
endpoint, so the core's byte pump drives it (reads, writes, half-close, reset, credit
and close), first alone, then under :func:`kakehashi.core.pump.pump_raw` with a real
socket on the other side."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket

import pytest

from kakehashi.core import pump
from kakehashi.core.stream import Conn, ConnClosed
from kakehashi.switch import messages as m
from kakehashi.switch.gateway import Gateway, GatewayConfig, GwTunnel, Stream, StreamEnd
from tests.support.wait import async_wait_until

WINDOW = 256 * 1024


def gateway() -> Gateway:
    return Gateway(GatewayConfig(server="http://127.0.0.1:1", user="u", password="p",
                                 name="gw"))


def stream(gw: Gateway, side: str = "connect", sid: int = 1) -> tuple[Stream, StreamEnd]:
    t = gw.tunnels.get("t1")
    if t is None:
        t = gw.tunnels["t1"] = GwTunnel(id="t1", side=side, proto="tcp",
                                        address="127.0.0.1:9", service="s", window=WINDOW)
    s = gw._new_stream(t, sid)
    return s, StreamEnd(gw, s)


def sent(gw: Gateway) -> list:
    return m.decode_to_server(gw.take(1 << 30)) if gw.outbox else []


def data(sid: int, payload: bytes) -> m.Data:
    return m.Data(tunnel="t1", stream=sid, data=payload)


# -- reading: what the peer sent, and credit back -----------------------------------------
async def test_reads_hand_out_chunks_in_pieces_and_credit_only_what_was_written() -> None:
    gw = gateway()
    s, end = stream(gw)
    gw._stream_msg(data(1, b"a" * 100_000))
    buf = bytearray(32 * 1024)
    assert await end.recv_into(buf) == 32 * 1024  # a chunk larger than the buffer: split
    assert sent(gw) == []  # nothing credited before the pump wrote it out
    assert await end.recv_into(buf) == 32 * 1024
    assert sent(gw) == []  # 32 KiB written: below a quarter window, no credit yet
    assert await end.recv_into(buf) == 32 * 1024
    # 64 KiB written out by now: a quarter window, credited at once
    assert sent(gw) == [m.Credit(tunnel="t1", stream=1, n=64 * 1024)]
    assert s.recv.outstanding == 100_000 - 64 * 1024


async def test_a_read_waits_for_data_and_an_empty_chunk_is_not_the_end() -> None:
    gw = gateway()
    _, end = stream(gw)
    buf = bytearray(16)
    read = asyncio.ensure_future(end.recv_into(buf))
    await asyncio.sleep(0)
    assert not read.done()
    gw._stream_msg(data(1, b""))
    await asyncio.sleep(0)
    assert not read.done()  # an empty chunk wakes it, but it waits on
    gw._stream_msg(data(1, b"hi"))
    assert await asyncio.wait_for(read, 5) == 2 and bytes(buf[:2]) == b"hi"


async def test_the_peers_eof_reads_as_the_end_after_its_data() -> None:
    gw = gateway()
    s, end = stream(gw)
    gw._stream_msg(data(1, b"last"))
    gw._stream_msg(m.Eof(tunnel="t1", stream=1))
    buf = bytearray(16)
    assert await end.recv_into(buf) == 4
    assert await end.recv_into(buf) == 0 and s.got_eof
    # data after the end is a protocol violation by the peer: the stream is reset
    gw._stream_msg(data(1, b"more"))
    assert s.reset and [type(x) for x in sent(gw)] == [m.Reset]


async def test_a_reset_ends_a_waiting_read() -> None:
    gw = gateway()
    s, end = stream(gw)
    read = asyncio.ensure_future(end.recv_into(bytearray(16)))
    await asyncio.sleep(0)
    gw._stream_msg(m.Reset(tunnel="t1", stream=1, reason="peer went away"))
    with pytest.raises(ConnClosed):
        await asyncio.wait_for(read, 5)
    assert s.reset and "t1" in gw.tunnels and 1 not in gw.tunnels["t1"].streams
    assert sent(gw) == []  # the peer reset it: nothing to tell it


async def test_a_peer_overrunning_the_window_is_reset() -> None:
    gw = gateway()
    s, _ = stream(gw)
    gw._stream_msg(data(1, b"x" * m.MAX_CHUNK))
    for _ in range(WINDOW // m.MAX_CHUNK):
        gw._stream_msg(data(1, b"x" * m.MAX_CHUNK))
    assert s.reset
    assert sent(gw) == [m.Reset(tunnel="t1", stream=1,
                                reason="the peer overran its window")]


# -- writing: credit, pieces, half-close --------------------------------------------------
async def test_writes_wait_for_credit_and_go_in_chunks() -> None:
    gw = gateway()
    s, end = stream(gw, side="listen")  # the listen side starts without credit
    assert s.send.available == 0
    payload = os.urandom(3 * m.MAX_CHUNK + 5)
    buf = bytearray(payload)
    write = asyncio.ensure_future(end.send_all(memoryview(buf)))
    await asyncio.sleep(0)
    assert not write.done() and sent(gw) == []
    gw._stream_msg(m.Credit(tunnel="t1", stream=1, n=m.MAX_CHUNK + 10))
    await async_wait_until(lambda: gw.outbox.queued(end.key) == 2, 5,
                           what="the credited part queued")
    assert not write.done()  # the rest waits for more credit
    gw._stream_msg(m.Credit(tunnel="t1", stream=1, n=WINDOW))
    await asyncio.wait_for(write, 5)
    buf[:] = b"\0" * len(buf)  # the pump reuses its buffer: what was queued is a copy
    frames = sent(gw)
    assert all(isinstance(x, m.Data) and len(x.data) <= m.MAX_CHUNK for x in frames)
    assert [len(x.data) for x in frames[:2]] == [m.MAX_CHUNK, 10]
    assert b"".join(x.data for x in frames) == payload
    assert s.send.available == m.MAX_CHUNK + 10 + WINDOW - len(payload)


async def test_half_close_goes_behind_the_data_and_only_once_the_stream_lives() -> None:
    gw = gateway()
    s, end = stream(gw)
    await end.send_all(b"tail")
    await end.shutdown_write()
    assert s.sent_eof
    assert sent(gw) == [data(1, b"tail"), m.Eof(tunnel="t1", stream=1)]
    gw._abort(s, notify=False)
    with pytest.raises(ConnClosed):
        await end.shutdown_write()
    with pytest.raises(ConnClosed):
        await end.send_all(b"x")


async def test_a_reset_ends_a_write_waiting_for_credit_and_drops_what_waits() -> None:
    gw = gateway()
    _s, end = stream(gw, side="listen")
    gw._stream_msg(m.Credit(tunnel="t1", stream=1, n=10))
    write = asyncio.ensure_future(end.send_all(b"y" * 100))
    await async_wait_until(lambda: gw.outbox.queued(end.key) == 1, 5, what="10 bytes queued")
    gw._stream_msg(m.Reset(tunnel="t1", stream=1, reason="gone"))
    with pytest.raises(ConnClosed):
        await asyncio.wait_for(write, 5)
    assert gw.outbox.queued(end.key) == 0 and sent(gw) == []


async def test_abort_resets_the_stream_and_tells_the_peer_close_does_nothing() -> None:
    gw = gateway()
    s, end = stream(gw)
    await end.send_all(b"never sent")
    end.close()
    assert not s.reset and gw.outbox.queued(end.key) == 1
    end.abort()
    assert s.reset and gw.outbox.queued(end.key) == 0
    assert sent(gw) == [m.Reset(tunnel="t1", stream=1, reason="aborted")]
    end.abort()  # twice: nothing more
    assert sent(gw) == []


async def test_credit_opens_a_listen_sides_stream_and_a_reset_refuses_it() -> None:
    gw = gateway()
    s, _ = stream(gw, side="listen")
    s.opened = asyncio.get_running_loop().create_future()
    gw._stream_msg(m.Credit(tunnel="t1", stream=1, n=WINDOW))
    assert s.opened.result() is True and s.send.available == WINDOW
    s2, _ = stream(gw, side="listen", sid=2)
    s2.opened = asyncio.get_running_loop().create_future()
    gw._stream_msg(m.Reset(tunnel="t1", stream=2, reason="cannot reach it"))
    assert s2.opened.result() is False and s2.reset


# -- under the core's pump, against a real socket -----------------------------------------
async def peer_of(gw: Gateway, s: Stream, sink: hashlib._Hash, done: asyncio.Event) -> None:
    """Play the other gateway: take what the stream sends (granting credit as it
    goes), echo nothing, and note the stream's end."""
    while True:
        await gw.out_ready.wait()
        for msg in m.decode_to_server(gw.take()):
            if isinstance(msg, m.Data):
                sink.update(msg.data)
                gw._stream_msg(m.Credit(tunnel="t1", stream=s.id, n=len(msg.data)))
            elif isinstance(msg, m.Eof):
                done.set()


async def test_the_pump_moves_both_ways_through_a_stream_end_with_half_close() -> None:
    gw = gateway()
    s, end = stream(gw)
    a, b = socket.socketpair()
    a.setblocking(False)
    conn = Conn(a)
    up = hashlib.sha256()
    up_done = asyncio.Event()
    peer = asyncio.ensure_future(peer_of(gw, s, up, up_done))
    task = asyncio.ensure_future(pump.pump_raw(conn, end))
    loop = asyncio.get_running_loop()
    try:
        # socket -> stream: 3 MiB (more than a window: credit must flow)
        payload = os.urandom(3 << 20)
        b.setblocking(False)
        await loop.sock_sendall(b, payload)
        b.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(up_done.wait(), 30)
        assert up.hexdigest() == hashlib.sha256(payload).hexdigest()
        # stream -> socket: the peer's data, in window-sized steps, then its end
        down = os.urandom(WINDOW)
        for i in range(0, len(down), m.MAX_CHUNK):
            gw._stream_msg(data(1, down[i:i + m.MAX_CHUNK]))
        gw._stream_msg(m.Eof(tunnel="t1", stream=1))
        got = bytearray()
        while chunk := await loop.sock_recv(b, 1 << 16):
            got += chunk
        assert bytes(got) == down
        ab, ba = await asyncio.wait_for(task, 10)
        assert (ab, ba) == (len(payload), len(down))
    finally:
        peer.cancel()
        task.cancel()
        conn.close()
        b.close()


async def test_a_reset_from_the_peer_ends_the_pump_with_conn_closed() -> None:
    gw = gateway()
    _s, end = stream(gw)
    a, b = socket.socketpair()
    a.setblocking(False)
    conn = Conn(a)
    task = asyncio.ensure_future(pump.pump_raw(conn, end))
    try:
        await asyncio.sleep(0)
        gw._stream_msg(m.Reset(tunnel="t1", stream=1, reason="the real server closed"))
        with pytest.raises(ConnClosed):
            await asyncio.wait_for(task, 10)
    finally:
        conn.close()
        b.close()


async def test_a_socket_reset_under_the_pump_resets_the_stream_for_the_peer() -> None:
    """Gateway._pump: the real socket aborts (RST): the other side is told, with why,
    and the stream is gone from its tunnel."""
    import struct

    gw = gateway()
    s, _ = stream(gw)
    srv = socket.create_server(("127.0.0.1", 0))
    b = socket.create_connection(srv.getsockname())
    a, _ = srv.accept()
    srv.close()
    a.setblocking(False)
    s.conn = Conn(a)
    task = asyncio.ensure_future(gw._pump(s))
    b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    b.sendall(b"some bytes")
    b.close()  # with linger 0: a reset
    await asyncio.wait_for(task, 10)
    assert s.reset and 1 not in gw.tunnels["t1"].streams
    resets = [x for x in sent(gw) if isinstance(x, m.Reset)]
    assert len(resets) == 1 and resets[0].reason.startswith("connection error")


# -- write-through: data off the link straight into a waiting pump's socket ----------------
def pump_waits(s: Stream) -> bool:
    """The pump's task waits for this stream's data (the reader would wake it)."""
    return bool(s.wake._waiters)  # (asyncio.Event's waiters: no public view of them)


async def pumped(gw: Gateway, s: Stream, end: StreamEnd
                 ) -> tuple[socket.socket, Conn, asyncio.Future[tuple[int, int]]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    conn = s.conn = Conn(a)
    task = asyncio.ensure_future(pump.pump_raw(conn, end))
    await async_wait_until(lambda: pump_waits(s), 5, what="the pump waiting for data")
    return b, conn, task


async def test_a_streams_data_reaches_its_socket_without_a_turn_of_the_loop() -> None:
    """An interactive stream's bytes are written as they come off the link: handing
    them to the pump's task cost a turn of the event loop behind every callback due
    (bulk streams' reads), about a millisecond per gateway on a loaded machine."""
    gw = gateway()
    s, end = stream(gw)
    b, conn, task = await pumped(gw, s, end)
    try:
        gw._stream_msg(data(1, b"p"))
        assert b.recv(16) == b"p"  # at once: no await between
        assert not s.inbound
        # the bytes count as written: credit comes back as it would through the pump
        gw._stream_msg(data(1, b"x" * (WINDOW // 4 - 1)))
        assert sent(gw) == [m.Credit(tunnel="t1", stream=1, n=WINDOW // 4)]
    finally:
        task.cancel()
        conn.close()
        b.close()


async def test_write_through_keeps_order_when_the_socket_takes_only_part() -> None:
    gw = gateway()
    s, end = stream(gw)
    b, conn, task = await pumped(gw, s, end)
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    try:
        chunks = [os.urandom(m.MAX_CHUNK) for _ in range(4)]
        for c in chunks:  # the first fills the socket; the rest queue behind its tail
            gw._stream_msg(data(1, c))
        assert s.inbound
        gw._stream_msg(m.Eof(tunnel="t1", stream=1))
        loop = asyncio.get_running_loop()
        got = bytearray()
        while chunk := await loop.sock_recv(b, 1 << 16):
            got += chunk
        assert bytes(got) == b"".join(chunks)
        b.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(task, 10)  # both ways ended: the pump is done
    finally:
        task.cancel()
        conn.close()
        b.close()


async def test_without_the_fast_path_the_pump_writes_everything(monkeypatch) -> None:
    from kakehashi.switch import gateway as gwmod

    monkeypatch.setattr(gwmod, "WRITE_THROUGH", False)
    gw = gateway()
    s, end = stream(gw)
    b, conn, task = await pumped(gw, s, end)
    try:
        gw._stream_msg(data(1, b"p"))
        assert list(s.inbound) == [b"p"]  # for the pump's task, which writes it
        loop = asyncio.get_running_loop()
        assert await asyncio.wait_for(loop.sock_recv(b, 16), 5) == b"p"
    finally:
        task.cancel()
        conn.close()
        b.close()

"""The relay server's per-link outbox against the other writers of the same link.

A control message goes out directly when the link is idle (``_enqueue``), and when
the socket takes only part of it, the rest is sent from a task. Until that rest is
out, nothing else may be written to the link: a data frame the pump forwards from
the paired connection, or a frame written under the link's write lock, would land
inside the control message and the terminal would read garbage (its frame decoder
takes the data frame's bytes as the rest of the message).
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
from collections.abc import Callable

import pytest

from kakehashi.core import wire
from kakehashi.core.pump import FramedSink
from kakehashi.core.stream import Conn, FramedConn
from kakehashi.relay import messages as m
from kakehashi.relay.server import Link, RelayServer
from tests.support.relay_link import tls_pair
from tests.support.wait import async_wait_until


def _who_list(size: int) -> m.WhoList:
    """A user list page of about ``size`` encoded bytes (far more than a small
    socket buffer takes at once)."""
    users = [m.UserInfo(user=f"user{i:06d}", encryption="optional", services=["ssh"])
             for i in range(size // 60)]
    return m.WhoList(users=users)


async def _frames(sock: socket.socket, writers_done: Callable[[], bool]) -> list[wire.Frame]:
    """Everything the terminal receives until the writers are done, as frames (the
    decoder refuses garbage: an unknown frame type, an oversized control frame)."""
    received = bytearray()
    while True:
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            if writers_done():
                break
            await async_wait_until(
                lambda: writers_done() or select.select([sock], [], [], 0)[0], 10,
                what="more bytes for the terminal, or the writers' end")
            continue
        assert data, "the link was closed"
        received += data
    decoder = wire.FrameDecoder()
    decoder.feed(bytes(received))
    frames = list(decoder.frames())
    assert not decoder.buffered, "bytes left that make no whole frame"
    return frames


def _payload(msg: m.Msg) -> bytes:
    return m.RELAY_CODEC.encode(msg)[wire.HEADER_SIZE:]


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of loopback TCP sockets (what a terminal's link is)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        theirs = socket.create_connection(server.getsockname())
        mine, _ = server.accept()
    return mine, theirs


def _flushed(link: Link) -> bool:
    """Nothing of the link's left to send (its outbox, a partly sent message)."""
    return (link.flusher is None or link.flusher.done()) and not link.framed.write_lock.locked()


async def _link(server: RelayServer) -> tuple[Link, socket.socket]:
    """A link whose terminal (the returned socket) reads nothing yet, with a send
    buffer far smaller than a big control message."""
    mine, theirs = _tcp_pair()
    mine.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setblocking(False)
    link = Link(1, FramedConn(Conn(mine)))
    server.links[link.cid] = link
    return link, theirs


async def _a_data_frame_waits_for_the_rest_of_a_partly_sent_message() -> None:
    server = RelayServer(None)  # type: ignore[arg-type]  (no logins here)
    link, terminal = await _link(server)
    # the paired connection's reader has a data frame for this link (the pump's sink)
    src_mine, src_theirs = socket.socketpair()
    src = FramedConn(Conn(src_mine))
    payload = b"d" * 300
    src.received(wire.encode_header(wire.FrameType.DATA, len(payload)) + payload)
    assert src.decoder.next_header() == (wire.FrameType.DATA, len(payload))
    msg = _who_list(60_000)
    server._enqueue(link.cid, msg, 0.0)
    assert link.framed.bytes_out < len(m.RELAY_CODEC.encode(msg))  # only part went out
    forwarded = asyncio.create_task(FramedSink(link.framed).data(src, len(payload)))
    frames = await _frames(terminal, lambda: forwarded.done() and _flushed(link))
    await forwarded
    assert len(frames) == 2
    assert frames[0].type is wire.FrameType.CTRL
    assert m.TERMINAL_CODEC.decode(frames[0].payload) == msg
    assert (frames[1].type, frames[1].payload) == (wire.FrameType.DATA, payload)
    for s in (terminal, src_mine, src_theirs):
        s.close()
    link.framed.conn.close()


async def _a_locked_write_and_later_messages_keep_their_place() -> None:
    server = RelayServer(None)  # type: ignore[arg-type]
    link, terminal = await _link(server)
    first = _who_list(60_000)
    server._enqueue(link.cid, first, 0.0)
    # a frame written under the link's write lock (an inter-node hold, an error
    # report) right after the partial write, then another message
    hold = asyncio.create_task(link.framed.send(m.RELAY_CODEC.encode(m.Hold())))
    server._enqueue(link.cid, m.HoldAck(seq=7), 0.0)
    frames = await _frames(terminal, lambda: hold.done() and _flushed(link))
    await hold
    assert [f.type for f in frames] == [wire.FrameType.CTRL] * 3
    got = [f.payload for f in frames]
    assert got == [_payload(first), _payload(m.Hold()), _payload(m.HoldAck(seq=7))]
    terminal.close()
    link.framed.conn.close()


def test_a_data_frame_waits_for_the_rest_of_a_partly_sent_message(run):
    run(_a_data_frame_waits_for_the_rest_of_a_partly_sent_message())


def test_a_locked_write_and_later_messages_keep_their_place(run):
    run(_a_locked_write_and_later_messages_keep_their_place())


async def _the_result_and_close_notify_leave_in_the_pairing_step(home) -> None:
    from kakehashi.relay.control import LeaveTLS, Send

    mine, theirs = await tls_pair(home)
    server = RelayServer(None)  # type: ignore[arg-type]
    link = Link(1, FramedConn(mine))
    server.links[link.cid] = link
    result = m.Result(req=1, ok=True, peer="pi", cipher=m.CIPHER_SESSION, keys=bytes(32))
    # what the pairing's actions do on the requester's link, with no await between
    server._apply_now([Send(link.cid, result), LeaveTLS(link.cid)])
    # both are on the socket already: no task, no loop round trip (in which the relay
    # would serve other connections first) before the terminal can switch
    assert link.flusher is None and not link.outbox
    assert mine.left_tls_write
    framed = FramedConn(theirs)
    frame = await framed.read_frame()
    assert frame is not None and m.TERMINAL_CODEC.decode(frame.payload) == result
    assert await framed.read_frame() is None and theirs.tls_ended_by_peer  # close_notify
    mine.close()
    theirs.close()


def test_the_result_and_close_notify_leave_in_the_pairing_step(run, tmp_path, monkeypatch):
    from kakehashi.core.stream import half_close_ready

    if not half_close_ready():
        pytest.skip("no one-call close_notify in this Python/OpenSSL")
    monkeypatch.setenv("KAKEHASHI_HOME", str(tmp_path / "home"))
    run(_the_result_and_close_notify_leave_in_the_pairing_step(tmp_path / "home"))


async def _a_close_notify_the_terminal_does_not_take_closes_the_link(home) -> None:
    """The end of TLS the relay queues for a terminal (the session cipher's switch,
    a session's end) is bounded as a queued message is (``SEND_TIMEOUT``): a terminal
    that reads nothing gets its link closed. It waited for as long as the terminal did
    not read (the watchdog skips a link whose session runs under the session cipher),
    holding the link and its outbox."""
    from kakehashi.relay.control import LeaveTLS

    mine, theirs = await tls_pair(home)
    server = RelayServer(None)  # type: ignore[arg-type]
    link = Link(1, FramedConn(mine))
    link.task = serving = asyncio.ensure_future(asyncio.Event().wait())  # its reader
    server.links[link.cid] = link
    raw = mine.sock  # (the TLS connection took over the socket: written past TLS)
    raw.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:  # the terminal reads nothing: fill what the kernel holds for it
            socket.socket.send(raw, b"\0" * 65536)
    server._apply_now([LeaveTLS(link.cid)])
    assert link.flusher is not None  # (it could not go out at once)
    await async_wait_until(serving.done, 10,
                           what="the link closed: its terminal takes no close_notify")
    assert link.flusher.done() and not link.flusher.cancelled()
    mine.close()
    theirs.close()


def test_a_close_notify_the_terminal_does_not_take_closes_the_link(run, tmp_path,
                                                                   monkeypatch):
    from kakehashi.core.stream import half_close_ready
    from kakehashi.relay import server as server_module

    if not half_close_ready():
        pytest.skip("no one-call close_notify in this Python/OpenSSL")
    monkeypatch.setenv("KAKEHASHI_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(server_module, "SEND_TIMEOUT", 0.05)
    run(_a_close_notify_the_terminal_does_not_take_closes_the_link(tmp_path / "home"))

"""The terminal's EarlySink (relay/agent.py) holds what a paired peer sends before this
side's session writes to its application, and hands over to the session's own sink
without losing a byte."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import termios

from kakehashi.core import wire
from kakehashi.core.stream import Conn, FramedConn
from kakehashi.relay import messages as m
from kakehashi.relay import terminal as t
from kakehashi.relay.agent import EarlySink, RelayLink, TerminalConfig, run_session
from tests.support.wait import async_wait_until


def _readable_bytes(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


async def _a_frame_arriving_while_the_session_takes_over_is_not_lost() -> None:
    """The session takes over from the sink while a frame's payload is still arriving
    into it (the peer's first bytes in a frame larger than one read: a service that
    speaks first with a lot, a requester's bulk upload behind an optimistic accept).
    The session used to find the sink empty, put its own in place and leave that
    frame behind in the sink nobody read: a silent hole in the stream."""
    mine, relay = socket.socketpair()
    app_sock, client = socket.socketpair()
    for s in (mine, relay, app_sock, client):
        s.setblocking(False)
    loop = asyncio.get_running_loop()
    first = bytes(range(256)) * 800  # 200 KiB: more than one read
    rest = b"and the rest" * 1000
    session = None
    try:
        link = RelayLink(TerminalConfig(server="127.0.0.1", port=1, user="u", password="p"))
        link.framed = FramedConn(Conn(mine))
        link.t.login("u", "p")
        link.t.receive(m.LoginOk(conn_id=1, token="tok", encryption="off", keepalive=15.0,
                                 dead_after=45.0))
        link.t.connect("bob")
        info = link.t.receive(m.Result(req=1, ok=True, peer="bob"))
        assert isinstance(info, t.Connected)
        await link._dispatch(info)  # what the reader does with the result: an EarlySink
        link.reader = asyncio.ensure_future(link._read_loop())
        frame = wire.encode_frame(wire.FrameType.DATA, first)
        await loop.sock_sendall(relay, frame[:64 * 1024])  # the frame's first part only
        await async_wait_until(lambda: _readable_bytes(mine) == 0,
                               what="the link's reader waiting inside the frame")
        session = asyncio.ensure_future(run_session(link, Conn(app_sock), info,
                                                    initiator=True))
        # the session has taken over (old code), or waits for the frame to land
        await async_wait_until(lambda: not isinstance(link.sink, EarlySink)
                               or getattr(link.sink, "receiving", False),
                               what="the session starting")
        await loop.sock_sendall(relay, frame[64 * 1024:])
        await loop.sock_sendall(relay, wire.encode_frame(wire.FrameType.DATA, rest))
        await loop.sock_sendall(relay, wire.encode_frame(wire.FrameType.EOF))
        got = bytearray()
        while True:
            chunk = await asyncio.wait_for(loop.sock_recv(client, 1 << 20), 30)
            if not chunk:
                break
            got += chunk
        assert bytes(got) == first + rest, (len(got), len(first) + len(rest))
    finally:
        for task in (session, getattr(link, "reader", None)):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        for s in (mine, relay, app_sock, client):
            s.close()


def test_a_frame_arriving_while_the_session_takes_over_is_not_lost(run) -> None:
    run(_a_frame_arriving_while_the_session_takes_over_is_not_lost())

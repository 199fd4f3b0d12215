"""The terminal's EarlySink (relay/agent.py) holds what a paired peer sends before this
side's session writes to its application: under optimistic pairing while the service
is still being connected, and while the session writes the first bytes to a service
that is slow to read them.

It must hold those bytes back as every other path of the product does (backpressure:
the link's reader waits, so the relay and the peer wait), bounded: it used to read on
regardless and end the session once 4 MiB had piled up ("peer sent too much before the
session began") - a requester sending a bulk stream at once to a service that took a
moment to read lost its session, and every such session held 4 MiB on the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket

from kakehashi.core import wire
from kakehashi.core.pump import forward_frames
from kakehashi.core.stream import Conn, FramedConn
from kakehashi.relay.agent import EarlySink, EndMark, run_session
from tests.support.relay_link import paired_link, readable_bytes
from tests.support.wait import async_wait_until

#: far more than the sink held before it gave up (4 MiB) and than the socket buffers
TOTAL = 12 * 1024 * 1024
FRAME = 64 * 1024


async def _no_ctrl(payload: bytes) -> bool:
    raise AssertionError("no control message expected")


async def _a_peer_faster_than_the_session_is_held_back() -> None:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.setblocking(False)
    framed, sender = FramedConn(Conn(ours)), FramedConn(Conn(peer))
    sink = EarlySink()
    sent = hashlib.sha256()

    async def send() -> None:
        for i in range(TOTAL // FRAME):
            chunk = bytes([i % 251]) * FRAME
            sent.update(chunk)
            await sender.send_frame(wire.FrameType.DATA, chunk)
        await sender.send_frame(wire.FrameType.EOF)
        peer.shutdown(socket.SHUT_WR)

    writer = asyncio.ensure_future(send())
    reader = asyncio.ensure_future(forward_frames(framed, lambda: sink, _no_ctrl))
    try:
        # nobody takes anything yet (a service still being connected): the reader
        # stops reading once the sink holds its window, instead of failing the link
        await async_wait_until(lambda: reader.done() or getattr(sink, "waiting", False),
                               timeout=30, what="the sink holding the reader back")
        assert not reader.done(), reader.exception()
        assert sink.size <= EarlySink.WINDOW + FRAME
        got, held_max = hashlib.sha256(), 0
        while True:  # the session takes the bytes at last, slowly: all come, in order
            held_max = max(held_max, sink.size)
            item = await sink.get(30)
            if isinstance(item, EndMark):
                break
            got.update(item)
        assert got.hexdigest() == sent.hexdigest()
        assert held_max <= EarlySink.WINDOW + FRAME
        assert await asyncio.wait_for(reader, 30) == "eof"
        await asyncio.wait_for(writer, 30)
    finally:
        for task in (reader, writer):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        ours.close()
        peer.close()


def test_a_peer_faster_than_the_session_is_held_back(run) -> None:
    run(_a_peer_faster_than_the_session_is_held_back())


async def _closing_the_sink_lets_a_held_reader_go() -> None:
    """A held reader is let go when the sink is given up (an optimistic accept whose
    service failed replaces it to read the relay's release reply; a link closing)."""
    sink = EarlySink()
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.setblocking(False)
    framed, sender = FramedConn(Conn(ours)), FramedConn(Conn(peer))
    try:
        send = asyncio.ensure_future(
            sender.send_frame(wire.FrameType.DATA, b"x" * (EarlySink.WINDOW + 1)))
        header = await asyncio.wait_for(framed.read_header(exact=True), 30)
        assert header is not None
        held = asyncio.ensure_future(sink.data(framed, header[1]))
        await async_wait_until(lambda: sink.waiting or held.done(), what="the reader held")
        assert not held.done()
        sink.close()
        await asyncio.wait_for(held, 30)
        await asyncio.wait_for(send, 30)
    finally:
        ours.close()
        peer.close()


def test_closing_the_sink_lets_a_held_reader_go(run) -> None:
    run(_closing_the_sink_lets_a_held_reader_go())


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
        link, info = paired_link(mine)
        await link._dispatch(info)  # what the reader does with the result: an EarlySink
        link.reader = asyncio.ensure_future(link._read_loop())
        frame = wire.encode_frame(wire.FrameType.DATA, first)
        await loop.sock_sendall(relay, frame[:64 * 1024])  # the frame's first part only
        await async_wait_until(lambda: readable_bytes(mine) == 0,
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

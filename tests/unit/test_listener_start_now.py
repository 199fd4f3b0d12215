"""Connections taken without a task: Listener's ``start_now`` offer, the mux's routing
of it, and the gateway's one-request connections served whole from callbacks (with
the fast lane on and off)."""

from __future__ import annotations

import asyncio
import gc
import socket
import weakref

import pytest

from kakehashi.core.mux import ProtocolMux, prefix_matcher
from kakehashi.core.stream import Conn, Held, Listener
from kakehashi.gateway import fastlane, server
from kakehashi.gateway.allow import AllowList
from kakehashi.gateway.http import looks_like_request
from tests.support.wait import async_wait_until


class Holder:
    """A handler that keeps every connection offered to it, for the test to end."""

    def __init__(self) -> None:
        self.held: list[Held] = []
        self.aborted: list[Held] = []
        self.by_task: list[Conn] = []

    async def __call__(self, conn: Conn) -> None:  # (no start_now: never used here)
        raise AssertionError("the coroutine path was not expected")

    def start_now(self, conn: Conn, held: Held):
        self.held.append(held)
        held.abort = lambda: self.aborted.append(held)
        return None


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


def _client(port: int, data: bytes = b"") -> socket.socket:
    """A client that connects and sends at once, before the loop runs again - as a
    client in another process does, whose bytes arrive right after its connect."""
    sock = socket.create_connection(("127.0.0.1", port))
    if data:
        sock.sendall(data)
    sock.setblocking(False)
    return sock


async def _read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    got = b""
    while True:
        data = await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
        if not data:
            sock.close()
            return got
        got += data


async def test_a_held_connection_counts_until_it_ends_and_is_then_closed():
    handler = Holder()
    listener = Listener("127.0.0.1", 0, handler, max_connections=1)
    listener.start()
    try:
        r1, w1 = await _connect(listener.address[1])
        await async_wait_until(lambda: len(handler.held) == 1, what="the first offer")
        assert listener.active == 1 and listener.per_client == {"127.0.0.1": 1}
        r2, w2 = await _connect(listener.address[1])  # waits in the backlog
        # the second is offered only once the first has ended (max_connections=1)
        handler.held[0].end()
        assert await asyncio.wait_for(r1.read(), 10) == b""  # closed by the listener
        await async_wait_until(lambda: len(handler.held) == 2, what="the second offer")
        assert listener.active == 1 and listener.per_client == {"127.0.0.1": 1}
        handler.held[1].end()
        assert await asyncio.wait_for(r2.read(), 10) == b""
        assert listener.active == 0 and listener.per_client == {}
        for w in (w1, w2):
            w.close()
    finally:
        await listener.close()


async def test_a_held_connection_goes_on_in_a_task_and_closing_aborts_the_others():
    handler = Holder()
    listener = Listener("127.0.0.1", 0, handler)
    listener.start()
    try:
        r1, w1 = await _connect(listener.address[1])
        r2, w2 = await _connect(listener.address[1])
        await async_wait_until(lambda: len(handler.held) == 2, what="both offers")
        first = handler.held[0]

        async def goes_on() -> None:
            await first.conn.send_all(b"from a task")

        first.to_task(goes_on())
        assert await asyncio.wait_for(r1.read(), 10) == b"from a task"  # then closed
        await async_wait_until(lambda: listener.active == 1, what="the task's end")
    finally:
        await listener.close()
    assert handler.aborted == [handler.held[1]]  # the one still held
    assert await asyncio.wait_for(r2.read(), 10) == b""
    assert listener.active == 0 and listener.per_client == {}
    for w in (w1, w2):
        w.close()


async def test_the_mux_offers_a_connection_to_the_route_its_first_bytes_choose():
    offered: list[bytes] = []
    by_coroutine: list[bytes] = []
    mux = ProtocolMux(timeout=5)

    def start_now(conn: Conn, held: Held):
        offered.append(conn.sock.recv(100))
        held.end()
        return None

    async def coroutine(conn: Conn) -> None:
        by_coroutine.append(await conn.recv(100))

    mux.add("quick", prefix_matcher(b"QUICK"), coroutine, start_now=start_now)
    mux.add("slow", prefix_matcher(b"SLOW"), coroutine)
    listener = Listener("127.0.0.1", 0, mux)
    listener.start()
    try:
        for data in (b"QUICK one", b"SLOW two"):
            assert await _read_all(_client(listener.address[1], data)) == b""
        # a client that says nothing at first: the mux's coroutine routes it once it
        # speaks (to the route's coroutine handler)
        r, w = await _connect(listener.address[1])
        await async_wait_until(lambda: listener.active == 1, what="the silent client")
        w.write(b"QUICK three")
        await w.drain()
        assert await asyncio.wait_for(r.read(), 10) == b""
        w.close()
    finally:
        await listener.close()
    assert offered == [b"QUICK one"]
    assert by_coroutine == [b"SLOW two", b"QUICK three"]


# -- the gateway: one request per connection ------------------------------------------
async def _one_shots(lane: bool, n: int, monkeypatch) -> dict:
    """``n`` one-request connections (``Connection: close``) through a gateway behind
    a mux, as ``gateway serve`` composes them; what the listener and the lanes did."""
    tasks: list[object] = []
    real_task = Listener._start_task

    def counted(self, work):
        tasks.append(work)
        return real_task(self, work)

    monkeypatch.setattr(Listener, "_start_task", counted)
    lanes: list[weakref.ref] = []
    real_init = fastlane.FastLane.__init__

    def recorded(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        lanes.append(weakref.ref(self))

    monkeypatch.setattr(fastlane.FastLane, "__init__", recorded)

    async def origin(reader, writer):
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    osrv = await asyncio.start_server(origin, "127.0.0.1", 0)
    oport = osrv.sockets[0].getsockname()[1]
    gw = server.GatewayServer(AllowList(["127.0.0.1"]),
                              settings=server.GatewaySettings(fast_lane=lane))
    mux = ProtocolMux(timeout=5)
    mux.add("http", looks_like_request, gw.handle_connection, start_now=gw.start_now)
    listener = Listener("127.0.0.1", 0, mux)
    listener.start()
    answers = []
    try:
        req = (f"GET http://127.0.0.1:{oport}/ HTTP/1.1\r\nHost: 127.0.0.1:{oport}\r\n"
               f"Connection: close\r\n\r\n").encode()
        for _ in range(n):
            answers.append(await _read_all(_client(listener.address[1], req)))
        await async_wait_until(lambda: listener.active == 0, what="every connection's end")
        held_left = len(listener.held)
        per_client = dict(listener.per_client)
    finally:
        await listener.close()
        gw.close()
        osrv.close()
    return {"answers": answers, "tasks": len(tasks), "lanes": lanes, "held": held_left,
            "per_client": per_client, "requests": gw.requests, "reused": gw.pool.reused}


@pytest.mark.parametrize("lane", [True, False])
async def test_one_request_connections_are_answered_with_the_lane_on_and_off(
        lane, monkeypatch):
    got = await _one_shots(lane, 12, monkeypatch)
    assert [a.endswith(b"\r\n\r\nok") and a.startswith(b"HTTP/1.1 200 OK")
            for a in got["answers"]] == [True] * 12
    assert all(b"connection: close" in a.lower() for a in got["answers"])
    assert got["requests"] == 12 and got["held"] == 0 and got["per_client"] == {}
    assert got["reused"] >= 11  # the upstream went back to the pool each time
    if lane:
        # only the first connection (its upstream had to be opened) needed a task
        assert got["tasks"] == 1
    else:
        assert got["tasks"] == 12


async def test_a_lane_served_without_a_task_leaves_no_reference_cycle(monkeypatch):
    """Each one-request connection's lane (and what it refers to) is freed when the
    connection ends, without the cycle collector: cycles per connection made
    collections that stalled the gateway for tens of milliseconds under load."""
    gc.disable()
    try:
        got = await _one_shots(True, 6, monkeypatch)
        assert got["tasks"] == 1
        assert [ref() for ref in got["lanes"]] == [None] * len(got["lanes"])
    finally:
        gc.enable()

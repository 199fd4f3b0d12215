"""The one-port protocol multiplexer, over real loopback sockets."""

from __future__ import annotations

import asyncio

import pytest

from kakehashi.core import tls
from kakehashi.core.mux import ProtocolMux, prefix_matcher
from kakehashi.core.stream import Conn, Listener, open_tcp, start_tls
from tests.support.wait import async_wait_until


async def _serve(mux: ProtocolMux) -> tuple[Listener, int]:
    listener = Listener("127.0.0.1", 0, mux)
    listener.start()
    return listener, listener.address[1]


def _mux(tls_ctx=None) -> ProtocolMux:
    mux = ProtocolMux(tls=tls_ctx, timeout=2)

    def replier(tag: bytes):
        async def handle(conn: Conn) -> None:
            data = await conn.recv(100)  # the sniffed bytes are still there
            await conn.send_all(tag + data)

        return handle

    mux.add("kkh", prefix_matcher(b"KKH"), replier(b"relay:"))
    mux.add("http", prefix_matcher(b"GET ", b"POST ", b"CONNECT "), replier(b"http:"))
    mux.fallback = replier(b"other:")
    return mux


@pytest.mark.parametrize(("send", "expect"), [
    (b"KKH\x01hello", b"relay:KKH\x01hello"),
    (b"GET / HTTP/1.1\r\n\r\n", b"http:GET / HTTP/1.1\r\n\r\n"),
    (b"CONNECT x:1 HTTP/1.1\r\n\r\n", b"http:CONNECT x:1 HTTP/1.1\r\n\r\n"),
    (b"SSH-2.0-OpenSSH\r\n", b"other:SSH-2.0-OpenSSH\r\n"),
])
async def test_routes_by_first_bytes_without_consuming(send, expect):
    listener, port = await _serve(_mux())
    try:
        conn = await open_tcp("127.0.0.1", port)
        await conn.send_all(send)
        assert await asyncio.wait_for(conn.recv(200), 5) == expect
        conn.close()
    finally:
        await listener.close()


async def test_bytes_trickling_in_are_waited_for():
    listener, port = await _serve(_mux())
    try:
        conn = await open_tcp("127.0.0.1", port)
        await conn.send_all(b"K")
        await asyncio.sleep(0.05)  # separate segments (what is tested: partial input)
        await conn.send_all(b"KH\x01")
        assert await asyncio.wait_for(conn.recv(200), 5) == b"relay:KKH\x01"
        conn.close()
    finally:
        await listener.close()


async def test_tls_then_sniff_again_inside(tmp_path, monkeypatch):
    monkeypatch.setenv("KAKEHASHI_HOME", str(tmp_path))
    listener, port = await _serve(_mux(tls.server_context()))
    try:
        conn = await open_tcp("127.0.0.1", port)
        ctx = tls.client_context(tls.DevCA().ca_path)
        conn = await start_tls(conn, ctx, server_side=False, server_hostname="localhost")
        await conn.send_all(b"KKH\x01inside")
        assert await asyncio.wait_for(conn.recv(200), 5) == b"relay:KKH\x01inside"
        conn.close()
    finally:
        await listener.close()


async def test_silent_connection_is_dropped():
    listener, port = await _serve(_mux())
    try:
        conn = await open_tcp("127.0.0.1", port)
        assert await asyncio.wait_for(conn.recv(10), 5) == b""  # closed after the timeout
        conn.close()
    finally:
        await listener.close()


def test_prefix_matcher_needs_more_bytes():
    match = prefix_matcher(b"CONNECT ")
    assert match(b"CON") is None and match(b"CONNECT x") is True and match(b"GET") is False


def _grammar_mux() -> ProtocolMux:
    """The gateway's composition: the relay preamble and HTTP by its request-line grammar."""
    from kakehashi.core import wire
    from kakehashi.gateway.http import looks_like_request

    mux = _mux()
    mux.routes.clear()
    mux.add("kkh", prefix_matcher(wire.MAGIC), _mux().routes[0].handler)
    mux.add("http", looks_like_request, _mux().routes[1].handler)
    return mux


@pytest.mark.parametrize("send", [
    b"PROPFIND http://h/dav/ HTTP/1.1\r\nHost: h\r\nDepth: 1\r\n\r\n",
    b"M-SEARCH * HTTP/1.1\r\n\r\n",
    b"QUERY http://h/q HTTP/1.1\r\n\r\n",
    b"A-METHOD-WITH-A-LONG-NAME-NOBODY-KNOWS /x HTTP/1.1\r\n\r\n",
])
async def test_http_is_recognised_by_its_grammar_not_a_method_list(send):
    listener, port = await _serve(_grammar_mux())
    try:
        conn = await open_tcp("127.0.0.1", port)
        await conn.send_all(send)
        assert await asyncio.wait_for(conn.recv(200), 5) == b"http:" + send
        conn.close()
    finally:
        await listener.close()


async def test_a_request_line_trickling_in_is_waited_for_and_the_relay_still_routes():
    from kakehashi.core import wire

    listener, port = await _serve(_grammar_mux())
    try:
        conn = await open_tcp("127.0.0.1", port)
        for piece in (b"MKCAL", b"ENDAR /cal", b"/ HTTP/1", b".1\r\n\r\n"):
            await conn.send_all(piece)
            await asyncio.sleep(0.02)  # separate segments (what is tested: partial input)
        got = b""
        while len(got) < 5:
            got += await asyncio.wait_for(conn.recv(200), 5)
        assert got.startswith(b"http:MKCAL")
        conn.close()
        conn = await open_tcp("127.0.0.1", port)
        await conn.send_all(wire.PREAMBLE + b"x")
        assert await asyncio.wait_for(conn.recv(200), 5) == b"relay:" + wire.PREAMBLE + b"x"
        conn.close()
    finally:
        await listener.close()


async def test_half_a_greeting_then_a_close_is_let_go_at_once():
    """A peek never shows the FIN behind the bytes: the mux must not wait out its
    timeout (holding a connection slot) for bytes that cannot come."""
    mux = _grammar_mux()
    mux.timeout = 30
    mux.fallback = None
    listener, port = await _serve(mux)
    try:
        conn = await open_tcp("127.0.0.1", port)
        await conn.send_all(b"PROPF")
        await conn.shutdown_write()
        try:  # closed with the greeting unread: an EOF or a reset, in time either way
            assert await asyncio.wait_for(conn.recv(10), 5) == b""  # not after 30 s
        except ConnectionResetError:
            pass
        conn.close()
    finally:
        await listener.close()


async def test_a_dribbled_request_line_costs_few_peeks():
    """A sender that stops in the middle of a request line is peeked at less and less
    often until the timeout (not every 5 ms: 20,000 such connections would spin)."""
    mux = _grammar_mux()
    mux.timeout = 1.0
    mux.fallback = None
    peeks = 0
    decided = mux._decided

    def counting(head: bytes) -> bool:
        nonlocal peeks
        peeks += 1
        return decided(head)

    mux._decided = counting  # type: ignore[method-assign]
    listener, port = await _serve(mux)
    try:
        conn = await open_tcp("127.0.0.1", port)
        await conn.send_all(b"GET /a-long-path-that-stops")
        try:  # cut at the mux's timeout (a reset: the bytes were never read)
            assert await asyncio.wait_for(conn.recv(10), 5) == b""
        except ConnectionResetError:
            pass
        conn.close()
        assert 3 <= peeks <= 20, peeks  # a fixed 5 ms pause would have made ~200
    finally:
        await listener.close()


async def test_a_burst_of_connections_is_accepted_and_the_limit_still_holds():
    """The listener takes many connections per wake-up; --max-connections still
    bounds how many are served at once (the rest wait in the backlog) and every
    one is served in the end."""
    active = peak = 0
    release = asyncio.Event()

    async def handle(conn: Conn) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            await release.wait()
            await conn.send_all(b"ok")
        finally:
            active -= 1

    listener = Listener("127.0.0.1", 0, handle, max_connections=20)
    listener.start()
    port = listener.address[1]
    try:
        clients = [await open_tcp("127.0.0.1", port) for _ in range(150)]
        await async_wait_until(lambda: active >= 20, 10, what="20 handlers active")
        assert len(listener.tasks) == 20  # the limit, not the burst
        release.set()
        async with asyncio.timeout(20):
            replies = [await c.recv(10) for c in clients]
        assert replies == [b"ok"] * 150 and peak == 20
        for c in clients:
            c.close()
    finally:
        await listener.close()


async def test_tls_tickets_of_rotated_keys_are_not_taken_back(tmp_path, monkeypatch):
    """A listener's TLS from a :class:`tls.TicketKeys` (the gateway's ``--tls`` and the
    relay it carries): a client's second connection resumes its first session; once the
    keys are due, a new context answers and the old ticket gets a full handshake (a
    context's own keys would otherwise last as long as the process)."""
    monkeypatch.setenv("KAKEHASHI_HOME", str(tmp_path))
    now = [0.0]
    keys = tls.TicketKeys(lambda: tls.server_context(cache=False), lifetime=60.0,
                          clock=lambda: now[0])
    listener, port = await _serve(_mux(keys))
    client, cache = tls.client_context(tls.DevCA().ca_path, cache=False), tls.SessionCache()

    async def one() -> bool:
        conn = await open_tcp("127.0.0.1", port)
        conn = await start_tls(conn, client, server_side=False, server_hostname="localhost",
                               sessions=cache)
        await conn.send_all(b"KKH\x01x")
        assert await asyncio.wait_for(conn.recv(200), 5) == b"relay:KKH\x01x"
        conn.keep_session()  # (the tickets came before the reply)
        conn.close()
        return conn.resumed

    try:
        assert [await one(), await one()] == [False, True]
        now[0] = 61.0
        assert [await one(), await one()] == [False, True]
        assert keys.rotations == 1 and (cache.full, cache.resumed) == (2, 2)
    finally:
        await listener.close()

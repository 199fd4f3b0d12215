"""The one-port protocol multiplexer, over real loopback sockets."""

from __future__ import annotations

import asyncio

import pytest

from kakehashi.core import tls
from kakehashi.core.mux import ProtocolMux, prefix_matcher
from kakehashi.core.stream import Conn, Listener, open_tcp, start_tls


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
        await asyncio.sleep(0.05)
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

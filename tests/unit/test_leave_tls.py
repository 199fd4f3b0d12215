"""Leaving TLS in place (the relay's session cipher; STARTTLS in reverse): each side
sends close_notify at an agreed point and writes plain TCP behind it; each reads TLS
records until the peer's close_notify, then plain TCP. OpenSSL must not read ahead past
the peer's close_notify: bytes written right behind it (in the same segment) belong to
the plain connection and must all arrive there, in order."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
from pathlib import Path

import pytest

from kakehashi.core.stream import Conn, DirectTLSConn, half_close_ready, start_tls
from kakehashi.core.tls import client_context, server_context

pytestmark = pytest.mark.skipif(not half_close_ready(),
                                reason="no one-call close_notify in this Python/OpenSSL")


@pytest.fixture
def ctx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    monkeypatch.setenv("KAKEHASHI_HOME", str(tmp_path / "home"))
    return server_context(names=["localhost"])


async def _pair(ctx: ssl.SSLContext, home: Path) -> tuple[DirectTLSConn, DirectTLSConn]:
    a, b = socket.socketpair()
    server, client = await asyncio.gather(
        start_tls(Conn(a), ctx, server_side=True, timeout=10, framed=True),
        start_tls(Conn(b), client_context(ca=home / "ca" / "ca.pem"), server_side=False,
                  server_hostname="localhost", timeout=10, framed=True))
    assert isinstance(server, DirectTLSConn) and isinstance(client, DirectTLSConn)
    return server, client


async def _read_all(conn: Conn) -> bytes:
    got = bytearray()
    buf = memoryview(bytearray(256 * 1024))  # large reads: a read-ahead would show
    while n := await conn.recv_into(buf):
        got += buf[:n]
    return bytes(got)


async def test_plain_bytes_right_behind_close_notify_reach_the_plain_connection(ctx, tmp_path):
    server, client = await _pair(ctx, tmp_path / "home")
    assert server.can_leave_tls and client.can_leave_tls
    inside_down, plain_down = os.urandom(100_000), os.urandom(300_000)
    inside_up, plain_up = os.urandom(70_000), os.urandom(200_000)

    async def relay_side() -> bytes:
        async def send() -> None:
            # inside TLS, close_notify, plain bytes: back to back, no wait between
            await server.send_all(inside_down)
            await server.leave_tls_write()
            await server.send_all(plain_down)

        sender = asyncio.create_task(send())
        got = await _read_all(server)  # the terminal's TLS records up to its close_notify
        assert got == inside_up and server.tls_ended_by_peer
        await sender  # (the driver swaps under the write lock: no write in flight)
        plain = server.left_tls()
        assert plain.plain
        await plain.shutdown_write()
        rest = await _read_all(plain)
        plain.close()
        return rest

    async def terminal_side() -> bytes:
        sender = asyncio.create_task(client.send_all(inside_up))  # still TLS
        got = await _read_all(client)
        assert got == inside_down and client.tls_ended_by_peer
        await sender
        await client.leave_tls_write()  # answer, then plain TCP both ways
        plain = client.left_tls()

        async def send() -> None:
            await plain.send_all(plain_up)
            await plain.shutdown_write()

        sender = asyncio.create_task(send())
        rest = await _read_all(plain)
        await sender
        plain.close()
        return rest

    up, down = await asyncio.gather(relay_side(), terminal_side())
    assert hashlib.sha256(up).digest() == hashlib.sha256(plain_up).digest()
    assert hashlib.sha256(down).digest() == hashlib.sha256(plain_down).digest()


async def test_not_left_until_both_close_notify_are_through(ctx, tmp_path):
    server, client = await _pair(ctx, tmp_path / "home")
    with pytest.raises(ValueError):
        server.left_tls()
    await server.leave_tls_write()
    with pytest.raises(ValueError):
        server.left_tls()  # the peer's close_notify has not been read
    assert await _read_all(client) == b""
    await client.leave_tls_write()
    await client.shutdown_write()  # past close_notify: a FIN only, no second alert
    client.left_tls().close()
    assert await _read_all(server) == b""
    server.left_tls().close()

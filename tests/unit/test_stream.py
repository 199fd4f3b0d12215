"""core.stream: connections that fail their TLS handshake leave nothing behind."""

from __future__ import annotations

import asyncio
import gc
import socket
import ssl
from pathlib import Path

import pytest

from kakehashi.core.stream import Conn, ConnClosed, TLSConn, start_tls
from kakehashi.core.tls import server_context


@pytest.fixture
def ctx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    monkeypatch.setenv("KAKEHASHI_HOME", str(tmp_path / "home"))
    return server_context(names=["localhost"])


def _live_tls_conns() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, TLSConn))


#: the first bytes of a TLS ClientHello record: enough for the server to start
PARTIAL_HELLO = bytes.fromhex("160301020001") + b"\x00" * 8


@pytest.mark.parametrize("first", [b"", PARTIAL_HELLO], ids=["silent", "partial-hello"])
async def test_failed_server_handshake_leaves_no_cycle(ctx, first):
    """A client that closes before (or during) the handshake: its TLS state is freed by
    reference counting at once, not by a cyclic collection that may come much later
    (each left-over SSL object holds tens of kilobytes of buffers)."""
    gc.collect()
    before = _live_tls_conns()
    gc.disable()
    try:
        for _ in range(20):
            a, b = socket.socketpair()
            if first:
                b.sendall(first)
            b.close()
            conn = Conn(a)
            with pytest.raises((ConnClosed, ssl.SSLError, OSError)):
                await start_tls(conn, ctx, server_side=True, timeout=5)
            conn.close()
            del conn
        assert _live_tls_conns() == before
    finally:
        gc.enable()


async def test_silent_client_costs_no_tls_state(ctx, monkeypatch):
    """A server builds no SSL object for a connection that never sends a byte."""
    made: list[object] = []

    def record(self, *args, **kwargs):
        made.append(self)
        raise RuntimeError("TLS state built for a client that sent nothing")

    monkeypatch.setattr(TLSConn, "__init__", record)
    a, b = socket.socketpair()
    b.close()
    conn = Conn(a)
    with pytest.raises(ConnClosed):
        await start_tls(conn, ctx, server_side=True, timeout=5)
    conn.close()
    assert made == []


def test_frames_are_parsed_only_by_the_wire_codec():
    """One frame codec in production (issue 7, item 18): FramedConn reads through
    wire.FrameDecoder (the fuzzed one), and nothing else in the package decodes frame
    headers or reaches into a connection's read buffer."""
    import kakehashi
    from kakehashi.core import wire
    from kakehashi.core.stream import FramedConn

    assert FramedConn.__init__.__code__.co_names.count("FrameDecoder") == 1
    package = Path(kakehashi.__file__).parent
    offenders = []
    for path in package.rglob("*.py"):
        if path.name == "wire.py":
            continue
        text = path.read_text()
        for needle in ("decode_header(", "_rbuf", "HEADER.unpack", "limits.check("):
            if needle in text:
                offenders.append(f"{path.relative_to(package)}: {needle}")
    assert offenders == []
    assert wire.FrameDecoder.next_header and wire.FrameDecoder.take_payload


async def _tls_pair(ctx: ssl.SSLContext, home: Path) -> tuple[Conn, Conn]:
    from kakehashi.core.tls import client_context

    a, b = socket.socketpair()
    client_ctx = client_context(ca=home / "ca" / "ca.pem")
    server, client = await asyncio.gather(
        start_tls(Conn(a), ctx, server_side=True, timeout=10),
        start_tls(Conn(b), client_ctx, server_side=False, server_hostname="localhost",
                  timeout=10),
    )
    return server, client


async def test_tls_half_close_keeps_the_other_direction(ctx, tmp_path):
    """A TLS stream that ends one way while the other way is still sending loses
    nothing of the other way (the close_notify must not swallow records in flight),
    and bulk data arrives intact through reads that take many records at once."""
    import hashlib

    server, client = await _tls_pair(ctx, tmp_path / "home")
    data = bytes(range(256)) * (8 << 12)  # 8 MiB: far more than the socket buffers

    async def send() -> None:
        await server.send_all(data)
        await server.shutdown_write()

    async def receive() -> bytes:
        got = bytearray()
        buf = memoryview(bytearray(256 * 1024))
        while n := await client.recv_into(buf):
            got += buf[:n]
            if len(got) >= 64 * 1024 and not client_closed:
                client_closed.append(True)
                await client.shutdown_write()  # half-close in the middle of the stream
        return bytes(got)

    client_closed: list[bool] = []
    sender = asyncio.create_task(send())
    got = await receive()
    await sender
    assert client_closed
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    assert await server.recv(100) == b""  # the client's end arrived as EOF
    server.close()
    client.close()

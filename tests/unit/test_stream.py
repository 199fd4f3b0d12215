"""core.stream: connections that fail their TLS handshake leave nothing behind."""

from __future__ import annotations

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

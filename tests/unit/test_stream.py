"""core.stream: connections that fail their TLS handshake leave nothing behind."""

from __future__ import annotations

import asyncio
import gc
import socket
import ssl
from pathlib import Path

import pytest

from kakehashi.core.stream import Conn, ConnClosed, DirectTLSConn, TLSConn, start_tls
from kakehashi.core.tls import server_context
from tests.support.wait import async_wait_until


@pytest.fixture
def ctx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    monkeypatch.setenv("KAKEHASHI_HOME", str(tmp_path / "home"))
    return server_context(names=["localhost"])


def _live_tls_conns() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, TLSConn))


#: the first bytes of a TLS ClientHello record: enough for the server to start
PARTIAL_HELLO = bytes.fromhex("160301020001") + b"\x00" * 8


@pytest.mark.parametrize("framed", [False, True], ids=["bio", "direct"])
@pytest.mark.parametrize("first", [b"", PARTIAL_HELLO], ids=["silent", "partial-hello"])
async def test_failed_server_handshake_leaves_no_cycle(ctx, first, framed):
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
                await start_tls(conn, ctx, server_side=True, timeout=5, framed=framed)
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


async def _tls_pair(ctx: ssl.SSLContext, home: Path, *, framed: bool = False
                    ) -> tuple[TLSConn, TLSConn]:
    from kakehashi.core.tls import client_context

    a, b = socket.socketpair()
    client_ctx = client_context(ca=home / "ca" / "ca.pem")
    server, client = await asyncio.gather(
        start_tls(Conn(a), ctx, server_side=True, timeout=10, framed=framed),
        start_tls(Conn(b), client_ctx, server_side=False, server_hostname="localhost",
                  timeout=10, framed=framed),
    )
    return server, client


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "fast-path-off"])
async def test_framed_tls_streams_both_ways(ctx, tmp_path, monkeypatch, fast):
    """A relay link's TLS (``framed=True``) takes the socket-driven fast path unless it
    is switched off; either way bulk data crosses both directions at once intact,
    reads take many records per call, and an end arrives as EOF."""
    import hashlib

    from kakehashi.core import stream

    monkeypatch.setattr(stream, "FAST_PATH", fast)
    server, client = await _tls_pair(ctx, tmp_path / "home", framed=True)
    assert isinstance(server, DirectTLSConn) is fast
    assert isinstance(client, DirectTLSConn) is fast
    assert server.tls_version == client.tls_version == "TLSv1.3"
    up = bytes(range(256)) * (6 << 12)
    down = bytes(reversed(range(256))) * (5 << 12)
    biggest: list[int] = [0]

    async def pump(src: TLSConn, dst: TLSConn, data: bytes) -> bytes:
        async def send() -> None:
            await dst.send_all(data)
            await dst.shutdown_write()

        sender = asyncio.create_task(send())
        got = bytearray()
        buf = memoryview(bytearray(256 * 1024))
        while n := await src.recv_into(buf):
            biggest[0] = max(biggest[0], n)
            got += buf[:n]
        await sender
        return bytes(got)

    got_up, got_down = await asyncio.gather(pump(server, client, up),
                                            pump(client, server, down))
    assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()
    assert biggest[0] > 16 * 1024  # more than one record per read
    server.close()
    client.close()


@pytest.mark.parametrize("reads", ["large", "small"])
async def test_tls_half_close_keeps_the_other_direction(ctx, tmp_path, reads):
    """A TLS stream that ends one way while the other way is still sending loses
    nothing of the other way, and bulk data arrives intact through reads that take
    many records at once. ``small``: the reader takes less than a record at a time,
    so records it has not read yet are already in the TLS input when it half-closes
    (the close_notify used to swallow one and break the stream: a hang)."""
    import hashlib

    server, client = await _tls_pair(ctx, tmp_path / "home")
    data = bytes(range(256)) * (8 << 12)  # 8 MiB: far more than the socket buffers

    async def send() -> None:
        await server.send_all(data)
        await server.shutdown_write()

    async def receive() -> bytes:
        got = bytearray()
        buf = memoryview(bytearray(256 * 1024 if reads == "large" else 1000))
        while n := await client.recv_into(buf):
            got += buf[:n]
            if len(got) >= 64 * 1024 and not client_closed:
                client_closed.append(True)
                await client.shutdown_write()  # half-close in the middle of the stream
        return bytes(got)

    client_closed: list[bool] = []
    sender = asyncio.create_task(send())
    got = await asyncio.wait_for(receive(), 30)
    await asyncio.wait_for(sender, 30)
    assert client_closed
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    assert await server.recv(100) == b""  # the client's end arrived as EOF
    server.close()
    client.close()


@pytest.mark.parametrize("framed", [False, True], ids=["bio", "direct"])
async def test_tls_half_close_with_records_already_received(ctx, tmp_path, framed):
    """Records that arrived (whole) but were not read yet when this side half-closes
    are still delivered: the close_notify is sent without letting OpenSSL process
    them (it used to take the next one and fail the stream with
    APPLICATION_DATA_AFTER_CLOSE_NOTIFY)."""
    server, client = await _tls_pair(ctx, tmp_path / "home", framed=framed)
    messages = [b"%04d" % i * 25 for i in range(100)]  # 100 records of 100 bytes
    for message in messages:
        await server.send_all(message)
    await server.shutdown_write()
    first = await client.recv(50)  # the rest is waiting, records whole
    await client.shutdown_write()
    got = bytearray(first)
    while chunk := await asyncio.wait_for(client.recv(4096), 10):
        got += chunk
    assert bytes(got) == b"".join(messages)
    assert await asyncio.wait_for(server.recv(10), 10) == b""
    server.close()
    client.close()


@pytest.mark.parametrize("at_once", [True, False], ids=["at-once", "after-wait"])
async def test_open_tcp_connects_whether_or_not_the_handshake_is_done_at_once(
        monkeypatch, at_once):
    """open_tcp takes a connection that was established by the time ``connect``
    returned without a readiness wait, and waits for one that was not; both carry
    data, and a refused port is a ConnectionError either way."""
    from kakehashi.core import stream

    if not at_once:
        def started_only(sock: socket.socket, addr: tuple) -> bool:
            sock.connect_ex(addr)
            return False  # as if the handshake were still in flight

        monkeypatch.setattr(stream, "_connect_at_once", started_only)
    loop = asyncio.get_running_loop()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        port = listener.getsockname()[1]
        conn = await stream.open_tcp("127.0.0.1", port, timeout=5)
        peer, _ = await loop.sock_accept(listener)
        try:
            await conn.send_all(b"hi")
            assert await loop.sock_recv(peer, 2) == b"hi"
        finally:
            peer.close()
            conn.close()
    with pytest.raises(ConnectionError):  # the listener is gone: refused
        await stream.open_tcp("127.0.0.1", port, timeout=5)


@pytest.mark.parametrize("at_once", [True, False], ids=["at-once", "after-wait"])
async def test_a_connect_that_reaches_itself_is_refused(monkeypatch, at_once):
    """A connect to a port where nothing listens can be given that same port as its
    source and 'succeed' onto itself (TCP simultaneous open): every byte sent comes
    back, so a gateway read its own request as the origin's reply (a 502 'unsupported
    HTTP version' seen in CI). open_tcp must report it as the refusal it is. The
    socket is bound to the destination port beforehand, which makes the kernel's
    rare choice certain."""
    from kakehashi.core import stream

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free again once closed; nothing listens there

    real_socket = socket.socket

    def bound_to_the_target(*args, **kwargs) -> socket.socket:
        sock = real_socket(*args, **kwargs)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        return sock

    monkeypatch.setattr(stream.socket, "socket", bound_to_the_target)
    if not at_once:
        def started_only(sock: socket.socket, addr: tuple) -> bool:
            sock.connect_ex(addr)
            return False

        monkeypatch.setattr(stream, "_connect_at_once", started_only)
    with pytest.raises(ConnectionError, match="reached itself"):
        await stream.open_tcp("127.0.0.1", port, timeout=5)


# -- half-close on both TLS drivers: the socket-driven one (fast path) and memory BIOs.
# ``framed=True`` asks for the fast path even where a half-close was not offered on it,
# so these tests exercise DirectTLSConn whenever FAST_PATH is on.
ROUNDS = 100  # the old failure was a race: about 1 in 30 connections
DRIVERS = pytest.mark.parametrize("fast", [True, False], ids=["direct", "bio"])


@DRIVERS
async def test_tls_writes_go_on_after_the_peers_bare_tcp_fin(ctx, tmp_path, monkeypatch, fast):
    """The peer sends, then ends its side with a bare TCP FIN (no close_notify, as a
    client that half-closes the socket under its TLS does): the end reads as EOF and
    the reply still goes out. (OpenSSL 3 took the FIN for a truncation attack and
    failed every later write of the socket-driven connection: the reply was lost.)"""
    from kakehashi.core import stream

    monkeypatch.setattr(stream, "FAST_PATH", fast)
    server, client = await _tls_pair(ctx, tmp_path / "home", framed=True)
    assert isinstance(server, DirectTLSConn) is fast
    data = bytes(range(256)) * 4096  # 1 MiB
    sender = asyncio.create_task(client.send_all(data))
    got = bytearray()
    buf = memoryview(bytearray(64 * 1024))
    while len(got) < len(data):
        n = await asyncio.wait_for(server.recv_into(buf), 10)
        assert n, "the stream ended early"
        got += buf[:n]
    await sender
    socket.socket.shutdown(client.sock, socket.SHUT_WR)  # TCP only, TLS state kept
    assert await asyncio.wait_for(server.recv(100), 10) == b""
    await server.send_all(b"reply after the client's end")
    await server.shutdown_write()
    reply = bytearray()
    while chunk := await asyncio.wait_for(client.recv(100), 10):
        reply += chunk
    assert bytes(reply) == b"reply after the client's end"
    assert bytes(got) == data
    server.close()
    client.close()


@DRIVERS
async def test_tls_half_close_while_the_peer_is_still_sending(ctx, tmp_path, monkeypatch, fast):
    """This side half-closes while a peer (a blocking ssl socket in a thread, as a
    client program) keeps streaming: every byte the peer sends after the close_notify
    still arrives, on every one of several connections. (Python's shutdown calls
    SSL_shutdown twice; the second call read the socket for the peer's close_notify
    and a record arriving in that instant failed the stream with
    APPLICATION_DATA_AFTER_CLOSE_NOTIFY.)"""
    import hashlib
    import threading

    from kakehashi.core import stream
    from kakehashi.core.tls import client_context

    monkeypatch.setattr(stream, "FAST_PATH", fast)
    client_ctx = client_context(ca=tmp_path / "home" / "ca" / "ca.pem")
    data = bytes(range(256)) * (4 << 10)  # 1 MiB a connection

    def peer(sock: socket.socket, result: dict[str, object]) -> None:
        try:
            with client_ctx.wrap_socket(sock, server_hostname="localhost") as tls:
                tls.sendall(data)
                socket.socket.shutdown(tls, socket.SHUT_WR)
                reply = b""
                while chunk := tls.recv(1 << 16):
                    reply += chunk
                result["reply"] = reply
        except (OSError, ssl.SSLError) as exc:
            result["error"] = exc

    for _ in range(ROUNDS):
        a, b = socket.socketpair()
        result: dict[str, object] = {}
        thread = threading.Thread(target=peer, args=(b, result), daemon=True)
        thread.start()
        server = await start_tls(Conn(a), ctx, server_side=True, timeout=10, framed=True)
        assert isinstance(server, DirectTLSConn) is fast
        got = bytearray()
        buf = memoryview(bytearray(64 * 1024))
        while n := await asyncio.wait_for(server.recv_into(buf), 10):
            got += buf[:n]
            if len(got) >= 32 * 1024 and not server._closed and len(got) - n < 32 * 1024:
                await server.send_all(b"done early")
                await server.shutdown_write()  # the peer is in the middle of its stream
        server.close()
        await asyncio.to_thread(thread.join, 20)
        assert "error" not in result, result
        assert result["reply"] == b"done early"
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


@pytest.mark.skipif(ssl.OPENSSL_VERSION_INFO < (3, 0), reason="needs OpenSSL 3")
@DRIVERS
async def test_every_tls_stream_takes_the_socket_driven_path(ctx, tmp_path, monkeypatch, fast):
    """On this platform (OpenSSL 3, CPython's _ssl layout) the fast path offers the
    half-close, so every TLS stream takes it (the gateway's TLS listener, the on-demand
    edge), not only relay links; bytes read ahead still need memory BIOs."""
    from kakehashi.core import stream

    monkeypatch.setattr(stream, "FAST_PATH", fast)
    assert stream.half_close_ready()
    server, client = await _tls_pair(ctx, tmp_path / "home")  # framed=False
    assert isinstance(server, DirectTLSConn) is fast
    assert isinstance(client, DirectTLSConn) is fast
    server.close()
    client.close()


# -- long TLS writes corked (stream.TLS_CORK): on TCP only, and never left corked ------
async def _tcp_tls_pair(ctx: ssl.SSLContext, home: Path) -> tuple[TLSConn, TLSConn]:
    """A TLS pair over loopback TCP (TCP_CORK means nothing on the socketpairs above)."""
    from kakehashi.core.stream import open_tcp
    from kakehashi.core.tls import client_context

    srv = socket.create_server(("127.0.0.1", 0))
    srv.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        accepted, raw = await asyncio.gather(
            loop.sock_accept(srv), open_tcp("127.0.0.1", srv.getsockname()[1], timeout=10))
    finally:
        srv.close()
    client_ctx = client_context(ca=home / "ca" / "ca.pem")
    return await asyncio.gather(
        start_tls(Conn(accepted[0]), ctx, server_side=True, timeout=10, framed=True),
        start_tls(raw, client_ctx, server_side=False, server_hostname="localhost",
                  timeout=10, framed=True))


def _corked(conn: TLSConn) -> bool:
    return bool(socket.socket.getsockopt(conn.sock, socket.IPPROTO_TCP, socket.TCP_CORK))


@pytest.mark.skipif(not hasattr(socket, "TCP_CORK"), reason="TCP_CORK is Linux's")
@pytest.mark.parametrize("cork", [True, False], ids=["cork", "no-cork"])
async def test_long_tls_writes_leave_the_socket_uncorked(ctx, tmp_path, monkeypatch, cork):
    """A TLS write of many records may cork the TCP socket while OpenSSL writes them
    (KAKEHASHI_TLS_CORK), but never leaves it corked: not when the write is done, not
    when it is cancelled while waiting for room (a leftover cork would hold the next
    short message, an interactive echo, up to the kernel's 200 ms). The bytes arrive
    intact either way, and a short write is not corked at all."""
    import hashlib

    from kakehashi.core import stream

    monkeypatch.setattr(stream, "TLS_CORK", cork)
    server, client = await _tcp_tls_pair(ctx, tmp_path / "home")
    assert isinstance(client, DirectTLSConn)
    seen: list[tuple[bool, bool]] = []  # (set on?, corked after) of each cork change
    real = DirectTLSConn._cork

    def spy(self: DirectTLSConn, on: bool) -> bool:
        done = real(self, on)
        if done:
            seen.append((on, _corked(self)))
        return done

    monkeypatch.setattr(DirectTLSConn, "_cork", spy)
    data = bytes(range(256)) * (4 << 10)  # 1 MiB: 64 records

    async def read(n: int) -> bytes:
        got = bytearray()
        buf = memoryview(bytearray(256 * 1024))
        while len(got) < n:
            k = await asyncio.wait_for(server.recv_into(buf), 10)
            assert k, "the stream ended early"
            got += buf[:k]
        return bytes(got)

    reader = asyncio.create_task(read(len(data)))
    await client.send_all(data)
    assert hashlib.sha256(await reader).digest() == hashlib.sha256(data).digest()
    assert not _corked(client)
    corked_then_not = [(True, True), (False, False)] if cork else []
    assert seen == corked_then_not  # corked during the write, then not

    seen.clear()
    await client.send_all(b"one short record")
    assert await read(16) == b"one short record"
    assert seen == []

    # the peer reads nothing: the write waits for room with the socket corked; cancel
    writer = asyncio.create_task(client.send_all(data * 32))
    await async_wait_until(lambda: client._waits, 10, what="the write waiting for room")
    writer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writer
    assert not _corked(client)
    assert seen == corked_then_not
    server.close()
    client.close()


@pytest.mark.parametrize("ahead", [True, False], ids=["read-ahead", "no-read-ahead"])
async def test_the_pump_reads_a_bulk_tls_stream_ahead(ctx, tmp_path, monkeypatch, ahead):
    """copy_raw turns OpenSSL's read-ahead on for a TLS source once the stream proves
    bulk (KAKEHASHI_TLS_READ_AHEAD): records read ahead wait in OpenSSL's buffer, and
    every one of them still reaches the sink - the last ones too, which arrive with
    the end and wake no reader of their own - and such a stream says it can no longer
    leave TLS. A short stream (an interactive session) is never read ahead."""
    import hashlib

    from kakehashi.core import stream
    from kakehashi.core.pump import copy_raw

    monkeypatch.setattr(stream, "TLS_READ_AHEAD", ahead)
    for size in (1 << 20, 1000):  # bulk, then a short one
        server, client = await _tcp_tls_pair(ctx, tmp_path / "home")
        assert isinstance(server, DirectTLSConn)
        sink_r, sink_w = socket.socketpair()
        data = bytes(range(256)) * (size // 256) + b"!" * (size % 256)

        async def send(client: TLSConn, data: bytes) -> None:
            for i in range(0, len(data), 48 * 1024):  # several records a write
                await client.send_all(data[i:i + 48 * 1024])
            await client.shutdown_write()

        sink, drain = Conn(sink_w), Conn(sink_r)

        async def read_sink(drain: Conn) -> bytes:
            got = bytearray()
            while piece := await drain.recv(1 << 20):
                got += piece
            return bytes(got)

        sender = asyncio.create_task(send(client, data))
        reader = asyncio.create_task(read_sink(drain))
        copied = await asyncio.wait_for(copy_raw(server, sink), 20)  # half-closes the sink
        await sender
        got = await asyncio.wait_for(reader, 10)
        assert copied == len(data)
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        assert server._read_ahead is (ahead and size > stream.SMALL_CHUNK)
        assert not server.can_leave_tls or not server._read_ahead
        for c in (server, client, sink, drain):
            c.close()

"""One aggregation port for everything (spec 001): ``gateway serve --relay`` carries
kakehashi relay sessions, HTTP proxying, CONNECT tunnels and events on the same
port, in TLS (sniffed again inside) and in plaintext, at the same time."""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import threading

import pytest

from tests.e2e.framework import roundtrip, stream_through
from tests.e2e.gateway_fixtures import (
    ca_path,
    curl,
    fast_lane,  # noqa: F401 (an autouse fixture: each test with the lane on, off)
    origin,
)
from tests.support.listener import ReplyAtEnd


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plaintext"])
def test_relay_sessions_and_http_proxy_share_the_port(env, echo, tmp_path, tls):
    env.add_user("pi")
    env.add_user("laptop")
    with origin() as o:
        gw_proc, gw = env.gateway("127.0.0.1", extra=["--relay"])
        assert "events, relay;" in gw_proc.output()
        env.agent("pi", gw, f"echo={echo.addr}", tls=tls)
        res = env.pipe("laptop", gw, "pi/echo", b"hello through the gateway port\n", tls=tls)
        assert res.stdout == b"hello through the gateway port\n"
        _, local = env.forward("laptop", gw, "pi/echo", tls=tls)
        assert roundtrip(local, b"ping") == b"ping"

        # at the same time: 16 MiB through the relay session and a 20 MB proxied download
        results: dict[str, object] = {}

        def relay_stream() -> None:
            results["relay"] = stream_through(local, 16 << 20)

        th = threading.Thread(target=relay_stream)
        th.start()
        out = tmp_path / "big.bin"
        r = curl("-x", f"http://127.0.0.1:{gw}", "-o", str(out), f"{o.url}/big")
        th.join(60)
        assert r.code == 0 and r.status == 200, r.stderr
        assert hashlib.sha256(out.read_bytes()).hexdigest() == o.big_sha
        sent, got, n = results["relay"]  # type: ignore[misc]
        assert n == 16 << 20 and sent == got

        # and still both: a proxied request after the relay traffic, a relay pipe after it
        assert curl("-x", f"http://127.0.0.1:{gw}", f"{o.url}/hello").body == \
            b"hello from origin /hello\n"
        assert env.pipe("laptop", gw, "pi/echo", b"again", tls=tls).stdout == b"again"
    assert gw_proc.alive
    assert any(e["to"] == o.addr and e["status"] == 200 for e in env.access())


def test_tls_on_the_listener_carries_http_connect_and_events(env, echo):
    """``--tls auto``: a TLS client (an HTTPS proxy URL) and a plaintext one on one port."""
    with origin() as o:
        _, gw = env.gateway("127.0.0.1")
        ca = str(ca_path())
        tls_proxy = f"https://localhost:{gw}"
        r = curl("-x", tls_proxy, "--proxy-cacert", ca, f"{o.url}/hello")
        assert r.code == 0 and r.status == 200, r.stderr
        assert r.body == b"hello from origin /hello\n" and "kakehashi" in (r.header("Via") or "")
        plain = curl("-x", f"http://127.0.0.1:{gw}", f"{o.url}/hello")
        assert plain.status == 200
        # a CONNECT tunnel inside TLS to the gateway (curl -p: tunnel even for http://)
        tunnelled = curl("-p", "-x", tls_proxy, "--proxy-cacert", ca, f"{o.url}/fixed/t")
        assert tunnelled.status == 200 and tunnelled.body == b"hello from origin /fixed/t\n"
        # the client module over TLS to the gateway: events and a tunnel
        via = ["--server", f"localhost:{gw}", "--ca", ca]
        pub = env.run("gateway", "events", "publish", "t", *via, "--data", "over tls")
        assert pub.stdout.strip() == b"published t #1"
        watch = env.run("gateway", "events", "watch", "t", *via, "--count", "1", "--wait", "1")
        assert json.loads(watch.stdout)["data"] == "over tls"
        res = env.run("gateway", "tunnel", *via, "--to", echo.addr, input=b"tls tunnel\n")
        assert res.stdout == b"tls tunnel\n"
    methods = [e["method"] for e in env.access(lambda es: len(es) >= 4)]
    assert methods.count("CONNECT") == 2 and methods.count("GET") == 2


def test_tls_on_refuses_plaintext_and_off_refuses_tls(env):
    with origin() as o:
        _, on = env.gateway("127.0.0.1", extra=["--tls", "on"], name="gw-tls-on")
        ok = curl("-x", f"https://localhost:{on}", "--proxy-cacert", str(ca_path()),
                  f"{o.url}/hello")
        assert ok.status == 200, ok.stderr
        refused = curl("-x", f"http://127.0.0.1:{on}", f"{o.url}/hello", timeout=10)
        assert refused.status == 400 and b"speaks TLS" in refused.body  # told, not forwarded
        _, off = env.gateway("127.0.0.1", extra=["--tls", "off"], name="gw-tls-off")
        refused = curl("-x", f"https://localhost:{off}", "--proxy-cacert", str(ca_path()),
                       f"{o.url}/hello", timeout=10)
        assert refused.code != 0 and refused.status == 0
        assert curl("-x", f"http://127.0.0.1:{off}", f"{o.url}/hello").status == 200
        assert [r.target for r in o.requests] == ["/hello", "/hello"]


def test_tls_listener_resumes_sessions_under_its_rotating_ticket_keys(env):
    """``--tls on`` issues session tickets from keys that rotate (core/tls.TicketKeys):
    a client's next connection resumes its session, and a tampered-with ticket does not
    (tests/unit/test_mux.py: a rotation refuses older tickets)."""
    with origin() as o:
        _, gw = env.gateway("127.0.0.1", extra=["--tls", "on"], name="gw-tls-resume")
        ctx = ssl.create_default_context(cafile=str(ca_path()))

        def get(session: ssl.SSLSession | None) -> ssl.SSLSocket:
            raw = socket.create_connection(("127.0.0.1", gw), timeout=20)
            s = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
            s.sendall(f"GET {o.url}/hello HTTP/1.1\r\nHost: {o.url[7:]}\r\n"
                      "Connection: close\r\n\r\n".encode())
            reply = b""
            while piece := s.recv(4096):
                reply += piece
            assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
            return s

        first = get(None)
        assert not first.session_reused and first.session.has_ticket
        second = get(first.session)
        assert second.session_reused
        for s in (first, second):
            s.close()


def _counting_sink() -> ReplyAtEnd:
    """A target that answers the byte count (8 bytes) after the client's half-close."""
    return ReplyAtEnd(lambda count, _digest: count.to_bytes(8, "big"))


#: both TLS drivers of the listener: socket-driven (the default) and memory BIOs
TLS_DRIVERS = pytest.mark.parametrize("fast_path", ["on", "off"], ids=["direct", "bio"])


def _tls_connect(gw: int, target_port: int) -> tuple[ssl.SSLSocket, bytes]:
    """A CONNECT to ``target_port`` inside TLS to the gateway's listener: the socket
    once the 200 has come, and whatever followed the head."""
    ctx = ssl.create_default_context(cafile=str(ca_path()))
    raw = socket.create_connection(("127.0.0.1", gw), timeout=20)
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    s.sendall(f"CONNECT 127.0.0.1:{target_port} HTTP/1.1\r\n"
              f"Host: 127.0.0.1:{target_port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        piece = s.recv(4096)
        assert piece, head
        head += piece
    assert head.startswith(b"HTTP/1.1 200")
    return s, head[head.index(b"\r\n\r\n") + 4:]


@TLS_DRIVERS
def test_a_tunnel_inside_tls_carries_the_reply_after_the_clients_half_close(env, fast_path):
    """CONNECT through a TLS listener: the client sends, ends its side (TCP half-close,
    as a sender that is done does), and still reads what the target answers."""
    sink = _counting_sink()
    try:
        _, gw = env.gateway("127.0.0.1", extra=["--tls", "on"], name="gw-tls-half",
                            env={"KAKEHASHI_FAST_PATH": fast_path})
        s, _ = _tls_connect(gw, sink.port)
        with s:
            data = b"x" * (1 << 20)
            s.sendall(data)
            socket.socket.shutdown(s, socket.SHUT_WR)  # TCP half-close, TLS state kept
            reply = b""
            while len(reply) < 8 and (piece := s.recv(8 - len(reply))):
                reply += piece
        assert int.from_bytes(reply, "big") == len(data)
    finally:
        sink.close()


#: what the early-ending target says before it ends its side
GREETING = b"bye before you are done\n"


@TLS_DRIVERS
def test_a_tunnel_inside_tls_carries_the_clients_bytes_after_the_targets_half_close(
        env, fast_path):
    """The other order: the target ends its side first while the client is still
    sending. The client reads the target's end (close_notify) and everything it sends
    afterwards still reaches the target, intact, until its own end."""
    target = ReplyAtEnd(greeting=GREETING)  # ends its side first, then counts
    try:
        _, gw = env.gateway("127.0.0.1", extra=["--tls", "on"], name="gw-tls-half-rev",
                            env={"KAKEHASHI_FAST_PATH": fast_path})
        data = bytes(range(256)) * (32 << 10)  # 8 MiB, most of it after the target's end
        s, got = _tls_connect(gw, target.port)
        with s:
            s.sendall(data[:1 << 16])
            while piece := s.recv(4096):  # the greeting, then the target's end
                got += piece
            assert got == GREETING
            s.sendall(data[1 << 16:])  # after the target's end
            socket.socket.shutdown(s, socket.SHUT_WR)
            assert target.counted.wait(30)
        assert target.total == len(data)
        assert target.digest == hashlib.sha256(data).hexdigest()
    finally:
        target.close()

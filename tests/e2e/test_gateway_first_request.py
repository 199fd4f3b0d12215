"""What the one port makes of a connection's first bytes, and how tunnels that end
badly are still accounted for (issue 7, items 12 and 14)."""

from __future__ import annotations

import socket
import ssl
import struct

import pytest

from tests.e2e.gateway_fixtures import (
    body_of,
    ca_path,
    fast_lane,  # noqa: F401 (an autouse fixture: each test with the lane on, off)
    origin,
    raw_exchange,
    status_of,
)

#: methods outside the old fixed list: WebDAV, CalDAV, caches, links, SSDP, RFC 9xxx QUERY
METHODS = ["PROPFIND", "MKCOL", "REPORT", "MKCALENDAR", "SEARCH", "PURGE", "LINK", "M-SEARCH",
           "QUERY"]


def _request(o, method: str, body: bytes = b"") -> bytes:
    return (f"{method} {o.url}/hello HTTP/1.1\r\nHost: {o.addr}\r\nDepth: 1\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def test_every_method_is_proxied_as_a_connections_first_request(env):
    with origin() as o:
        _, port = env.gateway(f"127.0.0.1:{o.port}")
        for method in METHODS:
            body = b"<propfind xmlns='DAV:'/>" if method in ("PROPFIND", "REPORT") else b""
            reply = raw_exchange(port, _request(o, method, body))
            assert status_of(reply) == 200, (method, reply)
            assert body_of(reply) == b"hello from origin /hello\n", method
        assert [r.method for r in o.requests] == METHODS
        assert [r.body_len for r in o.requests] == [24, 0, 24] + [0] * 6


def test_the_first_request_inside_tls_is_recognised_the_same_way(env):
    with origin() as o:
        _, port = env.gateway(f"127.0.0.1:{o.port}")
        ctx = ssl.create_default_context(cafile=str(ca_path()))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(_request(o, "PROPFIND"))
            reply = b""
            while piece := sock.recv(65536):
                reply += piece
        assert status_of(reply) == 200 and o.requests[0].method == "PROPFIND"


@pytest.mark.parametrize("first", [b"SSH-2.0-OpenSSH_9.6 Ubuntu\r\n", b"\x00\x01\x02\x03",
                                   b"GET  / HTTP/1.1\r\n\r\n"])
def test_what_is_not_a_request_line_is_closed_without_an_answer(env, first):
    with origin() as o:
        _, port = env.gateway(f"127.0.0.1:{o.port}")
        assert raw_exchange(port, first) == b""
        assert status_of(raw_exchange(port, _request(o, "MKCOL"))) == 200  # and it still serves


def test_a_request_line_longer_than_a_line_may_be_is_414_not_a_reset(env):
    with origin() as o:
        _, port = env.gateway(f"127.0.0.1:{o.port}")
        reply = raw_exchange(port, f"REPORT {o.url}/{'a' * 9000} HTTP/1.1\r\n\r\n".encode())
        assert status_of(reply) == 414, reply[:200]


# -- item 14: tunnels that end in a reset are logged ----------------------------------------
def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0) instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_connect_tunnel_the_client_resets_is_in_the_access_log(env, echo):
    _, port = env.gateway(echo.addr)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"CONNECT {echo.addr} HTTP/1.1\r\nHost: {echo.addr}\r\n\r\n".encode())
    assert status_of(sock.recv(4096)) == 200
    sock.sendall(b"x" * 1000)
    got = b""
    while len(got) < 1000:  # echoed: the bytes went both ways before the reset
        got += sock.recv(4096)
    _reset(sock)
    entries = env.access(lambda es: any(e["method"] == "CONNECT" for e in es), timeout=10)
    tunnel = [e for e in entries if e["method"] == "CONNECT"]
    assert len(tunnel) == 1, entries
    entry = tunnel[0]
    assert entry["status"] == 200 and entry["to"] == echo.addr
    assert entry["bytes_up"] == 1000 and entry["bytes"] == 1000
    assert entry["end"] == "reset", entry


def test_a_connect_tunnel_the_target_resets_is_in_the_access_log(env):
    listener = socket.create_server(("127.0.0.1", 0))
    addr = f"127.0.0.1:{listener.getsockname()[1]}"
    _, port = env.gateway(addr)
    with listener, socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"CONNECT {addr} HTTP/1.1\r\nHost: {addr}\r\n\r\n".encode())
        target, _ = listener.accept()
        assert status_of(sock.recv(4096)) == 200
        target.sendall(b"hello")
        assert sock.recv(100) == b"hello"
        _reset(target)
        entries = env.access(lambda es: any(e["method"] == "CONNECT" for e in es), timeout=10)
    entry = next(e for e in entries if e["method"] == "CONNECT")
    assert entry["status"] == 200 and entry["bytes"] == 5 and entry["bytes_up"] == 0, entry
    assert entry["end"] == "reset", entry

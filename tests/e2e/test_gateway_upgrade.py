"""WebSocket (HTTP/1.1 Upgrade) through the aggregation port, with a real client.

The relay means passes a well-formed upgrade offer on to the origin; when the origin
answers 101 the connection becomes a byte tunnel to the same checked target, like
CONNECT. The client module (``gateway forward``) does the same on its side, so an
application talking plain ``ws://`` to a local port reaches an internal WebSocket
server through the one open port.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import threading

import pytest

websockets_sync = pytest.importorskip("websockets.sync.server")
from websockets.sync.client import connect as ws_connect  # noqa: E402

from tests.e2e.gateway_fixtures import (  # noqa: E402
    fast_lane,  # noqa: F401 (an autouse fixture: each test with the lane on, off)
    origin,
    plain,
)


@contextlib.contextmanager
def ws_origin():
    """An internal WebSocket echo server (the websockets library) on loopback."""

    def echo(ws) -> None:
        for message in ws:
            ws.send(message)

    server = websockets_sync.serve(echo, "127.0.0.1", 0, compression=None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.socket.getsockname()[1]
    finally:
        server.shutdown()
        thread.join(5)


def _forward(env, gw: int, port: int) -> int:
    proc = env.spawn("forward", "gateway", "forward", *plain(gw),
                     "--to", f"127.0.0.1:{port}", "--listen", "127.0.0.1:0")
    return proc.bound_port()


def test_a_websocket_client_reaches_an_internal_server_through_gateway_forward(env):
    with ws_origin() as port:
        _, gw = env.gateway(f"127.0.0.1:{port}")
        local = _forward(env, gw, port)
        big = os.urandom(512 * 1024)
        with ws_connect(f"ws://127.0.0.1:{local}/chat", proxy=None, open_timeout=10,
                        max_size=None) as ws:
            ws.send("hello through one port")
            assert ws.recv(timeout=10) == "hello through one port"
            ws.send(big)
            assert ws.recv(timeout=10) == big
    [entry] = env.access(lambda es: any(e["status"] == 101 for e in es))
    assert entry["status"] == 101 and entry["to"] == f"127.0.0.1:{port}"
    assert entry["bytes"] > len(big) and entry["bytes_up"] > len(big)


def test_a_websocket_client_through_the_proxy_with_connect(env):
    """websockets' own proxy support tunnels with CONNECT: that works as well."""
    with ws_origin() as port:
        _, gw = env.gateway(f"127.0.0.1:{port}")
        with ws_connect(f"ws://127.0.0.1:{port}/chat", proxy=f"http://127.0.0.1:{gw}",
                        open_timeout=10) as ws:
            ws.send("via CONNECT")
            assert ws.recv(timeout=10) == "via CONNECT"
    entries = env.access(lambda es: bool(es))
    assert [e["method"] for e in entries] == ["CONNECT"]


def _upgrade_request(port: int, extra: str = "") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET http://127.0.0.1:{port}/chat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n{extra}\r\n").encode()


def _masked_text(text: bytes) -> bytes:
    mask = os.urandom(4)
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(text))
    return bytes([0x81, 0x80 | len(text)]) + mask + payload


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        piece = sock.recv(65536)
        assert piece, f"closed early after {data!r}"
        data += piece
    return data


def test_absolute_form_upgrade_switches_to_a_tunnel(env):
    """What a proxy-aware client that does not use CONNECT sends for ws://."""
    with ws_origin() as port:
        _, gw = env.gateway(f"127.0.0.1:{port}")
        with socket.create_connection(("127.0.0.1", gw), timeout=10) as sock:
            sock.sendall(_upgrade_request(port))
            head, _, rest = _read_until(sock, b"\r\n\r\n").partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            assert lines[0].startswith("HTTP/1.1 101")
            fields = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
            assert fields["upgrade"].lower() == "websocket"
            assert fields["connection"].lower() == "upgrade"
            assert "sec-websocket-accept" in fields and "kakehashi" in fields["via"]
            sock.sendall(_masked_text(b"raw frame"))
            reply = rest
            while len(reply) < 2 + len(b"raw frame"):
                reply += sock.recv(65536)
            assert reply == bytes([0x81, len(b"raw frame")]) + b"raw frame"


def test_an_upgrade_the_origin_declines_stays_plain_http(env):
    with origin() as o:
        _, gw = env.gateway("127.0.0.1")
        with socket.create_connection(("127.0.0.1", gw), timeout=10) as sock:
            plain = (f"GET {o.url}/hello HTTP/1.1\r\nHost: {o.addr}\r\n\r\n").encode()
            sock.sendall(plain)  # first a plain request: the connection is in the fast lane
            assert _read_until(sock, b"hello from origin").startswith(b"HTTP/1.1 200")
            sock.sendall(_upgrade_request(o.port).replace(b"/chat", b"/hello"))
            reply = _read_until(sock, b"hello from origin")
            assert reply.startswith(b"HTTP/1.1 200")
            sock.sendall(plain)  # declined: the connection goes on as plain HTTP
            assert _read_until(sock, b"hello from origin").startswith(b"HTTP/1.1 200")
        first, offered, last = o.requests
        assert offered.header("Upgrade") == "websocket"  # offered, and declined
        assert offered.header("Connection") == "Upgrade"  # only the upgrade is passed on
        assert first.header("Upgrade") is None and last.header("Upgrade") is None


def test_an_upgrade_to_a_disallowed_target_is_refused(env):
    with ws_origin() as port:
        _, gw = env.gateway("127.0.0.1:1")  # the origin's port is not allowed
        with socket.create_connection(("127.0.0.1", gw), timeout=10) as sock:
            sock.sendall(_upgrade_request(port))
            assert _read_until(sock, b"\r\n").startswith(b"HTTP/1.1 403")

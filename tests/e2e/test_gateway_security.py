"""Hostile input and policy at the gateway (spec 001): refusals are clear and short,
nothing forbidden is ever contacted, and the gateway keeps serving everyone else."""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import pytest

from tests.e2e.framework import free_port
from tests.e2e.gateway_fixtures import (
    body_of,
    curl,
    fast_lane,  # noqa: F401 (an autouse fixture: each test with the lane on, off)
    origin,
    raw_exchange,
    status_of,
)
from tests.support.wait import wait_accepted, wait_closed


@pytest.fixture
def gw(env):
    """A gateway with short timeouts in front of one allowed origin."""
    with origin() as o:
        proc, port = env.gateway(f"127.0.0.1:{o.port}", extra=[
            "--head-timeout", "1", "--read-timeout", "1", "--idle-timeout", "1",
            "--connect-timeout", "2"])

        def still_serves() -> None:
            assert proc.alive
            r = curl("-x", f"http://127.0.0.1:{port}", f"{o.url}/hello", timeout=10)
            assert r.code == 0 and r.status == 200 and r.body == b"hello from origin /hello\n"

        yield SimpleNamespace(env=env, port=port, o=o, still_serves=still_serves)


def _short_text(reply: bytes) -> str:
    body = body_of(reply)
    assert 0 < len(body) < 300, reply
    return body.decode()


def test_get_and_connect_outside_the_allow_list_are_403(gw):
    env = gw.env
    port = gw.port
    still_serves = gw.still_serves
    with origin() as other:  # alive, but not on the allow-list: must never be contacted
        r = curl("-x", f"http://127.0.0.1:{port}", f"{other.url}/hello")
        assert r.status == 403 and b"not on the gateway's allow-list" in r.body, r.body
        reply = raw_exchange(port, f"CONNECT {other.addr} HTTP/1.1\r\nHost: {other.addr}"
                                   "\r\n\r\n".encode())
        assert status_of(reply) == 403 and "allow-list" in _short_text(reply)
        assert other.connections == 0
    denies = [a for a in env.audit() if a["event"] == "target" and a["decision"] == "deny"]
    assert [a["target"] for a in denies] == [other.addr, other.addr]
    assert all("allow-list" in a["why"] for a in denies)
    still_serves()


def test_allowed_name_resolving_to_loopback_is_refused(env):
    with origin() as o:
        _, port = env.gateway("localhost")  # a name entry never admits loopback (no SSRF)
        r = curl("-x", f"http://127.0.0.1:{port}", f"http://localhost:{o.port}/hello")
        assert r.status == 403 and b"resolves to a forbidden address" in r.body, r.body
        reply = raw_exchange(port, f"CONNECT localhost:{o.port} HTTP/1.1\r\n"
                                   f"Host: localhost:{o.port}\r\n\r\n".encode())
        assert status_of(reply) == 403
        assert o.connections == 0
    deny = [a for a in env.audit() if a["event"] == "target"]
    assert deny and all(a["decision"] == "deny" for a in deny)


def test_proxy_authentication(env):
    env.add_proxy_user("alice", "alice-pw")
    with origin() as o:
        _, port = env.gateway("127.0.0.1", extra=["--auth"])
        url, gw = f"{o.url}/hello", f"http://127.0.0.1:{port}"
        none = curl("-x", gw, url)
        assert none.status == 407 and none.header("Proxy-Authenticate", ) == \
            'Basic realm="kakehashi"'
        assert b"proxy authentication required" in none.body
        wrong = curl("-x", gw, "-U", "alice:wrong", url)
        assert wrong.status == 407
        nobody = curl("-x", gw, "-U", "mallory:alice-pw", url)
        assert nobody.status == 407
        reply = raw_exchange(port, f"CONNECT {o.addr} HTTP/1.1\r\nHost: {o.addr}\r\n\r\n"
                             .encode())
        assert status_of(reply) == 407 and b"Proxy-Authenticate: Basic" in reply
        assert o.connections == 0
        right = curl("-x", gw, "-U", "alice:alice-pw", url)
        assert right.status == 200 and right.body == b"hello from origin /hello\n"
        [req] = o.requests
        assert req.header("Proxy-Authorization") is None  # credentials stay at the gateway
    denied = [a for a in env.audit() if a["event"] == "proxy-auth"]
    assert len(denied) == 4 and all(a["decision"] == "deny" for a in denied)
    entries = env.access(lambda es: any(e["status"] == 200 for e in es))
    assert [e["user"] for e in entries if e["status"] == 200] == ["alice"]


@pytest.mark.parametrize("head", [
    "".join(f"X-Many-{i}: {i}\r\n" for i in range(200)),
    "X-Huge: " + "a" * 70_000 + "\r\n",
    "".join(f"X-Fat-{i}: {'b' * 7000}\r\n" for i in range(12)),
], ids=["200 headers", "70 KB header", "84 KB head"])
def test_oversized_heads_are_431(gw, head):
    port = gw.port
    o = gw.o
    still_serves = gw.still_serves
    reply = raw_exchange(port, f"GET {o.url}/hello HTTP/1.1\r\nHost: {o.addr}\r\n{head}\r\n"
                         .encode())
    assert status_of(reply) == 431, reply[:200]
    _short_text(reply)
    assert o.requests == []
    still_serves()


def test_bad_chunk_size_in_upload_is_400(gw):
    port = gw.port
    o = gw.o
    still_serves = gw.still_serves
    reply = raw_exchange(port, (f"POST {o.url}/upload HTTP/1.1\r\nHost: {o.addr}\r\n"
                                "Transfer-Encoding: chunked\r\n\r\n"
                                "5\r\nhello\r\nzz-not-hex\r\nmore\r\n0\r\n\r\n").encode())
    assert status_of(reply) == 400 and "invalid chunk size" in _short_text(reply)
    assert not any(r.target == "/upload" and r.body_len for r in o.requests)
    still_serves()


SMUGGLE = {
    "CL and TE": "Content-Length: 60\r\nTransfer-Encoding: chunked\r\n",
    "TE then CL": "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
    "TE not ending in chunked": "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
    "space before colon": "Transfer-Encoding : chunked\r\nContent-Length: 4\r\n",
    "two lengths": "Content-Length: 5\r\nContent-Length: 60\r\n",
}


@pytest.mark.parametrize("name", SMUGGLE)
def test_request_smuggling_is_400_and_never_reaches_the_origin(gw, name):
    port = gw.port
    o = gw.o
    still_serves = gw.still_serves
    smuggled = f"GET {o.url}/smuggled HTTP/1.1\r\nHost: {o.addr}\r\n\r\n"
    reply = raw_exchange(port, (f"POST {o.url}/upload HTTP/1.1\r\nHost: {o.addr}\r\n"
                                f"{SMUGGLE[name]}\r\n0\r\n\r\n{smuggled}").encode(), shut=True)
    assert status_of(reply) == 400, reply[:300]
    _short_text(reply)
    assert reply.count(b"HTTP/1.1 ") == 1  # nothing answered for the smuggled request
    still_serves()
    assert "/smuggled" not in o.paths() and "/upload" not in o.paths()


@pytest.mark.parametrize("via", ["1.1 kakehashi", "1.0 squid, 1.1 KAKEHASHI (loop)",
                                 "HTTP/1.1 kakehashi"])
def test_via_loop_is_508(gw, via):
    port = gw.port
    o = gw.o
    still_serves = gw.still_serves
    r = curl("-x", f"http://127.0.0.1:{port}", "-H", f"Via: {via}", f"{o.url}/hello")
    assert r.status == 508 and b"loops through this gateway" in r.body, r.body
    assert o.requests == []
    still_serves()


def test_target_down_is_502(env):
    dead = free_port()  # nothing listens there
    with origin() as o:
        _, port = env.gateway("127.0.0.1")
        r = curl("-x", f"http://127.0.0.1:{port}", f"http://127.0.0.1:{dead}/x")
        assert r.status == 502 and b"cannot connect to 127.0.0.1:" in r.body, r.body
        assert len(r.body) < 300
        reply = raw_exchange(port, f"CONNECT 127.0.0.1:{dead} HTTP/1.1\r\n"
                                   f"Host: 127.0.0.1:{dead}\r\n\r\n".encode())
        assert status_of(reply) == 502
        ok = curl("-x", f"http://127.0.0.1:{port}", f"{o.url}/hello")
        assert ok.status == 200


def test_target_that_never_answers_is_504(gw):
    port = gw.port
    o = gw.o
    still_serves = gw.still_serves
    start = time.monotonic()
    r = curl("-x", f"http://127.0.0.1:{port}", f"{o.url}/hang", timeout=20)
    took = time.monotonic() - start
    assert r.status == 504 and b"did not answer in time" in r.body, r.body
    assert 0.8 < took < 5, took
    assert o.paths() == ["/hang"]
    still_serves()


@pytest.mark.parametrize(("path", "extra"), [("/bad-chunked", ()),
                                             ("/corrupt-gzip", ("--gzip-decode",))])
def test_upstream_body_breaking_after_the_head_cuts_the_connection(env, path, extra):
    """Once the head is out, an error reply would land inside the body (a second
    status line the client may take for the next response): the gateway must cut
    the connection, without the last chunk, so the client sees the body is short."""
    with origin() as o:
        _, port = env.gateway("127.0.0.1", extra=list(extra))
        reply = raw_exchange(port, f"GET {o.url}{path} HTTP/1.1\r\nHost: {o.addr}\r\n\r\n"
                             .encode())
        assert status_of(reply) == 200
        assert reply.count(b"HTTP/1.1") == 1, reply[-300:]
        assert not reply.endswith(b"0\r\n\r\n")  # no last chunk: visibly incomplete
        r = curl("-x", f"http://127.0.0.1:{port}", f"{o.url}{path}")
        assert r.code == 18, (r.code, r.stderr)  # curl: "transfer closed ... remaining"
        ok = curl("-x", f"http://127.0.0.1:{port}", f"{o.url}/hello")
        assert ok.status == 200
    assert any(e["status"] == 502 and e["target"].endswith(path)
               for e in env.access(lambda es: any(e["status"] == 502 for e in es)))


def _closed_within(sock: socket.socket, limit: float) -> tuple[float, bytes]:
    """Wait for the gateway to close ``sock``; return (seconds, what it said)."""
    start = time.monotonic()
    sock.settimeout(limit)
    got = b""
    try:
        while piece := sock.recv(4096):
            got += piece
    except TimeoutError:
        raise AssertionError(f"connection still open after {limit}s") from None
    except ConnectionResetError:
        pass
    return time.monotonic() - start, got


def test_slowloris_head_is_cut_off(gw):
    port = gw.port
    o = gw.o
    still_serves = gw.still_serves
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET http://x/ HTTP/1.1\r\n")
        took, got = _closed_within(sock, 5)
    assert took < 3 and status_of(got) == 408, got
    assert b"request head not received in time" in got
    # a connection that says nothing at all, or stalls in the TLS handshake, is closed too
    for first in (b"", b"\x16\x03\x01"):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(first)
            took, _ = _closed_within(sock, 5)
        assert took < 3
    # a dribbling sender (one header byte every 0.2 s) is cut off by the total deadline
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"GET {o.url}/hello HTTP/1.1\r\n".encode())
        start = time.monotonic()
        cut = None
        for byte in b"X-Slow: " + b"a" * 100:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                cut = time.monotonic() - start
                break
            time.sleep(0.2)  # the behaviour under test: a deliberately slow sender
        assert cut is not None, "the dribbling head was never cut off"
        assert cut < 4, cut
    assert o.requests == []
    still_serves()


def test_idle_keep_alive_connection_is_closed(gw):
    port = gw.port
    o = gw.o
    still_serves = gw.still_serves
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"GET {o.url}/hello HTTP/1.1\r\nHost: {o.addr}\r\n\r\n".encode())
        first = sock.recv(4096)
        assert status_of(first) == 200
        took, _ = _closed_within(sock, 5)  # idle-timeout 1
    assert took < 3
    still_serves()


def test_garbage_and_bad_requests_get_short_400s(gw):
    port = gw.port
    o = gw.o
    still_serves = gw.still_serves
    cases = [
        b"GET http://127.0.0.1:1/\x01bad HTTP/1.1\r\nHost: x\r\n\r\n",
        f"GET {o.url}/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".encode(),
        f"GET http://user:pw@{o.addr}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        b"GET /not-a-proxy-request HTTP/1.1\r\nHost: x\r\n\r\n",
        b"CONNECT 127.0.0.1 HTTP/1.1\r\nHost: x\r\n\r\n",
        f"GET {o.url}/ HTTP/1.1\nHost: x\n\n".encode(),
    ]
    for data in cases:
        reply = raw_exchange(port, data, shut=True)
        assert status_of(reply) == 400, (data, reply[:200])
        _short_text(reply)
    assert o.requests == []
    still_serves()


def _hold(port: int, n: int) -> list[socket.socket]:
    """``n`` connections that each hold a slot: a head that never ends (within the
    30 s head timeout), each accepted by the gateway before the next one arrives."""
    socks = []
    for _ in range(n):
        socks.append(s := socket.create_connection(("127.0.0.1", port)))
        s.sendall(b"GET ")
        wait_accepted(port)
    return socks


def test_max_connections_makes_a_flood_wait_and_others_get_served_later(env):
    with origin() as o:
        _, port = env.gateway("127.0.0.1", extra=["--max-connections", "3",
                                                  "--head-timeout", "30"])
        idle = _hold(port, 3)
        waiting = socket.create_connection(("127.0.0.1", port), timeout=10)
        waiting.sendall(f"GET {o.url}/hello HTTP/1.1\r\nHost: {o.addr}\r\n"
                        "Connection: close\r\n\r\n".encode())
        waiting.settimeout(0.8)
        with pytest.raises(TimeoutError):
            waiting.recv(100)  # in the backlog: not accepted while all slots are taken
        idle[0].close()  # a slot frees: the waiting connection is taken and served
        waiting.settimeout(10)
        reply = b""
        while chunk := waiting.recv(65536):
            reply += chunk
        assert status_of(reply) == 200 and body_of(reply) == b"hello from origin /hello\n"
        for s in [waiting, *idle[1:]]:
            s.close()


def test_max_per_client_closes_the_extra_connections_of_one_address(env):
    with origin() as o:
        _, port = env.gateway("127.0.0.1", extra=["--max-per-client", "2",
                                                  "--head-timeout", "30"])
        held = _hold(port, 2)
        extra = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert extra.recv(100) == b""  # closed at once, nothing said
        extra.close()
        held[0].shutdown(socket.SHUT_WR)  # the gateway sees the end and closes: a slot frees
        wait_closed(held[0])
        held[0].close()
        reply = raw_exchange(port, f"GET {o.url}/hello HTTP/1.1\r\nHost: {o.addr}\r\n"
                                   "Connection: close\r\n\r\n".encode())
        assert status_of(reply) == 200
        held[1].close()


def test_the_gateway_as_its_own_target_is_a_loop_not_an_amplifier(env):
    """With the gateway's own address allowed, CONNECTs chained through itself would
    cost it a connection each (and come from its own address); it answers 508."""
    _, port = env.gateway("127.0.0.1")
    hop = f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    reply = raw_exchange(port, hop * 50, timeout=5)
    statuses = [line.split()[1] for line in reply.split(b"\r\n") if line.startswith(b"HTTP/1.")]
    assert statuses == [b"200", b"508"], reply[:300]
    assert b"a loop" in reply
    loops = [a for a in env.audit() if a["event"] == "loop"]
    assert len(loops) == 1 and loops[0]["decision"] == "deny"


def test_events_cannot_be_published_by_bouncing_through_the_gateway(env):
    """Only --publisher networks may publish; a request relayed by the gateway to
    itself would come from the gateway's own (loopback) address."""
    _, port = env.gateway("127.0.0.1", extra=["--publisher", "127.0.0.1/32"])
    path = "/.well-known/kakehashi/events/alerts"
    direct = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.5", 0))
    with direct:
        direct.sendall(f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Length: 1\r\n"
                       f"Connection: close\r\n\r\nx".encode())
        assert status_of(direct.recv(4096)) == 403
    bounced = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.5", 0))
    with bounced:
        bounced.sendall(f"POST http://127.0.0.1:{port}{path} HTTP/1.1\r\nHost: gw\r\n"
                        f"Content-Length: 1\r\nConnection: close\r\n\r\nx".encode())
        reply = bounced.recv(4096)
        assert status_of(reply) == 508, reply
    assert curl(f"http://127.0.0.1:{port}{path}?cursor=0").status == 204  # nothing published


def test_the_gateways_own_endpoints_keep_http_framing(env):
    """/healthz and the event endpoints are answered by the gateway itself: a body
    they do not read must not become the next request, HEAD gets no body, and
    Connection: close closes."""
    with origin() as o:
        _, port = env.gateway("127.0.0.1")
        smuggled = (f"GET {o.url}/smuggled HTTP/1.1\r\nHost: {o.addr}\r\n\r\n").encode()
        reply = raw_exchange(port, b"POST /healthz HTTP/1.1\r\nHost: gw\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(smuggled) + smuggled,
                             timeout=3)
        assert status_of(reply) == 400 and reply.count(b"HTTP/1.1 ") == 1
        assert o.requests == []  # the body was not taken for a request
        head_reply = raw_exchange(port, b"HEAD /healthz HTTP/1.1\r\nHost: gw\r\n"
                                  b"Connection: close\r\n\r\n", timeout=5)
        assert status_of(head_reply) == 200 and head_reply.endswith(b"\r\n\r\n")
        assert b"Connection: close" in head_reply  # and it closed (raw_exchange returned)
        old = raw_exchange(port, b"GET /healthz HTTP/1.0\r\n\r\n", timeout=5)
        assert old.startswith(b"HTTP/1.0 200") and old.endswith(b"ok\n")

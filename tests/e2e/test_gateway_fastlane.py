"""The gateway's fast lane (kept-alive requests served from callbacks) end to end.

Every request after the first on a client connection goes through
``gateway.fastlane`` when it can, and back to the coroutine path when it cannot;
these cases cross that border on purpose: mixed framings on one connection,
pipelining, an origin that closes or stalls at the worst moment, a client that
stops reading, and timeouts that must fire from the lane's own timer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
import time
from types import SimpleNamespace

import pytest

from tests.e2e.gateway_fixtures import (
    CHUNKS,
    fast_lane,  # noqa: F401 (an autouse fixture: each test with the lane on, off)
    origin,
    raw_exchange,
)
from tests.support.wait import wait_until


class Client:
    """One kept-alive client connection speaking raw HTTP/1.1 to the gateway."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise EOFError("gateway closed the connection")
        self.buf += data

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def response(self, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        """Read one response (Content-Length, chunked or none)."""
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (ln.partition(":") for ln in lines[1:])}
        if method == "HEAD" or status in (204, 304):
            return status, headers, b""
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while (size := int(self._line().split(b";")[0], 16)) != 0:
                body += self._take(size)
                self._line()
            while self._line():
                pass
            return status, headers, body
        return status, headers, self._take(int(headers.get("content-length", "0")))

    def closed(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def get(o, path: str, *, method: str = "GET", extra: str = "") -> bytes:
    return (f"{method} {o.url}{path} HTTP/1.1\r\nHost: {o.addr}\r\n{extra}\r\n").encode()


@pytest.fixture
def lane(env):
    with origin() as o:
        # debug: the pool says when it keeps or drops an upstream (tests wait for that)
        proc, port = env.gateway("127.0.0.1", extra=["--read-timeout", "2"],
                                 env={"KAKEHASHI_LOG": "debug"})
        clients: list[Client] = []

        def client() -> Client:
            c = Client(port)
            clients.append(c)
            return c

        yield SimpleNamespace(env=env, o=o, port=port, client=client, proc=proc)
        for c in clients:
            c.close()


def test_mixed_framings_on_one_connection_cross_between_lane_and_coroutine(lane):
    o, c = lane.o, lane.client()
    upload = b"u" * 5000
    steps = [
        ("/hello", "GET", b"", b"hello from origin /hello\n"),
        ("/chunked", "GET", b"", b"".join(CHUNKS)),  # chunked: handed to the coroutine
        ("/fixed/1", "GET", b"", b"hello from origin /fixed/1\n"),
        ("/big", "GET", b"", None),  # 20 MiB: the coroutine's pump
        ("/fixed/2", "HEAD", b"", b""),
        ("/upload", "POST", upload, json.dumps(
            {"sha256": hashlib.sha256(upload).hexdigest(), "bytes": len(upload)}).encode()),
        ("/nothing-here", "GET", b"", b"not found\n"),
        ("/fixed/3", "GET", b"", b"hello from origin /fixed/3\n"),
    ]
    for path, method, body, want in steps:
        extra = f"Content-Length: {len(body)}\r\n" if body else ""
        c.send(get(o, path, method=method, extra=extra) + body)
        status, headers, got = c.response(method)
        assert status == (404 if path == "/nothing-here" else 200), path
        assert "1.1 kakehashi" in headers.get("via", ""), path
        if want is None:
            assert hashlib.sha256(got).hexdigest() == o.big_sha
        else:
            assert got == want, path
    assert o.connections == 1  # one upstream connection carried all of it
    entries = lane.env.access(lambda es: len(es) >= len(steps))
    assert [e["status"] for e in entries] == [200] * 6 + [404, 200]


def test_pipelined_requests_are_answered_in_order(lane):
    o, c = lane.o, lane.client()
    c.send(get(o, "/hello"))
    assert c.response()[0] == 200  # the lane is on from the second request
    c.send(b"".join(get(o, f"/fixed/{i}") for i in range(20)))
    for i in range(20):
        status, _, body = c.response()
        assert (status, body) == (200, f"hello from origin /fixed/{i}\n".encode())
    assert o.connections == 1


def test_repeated_heads_are_answered_by_what_each_request_asks(lane):
    """The lane remembers the last request and response head it rewrote: a repeated
    head is served from that, but a HEAD of the same path (whose origin response
    head is byte for byte the GET's) must still be read as bodiless, and the GET
    after it as having its body again."""
    o, c = lane.o, lane.client()
    want = b"hello from origin /hello\n"
    for method in ("GET", "GET", "GET", "HEAD", "HEAD", "GET", "HEAD", "GET"):
        c.send(get(o, "/hello", method=method))
        status, headers, body = c.response(method)
        assert (status, headers["content-length"]) == (200, str(len(want))), method
        assert body == (b"" if method == "HEAD" else want), method
    c.send(b"".join(get(o, "/hello", method=m) for m in ("GET", "HEAD", "GET", "GET")))
    assert [c.response(m)[2] for m in ("GET", "HEAD", "GET", "GET")] == \
        [want, b"", want, want]
    assert o.connections == 1


def test_requests_pipelined_behind_a_handed_over_response_are_answered(lane):
    """A chunked, large or interim response goes to the coroutine path: what the
    client pipelined behind that request must go along, not be dropped."""
    o, c = lane.o, lane.client()
    c.send(get(o, "/hello"))
    assert c.response()[0] == 200
    c.send(get(o, "/chunked") + get(o, "/fixed/after-chunked") + get(o, "/big")
           + get(o, "/fixed/after-big"))
    assert c.response()[2] == b"".join(CHUNKS)
    assert c.response()[2] == b"hello from origin /fixed/after-chunked\n"
    assert hashlib.sha256(c.response()[2]).hexdigest() == o.big_sha
    assert c.response()[2] == b"hello from origin /fixed/after-big\n"


def test_connection_close_ends_the_connection_after_the_response(lane):
    o, c = lane.o, lane.client()
    c.send(get(o, "/hello"))
    c.response()
    c.send(get(o, "/fixed/x", extra="Connection: close\r\n"))
    status, headers, body = c.response()
    assert status == 200 and headers.get("connection") == "close"
    assert body == b"hello from origin /fixed/x\n"
    assert c.closed()


def test_keep_alive_race_retries_an_idempotent_request_on_a_fresh_upstream(lane):
    """The origin closes a kept-alive connection instead of answering (its keep-alive
    timeout crossing our request): a GET is sent again on a new connection."""
    o, c = lane.o, lane.client()
    for _ in range(2):
        c.send(get(o, "/once"))
        assert c.response()[:3:2] == (200, b"once\n")
    assert o.connections == 2
    assert [r.conn for r in o.requests] == [1, 1, 2]


def test_keep_alive_race_on_a_request_with_a_body_is_a_502_not_a_resend(lane):
    o, c = lane.o, lane.client()
    c.send(get(o, "/once"))
    assert c.response()[0] == 200
    c.send(get(o, "/once", method="POST", extra="Content-Length: 3\r\n") + b"abc")
    status, _, body = c.response()
    assert status == 502 and b"upstream closed" in body
    assert o.connections == 1  # not sent twice


def test_upstream_closing_mid_body_cuts_the_client_connection(lane):
    o, c = lane.o, lane.client()
    c.send(get(o, "/hello"))
    c.response()
    c.send(get(o, "/short"))
    with pytest.raises(EOFError):
        c.response()  # 10 of 1000 bytes, then the gateway closes: the loss is visible


def test_read_timeout_fires_in_the_lane(lane):
    o, c = lane.o, lane.client()
    c.send(get(o, "/hello"))
    c.response()
    start = time.monotonic()
    c.send(get(o, "/hang"))
    status, _, body = c.response()
    assert status == 504 and b"did not answer in time" in body
    assert 1.5 < time.monotonic() - start < 10
    c2 = lane.client()  # a stalled body mid-response: the connection is cut
    c2.send(get(o, "/hello"))
    c2.response()
    c2.send(get(o, "/stall"))
    with pytest.raises(EOFError):
        c2.response()


def test_a_client_that_stops_reading_is_bounded_and_others_are_served(lane):
    o = lane.o
    slow = lane.client()
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.send(get(o, "/hello"))
    slow.response()
    n = 3000  # ~400 KiB of responses the slow client does not read for a while
    slow.send(b"".join(get(o, f"/fixed/{i:04d}") for i in range(n)))
    # the fast client comes while the gateway is busy with the slow client's pipeline
    wait_until(lambda: len(o.requests) > 100, what="the slow client's requests under way")
    fast = lane.client()
    for i in range(5):
        fast.send(get(o, f"/fixed/fast{i}"))
        assert fast.response()[2] == f"hello from origin /fixed/fast{i}\n".encode()
    for i in range(n):  # now read everything, in order, nothing lost
        assert slow.response()[2] == f"hello from origin /fixed/{i:04d}\n".encode()


def test_a_new_target_on_the_same_connection_gets_its_own_decision(env):
    with origin(name="one") as a, origin(name="two") as b:
        _, port = env.gateway(f"127.0.0.1:{a.port}")
        c = Client(port)
        try:
            c.send(get(a, "/hello"))
            assert c.response()[0] == 200
            c.send(get(b, "/hello"))  # not on the allow-list: the lane hands it back
            status, _, body = c.response()
            assert status == 403 and b"allow-list" in body
        finally:
            c.close()
    audit = [e for e in env.audit() if e["event"] == "target"]
    assert [(e["decision"], e["target"]) for e in audit] == [
        ("allow", f"127.0.0.1:{a.port}"), ("deny", f"127.0.0.1:{b.port}")]


HOSTILE_SECOND = {
    # name: (bytes after the path's request line + Host, expected status, reply text)
    "smuggling CL and TE": ("Content-Length: 60\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                            400, "both Content-Length and Transfer-Encoding"),
    "two lengths": ("Content-Length: 5\r\nContent-Length: 60\r\n\r\n", 400,
                    "conflicting Content-Length"),
    "space before colon": ("Transfer-Encoding : chunked\r\n\r\n", 400,
                           "whitespace between header name and colon"),
    "200 headers": ("".join(f"X-Many-{i}: {i}\r\n" for i in range(200)) + "\r\n", 431,
                    "header fields"),
    "70 KB header": ("X-Huge: " + "a" * 70_000 + "\r\n\r\n", 431, "too large"),
    "bare LF": ("X-A: 1\n\n", 400, "bare LF"),
    "control byte": ("X-A: a\x01b\r\n\r\n", 400, "control character"),
    "via loop": ("Via: 1.1 kakehashi\r\n\r\n", 508, "loops"),
}


@pytest.mark.parametrize("name", HOSTILE_SECOND)
def test_hostile_second_request_gets_the_same_refusal_as_a_first(lane, name):
    """What the fast lane sees first on a kept-alive connection is refused exactly as
    the coroutine path refuses it, nothing reaches the origin, others are served."""
    o, c = lane.o, lane.client()
    c.send(get(o, "/hello"))
    assert c.response()[0] == 200
    rest, status, text = HOSTILE_SECOND[name]
    c.send(f"POST {o.url}/upload HTTP/1.1\r\nHost: {o.addr}\r\n{rest}".encode())
    got, _, body = c.response()
    assert (got, text in body.decode()) == (status, True), body
    assert c.closed()
    assert o.paths() == ["/hello"]
    other = lane.client()
    other.send(get(o, "/fixed/after"))
    assert other.response()[2] == b"hello from origin /fixed/after\n"


# -- upstream connections shared between client connections (gateway.pool) ------------
def one_shot(port: int, o, path: str, method: str = "GET", body: bytes = b"") -> tuple:
    c = Client(port)
    try:
        extra = f"Content-Length: {len(body)}\r\n" if body else ""
        c.send(get(o, path, method=method, extra=extra + "Connection: close\r\n") + body)
        return c.response(method)
    finally:
        c.close()


def test_one_request_per_connection_clients_share_the_upstream(lane):
    o, port = lane.o, lane.port
    for i in range(3):
        assert one_shot(port, o, f"/fixed/{i}")[2] == f"hello from origin /fixed/{i}\n".encode()
    c = lane.client()  # a kept-alive client whose lane ends with the connection
    for i in range(2):
        c.send(get(o, f"/fixed/k{i}"))
        assert c.response()[0] == 200
    pooled = lane.proc.output().count(" pooled (")
    c.close()  # the lane sees the close and the upstream goes to the pool
    wait_until(lambda: lane.proc.output().count(" pooled (") > pooled, what="pooled again")
    assert one_shot(port, o, "/fixed/last")[0] == 200
    assert o.connections == 1 and {r.conn for r in o.requests} == {1}
    # every client connection still made (and audited) its own decision
    decisions = [e for e in lane.env.audit() if e["event"] == "target"]
    assert len(decisions) == 5 and all(e["decision"] == "allow" for e in decisions)


SMUGGLING_PROBES = [
    "Content-Length: 5\r\nContent-Length: 60\r\n",
    "Content-Length: 60\r\nTransfer-Encoding: chunked\r\n",
    "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
]


def test_probes_and_requests_in_parallel_each_get_their_own_answer(lane):
    """Client connections that come and go in parallel - smuggling probes refused
    (alone, behind a kept-alive request, pipelined behind one), one-shot clients
    sharing pooled upstreams, clients that leave before their answer - while the
    gateway reuses fd numbers and hands upstreams between owners (lane, pool,
    coroutine): every normal request gets its own answer, every probe its 400, and
    nothing smuggled reaches the origin."""
    o, port = lane.o, lane.port
    errors: list[str] = []

    def probe(n: int) -> bytes:
        smuggled = f"GET {o.url}/smuggled HTTP/1.1\r\nHost: {o.addr}\r\n\r\n"
        return (f"POST {o.url}/upload HTTP/1.1\r\nHost: {o.addr}\r\n"
                f"{SMUGGLING_PROBES[n % len(SMUGGLING_PROBES)]}\r\n0\r\n\r\n"
                f"{smuggled}").encode()

    def expect(c: Client, path: str) -> None:
        status, _, body = c.response()
        if (status, body) != (200, f"hello from origin {path}\n".encode()):
            errors.append(f"{path}: {status} {body[:120]!r}")

    def worker(w: int) -> None:
        for n in range(18):
            path = f"/fixed/{w}-{n}"
            c = Client(port)
            try:
                kind = (w + n) % 6
                if kind == 0:  # a probe on a new connection, its sender done sending
                    c.send(probe(n))
                    c.sock.shutdown(socket.SHUT_WR)
                elif kind == 1:  # one request per connection: pooled upstreams
                    c.send(get(o, path, extra="Connection: close\r\n"))
                    expect(c, path)
                    continue
                elif kind == 2:  # kept alive: requests, then the client closes
                    for k in range(3):
                        c.send(get(o, f"{path}-{k}"))
                        expect(c, f"{path}-{k}")
                    continue
                elif kind == 3:  # a probe on a connection with an upstream
                    c.send(get(o, path))
                    expect(c, path)
                    c.send(probe(n))
                elif kind == 4:  # a probe pipelined behind a request
                    c.send(get(o, path) + probe(n))
                    expect(c, path)
                else:  # gone before the answer (sometimes with a reset)
                    c.send(get(o, path))
                    if n % 2:
                        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                          b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    continue
                status, _, body = c.response()
                if status != 400:
                    errors.append(f"probe {n}: {status} {body[:120]!r}")
            except (OSError, EOFError) as exc:
                errors.append(f"{path}: {exc!r}")
            finally:
                c.close()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    assert lane.proc.alive
    assert "/smuggled" not in o.paths() and "/upload" not in o.paths()


def test_pooled_upstreams_expire_and_can_be_turned_off(env):
    with origin() as o:
        gw, port = env.gateway("127.0.0.1", extra=["--upstream-idle", "0.5"],
                               env={"KAKEHASHI_LOG": "debug"})
        one_shot(port, o, "/hello")
        gw.wait_for("closed: idle too long")  # after --upstream-idle: closed, not reused
        one_shot(port, o, "/hello")
        assert o.connections == 2
    with origin() as o:
        _, port = env.gateway("127.0.0.1", extra=["--upstream-idle", "0"], name="gw-no-pool")
        one_shot(port, o, "/hello")
        one_shot(port, o, "/hello")
        assert o.connections == 2


def test_pooled_upstream_closed_by_the_origin_is_retried_only_when_repeatable(lane):
    o, port = lane.o, lane.port
    assert one_shot(port, o, "/once")[:3:2] == (200, b"once\n")
    # the pooled connection is closed without an answer: a GET goes out again
    assert one_shot(port, o, "/once")[:3:2] == (200, b"once\n")
    assert [r.conn for r in o.requests] == [1, 1, 2]
    # a POST is not sent twice: the client learns it failed
    status, _, body = one_shot(port, o, "/once", method="POST", body=b"abc")
    assert status == 502 and b"closed without answering" in body
    assert [r.conn for r in o.requests] == [1, 1, 2, 2]


def test_a_removed_proxy_user_is_locked_out_on_an_open_connection(env):
    """Verified credentials are cached, but the user's record is read again every
    second: removing a user (or a new password) takes effect on kept-alive
    connections too, in the fast lane as on the coroutine path."""
    env.add_proxy_user("alice", "alice-pw")
    env.add_proxy_user("bob", "bob-pw")
    with origin() as o:
        _, port = env.gateway("127.0.0.1", extra=["--auth"])

        def auth(user: str) -> str:
            token = base64.b64encode(f"{user}:{user}-pw".encode()).decode()
            return f"Proxy-Authorization: Basic {token}\r\n"

        alice, bob = Client(port), Client(port)
        for c, user in ((alice, "alice"), (bob, "bob")):
            for _ in range(3):  # first request verifies, the next ones hit the cache
                c.send(get(o, "/hello", extra=auth(user)))
                assert c.response()[0] == 200
        env.run("gateway", "user", "remove", "alice", "--db", env.db)
        start = time.monotonic()

        def locked_out() -> bool:
            alice.send(get(o, "/hello", extra=auth("alice")))
            status = alice.response()[0]
            assert status in (200, 407), status
            return status == 407

        wait_until(locked_out, 10, interval=0.2, what="alice locked out")
        assert time.monotonic() - start < 3  # within about the 1 s recheck, not 60 s
        bob.send(get(o, "/hello", extra=auth("bob")))
        assert bob.response()[0] == 200  # the others are not affected
        for c in (alice, bob):
            c.close()


@pytest.mark.parametrize("first", ["401 first", "credentials first"])
def test_a_connection_an_origin_tied_to_its_client_is_never_shared(lane, first):
    """NTLM-style origins authenticate the TCP connection, not the request: such a
    connection must never serve another client connection (it would get the first
    client's identity)."""
    o = lane.o
    alice = lane.client()
    if first == "401 first":  # the origin offers NTLM, then the client authenticates
        alice.send(get(o, "/ntlm"))
        assert alice.response()[0] == 401
    alice.send(get(o, "/ntlm", extra="Authorization: NTLM alice\r\n"))
    assert alice.response()[2] == b"secret of alice\n"
    alice.close()
    lane.proc.wait_for("upstream not pooled: tied to its client connection")
    for _ in range(2):  # one-shot clients without credentials, as the pool's users
        status, _, body = one_shot(lane.port, o, "/ntlm")
        assert (status, body) == (401, b"who are you?\n")
    shared = one_shot(lane.port, o, "/hello")  # ordinary connections are still shared
    assert shared[0] == 200


# -- bodies on the coroutine path: every wait bounded, no overall deadline ------------
def test_a_close_delimited_body_that_stalls_is_cut(lane):
    o, c = lane.o, lane.client()
    c.send(get(o, "/close-stall"))
    start = time.monotonic()
    assert c.closed(timeout=15)  # the read timeout (2 s) ends it: nothing held forever
    assert c.buf.endswith(b"partial") and time.monotonic() - start < 12


def test_a_client_that_never_reads_an_endless_stream_is_let_go(lane):
    o, c = lane.o, lane.client()
    c.send(get(o, "/endless"))
    # the socket buffers fill, the gateway's sends block; after 2 s it gives up on us
    # and lets go of the origin's stream too
    wait_until(lambda: o.streams_cut, 30, what="the gateway letting go of the stream")
    c.sock.settimeout(10)
    got, first = 0, b""
    while got < 64 << 20 and (data := c.sock.recv(1 << 20)):
        first = first or data
        got += len(data)
    # the stream really flowed (a 200 and more than one 64 KiB chunk), then it ended
    assert first.startswith(b"HTTP/1.1 200 ") and got > 65536, (got, first[:100])
    assert got < 64 << 20, "the stream never ended: the gateway kept the client forever"


def test_a_slow_but_steady_upload_is_not_cut_short(lane):
    """1 MiB at about 250 KB/s with a 2 s read timeout: no overall deadline."""
    o, c = lane.o, lane.client()
    body = bytes(1 << 20)
    c.send(get(o, "/upload", method="POST", extra=f"Content-Length: {len(body)}\r\n"))
    for i in range(0, len(body), 32 << 10):
        c.send(body[i:i + (32 << 10)])
        time.sleep(0.12)  # the behaviour under test: a deliberately slow client
    status, _, answer = c.response()
    assert status == 200 and json.loads(answer) == {
        "sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body)}


def test_interim_responses_go_to_http_1_1_clients_only(lane):
    o = lane.o
    modern = raw_exchange(lane.port, get(o, "/early-hints", extra="Connection: close\r\n"))
    assert modern.startswith(b"HTTP/1.1 103 ") and b"HTTP/1.1 200 " in modern
    old = raw_exchange(lane.port, f"GET {o.url}/early-hints HTTP/1.0\r\n\r\n".encode())
    assert old.startswith(b"HTTP/1.1 200 ") and b" 103 " not in old  # RFC 9110 15.2
    expect = raw_exchange(lane.port, f"POST {o.url}/upload HTTP/1.0\r\nContent-Length: 2\r\n"
                          f"Expect: 100-continue\r\n\r\nhi".encode())
    assert expect.startswith(b"HTTP/1.1 200 ") and b"100 Continue" not in expect


def test_a_repeated_head_on_a_new_upstream_each_time_is_answered_each_time(lane):
    """The lane reuses its last request entry and its last response entry when the
    heads repeat byte for byte. Here the origin closes its side after every answer
    (its response head, byte for byte the same each time, says so): each repeated
    request needs an upstream of its own, and gets its own answer."""
    o, c = lane.o, lane.client()
    for _ in range(4):
        c.send(get(o, "/closing"))
        status, headers, body = c.response()
        assert (status, body) == (200, b"closing\n")
        assert headers.get("connection") != "close"  # the client's connection stays
    c.send(get(o, "/closing") * 3)  # and pipelined
    assert [c.response()[2] for _ in range(3)] == [b"closing\n"] * 3
    assert o.connections == 7


def test_a_pipelining_client_that_never_reads_is_cut(env):
    """Every send to a client has a deadline: a client that pipelines more than the
    socket buffers hold and then reads nothing is let go after the idle timeout (the
    lane parks what the socket does not take and arms its timer; the coroutine path
    sent response heads and small bodies with no deadline and waited for good,
    holding the connection, its task and its upstream), and others are served."""
    with origin() as o:
        proc, port = env.gateway("127.0.0.1", extra=["--idle-timeout", "2"],
                                 env={"KAKEHASHI_LOG": "debug"})
        slow = Client(port)
        slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        slow.send(get(o, "/hello"))
        slow.response()
        # (a receive buffer of a fixed, ample size: a tiny one makes the kernel collapse
        # its queue and take a few more bytes now and then, which is progress that
        # moves the lane's deadline on, and the test takes minutes)
        n, size = 1500, 8000  # 12 MB of responses: more than the buffers hold
        slow.send(b"".join(get(o, f"/sized/{size}") for _ in range(n)))
        me = f"client ('127.0.0.1', {slow.sock.getsockname()[1]}):"
        wait_until(lambda: me in proc.output(), 60,
                   what="the gateway letting go of a client that never reads")
        fast = Client(port)
        fast.send(get(o, "/fixed/fast"))
        assert fast.response()[2] == b"hello from origin /fixed/fast\n"
        fast.close()
        slow.sock.settimeout(10)
        got = 0
        try:
            while data := slow.sock.recv(1 << 20):
                got += len(data)
        except ConnectionResetError:
            pass
        assert got < n * size  # what the buffers held, then the end
        slow.close()

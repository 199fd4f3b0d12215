"""The client communication module (spec 001 Fig. 6, claims 6-7) through the CLI:
``gateway forward``, ``gateway tunnel`` (local port and stdin/stdout, e.g. as an
ssh ProxyCommand) and ``gateway events publish/watch`` (Fig. 11 polling)."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.e2e import sshd
from tests.e2e.framework import stream_through, wait_until
from tests.e2e.gateway_fixtures import (
    curl,
    fast_lane,  # noqa: F401 (an autouse fixture: each test with the lane on, off)
    origin,
    plain,
)


def _forward(env, gw: int, to: str):
    proc = env.spawn("forward", "gateway", "forward", *plain(gw), "--to", to,
                     "--listen", "127.0.0.1:0")
    return proc, proc.bound_port()


def _tunnel(env, gw: int, to: str):
    proc = env.spawn("tunnel", "gateway", "tunnel", *plain(gw), "--to", to,
                     "--listen", "127.0.0.1:0")
    return proc, proc.bound_port()


def test_forward_lets_a_plain_http_client_reach_the_origin(env, tmp_path):
    with origin() as o:
        _, gw = env.gateway("127.0.0.1")
        _, local = _forward(env, gw, o.addr)
        # curl knows nothing about proxies: it speaks origin-form HTTP to a local port
        r = curl(f"http://127.0.0.1:{local}/hello?q=1")
        assert r.code == 0 and r.status == 200, r.stderr
        assert r.body == b"hello from origin /hello?q=1\n"
        assert "kakehashi" in (r.header("Via") or "")
        [req] = o.requests  # Fig. 7: what the origin sees equals what the app sent (504 == 501)
        assert (req.method, req.target) == ("GET", "/hello?q=1")
        assert req.header("Host") == o.addr
        assert "kakehashi" in (req.header("Via") or "")
        # bodies both ways, chunked and Content-Length, and a kept-alive connection
        data = os.urandom(2 << 20)
        f = tmp_path / "up.bin"
        f.write_bytes(data)
        want = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        start = time.monotonic()  # curl sends "Expect: 100-continue" and waits for the 100
        up = curl("--expect100-timeout", "20", "-H", "Transfer-Encoding: chunked",
                  "--data-binary", f"@{f}", f"http://127.0.0.1:{local}/upload", timeout=20)
        assert json.loads(up.body or b"null") == want, up.stderr
        up = curl("--expect100-timeout", "20", "--data-binary", f"@{f}",
                  f"http://127.0.0.1:{local}/upload", timeout=20)
        assert json.loads(up.body or b"null") == want, up.stderr
        assert time.monotonic() - start < 10, "the 100 Continue was not relayed"
        out = tmp_path / "big.bin"
        big = curl("-o", str(out), f"http://127.0.0.1:{local}/big")
        assert big.code == 0 and hashlib.sha256(out.read_bytes()).hexdigest() == o.big_sha
        three = curl(*[f"http://127.0.0.1:{local}/fixed/{i}" for i in range(3)])
        assert three.body == b"".join(b"hello from origin /fixed/%d\n" % i for i in range(3))
    entries = env.access(lambda es: len(es) >= 7)
    assert len(entries) == 7 and all(e["to"] == o.addr for e in entries)


def test_forward_reports_gateway_refusals_to_the_application(env):
    with origin() as o:
        _, gw = env.gateway("127.0.0.1:1")  # only port 1 is allowed
        _, local = _forward(env, gw, o.addr)
        r = curl(f"http://127.0.0.1:{local}/hello")
        assert r.status == 403 and b"allow-list" in r.body
        assert o.connections == 0


def test_forward_answers_requests_it_cannot_relay(env):
    """The local port speaks plain HTTP for one target: an absolute-form request (an
    application configured to use it as a proxy) or garbage gets a clear 400."""
    with origin() as o:
        _, gw = env.gateway("127.0.0.1")
        proc, local = _forward(env, gw, o.addr)
        for request, status in (
                (f"GET {o.url}/hello HTTP/1.1\r\nHost: {o.addr}\r\n\r\n".encode(), b"400"),
                (b"GET /hello HTTP/9.9\r\n\r\n", b"505")):
            with socket.create_connection(("127.0.0.1", local), timeout=10) as sock:
                sock.sendall(request)
                assert sock.recv(4096).startswith(b"HTTP/1.1 " + status)
        assert curl(f"http://127.0.0.1:{local}/hello").status == 200  # still serving
        assert "Traceback" not in proc.output() and "never retrieved" not in proc.output()


def test_tunnel_on_a_local_port_10mb_both_ways(env, echo):
    _, gw = env.gateway("127.0.0.1")
    _, local = _tunnel(env, gw, echo.addr)
    sent, got, n = stream_through(local, 10 << 20)
    assert n == 10 << 20 and sent == got
    [entry] = env.access()
    assert entry["method"] == "CONNECT" and entry["to"] == echo.addr
    assert entry["bytes"] == entry["bytes_up"] == 10 << 20


def test_tunnel_on_stdin_stdout(env, echo):
    _, gw = env.gateway("127.0.0.1")
    data = os.urandom(3 << 20)
    res = env.run("gateway", "tunnel", *plain(gw), "--to", echo.addr,
                  input=data, timeout=60)
    assert hashlib.sha256(res.stdout).hexdigest() == hashlib.sha256(data).hexdigest()
    bad = env.run("gateway", "tunnel", *plain(gw), "--to", "127.0.0.1:1",
                  input=b"x", check=False)
    assert bad.returncode != 0 and b"502" in bad.stderr, bad.stderr


def test_ssh_proxycommand_through_the_gateway(env):
    ok, why = sshd.available()
    if not ok:
        pytest.skip(why)
    server = sshd.start_sshd(env)
    _, gw = env.gateway("127.0.0.1")
    proxy_cmd = " ".join(shlex.quote(a) for a in [
        sys.executable, "-m", "kakehashi", "--log-level", "warning", "gateway", "tunnel",
        *plain(gw), "--to", "%h:%p"])
    payload = os.urandom(1 << 20)
    res = subprocess.run(
        server.ssh_args("-o", f"ProxyCommand={proxy_cmd}", "-p", str(server.port),
                        "127.0.0.1", "sha256sum"),
        input=payload, capture_output=True, env=env.env, timeout=60)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    assert res.stdout.split()[0].decode() == hashlib.sha256(payload).hexdigest()
    [entry] = env.access()
    assert entry["method"] == "CONNECT" and entry["to"] == f"127.0.0.1:{server.port}"


# -- events (Fig. 11) ------------------------------------------------------------------
def _publish(env, gw: int, topic: str, text: str) -> str:
    return env.run("gateway", "events", "publish", topic, *plain(gw),
                   "--data", text).stdout.decode().strip()


def _watch(env, gw: int, topic: str, *extra: str, timeout: float = 30) -> list[dict]:
    res = env.run("gateway", "events", "watch", topic, *plain(gw), *extra,
                  timeout=timeout)
    return [json.loads(line) for line in res.stdout.decode().splitlines()]


def _lines(proc) -> list[dict]:
    text = proc.log.read_text()
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_events_in_order_and_resumed_from_a_cursor(env):
    gw_proc, gw = env.gateway("127.0.0.1", env={"KAKEHASHI_LOG": "debug"})
    for i in (1, 2, 3):
        assert _publish(env, gw, "builds", f"event {i}") == f"published builds #{i}"
    got = _watch(env, gw, "builds", "--count", "3", "--wait", "1")
    assert [(e["seq"], e["data"]) for e in got] == [(i, f"event {i}") for i in (1, 2, 3)]
    # the watcher stopped; two more events happen; a new watcher resumes from cursor 3
    for i in (4, 5):
        _publish(env, gw, "builds", f"event {i}")
    watcher = env.spawn("watch", "--log-level", "warning", "gateway", "events", "watch",
                        "builds", *plain(gw), "--cursor", "3", "--wait", "0.5")
    watcher.wait_for('"seq": 5')
    # several more long polls (each a new connection) after #5 bring nothing new
    wait_until(lambda: gw_proc.output().count("topic builds after #5") >= 3,
               what="three more long polls after #5")
    watcher.stop()
    assert [(e["seq"], e["data"]) for e in _lines(watcher)] == [(4, "event 4"),
                                                                (5, "event 5")]


def test_events_and_cursors_survive_a_gateway_restart(env):
    gw_proc, gw = env.gateway("127.0.0.1")
    for i in (1, 2, 3):
        _publish(env, gw, "deploys", f"event {i}")
    assert [e["seq"] for e in _watch(env, gw, "deploys", "--count", "2", "--wait", "1")] == [1, 2]
    gw_proc.stop(signal.SIGTERM)
    env.gateway("127.0.0.1", port=gw, name="gateway-again")  # same --db
    # the watcher resumes from its cursor 2: event 3 is still there, numbering goes on
    assert _publish(env, gw, "deploys", "event 4") == "published deploys #4"
    got = _watch(env, gw, "deploys", "--cursor", "2", "--count", "2", "--wait", "1")
    assert [(e["seq"], e["data"]) for e in got] == [(3, "event 3"), (4, "event 4")]


def test_memory_events_start_afresh(env):
    gw_proc, gw = env.gateway("127.0.0.1", extra=["--memory-events"])
    _publish(env, gw, "t", "gone after restart")
    gw_proc.stop(signal.SIGTERM)
    env.gateway("127.0.0.1", port=gw, name="gateway-again", extra=["--memory-events"])
    assert _publish(env, gw, "t", "first again") == "published t #1"


def test_long_poll_delivers_promptly(env):
    gw_proc, gw = env.gateway("127.0.0.1", env={"KAKEHASHI_LOG": "debug"})
    _publish(env, gw, "alerts", "old")
    watcher = env.spawn("watch", "--log-level", "warning", "gateway", "events", "watch",
                        "alerts", *plain(gw), "--cursor", "1", "--count", "1",
                        "--wait", "60")
    gw_proc.wait_for("long poll parked: topic alerts after #1")  # the gateway holds the poll
    assert _lines(watcher) == []
    _publish(env, gw, "alerts", "fresh")
    start = time.monotonic()
    watcher.wait_for('"fresh"', timeout=20)
    assert time.monotonic() - start < 20  # woken by the publish, not the 60 s poll timeout
    assert watcher.popen.wait(5) == 0
    assert [e["seq"] for e in _lines(watcher)] == [2]


def test_poll_endpoint_with_curl(env):
    _, gw = env.gateway("127.0.0.1")
    base = f"http://127.0.0.1:{gw}/.well-known/kakehashi/events/jobs"
    empty = curl(f"{base}?cursor=0&wait=0")
    assert empty.status == 204 and empty.header("Kakehashi-Cursor") == "0" and not empty.body
    pub = curl("--data-binary", "job done", base)
    assert pub.status == 202 and json.loads(pub.body) == {"seq": 1}
    start = time.monotonic()
    none = curl(f"{base}?cursor=1&wait=1")  # Fig. 11, 702: no event (after a long poll)
    assert none.status == 204 and none.header("Kakehashi-Cursor") == "1"
    assert 0.8 < time.monotonic() - start < 5
    one = curl(f"{base}?cursor=0&wait=0")  # 705: event occurred
    assert one.status == 200 and one.header("Kakehashi-Cursor") == "1"
    doc = json.loads(one.body)
    assert doc["cursor"] == 1 and [e["data"] for e in doc["events"]] == ["job done"]
    bad = curl(f"http://127.0.0.1:{gw}/.well-known/kakehashi/events/bad%20topic?cursor=0")
    assert bad.status == 400
    for wait in ("nan", "inf", "soon"):
        assert curl(f"{base}?cursor=0&wait={wait}").status == 400
    cli = env.run("gateway", "events", "publish", "bad\r\ntopic", *plain(gw),
                  "--data", "x", check=False)
    assert cli.returncode == 2 and b"topic names are" in cli.stderr


def test_publishing_only_from_publisher_networks(env):
    _, gw = env.gateway("127.0.0.1", extra=["--publisher", "192.0.2.0/24"])
    res = env.run("gateway", "events", "publish", "t", *plain(gw),
                  "--data", "x", check=False)
    assert res.returncode != 0 and b"403" in res.stderr
    deny = [a for a in env.audit() if a["event"] == "publish"]
    assert deny and deny[-1]["decision"] == "deny"


def test_client_module_authenticates_to_the_gateway(env, echo):
    env.add_proxy_user("bob", "bob-pw")
    with origin() as o:
        _, gw = env.gateway("127.0.0.1", extra=["--auth"])
        via = plain(gw)
        creds = {"KAKEHASHI_PASSWORD": "bob-pw"}
        local = env.spawn("forward", "gateway", "forward", *via, "--user", "bob",
                          "--to", o.addr, "--listen", "127.0.0.1:0", env=creds).bound_port()
        r = curl(f"http://127.0.0.1:{local}/hello")
        assert r.status == 200 and r.body == b"hello from origin /hello\n"
        assert o.requests[0].header("Proxy-Authorization") is None
        res = env.run("gateway", "tunnel", *via, "--user", "bob", "--to", echo.addr,
                      input=b"authenticated tunnel", env=creds)
        assert res.stdout == b"authenticated tunnel"
        wrong = env.run("gateway", "tunnel", *via, "--user", "bob", "--to", echo.addr,
                        input=b"x", env={"KAKEHASHI_PASSWORD": "nope"}, check=False)
        assert wrong.returncode != 0 and b"407" in wrong.stderr
        unauth = _forward(env, gw, o.addr)[1]
        assert curl(f"http://127.0.0.1:{unauth}/hello").status == 407
    entries = env.access(lambda es: len(es) >= 4)
    assert {e["user"] for e in entries if e["status"] == 200} == {"bob"}


def test_events_need_credentials_when_auth_is_on(env):
    env.add_proxy_user("bob", "bob-pw")
    _, gw = env.gateway("127.0.0.1", extra=["--auth"])
    via = plain(gw)
    creds = {"KAKEHASHI_PASSWORD": "bob-pw"}
    denied = env.run("gateway", "events", "publish", "t", *via, "--data", "x", check=False)
    assert denied.returncode != 0 and b"407" in denied.stderr
    env.run("gateway", "events", "publish", "t", *via, "--user", "bob", "--data", "ok",
            env=creds)
    out = env.run("gateway", "events", "watch", "t", *via, "--user", "bob",
                  "--count", "1", env=creds).stdout
    assert b'"data": "ok"' in out

"""The gateway (spec 001) with real clients: curl, Python requests, headless Chromium.

Every case runs a real ``kakehashi gateway serve`` and real origin servers, and
checks what the client received (bytes, SHA-256, headers) *and* what the origin
received (origin-form request line, restored Host, Via), which is the spec's
header round trip 501 -> 503 -> 504 seen from both ends.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import subprocess
import time

import pytest

from tests.e2e.gateway_fixtures import (
    CHUNKS,
    GZIP_TEXT,
    body_of,
    ca_path,
    curl,
    ensure_chromium,
    fast_lane,  # noqa: F401 (an autouse fixture: each test with the lane on, off)
    https_context,
    origin,
    raw_exchange,
    spki_sha256_b64,
    status_of,
)
from tests.support.wait import wait_until


def proxy(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def test_plain_http_is_rewritten_to_origin_form_with_host_and_via(env):
    with origin() as o:
        _, gw = env.gateway("127.0.0.1")
        r = curl("-x", proxy(gw), f"{o.url}/hello?x=1")
        assert r.code == 0 and r.status == 200, r.stderr
        assert r.body == b"hello from origin /hello?x=1\n"
        assert "kakehashi" in (r.header("Via") or "")
        [req] = o.requests
        assert (req.method, req.target, req.version) == ("GET", "/hello?x=1", "HTTP/1.1")
        assert req.header("Host") == f"127.0.0.1:{o.port}"
        assert "kakehashi" in (req.header("Via") or "")
        assert req.header("Proxy-Connection") is None  # hop-by-hop, not forwarded
    [entry] = env.access()
    assert entry["status"] == 200 and entry["to"] == o.addr and entry["method"] == "GET"
    allows = [a for a in env.audit() if a["event"] == "target"]
    assert allows[-1]["decision"] == "allow" and allows[-1]["target"] == o.addr


def test_spec_fig6_header_round_trip(env):
    """Spec Fig. 6/7: the client sends 503 (absolute URI, Host = the relay); the origin
    receives 504, which must equal the application's original 501."""
    with origin() as o:
        _, gw = env.gateway("127.0.0.1")
        original = f"GET /index.html HTTP/1.0\r\nHost: 127.0.0.1:{o.port}\r\n"  # 501
        converted = (f"GET http://127.0.0.1:{o.port}/index.html HTTP/1.0\r\n"  # 503
                     f"Host: 127.0.0.1:{gw}\r\n\r\n")
        reply = raw_exchange(gw, converted.encode())
        assert status_of(reply) == 200 and body_of(reply) == b"hello from origin /index.html\n"
        [req] = o.requests  # 504
        received = f"{req.method} {req.target} {req.version}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in req.headers if k.lower() != "via")
        assert received == original
        assert req.header_all("Via") == ["1.0 kakehashi"]


def test_hop_by_hop_fields_stay_on_their_hop(env):
    with origin() as o:
        _, gw = env.gateway("127.0.0.1")
        r = curl("-x", proxy(gw), "-H", "Connection: X-Hop-Req", "-H", "X-Hop-Req: secret",
                 "-H", "Keep-Alive: timeout=9", "-H", "TE: trailers", "-H", "Upgrade: h2c",
                 "-H", "X-End-To-End: kept", f"{o.url}/hop")
        assert r.status == 200 and r.body == b"hop\n", r.stderr
        [req] = o.requests
        for name in ("X-Hop-Req", "Keep-Alive", "TE", "Upgrade", "Proxy-Connection"):
            assert req.header(name) is None, name
        assert req.header("X-End-To-End") == "kept"
        assert r.header("X-Hop-Resp") is None and r.header("Keep-Alive") is None
        assert r.header("X-End-To-End") == "kept"


def test_chunked_response_is_relayed(env):
    with origin() as o:
        _, gw = env.gateway("127.0.0.1")
        r = curl("-x", proxy(gw), f"{o.url}/chunked")
        assert r.code == 0 and r.status == 200, r.stderr
        assert r.body == b"".join(CHUNKS)
        assert (r.header("Transfer-Encoding") or "").lower() == "chunked"


def test_https_through_connect_with_the_dev_ca(env):
    with origin(tls_ctx=https_context()) as o:
        _, gw = env.gateway("127.0.0.1")
        r = curl("-x", proxy(gw), "--cacert", str(ca_path()),
                 f"https://localhost:{o.port}/hello")
        assert r.code == 0 and r.status == 200, r.stderr
        assert r.body == b"hello from origin /hello\n"
        [req] = o.requests  # the tunnel is opaque: no Via was added inside TLS
        assert req.header("Host") == f"localhost:{o.port}" and req.header("Via") is None
    [entry] = env.access()
    assert entry["method"] == "CONNECT" and entry["status"] == 200
    assert entry["target"] == f"localhost:{o.port}"


def test_uploads_chunked_and_content_length_arrive_intact(env, tmp_path):
    data = os.urandom(3 << 20) + b"tail"
    f = tmp_path / "upload.bin"
    f.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    with origin() as o:
        _, gw = env.gateway("127.0.0.1")
        start = time.monotonic()  # curl waits for "100 Continue": the gateway answers it
        chunked = curl("-x", proxy(gw), "--expect100-timeout", "20",
                       "-H", "Transfer-Encoding: chunked",
                       "--data-binary", f"@{f}", f"{o.url}/upload")
        assert chunked.code == 0 and chunked.status == 200, chunked.stderr
        assert json.loads(chunked.body) == {"sha256": want, "bytes": len(data)}
        length = curl("-x", proxy(gw), "--expect100-timeout", "20", "-X", "PUT",
                      "--data-binary", f"@{f}", f"{o.url}/upload")
        assert length.code == 0 and length.status == 200, length.stderr
        assert json.loads(length.body) == {"sha256": want, "bytes": len(data)}
        assert time.monotonic() - start < 10
        first, second = o.requests
        assert (first.header("Transfer-Encoding") or "").lower() == "chunked"
        assert first.header("Content-Length") is None
        assert second.header("Content-Length") == str(len(data))
        assert second.header("Transfer-Encoding") is None


def test_20mb_download_sha256(env, tmp_path):
    out = tmp_path / "big.bin"
    with origin() as o:
        _, gw = env.gateway("127.0.0.1")
        r = curl("-x", proxy(gw), "-o", str(out), f"{o.url}/big")
        assert r.code == 0 and r.status == 200, r.stderr
        assert r.header("Content-Length") == str(len(o.big))
        assert hashlib.sha256(out.read_bytes()).hexdigest() == o.big_sha


@pytest.mark.parametrize("path", ["/gzip", "/gzip-chunked"])
def test_gzip_passes_through_untouched_by_default(env, path):
    with origin() as o:
        _, gw = env.gateway("127.0.0.1")
        r = curl("-x", proxy(gw), f"{o.url}{path}")  # no --compressed: raw bytes
        assert r.code == 0 and r.status == 200, r.stderr
        assert r.header("Content-Encoding") == "gzip"
        assert gzip.decompress(r.body) == GZIP_TEXT


@pytest.mark.parametrize("path", ["/gzip", "/gzip-chunked"])
def test_gzip_decode_fixes_the_headers_it_changes(env, path):
    with origin() as o:
        _, gw = env.gateway("127.0.0.1", extra=["--gzip-decode"])
        r = curl("-x", proxy(gw), f"{o.url}{path}")
        assert r.code == 0 and r.status == 200, r.stderr  # curl checks the framing
        assert r.body == GZIP_TEXT
        assert r.header("Content-Encoding") is None
        length = r.header("Content-Length")
        assert length is None or int(length) == len(GZIP_TEXT)
        if path == "/gzip":
            assert r.header("ETag") == 'W/"v1"'  # the bytes differ from the origin's
        # an HTTP/1.0 client cannot read chunked: the body ends with the connection
        old = curl("--http1.0", "-x", proxy(gw), f"{o.url}{path}")
        assert old.code == 0 and old.status == 200, old.stderr
        assert old.body == GZIP_TEXT and old.header("Transfer-Encoding") is None
        # and the connection stays usable for the next request after a decoded body
        two = curl("-x", proxy(gw), f"{o.url}{path}", f"{o.url}/hello")
        assert two.code == 0 and two.body == GZIP_TEXT + b"hello from origin /hello\n"


def test_keep_alive_on_both_sides(env):
    with origin() as o:
        _, gw = env.gateway("127.0.0.1")
        urls = [f"{o.url}/fixed/{i}" for i in range(3)]
        r = curl("-x", proxy(gw), "-w", "connects=%{num_connects}\\n", *urls)
        assert r.code == 0, r.stderr
        for i in range(3):
            assert f"hello from origin /fixed/{i}\n".encode() in r.body
        # curl opened one connection to the gateway, the gateway one to the origin
        connects = [int(x.split(b"=")[1]) for x in r.body.split() if x.startswith(b"connects=")]
        assert connects == [1, 0, 0]
        assert o.connections == 1
        assert [req.conn for req in o.requests] == [1, 1, 1]
    entries = env.access(lambda es: len(es) >= 3)
    assert [e["target"] for e in entries] == urls
    assert all(e["status"] == 200 for e in entries)


def test_upstream_closing_idle_keep_alive_is_not_an_error(env):
    """Origins close idle kept-alive connections when they like; the next request on
    the same client connection must get a fresh upstream, not a 502 (stdlib client)."""
    with origin(idle_close=0.2) as o:
        _, gw = env.gateway("127.0.0.1")
        conn = http.client.HTTPConnection("127.0.0.1", gw, timeout=10)
        try:
            sockets = set()
            for i in range(4):
                if i % 2:
                    conn.request("POST", f"{o.url}/upload", body=b"x" * 1000)
                    want = json.dumps({"sha256": hashlib.sha256(b"x" * 1000).hexdigest(),
                                       "bytes": 1000}).encode()
                else:
                    conn.request("GET", f"{o.url}/fixed/{i}")
                    want = f"hello from origin /fixed/{i}\n".encode()
                r = conn.getresponse()
                assert (r.status, r.read()) == (200, want)
                sockets.add(id(conn.sock))
                wait_until(lambda: o.idle_closes > i,  # noqa: B023 (called at once)
                           what="the origin closing its idle side")
        finally:
            conn.close()
        assert len(sockets) == 1  # one client connection throughout
        assert o.connections == 4  # a fresh upstream for each request
    assert [e["status"] for e in env.access(lambda es: len(es) >= 4)] == [200] * 4


def test_python_requests_with_proxies(env):
    requests = pytest.importorskip("requests")
    with origin() as plain, origin(tls_ctx=https_context()) as secure:
        _, gw = env.gateway("127.0.0.1")
        with requests.Session() as s:
            s.trust_env = False
            s.proxies = {"http": proxy(gw), "https": proxy(gw)}
            s.verify = str(ca_path())
            r = s.get(f"{plain.url}/hello", timeout=30)
            assert r.status_code == 200 and r.text == "hello from origin /hello\n"
            assert "kakehashi" in r.headers["Via"]
            r = s.get(f"https://localhost:{secure.port}/fixed/tls", timeout=30)
            assert r.status_code == 200 and r.text == "hello from origin /fixed/tls\n"
            payload = os.urandom(1 << 20)
            r = s.post(f"{plain.url}/upload", data=payload, timeout=30)
            assert r.json() == {"sha256": hashlib.sha256(payload).hexdigest(),
                                "bytes": len(payload)}
            r = s.post(f"{plain.url}/upload", data=iter([payload[:1000], payload[1000:]]),
                       timeout=30)  # a generator body: requests sends it chunked
            assert r.json()["sha256"] == hashlib.sha256(payload).hexdigest()
            r = s.get(f"{plain.url}/big", stream=True, timeout=60)
            h = hashlib.sha256()
            for piece in r.iter_content(1 << 20):
                h.update(piece)
            assert h.hexdigest() == plain.big_sha
        assert plain.connections == 1  # the session kept its proxied connection alive
        assert secure.requests[0].header("Host") == f"localhost:{secure.port}"


@pytest.fixture(scope="module")
def chromium():
    path, why = ensure_chromium()
    if path is None:
        pytest.skip(why)
    return path


def _dump_dom(chromium: str, tmp_path, gw: int, url: str, *extra: str) -> str:
    profile = tmp_path / f"chromium-{abs(hash(url))}"
    argv = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
            f"--user-data-dir={profile}", f"--proxy-server=http://127.0.0.1:{gw}",
            "--proxy-bypass-list=<-loopback>", *extra, "--dump-dom", url]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    res = subprocess.run(argv, capture_output=True, timeout=90, env=env,
                         start_new_session=True)
    return res.stdout.decode(errors="replace") + "\n--stderr--\n" + res.stderr.decode(
        errors="replace")[-2000:]


def test_headless_chromium_http_and_https_pages(env, chromium, tmp_path):
    with origin(require_via=True, name="plain") as plain, \
            origin(tls_ctx=https_context(), name="secure") as secure:
        _, gw = env.gateway("127.0.0.1")
        # the plain origin refuses anything that did not come through a kakehashi gateway
        assert curl(f"{plain.url}/page").status == 403
        out = _dump_dom(chromium, tmp_path, gw, f"{plain.url}/page")
        assert "kakehashi intranet page plain" in out, out
        out = _dump_dom(chromium, tmp_path, gw, f"https://localhost:{secure.port}/page",
                        f"--ignore-certificate-errors-spki-list={spki_sha256_b64()}")
        assert "kakehashi intranet page secure" in out, out
        assert any(r.target == "/page" for r in secure.requests)
    entries = env.access(lambda es: any(e["method"] == "CONNECT" for e in es))
    assert any(e["method"] == "GET" and e["target"] == f"{plain.url}/page"
               and e["status"] == 200 for e in entries), entries
    assert any(e["method"] == "CONNECT" and e["target"] == f"localhost:{secure.port}"
               for e in entries), entries

"""Origin servers and client helpers for the gateway end-to-end tests (spec 001).

:class:`Origin` is a small threaded HTTP/1.1 server written on raw sockets, so the
tests control framing byte for byte and can see exactly what the gateway sent:
every request line, header and body digest is recorded with the number of the
TCP connection it came on. Routes:

* ``/hello``, ``/index.html`` and anything under ``/fixed/`` - a short body;
* ``/chunked`` - a chunked body in several chunks;
* ``/gzip`` and ``/gzip-chunked`` - a gzip body (Content-Encoding: gzip);
* ``/big`` - :data:`BIG_SIZE` pseudo-random bytes (SHA-256 in ``Origin.big_sha``);
* ``/upload`` (POST/PUT) - reads a Content-Length or chunked body and answers
  ``{"sha256": ..., "bytes": n}``;
* ``/page`` - an HTML page for the browser test;
* ``/hop`` - a response carrying hop-by-hop fields;
* ``/hang`` - reads the request and never answers;
* ``/bad-chunked``, ``/corrupt-gzip`` - bodies that break after the head;
* ``/short`` (closes mid-body), ``/stall`` (stops mid-body) - Content-Length lies;
* ``/once`` - answers only the first request on a connection, then closes without
  answering (an origin's keep-alive timeout racing the next request).

With ``idle_close`` it closes kept-alive connections idle that long, as real
servers do (keep-alive timeouts).

With ``require_via`` the origin refuses (403) any request that did not come
through a kakehashi gateway, i.e. it is reachable "only through the gateway".
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import json
import os
import random
import shutil
import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kakehashi.core import tls
from tests.e2e.framework import Env
from tests.support.listener import stop_listener

BIG_SIZE = 20 * 1024 * 1024
GZIP_TEXT = b"".join(b"line %04d of the decoded gzip text\n" % i for i in range(2000))
CHUNKS = [b"alpha\n", b"beta beta\n", b"gamma gamma gamma\n" * 100, b"delta\n"]
PAGE = (b"<!doctype html><html><head><title>intranet</title></head>"
        b"<body><h1 id=t>kakehashi intranet page %s</h1></body></html>")


@dataclass
class Request:
    conn: int  # which TCP connection (1, 2, ...) it came on
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body_sha: str = ""
    body_len: int = 0

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class _Closed(Exception):
    pass


class _Buffered:
    """A socket with a read buffer (heads, chunk lines, fixed lengths)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise _Closed
        self.buf += data

    def until(self, sep: bytes, limit: int = 1 << 20) -> bytes:
        while (i := self.buf.find(sep)) < 0:
            if len(self.buf) > limit:
                raise _Closed
            self._fill()
        out, self.buf = self.buf[:i], self.buf[i + len(sep):]
        return out

    def exactly(self, n: int, sink) -> None:
        while n:
            if not self.buf:
                self._fill()
            piece, self.buf = self.buf[:n], self.buf[n:]
            sink(piece)
            n -= len(piece)


class _HeadOnly:
    """A response to HEAD: the head goes out, the body does not (RFC 9110 9.3.2)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data.partition(b"\r\n\r\n")[0] + b"\r\n\r\n")


@dataclass
class Origin:
    """A threaded HTTP/1.1 origin server on loopback that records what it receives."""

    tls_ctx: ssl.SSLContext | None = None
    require_via: bool = False
    name: str = "origin"
    idle_close: float | None = None  # close a kept-alive connection idle this long
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    streams_cut: int = 0  # endless streams the gateway let go of
    idle_closes: int = 0  # kept-alive connections closed after ``idle_close``

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._big: bytes | None = None
        self._socks: list[socket.socket] = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_ctx else 'http'}://127.0.0.1:{self.port}"

    @property
    def big(self) -> bytes:
        if self._big is None:
            self._big = random.Random(1).randbytes(BIG_SIZE)
        return self._big

    @property
    def big_sha(self) -> str:
        return hashlib.sha256(self.big).hexdigest()

    def paths(self) -> list[str]:
        with self._lock:
            return [r.target for r in self.requests]

    def close(self) -> None:
        self._stop = True
        self._stopped.set()
        stop_listener(self.sock, self._thread)
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()

    # -- serving ---------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                n = self.connections
                self._socks.append(conn)
            threading.Thread(target=self._serve, args=(conn, n), daemon=True).start()

    def _serve(self, raw: socket.socket, n: int) -> None:
        sock = raw
        try:
            if self.tls_ctx is not None:
                raw.settimeout(10)
                sock = self.tls_ctx.wrap_socket(raw, server_side=True)
                sock.settimeout(None)
            if self.idle_close is not None:
                sock.settimeout(self.idle_close)
            r = _Buffered(sock)
            while self._one(sock, r, n):
                pass
        except TimeoutError:
            if self.idle_close is not None:
                with contextlib.suppress(OSError):
                    sock.close()
                with self._lock:
                    self.idle_closes += 1  # closed first, then counted: tests wait for it
        except (_Closed, OSError, ssl.SSLError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    def _one(self, sock: socket.socket, r: _Buffered, n: int) -> bool:
        head = r.until(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        headers = [(k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:])]
        req = Request(n, method, target, version, headers)
        digest = hashlib.sha256()
        size = 0

        def sink(piece: bytes) -> None:
            nonlocal size
            digest.update(piece)
            size += len(piece)

        te = (req.header("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            while True:
                line = r.until(b"\r\n")
                k = int(line.split(b";")[0], 16)
                if k == 0:
                    while r.until(b"\r\n"):  # trailers up to the blank line
                        pass
                    break
                r.exactly(k, sink)
                r.until(b"\r\n")
        elif req.header("Content-Length"):
            r.exactly(int(req.header("Content-Length") or 0), sink)
        req.body_sha, req.body_len = digest.hexdigest(), size
        with self._lock:
            self.requests.append(req)
        close = (req.header("Connection") or "").lower() == "close" or version == "HTTP/1.0"
        via = " ".join(req.header_all("Via")).lower()
        if self.require_via and "kakehashi" not in via:
            self._send(sock, 403, b"only through the gateway\n", close=True)
            return False
        path = target.split("?")[0]
        if method == "HEAD":
            sock = _HeadOnly(sock)  # type: ignore[assignment]
        if path == "/hang":
            self._stopped.wait()  # never answers; ends when the origin closes
            return False
        if path == "/chunked":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            for c in CHUNKS:
                sock.sendall(b"%x\r\n%s\r\n" % (len(c), c))
            sock.sendall(b"0\r\n\r\n")
        elif path == "/gzip":
            self._send(sock, 200, gzip.compress(GZIP_TEXT), close=close,
                       extra=[("Content-Encoding", "gzip"), ("ETag", '"v1"')])
        elif path == "/gzip-chunked":
            data = gzip.compress(GZIP_TEXT)
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                         b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(0, len(data), 1000):
                c = data[i:i + 1000]
                sock.sendall(b"%x\r\n%s\r\n" % (len(c), c))
            sock.sendall(b"0\r\n\r\n")
        elif path == "/bad-chunked":  # a hostile or broken origin: framing breaks mid-body
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5\r\nhello\r\nZZ-not-a-size\r\n")
            return False
        elif path == "/once":  # a keep-alive timeout racing the next request
            if any(q.conn == n for q in self.requests[:-1]):
                return False  # not the first request here: close without answering
            self._send(sock, 200, b"once\n", close=close)
        elif path == "/short":  # Content-Length promises more than is sent
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
            return False
        elif path == "/stall":  # part of the body, then nothing
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
            self._stopped.wait()  # the rest never comes
            return False
        elif path == "/closing":  # an origin that ends every connection after one answer
            self._send(sock, 200, b"closing\n", close=True)
            return False
        elif path.startswith("/sized/"):  # a body of the size asked for
            self._send(sock, 200, b"s" * int(path[7:]), close=close)
        elif path == "/early-hints":  # an interim response before the final one
            sock.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
            self._send(sock, 200, b"hinted\n", close=close)
        elif path == "/close-stall":  # a close-delimited body that stops coming
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npartial")
            self._stopped.wait()  # the rest never comes
            return False
        elif path == "/endless":  # a chunked body without end (a stream)
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            piece = b"%x\r\n%s\r\n" % (65536, b"e" * 65536)
            try:
                while not self._stop:
                    sock.sendall(piece)  # until the gateway lets go of this connection
            except OSError:
                self.streams_cut += 1  # what a test waits for: the gateway let go
                raise
            return False
        elif path == "/corrupt-gzip":
            data = bytearray(gzip.compress(GZIP_TEXT))
            data[200:260] = b"\xff" * 60
            self._send(sock, 200, bytes(data), close=True, extra=[("Content-Encoding", "gzip")])
            return False
        elif path == "/hop":  # hop-by-hop fields a proxy must not pass on
            self._send(sock, 200, b"hop\n", close=close,
                       extra=[("Connection", "X-Hop-Resp"), ("X-Hop-Resp", "secret"),
                              ("Keep-Alive", "timeout=5"), ("X-End-To-End", "kept")])
        elif path == "/ntlm":  # connection-based auth (IIS style): the TCP connection is
            # authenticated once, and every later request on it is that user's
            authed = [q for q in self.requests if q.conn == n
                      and (q.header("Authorization") or "").startswith("NTLM ")]
            if authed:
                user = authed[0].header("Authorization")[5:]  # type: ignore[index]
                self._send(sock, 200, f"secret of {user}\n".encode(), close=close)
            else:
                self._send(sock, 401, b"who are you?\n", close=close,
                           extra=[("WWW-Authenticate", "NTLM")])
        elif path == "/big":
            self._send(sock, 200, self.big, close=close, ctype="application/octet-stream")
        elif path == "/upload":
            body = json.dumps({"sha256": req.body_sha, "bytes": req.body_len}).encode()
            self._send(sock, 200, body, close=close, ctype="application/json")
        elif path == "/page":
            self._send(sock, 200, PAGE % self.name.encode(), close=close, ctype="text/html")
        elif path in ("/hello", "/index.html") or path.startswith("/fixed/"):
            self._send(sock, 200, f"hello from {self.name} {target}\n".encode(), close=close)
        else:
            self._send(sock, 404, b"not found\n", close=close)
        return not close

    @staticmethod
    def _send(sock: socket.socket, status: int, body: bytes, *, close: bool,
              ctype: str = "text/plain", extra: list[tuple[str, str]] = ()) -> None:
        phrase = {200: "OK", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found"}[status]
        head = [f"HTTP/1.1 {status} {phrase}", f"Content-Type: {ctype}",
                f"Content-Length: {len(body)}", *[f"{k}: {v}" for k, v in extra]]
        if close:
            head.append("Connection: close")
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)


@contextlib.contextmanager
def origin(**kwargs):
    srv = Origin(**kwargs)
    try:
        yield srv
    finally:
        srv.close()


# -- TLS for HTTPS origins -------------------------------------------------------------
TLS_NAMES = ["localhost", "127.0.0.1"]


def https_context() -> ssl.SSLContext:
    """A server context with a certificate from the test home's development CA."""
    return tls.server_context(names=TLS_NAMES)


def ca_path() -> Path:
    return tls.DevCA().ca_path


def spki_sha256_b64() -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)) of the HTTPS origin's certificate, for
    Chromium's --ignore-certificate-errors-spki-list."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert_path, _ = tls.DevCA().issue(TLS_NAMES)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


# -- clients ---------------------------------------------------------------------------
@dataclass
class CurlResult:
    code: int  # curl's exit code
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    stderr: str

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


def curl(*args: str, timeout: float = 60.0, cwd: Path | None = None) -> CurlResult:
    """Run curl with ``args``; the last response's head is parsed from ``-D``."""
    with contextlib.ExitStack() as stack:
        import tempfile

        d = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        hdr = d / "headers"
        res = subprocess.run(["curl", "-sS", "--noproxy", "", "-D", str(hdr),
                              "--max-time", str(int(timeout)), *args],
                             capture_output=True, timeout=timeout + 10, cwd=cwd,
                             env={k: v for k, v in os.environ.items()
                                  if "proxy" not in k.lower()})
        raw = hdr.read_bytes().decode("latin-1") if hdr.exists() else ""
    status, headers = 0, []
    for block in raw.split("\r\n\r\n"):  # keep the last real (non-1xx, non-CONNECT) head
        lines = [ln for ln in block.split("\r\n") if ln]
        if not lines or not lines[0].startswith("HTTP/"):
            continue
        code = int(lines[0].split()[1])
        if 100 <= code < 200 or "connection established" in lines[0].lower():
            continue
        status = code
        headers = [(k.strip(), v.strip()) for k, _, v in
                   (ln.partition(":") for ln in lines[1:])]
    return CurlResult(res.returncode, status, headers, res.stdout,
                      res.stderr.decode(errors="replace"))


def raw_exchange(port: int, data: bytes, *, timeout: float = 10.0,
                 shut: bool = False) -> bytes:
    """Send ``data`` to the gateway, read until it closes (or ``timeout``)."""
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while piece := sock.recv(65536):
                out.append(piece)
    return b"".join(out)


def status_of(reply: bytes) -> int:
    first = reply.split(b"\r\n", 1)[0].split()
    return int(first[1]) if len(first) > 1 and first[1].isdigit() else 0


def body_of(reply: bytes) -> bytes:
    return reply.partition(b"\r\n\r\n")[2]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def ensure_chromium() -> tuple[str | None, str]:
    """Chromium's path, installing Debian's package once if it is missing."""
    path = chromium_path()
    if path:
        return path, ""
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return None, "chromium is not installed and cannot be installed here (no root apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"],
                ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]):
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run(cmd, env=env, capture_output=True, timeout=600)
        if path := chromium_path():
            return path, ""
    return None, "chromium could not be installed with apt-get (run scripts/install-deps.sh)"


def plain(port: int) -> list[str]:
    """Client options for a gateway on loopback ``port``, in plaintext (the e2e gateways
    accept both; TLS to the gateway has its own tests)."""
    return ["--server", f"127.0.0.1:{port}", "--tls", "off"]


@pytest.fixture(params=["on", "off"], ids=["lane-on", "lane-off"], autouse=True)
def fast_lane(request, monkeypatch):
    """Every gateway a test starts (``env.gateway``) runs with ``--fast-lane on``, and
    the test runs again with it off: the coroutine path alone must behave the same
    (both drive the one GatewayConnection). Active in the test files that import it."""
    monkeypatch.setattr(Env, "gateway_fast_lane", request.param, raising=False)
    return request.param

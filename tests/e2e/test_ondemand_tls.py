"""Client certificates at the TLS-terminating edge (S26, claim 12): curl with --cert/--key
reaches a plain HTTP device through a --tls grant; without a certificate, or with a key
that is not the pinned one, the edge refuses and says why in the audit trail."""

from __future__ import annotations

import http.server
import shutil
import subprocess
import threading

import pytest

from kakehashi.core import tls
from tests.e2e.framework import Env, wait_until
from tests.e2e.ondemand_fixtures import IMSI, OnDemand
from tests.support.listener import ReplyAtEnd

pytestmark = pytest.mark.skipif(not (shutil.which("curl") and shutil.which("openssl")),
                                reason="curl and openssl are needed (scripts/install-deps.sh)")

BODY = b"hello from a device that speaks no TLS\n"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def device():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def client_cert(root, name):
    ca = tls.DevCA(root / "clients")
    key, csr = tls.new_key_and_csr(name)
    (root / f"{name}.key").write_bytes(key)
    (root / f"{name}.pem").write_bytes(ca.sign_csr(csr, unit="client"))
    return ca.ca_path, root / f"{name}.pem", root / f"{name}.key"


def curl(env: Env, port: int, *cert: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert",
                           str(env.home / "ca" / "ca.pem"), *cert,
                           f"https://127.0.0.1:{port}/"], capture_output=True, timeout=30)


def denial(od: OnDemand, gid: str) -> dict:
    evs = wait_until(lambda: [e for e in od.events(gid) if e["event"] == "denied"], 15,
                     what="a denial", interval=0.2)
    return evs[0]


def test_client_certificates_at_the_edge(env, device):
    od = OnDemand(env).start()
    ca_pem, alice_pem, alice_key = client_cert(env.root, "alice")
    _, bob_pem, _ = client_cert(env.root, "bob")
    aid = od.cli("auth-info", "add", "--ca", str(ca_pem))["id"]
    g = od.grant(f"{IMSI}:{device}", "--ttl", "60s", "--tls", "--auth-info", aid)
    res = curl(env, g["port"], "--cert", str(alice_pem), "--key", str(alice_key))
    assert res.returncode == 0 and res.stdout == BODY, res.stderr

    # openssl s_client without a certificate: no byte of the device comes back
    sc = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{g['port']}",
                         "-quiet", "-verify_quiet"], input=b"GET / HTTP/1.0\r\n\r\n",
                        capture_output=True, timeout=30)
    assert BODY not in sc.stdout
    assert denial(od, g["id"])["reason"] == "certificate"

    # a pinned key: the CA's other client (bob) is refused, alice gets through
    pinned = od.cli("auth-info", "add", "--ca", str(ca_pem), "--pin", str(bob_pem))["id"]
    g2 = od.grant(f"{IMSI}:{device}", "--ttl", "60s", "--tls", "--auth-info", pinned)
    res = curl(env, g2["port"], "--cert", str(alice_pem), "--key", str(alice_key))
    assert BODY not in res.stdout
    d = denial(od, g2["id"])
    assert d["reason"] == "certificate" and "pin" in d["detail"]


def test_the_edge_resumes_a_clients_session_and_still_checks_its_pin(env, device):
    """A grant's TLS leg issues tickets from keys that rotate (core/tls.TicketKeys): a
    client's next connection resumes, and the pinned certificate is checked on the
    resumed connection as on the first."""
    import socket
    import ssl

    od = OnDemand(env).start()
    ca_pem, alice_pem, alice_key = client_cert(env.root, "alice")
    aid = od.cli("auth-info", "add", "--ca", str(ca_pem), "--pin", str(alice_pem))["id"]
    g = od.grant(f"{IMSI}:{device}", "--ttl", "60s", "--tls", "--auth-info", aid)
    ctx = ssl.create_default_context(cafile=str(env.home / "ca" / "ca.pem"))
    ctx.load_cert_chain(alice_pem, alice_key)

    def get(session: ssl.SSLSession | None) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", g["port"]), timeout=20)
        s = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        reply = b""
        while piece := s.recv(4096):
            reply += piece
        assert reply.endswith(BODY), reply[:200]
        return s

    first = get(None)
    second = get(first.session)
    assert not first.session_reused and second.session_reused
    for s in (first, second):
        s.close()
    assert not [e for e in od.events(g["id"]) if e["event"] == "denied"]


#: what the device answers after the digest of what it read
REPLY = bytes(reversed(range(256))) * (16 << 10)  # 4 MiB


@pytest.mark.parametrize("tuning", ["on", "off"])
def test_bulk_both_ways_through_a_tls_grant(env, tuning):
    """Bulk bytes through a --tls grant: the client's TLS ends at the edge, which
    encrypts again for its link to the inner relay, with the bulk TLS tuning on or off
    (long writes corked, KAKEHASHI_TLS_CORK; the pump's sources read ahead,
    KAKEHASHI_TLS_READ_AHEAD). 16 MiB up, the client's end (a TCP half-close under its
    TLS), then the device's digest and 4 MiB down: every byte intact both ways."""
    import hashlib
    import socket
    import ssl

    env.env["KAKEHASHI_TLS_CORK"] = env.env["KAKEHASHI_TLS_READ_AHEAD"] = tuning
    device = ReplyAtEnd(lambda _count, digest: digest + REPLY)
    try:
        od = OnDemand(env).start()
        g = od.grant(f"{IMSI}:{device.port}", "--ttl", "60s", "--tls")
        ctx = ssl.create_default_context(cafile=str(env.home / "ca" / "ca.pem"))
        data = bytes(range(256)) * (64 << 10)  # 16 MiB
        raw = socket.create_connection(("127.0.0.1", g["port"]), timeout=30)
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(data)
            socket.socket.shutdown(s, socket.SHUT_WR)  # TCP half-close, TLS state kept
            reply = bytearray()
            while piece := s.recv(1 << 16):
                reply += piece
        assert bytes(reply[:32]) == hashlib.sha256(data).digest()
        assert bytes(reply[32:]) == REPLY
    finally:
        device.close()

"""On-demand access end to end (spec 002): real manager, edge and inner processes from the
CLI, real clients, bytes checked by SHA-256, every decision read back from the audit trail.

One system serves the module (starting three processes costs seconds); each case makes
grants of its own.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.e2e.framework import Env, stream_through, wait_until
from tests.e2e.ondemand_fixtures import IMSI, OnDemand
from tests.support.wait import wait_closed


@pytest.fixture(scope="module")
def od(tmp_path_factory):
    env = Env(tmp_path_factory.mktemp("ondemand"))
    try:
        yield OnDemand(env).start()
    finally:
        env.close()


def events_until(od: OnDemand, gid: str, pred, what: str) -> list[dict]:
    return wait_until(lambda: (lambda evs: evs if pred(evs) else None)(od.events(gid)),
                      15, what=what, interval=0.2)


def test_grant_then_echo_intact(od, echo_mod):
    g = od.grant(f"{IMSI}:{echo_mod.port}", "--ttl", "60s")
    assert g["host"] == "127.0.0.1" and od.ports[0] <= g["port"] <= od.ports[1]
    assert g["edge"] == "edge-1" and g["policy"] == "random" and "random" in g["reason"]
    sent, got, n = stream_through(g["port"], 4 << 20)
    assert n == 4 << 20 and sent == got
    evs = events_until(od, g["id"], lambda e: any(x["event"] == "closed" for x in e),
                       "closed event")
    kinds = [e["event"] for e in evs]
    assert kinds[:1] == ["created"] and "access" in kinds and "connected" in kinds
    closed = next(e for e in evs if e["event"] == "closed")
    assert closed["bytes_up"] == 4 << 20 and closed["bytes_down"] == 4 << 20
    assert closed["duration"] >= 0 and closed["reason"] == "done"
    listed = od.cli("grants")
    assert g["id"] in {x["id"] for x in listed}


def test_cidr_refusal_never_reaches_the_device(od, echo_mod):
    g = od.grant(f"{IMSI}:{echo_mod.port}", "--ttl", "60s", "--cidr", "203.0.113.0/24")
    before = echo_mod.connections
    with socket.create_connection(("127.0.0.1", g["port"]), timeout=10) as c:
        c.sendall(b"should-not-pass")
        got = wait_closed(c)
    assert b"should-not-pass" not in got
    assert b"refused (cidr)" in got  # connection error information (S27)
    evs = events_until(od, g["id"], lambda e: any(x["event"] == "denied" for x in e), "denial")
    denied = next(e for e in evs if e["event"] == "denied")
    assert denied["reason"] == "cidr" and denied["client"] == "127.0.0.1"
    assert echo_mod.connections == before


def test_expiry_cuts_a_transfer_mid_stream(od, echo_mod):
    g = od.grant(f"{IMSI}:{echo_mod.port}", "--ttl", "3s")
    expires = g["expires_at_ts"]
    c = socket.create_connection(("127.0.0.1", g["port"]), timeout=10)
    c.settimeout(10)
    cut_at = None
    sent = 0
    try:
        while time.time() < expires + 5:
            c.sendall(b"x" * 4096)
            sent += 4096
            if not c.recv(65536):
                cut_at = time.time()
                break
    except OSError:
        cut_at = time.time()
    finally:
        c.close()
    assert cut_at is not None and sent > 0
    assert cut_at - expires < 1.5, f"cut {cut_at - expires:.2f}s after expiry"
    evs = events_until(od, g["id"], lambda e: any(x["event"] == "closed" for x in e),
                       "closed at expiry")
    closed = next(e for e in evs if e["event"] == "closed")
    assert closed["reason"] == "expired" and closed["bytes_up"] > 0
    assert any(e["event"] == "expired" for e in evs)
    # the port is gone and a new connection is not relayed
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", g["port"]), timeout=2).close()


def test_extend_then_revoke_a_live_connection(od, echo_mod):
    g = od.grant(f"{IMSI}:{echo_mod.port}", "--ttl", "2s")
    c = socket.create_connection(("127.0.0.1", g["port"]), timeout=10)
    c.sendall(b"a")
    assert c.recv(10) == b"a"
    ext = od.cli("extend", g["id"], "--ttl", "60s")
    assert ext["expires_in"] > 30
    # past the original expiry the connection still works
    wait_until(lambda: time.time() >= g["expires_at_ts"] + 0.5, 10,
               what="the original expiry passed")
    c.sendall(b"b")
    assert c.recv(10) == b"b"
    t0 = time.time()
    od.cli("revoke", g["id"])
    wait_closed(c, timeout=5)
    assert time.time() - t0 < 3
    c.close()
    evs = events_until(od, g["id"], lambda e: any(x["event"] == "closed" for x in e), "closed")
    kinds = [e["event"] for e in evs]
    assert "extended" in kinds and "deleted" in kinds
    assert next(e for e in evs if e["event"] == "closed")["reason"] == "revoked"
    assert next(e for e in evs if e["event"] == "deleted")["reason"] == "revoked"


def test_twenty_concurrent_connections_on_one_grant(od, echo_mod):
    g = od.grant(f"{IMSI}:{echo_mod.port}", "--ttl", "60s")
    results: list[tuple[str, str, int]] = []

    def one() -> None:
        results.append(stream_through(g["port"], 256 << 10, chunk=64 << 10))

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 20
    assert all(n == 256 << 10 and a == b for a, b, n in results)


def test_connection_cap_denies_with_limit(od, echo_mod):
    g = od.grant(f"{IMSI}:{echo_mod.port}", "--ttl", "60s", "--max-connections", "1")
    with socket.create_connection(("127.0.0.1", g["port"]), timeout=10) as first:
        first.sendall(b"1")
        assert first.recv(10) == b"1"
        with socket.create_connection(("127.0.0.1", g["port"]), timeout=10) as second:
            assert b"refused (limit)" in wait_closed(second)
    evs = events_until(od, g["id"], lambda e: any(x["event"] == "denied" for x in e), "limit")
    assert next(e for e in evs if e["event"] == "denied")["reason"] == "limit"


def test_bad_requests_get_clear_errors(od, echo_mod):
    # (every refusal is covered in-process by tests/unit/test_ondemand_api.py; here the
    # CLI says it in words)
    for args, text in [
        ((f"001010000000009:{echo_mod.port}", "--ttl", "60s"), "no device with IMSI"),
        ((f"{IMSI}:{echo_mod.port}", "--ttl", "400d"), "beyond"),
    ]:
        res = od.cli("grant", *args, check=False)
        assert res.returncode != 0 and text in res.stderr.decode(), res.stderr
    res = od.cli("grant", f"{IMSI}:{echo_mod.port}", role="edge", check=False)
    assert res.returncode != 0 and "may not" in res.stderr.decode()
    assert od.cli("devices")[0]["imsi"] == IMSI
    assert od.cli("edges")[0]["online"] is True


def test_openssh_through_a_grant(od):
    import getpass
    import hashlib
    import subprocess

    from tests.e2e import sshd

    ok, why = sshd.available()
    if not ok:
        pytest.skip(why)
    server = sshd.start_sshd(od.env)
    g = od.grant(f"{IMSI}:{server.port}", "--ttl", "60s")
    blob = od.env.root / "blob"
    blob.write_bytes(bytes(range(256)) * 8000)  # 2 MB
    with open(blob, "rb") as stdin:  # the host key pinned for [127.0.0.1]:* is checked
        res = subprocess.run(server.ssh_args("-p", str(g["port"]),
                                             f"{getpass.getuser()}@127.0.0.1", "sha256sum"),
                             stdin=stdin, capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout.split()[0].decode() == hashlib.sha256(blob.read_bytes()).hexdigest()


def test_inner_dials_only_what_was_granted(od, echo_mod):
    """A party with a valid edge identity still cannot make the inner relay dial an
    address or port that no grant names; a peer without one cannot even connect."""
    import ssl

    from websockets.sync.client import connect

    from kakehashi.core import tls, wire
    from kakehashi.ondemand import messages as m

    g = od.grant(f"{IMSI}:{echo_mod.port}", "--ttl", "60s")
    from pathlib import Path

    token = Path(od.tokens["edge"]).read_text().strip()
    key, csr = tls.new_key_and_csr("rogue")
    url = od.url.replace("http://", "ws://") + "/v1/relays/control"
    with connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        ws.send(m.encode(m.Hello(kind="edge", name="rogue", csr=csr.decode(),
                                 public_host="127.0.0.1", ports=(1, 1))))
        welcome = m.decode_to_relay(ws.recv())
    assert isinstance(welcome, m.Welcome)
    (od.env.root / "rogue.pem").write_text(welcome.cert)
    (od.env.root / "rogue.key").write_bytes(key)
    inner_port = od.procs["core-1"].bound_port()

    def dial(address: str, port: int, cert: bool = True) -> m.DialResult:
        ctx = ssl.create_default_context(cadata=welcome.ca)
        if cert:
            ctx.load_cert_chain(od.env.root / "rogue.pem", od.env.root / "rogue.key")
        with socket.create_connection(("127.0.0.1", inner_port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(wire.PREAMBLE + m.link_codec.encode(
                m.Dial(grant=g["id"], imsi=IMSI, address=address, port=port)))
            dec = wire.FrameDecoder(m.LINK_LIMITS)
            while (frame := dec.next_frame()) is None:
                data = s.recv(4096)
                if not data:
                    raise ConnectionError("closed without an answer")
                dec.feed(data)
            return m.link_codec.decode(frame.payload)

    before = echo_mod.connections
    assert not dial("127.0.0.1", 22).ok  # a port the grant does not name
    res = dial("10.9.9.9", echo_mod.port)  # not the device's address
    assert not res.ok and "not granted" in res.reason
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        dial("127.0.0.1", echo_mod.port, cert=False)  # no certificate from the manager
    assert echo_mod.connections == before
    evs = events_until(od, g["id"], lambda e: any(x["event"] == "refused" for x in e),
                       "the inner relay's refusal")
    refused = next(e for e in evs if e["event"] == "refused")
    assert refused["reason"] == "not-granted" and refused["inner"] == "core-1"


def test_events_follow_until_the_grant_ends_and_tables(od, echo_mod):
    g = od.grant(f"{IMSI}:{echo_mod.port}", "--ttl", "2s")
    follow = od.env.spawn("events-follow", "ondemand", "events", g["id"], "--follow",
                          "--server", od.url, "--token-file", od.tokens["admin"])
    follow.wait_for("created")
    assert roundtrip_ok(g["port"])
    follow.wait_for("expired", timeout=20)
    follow.popen.wait(20)  # it ends by itself once the grant has ended
    out = follow.output()
    assert follow.popen.returncode == 0 and "connected" in out and "closed" in out
    table = od.env.run("ondemand", "grants", "--all", "--server", od.url, "--token-file",
                       od.tokens["admin"]).stdout.decode()
    assert table.splitlines()[0].split()[:3] == ["ID", "HOST", "PORT"] and g["id"] in table


def roundtrip_ok(port: int) -> bool:
    from tests.e2e.framework import roundtrip

    return roundtrip(port, b"ping") == b"ping"

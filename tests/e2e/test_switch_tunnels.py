"""The socket switch end to end (spec 003): real server and gateway processes on
loopback, started through the CLI; S1-S7 through the command lines, bytes checked by
SHA-256, several streams at once, half-close, the long-poll transport, UDP, limits."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from kakehashi.core.apiclient import ApiClientError
from tests.e2e.framework import EchoServer, Env, stream_through, wait_until
from tests.e2e.switch_fixtures import Switch, port_of
from tests.support.listener import stop_listener


@pytest.fixture(scope="module")
def sw(tmp_path_factory, echo_mod):
    env = Env(tmp_path_factory.mktemp("switch"))
    try:
        s = Switch(env).start()
        s.gateway("asp1", "gw-srv")
        s.gateway("alice", "gw-alice")
        s.gateway("alice", "gw-alice-poll", "--transport", "poll")
        s.register("echo", echo_mod.addr, allow=("alice",))
        yield s
    finally:
        env.close()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 2).close()
    except OSError:
        return True
    return False


def test_cli_lifecycle(sw: Switch, echo_mod: EchoServer) -> None:
    """register (S1), list (S2), open (S3-S5), tunnels, close (S6-S7) as written."""
    sw.cli("asp1", "register", "echo-cli", "--gateway", "gw-srv", "--target", echo_mod.addr,
           "--allow", "alice")
    assert "echo-cli" in sw.cli("alice", "list").stdout.decode()
    assert "echo-cli" not in sw.cli("mallory", "list").stdout.decode()
    out = sw.cli("alice", "open", "echo-cli", "--gateway", "gw-alice", "--listen",
                 "127.0.0.1:0", "--json").stdout
    t = json.loads(out)
    assert t["state"] == "established" and t["tunnel"].startswith("t")
    sent, got, n = stream_through(port_of(t), 2 << 20)
    assert sent == got and n == 2 << 20
    rows = json.loads(sw.cli("alice", "tunnels", "--json").stdout)
    assert any(r["tunnel"] == t["tunnel"] and r["state"] == "established" for r in rows)
    closed = json.loads(sw.cli("alice", "close", t["tunnel"], "--json").stdout)
    assert closed["state"] == "deleted"
    assert refused(port_of(t))
    rows = json.loads(sw.cli("alice", "tunnels", "--all", "--json").stdout)
    assert [r["state"] for r in rows if r["tunnel"] == t["tunnel"]] == ["deleted"]
    events = [e["event"] for e in sw.audit() if e.get("tunnel") == t["tunnel"]]
    for step in ("tunnel-setting", "report-S4a", "report-S4b", "tunnel-established",
                 "connection", "tunnel-deleting", "report-S7a", "report-S7b",
                 "tunnel-deleted"):
        assert step in events, events


def test_parallel_streams_with_an_interactive_one(sw: Switch) -> None:
    """8 x 64 MiB echoed at once through one tunnel, each intact (SHA-256), while an
    interactive echo on the same tunnel keeps answering. Its latency is measured by
    bench/switch_bench.py (the parallel row), not asserted here."""
    t = sw.open("echo")
    port = port_of(t)
    results: list[tuple[str, str, int]] = []
    size = 64 << 20

    def bulk() -> None:
        results.append(stream_through(port, size, timeout=600))

    threads = [threading.Thread(target=bulk) for _ in range(8)]
    pings = 0
    with socket.create_connection(("127.0.0.1", port), 10) as ping:
        ping.settimeout(120)
        ping.sendall(b"x")
        assert ping.recv(1) == b"x"  # the interactive stream is open before the bulk
        for th in threads:
            th.start()
        while any(th.is_alive() for th in threads):
            ping.sendall(bytes([pings % 256]))
            assert ping.recv(1) == bytes([pings % 256])
            pings += 1
    for th in threads:
        th.join()
    assert len(results) == 8 and all(s == g and n == size for s, g, n in results)
    assert pings, "the bulk streams ended before a single ping"
    sw.close(t["tunnel"])


def test_long_poll_transport(sw: Switch) -> None:
    t = sw.open("echo", gateway="gw-alice-poll")
    sent, got, n = stream_through(port_of(t), 4 << 20)
    assert sent == got and n == 4 << 20
    # half-close passes end to end: the echo's answer ends after ours did
    with socket.create_connection(("127.0.0.1", port_of(t)), 10) as c:
        c.sendall(b"last words")
        c.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := c.recv(1024):
            data += chunk
    assert data == b"last words"
    sw.close(t["tunnel"])
    assert refused(port_of(t))


def test_udp_service(sw: Switch) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))

    def answer() -> None:
        while True:
            try:
                data, addr = server.recvfrom(65535)
            except OSError:
                return
            if addr is None:  # woken by the shutdown at the end of the test
                return
            server.sendto(data.upper(), addr)

    answerer = threading.Thread(target=answer, daemon=True)
    answerer.start()
    try:
        sw.register("dns-like", f"127.0.0.1:{server.getsockname()[1]}", proto="udp")
        t = sw.open("dns-like")
        assert t["proto"] == "udp"
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.settimeout(1.0)
        got = set()
        payloads = [f"datagram {i}".encode() for i in range(20)]

        def all_back() -> bool:
            for p in payloads:
                if p.upper() not in got:
                    client.sendto(p, ("127.0.0.1", port_of(t)))
            try:
                while True:
                    got.add(client.recvfrom(65535)[0])
            except OSError:
                pass
            return all(p.upper() in got for p in payloads)

        wait_until(all_back, 20, what="20 datagrams answered through the tunnel")
        client.close()
        sw.close(t["tunnel"])
    finally:
        stop_listener(server, answerer)  # wake and join before the number is freed


def test_connection_limit_and_live_count(sw: Switch, echo_mod: EchoServer) -> None:
    sw.register("one-at-a-time", echo_mod.addr, max_connections=1)
    t = sw.open("one-at-a-time")
    with socket.create_connection(("127.0.0.1", port_of(t)), 10) as first:
        first.sendall(b"a")
        assert first.recv(1) == b"a"
        row = next(r for r in sw.api("asp1").request("GET", "/v1/services")
                   if r["name"] == "one-at-a-time")
        assert row["connections"] == 1
        with socket.create_connection(("127.0.0.1", port_of(t)), 10) as second:
            second.settimeout(10)
            with pytest.raises(OSError):  # reset, or closed without a byte
                second.sendall(b"b")
                if not second.recv(1):
                    raise ConnectionResetError("closed")
        first.sendall(b"c")
        assert first.recv(1) == b"c"  # the first goes on
    assert any(e["event"] == "connection" and e["decision"] == "deny"
               and e.get("reason") == "connection limit" for e in sw.audit())
    sw.close(t["tunnel"])


def test_setup_rolled_back_when_the_server_side_fails(sw: Switch) -> None:
    """All or nothing: the real server is unreachable, so the user's half goes too."""
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    target = f"127.0.0.1:{dead.getsockname()[1]}"
    dead.close()
    sw.register("broken", target)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    listen_port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(ApiClientError) as exc:
        sw.open("broken", listen=f"127.0.0.1:{listen_port}")
    assert exc.value.code == "setup-failed" and "cannot reach" in exc.value.message
    assert refused(listen_port)
    rows = sw.api("alice").request("GET", "/v1/tunnels", params={"all": 1})
    assert [r["state"] for r in rows if r["service"] == "broken"] == ["deleted"]


def test_openssh_through_a_tunnel(sw: Switch) -> None:
    """An unmodified OpenSSH client and server: ssh to the pseudo socket, 2 MB through
    sha256sum on the far side."""
    import getpass
    import hashlib
    import subprocess

    from tests.e2e import sshd

    ok, why = sshd.available()
    if not ok:
        pytest.skip(why)
    server = sshd.start_sshd(sw.env)
    sw.register("ssh", f"127.0.0.1:{server.port}")
    t = sw.open("ssh")
    blob = sw.env.root / "blob"
    blob.write_bytes(bytes(range(256)) * 8000)
    with open(blob, "rb") as stdin:  # the host key pinned for [127.0.0.1]:* is checked
        res = subprocess.run(server.ssh_args("-p", str(port_of(t)),
                                             f"{getpass.getuser()}@127.0.0.1", "sha256sum"),
                             stdin=stdin, capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout.split()[0].decode() == hashlib.sha256(blob.read_bytes()).hexdigest()
    sw.close(t["tunnel"])


def test_a_reset_travels_end_to_end(sw: Switch) -> None:
    """The real server aborts (RST): the client learns at once, not at its next write
    timeout; the client aborting reaches the real server the same way."""
    import struct

    srv = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def serve() -> None:
        while True:  # the setup's reachability check (S3b) connects and says nothing
            c, _ = srv.accept()
            if c.recv(1):
                break
            c.close()
        # first: abort after the first byte
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        c, _ = srv.accept()  # second: wait for the client's abort
        c.settimeout(20)
        try:
            seen.append(c.recv(10) + c.recv(10))
        except OSError as exc:
            seen.append(type(exc).__name__.encode())
        c.close()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        sw.register("aborts", f"127.0.0.1:{srv.getsockname()[1]}")
        t = sw.open("aborts")
        with socket.create_connection(("127.0.0.1", port_of(t)), 10) as c:
            c.settimeout(20)
            c.sendall(b"x")
            try:
                assert c.recv(1) == b""
            except ConnectionResetError:
                pass
        c = socket.create_connection(("127.0.0.1", port_of(t)), 10)
        c.sendall(b"y")
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        th.join(30)
        assert seen and seen[0] in (b"y", b"ConnectionResetError"), seen
        sw.close(t["tunnel"])
    finally:
        stop_listener(srv, th)

"""Gateways and the server going away: the server notices a dead gateway and marks
its tunnels, a gateway that comes back without its tunnel gets it deleted on the other
side too, and after a server restart the gateways find it again (backoff with jitter)
with the catalog kept."""

from __future__ import annotations

import json
import signal
import socket

import pytest

from tests.e2e.framework import EchoServer, Env, stream_through, wait_until
from tests.e2e.switch_fixtures import Switch, port_of


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 2).close()
    except OSError:
        return True
    return False


def test_dead_gateway_marks_then_deletes_its_tunnels(env: Env, echo: EchoServer) -> None:
    sw = Switch(env).start()
    srv_gw = sw.gateway("asp1", "gw-srv")
    sw.gateway("alice", "gw-alice")
    sw.register("echo", echo.addr)
    t = sw.open("echo")
    srv_gw.popen.send_signal(signal.SIGKILL)
    srv_gw.popen.wait(10)
    api = sw.api("alice")
    wait_until(lambda: api.request("GET", f"/v1/tunnels/{t['tunnel']}")["offline"] == ["gw-srv"],
               15, what="the tunnel marked offline")
    # a connection meanwhile is refused at once (reset), not left hanging
    with socket.create_connection(("127.0.0.1", port_of(t)), 5) as c:
        c.settimeout(15)
        try:
            assert c.recv(1) == b""
        except ConnectionResetError:
            pass
    # it comes back as a new process without the tunnel: the tunnel is deleted, both sides
    sw.gateway("asp1", "gw-srv")
    wait_until(lambda: api.request("GET", f"/v1/tunnels/{t['tunnel']}")["state"] == "deleted",
               15, what="the tunnel deleted")
    wait_until(lambda: refused(port_of(t)), 15, what="alice's pseudo socket removed")
    t2 = sw.open("echo")
    sent, got, n = stream_through(port_of(t2), 1 << 20)
    assert sent == got and n == 1 << 20


def test_server_restart_gateways_come_back(env: Env, echo: EchoServer) -> None:
    sw = Switch(env).start()
    gw_srv = sw.gateway("asp1", "gw-srv")
    gw_alice = sw.gateway("alice", "gw-alice")
    sw.register("echo", echo.addr)
    sw.procs["server"].stop()
    port = sw.port
    proc = env.spawn("switch-server-2", "switch", "server", "--listen", f"127.0.0.1:{port}",
                     "--db", sw.db, "--tls", "off", "--audit-log", str(sw.audit_path))
    proc.wait_for("listening on")
    for gw in (gw_srv, gw_alice):
        wait_until(lambda gw=gw: gw.output().count("registered as") >= 2, 30,
                   what="the gateway back on the restarted server")
    assert [s["name"] for s in sw.api("alice").request("GET", "/v1/services")] == ["echo"]
    t = sw.open("echo")
    sent, got, n = stream_through(port_of(t), 1 << 20)
    assert sent == got and n == 1 << 20


def test_short_outage_keeps_the_pseudo_socket(env: Env, echo: EchoServer) -> None:
    """alice's gateway reaches the server through a proxy that dies and comes back: the
    gateway reconnects, says it still holds the tunnel, and the same local port works."""
    sw = Switch(env).start()
    sw.gateway("asp1", "gw-srv")
    proxy, pport = env.gateway(f"127.0.0.1:{sw.port}")
    gw = sw.gateway("alice", "gw-alice", "--proxy", f"http://127.0.0.1:{pport}")
    sw.register("echo", echo.addr)
    t = sw.open("echo")
    proxy.stop()
    wait_until(lambda: "link to" in gw.output(), 15, what="the gateway noticed the outage")
    env.gateway(f"127.0.0.1:{sw.port}", port=pport, name="gateway-again")
    wait_until(lambda: "registered as alice's (websocket link, 1 tunnels kept)"
               in gw.output(), 30, what="the gateway back, its tunnel kept")
    api = sw.api("alice")
    wait_until(lambda: api.request("GET", f"/v1/tunnels/{t['tunnel']}")["offline"] == [],
               15, what="the tunnel no longer marked")
    assert api.request("GET", f"/v1/tunnels/{t['tunnel']}")["state"] == "established"
    sent, got, n = stream_through(port_of(t), 1 << 20)
    assert sent == got and n == 1 << 20


def restart_server(env: Env, sw: Switch, *extra: str) -> None:
    """SIGKILL the server (no clean-up at all) and start a new one on the same port and
    database."""
    sw.procs["server"].kill9()
    proc = env.spawn("switch-server-2", "switch", "server", "--listen",
                     f"127.0.0.1:{sw.port}", "--db", sw.db, "--tls", "off", "--audit-log",
                     str(sw.audit_path), *extra)
    proc.wait_for("listening on")
    sw.procs["server"] = proc


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_tunnel_survives_a_server_sigkill(env: Env, echo: EchoServer, store: str,
                                          request: pytest.FixtureRequest) -> None:
    """The tunnel's record is in the store (a SQLite file, or a real redis-server
    through --db redis://): after the restart both gateways re-report their halves and
    the same tunnel carries a new connection without a new `open`."""
    sw = Switch(env)
    if store == "redis":
        sw.db = request.getfixturevalue("redis_url")
    sw.start()
    gws = [sw.gateway("asp1", "gw-srv"), sw.gateway("alice", "gw-alice")]
    sw.register("echo", echo.addr)
    opened = json.loads(sw.cli("alice", "open", "echo", "--gateway", "gw-alice",
                               "--json").stdout)
    tid = opened["tunnel"]
    assert opened["state"] == "established"
    restart_server(env, sw)
    for gw in gws:
        wait_until(lambda gw=gw: "registered as" in gw.output().split("link to")[-1], 30,
                   what="the gateway back on the restarted server")
    api = sw.api("alice")
    wait_until(lambda: api.request("GET", f"/v1/tunnels/{tid}")["offline"] == [], 30,
               what="both halves re-reported")
    sent, got, n = stream_through(port_of(opened), 4 << 20)
    assert sent == got and n == 4 << 20
    rows = json.loads(sw.cli("alice", "tunnels", "--json").stdout)
    row = next(r for r in rows if r["tunnel"] == tid)
    assert row["state"] == "established" and row["listen"] == opened["listen"]
    assert row["connections_total"] >= 1
    events = [(e["event"], e.get("tunnel")) for e in sw.audit()]
    assert ("tunnel-restored", tid) in events and ("tunnel-reestablished", tid) in events
    closed = json.loads(sw.cli("alice", "close", tid, "--json").stdout)
    assert closed["state"] == "deleted"
    wait_until(lambda: refused(port_of(opened)), 15, what="alice's pseudo socket removed")


def test_restored_tunnel_whose_half_stays_away_is_rolled_back(env: Env,
                                                              echo: EchoServer) -> None:
    sw = Switch(env).start()
    gw_srv = sw.gateway("asp1", "gw-srv")
    gw_alice = sw.gateway("alice", "gw-alice")
    sw.register("echo", echo.addr)
    t = sw.open("echo")
    gw_srv.kill9()
    restart_server(env, sw, "--offline-grace", "3")
    wait_until(lambda: "registered as" in gw_alice.output().split("link to")[-1], 30,
               what="alice's gateway back on the restarted server")
    api = sw.api("alice")
    wait_until(lambda: api.request("GET", f"/v1/tunnels/{t['tunnel']}")["state"] == "deleted",
               30, what="the tunnel rolled back")
    reason = api.request("GET", f"/v1/tunnels/{t['tunnel']}")["reason"]
    # (on a loaded machine gw-alice may also miss the short grace: then both are named)
    assert reason.startswith("gateway ") and "gw-srv" in reason
    assert reason.endswith("did not come back after the server restarted")
    wait_until(lambda: refused(port_of(t)), 15, what="alice's pseudo socket removed")
    assert any(e["event"] == "tunnel-deleted" and e.get("tunnel") == t["tunnel"]
               and "did not come back" in e.get("reason", "") for e in sw.audit())

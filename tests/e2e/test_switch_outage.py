"""Gateways and the server going away: the server notices a dead gateway and marks
its tunnels, a gateway that comes back without its tunnel gets it deleted on the other
side too, and after a server restart the gateways find it again (backoff with jitter)
with the catalog kept."""

from __future__ import annotations

import signal
import socket

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

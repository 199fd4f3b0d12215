"""Two switch server nodes on one real redis-server (issue 11): the service's gateway
attached to one node, the user's gateway to the other, and a tunnel between them."""

from __future__ import annotations

import json
import socket
import threading

from tests.e2e.framework import EchoServer, Env, stream_through, wait_until
from tests.e2e.switch_fixtures import Switch, port_of


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 2).close()
    except OSError:
        return True
    return False


def node(env: Env, redis_url: str, name: str) -> Switch:
    sw = Switch(env)
    sw.db = redis_url
    sw.audit_path = env.root / f"sw-audit-{name}.jsonl"
    return sw.start("--node", name)


def test_a_tunnel_between_gateways_on_two_nodes(env: Env, echo: EchoServer,
                                                redis_url: str) -> None:
    a = node(env, redis_url, "node-a")
    b = node(env, redis_url, "node-b")
    b.gateway("asp1", "gw-srv")  # the service's gateway on node b
    a.gateway("alice", "gw-alice")  # the user's on node a
    b.register("echo", echo.addr)  # registered through node b, seen by node a
    assert [s["name"] for s in a.api("alice").request("GET", "/v1/services")] == ["echo"]
    opened = json.loads(a.cli("alice", "open", "echo", "--gateway", "gw-alice",
                              "--json").stdout)
    assert opened["state"] == "established"
    # several streams at once across the nodes, each intact
    results: list[tuple[str, str, int]] = []
    threads = [threading.Thread(target=lambda: results.append(
        stream_through(port_of(opened), 4 << 20))) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert len(results) == 3 and all(s == g and n == 4 << 20 for s, g, n in results)
    rows = json.loads(a.cli("alice", "tunnels", "--json").stdout)
    assert [r["state"] for r in rows if r["tunnel"] == opened["tunnel"]] == ["established"]
    # the gateway on node b drops its link and comes back: the tunnel's home (node a)
    # hears it, and the same tunnel carries a new connection
    b.procs["gw-srv"].kill9()
    api = a.api("alice")
    wait_until(lambda: api.request("GET", f"/v1/tunnels/{opened['tunnel']}")["offline"]
               == ["gw-srv"], 30, what="node a marks the tunnel")
    b.gateway("asp1", "gw-srv")  # a new process: it lost its half, so the tunnel goes
    wait_until(lambda: api.request("GET", f"/v1/tunnels/{opened['tunnel']}")["state"]
               == "deleted", 30, what="the tunnel deleted on node a")
    wait_until(lambda: refused(port_of(opened)), 15, what="alice's pseudo socket removed")
    # a new one works, and closing it deletes both halves across the nodes
    t2 = json.loads(a.cli("alice", "open", "echo", "--gateway", "gw-alice",
                          "--json").stdout)
    sent, got, n = stream_through(port_of(t2), 1 << 20)
    assert sent == got and n == 1 << 20
    closed = json.loads(a.cli("alice", "close", t2["tunnel"], "--json").stdout)
    assert closed["state"] == "deleted"
    assert refused(port_of(t2))
    events = [e["event"] for e in a.audit() if e.get("tunnel") == t2["tunnel"]]
    assert "report-S4b" in events and "report-S7b" in events  # gw-srv's reports, via b


def test_a_home_node_killed_and_restarted_takes_its_cross_node_tunnel_back(
        env: Env, echo: EchoServer, redis_url: str) -> None:
    a = node(env, redis_url, "node-a")
    b = node(env, redis_url, "node-b")
    gw_srv = b.gateway("asp1", "gw-srv")
    gw_alice = a.gateway("alice", "gw-alice")
    b.register("echo", echo.addr)
    t = a.open("echo")
    a.procs["server"].kill9()
    proc = env.spawn("node-a-again", "switch", "server", "--listen", f"127.0.0.1:{a.port}",
                     "--db", redis_url, "--tls", "off", "--audit-log", str(a.audit_path),
                     "--node", "node-a")
    proc.wait_for("listening on")
    a.procs["server"] = proc
    # alice's gateway finds node a again; node b renews gw-srv's link on node a's request
    for gw in (gw_alice, gw_srv):
        wait_until(lambda gw=gw: gw.output().count("registered as") >= 2, 30,
                   what=f"{gw.name} said hello again")
    api = a.api("alice")
    wait_until(lambda: api.request("GET", f"/v1/tunnels/{t['tunnel']}")["offline"] == [],
               30, what="both halves re-reported to the restarted home")
    sent, got, n = stream_through(port_of(t), 2 << 20)
    assert sent == got and n == 2 << 20
    assert a.close(t["tunnel"])["state"] == "deleted"


def test_tunnels_are_listed_and_closed_from_either_node(env: Env, echo: EchoServer,
                                                        redis_url: str) -> None:
    """A tunnel homed on node a is listed, read and closed through node b (the close
    goes to its home through Redis); another user's tunnel stays out of reach."""
    a = node(env, redis_url, "node-a")
    b = node(env, redis_url, "node-b")
    b.gateway("asp1", "gw-srv")
    a.gateway("alice", "gw-alice")
    b.register("echo", echo.addr)
    # gw-srv's link is on b: node a's catalog sees the service online all the same
    assert [r["online"] for r in a.api("alice").request("GET", "/v1/services")] == [True]
    t = a.open("echo")  # homed on node a
    tid = t["tunnel"]
    rows = json.loads(b.cli("alice", "tunnels", "--json").stdout)
    assert [(r["tunnel"], r["state"], r["home"]) for r in rows] == \
        [(tid, "established", "node-a")]
    assert b.api("alice").request("GET", f"/v1/tunnels/{tid}")["service"] == "echo"
    assert json.loads(b.cli("mallory", "tunnels", "--json").stdout) == []
    refusal = b.cli("mallory", "close", tid, check=False)  # decided by the home: not hers
    assert refusal.returncode != 0 and b"no tunnel" in refusal.stderr
    sent, got, n = stream_through(port_of(t), 1 << 20)  # untouched by the refusal
    assert sent == got and n == 1 << 20
    closed = json.loads(b.cli("alice", "close", tid, "--json").stdout)
    assert closed == {"tunnel": tid, "state": "deleted", "reason": "closed by alice"}
    assert refused(port_of(t))
    assert json.loads(a.cli("alice", "tunnels", "--json").stdout) == []
    assert json.loads(b.cli("alice", "tunnels", "--json").stdout) == []
    events = [e["event"] for e in a.audit() if e.get("tunnel") == tid]
    assert "report-S7b" in events  # the home deleted both halves


def _admitted(port: int, n: int, barrier: threading.Barrier) -> list[socket.socket]:
    """``n`` connections to ``port`` at once; those the switch let through (an echo
    comes back), held open."""
    held: list[socket.socket] = []
    lock = threading.Lock()

    def one() -> None:
        barrier.wait(30)
        try:
            c = socket.create_connection(("127.0.0.1", port), 10)
            c.settimeout(15)
            c.sendall(b"x")
            ok = c.recv(1) == b"x"
        except OSError:
            return
        if ok:
            with lock:
                held.append(c)
        else:
            c.close()

    threads = [threading.Thread(target=one) for _ in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    return held


def test_the_connection_limit_holds_over_both_nodes(env: Env, echo: EchoServer,
                                                    redis_url: str) -> None:
    """Two tunnels of one service with a limit of 5, homed on different nodes; 12
    connections opened at once over both admit exactly 5; both nodes' catalogs count
    the cluster's connections; a node killed with SIGKILL leaves the sums, and its
    share of the limit is free again."""
    limit = 5
    a = node(env, redis_url, "node-a")
    b = node(env, redis_url, "node-b")
    a.gateway("asp1", "gw-srv")
    a.gateway("alice", "gw-alice")
    b.gateway("alice", "gw-alice-b")
    a.register("echo", echo.addr, max_connections=limit)
    ta = a.open("echo")  # homed on node a
    tb = b.open("echo", gateway="gw-alice-b")  # homed on node b, crossing to gw-srv on a
    barrier = threading.Barrier(2 * 6)
    got: dict[str, list[socket.socket]] = {}
    runs = [threading.Thread(target=lambda k=k, t=t: got.__setitem__(
        k, _admitted(port_of(t), 6, barrier))) for k, t in (("a", ta), ("b", tb))]
    for th in runs:
        th.start()
    for th in runs:
        th.join(120)
    try:
        total = len(got["a"]) + len(got["b"])
        assert total == limit, f"{len(got['a'])} + {len(got['b'])} admitted, limit {limit}"

        def counted(sw: Switch) -> int:
            return next(r["connections"] for r in sw.api("asp1").request("GET", "/v1/services")
                        if r["name"] == "echo")

        assert counted(a) == counted(b) == limit
        for c in got["a"][:1]:  # one ends: a place is free, on either node
            c.close()
        got["a"] = got["a"][1:]
        wait_until(lambda: counted(b) == limit - 1, 15, what="node b sees the end")
        extra = _admitted(port_of(tb), 2, threading.Barrier(2))
        assert len(extra) == 1
        got["b"] += extra
        # node b dies with its connections counted: they leave the sums
        b.procs["server"].kill9()
        wait_until(lambda: counted(a) == len(got["a"]), 30,
                   what="node b's connections gone from node a's count")
        more = _admitted(port_of(ta), limit, threading.Barrier(limit))
        assert len(more) == limit - len(got["a"])
        got["a"] += more
    finally:
        for conns in got.values():
            for c in conns:
                c.close()

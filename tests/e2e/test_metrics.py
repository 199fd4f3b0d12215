"""Prometheus /metrics and /healthz of real server processes after real traffic."""

from __future__ import annotations

import socket

from tests.e2e.framework import PASSWORD, wait_until
from tests.support.scrape import METRICS_LINE, get, sample, scrape


def metrics_port(proc) -> int:
    match = METRICS_LINE.search(proc.wait_for(METRICS_LINE))
    assert match is not None
    return int(match.group(1))


def test_relay_counts_logins_sessions_bytes_and_setup(env, echo):
    env.add_user("pi")
    env.add_user("laptop")
    proc, port = env.relay("--metrics-listen", "127.0.0.1:0")
    mport = metrics_port(proc)
    before = scrape(mport)
    assert sample(before, "kakehashi_sessions_total", system="relay") == 0
    env.agent("pi", port, f"echo={echo.addr}")
    data = b"x" * 100_000
    res = env.pipe("laptop", port, "pi/echo", data)
    assert res.stdout == data
    bad = env.run("relay", "pipe", *env.client_args("laptop", port), "pi/echo", input=b"",
                  env={"KAKEHASHI_PASSWORD": PASSWORD["laptop"] + "-wrong"}, check=False)
    assert bad.returncode != 0
    text = scrape(mport)
    assert sample(text, "kakehashi_sessions_total", system="relay") >= 1
    assert sample(text, "kakehashi_setup_seconds_count", system="relay") >= 1
    # both ends, with framing: the pipe's connection has closed (its bytes are in the
    # tally), the agent's is still open (read from the link when scraped)
    assert sample(text, "kakehashi_bytes_total", system="relay", direction="in") >= 2 * len(data)
    assert sample(text, "kakehashi_bytes_total", system="relay", direction="out") >= 2 * len(data)
    assert sample(text, "kakehashi_decisions_total", system="relay", event="login",
                  decision="allow") >= 2
    assert sample(text, "kakehashi_refusals_total", system="relay") >= 1
    assert any(s.startswith("login") for s in _reasons(text, "relay"))
    assert sample(text, "kakehashi_connections_active", system="relay") >= 1  # the agent
    status, body = get(f"http://127.0.0.1:{mport}/healthz")
    assert status == 200 and '"ok"' in body


def _reasons(text: str, system: str) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.labels["reason"] for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "kakehashi_refusals_total" and s.labels.get("system") == system}



def _gateway(env, *extra: str):
    proc = env.spawn("gateway", "gateway", "serve", "--listen", "127.0.0.1:0", "--tls", "off",
                     "--db", str(env.root / "gw.db"), "--allow-target", "127.0.0.1",
                     "--metrics-listen", "127.0.0.1:0", *extra)
    return proc, proc.bound_port(), metrics_port(proc)


def _connect(port: int, target: str) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        piece = sock.recv(4096)
        if not piece:
            break
        head += piece
    return sock, head


def test_gateway_counts_requests_tunnels_refusals_and_bytes(env, echo):
    _, port, mport = _gateway(env)
    sock, head = _connect(port, echo.addr)
    assert head.startswith(b"HTTP/1.1 200")
    data = b"y" * 50_000
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        got += sock.recv(65536)
    sock.close()
    refused, head = _connect(port, "10.255.255.1:22")
    assert b" 403 " in head.split(b"\r\n")[0]
    refused.close()
    # a proxied GET of the metrics page itself (relay means)
    proxied = socket.create_connection(("127.0.0.1", port), timeout=10)
    proxied.sendall(f"GET http://127.0.0.1:{mport}/healthz HTTP/1.1\r\n"
                    f"Host: 127.0.0.1:{mport}\r\nConnection: close\r\n\r\n".encode())
    reply = b""
    while piece := proxied.recv(65536):
        reply += piece
    proxied.close()
    assert reply.startswith(b"HTTP/1.1 200")

    def moved() -> str | None:
        text = scrape(mport)
        done = sample(text, "kakehashi_gateway_requests_total", status="200") >= 2 \
            and sample(text, "kakehashi_bytes_total", system="gateway", direction="in") \
            >= len(data)
        return text if done else None

    text = wait_until(moved, 15, what="the tunnel's end counted")
    assert sample(text, "kakehashi_sessions_total", system="gateway") >= 1
    assert sample(text, "kakehashi_setup_seconds_count", system="gateway") >= 1
    assert sample(text, "kakehashi_bytes_total", system="gateway", direction="out") >= len(data)
    assert sample(text, "kakehashi_gateway_requests_total", status="403") >= 1
    assert any(r.startswith("target") for r in _reasons(text, "gateway"))
    assert sample(text, "kakehashi_connections_total", system="gateway") >= 3
    assert get(f"http://127.0.0.1:{mport}/healthz")[0] == 200


def test_chain_proxy_counts_sessions_datagrams_and_refusals_by_hop(env):
    from kakehashi.core import crypto
    from tests.e2e.test_chain import Chain, exchange

    chain = Chain(env, extra={"metrics_listen": '"127.0.0.1:0"'})
    try:
        mport = metrics_port(chain.procs["fw1"])
        fwd = chain.forward()
        assert exchange(fwd.bound_port(), 200, 256) >= 190
        # the session is still open: the datagrams are counted live
        text = scrape(mport)
        assert sample(text, "kakehashi_chain_datagrams_total", outcome="relayed") >= 2 * 190
        # and their payload bytes, both ways: between what was echoed and what was sent
        # (exchange's datagrams of 256 carry 8 + 256 bytes)
        assert 2 * 190 * 264 <= sample(text, "kakehashi_chain_bytes_total") <= 2 * 200 * 264
        assert sample(text, "kakehashi_sessions_total", system="chain") >= 1
        assert sample(text, "kakehashi_sessions_active", system="chain") >= 1
        assert sample(text, "kakehashi_setup_seconds_count", system="chain") >= 1
        bad = chain.forward(keys=chain.alice_keys(fw1=crypto.new_shared_key()))
        assert bad.popen.wait(15) == 1
        far = chain.forward(mode="iterative",
                            keys=chain.alice_keys(fw2=crypto.new_shared_key()))
        assert far.popen.wait(15) == 1
        text = scrape(mport)
        assert sample(text, "kakehashi_chain_refused_total", hop="fw1",
                      reason="authentication") >= 1
        assert sample(text, "kakehashi_chain_refused_total", hop="fw2",
                      reason="authentication") >= 1
        assert any(r.startswith("authenticate") for r in _reasons(text, "chain"))
        assert get(f"http://127.0.0.1:{mport}/healthz")[0] == 200
    finally:
        chain.close()


def test_ondemand_counts_grants_sessions_refusals_and_cuts(env, echo):
    from tests.e2e.framework import stream_through
    from tests.e2e.ondemand_fixtures import IMSI, OnDemand

    od = OnDemand(env, inner_args=("--metrics-listen", "127.0.0.1:0"))
    od.manager()
    inner = od.inner(wait=False)
    edge = od.edge("edge-1", "--metrics-listen", "127.0.0.1:0", wait=False)
    inner.wait_for("inner core-1 online")
    edge.wait_for("edge edge-1 online")
    eport, iport = metrics_port(edge), metrics_port(inner)
    g = od.grant(f"{IMSI}:{echo.port}", "--ttl", "60s")
    sent, got, n = stream_through(g["port"], 1 << 20)
    assert n == 1 << 20 and sent == got
    denied = od.grant(f"{IMSI}:{echo.port}", "--ttl", "60s", "--cidr", "203.0.113.0/24")
    with socket.create_connection(("127.0.0.1", denied["port"]), timeout=10) as c:
        assert b"refused (cidr)" in c.recv(4096)
    live = socket.create_connection(("127.0.0.1", g["port"]), timeout=10)
    live.sendall(b"ping")
    assert live.recv(4) == b"ping"
    od.cli("revoke", g["id"])

    def cut() -> str | None:
        text = scrape(eport)
        return text if sample(text, "kakehashi_ondemand_edge_cuts_total",
                              reason="revoked") >= 1 else None

    text = wait_until(cut, 15, what="the revocation's cut counted")
    live.close()
    assert sample(text, "kakehashi_ondemand_edge_grants_opened_total") >= 2
    assert sample(text, "kakehashi_sessions_total", system="ondemand-edge") >= 2
    assert sample(text, "kakehashi_setup_seconds_count", system="ondemand-edge") >= 2
    assert sample(text, "kakehashi_bytes_total", system="ondemand-edge",
                  direction="in") >= 1 << 20
    assert sample(text, "kakehashi_refusals_total", system="ondemand-edge",
                  reason="denied:cidr") >= 1
    assert sample(scrape(iport), "kakehashi_decisions_total", system="ondemand-inner",
                  event="dialed", decision="allow") >= 2
    # the manager answers on its own API port
    mtext = scrape(od.manager_port)
    assert sample(mtext, "kakehashi_decisions_total", system="ondemand", event="created") >= 2
    assert sample(mtext, "kakehashi_decisions_total", system="ondemand", event="deleted") >= 1
    assert get(f"http://127.0.0.1:{od.manager_port}/healthz")[0] == 200
    assert get(f"http://127.0.0.1:{eport}/healthz")[0] == 200


def test_switch_counts_tunnels_by_state_streams_and_refusals(env, echo):
    from kakehashi.core.apiclient import ApiClientError
    from tests.e2e.switch_fixtures import Switch, port_of

    sw = Switch(env).start()
    sw.gateway("asp1", "gw-srv")
    sw.gateway("alice", "gw-alice")
    sw.register("echo", echo.addr, allow=("alice",))
    t = sw.open("echo")
    live = socket.create_connection(("127.0.0.1", port_of(t)), timeout=10)
    live.sendall(b"ping")
    assert live.recv(4) == b"ping"
    try:
        sw.open("echo", user="mallory", gateway="gw-alice")
        raise AssertionError("mallory may not open echo")
    except ApiClientError:
        pass
    text = scrape(sw.port)
    assert sample(text, "kakehashi_switch_tunnels", state="established") == 1
    assert sample(text, "kakehashi_sessions_active", system="switch") >= 1  # the stream
    assert sample(text, "kakehashi_switch_gateways") == 2
    assert sample(text, "kakehashi_refusals_total", system="switch") >= 1
    live.close()
    sw.close(t["tunnel"])
    text = scrape(sw.port)
    assert sample(text, "kakehashi_switch_tunnels", state="established") == 0
    assert get(f"http://127.0.0.1:{sw.port}/healthz")[0] == 200


def test_relay_cluster_membership_gauge_follows_the_nodes(env, redis_server):
    redis_url = redis_server.url
    from tests.support.ports import free_port

    def node(name: str):
        port = free_port()
        proc = env.spawn(f"node-{name}", "relay", "serve", "--listen", f"127.0.0.1:{port}",
                         "--db", redis_url, "--tls", "off", "--cluster", redis_url,
                         "--node", name, "--advertise", f"127.0.0.1:{port}",
                         "--cluster-ttl", "2", "--metrics-listen", "127.0.0.1:0")
        proc.wait_for(f"node {name} joined the cluster", 20)
        return proc, metrics_port(proc)

    _, aport = node("a")
    b, bport = node("b")

    def members(port: int, n: int) -> bool:
        text = scrape(port)
        return sample(text, "kakehashi_cluster_nodes", system="relay") == n

    wait_until(lambda: members(aport, 2) and members(bport, 2), 20, what="both see two")
    assert sample(scrape(aport), "kakehashi_cluster_node_up", system="relay", node="b") == 1
    b.kill9()
    wait_until(lambda: members(aport, 1), 20, what="a sees b gone")
    assert sample(scrape(aport), "kakehashi_cluster_node_up", system="relay", node="b") == 0
    # without the cluster state the node is unhealthy (a load balancer moves agents away)
    assert get(f"http://127.0.0.1:{aport}/healthz")[0] == 200
    redis_server.stop()
    wait_until(lambda: get(f"http://127.0.0.1:{aport}/healthz")[0] == 503, 20,
               what="a unhealthy without Redis")
    assert sample(scrape(aport), "kakehashi_cluster_nodes", system="relay") == 0
    redis_server.restart()
    wait_until(lambda: get(f"http://127.0.0.1:{aport}/healthz")[0] == 200, 30,
               what="a healthy again")

"""``kakehashi serve --config site.toml``: several roles in one real process, each used
by a real client, one /metrics for all, and a clean stop on SIGTERM."""

from __future__ import annotations

import re
import signal
import socket

from kakehashi.core import crypto
from tests.e2e.framework import Env, free_port, wait_until
from tests.e2e.test_chain import SERVER_HOST, UdpEcho, exchange
from tests.e2e.test_metrics import _connect, metrics_port
from tests.support.scrape import get, sample, scrape


def _port(proc, pattern: str) -> int:
    match = re.search(pattern, proc.wait_for(re.compile(pattern)))
    assert match is not None
    return int(match.group(1))


def _site(env: Env, body: str) -> str:
    path = env.root / "site.toml"
    path.write_text(body)
    return str(path)


def test_relay_gateway_and_chain_proxy_in_one_process(env, echo):
    env.add_user("pi")
    env.add_user("laptop")
    key = crypto.new_shared_key()
    udp = UdpEcho()
    a, b = free_port(), free_port()  # a session's two data ports
    site = _site(env, f"""
[serve]
roles = ["relay.serve", "gateway.serve", "chain.proxy"]
metrics-listen = "127.0.0.1:0"

[relay.serve]
listen = "127.0.0.1:0"
db = "{env.db}"
tls = "on"

[gateway.serve]
listen = "127.0.0.1:0"
tls = "off"
db = "{env.root / 'gw.db'}"
allow-target = ["127.0.0.1"]

[chain.proxy]
name = "fw1"
listen = "127.0.0.1:0"
udp-ports = "{min(a, b)}-{max(a, b)}"
keys = {{ alice = "{key}" }}
routes = {{ "{SERVER_HOST}/32" = "direct" }}
acl = [ {{ user = "alice", from = "127.0.0.0/8", ports = "any" }} ]
""")
    proc = env.spawn("site", "serve", "--config", site)
    try:
        relay = _port(proc, r"relay listening on [\d.]+:(\d+)")
        gw = _port(proc, r"gateway listening on [\d.]+:(\d+)")
        chain = _port(proc, r"chain proxy fw1 listening on [\d.]+:(\d+)")
        mport = metrics_port(proc)

        # relay: an agent and a session through it
        env.agent("pi", relay, f"echo={echo.addr}")
        assert env.pipe("laptop", relay, "pi/echo", b"via the site\n").stdout == b"via the site\n"
        # gateway: a CONNECT tunnel
        sock, head = _connect(gw, echo.addr)
        assert head.startswith(b"HTTP/1.1 200")
        sock.sendall(b"tunnel")
        assert sock.recv(6) == b"tunnel"
        sock.close()
        # chain: datagrams through the proxy to the UDP echo
        cfg = env.root / "fwd.toml"
        cfg.write_text(f"""[chain.forward]
id = "alice"
keys = {{ fw1 = "{key}" }}
first_hop = "fw1@127.0.0.1:{chain}"
to = "{SERVER_HOST}:{udp.port}"
udp_listen = "127.0.0.1:0"
""")
        fwd = env.spawn("forward", "--config", str(cfg), "chain", "forward")
        assert exchange(fwd.bound_port(), 50, 256) >= 45

        # one scrape holds every role's figures
        def all_moved() -> str | None:
            text = scrape(mport)
            ok = all(sample(text, "kakehashi_sessions_total", system=s) >= 1
                     for s in ("relay", "gateway", "chain"))
            return text if ok else None

        wait_until(all_moved, 15, what="sessions of the relay, the gateway and the chain")
        status, body = get(f"http://127.0.0.1:{mport}/healthz")
        assert status == 200
        assert '"role:relay.serve":true' in body.replace(" ", "")
        fwd.stop()
        assert proc.stop(signal.SIGTERM) == 0
        assert "stopped." in proc.output()
        for port in (relay, gw, chain, mport):  # every role let its port go
            probe = socket.socket()
            try:
                assert probe.connect_ex(("127.0.0.1", port)) != 0
            finally:
                probe.close()
    finally:
        udp.close()


def test_relay_on_the_gateway_port_shares_the_listener(env, echo):
    env.add_user("pi")
    env.add_user("laptop")
    site = _site(env, f"""
[gateway.serve]
listen = "127.0.0.1:0"
tls = "auto"
db = "{env.db}"
relay = true
allow-target = ["127.0.0.1"]
""")
    proc = env.spawn("site", "--config", site, "serve")  # the top-level --config works too
    gw = _port(proc, r"gateway listening on [\d.]+:(\d+)")
    assert "events, relay;" in proc.output()
    env.agent("pi", gw, f"echo={echo.addr}")
    assert env.pipe("laptop", gw, "pi/echo", b"one port\n").stdout == b"one port\n"
    sock, head = _connect(gw, echo.addr)
    assert head.startswith(b"HTTP/1.1 200")
    sock.close()
    assert proc.stop(signal.SIGINT) == 130


def test_a_role_that_cannot_start_stops_the_site(env):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        site = _site(env, f"""
[gateway.serve]
listen = "127.0.0.1:0"
tls = "off"
db = "{env.root / 'gw.db'}"

[relay.serve]
listen = "127.0.0.1:{busy.getsockname()[1]}"
db = "{env.db}"
""")
        res = env.run("serve", "--config", site, check=False, timeout=60)
        out = res.stderr.decode()
        assert res.returncode == 1, out
        assert "role relay.serve stopped" in out and "cannot listen" in out
    finally:
        busy.close()


def test_site_file_mistakes_are_usage_errors(env):
    res = env.run("serve", "--config", _site(env, "[relay.serve]\nlisten = 1\nlisen = 2\n"),
                  check=False)
    assert res.returncode != 0 and "unknown key 'lisen'" in res.stderr.decode()
    res = env.run("serve", "--config", _site(env, '[serve]\nroles = ["relay.user.add"]\n'),
                  check=False)
    assert res.returncode != 0
    res = env.run("serve", "--config", _site(env, "[serve]\n"), check=False)
    assert res.returncode == 2 and "no roles" in res.stderr.decode()


def test_a_whole_on_demand_system_in_one_process(env, echo):
    import json

    from tests.e2e.framework import stream_through

    db = env.root / "od.db"
    tokens = {}
    for role in ("admin", "edge", "inner"):
        path = env.root / f"{role}.tok"
        path.write_bytes(env.run("ondemand", "token", "create", "--db", str(db),
                                 "--role", role).stdout)
        tokens[role] = path
    mgr, lo = free_port(), free_port()
    url = f"http://127.0.0.1:{mgr}"
    site = _site(env, f"""
[serve]
metrics-listen = "127.0.0.1:0"

[ondemand.manager]
listen = "127.0.0.1:{mgr}"
db = "{db}"
tls = "off"

[ondemand.inner]
server = "{url}"
token-file = "{tokens['inner']}"
name = "core-1"
listen = "127.0.0.1:0"
device = ["001010000000001=127.0.0.1"]

[ondemand.edge]
server = "{url}"
token-file = "{tokens['edge']}"
name = "edge-1"
public-host = "127.0.0.1"
ports = "{lo}-{lo}"
""")
    proc = env.spawn("site", "serve", "--config", site)
    proc.wait_for("edge edge-1 online", 30)
    proc.wait_for("inner core-1 online", 30)
    mport = metrics_port(proc)
    grant = json.loads(env.run("ondemand", "grant", f"001010000000001:{echo.port}", "--ttl",
                               "60s", "--server", url, "--token-file", str(tokens["admin"]),
                               "--json").stdout)
    sent, got, n = stream_through(grant["port"], 1 << 20)
    assert n == 1 << 20 and sent == got
    text = wait_until(lambda: (lambda t: t if sample(
        t, "kakehashi_sessions_total", system="ondemand-edge") >= 1 else None)(scrape(mport)),
        15, what="the edge's session counted")
    assert sample(text, "kakehashi_decisions_total", system="ondemand", event="created") == 1
    assert sample(text, "kakehashi_decisions_total", system="ondemand-inner",
                  event="dialed") >= 1
    assert proc.stop(signal.SIGTERM) == 0

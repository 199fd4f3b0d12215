"""Relay federation end to end: real ``relay serve --cluster`` nodes on a real
``redis-server``, real agents and clients (spec 000: relay servers forwarding
connection requests to each other).

The nodes run with a short ``--cluster-ttl`` so that the defined states (a node
killed, Redis restarted, a node cut off from Redis) are reached in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time

import pytest

from tests.e2e.framework import PASSWORD, Env, Proc, stream_through
from tests.support.cutproxy import CutProxy
from tests.support.ports import free_port
from tests.support.wait import wait_until

TTL = 2.0


class Cluster:
    """Nodes of one cluster, their users in Redis (``--db redis://``)."""

    def __init__(self, env: Env, redis_url: str) -> None:
        self.env = env
        self.url = redis_url
        env.db = redis_url  # users and attributes in the store every node reads
        self.ports: dict[str, int] = {}
        self.procs: dict[str, Proc] = {}
        self.tls = "off"
        self.ttl = TTL

    def node(self, name: str, *, cluster_url: str | None = None, wait: bool = True) -> int:
        port = self.ports.get(name) or free_port()
        proc = self.env.spawn(
            f"node-{name}", "relay", "serve", "--listen", f"127.0.0.1:{port}",
            "--db", self.url, "--tls", self.tls, "--keepalive", "1",
            "--cluster", cluster_url or self.url, "--node", name,
            "--advertise", f"127.0.0.1:{port}", "--cluster-ttl", str(self.ttl),
            "--audit-log", str(self.env.root / f"audit-{name}.jsonl"))
        self.ports[name], self.procs[name] = port, proc
        if wait:
            proc.wait_for(f"node {name} joined the cluster", 20)
        return port

    def agent(self, user: str, *nodes: str, expose: str, wait: bool = True) -> Proc:
        args = ["relay", "agent", "--user", user, "--tls", self.tls, "--expose", expose]
        for n in nodes:
            args += ["--server", f"127.0.0.1:{self.ports[n]}"]
        proc = self.env.spawn(f"agent-{user}", *args, env=self.env.user_env(user))
        if wait:
            proc.wait_for(f"agent {user} online", 20)
        return proc

    def pipe(self, user: str, node: str, target: str, data: bytes, *extra: str,
             check: bool = True, timeout: float = 60.0):
        return self.env.run("relay", "pipe", "--server", f"127.0.0.1:{self.ports[node]}",
                            "--user", user, "--tls", self.tls, target, *extra, input=data,
                            env=self.env.user_env(user), timeout=timeout, check=check)

    def forward(self, user: str, node: str, target: str) -> int:
        proc = self.env.spawn(f"connect-{user}", "relay", "connect",
                              "--server", f"127.0.0.1:{self.ports[node]}", "--user", user,
                              "--tls", self.tls, target, "--listen", "127.0.0.1:0",
                              env=self.env.user_env(user))
        return proc.bound_port()

    def reachable(self, user: str, node: str, target: str) -> bool:
        res = self.pipe(user, node, target, b"ping\n", check=False, timeout=20)
        return res.returncode == 0 and res.stdout == b"ping\n"


@pytest.fixture
def cluster(env, redis_url):
    c = Cluster(env, redis_url)
    for user in PASSWORD:
        env.add_user(user)
    return c


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_sessions_between_every_pair_of_nodes(cluster, echo):
    for name in ("n0", "n1", "n2"):
        cluster.node(name)
    for user, name in (("alice", "n0"), ("bob", "n1"), ("carol", "n2")):
        cluster.agent(user, name, expose=f"echo={echo.addr}")
    data = os.urandom(1 << 20)
    for node in ("n0", "n1", "n2"):
        for target in ("alice", "bob", "carol"):
            res = cluster.pipe("laptop", node, f"{target}/echo", data)
            assert _sha(res.stdout) == _sha(data), (node, target)
    # the sessions that crossed nodes went over inter-node links, and were decided at
    # the target's node (its audit log has the pairing)
    audit = cluster.env.root / "audit-n0.jsonl"
    assert '"via": "n1"' in audit.read_text() and '"via": "n2"' in audit.read_text()


def test_tls_nodes_carry_sessions_that_require_encryption(cluster, echo):
    """Figs. 3/4 across nodes: every hop is TLS, the one between the nodes too."""
    cluster.tls = "on"
    cluster.env.run("relay", "user", "set", "pi", "--db", cluster.url,
                    "--encryption", "required")
    cluster.node("n0")
    cluster.node("n1")
    cluster.agent("pi", "n0", expose=f"echo={echo.addr}")
    data = os.urandom(256 << 10)
    res = cluster.pipe("laptop", "n1", "pi/echo", data, "--encrypt")
    assert _sha(res.stdout) == _sha(data)
    audit = (cluster.env.root / "audit-n1.jsonl").read_text()
    assert '"via": "n0"' in audit and '"hops_tls": [true, true]' in audit


def test_plaintext_nodes_upgrade_their_link_for_a_session_that_requires_encryption(
        cluster, echo):
    """Nodes with --tls off: the terminals' hops upgrade with STARTTLS (steps 12-13), and
    so does the link between the nodes; a session that needs no encryption keeps a
    plaintext (spliced) link."""
    cluster.node("n0")
    cluster.node("n1")
    cluster.agent("pi", "n0", expose=f"echo={echo.addr}")
    assert cluster.reachable("laptop", "n1", "pi/echo")
    data = os.urandom(256 << 10)
    res = cluster.pipe("laptop", "n1", "pi/echo", data, "--encrypt")
    assert _sha(res.stdout) == _sha(data)
    pairs = [json.loads(line) for line in
             (cluster.env.root / "audit-n1.jsonl").read_text().splitlines()
             if '"event": "pair"' in line]
    assert [p["hops_tls"] for p in pairs] == [[False, False], [True, True]]
    assert '"event": "starttls"' in (cluster.env.root / "audit-n0.jsonl").read_text()


def test_parallel_burst_of_cross_node_sessions(cluster, echo):
    """16 sessions at once through one forwarder: the pool of inter-node links grows
    for the burst (each request its own link), every stream arrives intact."""
    cluster.node("n0")
    cluster.node("n1")
    cluster.agent("pi", "n0", expose=f"echo={echo.addr}")
    port = cluster.forward("laptop", "n1", "pi/echo")
    results: list[object] = []

    def one_stream() -> None:
        try:
            results.append(stream_through(port, 1 << 20, timeout=60))
        except OSError as exc:
            results.append(exc)

    threads = [threading.Thread(target=one_stream) for _ in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert len(results) == 16
    for res in results:
        assert not isinstance(res, Exception), res
        sent, got, n = res  # type: ignore[misc]
        assert n == 1 << 20 and sent == got
    links = (cluster.env.root / "audit-n0.jsonl").read_text().count('"event": "node-link"')
    assert links >= 2  # more than the one spare


def test_quiet_cross_node_session_outlives_the_keepalive_watchdogs(cluster, echo):
    """Nothing crosses the inter-node link for several dead-after periods (keepalive
    1 s): the calling node's holds keep the called node's watchdog from cutting it."""
    cluster.node("n0")
    cluster.node("n1")
    cluster.agent("pi", "n0", expose=f"echo={echo.addr}")
    port = cluster.forward("laptop", "n1", "pi/echo")
    with socket.create_connection(("127.0.0.1", port), 15) as sock:
        sock.settimeout(15)
        sock.sendall(b"one\n")
        assert sock.recv(16) == b"one\n"
        time.sleep(5 * 1.0)  # the quiet period under test: 5 keepalives, dead after 3
        sock.sendall(b"two\n")
        assert sock.recv(16) == b"two\n"


def test_who_watch_and_broadcast_are_cluster_wide(cluster, echo):
    cluster.node("n0")
    cluster.node("n1")
    watch = cluster.env.spawn("watch", "relay", "watch", "--server",
                              f"127.0.0.1:{cluster.ports['n1']}", "--user", "laptop",
                              "--tls", "off", env=cluster.env.user_env("laptop"))
    watch.wait_for("watching presence")
    agent = cluster.agent("pi", "n0", expose=f"echo={echo.addr}")
    watch.wait_for("pi online")
    who = cluster.env.run("relay", "who", "--server", f"127.0.0.1:{cluster.ports['n1']}",
                          "--user", "laptop", "--tls", "off", "--json",
                          env=cluster.env.user_env("laptop"))
    assert '"user": "pi"' in who.stdout.decode()
    cluster.env.run("relay", "broadcast", "--server", f"127.0.0.1:{cluster.ports['n1']}",
                    "--user", "laptop", "--tls", "off", "pi", "-m", "hello from n1",
                    env=cluster.env.user_env("laptop"))
    agent.wait_for("message from laptop: hello from n1")
    agent.stop()
    watch.wait_for("pi offline")


def test_node_killed_mid_transfer_loses_only_its_sessions(cluster, echo):
    for name in ("n0", "n1", "n2"):
        cluster.node(name)
    cluster.agent("pi", "n0", "n2", "n1", expose=f"echo={echo.addr}")  # on n0
    cluster.agent("bob", "n2", expose=f"echo={echo.addr}")
    to_pi = cluster.forward("laptop", "n1", "pi/echo")
    to_bob = cluster.forward("alice", "n1", "bob/echo")
    assert cluster.reachable("laptop", "n1", "pi/echo")
    base = echo.connections
    results: dict[str, object] = {}

    def transfer(key: str, port: int, size: int) -> None:
        try:
            results[key] = stream_through(port, size, timeout=60)
        except OSError as exc:
            results[key] = exc

    doomed = threading.Thread(target=transfer, args=("pi", to_pi, 512 << 20))
    other = threading.Thread(target=transfer, args=("bob", to_bob, 64 << 20))
    doomed.start()
    other.start()
    wait_until(lambda: echo.connections >= base + 2, 20, what="both sessions under way")
    cluster.procs["n0"].kill9()
    other.join(90)
    sent, got, n = results["bob"]  # type: ignore[misc]
    assert n == 64 << 20 and sent == got  # n1 -> n2 was not disturbed
    doomed.join(90)
    assert "pi" in results  # it ended (cut short) instead of hanging
    # the agent moved to n2 and requests through n1 reach it again, within 30 s
    wait_until(lambda: cluster.reachable("laptop", "n1", "pi/echo"), 30,
               what="pi reachable again after its node was killed", interval=0.5)


def test_node_restarted_under_its_name_rejoins_and_serves(cluster, echo):
    cluster.node("n0")
    cluster.node("n1")
    agent = cluster.agent("pi", "n0", "n1", expose=f"echo={echo.addr}")
    cluster.procs["n0"].kill9()
    agent.wait_for(f"trying 127.0.0.1:{cluster.ports['n1']}", 30)
    # same name and port: it waits out its dead predecessor's entry, then starts empty
    cluster.node("n0")
    wait_until(lambda: cluster.reachable("laptop", "n0", "pi/echo"), 30,
               what="a request at the restarted node reaching pi at n1", interval=0.5)


def test_node_name_held_by_a_live_node_is_refused(cluster):
    cluster.node("n0")
    port = free_port()
    dup = cluster.env.spawn(
        "dup", "relay", "serve", "--listen", f"127.0.0.1:{port}", "--db", cluster.url,
        "--tls", "off", "--cluster", cluster.url, "--node", "n0",
        "--advertise", f"127.0.0.1:{port}", "--cluster-ttl", str(TTL))
    dup.wait_for("is in use by another live node", 30)
    wait_until(lambda: not dup.alive, 10, what="the second n0 to exit")


def test_users_of_a_dead_node_go_offline_cluster_wide_within_the_ttl(cluster, echo):
    cluster.node("n0")
    cluster.node("n1")
    watch = cluster.env.spawn("watch", "relay", "watch", "--server",
                              f"127.0.0.1:{cluster.ports['n1']}", "--user", "laptop",
                              "--tls", "off", env=cluster.env.user_env("laptop"))
    watch.wait_for("watching presence")
    cluster.agent("bob", "n0", expose=f"echo={echo.addr}")  # n0 only: it stays away
    watch.wait_for("bob online")
    cluster.procs["n0"].kill9()
    # its entries expire after the ttl; n1 notices at its next renewal (ttl / 3)
    watch.wait_for("bob offline", TTL + TTL / 3 + 5)


def test_node_stopped_leaves_the_cluster_at_once(cluster, echo):
    """A node that is stopped (not killed) removes its entries and says so: the others
    forget its users without waiting for the ttl, and its agents move on."""
    cluster.node("n0")
    cluster.node("n1")
    watch = cluster.env.spawn("watch", "relay", "watch", "--server",
                              f"127.0.0.1:{cluster.ports['n1']}", "--user", "laptop",
                              "--tls", "off", env=cluster.env.user_env("laptop"))
    watch.wait_for("watching presence")
    cluster.agent("bob", "n0", expose=f"echo={echo.addr}")
    watch.wait_for("bob online")
    code = cluster.procs["n0"].stop()
    assert code in (0, 130), cluster.procs["n0"].output()[-3000:]
    watch.wait_for("bob offline", TTL)  # before its entries could have expired


def test_redis_restart_the_cluster_recovers(cluster, echo, redis_server):
    cluster.node("n0")
    cluster.node("n1")
    cluster.agent("pi", "n0", expose=f"echo={echo.addr}")
    assert cluster.reachable("laptop", "n1", "pi/echo")
    redis_server.restart(kill=True)  # empty again: no persistence
    # the nodes write their entries again (and the shared secret); users are in that
    # Redis too, so they are added again as an operator restoring a backup would
    for user in ("pi", "laptop"):
        cluster.env.add_user(user)
    wait_until(lambda: cluster.reachable("laptop", "n1", "pi/echo"), 30,
               what="a cross-node session after the Redis restart", interval=0.5)


def test_node_cut_off_from_redis_lets_its_users_go(cluster, echo, redis_server):
    proxy = CutProxy(redis_server.port)
    try:
        cluster.node("n0", cluster_url=proxy.url)
        cluster.node("n1")
        agent = cluster.agent("pi", "n0", "n1", expose=f"echo={echo.addr}")
        assert cluster.reachable("laptop", "n1", "pi/echo")
        proxy.cut()
        # n0 refuses logins at once, and lets its agent go once its entries expired:
        # the agent is then at n1, never at both with different answers
        cluster.procs["n0"].wait_for("lost the cluster state", 20)
        agent.wait_for(f"trying 127.0.0.1:{cluster.ports['n1']}", 30)
        wait_until(lambda: cluster.reachable("laptop", "n1", "pi/echo"), 30,
                   what="pi reachable through n1", interval=0.5)
        res = cluster.pipe("laptop", "n0", "pi/echo", b"x", check=False, timeout=30)
        assert res.returncode != 0 and b"cluster" in res.stderr
        proxy.restore()
        cluster.procs["n0"].wait_for("node n0 joined the cluster", 30)
        wait_until(lambda: cluster.reachable("laptop", "n0", "pi/echo"), 30,
                   what="n0 serving again once Redis is back", interval=0.5)
    finally:
        proxy.close()


def test_unauthenticated_node_is_refused(cluster):
    from kakehashi.core import wire
    from kakehashi.relay import federation as fed
    from kakehashi.relay import messages as m

    port = cluster.node("n0")

    def talk(*msgs) -> list[m.Msg]:
        with socket.create_connection(("127.0.0.1", port), 10) as sock:
            sock.settimeout(10)
            sock.sendall(wire.PREAMBLE + b"".join(m.RELAY_CODEC.encode(x) for x in msgs))
            buf = b""
            while data := sock.recv(65536):
                buf += data
            assert buf[:4] == wire.PREAMBLE
            dec = wire.FrameDecoder()
            dec.feed(buf[4:])
            return [m.TERMINAL_CODEC.decode(f.payload) for f in dec.frames()]

    nonce = fed.new_nonce()
    got = talk(m.NodeHello(node="intruder", nonce=nonce), m.NodeProof(proof=b"\1" * 32))
    assert isinstance(got[0], m.NodeChallenge)
    assert isinstance(got[-1], m.Error) and got[-1].code == "node-auth"
    got = talk(m.NodeConnect(req=1, requester="laptop", target="pi"))
    assert isinstance(got[-1], m.Error) and got[-1].code == "protocol"
    audit = (cluster.env.root / "audit-n0.jsonl").read_text()
    assert "did not prove the cluster secret" in audit


def test_cluster_through_redis_sentinel_carries_sessions_and_follows_a_failover(
        env, echo, redis_sentinel):
    """``--db`` and ``--cluster`` as ``redis+sentinel://``: two nodes find the master
    through a real sentinel; a session crosses them; the master is killed, the sentinel
    promotes the replica, and the cluster serves again on the new master (the nodes
    reconnect by themselves: nothing is restarted)."""
    cluster = Cluster(env, redis_sentinel.url)
    cluster.ttl = 6.0  # longer than the failover: the nodes keep their connections
    for user in PASSWORD:
        env.add_user(user)
    cluster.node("n0")
    cluster.node("n1")
    cluster.agent("pi", "n0", "n1", expose=f"echo={echo.addr}")
    data = os.urandom(1 << 18)
    for node in ("n0", "n1"):
        assert _sha(cluster.pipe("laptop", node, "pi/echo", data).stdout) == _sha(data)
    redis_sentinel.wait_replicated()  # users, the secret and the presence on the replica
    redis_sentinel.kill_master()
    redis_sentinel.wait_failover()
    # defined state: each node serves again once it reaches the new master (a node that
    # lost it longer than the ttl first lets its agents go, and they log in again)
    for node in ("n0", "n1"):
        wait_until(lambda node=node: cluster.reachable("laptop", node, "pi/echo"), 60,
                   what=f"a session through {node} after the failover", interval=0.5)
    res = cluster.pipe("laptop", "n1", "pi/echo", data)
    assert _sha(res.stdout) == _sha(data)

"""A relay cluster in network namespaces: two nodes on public hosts, Redis on its own
host, the agent and the client behind NAT; one node is cut off from Redis by nftables
(silently: dropped packets, no reset), the defined state follows.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.e2e.framework import PASSWORD, Env
from tests.support.netns import ClusterLab
from tests.support.wait import wait_until

pytestmark = pytest.mark.lab

PORT = 7000
SERVICE_PORT = 8022
TTL = 3.0


def _kh(*args: str) -> list[str]:
    return [sys.executable, "-m", "kakehashi", "--log-format", "text", *args]


@pytest.fixture
def cluster_lab() -> Iterator[ClusterLab]:
    with ClusterLab() as lab:
        yield lab


def test_node_cut_off_from_redis_by_a_firewall(cluster_lab, env: Env):
    lab = cluster_lab
    url = f"redis://{lab.redis.addr}:6379"
    lab.redis.popen(["redis-server", "--port", "6379", "--bind", lab.redis.addr, "--save", "",
                     "--appendonly", "no", "--protected-mode", "no"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_until(lambda: "PONG" in lab.pub.run(["redis-cli", "-h", lab.redis.addr, "ping"],
                                             check=False).stdout, 15,
               what="redis-server in its namespace", interval=0.1)
    for user in ("pi", "laptop"):
        lab.pub.run(_kh("relay", "user", "add", user, "--db", url, "--password-stdin",
                        "--kdf-n", "1024"), input=PASSWORD[user] + "\n")
    logs = {}
    for host, name in ((lab.pub, "n1"), (lab.pub2, "n2")):
        logs[name] = env.root / f"{name}.log"
        host.popen(_kh("relay", "serve", "--listen", f"0.0.0.0:{PORT}", "--db", url,
                       "--tls", "off", "--keepalive", "1", "--cluster", url, "--node", name,
                       "--advertise", f"{host.addr}:{PORT}", "--cluster-ttl", str(TTL)),
                   env=env.env, stdout=open(logs[name], "wb"),  # noqa: SIM115
                   stderr=subprocess.STDOUT)
    for name in ("n1", "n2"):
        wait_until(lambda n=name: f"node {n} joined the cluster" in logs[n].read_text(), 20,
                   what=f"{name} joined")
    lab.hostb.start_whoami(SERVICE_PORT)
    agent_log = env.root / "agent.log"
    lab.hostb.popen(
        _kh("relay", "agent", "--server", f"{lab.pub.addr}:{PORT}",
            "--server", f"{lab.pub2.addr}:{PORT}", "--user", "pi", "--tls", "off",
            "--expose", f"whoami=127.0.0.1:{SERVICE_PORT}"),
        env={**env.env, "KAKEHASHI_PASSWORD": PASSWORD["pi"]},
        stdout=open(agent_log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    wait_until(lambda: f"agent pi online at {lab.pub.addr}" in agent_log.read_text(), 20,
               what="the agent online at n1")
    pw = env.root / "laptop.pass"
    pw.write_text(PASSWORD["laptop"])

    def pipe(node_addr: str) -> subprocess.CompletedProcess[str]:
        return lab.hosta.run(_kh("relay", "pipe", "--server", f"{node_addr}:{PORT}",
                                 "--user", "laptop", "--tls", "off", "--password-file",
                                 str(pw), "pi/whoami"), check=False, timeout=30)

    def answered(node_addr: str) -> bool:
        res = pipe(node_addr)
        return res.returncode == 0 and res.stdout.strip() == "127.0.0.1"

    # n2 learns of pi through the cluster (pub/sub, or its next renewal): wait for it
    wait_until(lambda: answered(lab.pub2.addr), 30,  # NAT -> n2 -> link -> n1 -> NAT
               what="pi reachable through n2 while at n1")
    lab.cut_from_redis(lab.pub)
    wait_until(lambda: "lost the cluster state" in logs["n1"].read_text(), 30,
               what="n1 noticing the silent partition")
    # n1's entries expire, it lets the agent go, the agent logs in at n2
    wait_until(lambda: answered(lab.pub2.addr), 40, what="pi reachable through n2",
               interval=0.5)
    res = pipe(lab.pub.addr)
    assert res.returncode != 0 and "cluster" in res.stderr
    lab.heal(lab.pub)
    wait_until(lambda: logs["n1"].read_text().count("node n1 joined the cluster") >= 2, 30,
               what="n1 back in the cluster")
    wait_until(lambda: answered(lab.pub.addr), 30, what="n1 serving again", interval=0.5)

"""The proxy chain across real firewalls: a client behind NAT, three nftables firewalls
that open only their control port and UDP range, a server behind the third.

The direct path is closed, a single relay hop at the first firewall does not get past
the second (Fig. 14(b)); the chain carries datagrams in both modes and encrypted,
and the first proxy sees the client only as the NAT's address (its port record locks
to the translated source port).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from kakehashi.core import crypto
from tests.e2e.framework import Env
from tests.support.netns import ChainLab
from tests.support.wait import wait_until

pytestmark = pytest.mark.lab

SERVER_PORT = 5300
ECHO = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 5300))
print("echo ready", flush=True)
while True:
    b, a = s.recvfrom(65535); s.sendto(b, a)
"""
EXCHANGE = """
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2]); host = sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2); ok = 0
for i in range(n):
    s.sendto(i.to_bytes(4, "big") * 64, (host, port))
    try:
        ok += s.recv(65535) == i.to_bytes(4, "big") * 64
    except TimeoutError:
        pass
print(ok)
"""


@pytest.fixture
def chain_lab() -> Iterator[ChainLab]:
    with ChainLab() as lab:
        yield lab


def _spawn(ns, env: Env, name: str, *args: str):
    log = env.root / f"{name}.log"
    proc = ns.popen([sys.executable, "-m", "kakehashi", "--log-format", "text", *args],
                    env=env.env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    return proc, log


def _wait(proc, log, text: str) -> None:
    def seen() -> bool:
        assert proc.poll() is None, log.read_text()
        return text in log.read_text()

    wait_until(seen, 20, what=f"{text!r} in {log.name}")


def test_chain_crosses_three_firewalls_behind_nat(chain_lab, env):
    lab = chain_lab
    keys = {k: crypto.new_shared_key() for k in ("a1", "a2", "a3", "12", "23")}
    lab.server.popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE)
    wait_until(lambda: "5300" in lab.server.run(["ss", "-uln"]).stdout, 10, what="echo")
    # the direct path is closed by fw1 (it forwards nothing)
    direct = lab.client.run([sys.executable, "-c", EXCHANGE, str(SERVER_PORT), "2",
                             lab.server.addr], check=False, timeout=30)
    assert direct.stdout.strip() == "0", direct

    hosts = {1: lab.fw1.addrs["lan0"], 2: lab.fw2.addrs["lan0"], 3: lab.fw3.addrs["lan0"]}
    # a single relay hop at fw1 (what a SOCKS5 UDP ASSOCIATE at the first firewall does on
    # its data path) gets past fw1 but not past fw2: the Fig. 14(b) situation
    hop_port = lab.udp_range(1)[1]
    lab.fw1.popen(["socat", f"UDP4-LISTEN:{hop_port},bind={hosts[1]},fork",
                   f"UDP4:{lab.server.addr}:{SERVER_PORT}"])
    wait_until(lambda: str(hop_port) in lab.fw1.run(["ss", "-uln"]).stdout, 10, what="socat")
    before = ChainLab.forward_drops(lab.fw2)
    one_hop = lab.client.run([sys.executable, "-c", EXCHANGE, str(hop_port), "2", hosts[1]],
                             check=False, timeout=30)
    assert one_hop.stdout.strip() == "0", one_hop
    assert ChainLab.forward_drops(lab.fw2) >= before + 2  # relayed by fw1, dropped by fw2
    for i, fw in ((3, lab.fw3), (2, lab.fw2), (1, lab.fw1)):
        low, high = lab.udp_range(i)
        route = "direct" if i == 3 else f"fw{i + 1}@{hosts[i + 1]}:{ChainLab.CONTROL_PORT}"
        args = ["chain", "proxy", "--name", f"fw{i}", "--listen",
                f"0.0.0.0:{ChainLab.CONTROL_PORT}", "--udp-ports", f"{low}-{high}",
                "--key", f"alice={keys[f'a{i}']}", "--route", f"198.18.24.0/24={route}",
                "--acl", "user=alice,from=198.18.0.0/15,ports=any",
                "--audit-log", str(env.root / f"audit-fw{i}.jsonl")]
        if i > 1:
            args += ["--key", f"fw{i - 1}={keys[f'{i - 1}{i}']}"]
        if i < 3:
            args += ["--key", f"fw{i + 1}={keys[f'{i}{i + 1}']}"]
        proc, log = _spawn(fw, env, f"fw{i}", *args)
        _wait(proc, log, "listening on")

    alice = [x for i in (1, 2, 3) for x in ("--key", f"fw{i}={keys[f'a{i}']}")]
    for n, extra in enumerate((["--mode", "recursive"], ["--mode", "iterative"],
                               ["--mode", "recursive", "--encrypt"])):
        port = 5353 + n
        proc, log = _spawn(lab.client, env, f"forward-{n}", "chain", "forward", "--id",
                           "alice", *alice, "--first-hop",
                           f"fw1@{hosts[1]}:{ChainLab.CONTROL_PORT}",
                           "--to", f"{lab.server.addr}:{SERVER_PORT}",
                           "--udp-listen", f"127.0.0.1:{port}", *extra)
        _wait(proc, log, "forwarding")
        res = lab.client.run([sys.executable, "-c", EXCHANGE, str(port), "200", "127.0.0.1"],
                             timeout=60)
        assert int(res.stdout) >= 198, (extra, res.stdout, log.read_text())
        proc.terminate()
        proc.wait(10)
    # fw1 saw the client only as the NAT's address
    audit = [json.loads(line) for line in
             (env.root / "audit-fw1.jsonl").read_text().splitlines()]
    origins = {a["origin"].split(":")[0] for a in audit if a["event"] == "access"}
    assert origins == {lab.nat.addr}

"""Unmodified applications through the relay: OpenSSH and iperf3."""

from __future__ import annotations

import getpass
import json
import shutil
import subprocess

import pytest

from tests.e2e import sshd
from tests.e2e.framework import PASSWORD

ok, why = sshd.available()


@pytest.mark.skipif(not ok, reason=why)
@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plaintext"])
def test_ssh_through_pipe_and_connect(env, tls):
    server = sshd.start_sshd(env)
    env.add_user("pi")
    env.add_user("laptop")
    _, port = env.relay(tls=tls)
    env.agent("pi", port, f"ssh=127.0.0.1:{server.port}", tls=tls)
    me = getpass.getuser()
    proxy = " ".join(env.cmd("relay", "pipe", *env.client_args("laptop", port, tls), "pi/ssh"))
    # ssh -o ProxyCommand: the host alias "pi" is verified against the pinned host key
    res = subprocess.run(
        server.ssh_args("-o", f"ProxyCommand={proxy}", f"{me}@pi", "echo via-pipe; uname -s"),
        capture_output=True, env={**env.env, "KAKEHASHI_PASSWORD": PASSWORD["laptop"]},
        timeout=60)
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout.split() == [b"via-pipe", b"Linux"]

    _, local = env.forward("laptop", port, "pi/ssh", tls=tls)
    blob = env.root / "blob"
    blob.write_bytes(bytes(range(256)) * 40000)  # 10 MB through scp over the forward
    with open(blob, "rb") as stdin:
        res = subprocess.run(server.ssh_args("-p", str(local), f"{me}@127.0.0.1", "sha256sum"),
                             stdin=stdin, capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr.decode()
    import hashlib

    assert res.stdout.split()[0].decode() == hashlib.sha256(blob.read_bytes()).hexdigest()


@pytest.mark.skipif(not shutil.which("iperf3"), reason="iperf3 not installed")
def test_iperf3_through_paired_session(env):
    env.add_user("pi")
    env.add_user("laptop")
    _, port = env.relay(tls=False)
    # no port probe: iperf3 would count it as a client; its log line says it listens
    _, iperf_port = env.spawn_on_port(
        "iperf3-server", lambda p: ["iperf3", "-s", "--forceflush", "-p", str(p)],
        "Server listening")
    env.agent("pi", port, f"iperf=127.0.0.1:{iperf_port}", tls=False)
    _, local = env.forward("laptop", port, "pi/iperf", tls=False)
    res = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(local), "-t", "2", "-J"],
                         capture_output=True, timeout=60)
    assert res.returncode == 0, res.stdout.decode()[-2000:]
    report = json.loads(res.stdout)
    assert "error" not in report, report.get("error")
    received = report["end"]["sum_received"]["bytes"]
    assert received > 10 << 20  # megabytes moved in two seconds, both sides agree
    assert report["end"]["sum_sent"]["bytes"] >= received

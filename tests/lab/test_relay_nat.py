"""The relay across real NAT: two private LANs behind masquerading routers.

hosta (LAN A) cannot open a connection to hostb (LAN B); both reach the relay on
``pub``. The agent on hostb logs in outbound, and hosta reaches hostb's service
by user ID through the relay, with and without encryption required.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.e2e.framework import PASSWORD, Env
from tests.support.wait import wait_until

pytestmark = pytest.mark.lab

RELAY_PORT = 7000
SERVICE_PORT = 8022


def _kh(env: Env, *args: str) -> list[str]:
    return [sys.executable, "-m", "kakehashi", "--log-format", "text", *args]


def _wait(proc: subprocess.Popen, log, text: str, timeout: float = 20.0) -> None:
    def seen() -> bool:
        assert proc.poll() is None, log.read_text()
        return text in log.read_text()

    wait_until(seen, timeout, what=f"{text!r} in the log")


@pytest.mark.parametrize("encryption", ["plaintext", "required"])
def test_relay_crosses_two_nats(nat_lab, env, encryption):
    lab = nat_lab
    required = encryption == "required"
    env.add_user("pi", *(["--encryption", "required"] if required else []))
    env.add_user("laptop")
    tls = "off"  # plaintext relay: with encryption required the hops upgrade (STARTTLS)
    # the relay on the public host; its certificate names the public address
    relay_log = env.root / "relay.log"
    relay = lab.pub.popen(
        _kh(env, "relay", "serve", "--listen", f"0.0.0.0:{RELAY_PORT}", "--db", env.db,
            "--tls", "off", "--name", lab.pub.addr, "--audit-log",
            str(env.root / "audit.jsonl")),
        env=env.env, stdout=open(relay_log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    _wait(relay, relay_log, "relay listening")
    # a service on hostb, reachable on hostb only
    lab.hostb.start_whoami(SERVICE_PORT)
    direct = lab.hosta.tcp_probe(lab.hostb.addr, SERVICE_PORT)
    assert not direct.connected, "LAN A reached LAN B directly: the NAT lab is broken"
    assert not lab.hosta.tcp_probe(lab.rtrb.addr, SERVICE_PORT).connected

    server = f"{lab.pub.addr}:{RELAY_PORT}"
    agent_log = env.root / "agent.log"
    agent = lab.hostb.popen(
        _kh(env, "relay", "agent", "--server", server, "--user", "pi", "--tls", tls,
            "--expose", f"whoami=127.0.0.1:{SERVICE_PORT}",
            *(["--encryption", "required"] if required else [])),
        env={**env.env, "KAKEHASHI_PASSWORD": PASSWORD["pi"]},
        stdout=open(agent_log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    _wait(agent, agent_log, "agent pi online")

    pw = env.root / "laptop.pass"
    pw.write_text(PASSWORD["laptop"])
    res = lab.hosta.run(
        _kh(env, "relay", "pipe", "--server", server, "--user", "laptop", "--tls", "off",
            "--password-file", str(pw), "pi/whoami"),
        check=False, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "127.0.0.1"  # answered by the service on hostb

    audit = env.audit()
    logins = {a["user"]: a for a in audit if a["event"] == "login" and a["decision"] == "allow"}
    # the relay saw each terminal only as its router's masqueraded public address
    assert logins["pi"]["addr"] == lab.rtrb.addr
    assert logins["laptop"]["addr"] == lab.rtra.addr
    pair = [a for a in audit if a["event"] == "pair"][-1]
    assert pair["encrypted"] is required
    if required:
        assert any(a["event"] == "starttls" and a["user"] == "laptop" for a in audit)

"""The gateway on a firewall's one open port (spec 001, Fig. 1) in a real FirewallLab.

::

    outside 198.18.4.10 -- fw (admits only TCP to gw:8443) -- gw 198.18.3.10  (kakehashi gateway)
                                                              inner 198.18.3.20 (HTTP origin :8000,
                                                                                 whoami :8022,
                                                                                 relay agent)

From ``outside`` nothing on the inside is reachable directly, yet through the one
port on ``gw`` it gets: plain HTTP relayed to ``inner`` (relay means), a CONNECT
tunnel to ``inner`` (tunnelling means), the event poll endpoint (Fig. 11) and a
kakehashi relay session to the agent on ``inner`` (the agent logs in to the same
port from the inside). A second port opened on ``gw`` stays unreachable.

One lab and one gateway serve the whole module (building them costs ~3 s).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.framework import PASSWORD, Env
from tests.lab.conftest import GATEWAY_PORT
from tests.support.netns import FirewallLab, Namespace, lab_available
from tests.support.wait import wait_log

pytestmark = pytest.mark.lab

HTTP_PORT = 8000
WHOAMI_PORT = 8022
OTHER_PORT = 9000
PROBE_TIMEOUT = 1.0
FILE_BODY = b"kakehashi aggregation port: hello from inner\n"
TOPIC = "lab-events"


@dataclass
class Deployment:
    lab: FirewallLab
    env: Env
    gateway: subprocess.Popen
    gateway_log: Path
    origin_log: Path

    @property
    def via(self) -> str:
        return f"{self.lab.gw.addr}:{GATEWAY_PORT}"

    @property
    def proxy(self) -> str:
        return f"http://{self.via}"

    def kh(self, ns: Namespace, *args: str, input: bytes | None = None,
           timeout: float = 20.0, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[bytes]:
        """Run the kakehashi CLI inside ``ns`` with the test's environment."""
        return run_in(ns, _kh(*args), env={**self.env.env, **(env or {})}, input=input,
                      timeout=timeout)

    def curl(self, ns: Namespace, *args: str, timeout: float = 10.0
             ) -> subprocess.CompletedProcess[bytes]:
        return run_in(ns, ["curl", "-sS", "--max-time", "5", *args], input=b"",
                      timeout=timeout)


def _kh(*args: str) -> list[str]:
    return [sys.executable, "-m", "kakehashi", "--log-format", "text", *args]


def run_in(ns: Namespace, argv: list[str], *, env: dict[str, str] | None = None,
           input: bytes | None = None, timeout: float = 20.0
           ) -> subprocess.CompletedProcess[bytes]:
    """Like ``Namespace.run`` but with an environment and bytes (no check)."""
    return subprocess.run([*ns.exec_prefix, *argv], env=env, input=input,
                          capture_output=True, timeout=timeout, check=False)




@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    ok, reason = lab_available()  # module fixtures run before the autouse skip check
    if not ok:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("gateway-lab")
    env = Env(root)
    env.add_user("pi")  # relay users live in the gateway's --db
    env.add_user("laptop")
    with FirewallLab(gateway_port=GATEWAY_PORT) as lab:
        # the internal services, reachable on the inside only
        www = root / "www"
        www.mkdir()
        (www / "file").write_bytes(FILE_BODY)
        origin_log = root / "origin.log"
        origin = lab.inner.popen(
            [sys.executable, "-u", "-m", "http.server", str(HTTP_PORT), "--bind", "0.0.0.0",
             "--directory", str(www)],
            stdout=open(origin_log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
        lab.inner.start_whoami(WHOAMI_PORT)
        wait_log(origin, origin_log, "Serving HTTP")

        gateway_log = root / "gateway.log"
        gateway = lab.gw.popen(
            _kh("gateway", "serve", "--listen", f"0.0.0.0:{GATEWAY_PORT}",
                "--allow-target", FirewallLab.INSIDE_NET, "--relay", "--db", env.db,
                "--publisher", FirewallLab.INSIDE_NET,
                "--audit-log", str(root / "audit.jsonl"),
                "--access-log", str(root / "access.jsonl")),
            env=env.env, stdout=open(gateway_log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
        wait_log(gateway, gateway_log, "gateway listening on")
        yield Deployment(lab, env, gateway, gateway_log, origin_log)


# -- the firewall -------------------------------------------------------------------
def test_inside_services_are_not_reachable_directly(dep: Deployment) -> None:
    lab = dep.lab
    # the services are up: gw (inside) reaches them
    assert lab.gw.tcp_probe(lab.inner.addr, WHOAMI_PORT).reply == lab.gw.addr
    res = dep.curl(lab.gw, f"http://{lab.inner.addr}:{HTTP_PORT}/file")
    assert res.returncode == 0 and res.stdout == FILE_BODY, res.stderr
    # ... and outside does not
    for port in (HTTP_PORT, WHOAMI_PORT):
        probe = lab.outside.tcp_probe(lab.inner.addr, port, PROBE_TIMEOUT)
        assert not probe.connected, f"outside reached inner:{port} directly"
    res = dep.curl(lab.outside, "--connect-timeout", "1",
                   f"http://{lab.inner.addr}:{HTTP_PORT}/file")
    assert res.returncode != 0


def test_second_port_on_gateway_host_is_not_reachable(dep: Deployment) -> None:
    lab = dep.lab
    lab.gw.start_whoami(OTHER_PORT)
    assert lab.inner.tcp_probe(lab.gw.addr, OTHER_PORT).connected  # it listens
    probe = lab.outside.tcp_probe(lab.gw.addr, OTHER_PORT, PROBE_TIMEOUT)
    assert not probe.connected
    assert "timed out" in probe.error  # dropped by the firewall, not refused by gw


# -- relay means: plain HTTP through the one port ------------------------------------
def test_http_request_relayed_through_the_port(dep: Deployment) -> None:
    lab = dep.lab
    url = f"http://{lab.inner.addr}:{HTTP_PORT}/file"
    res = dep.curl(lab.outside, "-i", "-x", dep.proxy, url)
    assert res.returncode == 0, res.stderr
    head, _, body = res.stdout.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"200", head
    assert body == FILE_BODY
    assert b"\r\nvia: 1.0 kakehashi" in head.lower()  # the gateway added its Via entry
    # the origin saw the request in origin form from the gateway, not from outside
    origin_lines = [ln for ln in dep.origin_log.read_text().splitlines() if "/file" in ln]
    assert any(ln.startswith(lab.gw.addr) and '"GET /file HTTP/1.1"' in ln
               for ln in origin_lines), origin_lines
    assert not any(ln.startswith(lab.outside.addr) for ln in origin_lines)


def test_gateway_refuses_targets_outside_its_allow_list(dep: Deployment) -> None:
    lab = dep.lab
    res = dep.curl(lab.outside, "-o", "/dev/null", "-w", "%{http_code}", "-x", dep.proxy,
                   f"http://127.0.0.1:{HTTP_PORT}/file")
    assert res.stdout == b"403", res.stderr
    res = dep.curl(lab.outside, "-o", "/dev/null", "-w", "%{http_code}", "-x", dep.proxy,
                   f"http://{lab.outside.addr}:{HTTP_PORT}/")
    assert res.stdout == b"403", res.stderr


# -- tunnelling means: CONNECT ------------------------------------------------------
def test_connect_tunnel_with_curl(dep: Deployment) -> None:
    lab = dep.lab
    res = dep.curl(lab.outside, "-p", "-x", dep.proxy,
                   f"telnet://{lab.inner.addr}:{WHOAMI_PORT}")
    # whoami answers with the address it sees: the gateway opened the connection
    assert res.stdout.decode().strip() == lab.gw.addr, res.stderr


def test_connect_tunnel_with_kakehashi_client(dep: Deployment) -> None:
    lab = dep.lab
    res = dep.kh(lab.outside, "gateway", "tunnel", "--server", dep.via, "--tls", "off",
                 "--to", f"{lab.inner.addr}:{HTTP_PORT}",
                 input=b"GET /file HTTP/1.0\r\nHost: inner\r\n\r\n")
    assert res.returncode == 0, res.stderr
    # bytes pass unchanged both ways: the origin's own answer, no Via from the gateway
    assert res.stdout.startswith(b"HTTP/1.0 200"), res.stdout[:200]
    assert res.stdout.endswith(b"\r\n\r\n" + FILE_BODY)
    assert b"via:" not in res.stdout.lower()


# -- events (Fig. 11) -----------------------------------------------------------------
def test_event_poll_through_the_port(dep: Deployment) -> None:
    lab = dep.lab
    url = f"{dep.proxy}/.well-known/kakehashi/events/{TOPIC}?cursor=0&wait=0"
    res = dep.curl(lab.outside, "-i", url)  # 702: no event yet
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(b"HTTP/1.1 204"), res.stdout
    # only internal networks may publish
    res = dep.curl(lab.outside, "-o", "/dev/null", "-w", "%{http_code}", "-d", "spoof", url)
    assert res.stdout == b"403"
    res = dep.kh(lab.inner, "gateway", "events", "publish", "--server", dep.via, "--tls", "off",
                 TOPIC, "--data", "door opened")
    assert res.returncode == 0, res.stderr
    assert b"published" in res.stdout
    # 705: the event, polled from outside through the same port
    res = dep.curl(lab.outside, url)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert [e["data"] for e in doc["events"]] == ["door opened"]
    res = dep.kh(lab.outside, "gateway", "events", "watch", "--server", dep.via, "--tls", "off",
                 TOPIC, "--cursor", "0", "--count", "1", "--wait", "2")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["data"] == "door opened"


# -- a kakehashi relay session on the same port --------------------------------------
def test_relay_session_through_the_port(dep: Deployment) -> None:
    lab = dep.lab
    agent_log = dep.env.root / "agent.log"
    agent = lab.inner.popen(  # inside the firewall the agent reaches gw directly
        _kh("relay", "agent", "--server", dep.via, "--user", "pi", "--tls", "off",
            "--expose", f"whoami=127.0.0.1:{WHOAMI_PORT}",
            "--expose", f"web=127.0.0.1:{HTTP_PORT}"),
        env={**dep.env.env, "KAKEHASHI_PASSWORD": PASSWORD["pi"]},
        stdout=open(agent_log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    try:
        wait_log(agent, agent_log, "agent pi online")
        pw = dep.env.root / "laptop.pass"
        pw.write_text(PASSWORD["laptop"])
        common = ("relay", "pipe", "--server", dep.via, "--user", "laptop", "--tls", "off",
                  "--password-file", str(pw))
        res = dep.kh(lab.outside, *common, "pi/whoami")
        assert res.returncode == 0, res.stderr
        assert res.stdout.decode().strip() == "127.0.0.1"  # answered on inner itself
        res = dep.kh(lab.outside, *common, "pi/web",
                     input=b"GET /file HTTP/1.0\r\n\r\n")
        assert res.returncode == 0, res.stderr
        assert res.stdout.endswith(b"\r\n\r\n" + FILE_BODY)
    finally:
        agent.terminate()
        agent.wait(5)
    # the relay on the gateway's port writes its decisions to the same --audit-log
    audit = [a for a in dep.env.audit() if a.get("system") == "relay"]
    logins = {a["user"]: a for a in audit if a.get("event") == "login"
              and a.get("decision") == "allow"}
    # no NAT in this lab: the relay saw the real addresses on both sides of the firewall
    assert logins["pi"]["addr"] == lab.inner.addr
    assert logins["laptop"]["addr"] == lab.outside.addr

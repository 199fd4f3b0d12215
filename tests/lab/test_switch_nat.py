"""The socket switch across real NAT and firewalls (spec 003) in a :class:`NatLab`.

::

    hosta 198.18.1.10 (alice: gateway + client) --lan0-- rtra --+
                                                                +-- pub 198.18.0.10 (switch :443)
    hostb 198.18.2.10 (asp1: gateway + server)  --lan0-- rtrb --+

Both routers masquerade and drop everything new from outside. On top, rtra forwards
only TCP 443 out of its LAN, and rtrb forwards nothing at all: hostb reaches the world
only through the HTTP proxy on rtrb (198.18.2.1:3128, Basic authentication), which
may only reach the switch's port 443. The direct paths fail; the tunnel works.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.e2e.framework import Env
from tests.support.netns import Namespace, NatLab, lab_available
from tests.support.wait import wait_log

pytestmark = pytest.mark.lab

SERVER = "https://198.18.0.10:443"
TARGET_PORT = 7007
PROXY = "198.18.2.1:3128"


class SwitchLab(NatLab):
    def _build(self) -> None:
        super()._build()
        self.rtra.nft("""\
table inet kklab_sw {
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan0" oifname "wan0" tcp dport 443 accept
    }
}
""")
        self.rtrb.nft("""\
table inet kklab_sw {
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
    }
}
""")


def _kh(*args: str) -> list[str]:
    return [sys.executable, "-m", "kakehashi", "--log-format", "text", *args]




_PROBE = """\
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket()
s.settimeout(5)
try:
    s.connect((host, port))
    data = b""
    while chunk := s.recv(256):
        data += chunk
    print("OK " + data.decode(errors="replace").strip())
except OSError as exc:
    print(f"ERR {exc}")
"""


def _probe(ns: Namespace, host: str, port: int) -> str:
    res = ns.run([sys.executable, "-I", "-c", _PROBE, host, str(port)], check=False,
                 timeout=20)
    return res.stdout.strip()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SwitchLab, Env]]:
    ok, reason = lab_available()
    if not ok:
        pytest.skip(reason)
    env = Env(tmp_path_factory.mktemp("switch-lab"))
    from kakehashi.core.store import open_store
    from kakehashi.switch.server import SwitchUsers

    db = str(env.root / "sw.db")
    users = SwitchUsers(open_store(db), kdf_n=2**10)
    users.add({"name": "asp1", "role": "asp"}, "asp1-password")
    users.add({"name": "alice", "role": "user"}, "alice-password")
    env.run("gateway", "user", "add", "px", "--db", str(env.root / "proxy.db"),
            "--password-stdin", "--kdf-n", "1024", input=b"px-password\n")
    with SwitchLab() as lab:
        def start(ns: Namespace, name: str, *args: str, ready: str,
                  extra_env: dict | None = None) -> None:
            log = env.root / f"{name}.log"
            proc = ns.popen(_kh(*args), env={**env.env, **(extra_env or {})},
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
            wait_log(proc, log, ready)

        start(lab.pub, "server", "switch", "server", "--listen", "198.18.0.10:443", "--db", db,
              "--audit-log", str(env.root / "audit.jsonl"), ready="listening on")
        start(lab.rtrb, "proxy", "gateway", "serve", "--listen", PROXY, "--db",
              str(env.root / "proxy.db"), "--auth", "--tls", "auto",
              "--allow-target", "198.18.0.10:443", ready="listening on")
        lab.hostb.start_whoami(TARGET_PORT)
        start(lab.hostb, "gw-srv", "switch", "gateway", "--server", SERVER, "--user", "asp1",
              "--name", "gw-srv", "--proxy", f"http://px@{PROXY}",
              ready="gateway gw-srv registered",
              extra_env={"KAKEHASHI_PASSWORD": "asp1-password",
                         "KAKEHASHI_PROXY_PASSWORD": "px-password"})
        start(lab.hosta, "gw-alice", "switch", "gateway", "--server", SERVER, "--user",
              "alice", "--name", "gw-alice", ready="gateway gw-alice registered",
              extra_env={"KAKEHASHI_PASSWORD": "alice-password"})
        yield lab, env


def _cli(lab_ns: Namespace, env: Env, user: str, *args: str) -> str:
    opts: list[str] = []
    if args[0] == "--proxy":
        opts, args = list(args[:2]), args[2:]
    res = subprocess.run([*lab_ns.exec_prefix, *_kh("switch", *args, "--server", SERVER,
                                                    "--user", user, *opts)],
                         env={**env.env, "KAKEHASHI_PASSWORD": f"{user}-password",
                              "KAKEHASHI_PROXY_PASSWORD": "px-password"},
                         capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr.decode()
    return res.stdout.decode()


def test_only_the_tunnel_crosses_both_firewalls(lab) -> None:
    import json

    lab, env = lab
    # no direct path: not from alice's LAN to the server, not from hostb to the switch
    assert _probe(lab.hosta, "198.18.2.10", TARGET_PORT).startswith("ERR")
    assert _probe(lab.hostb, "198.18.0.10", 443).startswith("ERR")
    # the ASP registers from its LAN, through the proxy
    _cli(lab.hostb, env, "asp1", "--proxy", f"http://px@{PROXY}", "register", "whoami",
         "--gateway", "gw-srv", "--target", f"198.18.2.10:{TARGET_PORT}", "--allow", "alice")
    assert "whoami" in _cli(lab.hosta, env, "alice", "list")
    t = json.loads(_cli(lab.hosta, env, "alice", "open", "whoami", "--gateway", "gw-alice",
                        "--listen", "127.0.0.1:7100", "--json"))
    assert t["state"] == "established"
    # the unmodified client connects to its local pseudo socket; the real server sees
    # the client-side pseudo socket in its own LAN
    assert _probe(lab.hosta, "127.0.0.1", 7100) == "OK 198.18.2.10"
    _cli(lab.hosta, env, "alice", "close", t["tunnel"])
    assert _probe(lab.hosta, "127.0.0.1", 7100).startswith("ERR")

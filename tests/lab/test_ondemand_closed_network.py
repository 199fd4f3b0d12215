"""On-demand access across real networks (spec 002) in an :class:`OnDemandLab`.

::

    client 198.18.5.30/.31 --+-- edge 198.18.5.10 (manager on HTTPS, edge relay)
                             +-- core 198.18.5.20 (inner relay) -- dev 100.64.0.10 (closed network)

The device has only a closed-network address; the direct path to it fails. A grant
whose range admits 198.18.5.30 works from that address (the device sees the inner
relay's closed-network address) and refuses 198.18.5.31 without reaching the device.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.e2e.framework import Env
from tests.support.netns import Namespace, OnDemandLab, lab_available
from tests.support.wait import wait_log

pytestmark = pytest.mark.lab

IMSI = "001010000000001"
DEVICE_PORT = 2222
MANAGER = "https://198.18.5.10:8700"

_PROBE = """\
import socket, sys
src, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket()
s.settimeout(5)
try:
    s.bind((src, 0))
    s.connect((host, port))
    data = b""
    while chunk := s.recv(256):
        data += chunk
    print("OK " + data.decode(errors="replace").strip())
except OSError as exc:
    print(f"ERR {exc}")
"""




def _kh(*args: str) -> list[str]:
    return [sys.executable, "-m", "kakehashi", "--log-format", "text", *args]


def _probe(ns: Namespace, src: str, host: str, port: int) -> str:
    res = ns.run([sys.executable, "-I", "-c", _PROBE, src, host, str(port)], check=False,
                 timeout=20)
    return res.stdout.strip()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OnDemandLab, Env]]:
    ok, reason = lab_available()
    if not ok:
        pytest.skip(reason)
    env = Env(tmp_path_factory.mktemp("ondemand-lab"))
    from kakehashi.core.identity import ApiTokens
    from kakehashi.core.store import open_store

    db = str(env.root / "od.db")
    store = open_store(db)
    for role in ("client", "edge", "inner"):
        (env.root / f"{role}.tok").write_text(ApiTokens(store).create(role)[1])
    store.close()
    ca = str(env.home / "ca" / "ca.pem")
    with OnDemandLab() as lab:
        def start(ns: Namespace, name: str, *args: str, ready: str) -> None:
            log = env.root / f"{name}.log"
            proc = ns.popen(_kh(*args), env=env.env, stdout=open(log, "wb"),  # noqa: SIM115
                            stderr=subprocess.STDOUT)
            wait_log(proc, log, ready)

        start(lab.edge, "manager", "ondemand", "manager", "--listen", "198.18.5.10:8700",
              "--db", db, "--tls", "on", ready="listening on")
        common = ["--server", MANAGER, "--ca", ca]
        start(lab.core, "inner", "ondemand", "inner", *common, "--token-file",
              str(env.root / "inner.tok"), "--name", "core-1", "--listen", "198.18.5.20:8701",
              "--device", f"{IMSI}=100.64.0.10", ready="inner core-1 online")
        start(lab.edge, "edge", "ondemand", "edge", *common, "--token-file",
              str(env.root / "edge.tok"), "--name", "edge-1", "--public-host", "198.18.5.10",
              "--ports", "31000-31099", ready="edge edge-1 online")
        lab.dev.start_whoami(DEVICE_PORT)
        yield lab, env


def test_only_the_granted_path_reaches_the_closed_network(lab):
    lab, env = lab
    # the device cannot be reached directly
    assert _probe(lab.client, "198.18.5.30", "100.64.0.10", DEVICE_PORT).startswith("ERR")
    res = subprocess.run(
        [*lab.client.exec_prefix, *_kh("ondemand", "grant", f"{IMSI}:{DEVICE_PORT}",
                                       "--server", MANAGER, "--ca",
                                       str(env.home / "ca" / "ca.pem"), "--token-file",
                                       str(env.root / "client.tok"), "--ttl", "60s",
                                       "--cidr", "198.18.5.30/32", "--json")],
        env=env.env, capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr.decode()
    g = json.loads(res.stdout)
    assert g["host"] == "198.18.5.10"
    # inside the range: the device answers, and sees the inner relay's closed address
    assert _probe(lab.client, "198.18.5.30", g["host"], g["port"]) == "OK 100.64.0.1"
    # outside the range: refused at the edge with the reason
    assert _probe(lab.client, "198.18.5.31", g["host"], g["port"]) == \
        "OK kakehashi: connection refused (cidr)"

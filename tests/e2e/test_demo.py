"""The README's first command must keep working: ``kakehashi demo`` shows every system,
one narrated line per step, with no log lines in between, and leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _demo(tmp_path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "kakehashi", "demo", *args],
                          capture_output=True, timeout=120, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                               "TMPDIR": str(tmp_path), "PYTHONPATH": ":".join(sys.path)})


def test_demo_shows_the_relay_then_the_gateway(tmp_path):
    res = _demo(tmp_path, "--bytes", "3000000")
    out = res.stdout.decode()
    assert res.returncode == 0, out + res.stderr.decode()
    assert res.stderr == b"", res.stderr.decode()  # the servers' logs went to a file
    relay, gateway = out.index("relay: "), out.index("gateway: ")
    assert relay < gateway
    steps = [line.split()[0] for line in out.splitlines()[1:] if line[:1] == " "]
    for step in ("who", "ACL", "proxy", "allow-list", "CONNECT", "events"):
        assert step in steps, out
    assert out.count("matches") >= 2 and "refused with 403" in out and "done" in out
    assert out.index("gateway: ") < out.index("chain: ") and "refused by fw1" in out
    assert out.index("ondemand: ") < out.index("switch: ") < out.index("chain: ")
    for step in ("S1", "S2", "S3-S5", "S6-S7"):
        assert step in steps, out
    assert not any("level" in line or " INFO " in line for line in out.splitlines()), out
    assert not list(tmp_path.glob("kakehashi-demo-*")), "the state directory was left behind"


@pytest.mark.parametrize(("system", "absent"), [("relay", "gateway: "), ("gateway", "relay: "),
                                                  ("chain", "relay: "),
                                                  ("switch", "relay: ")])
def test_demo_of_one_system(tmp_path, system, absent):
    res = _demo(tmp_path, system, "--tls", "off")
    out = res.stdout.decode()
    assert res.returncode == 0, out + res.stderr.decode()
    assert f"{system}: " in out and absent not in out and "done" in out

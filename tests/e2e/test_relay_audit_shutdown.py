"""A clean stop of the relay writes the audit entries it still holds.

The relay writes a pairing's entry a moment after the decision
(:meth:`AuditLog.record_soon`, 20 ms), off the session's setup path. SIGKILL may lose
that moment; SIGTERM and SIGINT (a clean stop) must not. The relay runs here with the
hold widened to an hour, so the entry is certainly still held when the signal comes
(the test sees it missing from the file first).
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tests.support.holdproxy import HoldProxy
from tests.support.wait import wait_until

#: the relay's CLI with the audit hold widened (the process is otherwise the real one)
_WIDE_HOLD = ("import runpy, kakehashi.core.audit as audit; audit.SOON = 3600.0; "
              "runpy.run_module('kakehashi', run_name='__main__', alter_sys=True)")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_clean_stop_writes_the_held_pair_entry(env, echo, sig):
    env.add_user("pi")
    env.add_user("laptop")
    relay = env.spawn("relay", sys.executable, "-c", _WIDE_HOLD, *env.cmd(
        "relay", "serve", "--listen", "127.0.0.1:0", "--db", env.db,
        "--keepalive", "30", "--audit-log", str(env.root / "audit.jsonl"))[3:], raw=True)
    port = relay.bound_port()
    # the agent reaches the relay through a proxy that takes no new link once its
    # first ones are in: the spare it opens after the pairing cannot log in, so no
    # later decision writes the held entry before the signal does
    proxy = HoldProxy(port)
    try:
        env.agent("pi", proxy.port, f"echo={echo.addr}", extra=("--spares", "2"))
        wait_until(lambda: sum(1 for a in env.audit() if a["event"] == "login") >= 2,
                   what="the agent's links logged in")
        proxy.refuse_new()
        pipe = env.spawn("pipe-laptop", "relay", "pipe", *env.client_args("laptop", port),
                         "pi/echo", env=env.user_env("laptop"), stdin=subprocess.PIPE)
        assert pipe.popen.stdin is not None
        pipe.popen.stdin.write(b"ping-through-the-relay")
        pipe.popen.stdin.flush()
        pipe.wait_for("ping-through-the-relay")  # paired: the relay holds the entry
        assert sum(1 for a in env.audit() if a["event"] == "login") == 3
        assert not [a for a in env.audit() if a["event"] == "pair"]
        assert relay.stop(sig, timeout=15) in (0, 130)
        pairs = [a for a in env.audit() if a["event"] == "pair"]
        assert [(a["from"], a["to"]) for a in pairs] == [("laptop", "pi")]
    finally:
        proxy.close()

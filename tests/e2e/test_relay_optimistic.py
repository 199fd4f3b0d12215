"""Optimistic pairing end to end through the CLI: the agent accepts a notification at
once and connects its service while the relay sends the requester its result; the
requester's early data goes to the agent with the notification.

Every mode of the relay (the session cipher, re-encrypting TLS, plaintext hops) is run
with the new flow and with the old one (``KAKEHASHI_OPTIMISTIC_PAIRING=0`` on the
agent: an agent that does not offer the capability gets notify, connect, accept). The
flow in use is read from the agent's setup trace: under optimistic pairing its accept
is encoded before the service is connected, in the old flow after. A service that
cannot be reached after the accept closes the session with a reason that `relay
connect` logs, as it logs a refusal in the old flow.
"""

from __future__ import annotations

import os
import socket

import pytest

from tests.e2e.framework import roundtrip, stream_through
from tests.support.ports import free_port
from tests.support.wait import wait_until

MODES = {
    "session-cipher": (True, {}),
    "re-encrypt": (True, {"KAKEHASHI_SESSION_CIPHER": "tls"}),
    "plaintext": (False, {}),
}


def _agent_steps(path: str, pid: int) -> list[str]:
    """The agent's trace steps, in order (``<ns> <pid> <step>`` lines)."""
    with open(path) as fh:
        lines = [line.split(" ", 2) for line in fh.read().splitlines()]
    return [what for _, who, what in sorted(lines, key=lambda x: int(x[0]))
            if int(who) == pid]


@pytest.mark.parametrize("optimistic", [True, False], ids=["optimistic", "old-flow"])
@pytest.mark.parametrize("mode", list(MODES))
def test_sessions_work_in_every_mode_and_both_flows(env, echo, tmp_path, mode, optimistic):
    tls, mode_env = MODES[mode]
    env.env.update(mode_env)  # relay, agent and connect alike
    trace = str(tmp_path / "agent-trace")
    env.add_user("pi")
    env.add_user("laptop")
    _, port = env.relay(tls=tls)
    agent = env.agent("pi", port, f"echo={echo.addr}", tls=tls, env={
        "KAKEHASHI_TRACE_SETUP": trace,
        "KAKEHASHI_OPTIMISTIC_PAIRING": "1" if optimistic else "0"})
    _, local = env.forward("laptop", port, "pi/echo", tls=tls)
    for i in range(3):  # a first write: early data in the TLS modes
        assert roundtrip(local, f"first bytes {i}".encode()) == f"first bytes {i}".encode()
    big = os.urandom(300_000)  # more than a request carries: the rest follows as data
    assert roundtrip(local, big) == big
    sent, got, n = stream_through(local, 16 << 20)
    assert n == 16 << 20 and sent == got

    steps = _agent_steps(trace, agent.popen.pid)
    accepted = [i for i, s in enumerate(steps) if s == "enc Accept"]
    connected = [i for i, s in enumerate(steps) if s == "service connected"]
    assert len(accepted) == len(connected) >= 5, steps
    # each session: the accept is encoded before (optimistic) or after (old flow) the
    # service connect that follows the notification
    for acc, con in zip(accepted, connected, strict=True):
        assert (acc < con) == optimistic, steps


@pytest.mark.parametrize("optimistic", [True, False], ids=["optimistic", "old-flow"])
@pytest.mark.parametrize("mode", list(MODES))
def test_a_service_that_fails_after_the_accept_is_reported_to_the_client(env, mode,
                                                                       optimistic):
    """Nothing listens on the service's port: under optimistic pairing the agent has
    accepted already, so the session closes with the reason; in the old flow the
    request is refused with it. Either way `relay connect` says why, the client's
    connection ends without a byte, and the next session on the same agent works."""
    tls, mode_env = MODES[mode]
    env.env.update(mode_env)
    dead = free_port()  # nobody listens there
    env.add_user("pi")
    env.add_user("laptop")
    _, port = env.relay(tls=tls)
    env.agent("pi", port, f"dead=127.0.0.1:{dead}", tls=tls,
              env={"KAKEHASHI_OPTIMISTIC_PAIRING": "1" if optimistic else "0"})
    conn, local = env.forward("laptop", port, "pi/dead", tls=tls)
    for i in range(2):
        with socket.create_connection(("127.0.0.1", local), timeout=15) as sock:
            sock.sendall(b"never reaches a service")
            sock.settimeout(15)
            got = b""
            try:
                while data := sock.recv(64):
                    got += data
            except ConnectionResetError:
                pass
            assert got == b""
        wait_until(lambda i=i: conn.output().count("service dead unavailable") > i,
                   timeout=15)
    out = conn.output()
    if optimistic:
        assert "closed by pi: service dead unavailable" in out, out
    else:
        assert "service dead unavailable [refused]" in out, out


@pytest.mark.parametrize("optimistic", [True, False], ids=["optimistic", "old-flow"])
@pytest.mark.parametrize("mode", ["session-cipher", "plaintext"])
def test_relay_pipe_exits_with_the_reason_when_the_service_fails(env, mode, optimistic):
    """``relay pipe`` (ssh's ProxyCommand) to a service nobody listens on: it exits 1
    and says why on stderr, whether the agent accepted first (the session's close
    carries the reason) or refused (the old flow); nothing reaches its stdout."""
    tls, mode_env = MODES[mode]
    env.env.update(mode_env)
    dead = free_port()
    env.add_user("pi")
    env.add_user("laptop")
    _, port = env.relay(tls=tls)
    env.agent("pi", port, f"dead=127.0.0.1:{dead}", tls=tls,
              env={"KAKEHASHI_OPTIMISTIC_PAIRING": "1" if optimistic else "0"})
    res = env.pipe("laptop", port, "pi/dead", b"never reaches a service", tls=tls,
                   check=False, timeout=30)
    err = res.stderr.decode()
    assert res.returncode == 1, err
    assert res.stdout == b""
    assert "service dead unavailable" in err, err
    if optimistic:
        assert "closed by pi" in err, err

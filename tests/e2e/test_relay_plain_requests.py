"""Early data on plaintext links through the CLI: a relay run with
``--plaintext-requesters refuse`` never instructs a plaintext requester to encrypt
(step 12), says so at login, and `relay connect` sends a session's first bytes with
its request. A target that requires encryption still refuses such a requester, and
none of those bytes reach its service.

Each case runs with the agent's optimistic pairing on and off (the old flow: notify,
connect, accept), and with early data switched off (``KAKEHASHI_EARLY_DATA=0``). The
first bytes are in `relay connect`'s socket before it accepts the client (it is
stopped meanwhile), so whether they go early is decided by the protocol alone; the
relay's pair record says how many it forwarded with the request.
"""

from __future__ import annotations

import os
import signal
import socket

import pytest

from tests.e2e.framework import roundtrip, stream_through
from tests.support.ports import free_port
from tests.support.wait import wait_until

FLOWS = {"optimistic": "1", "old-flow": "0"}
REFUSE = ("--plaintext-requesters", "refuse")


def _sent_before_accept(proc, port: int, payload: bytes) -> bytes:
    """A client whose bytes are in the socket before `relay connect` accepts it."""
    os.kill(proc.popen.pid, signal.SIGSTOP)
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
    finally:
        os.kill(proc.popen.pid, signal.SIGCONT)
    got = b""
    with sock:
        sock.settimeout(15)
        try:
            while data := sock.recv(65536):
                got += data
        except ConnectionResetError:
            pass
    return got


def _pairs(env, at_least: int = 1) -> list[dict]:
    return env.pairs(at_least)


@pytest.mark.parametrize("flow", list(FLOWS))
@pytest.mark.parametrize("case", ["refuse", "refuse-early-off", "upgrade"])
def test_first_bytes_go_with_the_request_where_the_relay_never_instructs(
        env, echo, case, flow):
    if case == "refuse-early-off":
        env.env["KAKEHASHI_EARLY_DATA"] = "0"  # relay, agent and connect alike
    env.add_user("pi")
    env.add_user("laptop")
    _, port = env.relay(*(REFUSE if case.startswith("refuse") else ()), tls=False)
    env.agent("pi", port, f"echo={echo.addr}", tls=False,
              env={"KAKEHASHI_OPTIMISTIC_PAIRING": FLOWS[flow]})
    conn, local = env.forward("laptop", port, "pi/echo", tls=False)
    for i in range(3):
        payload = f"first bytes {i}".encode()
        assert _sent_before_accept(conn, local, payload) == payload
    early = [p["early"] for p in _pairs(env, 3)]
    # only under the policy, with early data on: the relay said so at login
    assert early == ([len(b"first bytes 0")] * 3 if case == "refuse" else [0] * 3), early
    assert not any(p["encrypted"] for p in _pairs(env, 3))
    big = os.urandom(200_000)  # more than a request carries: the rest follows as data
    assert roundtrip(local, big) == big
    sent, got, n = stream_through(local, 4 << 20)
    assert n == 4 << 20 and sent == got


@pytest.mark.parametrize("flow", list(FLOWS))
def test_a_target_that_requires_encryption_refuses_and_its_service_gets_nothing(
        env, echo, flow):
    env.add_user("pi")
    env.add_user("laptop")
    _, port = env.relay(*REFUSE, tls=False)
    # pi's links upgrade before they log in (STARTTLS is on offer); laptop's stay plain
    env.agent("pi", port, f"echo={echo.addr}", tls=False,
              extra=("--encryption", "required"),
              env={"KAKEHASHI_OPTIMISTIC_PAIRING": FLOWS[flow]})
    conn, local = env.forward("laptop", port, "pi/echo", tls=False)
    for i in range(2):
        assert _sent_before_accept(conn, local, b"secret first bytes") == b""
        wait_until(lambda i=i: conn.output().count("does not upgrade") > i, timeout=15)
    assert "pi requires encryption" in conn.output()
    assert echo.connections == 0  # not a byte, not even a connection
    assert not _pairs(env, 0)
    refused = [a for a in env.audit() if a["event"] == "connect" and a["decision"] == "deny"]
    assert [a["why"] for a in refused] == ["encryption-required"] * 2, refused


@pytest.mark.parametrize("flow", list(FLOWS))
def test_a_target_that_asks_takes_the_session_without_early_data(env, echo, flow):
    """Para 0037, second option: pi is asked and agrees; the first bytes were not
    forwarded with the request (they crossed a plaintext hop of what was to be an
    encrypted session), `relay connect` sends them after the result."""
    env.add_user("pi")
    env.add_user("laptop")
    _, port = env.relay(*REFUSE, tls=False)
    env.agent("pi", port, f"echo={echo.addr}", tls=False,
              extra=("--encryption", "required", "--insecure-peer", "ask"),
              env={"KAKEHASHI_OPTIMISTIC_PAIRING": FLOWS[flow]})
    conn, local = env.forward("laptop", port, "pi/echo", tls=False)
    assert _sent_before_accept(conn, local, b"asked") == b"asked"
    [pair] = _pairs(env)
    assert pair["early"] == 0 and pair["insecure_ok"] and not pair["encrypted"]


@pytest.mark.parametrize("flow", list(FLOWS))
def test_a_dead_service_is_reported_with_the_reason(env, flow):
    """Nothing listens on the service's port: the first bytes went with the request
    and the session closes (optimistic) or is refused (old flow) with the reason;
    `relay connect` logs it and `relay pipe` exits 1 with it."""
    dead = free_port()
    env.add_user("pi")
    env.add_user("laptop")
    _, port = env.relay(*REFUSE, tls=False)
    env.agent("pi", port, f"dead=127.0.0.1:{dead}", tls=False,
              env={"KAKEHASHI_OPTIMISTIC_PAIRING": FLOWS[flow]})
    conn, local = env.forward("laptop", port, "pi/dead", tls=False)
    assert _sent_before_accept(conn, local, b"never reaches a service") == b""
    wait_until(lambda: "service dead unavailable" in conn.output(), timeout=15)
    res = env.pipe("laptop", port, "pi/dead", b"never reaches a service", tls=False,
                   check=False, timeout=30)
    assert res.returncode == 1 and res.stdout == b""
    assert "service dead unavailable" in res.stderr.decode()

"""Connections that close before the TLS handshake, or right after a resumed one,
must not cost the relay memory.

A TLS relay used to keep every such connection's SSL object alive in a reference
cycle (a failed handshake's traceback and the task that ran it), 45 MB per 1,000
connections, never given back. Measured on a real ``relay serve`` process.
"""

from __future__ import annotations

import os
import resource
import socket
import ssl
from collections.abc import Callable

from kakehashi.core import wire
from tests.e2e.framework import Env
from tests.support.wait import wait_until

ROUNDS = 3
PER_ROUND = 1000


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{key} missing from /proc/{pid}/status")


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _churn(proc, open_one: Callable[[], socket.socket], what: str) -> None:
    """Rounds of ``PER_ROUND`` connections from ``open_one``, all held open at once,
    then closed: the relay's fds come back after each round, and its RSS stays within
    10% over ``ROUNDS`` rounds after a warm-up (the allocator's first growth)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < PER_ROUND + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    pid = proc.popen.pid
    baseline_fds = _open_fds(pid)

    def round_() -> None:
        socks = [open_one() for _ in range(PER_ROUND)]
        # the relay accepted (nearly) all of them before they close: it holds their state
        wait_until(lambda: _open_fds(pid) >= baseline_fds + PER_ROUND * 9 // 10, 60,
                   what="the relay accepting the round's connections")
        for s in socks:
            s.close()
        wait_until(lambda: _open_fds(pid) <= baseline_fds, 60,
                   what="the relay closing the round's connections")

    round_()
    base = _status(pid, "VmRSS")
    for _ in range(ROUNDS):
        round_()
    end = _status(pid, "VmRSS")
    growth = (end - base) / base
    assert growth < 0.10, (
        f"relay RSS grew {growth:.0%} ({base} kB -> {end} kB) over {ROUNDS} rounds of "
        f"{PER_ROUND} {what}")
    assert proc.alive


def test_prehandshake_closes_leave_rss_flat(env: Env):
    env.add_user("pi")
    proc, port = env.relay(tls=True)
    _churn(proc, lambda: socket.create_connection(("127.0.0.1", port), timeout=10),
           "connections closed before the TLS handshake")


def test_resumed_links_closed_before_login_leave_rss_and_fds_flat(env: Env):
    """Links that resume the relay's TLS session (a ticket from its rotating keys) and
    close before they log in - a terminal's spares cut off, a scanner replaying a
    ticket - cost the relay nothing once closed: no state per ticket or per resumed
    handshake stays behind."""
    env.add_user("pi")
    proc, port = env.relay(tls=True)
    ctx = ssl.create_default_context(cafile=str(env.home / "ca" / "ca.pem"))
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                         server_hostname="localhost") as first:
        first.sendall(wire.PREAMBLE)
        assert first.recv(len(wire.PREAMBLE))  # the relay's first bytes bring its ticket
        session = first.session
    assert session is not None and session.has_ticket

    def resumed() -> socket.socket:
        """A link that resumes the session and goes no further (no preamble, no login)."""
        sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                               server_hostname="localhost", session=session)
        assert sock.session_reused
        return sock

    _churn(proc, resumed, "resumed links closed before login")

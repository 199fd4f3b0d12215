"""The socket switch under siege: bursts in parallel, a real server that does not
answer, churn of gateway links, readers that never read. Real processes on loopback;
every wait is on something observable."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.framework import Env, roundtrip, wait_until
from tests.e2e.switch_fixtures import Switch, port_of


@pytest.fixture(scope="module")
def sw(tmp_path_factory, echo_mod):
    env = Env(tmp_path_factory.mktemp("switch-siege"))
    try:
        s = Switch(env).start()
        s.gateway("asp1", "gw-srv")
        s.gateway("alice", "gw-alice")
        s.register("echo", echo_mod.addr, allow=("alice",))
        yield s
    finally:
        env.close()


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """A real server that never completes a TCP handshake: its accept queue is full
    (backlog 0, one connection parked in it), so the kernel drops further SYNs and a
    connect to it hangs until the connector gives up."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    addr = lsock.getsockname()
    parked = []
    try:
        for _ in range(2):  # fill the queue (its length is backlog + 1 on Linux)
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(addr)
            parked.append(s)
        yield f"{addr[0]}:{addr[1]}"
    finally:
        for s in parked:
            s.close()
        lsock.close()


def test_a_silent_real_server_does_not_stall_the_gateway_link(sw: Switch) -> None:
    """S3b checks that the real server can be reached; a server that never answers
    must hold up only its own setup, not the server-side gateway's link that every
    other tunnel of that gateway rides on (old code: the gateway awaited the probe in
    its link reader, so the echo below waited until the probe gave up)."""
    t = sw.open("echo")
    with silent_server() as target:
        sw.register("silent", target, allow=("alice",))
        pending: dict[str, Any] = {}

        def open_silent() -> None:
            with contextlib.suppress(Exception):
                pending["result"] = sw.open("silent")

        th = threading.Thread(target=open_silent, daemon=True)
        th.start()
        setting = wait_until(lambda: next(
            (r for r in sw.api("alice").request("GET", "/v1/tunnels")
             if r["service"] == "silent"), None), 15, what="the silent tunnel is setting")
        assert setting["state"] == "setting"
        # the echo tunnel rides the same server-side gateway link: it answers while
        # the silent server's setup is still pending
        assert roundtrip(port_of(t), b"ping" * 1000) == b"ping" * 1000
        now = sw.api("alice").request("GET", f"/v1/tunnels/{setting['tunnel']}")
        assert now["state"] == "setting", now
        th.join(60)
    assert "result" not in pending  # the silent service never became established
    sw.close(t["tunnel"])

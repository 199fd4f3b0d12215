"""The relay through the CLI: login, connect by user ID, pipe and port forward."""

from __future__ import annotations

import pytest

from tests.e2e.framework import roundtrip, stream_through


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plaintext"])
def test_pipe_and_forward_echo(env, echo, tls):
    env.add_user("pi")
    env.add_user("laptop")
    _, port = env.relay(tls=tls)
    env.agent("pi", port, f"echo={echo.addr}", tls=tls)
    res = env.pipe("laptop", port, "pi/echo", b"hello through the relay\n", tls=tls)
    assert res.stdout == b"hello through the relay\n"
    _, local = env.forward("laptop", port, "pi/echo", tls=tls)
    for i in range(5):  # sessions reuse released connections
        assert roundtrip(local, f"round {i}".encode()) == f"round {i}".encode()
    sent, got, n = stream_through(local, 32 << 20)
    assert n == 32 << 20 and sent == got

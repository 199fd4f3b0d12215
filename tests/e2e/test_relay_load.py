"""Volume and concurrency through real relay processes."""

from __future__ import annotations

import concurrent.futures as cf
import os

import pytest

from tests.e2e.framework import roundtrip, stream_through


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_256_mib_both_ways_sha256(env, echo, tls):
    env.add_user("pi")
    env.add_user("laptop")
    _, port = env.relay(tls=tls)
    env.agent("pi", port, f"echo={echo.addr}", tls=tls)
    _, local = env.forward("laptop", port, "pi/echo", tls=tls)
    # 256 MiB up and the same 256 MiB back down at the same time
    sent, got, n = stream_through(local, 256 << 20, timeout=300)
    assert n == 256 << 20
    assert sent == got


def test_200_concurrent_sessions(env, echo):
    env.add_user("pi")
    env.add_user("laptop")
    _, port = env.relay(tls=False)
    env.agent("pi", port, f"echo={echo.addr}", tls=False)
    _, local = env.forward("laptop", port, "pi/echo", tls=False)

    def one(i: int) -> bool:
        payload = os.urandom(1000 + i * 37)
        return roundtrip(local, payload, timeout=60) == payload

    with cf.ThreadPoolExecutor(200) as pool:
        results = list(pool.map(one, range(200)))
    assert all(results), f"{results.count(False)} of 200 sessions failed"
    assert echo.connections >= 200
    # every session was a separate pairing recorded by the relay
    assert len(env.pairs(200)) >= 200

"""Early data: `relay connect` sends a session's first bytes with its connection
request, and the relay forwards them to the target right behind the pairing.

Run both ways (the fast path can be switched off with KAKEHASHI_EARLY_DATA=0) and on
the paths where it applies (a TLS link; a plaintext link whose encryption is off) or
not (a plaintext link that may be told to encrypt): the bytes arrive intact and in
order whether they went early, in part (more than a request carries), or not at all.
"""

from __future__ import annotations

import os
import socket

import pytest

from tests.e2e.framework import roundtrip, stream_through

CASES = {
    "tls": (True, (), "1"),
    "tls-early-off": (True, (), "0"),
    "plaintext-encryption-off": (False, ("--encryption", "off"), "1"),
    "plaintext-optional": (False, (), "1"),  # may be told to encrypt: no early data
}


@pytest.mark.parametrize("case", list(CASES))
def test_first_bytes_arrive_intact_with_or_without_early_data(env, echo, case):
    tls, attrs, early = CASES[case]
    env.env["KAKEHASHI_EARLY_DATA"] = early  # relay, agent and connect alike
    env.add_user("pi")
    env.add_user("laptop")
    _, port = env.relay(tls=tls)
    env.agent("pi", port, f"echo={echo.addr}", tls=tls, extra=attrs)
    _, local = env.forward("laptop", port, "pi/echo", *attrs, tls=tls)
    for i in range(5):  # short first writes: the whole of each goes with the request
        assert roundtrip(local, f"round {i}".encode()) == f"round {i}".encode()
    # more than a request carries, all written before the session is set up: the
    # first 16 KiB go early, the rest follows as data, in order
    big = os.urandom(200_000)
    assert roundtrip(local, big) == big
    # a client that connects and waits before it speaks: nothing goes early
    with socket.create_connection(("127.0.0.1", local), timeout=15) as sock:
        sock.sendall(b"late")
        got = b""
        while len(got) < 4:
            got += sock.recv(64)
        assert got == b"late"
    sent, got, n = stream_through(local, 8 << 20)
    assert n == 8 << 20 and sent == got

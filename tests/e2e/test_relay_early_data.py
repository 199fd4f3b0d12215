"""Early data: `relay connect` sends a session's first bytes with its connection
request, and the relay forwards them to the target right behind the pairing.

Run both ways (the fast path can be switched off with KAKEHASHI_EARLY_DATA=0) and on
the paths where it applies (a TLS link; a plaintext link whose encryption is off) or
not (a plaintext link that may be told to encrypt): the bytes arrive intact and in
order whether they went early, in part (more than a request carries), or not at all.
`relay pipe` does the same with what its stdin holds (an ssh client's banner); the
relay's pair record says how many bytes went with the request.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import threading

import pytest

from kakehashi.relay.messages import EARLY_DATA_MAX
from tests.e2e.framework import roundtrip, stream_through
from tests.support.wait import wait_until

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


def _read_exactly(fd: int, n: int, timeout: float = 30.0) -> bytes:
    """``n`` bytes from ``fd`` as they arrive (failing after ``timeout`` s, not hanging)."""
    got = b""
    while len(got) < n:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"{len(got)} of {n} bytes within {timeout}s"
        data = os.read(fd, n - len(got))
        assert data, f"the stream ended after {len(got)} of {n} bytes"
        got += data
    return got


def _pipe_pairs(env) -> list[int]:
    return wait_until(lambda: [a["early"] for a in env.audit() if a["event"] == "pair"],
                      what="the relay's pair record")


@pytest.mark.parametrize("early", ["1", "0"], ids=["early-on", "early-off"])
def test_relay_pipe_sends_what_stdin_has_with_the_request(env, echo, early):
    """`relay pipe` (ssh's ProxyCommand) sends what its stdin already holds - the
    client's banner - with the connection request; the rest follows as data, and the
    output is the same byte for byte either way. stdin stays open, as ssh keeps it."""
    env.env["KAKEHASHI_EARLY_DATA"] = early  # relay, agent and pipe alike
    env.add_user("pi")
    env.add_user("laptop")
    _, port = env.relay()
    env.agent("pi", port, f"echo={echo.addr}")
    banner = b"SSH-2.0-OpenSSH_test\r\n"
    rest = os.urandom(300_000)
    in_r, in_w = os.pipe()
    os.write(in_w, banner)  # in stdin before the pipe starts: it is there to peek at
    proc = subprocess.Popen(env.cmd("relay", "pipe", *env.client_args("laptop", port),
                                    "pi/echo"),
                            stdin=in_r, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**env.env, **env.user_env("laptop")})
    os.close(in_r)
    try:
        out = proc.stdout.fileno()  # type: ignore[union-attr]
        assert _read_exactly(out, len(banner)) == banner
        writer = threading.Thread(target=lambda: (os.write(in_w, rest), os.close(in_w)))
        writer.start()
        assert _read_exactly(out, len(rest)) == rest
        writer.join()
        assert proc.stdout.read() == b""  # type: ignore[union-attr]
        assert proc.wait(30) == 0, proc.stderr.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
    assert _pipe_pairs(env) == [len(banner) if early == "1" else 0]


@pytest.mark.parametrize("early", ["1", "0"], ids=["early-on", "early-off"])
def test_relay_pipe_with_all_its_input_ended_before_the_request(env, echo, early):
    """All of stdin, end included, is there before the request: the first 16 KiB go
    with it (more than a request carries), the rest and the end follow in order."""
    env.env["KAKEHASHI_EARLY_DATA"] = early
    env.add_user("pi")
    env.add_user("laptop")
    _, port = env.relay()
    env.agent("pi", port, f"echo={echo.addr}")
    data = os.urandom(40_000)  # fits a pipe's buffer
    in_r, in_w = os.pipe()
    os.write(in_w, data)
    os.close(in_w)
    try:
        res = subprocess.run(env.cmd("relay", "pipe", *env.client_args("laptop", port),
                                     "pi/echo"),
                             stdin=in_r, capture_output=True, timeout=60,
                             env={**env.env, **env.user_env("laptop")})
    finally:
        os.close(in_r)
    assert res.returncode == 0, res.stderr
    assert res.stdout == data
    assert _pipe_pairs(env) == [EARLY_DATA_MAX if early == "1" else 0]

"""``--tls`` on one side only (issue 7, item 23): the client stops within seconds with a
message naming the flag to change, instead of waiting for its timeout.

Each direction, for the relay's clients and for the gateway's: a plaintext client
against a TLS server, and a TLS client against a plaintext server.
"""

from __future__ import annotations

import socket
import time

import pytest

from kakehashi.core import wire
from tests.e2e.gateway_fixtures import curl

#: well under the clients' 10 s connect timeout, well over a slow Python start-up
QUICK = 8.0


def _told(env, *args: str, says: str, flag: str, user_env: dict | None = None) -> None:
    """Run a client command that must fail soon (not at its timeout), saying ``says``
    and naming the flag to change."""
    start = time.monotonic()
    res = env.run(*args, env=user_env, timeout=40, check=False)
    took = time.monotonic() - start
    err = res.stderr.decode()
    assert res.returncode != 0, err
    assert says in err and flag in err, err
    assert took < QUICK, f"{took:.1f}s: {err}"


@pytest.mark.parametrize("command", [("who",), ("pipe", "pi/echo"),
                                     ("agent", "--expose", "echo=127.0.0.1:9")])
def test_relay_plaintext_client_against_a_tls_relay(env, command):
    env.add_user("laptop")
    _, port = env.relay(tls=True)
    _told(env, "relay", command[0], *env.client_args("laptop", port, tls=False),
          *command[1:], user_env=env.user_env("laptop"),
          says="speaks TLS", flag="use --tls on")


@pytest.mark.parametrize("command", [("who",), ("pipe", "pi/echo"),
                                     ("agent", "--expose", "echo=127.0.0.1:9")])
def test_relay_tls_client_against_a_plaintext_relay(env, command):
    env.add_user("laptop")
    _, port = env.relay(tls=False)
    _told(env, "relay", command[0], *env.client_args("laptop", port, tls=True),
          *command[1:], user_env=env.user_env("laptop"),
          says="does not speak TLS", flag="use --tls off")


@pytest.mark.parametrize("command", [("events", "publish", "t", "--data", "x"),
                                     ("events", "watch", "t", "--count", "1"),
                                     ("tunnel", "--to", "127.0.0.1:9")])
def test_gateway_plaintext_client_against_a_tls_gateway(env, command):
    _, port = env.gateway("127.0.0.1", extra=["--tls", "on"])
    _told(env, "gateway", *command, "--server", f"127.0.0.1:{port}",
          "--tls", "off",
          says="speaks TLS", flag="use --tls on")


@pytest.mark.parametrize("command", [("events", "publish", "t", "--data", "x"),
                                     ("events", "watch", "t", "--count", "1"),
                                     ("tunnel", "--to", "127.0.0.1:9")])
def test_gateway_tls_client_against_a_plaintext_gateway(env, command):
    _, port = env.gateway("127.0.0.1", extra=["--tls", "off"])
    _told(env, "gateway", *command, "--server", f"127.0.0.1:{port}",
          "--tls", "on",
          says="does not speak TLS", flag="use --tls off")


def test_curl_with_a_plain_proxy_url_is_told_to_use_tls(env):
    """A proxy client outside kakehashi gets an HTTP 400 that says so (not a silent close)."""
    _, port = env.gateway("127.0.0.1", extra=["--tls", "on"])
    r = curl("-x", f"http://127.0.0.1:{port}", "http://127.0.0.1:9/")
    assert r.status == 400 and b"speaks TLS" in r.body, (r.status, r.body, r.stderr)


def test_a_relay_answers_a_stray_tls_hello_and_keeps_serving(env, echo):
    """The plaintext relay answers a ClientHello in plain text and closes at once; the
    TLS relay answers a plaintext preamble with a TLS alert. Both go on serving."""
    env.add_user("pi")
    env.add_user("laptop")
    _, plain = env.relay(tls=False)
    hello = bytes([0x16, 0x03, 0x01, 0x00, 0x05]) + b"\x01\x00\x00\x01\x00"
    with socket.create_connection(("127.0.0.1", plain), timeout=QUICK) as sock:
        sock.sendall(hello)
        assert b"does not speak TLS" in sock.recv(200)
    env.agent("pi", plain, f"echo={echo.addr}", tls=False)
    assert env.pipe("laptop", plain, "pi/echo", b"plain", tls=False).stdout == b"plain"
    _, tls_port = env.relay(tls=True)
    with socket.create_connection(("127.0.0.1", tls_port), timeout=QUICK) as sock:
        sock.sendall(wire.PREAMBLE)
        assert sock.recv(200)[:2] == b"\x15\x03"  # a TLS alert record, at once
    assert env.run("relay", "who", *env.client_args("laptop", tls_port),
                   env=env.user_env("laptop")).returncode == 0

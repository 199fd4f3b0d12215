"""Hostile input against a live relay: clear errors, and everyone else keeps being served."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from kakehashi.core import wire
from kakehashi.relay import messages as m
from tests.support.wait import wait_closed


def _raw(port: int, data: bytes, *, wait: float = 5.0) -> bytes:
    """Send ``data`` and return everything the relay says before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)  # then EOF, even in the middle of a frame
        except OSError:
            pass  # the relay may already have hung up on us: that is fine too
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


def _errors(reply: bytes) -> list[m.Msg]:
    dec = wire.FrameDecoder(expect_preamble=True)
    dec.feed(reply)
    return [m.TERMINAL_CODEC.decode(f.payload) for f in dec.frames() if f.type == 1]


@pytest.fixture
def relay(env, echo):
    env.add_user("pi")
    env.add_user("laptop")
    proc, port = env.relay(tls=False, keepalive=1.0)
    env.agent("pi", port, f"echo={echo.addr}", tls=False)
    return env, proc, port


#: hostile opening -> the error code the relay must answer with, or None where it must
#: close without a word (the peer did not speak the protocol, or hung up itself)
HOSTILE: dict[str, tuple[bytes, str | None]] = {
    "http request": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", None),
    "wrong version": (b"KKH\x09" + wire.encode_frame(wire.FrameType.CTRL, b"\x80"), None),
    "oversized control frame": (wire.PREAMBLE + struct.pack(">I", (1 << 24) | 0xFFFFFF),
                                "too-large"),
    "unknown frame type": (wire.PREAMBLE + struct.pack(">I", (9 << 24) | 4) + b"abcd",
                           "bad-frame"),
    "garbage msgpack": (wire.PREAMBLE + wire.encode_frame(wire.FrameType.CTRL,
                                                          b"\xc1\xff\x00"), "decode"),
    "schema violation": (wire.PREAMBLE + wire.encode_frame(  # a login without a user ID
        wire.FrameType.CTRL, b"\x81\xa1t\xa5login"), "schema"),
    "data before login": (wire.PREAMBLE + wire.encode_frame(wire.FrameType.DATA, b"x" * 100),
                          "unexpected-data"),
    "connect before login": (wire.PREAMBLE + m.RELAY_CODEC.encode(
        m.ConnectRequest(req=1, target="pi")), "protocol"),
    "eof mid frame": (wire.PREAMBLE + struct.pack(">I", (1 << 24) | 1000) + b"short", None),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_input_is_refused_and_others_keep_working(relay, name):
    env, proc, port = relay
    data, code = HOSTILE[name]
    start = time.monotonic()
    reply = _raw(port, data)
    assert time.monotonic() - start < 5, "the relay kept a hostile connection open"
    if code is None:  # nothing to explain to a peer that is not speaking the protocol
        assert reply in (b"", wire.PREAMBLE), reply
        assert not reply or _errors(reply) == []
    else:  # the clear error must be there, not only checked when something came back
        assert reply.startswith(wire.PREAMBLE), reply
        errors = _errors(reply)
        assert errors and isinstance(errors[-1], m.Error), errors
        assert errors[-1].code == code, errors[-1]
        assert len(errors[-1].message) > 5  # a sentence saying what was wrong
    assert proc.alive
    assert env.pipe("laptop", port, "pi/echo", b"still here", tls=False).stdout == b"still here"


def test_silent_connections_are_closed(env, echo):
    env.add_user("laptop")
    env.add_user("pi")
    _, port = env.relay("--login-timeout", "1", tls=False)
    env.agent("pi", port, f"echo={echo.addr}", tls=False)
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    for s in socks[:25]:
        s.sendall(wire.PREAMBLE)  # half of them say hello and then nothing
    start = time.monotonic()
    for s in socks:  # each is closed by the relay (EOF or reset) after the login timeout
        assert wait_closed(s, timeout=15) in (b"", wire.PREAMBLE)
        s.close()
    assert time.monotonic() - start < 15
    assert env.pipe("laptop", port, "pi/echo", b"ok", tls=False).stdout == b"ok"


def test_one_address_cannot_take_every_connection(env, echo):
    """--max-per-client: a flood from one address is closed at once and the relay's
    connections stay for everyone else (here a second loopback address)."""
    env.add_user("laptop")
    env.add_user("pi")
    _, port = env.relay("--max-per-client", "4", "--login-timeout", "30", tls=False)
    flood = [socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0),
                                      timeout=10) for _ in range(4)]
    for s in flood:  # the relay's preamble back: it has accepted (and counted) each one
        s.sendall(wire.PREAMBLE)
        assert s.recv(4) == wire.PREAMBLE
    extra = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0),
                                     timeout=5)
    assert extra.recv(100) == b""  # over the limit: closed without a word
    extra.close()
    env.agent("pi", port, f"echo={echo.addr}", tls=False)  # from 127.0.0.1: unaffected
    assert env.pipe("laptop", port, "pi/echo", b"ok", tls=False).stdout == b"ok"
    for s in flood:
        s.close()

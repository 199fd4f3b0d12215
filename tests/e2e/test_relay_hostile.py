"""Hostile input against a live relay: clear errors, and everyone else keeps being served."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from kakehashi.core import wire
from kakehashi.relay import messages as m


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


HOSTILE = {
    "http request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "wrong version": b"KKH\x09" + wire.encode_frame(wire.FrameType.CTRL, b"\x80"),
    "oversized control frame": wire.PREAMBLE + struct.pack(">I", (1 << 24) | 0xFFFFFF),
    "unknown frame type": wire.PREAMBLE + struct.pack(">I", (9 << 24) | 4) + b"abcd",
    "garbage msgpack": wire.PREAMBLE + wire.encode_frame(wire.FrameType.CTRL, b"\xc1\xff\x00"),
    "schema violation": wire.PREAMBLE + wire.encode_frame(  # a login without a user ID
        wire.FrameType.CTRL, b"\x81\xa1t\xa5login"),
    "data before login": wire.PREAMBLE + wire.encode_frame(wire.FrameType.DATA, b"x" * 100),
    "connect before login": wire.PREAMBLE + m.RELAY_CODEC.encode(
        m.ConnectRequest(req=1, target="pi")),
    "eof mid frame": wire.PREAMBLE + struct.pack(">I", (1 << 24) | 1000) + b"short",
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_input_is_refused_and_others_keep_working(relay, name):
    env, proc, port = relay
    start = time.monotonic()
    reply = _raw(port, HOSTILE[name])
    assert time.monotonic() - start < 5, "the relay kept a hostile connection open"
    if reply.startswith(wire.PREAMBLE) and len(reply) > 4 and name != "eof mid frame":
        errors = _errors(reply)
        assert errors and isinstance(errors[-1], m.Error), errors
        assert errors[-1].message  # a sentence saying what was wrong
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
    time.sleep(3.5)
    closed = 0
    for s in socks:
        s.settimeout(1)
        try:
            data = s.recv(100)
            closed += data in (b"", wire.PREAMBLE) and _drained(s)
        except ConnectionResetError:
            closed += 1
        s.close()
    assert closed == 50
    assert env.pipe("laptop", port, "pi/echo", b"ok", tls=False).stdout == b"ok"


def _drained(s: socket.socket) -> bool:
    try:
        while s.recv(100):
            pass
    except ConnectionResetError:
        pass
    return True


def test_one_address_cannot_take_every_connection(env, echo):
    """--max-per-client: a flood from one address is closed at once and the relay's
    connections stay for everyone else (here a second loopback address)."""
    env.add_user("laptop")
    env.add_user("pi")
    _, port = env.relay("--max-per-client", "4", "--login-timeout", "30", tls=False)
    flood = [socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
             for _ in range(4)]
    time.sleep(0.6)
    extra = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0),
                                     timeout=5)
    assert extra.recv(100) == b""  # over the limit: closed without a word
    extra.close()
    env.agent("pi", port, f"echo={echo.addr}", tls=False)  # from 127.0.0.1: unaffected
    assert env.pipe("laptop", port, "pi/echo", b"ok", tls=False).stdout == b"ok"
    for s in flood:
        s.close()

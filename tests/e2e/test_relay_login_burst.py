"""Item 1: parallel password guesses against a live relay get no more checks than the
lockout limit, and the lockout of one user's guesser does not lock out others behind
the same address."""

from __future__ import annotations

import socket
import threading

from kakehashi.core import wire
from kakehashi.relay import messages as m
from tests.e2e.framework import PASSWORD
from tests.support.wait import wait_until

BURST = 120
LIMIT = 20  # the relay's default lockout


def _burst(port: int, passwords: list[str], user: str) -> list[socket.socket]:
    """Open one connection per password, then send every login at once."""
    socks = []
    for _ in passwords:
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        s.sendall(wire.PREAMBLE)
        socks.append(s)
    go = threading.Barrier(len(passwords))

    def send(i: int) -> None:
        go.wait()
        socks[i].sendall(m.TERMINAL_CODEC.encode(
            m.Login(user=user, password=passwords[i], attrs=None, token="")))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(passwords))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return socks


def _replies(socks: list[socket.socket]) -> list[bytes]:
    """What each connection received before the relay closed it."""
    replies = []
    for s in socks:
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except OSError:
            pass
        s.close()
        replies.append(b"".join(chunks))
    return replies


def _read_until(sock: socket.socket, kind: type) -> m.Msg:
    dec = wire.FrameDecoder(expect_preamble=True)
    while True:
        data = sock.recv(65536)
        assert data, f"closed before {kind.__name__}"
        dec.feed(data)
        for f in dec.frames():
            msg = m.TERMINAL_CODEC.decode(f.payload)
            assert not isinstance(msg, m.LoginFail), msg
            if isinstance(msg, kind):
                return msg


def _messages(reply: bytes) -> list[m.Msg]:
    dec = wire.FrameDecoder(expect_preamble=True)
    dec.feed(reply)
    return [m.TERMINAL_CODEC.decode(f.payload) for f in dec.frames() if f.type == 1]


def test_parallel_guesses_are_bounded_and_others_still_log_in(env, echo):
    env.add_user("carol")
    env.add_user("pi")
    env.add_user("laptop")
    _, port = env.relay(tls=False, keepalive=30.0)
    env.agent("pi", port, f"echo={echo.addr}", tls=False)
    # laptop's first link: its spare connections will log in with this token
    [first] = _burst(port, [PASSWORD["laptop"]], "laptop")
    ok = _read_until(first, m.LoginOk)

    def carol() -> list[dict]:
        return [e for e in env.audit() if e.get("event") == "login" and e.get("user") == "carol"]

    def locked() -> int:
        return sum(e["decision"] == "deny" and e.get("why") == "lockout" for e in carol())

    socks = _burst(port, [f"guess-{i}" for i in range(BURST - 1)], "carol")
    # the relay has seen every guess once BURST - 1 - LIMIT were refused unchecked (the
    # LIMIT checked ones hold their reservations until their hashes are done)
    wait_until(lambda: locked() >= BURST - 1 - LIMIT, 30, what="every guess seen")
    # the right password hidden at the end of the burst, while guesses are being checked
    socks += _burst(port, [PASSWORD["carol"]], "carol")
    got = [_messages(r) for r in _replies(socks)]
    assert not any(isinstance(msg, m.LoginOk) for msgs in got for msg in msgs)
    assert all(any(isinstance(msg, m.LoginFail) for msg in msgs) for msgs in got)
    events = carol()
    checked = [e for e in events if e["decision"] == "deny" and e.get("why") != "lockout"]
    assert len(checked) <= LIMIT and len(checked) + locked() == BURST
    assert not [e for e in events if e["decision"] == "allow"]
    # ...but laptop's spare connection logs in with its token from the same address
    spare = socket.create_connection(("127.0.0.1", port), timeout=30)
    spare.sendall(wire.PREAMBLE + m.TERMINAL_CODEC.encode(
        m.Login(user="laptop", password="", attrs=None, token=ok.token)))
    _read_until(spare, m.LoginOk)
    spare.close()
    first.close()
    # and another user's password login from that address is checked and works
    data = b"through the relay"
    assert env.pipe("laptop", port, "pi/echo", data, tls=False).stdout == data

"""Relay protocol defects of issue 7, through real relay and agent processes.

Raw terminals (a socket speaking the protocol by hand) stand in for terminals that
behave unusually: one that releases without ending, one that never answers a
notification. A fake relay stands in for a hostile one.
"""

from __future__ import annotations

import contextlib
import socket
import threading

import pytest

from kakehashi.core import wire
from kakehashi.relay import messages as m
from tests.e2e.framework import PASSWORD, EchoServer, Env
from tests.support.listener import stop_listener
from tests.support.wait import wait_until


class RawTerminal:
    """A blocking terminal that speaks the relay protocol message by message."""

    def __init__(self, port: int, user: str, *, attrs: m.Attrs | None = None,
                 password: str | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.dec = wire.FrameDecoder(expect_preamble=True)
        self.sock.sendall(wire.PREAMBLE)
        self.send(m.Login(user=user, password=password or PASSWORD[user], attrs=attrs))
        ok = self.recv()
        assert isinstance(ok, m.LoginOk), ok

    def send(self, msg: m.Msg) -> None:
        self.sock.sendall(m.TERMINAL_CODEC.encode(msg))

    def recv(self, timeout: float = 30.0) -> m.Msg | None:
        """The next control message (keepalive replies skipped); None when the relay
        closed the connection; TimeoutError when it said nothing for ``timeout`` s."""
        self.sock.settimeout(timeout)
        while True:
            for frame in self.dec.frames():
                if frame.type is wire.FrameType.CTRL:
                    msg = m.TERMINAL_CODEC.decode(frame.payload)
                    if not isinstance(msg, m.HoldAck):
                        return msg
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.dec.feed(data)

    def close(self) -> None:
        self.sock.close()


def _pair(a: RawTerminal, b: RawTerminal, target: str) -> None:
    a.send(m.ConnectRequest(req=1, target=target))
    note = b.recv()
    assert isinstance(note, m.Notify), note
    b.send(m.Accept(req=note.req))
    res = a.recv()
    assert isinstance(res, m.Result) and res.ok, res


# -- item 3 ---------------------------------------------------------------------------
def test_request_reaches_the_agent_that_offers_the_service(env: Env):
    """One user ID, two agents with different services: both are reachable."""
    ssh, web = EchoServer(), EchoServer()
    try:
        env.add_user("pi")
        env.add_user("laptop")
        _, port = env.relay(tls=False)
        env.agent("pi", port, f"ssh={ssh.addr}", tls=False)
        env.agent("pi", port, f"web={web.addr}", tls=False)
        for _ in range(3):
            assert env.pipe("laptop", port, "pi/web", b"to web", tls=False).stdout == b"to web"
            assert env.pipe("laptop", port, "pi/ssh", b"to ssh", tls=False).stdout == b"to ssh"
        assert web.connections >= 3 and ssh.connections >= 3
    finally:
        ssh.close()
        web.close()


# -- item 4 ---------------------------------------------------------------------------
def test_fig4_ask_path_lets_the_target_decide(env: Env, echo):
    """Target at --encryption off, requester --encrypt --insecure-peer ask: after the
    requester agrees, the target is told the session is unencrypted and decides."""
    env.add_user("pi")
    env.add_user("laptop")
    _, port = env.relay(tls=False)
    agent = env.agent("pi", port, f"echo={echo.addr}", tls=False,
                      extra=("--encryption", "off"))
    res = env.pipe("laptop", port, "pi/echo", b"plain", "--encrypt", "--insecure-peer", "ask",
                   tls=False)
    assert res.stdout == b"plain"
    agent.wait_for("unencrypted by agreement")
    # an agent that says --insecure-peer refuse declines such a session
    env.procs.remove(agent)
    agent.stop()
    env.agent("pi", port, f"echo={echo.addr}", tls=False,
              extra=("--encryption", "off", "--insecure-peer", "refuse"))
    res = env.pipe("laptop", port, "pi/echo", b"plain", "--encrypt", "--insecure-peer", "ask",
                   tls=False, check=False)
    assert res.returncode != 0 and b"unencrypted" in res.stderr


# -- item 5 ---------------------------------------------------------------------------
def test_release_without_end_tells_the_peer(env: Env):
    env.add_user("alice")
    env.add_user("bob")
    _, port = env.relay(tls=False, keepalive=60)  # raw terminals send no keepalives
    a, b = RawTerminal(port, "alice"), RawTerminal(port, "bob")
    try:
        _pair(a, b, "bob")
        a.send(m.Release())  # no end notification first
        end = b.recv(timeout=10)
        assert isinstance(end, m.End), end
        b.send(m.Release())
        assert isinstance(a.recv(), m.Released) and isinstance(b.recv(), m.Released)
        _pair(a, b, "bob")  # both connections are idle again and reusable
    finally:
        a.close()
        b.close()


# -- item 6 ---------------------------------------------------------------------------
def test_a_target_that_never_answers_does_not_stay_notified(env: Env):
    env.add_user("alice")
    env.add_user("bob")
    # raw terminals send no keepalives: a dead-peer close must not come first
    _, port = env.relay("--request-timeout", "1", tls=False, keepalive=10)
    a, b = RawTerminal(port, "alice"), RawTerminal(port, "bob")
    try:
        a.send(m.ConnectRequest(req=1, target="bob"))
        assert isinstance(b.recv(), m.Notify)  # ... and bob never answers
        res = a.recv()
        assert isinstance(res, m.Result) and res.code == "timeout", res
        # bob's connection is not left in the middle of the protocol: it is closed
        assert b.recv(timeout=20) is None
        assert any(r["event"] == "protocol" and "did not answer" in r.get("why", "")
                   for r in env.audit())
    finally:
        a.close()
        b.close()


# -- item 7 ---------------------------------------------------------------------------
#: 64 services of 60 characters: about 4 KB per user in a who-list
SERVICES = [f"service-{i:02d}-" + "x" * 50 for i in range(64)]


def _rss_kib(pid: int, key: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))


def _online_users(env: Env, port: int, count: int) -> list[RawTerminal]:
    users = []
    for i in range(count):
        name = f"user{i:02d}"
        env.run("relay", "user", "add", name, "--db", env.db, "--password-stdin",
                "--kdf-n", "1024", input=f"{name}-password\n".encode())
        users.append(RawTerminal(port, name, attrs=m.Attrs(services=SERVICES),
                                 password=f"{name}-password"))
    return users


def test_who_lists_more_users_than_one_message_holds(env: Env):
    """~30 users exposing many services make a list of ~120 KB: over the 64 KiB
    message limit (the relay used to drop the connection); it comes in pages."""
    env.add_user("laptop")
    _, port = env.relay(tls=False, keepalive=60)  # raw terminals send no keepalives
    users = _online_users(env, port, 30)
    try:
        res = env.run("relay", "who", *env.client_args("laptop", port, tls=False), "--json",
                      env=env.user_env("laptop"))
        listed = res.stdout.decode()
        assert all(f"user{i:02d}" in listed for i in range(30)), listed[-500:]
    finally:
        for t in users:
            t.close()


def test_a_client_that_never_reads_who_replies_is_cut_off(env: Env):
    """A client asking ``who`` again and again without reading the answers is cut
    off once its queued replies pass the outbox's byte bound; the relay's memory
    does not follow the client's requests (it used to queue 1,024 lists)."""
    env.add_user("carol")
    proc, port = env.relay(tls=False, keepalive=60)  # raw terminals send no keepalives
    users = _online_users(env, port, 13)  # a list of ~55 KB: one message
    hog = RawTerminal(port, "carol")  # logged in; from now on it reads nothing
    hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        base = _rss_kib(proc.popen.pid)
        who = m.TERMINAL_CODEC.encode(m.Who())
        with contextlib.suppress(OSError):  # the relay hangs up on us: that is the point
            for _ in range(1500):  # ~80 MB of replies, never read
                hog.sock.sendall(who)
        wait_until(lambda: any(r["event"] == "outbox" for r in env.audit()), 60,
                   what="the relay cutting off the client that does not read")
        grown = _rss_kib(proc.popen.pid, "VmHWM") - base
        assert grown < 24 * 1024, f"relay peak RSS grew {grown} KiB for one non-reader"
        assert proc.alive
    finally:
        hog.close()
        for t in users:
            t.close()


# -- item 9 ---------------------------------------------------------------------------
class HostileRelay:
    """Logs a terminal in, then notifies it of a request and ends it at once."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        first = True
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._one, args=(conn, first), daemon=True).start()
            first = False

    def _one(self, conn: socket.socket, hostile: bool) -> None:
        dec = wire.FrameDecoder(expect_preamble=True)
        conn.sendall(wire.PREAMBLE)
        with contextlib.suppress(OSError, wire.WireError):
            while data := conn.recv(65536):
                dec.feed(data)
                for frame in dec.frames():
                    msg = m.RELAY_CODEC.decode(frame.payload)
                    if isinstance(msg, m.Login):
                        conn.sendall(m.RELAY_CODEC.encode(m.LoginOk(
                            conn_id=1, token="t", encryption="optional", keepalive=15,
                            dead_after=45)))
                        if hostile:
                            conn.sendall(m.RELAY_CODEC.encode(m.Notify(req=7, peer="mallory"))
                                         + m.RELAY_CODEC.encode(m.End(reason="surprise")))
                    elif isinstance(msg, m.Hold):
                        conn.sendall(m.RELAY_CODEC.encode(m.HoldAck(seq=msg.seq)))

    def close(self) -> None:
        stop_listener(self.sock, self._thread)
        for conn in self.conns:
            conn.close()


@pytest.mark.parametrize("hostile", ["end-while-notified"])
def test_end_while_notified_is_a_clear_protocol_error(env: Env, echo, hostile):
    relay = HostileRelay()
    try:
        agent = env.agent("pi", relay.port, f"echo={echo.addr}", tls=False)
        agent.wait_for("relay protocol error")
        out = agent.output()
        assert "not accepted" in out
        assert "never retrieved" not in out and "Traceback" not in out
        assert agent.alive  # the agent goes on with its other links
    finally:
        relay.close()

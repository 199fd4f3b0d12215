"""Early data on a request that is retried: the requester's first bytes must reach the
target's service exactly once, or the session must fail where the requester sees it.

Under optimistic pairing the relay sends the early data to the agent with the
notification, and the agent accepts and connects its service at once, writing those
bytes to it. When the agent's link is lost at that moment (its accept never reached
the relay), the relay can only say the target was lost; a requester that then retries
the request with the same bytes delivers them to the service a second time, on a new
connection, and that second session works: the service saw the bytes twice.

The loss is made exact with a proxy between the agent and the relay that holds what
the agent sends (its accept) and then cuts the one link that was notified.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading

import pytest

from tests.support.holdproxy import HoldProxy
from tests.support.wait import wait_until

MODES = {
    "session-cipher": (True, {}),
    "re-encrypt": (True, {"KAKEHASHI_SESSION_CIPHER": "tls"}),
    "plaintext-encryption-off": (False, {}),
}


class Recorder:
    """The agent's service: echoes, and keeps what each connection received."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.conns: list[bytearray] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def received(self) -> list[bytes]:
        with self._lock:
            return [bytes(c) for c in self.conns]

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            got = bytearray()
            with self._lock:
                self.conns.append(got)
            threading.Thread(target=self._serve, args=(conn, got), daemon=True).start()

    def _serve(self, conn: socket.socket, got: bytearray) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    with self._lock:
                        got += data
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # (wakes the accept() of its thread)
        self.sock.close()


def _lose_a_link_behind_the_optimistic_accept(env, mode: str, lose: str) -> None:
    """The agent (through a proxy that holds what it sends) is notified of a request
    from `relay pipe` that carries early data; once the agent has written those bytes
    to its service, ``lose`` the agent's notified link ("target") or the requester's
    link ("requester", through a second proxy), then let the rest go on. The bytes must
    reach the service once in all, or the requester must fail and say why."""
    tls, mode_env = MODES[mode]
    env.env.update(mode_env)
    attrs = () if tls else ("--encryption", "off")  # early data on a plaintext link
    env.add_user("pi")
    env.add_user("laptop")
    service = Recorder()
    # keepalives far apart: the only thing the relay writes to a held link is then the
    # notification (not the answer to a keepalive)
    _, port = env.relay(tls=tls, keepalive=30)
    agent_proxy, pipe_proxy = HoldProxy(port), HoldProxy(port)
    try:
        env.agent("pi", agent_proxy.port, f"svc={service.addr}", tls=tls, extra=attrs)
        wait_until(lambda: sum(1 for a in env.audit() if a["event"] == "login"
                               and a.get("user") == "pi" and a["decision"] == "allow") >= 2,
                   what="both of the agent's links logged in")
        agent_proxy.hold()
        first = b"first bytes " + os.urandom(8).hex().encode()
        pipe = env.spawn("pipe-laptop", "relay", "pipe",
                         *env.client_args("laptop", pipe_proxy.port, tls), "pi/svc", *attrs,
                         env=env.user_env("laptop"), stdin=subprocess.PIPE)
        assert pipe.popen.stdin is not None
        pipe.popen.stdin.write(first)  # there before the request: it goes early
        pipe.popen.stdin.flush()
        # the agent accepted at once (held here) and wrote the bytes to its service
        wait_until(lambda: first in service.received(), 30,
                   what="the early data at the service behind the optimistic accept")
        if lose == "requester":
            pipe_proxy.cut_all()  # the requester's link, its request still unanswered
            wait_until(lambda: any(a["event"] == "connect" and a.get("why") ==
                                   "requester lost" for a in env.audit()),
                       what="the relay's record of the lost requester")
        # (the agent's accept, or the notified link cut before it arrives)
        assert agent_proxy.cut_notified_and_release(cut_notified=lose == "target") == 1
        pipe.popen.stdin.close()
        code = pipe.popen.wait(60)
        got = service.received()
        assert sum(1 for c in got if first in c) == 1, (
            f"the early bytes reached the service on {len(got)} connections "
            f"(requester exit {code}):\n{pipe.output()}")
        if code != 0:
            assert "cannot connect to pi/svc" in pipe.output()
            assert ("target-lost-early" if lose == "target"
                    else "closed-with-early-data") in pipe.output()
    finally:
        agent_proxy.close()
        pipe_proxy.close()
        service.close()


@pytest.mark.parametrize("mode", list(MODES))
def test_early_data_is_not_delivered_twice_when_the_notified_link_is_lost(env, mode):
    """The agent's link is lost after the notification with the early data and before
    its accept reached the relay: a requester that retried delivered the bytes again."""
    _lose_a_link_behind_the_optimistic_accept(env, mode, "target")


@pytest.mark.parametrize("mode", list(MODES))
def test_early_data_is_not_delivered_twice_when_the_requesters_link_is_lost(env, mode):
    """The requester's link is lost while its request waits for the target, which was
    sent the early data and accepted at once: the bytes reached the service, and the
    requester cannot know. It must not send them again on another link."""
    _lose_a_link_behind_the_optimistic_accept(env, mode, "requester")

"""Failures: relay restart, an agent killed mid-transfer, clean shutdown on Ctrl-C."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import struct
import threading
import time

from tests.e2e.framework import roundtrip, wait_until
from tests.support.listener import stop_listener


def test_agents_reconnect_after_relay_restart(env, echo):
    env.add_user("pi")
    env.add_user("laptop")
    relay, port = env.relay(tls=True)
    agent = env.agent("pi", port, f"echo={echo.addr}")
    _, local = env.forward("laptop", port, "pi/echo")
    assert roundtrip(local, b"before") == b"before"
    relay.stop(signal.SIGTERM)
    agent.wait_for("cannot reach relay")  # the agent lost it and is trying again
    env.relay(tls=True, port=port)

    def back() -> bool:  # both terminals come back on their own (backoff with jitter)
        with contextlib.suppress(OSError):
            return roundtrip(local, b"after", timeout=5) == b"after"
        return False

    wait_until(back, 30, interval=0.2, what="a session after the restart")
    assert agent.alive


def test_agent_killed_mid_transfer(env, echo):
    env.add_user("pi")
    env.add_user("laptop")
    _, port = env.relay(tls=False, keepalive=1.0)
    agent = env.agent("pi", port, f"echo={echo.addr}", tls=False)
    _, local = env.forward("laptop", port, "pi/echo", tls=False)
    sock = socket.create_connection(("127.0.0.1", local), timeout=30)
    sock.sendall(b"x" * (1 << 20))
    assert sock.recv(1) == b"x"  # the session is live and carrying data
    agent.kill9()
    start = time.monotonic()
    sock.settimeout(10)
    received = 0  # echoed bytes still arriving after the kill (a clue if this fails)
    try:
        while time.monotonic() - start < 20 and (data := sock.recv(1 << 20)):
            received += len(data)
    except ConnectionResetError:
        pass
    elapsed = time.monotonic() - start
    assert elapsed < 3 * 1.0 + 2, \
        f"peer saw the end after {elapsed:.1f}s ({received} bytes arrived after the kill)"
    sock.close()
    # the relay freed the agent's connections and keeps serving: pi is offline now
    who = env.run("relay", "who", *env.client_args("laptop", port, tls=False),
                  env=env.user_env("laptop")).stdout.decode()
    assert "pi\t" not in who and "laptop" in who
    states = [a for a in env.audit() if a["event"] == "offline" and a["user"] == "pi"]
    assert states, "relay did not record pi going offline"
    env.agent("pi", port, f"echo={echo.addr}", tls=False)  # and a new agent works
    assert roundtrip(local, b"again") == b"again"


def test_ctrl_c_is_clean(env, echo):
    env.add_user("pi")
    _, port = env.relay(tls=True)
    agent = env.agent("pi", port, f"echo={echo.addr}")
    assert agent.stop(signal.SIGINT) == 130
    assert "Traceback" not in agent.output()
    wait_until(lambda: any(a["event"] == "logout" and a["user"] == "pi" for a in env.audit()),
               what="pi's logout in the audit log")


def test_agent_detects_a_frozen_relay(env, echo):
    env.add_user("pi")
    relay, port = env.relay(tls=False, keepalive=0.5)
    agent = env.agent("pi", port, f"echo={echo.addr}", tls=False)
    relay.popen.send_signal(signal.SIGSTOP)  # the relay stops answering, TCP stays up
    try:
        agent.wait_for("relay missed", timeout=10)
    finally:
        relay.popen.send_signal(signal.SIGCONT)
    assert agent.alive  # it goes on trying to reconnect


def test_tls_mismatch_says_what_to_do(env):
    env.add_user("laptop")
    _, port = env.relay(tls=True)
    res = env.run("relay", "who", *env.client_args("laptop", port, tls=False),
                  env=env.user_env("laptop"), check=False)
    assert res.returncode == 1 and b"drop --tls off" in res.stderr


@contextlib.contextmanager
def one_shot_service(behave):
    """A loopback service whose single connection is handled by ``behave(sock)``."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = server.accept()
            behave(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop_listener(server, thread, 15)  # wake and join before the number is freed


def _reset_after(seconds: float):
    def behave(conn: socket.socket) -> None:
        time.sleep(seconds)  # the behaviour under test: a service quiet for a while
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # RST: the service's connection breaks, nothing more is said
    return behave


def test_a_service_that_resets_ends_the_session(env):
    """The agent's application stream broke (a reset) while the far side was quiet:
    the session must end on both sides, not wait for an EOF that never comes."""
    env.add_user("pi")
    env.add_user("laptop")
    _, port = env.relay(tls=False)
    with one_shot_service(_reset_after(0.5)) as addr:
        env.agent("pi", port, f"svc={addr}", tls=False)
        _, local = env.forward("laptop", port, "pi/svc", tls=False)
        sock = socket.create_connection(("127.0.0.1", local), timeout=10)
        start = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(100) == b""  # the end arrives (quiet client, broken service)
        assert time.monotonic() - start < 8
        sock.close()


def test_a_slow_consumer_does_not_make_the_uploader_drop_its_link(env):
    """keepalive 1 s (dead after 3 s): the service reads nothing for 6 s while the
    client uploads. The uploading terminal waits on the relay, which waits on the
    consumer; neither side may take that silence for a dead peer."""
    env.add_user("pi")
    env.add_user("laptop")
    _, port = env.relay(tls=False, keepalive=1.0)
    payload = os.urandom(24 << 20)

    def slow_reader(conn: socket.socket) -> None:
        time.sleep(6)  # the behaviour under test: a consumer that reads nothing for 6 s
        digest, size = hashlib.sha256(), 0
        while data := conn.recv(1 << 20):
            digest.update(data)
            size += len(data)
        conn.sendall(f"{size} {digest.hexdigest()}".encode())
        conn.close()

    with one_shot_service(slow_reader) as addr:
        env.agent("pi", port, f"sink={addr}", tls=False)
        res = env.pipe("laptop", port, "pi/sink", payload, tls=False, timeout=60)
    assert res.stdout.decode() == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}"

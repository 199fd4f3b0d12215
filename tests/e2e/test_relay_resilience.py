"""Failures: relay restart, an agent killed mid-transfer, clean shutdown on Ctrl-C."""

from __future__ import annotations

import signal
import socket
import time

from tests.e2e.framework import roundtrip


def test_agents_reconnect_after_relay_restart(env, echo):
    env.add_user("pi")
    env.add_user("laptop")
    relay, port = env.relay(tls=True)
    agent = env.agent("pi", port, f"echo={echo.addr}")
    _, local = env.forward("laptop", port, "pi/echo")
    assert roundtrip(local, b"before") == b"before"
    relay.stop(signal.SIGTERM)
    time.sleep(1.0)
    env.relay(tls=True, port=port)
    deadline = time.monotonic() + 30
    while True:  # both terminals come back on their own (backoff with jitter)
        try:
            if roundtrip(local, b"after", timeout=5) == b"after":
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, agent.output()[-2000:]
        time.sleep(0.5)
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
    time.sleep(0.3)
    assert any(a["event"] == "logout" and a["user"] == "pi" for a in env.audit())


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

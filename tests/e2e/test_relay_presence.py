"""Presence, notify policies, broadcast and login failures through the CLI."""

from __future__ import annotations

import json
import time


def _who(env, user, port):
    out = env.run("relay", "who", *env.client_args(user, port), "--json",
                  env=env.user_env(user)).stdout
    return {u["user"]: u for u in json.loads(out)}


def test_who_honours_notify_policy(env, echo):
    env.add_user("pi")
    env.add_user("alice", "--notify", "none")
    env.add_user("bob", "--notify", "only", "--notify-users", "laptop")
    env.add_user("carol", "--notify", "except", "--notify-users", "laptop")
    env.add_user("laptop")
    _, port = env.relay()
    for user in ("pi", "alice", "bob", "carol"):
        env.agent(user, port, f"echo={echo.addr}")
    seen = _who(env, "laptop", port)
    assert set(seen) == {"pi", "bob", "laptop"}
    assert seen["pi"]["services"] == ["echo"] and seen["pi"]["connections"] >= 2
    assert "carol" in _who(env, "pi", port) and "bob" not in _who(env, "pi", port)
    # a hidden user cannot be found by connecting either
    res = env.pipe("laptop", port, "alice/echo", b"x", check=False)
    assert res.returncode == 1 and b"not logged in" in res.stderr


def test_presence_notices_and_broadcast(env, echo):
    for user in ("pi", "alice", "laptop"):
        env.add_user(user)
    _, port = env.relay()
    watcher = env.spawn("watch", "relay", "watch", *env.client_args("laptop", port),
                        env=env.user_env("laptop"))
    watcher.wait_for("watching presence")
    pi = env.agent("pi", port, f"echo={echo.addr}")
    alice = env.agent("alice", port, f"echo={echo.addr}")
    watcher.wait_for("pi online")
    watcher.wait_for("alice online")
    res = env.run("relay", "broadcast", *env.client_args("laptop", port), "pi", "alice",
                  "nobody", "-m", "maintenance at noon", env=env.user_env("laptop"),
                  check=False)
    assert res.returncode == 3  # one target was not delivered
    assert b"delivered: pi, alice" in res.stdout and b"nobody" in res.stdout
    pi.wait_for("message from laptop: maintenance at noon")
    alice.wait_for("message from laptop: maintenance at noon")
    pi.stop()
    watcher.wait_for("pi offline")


def test_wrong_password_is_refused_and_slowed(env, echo):
    env.add_user("pi")
    env.add_user("laptop")
    _, port = env.relay()
    times = []
    for _ in range(3):
        start = time.monotonic()
        res = env.run("relay", "who", *env.client_args("laptop", port),
                      env={"KAKEHASHI_PASSWORD": "wrong"}, check=False)
        times.append(time.monotonic() - start)
        assert res.returncode == 1 and b"bad user ID or password" in res.stderr
    assert times[2] > times[0]  # the relay answers repeated failures more slowly
    denials = [a for a in env.audit() if a["event"] == "login" and a["decision"] == "deny"]
    assert len(denials) == 3
    agent = env.agent("pi", port, f"echo={echo.addr}", wait=False,
                      extra=("--password-file", str(_write(env, "wrong"))))
    assert agent.popen.wait(30) == 1  # a wrong password ends the agent, with a reason
    assert "bad user ID or password" in agent.output()


def _write(env, text):
    path = env.root / "pw"
    path.write_text(text + "\n")
    return path


def test_forbidden_peer_and_unknown_service(env, echo):
    env.add_user("pi", "--allowed-peers", "alice")
    env.add_user("alice")
    env.add_user("laptop")
    _, port = env.relay()
    env.agent("pi", port, f"echo={echo.addr}")
    res = env.pipe("laptop", port, "pi/echo", b"x", check=False)
    assert res.returncode == 1 and b"does not accept connections from you" in res.stderr
    assert env.pipe("alice", port, "pi/echo", b"ok").stdout == b"ok"
    res = env.pipe("alice", port, "pi/web", b"x", check=False)
    assert res.returncode == 1 and b"does not expose 'web'" in res.stderr
    denied = [a for a in env.audit() if a["event"] == "connect" and a["decision"] == "deny"]
    assert {a["why"] for a in denied} >= {"forbidden", "no-such-service"}

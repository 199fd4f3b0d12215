"""``--db redis://...`` through the CLI of every system, against a real ``redis-server``."""

from __future__ import annotations

import json

from tests.e2e.framework import roundtrip


def test_relay_users_and_sessions_on_redis(env, echo, redis_url):
    """Users added with ``relay user add --db redis://`` log in to a relay serving from
    the same Redis; a second relay on the same Redis sees them too."""
    env.db = redis_url
    env.add_user("pi")
    env.add_user("laptop")
    listed = json.loads(env.run("relay", "user", "list", "--db", redis_url, "--json").stdout)
    assert sorted(u["user"] for u in listed) == ["laptop", "pi"]
    dup = env.run("relay", "user", "add", "pi", "--db", redis_url, "--password-stdin",
                  input=b"x\n", check=False)
    assert dup.returncode != 0
    for _ in range(2):  # two relays, one user table
        _, port = env.relay()
        env.agent("pi", port, f"echo={echo.addr}")
        res = env.pipe("laptop", port, "pi/echo", b"hello over a Redis-backed relay\n")
        assert res.stdout == b"hello over a Redis-backed relay\n"
        _, local = env.forward("laptop", port, "pi/echo")
        assert roundtrip(local, b"again") == b"again"


def test_user_commands_of_every_system_accept_a_redis_url(env, redis_url):
    pw = b"a long enough password\n"
    env.run("gateway", "user", "add", "alice", "--db", redis_url, "--password-stdin",
            "--kdf-n", "1024", input=pw)
    assert env.run("gateway", "user", "list", "--db", redis_url).stdout.split() == [b"alice"]
    env.run("switch", "user", "add", "bob", "--db", redis_url, "--password-stdin",
            "--role", "asp", input=pw + pw)
    rows = json.loads(env.run("switch", "user", "list", "--db", redis_url, "--json").stdout)
    assert rows == [{"name": "bob", "role": "asp"}]
    token = env.run("ondemand", "token", "create", "--db", redis_url, "--role", "admin",
                    "--name", "ops").stdout.decode().strip()
    assert token
    assert b"ops" in env.run("ondemand", "token", "list", "--db", redis_url).stdout
    # the kinds do not collide: each system's records are its own
    env.run("gateway", "user", "remove", "alice", "--db", redis_url)
    assert env.run("gateway", "user", "list", "--db", redis_url).stdout.split() == []
    assert json.loads(env.run("switch", "user", "list", "--db", redis_url, "--json").stdout)

"""Encryption enforcement through the CLI (spec 000, Figs. 3-5, para 0037)."""

from __future__ import annotations

import pytest


def _setup(env, *pi_attrs: str):
    env.add_user("pi", *pi_attrs)
    env.add_user("laptop")
    _, port = env.relay(tls=False)  # plaintext relay: encryption must be negotiated
    return port


def _pairs(env, at_least: int = 1):
    return env.pairs(at_least)


def _starttls_users(env):
    return {a["user"] for a in env.audit() if a["event"] == "starttls"}


def test_fig3_target_requires_requester_is_instructed(env, echo):
    port = _setup(env)
    # pi turns encryption on at login; its connections upgrade before logging in
    env.agent("pi", port, f"echo={echo.addr}", tls=False, extra=("--encryption", "required"))
    res = env.pipe("laptop", port, "pi/echo", b"secret payload", tls=False)
    assert res.stdout == b"secret payload"
    assert _pairs(env)[-1]["encrypted"] is True
    # the requester's plaintext connection was upgraded in place after the instruction
    assert "laptop" in _starttls_users(env)
    pi_logins = [a for a in env.audit() if a["event"] == "login" and a["user"] == "pi"]
    assert pi_logins and all(a["encrypted"] for a in pi_logins)


def test_fig3_preregistered_encryption(env, echo):
    port = _setup(env, "--encryption", "required")
    env.agent("pi", port, f"echo={echo.addr}", tls=False, extra=("--encryption", "required"))
    assert env.pipe("laptop", port, "pi/echo", b"x", tls=False).stdout == b"x"
    assert _pairs(env)[-1]["encrypted"] is True


def test_preregistered_user_cannot_log_in_in_plaintext(env, echo):
    port = _setup(env, "--encryption", "required")
    agent = env.agent("pi", port, f"echo={echo.addr}", tls=False, wait=False)
    assert agent.popen.wait(20) == 1
    assert "requires encryption" in agent.output()


def test_fig4_requester_requires_target_is_instructed(env, echo):
    port = _setup(env)
    env.agent("pi", port, f"echo={echo.addr}", tls=False)  # pi: plaintext, optional
    res = env.pipe("laptop", port, "pi/echo", b"hello", "--encrypt", tls=False)
    assert res.stdout == b"hello"
    pair = _pairs(env)[-1]
    assert pair["encrypted"] is True and pair["from"] == "laptop"
    assert "pi" in _starttls_users(env)  # the target upgraded its notified connection


def test_plaintext_when_nobody_requires_encryption(env, echo):
    port = _setup(env)
    env.agent("pi", port, f"echo={echo.addr}", tls=False)
    assert env.pipe("laptop", port, "pi/echo", b"plain", tls=False).stdout == b"plain"
    assert _pairs(env)[-1]["encrypted"] is False
    assert not _starttls_users(env)


def test_requester_that_cannot_encrypt_is_refused(env, echo):
    port = _setup(env)
    env.agent("pi", port, f"echo={echo.addr}", tls=False, extra=("--encryption", "required"))
    res = env.pipe("laptop", port, "pi/echo", b"x", "--encryption", "off", tls=False,
                   check=False)
    assert res.returncode == 1
    assert b"requires encryption" in res.stderr
    assert not _pairs(env, 0)


def test_requiring_side_is_asked_and_agrees(env, echo):
    port = _setup(env)
    env.agent("pi", port, f"echo={echo.addr}", tls=False,
              extra=("--encryption", "required", "--insecure-peer", "ask"))
    res = env.pipe("laptop", port, "pi/echo", b"asked", "--encryption", "off", tls=False)
    assert res.stdout == b"asked"
    pair = _pairs(env)[-1]
    assert pair["encrypted"] is False and pair["insecure_ok"] is True


#: KAKEHASHI_E2E_SUITES for (agent, requester) -> the suite both seal with; a side
#: offering ChaCha20-Poly1305 alone sends the hello of a peer from before negotiation
_E2E_OFFERS = {
    "both-offer-aes": ({}, {}, "aes-128-gcm"),
    "agent-as-old-peer": ({"KAKEHASHI_E2E_SUITES": "chacha20-poly1305"}, {},
                          "chacha20-poly1305"),
    "requester-as-old-peer": ({}, {"KAKEHASHI_E2E_SUITES": "chacha20-poly1305"},
                              "chacha20-poly1305"),
}


@pytest.mark.parametrize("offers", list(_E2E_OFFERS))
def test_end_to_end_encryption_with_registered_keys(env, echo, offers):
    agent_env, pipe_env, suite = _E2E_OFFERS[offers]
    port = _setup(env)
    keys = {}
    for user in ("pi", "laptop"):
        path = env.root / f"{user}.key"
        keys[user] = env.run("relay", "keygen", str(path)).stdout.decode().strip()
        env.run("relay", "user", "set", user, "--db", env.db, "--pubkey", keys[user])
    agent = env.agent("pi", port, f"echo={echo.addr}", tls=False,
                      extra=("--identity", str(env.root / "pi.key")), env=agent_env)
    data = bytes(range(256)) * 4096
    res = env.pipe("laptop", port, "pi/echo", data, "--e2e",
                   "--identity", str(env.root / "laptop.key"), tls=False, env=pipe_env)
    assert res.stdout == data
    assert _pairs(env)[-1]["e2e"] is True
    agent.wait_for(f"end-to-end session with laptop sealed with {suite}")
    # a pinned key that differs from what the relay presents: refused, nothing delivered
    other = env.run("relay", "keygen", str(env.root / "other.key")).stdout.decode().strip()
    res = env.pipe("laptop", port, "pi/echo", b"never", "--e2e",
                   "--identity", str(env.root / "laptop.key"), "--peer-key", f"pi={other}",
                   tls=False, check=False)
    assert res.returncode == 1 and res.stdout == b""
    assert b"different key" in res.stderr

"""core.identity: registry, password sources, dummy hash, names, throttle, checker."""

from __future__ import annotations

import asyncio
import io
import threading

import pytest

from kakehashi.core import identity
from kakehashi.core.identity import (
    LoginThrottle,
    PasswordChecker,
    PasswordError,
    ThrottleSettings,
    UserRegistry,
    check_name,
    read_password,
    valid_name,
)
from kakehashi.core.store import open_store


# -- names ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["pi", "a.b-c_d@example", "x" * 64])
def test_valid_names(name):
    assert valid_name(name) and check_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 65, "a:b", "a b", "ä", "a\r\n", None, 5])
def test_invalid_names(name):
    assert not valid_name(name)
    with pytest.raises(ValueError, match="1-64"):
        check_name(name)


# -- password sources -----------------------------------------------------------------
def test_password_sources_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("KAKEHASHI_PASSWORD", "from-env")
    monkeypatch.setattr("sys.stdin", io.StringIO("from-stdin\nnext\n"))
    assert read_password(stdin=True) == "from-stdin"
    f = tmp_path / "pw"
    f.write_text("from-file\n")
    assert read_password(file=f) == "from-file"
    assert read_password() == "from-env"
    monkeypatch.delenv("KAKEHASHI_PASSWORD")
    with pytest.raises(PasswordError, match="--password-stdin, --password-file"):
        read_password()  # stdin is no terminal: no prompt
    f.write_text("")
    with pytest.raises(PasswordError, match="empty"):
        read_password(file=f)
    with pytest.raises(PasswordError, match="cannot read"):
        read_password(file=tmp_path / "missing")


# -- registry and verification -----------------------------------------------------
def test_registry_add_verify_passwd_remove(tmp_path):
    reg: UserRegistry = UserRegistry(open_store(tmp_path / "db"), "test.user", kdf_n=2**4)
    assert reg.add({"name": "ann", "role": "admin"}, "pw1")
    assert not reg.add({"name": "ann"}, "other")
    assert reg.verify("ann", "pw1") == {"name": "ann", "role": "admin",
                                        "password_hash": reg.get_doc("ann")["password_hash"]}
    assert reg.verify("ann", "wrong") is None
    reg.update({"name": "ann", "role": "user"})  # the hash is kept
    assert reg.verify("ann", "pw1")["role"] == "user"
    assert reg.set_password("ann", "pw2") and reg.verify("ann", "pw2")
    assert not reg.set_password("bob", "x")
    assert reg.names() == ["ann"] and reg.remove("ann") and reg.get("ann") is None


def test_unknown_users_cost_one_hash_at_the_registry_cost(tmp_path, monkeypatch):
    calls = []
    real = identity.verify_password
    monkeypatch.setattr(identity, "verify_password",
                        lambda pw, enc: calls.append(enc.split("$")[1]) or real(pw, enc))
    reg: UserRegistry = UserRegistry(open_store(tmp_path / "db"), "test.user", kdf_n=2**5)
    reg.add({"name": "ann"}, "pw")
    reg.verify("ann", "x")
    reg.verify("nobody", "x")
    reg.verify("bad:name", "x")
    assert calls == ["32", "32", "32"]
    assert identity.dummy_hash(2**5) is identity.dummy_hash(2**5)  # one dummy per cost


# -- throttle ---------------------------------------------------------------------------
def test_throttle_reserves_before_checking():
    t = LoginThrottle(ThrottleSettings(lockout=20))
    got = [t.begin("192.0.2.1", "carol", 0.0) for _ in range(120)]
    attempts = [a for a in got if not isinstance(a, str)]
    assert len(attempts) == 20 and got.count("lockout") == 100
    assert t.pending == 20


def test_throttle_success_erases_nothing_and_window_expires():
    t = LoginThrottle(ThrottleSettings(lockout=3, window=10))
    a, b, c = (t.begin("a", "u", 0.0) for _ in range(3))
    t.failed(a, 0.0)
    t.succeeded(b)
    t.failed(c, 1.0)
    assert t.failures("a", "u", 1.0) == 2 and not t.locked_out("a", "u", 1.0)
    t.failed(t.begin("a", "u", 1.0), 2.0)
    assert t.locked_out("a", "u", 2.0)
    assert not t.locked_out("a", "u", 12.1)  # ten seconds after the last failure
    assert len(t) == 0
    with pytest.raises(RuntimeError):
        t.succeeded(b)


def test_throttle_keys_are_address_and_user_with_an_address_ceiling():
    t = LoginThrottle(ThrottleSettings(lockout=2, address_lockout=3))
    for _ in range(2):
        t.failed(t.begin("a", "alice", 0.0), 0.0)
    assert t.begin("a", "alice", 0.0) == "lockout"
    assert not isinstance(t.begin("b", "alice", 0.0), str)  # another address
    t.failed(t.begin("a", "bob", 0.0), 0.0)  # a third failure from "a"
    assert t.begin("a", "carol", 0.0) == "lockout" and t.failures("a", None, 0.0) == 3


def test_throttle_memory_is_bounded_and_eviction_is_cheap():
    t = LoginThrottle(ThrottleSettings(max_keys=1000, lockout=1))
    for i in range(20_000):
        t.failed(t.begin(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", "u", float(i)), float(i))
    assert len(t) <= 1000


def test_throttle_caps_checks_in_flight_over_all_addresses():
    t = LoginThrottle(ThrottleSettings(max_pending=5))
    got = [t.begin(f"10.0.0.{i}", "u", 0.0) for i in range(8)]
    assert got[5:] == ["busy"] * 3


def test_delays_grow_per_user_and_address():
    t = LoginThrottle(ThrottleSettings(base_delay=0.5, max_delay=2))
    delays = [t.failed(t.begin("a", "u", 0.0), 0.0) for _ in range(4)]
    assert delays == [0.5, 1.0, 2.0, 2.0]


# -- the bounded checker ------------------------------------------------------------------
def test_checker_bounds_concurrent_checks_per_address_and_globally():
    checker = PasswordChecker(workers=3, per_address=2)
    release = threading.Event()
    started = threading.Semaphore(0)

    def slow(x):
        started.release()
        release.wait(10)
        return x

    async def main():
        tasks = [asyncio.create_task(checker.run("a", slow, i)) for i in range(10)]
        tasks += [asyncio.create_task(checker.run(f"b{i}", slow, i)) for i in range(10)]
        for _ in range(3):  # three start (two of "a", one other), then no more
            await asyncio.to_thread(started.acquire)
        assert checker.running == 3
        assert not await asyncio.to_thread(started.acquire, True, 0.2)
        release.set()
        return await asyncio.gather(*tasks)

    try:
        assert sorted(asyncio.run(main())) == sorted(list(range(10)) * 2)
        assert checker.peak == 3 and not checker._by_addr
    finally:
        checker.close()


def test_the_relay_schema_uses_the_one_name_definition():
    import msgspec

    from kakehashi.relay import messages as m

    for name in ("pi", "x" * 64, "a.b@c-d_e"):
        assert msgspec.convert(name, m.Name) == name and valid_name(name)
    for name in ("", "x" * 65, "p i", "a:b"):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(name, m.Name)
        assert not valid_name(name)

"""Proxy authentication: the shared throttle, bounded hashing, store reads off the loop."""

from __future__ import annotations

import asyncio
import base64
import threading

import pytest

from kakehashi.core.identity import LoginThrottle, PasswordChecker, ThrottleSettings
from kakehashi.core.store import open_store
from kakehashi.gateway import proxyauth
from kakehashi.gateway.proxyauth import ProxyAuth, ProxyUsers, parse_basic


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "gw.db")
    users = ProxyUsers(s, kdf_n=2**4)
    users.add({"name": "alice"}, "alice-pw")
    users.add({"name": "bob"}, "bob-pw")
    return s


@pytest.fixture
def verifies(monkeypatch):
    """Every password verification the proxy auth runs, with its thread."""
    calls: list[tuple[str, bool]] = []
    real = proxyauth._verify

    def counted(doc, password, kdf_n):
        calls.append((password, threading.current_thread() is threading.main_thread()))
        return real(doc, password, kdf_n)

    monkeypatch.setattr(proxyauth, "_verify", counted)
    return calls


def auth(store, **kw) -> ProxyAuth:
    return ProxyAuth(store, kdf_n=2**4, **kw)


def test_parse_basic():
    assert parse_basic(basic("a", "b:c")) == ("a", "b:c")
    assert parse_basic(b"Bearer x") is None
    assert parse_basic(b"Basic !!!") is None
    assert parse_basic(b"Basic " + base64.b64encode(b"no-colon")) is None


def test_parallel_guesses_are_bounded_by_the_lockout(store, verifies):
    """Item 13: 120 wrong guesses at once: the limit's worth are hashed, the rest refused."""
    pa = auth(store, throttle=LoginThrottle(ThrottleSettings(lockout=20)))

    async def main():
        return await asyncio.gather(*(pa.check(basic("alice", f"guess-{i}"), "192.0.2.7")
                                      for i in range(120)))

    try:
        results = asyncio.run(main())
    finally:
        pa.close()
    assert len(verifies) == 20
    assert sum(r.why == "lockout" for r in results) == 100
    assert all(r.user is None and r.claimed == "alice" for r in results)
    assert {r.why for r in results} == {"lockout", "bad user or password"}


def test_others_failures_do_not_lock_out_another_user(store, verifies):
    pa = auth(store, throttle=LoginThrottle(ThrottleSettings(lockout=3)))

    async def main():
        for i in range(5):
            await pa.check(basic("alice", f"guess-{i}"), "192.0.2.7")
        locked = await pa.check(basic("alice", "alice-pw"), "192.0.2.7")
        bob = await pa.check(basic("bob", "bob-pw"), "192.0.2.7")
        return locked, bob

    try:
        locked, bob = asyncio.run(main())
    finally:
        pa.close()
    assert locked.user is None and locked.why == "lockout"
    assert bob.user == "bob"


def test_hashing_and_store_reads_stay_off_the_event_loop(store, verifies, monkeypatch):
    loop_reads = []
    real_get = store.get

    def get(kind, key):
        loop_reads.append(threading.current_thread() is threading.main_thread())
        return real_get(kind, key)

    monkeypatch.setattr(store, "get", get)
    clock = Clock()
    pa = auth(store, clock=clock, recheck=1.0)
    header = basic("alice", "alice-pw")

    async def main():
        assert (await pa.check(header, "a")).user == "alice"
        assert pa.cached(header) == "alice"  # no read, no hash
        clock.now += 1.5
        assert pa.cached(header) is None  # due a re-read: the coroutine path does it
        assert (await pa.check(header, "a")).user == "alice"
        assert pa.cached(header) == "alice"

    try:
        asyncio.run(main())
    finally:
        pa.close()
    assert len(verifies) == 1 and not any(on_loop for _, on_loop in verifies)
    assert len(loop_reads) == 2 and not any(loop_reads)


def test_a_changed_password_locks_out_cached_credentials(store, verifies):
    clock = Clock()
    pa = auth(store, clock=clock, recheck=1.0)
    header = basic("alice", "alice-pw")

    async def main():
        assert (await pa.check(header, "a")).user == "alice"
        ProxyUsers(store, kdf_n=2**4).set_password("alice", "new-pw")
        clock.now += 1.5
        assert pa.cached(header) is None
        res = await pa.check(header, "a")
        assert res.user is None and res.why == "bad user or password"

    try:
        asyncio.run(main())
    finally:
        pa.close()


def test_unknown_users_cost_a_hash_too(store, verifies):
    pa = auth(store)
    try:
        res = asyncio.run(pa.check(basic("mallory", "x"), "a"))
    finally:
        pa.close()
    assert res.user is None and res.claimed == "mallory" and len(verifies) == 1


def test_hashes_run_a_few_at_a_time(store, verifies):
    checker = PasswordChecker(workers=4, per_address=2)
    pa = auth(store, checker=checker)

    async def main():
        await asyncio.gather(*(pa.check(basic("alice", f"g{i}"), "192.0.2.7")
                               for i in range(15)))

    try:
        asyncio.run(main())
    finally:
        pa.close()
    assert len(verifies) == 15 and checker.peak <= 2

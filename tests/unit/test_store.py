"""The store contract, held by every backend: SQLite (a file) and Redis (a real
``redis-server`` on loopback, started per test)."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from kakehashi.core.store import (
    RedisStore,
    SQLiteStore,
    StoreUnavailable,
    describe,
    is_url,
    open_store,
)
from kakehashi.core.store.redis import key_prefix, redacted
from tests.support.ports import free_port


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "state" / "store.db")
    return request.getfixturevalue("redis_url")


@pytest.fixture
def store(store_url):
    s = open_store(store_url)
    try:
        yield s
    finally:
        s.close()


def test_open_store_picks_the_backend(store, store_url):
    assert isinstance(store, RedisStore if store_url.startswith("redis://") else SQLiteStore)
    assert is_url(store_url) == store_url.startswith("redis://")


def test_put_get_overwrite(store):
    assert store.get("user", "pi") is None
    store.put("user", "pi", {"name": "pi", "n": 1, "nested": {"a": [1, 2]}})
    assert store.get("user", "pi") == {"name": "pi", "n": 1, "nested": {"a": [1, 2]}}
    store.put("user", "pi", {"name": "pi", "n": 2})
    assert store.get("user", "pi") == {"name": "pi", "n": 2}


def test_kinds_are_separate(store):
    store.put("a", "k", {"v": "a"})
    store.put("b", "k", {"v": "b"})
    assert store.get("a", "k") == {"v": "a"}
    assert store.get("b", "k") == {"v": "b"}
    assert store.list("a") == [("k", {"v": "a"})]
    assert store.delete("a", "k")
    assert store.get("b", "k") == {"v": "b"}


def test_insert_only_creates(store):
    assert store.insert("user", "pi", {"v": 1})
    assert not store.insert("user", "pi", {"v": 2})
    assert store.get("user", "pi") == {"v": 1}


def test_delete_says_whether_it_removed(store):
    store.put("user", "pi", {})
    assert store.delete("user", "pi")
    assert not store.delete("user", "pi")
    assert store.get("user", "pi") is None


def test_list_is_sorted_by_key_and_keeps_odd_keys(store):
    keys = ["b", "a", "c/0002", "c/0001", "ünï", "with space", "x:y:z"]
    for k in keys:
        store.put("kind", k, {"k": k})
    assert [k for k, _ in store.list("kind")] == sorted(keys)
    assert all(doc == {"k": k} for k, doc in store.list("kind"))
    assert store.list("empty") == []


def test_write_many_puts_and_deletes(store):
    store.put("t", "gone", {"v": 0})
    store.write_many([("t", "a", {"v": 1}), ("t", "b", {"v": 2}), ("t", "gone", None),
                      ("u", "a", {"v": 3}), ("t", "a", {"v": 4})])
    assert store.list("t") == [("a", {"v": 4}), ("b", {"v": 2})]
    assert store.get("u", "a") == {"v": 3}
    store.write_many([])


def test_a_second_handle_sees_the_first_ones_writes(store, store_url):
    other = open_store(store_url)
    try:
        store.put("user", "pi", {"v": 1})
        assert other.get("user", "pi") == {"v": 1}
        assert not other.insert("user", "pi", {"v": 2})
        other.delete("user", "pi")
        assert store.get("user", "pi") is None
    finally:
        other.close()


def test_parallel_inserts_have_exactly_one_winner(store_url):
    """Two nodes creating the same user at once: one wins, the other is told so."""
    handles = [open_store(store_url) for _ in range(8)]
    barrier = threading.Barrier(len(handles))
    results: list[bool] = []
    lock = threading.Lock()

    def run(s, i):
        barrier.wait()
        ok = s.insert("user", "same", {"by": i})
        with lock:
            results.append(ok)

    threads = [threading.Thread(target=run, args=(s, i)) for i, s in enumerate(handles)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert sorted(results) == [False] * 7 + [True]
    finally:
        for s in handles:
            s.close()


def test_store_is_usable_from_several_threads(store):
    def run(i):
        for j in range(20):
            store.put("t", f"{i}-{j:02d}", {"i": i, "j": j})

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(store.list("t")) == 80


# -- Redis only --------------------------------------------------------------------------
def test_redis_keys_have_a_prefix_per_kind(redis_url):
    import redis

    s = open_store(redis_url)
    s.put("relay.user", "pi", {"v": 1})
    raw = redis.Redis.from_url(redis_url)
    assert set(raw.keys()) == {b"kakehashi:relay.user"}
    s.close()
    t = open_store(redis_url + "?prefix=site2:")
    assert t.get("relay.user", "pi") is None  # another deployment in the same database
    t.put("relay.user", "pi", {"v": 2})
    assert set(raw.keys()) == {b"kakehashi:relay.user", b"site2:relay.user"}
    t.close()


def test_redis_database_number_in_the_url(redis_url):
    a, b = open_store(redis_url + "/0"), open_store(redis_url + "/3")
    a.put("k", "x", {"db": 0})
    assert b.get("k", "x") is None
    a.close()
    b.close()


def test_unreachable_redis_is_a_clear_error():
    port = free_port()  # nothing listens there
    with pytest.raises(StoreUnavailable, match=rf"cannot reach Redis at redis://127.0.0.1:{port}"):
        open_store(f"redis://127.0.0.1:{port}")


def test_redis_going_away_is_a_clear_error(redis_server):
    s = open_store(redis_server.url)
    s.put("k", "x", {})
    redis_server.stop(kill=True)
    with pytest.raises(StoreUnavailable, match="cannot reach Redis"):
        s.get("k", "x")
    s.close()


def test_password_never_shown():
    url = "redis://admin:s3cret@127.0.0.1:1/0"
    assert "s3cret" not in redacted(url)
    assert "s3cret" not in describe(url)
    assert describe("/var/lib/x.db") == "/var/lib/x.db"
    port = free_port()
    with pytest.raises(StoreUnavailable) as info:
        open_store(f"redis://admin:s3cret@127.0.0.1:{port}")
    assert "s3cret" not in str(info.value)


def test_prefix_option():
    assert key_prefix("redis://h:1/0") == "kakehashi:"
    assert key_prefix("redis://h:1/0?prefix=a:") == "a:"


def test_unknown_url_scheme_is_refused():
    with pytest.raises(ValueError, match="redis://"):
        open_store("postgres://h/db")


def test_cli_says_why_when_redis_is_down(tmp_path):
    """``--db redis://...`` with nothing there: one clear line and exit status 1."""
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "kakehashi", "relay", "user", "list", "--db",
         f"redis://127.0.0.1:{port}"], capture_output=True, text=True, timeout=60,
        env={"KAKEHASHI_HOME": str(tmp_path), "PATH": "/usr/bin:/bin",
             "PYTHONPATH": ":".join(sys.path)})
    assert proc.returncode == 1, proc.stderr
    assert f"cannot reach Redis at redis://127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr

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
from kakehashi.core.store.redis import (
    CLUSTER_REFUSAL,
    async_client,
    is_redis_url,
    key_prefix,
    parse_url,
    redacted,
)
from tests.support.ports import free_port


@pytest.fixture(params=["sqlite", "redis", "sentinel"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "state" / "store.db")
    if request.param == "sentinel":  # the master found through a real Redis Sentinel
        return request.getfixturevalue("redis_sentinel").url
    return request.getfixturevalue("redis_url")


@pytest.fixture
def store(store_url):
    s = open_store(store_url)
    try:
        yield s
    finally:
        s.close()


def test_open_store_picks_the_backend(store, store_url):
    assert isinstance(store, RedisStore if store_url.startswith("redis") else SQLiteStore)
    assert is_url(store_url) == store_url.startswith("redis")


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


# -- Redis Sentinel URLs -----------------------------------------------------------------
def test_sentinel_url_parsed():
    t = parse_url("redis+sentinel://u:p%40ss@10.0.0.1:26380,[::1],h3:1/mymaster/2"
                  "?prefix=site:&sentinel_password=sp&socket_keepalive=true")
    assert t.sentinels == (("10.0.0.1", 26380), ("::1", 26379), ("h3", 1))
    assert t.service == "mymaster" and t.prefix == "site:"
    assert t.master_kwargs["username"] == "u" and t.master_kwargs["password"] == "p@ss"
    assert t.master_kwargs["db"] == 2 and t.master_kwargs["socket_keepalive"] is True
    assert t.sentinel_kwargs == {"password": "sp"}
    assert "ssl" not in t.master_kwargs and "prefix" not in t.master_kwargs


def test_sentinel_url_with_tls_speaks_tls_to_sentinels_and_master():
    t = parse_url("rediss+sentinel://h:26379/m?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required")
    assert t.master_kwargs["ssl"] is True and t.sentinel_kwargs["ssl"] is True
    assert t.master_kwargs["ssl_ca_certs"] == t.sentinel_kwargs["ssl_ca_certs"] == "/ca.pem"


def test_direct_urls_parse_as_before():
    t = parse_url("redis://:pw@127.0.0.1:6379/3?prefix=a:")
    assert not t.sentinels and t.client_url == "redis://:pw@127.0.0.1:6379/3"
    assert t.prefix == "a:"


@pytest.mark.parametrize("url, why", [
    ("redis+sentinel:///m", "at least one sentinel"),
    ("redis+sentinel://h:1", "/MASTER"),
    ("redis+sentinel://h:1/", "/MASTER"),
    ("redis+sentinel://h:1/m/x", "a number"),
    ("redis+sentinel://h:1/m/1/2", "/MASTER"),
    ("redis+sentinel://h:1/m/1?db=2", "given twice"),
    ("redis+sentinel://h:99999/m", "bad port"),
    ("redis+sentinel://h:1,,h:2/m", "empty sentinel"),
    ("redis+sentinel://[::1/m", "IPv6"),
    ("redis+sentinel://h:1/m?socket_timeout=soon", "socket_timeout"),
    ("postgres://h/db", "redis://"),
])
def test_bad_redis_urls_are_refused_with_the_reason(url, why):
    with pytest.raises(ValueError, match=why):
        parse_url(url)


def test_redis_cluster_urls_are_refused_saying_why():
    assert is_redis_url("redis+cluster://h:7000")  # known, so refused by name
    with pytest.raises(ValueError, match=r"not supported: .*MULTI/EXEC") as info:
        parse_url("redis+cluster://h:7000,h:7001")
    assert str(info.value) == CLUSTER_REFUSAL
    with pytest.raises(StoreUnavailable, match="Redis Cluster"):
        open_store("redis+cluster://h:7000")


def test_sentinel_password_never_shown():
    url = "redis+sentinel://admin:s3cret@127.0.0.1:1,127.0.0.1:2/kk?sentinel_password=t0p&x=1"
    assert "s3cret" not in redacted(url) and "s3cret" not in describe(url)
    assert "t0p" not in redacted(url) and redacted(url).endswith("sentinel_password=***&x=1")
    assert redacted("redis://h:1/0?prefix=a:") == "redis://h:1/0?prefix=a:"
    assert is_url(url)


def test_store_follows_a_sentinel_failover(redis_sentinel):
    """The master is killed; the sentinel promotes the replica; the same store (no
    reopening) reads what it wrote and writes again."""
    s = open_store(redis_sentinel.url)
    s.put("relay.user", "pi", {"v": 1})
    redis_sentinel.wait_replicated()
    redis_sentinel.kill_master()
    redis_sentinel.wait_failover()
    assert s.get("relay.user", "pi") == {"v": 1}
    s.put("relay.user", "pi", {"v": 2})
    assert s.get("relay.user", "pi") == {"v": 2}
    s.close()


def test_async_client_through_sentinel_blocks_for_a_free_connection(redis_sentinel):
    """A burst beyond the pool waits for a connection (as with one server), and the
    pool asks the sentinel where the master is."""
    import asyncio

    from kakehashi.core.store import redis as store_redis

    async def main() -> list[bytes]:
        client = async_client(redis_sentinel.url)
        client.connection_pool.max_connections = 2
        try:
            return await asyncio.gather(*(client.execute_command("PING")
                                          for _ in range(20)))
        finally:
            await client.aclose()

    assert store_redis.MAX_CONNECTIONS > 2
    assert all(asyncio.run(main()))


def test_cli_refuses_a_bad_cluster_url(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "kakehashi", "relay", "serve", "--listen", "127.0.0.1:0",
         "--tls", "off", "--cluster", "redis+cluster://127.0.0.1:7000",
         "--advertise", "127.0.0.1:1"], capture_output=True, text=True, timeout=60,
        env={"KAKEHASHI_HOME": str(tmp_path), "PATH": "/usr/bin:/bin",
             "PYTHONPATH": ":".join(sys.path)})
    assert proc.returncode == 2, proc.stderr
    assert "Redis Cluster (redis+cluster://) is not supported" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sentinel_url_with_passwords_for_the_master_and_the_sentinel(tmp_path):
    """``redis+sentinel://:PASSWORD@.../MASTER?sentinel_password=...`` against a real
    set whose master, replica and sentinel all require a password; a wrong sentinel
    password is a clear error that shows neither password."""
    from tests.support.redis import REDIS_SERVER, RedisSentinelSet

    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    rs = RedisSentinelSet(tmp_path, password="m4ster", sentinel_password="s3ntinel")
    try:
        port = rs.sentinel.port
        good = f"redis+sentinel://:m4ster@127.0.0.1:{port}/kk/2?sentinel_password=s3ntinel"
        s = open_store(good)
        s.put("relay.user", "pi", {"v": 1})
        assert s.get("relay.user", "pi") == {"v": 1}
        s.close()
        bad = f"redis+sentinel://:m4ster@127.0.0.1:{port}/kk?sentinel_password=wrong"
        with pytest.raises(StoreUnavailable) as info:
            open_store(bad)
        assert "m4ster" not in str(info.value) and "wrong" not in str(info.value)
        with pytest.raises(StoreUnavailable, match=r"refused the login|cannot reach"):
            open_store(f"redis+sentinel://:nope@127.0.0.1:{port}/kk?sentinel_password="
                       "s3ntinel")
    finally:
        rs.close()

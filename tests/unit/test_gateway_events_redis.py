"""Event topics on Redis Streams: the hub contract held by both hubs (in memory and
Redis), and what only several gateways sharing one Redis can show."""

from __future__ import annotations

import asyncio

import pytest

from kakehashi.gateway.event_redis import RedisEventHub
from kakehashi.gateway.events import EventHub, EventsUnavailable, Retention
from tests.support.ports import free_port
from tests.support.wait import async_wait_until


@pytest.fixture(params=["memory", "redis"])
async def make_hub(request):
    hubs = []

    def make(retention: Retention | None = None, **kw):
        if request.param == "memory":
            hub = EventHub(retention)
        else:
            hub = RedisEventHub(request.getfixturevalue("redis_url"), retention, **kw)
        hubs.append(hub)
        return hub

    yield make
    for hub in hubs:
        await hub.aclose()


@pytest.fixture
async def two_gateways(redis_url):
    """Two hubs on one Redis: two gateways serving the same topics."""
    a, b = RedisEventHub(redis_url), RedisEventHub(redis_url)
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


def _seqs(batch) -> list[int]:
    return [e.seq for e in batch.events]


# -- the contract, both hubs ---------------------------------------------------------
async def test_numbering_cursor_and_no_event(make_hub):
    hub = make_hub()
    empty = await hub.wait("alerts", 0, 0)
    assert empty.events == () and empty.cursor == 0 and not empty.gap
    for i in range(5):
        ev = await hub.publish_stored("alerts", f"e{i}".encode())
        assert ev.seq == i + 1
    batch = await hub.wait("alerts", 2, 0)
    assert _seqs(batch) == [3, 4, 5] and batch.cursor == 5
    assert [e.data for e in batch.events] == [b"e2", b"e3", b"e4"]
    assert (await hub.wait("alerts", 5, 0)).events == ()
    assert (await hub.wait("other", 0, 0)).events == ()  # topics are separate


async def test_negative_and_future_cursors(make_hub):
    hub = make_hub()
    await hub.publish_stored("t", b"old")
    only_new = await hub.wait("t", -1, 0)
    assert only_new.events == () and only_new.cursor == 1
    future = await hub.wait("t", 99, 0)  # a hub that lost its events numbers from 1 again
    assert future.gap and future.cursor == 1 and future.events == ()


async def test_count_and_size_retention_report_a_gap(make_hub):
    hub = make_hub(Retention(max_events=3, max_bytes=1000, max_event=600))
    for i in range(6):
        await hub.publish_stored("t", bytes([65 + i]) * 10)
    batch = await hub.wait("t", 0, 0)
    assert _seqs(batch) == [4, 5, 6] and batch.gap
    assert not (await hub.wait("t", 3, 0)).gap
    await hub.publish_stored("t", b"x" * 500)
    await hub.publish_stored("t", b"y" * 500)  # 1000 + 10 bytes: the oldest goes
    assert _seqs(await hub.wait("t", 0, 0)) == [7, 8]


async def test_age_retention(make_hub):
    hub = make_hub(Retention(max_age=0.05))
    await hub.publish_stored("t", b"short-lived")

    async def expired():
        batch = await hub.wait("t", 0, 0)
        return batch.gap and not batch.events and batch.cursor == 1

    for _ in range(500):
        if await expired():
            break
        await asyncio.sleep(0.01)
    assert await expired()
    assert (await hub.publish_stored("t", b"next")).seq == 2  # numbering goes on


async def test_long_poll_wakes_on_publish_and_times_out(make_hub):
    hub = make_hub()
    waiter = asyncio.create_task(hub.wait("alerts", 0, timeout=10))
    await async_wait_until(lambda: hub._waiters.get("alerts"), what="the waiter parked")
    await hub.publish_stored("alerts", b"fire")
    batch = await asyncio.wait_for(waiter, 5)
    assert [e.data for e in batch.events] == [b"fire"]
    empty = await hub.wait("alerts", batch.cursor, timeout=0.05)
    assert empty.events == () and empty.cursor == batch.cursor


async def test_topic_names_sizes_and_count_are_bounded(make_hub):
    hub = make_hub(Retention(max_topics=2, max_event=10))
    with pytest.raises(ValueError):
        await hub.publish_stored("bad topic", b"x")
    with pytest.raises(ValueError):
        await hub.publish_stored("a", b"x" * 11)
    await hub.publish_stored("a", b"x")
    await hub.publish_stored("b", b"x")
    with pytest.raises(ValueError, match="too many topics"):
        await hub.publish_stored("c", b"x")
    await hub.publish_stored("a", b"again")  # existing topics go on


async def test_binary_payloads_come_back_unchanged(make_hub):
    hub = make_hub()
    payloads = [bytes(range(256)), b"\x00", "日本語".encode(), b""]
    for p in payloads:
        await hub.publish_stored("bin", p)
    assert [e.data for e in (await hub.wait("bin", 0, 0)).events] == payloads


async def test_a_publish_repeated_with_its_idempotency_key_is_not_repeated(make_hub):
    hub = make_hub()
    first = await hub.publish_stored("t", b"once", "pub-1")
    again = await hub.publish_stored("t", b"once", "pub-1")
    assert (again.seq, again.data) == (first.seq, b"once")
    other = await hub.publish_stored("u", b"same key, other topic", "pub-1")
    assert other.seq == 1
    assert (await hub.publish_stored("t", b"new key", "pub-2")).seq == 2
    assert _seqs(await hub.wait("t", 0, 0)) == [1, 2]


# -- Redis only: several gateways ----------------------------------------------------
async def test_an_idempotency_key_holds_across_gateways(two_gateways):
    """A publisher that lost gateway A's answer sends again to B: one event."""
    a, b = two_gateways
    first = await a.publish_stored("t", b"x", "k-77")
    assert (await b.publish_stored("t", b"x", "k-77")).seq == first.seq
    assert _seqs(await b.wait("t", 0, 0)) == [1]


async def test_a_cursor_from_one_gateway_is_valid_on_the_other(two_gateways):
    a, b = two_gateways
    seen: list[int] = []
    cursor = 0
    for round_ in range(6):
        pub = a if round_ % 2 else b
        for i in range(round_ + 1):
            await pub.publish_stored("t", f"{round_}.{i}".encode())
        poller = b if round_ % 3 else a
        batch = await poller.wait("t", cursor, 0)
        seen += _seqs(batch)
        cursor = batch.cursor
    assert seen == list(range(1, 22))


async def test_a_long_poll_on_one_gateway_wakes_on_a_publish_to_the_other(two_gateways):
    a, b = two_gateways
    waiter = asyncio.create_task(b.wait("alerts", -1, timeout=20))
    await async_wait_until(lambda: b._waiters.get("alerts"), what="the waiter parked on b")
    await async_wait_until(lambda: b._follower is not None, what="b following")
    ev = await a.publish_stored("alerts", b"from a")
    batch = await asyncio.wait_for(waiter, 10)
    assert [(e.seq, e.data) for e in batch.events] == [(ev.seq, b"from a")]


async def test_parallel_publishers_on_two_gateways_get_distinct_numbers(two_gateways):
    a, b = two_gateways
    events = await asyncio.gather(*[(a if i % 2 else b).publish_stored("t", b"%d" % i)
                                    for i in range(200)])
    assert sorted(e.seq for e in events) == list(range(1, 201))
    got, cursor = [], 0
    while True:
        batch = await a.wait("t", cursor, 0)
        if not batch.events:
            break
        got += batch.events
        cursor = batch.cursor
    assert sorted(e.data for e in got) == sorted(b"%d" % i for i in range(200))
    assert [e.seq for e in got] == list(range(1, 201))


async def test_a_retried_publish_is_answered_not_repeated(redis_url, monkeypatch):
    """redis-py runs a command again when its connection failed, and the first run may
    have happened: the publish then gets the event it made, and the topic has one."""
    from kakehashi.gateway import event_redis

    hub = RedisEventHub(redis_url)
    try:
        monkeypatch.setattr(event_redis.secrets, "token_hex", lambda n: "same-publish")
        first = await hub.publish_stored("t", b"once")
        again = await hub.publish_stored("t", b"once")
        assert (again.seq, again.ts) == (first.seq, first.ts)
        assert _seqs(await hub.wait("t", 0, 0)) == [1]
        monkeypatch.undo()
        assert (await hub.publish_stored("t", b"next")).seq == 2
    finally:
        await hub.aclose()


async def test_retention_drops_many_events_at_once(redis_url):
    """A gateway keeping fewer events than another published: its first poll trims
    hundreds in one script (the head is read in growing batches)."""
    many, few = RedisEventHub(redis_url), RedisEventHub(redis_url, Retention(max_events=5))
    try:
        await asyncio.gather(*[many.publish_stored("t", b"%d" % i) for i in range(700)])
        batch = await few.wait("t", 0, 0)
        assert _seqs(batch) == [696, 697, 698, 699, 700] and batch.gap
        assert _seqs(await many.wait("t", 690, 0)) == [696, 697, 698, 699, 700]
    finally:
        await many.aclose()
        await few.aclose()


async def test_a_poll_reads_at_most_the_reply_limit(redis_url):
    hub = RedisEventHub(redis_url, reply_bytes=2500)
    try:
        for _ in range(10):
            await hub.publish_stored("big", b"z" * 1000)
        first = await hub.wait("big", 0, 0)
        assert _seqs(first) == [1, 2]
        one = RedisEventHub(redis_url, reply_bytes=10)
        assert _seqs(await one.wait("big", 2, 0)) == [3]  # at least one event
        await one.aclose()
    finally:
        await hub.aclose()


async def test_redis_away_is_events_unavailable_and_the_follower_comes_back(redis_server):
    hub = RedisEventHub(redis_server.url)
    try:
        await hub.publish_stored("t", b"before")
        waiter = asyncio.create_task(hub.wait("t", 1, timeout=60))
        await async_wait_until(lambda: hub._waiters.get("t"), what="the waiter parked")
        redis_server.stop(kill=True)
        # the parked poll is woken, looks again and is told Redis is away
        with pytest.raises(EventsUnavailable):
            await asyncio.wait_for(waiter, 30)
        with pytest.raises(EventsUnavailable, match="Redis"):
            await hub.publish_stored("t", b"lost")
        redis_server.start(keep_port=True)  # empty: numbering starts again
        waiter = asyncio.create_task(hub.wait("t", 0, timeout=60))
        await async_wait_until(lambda: hub._waiters.get("t"), timeout=30,
                               what="the waiter parked again")
        other = RedisEventHub(redis_server.url)
        await other.publish_stored("t", b"after")
        await other.aclose()
        batch = await asyncio.wait_for(waiter, 30)
        assert [e.data for e in batch.events] == [b"after"]
    finally:
        await hub.aclose()


async def test_unreachable_redis_is_a_clear_error():
    hub = RedisEventHub(f"redis://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(EventsUnavailable, match=r"cannot reach Redis at redis://127\.0\.0\.1"):
            await hub.wait("t", 0, 0)
    finally:
        await hub.aclose()

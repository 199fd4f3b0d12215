"""The event hub: cursors, retention, long polling (spec 001 Fig. 11, claim 7)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from kakehashi.core.store import SQLiteStore
from kakehashi.gateway.event_endpoint import ByteBudget
from kakehashi.gateway.event_journal import EVENT_KIND, JournalError, StoreJournal
from kakehashi.gateway.event_wire import encode_event, event_size, parse_reply, plan_reply
from kakehashi.gateway.events import Batch, Event, EventHub, Retention, TopicLog
from tests.support.wait import async_wait_until


def test_no_event_then_events_after_the_cursor():
    log = TopicLog()
    assert log.since(0).events == ()  # Fig. 11, 702: "no event"
    for i in range(5):
        log.append(f"e{i}".encode(), now=0.0)
    batch = log.since(2)
    assert [e.seq for e in batch.events] == [3, 4, 5] and batch.cursor == 5
    assert log.since(5).events == () and log.since(5).cursor == 5


def test_reconnecting_with_the_cursor_loses_and_repeats_nothing():
    log = TopicLog()
    seen: list[int] = []
    cursor = 0
    for round_ in range(10):
        for i in range(round_ % 3 + 1):
            log.append(f"{round_}.{i}".encode(), now=0.0)
        batch = log.since(cursor)  # a new poll after a "reconnect"
        seen += [e.seq for e in batch.events]
        cursor = batch.cursor
    assert seen == list(range(1, log.last_seq + 1))


def test_retention_drops_old_events_and_reports_the_gap():
    log = TopicLog(Retention(max_events=3))
    for i in range(6):
        log.append(str(i).encode(), now=0.0)
    batch = log.since(1)
    assert batch.gap and [e.seq for e in batch.events] == [4, 5, 6]
    assert not log.since(4).gap


def test_age_and_size_limits():
    log = TopicLog(Retention(max_age=10, max_bytes=10))
    log.append(b"12345", now=0.0)
    log.append(b"123456", now=1.0)  # over 10 bytes: the oldest goes
    assert [e.seq for e in log.since(0).events] == [2]
    log.expire(now=20.0)
    assert log.since(0).events == ()
    with pytest.raises(ValueError):
        TopicLog(Retention(max_event=4)).append(b"12345", now=0.0)


def test_cursor_from_a_restarted_hub_resets_with_a_gap():
    log = TopicLog()
    log.append(b"x", now=0.0)
    batch = log.since(99)
    assert batch.gap and batch.cursor == 1 and batch.events == ()


def test_negative_cursor_means_only_new_events():
    log = TopicLog()
    log.append(b"old", now=0.0)
    assert log.since(-1).events == () and log.since(-1).cursor == 1


async def test_long_poll_wakes_on_publish_and_times_out_otherwise():
    hub = EventHub()
    waiter = asyncio.create_task(hub.wait("alerts", 0, timeout=5))
    await async_wait_until(lambda: hub._waiters.get("alerts"), what="the waiter parked")
    hub.publish("alerts", b"fire")
    batch = await asyncio.wait_for(waiter, 1)
    assert [e.data for e in batch.events] == [b"fire"]
    empty = await hub.wait("alerts", batch.cursor, timeout=0.05)
    assert empty.events == () and empty.cursor == batch.cursor


async def test_only_new_long_poll_sees_an_event_published_during_the_wait():
    hub = EventHub()
    hub.publish("t", b"old")
    waiter = asyncio.create_task(hub.wait("t", -1, timeout=5))
    await async_wait_until(lambda: hub._waiters.get("t"), what="the waiter parked")
    hub.publish("t", b"new")
    assert [e.data for e in (await waiter).events] == [b"new"]


async def test_topic_names_and_count_are_bounded():
    hub = EventHub(Retention(max_topics=2))
    with pytest.raises(ValueError):
        hub.publish("bad topic", b"x")
    hub.publish("a", b"x")
    hub.publish("b", b"x")
    with pytest.raises(ValueError):
        hub.publish("c", b"x")


def _journaled(path, retention: Retention | None = None) -> EventHub:
    return EventHub(retention, journal=StoreJournal(SQLiteStore(path)))


def test_a_journaled_hub_comes_back_with_its_events_and_numbering(tmp_path):
    db = tmp_path / "gw.db"
    hub = _journaled(db)
    for i in range(1, 4):
        hub.publish("alerts", f"e{i}".encode())
    hub.publish("other", b"\x00\xffbinary")
    again = _journaled(db)  # a restart: a new hub over the same store
    assert [(e.seq, e.data) for e in again.poll("alerts", 1).events] == [(2, b"e2"), (3, b"e3")]
    assert again.poll("other", 0).events[0].data == b"\x00\xffbinary"
    assert again.publish("alerts", b"e4").seq == 4  # numbering goes on: cursors stay valid


def test_the_journal_forgets_what_retention_drops(tmp_path):
    db = tmp_path / "gw.db"
    hub = _journaled(db, Retention(max_events=2))
    for i in range(5):
        hub.publish("t", str(i).encode())
    store = SQLiteStore(db)
    assert len(store.list(EVENT_KIND)) == 2
    again = _journaled(db, Retention(max_events=2))
    batch = again.poll("t", 0)
    assert [e.seq for e in batch.events] == [4, 5] and batch.gap


def test_numbering_survives_even_when_every_event_expired(tmp_path):
    db = tmp_path / "gw.db"
    _journaled(db).publish("t", b"x")
    store = SQLiteStore(db)
    store.put(EVENT_KIND, "t/00000000000000000001", {"ts": 0.0, "data": "eA=="})  # made old
    assert _journaled(db, Retention(max_age=60)).poll("t", 0).events == ()
    assert store.list(EVENT_KIND) == []  # the expired event left the store as well
    assert _journaled(db).publish("t", b"y").seq == 2


def test_a_damaged_stored_event_is_skipped(tmp_path):
    db = tmp_path / "gw.db"
    hub = _journaled(db)
    hub.publish("t", b"good")
    SQLiteStore(db).put(EVENT_KIND, "t/00000000000000000002", {"ts": "soon"})
    assert [e.data for e in _journaled(db).poll("t", 0).events] == [b"good"]


# -- replies: predictable sizes, a byte limit, a cursor to go on from (issue 7, item 11) ---
def test_binary_events_cost_base64_not_json_escapes():
    binary = Event(1, 0.0, b"\x01" * 65536)  # UTF-8, but 6x as JSON escapes
    assert binary.text_size == -1 and event_size(binary) < 88 * 1024
    assert len(encode_event(binary)) == event_size(binary)
    text = Event(2, 0.0, b'{"build": 7, "ok": true}')  # JSON text stays readable text
    assert text.text_size > 0 and b'"data": "{\\"build\\"' in encode_event(text)
    reply = plan_reply(Batch((binary, text), 2), 1 << 20)
    assert [e.get("data_b64") is not None for e in parse_reply(reply.encode())[0]] == [
        True, False]


def test_a_backlog_over_the_reply_limit_comes_in_replies_that_continue():
    log = TopicLog()
    for _ in range(350):  # the case: 350 events of 64 KiB of \x01
        log.append(bytes([1]) * 65536, now=0.0)
    cursor, seen, limit = 0, [], 4 << 20
    while cursor < log.last_seq:
        reply = plan_reply(log.since(cursor), limit)
        assert reply.size <= limit and reply.cursor > cursor  # fits, and moves on
        events, cursor, _ = parse_reply(reply.encode())
        seen += [e["seq"] for e in events]
    assert seen == list(range(1, 351))
    # one event larger than the limit still goes (alone): a watcher never loops
    reply = plan_reply(log.since(0), 10)
    assert [e.seq for e in reply.events] == [1] and reply.cursor == 1


async def test_the_byte_budget_is_shared_first_come_first_served():
    budget = ByteBudget(100)
    assert await budget.acquire(60) == 60
    second = asyncio.create_task(budget.acquire(60))
    third = asyncio.create_task(budget.acquire(10))  # fits, but waits its turn
    await async_wait_until(lambda: len(budget._waiters) == 2, what="both waiting")
    assert not second.done() and not third.done() and budget.used == 60
    budget.release(60)
    assert await second == 60 and await third == 10 and budget.used == 70
    waiting = asyncio.create_task(budget.acquire(500))  # more than all: clamped
    await async_wait_until(lambda: len(budget._waiters) == 1, what="waiting")
    waiting.cancel()  # a watcher cut while it waits gives nothing back twice
    with pytest.raises(asyncio.CancelledError):
        await waiting
    budget.release(70)
    assert budget.used == 0 and await budget.acquire(500) == 100


# -- the journal writes off the event loop, batched (issue 7, item 20) --------------------
class _WatchedStore(SQLiteStore):
    """Records on which thread each write ran and how many commits there were."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.write_threads: list[int] = []

    def put(self, kind, key, doc):
        self.write_threads.append(threading.get_ident())
        super().put(kind, key, doc)

    def delete(self, kind, key):
        self.write_threads.append(threading.get_ident())
        return super().delete(kind, key)

    def write_many(self, ops):
        self.write_threads.append(threading.get_ident())
        super().write_many(ops)


async def test_journal_writes_run_off_the_loop_in_batches(tmp_path):
    store = _WatchedStore(tmp_path / "gw.db")
    journal = StoreJournal(store)
    hub = EventHub(Retention(max_events=10), journal=journal)
    for i in range(100):
        hub.publish("t", b"e%d" % i)  # 90 of them dropped again by retention
    await hub.sync()
    assert store.write_threads, "nothing was written"
    assert threading.get_ident() not in store.write_threads  # never on the loop's thread
    assert len(store.write_threads) <= 3  # a burst is a few commits, not 190
    again = EventHub(Retention(max_events=10), journal=StoreJournal(SQLiteStore(store.path)))
    assert [e.seq for e in again.poll("t", 0).events] == list(range(91, 101))
    assert len(store.list(EVENT_KIND)) == 10
    journal.close()


async def test_a_failing_store_fails_sync_not_the_loop(tmp_path):
    class Broken(SQLiteStore):
        def write_many(self, ops):
            raise OSError("disk full")

    hub = EventHub(journal=StoreJournal(Broken(tmp_path / "gw.db")))
    hub.publish("t", b"x")
    with pytest.raises(JournalError):
        await hub.sync()
    hub.publish("t", b"y")  # the hub goes on; the next sync reports again
    with pytest.raises(JournalError):
        await hub.sync()

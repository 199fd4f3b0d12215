"""The event hub: server-to-client events through the aggregation port (spec 001 Fig. 11).

Internal publishers post events to a *topic*; external clients poll through the
one open port and get "no event" (Fig. 11, 702) or the events after their cursor
(705). Each topic is an append-only log with sequence numbers, so a client that
reconnects with its cursor receives every retained event once: nothing lost,
nothing duplicated. Long polling (a bounded wait for the next event) keeps latency
low without an inbound port (claim 7's repeated request "at a predetermined timing").

:class:`TopicLog` is pure (no clock, no I/O); :class:`EventHub` adds waiting and,
with a journal, keeps the retained events across restarts: a client's cursor stays
valid when the gateway comes back.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger("kakehashi.gateway.events")

TOPIC_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
#: seconds a publisher's Idempotency-Key is remembered, and how many are at most
PUBLISH_KEY_TTL = 300.0
MAX_PUBLISH_KEYS = 100_000


def b64_size(n: int) -> int:
    """Length of the base64 text of ``n`` bytes."""
    return 4 * ((n + 2) // 3)


#: bytes JSON escapes (ensure_ascii off): the short ones take 2 bytes, the rest 6
_ESCAPED = bytes(range(0x20)) + b'"\\'
_SHORT_ESCAPED = b'\b\f\n\r\t"\\'


def json_text_size(data: bytes) -> int:
    """Bytes of ``data`` as a JSON string (quotes included) if it goes as text, else -1.

    A payload goes as text only when it is UTF-8 and escaping leaves it no larger than
    base64 would be: so no event costs more than base64 on the wire (64 KiB of
    ``\\x01`` would be 384 KiB of ``\\u0001`` escapes), and the size of every reply is
    known before it is written. Counted, not encoded: a publish pays two scans.
    """
    n = len(data)
    special = n - len(data.translate(None, _ESCAPED))
    short = n - len(data.translate(None, _SHORT_ESCAPED))
    size = n + 2 + short + 5 * (special - short)
    if size > b64_size(n) + 2:
        return -1
    if not data.isascii():
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return -1
    return size


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    ts: float
    data: bytes
    #: see :func:`json_text_size`; computed once here, not on every poll that sends it
    text_size: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "text_size", json_text_size(self.data))


@dataclass(frozen=True, slots=True)
class Batch:
    """Answer to a poll: events after the cursor, the next cursor, and whether some
    events the client never saw were already dropped by retention (``gap``)."""

    events: tuple[Event, ...]
    cursor: int
    gap: bool = False


@dataclass
class Retention:
    max_events: int = 10_000
    max_age: float = 3600.0
    max_bytes: int = 64 * 1024 * 1024
    max_event: int = 64 * 1024
    max_topics: int = 1024
    max_batch: int = 1000


@dataclass
class TopicLog:
    """One topic: retained events with increasing sequence numbers (first is 1)."""

    retention: Retention = field(default_factory=Retention)
    events: deque[Event] = field(default_factory=deque)
    last_seq: int = 0
    size: int = 0

    def append(self, data: bytes, now: float) -> Event:
        return self.append_dropping(data, now)[0]

    def append_dropping(self, data: bytes, now: float) -> tuple[Event, list[Event]]:
        """Append; also return the events that retention dropped to make room."""
        if len(data) > self.retention.max_event:
            raise ValueError(f"event of {len(data)} bytes exceeds {self.retention.max_event}")
        self.last_seq += 1
        event = Event(self.last_seq, now, data)
        self.events.append(event)
        self.size += len(data)
        return event, self.expire(now)

    def expire(self, now: float) -> list[Event]:
        """Drop what retention no longer keeps; returns the dropped events."""
        r = self.retention
        dropped: list[Event] = []
        while self.events and (
            len(self.events) > r.max_events
            or self.size > r.max_bytes
            or now - self.events[0].ts > r.max_age
        ):
            dropped.append(self.events.popleft())
            self.size -= len(dropped[-1].data)
        return dropped

    def since(self, cursor: int) -> Batch:
        """Events with ``seq > cursor`` (cursor 0: from the oldest retained)."""
        if cursor < 0:
            cursor = max(self.last_seq + cursor + 1, 0)  # -1: only new events
        if cursor >= self.last_seq:
            # a cursor from the future: the hub restarted and numbering began again
            return Batch((), self.last_seq, gap=cursor > self.last_seq)
        first = self.events[0].seq if self.events else self.last_seq + 1
        gap = cursor + 1 < first
        start = max(cursor + 1 - first, 0)
        picked = tuple(itertools.islice(self.events, start, start + self.retention.max_batch))
        return Batch(picked, picked[-1].seq if picked else self.last_seq, gap)


class EventsUnavailable(Exception):
    """Where the events are kept failed (a journal write, a Redis that cannot be
    reached): the endpoint answers 503 and the client tries again."""


class TopicHub(Protocol):
    """What the events endpoint needs of a hub: :class:`EventHub` (this gateway's
    memory, optionally journaled) or ``event_redis.RedisEventHub`` (topics shared by
    several gateways)."""

    retention: Retention

    async def publish_stored(self, topic: str, data: bytes,
                             key: str | None = None) -> Event: ...
    async def wait(self, topic: str, cursor: int, timeout: float) -> Batch: ...
    async def aclose(self) -> None: ...


class EventJournal(Protocol):
    """Where a hub keeps its retained events across restarts (see ``event_journal``).

    ``appended`` and ``dropped`` only take note (they are called on the event loop and
    must not wait for storage); ``sync`` waits until everything noted so far is stored.
    """

    def load(self) -> dict[str, tuple[int, list[Event]]]: ...
    def appended(self, topic: str, event: Event) -> None: ...
    def dropped(self, topic: str, events: list[Event]) -> None: ...
    async def sync(self) -> None: ...


class EventHub:
    """Topics plus long-poll waiters, optionally journaled so a restart keeps them."""

    def __init__(self, retention: Retention | None = None,
                 journal: EventJournal | None = None) -> None:
        self.retention = retention or Retention()
        self.topics: dict[str, TopicLog] = {}
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self.published = 0
        #: (topic, Idempotency-Key) -> the event it made and until when it is kept
        self._keys: OrderedDict[tuple[str, str], tuple[Event, float]] = OrderedDict()
        self.journal = journal
        if journal is not None:
            self._restore(journal)

    def _restore(self, journal: EventJournal) -> None:
        """Continue each topic's numbering, with the events retention still keeps."""
        now = time.time()
        for name, (last_seq, events) in journal.load().items():
            if not TOPIC_RE.match(name) or len(self.topics) >= self.retention.max_topics:
                continue
            log = self.topics[name] = TopicLog(self.retention, last_seq=last_seq)
            for event in sorted(events, key=lambda e: e.seq):
                if event.seq <= last_seq:
                    log.events.append(event)
                    log.size += len(event.data)
            self._drop(name, log.expire(now))

    def _drop(self, topic: str, events: list[Event]) -> None:
        if events and self.journal is not None:
            self.journal.dropped(topic, events)

    def _topic(self, name: str, *, create: bool) -> TopicLog | None:
        if not TOPIC_RE.match(name):
            raise ValueError("topic names are 1-128 of A-Z a-z 0-9 _ . -")
        log = self.topics.get(name)
        if log is None and create:
            if len(self.topics) >= self.retention.max_topics:
                raise ValueError("too many topics")
            log = self.topics[name] = TopicLog(self.retention)
        return log

    def publish(self, topic: str, data: bytes) -> Event:
        log = self._topic(topic, create=True)
        assert log is not None
        event, dropped = log.append_dropping(data, time.time())
        if self.journal is not None:
            self.journal.appended(topic, event)
        self._drop(topic, dropped)
        self.published += 1
        for fut in self._waiters.pop(topic, ()):
            if not fut.done():
                fut.set_result(None)
        return event

    async def sync(self) -> None:
        """Wait until what was published so far is in the journal (if there is one):
        a publisher is told its event was accepted only once it would survive a restart."""
        if self.journal is not None:
            await self.journal.sync()

    async def publish_stored(self, topic: str, data: bytes,
                             key: str | None = None) -> Event:
        """Publish, then wait until the journal has it (what a ``202`` promises).

        ``key`` (the publisher's ``Idempotency-Key``): a publish repeated with the same
        key within :data:`PUBLISH_KEY_TTL` s gets the event the first one made, so a
        publisher that lost an answer may send again without making a duplicate."""
        if key is not None:
            now = time.monotonic()
            while self._keys and next(iter(self._keys.values()))[1] < now:
                self._keys.popitem(last=False)
            done = self._keys.get((topic, key))
            if done is not None:
                await self.sync()
                return done[0]
        event = self.publish(topic, data)
        if key is not None:
            self._keys[(topic, key)] = (event, time.monotonic() + PUBLISH_KEY_TTL)
            if len(self._keys) > MAX_PUBLISH_KEYS:
                self._keys.popitem(last=False)
        await self.sync()
        return event

    async def aclose(self) -> None:
        """Nothing to close (the journal is closed by its owner)."""

    def poll(self, topic: str, cursor: int) -> Batch:
        log = self._topic(topic, create=False)
        if log is None:
            return Batch((), max(cursor, 0))
        self._drop(topic, log.expire(time.time()))
        return log.since(cursor)

    async def wait(self, topic: str, cursor: int, timeout: float) -> Batch:
        """Long poll: return at once if there are events, else wait up to ``timeout``."""
        batch = self.poll(topic, cursor)
        if batch.events or timeout <= 0:
            return batch
        if cursor < 0:  # "only new": pin the cursor now so a publish during the wait counts
            cursor = batch.cursor
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(topic, set())
        waiters.add(fut)
        # the moment a watcher is parked, for operators and for tests that must know it
        log.debug("long poll parked: topic %s after #%d, up to %.1f s", topic, cursor, timeout)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass
        finally:
            waiters.discard(fut)
            if not waiters:
                self._waiters.pop(topic, None)
        return self.poll(topic, cursor)

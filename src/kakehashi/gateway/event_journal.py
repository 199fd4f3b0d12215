"""The event hub's journal in the project's store: retained events outlive a restart.

Claim 7's clients poll with a cursor. If a restart renumbered the topics, every
cursor would point into the future and watchers would see a gap; with the journal
the gateway comes back with the same numbering and the events retention still keeps.

Each event is one document (``topic/seq`` → time and payload), and each topic one
more holding its last sequence number, so the numbering goes on even when every
event of a topic has expired.

Writes never run on the event loop: a SQLite commit can wait for the disk (and for
another process holding the file), which would stall every connection of the
gateway. ``appended``/``dropped`` only queue the change; one writer thread stores
everything queued since its last commit in one transaction (a burst of publishes
costs one commit, not one each), and :meth:`StoreJournal.sync` waits until what was
queued before it is stored: the endpoint answers a publisher's ``202`` after that,
so an event the publisher was told about is in the store.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from concurrent.futures import ThreadPoolExecutor

from kakehashi.core.store import Doc, Store
from kakehashi.gateway.events import Event, EventsUnavailable

log = logging.getLogger("kakehashi.gateway.events")

EVENT_KIND = "gateway-event"
TOPIC_KIND = "gateway-topic"

Op = tuple[str, str, Doc | None]  # (kind, key, document or None to delete)


def _key(topic: str, seq: int) -> str:
    return f"{topic}/{seq:020d}"


class JournalError(EventsUnavailable):
    """Queued changes could not be stored (the store's error is the cause)."""


class StoreJournal:
    """:class:`~kakehashi.gateway.events.EventJournal` over a :class:`Store`.

    Without a running event loop (start-up, tools, tests) changes are written at once.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        #: changes not yet handed to the writer, by (kind, key): a later change of the
        #: same document replaces an earlier one (a topic's last_seq is written once
        #: per batch however many events it got)
        self._pending: dict[tuple[str, str], Doc | None] = {}
        self._queued = 0  # changes queued so far (a running count)
        self._stored = 0  # of those, how many are stored (or failed)
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._thread: ThreadPoolExecutor | None = None
        self.batches = 0  # transactions committed (for tests and curiosity)

    def load(self) -> dict[str, tuple[int, list[Event]]]:
        topics: dict[str, tuple[int, list[Event]]] = {}
        for name, doc in self.store.list(TOPIC_KIND):
            topics[name] = (int(doc.get("last_seq", 0)), [])
        for key, doc in self.store.list(EVENT_KIND):
            topic, _, seq = key.rpartition("/")
            try:
                event = Event(int(seq), float(doc["ts"]), base64.b64decode(doc["data"]))
            except (KeyError, TypeError, ValueError):
                log.warning("skipping a damaged stored event %r", key)
                continue
            last_seq, events = topics.setdefault(topic, (event.seq, []))
            events.append(event)
            if event.seq > last_seq:  # a topic record older than its events
                topics[topic] = (event.seq, events)
        return topics

    def appended(self, topic: str, event: Event) -> None:
        self._queue([(EVENT_KIND, _key(topic, event.seq),
                      {"ts": event.ts, "data": base64.b64encode(event.data).decode()}),
                     (TOPIC_KIND, topic, {"last_seq": event.seq})])

    def dropped(self, topic: str, events: list[Event]) -> None:
        self._queue([(EVENT_KIND, _key(topic, event.seq), None) for event in events])

    def _queue(self, ops: list[Op]) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop to keep responsive: write now
            self._write(ops)
            return
        for kind, key, doc in ops:
            self._pending.pop((kind, key), None)  # re-inserted last: the order of changes
            self._pending[(kind, key)] = doc
        self._queued += len(ops)
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_queued())

    def _write(self, ops: list[Op]) -> None:
        if ops:
            self.store.write_many(ops)
            self.batches += 1

    async def _write_queued(self) -> None:
        """Store what is queued, batch after batch, in the writer thread."""
        loop = asyncio.get_running_loop()
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="event-journal")
        while self._pending:
            batch, self._pending = self._pending, {}
            upto = self._queued
            error: BaseException | None = None
            try:
                await loop.run_in_executor(
                    self._thread, self._write, [(k, key, d) for (k, key), d in batch.items()])
            except Exception as exc:  # the store failed (disk full, locked too long...)
                log.error("events: %d journal changes not stored: %s", len(batch), exc)
                error = exc
            self._stored = upto
            self._wake(error)

    def _wake(self, error: BaseException | None) -> None:
        still = []
        for mark, fut in self._waiters:
            if mark > self._stored:
                still.append((mark, fut))
            elif not fut.done():
                if error is None:
                    fut.set_result(None)
                else:
                    exc = JournalError(f"not stored: {error}")
                    exc.__cause__ = error
                    fut.set_exception(exc)
        self._waiters = still

    async def sync(self) -> None:
        """Wait until every change queued before this call is stored; JournalError if
        the store failed to take them."""
        if self._stored >= self._queued:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((self._queued, fut))
        await fut

    def close(self) -> None:
        """Store what is still queued (at shutdown, after the loop has stopped)."""
        if self._thread is not None:  # a batch in the writer thread goes first
            self._thread.shutdown(wait=True)
            self._thread = None
        if self._pending:
            batch, self._pending = self._pending, {}
            self._write([(k, key, d) for (k, key), d in batch.items()])
            self._stored = self._queued

"""The event hub's journal in the project's store: retained events outlive a restart.

Claim 7's clients poll with a cursor. If a restart renumbered the topics, every
cursor would point into the future and watchers would see a gap; with the journal
the gateway comes back with the same numbering and the events retention still keeps.

Each event is one document (``topic/seq`` → time and payload), and each topic one
more holding its last sequence number, so the numbering goes on even when every
event of a topic has expired. Writes happen on publish (not on a timer): an event
the publisher was told about is in the store.
"""

from __future__ import annotations

import base64
import logging

from kakehashi.core.store import Store
from kakehashi.gateway.events import Event

log = logging.getLogger("kakehashi.gateway.events")

EVENT_KIND = "gateway-event"
TOPIC_KIND = "gateway-topic"


def _key(topic: str, seq: int) -> str:
    return f"{topic}/{seq:020d}"


class StoreJournal:
    """:class:`~kakehashi.gateway.events.EventJournal` over a :class:`Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store

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
        self.store.put(EVENT_KIND, _key(topic, event.seq),
                       {"ts": event.ts, "data": base64.b64encode(event.data).decode()})
        self.store.put(TOPIC_KIND, topic, {"last_seq": event.seq})

    def dropped(self, topic: str, events: list[Event]) -> None:
        for event in events:
            self.store.delete(EVENT_KIND, _key(topic, event.seq))

"""The poll reply's wire form, both directions, without I/O (spec 001 Fig. 11, 705).

A ``200`` poll reply is one JSON document, the documented shape::

    {"cursor": 7, "gap": false, "events": [{"seq": 6, "ts": 1.5, "data": "text"},
                                           {"seq": 7, "ts": 1.6, "data_b64": "AAE="}]}

Each event's payload goes as ``data`` (UTF-8 text, JSON-escaped) when that is no
larger than base64, else as ``data_b64``: a 64 KiB binary event costs about 87 KiB,
never the 6x of ``\\u0001`` escapes. Because every event's size is known before it is
encoded (:func:`event_size`), the server can

* pick the events that fit a byte limit (the client's ``max_bytes``, capped by the
  server) and say with the cursor where the next poll continues, so no reply is ever
  larger than the client accepts and a watcher always makes progress; and
* send ``Content-Length`` first and then encode the events one at a time as the
  client reads them, instead of building the whole reply in memory.

:func:`parse_reply` is the client's side: it accepts exactly this shape and raises
:class:`EventReplyError` for anything else.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from typing import Any

from kakehashi.gateway.events import Batch, Event, b64_size

SEP = b", "
SUFFIX = b"]}"


class EventReplyError(ValueError):
    """A poll reply that is not the documented shape."""


def _event_head(event: Event) -> bytes:
    ts = event.ts if math.isfinite(event.ts) else 0.0  # a damaged store must not break JSON
    key = b"data" if event.text_size >= 0 else b"data_b64"
    return b'{"seq": %d, "ts": %s, "%s": ' % (event.seq, repr(ts).encode(), key)


def event_size(event: Event) -> int:
    """Bytes :func:`encode_event` will produce, computed without encoding."""
    payload = event.text_size if event.text_size >= 0 else b64_size(len(event.data)) + 2
    return len(_event_head(event)) + payload + 1


def encode_event(event: Event) -> bytes:
    """One event as a JSON object (exactly :func:`event_size` bytes)."""
    if event.text_size >= 0:
        payload = encode_basestring(event.data.decode("utf-8")).encode("utf-8")
    else:
        payload = b'"' + base64.b64encode(event.data) + b'"'
    return _event_head(event) + payload + b"}"


def _prefix(cursor: int, gap: bool) -> bytes:
    return b'{"cursor": %d, "gap": %s, "events": [' % (cursor, b"true" if gap else b"false")


@dataclass(frozen=True, slots=True)
class Reply:
    """What one ``200`` reply carries: its events, the cursor to continue from, and
    the exact size of the body (for Content-Length)."""

    events: tuple[Event, ...]
    cursor: int
    gap: bool
    size: int

    @property
    def prefix(self) -> bytes:
        return _prefix(self.cursor, self.gap)

    def encode(self) -> bytes:
        """The whole body at once (tests and small replies; the server streams it)."""
        return self.prefix + SEP.join(encode_event(e) for e in self.events) + SUFFIX


def plan_reply(batch: Batch, max_bytes: int) -> Reply:
    """The events of ``batch`` that fit ``max_bytes`` (in order; always at least one,
    so a watcher goes on even when one event alone is larger than its limit)."""
    assert batch.events, "an empty batch is a 204, not a reply"
    size = len(_prefix(batch.cursor, batch.gap)) + len(SUFFIX)  # the widest cursor
    taken = 0
    for event in batch.events:
        n = event_size(event) + (len(SEP) if taken else 0)
        if taken and size + n > max_bytes:
            break
        size += n
        taken += 1
    events = batch.events[:taken]
    cursor = events[-1].seq
    size -= len(_prefix(batch.cursor, batch.gap)) - len(_prefix(cursor, batch.gap))
    return Reply(events, cursor, batch.gap, size)


# -- the client's side -------------------------------------------------------------
def _int(value: Any, what: str, minimum: int) -> int:
    if type(value) is not int or value < minimum:
        raise EventReplyError(f"{what} must be an integer >= {minimum}")
    return value


def _check_event(event: Any) -> int:
    if not isinstance(event, dict):
        raise EventReplyError("an event must be an object")
    seq = _int(event.get("seq"), "seq", 1)
    ts = event.get("ts", 0.0)
    if type(ts) not in (int, float) or not math.isfinite(ts):
        raise EventReplyError("ts must be a number")
    text, b64 = event.get("data"), event.get("data_b64")
    if (text is None) == (b64 is None):
        raise EventReplyError("an event has either data or data_b64")
    if not isinstance(text if b64 is None else b64, str):
        raise EventReplyError("data and data_b64 are strings")
    if text is not None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise EventReplyError("data is not valid text (a lone surrogate)") from None
    else:
        try:
            base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise EventReplyError("data_b64 is not base64") from None
    return seq


def parse_reply(body: bytes) -> tuple[list[dict], int, bool]:
    """A ``200`` poll reply's events (as sent: dicts with seq, ts and data or
    data_b64), its cursor and its gap flag. Events come in order, none after the cursor."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise EventReplyError("the event reply is not JSON") from None
    if not isinstance(doc, dict):
        raise EventReplyError("the event reply is not an object")
    cursor = _int(doc.get("cursor"), "cursor", 0)
    gap = doc.get("gap", False)
    events = doc.get("events")
    if not isinstance(gap, bool) or not isinstance(events, list):
        raise EventReplyError("gap must be true or false and events a list")
    last = 0
    for event in events:
        seq = _check_event(event)
        if seq <= last or seq > cursor:
            raise EventReplyError("events must be in order and not after the cursor")
        last = seq
    return events, cursor, gap


def event_data(event: dict) -> bytes:
    """The payload of an event from :func:`parse_reply`."""
    if "data_b64" in event:
        return base64.b64decode(event["data_b64"])
    return str(event["data"]).encode("utf-8")

"""The poll reply codec (``gateway.event_wire``) under generated input.

Server side: for any payloads and any byte limit, the reply is exactly the size
announced (Content-Length is computed before encoding), fits the limit unless one
event alone does not, continues with the right cursor, and no event costs more than
base64. Client side: whatever bytes arrive, ``parse_reply`` returns the documented
shape or raises ``EventReplyError``, nothing else.
"""

from __future__ import annotations

import json

from hypothesis import example, given, settings
from hypothesis import strategies as st

from kakehashi.gateway.event_wire import (
    EventReplyError,
    encode_event,
    event_data,
    event_size,
    parse_reply,
    plan_reply,
)
from kakehashi.gateway.events import Batch, Event, b64_size

FAST = settings(max_examples=400, deadline=None)

payloads = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b"\x01" * 999, b'"\\' * 50, "日本語".encode(), b"\xff\xfe"]),
)


@FAST
@given(st.lists(payloads, min_size=1, max_size=20), st.integers(1, 20_000),
       st.integers(0, 10**9), st.booleans(),
       st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_replies_are_the_announced_size_fit_the_limit_and_round_trip(
        datas, limit, first, gap, ts):
    events = tuple(Event(first + i + 1, ts, d) for i, d in enumerate(datas))
    reply = plan_reply(Batch(events, events[-1].seq, gap), limit)
    body = reply.encode()
    assert len(body) == reply.size
    assert reply.size <= limit or len(reply.events) == 1
    assert reply.events == events[:len(reply.events)]  # a prefix, in order
    got, cursor, got_gap = parse_reply(body)
    assert cursor == reply.cursor == reply.events[-1].seq and got_gap == gap
    assert [event_data(e) for e in got] == [e.data for e in reply.events]
    assert json.loads(body) == {"cursor": cursor, "gap": gap, "events": got}
    for event in reply.events:
        encoded = encode_event(event)
        assert len(encoded) == event_size(event)
        assert len(encoded) <= b64_size(len(event.data)) + 80  # never the 6x of escapes


@FAST
@given(st.binary(max_size=2000))
@example(b"[" * 100_000)  # deep nesting must be a clean error too
@example(b'{"cursor": 1, "gap": false, "events": [{"seq": 1, "data": "\\ud800"}]}')
@example(b'{"cursor": 1, "events": [{"seq": 1, "data": "x", "data_b64": "eA=="}]}')
def test_the_client_parser_rejects_garbage_cleanly(body):
    try:
        events, cursor, gap = parse_reply(body)
    except EventReplyError:
        return
    assert isinstance(cursor, int) and isinstance(gap, bool)
    for event in events:
        event_data(event)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["cursor", "gap", "events", "seq", "ts", "data", "data_b64", "x"]),
        inner, max_size=5),
    max_leaves=25)


@FAST
@given(st.integers(-2, 10), st.one_of(st.booleans(), json_values),
       st.lists(st.dictionaries(st.sampled_from(["seq", "ts", "data", "data_b64", "x"]),
                                json_values | st.integers(0, 12) | st.text(max_size=8),
                                max_size=5), max_size=5))
def test_the_client_parser_on_near_miss_documents(cursor, gap, events):
    body = json.dumps({"cursor": cursor, "gap": gap, "events": events}).encode()
    try:
        got, got_cursor, _ = parse_reply(body)
    except EventReplyError:
        return
    seqs = [e["seq"] for e in got]
    assert seqs == sorted(set(seqs)) and all(0 < s <= got_cursor for s in seqs)
    for event in got:
        assert isinstance(event_data(event), bytes)

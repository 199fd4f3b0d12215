"""Hostile input to the on-demand system's parsers: control-channel messages, the relay
link's dial, and what people type (durations, targets, ranges, tables). Each either
yields a valid value or raises its one clear error type, never anything else."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from kakehashi.core import wire
from kakehashi.ondemand import grants as g
from kakehashi.ondemand import messages as m

FAST = settings(max_examples=150, deadline=None)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=20)
tags = st.sampled_from(["hello", "ack", "request", "event", "load", "welcome", "open",
                        "update", "close", "reply", "refused", "nope"])


@FAST
@given(st.dictionaries(st.text(max_size=12), json_values, max_size=8), tags)
def test_control_messages_are_valid_or_a_protocol_error(fields, tag):
    text = json.dumps({**fields, "type": tag})
    for decode in (m.decode_to_manager, m.decode_to_relay):
        try:
            msg = decode(text)
        except m.ProtocolError:
            continue
        assert m.decode_to_manager(m.encode(msg)) == msg or \
            m.decode_to_relay(m.encode(msg)) == msg


@FAST
@given(st.binary(max_size=200))
def test_control_message_bytes(data):
    for decode in (m.decode_to_manager, m.decode_to_relay):
        try:
            decode(data)
        except m.ProtocolError:
            pass


def test_a_huge_control_message_is_refused_before_parsing():
    try:
        m.decode_to_manager("x" * (m.MAX_MESSAGE + 1))
    except m.ProtocolError as exc:
        assert "too large" in str(exc)
    else:
        raise AssertionError("accepted")


@FAST
@given(st.binary(max_size=300))
def test_link_frames(data):
    dec = wire.FrameDecoder(m.LINK_LIMITS)
    try:
        dec.feed(data)
        for frame in dec.frames():
            if frame.type is wire.FrameType.CTRL:
                m.link_codec.decode(frame.payload)
    except wire.WireError:
        pass


@FAST
@given(st.text(max_size=40))
def test_typed_values(text):
    for parse in (g.parse_duration, g.parse_target, g.parse_port_range, g.parse_cidr,
                  g.check_imsi, lambda t: g.parse_table([t], "--region")):
        try:
            parse(text)
        except g.GrantError as exc:
            assert exc.code and exc.message

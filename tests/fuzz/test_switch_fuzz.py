"""Hostile input to the socket switch's parsers and decisions: link bodies (bytes, and
well-framed msgpack of any shape), and any sequence of stream messages from any
gateway into the switch table. Each body either decodes or raises the one
ProtocolError; the switch table never raises and never counts a connection twice."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from kakehashi.core import wire
from kakehashi.switch import messages as m
from kakehashi.switch import tunnels as tn

FAST = settings(max_examples=200, deadline=None)

values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=16)
    | st.binary(max_size=32),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=16)
tags = st.sampled_from(["hello", "welcome", "refused", "setup", "delete", "done", "error",
                        "open", "data", "eof", "reset", "credit", "nope"])


@FAST
@given(st.binary(max_size=300))
def test_raw_bodies_decode_or_are_a_protocol_error(body):
    for decode in (m.decode_to_server, m.decode_to_gateway):
        try:
            decode(body)
        except m.ProtocolError:
            pass


@FAST
@given(st.lists(st.tuples(st.dictionaries(st.text(max_size=10), values, max_size=6), tags),
                max_size=4))
def test_framed_messages_of_any_shape(items):
    body = b""
    for fields, tag in items:
        payload = msgspec.msgpack.encode({**fields, "type": tag})
        body += wire.encode_frame(wire.FrameType.CTRL, payload)
    for decode in (m.decode_to_server, m.decode_to_gateway):
        try:
            msgs = decode(body)
        except m.ProtocolError:
            continue
        assert decode(m.encode_many(msgs)) == msgs


tunnel_ids = st.sampled_from(["t1", "t2", "tforged"])
gateways = st.sampled_from(["gw-a", "gw-b", "gw-x"])
stream_ids = st.integers(1, 4)
stream_msgs = st.one_of(
    st.builds(m.Open, tunnel=tunnel_ids, stream=stream_ids),
    st.builds(m.Data, tunnel=tunnel_ids, stream=stream_ids,
              data=st.binary(max_size=8) | st.just(b"x" * m.MAX_CHUNK)),
    st.builds(m.Eof, tunnel=tunnel_ids, stream=stream_ids),
    st.builds(m.Reset, tunnel=tunnel_ids, stream=stream_ids),
    st.builds(m.Credit, tunnel=tunnel_ids, stream=stream_ids, n=st.integers(1, 2**20)),
)


@FAST
@given(st.lists(st.tuples(gateways, stream_msgs), max_size=60), st.booleans())
def test_switch_table_under_any_sequence(events, lose_b):
    sw = tn.Switch(window=2 * m.MAX_CHUNK)
    for gw, user in (("gw-a", "alice"), ("gw-b", "asp1"), ("gw-x", "mallory")):
        sw.gateway_hello(gw, user, [], 0)
    sw.register(tn.Service(name="svc", owner="asp1", gateway="gw-b", target="h:1",
                           allow=["alice"], max_connections=3), "asp")
    for tid in ("t1", "t2"):
        t, actions = sw.open_tunnel("alice", "user", "svc", "gw-a", "127.0.0.1:0", 0, tid=tid)
        for a in actions:
            if isinstance(a, tn.Send) and isinstance(a.msg, m.Setup):
                sw.on_done(a.gateway, m.Done(req=a.msg.req, tunnel=tid, ok=True), 0)
        assert t.state is tn.State.ESTABLISHED
    for i, (gw, msg) in enumerate(events):
        if lose_b and i == len(events) // 2:
            sw.gateway_lost("gw-b", 1)
        for a in sw.on_stream(gw, msg):
            if isinstance(a, tn.Send):
                assert a.gateway in ("gw-a", "gw-b", "gw-x")
                if a.gateway == "gw-x":  # mallory's gateway only ever hears refusals
                    assert isinstance(a.msg, m.Error)
        live = sum(len(t.streams) for t in sw.tunnels.values())
        assert sw.live.get("svc", 0) == live <= 3
        for t in sw.tunnels.values():
            for rec in t.streams.values():
                assert 0 <= rec.inflight_ab <= t.window and 0 <= rec.inflight_ba <= t.window

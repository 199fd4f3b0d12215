"""Hostile bytes on a chain control connection: only WireError, never anything else."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from kakehashi.chain import messages as m
from kakehashi.core import wire
from kakehashi.core.crypto import ControlChannel, ControlError


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_decode_of_random_payloads(data):
    try:
        m.codec.decode(data)
    except wire.WireError:
        pass


values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.text(max_size=80)
    | st.binary(max_size=70),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=6),
    max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["challenge", "answer", "proof", "request", "reply", "extend",
                        "refused", "relay", "sealed", "bogus"]),
       st.dictionaries(st.sampled_from(["hop", "nonce", "id", "mac", "rid", "server",
                                        "requester", "user", "mode", "encrypt", "via",
                                        "origin", "near", "far", "complete", "path",
                                        "challenge", "max_payload", "reason", "text",
                                        "body", "data"]), values, max_size=10))
def test_decode_of_near_miss_messages(tag, fields):
    try:
        payload = msgspec.msgpack.encode({"type": tag, **fields})
    except (OverflowError, TypeError):
        return
    try:
        msg = m.codec.decode(payload)
    except wire.WireError:
        return
    assert len(m.codec.encode(msg)) <= m.LIMITS.max_ctrl + wire.HEADER_SIZE


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_frame_decoder_with_chain_limits(data):
    dec = wire.FrameDecoder(m.LIMITS, expect_preamble=True)
    dec.feed(data)
    try:
        for frame in dec.frames():
            assert len(frame.payload) <= m.LIMITS.max_ctrl
            try:
                m.codec.decode(frame.payload)
            except wire.WireError:
                pass
    except wire.WireError:
        pass


KEY = bytes(range(32))


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=m.MAX_MESSAGE + 40), st.booleans())
def test_unseal_of_hostile_sealed_messages(data, genuine):
    """What a relaying proxy or a man in the middle puts in a Sealed: a refusal
    (ControlError: altered or forged; WireError: not one message, or nested), nothing else.
    ``genuine``: random bytes sealed with the right key (only the decoding can fail)."""
    send, recv = ControlChannel(KEY, KEY[::-1]), ControlChannel(KEY[::-1], KEY)
    blob = send.seal(data) if genuine else data
    try:
        sealed = m.codec.decode(m.codec.encode(m.Sealed(blob))[wire.HEADER_SIZE:])
    except (wire.WireError, msgspec.ValidationError):
        return  # too short or too long for a Sealed: refused by the schema
    assert isinstance(sealed, m.Sealed)
    try:
        msg = m.unseal(recv, sealed)
    except (ControlError, wire.WireError):
        return
    assert genuine and not isinstance(msg, m.Sealed)

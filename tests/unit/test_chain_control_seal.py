"""Control messages after authentication are sealed (core.crypto.ControlChannel).

Both ends of a MutualAuth derive the same channel; an altered, replayed, reordered,
dropped or reflected message is refused, and after a refusal nothing more is accepted.
"""

from __future__ import annotations

import os

import pytest

from kakehashi.chain import messages as m
from kakehashi.chain.setup import HOP_PURPOSE
from kakehashi.core.crypto import ControlChannel, ControlError, MutualAuth

KEY = os.urandom(32)


def pair() -> tuple[ControlChannel, ControlChannel]:
    r = MutualAuth("responder", "fw2", {"fw1": KEY}, HOP_PURPOSE)
    i = MutualAuth("initiator", "fw1", {"fw2": KEY}, HOP_PURPOSE)
    peer, nonce = r.challenge()
    a = i.answer(peer, nonce)
    i.check_proof(r.check_answer(*a))
    return ControlChannel.after(i), ControlChannel.after(r)


def msg(rid: int = 7) -> bytes:
    return m.codec.encode(m.Extend(rid))[4:]


def test_sealed_messages_pass_in_both_directions_in_order():
    i, r = pair()
    for n in range(3):
        assert r.open(i.seal(msg(n))) == msg(n)
        assert i.open(r.seal(msg(n + 10))) == msg(n + 10)


def test_tampered_message_is_refused_and_the_channel_stays_broken():
    i, r = pair()
    sealed = bytearray(i.seal(msg()))
    sealed[-1] ^= 1
    with pytest.raises(ControlError, match="integrity"):
        r.open(bytes(sealed))
    with pytest.raises(ControlError):
        r.open(i.seal(msg()))


def test_replayed_message_is_refused():
    i, r = pair()
    sealed = i.seal(msg())
    r.open(sealed)
    with pytest.raises(ControlError):
        r.open(sealed)


def test_reordered_or_dropped_message_is_refused():
    i, r = pair()
    _first, second = i.seal(msg(1)), i.seal(msg(2))
    with pytest.raises(ControlError):
        r.open(second)
    i, r = pair()
    i.seal(msg(1))  # dropped on the way
    with pytest.raises(ControlError):
        r.open(i.seal(msg(2)))


def test_reflected_message_is_refused():
    i, _r = pair()
    sealed = i.seal(msg())
    with pytest.raises(ControlError):
        i.open(sealed)  # sent back to its sender


def test_plaintext_or_other_version_after_authentication_is_refused():
    i, r = pair()
    with pytest.raises(ControlError, match="not a sealed"):
        r.open(msg())
    i, r = pair()
    with pytest.raises(ControlError):
        r.open(b"\x02" + i.seal(msg())[1:])


def test_channels_of_other_exchanges_do_not_open_each_other():
    i, _ = pair()
    _, r2 = pair()
    with pytest.raises(ControlError):
        r2.open(i.seal(msg()))

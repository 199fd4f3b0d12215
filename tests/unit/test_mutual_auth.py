"""Mutual challenge-response (ISO/IEC 9798-4 style) and the datagram AEAD channel."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kakehashi.core import crypto
from kakehashi.core.crypto import AuthFailed, DatagramChannel, MutualAuth
from tests.support.aead_paths import PATHS, batch_path, use_path

K = os.urandom(32)
P = b"test"


def pair(r_keys=None, i_keys=None, purpose_r=P, purpose_i=P):
    r = MutualAuth("responder", "fw1", {"alice": K} if r_keys is None else r_keys, purpose_r)
    i = MutualAuth("initiator", "alice", {"fw1": K} if i_keys is None else i_keys, purpose_i)
    return r, i


def test_both_sides_authenticate_and_agree_on_directional_keys():
    r, i = pair()
    proof = r.check_answer(*i.answer(*r.challenge()))
    i.check_proof(proof)
    assert r.done and i.done and r.peer_id == "alice" and i.peer_id == "fw1"
    i_send, i_recv = i.session_keys()
    r_send, r_recv = r.session_keys()
    assert (i_send, i_recv) == (r_recv, r_send) and i_send != i_recv


def test_wrong_key_is_refused_by_the_verifier():
    r, i = pair(i_keys={"fw1": os.urandom(32)})
    with pytest.raises(AuthFailed, match="alice"):
        r.check_answer(*i.answer(*r.challenge()))
    assert not r.done


def test_unknown_id_is_refused_like_a_wrong_key():
    r, _ = pair()
    i = MutualAuth("initiator", "mallory", {"fw1": K}, P)
    with pytest.raises(AuthFailed, match="wrong key or unknown ID"):
        r.check_answer(*i.answer(*r.challenge()))


def test_initiator_without_key_for_the_challenger_says_so():
    r = MutualAuth("responder", "fw9", {}, P)
    i = MutualAuth("initiator", "alice", {"fw1": K}, P)
    with pytest.raises(AuthFailed, match="no shared key for 'fw9'"):
        i.answer(*r.challenge())


def test_verifier_that_lacks_the_key_cannot_forge_a_proof():
    r, i = pair(r_keys={"alice": os.urandom(32)})
    answer = i.answer(*r.challenge())
    with pytest.raises(AuthFailed):
        r.check_answer(*answer)
    with pytest.raises(AuthFailed):
        i.check_proof(os.urandom(32))


def test_replayed_answer_fails_against_a_fresh_challenge():
    r1, i1 = pair()
    answer = i1.answer(*r1.challenge())
    r1.check_answer(*answer)
    r2, _ = pair()
    with pytest.raises(AuthFailed):
        r2.check_answer(*answer)  # recorded answer, new nonce


def test_reflection_of_the_proof_as_an_answer_fails():
    """An attacker who opens a second session to the client cannot make it answer for
    the attacker: the direction label and identity order differ."""
    r, i = pair()
    _, n_r = r.challenge()
    _, n_i, mac_i = i.answer("fw1", n_r)
    proof = r.check_answer("alice", n_i, mac_i)
    r2 = MutualAuth("responder", "fw1", {"alice": K}, P)
    # send the responder's own proof back to it as if it were an answer
    with pytest.raises(AuthFailed):
        r2.check_answer("alice", n_i, proof)


def test_reflecting_the_challenge_nonce_is_refused():
    """Mallory relays the proxy's challenge to the proxy itself (the proxy holds a key
    for the name 'fw1' too, e.g. symmetric pairs) - an answer carrying N_R is refused."""
    r = MutualAuth("responder", "fw1", {"fw1": K}, P)
    _, n_r = r.challenge()
    i = MutualAuth("initiator", "fw1", {"fw1": K}, P)
    i._nonce = n_r  # the reflected nonce
    with pytest.raises(AuthFailed, match="reflects"):
        r.check_answer(*i.answer("fw1", n_r))


def test_purpose_binds_the_exchange():
    r, i = pair(purpose_i=b"other")
    with pytest.raises(AuthFailed):
        r.check_answer(*i.answer(*r.challenge()))


def test_second_answer_is_refused():
    r, i = pair()
    answer = i.answer(*r.challenge())
    r.check_answer(*answer)
    with pytest.raises(AuthFailed, match="already"):
        r.check_answer(*answer)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=70), st.binary(max_size=40), st.binary(max_size=40))
def test_hostile_answers_never_authenticate(peer_id, nonce, mac):
    r, _ = pair()
    r.challenge()
    with pytest.raises(AuthFailed):
        r.check_answer(peer_id, nonce, mac)


def test_shared_keys_round_trip_and_bad_ones_are_explained():
    text = crypto.new_shared_key()
    assert len(crypto.parse_shared_key(text)) == 32
    with pytest.raises(ValueError, match="base64"):
        crypto.parse_shared_key("not base64!")
    with pytest.raises(ValueError, match="at least 16"):
        crypto.parse_shared_key("YWJj")


# -- datagram channel -----------------------------------------------------------------
def channels():
    a, b = os.urandom(32), os.urandom(32)
    return DatagramChannel(a, b), DatagramChannel(b, a)


def test_channel_round_trip_with_overhead():
    c, s = channels()
    sealed = c.seal(b"x" * 100)
    assert len(sealed) == 100 + crypto.DATAGRAM_OVERHEAD
    assert s.open(sealed) == b"x" * 100
    assert c.open(s.seal(b"back")) == b"back"


def test_channel_refuses_replays_tampering_and_short_input():
    c, s = channels()
    sealed = c.seal(b"hello")
    assert s.open(sealed) == b"hello"
    assert s.open(sealed) is None  # replay
    bad = bytearray(c.seal(b"hello"))
    bad[-1] ^= 1
    assert s.open(bytes(bad)) is None
    assert s.open(b"short") is None
    assert s.refused == 3


def test_channel_accepts_reordering_within_the_window_once():
    c, s = channels()
    msgs = [c.seal(bytes([i])) for i in range(50)]
    order = list(range(50))[::-1]
    assert [s.open(msgs[i]) for i in order] == [bytes([i]) for i in order]
    assert all(s.open(msgs[i]) is None for i in range(50))


def test_channel_refuses_what_fell_out_of_the_window():
    c, s = channels()
    old = c.seal(b"old")
    for _ in range(crypto._WINDOW + 1):
        s.open(c.seal(b"n"))
    assert s.open(old) is None


def test_channel_failed_open_does_not_move_the_window():
    c, s = channels()
    forged = (2**40).to_bytes(8, "big") + os.urandom(30)
    assert s.open(forged) is None
    assert s.open(c.seal(b"ok")) == b"ok"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_channel_open_of_garbage_is_refused(data):
    _, s = channels()
    assert s.open(data) is None


# -- the batch forms (what the forwarder's fast path calls) -----------------------------
#: the batch tests run on every batch path: C, the strided Python form, the Python loop
def _batch(way, datagrams: list[bytes]) -> list[bytes | None]:
    """``datagrams`` through ``way.batch`` in one call, laid out as a batched receive
    holds them (fixed slots), the outputs back to back."""
    slot = 70000
    src = bytearray(slot * len(datagrams))
    for i, d in enumerate(datagrams):
        src[i * slot:i * slot + len(d)] = d
    out = memoryview(bytearray(sum(len(d) + 24 for d in datagrams) + 8))
    sizes = way.batch(src, range(0, slot * len(datagrams), slot),
                      [len(d) for d in datagrams], len(datagrams), out, 8)
    got: list[bytes | None] = []
    at = 8
    for k in sizes:
        got.append(None if k < 0 else out[at:at + k].tobytes())
        at += max(k, 0)
    return got


def _open_both(one: DatagramChannel, many: DatagramChannel, wire: list[bytes],
               chunks: list[int]) -> tuple[DatagramChannel, DatagramChannel]:
    """``wire`` opened one at a time by ``one`` and in batches of ``chunks`` sizes (in
    turn) by ``many``: the same outputs and the same refusals counted."""
    expected = [one.open(d) for d in wire]
    got: list[bytes | None] = []
    at, c = 0, 0
    while at < len(wire):
        k = chunks[c % len(chunks)]
        got += _batch(many.open, wire[at:at + k])
        at, c = at + k, c + 1
    assert got == expected
    assert many.refused == one.refused
    return one, many


@PATHS
def test_a_sealed_batch_is_what_sealing_one_at_a_time_gives(path):
    a, b = os.urandom(32), os.urandom(32)
    one, many = DatagramChannel(a, b), DatagramChannel(a, b)
    with batch_path(path):
        for sizes in ((0, 1, 512, 512, 1400, 9000), (512,) * 20, (0, 0, 0), (1400,) * 64):
            msgs = [os.urandom(n) for n in sizes]
            assert _batch(many.seal, msgs) == [one.seal(m) for m in msgs]
        assert many.seal(b"next") == one.seal(b"next")  # the sequence went on alike


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1100), st.sampled_from(["ok", "tamper", "short"])),
                max_size=60),
       st.lists(st.integers(1, 20), min_size=1, max_size=8))
@PATHS
def test_opening_a_batch_decides_as_opening_one_at_a_time(path, order, chunks):
    """Replays (within one batch too), reordering, datagrams older than the window,
    tampered and short ones: opening them in batches of any size refuses and accepts
    exactly what opening them one at a time does, and counts the same refusals."""
    a, b = os.urandom(32), os.urandom(32)
    sender = DatagramChannel(a, b)
    sealed = [sender.seal(b"m%d" % i) for i in range(1101)]
    wire = []
    for i, how in order:
        d = sealed[i]
        if how == "tamper":
            d = d[:-1] + bytes([d[-1] ^ 1])
        elif how == "short":
            d = d[:crypto.DATAGRAM_OVERHEAD - 1]
        wire.append(d)
    with batch_path(path):
        _open_both(DatagramChannel(b, a), DatagramChannel(b, a), wire, chunks)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=8),
       st.sets(st.integers(0, 119), max_size=6),
       st.lists(st.integers(0, 119), max_size=4))
@PATHS
def test_in_order_batches_with_forgeries_decide_as_one_at_a_time(path, chunks, tampered,
                                                                again):
    """Batches whose datagrams are each the next in order (a sender's burst: what the
    fast form of ``open_batch`` takes), some altered in flight, then some repeated: each
    authentic one is accepted once, every altered or repeated one refused and counted,
    and the window ends where opening them one at a time leaves it."""
    a, b = os.urandom(32), os.urandom(32)
    sender = DatagramChannel(a, b)
    wire = [sender.seal(b"d%d" % i * 30) for i in range(120)]
    for i in tampered:
        wire[i] = wire[i][:-1] + bytes([wire[i][-1] ^ 1])
    wire += [wire[i] for i in again]
    with batch_path(path):
        one, many = _open_both(DatagramChannel(b, a), DatagramChannel(b, a), wire, chunks)
    assert (many._top, many._seen) == (one._top, one._seen)
    assert many.seal(b"x") == one.seal(b"x")  # (the send side is untouched)


@PATHS
def test_an_in_order_batch_takes_the_window_as_one_at_a_time_does(path, monkeypatch):
    """A burst of datagrams each the next in order, the fifth altered: the others are
    accepted, the fifth refused, and afterwards a replay of any of them is refused while
    the authentic fifth (never accepted) still is accepted once."""
    use_path(monkeypatch, path)
    c, s = channels()
    sealed = [c.seal(b"%d" % i) for i in range(10)]
    forged = sealed[4][:-1] + bytes([sealed[4][-1] ^ 1])
    assert _batch(s.open, [*sealed[:4], forged, *sealed[5:]]) == [
        b"%d" % i if i != 4 else None for i in range(10)]
    assert s.refused == 1
    assert _batch(s.open, [sealed[2], sealed[9], sealed[4], sealed[4]]) == [
        None, None, b"4", None]
    assert s.refused == 4


def _run(datagrams: list[bytes]) -> tuple[bytearray, list[int]]:
    """``datagrams`` back to back in one buffer, with their starts as a list: a
    coalesced run as a receive-offload socket delivers it and the batch cuts it."""
    buf = bytearray(b"".join(datagrams))
    starts, at = [], 0
    for d in datagrams:
        starts.append(at)
        at += len(d)
    return buf, starts


@PATHS
def test_a_coalesced_run_opens_and_seals_as_one_at_a_time(path, monkeypatch):
    """Runs of sealed datagrams back to back (list starts, the stride of their size):
    in order, then with a gap, a forgery and a replay inside a run; opened as runs they
    decide as one at a time, window included; plaintexts sealed from such a run are
    what sealing them one at a time gives."""
    use_path(monkeypatch, path)
    a, b = os.urandom(32), os.urandom(32)
    sender, one, many = DatagramChannel(a, b), DatagramChannel(b, a), DatagramChannel(b, a)
    sealed = [sender.seal(b"p%03d" % i * 8) for i in range(100)]
    forged = sealed[45][:-1] + bytes([sealed[45][-1] ^ 1])
    runs = [sealed[:20], sealed[20:40], sealed[41:44] + [forged] + sealed[46:50],
            sealed[50:60] + [sealed[55]], sealed[60:100], sealed[40:41] + sealed[45:46]]
    for run in runs:
        buf, starts = _run(run)
        out = memoryview(bytearray(len(buf)))
        sizes = many.open.batch(buf, starts, [len(d) for d in run], len(run), out, 0)
        got, at = [], 0
        for k in sizes:
            got.append(None if k < 0 else out[at:at + k].tobytes())
            at += max(k, 0)
        assert got == [one.open(d) for d in run]
    assert (many._top, many._seen, many.refused) == (one._top, one._seen, one.refused)
    plain = [b"q%02d" % i * 40 for i in range(30)]
    s1, s2 = DatagramChannel(a, b), DatagramChannel(a, b)
    buf, starts = _run(plain)
    out = memoryview(bytearray(len(buf) + 24 * len(plain)))
    sizes = s2.seal.batch(buf, starts, [len(p) for p in plain], len(plain), out, 0)
    assert sizes == [len(plain[0]) + 24] * len(plain)
    assert out.tobytes() == b"".join(s1.seal(p) for p in plain)


@PATHS
def test_runs_in_several_slots_and_rewritten_heads_decide_as_one_at_a_time(path,
                                                                          monkeypatch):
    """Two coalesced runs taken by one receive (each in its own slot: starts that are
    not one stride) seal and open as one at a time; so does an in-order run in which one
    datagram's sequence number (outside the AEAD) was rewritten to a later one: refused,
    as opening it under the number it carries fails."""
    use_path(monkeypatch, path)
    a, b = os.urandom(32), os.urandom(32)
    slot = 10000
    starts = [0, 400, 800, slot, slot + 400, slot + 800, slot + 1200]
    plain = [(b"%d" % i * 400)[:400] for i in range(7)]
    src = bytearray(2 * slot)
    for at, p in zip(starts, plain, strict=True):
        src[at:at + 400] = p
    s1, s2 = DatagramChannel(a, b), DatagramChannel(a, b)
    out = memoryview(bytearray(7 * 424))
    assert s2.seal.batch(src, starts, [400] * 7, 7, out, 0) == [424] * 7
    wire = [s1.seal(p) for p in plain]
    assert out.tobytes() == b"".join(wire)
    one, many = DatagramChannel(b, a), DatagramChannel(b, a)
    sealed = bytearray(2 * slot)
    starts = [0, 424, 848, slot, slot + 424, slot + 848, slot + 1272]
    for at, d in zip(starts, wire, strict=True):
        sealed[at:at + 424] = d
    got = many.open.batch(sealed, starts, [424] * 7, 7, memoryview(bytearray(7 * 400)), 0)
    assert got == [400] * 7 and [one.open(d) for d in wire] == plain
    more = [s1.seal(b"m%d" % i * 50) for i in range(6)]
    bad = bytearray(more[2])
    bad[:8] = (int.from_bytes(bad[:8], "big") + 3).to_bytes(8, "big")
    run = [*more[:2], bytes(bad), *more[3:]]
    buf, at = _run(run)
    got = many.open.batch(buf, at, [len(d) for d in run], len(run),
                          memoryview(bytearray(len(buf))), 0)
    assert got == [len(d) - 24 if one.open(d) is not None else -1 for d in run]
    assert got[2] == -1
    assert (many._top, many._seen, many.refused) == (one._top, one._seen, one.refused)


def test_strided_views_follow_the_buffer_and_its_contents():
    """The views a burst is sealed and opened through are made once per layout: they
    must still read the buffer given (another buffer with the same layout, or new
    contents in the same one), never what an earlier burst held."""
    a, b = os.urandom(32), os.urandom(32)
    seal, check = DatagramChannel(a, b), DatagramChannel(a, b)
    first = [bytes([1]) * 300] * 8
    second = [bytes([2]) * 300] * 8
    for msgs in (first, second):  # a new buffer each time (_batch makes one)
        assert _batch(seal.seal, msgs) == [check.seal(m) for m in msgs]
    buf = bytearray(b"".join(first))  # one buffer, rewritten between bursts
    starts = list(range(0, len(buf), 300))
    for msgs in (first, second):
        buf[:] = b"".join(msgs)
        out = memoryview(bytearray(8 * 324))
        seal.seal.batch(buf, starts, [300] * 8, 8, out, 0)
        assert out.tobytes() == b"".join(check.seal(m) for m in msgs)
    buf[:] = b"".join(first)  # a longer burst in a layout used before for a shorter one
    for n in (3, 8):
        out = memoryview(bytearray(8 * 324))
        assert seal.seal.batch(buf, starts, [300] * n, n, out, 0) == [324] * n
        assert out[:n * 324].tobytes() == b"".join(check.seal(m) for m in first[:n])


def test_a_burst_takes_the_strided_form(monkeypatch):
    """With crypto.STRIDED on, a burst of one size is sealed and opened through views
    made once (the form the sealing ends' figures depend on), not the loop."""
    calls = []
    real = crypto._strided

    def spy(*args):
        calls.append(args[1:4])
        return real(*args)

    monkeypatch.setattr(crypto, "_strided", spy)
    monkeypatch.setattr(crypto, "STRIDED", True)
    monkeypatch.setattr(crypto, "NATIVE", False)
    c, s = channels()
    msgs = [os.urandom(512) for _ in range(16)]
    sealed = _batch(c.seal, msgs)
    assert len(calls) == 2
    assert _batch(s.open, sealed) == msgs
    assert len(calls) == 4

"""The C batch path of :class:`DatagramChannel` (``kakehashi.core._dgaead``) against the
Python one (the reference), on hostile batches: forged tags, rewritten sequence numbers,
replays within and across batches, reordering, datagrams older than the window,
truncated and odd-sized ones, garbage, and layouts that point outside the buffers.
Both must give the same sizes, the same plaintexts, the same window and the same count
of refusals; a layout outside the buffers must be a ValueError in C, never a read or a
write beyond them."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kakehashi.core import crypto
from kakehashi.core.crypto import DATAGRAM_OVERHEAD, DatagramChannel
from tests.support.aead_paths import batch_path

pytestmark = pytest.mark.skipif(crypto._dgaead is None, reason="_dgaead is not built")

FAST = settings(max_examples=300, deadline=None)
A, B = os.urandom(32), os.urandom(32)

#: what happens to a sealed datagram on the way
HOW = st.sampled_from(["ok", "ok", "ok", "tag", "body", "head", "cut", "short", "empty",
                       "garbage", "extend"])


def _mangle(d: bytes, how: str, rnd: int) -> bytes:
    """``d`` as a hostile network leaves it (``rnd``: a random number for the details)."""
    if how == "tag":
        return d[:-1] + bytes([d[-1] ^ (1 + rnd % 255)])
    if how == "body" and len(d) > DATAGRAM_OVERHEAD:
        at = 8 + rnd % (len(d) - DATAGRAM_OVERHEAD)
        return d[:at] + bytes([d[at] ^ 0x80]) + d[at + 1:]
    if how == "head":  # another sequence number (outside the AEAD)
        seq = (int.from_bytes(d[:8], "big") + 1 + rnd % 2000) % 2**64
        return seq.to_bytes(8, "big") + d[8:]
    if how == "cut":
        return d[:rnd % len(d)]
    if how == "short":
        return d[:DATAGRAM_OVERHEAD - 1 - rnd % DATAGRAM_OVERHEAD]
    if how == "empty":
        return b""
    if how == "garbage":
        return os.urandom(rnd % 80)
    if how == "extend":
        return d + bytes(1 + rnd % 5)
    return d


def _layout(datagrams: list[bytes], gaps: list[int]) -> tuple[bytearray, list[int]]:
    """The datagrams in one buffer with ``gaps`` (in turn) between them: fixed slots,
    coalesced runs and odd offsets alike."""
    buf, starts = bytearray(), []
    for i, d in enumerate(datagrams):
        buf += bytes(gaps[i % len(gaps)])
        starts.append(len(buf))
        buf += d
    return buf, starts


def _open(ch: DatagramChannel, path: str, buf: bytearray, starts, lengths, n: int,
          at: int) -> tuple[list[int], list[bytes]]:
    out = memoryview(bytearray(at + sum(lengths[:n]) + 1))
    with batch_path(path):
        sizes = ch.open.batch(buf, starts, lengths, n, out, at)
    got, pos = [], at
    for k in sizes:
        got.append(b"" if k < 0 else out[pos:pos + k].tobytes())
        pos += max(k, 0)
    return sizes, got


@FAST
@given(st.lists(st.tuples(st.integers(0, 1300), HOW, st.integers(0, 2**16)), max_size=80),
       st.lists(st.integers(1, 40), min_size=1, max_size=6),
       st.lists(st.integers(0, 9), min_size=1, max_size=4),
       st.integers(0, 7),
       st.sampled_from([0, 2**63, 2**64 - 1400]))
def test_native_open_decides_as_the_python_paths(order, chunks, gaps, at, first_seq):
    """Twin receivers, one on C and one on each Python path, take the same hostile
    batches: every batch gives the same sizes and plaintexts, and after every batch the
    window and the refusals agree (so a divergence cannot hide behind a later one)."""
    sender = DatagramChannel(A, B)
    sender._send_seq = first_seq
    sealed = [sender.seal(b"%d" % i * (i % 7)) for i in range(1301)]
    wire = [_mangle(sealed[i], how, rnd) for i, how, rnd in order]
    native = DatagramChannel(B, A)
    refs = {"strided": DatagramChannel(B, A), "loop": DatagramChannel(B, A)}
    pos, c = 0, 0
    while pos < len(wire):
        batch = wire[pos:pos + chunks[c % len(chunks)]]
        pos, c = pos + len(batch), c + 1
        buf, starts = _layout(batch, gaps)
        lengths = [len(d) for d in batch]
        want = _open(native, "native", buf, starts, lengths, len(batch), at)
        for path, ref in refs.items():
            assert _open(ref, path, buf, starts, lengths, len(batch), at) == want
            assert (ref._top, ref._seen, ref.refused) == \
                (native._top, native._seen, native.refused)


@FAST
@given(st.lists(st.integers(0, 1500), max_size=70),
       st.lists(st.integers(0, 9), min_size=1, max_size=4),
       st.integers(0, 7), st.integers(0, 2**64 - 200))
def test_native_seal_is_byte_for_byte_the_python_paths(sizes, gaps, at, first_seq):
    """Batches of any sizes (zero, odd, mixed, one size at a stride) in any layout seal
    to the same bytes in C as in Python, and the sequence goes on alike."""
    plain = [os.urandom(k) for k in sizes]
    buf, starts = _layout(plain, gaps)
    outs = []
    for path in ("native", "strided", "loop"):
        ch = DatagramChannel(A, B)
        ch._send_seq = first_seq
        out = memoryview(bytearray(at + sum(sizes) + DATAGRAM_OVERHEAD * len(sizes)))
        with batch_path(path):
            got = ch.seal.batch(buf, starts, sizes, len(sizes), out, at)
        outs.append((got, out.tobytes(), ch._send_seq, ch.seal(b"after")))
    assert outs[0] == outs[1] == outs[2]


@FAST
@given(st.integers(0, 300), st.lists(st.tuples(st.integers(-5, 400), st.integers(-5, 400)),
                                     max_size=12),
       st.integers(-3, 20), st.integers(-2, 400), st.integers(0, 400))
def test_native_layout_outside_the_buffers_is_refused_not_read(src_len, layout, n, at,
                                                              out_len):
    """Starts, lengths, counts and output offsets that do not fit the buffers: C raises
    ValueError and changes nothing (window, refusals), or, where they do fit, works as
    the Python loop does; it never reads or writes outside (the interpreter would crash
    or the bytes beyond ``out`` change)."""
    src = bytearray(os.urandom(src_len))
    starts = [s for s, _ in layout]
    lengths = [k for _, k in layout]
    fits = (0 <= n <= len(layout) and 0 <= at <= out_len
            and all(s >= 0 and k >= 0 and s + k <= src_len for s, k in layout[:n]))
    guard = os.urandom(64)
    for way in ("seal", "open"):
        ch = DatagramChannel(A, B)
        ch._top, ch._seen = 5, 0b1011
        room = bytearray(out_len) + bytearray(guard)
        out = memoryview(room)[:out_len]
        before = (ch._top, ch._seen, ch.refused)
        with batch_path("native"):
            try:
                fn = ch.seal.batch if way == "seal" else ch.open.batch
                sizes = fn(src, starts, lengths, n, out, at)
            except ValueError:
                assert (ch._top, ch._seen, ch.refused) == before
                if fits:  # only an output too small may refuse a layout that fits
                    need = sum(lengths[:n]) + DATAGRAM_OVERHEAD * n if way == "seal" else \
                        sum(max(0, k - DATAGRAM_OVERHEAD) for k in lengths[:n])
                    assert at + need > out_len
            else:
                assert fits and len(sizes) == n
        assert room[out_len:] == guard


"""The link's multiplexing: credit windows and the fair outbox."""

from __future__ import annotations

from kakehashi.switch import messages as m
from kakehashi.switch.mux import (
    LINK_BODY,
    QUANTUM,
    LinkPacer,
    Outbox,
    RecvWindow,
    SendWindow,
    link_body,
)


def test_send_window_takes_only_what_is_granted() -> None:
    w = SendWindow(100)
    assert w.take(60) == 60 and w.take(60) == 40 and w.take(1) == 0
    w.credit(10)
    assert w.take(60) == 10


def test_recv_window_returns_credit_in_quarter_steps() -> None:
    r = RecvWindow(400)
    assert r.received(400)
    assert not r.received(1)  # an overrun is reported
    r = RecvWindow(400)
    r.received(400)
    assert r.consumed(50) == 0 and r.consumed(50) == 100
    assert r.outstanding == 300


def frames_of(body: bytes) -> list:
    return m.decode_to_gateway(body)


def test_outbox_control_first_then_data_by_quantum() -> None:
    """Each turn a stream may send a quantum of bytes: 10 KiB chunks of a busy stream
    leave one, then two per turn; the other stream's byte goes in between."""
    box = Outbox(quantum=16 * 1024)
    for i in range(3):
        box.put(m.Data(tunnel="t", stream=1, data=bytes([i]) * 10240))
    box.put(m.Data(tunnel="t", stream=2, data=b"b"))
    box.put(m.Credit(tunnel="t", stream=1, n=5))
    got = frames_of(box.take(1 << 20))
    assert isinstance(got[0], m.Credit)
    assert [(x.stream, x.data[:1]) for x in got[1:]] == [
        (1, b"\x00"), (2, b"b"), (1, b"\x01"), (1, b"\x02")]
    assert not box and box.bytes == 0 and len(box) == 0


def test_a_bulk_stream_cannot_hold_the_link() -> None:
    """An interactive chunk queued behind 100 bulk chunks leaves first."""
    box = Outbox()
    big = b"x" * m.MAX_CHUNK
    for _ in range(100):
        box.put(m.Data(tunnel="t", stream=1, data=big))
    box.put(m.Data(tunnel="t", stream=3, data=b"ping"))
    first = frames_of(box.take(m.MAX_CHUNK + 200))
    assert [x.stream for x in first] == [3, 1]


def test_a_small_frame_does_not_wait_behind_busy_streams_chunks() -> None:
    """8 busy streams with their windows queued: a ping that comes while they are
    served leaves at the head of the next body, not after a chunk of each (which
    would be more than one body)."""
    box = Outbox()
    big = b"x" * m.MAX_CHUNK
    for sid in range(1, 9):
        for _ in range(8):
            box.put(m.Data(tunnel="t", stream=sid, data=big))
    for _ in range(3):
        box.take(LINK_BODY)
    box.put(m.Data(tunnel="t", stream=99, data=b"ping"))
    body = frames_of(box.take(LINK_BODY))
    assert body[0].stream == 99


def test_a_bulk_stream_back_from_idle_does_not_jump_the_queue() -> None:
    """A bulk stream whose queue ran dry (waiting for credit) comes back with a whole
    chunk: as a new stream it is served first only if that chunk fits its quantum."""
    box = Outbox()
    big = b"x" * m.MAX_CHUNK
    box.put(m.Data(tunnel="t", stream=1, data=big))
    box.put(m.Data(tunnel="t", stream=2, data=b"ping"))
    assert [x.stream for x in frames_of(box.take(1 << 20))] == [2, 1]


def test_busy_streams_share_the_link_by_bytes() -> None:
    """Two busy streams, one with 64 KiB chunks, one with 1 KiB ones: over a run of
    bodies each gets about half the bytes (not half the chunks)."""
    box = Outbox()
    for _ in range(40):
        box.put(m.Data(tunnel="t", stream=1, data=b"x" * m.MAX_CHUNK))
    for _ in range(3000):
        box.put(m.Data(tunnel="t", stream=2, data=b"y" * 1024))
    sent = {1: 0, 2: 0}
    for _ in range(10):
        for x in frames_of(box.take(LINK_BODY)):
            sent[x.stream] += len(x.data)
    assert 0.8 < sent[1] / sent[2] < 1.25, sent


def test_eof_waits_behind_its_streams_data() -> None:
    box = Outbox()
    box.put(m.Data(tunnel="t", stream=1, data=b"x"))
    box.put(m.Eof(tunnel="t", stream=1))
    box.put(m.Reset(tunnel="t", stream=2))
    got = frames_of(box.take(1 << 20))
    assert [type(x) for x in got] == [m.Reset, m.Data, m.Eof]


def test_dropping_a_stream_forgets_its_data() -> None:
    box = Outbox()
    box.put(m.Data(tunnel="t", stream=1, data=b"x" * 100))
    box.put(m.Data(tunnel="t", stream=2, data=b"y"))
    box.drop(("t", 1))
    assert [x.stream for x in frames_of(box.take(1 << 20))] == [2]
    assert box.bytes == 0


# -- the link window -------------------------------------------------------------------------
def test_link_window_grows_while_bodies_do_not_queue() -> None:
    p = LinkPacer(floor=256 * 1024, cap=4 << 20, target=0.005)
    now = 0.0
    for _ in range(40):  # acknowledged after 1 ms each: the path is empty
        p.sent(128 * 1024, now)
        now += 0.001
        assert p.acked(p.sent_total, now)
    assert p.window == 4 << 20 and p.inflight == 0 and p.room == 4 << 20


def test_link_window_shrinks_when_bodies_queue_but_not_below_the_floor() -> None:
    p = LinkPacer(floor=1 << 20, cap=16 << 20, target=0.005)
    p.window = 4 << 20
    p.sent(1000, 0.0)
    p.acked(1000, 0.001)  # the fastest round trip: 1 ms
    p.sent(1000, 1.0)
    p.sent(1000, 1.0)
    w = p.window
    p.acked(2000, 1.050)  # 50 ms: 49 ms of queue
    assert p.window == w * 3 // 4
    p.acked(3000, 1.051)  # within the same round trip: one cut per round trip
    assert p.window == w * 3 // 4
    for i in range(8):  # still queueing, a round trip apart (within the epoch)
        p.sent(1000, 2.0 + i)
        p.acked(p.sent_total, 2.05 + i)
    assert p.window == p.floor


def test_after_the_first_queueing_the_window_grows_by_a_body_per_round_trip() -> None:
    """Slow start ends at the first cut: from then on the window creeps up by about
    one body per round trip instead of doubling (which overshot by a window's worth
    of queue before each cut)."""
    p = LinkPacer(floor=256 * 1024, cap=64 << 20, target=0.005)
    now = 0.0
    p.sent(1000, now)
    p.acked(1000, now + 0.001)  # the fastest round trip: 1 ms
    while p.slow_start:  # doubling until bodies queue (50 ms here)
        now += 1.0
        p.sent(p.window, now)
        rtt = 0.001 if p.window < 4 << 20 else 0.05
        p.acked(p.sent_total, now + rtt)
    cut = p.window
    assert cut < 4 << 20 and p.window >= (4 << 20) * 3 // 4
    for _ in range(10):  # ten round trips without queueing: ten bodies more
        now += 1.0
        p.sent(p.window, now)
        p.acked(p.sent_total, now + 0.001)
    assert 9 * LINK_BODY <= p.window - cut <= 11 * LINK_BODY


def test_a_slower_path_is_learnt_not_punished_for_ever() -> None:
    """The fastest round trip is remembered for an epoch only: after the path gets
    slower for good, the window grows again."""
    p = LinkPacer(floor=64 * 1024, cap=16 << 20, target=0.005)
    p.sent(1000, 0.0)
    p.acked(1000, 0.001)
    t = 1.0
    while t < 40:  # 80 ms from now on
        p.sent(64 * 1024, t)
        p.acked(p.sent_total, t + 0.08)
        t += 0.1
    low = p.window
    for _ in range(20):
        p.sent(64 * 1024, t)
        p.acked(p.sent_total, t + 0.08)
        t += 0.1
    assert p.base_rtt > 0.07 and p.window > low


def test_an_ack_of_bytes_never_sent_is_refused() -> None:
    p = LinkPacer()
    p.sent(100, 0.0)
    assert not p.acked(101, 0.1)
    assert p.acked(100, 0.1) and p.acked(50, 0.2) and p.inflight == 0  # old: ignored


def test_a_full_window_holds_data_but_not_control() -> None:
    box = Outbox()
    box.put(m.Data(tunnel="t", stream=1, data=b"x" * 100))
    box.put(m.Credit(tunnel="t", stream=2, n=7))
    got = frames_of(box.take(LINK_BODY, data=False))
    assert got == [m.Credit(tunnel="t", stream=2, n=7)] and box and not box.control
    assert [x.stream for x in frames_of(box.take(LINK_BODY))] == [1]


def test_acknowledgements_waiting_are_folded_into_the_newest() -> None:
    box = Outbox()
    box.put(m.Ack(n=100))
    box.put(m.Data(tunnel="t", stream=1, data=b"x"))
    box.put(m.Ack(n=250))
    assert len(box) == 2 and box.control
    assert [type(x) for x in frames_of(box.take(LINK_BODY, data=False))] == [m.Ack]
    box.put(m.Ack(n=300))
    got = frames_of(box.take(LINK_BODY))
    assert got == [m.Ack(n=300), m.Data(tunnel="t", stream=1, data=b"x")]
    assert not box and box.bytes == 0


# -- sparse streams and the link window ------------------------------------------------------
def full_link(streams: int = 8) -> tuple[Outbox, LinkPacer]:
    """An outbox with busy streams queued and a link window that is full."""
    box, pacer = Outbox(), LinkPacer(floor=256 * 1024)
    big = b"x" * m.MAX_CHUNK
    for sid in range(1, streams + 1):
        for _ in range(8):
            box.put(m.Data(tunnel="t", stream=sid, data=big))
    now = 0.0
    while pacer.room > 0:
        body, _ = link_body(box, pacer, now)
        assert body
    return box, pacer


def test_a_sparse_streams_frame_does_not_wait_for_the_link_window() -> None:
    """The window is full of bulk data: an interactive byte still leaves at once (it
    would otherwise wait a round trip for an acknowledgement), the bulk data does not."""
    box, pacer = full_link()
    assert link_body(box, pacer, 0.1) == (b"", False)  # bulk waits for an ack
    box.put(m.Data(tunnel="t", stream=99, data=b"p"))
    body, more = link_body(box, pacer, 0.1)
    assert [(x.stream, x.data) for x in frames_of(body)] == [(99, b"p")]
    assert not more  # and the bulk data waits again
    pacer.acked(pacer.sent_total, 0.2)
    assert box.pending(pacer.room)
    assert {x.stream for x in frames_of(link_body(box, pacer, 0.2)[0])} <= set(range(1, 9))


def test_sparse_streams_overdraw_the_window_by_at_most_a_quantum() -> None:
    """Many streams each with a small frame (or one stream sending small frames, each
    one leaving before the next comes) cannot bypass the window for good: past a
    quantum beyond it, they wait for an acknowledgement like the bulk data."""
    box, pacer = full_link(streams=1)
    sent = 0
    for sid in range(100, 200):
        box.put(m.Data(tunnel="t", stream=sid, data=b"s" * 1000))
        sent += len(link_body(box, pacer, 0.1)[0])
    assert 0 < sent < QUANTUM + 1100
    assert -QUANTUM - 1100 < pacer.room <= -QUANTUM
    assert len(box) > 50 and not box.pending(pacer.room)


def test_a_body_with_a_sparse_frame_carries_no_bulk_data() -> None:
    """The interactive frame travels in a body of its own (with the control messages
    waiting): the far end need not read (and pass on) a body of bulk first."""
    box = Outbox()
    for _ in range(4):
        box.put(m.Data(tunnel="t", stream=1, data=b"x" * m.MAX_CHUNK))
    box.take(LINK_BODY)  # stream 1 is busy now
    box.put(m.Credit(tunnel="t", stream=5, n=9))
    box.put(m.Data(tunnel="t", stream=2, data=b"p"))
    body, more = link_body(box, None, 0.0)
    assert [type(x) for x in frames_of(body)] == [m.Credit, m.Data]
    assert more
    assert [x.stream for x in frames_of(link_body(box, None, 0.0)[0])] == [1, 1]


def test_a_long_poll_body_still_carries_everything() -> None:
    """A long-poll body costs a request: there the sparse frame rides with the bulk."""
    box = Outbox()
    for _ in range(4):
        box.put(m.Data(tunnel="t", stream=1, data=b"x" * m.MAX_CHUNK))
    box.take(LINK_BODY)
    box.put(m.Data(tunnel="t", stream=2, data=b"p"))
    assert [x.stream for x in frames_of(box.take(1 << 20))] == [2, 1, 1]


def test_a_few_ms_of_queue_on_a_short_path_shrink_the_window() -> None:
    """Each link hop's queue is CPU time its far end spends on bulk data before an
    echo's frame gets through, and an echo crosses four hops: on a loopback path 3 ms
    of queue per hop is too much (the old aim of 5 ms let the window grow on)."""
    p = LinkPacer()
    p.window = 4 << 20
    p.slow_start = False
    p.sent(1000, 0.0)
    p.acked(1000, 0.0005)  # the fastest round trip: 0.5 ms
    w = p.window
    p.sent(128 * 1024, 1.0)
    assert p.acked(p.sent_total, 1.0035)  # 3 ms of queue
    assert p.window == w * 3 // 4


def test_a_long_paths_jitter_is_not_taken_for_a_queue() -> None:
    """On a 40 ms path a few ms either way are the path's own jitter: the aim there is
    a share of the round trip, so the window still grows."""
    p = LinkPacer()
    p.sent(1000, 0.0)
    p.acked(1000, 0.040)
    t = 1.0
    for i in range(30):
        p.sent(p.window, t)
        p.acked(p.sent_total, t + 0.040 + 0.008 * (i % 2))  # 0 or 8 ms late
        t += 0.1
    assert p.window >= 8 << 20 and p.slow_start


def test_the_data_fast_encoding_is_the_codecs_own() -> None:
    import os

    for tunnel in ("a", "t" * 32):
        for sid in (1, 127, 128, 65535, 65536, 2**31):
            prefix = m.data_prefix(tunnel, sid)
            for n in (0, 1, 255, 256, 65535, m.MAX_CHUNK):
                payload = os.urandom(n)
                assert m.encode_data(prefix, memoryview(payload)) == m.encode(
                    m.Data(tunnel=tunnel, stream=sid, data=payload))

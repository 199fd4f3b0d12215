"""The link's multiplexing: credit windows and the fair outbox."""

from __future__ import annotations

from kakehashi.switch import messages as m
from kakehashi.switch.mux import Outbox, RecvWindow, SendWindow


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


def test_outbox_control_first_then_data_round_robin() -> None:
    box = Outbox()
    for i in range(3):
        box.put(m.Data(tunnel="t", stream=1, data=b"a" * 10 + bytes([i])))
    box.put(m.Data(tunnel="t", stream=2, data=b"b"))
    box.put(m.Credit(tunnel="t", stream=1, n=5))
    got = frames_of(box.take(1 << 20))
    assert isinstance(got[0], m.Credit)
    assert [(x.stream, len(x.data)) for x in got[1:]] == [(1, 11), (2, 1), (1, 11), (1, 11)]
    assert not box and box.bytes == 0


def test_a_bulk_stream_cannot_hold_the_link() -> None:
    """An interactive chunk queued behind 100 bulk chunks leaves in the first batch."""
    box = Outbox()
    big = b"x" * m.MAX_CHUNK
    for _ in range(100):
        box.put(m.Data(tunnel="t", stream=1, data=big))
    box.put(m.Data(tunnel="t", stream=3, data=b"ping"))
    first = frames_of(box.take(m.MAX_CHUNK + 200))
    assert [x.stream for x in first] == [1, 3]


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

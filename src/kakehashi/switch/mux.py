"""A gateway link's multiplexing, sans-IO: per-stream credit and a fair outbox.

One link carries every stream of every tunnel of a gateway, so two things decide
whether an interactive stream stays responsive beside a bulk one:

* **credit** (:class:`SendWindow`, :class:`RecvWindow`): a sender may have at most
  ``window`` bytes that its receiver has not yet written to its socket; the receiver
  returns credit (a :class:`~.messages.Credit`) in quarter-window steps as it writes.
  Memory per stream is bounded on both gateways and on the server, and a slow
  reader slows only its own stream;
* **the outbox** (:class:`Outbox`): control messages (instructions, reports, opens,
  resets, credit) go first; data chunks (and a stream's Eof, behind its data) wait per
  stream and leave by deficit round robin with a small byte quantum
  (:data:`QUANTUM`), a stream that had nothing waiting being served before the busy
  ones (the sparse-flow rule of fq_codel, RFC 8290). A bulk stream's 64 KiB chunks
  need several turns' quanta to leave, while an interactive stream's few bytes leave
  on their first turn: a small frame waits for at most one quantum per busy stream on
  average (never more than one chunk each), not for the bulk streams' windows.

The outbox is the only place where a link's traffic can be reordered: whatever has
left it (a body being written, the kernel's buffers at both ends, a body being
decoded at the far end) is first in, first out, and a frame behind it waits for every
byte of it. So on a WebSocket link the sender keeps that small: bodies of at most
:data:`LINK_BODY`, and at most a **link window** of bytes not yet acknowledged by the
receiver (:class:`LinkPacer`: :class:`~.messages.Ack` says how much it took off the
link). The window adapts to the path by delay (as TCP Vegas and LEDBAT do): it grows
while a body's acknowledgement comes back within :data:`QUEUE_TARGET` (a quarter of
the round trip on a long path) of the fastest one lately - doubling per round trip
until bodies first queue, then by one body per round trip - and shrinks by a quarter
(at most once a round trip) when bodies queue - so a long fat path gets a large window
and a loaded loopback a small one, instead of the megabytes that the kernel's buffers
would otherwise hold in front of an interactive frame. Control messages (credit,
acknowledgements, instructions) are never held back by the window, so neither side
can wait for the other forever.

The sparse-flow rule reaches past the outbox too (:func:`link_body`): a sparse
stream's frames are not held back by a full window either (they may overdraw it by
at most a quantum in all, so many small streams cannot bypass it for good), and they
leave in a body of their own, so the far end reads and passes them on without first
taking a body of bulk data off the link. What is left in front of them is what
already left: the window.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable
from typing import Any

from kakehashi.switch import messages as m


class SendWindow:
    """How much a stream may still send: starts at the peer's window, shrinks as data
    is sent, grows with each Credit."""

    def __init__(self, initial: int) -> None:
        self.available = initial

    def take(self, want: int) -> int:
        n = max(0, min(want, self.available))
        self.available -= n
        return n

    def credit(self, n: int) -> None:
        self.available += n


class RecvWindow:
    """The receiving side: counts bytes written to the socket and says when to return
    credit (at least a quarter window at a time, so credit costs few messages)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.outstanding = 0  # received, not yet credited back
        self._consumed = 0

    def received(self, n: int) -> bool:
        """Account ``n`` received bytes; False if the sender overran the window."""
        self.outstanding += n
        return self.outstanding <= self.window

    def consumed(self, n: int) -> int:
        """``n`` bytes were written out; returns the credit to send now (0: not yet)."""
        self._consumed += n
        if self._consumed >= max(1, self.window // 4):
            give, self._consumed = self._consumed, 0
            self.outstanding -= give
            return give
        return 0


#: bytes a busy stream may send per round-robin turn (a chunk of MAX_CHUNK needs several
#: turns; a frame of an interactive stream fits in one)
QUANTUM = 16 * 1024
#: the largest body a WebSocket link writer takes at once: small, so that a frame the
#: outbox would put first does not queue behind much that already left it (a long-poll
#: link takes larger bodies: each costs an HTTP request)
LINK_BODY = 2 * (m.MAX_CHUNK + 512)  # two whole chunks


#: the link window's bounds and the queueing delay it aims for: at least
#: QUEUE_TARGET, on a long path a share of its fastest round trip (a path of 40 ms
#: jitters by more than 2 ms without any queue of ours). An echo crosses four link
#: hops; each hop's queue is also CPU time its far end spends on bulk data before the
#: echo's frame, so the aim is low: on a loaded 2-core loopback 2 ms against 5 ms
#: took the echo beside 8 bulk streams from p50 16 to 11 ms at the same bulk rate
LINK_WINDOW_FLOOR = 256 * 1024
LINK_WINDOW_CAP = 16 * 1024 * 1024
QUEUE_TARGET = 0.002
QUEUE_RTT_SHARE = 0.25
#: an idle receiver acknowledges once this much came since its last ack (one that has
#: something to send anyway acknowledges every body: the ack rides along). Below the
#: floor, so a sender whose window is full always gets one
ACK_EVERY = LINK_WINDOW_FLOOR * 3 // 4
#: how long the fastest round trip seen is remembered (a path can get slower)
BASE_RTT_EPOCH = 10.0


class LinkPacer:
    """The sender's side of link flow control (see the module docstring).

    ``sent(n, now)`` for each body written, ``acked(total, now)`` for each
    :class:`~.messages.Ack`; :attr:`room` is how many bytes may be written now.
    """

    def __init__(self, *, floor: int = LINK_WINDOW_FLOOR, cap: int = LINK_WINDOW_CAP,
                 target: float = QUEUE_TARGET) -> None:
        self.floor, self.cap, self.target = floor, cap, target
        self.window = floor
        self.sent_total = 0
        self.acked_total = 0
        self._marks: collections.deque[tuple[int, float]] = collections.deque()
        self.base_rtt = float("inf")
        self._epoch_min = float("inf")
        self._epoch_end = 0.0
        self._hold_until = 0.0
        self.slow_start = True

    @property
    def inflight(self) -> int:
        return self.sent_total - self.acked_total

    @property
    def room(self) -> int:
        return self.window - self.inflight

    def sent(self, n: int, now: float) -> None:
        self.sent_total += n
        self._marks.append((self.sent_total, now))

    def acked(self, total: int, now: float) -> bool:
        """The receiver took ``total`` bytes in all; False if that is more than was
        sent (the peer is broken or lying: the caller ends the link)."""
        if total > self.sent_total:
            return False
        if total <= self.acked_total:
            return True
        n = total - self.acked_total
        self.acked_total = total
        sent_at = None
        while self._marks and self._marks[0][0] <= total:
            sent_at = self._marks.popleft()[1]
        if sent_at is None:
            return True
        rtt = max(0.0, now - sent_at)
        if now >= self._epoch_end:  # forget the fastest of long ago, keep the recent one
            self.base_rtt = min(self._epoch_min, rtt)
            self._epoch_min = rtt
            self._epoch_end = now + BASE_RTT_EPOCH
        else:
            self._epoch_min = min(self._epoch_min, rtt)
            self.base_rtt = min(self.base_rtt, rtt)
        if rtt - self.base_rtt <= max(self.target, self.base_rtt * QUEUE_RTT_SHARE):
            # slow start until bodies first queue (the window about doubles per round
            # trip), then one body more per round trip: doubling again would overshoot
            # the aim by a whole window before the next cut (megabytes in the kernel's
            # buffers on a busy machine, in front of every interactive frame)
            grow = n if self.slow_start else max(1, n * LINK_BODY // self.window)
            self.window = min(self.cap, self.window + grow)
        elif now >= self._hold_until:
            self.slow_start = False
            self.window = max(self.floor, self.window * 3 // 4)
            self._hold_until = now + rtt
        return True


class Outbox:
    """Messages waiting for the link: control first, then data by deficit round robin
    over streams, streams that were idle first (see the module docstring).

    ``take(limit)`` returns encoded frames of at most about ``limit`` bytes (at least
    one message when any waits).
    """

    def __init__(self, quantum: int = QUANTUM) -> None:
        self.quantum = quantum
        self._ctrl: collections.deque[bytes] = collections.deque()
        #: the latest link acknowledgement (cumulative: a newer one replaces it)
        self._ack = b""
        self._data: dict[Hashable, collections.deque[bytes]] = {}
        self._deficit: dict[Hashable, int] = {}
        #: streams that had nothing waiting when their data came (served first), and
        #: the busy ones, each in round-robin order
        self._new: collections.deque[Hashable] = collections.deque()
        self._old: collections.deque[Hashable] = collections.deque()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._ctrl) + bool(self._ack) + sum(len(q) for q in self._data.values())

    def __bool__(self) -> bool:
        return bool(self._ctrl or self._ack or self._data)

    def put(self, msg: Any) -> None:
        # a stream's end waits behind its data; everything else may go ahead
        if isinstance(msg, m.Ack):  # only the newest total matters
            frame = m.encode(msg)
            self.bytes += len(frame) - len(self._ack)
            self._ack = frame
        elif isinstance(msg, (m.Data, m.Eof)):
            self.put_data((msg.tunnel, msg.stream), m.encode(msg))
        else:
            frame = m.encode(msg)
            self._ctrl.append(frame)
            self.bytes += len(frame)

    def put_data(self, key: Hashable, frame: bytes) -> None:
        q = self._data.get(key)
        if q is None:
            q = self._data[key] = collections.deque()
            self._deficit[key] = self.quantum
            self._new.append(key)
        q.append(frame)
        self.bytes += len(frame)

    def queued(self, key: Hashable) -> int:
        q = self._data.get(key)
        return len(q) if q else 0

    def drop(self, key: Hashable) -> None:
        """Forget a stream's waiting data (it was reset)."""
        q = self._data.pop(key, None)
        if q is None:
            return
        self.bytes -= sum(len(f) for f in q)
        del self._deficit[key]
        for turn in (self._new, self._old):
            try:
                turn.remove(key)
            except ValueError:
                continue
            break

    @property
    def control(self) -> bool:
        """Whether a control message waits."""
        return bool(self._ctrl or self._ack)

    def _sparse_waiting(self) -> bool:
        deficit = self._deficit
        return any(deficit[k] >= len(self._data[k][0]) for k in self._new)

    def pending(self, room: int) -> bool:
        """Whether :meth:`take` would return something for a link window with ``room``
        bytes left (see :func:`link_body`): control always, a sparse stream's data while
        the window is overdrawn by less than a quantum, the rest while it has room."""
        if self.control:
            return True
        if not self._data:
            return False
        return room > 0 or (room + self.quantum > 0 and self._sparse_waiting())

    def take(self, limit: int, *, data: bool = True, sparse: int | None = None,
             alone: bool = False) -> bytes:
        """Up to about ``limit`` bytes of frames: control first, then the sparse
        streams' (those that had nothing waiting: up to a quantum each, at most
        ``sparse`` bytes in all - even when ``data`` is False, if given), then - only when ``data``
        (the link window has room) - the busy streams' by deficit round robin. With
        ``alone``, a body that carries sparse data ends after it: it is small, so the
        far end has it (and passes it on) without first reading a body of bulk data."""
        out: list[bytes] = []
        size = 0
        if self._ack:
            out.append(self._ack)
            size += len(self._ack)
            self._ack = b""
        while self._ctrl and (not out or size + len(self._ctrl[0]) <= limit):
            frame = self._ctrl.popleft()
            out.append(frame)
            size += len(frame)
        data_q, deficit, new = self._data, self._deficit, self._new
        budget = (limit if data else 0) if sparse is None else min(limit, sparse)
        taken = 0  # sparse bytes
        while new and taken < budget:
            key = new[0]
            q = data_q[key]
            frame = q[0]
            if deficit[key] < len(frame):  # not sparse: it waits its turn among the busy
                new.popleft()
                deficit[key] += self.quantum
                self._old.append(key)
                continue
            if out and size + len(frame) > limit:
                break
            q.popleft()
            deficit[key] -= len(frame)
            out.append(frame)
            size += len(frame)
            taken += len(frame)
            if not q:  # idle again: its next data counts as new
                new.popleft()
                del data_q[key], deficit[key]
        while data and not (alone and taken) and (new or self._old):
            turn = new if new else self._old
            key = turn[0]
            q = data_q[key]
            frame = q[0]
            if deficit[key] < len(frame):  # its turn is over: a quantum more next time
                turn.popleft()
                deficit[key] += self.quantum
                self._old.append(key)
                continue
            if out and size + len(frame) > limit:
                break
            q.popleft()
            deficit[key] -= len(frame)
            out.append(frame)
            size += len(frame)
            if not q:  # idle again: its next data counts as new
                turn.popleft()
                del data_q[key], deficit[key]
        self.bytes -= size
        return b"".join(out)


def link_body(box: Outbox, pacer: LinkPacer | None, now: float) -> tuple[bytes, bool]:
    """The next body for a WebSocket link (both ends use this) and whether more may be
    sent at once (False: what waits must wait for an acknowledgement, or nothing does).

    At most :data:`LINK_BODY`; control always; the sparse streams' data even when the
    window is full (overdrawing it by at most a quantum: a few bytes of an interactive
    stream need not wait for an acknowledgement, and cannot crowd out the window), and
    alone in its body; the busy streams' data while the window has room."""
    room = LINK_BODY if pacer is None else min(LINK_BODY, pacer.room)
    body = box.take(min(LINK_BODY, room) if room > 0 else LINK_BODY, data=room > 0,
                    sparse=room + box.quantum, alone=True)
    if body and pacer is not None:
        pacer.sent(len(body), now)
        room = pacer.room
    return body, box.pending(room)

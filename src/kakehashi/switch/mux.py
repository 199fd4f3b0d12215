"""A gateway link's multiplexing, sans-IO: per-stream credit and a fair outbox.

One link carries every stream of every tunnel of a gateway, so two things decide
whether an interactive stream stays responsive beside a bulk one:

* **credit** (:class:`SendWindow`, :class:`RecvWindow`): a sender may have at most
  ``window`` bytes that its receiver has not yet written to its socket; the receiver
  returns credit (a :class:`~.messages.Credit`) in quarter-window steps as it writes.
  Memory per stream is bounded on both gateways and on the server, and a slow
  reader slows only its own stream;
* **the outbox** (:class:`Outbox`): control messages (instructions, reports, opens,
  resets, credit) go first; data chunks (and a stream's Eof, behind its data) wait
  per stream and leave round-robin, one chunk per stream per turn, so a stream with
  much to send cannot hold the link for longer than one chunk while another has
  something.
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


class Outbox:
    """Messages waiting for the link: control first, then data round-robin by stream.

    ``take(limit)`` returns encoded frames of at most about ``limit`` bytes (at least
    one message when any waits).
    """

    def __init__(self) -> None:
        self._ctrl: collections.deque[bytes] = collections.deque()
        self._data: dict[Hashable, collections.deque[bytes]] = {}
        self._ready: collections.deque[Hashable] = collections.deque()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._ctrl) + sum(len(q) for q in self._data.values())

    def __bool__(self) -> bool:
        return bool(self._ctrl or self._ready)

    def put(self, msg: Any) -> None:
        # a stream's end waits behind its data; everything else may go ahead
        if isinstance(msg, (m.Data, m.Eof)):
            self.put_data((msg.tunnel, msg.stream), m.encode(msg))
        else:
            frame = m.encode(msg)
            self._ctrl.append(frame)
            self.bytes += len(frame)

    def put_data(self, key: Hashable, frame: bytes) -> None:
        q = self._data.get(key)
        if q is None:
            q = self._data[key] = collections.deque()
        if not q:
            self._ready.append(key)
        q.append(frame)
        self.bytes += len(frame)

    def queued(self, key: Hashable) -> int:
        q = self._data.get(key)
        return len(q) if q else 0

    def drop(self, key: Hashable) -> None:
        """Forget a stream's waiting data (it was reset)."""
        q = self._data.pop(key, None)
        if q:
            self.bytes -= sum(len(f) for f in q)
            try:
                self._ready.remove(key)
            except ValueError:
                pass

    def take(self, limit: int) -> bytes:
        out: list[bytes] = []
        size = 0
        while self._ctrl and (not out or size + len(self._ctrl[0]) <= limit):
            frame = self._ctrl.popleft()
            out.append(frame)
            size += len(frame)
        while self._ready:
            key = self._ready[0]
            q = self._data[key]
            if out and size + len(q[0]) > limit:
                break
            self._ready.popleft()
            frame = q.popleft()
            out.append(frame)
            size += len(frame)
            if q:
                self._ready.append(key)  # its next chunk waits for the others' turn
            else:
                del self._data[key]
        self.bytes -= size
        return b"".join(out)

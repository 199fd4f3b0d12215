"""The one UDP forwarder: two datagram sockets joined by a port record.

A forwarding association has a **near** side (towards the client: the spec's area
3141, the client-side peer) and a **far** side (towards the server: area 3142). A
datagram is relayed only if its source matches the record; everything else is
dropped and counted, never relayed (a firewall's behaviour, spec 004 [0055]).

:class:`PortRecord` is the sans-IO decision (which endpoint, if any, a datagram from a
given source goes to); :class:`DatagramForwarder` is the thin asyncio layer that
drives it from ``DatagramProtocol`` callbacks, with no task per datagram. Optional
transforms per direction (sealing and opening with
:class:`kakehashi.core.crypto.DatagramChannel`) return None to drop.

The near peer is not known in advance when the client sits behind NAT: the record
locks to the first source endpoint seen from the expected host (``lock="first"``), or,
for a local port serving changing applications (each ``dig`` uses a new source port),
follows the latest sender from the expected host (``lock="latest"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import random
import socket
from collections.abc import Callable
from typing import Literal

Addr = tuple[str, int]
Transform = Callable[[bytes], "bytes | None"]

#: bytes a side may hold in user space when the kernel buffer is full; beyond that
#: datagrams are dropped (UDP has no backpressure; memory must not grow)
MAX_WRITE_BUFFER = 1 << 20
SOCKET_BUFFER = 4 << 20


class PortRecord:
    """Where datagrams go: the spec's port information record (3141/3142) as decisions."""

    __slots__ = ("dropped", "expect_host", "far", "from_far_count", "from_near_count",
                 "lock", "near", "tentative")

    def __init__(self, *, expect_host: str | None = None, near: Addr | None = None,
                 far: Addr | None = None, lock: Literal["first", "latest"] = "first",
                 tentative: bool = False) -> None:
        self.expect_host = expect_host
        self.near = near
        self.far = far
        self.lock = lock
        #: ``near`` is what the requester declared, not yet seen: answers may go there
        #: (a server that sends first), and the first datagram from the expected host
        #: still replaces it (NAT rewrote the declared port)
        self.tentative = tentative and near is not None
        self.from_near_count = 0
        self.from_far_count = 0
        self.dropped = 0

    def from_near(self, src: Addr) -> Addr | None:
        """A datagram arrived on the near (client-facing) port from ``src``."""
        near = self.near
        if src != near:
            if (near is not None and self.lock == "first" and not self.tentative) or (
                    self.expect_host is not None and src[0] != self.expect_host):
                self.dropped += 1
                return None
            self.near = src[:2]
        self.tentative = False
        far = self.far
        if far is None:
            self.dropped += 1
            return None
        self.from_near_count += 1
        return far

    def from_far(self, src: Addr) -> Addr | None:
        """A datagram arrived on the far (server-facing) port from ``src``."""
        near = self.near
        if src != self.far or near is None:
            self.dropped += 1
            return None
        self.from_far_count += 1
        return near

    @property
    def packets(self) -> int:
        return self.from_near_count + self.from_far_count


def bind_udp(host: str, port: int = 0) -> socket.socket:
    """A non-blocking UDP socket bound to host:port with large buffers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_in_range(host: str, low: int, high: int, *, tries: int | None = None) -> socket.socket:
    """A UDP socket bound to a free port in [low, high] (the range a firewall opens).

    Starts at a random port so concurrent sessions rarely collide; OSError (EADDRINUSE)
    when every port is taken.
    """
    span = high - low + 1
    start = random.randrange(span)
    for i in range(span if tries is None else min(tries, span)):
        try:
            return bind_udp(host, low + (start + i) % span)
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise
    raise OSError(errno.EADDRINUSE, f"no free UDP port in {low}-{high}")


class _Side(asyncio.DatagramProtocol):
    __slots__ = ("fwd", "near")

    def __init__(self, fwd: DatagramForwarder, near: bool) -> None:
        self.fwd = fwd
        self.near = near

    def datagram_received(self, data: bytes, addr: Addr) -> None:  # type: ignore[override]
        if self.near:
            self.fwd.near_received(data, addr)
        else:
            self.fwd.far_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.fwd.errors += 1  # ICMP unreachable and friends: not fatal for UDP


class DatagramForwarder:
    """Relay datagrams between a near and a far socket as ``record`` decides.

    ``near_to_far``/``far_to_near`` transform payloads (None: drop). :meth:`start` wraps
    the sockets in loop transports; :meth:`close` closes them (and with them the
    sockets), so a session leaves no descriptor behind. ``idle`` is how long no
    datagram was relayed, measured by a periodic check (no clock read per datagram).
    """

    def __init__(self, near_sock: socket.socket, far_sock: socket.socket, record: PortRecord,
                 *, near_to_far: Transform | None = None,
                 far_to_near: Transform | None = None) -> None:
        self.record = record
        self.near_sock = near_sock
        self.far_sock = far_sock
        self.near_to_far = near_to_far
        self.far_to_near = far_to_near
        self._near_t: asyncio.DatagramTransport | None = None
        self._far_t: asyncio.DatagramTransport | None = None
        self.errors = 0
        self.overflow = 0
        self.closed = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._near_t, _ = await loop.create_datagram_endpoint(
                lambda: _Side(self, True), sock=self.near_sock)
            self._far_t, _ = await loop.create_datagram_endpoint(
                lambda: _Side(self, False), sock=self.far_sock)
        except BaseException:
            self.close()
            raise

    def near_received(self, data: bytes, addr: Addr) -> None:
        dst = self.record.from_near(addr)
        if dst is None:
            return
        if self.near_to_far is not None:
            data = self.near_to_far(data)  # type: ignore[assignment]
            if data is None:
                self.record.dropped += 1
                return
        t = self._far_t
        if t is None or t.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self.overflow += 1
            return
        t.sendto(data, dst)

    def far_received(self, data: bytes, addr: Addr) -> None:
        dst = self.record.from_far(addr)
        if dst is None:
            return
        if self.far_to_near is not None:
            data = self.far_to_near(data)  # type: ignore[assignment]
            if data is None:
                self.record.dropped += 1
                return
        t = self._near_t
        if t is None or t.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self.overflow += 1
            return
        t.sendto(data, dst)

    async def wait_idle(self, timeout: float, *, period: float | None = None) -> None:
        """Return once no datagram was relayed for about ``timeout`` seconds."""
        period = period or max(0.05, min(timeout / 4, 5.0))
        last = -1
        quiet = 0.0
        while quiet < timeout:
            await asyncio.sleep(period)
            now = self.record.packets
            quiet = quiet + period if now == last else 0.0
            last = now

    def close(self) -> None:
        """Close both sides; a transport closes its socket itself (on the next loop
        turn), a socket that never got a transport is closed here."""
        if self.closed:
            return
        self.closed = True
        for t, s in ((self._near_t, self.near_sock), (self._far_t, self.far_sock)):
            if t is not None:
                t.close()
            else:
                s.close()

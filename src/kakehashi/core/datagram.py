"""The one UDP forwarder: two datagram sockets joined by a port record.

A forwarding association has a **near** side (towards the client: the spec's area
3141, the client-side peer) and a **far** side (towards the server: area 3142). A
datagram is relayed only if its source matches the record; everything else is
dropped and counted, never relayed (a firewall's behaviour, spec 004 [0055]).

:class:`PortRecord` is the sans-IO decision (which endpoint, if any, a datagram from a
given source goes to); :class:`DatagramForwarder` is the thin asyncio layer that
drives it, with no task per datagram, in one of two ways that make the same decisions:

- the **fast path** (default): each socket is watched with ``loop.add_reader``; a
  readiness callback relays what the socket holds, up to :data:`BATCH` datagrams, as
  the record decides. No transport, protocol object, ``bytes`` copy or write buffer
  per datagram: a profile of a proxy on the other path spent more than half its time in
  that machinery. The batch bound keeps one busy socket from starving the others on
  the loop. In a burst a lane takes the batch with one ``recvmmsg`` into reused
  buffers and sends it on with one ``sendmmsg``, datagrams of one size to one
  destination as one segmentation-offloaded send (:mod:`kakehashi.core.udpbatch`):
  a profile of a chain hop under load spent most of its time in per-datagram system
  calls and in the kernel's per-datagram send path. Between bursts a lane takes one
  datagram per wakeup with ``recvfrom_into`` and sends it with ``sendto`` (cheaper
  than the batched calls through ctypes for one), and skips the read that would only
  find the socket empty: that read sits after the send, while the next hop may be
  waiting for this CPU, and it raised the median latency through a chain.
- the **kernel path** (``kernel=``, on top of the fast path): once the record has locked
  both peers and no transform is set, nftables rules (:mod:`kakehashi.core.kernelpath`)
  rewrite the session's datagrams in the kernel; the first datagram, and any that match
  no rule, still come here and meet the same record.
- the **protocol path** (``fast_path=False``): ``DatagramProtocol`` callbacks and
  transports, the plain asyncio way, kept so the fast path can be switched off and
  compared (the e2e tests run both).

Optional transforms per direction (sealing and opening with
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
import logging
import os
import random
import socket
import sys
from collections.abc import Callable, Container, Iterable
from typing import TYPE_CHECKING, Literal

from kakehashi.core import udpbatch
from kakehashi.core.udpbatch import BATCH

if TYPE_CHECKING:
    from kakehashi.core.kernelpath import KernelPath, Offload

__all__ = ["BATCH", "PROBE", "DatagramForwarder", "PortAllocator", "PortRecord", "bind_in_range",
           "bind_udp"]

log = logging.getLogger("kakehashi.core.datagram")

Addr = tuple[str, int]
#: a payload transform (seal, open): returns what to send, or None to drop. One with a
#: ``batch`` attribute (:class:`kakehashi.core.crypto.DatagramTransform`) is given a
#: whole burst at once on the fast path (:meth:`kakehashi.core.udpbatch.Batch.transform`)
Transform = Callable[[bytes], "bytes | None"]

#: bytes a side may hold in user space when the kernel buffer is full; beyond that
#: datagrams are dropped (UDP has no backpressure; memory must not grow)
MAX_WRITE_BUFFER = 1 << 20
SOCKET_BUFFER = 4 << 20
#: a lane taking one datagram per wakeup takes a batch every PROBE-th wakeup (burst
#: detection)
PROBE = 16
#: a lane in a burst goes back to one datagram per wakeup after this many batches in a
#: row found one datagram or none: a sender's burst reaches the next hop as a trickle at
#: first (the hop wakes at its first datagram), and one such batch must not end it
LINGER = 8
#: the largest datagram a UDP socket can deliver
MAX_DATAGRAM = 65535
#: whether a sealing end's lane runs its readiness callbacks in C once the record has
#: decided where its datagrams go (:meth:`DatagramForwarder._turn`): the Python around
#: each callback's system calls and AEAD call was ~40% of a sealing end's CPU in the
#: chain's bursts. ``KAKEHASHI_NATIVE_LANES=0`` turns it off (the Python lane, the
#: reference, then runs; tests run both)
NATIVE_LANES = os.environ.get("KAKEHASHI_NATIVE_LANES", "1") != "0"


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

    def from_near(self, src: Addr, count: int = 1) -> Addr | None:
        """A datagram arrived on the near (client-facing) port from ``src`` (or ``count``
        of them in a row: the decision for the first holds for the rest, which meet the
        state it leaves).

        Endpoints are compared as (host, port): an IPv6 socket reports a source as
        (host, port, flowinfo, scope_id), and the record holds (host, port) (what it
        locked to, ``src[:2]``, and what the port exchange declared), so comparing
        whole tuples refused every IPv6 datagram after the first."""
        near = self.near
        if src != near and (near is None or src[:2] != near[:2]):
            if (near is not None and self.lock == "first" and not self.tentative) or (
                    self.expect_host is not None and src[0] != self.expect_host):
                self.dropped += count
                return None
            self.near = src[:2]
        self.tentative = False
        far = self.far
        if far is None:
            self.dropped += count
            return None
        self.from_near_count += count
        return far

    def from_far(self, src: Addr, count: int = 1) -> Addr | None:
        """A datagram arrived on the far (server-facing) port from ``src`` (or ``count``
        of them in a row); compared as (host, port), as in :meth:`from_near`."""
        near, far = self.near, self.far
        if near is None or (src != far and (far is None or src[:2] != far[:2])):
            self.dropped += count
            return None
        self.from_far_count += count
        return near

    @property
    def packets(self) -> int:
        return self.from_near_count + self.from_far_count


#: room for the segment size of a coalesced message (CMSG_SPACE(sizeof(int)))
_GRO_CMSG = socket.CMSG_SPACE(4)


def _receive_offload(sock: socket.socket) -> bool:
    """Turn on ``UDP_GRO`` (:mod:`kakehashi.core.udpbatch`): another hop's offloaded run
    arrives as one message to cut, not as datagrams the kernel cut one by one at this
    socket (at the sender's expense); False where the kernel has no such option."""
    try:
        sock.setsockopt(udpbatch.SOL_UDP, udpbatch.UDP_GRO, 1)
    except OSError:
        return False
    return True


def _segment(ancillary: list[tuple[int, int, bytes]]) -> int:
    """The segment size a ``recvmsg`` reported for a coalesced message (0: none)."""
    for level, kind, data in ancillary:
        if level == udpbatch.SOL_UDP and kind == udpbatch.UDP_GRO and len(data) >= 4:
            return int.from_bytes(data[:4], sys.byteorder)
    return 0


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


def bind_in_range(host: str, low: int, high: int, *, tries: int | None = None,
                  avoid: Container[int] = ()) -> socket.socket:
    """A UDP socket bound to a free port in [low, high] (the range a firewall opens),
    not one of ``avoid``.

    Starts at a random port so concurrent sessions rarely collide; OSError (EADDRINUSE)
    when every port is taken.
    """
    span = high - low + 1
    start = random.randrange(span)
    for i in range(span if tries is None else min(tries, span)):
        port = low + (start + i) % span
        if port in avoid:
            continue
        try:
            return bind_udp(host, port)
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise
    raise OSError(errno.EADDRINUSE, f"no free UDP port in {low}-{high}")


#: freed ports a :class:`PortAllocator` remembers (the most recently freed)
MAX_FREED = 4096


class PortAllocator:
    """The data ports of a configured range, a port its session freed taken again last.

    When a session ends its ports close, but its peers' datagrams are still in flight
    (and a peer that has not noticed goes on sending for a while). A new session given
    such a port would take them for its own: a late answer from the same server to the
    old server-facing port matches the new record and reaches the new client; a late
    datagram from the old client (the same host) locks the new record to it. So ports
    never handed out come first (from a random start, as :func:`bind_in_range`), and
    only when none is free the ones freed here, the longest freed first: a range with
    room for twice the sessions it holds never reuses a port while another is free.
    """

    def __init__(self, host: str, low: int, high: int) -> None:
        self.host, self.low, self.high = host, low, high
        #: ports handed out here and freed since, the longest freed first
        self.freed: dict[int, None] = {}

    def bind(self) -> socket.socket:
        """A socket on a free port of the range; OSError (EADDRINUSE) when none is."""
        if len(self.freed) <= self.high - self.low:  # ports never freed may be left
            try:
                return bind_in_range(self.host, self.low, self.high, avoid=self.freed)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
        for port in self.freed:
            try:
                sock = bind_udp(self.host, port)
            except OSError as exc:
                if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                    raise
                continue
            del self.freed[port]
            return sock
        raise OSError(errno.EADDRINUSE, f"no free UDP port in {self.low}-{self.high}")

    def release(self, *ports: int) -> None:
        """``ports`` were closed: they go to the end of the queue of freed ports (which
        remembers the last :data:`MAX_FREED`: a port freed before those is as good as
        one never handed out, and memory stays bounded for a range of any size)."""
        for port in ports:
            self.freed.pop(port, None)
            self.freed[port] = None
        while len(self.freed) > MAX_FREED:
            del self.freed[next(iter(self.freed))]


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

    ``near_to_far``/``far_to_near`` transform payloads (None: drop). :meth:`start`
    watches the sockets (``fast_path``: readiness callbacks that drain them; otherwise
    loop transports); :meth:`close` stops that and closes the sockets, so a session
    leaves no descriptor behind. ``idle`` is how long no datagram was relayed, measured
    by a periodic check (no clock read per datagram).
    """

    def __init__(self, near_sock: socket.socket, far_sock: socket.socket, record: PortRecord,
                 *, near_to_far: Transform | None = None,
                 far_to_near: Transform | None = None, fast_path: bool = True,
                 kernel: KernelPath | None = None, position: int = 0) -> None:
        self.record = record
        self.near_sock = near_sock
        self.far_sock = far_sock
        self.near_to_far = near_to_far
        self.far_to_near = far_to_near
        self.fast_path = fast_path
        self._near_t: asyncio.DatagramTransport | None = None
        self._far_t: asyncio.DatagramTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._io: udpbatch.Batch
        self._families: tuple[int, int]
        #: per lane (0: near -> far, 1: far -> near): in a burst? wakeups in single mode,
        #: batches in a row that found at most one datagram
        self._burst = [False, False]
        #: per lane: whether its incoming socket takes an offloaded run as one message
        self._gro = (False, False)
        self._wakes = [0, 0]
        self._thin = [0, 0]
        #: whether a lane whose transform has a native turn takes it (:meth:`_turn`;
        #: :data:`NATIVE_LANES`, where the batched system calls are there), and per lane
        #: whether its turn may still make offloaded sends (off once its route refused)
        self._lanes = False
        self._gso = [True, True]
        #: send failures (ICMP errors, unreachable networks): not fatal for UDP
        self.errors = 0
        #: datagrams dropped because the outgoing side could not take them
        self.overflow = 0
        self.closed = False
        #: the kernel path (fast path only): this process's nftables table, the hop's
        #: position in the chain (orders the rewrites of several hops on one host), the
        #: session's rules once installed, and the kernel counts already in the record
        self.kernel = kernel if fast_path else None
        self.position = position
        self.offload: Offload | None = None
        self._installing: asyncio.Task[None] | None = None
        #: payload bytes relayed in user space per lane (the record counts datagrams);
        #: the kernel's share apart, in packets and payload bytes: it sees a
        #: segmentation-offloaded send of several datagrams as one packet, so its
        #: packets are not datagrams and are never added to the record's counts
        self.user_bytes = [0, 0]
        self.kernel_packets = [0, 0]
        self.kernel_bytes = [0, 0]
        #: the current offload's counters (out, back packets, out, back bytes) as
        #: already added above
        self._counted = [0, 0, 0, 0]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.fast_path:
                self._prepare()
                loop.add_reader(self.near_sock.fileno(), self._lane(0))
                self._loop = loop  # from here on close() removes the readers
                loop.add_reader(self.far_sock.fileno(), self._lane(1))
                return
            self._near_t, _ = await loop.create_datagram_endpoint(
                lambda: _Side(self, True), sock=self.near_sock)
            self._far_t, _ = await loop.create_datagram_endpoint(
                lambda: _Side(self, False), sock=self.far_sock)
        except BaseException:
            self.close()
            raise

    # -- the fast path: readiness callbacks ---------------------------------------------
    def _prepare(self) -> None:
        """What the lanes' callbacks need before the first (:meth:`start`; tests that
        drive the callbacks themselves call it)."""
        self._io = udpbatch.scratch()
        #: per lane, the outgoing socket's address family (an enum lookup each time it is
        #: read from the socket)
        self._families = (int(self.far_sock.family), int(self.near_sock.family))
        if self._io.mmsg:  # (where the batch can cut what it coalesces)
            self._gro = (_receive_offload(self.near_sock), _receive_offload(self.far_sock))
            self._lanes = NATIVE_LANES

    def _lane(self, lane: int) -> Callable[[], None]:
        """The readiness callback of one lane (0: near -> far, 1: far -> near).

        Between bursts it relays the one datagram that woke it with a ``recvfrom_into``
        and a ``sendto`` and nothing else: every step here is paid by each datagram of
        one-at-a-time traffic at every hop, so what it needs is bound once, here, not
        looked up per datagram (with the batch machinery in the way, a lone datagram
        cost ~4 µs more CPU per hop than on the protocol path, and a chain's median
        round trip ~1.3x more). In a burst, and every :data:`PROBE`-th wakeup to notice
        one, it hands over to :meth:`_drain`.
        """
        near = lane == 0
        src_sock, dst_sock = (self.near_sock, self.far_sock) if near else (
            self.far_sock, self.near_sock)
        recv_into, sendto = src_sock.recvfrom_into, dst_sock.sendto
        recvmsg_into, gro = src_sock.recvmsg_into, self._gro[lane]
        record = self.record
        decide = record.from_near if near else record.from_far
        buf = self._io.rx[:MAX_DATAGRAM]  # slot 0: a callback is done with it on return
        burst, wakes = self._burst, self._wakes
        drain = self._drain
        turn = self._turn
        #: what the lane's native turn sends to, as last encoded (the record's peer and
        #: destination, their sockaddrs): once per session, not per wakeup
        names: list[object] = [None, None, None, None]

        def relay() -> None:
            if self._lanes and turn(lane, names):
                return
            if burst[lane]:
                drain(lane, src_sock, dst_sock, decide,
                      self.near_to_far if near else self.far_to_near)
                return
            w = wakes[lane] = wakes[lane] + 1
            if not w % PROBE:
                drain(lane, src_sock, dst_sock, decide,
                      self.near_to_far if near else self.far_to_near)
                return
            try:
                if gro:  # the datagram may be another hop's run, taken as one message
                    n, ancillary, _, src = recvmsg_into((buf,), _GRO_CMSG)
                    if ancillary:
                        segment = _segment(ancillary)
                        if 0 < segment < n:
                            self._relay_taken(lane, self._io.took(n, segment, src), dst_sock,
                                              decide, self.near_to_far if near
                                              else self.far_to_near)
                            return
                else:
                    n, src = recv_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # an error queued on the socket (ICMP): not fatal for UDP
                self.errors += 1
                return
            self._relay_one(lane, buf[:n], src, sendto, decide,
                            self.near_to_far if near else self.far_to_near)

        return relay

    def _relay_one(self, lane: int, data: bytes | memoryview, src: Addr,
                   sendto: Callable[[bytes | memoryview, Addr], int],
                   decide: Callable[[Addr], Addr | None], transform: Transform | None,
                   ) -> None:
        """Relay one received datagram from ``src`` as the record decides: the lone
        datagram of a wakeup between bursts, and those a native turn handed back."""
        dst = decide(src)
        if dst is None:
            return
        self.user_bytes[lane] += len(data)
        if lane == 0 and self.kernel is not None:
            self._offer()
        try:
            if transform is not None:
                # its own bytes: a transform may keep what it is given
                data = transform(bytes(data))  # type: ignore[assignment]
                if data is None:
                    self.record.dropped += 1
                    return
            sendto(data, dst)
        except (BlockingIOError, InterruptedError):  # the send buffer is full: UDP drops
            self.overflow += 1
        except (OSError, ValueError):  # no route, too large, no address for it
            self.errors += 1

    def _turn(self, lane: int, names: list[object]) -> bool:
        """The lane's readiness callback in C, when its transform has one (a sealing
        end: :meth:`kakehashi.core.crypto.DatagramChannel.seal_turn`) and the record
        already says where this lane's datagrams go: from its peer (``near`` for lane
        0, ``far`` for lane 1) to the other. That is the decision the record makes for
        every datagram from the peer; C applies it to them and hands the first from any
        other source back, with all after it, and those meet the record here
        (:meth:`_relay_one`), in order. The record's counts, ``user_bytes``,
        ``errors`` and ``overflow`` come out as on the Python path. False: not here
        (no turn, no decision yet, the native path off), the Python path runs."""
        near = lane == 0
        transform = self.near_to_far if near else self.far_to_near
        turn = getattr(transform, "turn", None)
        if turn is None:
            return False
        rec = self.record
        peer, dst = (rec.near, rec.far) if near else (rec.far, rec.near)
        if peer is None or dst is None:
            return False
        src_sock, dst_sock = (self.near_sock, self.far_sock) if near else (
            self.far_sock, self.near_sock)
        if names[0] is not peer or names[1] is not dst:
            try:
                raw = udpbatch.encode(int(src_sock.family), peer)
                # only a peer as the kernel reports it (a literal address): the record
                # compares (host, port), and ("localhost", p) is never a datagram's
                # source. C compares whole sockaddrs: an IPv6 one with the flowinfo and
                # scope_id encoded here (those of a 4-tuple, else 0), so it takes only
                # datagrams the record takes, and hands back the rest (a link-local
                # peer's, whose scope_id the kernel fills in) for the record to decide
                names[2] = raw if udpbatch.decode(raw)[:2] == peer[:2] else None
                names[3] = udpbatch.encode(int(dst_sock.family), dst)
            except OSError:
                names[2] = None
            names[0], names[1] = peer, dst
        if names[2] is None:
            return False
        r = turn(src_sock.fileno(), dst_sock.fileno(), names[2], names[3], self._gso[lane],
                 BATCH)
        if r is None:
            return False
        taken, size, refused, failed, overflow, rx_error, gso, rest = r
        if taken:
            (rec.from_near if near else rec.from_far)(peer, taken)
            self.user_bytes[lane] += size
        rec.dropped += refused
        self.errors += failed + rx_error
        self.overflow += overflow
        if not gso:
            self._gso[lane] = False
        if rest:
            decide = rec.from_near if near else rec.from_far
            sendto = dst_sock.sendto
            for payload, raw in rest:
                try:
                    src = udpbatch.decode(raw)
                except OSError:  # (a family the record cannot hold)
                    self.errors += 1
                    continue
                self._relay_one(lane, payload, src, sendto, decide, transform)
        return True

    def _drain(self, lane: int, src_sock: socket.socket, dst_sock: socket.socket,
               decide: Callable[[Addr, int], Addr | None], transform: Transform | None,
               ) -> None:
        """Relay what ``src_sock`` holds, each datagram as the record decides, in order.

        A lane in a burst takes up to :data:`BATCH` (the kernel's receive buffer keeps
        the rest for the next turn), until :data:`LINGER` batches in a row found one
        datagram or none; a lane between bursts comes here every :data:`PROBE`-th
        wakeup (:meth:`_lane`), to notice a burst.
        """
        burst = self._burst
        limit = BATCH
        io = self._io
        try:
            n = io.recv(src_sock, limit)
        except OSError:  # an error queued on the socket (ICMP): not fatal for UDP
            self.errors += 1
            return
        if n > 1:
            burst[lane] = True
            self._thin[lane] = 0
        elif burst[lane]:
            self._thin[lane] += 1
            if self._thin[lane] >= LINGER:
                burst[lane] = False
        self._relay_taken(lane, n, dst_sock, decide, transform)

    def _relay_taken(self, lane: int, n: int, dst_sock: socket.socket,
                     decide: Callable[[Addr, int], Addr | None],
                     transform: Transform | None) -> None:
        """Relay the ``n`` datagrams the batch holds, as the record decides, in order."""
        io = self._io
        family = self._families[lane]
        offer = lane == 0 and self.kernel is not None
        batch = getattr(transform, "batch", None)
        lengths = io.lengths
        src = io.source
        if src is not None and n:
            # one sender for the whole burst (the usual case): one decision for it
            dst = decide(src, n)
            if dst is None:
                return
            self.user_bytes[lane] += sum(lengths[:n])
            if offer:
                self._offer()
            if batch is not None:
                try:  # (the burst through the transform, and sent: a sealing end's wakeup)
                    refused, failed, overflow = io.transform_send(batch, family, dst, dst_sock)
                except (OSError, ValueError):  # larger than a datagram once sealed
                    self.errors += n
                else:
                    self.record.dropped += refused
                    self.errors += failed
                    self.overflow += overflow
                    return
            else:
                self._each(io, family, range(n), dst, transform)
        else:
            sources = io.sources
            size = 0
            for i in range(n):
                dst = decide(sources[i])
                if dst is None:
                    continue
                size += lengths[i]
                if offer:
                    self._offer()
                if batch is not None:
                    try:
                        self.record.dropped += io.transform(batch, family, dst, i, 1)
                    except (OSError, ValueError):
                        self.errors += 1
                else:
                    self._each(io, family, (i,), dst, transform)
            self.user_bytes[lane] += size
        failed, overflow = io.flush(dst_sock)
        self.errors += failed
        self.overflow += overflow

    def _each(self, io: udpbatch.Batch, family: int, which: Iterable[int], dst: Addr,
              transform: Transform | None) -> None:
        """Queue received datagrams to ``dst``: as they are, or through a transform that
        takes one datagram at a time."""
        for i in which:
            try:
                if transform is None:
                    io.relay(family, i, dst)
                    continue
                # its own bytes: a transform may keep what it is given
                data = transform(io.payload(i).tobytes())
                if data is None:
                    self.record.dropped += 1
                    continue
                io.put(family, data, dst)
            except (OSError, ValueError):  # no address for this socket, or too large
                self.errors += 1

    # -- the kernel path ---------------------------------------------------------------
    def _offer(self) -> None:
        """A datagram from the near peer was relayed here: if the record now says who
        both peers are and nothing transforms payloads, hand the session to the kernel
        (again, if the near peer changed: a ``latest`` lock)."""
        rec = self.record
        if (rec.near is None or rec.far is None or self.near_to_far is not None
                or self.far_to_near is not None or rec.tentative):
            return
        o = self.offload
        if o is not None:
            if o.near == rec.near and o.far == rec.far:
                return  # in flight before the rules: the kernel has the rest
            # the near peer moved (a ``latest`` lock): the old rules go before this
            # datagram is sent on, or the answer would be rewritten to the old peer
            self.offload = None
            if self.kernel is not None:
                self.kernel.remove(o)
                self._absorb(o)
        if self._installing is not None and not self._installing.done():
            return
        self._installing = asyncio.ensure_future(self._install(rec.near, rec.far))

    async def _install(self, near: Addr, far: Addr) -> None:
        kernel = self.kernel
        if kernel is None or self.closed:
            return
        prev, self.offload = self.offload, None
        if prev is not None:
            kernel.remove(prev)
            self._absorb(prev)
        o = kernel.new(self.position, near, self.near_sock.getsockname(),
                       self.far_sock.getsockname(), far)
        why = kernel.eligible(o.near, o.near_port, o.far_port, o.far)
        if why is None:
            try:
                await kernel.install(o)
            except Exception as exc:  # nft failed: user space goes on relaying
                why = f"nftables refused the rules: {exc}"
        if why is not None:
            log.info("kernel fast path not used for this session (%s): relayed in user space",
                     why)
            self.kernel = None
            return
        if self.closed:  # closed while nft ran
            kernel.remove(o)
            return
        self.offload = o

    def _absorb(self, o: Offload) -> None:
        """Add what the kernel relayed since the last reading to its share."""
        now = (o.out_packets, o.back_packets, o.out_bytes, o.back_bytes)
        c = self._counted
        self.kernel_packets[0] += now[0] - c[0]
        self.kernel_packets[1] += now[1] - c[1]
        self.kernel_bytes[0] += now[2] - c[2]
        self.kernel_bytes[1] += now[3] - c[3]
        self._counted = [0, 0, 0, 0] if o.removed else list(now)

    @property
    def relayed_bytes(self) -> int:
        """Payload bytes relayed both ways, in user space and in the kernel (exact on
        both paths, unlike a count of datagrams: see :attr:`kernel_packets`)."""
        return sum(self.user_bytes) + sum(self.kernel_bytes)

    @property
    def activity(self) -> int:
        """Grows while anything is relayed: datagrams here, packets in the kernel."""
        return self.record.packets + sum(self.kernel_packets)

    async def refresh(self) -> None:
        """Bring the record's counts up to date with the kernel's (a poll of counters)."""
        o, kernel = self.offload, self.kernel
        if o is None or kernel is None:
            return
        with contextlib.suppress(Exception):
            await kernel.refresh()
        if self.offload is o and not o.removed:
            self._absorb(o)

    # -- the protocol path (and datagrams handed in by the owner) ------------------------
    def near_received(self, data: bytes, addr: Addr) -> None:
        dst = self.record.from_near(addr)
        if dst is None:
            return
        self.user_bytes[0] += len(data)
        if self.near_to_far is not None:
            data = self.near_to_far(data)  # type: ignore[assignment]
            if data is None:
                self.record.dropped += 1
                return
        self._send(self._far_t, self.far_sock, data, dst)

    def far_received(self, data: bytes, addr: Addr) -> None:
        dst = self.record.from_far(addr)
        if dst is None:
            return
        self.user_bytes[1] += len(data)
        if self.far_to_near is not None:
            data = self.far_to_near(data)  # type: ignore[assignment]
            if data is None:
                self.record.dropped += 1
                return
        self._send(self._near_t, self.near_sock, data, dst)

    def _send(self, t: asyncio.DatagramTransport | None, sock: socket.socket, data: bytes,
              dst: Addr) -> None:
        # an empty datagram is a datagram, but a transport's sendto() ignores it: it goes
        # out on the socket itself when nothing waits in the transport's buffer before it
        if t is None or (not data and not t.get_write_buffer_size()):
            if (self.fast_path or t is not None) and not self.closed:
                try:
                    sock.sendto(data, dst)
                except (BlockingIOError, InterruptedError):
                    self.overflow += 1
                except OSError:
                    self.errors += 1
            else:
                self.overflow += 1
            return
        if t.get_write_buffer_size() > MAX_WRITE_BUFFER:
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
            await self.refresh()
            now = self.activity
            quiet = quiet + period if now == last else 0.0
            last = now

    def close(self) -> None:
        """Close both sides. The fast path's readers are removed and its sockets closed
        now; a transport closes its socket itself (on the next loop turn), a socket that
        never got a transport is closed here."""
        if self.closed:
            return
        self.closed = True
        o, self.offload = self.offload, None
        if o is not None and self.kernel is not None:
            self.kernel.remove(o)  # before the ports close: a next session may take them
            self._absorb(o)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            for s in (self.near_sock, self.far_sock):
                with contextlib.suppress(ValueError, OSError):
                    loop.remove_reader(s.fileno())  # -1 (already closed): nothing to do
        for t, s in ((self._near_t, self.near_sock), (self._far_t, self.far_sock)):
            if t is not None:
                t.close()
            else:
                s.close()

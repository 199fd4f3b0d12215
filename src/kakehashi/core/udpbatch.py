"""Batched UDP I/O: a burst of datagrams in two system calls, in reused buffers.

The datagram forwarder (:mod:`kakehashi.core.datagram`) relays whatever a readable
socket holds. With a ``recvfrom_into``/``sendto`` pair per datagram, a profile of a
chain hop under load (the encrypted chain with the kernel path: the forward and the
last proxy seal and open in user space) spent three quarters of its busy time in
``sendto``: entering the kernel and running its send path (routing, netfilter, the
loopback device, the receiver's wakeup) once per datagram. :class:`Batch` takes up to
:data:`BATCH` datagrams with one ``recvmmsg`` and sends what the port record lets
through with one ``sendmmsg``:

- consecutive datagrams of one size to one destination leave as **one** send with
  segmentation offload (``UDP_SEGMENT``): the kernel runs its send path once for the
  group and cuts it into the same datagrams at the receiving socket (or the device), so
  receivers see exactly what was sent. A route that refuses it (a smaller MTU, no
  checksum offload, an old kernel) gets that destination's datagrams one by one;
- the datagrams land in fixed 64 KiB slots of an anonymous mapping (never truncated:
  no UDP payload is larger; only the touched pages cost memory), and a plaintext relay
  sends them from there: no ``bytes`` object per datagram;
- a transform's output (sealing, opening) is copied into a slot of a second mapping;
- source addresses are decoded once per distinct ``sockaddr`` (a small cache), so the
  record still decides on the same ``(host, port)`` tuples as ``recvfrom`` gives;
- destination ``sockaddr`` structures are encoded once per destination.

A queue of one is sent with a plain ``sendto``: through ctypes the batched calls cost a
few microseconds more, which one-at-a-time traffic would pay in latency at every hop (the
forwarder does not come here at all for a lone datagram between bursts). For the same
reason a queue of one run (a sealing end's burst, every wakeup) leaves with the socket's
own ``sendmsg`` and a ``UDP_SEGMENT`` control message.

This is Linux ``recvmmsg(2)``/``sendmmsg(2)`` through ctypes on an LP64 libc. Where that
is missing (another OS, a 32-bit build), :class:`Batch` does the same with a loop of
``recvfrom_into``/``sendto`` into the same slots, so the forwarder has one code path.

Nothing here decides anything: it moves bytes and counts failures. A :class:`Batch`
belongs to one thread (:func:`scratch`); a caller fills it, queues and flushes within
one readiness callback, so every forwarder on a loop shares it.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import mmap
import os
import socket
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

Addr = tuple
#: a batch transform (sealing, opening): (src, starts, lengths, n, out, at) -> the length
#: it wrote for each datagram, back to back into ``out`` from ``at``; -1: refused
BatchFn = Callable[[Any, Sequence[int], Sequence[int], int, memoryview, int], list[int]]
#: a queued send (see Batch._queue)
Entry = tuple[int, int, int, Addr, int, int]

#: datagrams taken from one socket per call (the loop polls again after it, so one busy
#: socket does not starve the others)
BATCH = 64
#: room for one datagram: no UDP payload is larger (65,507 B over IPv4)
SLOT = 1 << 16
_NAME = 32  # room for a sockaddr_in6 (28 B)
#: what a transform may add to each datagram, at most (sealing adds 24 B)
_TX_SPARE = 64
#: receive offload (``UDP_GRO``, Linux 5.0): a socket with it takes a segmentation-
#: offloaded send (another hop's run) as one message of up to 64 KiB, with its segment
#: size in a control message, instead of the kernel cutting it into datagrams at the
#: receiving socket; :meth:`Batch.recv` cuts it where the sender's datagrams end
UDP_GRO = 104
#: datagrams one received message can hold (the kernel's UDP_MAX_SEGMENTS)
GRO_SEGMENTS = 128
_RX_CMSG = 24  # CMSG_SPACE(sizeof(int)): the segment size
_HDR = 64  # sizeof(struct mmsghdr) on LP64 Linux: msghdr (56) + msg_len, padded
_Q = _HDR // 8  # 8-byte words per header
MSG_DONTWAIT = 0x40
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)
#: segmentation offload (``UDP_SEGMENT``, Linux 4.18): consecutive datagrams of one size
#: to one destination leave as one send, cut into datagrams by the kernel, so the stack
#: (routing, netfilter, the loopback device) runs once for them, not once each
SOL_UDP = 17
UDP_SEGMENT = 103
#: at most this many datagrams per offloaded send (the kernel's UDP_MAX_SEGMENTS is 64
#: or more), this many bytes in all (an IP packet's limit), of at most this size (more
#: than an Ethernet MTU takes is refused by the kernel with EINVAL)
GSO_SEGMENTS = 64
GSO_BYTES = 65000
GSO_SIZE = 1472
_CMSG_LEN = 16 + 2  # CMSG_LEN(sizeof(uint16_t)) on LP64
_CMSG = 24  # CMSG_SPACE(sizeof(uint16_t))
#: errors that say "not with segmentation offload" (then each datagram alone)
_NO_GSO = (errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EMSGSIZE)
#: distinct source addresses remembered (a spoofing flood from many sources only
#: refills the cache)
_CACHE = 4096


def _libc() -> tuple[object, object] | None:
    """recvmmsg and sendmmsg from the C library, or None where the layout is not known."""
    if not sys.platform.startswith("linux") or struct.calcsize("P") != 8:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        recv, send = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    # no argtypes: converting each argument through them cost ~1 us per call, paid at
    # every wakeup of a lane in a burst. The callers pass what C takes as is: ints for
    # the int arguments (ctypes refuses one that does not fit), a c_void_p made once
    # for the headers' address, None for the timeout
    recv.restype = ctypes.c_int
    send.restype = ctypes.c_int
    return recv, send


_MMSG = _libc()
#: whether the system calls are there (tests turn it off to run the loop as well)
AVAILABLE = _MMSG is not None
#: whether :meth:`Batch.transform_send` sends a burst that came out as one run straight
#: from the send area (off: through the queue and :meth:`Batch.flush`, as every other
#: send; tests run both)
FUSED = True


def _address(buf: object) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))  # type: ignore[arg-type]


def encode(family: int, addr: Addr) -> bytes:
    """The ``sockaddr`` for ``addr`` on a socket of ``family`` (a literal, or resolved
    once as ``sendto`` would); OSError if it cannot be one."""
    host, port = addr[0], addr[1]
    if family == socket.AF_INET:
        try:
            packed = socket.inet_pton(socket.AF_INET, host)
        except OSError:
            packed = socket.inet_pton(socket.AF_INET, socket.getaddrinfo(
                host, port, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0])
        return struct.pack("=H", family) + port.to_bytes(2, "big") + packed + bytes(8)
    if family == socket.AF_INET6:
        flow, scope = (addr[2], addr[3]) if len(addr) >= 4 else (0, 0)
        try:
            packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
            if "%" in host and not scope:
                scope = socket.if_nametoindex(host.partition("%")[2])
        except OSError:
            info = socket.getaddrinfo(host, port, socket.AF_INET6, socket.SOCK_DGRAM)[0][4]
            packed = socket.inet_pton(socket.AF_INET6, info[0].partition("%")[0])
            flow, scope = info[2], info[3]
        return (struct.pack("=H", family) + port.to_bytes(2, "big") + struct.pack("!I", flow)
                + packed + struct.pack("=I", scope))
    raise OSError(errno.EAFNOSUPPORT, f"address family {family} not supported")


def decode(raw: bytes) -> Addr:
    """The address tuple ``recvfrom`` would give for a ``sockaddr``."""
    family = struct.unpack_from("=H", raw)[0]
    port = int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET:
        return (socket.inet_ntop(socket.AF_INET, raw[4:8]), port)
    if family == socket.AF_INET6:
        host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        flow = struct.unpack_from("!I", raw, 4)[0]
        scope = struct.unpack_from("=I", raw, 24)[0]
        if scope:
            try:
                host += "%" + socket.if_indextoname(scope)
            except OSError:
                host += f"%{scope}"
        return (host, port, flow, scope)
    raise OSError(errno.EAFNOSUPPORT, f"address family {family} not supported")


class Batch:
    """One thread's buffers for a burst: receive up to :data:`BATCH` datagrams
    (:meth:`recv`), queue what goes on (:meth:`relay` for a received payload as is,
    :meth:`put` for a transform's output) and send the queue (:meth:`flush`)."""

    def __init__(self, size: int = BATCH, *, mmsg: bool = True) -> None:
        self.size = size
        self.mmsg = mmsg and _MMSG is not None
        #: received payloads (slot i: datagram i) and transformed ones (slot j: queued j)
        self._rx_map = mmap.mmap(-1, size * SLOT)
        # outputs lie one after the other (a transform may add _TX_SPARE bytes to each)
        self._tx_map = mmap.mmap(-1, size * (SLOT + GRO_SEGMENTS * _TX_SPARE))
        self.rx = memoryview(self._rx_map)
        self.tx = memoryview(self._tx_map)
        self.lengths = [0] * size
        self.sources: list[Addr] = [()] * size
        #: where datagram i of the last :meth:`recv` starts in :attr:`rx` (slot i, unless
        #: a received message held several: then they follow each other in its slot)
        self.starts: Sequence[int] = range(0, 0)
        #: the one source of every datagram of the last :meth:`recv`, or None (several)
        self.source: Addr | None = None
        #: the queue: (where: a byte offset into rx if >= 0, into tx as -1 - offset if
        #: < 0; bytes; the sending socket's address family; destination; datagram size;
        #: datagrams): one datagram, or a run of them of one size, back to back in tx
        self._queue: list[Entry] = []
        self._tx_off = 0
        self._last = 0  # datagrams the last recv() took
        #: segmentation offload: used unless turned off, except to destinations (their
        #: sockaddr, and as (family, destination) for :meth:`transform`) whose route
        #: refused it
        self.gso = True
        self._no_gso: set[object] = set()
        self._no_gso_dst: set[tuple[int, Addr]] = set()
        self._src_cache: dict[bytes, Addr] = {}
        #: the UDP_SEGMENT control message of :meth:`_send_run`, per segment size
        self._seg_cmsg: dict[int, list[tuple[int, int, bytes]]] = {}
        self._dst_cache: dict[tuple[int, Addr], tuple[tuple[int, int], object]] = {}
        self._retired: list[object] = []
        self._rx_base = _address(self._rx_map)
        self._tx_base = _address(self._tx_map)
        if not self.mmsg:
            return
        # receive headers, each with its name slot and one iovec on its payload slot
        self._rx_names = bytearray(size * _NAME)
        self._rx_iov = bytearray(size * 16)
        self._rx_hdr = bytearray(size * _HDR)
        names, iov = _address(self._rx_names), _address(self._rx_iov)
        q = memoryview(self._rx_iov).cast("Q")
        h = memoryview(self._rx_hdr).cast("Q")
        for i in range(size):
            q[2 * i], q[2 * i + 1] = self._rx_base + i * SLOT, SLOT
            h[_Q * i] = names + i * _NAME
            h[_Q * i + 1] = _NAME  # msg_namelen: the kernel writes the real length back
            h[_Q * i + 2] = iov + i * 16
            h[_Q * i + 3] = 1
        self._rx_h = h
        self._rx_used = 0  # headers whose msg_namelen the last call overwrote
        self._namelens = memoryview(array.array("Q", [_NAME] * size))
        # a control buffer per header, for the segment size of a coalesced message
        self._rx_ctl = bytearray(size * _RX_CMSG)
        ctl = _address(self._rx_ctl)
        for i in range(size):
            h[_Q * i + 4] = ctl + i * _RX_CMSG
            h[_Q * i + 5] = _RX_CMSG
        self._ctllens = memoryview(array.array("Q", [_RX_CMSG] * size))
        self._rx_names_view = memoryview(self._rx_names)
        # send headers: each points at its own iovec; names and slots set per datagram
        self._tx_iov = bytearray(size * 16)
        self._tx_hdr = bytearray(size * _HDR)
        self._tx_iov_q = memoryview(self._tx_iov).cast("Q")
        self._tx_h = memoryview(self._tx_hdr).cast("Q")
        tiov = _address(self._tx_iov)
        for i in range(size):
            self._tx_h[_Q * i + 2] = tiov + i * 16
            self._tx_h[_Q * i + 3] = 1
        self._tx_hdr_addr = _address(self._tx_hdr)
        self._tx_hdr_ptr = ctypes.c_void_p(self._tx_hdr_addr)
        self._tx_iov_addr = tiov
        self._tx_ctl = bytearray(size * _CMSG)
        self._tx_ctl_addr = _address(self._tx_ctl)
        self._rx_hdr_addr = _address(self._rx_hdr)
        self._rx_hdr_ptr = ctypes.c_void_p(self._rx_hdr_addr)

    # -- receiving ----------------------------------------------------------------------
    def recv(self, sock: socket.socket, limit: int = BATCH) -> int:
        """Take what ``sock`` holds, up to ``limit`` datagrams (0: nothing there).

        Fills :attr:`lengths` and :attr:`sources`; OSError for an error queued on the
        socket (an ICMP error for an earlier send: not fatal for UDP)."""
        if self.mmsg:
            h = self._rx_h
            used = self._rx_used  # the kernel wrote each name's and control's length
            if used:                # there: reset them
                h[1:_Q * used:_Q] = self._namelens[:used]
                h[5:_Q * used:_Q] = self._ctllens[:used]
            n = _MMSG[0](sock.fileno(), self._rx_hdr_ptr, min(limit, self.size),  # type: ignore[index,operator]
                         MSG_DONTWAIT, None)
            if n < 0:
                err = ctypes.get_errno()
                self._rx_used = self._last = 0
                if err in _AGAIN:
                    return 0
                raise OSError(err, os.strerror(err))
            self._rx_used = self._last = n
            self.starts = range(0, n * SLOT, SLOT)
            if n == 0:
                return 0
            # one C call each for the lengths and the names, not a loop of Python: the
            # kernel wrote msg_len (word 7) and msg_namelen (word 1) as 32-bit values into
            # 64-bit words whose upper halves stay zero
            self.lengths[:n] = h[7:_Q * n:_Q].tolist()
            names, cache, sources = self._rx_names_view, self._src_cache, self.sources
            first = names[:_NAME].tobytes()
            # (bytearray against bytes: one memcmp; a memoryview compares byte by byte)
            if n == 1 or self._rx_names[:n * _NAME] == first * n:
                # a burst from one peer (the usual case): one source for all of it
                raw = first[:h[1]]
                src = cache.get(raw)
                if src is None:
                    if len(cache) >= _CACHE:
                        cache.clear()
                    src = cache[raw] = decode(raw)
                sources[:n] = [src] * n
                self.source = src
            else:
                self.source = None
                each = []
                for i in range(n):
                    raw = names[i * _NAME:i * _NAME + (h[_Q * i + 1] & 0xFFFFFFFF)].tobytes()
                    src = cache.get(raw)
                    if src is None:
                        if len(cache) >= _CACHE:
                            cache.clear()
                        src = cache[raw] = decode(raw)
                    each.append(src)
                sources[:n] = each
            controls = h[5:_Q * n:_Q].tolist()  # (the kernel's: 0 unless coalesced)
            if controls.count(0) == n:
                return n
            return self._cut(n, [self._segment(i) if c else 0 for i, c in enumerate(controls)])
        n = 0
        recv = sock.recvfrom_into
        rx = self.rx
        try:
            while n < min(limit, self.size):
                self.lengths[n], self.sources[n] = recv(rx[n * SLOT:(n + 1) * SLOT])
                n += 1
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            if n == 0:
                raise
            # after some datagrams: those go on, and the error (taken off the socket by
            # this read) is not counted, as with recvmmsg
        self._last = n
        self.starts = range(0, n * SLOT, SLOT)
        src = self.sources[0]
        self.source = src if n and self.sources[:n].count(src) == n else None
        return n

    def _segment(self, i: int) -> int:
        """The segment size in message ``i``'s control buffer (0: none there)."""
        _, level, kind, segment = struct.unpack_from("=Qiii", self._rx_ctl, i * _RX_CMSG)
        return segment if level == SOL_UDP and kind == UDP_GRO else 0

    def _cut(self, n: int, segments: list[int]) -> int:
        """Messages of the last recvmmsg that hold several datagrams (a receive-offload
        socket took another hop's offloaded run as one): their datagrams, each with its
        own entry, where the sender's ended (every ``segment`` bytes, the last one
        shorter or not). Returns how many datagrams there are now."""
        starts: list[int] = []
        lengths: list[int] = []
        sources: list[Addr] = []
        for i in range(n):
            size, src, at, segment = self.lengths[i], self.sources[i], i * SLOT, segments[i]
            if 0 < segment < size:
                k = -(-size // segment)
                starts.extend(range(at, at + size, segment))
                lengths.extend([segment] * (k - 1))
                lengths.append(size - segment * (k - 1))
                sources.extend([src] * k)
            else:
                starts.append(at)
                lengths.append(size)
                sources.append(src)
        self.starts, self.lengths, self.sources = starts, lengths, sources
        self._last = len(starts)
        return self._last

    def took(self, size: int, segment: int, src: Addr) -> int:
        """Set up as if :meth:`recv` had taken one message of ``size`` bytes in slot 0
        from ``src``, made of datagrams of ``segment`` bytes (a coalesced message read
        by someone else: the forwarder's one-datagram path); how many datagrams."""
        self.lengths[0], self.sources[0] = size, src
        self.source = src
        self._last = 1
        return self._cut(1, [segment])

    def payload(self, i: int) -> memoryview:
        """Datagram ``i`` of the last :meth:`recv` (valid until the next one)."""
        at = self.starts[i]
        return self.rx[at:at + self.lengths[i]]

    # -- sending -----------------------------------------------------------------------
    def _name(self, family: int, dst: Addr) -> tuple[int, int]:
        """The address and length of ``dst``'s sockaddr, encoded once per destination
        (OSError: not an address for a socket of ``family``)."""
        key = (family, dst)
        entry = self._dst_cache.get(key)
        if entry is None:
            if len(self._dst_cache) >= _CACHE:  # headers being filled may point at them
                self._retired.extend(self._dst_cache.values())
                self._dst_cache.clear()
            buf = ctypes.create_string_buffer(encode(family, dst))
            entry = self._dst_cache[key] = ((ctypes.addressof(buf), len(buf) - 1), buf)
        return entry[0]  # type: ignore[return-value]

    def relay(self, family: int, i: int, dst: Addr) -> None:
        """Queue received datagram ``i`` as is, to ``dst`` on a socket of ``family``."""
        n = self.lengths[i]
        self._queue.append((self.starts[i], n, family, dst, n, 1))

    def put(self, family: int, data: bytes, dst: Addr) -> None:
        """Queue a copy of ``data`` to ``dst`` (ValueError if larger than a datagram)."""
        n = len(data)
        if n > SLOT:
            raise ValueError(f"{n} bytes do not fit a datagram")
        off = self._tx_off
        self.tx[off:off + n] = data
        self._tx_off = off + n
        self._queue.append((-1 - off, n, family, dst, n, 1))

    def transform(self, batch: BatchFn, family: int, dst: Addr, first: int = 0,
                  count: int | None = None) -> int:
        """Transform received datagrams ``first`` to ``first + count`` (all of the last
        :meth:`recv` by default) with ``batch`` into the send area and queue what it
        returns to ``dst``; returns how many it refused.

        The outputs lie back to back, so consecutive outputs of one size leave as one
        run: one ``iovec`` and one segmentation-offloaded send for up to
        :data:`GSO_SEGMENTS` datagrams, and no Python per datagram here or in
        :meth:`flush` (``batch`` itself loops once over them).
        """
        n = self._last if count is None else count
        off = self._tx_off
        sizes = batch(self.rx, self.starts[first:first + n], self.lengths[first:first + n], n,
                      self.tx, off)
        return self._enqueue(sizes, n, off, family, dst)

    def _enqueue(self, sizes: list[int], n: int, off: int, family: int, dst: Addr) -> int:
        """Queue the outputs a batch transform wrote from ``off`` (``sizes``: each one's
        length, -1 for a refusal) to ``dst``; returns how many it refused."""
        queue = self._queue
        seg = sizes[0] if n else 0
        if n and sizes.count(seg) == n and seg > 0:  # all accepted, of one size
            self._tx_off = off + n * seg
            if not self.gso or seg > GSO_SIZE or (
                    self._no_gso_dst and (family, dst) in self._no_gso_dst):
                queue.extend([(-1 - off - j * seg, seg, family, dst, seg, 1) for j in range(n)])
                return 0
            run = min(GSO_SEGMENTS, GSO_BYTES // seg)
            if n <= run:  # (the usual burst: one run)
                queue.append((-1 - off, n * seg, family, dst, seg, n))
                return 0
            for j in range(0, n, run):
                k = min(run, n - j)
                queue.append((-1 - off - j * seg, k * seg, family, dst, seg, k))
            return 0
        refused = 0
        for k in sizes:  # some refused, or sizes vary (or empty): one entry each
            if k < 0:
                refused += 1
                continue
            queue.append((-1 - off, k, family, dst, k, 1))
            off += k
        self._tx_off = off
        return refused

    def transform_send(self, batch: BatchFn, family: int, dst: Addr,
                       sock: socket.socket) -> tuple[int, int, int]:
        """:meth:`transform` of everything the last :meth:`recv` took, then :meth:`flush`:
        returns (refused, failed, overflowed).

        Every wakeup of a sealing end is this call, and the usual outcome, every output
        accepted and of one size, leaves from here as it lies in the send area: one
        datagram with ``sendto``, a run with one segmentation-offloaded ``sendmsg``
        (:meth:`_send_run`), with no slices of the receive state, no queue entry and no
        flush dispatch on the way: that glue cost about as much per wakeup as the AEAD
        calls of a dozen datagrams (``bench/sealing_bench.py``). Anything else (a
        refusal, mixed sizes, a run too long for one send, a route without offload, an
        earlier queue) takes :meth:`transform` and :meth:`flush` as before.
        :data:`FUSED` off: always that way (tests run both).
        """
        n = self._last
        if not FUSED or not n or self._queue or not self.mmsg:
            refused = self.transform(batch, family, dst)
            return (refused, *self.flush(sock))
        lengths = self.lengths
        off = self._tx_off
        sizes = batch(self.rx, self.starts, lengths if len(lengths) == n else lengths[:n], n,
                      self.tx, off)
        seg = sizes[0]
        if seg > 0 and sizes.count(seg) == n:
            if n == 1:
                return (0, *self._send_each(sock, [(-1 - off, seg, family, dst, seg, 1)]))
            if (self.gso and seg <= GSO_SIZE and n <= GSO_SEGMENTS and n * seg <= GSO_BYTES
                    and (family, dst) not in self._no_gso_dst):
                return (0, *self._send_run(sock, [(-1 - off, n * seg, family, dst, seg, n)]))
        refused = self._enqueue(sizes, n, off, family, dst)
        return (refused, *self.flush(sock))

    def flush(self, sock: socket.socket) -> tuple[int, int]:
        """Send the queue on ``sock``; returns (failed, overflowed): datagrams refused
        with an error, and datagrams the full send buffer could not take (UDP drops)."""
        queue = self._queue
        if not queue:
            return 0, 0
        self._queue = []
        self._tx_off = 0
        if len(queue) == 1 and self.mmsg:
            if queue[0][5] == 1:
                return self._send_each(sock, queue)  # one datagram: sendto costs the least
            return self._send_run(sock, queue)
        if not self.mmsg:
            return self._send_each(sock, queue)
        try:
            return self._send_groups(sock, queue)
        finally:
            self._retired.clear()

    def _send_run(self, sock: socket.socket, queue: list[Entry]) -> tuple[int, int]:
        """Send a queue of one run (a burst as :meth:`transform` queues it: a sealing
        end's every wakeup) as one segmentation-offloaded ``sendmsg``: the socket's own
        method, with the control message made once per segment size. Through ctypes,
        :meth:`_send_groups` filled a header in Python and converted the call's
        arguments, several microseconds more per wakeup (``bench/sealing_bench.py``).
        A route that refuses the offload gets the run one datagram at a time, and
        later runs to that destination are not made (as in :meth:`_send_groups`)."""
        where, n, family, dst, seg, count = queue[0]
        cmsg = self._seg_cmsg.get(seg)
        if cmsg is None:
            cmsg = self._seg_cmsg[seg] = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", seg))]
        view = self.rx[where:where + n] if where >= 0 else self.tx[-1 - where:-1 - where + n]
        try:
            sock.sendmsg((view,), cmsg, 0, dst)
        except (BlockingIOError, InterruptedError):  # the send buffer is full: UDP drops
            return 0, count
        except OSError as exc:
            if exc.errno not in _NO_GSO:
                return count, 0  # an unreachable network, no address for it
            self._no_gso_dst.add((family, dst))
            with contextlib.suppress(OSError):
                self._no_gso.add(self._name(family, dst))
            self._retired.clear()
            return self._send_each(sock, queue)
        return 0, 0

    def _send_each(self, sock: socket.socket, queue: list[Entry]) -> tuple[int, int]:
        """``sendto`` each queued datagram: (failed, overflowed)."""
        failed = overflow = 0
        send, rx, tx = sock.sendto, self.rx, self.tx
        for where, n, _, dst, seg, count in queue:
            view = rx[where:where + n] if where >= 0 else tx[-1 - where:-1 - where + n]
            for j in range(0, n, seg) if count > 1 else (0,):
                try:
                    send(view[j:j + seg] if count > 1 else view, dst)
                except (BlockingIOError, InterruptedError):
                    overflow += 1
                except OSError:
                    failed += 1
        return failed, overflow

    def _send_groups(self, sock: socket.socket, queue: list[Entry]) -> tuple[int, int]:
        """sendmmsg the queue, consecutive datagrams of one size to one destination as
        one segmentation offload send (``UDP_SEGMENT``) where the kernel takes it: a
        run from :meth:`transform` as it is, lone datagrams grouped here."""
        h, iov = self._tx_h, self._tx_iov_q
        rx_base, tx_base, iov_addr = self._rx_base, self._tx_base, self._tx_iov_addr
        no_gso = self._no_gso
        counts: list[int] = []  # datagrams per header
        iovs: list[int] = []  # iovecs (queue entries) per header
        starts: list[int] = []
        sizes: list[int] = []
        seg = left = failed = 0
        grow = False
        gname: object = None
        names = []
        kept = 0
        for entry in queue:
            try:
                names.append(self._name(entry[2], entry[3]))
            except OSError:  # no address for this socket: these datagrams fail
                failed += entry[5]
            else:
                queue[kept] = entry
                kept += 1
        del queue[kept:]
        for j, (where, n, _, _, dseg, count) in enumerate(queue):
            name = names[j]
            iov[2 * j] = rx_base + where if where >= 0 else tx_base - 1 - where
            iov[2 * j + 1] = n
            if count == 1 and grow and 0 < n <= seg and name == gname and left >= n:
                counts[-1] += 1  # (an empty datagram goes alone)
                iovs[-1] += 1
                left -= n
                grow = n == seg and counts[-1] < GSO_SEGMENTS  # a shorter one ends it
                continue
            b = _Q * len(counts)
            h[b], h[b + 1] = name  # type: ignore[misc]
            h[b + 2] = iov_addr + 16 * j
            counts.append(count)
            iovs.append(1)
            starts.append(j)
            sizes.append(dseg)
            seg, gname, left = n, name, GSO_BYTES - n
            # a run is a header of its own; a lone datagram may start a group
            grow = count == 1 and self.gso and 0 < n <= GSO_SIZE and name not in no_gso
        ctl, ctl_addr = self._tx_ctl, self._tx_ctl_addr
        for g, k in enumerate(counts):
            b = _Q * g
            h[b + 3] = iovs[g]
            if k > 1:
                struct.pack_into("=QiiH", ctl, g * _CMSG, _CMSG_LEN, SOL_UDP, UDP_SEGMENT,
                                 sizes[g])
                h[b + 4], h[b + 5] = ctl_addr + g * _CMSG, _CMSG
            else:
                h[b + 4] = h[b + 5] = 0
        overflow = 0
        total, off, fd = len(counts), 0, sock.fileno()
        send = _MMSG[1]  # type: ignore[index]
        while off < total:
            at = self._tx_hdr_ptr if not off else ctypes.c_void_p(self._tx_hdr_addr + off * _HDR)
            r = send(fd, at, total - off, MSG_DONTWAIT)  # type: ignore[operator]
            if r >= 0:
                off += r
                continue
            err = ctypes.get_errno()
            if err in _AGAIN:  # the kernel's send buffer is full: UDP drops
                overflow += sum(counts[off:])
                break
            k = counts[off]
            if k > 1 and err in _NO_GSO:
                # this route takes no segmentation offload (a smaller MTU, no checksum
                # offload, an old kernel): that destination's datagrams go one by one
                no_gso.add(names[starts[off]])
                self._no_gso_dst.add((queue[starts[off]][2], queue[starts[off]][3]))
                f, o = self._send_each(sock, queue[starts[off]:starts[off] + iovs[off]])
                failed, overflow = failed + f, overflow + o
            else:
                failed += k  # an unreachable network, too large
            off += 1
        return failed, overflow


_scratch = threading.local()


def scratch(mmsg: bool | None = None) -> Batch:
    """This thread's :class:`Batch` (readiness callbacks run one at a time on a loop's
    thread and flush before they return, so every forwarder on it shares one)."""
    mmsg = AVAILABLE if mmsg is None else mmsg
    batches: dict[bool, Batch] | None = getattr(_scratch, "batches", None)
    if batches is None:
        batches = _scratch.batches = {}
    b = batches.get(mmsg)
    if b is None:
        b = batches[mmsg] = Batch(mmsg=mmsg)
    return b

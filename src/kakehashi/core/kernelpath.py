"""The kernel fast path of the UDP forwarder: nftables rewrites a locked session's datagrams.

Once a forwarding association is pure forwarding (no sealing or opening) and its port
record has locked both peers, what it does to each datagram is a fixed rewrite: from
the near peer to this host's near port becomes from this host's far port to the far
peer, and back. The first datagram still reaches user space, so the record (the one
sans-IO decision, :class:`kakehashi.core.datagram.PortRecord`) decides who the near peer
is; then this module adds that rewrite as elements of nftables sets and maps and the
kernel relays the rest without waking the process. A datagram that matches no element
(a spoofed source, another port) still reaches the socket and the record drops and
counts it.

The rewrite is **stateless** (payload mangling in the prerouting hook, conntrack turned
off for the session's tuples with ``notrack``) rather than conntrack DNAT/SNAT: a NAT
binding is made at a flow's first packet, and that packet already went through user
space untranslated; and on one host several hops rewrite the same datagram in one pass,
which one conntrack entry cannot express. Each hop position gets its own base chain, its
priority ordered by the position (outbound: the client first; answers: the last proxy
first), so on one host a datagram crosses every offloaded hop in a single kernel pass.

Scope: IPv4, and sessions whose two peers are addresses of this host (loopback, or this
host's own addresses): a rewritten datagram is then delivered locally. A peer on another
host would need the datagram forwarded (``ip_forward`` and the forward chain's consent)
and its source rewritten after routing; that is not done here, and such sessions stay in
user space.

One table per process, ``ip kakehashi_dgram_<pid>`` (:func:`table_script`), made once
through libnftables in this process (:class:`_Nft`), never by running ``nft`` (a
process per change held the loop ~10 ms), with each hop position's sets and chains
(:func:`position_script`); a session is elements only (:func:`session_elements`), added
and deleted by one netlink batch each (:class:`SetElements`), so its cost does not grow
with the sessions. The table is removed at exit; one left by a process that died
without cleaning up is removed by the next one that starts (one named for its own PID
as well: a process restarted in a PID namespace of its own gets the dead one's PID).
The per-element counters of each session's two tuples give the kernel's share (idle
timeout, metrics, the session's end), read over netlink by polling, in packets and
payload bytes, never as datagrams: a
segmentation-offloaded send (a user-space hop's burst, see
:mod:`kakehashi.core.udpbatch`, or a QUIC stack's) is one packet for several datagrams,
while its bytes are exact.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import ipaddress
import itertools
import logging
import os
import re
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

from kakehashi.core import fastpath

log = logging.getLogger("kakehashi.core.kernelpath")

Addr = tuple[str, int]
TABLE_PREFIX = "kakehashi_dgram_"
#: hop positions get base chains at these priorities (prerouting; conntrack is -200,
#: dstnat -100): outbound from OUT_BASE upwards, answers from BACK_BASE downwards
OUT_BASE = -190
BACK_BASE = -110
MAX_POSITION = 39
_TUPLE = "ipv4_addr . inet_service . ipv4_addr . inet_service"
_MATCH = "ip saddr . udp sport . ip daddr . udp dport"
#: libnftables by its soname (the one since nftables 0.9; ctypes.util.find_library would
#: run ldconfig in a process)
LIBRARY = "libnftables.so.1"
NETLINK_NETFILTER = 12
#: an IPv4 header without options and a UDP header: what a counter's bytes hold beyond
#: the payload, once per packet (the rules take no packet with IP options: see
#: :meth:`KernelPath._position_script`)
HEADERS = 20 + 8
#: seconds within which a second poll of the counters reuses the first one's reading
REFRESH_MIN = 0.05


class KernelPathError(RuntimeError):
    """nft refused or failed; the session stays in user space."""


class _Nft:
    """nftables through libnftables, in this process (the library ``nft`` itself is a
    front end of, so it is there wherever ``nft`` is).

    Why not the ``nft`` command: a process per rule change cost about 10 ms of fork,
    exec and start-up against well under 1 ms for the same batch through the library
    (measured: one session's install, counter read and removal 31 ms with three ``nft``
    processes, 0.8 ms here), and removal must be synchronous (the session's ports are
    about to be freed), so each teardown held the event loop for a process's run. The
    binding is the four calls of libnftables' stable API (nft_ctx_new,
    nft_run_cmd_from_buffer and its buffered output and errors) through ctypes, as the
    upstream Python binding does, so nothing else needs installing. It makes the table
    and the positions' sets and chains, and lists the tables (:func:`clean_stale`);
    sessions and counters go through :class:`SetElements`. Calls are made from the
    event loop's thread only (a context is not shared between threads).
    """

    def __init__(self) -> None:
        lib = ctypes.CDLL(LIBRARY)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_char_p
        self.lib = lib
        ctx = lib.nft_ctx_new(0)
        if not ctx:
            raise KernelPathError("libnftables could not make a context")
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        self.ctx = ctx

    def run(self, script: str) -> str:
        """Run ``script`` (nft syntax, one batch: all of it or nothing) and return what
        it printed; :class:`KernelPathError` with nft's message when it failed."""
        ctx = self.ctx
        rc = self.lib.nft_run_cmd_from_buffer(ctx, script.encode())
        out = (self.lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
        if rc != 0:
            err = (self.lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
            raise KernelPathError(err.strip() or f"nft failed ({rc})")
        return out


_lib: _Nft | None = None


def _nft(script: str) -> str:
    """Run an nft script through this process's libnftables context (made on first
    use). Raises :class:`KernelPathError`, or OSError when libnftables cannot be
    loaded."""
    global _lib
    if _lib is None:
        _lib = _Nft()
    return _lib.run(script)


#: CAP_NET_ADMIN's bit in the capability sets (linux/capability.h)
CAP_NET_ADMIN = 12


def _net_admin() -> bool:
    """Has this process CAP_NET_ADMIN in its effective set (what nftables asks for: a
    service without root can be given it, e.g. systemd's AmbientCapabilities=)?"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError):
        pass
    return False


def _libnftables() -> bool:
    """Can libnftables be loaded here?"""
    try:
        ctypes.CDLL(LIBRARY)
    except OSError:
        return False
    return True


def _is_local(host: str) -> bool:
    """Is ``host`` an IPv4 address of this host (a datagram to it is delivered here)?"""
    try:
        if ipaddress.ip_address(host).version != 4:
            return False
    except ValueError:
        return False
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((host, 0))
    except OSError:
        return False
    finally:
        s.close()
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Offload:
    """One session's rules: the tuples it rewrites and its counters' last readings."""

    sid: int
    position: int
    near: Addr
    near_port: Addr
    far_port: Addr
    far: Addr
    #: packets the kernel relayed each way, as last read: not datagrams, a
    #: segmentation-offloaded send of several datagrams is one packet here
    out_packets: int = 0
    back_packets: int = 0
    #: their UDP payload bytes (exact either way: the counter's bytes less one IPv4 and
    #: UDP header per packet, and an offloaded send has one for all its datagrams)
    out_bytes: int = 0
    back_bytes: int = 0
    installed: bool = False
    removed: bool = False

    def keys(self) -> tuple[bytes, bytes]:
        """The tuples its datagrams arrive with, from the near peer to the near port and
        from the far peer to the far port, as the kernel keys them (:func:`element_key`)."""
        return element_key(self.near, self.near_port), element_key(self.far, self.far_port)


#: the rewrite maps in the order a session's rule applies them, each with the field it
#: sets: see :func:`rewrite_elements`
REWRITES = (("saddr", "ip saddr", "ipv4_addr"), ("sport", "udp sport", "inet_service"),
            ("daddr", "ip daddr", "ipv4_addr"), ("dport", "udp dport", "inet_service"))


def table_script(t: str) -> str:
    """The table every session of this process shares, made once (:meth:`KernelPath.prepare`).

    A session is elements in these sets and maps, never rules, chains or named objects
    of its own: a change through libnftables (1.0.6 here) first fetches the table's
    chains, sets and named objects, so with a chain or a named counter per session each
    install and removal cost grows with the number of sessions (measured: 67 ms per
    install and removal with 2,000 sessions as chains and named counters), while set
    elements are not fetched for a hash set's change (docs/benchmarks.md); and the
    kernel looks a tuple up in a hash whatever the number of sessions.

    - ``tuples``: every offloaded tuple, both ways; the ``untracked`` chain takes them out
      of conntrack (the rewrite is stateless: see the module's docstring);
    - ``saddr``, ``sport``, ``daddr``, ``dport``: the rewrite, one field per map, each
      keyed by the tuple as it is when that field is set (:func:`rewrite_elements`);
    - the positions' sets (:func:`position_script`), whose elements count.
    """
    script = (f"add table ip {t}\n"
              f"add set ip {t} tuples {{ type {_TUPLE}; }}\n")
    for name, _, kind in REWRITES:
        script += f"add map ip {t} {name} {{ type {_TUPLE} : {kind}; }}\n"
    return script + (f"add chain ip {t} untracked {{ type filter hook prerouting "
                     f"priority -300; policy accept; }}\n"
                     f"add rule ip {t} untracked {_MATCH} @tuples notrack\n")


def position_script(t: str, k: int) -> str:
    """A hop position's two sets (the tuples it rewrites, each way) and their base
    chains, made when the position's first session is offloaded. The chain's one rule
    matches a tuple of the set, which counts it in the element's own counter (the set's
    ``counter`` flag: the session's count, read through netlink by
    :class:`SetElements`), and rewrites the four fields through the shared maps. The
    statements run in order and each lookup reads the packet as the statements before
    it left it, hence the keys of :func:`rewrite_elements`. Only packets without IP
    options are rewritten (``ip hdrlength 5``; the rare others go to user space), so a
    counter's bytes less :data:`HEADERS` per packet are exactly the payload."""
    rewrite = " ".join(f"{field} set {_MATCH} map @{name}" for name, field, _ in REWRITES)
    script = ""
    for way, priority in (("out", OUT_BASE + k), ("back", BACK_BASE - k)):
        script += (f"add set ip {t} {way}{k} {{ type {_TUPLE}; counter; }}\n"
                   f"add chain ip {t} {way}{k} {{ type filter hook prerouting priority "
                   f"{priority}; policy accept; }}\n"
                   f"add rule ip {t} {way}{k} ip hdrlength 5 {_MATCH} @{way}{k} {rewrite}\n")
    return script


Tuple = tuple[Addr, Addr]


def rewrite_elements(o: Offload) -> dict[str, list[tuple[Tuple, str | int]]]:
    """Each rewrite map's elements for the session, both ways: the tuple (source,
    destination) it is looked up with, and the field's new value.

    Outbound, (near -> near_port) becomes (far_port -> far): the source address, then
    the source port, then the destination address, then the destination port, each
    looked up with the tuple as the previous steps left it. Every key keeps one of this
    process's own data ports whole (the destination until the third step, then the new
    source), and those are bound sockets, distinct across sessions and ways: keys never
    collide, whatever the peers (on loopback, every address is the same)."""
    (nh, np_), (h1, p1), (h2, p2), (fh, fp) = o.near, o.near_port, o.far_port, o.far
    out: list[tuple[Tuple, str | int]] = [
        (((nh, np_), (h1, p1)), h2), (((h2, np_), (h1, p1)), p2),
        (((h2, p2), (h1, p1)), fh), (((h2, p2), (fh, p1)), fp)]
    back: list[tuple[Tuple, str | int]] = [
        (((fh, fp), (h2, p2)), h1), (((h1, fp), (h2, p2)), p1),
        (((h1, p1), (h2, p2)), nh), (((h1, p1), (nh, p2)), np_)]
    return {name: [out[i], back[i]] for i, (name, _, _) in enumerate(REWRITES)}


#: an element as sent to the kernel: its key and, in a map, its value
Element = tuple[bytes, "bytes | None"]


def session_elements(o: Offload) -> list[tuple[str, list[Element]]]:
    """The session's elements set by set, in the order they are added (one atomic
    batch: :meth:`SetElements.change`): the rewrite first, then the tuples in
    ``tuples`` and in the position's sets, so the rule can match only once its rewrite
    is whole. Removal deletes the same keys, the sets in the reverse order."""
    out_k, back_k = o.keys()
    return [(name, [(element_key(*key), socket.inet_aton(value) if isinstance(value, str)
                     else struct.pack("!H", value)) for key, value in elements])
            for name, elements in rewrite_elements(o).items()] + [
        ("tuples", [(out_k, None), (back_k, None)]),
        (f"out{o.position}", [(out_k, None)]), (f"back{o.position}", [(back_k, None)])]


def element_key(src: Addr, dst: Addr) -> bytes:
    """A tuple as the kernel holds it in a concatenated key: each field in network order
    in a 32-bit slot (a port's two bytes, then two of padding)."""
    return (socket.inet_aton(src[0]) + struct.pack("!H2x", src[1])
            + socket.inet_aton(dst[0]) + struct.pack("!H2x", dst[1]))


_NLA = struct.Struct("=HH")  # a netlink attribute's length and type
_U64 = struct.Struct("!Q")


def _attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + bytes(-n % 4)


def _spans(buf: bytes, i: int, end: int) -> Iterator[tuple[int, int, int]]:
    """The attributes in ``buf[i:end]``: (type, payload start, payload end) each, by
    offsets (a dump holds thousands of elements: no slices or lists on the way)."""
    while i + 4 <= end:
        n, kind = _NLA.unpack_from(buf, i)
        if n < 4:
            return
        yield kind & 0x3FFF, i + 4, i + n
        i += (n + 3) & ~3


def _fields(buf: bytes, i: int, end: int) -> dict[int, tuple[int, int]]:
    """The attributes in ``buf[i:end]`` by type (the last of a type): payload start and
    end. The same walk as :func:`_spans`, without a generator: an element's levels are
    read this way, thousands of times per dump."""
    out = {}
    while i + 4 <= end:
        n, kind = _NLA.unpack_from(buf, i)
        if n < 4:
            break
        out[kind & 0x3FFF] = (i + 4, i + n)
        i += (n + 3) & ~3
    return out


def _attrs(buf: bytes) -> list[tuple[int, bytes]]:
    return [(kind, buf[a:b]) for kind, a, b in _spans(buf, 0, len(buf))]


class SetElements:
    """The table's set elements over netlink: a session's added or deleted in one atomic
    batch, their counters read straight from the kernel.

    Why not libnftables: before each command it fetches the table's chains, sets and
    named objects (about ten netlink round trips, half a millisecond of a proxy's loop
    per session change, and more as the host's ruleset grows), and its ``get element``
    and ``list set`` fetch every element of the table first (26 ms for one element among
    8,000). Here an install or a removal is one batch of NEWSETELEM or DELSETELEM
    messages the kernel applies all or nothing (NFT_MSG_*SETELEM inside
    NFNL_MSG_BATCH_BEGIN/END, as libnftables itself sends them), and a reading asks the
    kernel for given keys (GETSETELEM), which it looks up. libnftables still makes the
    table and each position's sets and chains, once. Sans-IO: :meth:`batch` and
    :meth:`request` make the messages, :meth:`acks` and :meth:`parse` read the answers;
    :meth:`change` and :meth:`read` send them on one socket kept open (a netlink socket
    made after a commit that deleted elements took 6-15 ms to make; a kept one answers
    in 0.1 ms).
    """

    NFNL_SUBSYS_NFTABLES = 10
    NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM, NFT_MSG_DELSETELEM = 12, 13, 14
    NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
    NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP, NLM_F_CREATE = 1, 4, 0x300, 0x400
    NLMSG_ERROR, NLMSG_DONE = 2, 3
    NESTED = 0x8000
    # attributes: the element list's table, set and elements; a list's element; an
    # element's key, its expression (one) and expressions (several); a data value; an
    # expression's name and data; a counter's bytes and packets
    LIST_TABLE, LIST_SET, LIST_ELEMENTS, LIST_ELEM = 1, 2, 3, 1
    ELEM_KEY, ELEM_DATA, ELEM_EXPR, ELEM_EXPRESSIONS, DATA_VALUE = 1, 2, 7, 11, 1
    EXPR_NAME, EXPR_DATA, COUNTER_BYTES, COUNTER_PACKETS = 1, 2, 1, 2

    @classmethod
    def _list(cls, table: str, set_name: str) -> bytes:
        return (struct.pack("=BBH", socket.AF_INET, 0, 0)
                + _attr(cls.LIST_TABLE, table.encode() + b"\0")
                + _attr(cls.LIST_SET, set_name.encode() + b"\0"))

    @classmethod
    def batch(cls, table: str, add: bool, sets: list[tuple[str, list[Element]]],
              seq: int) -> bytes:
        """One batch adding (``add``) or deleting ``sets``' elements (a deletion sends
        the keys only): a message per set, numbered from ``seq`` + 1, each acknowledged
        (:meth:`acks`), between the batch's begin (``seq``) and end."""
        def message(kind: int, flags: int, n: int, body: bytes) -> bytes:
            return struct.pack("=IHHII", 16 + len(body), kind, flags, n, 0) + body

        bounds = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(cls.NFNL_SUBSYS_NFTABLES))
        op = cls.NFT_MSG_NEWSETELEM if add else cls.NFT_MSG_DELSETELEM
        flags = cls.NLM_F_REQUEST | cls.NLM_F_ACK | (cls.NLM_F_CREATE if add else 0)
        out = message(cls.NFNL_MSG_BATCH_BEGIN, cls.NLM_F_REQUEST, seq, bounds)
        for i, (set_name, elements) in enumerate(sets, 1):
            items = b"".join(
                _attr(cls.LIST_ELEM | cls.NESTED,
                      _attr(cls.ELEM_KEY | cls.NESTED, _attr(cls.DATA_VALUE, key))
                      + (_attr(cls.ELEM_DATA | cls.NESTED, _attr(cls.DATA_VALUE, data))
                         if add and data is not None else b""))
                for key, data in elements)
            out += message((cls.NFNL_SUBSYS_NFTABLES << 8) | op, flags, seq + i,
                           cls._list(table, set_name)
                           + _attr(cls.LIST_ELEMENTS | cls.NESTED, items))
        return out + message(cls.NFNL_MSG_BATCH_END, cls.NLM_F_REQUEST, seq + len(sets) + 1,
                             bounds)

    @classmethod
    def acks(cls, data: bytes, first: int, last: int,
             errors: dict[int, int]) -> int:
        """Count the acknowledgements of messages ``first``..``last`` in one read and put
        each non-zero error (a negative errno) in ``errors`` by message number."""
        i, n = 0, 0
        while i + 16 <= len(data):
            size, kind, _, got = struct.unpack_from("=IHHI", data, i)
            if kind == cls.NLMSG_ERROR and first <= got <= last:
                n += 1
                err = struct.unpack_from("=i", data, i + 16)[0]
                if err:
                    errors[got] = err
            i += max(16, (size + 3) & ~3)
        return n

    @classmethod
    def request(cls, table: str, set_name: str, keys: list[bytes] | None,
                seq: int = 1) -> bytes:
        """The request for ``keys`` of ``ip table set_name``; None: all (a dump)."""
        body = cls._list(table, set_name)
        if keys is not None:
            body += _attr(cls.LIST_ELEMENTS | cls.NESTED, b"".join(
                _attr(cls.LIST_ELEM | cls.NESTED,
                      _attr(cls.ELEM_KEY | cls.NESTED, _attr(cls.DATA_VALUE, k)))
                for k in keys))
        flags = cls.NLM_F_REQUEST | (cls.NLM_F_DUMP if keys is None else cls.NLM_F_ACK)
        kind = (cls.NFNL_SUBSYS_NFTABLES << 8) | cls.NFT_MSG_GETSETELEM
        return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = itertools.count(1)

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            sock.bind((0, 0))
            sock.settimeout(5)
            self._sock = sock
        return self._sock

    def _numbers(self, n: int) -> int:
        """``n`` consecutive message numbers; the first."""
        first = next(self._seq)
        for _ in range(n - 1):
            next(self._seq)
        return first & 0x7FFFFFFF

    def change(self, table: str, add: bool, sets: list[tuple[str, list[Element]]]) -> None:
        """Add (or delete) ``sets``' elements in ``ip table``, all or nothing.
        :class:`KernelPathError` with the kernel's reason when it refused (then nothing
        changed), OSError when it did not answer."""
        seq = self._numbers(len(sets) + 2)
        errors: dict[int, int] = {}
        try:
            sock = self._socket()
            sock.send(self.batch(table, add, sets, seq))
            got = 0
            while got < len(sets):
                got += self.acks(sock.recv(1 << 16), seq + 1, seq + len(sets), errors)
        except OSError as exc:
            if exc.errno is None:  # no answer: the next change gets a clean socket
                self.close()
            raise
        if errors:
            n, err = min(errors.items())
            raise KernelPathError(f"{'add' if add else 'delete'} element in "
                                  f"{sets[n - seq - 1][0]}: {os.strerror(-err)}")

    def read(self, table: str, set_name: str,
             keys: list[bytes] | None = None) -> dict[bytes, tuple[int, int]]:
        """The (packets, bytes) of ``keys`` in ``ip table set_name`` (None: every
        element), by key; OSError when the kernel refuses (ENOENT: no such set or
        element) or does not answer."""
        seq = self._numbers(1)
        counts: dict[bytes, tuple[int, int]] = {}
        try:
            sock = self._socket()
            sock.send(self.request(table, set_name, keys, seq))
            while not self.parse(sock.recv(1 << 20), counts, seq):
                pass
        except OSError as exc:
            if exc.errno is None:  # no answer: a later reading gets a clean socket
                self.close()
            raise
        return counts

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @classmethod
    def parse(cls, data: bytes, counts: dict[bytes, tuple[int, int]], seq: int = 1) -> bool:
        """Add the elements' (packets, bytes) in one read of replies to request ``seq``
        to ``counts`` by key (replies to an earlier request are skipped); True once the
        answer is complete. OSError with the kernel's error."""
        i, done = 0, False
        while i + 16 <= len(data):
            n, kind, _, got = struct.unpack_from("=IHHI", data, i)
            payload = data[i + 16:i + n]
            i += max(16, (n + 3) & ~3)
            if got != seq:
                continue
            if kind == cls.NLMSG_ERROR:
                err = struct.unpack_from("=i", payload)[0]
                if err:
                    raise OSError(-err, os.strerror(-err))
                done = True
            elif kind == cls.NLMSG_DONE:
                done = True
            else:
                for a, value in _attrs(payload[4:]):
                    if a == cls.LIST_ELEMENTS:
                        for _, start, stop in _spans(value, 0, len(value)):
                            cls._element(value, start, stop, counts)
        return done

    @classmethod
    def _element(cls, elem: bytes, i: int, end: int,
                 counts: dict[bytes, tuple[int, int]]) -> None:
        """The key and counter of the element in ``elem[i:end]``."""
        fields = _fields(elem, i, end)
        key = fields.get(cls.ELEM_KEY)
        exprs = [fields[cls.ELEM_EXPR]] if cls.ELEM_EXPR in fields else []
        if cls.ELEM_EXPRESSIONS in fields:
            exprs += [(s, e) for _, s, e in _spans(elem, *fields[cls.ELEM_EXPRESSIONS])]
        for start, stop in exprs:
            expr = _fields(elem, start, stop)
            name, data = expr.get(cls.EXPR_NAME), expr.get(cls.EXPR_DATA)
            if key and name and data and elem[name[0]:name[1]].rstrip(b"\0") == b"counter":
                c = _fields(elem, *data)
                # the key: a nest of one DATA_VALUE
                counts[elem[key[0] + 4:key[1]]] = (
                    _U64.unpack_from(elem, c[cls.COUNTER_PACKETS][0])[0],
                    _U64.unpack_from(elem, c[cls.COUNTER_BYTES][0])[0])
                return


class KernelPath:
    """This process's nftables table and the sessions offloaded into it."""

    def __init__(self) -> None:
        self.table = f"{TABLE_PREFIX}{os.getpid()}"
        self._ids = itertools.count(1)
        self._positions: set[int] = set()
        self.sessions: dict[int, Offload] = {}
        self._created = False
        self._refreshed = float("-inf")
        self._refresh_cost = 0.0
        self._sets = SetElements()

    # -- availability ---------------------------------------------------------------------
    @staticmethod
    def unavailable() -> str | None:
        """Why the kernel path cannot be used here, or None."""
        if not (hasattr(os, "geteuid") and os.geteuid() == 0) and not _net_admin():
            return "not running as root or with CAP_NET_ADMIN"
        if not _libnftables():
            return "libnftables (nftables) is not installed"
        return None

    def prepare(self) -> None:
        """Remove tables of dead processes, create this one (:func:`table_script`), remove
        it at exit. Raises :class:`KernelPathError` when nftables refuses.

        A table already named for this PID is a dead process's: this one has made none
        yet. A process killed in a PID namespace of its own (a container, a service
        with private PIDs) is restarted with the same PID, and ``add table`` keeps
        what is there: the dead one's rewrites would have stayed in this table for as
        long as it ran. So it goes first (adding then deleting: no error when absent),
        in the same batch as the new table."""
        clean_stale()
        _nft(f"add table ip {self.table}\ndelete table ip {self.table}\n"
             + table_script(self.table))
        self._created = True
        atexit.register(self.remove_table)

    def remove_table(self) -> None:
        if self._created:
            self._created = False
            with contextlib.suppress(KernelPathError, OSError):
                _nft(f"delete table ip {self.table}\n")
        self._sets.close()

    # -- sessions -------------------------------------------------------------------------
    def eligible(self, near: Addr, near_port: Addr, far_port: Addr, far: Addr) -> str | None:
        """Why this session cannot be offloaded, or None."""
        for host, _ in (near_port, far_port):
            try:
                if ipaddress.ip_address(host).is_unspecified:
                    return "the data ports are bound to a wildcard address"
            except ValueError:
                return f"{host!r} is not an address"
        for host, _ in (near, far):
            if not _is_local(host):
                return f"{host} is not an IPv4 address of this host"
        return None

    def new(self, position: int, near: Addr, near_port: Addr, far_port: Addr,
            far: Addr) -> Offload:
        return Offload(next(self._ids), max(0, min(position, MAX_POSITION)),
                       near[:2], near_port[:2], far_port[:2], far[:2])

    async def install(self, o: Offload) -> None:
        """Add the session's elements (:func:`session_elements`, one netlink batch): from
        now on the kernel relays its datagrams. The position's sets and chains are made
        first through libnftables when it is the position's first session. (Well under a
        millisecond, made here on the loop's thread; a coroutine so the forwarder need
        not know how nftables is reached.)"""
        if o.position not in self._positions:
            _nft(position_script(self.table, o.position))
            self._positions.add(o.position)
        self._sets.change(self.table, True, session_elements(o))
        o.installed = True
        self.sessions[o.sid] = o

    def remove(self, o: Offload) -> None:
        """Delete the session's elements now (synchronously: its ports are about to be
        closed and may be taken by the next session), after the last reading of its
        counters."""
        if o.removed or not o.installed:
            o.removed = True
            return
        o.removed = True
        self.sessions.pop(o.sid, None)
        with contextlib.suppress(OSError):
            self._read(o)  # the last reading, straight from the kernel
        try:
            self._sets.change(self.table, False, session_elements(o)[::-1])
        except (KernelPathError, OSError) as exc:
            log.warning("kernel fast path: could not remove the elements of session %d: %s",
                        o.sid, exc)

    # -- counters -------------------------------------------------------------------------
    @staticmethod
    def _apply(o: Offload, out: tuple[int, int] | None, back: tuple[int, int] | None) -> None:
        """Take a session's readings, (packets, bytes) each way, as payload."""
        if out is not None:
            o.out_packets, o.out_bytes = out[0], out[1] - HEADERS * out[0]
        if back is not None:
            o.back_packets, o.back_bytes = back[0], back[1] - HEADERS * back[0]

    def _read(self, o: Offload) -> None:
        """Read one session's counters (two keys, looked up by the kernel)."""
        k, (out_t, back_t) = o.position, o.keys()
        self._apply(o, self._sets.read(self.table, f"out{k}", [out_t]).get(out_t),
                    self._sets.read(self.table, f"back{k}", [back_t]).get(back_t))

    async def refresh(self) -> None:
        """Read every offloaded session's counters: a dump of each position's two sets.
        Sessions polling within :data:`REFRESH_MIN` of each other share one reading, and
        so do those within ten times the last reading's duration (a large table's dump
        takes milliseconds; the polls then keep to a tenth of the loop's time)."""
        now = asyncio.get_running_loop().time()
        if now - self._refreshed < max(REFRESH_MIN, 10 * self._refresh_cost):
            return
        self._refreshed = now
        sessions = [o for o in self.sessions.values() if o.installed and not o.removed]
        if not sessions:
            return
        t0 = time.perf_counter()
        counts: dict[bytes, tuple[int, int]] = {}
        with contextlib.suppress(OSError):
            for k in {o.position for o in sessions}:
                counts.update(self._sets.read(self.table, f"out{k}"))
                counts.update(self._sets.read(self.table, f"back{k}"))
        for o in sessions:
            out_t, back_t = o.keys()
            self._apply(o, counts.get(out_t), counts.get(back_t))
        self._refresh_cost = time.perf_counter() - t0


def clean_stale() -> list[str]:
    """Delete the tables of kakehashi processes that are gone; returns their names."""
    try:
        listing = _nft("list tables\n")
    except (KernelPathError, OSError):
        return []
    gone = []
    for m in re.finditer(rf"^table ip ({TABLE_PREFIX}(\d+))$", listing, re.M):
        if int(m.group(2)) != os.getpid() and not _pid_alive(int(m.group(2))):
            with contextlib.suppress(KernelPathError, OSError):
                _nft(f"delete table ip {m.group(1)}\n")
                gone.append(m.group(1))
    for name in gone:
        log.info("kernel fast path: removed %s, left by a process that is gone", name)
    return gone


_shared: KernelPath | None = None
_shared_why: str | None = None


def shared() -> tuple[KernelPath | None, str | None]:
    """This process's kernel path, prepared on first use, or (None, why not)."""
    global _shared, _shared_why
    if _shared is None and _shared_why is None:
        why = KernelPath.unavailable()
        if why is None:
            kp = KernelPath()
            try:
                kp.prepare()
            except (KernelPathError, OSError) as exc:
                why = f"nftables refused the table: {exc}"
            else:
                _shared = kp
        _shared_why = why
    return _shared, _shared_why


def for_mode(mode: str) -> tuple[KernelPath | None, str | None]:
    """This process's kernel path for ``mode`` (:func:`shared`), or (None, why not);
    ``off`` and ``on`` never try it. Raises :class:`KernelPathError` for ``kernel`` when
    the kernel path is unavailable: asked for by name, its absence is an error at start
    (``auto`` is the mode that falls back)."""
    if not fastpath.wants_kernel(mode):
        return None, None
    kernel, why = shared()
    if kernel is None and mode == "kernel":
        raise KernelPathError(f"--fast-path kernel: kernel path unavailable: {why} "
                              f"(--fast-path auto falls back to the user-space fast path)")
    return kernel, why

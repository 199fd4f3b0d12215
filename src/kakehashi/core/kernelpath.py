"""The kernel fast path of the UDP forwarder: nftables rewrites a locked session's datagrams.

Once a forwarding association is pure forwarding (no sealing or opening) and its port
record has locked both peers, what it does to each datagram is a fixed rewrite: from
the near peer to this host's near port becomes from this host's far port to the far
peer, and back. The first datagram still reaches user space, so the record (the one
sans-IO decision, :class:`kakehashi.core.datagram.PortRecord`) decides who the near peer
is; then this module installs that rewrite as nftables rules and the kernel relays the
rest without waking the process. A datagram that matches no rule (a spoofed source,
another port) still reaches the socket and the record drops and counts it.

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

Rules are changed through libnftables in this process (:class:`_Nft`), not by running
``nft``: a teardown is synchronous and a process per change held the loop ~10 ms.
One table per process, ``ip kakehashi_dgram_<pid>``, removed at exit; a table left by a
process that died without cleaning up is removed by the next one that starts. Named counters
on each session's rules give the kernel's share (idle timeout, metrics, the session's
end), read by polling, in packets and payload bytes, never as datagrams: a
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
import json
import logging
import os
import re
import socket
from dataclasses import dataclass

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
    upstream Python binding does, so nothing else needs installing. Two contexts: one
    with JSON output for reading counters, one for changes and text listings. Calls are
    made from the event loop's thread only (a context is not shared between threads).
    """

    #: NFT_CTX_OUTPUT_JSON in libnftables' output flags
    OUTPUT_JSON = 1 << 4

    def __init__(self) -> None:
        lib = ctypes.CDLL(LIBRARY)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_char_p
        self.lib = lib
        self.text = self._context(0)
        self.json = self._context(self.OUTPUT_JSON)

    def _context(self, flags: int) -> int:
        ctx = self.lib.nft_ctx_new(0)
        if not ctx:
            raise KernelPathError("libnftables could not make a context")
        self.lib.nft_ctx_buffer_output(ctx)
        self.lib.nft_ctx_buffer_error(ctx)
        if flags:
            self.lib.nft_ctx_output_set_flags(ctx, flags)
        return ctx

    def run(self, script: str, *, as_json: bool = False) -> str:
        """Run ``script`` (nft syntax, one batch: all of it or nothing) and return what
        it printed; :class:`KernelPathError` with nft's message when it failed."""
        ctx = self.json if as_json else self.text
        rc = self.lib.nft_run_cmd_from_buffer(ctx, script.encode())
        out = (self.lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
        if rc != 0:
            err = (self.lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
            raise KernelPathError(err.strip() or f"nft failed ({rc})")
        return out


_lib: _Nft | None = None


def _nft(script: str, *, as_json: bool = False) -> str:
    """Run an nft script through this process's libnftables contexts (made on first
    use). Raises :class:`KernelPathError`, or OSError when libnftables cannot be
    loaded."""
    global _lib
    if _lib is None:
        _lib = _Nft()
    return _lib.run(script, as_json=as_json)


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

    def tuples(self) -> tuple[str, str]:
        (nh, np_), (h1, p1), (h2, p2), (fh, fp) = (self.near, self.near_port,
                                                   self.far_port, self.far)
        return f"{nh} . {np_} . {h1} . {p1}", f"{fh} . {fp} . {h2} . {p2}"


class KernelPath:
    """This process's nftables table and the sessions offloaded into it."""

    def __init__(self) -> None:
        self.table = f"{TABLE_PREFIX}{os.getpid()}"
        self._ids = itertools.count(1)
        self._positions: set[int] = set()
        self.sessions: dict[int, Offload] = {}
        self._created = False
        self._refreshed = float("-inf")

    # -- availability ---------------------------------------------------------------------
    @staticmethod
    def unavailable() -> str | None:
        """Why the kernel path cannot be used here, or None."""
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            return "not running as root"
        if not _libnftables():
            return "libnftables (nftables) is not installed"
        return None

    def prepare(self) -> None:
        """Remove tables of dead processes, create this one, remove it at exit.
        Raises :class:`KernelPathError` when nftables refuses."""
        clean_stale()
        _nft(f"add table ip {self.table}\n"
                  f"add set ip {self.table} tuples {{ type {_TUPLE}; }}\n"
                  f"add chain ip {self.table} untracked {{ type filter hook prerouting "
                  f"priority -300; policy accept; }}\n"
                  f"add rule ip {self.table} untracked {_MATCH} @tuples notrack\n")
        self._created = True
        atexit.register(self.remove_table)

    def remove_table(self) -> None:
        if self._created:
            self._created = False
            with contextlib.suppress(KernelPathError, OSError):
                _nft(f"delete table ip {self.table}\n")

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

    def _position_script(self, k: int) -> str:
        """A hop position's maps and base chains. Only packets without IP options are
        rewritten (``ip hdrlength 5``; the rare others go to user space), so a counter's
        bytes less :data:`HEADERS` per packet are exactly the payload."""
        t = self.table
        return (f"add map ip {t} out{k} {{ type {_TUPLE} : verdict; }}\n"
                f"add map ip {t} back{k} {{ type {_TUPLE} : verdict; }}\n"
                f"add chain ip {t} out{k} {{ type filter hook prerouting priority "
                f"{OUT_BASE + k}; policy accept; }}\n"
                f"add rule ip {t} out{k} ip hdrlength 5 {_MATCH} vmap @out{k}\n"
                f"add chain ip {t} back{k} {{ type filter hook prerouting priority "
                f"{BACK_BASE - k}; policy accept; }}\n"
                f"add rule ip {t} back{k} ip hdrlength 5 {_MATCH} vmap @back{k}\n")

    def new(self, position: int, near: Addr, near_port: Addr, far_port: Addr,
            far: Addr) -> Offload:
        return Offload(next(self._ids), max(0, min(position, MAX_POSITION)),
                       near[:2], near_port[:2], far_port[:2], far[:2])

    async def install(self, o: Offload) -> None:
        """Add the session's rules: from now on the kernel relays its datagrams. (One
        library call of well under a millisecond, made here on the loop's thread; a
        coroutine so the forwarder need not know how nftables is reached.)"""
        t, k, sid = self.table, o.position, o.sid
        script = ""
        if k not in self._positions:
            script += self._position_script(k)
        (h1, p1), (h2, p2) = o.near_port, o.far_port
        (nh, np_), (fh, fp) = o.near, o.far
        out_t, back_t = o.tuples()
        # named counters: read (and at the end reset) one by one without listing the
        # table, a cost that would grow with the number of sessions
        script += (
            f"add counter ip {t} s{sid}o\nadd counter ip {t} s{sid}b\n"
            f"add chain ip {t} s{sid}o\n"
            f"add rule ip {t} s{sid}o counter name s{sid}o ip saddr set {h2} ip daddr set {fh} "
            f"udp sport set {p2} udp dport set {fp}\n"
            f"add chain ip {t} s{sid}b\n"
            f"add rule ip {t} s{sid}b counter name s{sid}b ip saddr set {h1} ip daddr set {nh} "
            f"udp sport set {p1} udp dport set {np_}\n"
            f"add element ip {t} tuples {{ {out_t}, {back_t} }}\n"
            f"add element ip {t} out{k} {{ {out_t} : jump s{sid}o }}\n"
            f"add element ip {t} back{k} {{ {back_t} : jump s{sid}b }}\n")
        _nft(script)
        self._positions.add(k)
        o.installed = True
        self.sessions[sid] = o

    def remove(self, o: Offload) -> None:
        """Delete the session's rules now (synchronously: its ports are about to be
        closed and may be taken by the next session)."""
        if o.removed or not o.installed:
            o.removed = True
            return
        o.removed = True
        self.sessions.pop(o.sid, None)
        t, k, sid = self.table, o.position, o.sid
        out_t, back_t = o.tuples()
        with contextlib.suppress(KernelPathError, OSError, ValueError):
            # the last reading: reset, as nothing reads these counters after this (a
            # reset is answered without a listing; see _apply)
            self._apply(_nft(f"reset counter ip {t} s{sid}o\nreset counter ip {t} s{sid}b\n",
                             as_json=True), [o])
        try:
            _nft(f"delete element ip {t} out{k} {{ {out_t} }}\n"
                 f"delete element ip {t} back{k} {{ {back_t} }}\n"
                 f"delete element ip {t} tuples {{ {out_t}, {back_t} }}\n"
                 f"flush chain ip {t} s{sid}o\nflush chain ip {t} s{sid}b\n"
                 f"delete chain ip {t} s{sid}o\ndelete chain ip {t} s{sid}b\n"
                 f"delete counter ip {t} s{sid}o\ndelete counter ip {t} s{sid}b\n")
        except (KernelPathError, OSError) as exc:
            log.warning("kernel fast path: could not remove the rules of session %d: %s",
                        sid, exc)

    # -- counters -------------------------------------------------------------------------
    @staticmethod
    def _apply(out: str, sessions: list[Offload]) -> None:
        """Take the readings of the sessions' named counters from nft's JSON output (one
        document per command). Measured with 200 sessions in the table: a ``reset
        counter`` 0.1 ms, ``list counter`` of one 5.7 ms, ``list chain`` 2.1 ms, ``list
        counters table`` 6.9 ms, ``list table`` 16 ms (the listings fetch the table)."""
        counts: dict[str, tuple[int, int]] = {}
        decoder, pos = json.JSONDecoder(), 0
        while True:
            while pos < len(out) and out[pos].isspace():
                pos += 1
            if pos >= len(out):
                break
            doc, pos = decoder.raw_decode(out, pos)
            for item in doc.get("nftables", []):
                c = item.get("counter") if isinstance(item, dict) else None
                if isinstance(c, dict):
                    packets = int(c.get("packets", 0))
                    payload = int(c.get("bytes", 0)) - HEADERS * packets
                    counts[str(c.get("name", ""))] = (packets, payload)
        for o in sessions:
            o.out_packets, o.out_bytes = counts.get(f"s{o.sid}o", (o.out_packets, o.out_bytes))
            o.back_packets, o.back_bytes = counts.get(f"s{o.sid}b",
                                                      (o.back_packets, o.back_bytes))

    async def refresh(self) -> None:
        """Read every offloaded session's counters: one listing of the table's counters,
        and sessions polling within :data:`REFRESH_MIN` of each other share it."""
        now = asyncio.get_running_loop().time()
        if now - self._refreshed < REFRESH_MIN:
            return
        self._refreshed = now
        sessions = [o for o in self.sessions.values() if o.installed and not o.removed]
        if sessions:
            with contextlib.suppress(KernelPathError, OSError, ValueError):
                self._apply(_nft(f"list counters table ip {self.table}\n", as_json=True),
                            sessions)


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

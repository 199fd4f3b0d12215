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

One table per process, ``ip kakehashi_dgram_<pid>``, removed at exit; a table left by a
process that died without cleaning up is removed by the next one that starts. Counters
on each session's rules give the kernel's share of the datagram counts (idle timeout and
metrics), read by polling. They count packets as the kernel sees them: a
segmentation-offloaded send (a user-space hop's burst, see
:mod:`kakehashi.core.udpbatch`, or a QUIC stack's) is one packet for several datagrams.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ipaddress
import itertools
import json
import logging
import os
import re
import shutil
import socket
import subprocess
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
NFT_TIMEOUT = 10.0
#: seconds within which a second poll of the counters reuses the first one's reading
REFRESH_MIN = 0.05


class KernelPathError(RuntimeError):
    """nft refused or failed; the session stays in user space."""


def _nft_sync(script: str | None = None, *args: str) -> str:
    nft = shutil.which("nft") or "nft"
    argv = [nft, *args] + (["-f", "-"] if script is not None else [])
    r = subprocess.run(argv, input=script, text=True, capture_output=True,
                       timeout=NFT_TIMEOUT, check=False)
    if r.returncode != 0:
        raise KernelPathError(r.stderr.strip() or f"nft exited with {r.returncode}")
    return r.stdout


async def _nft(script: str) -> None:
    nft = shutil.which("nft") or "nft"
    proc = await asyncio.create_subprocess_exec(
        nft, "-f", "-", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)  # pipes, not DEVNULL: uvloop keeps a /dev/null open for it
    try:
        _, err = await asyncio.wait_for(proc.communicate(script.encode()), NFT_TIMEOUT)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise KernelPathError(err.decode(errors="replace").strip())


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
    #: datagrams the kernel relayed each way, as last read
    out_packets: int = 0
    back_packets: int = 0
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
        self._refreshing: asyncio.Future[None] | None = None
        self._refreshed = float("-inf")

    # -- availability ---------------------------------------------------------------------
    @staticmethod
    def unavailable() -> str | None:
        """Why the kernel path cannot be used here, or None."""
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            return "not running as root"
        if shutil.which("nft") is None:
            return "nft (nftables) is not installed"
        return None

    def prepare(self) -> None:
        """Remove tables of dead processes, create this one, remove it at exit.
        Raises :class:`KernelPathError` when nftables refuses."""
        clean_stale()
        _nft_sync(f"add table ip {self.table}\n"
                  f"add set ip {self.table} tuples {{ type {_TUPLE}; }}\n"
                  f"add chain ip {self.table} untracked {{ type filter hook prerouting "
                  f"priority -300; policy accept; }}\n"
                  f"add rule ip {self.table} untracked {_MATCH} @tuples notrack\n")
        self._created = True
        atexit.register(self.remove_table)

    def remove_table(self) -> None:
        if self._created:
            self._created = False
            with contextlib.suppress(KernelPathError, OSError, subprocess.SubprocessError):
                _nft_sync(f"delete table ip {self.table}\n")

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
        t = self.table
        return (f"add map ip {t} out{k} {{ type {_TUPLE} : verdict; }}\n"
                f"add map ip {t} back{k} {{ type {_TUPLE} : verdict; }}\n"
                f"add chain ip {t} out{k} {{ type filter hook prerouting priority "
                f"{OUT_BASE + k}; policy accept; }}\n"
                f"add rule ip {t} out{k} {_MATCH} vmap @out{k}\n"
                f"add chain ip {t} back{k} {{ type filter hook prerouting priority "
                f"{BACK_BASE - k}; policy accept; }}\n"
                f"add rule ip {t} back{k} {_MATCH} vmap @back{k}\n")

    def new(self, position: int, near: Addr, near_port: Addr, far_port: Addr,
            far: Addr) -> Offload:
        return Offload(next(self._ids), max(0, min(position, MAX_POSITION)),
                       near[:2], near_port[:2], far_port[:2], far[:2])

    async def install(self, o: Offload) -> None:
        """Add the session's rules: from now on the kernel relays its datagrams."""
        t, k, sid = self.table, o.position, o.sid
        script = ""
        if k not in self._positions:
            script += self._position_script(k)
        (h1, p1), (h2, p2) = o.near_port, o.far_port
        (nh, np_), (fh, fp) = o.near, o.far
        out_t, back_t = o.tuples()
        script += (
            f"add chain ip {t} s{sid}o\n"
            f"add rule ip {t} s{sid}o counter ip saddr set {h2} ip daddr set {fh} "
            f"udp sport set {p2} udp dport set {fp}\n"
            f"add chain ip {t} s{sid}b\n"
            f"add rule ip {t} s{sid}b counter ip saddr set {h1} ip daddr set {nh} "
            f"udp sport set {p1} udp dport set {np_}\n"
            f"add element ip {t} tuples {{ {out_t}, {back_t} }}\n"
            f"add element ip {t} out{k} {{ {out_t} : jump s{sid}o }}\n"
            f"add element ip {t} back{k} {{ {back_t} : jump s{sid}b }}\n")
        await _nft(script)
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
        with contextlib.suppress(KernelPathError, OSError, subprocess.SubprocessError):
            self._read_counters([o])
        try:
            _nft_sync(f"delete element ip {t} out{k} {{ {out_t} }}\n"
                      f"delete element ip {t} back{k} {{ {back_t} }}\n"
                      f"delete element ip {t} tuples {{ {out_t}, {back_t} }}\n"
                      f"flush chain ip {t} s{sid}o\nflush chain ip {t} s{sid}b\n"
                      f"delete chain ip {t} s{sid}o\ndelete chain ip {t} s{sid}b\n")
        except (KernelPathError, OSError, subprocess.SubprocessError) as exc:
            log.warning("kernel fast path: could not remove the rules of session %d: %s",
                        sid, exc)

    # -- counters -------------------------------------------------------------------------
    def _read_counters(self, sessions: list[Offload]) -> None:
        """Read the counters of ``sessions`` (one nft call for the whole table)."""
        if not sessions:
            return
        out = _nft_sync(None, "-j", "list", "table", "ip", self.table)
        self._apply(out, sessions)

    def _apply(self, out: str, sessions: list[Offload]) -> None:
        counts: dict[str, int] = {}
        for item in json.loads(out).get("nftables", []):
            rule = item.get("rule")
            if not rule:
                continue
            for expr in rule.get("expr", []):
                c = expr.get("counter") if isinstance(expr, dict) else None
                if isinstance(c, dict):
                    counts[rule.get("chain", "")] = int(c.get("packets", 0))
        for o in sessions:
            o.out_packets = counts.get(f"s{o.sid}o", o.out_packets)
            o.back_packets = counts.get(f"s{o.sid}b", o.back_packets)

    async def refresh(self) -> None:
        """Read every offloaded session's counters: one nft call for the whole table, and
        sessions polling at about the same time share it."""
        loop = asyncio.get_running_loop()
        if self._refreshing is not None and not self._refreshing.done():
            await asyncio.shield(self._refreshing)
            return
        if loop.time() - self._refreshed < REFRESH_MIN:
            return
        self._refreshing = asyncio.ensure_future(self._refresh())
        try:
            await asyncio.shield(self._refreshing)
        finally:
            self._refreshed = loop.time()

    async def _refresh(self) -> None:
        sessions = [o for o in self.sessions.values() if o.installed and not o.removed]
        if not sessions:
            return
        nft = shutil.which("nft") or "nft"
        proc = await asyncio.create_subprocess_exec(
            nft, "-j", "list", "table", "ip", self.table, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), NFT_TIMEOUT)
        if proc.returncode == 0:
            self._apply(out.decode(), sessions)


def clean_stale() -> list[str]:
    """Delete the tables of kakehashi processes that are gone; returns their names."""
    try:
        listing = _nft_sync(None, "list", "tables")
    except (KernelPathError, OSError, subprocess.SubprocessError):
        return []
    gone = []
    for m in re.finditer(rf"^table ip ({TABLE_PREFIX}(\d+))$", listing, re.M):
        if int(m.group(2)) != os.getpid() and not _pid_alive(int(m.group(2))):
            with contextlib.suppress(KernelPathError, OSError, subprocess.SubprocessError):
                _nft_sync(f"delete table ip {m.group(1)}\n")
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
            except (KernelPathError, OSError, subprocess.SubprocessError) as exc:
                why = f"nftables refused the table: {exc}"
            else:
                _shared = kp
        _shared_why = why
    return _shared, _shared_why

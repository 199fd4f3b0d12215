"""The chain's kernel fast path (``--fast-path kernel``) end to end: real proxy processes
whose sessions, once their port records have locked, are relayed by nftables rules.

Checked: payloads intact in both modes and encrypted, with the forwarding hops' rule
counters showing the kernel carried them (in encrypted mode the last proxy, which opens
and seals, stays in user space); spoofed datagrams still reach the user-space socket and
are dropped and counted; a teardown removes the session's rules; a process's exit removes
its table and a dead process's table is removed by the next start; 1,000 setups with a
datagram each leave no descriptors and no rules behind. Root and nft only (skipped with
the reason elsewhere). The rest of the chain's e2e tests run with the fast path on and off
(``test_chain.py``); the volume test runs with it on and kernel.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time

import pytest

from kakehashi.chain.forward import build_chain
from kakehashi.chain.setup import SetupFailed
from kakehashi.core import crypto
from kakehashi.core.kernelpath import TABLE_PREFIX, KernelPath
from tests.e2e.framework import Env
from tests.e2e.test_chain import Chain, ended, exchange
from tests.support.wait import async_wait_until, wait_until

pytestmark = pytest.mark.skipif(KernelPath.unavailable() is not None,
                                reason=f"kernel fast path: {KernelPath.unavailable()}")


class KernelChain(Chain):
    fast_path = "kernel"


def sessions(pid: int, what: str = "packets") -> dict[str, int] | None:
    """The offloaded tuples of process ``pid``'s table (the elements of its positions'
    sets, out<k> and back<k>) and their packet (or byte) counters (None: no table)."""
    r = subprocess.run(["nft", "-j", "list", "table", "ip", f"{TABLE_PREFIX}{pid}"],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return None
    out: dict[str, int] = {}
    for item in json.loads(r.stdout)["nftables"]:
        s = item.get("set")
        if s is None or not re.fullmatch(r"(out|back)\d+", s["name"]):
            continue
        for e in s.get("elem", []):
            e = e["elem"]
            out[f"{s['name']} {e['val']['concat']}"] = e["counter"][what]
    return out


def elements(pid: int) -> int:
    """Elements in every set and map of process ``pid``'s table (its offloaded sessions
    are nothing else; 0 without a table)."""
    r = subprocess.run(["nft", "-j", "list", "table", "ip", f"{TABLE_PREFIX}{pid}"],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return 0
    return sum(len(item.get("set", item.get("map", {})).get("elem", []))
               for item in json.loads(r.stdout)["nftables"])


def kernel_packets(pid: int) -> int:
    return sum((sessions(pid) or {}).values())


def kernel_bytes(pid: int) -> int:
    """Bytes the kernel relayed for ``pid``: unlike packets, the same however the sender
    grouped its datagrams (a segmentation-offloaded send of many is one packet)."""
    return sum((sessions(pid, "bytes") or {}).values())


def udp_queued(addr: tuple[str, int]) -> int | None:
    """Bytes waiting in the receive queue of this host's UDP socket bound to ``addr``
    (``/proc/net/udp``), None when no socket is bound there. 0 once its owner has read
    every datagram (the record has decided each one)."""
    ip = struct.unpack("=I", socket.inet_aton(addr[0]))[0]  # as the kernel prints it
    local = f"{ip:08X}:{addr[1]:04X}"
    with open("/proc/net/udp") as f:
        for line in f.read().splitlines()[1:]:
            fields = line.split()
            if fields[1] == local:
                return int(fields[4].split(":")[1], 16)
    return None


def tables() -> set[str]:
    r = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True)
    return set(re.findall(rf"table ip ({TABLE_PREFIX}\d+)", r.stdout))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    env = Env(tmp_path_factory.mktemp("chain-kernel"))
    c = KernelChain(env)
    try:
        for p in c.procs.values():
            p.wait_for("kernel fast path on")
        yield c
    finally:
        env.close()
        c.close()


def _pids(chain: Chain) -> dict[str, int]:
    return {n: p.popen.pid for n, p in chain.procs.items()}


@pytest.mark.parametrize(("mode", "encrypt"), [("recursive", False), ("iterative", False),
                                               ("recursive", True), ("iterative", True)])
def test_datagrams_cross_in_the_kernel_intact(chain, mode, encrypt):
    fwd = chain.forward(mode=mode, encrypt=encrypt)
    port = fwd.bound_port()
    pids = _pids(chain)
    first = exchange(port, 2000, 512)
    assert first >= 1990
    # the hops that only forward handed the session to the kernel, which relayed the rest
    # (counted in bytes: the forward and fw3 send bursts as offloaded sends, one packet
    # for several datagrams)
    offloaded = ["fw1", "fw2"] + ([] if encrypt else ["fw3"])
    wait_until(lambda: all(kernel_bytes(pids[h]) > 1000 * 512 for h in offloaded), 15,
               what=f"kernel counters of {offloaded}")
    if encrypt:  # fw3 opens and seals: user space; the forward seals: user space
        assert sessions(pids["fw3"]) == {}
        assert not sessions(fwd.popen.pid)
    else:  # the forward's local port too (a plaintext forward only forwards)
        wait_until(lambda: kernel_packets(fwd.popen.pid) > 1000, 15,
                   what="the forward's kernel counters")
    # another application (a new source port) takes the local port over: the forward's
    # record follows it and so do its rules
    second = exchange(port, 20, 1400)
    assert second == 20
    before = {h: ended(chain, h) for h in ("fw1", "fw2", "fw3")}
    fwd.stop()
    # teardown: every hop ends the session and removes its rules; the counts include the
    # kernel's share
    for h in ("fw1", "fw2", "fw3"):
        wait_until(lambda h=h: ended(chain, h) > before[h], 15, what=f"{h} ending the session")
        assert sessions(pids[h]) == {}, h
    # fw2 relayed every datagram both ways, the first in user space, the rest in the
    # kernel: the payload bytes add up exactly (the kernel's packets do not: an offloaded
    # send of several datagrams is one), between what was echoed and what was sent
    m = re.findall(r"fw2: session of alice ended: (\d+) bytes relayed \((\d+) datagrams in "
                   r"user space, (\d+) packets in the kernel\)", chain.procs["fw2"].output())
    relayed, user, kernel = map(int, m[-1])
    extra = crypto.DATAGRAM_OVERHEAD if encrypt else 0  # fw2 relays ciphertext then
    low = 2 * (first * (payload(512) + extra) + second * (payload(1400) + extra))
    high = 2 * (2000 * (payload(512) + extra) + 20 * (payload(1400) + extra))
    assert low <= relayed <= high, (relayed, low, high)
    assert user >= 1 and kernel >= 1


def payload(size: int) -> int:
    """The bytes of one of :func:`exchange`'s datagrams of ``size``."""
    return 8 + 32 * (size // 32)


async def test_spoofed_datagrams_reach_user_space_and_are_dropped(chain):
    """Rules match only the locked peers: any other source still lands on the port's
    socket, where the record drops and counts it."""
    pids = _pids(chain)
    c = await build_chain(chain.config())
    loop = asyncio.get_running_loop()
    try:
        for word in (b"good", b"more"):  # the second crosses once the rules are in
            c.data_sock.sendto(word, c.setup.first.addr)
            assert await asyncio.wait_for(loop.sock_recv(c.data_sock, 100), 10) == word
            await async_wait_until(lambda: all(sessions(pids[h]) for h in pids), 15,
                                   what="every hop's rules installed")
        before = chain.echo.count
        spoof = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(20):
            spoof.sendto(b"evil", c.setup.first.addr)  # to fw1's P2
            spoof.sendto(b"evil", c.setup.last.addr)  # to fw3's P5, not from the server
        spoof.close()
        c.data_sock.sendto(b"again", c.setup.first.addr)
        assert await asyncio.wait_for(loop.sock_recv(c.data_sock, 100), 10) == b"again"
        # "again" crossed in the kernel, ahead of the spoofed datagrams still queued on
        # the user-space sockets (between bursts a proxy takes one datagram per wakeup):
        # the session ends only once fw1 and fw3 have read, and so decided, every one of
        # them (a session's end discards what its sockets still hold, uncounted)
        await async_wait_until(lambda: udp_queued(c.setup.first.addr) == 0
                               and udp_queued(c.setup.last.addr) == 0, 15,
                               what="fw1 and fw3 reading every spoofed datagram")
        assert chain.echo.count == before + 1  # only "again" reached the server
        assert kernel_packets(pids["fw1"]) >= 2  # ... through the kernel
    finally:
        n = {h: ended(chain, h) for h in ("fw1", "fw3")}
        c.close()
        c.data_sock.close()
    for h in ("fw1", "fw3"):
        wait_until(lambda h=h: ended(chain, h) > n[h], 15, what=f"{h} ending the session")
        dropped = re.findall(rf"{h}: session of alice ended: .*?\), (\d+) dropped",
                             chain.procs[h].output())
        assert int(dropped[-1]) >= 20, h


async def test_rules_change_in_process_and_count_an_offloaded_send_as_one_packet(
        monkeypatch):
    """This process's kernel path, without the proxies: installing, polling and removing a
    session's rules start no process (libnftables in the process: an ``nft`` per change
    held a proxy's loop ~10 ms per teardown), and a segmentation-offloaded send of ten
    datagrams is one packet for the counters, its payload bytes exact."""
    def no_process(*args, **kwargs):
        raise AssertionError(f"a process was started: {args[:1]}")

    monkeypatch.setattr(subprocess, "run", no_process)
    monkeypatch.setattr(subprocess, "Popen", no_process)
    monkeypatch.setattr(asyncio, "create_subprocess_exec", no_process)
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(4)]
    near, p2, p3, far = socks
    kp = KernelPath()
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        kp.prepare()
        o = kp.new(0, near.getsockname(), p2.getsockname(), p3.getsockname(),
                   far.getsockname())
        await kp.install(o)
        near.setsockopt(socket.IPPROTO_UDP, 103, 100)  # UDP_SEGMENT: 100-byte datagrams
        near.sendto(bytes(range(100)) * 10, p2.getsockname())  # one send, ten datagrams
        far.settimeout(5)
        for _ in range(10):  # rewritten in the kernel: from P3, to the far peer
            data, src = far.recvfrom(2000)
            assert (data, src) == (bytes(range(100)), p3.getsockname())
        far.sendto(b"answer", p3.getsockname())  # and back, from P2 to the near peer
        near.settimeout(5)
        assert near.recvfrom(100) == (b"answer", p2.getsockname())
        await kp.refresh()
        assert (o.out_packets, o.out_bytes, o.back_packets, o.back_bytes) == (1, 1000, 1, 6)
        near.sendto(bytes(300), p2.getsockname())  # three more, read at removal
        for _ in range(3):
            assert far.recv(2000) == bytes(100)
        kp.remove(o)
        assert (o.out_packets, o.out_bytes) == (2, 1300)
        monkeypatch.undo()  # the check below runs nft
        assert sessions(os.getpid()) == {}
    finally:
        kp.remove_table()
        for s in socks:
            s.close()


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.timeout(1200)
async def test_a_thousand_offloaded_setups_leave_no_descriptors_and_no_rules(chain):
    pids = _pids(chain)
    sem = asyncio.Semaphore(6)
    cfgs = [chain.config(), chain.config("iterative")]
    loop = asyncio.get_running_loop()
    closed = 0

    async def one(i: int) -> None:
        nonlocal closed
        async with sem:
            for _ in range(50):
                try:
                    c = await build_chain(cfgs[i % 2])
                    break
                except SetupFailed as exc:  # sessions just closed may still hold slots
                    if exc.reason != "limit":
                        raise
                    seen = closed
                    await async_wait_until(lambda h=exc.hop, n=seen: ended(chain, h) >= n, 30,
                                           what=f"{exc.hop} ending {seen} sessions")
            try:  # a datagram locks the records: every hop installs rules
                for _ in range(5):
                    c.data_sock.sendto(b"ping", c.setup.first.addr)
                    try:
                        await asyncio.wait_for(loop.sock_recv(c.data_sock, 100), 2)
                        break
                    except TimeoutError:
                        continue
            finally:
                c.close()
                c.data_sock.close()
                closed += 1

    # the base once a session has been offloaded and torn down (anything opened for good
    # on first use, not per session, is in it)
    n = ended(chain, "fw3")
    await one(0)
    await async_wait_until(lambda: ended(chain, "fw3") > n, 15, what="the first session's end")
    await async_wait_until(lambda: all(sessions(pid) == {} for pid in pids.values()), 15,
                           what="the first session's rules removed")
    base = {h: _fds(pid) for h, pid in pids.items()}
    await asyncio.gather(*(one(i) for i in range(1000)))
    wait_until(lambda: {h: _fds(pid) for h, pid in pids.items()} == base, 60,
               what=f"descriptors back to {base}")
    wait_until(lambda: all(sessions(pid) == {} for pid in pids.values()), 60,
               what="every session's rules removed")
    # nothing of the 1,000 sessions is left in any set or map
    assert {h: elements(pid) for h, pid in pids.items()} == dict.fromkeys(pids, 0)


def test_exit_removes_the_table_and_a_dead_process_table_is_cleaned(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{TABLE_PREFIX}{dead.pid}"
    subprocess.run(["nft", "add", "table", "ip", stale], check=True)
    env = Env(tmp_path)
    try:
        c = KernelChain(env)
        try:
            for p in c.procs.values():
                p.wait_for("kernel fast path on")
            assert stale not in tables()  # the first proxy to start removed it
            mine = {f"{TABLE_PREFIX}{pid}" for pid in _pids(c).values()}
            assert mine <= tables()
            fwd = c.forward()
            assert exchange(fwd.bound_port(), 200, 64) >= 198
            fwd.stop()
            for p in c.procs.values():
                p.stop()
            assert not mine & tables()  # each removed its own at exit
        finally:
            c.close()
    finally:
        env.close()
        subprocess.run(["nft", "delete", "table", "ip", stale], capture_output=True,
                       check=False)


def test_clean_kernel_removes_only_the_tables_of_dead_processes():
    """``chain clean-kernel`` (for a service manager after a SIGKILL or a crash): a dead
    process's table goes, a live process's table stays, a second run finds nothing."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = f"{TABLE_PREFIX}{dead.pid}", f"{TABLE_PREFIX}{os.getpid()}"
    for name in (stale, live):
        subprocess.run(["nft", "add", "table", "ip", name], check=True)
    cmd = [sys.executable, "-m", "kakehashi", "chain", "clean-kernel"]
    try:
        out = subprocess.run([*cmd, "--json"], capture_output=True, text=True, check=True,
                             timeout=30)
        assert json.loads(out.stdout) == {"removed": [stale]}
        assert stale not in tables() and live in tables()
        again = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30)
        assert again.stdout.startswith("nothing to remove")
    finally:
        for name in (stale, live):
            subprocess.run(["nft", "delete", "table", "ip", name], capture_output=True,
                           check=False)


def test_an_offloaded_session_is_busy_while_the_kernel_relays_and_ends_when_idle(tmp_path):
    """The idle timeout reads the rules' counters: a session whose datagrams all cross in
    the kernel is not idle (no datagram reaches its sockets), and ends once they stop."""
    env = Env(tmp_path)
    c = KernelChain(env, extra={"idle_timeout": "1.5"})
    try:
        pids = _pids(c)
        fwd = c.forward()
        port = fwd.bound_port()
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        try:
            s.sendto(b"lock", ("127.0.0.1", port))
            assert s.recv(100) == b"lock"
            wait_until(lambda: all(sessions(pid) for pid in pids.values()), 15,
                       what="every hop's rules installed")
            # keep it busy for three idle timeouts, all through the kernel: one
            # datagram at a time, each echoed before the next goes
            sent = 0
            end = time.monotonic() + 4.5
            while time.monotonic() < end:
                s.sendto(b"busy", ("127.0.0.1", port))
                assert s.recv(100) == b"busy"
                sent += 1
            assert kernel_packets(pids["fw2"]) >= sent  # both ways, minus the first
            assert not any("session of alice ended" in p.output() for p in c.procs.values())
        finally:
            s.close()
        for p in c.procs.values():
            p.wait_for(f"{p.name}: session of alice ended", 20)
        assert any("idle for 1.5s, closed" in p.output() for p in c.procs.values())
        wait_until(lambda: all(sessions(pid) == {} for pid in pids.values()), 15,
                   what="the idle session's rules removed")
        fwd.stop()
    finally:
        env.close()
        c.close()


class DefaultChain(Chain):
    fast_path = None  # neither the config key nor the flag: the default


def test_the_default_offloads_as_root_and_forced_user_space_still_works(tmp_path):
    """Without --fast-path (auto, the default) a root process uses the kernel path and
    says so in one line; ``--fast-path on`` on the forward keeps its hop in user space
    through the same proxies."""
    env = Env(tmp_path)
    c = DefaultChain(env)
    try:
        pids = _pids(c)
        for p in c.procs.values():
            p.wait_for(f"{p.name}: kernel fast path on (--fast-path auto, nftables table")
        fwd = c.forward()
        fwd.wait_for("kernel fast path on (--fast-path auto")
        assert exchange(fwd.bound_port(), 400, 256) >= 395
        wait_until(lambda: all(kernel_bytes(pids[h]) > 100 * 256 for h in pids)
                   and kernel_bytes(fwd.popen.pid) > 100 * 256, 15,
                   what="every hop's kernel counters, the forward's included")
        fwd.stop()
        c.fast_path = "on"  # this forward only: the proxies stay as they are
        user = c.forward()
        user.wait_for("user-space fast path (--fast-path on)")
        assert exchange(user.bound_port(), 400, 256) >= 395
        assert sessions(user.popen.pid) is None  # no table: nothing tried in the kernel
        user.stop()
        for h, pid in pids.items():
            wait_until(lambda pid=pid: elements(pid) == 0, 15, what=f"{h}'s elements removed")
    finally:
        env.close()
        c.close()


def _objects(table: str) -> dict[str, int]:
    r = subprocess.run(["nft", "-j", "list", "table", "ip", table], capture_output=True,
                       text=True, check=True)
    out: dict[str, int] = {}
    for item in json.loads(r.stdout)["nftables"]:
        for kind in item:
            out[kind] = out.get(kind, 0) + 1
    return out


async def test_sessions_are_elements_in_one_table_made_once():
    """Offloading more sessions adds no chain, rule, set or named counter (each of which
    libnftables fetches before every change, so their number made each install and
    removal cost grow with the sessions); removing them leaves the table as it was."""
    kp = KernelPath()
    try:
        kp.prepare()
        o = kp.new(0, ("127.0.0.1", 10001), ("127.0.0.1", 20001), ("127.0.0.1", 30001),
                   ("127.0.0.1", 40001))
        await kp.install(o)  # the position's sets and chains come with its first session
        before = _objects(kp.table)
        more = [kp.new(0, ("127.0.0.1", 10002 + i), ("127.0.0.1", 20002 + i),
                       ("127.0.0.1", 30002 + i), ("127.0.0.1", 40002 + i)) for i in range(20)]
        for m in more:
            await kp.install(m)
        assert _objects(kp.table) == before
        assert elements(os.getpid()) == 12 * 21
        for m in [o, *more]:
            kp.remove(m)
        assert _objects(kp.table) == before and elements(os.getpid()) == 0
    finally:
        kp.remove_table()


def test_a_proxy_restarted_with_a_killed_ones_pid_starts_with_a_clean_table(tmp_path):
    """A proxy SIGKILLed in a PID namespace of its own (a container, a service with
    private PIDs) is restarted with the same PID: the table named for that PID is its
    dead predecessor's, with its offloaded sessions' rewrites. The new proxy took it
    for its own (clean_stale spares this process's PID, 'add table' keeps what is
    there), so the old rewrites stayed for as long as it ran. It must start from an
    empty table. The PID is kept here by a shell that leaves a table (with one
    element) for its own PID and then becomes the proxy (exec)."""
    import shlex

    env = Env(tmp_path)
    path = tmp_path / "fw.toml"
    path.write_text("\n".join([
        "[chain.proxy]", 'name = "fw"', 'listen = "127.0.0.1:0"', 'udp_ports = "1024-65535"',
        f'keys = {{ alice = "{crypto.new_shared_key()}" }}',
        'routes = { "127.0.0.3/32" = "direct" }',
        'acl = [ { user = "alice", from = "127.0.0.0/8", ports = "any" } ]',
        'fast_path = "kernel"']) + "\n")
    stale = f"{TABLE_PREFIX}$$"
    script = (f"nft add table ip {stale} && "
              f"nft add set ip {stale} left '{{ type ipv4_addr; }}' && "
              f"nft add element ip {stale} left '{{ 10.9.9.9 }}' && "
              f"exec {shlex.join(env.cmd('--config', str(path), 'chain', 'proxy'))}")
    proc = env.spawn("fw", "sh", "-c", script, raw=True)
    try:
        proc.wait_for("kernel fast path on")
        listing = subprocess.run(["nft", "list", "table", "ip",
                                  f"{TABLE_PREFIX}{proc.popen.pid}"],
                                 capture_output=True, text=True, check=True).stdout
        assert "left" not in listing and "10.9.9.9" not in listing, listing
    finally:
        env.close()
        subprocess.run(["nft", "delete", "table", "ip", f"{TABLE_PREFIX}{proc.popen.pid}"],
                       capture_output=True, check=False)

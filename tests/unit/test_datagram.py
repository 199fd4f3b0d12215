"""The core UDP forwarder: port-record decisions and the socket layer."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from kakehashi.core import crypto, datagram, udpbatch
from kakehashi.core.crypto import DatagramChannel
from kakehashi.core.datagram import (
    BATCH,
    LINGER,
    PROBE,
    DatagramForwarder,
    PortAllocator,
    PortRecord,
    bind_in_range,
    bind_udp,
)
from tests.support.wait import async_wait_until


@pytest.fixture(params=["fast-path", "fast-path-python-lanes", "fast-path-batched",
                        "fast-path-queued", "fast-path-loop", "protocol-path"])
def fast(request, monkeypatch):
    """Every forwarder test runs on the fast path (readiness callbacks: as configured,
    a sealing end's lanes in C where the extension has them; the same with those lanes
    in Python, ``datagram.NATIVE_LANES`` off, as in the variants after it; with every
    wakeup taking a batch through the batched system calls; the same with a transformed
    burst always sent through the queue, ``udpbatch.FUSED`` off; with the loop used
    where those are missing) and on the protocol path (asyncio transports): all must
    make the same decisions."""
    if request.param.startswith("fast-path") and request.param != "fast-path-loop" \
            and not udpbatch.AVAILABLE:
        pytest.skip("no recvmmsg/sendmmsg here")
    if request.param != "fast-path":
        monkeypatch.setattr(datagram, "NATIVE_LANES", False)
    monkeypatch.setattr(udpbatch, "AVAILABLE", request.param != "fast-path-loop")
    if request.param in ("fast-path-batched", "fast-path-queued"):
        monkeypatch.setattr(datagram, "PROBE", 1)
    monkeypatch.setattr(udpbatch, "FUSED", request.param != "fast-path-queued")
    return request.param != "protocol-path"


C = ("10.0.0.5", 4000)
S = ("10.9.9.9", 5300)


def test_record_locks_to_first_source_from_the_expected_host():
    r = PortRecord(expect_host="10.0.0.5", far=S)
    assert r.from_near(("10.0.0.6", 1)) is None  # other host: dropped before locking
    assert r.from_near(C) == S
    assert r.near == C
    assert r.from_near(("10.0.0.5", 4001)) is None  # same host, other port: locked
    assert r.from_far(S) == C
    assert r.from_far(("10.9.9.9", 5301)) is None
    assert r.dropped == 3 and r.packets == 2


def test_record_locks_to_a_natted_port():
    r = PortRecord(expect_host="198.51.100.1", far=S)
    assert r.from_near(("198.51.100.1", 61000)) == S  # NAT changed the declared P1
    assert r.from_far(S) == ("198.51.100.1", 61000)


def test_far_datagrams_before_the_near_side_is_known_are_dropped():
    r = PortRecord(far=S)
    assert r.from_far(S) is None and r.dropped == 1


def test_unknown_far_drops_until_set():
    r = PortRecord(expect_host="10.0.0.5")
    assert r.from_near(C) is None
    r.far = S
    assert r.from_near(C) == S


def test_latest_lock_follows_the_application():
    r = PortRecord(lock="latest", far=S)
    assert r.from_near(("127.0.0.1", 1000)) == S
    assert r.from_near(("127.0.0.1", 1001)) == S
    assert r.from_far(S) == ("127.0.0.1", 1001)


def test_an_ipv6_source_matches_the_records_host_and_port():
    """An IPv6 socket reports a source as (host, port, flowinfo, scope_id); the record
    holds (host, port): the port exchange's addresses, and ``src[:2]`` once it locked.
    Comparing whole tuples, the record took the first datagram from an IPv6 client and
    refused every one after it, and every answer from an IPv6 server. Fails on the code
    before (None from the second datagram on)."""
    r = PortRecord(expect_host="2001:db8::5", far=("2001:db8::9", 5300))
    client = ("2001:db8::5", 4000, 0, 0)
    assert r.from_near(client) == ("2001:db8::9", 5300)
    assert r.from_near(client) == ("2001:db8::9", 5300)
    assert r.from_far(("2001:db8::9", 5300, 0, 0)) == ("2001:db8::5", 4000)
    assert r.from_near(("2001:db8::5", 4001, 0, 0)) is None  # locked: another port
    assert r.from_far(("2001:db8::9", 5301, 0, 0)) is None
    assert r.from_near_count == 2 and r.from_far_count == 1 and r.dropped == 2


def test_bind_in_range_exhausts_cleanly():
    base = 39000 + os.getpid() % 500
    socks = []
    try:
        for _ in range(3):
            socks.append(bind_in_range("127.0.0.1", base, base + 2))
        assert sorted(s.getsockname()[1] for s in socks) == [base, base + 1, base + 2]
        with pytest.raises(OSError, match="no free UDP port"):
            bind_in_range("127.0.0.1", base, base + 2)
    finally:
        for s in socks:
            s.close()


def test_port_allocator_hands_out_a_freed_port_last():
    """Ports never handed out first; freed ones only when none is left, the longest
    freed first (a session's late datagrams must not reach the next one's peers)."""
    base = 39600 + os.getpid() % 300
    ports = PortAllocator("127.0.0.1", base, base + 3)
    held = [ports.bind() for _ in range(2)]
    first = [s.getsockname()[1] for s in held]
    for s in held:
        s.close()
    ports.release(*first)
    fresh = [ports.bind() for _ in range(2)]
    try:
        assert not {s.getsockname()[1] for s in fresh} & set(first)
        # the range is full: freed ports come back, the longest freed first
        again = ports.bind()
        assert again.getsockname()[1] == first[0]
        ports.release(first[0])
        again.close()
        fresh += [ports.bind(), ports.bind()]
        assert [s.getsockname()[1] for s in fresh[2:]] == [first[1], first[0]]
        with pytest.raises(OSError, match="no free UDP port"):
            ports.bind()
    finally:
        for s in fresh:
            s.close()


def test_port_allocator_remembers_a_bounded_number_of_freed_ports(monkeypatch):
    monkeypatch.setattr(datagram, "MAX_FREED", 3)
    ports = PortAllocator("127.0.0.1", 40000, 40999)
    ports.release(1, 2, 3, 4, 5)
    assert list(ports.freed) == [3, 4, 5]
    ports.release(3)
    assert list(ports.freed) == [4, 5, 3]


async def test_forwarder_relays_both_ways_and_drops_spoofed(fast):
    server = bind_udp("127.0.0.1")
    client = bind_udp("127.0.0.1")
    spoof = bind_udp("127.0.0.1")
    near, far = bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    rec = PortRecord(expect_host="127.0.0.1", far=server.getsockname())
    fwd = DatagramForwarder(near, far, rec, near_to_far=lambda d: d.upper(), fast_path=fast)
    await fwd.start()
    loop = asyncio.get_running_loop()
    try:
        client.sendto(b"hello", near.getsockname())
        data, addr = await asyncio.wait_for(loop.sock_recvfrom(server, 100), 5)
        assert data == b"HELLO" and addr == far.getsockname()
        spoof.sendto(b"evil", near.getsockname())  # after the lock: dropped
        spoof.sendto(b"evil", far.getsockname())  # not the server: dropped
        await async_wait_until(lambda: rec.dropped == 2, what="two spoofed drops")
        server.sendto(b"back", far.getsockname())
        data, addr = await asyncio.wait_for(loop.sock_recvfrom(client, 100), 5)
        assert data == b"back" and addr == near.getsockname()
    finally:
        fwd.close()
        for s in (server, client, spoof):
            s.close()
    await async_wait_until(lambda: near.fileno() < 0 and far.fileno() < 0,
                           what="forwarder sockets closed")


async def test_close_before_start_closes_the_sockets(fast):
    near, far = bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    DatagramForwarder(near, far, PortRecord(), fast_path=fast).close()
    assert near.fileno() < 0 and far.fileno() < 0
    assert isinstance(near, socket.socket)


def test_tentative_near_takes_answers_and_yields_to_a_natted_port_once():
    r = PortRecord(expect_host="10.0.0.5", near=C, far=S, tentative=True)
    assert r.from_far(S) == C  # the server may send first
    assert r.from_near(("10.0.0.5", 61000)) == S  # NAT: the real port replaces it
    assert r.near == ("10.0.0.5", 61000) and not r.tentative
    assert r.from_near(C) is None  # now locked


def test_tentative_near_confirmed_by_its_own_datagram():
    r = PortRecord(expect_host="10.0.0.5", near=C, far=S, tentative=True)
    assert r.from_near(C) == S and not r.tentative
    assert r.from_near(("10.0.0.5", 61000)) is None


async def _recv_all(sock: socket.socket, n: int) -> list[bytes]:
    loop = asyncio.get_running_loop()
    return [await asyncio.wait_for(loop.sock_recv(sock, 65535), 5) for _ in range(n)]


async def test_a_burst_beyond_one_batch_is_relayed_whole_and_in_order(fast):
    """More datagrams than one readiness callback takes: the rest wait in the kernel's
    buffer for the next turn, none is lost or reordered."""
    server, client = bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    near, far = bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    rec = PortRecord(expect_host="127.0.0.1", far=server.getsockname())
    fwd = DatagramForwarder(near, far, rec, fast_path=fast)
    await fwd.start()
    try:
        n = BATCH * 5 + 3
        for i in range(n):
            client.sendto(i.to_bytes(4, "big") * 100, near.getsockname())
        got = await _recv_all(server, n)
        assert [int.from_bytes(d[:4], "big") for d in got] == list(range(n))
        assert all(d == d[:4] * 100 for d in got) and rec.from_near_count == n
    finally:
        fwd.close()
        for s in (server, client):
            s.close()


async def test_a_flooded_session_does_not_starve_another(fast):
    """A thousand datagrams queued on one session's port and one on another's: the
    other's is relayed within the first turn, while most of the flood still waits (at
    most a batch per socket per turn)."""
    server, client = bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    fwds = []
    for _ in range(2):
        near, far = bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
        fwds.append(DatagramForwarder(near, far, PortRecord(far=server.getsockname()),
                                      fast_path=fast))
    flooded, other = fwds
    try:
        for f in fwds:
            await f.start()
        for _ in range(1000):
            client.sendto(b"flood", flooded.near_sock.getsockname())
        client.sendto(b"other", other.near_sock.getsockname())
        got = await _recv_all(server, 1001)  # in the order they were relayed
        assert got.count(b"flood") == 1000
        assert got.index(b"other") <= BATCH
    finally:
        for f in fwds:
            f.close()
        for s in (server, client):
            s.close()


async def _sealing_hop(fast: bool, *, forward_side: bool = False) -> tuple[
        DatagramChannel, DatagramChannel, socket.socket, socket.socket, DatagramForwarder]:
    """A started forwarder at one sealing end of an encrypted chain: the last hop (it
    opens towards the server and seals the answers), or with ``forward_side`` the lane of
    ``chain forward`` (it seals towards the chain and opens the answers); the other end's
    channel and the forwarder's own, a server and a client socket."""
    k1, k2 = os.urandom(32), os.urandom(32)
    client_ch, hop_ch = DatagramChannel(k1, k2), DatagramChannel(k2, k1)
    server, client = bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    near, far = bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    if forward_side:
        rec = PortRecord(lock="latest", far=server.getsockname())
        out, back = hop_ch.seal, hop_ch.open
    else:
        rec = PortRecord(expect_host="127.0.0.1", far=server.getsockname())
        out, back = hop_ch.open, hop_ch.seal
    fwd = DatagramForwarder(near, far, rec, near_to_far=out, far_to_near=back,
                            fast_path=fast)
    await fwd.start()
    return client_ch, hop_ch, server, client, fwd


async def test_sealed_datagrams_are_opened_and_replays_dropped_and_counted(fast):
    """The forwarder as the last hop of an encrypted chain: it opens what the client
    sealed; a replayed datagram and a forged one are dropped and counted, never relayed."""
    client_ch, hop_ch, server, client, fwd = await _sealing_hop(fast)
    rec, near, far = fwd.record, fwd.near_sock, fwd.far_sock
    loop = asyncio.get_running_loop()
    try:
        sealed = client_ch.seal(b"question")
        client.sendto(sealed, near.getsockname())
        assert await _recv_all(server, 1) == [b"question"]
        client.sendto(sealed, near.getsockname())  # replayed
        client.sendto(sealed[:-1] + bytes([sealed[-1] ^ 1]), near.getsockname())  # forged
        await async_wait_until(lambda: rec.dropped == 2, what="replay and forgery dropped")
        assert hop_ch.refused == 2
        client.sendto(client_ch.seal(b"next"), near.getsockname())
        assert await _recv_all(server, 1) == [b"next"]
        server.sendto(b"answer", far.getsockname())
        back = await asyncio.wait_for(loop.sock_recv(client, 65535), 5)
        assert client_ch.open(back) == b"answer"
    finally:
        fwd.close()
        for s in (server, client):
            s.close()


async def test_an_empty_datagram_is_relayed_both_ways(fast):
    """A UDP datagram may carry nothing (a keepalive, a probe); asyncio's transports
    drop an empty one in sendto(), so the protocol path sent it on by itself. Fails on
    the protocol path before that."""
    server, client = bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    near, far = bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    rec = PortRecord(expect_host="127.0.0.1", far=server.getsockname())
    fwd = DatagramForwarder(near, far, rec, fast_path=fast)
    await fwd.start()
    try:
        for d in (b"", b"x", b""):
            client.sendto(d, near.getsockname())
        assert await _recv_all(server, 3) == [b"", b"x", b""]
        server.sendto(b"", far.getsockname())
        assert await _recv_all(client, 1) == [b""]
        assert rec.from_near_count == 3 and rec.from_far_count == 1
    finally:
        fwd.close()
        for s in (server, client):
            s.close()


async def test_a_datagram_handed_in_by_the_owner_is_relayed(fast):
    """``chain forward`` hands the datagram that woke it up to the new forwarder."""
    server, client = bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    near, far = bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    rec = PortRecord(lock="latest", far=server.getsockname())
    fwd = DatagramForwarder(near, far, rec, fast_path=fast)
    await fwd.start()
    try:
        fwd.near_received(b"first", client.getsockname())
        assert await _recv_all(server, 1) == [b"first"]
        assert rec.near == client.getsockname()
    finally:
        fwd.close()
        for s in (server, client):
            s.close()


async def test_the_fast_path_closes_its_sockets_at_once():
    near, far = bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    fwd = DatagramForwarder(near, far, PortRecord(), fast_path=True)
    await fwd.start()
    fwd.close()
    assert near.fileno() < 0 and far.fileno() < 0
    fwd.close()  # twice: nothing more happens


class CountingCalls:
    """Wraps udpbatch's recvmmsg/sendmmsg: how many calls, how many datagrams each."""

    def __init__(self, monkeypatch) -> None:
        self.recv: list[int] = []
        self.send: list[int] = []
        real_recv, real_send = udpbatch._MMSG

        def recv(*args):
            n = real_recv(*args)
            self.recv.append(n)
            return n

        def send(*args):
            n = real_send(*args)
            self.send.append(n)
            return n

        monkeypatch.setattr(udpbatch, "_MMSG", (recv, send))


@pytest.mark.skipif(not udpbatch.AVAILABLE, reason="no recvmmsg/sendmmsg here")
async def test_a_burst_costs_two_system_calls_per_batch(monkeypatch):
    """Once a lane has noticed a burst, it takes a batch per system call and sends it on
    with one (datagrams of one size to one destination as one offloaded send), not a
    recvfrom and a sendto each; the batch bound still hands the loop back between
    batches."""
    calls = CountingCalls(monkeypatch)
    server, client = bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    near, far = bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    rec = PortRecord(expect_host="127.0.0.1", far=server.getsockname())
    fwd = DatagramForwarder(near, far, rec, fast_path=True)
    n = (PROBE - 1) + BATCH * 3 + 3  # one per wakeup until the probe, then batches
    for i in range(n):  # all queued before the forwarder watches the socket
        client.sendto(i.to_bytes(4, "big"), near.getsockname())
    await fwd.start()
    try:
        got = await _recv_all(server, n)
        assert [int.from_bytes(d, "big") for d in got] == list(range(n))
        assert calls.recv == [BATCH, BATCH, BATCH, 3]
        assert calls.send == [1, 1, 1, 1]  # one offloaded send per batch
    finally:
        fwd.close()
        for s in (server, client):
            s.close()


@pytest.mark.skipif(not udpbatch.AVAILABLE, reason="no recvmmsg/sendmmsg here")
async def test_a_burst_that_thins_for_a_moment_is_still_taken_in_batches(monkeypatch):
    """A hop wakes at the first datagram of its sender's burst, so a batch often finds
    one: a few such batches do not end the burst (the next burst is taken in batches at
    once, not one per wakeup until the next probe); LINGER of them in a row do. Fails on
    the code that left the burst at the first batch of one."""
    calls = CountingCalls(monkeypatch)
    server, client = bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    near, far = bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    rec = PortRecord(expect_host="127.0.0.1", far=server.getsockname())
    fwd = DatagramForwarder(near, far, rec, fast_path=True)

    async def burst(n: int) -> None:
        for _ in range(n):
            client.sendto(b"b", near.getsockname())
        assert await _recv_all(server, n) == [b"b"] * n

    async def one_by_one(n: int) -> None:
        for _ in range(n):
            client.sendto(b"1", near.getsockname())
            assert await _recv_all(server, 1) == [b"1"]

    for _ in range(PROBE - 1 + BATCH + 2):  # one per wakeup, the probe's batch, a batch
        client.sendto(b"b", near.getsockname())
    await fwd.start()
    try:
        assert len(await _recv_all(server, PROBE - 1 + BATCH + 2)) == PROBE - 1 + BATCH + 2
        assert calls.recv == [BATCH, 2]
        await one_by_one(LINGER - 1)
        await burst(BATCH + 5)
        assert calls.recv[2:] == [1] * (LINGER - 1) + [BATCH, 5]
        del calls.recv[:]
        await one_by_one(LINGER + 5)  # the burst is over after LINGER
        assert calls.recv == [1] * LINGER
    finally:
        fwd.close()
        for s in (server, client):
            s.close()


async def test_a_lone_datagram_between_bursts_bypasses_the_batch(monkeypatch):
    """Between bursts a datagram that wakes a lane is taken with one recvfrom_into and
    sent with one sendto, and nothing of the batch machinery (its receive, queue and
    flush) runs for it: that is paid by every datagram of one-at-a-time traffic at every
    hop (it cost a lone datagram ~4 us more CPU per hop than the protocol path). Only
    the PROBE-th wakeup, looking for a burst, takes a batch. Both lanes, plaintext and
    through a transform. Fails on the code that sent every datagram through the batch."""
    calls: list[str] = []
    for name in ("recv", "relay", "put", "flush"):
        real = getattr(udpbatch.Batch, name)

        def wrap(self, *args, _real=real, _name=name):
            calls.append(_name)
            return _real(self, *args)

        monkeypatch.setattr(udpbatch.Batch, name, wrap)
    server, client = bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    near, far = bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    rec = PortRecord(expect_host="127.0.0.1", far=server.getsockname())
    fwd = DatagramForwarder(near, far, rec, fast_path=True, far_to_near=lambda d: d + b"!")
    await fwd.start()
    try:
        for i in range(PROBE - 1):
            client.sendto(b"q%d" % i, near.getsockname())
            assert await _recv_all(server, 1) == [b"q%d" % i]
            server.sendto(b"a%d" % i, far.getsockname())
            assert await _recv_all(client, 1) == [b"a%d!" % i]
        assert calls == []
        assert rec.from_near_count == rec.from_far_count == PROBE - 1
        client.sendto(b"probe", near.getsockname())  # the PROBE-th wakeup: a batch
        assert await _recv_all(server, 1) == [b"probe"]
        assert calls == ["recv", "relay", "flush"]
    finally:
        fwd.close()
        for s in (server, client):
            s.close()


async def test_spoofed_datagrams_inside_a_burst_are_dropped_and_counted(fast):
    """Spoofed datagrams interleaved with the peers' in the same bursts, on both ports:
    each one is dropped and counted, the peers' arrive whole and in order."""
    server, client, spoof = bind_udp("127.0.0.1"), bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    near, far = bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    rec = PortRecord(expect_host="127.0.0.1", far=server.getsockname())
    fwd = DatagramForwarder(near, far, rec, fast_path=fast)
    await fwd.start()
    n = BATCH * 2 + 7
    try:
        client.sendto(b"lock", near.getsockname())
        assert await _recv_all(server, 1) == [b"lock"]
        for i in range(n):
            client.sendto(b"c%d" % i, near.getsockname())
            spoof.sendto(b"evil", near.getsockname())
            spoof.sendto(b"evil", far.getsockname())
            server.sendto(b"s%d" % i, far.getsockname())
        assert await _recv_all(server, n) == [b"c%d" % i for i in range(n)]
        assert await _recv_all(client, n) == [b"s%d" % i for i in range(n)]
        await async_wait_until(lambda: rec.dropped == 2 * n, what="every spoofed datagram")
        assert rec.from_near_count == n + 1 and rec.from_far_count == n
        # the payload bytes relayed each way: the peers' only, none of the spoofed
        assert fwd.user_bytes == [4 + sum(len(b"c%d" % i) for i in range(n)),
                                  sum(len(b"s%d" % i) for i in range(n))]
        assert fwd.relayed_bytes == sum(fwd.user_bytes)
        assert fwd.errors == 0 and fwd.overflow == 0
    finally:
        fwd.close()
        for s in (server, client, spoof):
            s.close()


async def test_every_size_is_relayed_intact_and_an_oversized_output_is_counted(fast):
    """Empty datagrams, the largest an IPv4 socket takes (nothing truncated) and sizes
    between, in one burst; a transform whose output no datagram can carry drops that
    one datagram (counted) and the rest go on."""
    server, client = bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    near, far = bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    rec = PortRecord(expect_host="127.0.0.1", far=server.getsockname())
    fwd = DatagramForwarder(near, far, rec, fast_path=fast,
                            far_to_near=lambda d: d * 3 if d.startswith(b"big") else d)
    await fwd.start()
    try:
        sizes = [0, 1, 65507, 1472, 9000, 0, 65507, 512, 40000, 3,
                 *[512] * 5, 100, *[512] * 3, *[1472] * 70]  # offload groups and their ends
        sent = [os.urandom(n) for n in sizes]
        for d in sent:
            client.sendto(d, near.getsockname())
        assert await _recv_all(server, len(sent)) == sent
        server.sendto(b"big" + bytes(30000), far.getsockname())  # 90,009 B after: dropped
        server.sendto(b"after", far.getsockname())
        assert await _recv_all(client, 1) == [b"after"]
        assert fwd.errors == 1 and rec.from_far_count == 2
    finally:
        fwd.close()
        for s in (server, client):
            s.close()


async def test_sealed_bursts_both_ways_are_opened_in_order(fast):
    """The last hop of an encrypted chain under bursts larger than a batch: every sealed
    datagram opened, every answer sealed, nothing lost or reordered."""
    client_ch, hop_ch, server, client, fwd = await _sealing_hop(fast)
    rec, near, far = fwd.record, fwd.near_sock, fwd.far_sock
    n = BATCH * 3 + 5
    try:
        for i in range(n):
            client.sendto(client_ch.seal(b"q%d" % i * 50), near.getsockname())
        assert await _recv_all(server, n) == [b"q%d" % i * 50 for i in range(n)]
        for i in range(n):
            server.sendto(b"a%d" % i * 50, far.getsockname())
        back = await _recv_all(client, n)
        assert [client_ch.open(d) for d in back] == [b"a%d" % i * 50 for i in range(n)]
        assert hop_ch.refused == 0 and rec.dropped == 0
    finally:
        fwd.close()
        for s in (server, client):
            s.close()


@pytest.mark.skipif(not udpbatch.AVAILABLE, reason="no recvmmsg/sendmmsg here")
async def test_a_route_that_refuses_segmentation_offload_gets_datagrams_one_by_one(
        monkeypatch):
    """The kernel refuses an offloaded send (here: the socket sends without UDP
    checksums, which offload cannot do); that batch goes again one datagram at a time,
    later ones to that destination too, and nothing is lost or counted as an error."""
    calls = CountingCalls(monkeypatch)
    monkeypatch.setattr(datagram, "PROBE", 1)
    server, client = bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    near, far = bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    far.setsockopt(socket.SOL_SOCKET, 11, 1)  # SO_NO_CHECK
    io = udpbatch.Batch()  # its own, so the refusal it remembers stays in this test
    rec = PortRecord(expect_host="127.0.0.1", far=server.getsockname())
    fwd = DatagramForwarder(near, far, rec, fast_path=True)
    n = BATCH * 2
    for i in range(n):
        client.sendto(i.to_bytes(4, "big") * 8, near.getsockname())
    await fwd.start()
    fwd._io = io
    try:
        got = await _recv_all(server, n)
        assert [int.from_bytes(d[:4], "big") for d in got] == list(range(n))
        assert calls.send == [-1, BATCH]  # refused; then one header per datagram
        assert fwd.errors == 0 and fwd.overflow == 0
    finally:
        fwd.close()
        for s in (server, client):
            s.close()


async def test_a_sealed_burst_goes_through_the_channel_once_per_batch(monkeypatch):
    """In a burst the fast path hands the whole batch to the channel in one call, never
    a ``bytes`` per datagram through the one-datagram form (which a datagram that wakes
    a lane between bursts still takes: for one, it costs less). Fails on the code that
    called the transform per datagram."""
    # (the Python lane: the native turn calls no batch form)
    monkeypatch.setattr(datagram, "NATIVE_LANES", False)
    client_ch, hop_ch, server, client, fwd = await _sealing_hop(True)
    near = fwd.near_sock
    calls: list[int] = []
    real = hop_ch.open.batch

    def counted(*args):
        calls.append(args[3])
        return real(*args)

    hop_ch.open.batch = counted
    n = (PROBE - 1) + BATCH * 2  # one per wakeup until the probe, then batches
    try:
        for i in range(n):
            client.sendto(client_ch.seal(b"q%d" % i), near.getsockname())
        assert await _recv_all(server, n) == [b"q%d" % i for i in range(n)]
        assert calls == [BATCH, BATCH]
        assert hop_ch.refused == 0 and fwd.record.from_near_count == n
    finally:
        fwd.close()
        for s in (server, client):
            s.close()


async def test_replays_and_forgeries_inside_one_sealed_burst_are_dropped_exactly(fast):
    """A burst that repeats datagrams (next to each other and further apart) and carries
    a forged one: each original is opened once, in order, every other one is dropped and
    counted, on every path."""
    client_ch, hop_ch, server, client, fwd = await _sealing_hop(fast)
    rec, near = fwd.record, fwd.near_sock
    sealed = [client_ch.seal(b"q%d" % i * 20) for i in range(6)]
    forged = sealed[5][:-1] + bytes([sealed[5][-1] ^ 1])
    wire = [sealed[0], sealed[1], sealed[1], sealed[2], sealed[0], forged, sealed[3],
            sealed[5], sealed[4], sealed[3], sealed[5]]
    try:
        for d in wire:
            client.sendto(d, near.getsockname())
        got = await _recv_all(server, 6)
        assert got == [b"q%d" % i * 20 for i in (0, 1, 2, 3, 5, 4)]
        await async_wait_until(lambda: rec.dropped == 5, what="the replays and the forgery")
        assert hop_ch.refused == 5 and rec.from_near_count == len(wire)
    finally:
        fwd.close()
        for s in (server, client):
            s.close()


async def test_sealed_bursts_of_every_size_arrive_intact(fast):
    """The sealing side (``chain forward``'s lane towards the chain) with outputs of one
    size in runs longer than one offloaded send takes, sizes too large to offload, an
    empty datagram and the largest that can still be sealed, in one burst; the opening
    side back with a refused datagram in the middle of a run."""
    peer, ch, server, client, fwd = await _sealing_hop(fast, forward_side=True)
    rec, near, far = fwd.record, fwd.near_sock, fwd.far_sock
    try:
        client.sendto(b"lock", near.getsockname())
        assert [peer.open(d) for d in await _recv_all(server, 1)] == [b"lock"]
        sizes = [*[512] * 70, 0, 1448, 1472, *[2000] * 3, 65483, 1, *[1400] * 50, 512]
        sent = [os.urandom(n) for n in sizes]
        for d in sent:
            client.sendto(d, near.getsockname())
        got = await _recv_all(server, len(sent))
        assert [len(d) for d in got] == [n + 24 for n in sizes]
        assert [peer.open(d) for d in got] == sent
        back = [peer.seal(b"a%d" % i * 30) for i in range(40)]
        back[17] = back[17][:-1] + bytes([back[17][-1] ^ 1])
        for d in back:
            server.sendto(d, far.getsockname())
        assert await _recv_all(client, 39) == [b"a%d" % i * 30 for i in range(40) if i != 17]
        await async_wait_until(lambda: rec.dropped == 1, what="the forged answer")
        assert fwd.errors == 0 and ch.refused == 1
    finally:
        fwd.close()
        for s in (server, client):
            s.close()


@pytest.mark.skipif(not udpbatch.AVAILABLE, reason="no recvmmsg/sendmmsg here")
@pytest.mark.parametrize("lanes", ["native", "python"])
async def test_runs_from_the_hop_before_are_opened_datagram_by_datagram(monkeypatch, lanes):
    """The last hop of an encrypted chain gets the client's sealed datagrams as offloaded
    runs (the forward sends a burst that way): its sockets take each run as one message
    (receive offload), on a lone wakeup as in a burst, and every datagram in it is
    still opened, decided and counted on its own; a replay inside a run is dropped. On
    the Python lane and on the native one (which cuts the runs in C)."""
    monkeypatch.setattr(datagram, "NATIVE_LANES", lanes == "native")
    client_ch, hop_ch, server, client, fwd = await _sealing_hop(True)
    rec, near = fwd.record, fwd.near_sock
    with bind_udp("127.0.0.1") as probe:
        try:
            probe.setsockopt(socket.SOL_UDP, 104, 1)  # UDP_GRO
        except OSError:
            pytest.skip("no UDP_GRO here")
    cuts: list[int] = []
    real = getattr(udpbatch.Batch, "_cut", None)

    def cut(self, n, segments):
        cuts.append(len(segments))
        return real(self, n, segments)

    monkeypatch.setattr(udpbatch.Batch, "_cut", cut, raising=False)
    sender = udpbatch.Batch()
    try:
        for rnd in range(PROBE + 2):  # lone wakeups, the probe, then bursts
            sealed = [client_ch.seal(b"r%d-%d" % (rnd, i) * 20) for i in range(10)]
            for d in [*sealed, sealed[3]]:
                sender.put(int(client.family), d, near.getsockname())
            assert sender.flush(client) == (0, 0)
            assert await _recv_all(server, 10) == [b"r%d-%d" % (rnd, i) * 20
                                                   for i in range(10)]
        await async_wait_until(lambda: rec.dropped == PROBE + 2, what="the replays")
        assert hop_ch.refused == PROBE + 2
        assert rec.from_near_count == 11 * (PROBE + 2)
        if lanes == "python" or hop_ch.open.turn is None:
            assert len(cuts) >= PROBE + 2  # each run came as one message (or more), cut
    finally:
        fwd.close()
        for s in (server, client):
            s.close()


@pytest.mark.skipif(not udpbatch.AVAILABLE, reason="no recvmmsg/sendmmsg here")
@pytest.mark.parametrize("forward_side", [False, True])
async def test_a_sealing_ends_lanes_run_in_c_once_the_record_has_decided(forward_side,
                                                                         monkeypatch):
    """With the extension's lane turn there, each lane of a sealing end hands a wakeup
    to C once its record says where the lane's datagrams go: the Python batch forms are
    not called at all, a spoofed datagram in the middle of a burst comes back to the
    record (dropped and counted), and the counts are exact. Fails on the code before the
    turn (no ``turn`` on the channel's transforms)."""
    monkeypatch.setattr(datagram, "NATIVE_LANES", True)  # (whatever the environment says)
    monkeypatch.setattr(crypto, "NATIVE", crypto._dgaead is not None)
    client_ch, hop_ch, server, client, fwd = await _sealing_hop(True, forward_side=forward_side)
    if hop_ch.seal.turn is None:
        pytest.skip("the extension has no lane turn here")
    rec, near, far = fwd.record, fwd.near_sock, fwd.far_sock
    turns: list[int] = []

    def counted(real):
        def turn(*args):
            r = real(*args)
            turns.append(r[0])
            return r
        return turn

    def refuse(*args):
        raise AssertionError("the Python batch form ran")

    for t in (hop_ch.seal, hop_ch.open):
        t.turn = counted(t.turn)
        t.batch = refuse
    # what the client sends: plaintexts to a forward, sealed ones to the last hop; and
    # what the server answers: sealed ones to a forward, plaintexts to the last hop
    wrap = (lambda d: d) if forward_side else client_ch.seal
    unwrap = client_ch.open if forward_side else (lambda d: d)
    answer = client_ch.seal if forward_side else (lambda d: d)
    answered = (lambda d: d) if forward_side else client_ch.open
    # a forward's record follows the latest sender (lock "latest"): the spoofed datagram
    # moves the session and is relayed; the last hop's is locked: it is dropped
    sent = [b"q%d" % i for i in range(20)] + [b"spoofed"] * forward_side + [
        b"q%d" % i for i in range(20, 40)]
    try:
        client.sendto(wrap(b"first"), near.getsockname())  # locks the record
        assert [unwrap(d) for d in await _recv_all(server, 1)] == [b"first"]
        with bind_udp("127.0.0.1") as spoof:
            for i in range(40):
                if i == 20:
                    spoof.sendto(wrap(b"spoofed"), near.getsockname())
                client.sendto(wrap(b"q%d" % i), near.getsockname())
            assert [unwrap(d) for d in await _recv_all(server, len(sent))] == sent
            await async_wait_until(lambda: rec.dropped == (not forward_side),
                                   what="the spoofed datagram's fate")
        for i in range(30):
            server.sendto(answer(b"a%d" % i), far.getsockname())
        answers = await _recv_all(client, 30)
        assert [answered(d) for d in answers] == [b"a%d" % i for i in range(30)]
        assert rec.from_near_count == 1 + len(sent) and rec.from_far_count == 30
        assert turns and sum(turns) <= 40 + 30  # (the spoofed one and after: the record's)
        assert fwd.errors == 0 and fwd.overflow == 0 and hop_ch.refused == 0
        assert fwd.user_bytes == [sum(len(wrap(d)) for d in [b"first", *sent]),
                                  sum(len(answer(b"a%d" % i)) for i in range(30))]
    finally:
        fwd.close()
        for s in (server, client):
            s.close()


async def test_an_encrypted_hop_relays_an_ipv6_session_both_ways(fast, monkeypatch):
    """The last hop of an encrypted chain on IPv6 (the record's server as the port
    exchange gives it, (host, port)): every datagram and every answer goes through,
    and on the fast path with the extension's lane turn, C takes the session's
    datagrams (its sockaddr compare holds the record's decision for an IPv6 peer too).
    Fails on the code before (the record refused all but the first datagram; the turn
    never ran for an IPv6 peer)."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    monkeypatch.setattr(crypto, "NATIVE", crypto._dgaead is not None)
    try:
        server, client = bind_udp("::1"), bind_udp("::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    k1, k2 = os.urandom(32), os.urandom(32)
    client_ch, hop_ch = DatagramChannel(k1, k2), DatagramChannel(k2, k1)
    near, far = bind_udp("::1"), bind_udp("::1")
    rec = PortRecord(expect_host="::1", far=server.getsockname()[:2])
    turns: list[int] = []
    for t in (hop_ch.seal, hop_ch.open):
        if t.turn is not None:
            def counted(*args, real=t.turn):
                r = real(*args)
                if r is not None:
                    turns.append(r[0])
                return r
            t.turn = counted
    fwd = DatagramForwarder(near, far, rec, near_to_far=hop_ch.open, far_to_near=hop_ch.seal,
                            fast_path=fast)
    await fwd.start()
    try:
        for i in range(20):
            client.sendto(client_ch.seal(b"q%d" % i), near.getsockname())
        assert await _recv_all(server, 20) == [b"q%d" % i for i in range(20)]
        for i in range(20):
            server.sendto(b"a%d" % i, far.getsockname())
        assert [client_ch.open(d) for d in await _recv_all(client, 20)] == [
            b"a%d" % i for i in range(20)]
        assert rec.from_near_count == 20 and rec.from_far_count == 20 and rec.dropped == 0
        if fwd._lanes and hop_ch.seal.turn is not None:
            assert sum(turns) > 0, "C never took the IPv6 session's datagrams"
    finally:
        fwd.close()
        for s in (server, client):
            s.close()

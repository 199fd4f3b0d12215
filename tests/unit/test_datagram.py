"""The core UDP forwarder: port-record decisions and the socket layer."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from kakehashi.core.datagram import DatagramForwarder, PortRecord, bind_in_range, bind_udp
from tests.support.wait import async_wait_until

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


async def test_forwarder_relays_both_ways_and_drops_spoofed():
    server = bind_udp("127.0.0.1")
    client = bind_udp("127.0.0.1")
    spoof = bind_udp("127.0.0.1")
    near, far = bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    rec = PortRecord(expect_host="127.0.0.1", far=server.getsockname())
    fwd = DatagramForwarder(near, far, rec, near_to_far=lambda d: d.upper())
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


async def test_close_before_start_closes_the_sockets():
    near, far = bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    DatagramForwarder(near, far, PortRecord()).close()
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

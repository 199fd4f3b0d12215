"""The kernel fast path's decisions in the forwarder, with a stand-in for nftables.

When the forwarder hands a session to the kernel (after the record locked, never with a
transform, again when a ``latest`` record moves, not at all when nft fails) is decided
here without root; the rules themselves are exercised for real in
``tests/e2e/test_chain_kernel.py``.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from kakehashi.core import kernelpath
from kakehashi.core.datagram import DatagramForwarder, PortRecord, bind_udp
from kakehashi.core.kernelpath import KernelPath, KernelPathError, Offload
from tests.support.wait import async_wait_until


class FakeKernel(KernelPath):
    """Records installs and removals; ``fail`` makes installs fail like a refusing nft."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fail = fail
        self.installed: list[Offload] = []
        self.removed: list[Offload] = []

    async def install(self, o: Offload) -> None:
        if self.fail:
            raise KernelPathError("Operation not permitted")
        o.installed = True
        self.installed.append(o)

    def remove(self, o: Offload) -> None:
        o.removed = True
        o.out_packets += 7  # relayed since the last reading, read at removal
        o.out_bytes += 7 * 1000
        self.removed.append(o)

    async def refresh(self) -> None:
        for o in self.installed:
            if not o.removed:
                # one offloaded send of 3 datagrams, and a single answer
                o.out_packets += 1
                o.out_bytes += 3 * 100
                o.back_packets += 1
                o.back_bytes += 40


def pair() -> tuple[socket.socket, socket.socket]:
    return bind_udp("127.0.0.1"), bind_udp("127.0.0.1")


async def recv(sock: socket.socket) -> tuple[bytes, tuple[str, int]]:
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: fut.done() or fut.set_result(sock.recvfrom(65535)))
    try:
        return await asyncio.wait_for(fut, 5)
    finally:
        loop.remove_reader(sock.fileno())


async def test_the_session_goes_to_the_kernel_once_the_record_locked():
    server, client = pair()
    near, far = pair()
    kernel = FakeKernel()
    rec = PortRecord(expect_host="127.0.0.1", far=server.getsockname())
    fwd = DatagramForwarder(near, far, rec, kernel=kernel, position=2)
    await fwd.start()
    try:
        assert kernel.installed == []  # nobody locked yet: nothing to offload
        client.sendto(b"first", near.getsockname())
        assert (await recv(server))[0] == b"first"  # the first one crossed in user space
        await async_wait_until(lambda: fwd.offload is not None, 5, what="the offload")
        o = kernel.installed[0]
        assert (o.near, o.far, o.position) == (client.getsockname(), server.getsockname(), 2)
        assert (o.near_port, o.far_port) == (near.getsockname(), far.getsockname())
        client.sendto(b"late", near.getsockname())  # in flight before the rules: relayed
        assert (await recv(server))[0] == b"late"
        assert len(kernel.installed) == 1
        await fwd.refresh()  # the kernel's share, apart from the record's datagrams
        assert rec.from_near_count == 2 and rec.from_far_count == 0
        assert fwd.kernel_packets == [1, 1] and fwd.kernel_bytes == [300, 40]
        assert fwd.relayed_bytes == len(b"firstlate") + 340
        assert fwd.activity == 2 + 2
        await fwd.refresh()  # readings are totals: only what is new is added
        assert fwd.kernel_packets == [2, 2] and fwd.kernel_bytes == [600, 80]
    finally:
        fwd.close()
        for s in (server, client):
            s.close()
    assert kernel.removed == [o]  # the rules go with the session
    assert rec.from_near_count == 2  # the last reading, taken at removal, is the kernel's
    assert fwd.kernel_packets == [2 + 7, 2] and fwd.kernel_bytes == [600 + 7000, 80]
    assert fwd.relayed_bytes == len(b"firstlate") + 7680


@pytest.mark.parametrize("transform", ["near_to_far", "far_to_near"])
async def test_a_session_that_transforms_stays_in_user_space(transform):
    server, client = pair()
    near, far = pair()
    kernel = FakeKernel()
    rec = PortRecord(far=server.getsockname())
    fwd = DatagramForwarder(near, far, rec, kernel=kernel, **{transform: lambda d: d})
    await fwd.start()
    try:
        for _ in range(3):
            client.sendto(b"x", near.getsockname())
            assert (await recv(server))[0] == b"x"
        assert kernel.installed == [] and fwd._installing is None
    finally:
        fwd.close()
        server.close()
        client.close()


async def test_a_latest_record_that_moves_takes_its_rules_along():
    server, a = pair()
    b = bind_udp("127.0.0.1")
    near, far = pair()
    kernel = FakeKernel()
    rec = PortRecord(lock="latest", far=server.getsockname())
    fwd = DatagramForwarder(near, far, rec, kernel=kernel)
    await fwd.start()
    try:
        a.sendto(b"a", near.getsockname())
        await recv(server)
        await async_wait_until(lambda: fwd.offload is not None, 5, what="the first offload")
        first = fwd.offload
        b.sendto(b"b", near.getsockname())  # another application on the local port
        await recv(server)
        assert first in kernel.removed  # gone before "b" went on: answers follow b
        await async_wait_until(lambda: fwd.offload is not None and fwd.offload is not first,
                               5, what="the second offload")
        assert fwd.offload.near == b.getsockname()
        server.sendto(b"answer", far.getsockname())  # (user space here: fake rules)
        assert (await recv(b))[0] == b"answer"
    finally:
        fwd.close()
        for s in (server, a, b):
            s.close()


async def test_when_nft_refuses_the_session_stays_in_user_space():
    server, client = pair()
    near, far = pair()
    kernel = FakeKernel(fail=True)
    fwd = DatagramForwarder(near, far, PortRecord(far=server.getsockname()), kernel=kernel)
    await fwd.start()
    try:
        client.sendto(b"1", near.getsockname())
        await recv(server)
        await async_wait_until(lambda: fwd.kernel is None, 5, what="the fallback")
        for _ in range(3):
            client.sendto(b"2", near.getsockname())
            assert (await recv(server))[0] == b"2"
        assert fwd.offload is None
    finally:
        fwd.close()
        server.close()
        client.close()


def test_unavailable_without_root(monkeypatch):
    monkeypatch.setattr(kernelpath.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(kernelpath, "_net_admin", lambda: False)
    assert KernelPath.unavailable() == "not running as root or with CAP_NET_ADMIN"
    # a service given CAP_NET_ADMIN without root can use it (libnftables permitting)
    monkeypatch.setattr(kernelpath, "_net_admin", lambda: True)
    assert KernelPath.unavailable() in (None, "libnftables (nftables) is not installed")
    monkeypatch.setattr(kernelpath.os, "geteuid", lambda: 0)
    monkeypatch.setattr(kernelpath.ctypes, "CDLL", _no_library)
    assert KernelPath.unavailable() == "libnftables (nftables) is not installed"


def _no_library(name: str) -> object:
    raise OSError(f"{name}: cannot open shared object file")


def test_only_sessions_between_addresses_of_this_host_are_eligible():
    k = KernelPath()
    here = ("127.0.0.1", 4000)
    assert k.eligible(("127.0.0.1", 1), here, here, ("127.0.0.3", 2)) is None
    assert "not an IPv4 address of this host" in k.eligible(("192.0.2.1", 1), here, here,
                                                            ("127.0.0.3", 2))
    assert "wildcard" in k.eligible(("127.0.0.1", 1), ("0.0.0.0", 4000), here,
                                    ("127.0.0.3", 2))
    assert "not an IPv4" in k.eligible(("::1", 1), here, here, ("127.0.0.3", 2))


# -- the table's scripts and the rewrite they express (sans-IO) -----------------------------
Addr = tuple[str, int]


def _rewrite(o: Offload, way: str, packet: tuple[Addr, Addr]) -> tuple[Addr, Addr] | None:
    """What a position's rule does to ``packet`` (source, destination), evaluated from the
    session's elements as the kernel does: membership of the way's set, then each map
    looked up with the tuple as the previous statement left it (None: no match)."""
    elements = dict(kernelpath.session_elements(o))
    if (kernelpath.element_key(*packet), None) not in elements[f"{way}{o.position}"]:
        return None
    (sh, sp), (dh, dp) = packet
    for name, _, _ in kernelpath.REWRITES:
        value = dict(elements[name])[kernelpath.element_key((sh, sp), (dh, dp))]
        assert value is not None
        if name == "saddr":
            sh = socket.inet_ntoa(value)
        elif name == "sport":
            sp = struct.unpack("!H", value)[0]
        elif name == "daddr":
            dh = socket.inet_ntoa(value)
        else:
            dp = struct.unpack("!H", value)[0]
    return (sh, sp), (dh, dp)


@pytest.mark.parametrize("hosts", [("127.0.0.1",) * 4, ("10.0.0.1", "10.0.0.2", "10.0.0.3",
                                                        "10.0.0.4")])
def test_the_maps_rewrite_near_to_far_and_back(hosts):
    nh, h1, h2, fh = hosts
    o = KernelPath().new(1, (nh, 5000), (h1, 40001), (h2, 40002), (fh, 5300))
    assert _rewrite(o, "out", ((nh, 5000), (h1, 40001))) == ((h2, 40002), (fh, 5300))
    assert _rewrite(o, "back", ((fh, 5300), (h2, 40002))) == ((h1, 40001), (nh, 5000))
    # another source (a spoofer, another port): no match, the datagram goes to user space
    assert _rewrite(o, "out", ((nh, 5001), (h1, 40001))) is None
    assert _rewrite(o, "back", ((fh, 5300), (h1, 40001))) is None


def test_no_two_sessions_share_a_key_on_loopback():
    """Every peer on 127.0.0.1, peers' ports even equal to data ports: each map's keys
    stay distinct across sessions and ways (each keeps one of the process's own bound
    ports whole)."""
    kp = KernelPath()
    here = "127.0.0.1"
    sessions = [kp.new(0, (here, 40000 + 2 * i), (here, 40000 + 2 * i), (here, 40001 + 2 * i),
                       (here, 5300)) for i in range(50)]
    sessions += [kp.new(1, (here, 5000), (here, 41000 + 2 * i), (here, 41001 + 2 * i),
                        (here, 40000 + 2 * i)) for i in range(50)]
    for name, _, _ in kernelpath.REWRITES:
        keys = [k for o in sessions for k, _ in kernelpath.rewrite_elements(o)[name]]
        assert len(keys) == len(set(keys)), name


def test_a_session_is_twelve_elements_rewrite_first():
    """A session is elements only (a chain, set or named object per session is what made
    libnftables' cost grow with the sessions): the rewrite's first, its tuples in the
    position's sets last, so the rule cannot match a half-made rewrite; the removal
    deletes the same keys, the position's sets first."""
    o = KernelPath().new(3, ("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3),
                         ("127.0.0.3", 4))
    sets = kernelpath.session_elements(o)
    assert [name for name, _ in sets] == ["saddr", "sport", "daddr", "dport", "tuples",
                                         "out3", "back3"]
    assert sum(len(elements) for _, elements in sets) == 12
    out_k, back_k = o.keys()
    assert dict(sets)["tuples"] == [(out_k, None), (back_k, None)]
    # a map's values are the field's bytes: an address's four, a port's two
    assert {len(v) for name, elements in sets[:4] for _, v in elements if v} == {4, 2}
    assert "counter;" in kernelpath.position_script("t", 3)  # per-element counters


def _messages(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out, i = [], 0
    while i < len(data):
        n, kind, flags, seq = struct.unpack_from("=IHHI", data, i)
        out.append((kind, flags, seq, data[i + 16:i + n]))
        i += (n + 3) & ~3
    return out


def test_an_install_and_a_removal_are_one_atomic_batch_each():
    se = kernelpath.SetElements
    o = KernelPath().new(1, ("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3),
                         ("127.0.0.3", 4))
    sets = kernelpath.session_elements(o)
    msgs = _messages(se.batch("tbl", True, sets, 40))
    assert [m[0] for m in msgs] == [se.NFNL_MSG_BATCH_BEGIN] + [(10 << 8) | 12] * 7 + [
        se.NFNL_MSG_BATCH_END]
    assert [m[2] for m in msgs] == list(range(40, 49))
    assert all(m[1] == 1 | 4 | 0x400 for m in msgs[1:-1])  # request, ack, create
    assert b"tbl\0" in msgs[1][3] and b"saddr\0" in msgs[1][3]
    for (_, elements), m in zip(sets, msgs[1:-1], strict=True):
        assert all(key in m[3] and (value is None or value in m[3]) for key, value in elements)
    gone = _messages(se.batch("tbl", False, sets[::-1], 50))
    assert [m[0] for m in gone[1:-1]] == [(10 << 8) | 14] * 7
    assert b"back1\0" in gone[1][3] and b"saddr\0" in gone[-2][3]
    # the answers: one acknowledgement per message, errors by message number
    errors: dict[int, int] = {}
    answer = _ack(51) + _ack(52, -2) + _ack(99) + _ack(53)
    assert se.acks(answer, 51, 57, errors) == 3 and errors == {52: -2}


# -- the counters' netlink codec -------------------------------------------------------------
def _reply(seq: int, elements: list[tuple[bytes, int, int]]) -> bytes:
    """A kernel's NEWSETELEM answer holding ``elements`` (key, packets, bytes)."""
    a, ec = kernelpath._attr, kernelpath.SetElements
    elems = b"".join(
        a(ec.LIST_ELEM | ec.NESTED,
          a(ec.ELEM_KEY | ec.NESTED, a(ec.DATA_VALUE, key))
          + a(ec.ELEM_EXPR | ec.NESTED,
              a(ec.EXPR_NAME, b"counter\0")
              + a(ec.EXPR_DATA | ec.NESTED,
                  a(ec.COUNTER_BYTES, struct.pack("!Q", nbytes))
                  + a(ec.COUNTER_PACKETS, struct.pack("!Q", packets)))))
        for key, packets, nbytes in elements)
    body = struct.pack("=BBH", socket.AF_INET, 0, 0) + a(ec.LIST_TABLE, b"t\0") + \
        a(ec.LIST_SET, b"out0\0") + a(ec.LIST_ELEMENTS | ec.NESTED, elems)
    return struct.pack("=IHHII", 16 + len(body), (10 << 8) | 12, 0, seq, 0) + body


def _ack(seq: int, err: int = 0) -> bytes:
    return struct.pack("=IHHIIi", 20, kernelpath.SetElements.NLMSG_ERROR, 0, seq, 0, err)


def test_the_counters_codec():
    ec = kernelpath.SetElements
    k1 = kernelpath.element_key(("127.0.0.1", 5000), ("127.0.0.2", 40001))
    assert k1 == bytes([127, 0, 0, 1, 0x13, 0x88, 0, 0, 127, 0, 0, 2, 0x9C, 0x41, 0, 0])
    req = ec.request("kakehashi_dgram_1", "out0", [k1], seq=7)
    n, kind, flags, seq = struct.unpack_from("=IHHI", req)
    assert (n, kind, flags, seq) == (len(req), (10 << 8) | 13, 1 | 4, 7)
    assert k1 in req and b"kakehashi_dgram_1\0" in req and b"out0\0" in req
    dump = ec.request("t", "out0", None)
    assert struct.unpack_from("=H", dump, 6)[0] == 1 | 0x300
    k2 = kernelpath.element_key(("127.0.0.1", 5001), ("127.0.0.2", 40003))
    counts: dict[bytes, tuple[int, int]] = {}
    # a late answer to an earlier request is skipped; the answer ends with the ack
    assert not ec.parse(_reply(6, [(k1, 99, 99)]) + _reply(7, [(k1, 3, 1084)]), counts, 7)
    assert counts == {k1: (3, 1084)}
    assert ec.parse(_reply(7, [(k2, 1, 40)]) + _ack(7), counts, 7)
    assert counts == {k1: (3, 1084), k2: (1, 40)}
    with pytest.raises(FileNotFoundError):
        ec.parse(_ack(8, -2), {}, 8)  # ENOENT: no such element


def test_a_counter_among_several_expressions():
    """An element with several stateful expressions (NFTA_SET_ELEM_EXPRESSIONS, a list):
    the counter is found among them; an element without one is not counted."""
    a, ec = kernelpath._attr, kernelpath.SetElements
    k1 = kernelpath.element_key(("127.0.0.1", 1), ("127.0.0.1", 2))
    k2 = kernelpath.element_key(("127.0.0.1", 3), ("127.0.0.1", 4))
    quota = a(ec.LIST_ELEM | ec.NESTED, a(ec.EXPR_NAME, b"quota\0")
              + a(ec.EXPR_DATA | ec.NESTED, a(1, struct.pack("!Q", 7))))
    counter = a(ec.LIST_ELEM | ec.NESTED, a(ec.EXPR_NAME, b"counter\0")
                + a(ec.EXPR_DATA | ec.NESTED, a(ec.COUNTER_BYTES, struct.pack("!Q", 580))
                    + a(ec.COUNTER_PACKETS, struct.pack("!Q", 4))))
    elems = (a(ec.LIST_ELEM | ec.NESTED, a(ec.ELEM_KEY | ec.NESTED, a(ec.DATA_VALUE, k1))
                                         + a(ec.ELEM_EXPRESSIONS | ec.NESTED, quota + counter))
             + a(ec.LIST_ELEM | ec.NESTED, a(ec.ELEM_KEY | ec.NESTED, a(ec.DATA_VALUE, k2))))
    body = struct.pack("=BBH", socket.AF_INET, 0, 0) + a(ec.LIST_ELEMENTS | ec.NESTED, elems)
    reply = struct.pack("=IHHII", 16 + len(body), (10 << 8) | 12, 0, 3, 0) + body
    counts: dict[bytes, tuple[int, int]] = {}
    assert ec.parse(reply + _ack(3), counts, 3)
    assert counts == {k1: (4, 580)}


def test_a_reading_is_payload_bytes():
    o = KernelPath().new(0, ("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3),
                         ("127.0.0.1", 4))
    KernelPath._apply(o, (2, 2 * kernelpath.HEADERS + 1300), None)
    assert (o.out_packets, o.out_bytes, o.back_packets, o.back_bytes) == (2, 1300, 0, 0)

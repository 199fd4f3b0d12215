"""The kernel fast path's decisions in the forwarder, with a stand-in for nftables.

When the forwarder hands a session to the kernel (after the record locked, never with a
transform, again when a ``latest`` record moves, not at all when nft fails) is decided
here without root; the rules themselves are exercised for real in
``tests/e2e/test_chain_kernel.py``.
"""

from __future__ import annotations

import asyncio
import socket

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
    assert KernelPath.unavailable() == "not running as root"
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

"""Batched UDP I/O (core/udpbatch): addresses as recvfrom gives them, every family, and
the same results with the batched system calls and with the loop."""

from __future__ import annotations

import socket

import pytest

from kakehashi.core import udpbatch
from kakehashi.core.datagram import bind_udp
from tests.support.wait import wait_until

modes = pytest.mark.parametrize("mmsg", [
    pytest.param(True, marks=pytest.mark.skipif(not udpbatch.AVAILABLE,
                                                reason="no recvmmsg/sendmmsg here")),
    False], ids=["mmsg", "loop"])


def _has_ipv6() -> bool:
    try:
        bind_udp("::1").close()
    except OSError:
        return False
    return True


@pytest.mark.parametrize("addr", [("127.0.0.1", 5300), ("10.1.2.3", 1),
                                  ("::1", 5300, 0, 0), ("2001:db8::7", 65535, 5, 0)])
def test_a_sockaddr_decodes_to_what_it_encodes(addr):
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    assert udpbatch.decode(udpbatch.encode(family, addr)) == addr


def test_an_address_of_the_wrong_family_is_refused():
    with pytest.raises(OSError):
        udpbatch.encode(socket.AF_INET, ("::1", 53))


@modes
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_a_burst_in_and_out_with_sources_as_recvfrom_gives_them(mmsg, host):
    if ":" in host and not _has_ipv6():
        pytest.skip("no IPv6 loopback")
    io = udpbatch.Batch(8, mmsg=mmsg)
    a, b, c = bind_udp(host), bind_udp(host), bind_udp(host)
    c.settimeout(5)
    try:
        sent = [b"%d" % i * (i + 1) for i in range(11)]
        for d in sent:
            a.sendto(d, b.getsockname())
        got: list[bytes] = []
        while len(got) < len(sent):
            n = wait_until(lambda: io.recv(b), 5, what="datagrams to take")
            assert io.sources[:n] == [a.getsockname()] * n
            got += [io.payload(i).tobytes() for i in range(n)]
        assert got == sent
        # relayed from the receive slots, and a copy put in, to a destination by name
        a.sendto(b"again", b.getsockname())
        n = wait_until(lambda: io.recv(b), 5, what="one more")
        name = "localhost" if ":" not in host else host
        io.relay(int(b.family), 0, (name, c.getsockname()[1]))
        io.put(int(b.family), b"put", c.getsockname())
        assert io.flush(b) == (0, 0)
        assert [c.recv(100), c.recv(100)] == [b"again", b"put"]
    finally:
        for s in (a, b, c):
            s.close()


@pytest.mark.skipif(not udpbatch.AVAILABLE, reason="no recvmmsg/sendmmsg here")
def test_an_offloaded_run_taken_as_one_message_is_cut_where_its_datagrams_end():
    """A socket with receive offload takes another hop's offloaded run (here: a flush of
    datagrams of one size, the last shorter) as one message; recv gives back each
    datagram, with its source, beside a plain datagram from another sender."""
    io, out = udpbatch.Batch(), udpbatch.Batch()
    a, b, c = bind_udp("127.0.0.1"), bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    try:
        b.setsockopt(socket.SOL_UDP, 104, 1)  # UDP_GRO
    except OSError:
        pytest.skip("no UDP_GRO here")
    try:
        sent = [bytes([i]) * 500 for i in range(20)] + [b"last"]
        for d in sent:
            out.put(int(a.family), d, b.getsockname())
        assert out.flush(a) == (0, 0)
        c.sendto(b"plain", b.getsockname())
        got: list[tuple[bytes, tuple]] = []
        while len(got) < len(sent) + 1:
            n = wait_until(lambda: io.recv(b), 5, what="the run")
            got += [(io.payload(i).tobytes(), io.sources[i]) for i in range(n)]
        assert got == [(d, a.getsockname()) for d in sent] + [(b"plain", c.getsockname())]
    finally:
        for s in (a, b, c):
            s.close()


def _copy_batch(src, starts, lengths, n, out, at):
    """A transform that copies each datagram (what a sealing end's batch call does, less
    the AEAD): its outputs back to back in the send area."""
    for i in range(n):
        out[at:at + lengths[i]] = src[starts[i]:starts[i] + lengths[i]]
        at += lengths[i]
    return [lengths[i] for i in range(n)]


def _counting_sends(monkeypatch) -> list[int]:
    """The batched send calls (sendmmsg through ctypes) made from here on."""
    calls: list[int] = []
    real_recv, real_send = udpbatch._MMSG

    def send(*args):
        n = real_send(*args)
        calls.append(n)
        return n

    monkeypatch.setattr(udpbatch, "_MMSG", (real_recv, send))
    return calls


@pytest.mark.skipif(not udpbatch.AVAILABLE, reason="no recvmmsg/sendmmsg here")
def test_a_transformed_burst_leaves_as_one_offloaded_sendmsg(monkeypatch):
    """A sealing end's wakeup queues one run (the burst through its transform): it leaves
    with the socket's own sendmsg, not a sendmmsg through ctypes (several microseconds
    more per wakeup), and the receiver gets every datagram, in order. Fails on the code
    that sent every run with sendmmsg."""
    sends = _counting_sends(monkeypatch)

    def step(io: udpbatch.Batch, sock: socket.socket, dst: tuple) -> None:
        assert io.transform(_copy_batch, int(sock.family), dst) == 0
        assert io.flush(sock) == (0, 0)

    _a_burst_through(udpbatch.Batch(), step)
    assert sends == []


def _a_burst_through(io: udpbatch.Batch, step) -> None:
    """12 datagrams of 300 B sent to a socket, taken by ``io`` and handed to ``step(io,
    socket, destination)`` until all were taken: the destination gets them all, in
    order."""
    a, b, c = bind_udp("127.0.0.1"), bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    c.settimeout(5)
    try:
        sent = [bytes([i]) * 300 for i in range(12)]
        for d in sent:
            a.sendto(d, b.getsockname())
        got = 0
        while got < len(sent):
            got += wait_until(lambda: io.recv(b), 5, what="the burst")
            step(io, b, c.getsockname())
        assert [c.recv(1000) for _ in sent] == sent
    finally:
        for s in (a, b, c):
            s.close()


@pytest.mark.skipif(not udpbatch.AVAILABLE, reason="no recvmmsg/sendmmsg here")
def test_a_run_the_route_refuses_to_offload_goes_one_by_one_and_later_ones_too():
    """The kernel refuses the run's offloaded send (the socket sends without UDP
    checksums, which offload cannot do): the run goes again one datagram at a time,
    nothing is lost or counted, and the next burst to that destination is not made a
    run at all."""
    io = udpbatch.Batch()
    a, b, c = bind_udp("127.0.0.1"), bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    b.setsockopt(socket.SOL_SOCKET, 11, 1)  # SO_NO_CHECK
    c.settimeout(5)
    try:
        for rnd in range(2):
            sent = [b"%d-%d" % (rnd, i) * 50 for i in range(8)]
            for d in sent:
                a.sendto(d, b.getsockname())
            got = 0
            while got < len(sent):
                n = wait_until(lambda: io.recv(b), 5, what="the burst")
                io.transform(_copy_batch, int(b.family), c.getsockname())
                if rnd:  # what the first refusal taught: one entry per datagram
                    assert all(entry[5] == 1 for entry in io._queue)
                assert io.flush(b) == (0, 0)
                got += n
            assert [c.recv(1000) for _ in sent] == sent
    finally:
        for s in (a, b, c):
            s.close()


def _refusing(skip: int):
    """:func:`_copy_batch` that refuses datagram ``skip`` (as opening refuses a replay)."""

    def batch(src, starts, lengths, n, out, at):
        sizes = []
        for i in range(n):
            if i == skip:
                sizes.append(-1)
                continue
            out[at:at + lengths[i]] = src[starts[i]:starts[i] + lengths[i]]
            at += lengths[i]
            sizes.append(lengths[i])
        return sizes

    return batch


FUSED = pytest.mark.parametrize("fused", [True, False], ids=["fused", "queued"])


@pytest.mark.skipif(not udpbatch.AVAILABLE, reason="no recvmmsg/sendmmsg here")
@FUSED
@pytest.mark.parametrize("case", ["one-run", "lone", "refused", "sizes", "no-offload"])
def test_transform_send_delivers_what_transform_and_flush_deliver(monkeypatch, fused, case):
    """A burst through a transform and sent in one call (:meth:`Batch.transform_send`,
    a sealing end's every wakeup) reaches the receiver exactly as through the queue:
    every accepted datagram once and in order, refusals counted and left out, whether it
    leaves straight from the send area (one run, or one datagram) or falls back to the
    queue (a refusal, mixed sizes, a route that refuses offload: twice, so the second
    burst meets what the first taught)."""
    monkeypatch.setattr(udpbatch, "FUSED", fused)
    io = udpbatch.Batch()
    a, b, c = bind_udp("127.0.0.1"), bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    if case == "no-offload":
        b.setsockopt(socket.SOL_SOCKET, 11, 1)  # SO_NO_CHECK: the kernel refuses offload
    c.settimeout(5)
    batch = _refusing(3) if case == "refused" else _copy_batch
    try:
        for rnd in range(2 if case == "no-offload" else 1):
            count = 1 if case == "lone" else 12
            sent = [b"%d-%02d" % (rnd, i) * (7 + i if case == "sizes" else 60)
                    for i in range(count)]
            for d in sent:
                a.sendto(d, b.getsockname())
            wait_until(lambda: b.recv(1, socket.MSG_PEEK), 5, what="the burst")
            got = refused = 0
            while got < count:
                n = wait_until(lambda: io.recv(b), 5, what="the rest of the burst")
                r, failed, overflow = io.transform_send(batch, int(b.family), c.getsockname(),
                                                        b)
                assert (failed, overflow) == (0, 0)
                refused += r
                got += n
            want = [d for i, d in enumerate(sent) if case != "refused" or i != 3]
            assert [c.recv(1000) for _ in want] == want
            assert refused == (1 if case == "refused" else 0)
            assert not io._queue
    finally:
        for s in (a, b, c):
            s.close()


@pytest.mark.skipif(not udpbatch.AVAILABLE, reason="no recvmmsg/sendmmsg here")
@FUSED
def test_transform_send_cuts_a_run_longer_than_one_offloaded_send(monkeypatch, fused):
    """Another hop's coalesced run taken as one message can hold more datagrams than one
    offloaded send may carry: they leave as several runs, all of them, in order."""
    monkeypatch.setattr(udpbatch, "FUSED", fused)
    io = udpbatch.Batch()
    b, c = bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    c.settimeout(5)
    try:
        count, seg = udpbatch.GSO_SEGMENTS + 36, 100
        sent = [b"%03d" % i * (seg // 3) + b"." for i in range(count)]
        message = b"".join(sent)
        io.rx[:len(message)] = message
        assert io.took(len(message), seg, ("127.0.0.1", 1)) == count
        assert io.transform_send(_copy_batch, int(b.family), c.getsockname(), b) == (0, 0, 0)
        assert [c.recv(1000) for _ in sent] == sent
    finally:
        for s in (b, c):
            s.close()


@pytest.mark.skipif(not udpbatch.AVAILABLE, reason="no recvmmsg/sendmmsg here")
def test_a_burst_that_comes_out_as_one_run_leaves_without_the_queue(monkeypatch):
    """The usual wakeup of a sealing end (every output accepted, one size) is sent from
    the send area with one sendmsg: no queue entry, no flush. Fails on the code before
    transform_send (no such call: a transform, then a flush)."""
    monkeypatch.setattr(udpbatch, "FUSED", True)
    io = udpbatch.Batch()
    flushes: list[int] = []
    real_flush = io.flush
    monkeypatch.setattr(io, "flush", lambda sock: flushes.append(1) or real_flush(sock))

    def step(io: udpbatch.Batch, sock: socket.socket, dst: tuple) -> None:
        assert io.transform_send(_copy_batch, int(sock.family), dst, sock) == (0, 0, 0)

    _a_burst_through(io, step)
    assert flushes == []

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
    io = udpbatch.Batch()
    a, b, c = bind_udp("127.0.0.1"), bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    c.settimeout(5)
    try:
        sent = [bytes([i]) * 300 for i in range(12)]
        for d in sent:
            a.sendto(d, b.getsockname())
        got = 0
        while got < len(sent):
            n = wait_until(lambda: io.recv(b), 5, what="the burst")
            assert io.transform(_copy_batch, int(b.family), c.getsockname()) == 0
            assert io.flush(b) == (0, 0)
            got += n
        assert [c.recv(1000) for _ in sent] == sent
        assert sends == []
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

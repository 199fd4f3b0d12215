"""A sealing end's lane in C (``Sealer.turn``/``Opener.turn`` of
``kakehashi.core._dgaead``, driven by :meth:`DatagramForwarder._turn`) against the same
lane in Python (the reference), on hostile traffic through real sockets: spoofed
sources inside a burst (the record must decide them: dropped with a ``first`` lock, the
session moving with a ``latest`` one), forged tags and bodies, rewritten sequence
numbers, replays, truncated, empty and oversized datagrams, offloaded runs that arrive
as one message. Both must deliver the same datagrams, byte for byte and in order, and
leave the same record (counts, drops, locked peer), the same forwarder counters
(``user_bytes``, ``errors``, ``overflow``) and the same channel (window, refusals, next
sequence number)."""

from __future__ import annotations

import os
import select
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kakehashi.core import crypto, datagram, udpbatch
from kakehashi.core.crypto import DATAGRAM_OVERHEAD, DatagramChannel
from kakehashi.core.datagram import DatagramForwarder, PortRecord, bind_udp

pytestmark = pytest.mark.skipif(
    crypto._dgaead is None or not hasattr(crypto._dgaead.Sealer, "turn")
    or not udpbatch.AVAILABLE, reason="no native lane turn here")

FAST = settings(max_examples=150, deadline=None)
K1, K2 = os.urandom(32), os.urandom(32)
ROLES = ("peer", "other", "third")

#: what happens to a sealed datagram on the way ("ok" mostly), for lanes that open
HOW = st.sampled_from(["ok"] * 6 + ["tag", "body", "head", "replay", "cut", "short", "empty",
                                    "garbage"])
SIZE = st.one_of(st.integers(0, 700), st.sampled_from([1448, 1449, 2000, 9000, 65483, 65484]))
#: one send: from which socket, how many datagrams (more than one: an offloaded run of
#: one size), their size, what happens to them, a random number for the details
SEND = st.tuples(st.sampled_from(["peer"] * 5 + ["other", "third"]), st.integers(1, 12),
                 SIZE, HOW, st.integers(0, 2**32))


def _mangle(d: bytes, how: str, rnd: int, earlier: list[bytes]) -> bytes:
    if how == "tag":
        return d[:-1] + bytes([d[-1] ^ (1 + rnd % 255)])
    if how == "body" and len(d) > DATAGRAM_OVERHEAD:
        at = 8 + rnd % (len(d) - DATAGRAM_OVERHEAD)
        return d[:at] + bytes([d[at] ^ 0x80]) + d[at + 1:]
    if how == "head":
        seq = (int.from_bytes(d[:8], "big") + 1 + rnd % 3000) % 2**64
        return seq.to_bytes(8, "big") + d[8:]
    if how == "replay" and earlier:
        return earlier[rnd % len(earlier)]
    if how == "cut":
        return d[:rnd % len(d)]
    if how == "short":
        return d[:rnd % DATAGRAM_OVERHEAD]
    if how == "empty":
        return b""
    if how == "garbage":
        return os.urandom(rnd % 80)
    return d


def _inputs(sends: list[tuple[str, int, int, str, int]], opening: bool,
            ) -> list[tuple[str, list[bytes]]]:
    """What each send carries: plaintexts for a lane that seals, what the other end
    sealed (as the network leaves it) for a lane that opens. A run keeps one size (the
    kernel cuts an offloaded send where the sender's datagrams end), so its mangling
    keeps the size too."""
    other_end = DatagramChannel(K1, K2)
    earlier: list[bytes] = []
    out = []
    for role, count, size, how, rnd in sends:
        if count > 1:
            size = min(size, 1448 - DATAGRAM_OVERHEAD)
        grams = []
        for j in range(count):
            # (the last of a run may be shorter: the kernel cuts it where it ends)
            k = size - rnd % (size + 1) if count > 1 and j == count - 1 and rnd % 3 else size
            plain = (b"%d:%d:" % (len(out), j) + os.urandom(k))[:k]
            if not opening:
                grams.append(plain)
                continue
            d = other_end.seal(plain)
            mode = how if count == 1 or how in ("ok", "tag", "body", "head") else "ok"
            d = _mangle(d, mode, rnd + j, earlier)
            earlier.append(d)
            grams.append(d)
        if count > 1 and (len({len(g) for g in grams[:-1]}) > 1
                          or len(grams[-1]) > len(grams[0])):
            grams = grams[:1]
        out.append((role, grams))
    return out


def _send(sock: socket.socket, grams: list[bytes], dst: tuple[str, int]) -> None:
    if len(grams) == 1:
        try:
            sock.sendto(grams[0], dst)
        except OSError:  # (larger than a datagram once sealed: not sent, in either run)
            pass
        return
    seg = len(grams[0])
    try:  # one offloaded send: the receiver, with receive offload, takes it as one message
        sock.sendmsg([b"".join(grams)], [(udpbatch.SOL_UDP, udpbatch.UDP_SEGMENT,
                                           struct.pack("=H", seg))], 0, dst)
    except OSError:  # (an empty or oversized segment): one by one
        for g in grams:
            sock.sendto(g, dst)


def _run(native: bool, side: str, lane: int, lock: str,
         inputs: list[tuple[str, list[bytes]]]) -> dict[str, object]:
    """One lane of a fresh forwarder at a sealing end, driven by its readiness callback
    until its socket is empty, after every input was sent."""
    before = datagram.NATIVE_LANES, crypto.NATIVE
    # (the C lane, whatever the environment says; the Python lane with the C batch forms,
    # which tests/fuzz/test_native_aead_fuzz.py holds to the Python ones)
    datagram.NATIVE_LANES, crypto.NATIVE = native, True
    socks = {r: bind_udp("127.0.0.1") for r in ROLES}
    server, near, far = bind_udp("127.0.0.1"), bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    ch = DatagramChannel(K2, K1)
    try:
        seal_out = side == "forward"
        out, back = (ch.seal, ch.open) if seal_out else (ch.open, ch.seal)
        if lane == 0:
            rec = PortRecord(expect_host=None if lock == "latest" else "127.0.0.1",
                             far=server.getsockname(), lock=lock)  # type: ignore[arg-type]
            into, dst_sock = near, server
        else:  # the answers' lane: from the far peer (the peer role) to the near one
            rec = PortRecord(near=server.getsockname(), far=socks["peer"].getsockname(),
                             lock=lock)  # type: ignore[arg-type]
            into, dst_sock = far, server
        fwd = DatagramForwarder(near, far, rec, near_to_far=out, far_to_near=back)
        fwd._prepare()
        relay = fwd._lane(lane)
        for role, grams in inputs:
            _send(socks[role], grams, into.getsockname())
        for _ in range(10_000):
            if not select.select([into], [], [], 0)[0]:
                break
            relay()
        dst_sock.setblocking(False)
        got = []
        while True:
            try:
                got.append(dst_sock.recv(65535))
            except BlockingIOError:
                break
        role_of = {s.getsockname(): r for r, s in socks.items()}
        role_of[server.getsockname()] = "server"
        return {
            "got": got, "from_near": rec.from_near_count, "from_far": rec.from_far_count,
            "dropped": rec.dropped, "near": role_of.get(rec.near, rec.near),
            "tentative": rec.tentative, "user_bytes": fwd.user_bytes,
            "errors": fwd.errors, "overflow": fwd.overflow, "refused": ch.refused,
            "window": (ch._top, ch._seen), "seq": ch._send_seq,
        }
    finally:
        datagram.NATIVE_LANES, crypto.NATIVE = before
        for s in (*socks.values(), server, near, far):
            s.close()


@FAST
@given(side=st.sampled_from(["last-hop", "forward"]), lane=st.sampled_from([0, 1]),
       lock=st.sampled_from(["first", "latest"]), sends=st.lists(SEND, min_size=1,
                                                                  max_size=14))
def test_the_native_lane_relays_and_decides_as_the_python_lane(side, lane, lock, sends):
    opening = (side == "forward") == (lane == 1)
    inputs = _inputs(sends, opening)
    assert _run(True, side, lane, lock, inputs) == _run(False, side, lane, lock, inputs)


def test_a_sealing_lane_that_runs_out_of_sequence_numbers_hands_back_to_python():
    """Near the end of the counter the turn takes nothing it cannot seal: the Python path
    gets those datagrams and refuses them as it always did (E2EError, nothing sent with a
    nonce used twice)."""
    inputs = [("peer", [b"a" * 10]), ("peer", [b"b" * 10])]
    results = []
    for native in (True, False):
        ch = DatagramChannel(K2, K1)
        ch._send_seq = crypto._MAX_COUNTER - 1  # room for one
        socks = {r: bind_udp("127.0.0.1") for r in ROLES}
        server, near, far = (bind_udp("127.0.0.1") for _ in range(3))
        before = datagram.NATIVE_LANES, crypto.NATIVE
        datagram.NATIVE_LANES, crypto.NATIVE = native, True
        try:
            rec = PortRecord(near=socks["peer"].getsockname(), far=server.getsockname())
            fwd = DatagramForwarder(near, far, rec, near_to_far=ch.seal)
            fwd._prepare()
            relay = fwd._lane(0)
            for role, grams in inputs:
                _send(socks[role], grams, near.getsockname())
            raised = 0
            for _ in range(10):
                if not select.select([near], [], [], 0)[0]:
                    break
                try:
                    relay()
                except crypto.E2EError:
                    raised += 1
            server.setblocking(False)
            got = []
            with pytest.raises(BlockingIOError):
                while True:
                    got.append(server.recv(100))
            results.append((got, raised, ch._send_seq))
        finally:
            datagram.NATIVE_LANES, crypto.NATIVE = before
            for s in (*socks.values(), server, near, far):
                s.close()
    assert results[0] == results[1]
    assert results[0][2] == crypto._MAX_COUNTER and len(results[0][0]) == 1

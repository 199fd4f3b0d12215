"""The C batch path of the datagram AEAD (``kakehashi.core._dgaead``): that it is the
path taken where it is built (and built where CI runs), that switching it off works, and
its edge cases. Its equivalence with the Python path on hostile batches is
tests/fuzz/test_native_aead_fuzz.py; the batch tests of tests/unit/test_mutual_auth.py
run on it too."""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import subprocess
import sys

import pytest

from kakehashi.core import crypto, udpbatch
from kakehashi.core.crypto import DATAGRAM_OVERHEAD, DatagramChannel, E2EError
from kakehashi.core.datagram import bind_udp
from tests.support.aead_paths import use_path

A, B = os.urandom(32), os.urandom(32)
native_only = pytest.mark.skipif(crypto._dgaead is None, reason="_dgaead is not built")


def test_the_extension_is_there_where_ci_requires_it():
    """scripts/test.sh (CI) sets KAKEHASHI_REQUIRE_NATIVE_AEAD=1 after
    scripts/install-deps.sh built the extension: there a missing build is a failure,
    not a silent fall back to the Python path."""
    if os.environ.get("KAKEHASHI_REQUIRE_NATIVE_AEAD") != "1":
        pytest.skip("KAKEHASHI_REQUIRE_NATIVE_AEAD is not set (only CI requires the build)")
    assert crypto._dgaead is not None, (
        "kakehashi.core._dgaead did not import: run scripts/install-deps.sh "
        "(gcc, libssl-dev, Python's headers; python3 setup.py build_ext --inplace)")


class _Refuse:
    """Stands in for the ``cryptography`` AEAD objects: any use is a failure."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the Python path ran (AESGCM.{name}) with the extension built")


@native_only
def test_where_the_extension_imports_batches_go_through_it(monkeypatch):
    """With the module present and nothing switched off, a channel seals and opens its
    batches in C: its ``cryptography`` objects are never touched."""
    monkeypatch.delenv("KAKEHASHI_NATIVE_AEAD", raising=False)
    out = subprocess.run(
        [sys.executable, "-c", "from kakehashi.core import crypto; print(crypto.aead_path())"],
        capture_output=True, text=True, check=True, env={**os.environ})
    assert out.stdout.strip() == "native"
    assert crypto.NATIVE  # (this process: no test left it off)
    sender, receiver = DatagramChannel(A, B), DatagramChannel(B, A)
    sender._send = receiver._recv = _Refuse()  # type: ignore[assignment]
    src = bytearray(os.urandom(64 * 512))
    sealed = memoryview(bytearray(64 * 536))
    assert sender.seal.batch(src, range(0, 64 * 512, 512), [512] * 64, 64, sealed, 0) == \
        [536] * 64
    opened = memoryview(bytearray(64 * 512))
    assert receiver.open.batch(sealed, range(0, 64 * 536, 536), [536] * 64, 64, opened,
                               0) == [512] * 64
    assert opened.tobytes() == bytes(src)


def test_the_environment_switches_it_off():
    """KAKEHASHI_NATIVE_AEAD=0 keeps the Python path (and says so)."""
    out = subprocess.run(
        [sys.executable, "-c", "from kakehashi.core import crypto; print(crypto.aead_path())"],
        capture_output=True, text=True, check=True,
        env={**os.environ, "KAKEHASHI_NATIVE_AEAD": "0"})
    assert out.stdout.strip() == "python"


def _opened(ch: DatagramChannel, datagrams: list[bytes], at: int = 0) -> list[bytes | None]:
    buf = bytearray(b"".join(datagrams))
    starts, pos = [], 0
    for d in datagrams:
        starts.append(pos)
        pos += len(d)
    out = memoryview(bytearray(at + len(buf)))
    sizes = ch.open.batch(buf, starts, [len(d) for d in datagrams], len(datagrams), out, at)
    got: list[bytes | None] = []
    for k in sizes:
        got.append(None if k < 0 else out[at:at + k].tobytes())
        at += max(k, 0)
    return got


@pytest.mark.parametrize("path", ["native", "loop"])
def test_edge_batches(path, monkeypatch):
    """n = 0; empty payloads (exactly the overhead: accepted when authentic); a datagram
    one byte short of the overhead, an empty one; the last sequence numbers before the
    counter's end; a batch longer than the stack's room in C (heap layout)."""
    use_path(monkeypatch, path)
    sender, receiver = DatagramChannel(A, B), DatagramChannel(B, A)
    out = memoryview(bytearray(16))
    assert sender.seal.batch(b"", [], [], 0, out, 0) == []
    assert receiver.open.batch(b"", [], [], 0, out, 0) == []
    assert (receiver._top, receiver._seen, receiver.refused) == (-1, 0, 0)
    empty = [sender.seal(b"") for _ in range(3)]
    assert all(len(d) == DATAGRAM_OVERHEAD for d in empty)
    assert _opened(receiver, [*empty, empty[1], empty[0][:-1], b""]) == \
        [b"", b"", b"", None, None, None]
    assert receiver.refused == 3
    high = DatagramChannel(A, B)
    high._send_seq = 2**64 - 4
    last = [high.seal(b"%d" % i) for i in range(3)]
    with pytest.raises(E2EError):
        high.seal(b"no more")
    assert _opened(receiver, last) == [b"0", b"1", b"2"]
    assert receiver._top == 2**64 - 2
    assert _opened(receiver, last[2:]) == [None]
    many = [sender.seal(b"m%d" % i) for i in range(700)]
    assert _opened(receiver, many) == [None] * 700  # (all older than the window)
    fresh = DatagramChannel(B, A)
    assert _opened(fresh, [*empty, *many]) == [b"", b"", b""] + [b"m%d" % i
                                                                 for i in range(700)]


@native_only
def test_c_refuses_layouts_outside_its_buffers(monkeypatch):
    """Every start and length is checked against the buffers before anything is read or
    written: ValueError, and the window, the refusals (and the output) as they were."""
    use_path(monkeypatch, "native")
    sender, receiver = DatagramChannel(A, B), DatagramChannel(B, A)
    sealed = [sender.seal(b"abc") for _ in range(3)]
    buf = bytearray(b"".join(sealed))
    out = memoryview(bytearray(100))
    state = (receiver._top, receiver._seen, receiver.refused)
    bad = [
        ([0, 27, 54], [27, 27, 28], 3, 0),   # the last one runs past the end
        ([0, 27, -1], [27, 27, 27], 3, 0),   # a negative start
        ([0, 27, 82], [27, 27, 0], 3, 0),    # a start beyond the end
        ([0, 27, 54], [27, 27, -1], 3, 0),   # a negative length
        ([0, 27], [27, 27, 27], 3, 0),       # n beyond the starts
        ([0, 27, 54], [27, 27, 27], 3, 101),  # an offset beyond the output
        ([0, 27, 54], [27, 27, 27], 3, 95),  # the output too small for what may open
        ([0, 27, 54], [27, 27, 27], -1, 0),  # a negative count
    ]
    for starts, lengths, n, at in bad:
        with pytest.raises(ValueError):
            receiver.open.batch(buf, starts, lengths, n, out, at)
        assert (receiver._top, receiver._seen, receiver.refused) == state
        assert out.tobytes() == bytes(100)
    for starts, lengths, n, at in bad:
        seq = sender._send_seq
        with pytest.raises(ValueError):
            sender.seal.batch(buf, starts, lengths, n, out, at + 20)
        assert sender._send_seq >= seq  # never back: a nonce is never used twice
        assert out.tobytes() == bytes(100)
    with pytest.raises((TypeError, BufferError)):  # a read-only output
        receiver.open.batch(buf, [0], [27], 1, bytes(10), 0)
    with pytest.raises(TypeError):
        receiver.open.batch(buf, ["0"], [27], 1, out, 0)
    with pytest.raises(ValueError):
        crypto._dgaead.Sealer(b"short key")
    opener = crypto._dgaead.Opener(B)
    for top, seen in ((-2, 0), (2**64, 0), (5, -1), (5, 1 << 1024)):  # not a window
        with pytest.raises((ValueError, OverflowError)):
            opener.open(top, seen, buf, [0], [27], 1, out, 0)
    assert opener.open(5, (1 << 1024) - 1, buf, [], [], 0, out, 0) == \
        ([], 5, (1 << 1024) - 1, 0)
    assert _opened(receiver, sealed) == [b"abc"] * 3  # and the channel still works


_SHRINKING = '''
import os
from kakehashi.core import _dgaead

lengths = []

class Starts(list):
    """A caller's own sequence whose __getitem__ empties the lengths list (a plain
    list, read in C without a bounds check before the fix)."""
    def __getitem__(self, i):
        lengths.clear()
        return super().__getitem__(i)

for make, call in (
        (_dgaead.Sealer, lambda c, s: c.seal(0, bytes(64), s, lengths, 4, bytearray(200), 0)),
        (_dgaead.Opener, lambda c, s: c.open(-1, 0, bytes(200), s, lengths, 4,
                                             bytearray(200), 0))):
    lengths[:] = [30] * 4
    try:
        call(make(os.urandom(32)), Starts([0, 30, 60, 90]))
    except ValueError as exc:
        print("ValueError", exc)
'''


@native_only
def test_c_rereads_a_lists_size_when_the_other_sequence_runs_python_code():
    """starts or lengths may be any sequence: one whose __getitem__ runs Python code can
    shrink the other, a plain list, in the middle of the call. C read that list's item
    i without checking it was still there (a read past its end or through a NULL item
    array: a segmentation fault); now it is a ValueError. In a child process, so that
    the crash fails this test instead of ending the run."""
    out = subprocess.run([sys.executable, "-c", _SHRINKING], capture_output=True, text=True,
                         env={**os.environ}, timeout=60)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.count("ValueError") == 2, out.stdout


lane_turn = pytest.mark.skipif(
    crypto._dgaead is None or not hasattr(crypto._dgaead.Sealer, "turn"),
    reason="the extension has no lane turn here")


def _turn_sockets() -> tuple[list[socket.socket], bytes, bytes]:
    """A peer, another source, the lane's socket, its sending socket and a sink; the
    peer's and the sink's sockaddrs."""
    socks = [bind_udp("127.0.0.1") for _ in range(5)]
    socks[4].setblocking(False)
    return (socks, udpbatch.encode(socket.AF_INET, socks[0].getsockname()),
            udpbatch.encode(socket.AF_INET, socks[4].getsockname()))


def _drain(sock: socket.socket) -> list[bytes]:
    got = []
    with contextlib.suppress(BlockingIOError):
        while True:
            got.append(sock.recv(65535))
    return got


@lane_turn
@pytest.mark.parametrize("sealing", [True, False])
def test_what_runs_inside_a_lane_turn_never_reuses_its_nonces_or_replays(sealing,
                                                                          monkeypatch):
    """A lane turn (Sealer.turn / Opener.turn) allocates the datagrams it hands back,
    and in CPython an allocation can start a garbage collection, which runs Python code
    (finalizers, gc callbacks; other threads then): the C code expects that (a second
    turn gets None, its caller the Python path). But the channel's sequence number and
    window were updated only once the turn returned: a seal inside it used the number
    the turn had just used for the peer's first datagram (AES-GCM's nonce twice under
    one key), an open accepted what the turn also accepted. Now, during the turn, the
    channel refuses both. Fails on the code before (a sequence number sent twice; the
    peer's datagram opened twice)."""
    monkeypatch.setattr(crypto, "NATIVE", True)
    socks, peer, dst = _turn_sockets()
    sender = DatagramChannel(B, A)
    ch = DatagramChannel(A, B)
    try:
        if sealing:
            grams = [b"p%d" % i for i in range(3)]
        else:
            grams = [sender.seal(b"p%d" % i) for i in range(3)]
        for g in grams:
            socks[0].sendto(g, socks[2].getsockname())
        socks[1].sendto(b"another source", socks[2].getsockname())  # (handed back)
        inside: list[object] = []

        def collecting(phase: str, info: object) -> None:
            if phase == "start" and not inside:
                try:
                    inside.append(ch.seal(b"inside") if sealing else ch.open(grams[0]))
                except E2EError as exc:
                    inside.append(exc)

        gc.collect()
        threshold = gc.get_threshold()
        gc.callbacks.append(collecting)
        gc.set_threshold(1)
        try:
            turn = ch.seal.turn if sealing else ch.open.turn
            r = turn(socks[2].fileno(), socks[3].fileno(), peer, dst, True, 64)
        finally:
            gc.set_threshold(*threshold)
            gc.callbacks.remove(collecting)
        assert r is not None and r[0] == 3 and r[-1] is not None and len(r[-1]) == 1
        got = _drain(socks[4])
        assert len(got) == 3 and inside, (got, inside)
        if sealing:
            seqs = [int.from_bytes(g[:8], "big") for g in got]
            if isinstance(inside[0], bytes):
                seqs.append(int.from_bytes(inside[0][:8], "big"))
            assert len(set(seqs)) == len(seqs), f"a sequence number sealed twice: {seqs}"
            assert ch._send_seq > max(seqs)
        else:
            assert got == [b"p0", b"p1", b"p2"]
            assert inside[0] is None, "the peer's datagram was opened twice"
            assert ch.open(grams[0]) is None and ch.open(sender.seal(b"next")) == b"next"
    finally:
        for s in socks:
            s.close()


_OOM = '''
import contextlib, os, socket
import _testcapi
from kakehashi.core import crypto, udpbatch
from kakehashi.core.crypto import DatagramChannel, E2EError
from kakehashi.core.datagram import bind_udp

crypto.NATIVE = True
socks = [bind_udp("127.0.0.1") for _ in range(5)]
socks[4].setblocking(False)
peer = udpbatch.encode(socket.AF_INET, socks[0].getsockname())
dst = udpbatch.encode(socket.AF_INET, socks[4].getsockname())

def drain(sock):
    got = []
    with contextlib.suppress(BlockingIOError):
        while True:
            got.append(sock.recv(65535))
    return got

failed = 0
for sealing in (True, False):
    for start in range(60):
        k1, k2 = os.urandom(32), os.urandom(32)
        sender, ch = DatagramChannel(k2, k1), DatagramChannel(k1, k2)
        # (numbers no small-int cache holds: the result takes allocations)
        sender._send_seq = ch._send_seq = 10**6
        grams = [b"p%d" % i for i in range(3)]
        if not sealing:
            grams = [sender.seal(g) for g in grams]
        for g in grams:
            socks[0].sendto(g, socks[2].getsockname())
        socks[1].sendto(b"another source", socks[2].getsockname())
        turn = ch.seal_turn if sealing else ch.open_turn
        args = (socks[2].fileno(), socks[3].fileno(), peer, dst, True, 64)
        _testcapi.set_nomemory(start, 0)
        try:
            turn(*args)
        except MemoryError:
            pass
        finally:
            _testcapi.remove_mem_hooks()
        drain(socks[2])
        got = drain(socks[4])
        if sealing:
            seqs = [int.from_bytes(g[:8], "big") for g in got]
            try:
                again = int.from_bytes(ch.seal(b"after")[:8], "big")
            except E2EError:
                again = None
            if again is not None and again in seqs:
                failed += 1
                print("sequence sealed twice", start, seqs, again)
        else:
            for g in grams:
                if g[8:] and ch.open(g) is not None and grams.index(g) < len(got):
                    failed += 1
                    print("replay accepted", start)
print("failed", failed)
'''


@lane_turn
def test_a_lane_turn_that_fails_for_memory_leaves_no_nonce_or_replay_behind():
    """A turn that sealed and sent datagrams and then could not build its result
    (MemoryError: the tuple, the next sequence number as an int) returned nothing, so
    the channel kept the sequence number it had before, and the next turn sealed under
    the numbers just used again; an opening turn's window moves were lost the same way,
    and the datagrams it had just opened were accepted again. Now such a channel is
    exhausted (it refuses to seal, and to open, until it is made again): safe, not
    fresh. Allocation failures injected with _testcapi at every point of the call, in a
    child process. Fails on the code before (sequence numbers sealed twice, replays
    accepted)."""
    pytest.importorskip("_testcapi")
    out = subprocess.run([sys.executable, "-c", _OOM], capture_output=True, text=True,
                         env={**os.environ}, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.strip().endswith("failed 0"), out.stdout[-2000:]

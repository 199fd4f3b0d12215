"""Issue 9's proof of volume: 100,000 datagrams with payload checks through three real
proxy processes and ``chain forward``, plaintext and encrypted, with the fast path on and
with the kernel fast path (root and nft; the forwarding hops relay in nftables).

Every datagram carries its number and a payload derived from it; each echo is checked
byte for byte. A corrupted, foreign or duplicated echo fails the test at once; loss
(UDP on a loaded machine) is bounded, not forbidden.
"""

from __future__ import annotations

import hashlib
import socket

import pytest

from kakehashi.core.kernelpath import KernelPath
from tests.e2e.framework import Env
from tests.e2e.test_chain import Chain

TOTAL = 100_000
SIZE = 512
WINDOW = 64


def payload(k: int) -> bytes:
    head = k.to_bytes(8, "big")
    return head + (hashlib.sha256(head).digest() * (SIZE // 32))[: SIZE - 8]


def run(port: int) -> tuple[int, int]:
    """Send TOTAL numbered datagrams, WINDOW in flight; return (intact, lost)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.settimeout(0.5)
    seen: set[int] = set()
    try:
        for base in range(0, TOTAL, WINDOW):
            n = min(WINDOW, TOTAL - base)
            for k in range(base, base + n):
                s.sendto(payload(k), ("127.0.0.1", port))
            for _ in range(n):
                try:
                    got = s.recv(65535)
                except TimeoutError:
                    break  # the rest of this window was lost
                k = int.from_bytes(got[:8], "big")
                assert got == payload(k), f"datagram {k} came back altered"
                assert k not in seen, f"datagram {k} came back twice"
                seen.add(k)
    finally:
        s.close()
    return len(seen), TOTAL - len(seen)


@pytest.fixture(scope="module", params=["on", "python-lanes", "kernel"],
                ids=["fast-path", "fast-path-python-lanes", "kernel-path"])
def chain(tmp_path_factory, request):
    """The fast path as configured (the sealing ends' lanes in C where the extension has
    them), the same with those lanes in Python (``KAKEHASHI_NATIVE_LANES=0``), and the
    kernel path."""
    if request.param == "kernel" and KernelPath.unavailable() is not None:
        pytest.skip(f"kernel fast path: {KernelPath.unavailable()}")
    env = Env(tmp_path_factory.mktemp("chain-volume"))
    if request.param == "python-lanes":
        env.env["KAKEHASHI_NATIVE_LANES"] = "0"
    fast_path = "on" if request.param == "python-lanes" else request.param
    c = type("VolumeChain", (Chain,), {"fast_path": fast_path})(env)
    try:
        yield c
    finally:
        env.close()
        c.close()


@pytest.mark.parametrize(("mode", "encrypt"), [("recursive", False), ("iterative", True)])
def test_a_hundred_thousand_datagrams_through_three_proxies(chain, mode, encrypt):
    fwd = chain.forward(mode=mode, encrypt=encrypt)
    try:
        port = fwd.bound_port()
        assert ("encrypted to fw3" in fwd.output()) == encrypt
        intact, lost = run(port)
        assert intact >= TOTAL * 0.99, f"{lost} of {TOTAL} lost"
        # the server saw each one that came back, from the last hop (P5)
        assert chain.echo.count >= intact
    finally:
        fwd.stop()

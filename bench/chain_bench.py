"""Proxy-chain benchmark (spec 004): UDP through three proxies on loopback, beside three
chained socat UDP relays and direct.

    python bench/chain_bench.py            # full run
    python bench/chain_bench.py --quick    # short run

Rows: ``direct`` (client -> echo), ``socat x3`` (three chained ``socat UDP4-LISTEN ...
UDP4:`` relays, the same number of forwarding processes and UDP hops), ``chain`` (three
``kakehashi chain proxy`` processes and ``chain forward``, recursive setup),
``chain iterative``, ``chain encrypted`` (AES-256-GCM between the client and the last
proxy), ``chain (client library)`` (the sender's own socket is the chain's P1, as with
kakehashi.chain.api: three forwarding processes, like socat x3), then ``socat x3`` again
(the socat relays stay up; the base of the ratios is the mean of both). For each: datagrams/s
with 64 datagrams of 512 B in flight (echoed, so every
datagram crosses the path twice and each round counts 2), and the round-trip latency of
one datagram at a time (p50/p99). Then the setup time of a three-proxy chain in each
mode (median of --setups setups, in this process through ``build_chain``).
The issue's targets: chain >= socat x3; encrypted >= 0.5x plaintext.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (
    Procs,
    free_port,
    install_signal_exit,
    machine,
    median,
    percentile,
    ratio,
    say,
    source_version,
    table,
)

from kakehashi.chain.forward import ForwardConfig, build_chain
from kakehashi.chain.tables import Hop
from kakehashi.core import crypto

ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind(("127.0.0.1", int(sys.argv[1]))); print("echo ready", flush=True)
while True:
    b, a = s.recvfrom(65535); s.sendto(b, a)
"""


def throughput(port: int | tuple[str, int], seconds: float, window: int = 64, size: int = 512,
               sock: socket.socket | None = None) -> float:
    s = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.settimeout(1)
    pad = os.urandom(size)
    dst = ("127.0.0.1", port) if isinstance(port, int) else port
    done = 0
    end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < end:
        for _ in range(window):
            s.sendto(pad, dst)
        try:
            for _ in range(window):
                s.recv(65535)
                done += 1
        except TimeoutError:
            pass
    dt = time.perf_counter() - t0
    if sock is None:
        s.close()
    return 2 * done / dt


def latency(port: int | tuple[str, int], count: int,
            sock: socket.socket | None = None) -> tuple[float, float]:
    s = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1)
    dst = ("127.0.0.1", port) if isinstance(port, int) else port
    times = []
    for i in range(count):
        t = time.perf_counter()
        s.sendto(i.to_bytes(8, "big") * 8, dst)
        try:
            s.recv(65535)
        except TimeoutError:
            continue
        times.append((time.perf_counter() - t) * 1e6)
    if sock is None:
        s.close()
    return percentile(times, 50), percentile(times, 99)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--pings", type=int, default=3000)
    ap.add_argument("--setups", type=int, default=100)
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.pings, args.setups = 2.0, 500, 30
    install_signal_exit()
    load0 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    work = Path(tempfile.mkdtemp(prefix="kakehashi-chain-bench-"))
    rows: list[list[str]] = []
    results: dict[str, float] = {}
    kh = [sys.executable, "-m", "kakehashi", "--log-level", "warning"]
    with Procs(work) as procs:
        echo_port = free_port()
        procs.spawn("echo", [sys.executable, "-c", ECHO, str(echo_port)]).wait_for("ready")

        def measure(name: str, port: int | tuple[str, int],
                    sock: socket.socket | None = None) -> None:
            say(f"{name}: throughput ...")
            rate = throughput(port, args.seconds, sock=sock)
            p50, p99 = latency(port, args.pings, sock=sock)
            results[name] = rate
            rows.append([name, f"{rate:,.0f}", f"{p50:.0f}", f"{p99:.0f}"])

        measure("direct", echo_port)

        ports = [free_port() for _ in range(3)]
        nxt = echo_port
        for p in reversed(ports):
            procs.spawn("socat", ["socat", f"UDP4-LISTEN:{p},bind=127.0.0.1,reuseaddr,fork",
                                  f"UDP4:127.0.0.1:{nxt}"])
            nxt = p
        time.sleep(0.3)  # socat prints nothing when ready; its bind is immediate
        # socat stays up: it is measured again after the chain rows, so drift of the
        # shared machine's load shows (and the base is the mean of both)
        measure("socat x3", ports[0])

        keys = {k: crypto.new_shared_key() for k in
                ("a1", "a2", "a3", "12", "23")}
        cports = [free_port() for _ in range(3)]
        for i in (3, 2, 1):
            route = "direct" if i == 3 else f"fw{i + 1}@127.0.0.1:{cports[i]}"
            args_ = [*kh, "chain", "proxy", "--name", f"fw{i}", "--listen",
                     f"127.0.0.1:{cports[i - 1]}", "--udp-ports",
                     f"{46000 + 200 * i}-{46000 + 200 * i + 199}",
                     "--key", f"alice={keys[f'a{i}']}", "--route", f"127.0.0.1/32={route}",
                     "--acl", "user=alice,from=127.0.0.0/8,ports=any"]
            if i > 1:
                args_ += ["--key", f"fw{i - 1}={keys[f'{i - 1}{i}']}"]
            if i < 3:
                args_ += ["--key", f"fw{i + 1}={keys[f'{i}{i + 1}']}"]
            procs.spawn(f"fw{i}", args_)
        for p in cports:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", p), 0.2).close()
                    break
                except OSError:
                    time.sleep(0.05)
        alice = [f"fw{i}={keys[f'a{i}']}" for i in (1, 2, 3)]
        for name, extra in (("chain", []), ("chain iterative", ["--mode", "iterative"]),
                            ("chain encrypted", ["--encrypt"])):
            lp = free_port()
            fwd = procs.spawn("forward", [
                sys.executable, "-m", "kakehashi", "chain", "forward", "--id", "alice",
                *(x for k in alice for x in ("--key", k)),
                "--first-hop", f"fw1@127.0.0.1:{cports[0]}", "--to", f"127.0.0.1:{echo_port}",
                "--udp-listen", f"127.0.0.1:{lp}", *extra])
            fwd.wait_for("forwarding")
            measure(name, lp)
            procs.stop(fwd)

        # the client as a library (kakehashi.chain.api's path): the application's own
        # socket is P1, so three forwarding processes are between it and the server, as
        # with socat x3
        loop = asyncio.new_event_loop()
        lib = loop.run_until_complete(build_chain(ForwardConfig(
            "alice", {f"fw{i}": crypto.parse_shared_key(keys[f"a{i}"]) for i in (1, 2, 3)},
            Hop("fw1", "127.0.0.1", cports[0]), ("127.0.0.1", echo_port), ("127.0.0.1", 0))))
        data_sock: socket.socket = lib.data_sock  # type: ignore[assignment]
        data_sock.setblocking(True)
        measure("chain (client library)", lib.setup.first.addr, data_sock)  # type: ignore[union-attr]
        measure("socat x3 (again)", ports[0])
        lib.close()
        data_sock.close()
        loop.close()

        async def setups(mode: str, encrypt: bool) -> float:
            cfg = ForwardConfig("alice", {f"fw{i}": crypto.parse_shared_key(keys[f"a{i}"])
                                          for i in (1, 2, 3)},
                                Hop("fw1", "127.0.0.1", cports[0]), ("127.0.0.1", echo_port),
                                ("127.0.0.1", 0), mode=mode, encrypt=encrypt)  # type: ignore[arg-type]
            times = []
            for _ in range(args.setups):
                c = await build_chain(cfg)
                times.append(c.seconds * 1000)
                c.close()
                c.data_sock.close()  # type: ignore[attr-defined]
            return median(times)

        setup_rows = []
        for mode, enc in (("recursive", False), ("iterative", False), ("recursive", True)):
            ms = asyncio.run(setups(mode, enc))
            setup_rows.append([f"{mode}{' encrypted' if enc else ''}", f"{ms:.2f}"])

    base = (results["socat x3"] + results["socat x3 (again)"]) / 2
    for r in rows:
        r.append(ratio(results[r[0]], base))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n{machine()}; kakehashi {source_version()}; load average {load0} at the "
          f"start, {load} at the end\n")
    print(table(["path (3 hops)", "datagrams/s", "p50 µs", "p99 µs", "vs socat x3 (mean)"],
                rows))
    print()
    print(table(["three-proxy chain setup", "median ms"], setup_rows))
    enc = results.get("chain encrypted", 0) / max(results.get("chain", 1), 1)
    print(f"\nencrypted/plaintext: {enc:.2f}x (target >= 0.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

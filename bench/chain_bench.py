"""Proxy-chain benchmark (spec 004): UDP through three proxies on loopback, beside three
chained socat UDP relays and direct.

    python bench/chain_bench.py            # full run
    python bench/chain_bench.py --quick    # short run
    python bench/chain_bench.py --rounds 9 --only socat,chain,chain-off
    python bench/chain_bench.py --old-src /tmp/old/src   # + the encrypted rows of another tree

Rows: ``direct`` (client -> echo), ``socat x3`` (three chained ``socat UDP4-LISTEN ...
UDP4:`` relays, the same number of forwarding processes and UDP hops), ``chain (default:
auto)`` (three ``kakehashi chain proxy`` processes and ``chain forward``, recursive setup,
all started **without** ``--fast-path``: the default, ``auto``, which as root with
libnftables is the kernel path - each session that only forwards is handed to nftables
once its port record locked, the forward's local port included - and elsewhere the
user-space fast path; the run prints which the default proxies used), ``chain iterative
(auto)``, ``chain encrypted (auto)`` (AES-256-GCM between the client and the last proxy:
fw1 and fw2 forward ciphertext in the kernel, fw3 and the forward seal and open in user
space), ``chain, user-space fast path (on)`` and ``chain encrypted, ... (on)`` (three
other proxies and the forward with ``--fast-path on``: readiness callbacks, no kernel
path), ``chain, fast path off`` (three more with ``--fast-path off``: asyncio datagram
transports), ``chain (client library, auto)`` and ``chain (client library), user-space
fast path (on)`` (the sender's own socket is the chain's P1, as with kakehashi.chain.api:
three forwarding processes, like socat x3). ``--old-src DIR`` adds the encrypted rows
again with every kakehashi process of them (three proxies and the forward) from another
source tree, in the same rounds: before and after a change to the sealing ends, against
the same peers and the same load.
Everything stays up for the whole run and the rows are
measured in **rounds**, interleaved (each round every row once, starting one row later
than the round before), so the shared machine's drift hits every row alike; each figure
is the median over the rounds, and the ratio to socat x3 is the median of the per-round
ratios (paired within a round). For each row: datagrams/s with 64 datagrams of 512 B in
flight (echoed, so every datagram crosses the path twice and each round trip counts 2),
and the round-trip latency of one datagram at a time (p50/p99). Then the setup time of
a three-proxy chain in each mode (median of --setups setups, in this process through
``build_chain``), and the whole life of a session (set up, one datagram echoed, closed)
through the default proxies (as root: the kernel path, which installs and removes the
session's elements) and, with an ``on`` row chosen, through the user-space ones, with
the three proxies' CPU per session (/proc, reaped children included). The issue's
targets: chain >= socat x3 (datagrams/s and latency); encrypted >= 0.5x plaintext.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (
    Procs,
    cpu_seconds,
    free_port,
    install_signal_exit,
    machine,
    median,
    percentile,
    say,
    source_version,
    table,
    wait_listening,
)

from kakehashi.chain.forward import ForwardConfig, build_chain
from kakehashi.chain.setup import SetupFailed
from kakehashi.chain.tables import Hop
from kakehashi.core import crypto
from kakehashi.core.kernelpath import TABLE_PREFIX

ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind(("127.0.0.1", int(sys.argv[1]))); print("echo ready", flush=True)
while True:
    b, a = s.recvfrom(65535); s.sendto(b, a)
"""


def throughput(port: int | tuple[str, int], seconds: float, window: int = 64, size: int = 512,
               sock: socket.socket | None = None, pattern: str = "burst") -> float:
    """Datagrams per second both ways, ``window`` of them in flight.

    ``burst``: ``window`` sent, then their echoes awaited, in lock step: every burst
    crosses the path and comes back before the next leaves, so the processes on the
    way take turns (a latency-bound figure). ``sliding``: each echo received sends the
    next datagram, so ``window`` stay in flight all the time and the processes on the
    way work at once, as under a steady stream (a media flow, a QUIC transfer)."""
    s = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.settimeout(1)
    pad = os.urandom(size)
    dst = ("127.0.0.1", port) if isinstance(port, int) else port
    done = 0
    end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    if pattern == "sliding":
        for _ in range(window):
            s.sendto(pad, dst)
        recv, sendto, clock = s.recv, s.sendto, time.perf_counter
        while clock() < end:
            try:
                for _ in range(window):
                    recv(65535)
                    done += 1
                    sendto(pad, dst)
            except TimeoutError:  # a datagram lost: put the window back in flight
                for _ in range(window):
                    sendto(pad, dst)
        with contextlib.suppress(TimeoutError):  # what is still in flight at the end
            s.settimeout(0.2)
            for _ in range(window):
                recv(65535)
                done += 1
        s.settimeout(1)
    while pattern == "burst" and time.perf_counter() < end:
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


ROWS = ["direct", "socat", "chain", "chain-iterative", "chain-encrypted", "chain-on",
        "chain-on-encrypted", "chain-off", "library", "library-on"]
TITLES = {"direct": "direct", "socat": "socat x3", "chain": "chain (default: auto)",
          "chain-iterative": "chain iterative (auto)", "chain-encrypted": "chain encrypted (auto)",
          "chain-on": "chain, user-space fast path (on)",
          "chain-on-encrypted": "chain encrypted, user-space fast path (on)",
          "chain-off": "chain, fast path off",
          "library": "chain (client library, auto)",
          "library-on": "chain (client library), user-space fast path (on)"}
#: rows through the three proxies started with --fast-path on / off (the others go
#: through three started without the flag: the default)
ON_ROWS = {"chain-on", "chain-on-encrypted", "library-on"}
#: with --old-src: the encrypted rows again, every kakehashi process of them (the forward
#: and its three proxies) from that source tree, measured in the same rounds
OLD_ROWS = {"chain-encrypted-old": ("chain-encrypted", "chain encrypted (auto, old src)"),
            "chain-on-encrypted-old": ("chain-on-encrypted",
                                       "chain encrypted, user-space fast path (on, old src)")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seconds", type=float, default=3.0, help="throughput per row and round")
    ap.add_argument("--pings", type=int, default=2000, help="latency samples per row and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pattern", choices=["burst", "sliding"], default="burst",
                    help="throughput load: bursts of --window in lock step, or --window "
                         "always in flight (each echo sends the next)")
    ap.add_argument("--window", type=int, default=64, help="datagrams in flight")
    ap.add_argument("--setups", type=int, default=100)
    ap.add_argument("--only", default="", help=f"comma-separated rows of {ROWS} "
                                               "(socat always comes along)")
    ap.add_argument("--old-src", default="",
                    help="another tree's src/ directory: its encrypted rows (of those chosen) "
                         "run beside this tree's, in the same rounds")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.pings, args.rounds, args.setups = 1.0, 500, 3, 30
    only = [r for r in args.only.split(",") if r]
    if unknown := set(only) - set(ROWS):
        ap.error(f"unknown rows {sorted(unknown)}; choose from {ROWS}")
    chosen = [r for r in ROWS if not only or r in only or r == "socat"]
    if args.old_src:
        chosen += [old for old, (row, _) in OLD_ROWS.items() if row in chosen]
        TITLES.update({old: title for old, (_, title) in OLD_ROWS.items()})
    old_env = {"PYTHONPATH": str(Path(args.old_src).resolve())} if args.old_src else None
    install_signal_exit()
    load0 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    work = Path(tempfile.mkdtemp(prefix="kakehashi-chain-bench-"))
    kh = [sys.executable, "-m", "kakehashi", "--log-level", "warning"]
    targets: dict[str, tuple[tuple[str, int], socket.socket | None]] = {}
    with Procs(work) as procs:
        echo_port = free_port()
        procs.spawn("echo", [sys.executable, "-c", ECHO, str(echo_port)]).wait_for("ready")
        targets["direct"] = (("127.0.0.1", echo_port), None)

        ports = [free_port() for _ in range(3)]
        nxt = echo_port
        for p in reversed(ports):
            procs.spawn("socat", ["socat", f"UDP4-LISTEN:{p},bind=127.0.0.1,reuseaddr,fork",
                                  f"UDP4:127.0.0.1:{nxt}"])
            nxt = p
        time.sleep(0.3)  # socat prints nothing when ready; its bind is immediate
        targets["socat"] = (("127.0.0.1", ports[0]), None)

        keys = {k: crypto.new_shared_key() for k in ("a1", "a2", "a3", "12", "23")}
        alice = [f"fw{i}={keys[f'a{i}']}" for i in (1, 2, 3)]

        pids: dict[str, list[int]] = {}
        #: encrypted rows: the pids of their two sealing ends (the forward, fw3)
        sealing: dict[str, tuple[int, int]] = {}

        def proxies(fast_path: str, udp_base: int, env: dict[str, str] | None = None,
                    ) -> list[int]:
            """Three chained proxies (fw1 -> fw2 -> fw3 -> direct); their control ports
            (``auto``: started without --fast-path, the default)."""
            cports = [free_port() for _ in range(3)]
            for i in (3, 2, 1):  # (fw3 first: its pid is the first of the three)
                route = "direct" if i == 3 else f"fw{i + 1}@127.0.0.1:{cports[i]}"
                low = udp_base + 200 * i
                args_ = [*kh, "chain", "proxy", "--name", f"fw{i}", "--listen",
                         f"127.0.0.1:{cports[i - 1]}", "--udp-ports", f"{low}-{low + 199}",
                         "--key", f"alice={keys[f'a{i}']}", "--route",
                         f"127.0.0.1/32={route}", "--acl",
                         "user=alice,from=127.0.0.0/8,ports=any"]
                if fast_path != "auto":
                    args_ += ["--fast-path", fast_path]
                if i > 1:
                    args_ += ["--key", f"fw{i - 1}={keys[f'{i - 1}{i}']}"]
                if i < 3:
                    args_ += ["--key", f"fw{i + 1}={keys[f'{i}{i + 1}']}"]
                pids.setdefault(fast_path if env is None else f"{fast_path}-old", []).append(
                    procs.spawn(f"fw{i}-{fast_path}", args_, env=env).popen.pid)
            for p in cports:
                wait_listening(p)
            return cports

        cports = proxies("auto", 46000)
        off_ports = proxies("off", 47000) if "chain-off" in chosen else []
        on_ports = proxies("on", 48000) if ON_ROWS & set(chosen) else []
        forwards = {"chain": (cports, []), "chain-iterative": (cports, ["--mode", "iterative"]),
                    "chain-encrypted": (cports, ["--encrypt"]),
                    "chain-on": (on_ports, ["--fast-path", "on"]),
                    "chain-on-encrypted": (on_ports, ["--encrypt", "--fast-path", "on"]),
                    "chain-off": (off_ports, ["--fast-path", "off"])}
        if args.old_src:
            old_auto = proxies("auto", 49000, old_env) if "chain-encrypted-old" in chosen \
                else []
            old_on = proxies("on", 50000, old_env) if "chain-on-encrypted-old" in chosen \
                else []
            forwards.update({"chain-encrypted-old": (old_auto, ["--encrypt"]),
                             "chain-on-encrypted-old": (old_on, ["--encrypt", "--fast-path",
                                                                 "on"])})
        groups = {"auto": cports, "on": on_ports, "off": off_ports}
        if args.old_src:
            groups.update({"auto-old": old_auto, "on-old": old_on})
        for name, (cp, extra) in forwards.items():
            if name not in chosen:
                continue
            lp = free_port()
            fwd = procs.spawn(name, [
                *kh[:3], "chain", "forward", "--id", "alice",
                *(x for k in alice for x in ("--key", k)),
                "--first-hop", f"fw1@127.0.0.1:{cp[0]}", "--to", f"127.0.0.1:{echo_port}",
                "--udp-listen", f"127.0.0.1:{lp}", *extra],
                env=old_env if name in OLD_ROWS else None)
            fwd.wait_for("forwarding")
            targets[name] = (("127.0.0.1", lp), None)
            if "--encrypt" in extra:
                group = next(k for k, v in groups.items() if v == cp)
                sealing[name] = (fwd.popen.pid, pids[group][-3])

        # the client as a library (kakehashi.chain.api's path): the application's own
        # socket is P1, so three forwarding processes are between it and the server, as
        # with socat x3
        loop = asyncio.new_event_loop()
        libs = []
        for name, cp in (("library", cports), ("library-on", on_ports)):
            if name not in chosen:
                continue
            lib = loop.run_until_complete(build_chain(ForwardConfig(
                "alice", {f"fw{i}": crypto.parse_shared_key(keys[f"a{i}"]) for i in (1, 2, 3)},
                Hop("fw1", "127.0.0.1", cp[0]), ("127.0.0.1", echo_port),
                ("127.0.0.1", 0))))
            libs.append(lib)
            data_sock: socket.socket = lib.data_sock  # type: ignore[assignment]
            data_sock.setblocking(True)
            targets[name] = (lib.setup.first.addr, data_sock)  # type: ignore[union-attr]

        # which path the default took (the proxies log it at info; this run logs warnings)
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                                check=False).stdout if shutil.which("nft") else ""
        kernel = [p for p in pids["auto"] if f"{TABLE_PREFIX}{p}" in tables]
        default_path = ("the kernel path (an nftables table in each)" if len(kernel) == 3 else
                        f"the user-space fast path ({len(kernel)} of 3 with a kernel table)")
        say(f"default proxies (no --fast-path): {default_path}")
        # (the sealing ends' figures depend on it: kakehashi.core._dgaead built or not)
        say(f"datagram sealing of this tree's processes: {crypto.aead_path()} batch path")
        rounds: dict[str, list[tuple[float, float, float]]] = {r: [] for r in chosen}
        #: per encrypted row and round: CPU per datagram at the forward and at fw3, in µs
        seal_cpu: dict[str, list[tuple[float, float]]] = {r: [] for r in sealing}
        for rnd in range(args.rounds):
            order = chosen[rnd % len(chosen):] + chosen[:rnd % len(chosen)]
            say(f"round {rnd + 1}/{args.rounds} (load {os.getloadavg()[0]:.2f}): "
                + ", ".join(order))
            for name in order:
                dst, sock = targets[name]
                ends = sealing.get(name, ())
                cpu0 = [cpu_seconds(p) for p in ends]
                t0 = time.monotonic()
                rate = throughput(dst, args.seconds, sock=sock, window=args.window,
                                  pattern=args.pattern)
                if ends:
                    moved = rate * (time.monotonic() - t0)
                    seal_cpu[name].append(tuple(  # type: ignore[arg-type]
                        (cpu_seconds(p) - c) * 1e6 / moved for p, c in zip(ends, cpu0,
                                                                           strict=True)))
                p50, p99 = latency(dst, args.pings, sock=sock)
                rounds[name].append((rate, p50, p99))
        for lib in libs:
            lib.close()
            lib.data_sock.close()  # type: ignore[attr-defined]
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

        async def cycles(ports: list[int]) -> tuple[float, float]:
            """Sessions one after another, each set up, locked by one echoed datagram
            (a kernel-path proxy then installs its rules) and closed (it removes them):
            the median ms per session and the proxies' CPU ms per session."""
            cfg = ForwardConfig("alice", {f"fw{i}": crypto.parse_shared_key(keys[f"a{i}"])
                                          for i in (1, 2, 3)},
                                Hop("fw1", "127.0.0.1", ports[0]), ("127.0.0.1", echo_port),
                                ("127.0.0.1", 0))
            loop = asyncio.get_running_loop()
            which = pids["on" if ports == on_ports else "auto"]
            cpu0 = sum(cpu_seconds(p) for p in which)
            times = []
            for _ in range(args.setups):
                t = time.perf_counter()
                for _ in range(100):
                    try:
                        c = await build_chain(cfg)
                        break
                    except SetupFailed as exc:  # the last sessions' slots not yet freed
                        if exc.reason != "limit":
                            raise
                        await asyncio.sleep(0.01)
                sock = c.data_sock
                sock.sendto(b"lock", c.setup.first.addr)  # type: ignore[union-attr]
                await asyncio.wait_for(loop.sock_recv(sock, 100), 5)  # type: ignore[arg-type]
                c.close()
                sock.close()  # type: ignore[union-attr]
                times.append((time.perf_counter() - t) * 1000)
            await asyncio.sleep(1.0)  # the last teardowns
            return median(times), (sum(cpu_seconds(p) for p in which) - cpu0) * 1000 / len(
                times)

        setup_rows = []
        for mode, enc in (("recursive", False), ("iterative", False), ("recursive", True)):
            if args.setups:
                ms = asyncio.run(setups(mode, enc))
                setup_rows.append([f"{mode}{' encrypted' if enc else ''}", f"{ms:.2f}", ""])
        # the whole life of a session, by default (as root: the kernel path, elements
        # installed and removed at each proxy) and with the user-space fast path, and what
        # it costs the three proxies
        for title, ports in (("session (setup, echo, teardown), default", cports),
                             ("session, user-space fast path (on)", on_ports)):
            if args.setups and ports:
                ms, cpu = asyncio.run(cycles(ports))
                setup_rows.append([title, f"{ms:.2f}", f"{cpu:.2f}"])

    def med(name: str, i: int) -> float:
        return median([r[i] for r in rounds[name]])

    def paired(name: str, i: int) -> str:
        """The median over the rounds of this row's figure / socat's in the same round."""
        pairs = zip(rounds[name], rounds["socat"], strict=True)
        return f"{median([a[i] / b[i] for a, b in pairs]):.2f}x"

    rows = [[TITLES[n], f"{med(n, 0):,.0f}", f"{med(n, 1):.0f}", f"{med(n, 2):.0f}",
             paired(n, 0), paired(n, 1), paired(n, 2)] for n in chosen]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\ndefault proxies (no --fast-path): {default_path}")
    print(f"\n{machine()}; kakehashi {source_version()}; load average {load0} at the "
          f"start, {load} at the end; {args.rounds} interleaved rounds of {args.seconds:g} s "
          f"and {args.pings} pings per row; throughput load: {args.pattern}, window "
          f"{args.window}; medians\n")
    # the target is met where rate / socat >= 1 and p50, p99 / socat <= 1
    print(table(["path (3 hops)", "datagrams/s", "p50 µs", "p99 µs", "rate / socat x3",
                 "p50 / socat x3", "p99 / socat x3"], rows))
    if setup_rows:
        print()
        print(table(["three-proxy chain setup", "median ms", "proxies' CPU ms per session"],
                    setup_rows))
    print()
    for name in chosen:  # the rounds behind the medians (the machine is shared)
        print(f"{TITLES[name]}, datagrams/s per round: "
              + ", ".join(f"{r[0]:,.0f}" for r in rounds[name]))
    if seal_cpu:
        print()
        print(table(["encrypted row: CPU per datagram during its datagrams/s (/proc)",
                     "chain forward µs", "fw3 µs"],
                    [[TITLES[n], f"{median([c[0] for c in v]):.1f}",
                      f"{median([c[1] for c in v]):.1f}"] for n, v in seal_cpu.items()]))
    for e_row, p_row in (("chain-encrypted", "chain"), ("chain-on-encrypted", "chain-on"),
                         ("chain-encrypted-old", "chain"),
                         ("chain-on-encrypted-old", "chain-on")):
        if e_row in rounds and p_row in rounds:
            enc = median([e[0] / c[0] for e, c in zip(rounds[e_row], rounds[p_row],
                                                        strict=True)])
            print(f"{TITLES[e_row]} / {TITLES[p_row]} (datagrams/s, median of per-round "
                  f"ratios): {enc:.2f}x (target >= 0.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The chain's kernel path: what installing and removing one session's rewrite costs with
N other sessions already offloaded in the same process (root and libnftables).

    python bench/kernel_install_bench.py                    # N = 1, 200, 2000
    python bench/kernel_install_bench.py --sessions 1,200 --cycles 50
    PYTHONPATH=/tmp/old/src python bench/kernel_install_bench.py   # another tree

For each N: a fresh :class:`kakehashi.core.kernelpath.KernelPath` table, N - 1 sessions
put in (installed one by one; in a tree whose installs are libnftables scripts, the
scripts are collected and run in batches of 500, so filling a large table does not take
the very cost being measured), then ``--cycles`` times one more session
installed, its counters read once (``refresh``), and removed, each step timed on its own;
medians and p90 in milliseconds. Only the kernel path's own calls are timed (libnftables
in this process, as a proxy makes them); no datagram is sent, so the tuples are made up
(loopback addresses, distinct ports). The table is removed at the end of each N. Run it
under the benchmark lock on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine, median, percentile, say, source_version, table


def _session(kp: object, i: int, position: int) -> object:
    """Session ``i``'s made-up tuples: every port distinct across sessions."""
    return kp.new(position, ("127.0.0.1", 10000 + i), ("127.0.0.2", 20000 + i),  # type: ignore[attr-defined]
                  ("127.0.0.3", 30000 + i), ("127.0.0.4", 40000 + i))


async def measure(n: int, cycles: int, positions: int) -> dict[str, list[float]]:
    from kakehashi.core import kernelpath

    kp = kernelpath.KernelPath()
    kp.prepare()
    times: dict[str, list[float]] = {"fill": [], "install": [], "refresh": [], "remove": []}
    try:
        t0 = time.perf_counter()
        if hasattr(kernelpath, "SetElements"):  # elements over netlink: install them
            for i in range(n - 1):
                await kp.install(_session(kp, i, i % positions))
        else:  # a tree whose installs are libnftables scripts: collected, run in batches
            real = kernelpath._nft
            scripts: list[str] = []
            kernelpath._nft = lambda script, **_: scripts.append(script) or ""  # type: ignore[assignment]
            try:
                for i in range(n - 1):
                    await kp.install(_session(kp, i, i % positions))
            finally:
                kernelpath._nft = real  # type: ignore[assignment]
            for k in range(0, len(scripts), 500):
                real("".join(scripts[k:k + 500]))
        times["fill"].append(time.perf_counter() - t0)
        for c in range(cycles):
            o = _session(kp, 5000 + c, c % positions)
            t0 = time.perf_counter()
            await kp.install(o)
            t1 = time.perf_counter()
            kp._refreshed = float("-inf")
            await kp.refresh()
            t2 = time.perf_counter()
            kp.remove(o)
            t3 = time.perf_counter()
            times["install"].append(t1 - t0)
            times["refresh"].append(t2 - t1)
            times["remove"].append(t3 - t2)
    finally:
        kp.remove_table()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", default="1,200,2000",
                    help="comma-separated N: sessions in the table while one more is "
                         "installed and removed")
    ap.add_argument("--cycles", type=int, default=30, help="install/remove cycles per N")
    ap.add_argument("--positions", type=int, default=4,
                    help="hop positions the N sessions are spread over (a host running "
                         "three proxies and a forward has four)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("root only: the kernel path changes nftables")
    say(f"# kernel path install cost - {machine()} - src {source_version()}")
    rows = []
    for n in (int(x) for x in args.sessions.split(",")):
        t = asyncio.run(measure(n, args.cycles, args.positions))
        ms = {k: [v * 1000 for v in vs] for k, vs in t.items()}
        both = [a + b for a, b in zip(ms["install"], ms["remove"], strict=True)]
        rows.append([str(n), f"{ms['fill'][0]:.0f}",
                     f"{median(ms['install']):.2f} / {percentile(ms['install'], 90):.2f}",
                     f"{median(ms['remove']):.2f} / {percentile(ms['remove'], 90):.2f}",
                     f"{median(both):.2f}",
                     f"{median(ms['refresh']):.2f}"])
        say(rows[-1])
    print(table(["sessions", "fill N-1 (ms)", "install p50/p90 ms",
                 "remove p50/p90 ms", "install+remove p50 ms", "refresh (read all) p50 ms"],
                rows))


if __name__ == "__main__":
    main()

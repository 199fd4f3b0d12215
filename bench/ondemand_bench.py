"""On-demand access benchmark (spec 002): a manager, an edge and an inner relay on loopback,
beside two chained haproxy processes and direct TCP.

    python bench/ondemand_bench.py            # full run
    python bench/ondemand_bench.py --quick    # short run
    python bench/ondemand_bench.py --only throughput,grants

Four benchmarks, one table at the end:

* throughput - one TCP stream client -> edge -> (mutual TLS) -> inner -> sink, against
  two chained haproxy ``mode tcp`` (the same number of forwarding processes and TCP
  hops without TLS between them) and direct; MB/s median of --repeat runs (iperf3,
  Python sender as fallback);
* grants - grant creation through the REST API (the edge has opened the port when the
  answer comes): p50/p99 latency of --grants-seq sequential requests, and grants/s with
  --grants-workers clients at once;
* live - --live grants open on one edge: the edge's RSS and open file descriptors;
* expiry - --expiries grants that all end at the same moment, one live
  connection on each: how late each connection is cut after its grant's expiry
  (p50/p99/max; target p99 < 1 s).
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import forwarders as fw
from benchlib import (
    LOOPBACK,
    Procs,
    free_port,
    install_signal_exit,
    machine,
    median,
    percentile,
    raise_nofile,
    ratio,
    rss_kib,
    say,
    table,
    wait_listening,
)
from relay_bench import SERVERS, iperf_once, python_once

IMSI = "001010000000001"
HEADERS = ["Benchmark", "Path", "Result", "vs direct", "vs haproxy x2", "Notes"]


class System:
    """A manager, an inner relay (device: 127.0.0.1) and an edge, as processes."""

    def __init__(self, procs: Procs, workdir: Path, ports: tuple[int, int], *,
                 link_tls: bool = True, env: dict[str, str] | None = None) -> None:
        """``env``: more environment for every process (say ``KAKEHASHI_FAST_PATH``)."""
        from kakehashi.core.apiclient import ApiClient
        from kakehashi.core.identity import ApiTokens
        from kakehashi.core.store import open_store

        self.procs = procs
        env = {"KAKEHASHI_HOME": str(workdir / "home"), "KAKEHASHI_LOG": "warning",
               **(env or {})}
        db = str(workdir / "od.db")
        store = open_store(db)
        tokens = {r: ApiTokens(store).create(r)[1] for r in ("client", "edge", "inner")}
        store.close()
        for role, text in tokens.items():
            (workdir / f"{role}.tok").write_text(text)
        self.mport = free_port()
        kh = [sys.executable, "-m", "kakehashi", "--log-format", "text"]
        url = f"http://{LOOPBACK}:{self.mport}"
        self.manager = procs.spawn("manager", [*kh, "ondemand", "manager", "--listen",
                                               f"{LOOPBACK}:{self.mport}", "--db", db,
                                               "--tls", "off", "--max-ttl", "2h"], env=env)
        wait_listening(self.mport, proc=self.manager)
        self.inner = procs.spawn("inner", [
            *kh, "--log-level", "info", "ondemand", "inner", "--server", url, "--token-file",
            str(workdir / "inner.tok"), "--name", "core-1", "--listen", f"{LOOPBACK}:0",
            "--device", f"{IMSI}={LOOPBACK}", "--link-tls", "on" if link_tls else "off"],
            env={**env, "KAKEHASHI_LOG": "info"})
        self.edge = procs.spawn("edge", [
            *kh, "--log-level", "info", "ondemand", "edge", "--server", url, "--token-file",
            str(workdir / "edge.tok"), "--name", "edge-1", "--public-host", LOOPBACK,
            "--ports", f"{ports[0]}-{ports[1]}", "--burst", "0"],
            env={**env, "KAKEHASHI_LOG": "info"}, nofile=200_000)
        self.inner.wait_for("inner core-1 online", 60)
        self.edge.wait_for("edge edge-1 online", 60)
        self.url = url
        self.token = tokens["client"]
        self.api = lambda: ApiClient(url, self.token, timeout=60)

    def grant(self, port: int, ttl: float, api=None) -> dict:
        api = api or self.api()
        body = {"targets": [{"imsi": IMSI, "port": port}], "ttl": ttl}
        return api.request("POST", "/v1/grants", body)["grants"][0]

    def many(self, port: int, ttl: float, count: int, workers: int, *,
             expire_at: float | None = None) -> tuple[list[dict], float]:
        """``count`` grants of ``ttl`` seconds; with ``expire_at`` (a time.time()) each
        grant's TTL is what is left until then, so they all end at the same moment."""
        local = threading.local()

        def one(_: int) -> dict:
            if not hasattr(local, "api"):
                local.api = self.api()
            return self.grant(port, ttl if expire_at is None else expire_at - time.time(),
                              local.api)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            made = list(pool.map(one, range(count)))
        return made, time.perf_counter() - t0


def bench_throughput(args, workdir: Path, rows: list[list[str]]) -> None:
    results: dict[str, float] = {}
    names = {"direct": "direct", "haproxy2": "haproxy x2 (chained, mode tcp)",
             "ondemand": "client -> edge -> inner -> device (mTLS link)",
             "ondemand-plain": "the same, inner --link-tls off (splice)"}
    for key in names:
        sink = free_port()
        with Procs(workdir) as procs:
            if key == "direct":
                port = sink
            elif key == "haproxy2":
                port = fw.start_haproxy_chain(procs, sink, hops=2).port
            else:
                sub = workdir / key
                sub.mkdir(exist_ok=True)
                system = System(procs, sub, (45000, 45099), link_tls=key == "ondemand")
                port = system.grant(sink, 3600)["port"]
            runs = []
            for _ in range(args.repeat):
                try:
                    run = iperf_once(procs, port, sink, args.seconds) if args.tool == "iperf3" \
                        else None
                except Exception as exc:  # iperf3 missing or failing: the Python sender
                    say(f"  {key}: iperf3 failed ({exc}); Python sender")
                    run = None
                run = run or python_once(procs, port, sink, args.seconds)
                runs.append(run.mbps)
                say(f"  {key}: {run.mbps:,.0f} MB/s ({run.tool})")
            results[key] = median(runs)
    for key in names:
        rows.append(["throughput", names[key], f"{results[key]:,.0f} MB/s",
                     ratio(results[key], results["direct"]),
                     ratio(results[key], results["haproxy2"]),
                     f"median of {args.repeat} x {args.seconds:g} s"])


def bench_control(args, workdir: Path, rows: list[list[str]]) -> None:
    with Procs(workdir) as procs:
        lo = 40000
        system = System(procs, workdir / "ctl", (lo, lo + max(args.live, args.expiries) * 2 +
                                                 args.grants_seq + 2000))
        sink = procs.spawn("sink", [sys.executable, SERVERS, "echo", str(port := free_port()),
                                    "--max-seconds", "3600"])
        wait_listening(port, proc=sink)
        base_rss, base_fds = rss_kib(system.edge.pid), _fds(system.edge.pid)
        if "grants" in args.only:
            api = system.api()
            lat = []
            for _ in range(args.grants_seq):
                t0 = time.perf_counter()
                system.grant(port, 3600, api)
                lat.append((time.perf_counter() - t0) * 1000)
            made, dt = system.many(port, 3600, args.grants_par, args.grants_workers)
            rows.append(["grants", "POST /v1/grants, sequential",
                         f"p50 {percentile(lat, 50):.1f} ms, p99 {percentile(lat, 99):.1f} ms",
                         "-", "-", f"{args.grants_seq} grants; the port accepts on return"])
            rows.append(["grants", f"POST /v1/grants, {args.grants_workers} clients",
                         f"{len(made) / dt:,.0f} grants/s", "-", "-", f"{len(made)} grants"])
        if "expiry" in args.only:
            bench_expiry(args, system, port, rows)
        if "live" in args.only:
            have = _live(system)
            made, dt = system.many(port, 7200, max(0, args.live - have), args.grants_workers)
            total = have + len(made)
            rss, fds = rss_kib(system.edge.pid), _fds(system.edge.pid)
            rows.append(["live", f"{total:,} live grants on one edge",
                         f"RSS {rss / 1024:,.0f} MiB, {fds:,} fds", "-", "-",
                         f"{(rss - base_rss) / max(1, total):,.1f} KiB and "
                         f"{(fds - base_fds) / max(1, total):.2f} fds per grant; "
                         f"manager RSS {rss_kib(system.manager.pid) / 1024:,.0f} MiB"])


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _live(system: System) -> int:
    return len(system.api().request("GET", "/v1/grants"))


def bench_expiry(args, system: System, port: int, rows: list[list[str]]) -> None:
    """K grants that all expire at the same moment, one live connection each."""
    raise_nofile(args.expiries * 2 + 1024)
    ttl = 15.0 + args.expiries / 100
    made, _ = system.many(port, ttl, args.expiries, args.grants_workers,
                          expire_at=time.time() + ttl)
    sel = selectors.DefaultSelector()
    for g in made:
        s = socket.create_connection((LOOPBACK, g["port"]), timeout=30)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, g["expires_at_ts"])
    spread = max(g["expires_at_ts"] for g in made) - min(g["expires_at_ts"] for g in made)
    late: list[float] = []
    deadline = max(g["expires_at_ts"] for g in made) + 30
    while len(late) < len(made) and time.time() < deadline:
        for key, _ in sel.select(timeout=1.0):
            try:
                data = key.fileobj.recv(65536)
            except OSError:
                data = b""
            if not data:
                late.append(time.time() - key.data)
                sel.unregister(key.fileobj)
                key.fileobj.close()
    cut = len(late)
    rows.append(["expiry", f"{len(made)} grants expiring within {spread:.1f} s, one live "
                           "connection each",
                 f"late p50 {percentile(late, 50):.3f} s, p99 {percentile(late, 99):.3f} s, "
                 f"max {max(late) if late else float('nan'):.3f} s", "-", "-",
                 f"{cut}/{len(made)} cut; target p99 < 1 s"])


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default="throughput,grants,expiry,live")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tool", choices=["iperf3", "python"], default="iperf3")
    p.add_argument("--grants-seq", type=int, default=300)
    p.add_argument("--grants-par", type=int, default=1000)
    p.add_argument("--grants-workers", type=int, default=16)
    p.add_argument("--live", type=int, default=10_000)
    p.add_argument("--expiries", type=int, default=1000)
    p.add_argument("--keep-workdir", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.seconds, args.repeat = 2.0, 1
        args.grants_seq, args.grants_par, args.live, args.expiries = 100, 200, 1000, 200
    args.only = set(args.only.split(","))
    return args


def main() -> int:
    args = parse_args()
    install_signal_exit()
    raise_nofile(65536)
    workdir = Path(tempfile.mkdtemp(prefix="kakehashi-ondemand-bench-"))
    for sub in ("tp", "ctl"):
        (workdir / sub).mkdir()
    rows: list[list[str]] = []
    say(f"on-demand benchmark on {machine()}; work directory {workdir}")
    if "throughput" in args.only:
        bench_throughput(args, workdir, rows)
    if args.only & {"grants", "expiry", "live"}:
        bench_control(args, workdir, rows)
    print(table(HEADERS, rows))
    if not args.keep_workdir:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

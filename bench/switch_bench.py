"""Socket switch benchmark (spec 003): a switch server and two gateways on loopback,
beside direct TCP, ``ssh -L`` and the kakehashi relay path, in one run.

    python bench/switch_bench.py            # full run
    python bench/switch_bench.py --quick    # short run
    python bench/switch_bench.py --only throughput,setup

Three benchmarks, one table at the end:

* throughput - one TCP stream client -> pseudo socket (the user's gateway) -> switch
  server -> the ASP's gateway -> sink, over a WebSocket link (plaintext and TLS) and
  over HTTP/1.1 long polling, against ``ssh -L`` (one encrypted hop, two processes),
  the kakehashi relay path (TLS) and direct; MB/s median of --repeat runs (iperf3,
  Python sender as fallback), with the forwarding processes' CPU per GB;
* latency - 1-byte echo round trips through a WebSocket and a long-poll tunnel while
  idle: p50/p99 (the long poll's cost is one held request per direction);
* parallel - --streams parallel streams of --mib MiB each through one WebSocket
  tunnel, each checked by SHA-256 at the far end, while an interactive 1-byte echo
  on another tunnel of the same two gateways measures its round trips (p50/p99,
  against the same echo while idle, and against one straight to the echo server
  after each: the machine's own cost of waking a process that is not busy): one bulk
  stream must not starve the others. Beside it, the same workload (same sink, echo
  server and rate of pings) through ONE ``ssh -L`` connection carrying both forwards
  as channels, and through the kakehashi relay (TLS; one agent, two ``relay
  connect``), --rounds rounds interleaved, medians;
* scale - --gateways gateways (in one load-generator process) on one server and
  --tunnels tunnels among them: tunnel setup time p50/p99 (S2 -> S5, both gateways
  report) and the server's RSS with all of them established.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import forwarders as fw
from benchlib import (
    LOOPBACK,
    Procs,
    descendants,
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
    tree_cpu_seconds,
    wait_listening,
)
from relay_bench import SERVERS, Transfer, iperf_once, python_once

HEADERS = ["Benchmark", "Path", "Result", "vs direct", "vs ssh -L", "Notes"]
USERS = {"asp1": "asp", "alice": "user"}
PASSWORD = "bench-password-123"


class Switch:
    """A switch server and the two gateways of a tunnel, as processes."""

    def __init__(self, procs: Procs, workdir: Path, *, tls: bool = False) -> None:
        self.procs = procs
        self.tls = tls
        self.home = workdir / "kakehashi-home"
        self.db = str(workdir / f"switch-{free_port()}.db")
        self.env = {"KAKEHASHI_HOME": str(self.home), "PYTHONUNBUFFERED": "1",
                    "KAKEHASHI_PASSWORD": PASSWORD}
        os.environ["KAKEHASHI_HOME"] = str(self.home)
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        from kakehashi.core.store import open_store
        from kakehashi.switch.server import SwitchUsers

        users = SwitchUsers(open_store(self.db), kdf_n=2**12)
        for name, role in USERS.items():
            users.add({"name": name, "role": role}, PASSWORD)
        self.port = free_port()
        self.server = procs.spawn("switch-server", fw.Kakehashi.argv(
            "switch", "server", "--listen", f"{LOOPBACK}:{self.port}", "--db", self.db,
            "--tls", "on" if tls else "off",
            # the scale run's load generator is one user with 1,000 gateways
            "--max-gateways-per-user", "0", "--max-tunnels-per-user", "0"),
            env=self.env, nofile=65536)
        wait_listening(self.port, proc=self.server)
        self.url = f"{'https' if tls else 'http'}://{LOOPBACK}:{self.port}"
        self.gateways: dict[str, int] = {}

    def gateway(self, user: str, name: str, *extra: str) -> int:
        proc = self.procs.spawn(name, fw.Kakehashi.argv(
            "switch", "gateway", "--server", self.url, "--user", user, "--name", name, *extra),
            env=self.env, nofile=65536)
        proc.wait_for(f"gateway {name} registered")
        self.gateways[name] = proc.pid
        return proc.pid

    def api(self, method: str, path: str, body: object = None, user: str = "alice") -> object:
        from kakehashi.core.apiclient import ApiClient

        return ApiClient(self.url, basic=(user, PASSWORD), timeout=60).request(
            method, path, body)

    def route(self, target: int, gateway: str, name: str) -> fw.Route:
        svc = f"svc-{target}"
        self.api("POST", "/v1/services", {"name": svc, "gateway": "gw-srv",
                                          "target": f"{LOOPBACK}:{target}",
                                          "allow": ["alice"]}, user="asp1")
        # S3b checks that the real server can be reached; the sink of a throughput run
        # starts later (iperf3 -s -1 per run), so something listens there meanwhile
        stand_in = None
        with contextlib.suppress(OSError):
            stand_in = socket.create_server((LOOPBACK, target))
        try:
            t = self.api("POST", "/v1/tunnels", {"service": svc, "gateway": gateway,
                                                 "listen": f"{LOOPBACK}:0"})
        finally:
            if stand_in is not None:
                stand_in.close()
        port = int(t["listen"].rpartition(":")[2])  # type: ignore[index]
        return fw.Route(name, port, [self.server.pid, self.gateways["gw-srv"],
                                     self.gateways[gateway]])


def start_route(key: str, procs: Procs, workdir: Path, target: int) -> fw.Route:
    if key == "direct":
        return fw.direct(target)
    if key == "ssh":
        return fw.start_ssh(procs, target)
    if key in ("relay-tls", "relay"):
        return fw.Kakehashi(workdir).start_route(procs, target, tls=True)
    sw = Switch(procs, workdir, tls=key == "switch-ws-tls")
    sw.gateway("asp1", "gw-srv")
    poll = key == "switch-poll"
    sw.gateway("alice", "gw-alice", "--transport", "poll" if poll else "websocket")
    label = {"switch-ws": "switch WebSocket", "switch-ws-tls": "switch WebSocket TLS",
             "switch-poll": "switch long poll"}[key]
    return sw.route(target, "gw-alice", label)


def measure_throughput(key: str, args: argparse.Namespace, workdir: Path) -> dict:
    sink = free_port()
    with Procs(workdir) as procs:
        route = start_route(key, procs, workdir, sink)
        runs: list[Transfer] = []
        cpu = 0.0
        for i in range(args.repeat):
            before = tree_cpu_seconds(route.pids)
            run = None
            try:
                run = iperf_once(procs, route.port, sink, args.seconds)
            except (RuntimeError, ValueError, KeyError, OSError,
                    subprocess.TimeoutExpired) as exc:
                say(f"  {key}: iperf3 failed ({exc}); the Python sender instead")
            if run is None:
                run = python_once(procs, route.port, sink, args.seconds)
            time.sleep(0.2)
            cpu += tree_cpu_seconds(route.pids) - before
            runs.append(run)
            say(f"  {route.name} run {i + 1}/{args.repeat}: {run.mbps:,.0f} MB/s ({run.tool})")
    moved = sum(r.bytes for r in runs)
    return {"name": route.name, "mbps": median([r.mbps for r in runs]),
            "cpu_per_gb": cpu / (moved / 1e9) if route.pids and moved else None}


def measure_latency(key: str, args: argparse.Namespace, workdir: Path) -> dict:
    echo = free_port()
    with Procs(workdir) as procs:
        server = procs.spawn("echo", [sys.executable, SERVERS, "echo", str(echo),
                                      "--max-seconds", "600"])
        wait_listening(echo, proc=server)
        route = start_route(key, procs, workdir, echo)
        times = []
        with socket.create_connection((LOOPBACK, route.port), 10) as c:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(args.pings):
                t0 = time.perf_counter()
                c.sendall(b"p")
                if c.recv(1) != b"p":
                    raise RuntimeError("echo broken")
                times.append((time.perf_counter() - t0) * 1000)
    return {"name": route.name, "p50": percentile(times, 50), "p99": percentile(times, 99)}


PARALLEL_KEYS = ["switch-ws", "ssh", "relay-tls", "relay"]


def start_parallel_routes(key: str, procs: Procs, workdir: Path, sha: int,
                          echo: int) -> tuple[fw.Route, fw.Route, dict[str, int]]:
    """The bulk route, the echo route and the forwarding processes by name, for one
    path: the echo shares as much of the bulk's path as the path allows - the same two
    gateways and server (two tunnels, one link each way), the same ssh connection (two
    ``-L`` channels), the same relay and agent (two ``relay connect``; the relay gives
    each session its own TCP connection, so it has no one link to share)."""
    if key == "ssh":
        bulk, ping = fw.start_ssh_forwards(procs, [sha, echo])
        return bulk, ping, {"sshd": bulk.pids[0], "ssh": bulk.pids[1]}
    if key in ("relay-tls", "relay"):
        home = workdir / f"relay-{free_port()}"
        home.mkdir()
        kk = fw.Kakehashi(home)
        tls = key == "relay-tls"
        relay_port, relay_pid = kk.serve(procs, tls=tls)
        agent_pid = kk.agent(procs, relay_port, {"sha": sha, "echo": echo}, tls=tls)
        bulk_port, bulk_pid = kk.connect(procs, relay_port, "sha", tls=tls)
        ping_port, ping_pid = kk.connect(procs, relay_port, "echo", tls=tls)
        pids = {"relay": relay_pid, "agent": agent_pid, "connect": bulk_pid,
                "connect-echo": ping_pid}
        name = "kakehashi relay " + ("TLS" if tls else "plaintext")
        return (fw.Route(name, bulk_port, list(pids.values())),
                fw.Route(name, ping_port, list(pids.values())), pids)
    sw = Switch(procs, workdir)
    sw.gateway("asp1", "gw-srv")
    sw.gateway("alice", "gw-alice", "--transport", "websocket")
    bulk = sw.route(sha, "gw-alice", "switch WebSocket")
    ping = sw.route(echo, "gw-alice", "switch WebSocket")
    return bulk, ping, {"server": sw.server.pid, **sw.gateways}


def measure_parallel(key: str, args: argparse.Namespace, workdir: Path) -> dict:
    """One run of the parallel benchmark through one path (see the module docstring)."""
    import hashlib
    import threading

    sha, echo = free_port(), free_port()
    with Procs(workdir) as procs:
        for kind, port in (("sha", sha), ("echo", echo)):
            srv = procs.spawn(kind, [sys.executable, SERVERS, kind, str(port),
                                     "--max-seconds", "900"])
            wait_listening(port, proc=srv)
        bulk, ping, named = start_parallel_routes(key, procs, workdir, sha, echo)

        def pings(c: socket.socket, n: int, floor: list[float]) -> list[float]:
            """``n`` round trips through the tunnel, each followed by one straight to
            the echo server (into ``floor``): what the machine's scheduling costs an
            echo whose processes are not the busy ones."""
            out = []
            for _ in range(n):
                for sock, into in ((c, out), (d, floor)):
                    t0 = time.perf_counter()
                    sock.sendall(b"p")
                    if sock.recv(1) != b"p":
                        raise RuntimeError("echo broken")
                    into.append((time.perf_counter() - t0) * 1000)
            return out

        ok: list[bool] = []

        def stream(seed: int) -> None:
            block = hashlib.sha256(str(seed).encode()).digest() * (1 << 15)  # 1 MiB
            local = hashlib.sha256()
            with socket.create_connection((LOOPBACK, bulk.port), 30) as s:
                for _ in range(args.mib):
                    s.sendall(block)
                    local.update(block)
                s.shutdown(socket.SHUT_WR)
                got = b""
                while len(got) < 32 and (chunk := s.recv(64)):
                    got += chunk
            ok.append(got == local.digest())

        with socket.create_connection((LOOPBACK, ping.port), 10) as c, \
                socket.create_connection((LOOPBACK, echo), 10) as d:
            for sock in (c, d):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            idle = pings(c, args.pings, [])
            direct: list[float] = []
            threads = [threading.Thread(target=stream, args=(i,)) for i in range(args.streams)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            busy: list[float] = []
            sched0 = _schedstat(named)
            while any(t.is_alive() for t in threads):
                busy += pings(c, 10, direct)
                time.sleep(0.01)
            for t in threads:
                t.join()
            secs = time.perf_counter() - t0
            sched1 = _schedstat(named)
    return {"name": bulk.name, "intact": sum(ok),
            "mbps": args.streams * args.mib * 1.048576 / secs,
            "idle_p50": percentile(idle, 50), "idle_p99": percentile(idle, 99),
            "p50": percentile(busy, 50), "p99": percentile(busy, 99), "pings": len(busy),
            "direct_p50": percentile(direct, 50), "direct_p99": percentile(direct, 99),
            "cpu_wait": {n: (sched1[n][1] - sched0[n][1]) / 1e9 / secs
                         for n in sched0 if n in sched1},
            "cpu_run": {n: (sched1[n][0] - sched0[n][0]) / 1e9 / secs
                        for n in sched0 if n in sched1},
            "load": os.getloadavg()[0]}


def _schedstat(named: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Nanoseconds each forwarding process (with its descendants: sshd forks the
    connection's own process) has run and has waited for a CPU while runnable (Linux
    ``/proc/PID/schedstat``; the main thread): on a shared machine the echo's latency
    beside bulk is mostly the forwarders waiting for a CPU."""
    out = {}
    for name, top in named.items():
        run = wait = 0
        for pid in (top, *descendants(top)):
            with contextlib.suppress(OSError, ValueError):
                r, w, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
                run, wait = run + int(r), wait + int(w)
        out[name] = (run, wait)
    return out


def parallel_rows(runs: dict[str, list[dict]], args: argparse.Namespace) -> list[list[str]]:
    """One row per path: medians over the interleaved rounds, echo p50 against ssh -L's
    from the same run."""
    def med(key: str, field: str) -> float:
        return median([r[field] for r in runs[key]])

    ssh_p50 = med("ssh", "p50") if runs.get("ssh") else None
    rows = []
    for key, rs in runs.items():
        names = list(rs[0]["cpu_wait"])
        wait = "/".join(f"{median([r['cpu_wait'][n] for r in rs]):.0%}" for n in names)
        ran = "/".join(f"{median([r['cpu_run'][n] for r in rs]):.0%}" for n in names)
        rows.append([
            "parallel + interactive", f"{rs[0]['name']}, {args.streams} x {args.mib} MiB",
            f"echo p50 {med(key, 'p50'):.2f} ms", "", ratio(med(key, "p50"), ssh_p50),
            f"p99 {med(key, 'p99'):.2f} ms; bulk {med(key, 'mbps'):,.0f} MB/s total; "
            f"SHA-256 intact {min(r['intact'] for r in rs)}/{args.streams}; idle echo p50 "
            f"{med(key, 'idle_p50'):.2f} ms p99 {med(key, 'idle_p99'):.2f} ms; straight to "
            f"the echo server meanwhile p50 {med(key, 'direct_p50'):.2f} ms; "
            f"{'/'.join(names)} ran {ran} and waited for a CPU {wait} of the time; "
            f"medians of {len(rs)} rounds ({sum(r['pings'] for r in rs)} pings), load "
            f"{min(r['load'] for r in rs):.1f}-{max(r['load'] for r in rs):.1f}"])
    return rows


async def _scale(url: str, gateways: int, tunnels: int, target: int) -> dict:
    """In-process gateways (one load generator), tunnels opened over the API."""
    from kakehashi.switch.gateway import Gateway, GatewayConfig

    gws = [Gateway(GatewayConfig(server=url, user="alice", password=PASSWORD,
                                 name=f"gw-load-{i}", transport="websocket"))
           for i in range(gateways)]
    t0 = time.perf_counter()
    # one login first: the rest find it remembered (a burst of parallel first logins from
    # one address is what the login throttle exists to refuse)
    tasks = [asyncio.create_task(gws[0].run())]
    await asyncio.wait_for(gws[0].connected.wait(), 60)
    tasks += [asyncio.create_task(g.run()) for g in gws[1:]]
    await asyncio.wait_for(asyncio.gather(*(g.connected.wait() for g in gws)), 600)
    connect_s = time.perf_counter() - t0
    from kakehashi.core.apiclient import ApiClient

    api = ApiClient(url, basic=("alice", PASSWORD), timeout=120)
    times: list[float] = []

    def open_one(i: int) -> None:
        t = time.perf_counter()
        api.request("POST", "/v1/tunnels", {"service": f"svc-{target}",
                                            "gateway": f"gw-load-{i % gateways}",
                                            "listen": f"{LOOPBACK}:0"})
        times.append((time.perf_counter() - t) * 1000)

    from concurrent.futures import ThreadPoolExecutor

    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(8) as pool:
        await asyncio.gather(*(loop.run_in_executor(pool, open_one, i)
                               for i in range(tunnels)))
    for t in tasks:
        t.cancel()
    return {"connect_s": connect_s, "p50": percentile(times, 50),
            "p99": percentile(times, 99)}


def measure_scale(args: argparse.Namespace, workdir: Path) -> dict:
    raise_nofile(max(4096, args.tunnels + args.gateways * 4 + 1024))
    with Procs(workdir) as procs:
        sw = Switch(procs, workdir)
        sw.gateway("asp1", "gw-srv")
        target = free_port()
        sw.api("POST", "/v1/services", {"name": f"svc-{target}", "gateway": "gw-srv",
                                        "target": f"{LOOPBACK}:{target}",
                                        "allow": ["alice"]}, user="asp1")
        sink = procs.spawn("sink", [sys.executable, SERVERS, "sink", str(target),
                                    "--max-seconds", "900"])
        wait_listening(target, proc=sink)
        before = rss_kib(sw.server.pid)
        res = asyncio.run(_scale(sw.url, args.gateways, args.tunnels, target))
        res["rss_mb"] = rss_kib(sw.server.pid) / 1024
        res["rss_before_mb"] = before / 1024
    return res


def _shares(wait: dict[str, float]) -> str:
    return "/".join(f"{w:.0%}" for w in wait.values()) or "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="throughput,latency,parallel,scale")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pings", type=int, default=500)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3,
                    help="parallel: interleaved rounds of every path (medians reported)")
    ap.add_argument("--parallel", default=",".join(PARALLEL_KEYS[:3]),
                    help="parallel: the paths, of " + ",".join(PARALLEL_KEYS))
    ap.add_argument("--gateways", type=int, default=1000)
    ap.add_argument("--tunnels", type=int, default=10000)
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.repeat, args.pings = 2.0, 1, 200
        args.gateways, args.tunnels, args.mib, args.rounds = 100, 500, 8, 1
    install_signal_exit()
    only = set(args.only.split(","))
    workdir = Path(tempfile.mkdtemp(prefix="kakehashi-switch-bench-"))
    rows: list[list[str]] = []
    say(f"switch benchmark on {machine()}; work directory {workdir}")
    if "throughput" in only:
        keys = ["direct", "ssh", "relay-tls", "switch-ws", "switch-ws-tls", "switch-poll"]
        res = {}
        for key in keys:
            if key == "ssh" and fw.ssh_available():
                say(f"  ssh -L skipped: {fw.ssh_available()}")
                continue
            res[key] = measure_throughput(key, args, workdir)
        base, ssh = res["direct"]["mbps"], res.get("ssh", {}).get("mbps")
        for r in res.values():
            cpu = f"{r['cpu_per_gb']:.1f} CPU s/GB" if r["cpu_per_gb"] else ""
            rows.append(["throughput", r["name"], f"{r['mbps']:,.0f} MB/s",
                         ratio(r["mbps"], base), ratio(r["mbps"], ssh), cpu])
    if "latency" in only:
        for key in ("direct", "switch-ws", "switch-poll"):
            r = measure_latency(key, args, workdir)
            rows.append(["latency (1-byte echo)", r["name"], f"p50 {r['p50']:.2f} ms",
                         "", "", f"p99 {r['p99']:.2f} ms"])
    if "parallel" in only:
        keys = [k for k in args.parallel.split(",") if k != "ssh" or not fw.ssh_available()]
        runs: dict[str, list[dict]] = {k: [] for k in keys}
        for i in range(args.rounds):  # interleaved: each path sees the same machine
            for key in keys:
                r = measure_parallel(key, args, workdir)
                runs[key].append(r)
                say(f"  round {i + 1}/{args.rounds} {r['name']}: bulk {r['mbps']:,.0f} MB/s"
                    f" (intact {r['intact']}/{args.streams}), echo p50 {r['p50']:.2f} ms"
                    f" p99 {r['p99']:.2f} ms ({r['pings']} pings), idle p50 "
                    f"{r['idle_p50']:.2f} ms, waited for a CPU {_shares(r['cpu_wait'])},"
                    f" load {r['load']:.1f}")
        rows += parallel_rows(runs, args)
    if "scale" in only:
        r = measure_scale(args, workdir)
        rows.append(["scale", f"{args.gateways} gateways, {args.tunnels} tunnels",
                     f"setup p50 {r['p50']:.1f} ms", "", "",
                     f"p99 {r['p99']:.1f} ms; gateways up in {r['connect_s']:.1f} s; server "
                     f"RSS {r['rss_before_mb']:.0f} -> {r['rss_mb']:.0f} MB"])
    say("")
    print(table(HEADERS, rows))
    (workdir / "results.json").write_text(json.dumps(rows))


if __name__ == "__main__":
    main()

"""Relay benchmark: kakehashi's relay side by side with direct TCP, socat, haproxy and ssh -L.

    python bench/relay_bench.py            # full run (about 6 minutes on 2 cores)
    python bench/relay_bench.py --quick    # short run (about 2 minutes)
    python bench/relay_bench.py --only throughput,setup:relay
    python bench/relay_bench.py --list     # the benchmark and row names

Four benchmarks, everything on loopback (127.0.0.1), one table at the end:

* throughput - one TCP stream, client -> path -> sink (iperf3; Python fallback),
  MB/s (10^6 bytes/s) median of --repeat runs, ratios vs direct and vs haproxy,
  and the CPU time the forwarding processes used per GB moved;
* setup - time from a client's connect() until the first byte comes back from an
  echo server behind the path, p50/p90/p99 over --sessions sequential sessions;
* idle - one relay server and --agents logged-in idle agents (one load-generator
  process): server RSS per agent and server CPU while only keepalives flow;
* churn - a TLS relay receiving --churn-rounds rounds of --churn-size TCP
  connections that send nothing and close: server RSS after a warm-up round and
  after the rounds (it must stay flat);
* burst - --burst-size wrong passwords for one user sent at once from one address:
  how many the relay checked (ran the password hash for) against its lockout limit,
  and how long until every one was answered;
* cluster - two relay nodes on one redis-server: throughput and setup time with the
  client at the agent's node and at the other node (interleaved, same run), then the
  agent's node killed and the time until the agent is reachable through the other.

See bench/README.md for what each row means and the targets. Users are registered
with --kdf-n 1024 (cheap scrypt), so logins cost ~3 ms instead of ~50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import forwarders as fw
from benchlib import (
    LOOPBACK,
    Procs,
    cpu_seconds,
    free_port,
    install_signal_exit,
    machine,
    median,
    percentile,
    raise_nofile,
    ratio,
    rss_kib,
    say,
    select_rows,
    source_version,
    table,
    tree_cpu_seconds,
    wait_listening,
)

HERE = Path(__file__).resolve().parent
SERVERS = str(HERE / "servers.py")

THROUGHPUT_ROWS = ["direct", "socat", "haproxy", "haproxy3", "uvloop3", "ssh", "relay",
                   "relay-nosplice", "relay-tls", "relay-tls-reencrypt", "relay-tls-nofast",
                   "relay-e2e", "relay-e2e-chacha", "relay-tls-e2e", "relay-old", "relay-tls-old",
                   "relay-e2e-old", "relay-tls-e2e-old"]
SETUP_ROWS = ["direct", "haproxy", "haproxy3", "uvloop3", "ssh", "relay", "relay-tls",
              "relay-encoff", "relay-noearly", "relay-tls-noearly", "relay-encoff-noearly",
              "link-spare", "link-new", "link-new-tls", "relay-old", "relay-tls-old",
              "relay-tls-reencrypt", "relay-tls-reencrypt-old", "relay-refuse",
              "relay-refuse-noearly"]
BASELINES = ["direct", "haproxy"]

SETUP_TARGET_MS = 1.0
CHURN_TARGET_PCT = 10.0
BURST_LIMIT = 20  # the relay's default lockout (failures per address and user)
RSS_TARGET_MB = 200.0
CPU_TARGET_PCT = 5.0


@dataclass
class Row:
    bench: str
    path: str
    result: str
    vs_direct: str = "-"
    vs_haproxy: str = "-"
    notes: str = ""
    target: str = ""

    def cells(self) -> list[str]:
        return [self.bench, self.path, self.result, self.vs_direct, self.vs_haproxy,
                self.notes, self.target]


HEADERS = ["Benchmark", "Path", "Result", "vs direct", "vs haproxy", "Notes", "Target"]


# == throughput =======================================================================
@dataclass
class Transfer:
    bytes: int
    seconds: float
    tool: str

    @property
    def mbps(self) -> float:
        return self.bytes / self.seconds / 1e6


def _renamed(route: fw.Route, suffix: str) -> fw.Route:
    route.name += suffix
    return route


#: ``relay serve --plaintext-requesters refuse``
PLAINTEXT_REFUSE = ("--plaintext-requesters", "refuse")


def start_route(key: str, procs: Procs, kk: fw.Kakehashi, target: int,
                old_src: str | None = None) -> fw.Route:
    """``relay-old``/``relay-tls-old``/``relay-e2e-old`` run the relay, agent and connect
    processes from ``old_src`` (a source tree's ``src``): before and after in one
    interleaved run."""
    if key.endswith("-old"):
        if not old_src:
            raise SystemExit(f"{key} needs --old-src")
        env = {"PYTHONPATH": old_src}
        if "-reencrypt" in key:
            env["KAKEHASHI_SESSION_CIPHER"] = "tls"
        route = kk.start_route(procs, target, tls=key.startswith("relay-tls"),
                               e2e="-e2e" in key, env=env)
        return _renamed(route, (" (session cipher off: re-encrypting)" if "-reencrypt" in key
                                else "") + " (old source)")
    starters: dict[str, Callable[[], fw.Route]] = {
        "direct": lambda: fw.direct(target),
        "socat": lambda: fw.start_socat(procs, target),
        "haproxy": lambda: fw.start_haproxy(procs, target),
        "haproxy3": lambda: fw.start_haproxy_chain(procs, target),
        "uvloop3": lambda: fw.start_uvloop_chain(procs, target),
        "ssh": lambda: fw.start_ssh(procs, target),
        "relay": lambda: kk.start_route(procs, target, tls=False),
        "relay-nosplice": lambda: kk.start_route(procs, target, tls=False, splice=False),
        "relay-tls": lambda: kk.start_route(procs, target, tls=True),
        "relay-tls-nofast": lambda: kk.start_route(procs, target, tls=True, fast_path=False),
        # the relay's session cipher off (KAKEHASHI_SESSION_CIPHER=tls): it decrypts and
        # re-encrypts every byte, as before (the default relays sealed frames unchanged)
        "relay-tls-reencrypt": lambda: _renamed(kk.start_route(
            procs, target, tls=True, env={"KAKEHASHI_SESSION_CIPHER": "tls"}),
            " (session cipher off: re-encrypting)"),
        "relay-e2e": lambda: kk.start_route(procs, target, tls=False, e2e=True),
        # both ends offering ChaCha20-Poly1305 only, as peers from before AES-128-GCM
        "relay-e2e-chacha": lambda: _renamed(kk.start_route(
            procs, target, tls=False, e2e=True,
            env={"KAKEHASHI_E2E_SUITES": "chacha20-poly1305"}), " (ChaCha20-Poly1305)"),
        "relay-tls-e2e": lambda: kk.start_route(procs, target, tls=True, e2e=True),
        # early data (the first bytes with the request) on and off; a plaintext link
        # carries them only when the terminals' encryption is off
        "relay-encoff": lambda: kk.start_route(procs, target, tls=False, encryption="off"),
        "relay-noearly": lambda: kk.start_route(procs, target, tls=False, early=False),
        "relay-tls-noearly": lambda: kk.start_route(procs, target, tls=True, early=False),
        "relay-encoff-noearly": lambda: kk.start_route(procs, target, tls=False,
                                                       encryption="off", early=False),
        # a relay that never instructs a plaintext requester to encrypt (step 12) says
        # so at login: early data on plaintext links whose encryption is optional
        "relay-refuse": lambda: kk.start_route(procs, target, tls=False,
                                               serve_extra=PLAINTEXT_REFUSE),
        "relay-refuse-noearly": lambda: kk.start_route(
            procs, target, tls=False, serve_extra=PLAINTEXT_REFUSE, early=False),
    }
    return starters[key]()


def iperf_once(procs: Procs, port: int, sink: int, seconds: float) -> Transfer:
    server = procs.spawn("iperf3-server", ["iperf3", "-s", "-1", "-B", LOOPBACK, "-p", str(sink)])
    try:
        wait_listening(sink, proc=server)
        res = subprocess.run(
            ["iperf3", "-c", LOOPBACK, "-p", str(port), "-t", str(seconds), "-J",
             "--connect-timeout", "5000"],
            capture_output=True, text=True, timeout=seconds + 30)
        data = json.loads(res.stdout or "{}")
        if "error" in data or res.returncode != 0:
            raise RuntimeError(f"iperf3: {data.get('error') or res.stderr.strip()}")
        got = data["end"]["sum_received"]
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.popen.wait(5)
        return Transfer(int(got["bytes"]), float(got["seconds"]), "iperf3")
    finally:
        procs.stop(server)


def python_once(procs: Procs, port: int, sink: int, seconds: float) -> Transfer:
    """Fallback sender: stream for ``seconds``, half-close, wait for the sink's byte count."""
    server = procs.spawn("sink", [sys.executable, SERVERS, "sink", str(sink),
                                  "--max-seconds", str(seconds + 60)])
    try:
        wait_listening(sink, proc=server)
        block = os.urandom(1 << 20)
        with socket.create_connection((LOOPBACK, port), timeout=seconds + 30) as sock:
            started = time.perf_counter()
            while time.perf_counter() - started < seconds:
                sock.sendall(block)
            sock.shutdown(socket.SHUT_WR)
            reply = b""
            while len(reply) < 8 and (chunk := sock.recv(8 - len(reply))):
                reply += chunk
            elapsed = time.perf_counter() - started
        if len(reply) != 8:
            raise RuntimeError("the sink did not report its byte count")
        return Transfer(int.from_bytes(reply, "big"), elapsed, "python")
    finally:
        procs.stop(server)


def measure_throughput(keys: list[str], args: argparse.Namespace, kk: fw.Kakehashi,
                       workdir: Path) -> dict[str, dict]:
    """Every path started once, then --repeat rounds that visit each path in turn, so
    a change in the machine's load hits all paths alike (medians of the rounds)."""
    sink = free_port()
    with Procs(workdir) as procs:
        routes = {key: start_route(key, procs, kk, sink, args.old_src) for key in keys}
        runs: dict[str, list[Transfer]] = {key: [] for key in keys}
        cpu = dict.fromkeys(keys, 0.0)
        for i in range(args.repeat):
            for key, route in routes.items():
                before = tree_cpu_seconds(route.pids)
                run = None
                if args.tool == "iperf3":
                    try:
                        run = iperf_once(procs, route.port, sink, args.seconds)
                    except (RuntimeError, ValueError, KeyError,
                            subprocess.TimeoutExpired) as exc:
                        say(f"  {key}: iperf3 failed ({exc}); falling back to the Python sender")
                if run is None:
                    run = python_once(procs, route.port, sink, args.seconds)
                time.sleep(0.2)  # let the forwarders finish (and socat reap its child)
                cpu[key] += tree_cpu_seconds(route.pids) - before
                runs[key].append(run)
                say(f"  {route.name} round {i + 1}/{args.repeat}: {run.mbps:,.0f} MB/s "
                    f"({run.tool})")
    out = {}
    for key, route in routes.items():
        moved = sum(r.bytes for r in runs[key])
        out[key] = {"name": route.name, "mbps": median([r.mbps for r in runs[key]]),
                    "runs": [r.mbps for r in runs[key]],
                    "tools": sorted({r.tool for r in runs[key]}),
                    "cpu_per_gb": cpu[key] / (moved / 1e9) if route.pids and moved else None,
                    "procs": len(route.pids)}
    return out


def throughput_rows(results: dict[str, dict]) -> list[Row]:
    direct = results.get("direct", {}).get("mbps")
    haproxy = results.get("haproxy", {}).get("mbps")
    ssh = results.get("ssh", {}).get("mbps")
    rows = []
    for key, r in results.items():
        spread = "/".join(f"{v:,.0f}" for v in r["runs"])
        notes = [f"runs {spread}"]
        if ssh and key.startswith("relay") and ("tls" in key or "e2e" in key):
            notes.append(f"{r['mbps'] / ssh:.2f}x ssh -L")
        if r["cpu_per_gb"] is not None:
            notes.append(f"CPU {r['cpu_per_gb']:.2f} s/GB ({r['procs']} proc)")
        if r["tools"] != ["iperf3"]:
            notes.append("tool " + "+".join(r["tools"]))
        rows.append(Row("throughput", r["name"], f"{r['mbps']:,.0f} MB/s",
                        ratio(r["mbps"], direct), ratio(r["mbps"], haproxy), "; ".join(notes)))
    return rows


# == session setup time ===============================================================
def time_sessions(port: int, count: int, gap: float, warmup: int = 10) -> list[float]:
    """connect(), send one byte, wait for the echo; seconds per session (after warm-up)."""
    samples = []
    for i in range(warmup + count):
        started = time.perf_counter()
        with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                raise RuntimeError(f"no echo through port {port}")
            elapsed = time.perf_counter() - started
        if i >= warmup:
            samples.append(elapsed)
        time.sleep(gap)
    return samples


async def time_link_sessions(relay_port: int, ca: Path, *, tls: bool, new_link: bool,
                             count: int, gap: float, warmup: int = 10) -> list[float]:
    """The relay's terminal in this process: a session on a spare link or on a new link.

    ``new_link``: every session opens its own TCP connection (+TLS) and logs in with
    the resumption token, as a terminal without a spare has to; otherwise a
    :class:`Terminal` keeps spare links and the session takes one. Timed from the
    request to the first echoed byte (the app side is a loopback TCP pair).
    """
    from kakehashi.core import tls as ktls
    from kakehashi.core.stream import Conn
    from kakehashi.relay.agent import RelayLink, Terminal, TerminalConfig, run_session

    ctx = ktls.client_context(ca) if tls else None
    cfg = TerminalConfig(server=LOOPBACK, port=relay_port, user="laptop",
                         password=fw.PASSWORDS["laptop"], tls=ctx, starttls=ctx, spares=2)
    loop = asyncio.get_running_loop()
    term = Terminal(cfg)
    maintainer = asyncio.create_task(term.maintain())
    await asyncio.wait_for(term.connected.wait(), 15)
    listener = socket.create_server((LOOPBACK, 0))
    listener.setblocking(False)
    tasks: set[asyncio.Task[None]] = set()

    async def session(link: RelayLink, app: Conn, info: object) -> None:
        await run_session(link, app, info, initiator=True)  # type: ignore[arg-type]
        if new_link:
            link.close()

    samples = []
    try:
        for i in range(warmup + count):
            client = socket.socket()
            client.setblocking(False)
            await loop.sock_connect(client, listener.getsockname())
            app_sock, _ = await loop.sock_accept(listener)
            started = time.perf_counter()
            if new_link:
                link = RelayLink(cfg)
                await link.open(term.token)
                info = await link.connect("pi", "echo")
            else:
                link, info = await term.connect("pi", "echo")
            task = asyncio.create_task(session(link, Conn(app_sock), info))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await loop.sock_sendall(client, b"x")
            if await loop.sock_recv(client, 1) != b"x":
                raise RuntimeError("no echo through the relay link")
            if i >= warmup:
                samples.append(time.perf_counter() - started)
            client.close()
            await asyncio.sleep(gap)
    finally:
        listener.close()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        maintainer.cancel()
        await term.close()
    return samples


def run_async(coro):
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    return runner(coro)


def _start_setup_route(key: str, procs: Procs, kk: fw.Kakehashi, echo: int,
                       old_src: str | None) -> fw.Route:
    route = start_route(key, procs, kk, echo, old_src)
    if key.startswith("relay") and not key.endswith("-old"):
        route.name += " (CLI connect, spares 2)"
    return route


def _setup_result(name: str, samples: list[float]) -> dict:
    ms = [s * 1000 for s in samples]
    result = {"name": name, "p50": percentile(ms, 50), "p90": percentile(ms, 90),
              "p99": percentile(ms, 99), "n": len(ms)}
    say(f"  {name}: p50 {result['p50']:.3f} ms, p90 {result['p90']:.3f} ms, "
        f"p99 {result['p99']:.3f} ms")
    return result


def measure_setup(keys: list[str], args: argparse.Namespace, kk: fw.Kakehashi,
                  workdir: Path, echo: int) -> dict[str, dict]:
    """Every process path started once, then rounds that visit each path in turn
    (--repeat rounds of --sessions/--repeat sessions), so a change in the machine's
    load hits all of them alike; the in-process ``link-*`` rows run after, each alone."""
    out: dict[str, dict] = {}
    routed = [k for k in keys if not k.startswith("link-")]
    with Procs(workdir) as procs:
        routes = {k: _start_setup_route(k, procs, kk, echo, args.old_src) for k in routed}
        samples: dict[str, list[float]] = {k: [] for k in routed}
        per_round = max(args.sessions // args.repeat, 10)
        for i in range(args.repeat):
            for key, route in routes.items():
                samples[key] += time_sessions(route.port, per_round, args.gap,
                                              warmup=10 if i == 0 else 2)
            say(f"  round {i + 1}/{args.repeat} done (load {os.getloadavg()[0]:.1f})")
        for key, route in routes.items():
            out[key] = _setup_result(route.name, samples[key])
    for key in keys:
        if not key.startswith("link-"):
            continue
        with Procs(workdir) as procs:
            tls = key.endswith("-tls")
            relay_port, _ = kk.serve(procs, tls=tls)
            kk.agent(procs, relay_port, {"echo": echo}, tls=tls)
            name = {"link-spare": "in-process terminal, spare link (plaintext)",
                    "link-new": "in-process terminal, new link per session (plaintext)",
                    "link-new-tls": "in-process terminal, new link per session (TLS)"}[key]
            out[key] = _setup_result(name, run_async(time_link_sessions(
                relay_port, kk.ca, tls=tls, new_link=key != "link-spare", count=args.sessions,
                gap=args.gap)))
    return {k: out[k] for k in keys}


def setup_rows(results: dict[str, dict]) -> list[Row]:
    direct = results.get("direct", {}).get("p50")
    haproxy = results.get("haproxy", {}).get("p50")
    rows = []
    for key, r in results.items():
        added = r["p50"] - direct if direct is not None else None
        target = ""
        if key.startswith("relay") or key == "link-spare":
            verdict = "PASS" if added is not None and added < SETUP_TARGET_MS else "FAIL"
            target = f"< {SETUP_TARGET_MS:g} ms added: {verdict}"
        rows.append(Row(
            "setup", r["name"],
            f"p50 {r['p50']:.3f} / p90 {r['p90']:.3f} / p99 {r['p99']:.3f} ms",
            f"+{added:.3f} ms" if added is not None and key != "direct" else "-",
            f"{r['p50'] - haproxy:+.3f} ms" if haproxy is not None and key != "haproxy"
            else "-",
            f"{r['n']} sessions", target))
    return rows


# == idle agents ======================================================================
AGENT_PASSWORD = "idle-agent-bench-secret"


def register_agents(db: str, count: int, prefix: str = "a") -> float:
    """Users a0..a{N-1} straight into the registry (threads: scrypt releases the GIL)."""
    from kakehashi.core.store import open_store
    from kakehashi.relay.control import UserRecord
    from kakehashi.relay.users import RelayUsers

    started = time.monotonic()
    registry = RelayUsers(open_store(db), kdf_n=fw.KDF_N)
    # threads: scrypt releases the GIL, and each add waits on a Redis round trip
    with ThreadPoolExecutor(max_workers=4 * (os.cpu_count() or 2)) as pool:
        list(pool.map(lambda i: registry.add(UserRecord(name=f"{prefix}{i}"), AGENT_PASSWORD),
                      range(count), chunksize=64))
    return time.monotonic() - started


def wait_event(proc, event: str, timeout: float) -> dict:
    """The generator's JSON line for ``event`` (it prints them on stdout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in proc.output().splitlines():
            if line.startswith("{") and f'"event": "{event}"' in line:
                return json.loads(line)
        if not proc.alive:
            raise RuntimeError(f"load generator exited:\n{proc.output()[-2000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"load generator: no {event!r} in {timeout:.0f}s")


def last_status(proc) -> dict | None:
    lines = [ln for ln in proc.output().splitlines() if '"event": "status"' in ln]
    return json.loads(lines[-1]) if lines else None


def measure_idle(args: argparse.Namespace, kk: fw.Kakehashi, workdir: Path) -> dict:
    n = args.agents
    db = str(workdir / "idle.db")
    say(f"  registering {n} users (scrypt n={fw.KDF_N}) ...")
    reg_seconds = register_agents(db, n)
    with Procs(workdir) as procs:
        port, pid = kk.serve(procs, tls=args.idle_tls, db=db, nofile=n + 1024,
                             extra=("--keepalive", str(args.keepalive)))
        time.sleep(1.0)
        rss_before = rss_kib(pid)
        tls_args = ["--tls-ca", str(kk.ca)] if args.idle_tls else []
        gen = procs.spawn("idle-agents", [
            sys.executable, str(HERE / "idle_agents.py"), "--server", f"{LOOPBACK}:{port}",
            "--count", str(n), "--concurrency", str(args.concurrency),
            "--max-seconds", str(args.window + n / 20 + 300), *tls_args],
            env={"BENCH_AGENT_PASSWORD": AGENT_PASSWORD}, nofile=n + 1024)
        login_cpu0 = cpu_seconds(pid, children=False)
        online = wait_event(gen, "online", timeout=60 + n / 50)
        login_cpu = cpu_seconds(pid, children=False) - login_cpu0
        say(f"  {online['online']} agents online in {online['seconds']} s "
            f"({online['failed']} failed)")
        time.sleep(3.0)  # let the login burst settle
        rss_loaded = rss_kib(pid)
        cpu0, gen_cpu0, t0 = cpu_seconds(pid, children=False), cpu_seconds(gen.pid), \
            time.monotonic()
        say(f"  measuring server CPU for {args.window:g} s (keepalive {args.keepalive:g} s) ...")
        time.sleep(args.window)
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds(pid, children=False) - cpu0
        gen_cpu = cpu_seconds(gen.pid) - gen_cpu0
        rss_after, hwm = rss_kib(pid), rss_kib(pid, "VmHWM")
        gen_rss = rss_kib(gen.pid)
        status = last_status(gen)
        if status and status["alive"] != online["online"]:
            say(f"  only {status['alive']} of {online['online']} agents still online; relay log:\n"
                + "\n".join(next(p for p in procs.procs if p.pid == pid)
                            .output().splitlines()[-15:]))
    return {"agents": online["online"], "failed": online["failed"],
            "login_seconds": online["seconds"], "login_cpu": login_cpu,
            "register_seconds": reg_seconds,
            "rss_before_mb": rss_before / 1024, "rss_loaded_mb": rss_loaded / 1024,
            "rss_after_mb": rss_after / 1024, "hwm_mb": hwm / 1024,
            "kb_per_agent": (rss_after - rss_before) / max(1, online["online"]),
            "cpu_pct": 100 * cpu / elapsed, "window": elapsed,
            "gen_cpu_pct": 100 * gen_cpu / elapsed, "gen_rss_mb": gen_rss / 1024,
            "alive": status["alive"] if status else None, "keepalive": args.keepalive,
            "tls": args.idle_tls}


def idle_rows(r: dict) -> list[Row]:
    n = r["agents"]
    rss_ok = "PASS" if r["rss_after_mb"] < RSS_TARGET_MB else "FAIL"
    cpu_ok = "PASS" if r["cpu_pct"] < CPU_TARGET_PCT else "FAIL"
    alive = f"; {r['alive']} still online at the end" if r["alive"] is not None else ""
    return [
        Row("idle", f"relay server RSS, {n} idle agents{' (TLS)' if r['tls'] else ''}",
            f"{r['rss_after_mb']:.0f} MB ({r['kb_per_agent']:.1f} KB/agent)",
            notes=f"empty {r['rss_before_mb']:.0f} MB, after logins {r['rss_loaded_mb']:.0f} MB,"
                  f" peak {r['hwm_mb']:.0f} MB{alive}",
            target=f"< {RSS_TARGET_MB:g} MB: {rss_ok}"),
        Row("idle", f"relay server CPU, keepalive every {r['keepalive']:g} s",
            f"{r['cpu_pct']:.2f} % of a core",
            notes=f"over {r['window']:.0f} s; load generator {r['gen_cpu_pct']:.1f} % CPU, "
                  f"{r['gen_rss_mb']:.0f} MB",
            target=f"< {CPU_TARGET_PCT:g} %: {cpu_ok}"),
        Row("idle", f"logins ({n} agents, 1 generator process)",
            f"{n / r['login_seconds']:,.0f} logins/s",
            notes=f"{r['login_seconds']:.1f} s, server CPU {r['login_cpu']:.1f} s; "
                  f"{r['failed']} failed; users registered in {r['register_seconds']:.0f} s"),
    ]


# == pre-handshake churn ==============================================================
def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _churn_round(port: int, pid: int, size: int, idle_fds: int) -> None:
    """``size`` connects that send nothing, closed once the relay holds them all."""
    socks = []
    for _ in range(size):
        with contextlib.suppress(OSError):
            socks.append(socket.create_connection((LOOPBACK, port), timeout=10))
    deadline = time.monotonic() + 60
    while _open_fds(pid) < idle_fds + len(socks) * 9 // 10 and time.monotonic() < deadline:
        time.sleep(0.02)
    for sock in socks:
        sock.close()
    deadline = time.monotonic() + 60
    while _open_fds(pid) > idle_fds and time.monotonic() < deadline:
        time.sleep(0.05)


def measure_churn(args: argparse.Namespace, kk: fw.Kakehashi, workdir: Path) -> dict:
    size, rounds = args.churn_size, args.churn_rounds
    raise_nofile(size + 1024)  # this process holds a round's sockets too
    with Procs(workdir) as procs:
        port, pid = kk.serve(procs, tls=True, nofile=size + 1024)
        wait_listening(port)
        idle_fds = _open_fds(pid)
        start = rss_kib(pid)
        _churn_round(port, pid, size, idle_fds)  # warm-up: the allocator's first growth
        base = rss_kib(pid)
        t0 = time.monotonic()
        for i in range(rounds):
            _churn_round(port, pid, size, idle_fds)
            say(f"  round {i + 1}/{rounds}: relay RSS {rss_kib(pid) / 1024:.0f} MB")
        end, hwm = rss_kib(pid), rss_kib(pid, "VmHWM")
        seconds = time.monotonic() - t0
    return {"size": size, "rounds": rounds, "start_mb": start / 1024, "base_mb": base / 1024,
            "end_mb": end / 1024, "hwm_mb": hwm / 1024, "seconds": seconds,
            "growth_pct": 100 * (end - base) / base}


def churn_rows(r: dict) -> list[Row]:
    ok = "PASS" if r["growth_pct"] < CHURN_TARGET_PCT else "FAIL"
    return [Row(
        "churn", f"relay server RSS, {r['rounds']} x {r['size']:,} pre-handshake closes (TLS)",
        f"{r['base_mb']:.0f} -> {r['end_mb']:.0f} MB ({r['growth_pct']:+.1f} %)",
        notes=f"empty {r['start_mb']:.0f} MB, before the rounds (after a warm-up round) "
              f"{r['base_mb']:.0f} MB, peak {r['hwm_mb']:.0f} MB; {r['seconds']:.0f} s",
        target=f"< {CHURN_TARGET_PCT:g} %: {ok}")]


# == parallel login guesses ===========================================================
def _burst(port: int, n: int) -> float:
    """``n`` logins with wrong passwords for carol, all sent at once; seconds until the
    relay has answered (or closed) every one of them."""
    from kakehashi.core import wire
    from kakehashi.relay import messages as m

    socks = [socket.create_connection((LOOPBACK, port), timeout=120) for _ in range(n)]
    for s in socks:
        s.sendall(wire.PREAMBLE)
    logins = [m.TERMINAL_CODEC.encode(m.Login(user="carol", password=f"guess-{i}",
                                              attrs=None, token=""))
              for i in range(n)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(lambda pair: pair[0].sendall(pair[1]), zip(socks, logins, strict=True)))

    def answered(s: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while s.recv(65536):  # the preamble, then the refusal, then the close
                pass
        s.close()

    with ThreadPoolExecutor(max_workers=64) as pool:
        list(pool.map(answered, socks))
    return time.monotonic() - t0


def measure_burst(args: argparse.Namespace, kk: fw.Kakehashi, workdir: Path) -> dict:
    n = args.burst_size
    db = str(workdir / "burst.db")
    kk.cli("relay", "user", "add", "carol", "--db", db, "--password-stdin",
           input="right-horse-battery\n")  # the default scrypt cost, as in production
    audit = workdir / "burst-audit.jsonl"
    with Procs(workdir) as procs:
        port, _pid = kk.serve(procs, tls=False, db=db, extra=("--audit-log", str(audit)))
        wait_listening(port)
        seconds = _burst(port, n)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            checked = locked = 0
            for line in audit.read_text().splitlines() if audit.exists() else []:
                e = json.loads(line)
                if e.get("event") == "login" and e.get("decision") == "deny":
                    if e.get("why") == "lockout":
                        locked += 1
                    else:
                        checked += 1
            if checked + locked >= n:
                break
            time.sleep(0.1)
    return {"n": n, "checked": checked, "locked": locked, "seconds": seconds}


def burst_rows(r: dict) -> list[Row]:
    ok = "PASS" if r["checked"] <= BURST_LIMIT else "FAIL"
    return [Row(
        "burst", f"{r['n']} wrong passwords for one user at once from one address",
        f"{r['checked']} checked",
        notes=f"{r['locked']} refused by the lockout without a hash; all answered in "
              f"{r['seconds']:.1f} s (default scrypt cost)",
        target=f"<= {BURST_LIMIT} (the lockout): {ok}")]


# == cluster (relay federation) ========================================================
def _cluster_node(procs: Procs, kk: fw.Kakehashi, url: str, name: str, ttl: float, *,
                  metrics: int | None = None, nofile: int | None = None):
    port = free_port()
    extra = ["--metrics-listen", f"{LOOPBACK}:{metrics}"] if metrics else []
    proc = procs.spawn(f"node-{name}", kk.argv(
        "relay", "serve", "--listen", f"{LOOPBACK}:{port}", "--db", url, "--tls", "off",
        "--cluster", url, "--node", name, "--advertise", f"{LOOPBACK}:{port}",
        "--cluster-ttl", str(ttl), *extra), env=kk.env, nofile=nofile)
    proc.wait_for(f"node {name} joined the cluster")
    return port, proc


def _cluster_nodes_seen(metrics_port: int) -> int | None:
    """``kakehashi_cluster_nodes`` of a node's /metrics (None when it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{metrics_port}/metrics",
                                    timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("kakehashi_cluster_nodes{"):
            return int(float(line.rsplit(" ", 1)[1]))
    return None


def _cluster_connect(procs: Procs, kk: fw.Kakehashi, node_port: int, service: str) -> int:
    port = free_port()
    proc = procs.spawn("connect", kk.argv(
        "relay", "connect", *kk.terminal_args("laptop", node_port, False),
        f"pi/{service}", "--listen", f"{LOOPBACK}:{port}"),
        env={**kk.env, "KAKEHASHI_PASSWORD": fw.PASSWORDS["laptop"]})
    proc.wait_for("forwarding")
    return port


def _echo_once(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
            sock.sendall(b"x")
            return sock.recv(1) == b"x"
    except OSError:
        return False


def measure_cluster(args: argparse.Namespace, kk: fw.Kakehashi, workdir: Path) -> dict:
    """Two nodes on one redis-server, the agent at n1: a client at n1 (same node) and one
    at n2 (cross node, over an inter-node link), measured interleaved; then n1 is
    killed and the time until the agent is reachable again through n2 is taken."""
    ttl = 3.0
    with Procs(workdir) as procs:
        rport = free_port()
        redis = procs.spawn("redis", ["redis-server", "--port", str(rport), "--bind", LOOPBACK,
                                      "--save", "", "--appendonly", "no"])
        wait_listening(rport, proc=redis)
        url = f"redis://{LOOPBACK}:{rport}"
        for user, password in fw.PASSWORDS.items():
            kk.cli("relay", "user", "add", user, "--db", url, "--password-stdin",
                   "--kdf-n", str(fw.KDF_N), input=password + "\n")
        (p1, n1), (p2, _) = (_cluster_node(procs, kk, url, n, ttl) for n in ("n1", "n2"))
        sink, echo = free_port(), free_port()
        server = procs.spawn("echo", [sys.executable, SERVERS, "echo", str(echo),
                                      "--max-seconds", "3600"])
        wait_listening(echo, proc=server)
        agent = procs.spawn("agent", kk.argv(
            "relay", "agent", "--user", "pi", "--tls", "off", "--server", f"{LOOPBACK}:{p1}",
            "--server", f"{LOOPBACK}:{p2}", "--expose", f"target={LOOPBACK}:{sink}",
            "--expose", f"echo={LOOPBACK}:{echo}"),
            env={**kk.env, "KAKEHASHI_PASSWORD": fw.PASSWORDS["pi"]})
        agent.wait_for("agent pi online")
        routes = {"same-node": (_cluster_connect(procs, kk, p1, "target"),
                                _cluster_connect(procs, kk, p1, "echo")),
                  "cross-node": (_cluster_connect(procs, kk, p2, "target"),
                                 _cluster_connect(procs, kk, p2, "echo"))}
        mbps: dict[str, list[float]] = {k: [] for k in routes}
        setup: dict[str, list[float]] = {k: [] for k in routes}
        for i in range(args.repeat):  # interleaved: the machine's load hits both alike
            for key, (tport, eport) in routes.items():
                run = None
                if args.tool == "iperf3":
                    with contextlib.suppress(RuntimeError, ValueError, KeyError,
                                             subprocess.TimeoutExpired):
                        run = iperf_once(procs, tport, sink, args.seconds)
                run = run or python_once(procs, tport, sink, args.seconds)
                mbps[key].append(run.mbps)
                say(f"  {key} run {i + 1}/{args.repeat}: {run.mbps:,.0f} MB/s ({run.tool})")
                setup[key] += time_sessions(eport, max(args.sessions // args.repeat, 10),
                                            args.gap)
        killed = time.monotonic()
        os.kill(n1.pid, 9)
        back = None
        deadline = killed + 60
        while time.monotonic() < deadline:
            if _echo_once(routes["cross-node"][1]):
                back = time.monotonic() - killed
                break
            time.sleep(0.1)
    out = {k: {"mbps": median(v), "runs": v,
               "p50": percentile([s * 1000 for s in setup[k]], 50),
               "p99": percentile([s * 1000 for s in setup[k]], 99), "n": len(setup[k])}
           for k, v in mbps.items()}
    out["failover"] = back
    out["ttl"] = ttl
    return out


def measure_cluster_idle(args: argparse.Namespace, kk: fw.Kakehashi, workdir: Path) -> dict:
    """--agents idle agents spread evenly over three nodes (one load generator per
    node): RSS per node, Redis memory, the nodes' CPU while only keepalives flow; then
    n3 is killed (SIGKILL) and the time until n1 and n2 count two nodes is taken (the
    cluster noticing a dead node: its entries expire after the ttl, the others see it
    at their next renewal)."""
    n = args.agents // 3
    ttl = 6.0
    nofile = n + 4096  # the agents' connections, the inter-node links, Redis, spares
    with Procs(workdir) as procs:
        rport = free_port()
        redis = procs.spawn("redis", ["redis-server", "--port", str(rport), "--bind", LOOPBACK,
                                      "--save", "", "--appendonly", "no"])
        wait_listening(rport, proc=redis)
        url = f"redis://{LOOPBACK}:{rport}"
        say(f"  registering 3 x {n} users in Redis ...")
        for prefix in ("x", "y", "z"):
            register_agents(url, n, prefix)
        mports = [free_port() for _ in range(3)]
        nodes = [_cluster_node(procs, kk, url, name, ttl, metrics=mp, nofile=nofile)
                 for name, mp in zip(("n1", "n2", "n3"), mports, strict=True)]
        time.sleep(1.0)
        rss_before = [rss_kib(p.pid) for _, p in nodes]
        gens = []
        for (port, _), prefix in zip(nodes, ("x", "y", "z"), strict=True):
            gens.append(procs.spawn("idle-agents", [
                sys.executable, str(HERE / "idle_agents.py"), "--server", f"{LOOPBACK}:{port}",
                # logins in flight from one address count against its lockout (100 at
                # the default): below it, whatever the store's latency
                "--count", str(n), "--prefix", prefix,
                "--concurrency", str(min(args.concurrency, 50)),
                "--max-seconds", str(args.window + n / 10 + 300)],
                env={"BENCH_AGENT_PASSWORD": AGENT_PASSWORD}, nofile=n + 1024))
        online = [wait_event(g, "online", timeout=60 + n / 30) for g in gens]
        say("  online: " + ", ".join(f"{o['online']} in {o['seconds']} s" for o in online))
        time.sleep(3.0)
        load = os.getloadavg()[0]
        cpu0 = [cpu_seconds(p.pid, children=False) for _, p in nodes]
        gen0 = [cpu_seconds(g.pid, children=False) for g in gens]
        t0 = time.monotonic()
        time.sleep(args.window)
        elapsed = time.monotonic() - t0
        cpu = [cpu_seconds(p.pid, children=False) - c for (_, p), c in zip(nodes, cpu0,
                                                                              strict=True)]
        gen_cpu = [cpu_seconds(g.pid, children=False) - c for g, c in zip(gens, gen0,
                                                                             strict=True)]
        rss = [rss_kib(p.pid) for _, p in nodes]
        alive = [(last_status(g) or {}).get("alive") for g in gens]
        info = subprocess.run(["redis-cli", "-p", str(rport), "info", "memory"],
                              capture_output=True, text=True, timeout=10).stdout
        used = next((int(line.split(":")[1]) for line in info.splitlines()
                     if line.startswith("used_memory:")), 0)
        seen = [_cluster_nodes_seen(mp) for mp in mports[:2]]
        # the cluster noticing a dead node: n3 killed, until n1 and n2 count two nodes
        killed = time.monotonic()
        os.kill(nodes[2][1].pid, 9)
        noticed: list[float | None] = [None, None]
        while None in noticed and time.monotonic() < killed + 60:
            for i, mp in enumerate(mports[:2]):
                if noticed[i] is None and _cluster_nodes_seen(mp) == 2:
                    noticed[i] = time.monotonic() - killed
            time.sleep(0.05)
    return {"per_node": n, "online": [o["online"] for o in online],
            "login_seconds": [o["seconds"] for o in online], "alive": alive,
            "rss_before_mb": [r / 1024 for r in rss_before], "rss_mb": [r / 1024 for r in rss],
            "cpu_pct": [100 * c / elapsed for c in cpu],
            "gen_cpu_pct": [100 * c / elapsed for c in gen_cpu], "redis_mb": used / 1e6,
            "window": elapsed, "ttl": ttl, "load": load, "seen": seen, "noticed": noticed}


def cluster_idle_rows(r: dict) -> list[Row]:
    total = sum(r["online"])
    rss = "/".join(f"{v:.0f}" for v in r["rss_mb"])
    cpu = "/".join(f"{v:.1f}" for v in r["cpu_pct"])
    kb = [(a - b) * 1024 / max(1, o) for a, b, o in
          zip(r["rss_mb"], r["rss_before_mb"], r["online"], strict=True)]
    return [
        Row("cluster", f"{total} idle agents over 3 nodes: RSS per node", f"{rss} MB",
            notes=f"{'/'.join(f'{k:.1f}' for k in kb)} KB per agent; online "
                  f"{'/'.join(str(o) for o in r['online'])}"),
        Row("cluster", "idle: nodes' CPU (keepalives, presence renewal, full reads)",
            f"{cpu} % of a core",
            notes=f"over {r['window']:.0f} s, --cluster-ttl {r['ttl']:g} s; load average "
                  f"{r['load']:.1f} at the start; the load generators "
                  f"{'/'.join(f'{v:.1f}' for v in r['gen_cpu_pct'])} %; logins took "
                  f"{'/'.join(f'{v:.0f}' for v in r['login_seconds'])} s"),
        Row("cluster", f"Redis memory for {total} users' presence", f"{r['redis_mb']:.1f} MB",
            notes="used_memory, users' records included"),
        Row("cluster", "a node killed (SIGKILL, 1/3 of the agents): noticed by the others",
            "/".join(f"{v:.1f}" for v in r["noticed"] if v is not None) + " s"
            if all(v is not None for v in r["noticed"]) else "not within 60 s",
            notes=f"SIGKILL until n1/n2 count 2 nodes (kakehashi_cluster_nodes): its "
                  f"entries expire after --cluster-ttl {r['ttl']:g} s, the survivors see "
                  f"it at their next renewal (every {r['ttl'] / 3:g} s) and drop it",
            target=f"<= {r['ttl'] * 4 / 3:g} s + a renewal's work"),
    ]


def cluster_rows(r: dict) -> list[Row]:
    same, cross = r["same-node"], r["cross-node"]
    rows = []
    for key, label in (("same-node", "client and agent at one node"),
                       ("cross-node", "client at n2, agent at n1 (inter-node link)")):
        x = r[key]
        spread = "/".join(f"{v:,.0f}" for v in x["runs"])
        rows.append(Row("cluster", f"throughput, {label}", f"{x['mbps']:,.0f} MB/s",
                        notes=f"runs {spread}; {ratio(x['mbps'], same['mbps'])} of same-node",
                        target=">= 0.8x same-node" if key == "cross-node" else ""))
    rows.append(Row("cluster", "setup p50 (first byte echoed), same-node / cross-node",
                    f"{same['p50']:.2f} / {cross['p50']:.2f} ms",
                    notes=f"the extra hop adds {cross['p50'] - same['p50']:.2f} ms at p50; "
                          f"p99 {same['p99']:.2f} / {cross['p99']:.2f} ms; "
                          f"{cross['n']} sessions each"))
    back = r["failover"]
    rows.append(Row("cluster", "agent's node killed (SIGKILL): reachable again via n2",
                    f"{back:.2f} s" if back is not None else "not within 60 s",
                    notes=f"--cluster-ttl {r['ttl']:g} s: the other nodes drop the dead "
                          f"node's users within ttl + {r['ttl'] / 3:g} s (one renewal)",
                    target="<= 30 s"))
    return rows


# == main =============================================================================
def selected(only: list[str] | None) -> dict[str, list[str]]:
    """Rows to run per benchmark; a group's baselines (direct, haproxy) come along."""
    groups = {"throughput": THROUGHPUT_ROWS, "setup": SETUP_ROWS, "idle": ["agents"],
              "churn": ["prehandshake"], "burst": ["login"], "cluster": ["nodes", "idle"]}
    return select_rows(groups, only, {g: BASELINES for g in ("throughput", "setup")})


def check_tools(rows: dict[str, list[str]]) -> None:
    missing = [t for t in ("iperf3", "socat", "haproxy") if not shutil.which(t)]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run bash scripts/install-deps.sh")
    why = fw.ssh_available()
    if why:
        say(f"skipping the ssh -L rows: {why}")
        for g in rows:
            rows[g] = [r for r in rows[g] if r != "ssh"]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="short run: 2 s x 1 transfer, 50 sessions, 1000 agents, 20 s window")
    ap.add_argument("--only", help="comma-separated: throughput, setup, idle, GROUP:ROW or ROW")
    ap.add_argument("--list", action="store_true", help="print the benchmark names and exit")
    ap.add_argument("--seconds", type=float, help="seconds per transfer (default 5; quick 2)")
    ap.add_argument("--repeat", type=int, help="transfers per throughput row (default 3; quick 1)")
    ap.add_argument("--tool", choices=["iperf3", "python"], default="iperf3",
                    help="throughput client/sink (python: own sender and sink)")
    ap.add_argument("--sessions", type=int, help="sessions per setup row (default 300; quick 50)")
    ap.add_argument("--gap", type=float, default=0.01, help="pause between sessions (s)")
    ap.add_argument("--old-src", help="a source tree's src directory for the rows relay-old and "
                    "relay-tls-old (before/after in one interleaved run)")
    ap.add_argument("--agents", type=int, help="idle agents (default 10000; quick 1000)")
    ap.add_argument("--concurrency", type=int, default=500, help="agent logins in flight")
    ap.add_argument("--window", type=float, help="idle CPU window in s (default 60; quick 20)")
    ap.add_argument("--keepalive", type=float, default=15.0, help="relay keepalive (s)")
    ap.add_argument("--idle-tls", action="store_true",
                    help="idle agents connect with TLS (default: --tls off, as in the target)")
    ap.add_argument("--churn-size", type=int,
                    help="connections per churn round (default 2000; quick 1000)")
    ap.add_argument("--churn-rounds", type=int,
                    help="churn rounds after the warm-up (default 10; quick 3)")
    ap.add_argument("--burst-size", type=int, default=120,
                    help="simultaneous wrong passwords in the burst benchmark (default 120)")
    ap.add_argument("--keep-workdir", action="store_true", help="keep logs and configs")
    args = ap.parse_args()
    quick = args.quick
    defaults = {"seconds": 2.0 if quick else 5.0, "repeat": 1 if quick else 3,
                "sessions": 50 if quick else 300, "agents": 1000 if quick else 10000,
                "window": 20.0 if quick else 60.0, "churn_size": 1000 if quick else 2000,
                "churn_rounds": 3 if quick else 10}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> int:
    args = parse_args()
    if args.list:
        print("throughput:", ", ".join(THROUGHPUT_ROWS))
        print("setup:     ", ", ".join(SETUP_ROWS))
        print("idle:       agents")
        print("churn:      prehandshake")
        print("burst:      login")
        print("cluster:    nodes, idle")
        return 0
    rows = selected(args.only.split(",") if args.only else None)
    if not args.old_src:
        rows = {g: [r for r in rs if not r.endswith("-old")] for g, rs in rows.items()}
    check_tools(rows)
    install_signal_exit()
    workdir = Path(tempfile.mkdtemp(prefix="kakehashi-bench-"))
    started = time.monotonic()
    version = source_version()
    out: list[Row] = []
    try:
        kk = fw.Kakehashi(workdir)
        if rows.get("throughput"):
            say(f"== throughput: one stream, {args.seconds:g} s x {args.repeat}")
            say("   (interleaved: each round visits every path)")
            res = measure_throughput(rows["throughput"], args, kk, workdir)
            out += throughput_rows(res)
            print(table(HEADERS, [r.cells() for r in throughput_rows(res)]), flush=True)
        if rows.get("setup"):
            say(f"== setup: {args.sessions} sequential sessions, first byte echoed")
            with Procs(workdir) as procs:
                echo = free_port()
                server = procs.spawn("echo", [sys.executable, SERVERS, "echo", str(echo),
                                              "--max-seconds", "3600"])
                wait_listening(echo, proc=server)
                res = measure_setup(rows["setup"], args, kk, workdir, echo)
            out += setup_rows(res)
            print(table(HEADERS, [r.cells() for r in setup_rows(res)]), flush=True)
        if rows.get("idle"):
            say(f"== idle: {args.agents} agents, keepalive {args.keepalive:g} s")
            res_idle = measure_idle(args, kk, workdir)
            out += idle_rows(res_idle)
            print(table(HEADERS, [r.cells() for r in idle_rows(res_idle)]), flush=True)
        if rows.get("churn"):
            say(f"== churn: {args.churn_rounds} x {args.churn_size} pre-handshake closes")
            res_churn = measure_churn(args, kk, workdir)
            out += churn_rows(res_churn)
            print(table(HEADERS, [r.cells() for r in churn_rows(res_churn)]), flush=True)
        if rows.get("burst"):
            say(f"== burst: {args.burst_size} parallel wrong passwords from one address")
            res_burst = measure_burst(args, kk, workdir)
            out += burst_rows(res_burst)
            print(table(HEADERS, [r.cells() for r in burst_rows(res_burst)]), flush=True)
        if rows.get("cluster"):
            say(f"== cluster: two nodes, same-node vs cross-node, {args.repeat} x "
                f"{args.seconds:g} s interleaved; then the agent's node killed")
            if "nodes" in rows["cluster"]:
                res_cluster = measure_cluster(args, kk, workdir)
                out += cluster_rows(res_cluster)
                print(table(HEADERS, [r.cells() for r in cluster_rows(res_cluster)]),
                      flush=True)
            if "idle" in rows["cluster"]:
                say(f"== cluster idle: {args.agents} agents over three nodes")
                res_ci = measure_cluster_idle(args, kk, workdir)
                out += cluster_idle_rows(res_ci)
                print(table(HEADERS, [r.cells() for r in cluster_idle_rows(res_ci)]),
                      flush=True)
    except KeyboardInterrupt:
        say("interrupted; processes stopped")
        return 130
    finally:
        if args.keep_workdir:
            say(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    minutes = (time.monotonic() - started) / 60
    print(f"\n## kakehashi relay benchmark ({time.strftime('%Y-%m-%d')}, {machine()}; "
          f"{'quick' if args.quick else 'full'} run, {minutes:.1f} min; kakehashi {version})\n")
    print(table(HEADERS, [r.cells() for r in out]))
    print("\nMB = 10^6 bytes. Users registered with --kdf-n 1024 (cheap logins).")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Gateway benchmark: `kakehashi gateway serve` side by side with haproxy and tinyproxy.

    python bench/gateway_bench.py            # full run (about 6 minutes on 2 cores)
    python bench/gateway_bench.py --quick    # short run (about 1.5 minutes)
    python bench/gateway_bench.py --only http
    python bench/gateway_bench.py --only connect:gateway,connect-py:gateway
    python bench/gateway_bench.py --profile  # + py-spy of the gateway under wrk load
    python bench/gateway_bench.py --list     # the benchmark and row names
    python bench/gateway_bench.py --only http:haproxy,http:gateway-quiet,http:gateway-old \
        --old-src /tmp/old/src               # keep-alive rows, before/after in one run

Three benchmarks, everything on loopback (127.0.0.1), one table at the end:

* http - small requests through a forward proxy: ``wrk -t2 -c50 --latency`` with a
  Lua script that sends absolute-form requests (``GET http://origin/ HTTP/1.1`` with
  the fields ``curl -x`` sends, what a proxy receives) to a fast origin (haproxy
  ``http-request return``, a 100-byte body, keep-alive). Requests/s (median of
  --repeat runs), p50/p99 latency, the proxy's CPU time per request; ratios vs
  haproxy ``mode http`` and vs tinyproxy. By default the proxy runs alone on CPU 1
  and wrk + origin on CPU 0 (--no-pin); rows are interleaved run by run.
* connect - bulk throughput of a CONNECT tunnel with iperf3 (one stream). iperf3
  cannot speak CONNECT, so the tunnel is ``kakehashi gateway tunnel --listen``
  (a second process) in front of the gateway; haproxy ``mode tcp`` once and twice
  chained (the same number of forwarding processes) are the references.
* connect-tls - the same Python sender over TLS (one TLS client context for every
  row; the cipher negotiated is shown): the gateway with a TLS listener (``--tls on``,
  CONNECT inside TLS) against haproxy ``mode tcp`` with ``bind ... ssl crt`` (TLS
  termination, plaintext to the sink); the on-demand edge with a ``tls`` grant
  (client TLS ends at the edge; edge -> inner relay link with TLS, the default, and
  ``--link-tls off``) against haproxy ``ssl crt`` -> haproxy ``mode tcp`` (the same
  two forwarding processes), and the edge with link TLS against haproxy ``ssl crt``
  -> ``server ... ssl`` -> haproxy ``ssl crt`` (``haproxy-ssl2tls``: TLS on the link
  between them too, the same crypto per byte). Rows interleaved run by run; CPU s/GB
  of the forwarders.
  The ``-bio`` rows run kakehashi with ``KAKEHASHI_FAST_PATH=off`` (TLS through memory
  BIOs, the driver these streams had before TLS on the socket could half-close);
  ``ondemand-tls-old`` runs the edge row's processes from ``--old-src``.
* connect-py - the gateway alone: a Python sender in this process connects, sends
  ``CONNECT``, reads the 200 and streams --bytes (1 GiB) to a counting sink, which
  answers the byte count after the half-close; the same sender through haproxy
  ``mode tcp`` and direct. MB/s median of --repeat runs, CPU s/GB of the forwarder.

See bench/README.md ("Gateway") for the rows and targets: gateway >= 0.5x haproxy
requests/s (and far above tinyproxy); CONNECT throughput >= haproxy ``mode tcp``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
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
    ratio,
    say,
    select_rows,
    source_version,
    table,
    tree_cpu_seconds,
    wait_listening,
)

HERE = Path(__file__).resolve().parent
SERVERS = str(HERE / "servers.py")

#: tinyproxy last in each round: it leaves thousands of closed connections behind
HTTP_ROWS = ["direct", "haproxy", "gateway", "gateway-quiet", "gateway-old", "gateway-nolane",
             "tinyproxy"]
#: rows that run another source tree (--old-src): a before/after in one run
OLD_ROWS = {"gateway-old", "ondemand-tls-old"}
CONNECT_ROWS = ["direct", "haproxy", "haproxy2", "gateway"]
CONNECT_PY_ROWS = ["direct", "haproxy", "gateway", "gateway-nosplice"]
#: TLS terminated by the forwarder, plaintext on to the sink; interleaved run by run
CONNECT_TLS_ROWS = ["haproxy-ssl", "gateway-tls", "gateway-tls-bio", "haproxy-ssl2",
                    "ondemand-tls", "ondemand-tls-old", "ondemand-tls-bio",
                    "ondemand-tls-plainlink", "haproxy-ssl2tls"]
#: rows of kakehashi with ``KAKEHASHI_FAST_PATH=off`` (TLS through memory BIOs): the
#: driver before TLS on the socket could half-close, for a before/after in one run
SLOW_TLS_ROWS = {"gateway-tls-bio", "ondemand-tls-bio"}
GROUPS = {"http": HTTP_ROWS, "http-close": HTTP_ROWS, "connect": CONNECT_ROWS,
          "connect-py": CONNECT_PY_ROWS, "connect-tls": CONNECT_TLS_ROWS}
BASELINES = {"http": ["haproxy", "tinyproxy"], "http-close": ["haproxy", "tinyproxy"],
             "connect": ["direct", "haproxy"],
             "connect-py": ["direct", "haproxy"],
             "connect-tls": ["haproxy-ssl", "haproxy-ssl2", "haproxy-ssl2tls"]}

HTTP_TARGET = 0.5      # gateway req/s >= 0.5x haproxy mode http
CONNECT_TARGET = 1.0   # gateway CONNECT MB/s >= 1.0x haproxy mode tcp

BODY = "kakehashi-bench " * 6 + "0123"  # 100 bytes
assert len(BODY) == 100

ORIGIN_CFG = """\
global
    maxconn 4096
    nbthread 1
defaults
    mode http
    timeout client 120s
    timeout http-keep-alive 120s
frontend origin
    bind {loopback}:{port}
    http-request return status 200 content-type text/plain string "{body}"
"""

HAPROXY_ARGV = ["haproxy", "-db", "-f"]  # the config path goes last

HAPROXY_HTTP_CFG = """\
global
    maxconn 4096
    nbthread 1
defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout http-keep-alive 120s
frontend proxy
    bind {loopback}:{port}
    default_backend origin
backend origin
    server o1 {loopback}:{origin}
"""

TINYPROXY_CFG = """\
Port {port}
Listen {loopback}
Timeout 120
MaxClients 200
LogLevel Critical
LogFile "{dir}/tinyproxy-{port}.log"
PidFile "{dir}/tinyproxy-{port}.pid"
"""

WRK_SCRIPT = """\
-- absolute-form request line and the fields curl -x sends (Proxy-Connection included)
wrk.path = "http://{loopback}:{origin}/"
wrk.headers["Host"] = "{loopback}:{origin}"
wrk.headers["User-Agent"] = "curl/8.5.0"
wrk.headers["Accept"] = "*/*"
wrk.headers["Proxy-Connection"] = "Keep-Alive"
"""
#: http-close: one request per connection (what a one-shot client such as a script
#: calling curl once does); every request pays the connection setup and teardown
WRK_CLOSE = 'wrk.headers["Connection"] = "close"\n'


@dataclass
class Row:
    bench: str
    path: str
    result: str
    latency: str = "-"
    vs_a: str = "-"
    vs_b: str = "-"
    cpu: str = "-"
    notes: str = ""
    target: str = ""

    def cells(self) -> list[str]:
        return [self.bench, self.path, self.result, self.latency, self.vs_a, self.vs_b,
                self.cpu, self.notes, self.target]


HEADERS = ["Benchmark", "Path", "Result", "Latency p50 / p99", "vs haproxy",
           "vs tinyproxy / direct", "Proxy CPU", "Notes", "Target"]


@dataclass
class Route:
    name: str
    port: int
    pids: list[int] = field(default_factory=list)


def pinned(cpu: int | None, argv: list[str]) -> list[str]:
    """``taskset`` in front (it execs, so the pid stays the program's)."""
    return ["taskset", "-c", str(cpu), *argv] if cpu is not None else argv


# == kakehashi ========================================================================
class Gateway:
    """``kakehashi gateway serve`` and ``gateway tunnel`` with a private home and db."""

    def __init__(self, workdir: Path) -> None:
        self.home = workdir / "kakehashi-home"
        self.db = str(workdir / "gateway.db")
        self.env = {"KAKEHASHI_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}
        #: another source tree's src (--old-src), for the -old rows
        self.old_src = ""

    @staticmethod
    def argv(*args: str, log_level: str = "info") -> list[str]:
        return [sys.executable, "-m", "kakehashi", "--log-format", "text",
                "--log-level", log_level, *args]

    def serve(self, procs: Procs, *, cpu: int | None = None, log_level: str = "info",
              env: dict[str, str] | None = None, extra: tuple[str, ...] = ()) -> Route:
        port = free_port()
        proc = procs.spawn("gateway", pinned(cpu, self.argv(
            "gateway", "serve", "--listen", f"{LOOPBACK}:{port}", "--allow-target", LOOPBACK,
            "--tls", "off", "--db", self.db, *extra, log_level=log_level)),
            env={**self.env, **(env or {})})
        proc.wait_for("gateway listening on")
        return Route("kakehashi gateway", port, [proc.pid])

    def tunnel(self, procs: Procs, gateway_port: int, target: int) -> Route:
        port = free_port()
        proc = procs.spawn("tunnel", self.argv(
            "gateway", "tunnel", "--server", f"{LOOPBACK}:{gateway_port}", "--tls", "off",
            "--to", f"{LOOPBACK}:{target}", "--listen", f"{LOOPBACK}:{port}"), env=self.env)
        proc.wait_for("tunnel ")
        return Route("gateway tunnel", port, [proc.pid])


# == http: requests/s with wrk ========================================================
@dataclass
class WrkRun:
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    non2xx: int
    socket_errors: dict[str, int]
    seconds: float


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> WrkRun:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if not (rps and total and p50 and p99):
        raise RuntimeError(f"cannot read wrk output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       out)
    errs = dict(zip(["connect", "read", "write", "timeout"],
                    [int(x) for x in errors.groups()], strict=True)) if errors else {}
    return WrkRun(float(rps.group(1)), int(total.group(1)), _ms(p50.group(1)),
                  _ms(p99.group(1)), int(non2xx.group(1)) if non2xx else 0, errs,
                  _ms(total.group(2) + total.group(3)) / 1000)


def wrk_once(args: argparse.Namespace, port: int, script: Path | None, seconds: float,
             cpu: int | None) -> WrkRun:
    argv = pinned(cpu, ["wrk", f"-t{args.threads}", f"-c{args.connections}",
                        f"-d{seconds:g}s", "--latency", "--timeout", "5s",
                        *(["-s", str(script)] if script else []), f"http://{LOOPBACK}:{port}/"])
    res = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if res.returncode != 0:
        raise RuntimeError(f"wrk failed ({res.returncode}): {res.stderr.strip()}")
    return parse_wrk(res.stdout)


def start_configured(procs: Procs, name: str, template: str, argv: list[str],
                     cpu: int | None, **fields) -> tuple[int, int]:
    """Write ``template`` (filled with a free port) as NAME-PORT.conf, start
    ``argv`` + that path pinned to ``cpu``, wait until it listens: (port, pid)."""
    port = free_port()
    cfg = procs.workdir / f"{name}-{port}.conf"
    cfg.write_text(template.format(loopback=LOOPBACK, port=port, **fields))
    proc = procs.spawn(name, pinned(cpu, [*argv, str(cfg)]))
    wait_listening(port, proc=proc)
    return port, proc.pid


def start_origin(procs: Procs, cpu: int | None) -> Route:
    port, pid = start_configured(procs, "origin", ORIGIN_CFG, HAPROXY_ARGV, cpu, body=BODY)
    return Route("origin", port, [pid])


def start_http_proxy(key: str, procs: Procs, gw: Gateway, origin: int,
                     cpu: int | None) -> Route:
    if key == "direct":
        return Route("direct (wrk -> origin)", origin)
    if key == "haproxy":
        port, pid = start_configured(procs, "haproxy-http", HAPROXY_HTTP_CFG, HAPROXY_ARGV,
                                     cpu, origin=origin)
        return Route("haproxy mode http (1 thread)", port, [pid])
    if key == "tinyproxy":
        port, pid = start_configured(procs, "tinyproxy", TINYPROXY_CFG,
                                     ["tinyproxy", "-d", "-c"], cpu, dir=procs.workdir)
        return Route("tinyproxy", port, [pid])
    if key == "gateway":
        route = gw.serve(procs, cpu=cpu)
        route.name = "kakehashi gateway (default log level)"
        return route
    if key == "gateway-quiet":
        route = gw.serve(procs, cpu=cpu, log_level="error")
        route.name = "kakehashi gateway, --log-level error"
        return route
    if key == "gateway-old":
        route = gw.serve(procs, cpu=cpu, log_level="error", env={"PYTHONPATH": gw.old_src})
        route.name = "kakehashi gateway from --old-src, --log-level error"
        return route
    if key == "gateway-nolane":
        route = gw.serve(procs, cpu=cpu, log_level="error", extra=("--fast-lane", "off"))
        route.name = "kakehashi gateway, --fast-lane off, --log-level error"
        return route
    raise KeyError(key)


def check_proxy(port: int, origin: int) -> None:
    """One request by hand: the path must answer 200 with the origin's body."""
    with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
        sock.sendall(f"GET http://{LOOPBACK}:{origin}/ HTTP/1.1\r\nHost: {LOOPBACK}:{origin}"
                     "\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    if not data.startswith(b"HTTP/1.1 200") or not data.endswith(BODY.encode()):
        raise RuntimeError(f"port {port} did not relay the origin's answer: {data[:300]!r}")


def measure_http(keys: list[str], args: argparse.Namespace, gw: Gateway, workdir: Path,
                 origin: Route, script: Path, pin: tuple[int, int] | None,
                 direct_script: Path | None = None) -> dict:
    """Every row's proxy runs at once (idle when not measured) and the runs are
    interleaved round by round, so drift of a noisy machine hits all rows alike."""
    load_cpu, proxy_cpu = pin if pin else (None, None)
    with Procs(workdir) as procs:
        routes = {k: start_http_proxy(k, procs, gw, origin.port, proxy_cpu) for k in keys}
        scripts = {k: (script if k != "direct" else direct_script) for k in keys}
        for k, route in routes.items():
            check_proxy(route.port, origin.port)
            wrk_once(args, route.port, scripts[k], 1.0, load_cpu)  # warm-up
        runs: dict[str, list[WrkRun]] = {k: [] for k in keys}
        proxy_s = dict.fromkeys(keys, 0.0)
        origin_s = dict.fromkeys(keys, 0.0)
        for i in range(args.repeat):
            for k, route in routes.items():
                before, obefore = tree_cpu_seconds(route.pids), cpu_seconds(origin.pids[0])
                run = wrk_once(args, route.port, scripts[k], args.seconds, load_cpu)
                proxy_s[k] += tree_cpu_seconds(route.pids) - before
                origin_s[k] += cpu_seconds(origin.pids[0]) - obefore
                runs[k].append(run)
                errs = sum(run.socket_errors.values())
                say(f"  {route.name} run {i + 1}/{args.repeat}: {run.rps:,.0f} req/s, "
                    f"p50 {run.p50_ms:.2f} ms, p99 {run.p99_ms:.2f} ms"
                    + (f", {run.non2xx} non-2xx" if run.non2xx else "")
                    + (f", socket errors {run.socket_errors}" if errs else ""))
        profiles = {k: profile_gateway(args, routes[k], scripts[k], load_cpu, workdir, k)
                    for k in keys if args.profile and k.startswith("gateway")}
    return {k: _http_result(routes[k], runs[k], proxy_s[k], origin_s[k], profiles.get(k))
            for k in keys}


def _http_result(route: Route, runs: list[WrkRun], proxy_s: float, origin_s: float,
                 profile: dict | None) -> dict:
    requests = sum(r.requests for r in runs)
    seconds = sum(r.seconds for r in runs)
    errors: collections.Counter[str] = collections.Counter()
    for r in runs:
        errors.update(r.socket_errors)
    return {"name": route.name, "rps": median([r.rps for r in runs]),
            "runs": [r.rps for r in runs], "p50": median([r.p50_ms for r in runs]),
            "p99": median([r.p99_ms for r in runs]),
            "cpu_us": proxy_s / requests * 1e6 if route.pids and requests else None,
            "cpu_pct": 100 * proxy_s / seconds if route.pids and seconds else None,
            "origin_pct": 100 * origin_s / seconds if seconds else None,
            "non2xx": sum(r.non2xx for r in runs),
            "errors": {k: v for k, v in errors.items() if v}, "profile": profile}


def http_rows(results: dict[str, dict], pin: tuple[int, int] | None,
              group: str = "http") -> list[Row]:
    hap = results.get("haproxy", {}).get("rps")
    tiny = results.get("tinyproxy", {}).get("rps")
    rows = []
    for key, r in results.items():
        notes = ["runs " + "/".join(f"{v:,.0f}" for v in r["runs"])]
        if r["cpu_pct"] is not None:
            notes.append(f"proxy {r['cpu_pct']:.0f} % of a core")
        if r["origin_pct"] is not None:
            notes.append(f"origin {r['origin_pct']:.0f} %")
        if r["non2xx"]:
            notes.append(f"{r['non2xx']} non-2xx")
        if r["errors"]:
            what = ", ".join(f"{v} {k}" for k, v in r["errors"].items())
            notes.append(f"socket errors: {what}"
                         + (" (closes every connection: no client keep-alive)"
                            if key == "tinyproxy" and set(r["errors"]) == {"read"} else ""))
        target = ""
        if key == "gateway" and group == "http":  # the target is for keep-alive clients
            ok = hap and r["rps"] >= HTTP_TARGET * hap
            target = f">= {HTTP_TARGET:g}x haproxy: {'PASS' if ok else 'FAIL'}"
        rows.append(Row(
            group, r["name"], f"{r['rps']:,.0f} req/s",
            f"{r['p50']:.2f} / {r['p99']:.2f} ms",
            ratio(r["rps"], hap) if key not in ("direct",) else "-",
            ratio(r["rps"], tiny) if key not in ("direct",) else "-",
            f"{r['cpu_us']:.0f} us/req" if r["cpu_us"] is not None else "-",
            "; ".join(notes), target))
    return rows


def profile_gateway(args: argparse.Namespace, route: Route, script: Path | None,
                    load_cpu: int | None, workdir: Path, key: str) -> dict | None:
    """py-spy the gateway under the same wrk load (a separate, unmeasured run)."""
    if not shutil.which("py-spy"):
        say("  --profile: py-spy not found (pip install py-spy)")
        return None
    out = workdir / f"py-spy-{key}.txt"
    seconds = max(args.seconds, 5.0)
    wrk = subprocess.Popen(pinned(load_cpu, [
        "wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds + 2:g}s",
        *(["-s", str(script)] if script else []), f"http://{LOOPBACK}:{route.port}/"]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        subprocess.run(["py-spy", "record", "--pid", str(route.pids[0]), "--duration",
                        f"{seconds:g}", "--rate", "250", "--format", "raw", "-o", str(out)],
                       capture_output=True, timeout=seconds + 60, check=True)
    except (subprocess.SubprocessError, OSError) as exc:
        say(f"  --profile: py-spy failed: {exc}")
        return None
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            wrk.wait(seconds + 30)
        if wrk.poll() is None:
            wrk.kill()
    return aggregate_profile(out)


def aggregate_profile(path: Path) -> dict:
    """Raw py-spy stacks -> share of samples per function (inclusive and self)."""
    incl: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        own[frames[-1]] += n
        for name in set(frames):
            incl[name] += n
    top_incl = [(f, c / total) for f, c in incl.most_common(60)
                if c / total < 0.98 and ("kakehashi/" in f or "asyncio" in f or "json" in f
                                          or "logging" in f or "ipaddress" in f)][:25]
    return {"samples": total, "file": str(path),
            "inclusive": top_incl,
            "self": [(f, c / total) for f, c in own.most_common(15)]}


def print_profile(key: str, prof: dict) -> None:
    say(f"\n### py-spy, {key} under wrk load ({prof['samples']} samples; raw: {prof['file']})")
    say("inclusive (project, asyncio, logging, json, ipaddress frames):")
    for name, share in prof["inclusive"]:
        say(f"  {share * 100:5.1f} %  {name}")
    say("self:")
    for name, share in prof["self"]:
        say(f"  {share * 100:5.1f} %  {name}")


# == connect: bulk throughput =========================================================
@dataclass
class Transfer:
    bytes: int
    seconds: float

    @property
    def mbps(self) -> float:
        return self.bytes / self.seconds / 1e6


def iperf_once(procs: Procs, port: int, sink: int, seconds: float) -> Transfer:
    server = procs.spawn("iperf3-server", ["iperf3", "-s", "-1", "-B", LOOPBACK, "-p", str(sink)])
    try:
        wait_listening(sink, proc=server)
        res = subprocess.run(
            ["iperf3", "-c", LOOPBACK, "-p", str(port), "-t", f"{seconds:g}", "-J",
             "--connect-timeout", "5000"],
            capture_output=True, text=True, timeout=seconds + 30)
        data = json.loads(res.stdout or "{}")
        if "error" in data or res.returncode != 0:
            raise RuntimeError(f"iperf3: {data.get('error') or res.stderr.strip()}")
        got = data["end"]["sum_received"]
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.popen.wait(5)
        return Transfer(int(got["bytes"]), float(got["seconds"]))
    finally:
        procs.stop(server)


def blast_once(procs: Procs, port: int, sink: int, nbytes: int,
               connect_to: str | None, *, ctx: ssl.SSLContext | None = None,
               cipher: list[str] | None = None) -> Transfer:
    """Send ``nbytes`` (after a CONNECT if ``connect_to``) to the counting sink; over
    TLS with ``ctx`` (the negotiated cipher is appended to ``cipher``)."""
    server = procs.spawn("sink", [sys.executable, SERVERS, "sink", str(sink),
                                  "--max-seconds", "600"])
    try:
        wait_listening(sink, proc=server)
        block = os.urandom(1 << 20)
        with contextlib.ExitStack() as stack:
            sock = stack.enter_context(socket.create_connection((LOOPBACK, port), timeout=120))
            if ctx is not None:
                sock = stack.enter_context(ctx.wrap_socket(sock, server_hostname="localhost"))
                if cipher is not None:
                    cipher.append(f"{sock.version()} {sock.cipher()[0]}")
            if connect_to:
                sock.sendall(f"CONNECT {connect_to} HTTP/1.1\r\nHost: {connect_to}\r\n\r\n"
                             .encode())
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise RuntimeError(f"CONNECT: the proxy closed: {head!r}")
                    head += chunk
                if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
                    raise RuntimeError(f"CONNECT refused: {head[:200]!r}")
                if head.index(b"\r\n\r\n") + 4 != len(head):
                    raise RuntimeError("bytes after the CONNECT answer")
            started = time.perf_counter()
            left = nbytes
            view = memoryview(block)
            while left:
                n = min(left, len(block))
                sock.sendall(view[:n])
                left -= n
            # (the TCP half-close itself: SSLSocket.shutdown would drop the TLS state
            # needed to read the reply)
            socket.socket.shutdown(sock, socket.SHUT_WR)
            reply = b""
            while len(reply) < 8 and (chunk := sock.recv(8 - len(reply))):
                reply += chunk
            elapsed = time.perf_counter() - started
        if len(reply) != 8:
            raise RuntimeError("the sink did not report its byte count (half-close lost?)")
        got = int.from_bytes(reply, "big")
        if got != nbytes:
            raise RuntimeError(f"the sink counted {got} of {nbytes} bytes")
        return Transfer(got, elapsed)
    finally:
        procs.stop(server)


HAPROXY_SSL_CFG = """\
global
    maxconn 4096
    nbthread 1
    tune.ssl.default-dh-param 2048
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend bench
    bind {loopback}:{port} ssl crt {pem}
    default_backend target
backend target
    server t1 {loopback}:{target}{server_opts}
"""


def tls_client() -> ssl.SSLContext:
    """The one client context of the connect-tls rows (certificates not checked: the
    rows compare forwarders, every one with the same development certificate)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def start_tls_route(key: str, procs: Procs, gw: Gateway, target: int,
                    workdir: Path) -> tuple[Route, str | None]:
    """A connect-tls row's forwarder(s) to ``target``; for the gateway, the CONNECT
    target to send inside TLS."""
    from kakehashi.core import tls

    cert, key_path = tls.DevCA(workdir / "ca").issue([LOOPBACK, "localhost"])
    if key in ("haproxy-ssl", "haproxy-ssl2", "haproxy-ssl2tls"):
        pids = []
        pem = workdir / "haproxy.pem"
        pem.write_bytes(cert.read_bytes() + key_path.read_bytes())
        opts = ""
        if key == "haproxy-ssl2":
            plain = fw.start_haproxy(procs, target)
            target, pids = plain.port, plain.pids
        elif key == "haproxy-ssl2tls":
            # what the on-demand edge does with link TLS: the first terminates the
            # client's TLS and encrypts again to the second, which terminates that
            # link's TLS and forwards plaintext (two TLS operations in the first)
            target, inner = start_configured(procs, key + "-inner", HAPROXY_SSL_CFG,
                                             HAPROXY_ARGV, None, pem=pem, target=target,
                                             server_opts="")
            pids, opts = [inner], " ssl verify none"
        port, pid = start_configured(procs, key, HAPROXY_SSL_CFG, HAPROXY_ARGV, None,
                                     pem=pem, target=target, server_opts=opts)
        name = "haproxy mode tcp, ssl crt" + {
            "haproxy-ssl2": " -> haproxy mode tcp",
            "haproxy-ssl2tls": " -> ssl -> haproxy ssl crt (TLS on the link too)",
        }.get(key, "")
        return Route(name, port, [pid, *pids]), None
    slow = {"KAKEHASHI_FAST_PATH": "off"} if key in SLOW_TLS_ROWS else None
    bio = " (FAST_PATH=off: memory BIOs)" if slow else ""
    if key in OLD_ROWS:  # every process of the row (manager, inner, edge) from that tree
        slow, bio = {"PYTHONPATH": gw.old_src}, " from --old-src"
    if key.startswith("gateway-tls"):
        route = gw.serve(procs, env=slow, extra=("--tls", "on", "--cert", str(cert),
                                                 "--key", str(key_path)))
        return Route("kakehashi gateway CONNECT, --tls on listener" + bio, route.port,
                     route.pids), f"{LOOPBACK}:{target}"
    from ondemand_bench import IMSI, System  # the manager, inner relay and edge

    plain_link = key == "ondemand-tls-plainlink"
    sub = workdir / key
    sub.mkdir(exist_ok=True)
    base = {"ondemand-tls-plainlink": 46000, "ondemand-tls": 46100,
            "ondemand-tls-old": 46300}.get(key, 46200)
    system = System(procs, sub, (base, base + 99), link_tls=not plain_link, env=slow)
    grant = system.api().request("POST", "/v1/grants", {
        "targets": [{"imsi": IMSI, "port": target}], "ttl": 3600,
        "tls": True})["grants"][0]
    wait_listening(int(grant["port"]))
    name = "on-demand edge, tls grant -> inner" + (" (--link-tls off)" if plain_link
                                                   else " (link TLS)") + bio
    return Route(name, int(grant["port"]), [system.edge.pid, system.inner.pid]), None


def measure_connect_tls(keys: list[str], args: argparse.Namespace, gw: Gateway,
                        workdir: Path) -> dict:
    """Every row started once, then --repeat rounds of one transfer per row."""
    sink = free_port()
    ctx = tls_client()
    with Procs(workdir) as procs:
        routes = {k: start_tls_route(k, procs, gw, sink, workdir) for k in keys}
        runs: dict[str, list[Transfer]] = {k: [] for k in keys}
        cpu = dict.fromkeys(keys, 0.0)
        cipher: dict[str, list[str]] = {}
        failed: dict[str, list[str]] = {}
        for i in range(args.repeat):
            for k in keys:
                route, connect_to = routes[k]
                before = tree_cpu_seconds(route.pids)
                try:
                    run = blast_once(procs, route.port, sink, args.bytes, connect_to,
                                     ctx=ctx, cipher=cipher.setdefault(k, []))
                except (RuntimeError, OSError) as exc:  # a row's failure is its result
                    failed.setdefault(k, []).append(f"round {i + 1}: {exc}")
                    say(f"  {route.name} round {i + 1}/{args.repeat}: FAILED: {exc}")
                    continue
                time.sleep(0.2)
                cpu[k] += tree_cpu_seconds(route.pids) - before
                runs[k].append(run)
                say(f"  {route.name} round {i + 1}/{args.repeat}: {run.mbps:,.0f} MB/s "
                    f"(load {os.getloadavg()[0]:.1f})")
    out = {}
    for k in keys:
        moved = sum(r.bytes for r in runs[k])
        route = routes[k][0]
        out[k] = {"name": route.name,
                  "mbps": median([r.mbps for r in runs[k]]) if runs[k] else 0.0,
                  "runs": [r.mbps for r in runs[k]],
                  "cpu_per_gb": cpu[k] / (moved / 1e9) if moved else None,
                  "procs": len(route.pids), "cipher": (cipher.get(k) or ["?"])[0],
                  "failed": failed.get(k, [])}
    return out


def connect_tls_rows(results: dict[str, dict]) -> list[Row]:
    rows = []
    for key, r in results.items():
        # the peer doing the same: the edge with link TLS against haproxy encrypting
        # its link too, the others against TLS terminated once
        peer_key = ("haproxy-ssl2tls" if key in ("ondemand-tls", "ondemand-tls-old",
                                                 "ondemand-tls-bio")
                    and "haproxy-ssl2tls" in results
                    else "haproxy-ssl2" if key.startswith("ondemand") else "haproxy-ssl")
        peer = results.get(peer_key, {}).get("mbps")
        target = ""
        if key in ("gateway-tls", "ondemand-tls"):
            ok = peer and r["mbps"] >= CONNECT_TARGET * peer
            target = f">= {peer_key}: {'PASS' if ok else 'FAIL'}"
        cpu = (f"{r['cpu_per_gb']:.2f} s/GB ({r['procs']} proc)"
               if r["cpu_per_gb"] is not None else "-")
        rows.append(Row("connect (TLS)", r["name"], f"{r['mbps']:,.0f} MB/s", "-",
                        ratio(r["mbps"], peer), "-", cpu,
                        f"{r['cipher']}; runs " + "/".join(f"{v:,.0f}" for v in r["runs"])
                        + "".join(f"; FAILED {f}" for f in r["failed"]),
                        target))
    return rows


def start_connect_route(group: str, key: str, procs: Procs, gw: Gateway,
                        target: int) -> tuple[Route, str | None]:
    """The route and, for the Python sender, the CONNECT target to send first."""
    if key == "direct":
        return Route("direct", target), None
    if key == "haproxy":
        r = fw.start_haproxy(procs, target)
        return Route("haproxy mode tcp", r.port, r.pids), None
    if key == "haproxy2":
        r = fw.start_haproxy_chain(procs, target, hops=2)
        return Route("haproxy mode tcp x2 (chained)", r.port, r.pids), None
    env = {"KAKEHASHI_NO_SPLICE": "1"} if key == "gateway-nosplice" else None
    gateway = gw.serve(procs, env=env)
    if group == "connect":  # iperf3 needs a plain port: the tunnel client does the CONNECT
        tunnel = gw.tunnel(procs, gateway.port, target)
        return Route("gateway tunnel --listen -> gateway serve (CONNECT)", tunnel.port,
                     [tunnel.pids[0], gateway.pids[0]]), None
    name = "kakehashi gateway CONNECT" + (" (no splice)" if env else " (splice)")
    return Route(name, gateway.port, gateway.pids), f"{LOOPBACK}:{target}"


def measure_connect(group: str, key: str, args: argparse.Namespace, gw: Gateway,
                    workdir: Path) -> dict:
    sink = free_port()
    with Procs(workdir) as procs:
        route, connect_to = start_connect_route(group, key, procs, gw, sink)
        runs: list[Transfer] = []
        cpu = 0.0
        for i in range(args.repeat):
            before = tree_cpu_seconds(route.pids)
            if group == "connect":
                run = iperf_once(procs, route.port, sink, args.iperf_seconds)
            else:
                run = blast_once(procs, route.port, sink, args.bytes, connect_to)
            time.sleep(0.2)
            cpu += tree_cpu_seconds(route.pids) - before
            runs.append(run)
            say(f"  {route.name} run {i + 1}/{args.repeat}: {run.mbps:,.0f} MB/s")
    moved = sum(r.bytes for r in runs)
    return {"name": route.name, "mbps": median([r.mbps for r in runs]),
            "runs": [r.mbps for r in runs],
            "cpu_per_gb": cpu / (moved / 1e9) if route.pids and moved else None,
            "procs": len(route.pids)}


def connect_rows(group: str, results: dict[str, dict]) -> list[Row]:
    hap = results.get("haproxy", {}).get("mbps")
    direct = results.get("direct", {}).get("mbps")
    rows = []
    label = "connect (iperf3)" if group == "connect" else "connect (python)"
    for key, r in results.items():
        target = ""
        if key == "gateway":
            ok = hap and r["mbps"] >= CONNECT_TARGET * hap
            target = f">= {CONNECT_TARGET:g}x haproxy tcp: {'PASS' if ok else 'FAIL'}"
        cpu = (f"{r['cpu_per_gb']:.2f} s/GB ({r['procs']} proc)"
               if r["cpu_per_gb"] is not None else "-")
        rows.append(Row(label, r["name"], f"{r['mbps']:,.0f} MB/s", "-",
                        ratio(r["mbps"], hap), ratio(r["mbps"], direct), cpu,
                        "runs " + "/".join(f"{v:,.0f}" for v in r["runs"]), target))
    return rows


# == main =============================================================================
def selected(only: list[str] | None) -> dict[str, list[str]]:
    """Rows to run per group; the group's baselines always come along."""
    return select_rows(GROUPS, only, BASELINES)


def check_tools(rows: dict[str, list[str]]) -> None:
    need = {"haproxy"}
    if "http" in rows or "http-close" in rows:
        need |= {"wrk", "tinyproxy"}
    if "connect" in rows:
        need.add("iperf3")
    missing = sorted(t for t in need if not shutil.which(t))
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run bash scripts/install-deps.sh")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="short run: 1 x 3 s wrk, 1 x 2 s iperf3, 256 MiB python transfers")
    ap.add_argument("--only", help="comma-separated: http, connect, connect-py, GROUP:ROW, ROW")
    ap.add_argument("--list", action="store_true", help="print the benchmark names and exit")
    ap.add_argument("--seconds", type=float, help="seconds per wrk run (default 10; quick 3)")
    ap.add_argument("--iperf-seconds", type=float,
                    help="seconds per iperf3 run (default 5; quick 2)")
    ap.add_argument("--bytes", type=int, help="bytes per python transfer (default 1 GiB; "
                                              "quick 256 MiB)")
    ap.add_argument("--repeat", type=int, help="runs per row (default 3; quick 1)")
    ap.add_argument("--connections", type=int, default=50, help="wrk -c")
    ap.add_argument("--threads", type=int, default=2, help="wrk -t")
    ap.add_argument("--no-pin", action="store_true",
                    help="http: do not pin the proxy to CPU 1 and wrk + origin to CPU 0")
    ap.add_argument("--profile", action="store_true",
                    help="http: py-spy the gateway rows under load and print where time goes")
    ap.add_argument("--keep-workdir", action="store_true", help="keep logs and configs")
    ap.add_argument("--old-src", default="",
                    help="another source tree's src directory (e.g. git archive main | tar -x "
                         "-C /tmp/old): adds the rows gateway-old (http) and ondemand-tls-old "
                         "(connect-tls), a before/after in one run")
    args = ap.parse_args()
    quick = args.quick
    defaults = {"seconds": 3.0 if quick else 10.0, "iperf_seconds": 2.0 if quick else 5.0,
                "bytes": (256 if quick else 1024) << 20, "repeat": 1 if quick else 3}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> int:
    args = parse_args()
    if args.list:
        for group, rows in GROUPS.items():
            print(f"{group + ':':12}", ", ".join(rows))
        return 0
    rows = selected(args.only.split(",") if args.only else None)
    if not args.old_src:  # the -old rows only when asked for, with a tree to run
        if args.only and any(name.rpartition(":")[2] in OLD_ROWS
                             for name in args.only.split(",")):
            raise SystemExit("the -old rows need --old-src DIR (a source tree's src)")
        rows = {g: [r for r in keys if r not in OLD_ROWS] for g, keys in rows.items()}
    check_tools(rows)
    install_signal_exit()
    pin = None if args.no_pin or (os.cpu_count() or 1) < 2 or not shutil.which("taskset") \
        else (0, 1)
    workdir = Path(tempfile.mkdtemp(prefix="kakehashi-gwbench-"))
    started = time.monotonic()
    load0 = os.getloadavg()[0]
    version = source_version()
    out: list[Row] = []
    profiles: dict[str, dict] = {}
    try:
        gw = Gateway(workdir)
        gw.old_src = str(Path(args.old_src).resolve()) if args.old_src else ""
        for group in ("http", "http-close"):
            if not rows.get(group):
                continue
            say(f"== {group}: wrk -t{args.threads} -c{args.connections} -d{args.seconds:g}s "
                f"x {args.repeat}, 100-byte responses"
                + ("; one request per connection" if group == "http-close" else "")
                + (f"; proxy on CPU {pin[1]}, wrk + origin on CPU {pin[0]}" if pin else ""))
            close = group == "http-close"
            with Procs(workdir) as procs:
                origin = start_origin(procs, pin[0] if pin else None)
                script = workdir / f"{group}.lua"
                text = WRK_SCRIPT.format(loopback=LOOPBACK, origin=origin.port)
                if close:
                    text = text.replace('"Proxy-Connection"] = "Keep-Alive"',
                                        '"Proxy-Connection"] = "close"') + WRK_CLOSE
                script.write_text(text)
                direct = None
                if close:
                    direct = workdir / "direct-close.lua"
                    direct.write_text(WRK_CLOSE)
                res = measure_http(rows[group], args, gw, workdir, origin, script, pin,
                                   direct_script=direct)
            profiles.update({f"{group}:{k}": r["profile"] for k, r in res.items()
                             if r.get("profile")})
            group_rows = http_rows(res, pin, group)
            out += group_rows
            print(table(HEADERS, [r.cells() for r in group_rows]), flush=True)
        for group in ("connect", "connect-py"):
            if not rows.get(group):
                continue
            what = (f"iperf3 -t {args.iperf_seconds:g}" if group == "connect"
                    else f"python sender, {args.bytes / 2**20:,.0f} MiB")
            say(f"== {group}: one stream, {what} x {args.repeat}")
            res = {k: measure_connect(group, k, args, gw, workdir) for k in rows[group]}
            out += connect_rows(group, res)
            print(table(HEADERS, [r.cells() for r in connect_rows(group, res)]), flush=True)
        if rows.get("connect-tls"):
            say(f"== connect-tls: one TLS stream, python sender, {args.bytes / 2**20:,.0f} "
                f"MiB x {args.repeat} interleaved rounds")
            res = measure_connect_tls(rows["connect-tls"], args, gw, workdir)
            tls_rows = connect_tls_rows(res)
            out += tls_rows
            print(table(HEADERS, [r.cells() for r in tls_rows]), flush=True)
    except KeyboardInterrupt:
        say("interrupted; processes stopped")
        return 130
    finally:
        if args.keep_workdir or profiles:
            say(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    for key, prof in profiles.items():
        print_profile(key, prof)
    minutes = (time.monotonic() - started) / 60
    load1 = os.getloadavg()[0]
    end_version = source_version()
    if end_version != version:  # src/ changed under the run: say so, rows may differ
        version = f"{version} at the start, {end_version} at the end"
    print(f"\n## kakehashi gateway benchmark ({time.strftime('%Y-%m-%d')}, {machine()}; "
          f"{'quick' if args.quick else 'full'} run, {minutes:.1f} min; kakehashi src {version}; "
          f"load average {load0:.2f} before, {load1:.2f} after)\n")
    print(table(HEADERS, [r.cells() for r in out]))
    print(f"\nhttp: wrk -t{args.threads} -c{args.connections}, {args.seconds:g} s x {args.repeat}"
          f", absolute-form GET, 100-byte body from a haproxy origin"
          + (", proxy pinned to its own CPU" if pin else "")
          + "; Proxy CPU = proxy CPU time per request. connect: MB = 10^6 bytes; "
            "Proxy CPU = forwarding processes' CPU per GB.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

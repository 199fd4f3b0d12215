#!/usr/bin/env python3
"""One relay session setup, step by step, across the four processes.

Starts a relay, an agent and ``relay connect`` (as ``relay_bench.py``'s setup rows do)
with ``KAKEHASHI_TRACE_SETUP`` set, an echo service that records its own events, and
times sessions from this process (connect, one byte, its echo). Every process writes
``<CLOCK_MONOTONIC ns> <pid> <event>`` to one file; the lines between this process's
``client connect`` and ``client echo read`` are one setup. Prints the median time from
each step to the next (microseconds) for each mode.

    python bench/setup_trace.py --sessions 50 --gap 0.05 --modes relay-tls,relay-tls-reencrypt,relay
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import forwarders as fw  # noqa: E402
from benchlib import LOOPBACK, Procs, cpu_seconds, free_port, wait_listening  # noqa: E402

from kakehashi.core import trace  # noqa: E402

#: a one-byte echo service that records when it accepted, read and wrote
ECHO = """
import os, socket, sys, time
port, path = int(sys.argv[1]), sys.argv[2]
fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
def ev(what):
    os.write(fd, f"{time.monotonic_ns()} {os.getpid()} {what}\\n".encode())
srv = socket.create_server(("127.0.0.1", port))
while True:
    c, _ = srv.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ev("accepted")
    d = c.recv(1)
    ev("read")
    c.sendall(d)
    ev("wrote")
    c.close()
"""

MODES = {
    "relay-tls": (True, {}),
    "relay-tls-reencrypt": (True, {"KAKEHASHI_SESSION_CIPHER": "tls"}),
    # the default without TLS session resumption (every link a full handshake)
    "relay-tls-noresume": (True, {"KAKEHASHI_TLS_RESUME": "off"}),
    "relay": (False, {}),
    # relay serve --plaintext-requesters refuse: early data on plaintext links
    "relay-refuse": (False, {}),
}


def sessions(port: int, count: int, gap: float, warmup: int) -> None:
    for i in range(warmup + count):
        if i == warmup:
            trace.event("measure")
        trace.event("connect")
        with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            trace.event("connected")
            sock.sendall(b"x")
            trace.event("wrote byte")
            if sock.recv(1) != b"x":
                raise RuntimeError("no echo")
            trace.event("echo read")
        time.sleep(gap)


def setups_of(path: Path, names: dict[int, str]) -> list[dict[str, int]]:
    """Cut the trace into setups: for each, the time of every step (ns since the
    client's connect), the first occurrence of each name; the relay's links are named
    by their role (the requester's link carried the ConnectRequest, the agent's the
    Accept)."""
    lines = []
    for line in path.read_text().splitlines():
        ns, pid, what = line.split(" ", 2)
        lines.append((int(ns), names.get(int(pid), pid), what))
    lines.sort()
    measuring = False
    out: list[dict[str, int]] = []
    cur: list[tuple[int, str, str]] | None = None
    raw: list[list[tuple[int, str, str]]] = []
    for ns, who, what in lines:
        if who == "client" and what == "measure":
            measuring = True
        if not measuring:
            continue
        if who == "client" and what == "connect":
            cur = []
            raw.append(cur)
        if cur is not None:
            cur.append((ns, who, what))
        if who == "client" and what == "echo read":
            cur = None
    for events in raw:
        roles = {}
        for _, who, what in events:
            if who == "relay" and what.startswith("link ") and not what.startswith("link plain"):
                _, cid, msg = what.split(" ", 2)
                if msg == "ConnectRequest":
                    roles[cid] = "requester"
                elif msg == "Accept":
                    roles[cid] = "agent"
        steps: dict[str, int] = {}
        t0 = events[0][0]
        for ns, who, what in events:
            if who == "relay" and what.startswith("link "):
                if not what.startswith("link plain"):
                    continue
                what = f"{roles.get(what.rsplit(' ', 1)[1], '?')} link plain"
            key = f"{who}: {what}"
            k = 2
            while key in steps:
                key = f"{who}: {what} #{k}"
                k += 1
            steps[key] = ns - t0
        out.append(steps)
    return out


#: (label, from step, to step): the hops of one setup
HOPS = [
    ("client connect -> relay connect accepts", "client: connect", "connect: local accepted"),
    ("connect: accept -> request written (Python)", "connect: local accepted",
     "connect: enc ConnectRequest"),
    ("request: connect -> relay (transit + wake-up)", "connect: enc ConnectRequest",
     "relay: dec ConnectRequest"),
    ("relay: request -> notification (Python)", "relay: dec ConnectRequest", "relay: enc Notify"),
    ("notification: relay -> agent (transit + wake-up)", "relay: enc Notify", "agent: dec Notify"),
    ("agent: connect to the service (loopback)", "agent: dec Notify", "agent: service connected"),
    # optimistic pairing: the accept (and, under the session cipher, the agent's
    # close_notify) before the service connect, the early data written after it
    ("agent: notification -> accept written (Python)", "agent: dec Notify",
     "agent: enc Accept"),
    ("agent: accept -> its close_notify out", "agent: enc Accept", "agent: close_notify sent"),
    ("agent: accept -> service connected", "agent: enc Accept", "agent: service connected"),
    ("agent: service connected -> early data written", "agent: service connected",
     "agent: early data written"),
    ("agent: connected -> accept written (Python)", "agent: service connected",
     "agent: enc Accept"),
    ("accept: agent -> relay (transit + wake-up)", "agent: enc Accept", "relay: dec Accept"),
    ("relay: accept -> result (Python)", "relay: dec Accept", "relay: enc Result"),
    ("relay: result -> first close_notify out", "relay: enc Result", "relay: close_notify sent"),
    ("relay: first -> second close_notify out", "relay: close_notify sent",
     "relay: close_notify sent #2"),
    ("result: relay -> connect (transit + wake-up)", "relay: enc Result", "connect: dec Result"),
    ("connect: result -> relay's close_notify read", "connect: dec Result",
     "connect: close_notify read"),
    ("connect: its close_notify out", "connect: close_notify read", "connect: close_notify sent"),
    ("connect close_notify -> relay switched requester link", "connect: close_notify sent",
     "relay: requester link plain"),
    ("relay close_notify #2 -> agent read it", "relay: close_notify sent #2",
     "agent: close_notify read"),
    ("agent: its close_notify out", "agent: close_notify read", "agent: close_notify sent"),
    ("agent close_notify -> relay switched agent link", "agent: close_notify sent",
     "relay: agent link plain"),
    ("agent: first byte written to the service", "client: connect", "agent: app written"),
    ("first byte: agent -> echo read", "agent: app written", "echo: read"),
    ("echo: read -> wrote", "echo: read", "echo: wrote"),
    ("reply: echo -> agent read", "echo: wrote", "agent: app read"),
    ("reply: agent read -> relay frame in (transit + wake-up)", "agent: app read",
     "relay: frame in #2"),
    ("reply: agent read -> connect wrote to client", "agent: app read", "connect: app written"),
    ("reply: connect wrote -> client read", "connect: app written", "client: echo read"),
    ("total: client connect -> echo read", "client: connect", "client: echo read"),
]


def report(mode: str, setups: list[dict[str, int]]) -> None:
    print(f"== {mode}: {len(setups)} setups")
    print("  median offset from the client's connect (us), steps most setups took:")
    keys: dict[str, list[int]] = {}
    for s in setups:
        for k, v in s.items():
            keys.setdefault(k, []).append(v)
    rows = [(statistics.median(v), k, len(v)) for k, v in keys.items()
            if len(v) * 2 >= len(setups)]
    for med, k, n in sorted(rows):
        print(f"    {med / 1000:8.0f}  [{n:3d}]  {k}")
    print("  hops (median of the per-setup delta, us):")
    for label, a, b in HOPS:
        d = [s[b] - s[a] for s in setups if a in s and b in s]
        if len(d) * 2 >= len(setups):
            print(f"    {statistics.median(d) / 1000:8.0f}  [{len(d):3d}]  {label}")


def attach_strace(pids: dict[str, int], out: Path, mode: str) -> dict[str, tuple]:
    """``strace -c -f`` attached to each process; the summaries go to ``out``."""
    tracers = {}
    for name, pid in pids.items():
        path = out / f"strace-{mode}-{name}.txt"
        proc = subprocess.Popen(["strace", "-c", "-f", "-o", str(path), "-p", str(pid)],
                                stderr=subprocess.PIPE, text=True)
        for line in proc.stderr:  # "Process N attached" once per thread
            if "attached" in line:
                break
        tracers[name] = (proc, path)
    time.sleep(0.2)  # the other threads' attach lines
    return tracers


def report_strace(tracers: dict[str, tuple], count: int) -> None:
    """System calls per session of each traced process: all, and the top few by type
    (calls and errors), from strace's summary table."""
    for name, (proc, path) in tracers.items():
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
        rows = {}
        for line in path.read_text().splitlines():
            f = line.split()
            if len(f) >= 5 and f[0][0].isdigit() and not line.startswith("100.00"):
                errors = int(f[4]) if len(f) == 6 else 0
                rows[f[-1]] = (int(f[3]), errors)
        total = sum(c for c, _ in rows.values())
        top = sorted(rows.items(), key=lambda kv: -kv[1][0])[:6]
        print(f"  syscalls per session, {name}: {total / count:.1f} (" + ", ".join(
            f"{k} {c / count:.1f}" + (f" [{e / count:.1f} failed]" if e else "")
            for k, (c, e) in top) + ")")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--gap", type=float, default=0.05)
    ap.add_argument("--modes", default="relay-tls,relay-tls-reencrypt,relay")
    ap.add_argument("--keep", help="directory to keep the raw traces in")
    ap.add_argument("--strace", action="store_true",
                    help="attach strace -c -f to relay, agent and relay connect and print "
                         "their system calls per session (CPU figures are then not "
                         "meaningful)")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="kakehashi-trace-"))
    kk = fw.Kakehashi(workdir)
    for mode in args.modes.split(","):
        tls, env = MODES[mode]
        path = (Path(args.keep) if args.keep else workdir) / f"trace-{mode}.txt"
        path.unlink(missing_ok=True)
        with Procs(workdir) as procs:
            echo = free_port()
            server = procs.spawn("echo", [sys.executable, "-c", ECHO, str(echo), str(path)])
            wait_listening(echo, proc=server)
            route = kk.start_route(procs, echo, tls=tls,
                                   env={**env, "KAKEHASHI_TRACE_SETUP": str(path)},
                                   serve_extra=("--plaintext-requesters", "refuse")
                                   if mode == "relay-refuse" else ())
            relay_pid, agent_pid, connect_pid = route.pids
            names = {relay_pid: "relay", agent_pid: "agent", connect_pid: "connect",
                     server.pid: "echo", os.getpid(): "client"}
            trace.start(str(path))
            pids = {"relay": relay_pid, "agent": agent_pid, "connect": connect_pid,
                    "echo": server.pid}
            tracers = {}
            if args.strace:
                tracers = attach_strace({k: pids[k] for k in ("relay", "agent", "connect")},
                                        path.parent, mode)
            cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
            sessions(route.port, args.sessions, args.gap, warmup=10)
            cpu = {name: (cpu_seconds(pid) - cpu0[name]) / (args.sessions + 10) * 1e6
                   for name, pid in pids.items()}
            trace.stop()
            report_strace(tracers, args.sessions + 10)
        report(mode, setups_of(path, names))
        # what the four processes spend per setup: on 2 cores, work done "in parallel"
        # by optimistic pairing still competes with the critical path for a core
        print("  CPU per setup (us, tracing on): " + ", ".join(
            f"{name} {us:.0f}" for name, us in cpu.items()) + f", total {sum(cpu.values()):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

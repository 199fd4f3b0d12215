"""Load generator: N logged-in, idle relay agents in one process (uvloop).

    BENCH_AGENT_PASSWORD=... python bench/idle_agents.py --server 127.0.0.1:PORT --count 10000

Each agent is one :class:`kakehashi.relay.agent.RelayLink` logged in as its own user
(``a0`` .. ``a{N-1}``, registered beforehand by relay_bench.py). Logins run at most
``--concurrency`` at a time. Once they are done the links only send their
connection-hold (keepalive) every interval the relay announced, as a real idle
agent does. Progress is printed as JSON lines on stdout:

    {"event": "online", "online": N, "failed": 0, "seconds": 12.3}
    {"event": "status", "alive": N, ...}            every 10 s

The process ends on SIGTERM/SIGINT or after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time

from benchlib import raise_nofile

from kakehashi.core import tls
from kakehashi.relay.agent import RelayError, RelayLink, TerminalConfig


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def login(cfg: TerminalConfig, gate: asyncio.Semaphore, attempts: int = 3) -> RelayLink:
    for attempt in range(1, attempts + 1):
        link = RelayLink(cfg)
        try:
            async with gate:
                await link.open()
            return link
        except (OSError, TimeoutError, RelayError) as exc:
            link.close()
            if attempt == attempts:
                raise
            if isinstance(exc, RelayError) and exc.code == "login-failed":
                raise
            await asyncio.sleep(0.2 * attempt)
    raise AssertionError("unreachable")


async def run(args: argparse.Namespace, password: str) -> int:
    host, _, port = args.server.rpartition(":")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gate = asyncio.Semaphore(args.concurrency)
    started = time.monotonic()
    ctx = tls.client_context(args.tls_ca) if args.tls_ca else None

    async def one(i: int) -> RelayLink:
        cfg = TerminalConfig(server=host, port=int(port), user=f"{args.prefix}{i}",
                             password=password, tls=ctx, starttls=None)
        return await login(cfg, gate)

    results = await asyncio.gather(*(one(i) for i in range(args.count)),
                                   return_exceptions=True)
    links = [r for r in results if isinstance(r, RelayLink)]
    errors = [r for r in results if not isinstance(r, RelayLink)]
    elapsed = time.monotonic() - started
    emit("online", online=len(links), failed=len(errors), seconds=round(elapsed, 2),
         logins_per_s=round(len(links) / elapsed, 1) if elapsed else None,
         first_error=repr(errors[0]) if errors else None)

    deadline = started + args.max_seconds
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            await asyncio.wait_for(stop.wait(), min(10.0, max(0.1, deadline - time.monotonic())))
        except TimeoutError:
            emit("status", alive=sum(not link.closed.is_set() for link in links),
                 seconds=round(time.monotonic() - started, 1))
    alive = sum(not link.closed.is_set() for link in links)
    for link in links:
        link.close()
    await asyncio.sleep(0.1)
    emit("closed", alive_at_end=alive)
    return 0 if not errors else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", required=True, help="relay HOST:PORT")
    ap.add_argument("--tls-ca", help="connect with TLS, trusting this CA file (default: plaintext)")
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--prefix", default="a", help="user names are PREFIX0 .. PREFIX{N-1}")
    ap.add_argument("--concurrency", type=int, default=500, help="logins in flight at once")
    ap.add_argument("--max-seconds", type=float, default=900.0)
    args = ap.parse_args()
    password = os.environ.get("BENCH_AGENT_PASSWORD")
    if not password:
        print("set BENCH_AGENT_PASSWORD", file=sys.stderr)
        return 2
    raise_nofile(args.count + 1024)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    return runner(run(args, password))


if __name__ == "__main__":
    sys.exit(main())

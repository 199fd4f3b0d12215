"""The on-demand edge under a flood of connections to a public grant port: the burst
limit refuses them without asking anyone, the edge's audit and the manager's event
trail hear of them in aggregate (one event a second, with a count), the edge's
descriptors come back, and the grant goes on serving."""

from __future__ import annotations

import asyncio
import json
import os

from tests.e2e.framework import roundtrip, wait_until
from tests.e2e.ondemand_fixtures import IMSI, OnDemand


async def _flood(port: int, n: int) -> None:
    async def one() -> None:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return
        writer.transport.abort()

    await asyncio.gather(*(one() for _ in range(n)))


def _edge_events(od: OnDemand, grant: str) -> list[dict]:
    out = []
    for line in od.procs["edge-1"].output().splitlines():
        _, sep, text = line.partition("kakehashi.audit: ")
        if sep and f'"{grant}"' in text:
            out.append(json.loads(text))
    return out


def test_a_connection_flood_is_reported_in_aggregate(env, echo) -> None:
    od = OnDemand(env).start()
    g = od.grant(f"{IMSI}:{echo.port}", "--ttl", "600s")
    edge_pid = od.procs["edge-1"].popen.pid
    fds = len(os.listdir(f"/proc/{edge_pid}/fd"))
    n = 3000
    asyncio.run(_flood(g["port"], n))

    def decided() -> tuple[int, list[dict]] | None:
        events = _edge_events(od, g["id"])
        accessed = sum(1 for e in events if e["event"] == "access")
        refused = [e for e in events if e["event"] == "refused"]
        seen = accessed + sum(e.get("count", 1) for e in refused)
        return (accessed, refused) if seen == n else None

    accessed, refused = wait_until(decided, 60, what="every connection decided")
    assert accessed < n and all(e["reason"] == "burst" for e in refused)
    # old code: one audit line (and one manager event) per refused connection
    assert len(refused) < n // 10, len(refused)
    wait_until(lambda: len(os.listdir(f"/proc/{edge_pid}/fd")) <= fds, 30,
               what="the edge's descriptors come back")
    assert roundtrip(g["port"], b"still serving") == b"still serving"

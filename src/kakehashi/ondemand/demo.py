"""The on-demand system's part of ``kakehashi demo``: a grant, a session, a CIDR refusal and
the cut at expiry, on loopback, narrated with the spec's step numbers.

Everything runs in one process and one event loop (the manager's API on uvicorn, an edge,
an inner relay, a device), talking over real sockets exactly as the separate processes
of ``kakehashi ondemand ...`` do.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kakehashi.core import web
from kakehashi.core.apiclient import ApiClient, ApiClientError
from kakehashi.core.audit import AuditLog
from kakehashi.core.demoapps import sha_service
from kakehashi.core.store import open_store
from kakehashi.core.stream import Listener, open_tcp
from kakehashi.ondemand.edge import Edge, EdgeConfig
from kakehashi.ondemand.inner import Inner, InnerConfig
from kakehashi.ondemand.manager import Manager, ManagerSettings, build_app

Say = Callable[[str, str], None]
IMSI = "001010000000001"




async def _wait(pred: Callable[[], Any], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("the demo's relays did not come up")
        await asyncio.sleep(0.02)


async def run(say: Say, home: Path, nbytes: int = 1 << 20) -> bool:
    """Narrate the on-demand system; True when every step did what it should."""
    ok = True
    store = open_store(home / "ondemand.db")
    mgr = Manager(store, audit=AuditLog(home / "ondemand-audit.jsonl", system="ondemand"),
                  settings=ManagerSettings(), ca_home=home / "ondemand-relay-ca")
    tokens = {r: mgr.tokens.create(r)[1] for r in ("client", "edge", "inner")}
    sock = web.bind("127.0.0.1", 0)
    mport = sock.getsockname()[1]
    server = asyncio.create_task(web.serve(build_app(mgr), sock, name="ondemand manager"))
    url = f"http://127.0.0.1:{mport}"
    say("manager", f"connection management device: REST API on {url}/v1 "
                   f"(OpenAPI at {url}/openapi.json); tokens for a client, an edge, an inner")

    device = Listener("127.0.0.1", 0, sha_service)
    device.start()
    dport = device.address[1]
    inner = Inner(InnerConfig(server=url, token=tokens["inner"], name="core-1",
                              listen=("127.0.0.1", 0), devices={IMSI: "127.0.0.1"}))
    lo = 40000 + int.from_bytes(os.urandom(2), "big") % 20000
    edge = Edge(EdgeConfig(server=url, token=tokens["edge"], name="edge-1",
                           public_host="127.0.0.1", ports=(lo, lo + 99), bind="127.0.0.1"))
    tasks = [asyncio.create_task(inner.run()), asyncio.create_task(edge.run())]
    try:
        await _wait(lambda: inner.ready.is_set() and edge.link_ctx is not None)
        say("S24", f"inner relay [b]core-1[/] registered device IMSI {IMSI} (a SHA-256 service "
                   f"on 127.0.0.1:{dport}, inside the 'closed network'); edge [b]edge-1[/] "
                   f"registered ports {lo}-{lo + 99}; both hold certificates the manager issued")
        api = ApiClient(url, tokens["client"])

        async def call(method: str, path: str, body: Any = None) -> Any:
            return await asyncio.to_thread(api.request, method, path, body)

        target = [{"imsi": IMSI, "port": dport}]
        t0 = time.perf_counter()
        g = (await call("POST", "/v1/grants", {"targets": target, "ttl": "60s"}))["grants"][0]
        ms = (time.perf_counter() - t0) * 1000
        say("S11-S15", f"grant {g['id']}: {g['host']}:{g['port']} for {IMSI}:{dport}, 60 s; "
                       f"edge {g['edge']} chosen by [b]{g['policy']}[/] ({g['reason']}); the "
                       f"port was drawn with a CSPRNG and already accepts ({ms:.0f} ms)")

        conn = await open_tcp("127.0.0.1", g["port"])
        payload = os.urandom(nbytes)
        t0 = time.perf_counter()
        await conn.send_all(payload)
        await conn.shutdown_write()
        reply = b""
        while data := await conn.recv():
            reply += data
        conn.close()
        size, digest = reply.decode().split() if reply else ("0", "")
        match = digest == hashlib.sha256(payload).hexdigest() and int(size) == nbytes
        ok &= match
        say("S21-S30", f"{nbytes / 2**20:.0f} MiB client -> edge -> (mutual TLS) -> inner -> "
                       f"device in {time.perf_counter() - t0:.2f} s; the device's SHA-256 "
                       f"{'[green]matches[/]' if match else '[red]DIFFERS[/]'}")

        g2 = (await call("POST", "/v1/grants", {"targets": target, "ttl": "60s",
                                                "cidrs": ["203.0.113.0/24"]}))["grants"][0]
        conn = await open_tcp("127.0.0.1", g2["port"])
        await conn.send_all(b"should not pass")
        answer = b""
        with contextlib.suppress(OSError):
            while data := await asyncio.wait_for(conn.recv(), 5):
                answer += data
        conn.close()
        refused = b"refused (cidr)" in answer
        ok &= refused
        say("S26-S27", f"grant {g2['id']} allows only 203.0.113.0/24; our 127.0.0.1 is "
                       f"refused before the device is dialled: [yellow]"
                       f"{answer.decode(errors='replace').strip() or '(nothing)'}[/]")

        g3 = (await call("POST", "/v1/grants", {"targets": target, "ttl": "2s"}))["grants"][0]
        conn = await open_tcp("127.0.0.1", g3["port"])
        expires = time.time() + g3["expires_in"]
        with contextlib.suppress(OSError):
            while time.time() < expires + 5:
                await conn.send_all(b"x" * 1024)  # a stream that would go on and on
                try:
                    if await asyncio.wait_for(conn.recv(), 0.05) == b"":
                        break  # the edge ended it
                except TimeoutError:
                    continue
        cut = time.time()
        conn.close()
        evs = await _events(call, g3["id"], "closed")
        closed = next((e for e in evs if e["event"] == "closed"), {})
        late = cut - expires
        ok &= closed.get("reason") == "expired" and late < 1.5
        say("S26c", f"grant {g3['id']} lived 2 s: the live connection was cut "
                    f"{max(late, 0):.2f} s after expiry; audited as closed "
                    f"(reason {closed.get('reason')}, {closed.get('bytes_up', 0)} bytes up, "
                    f"{closed.get('duration', 0)} s)")
        evs = await call("GET", f"/v1/grants/{g['id']}/events")
        say("audit", f"grant {g['id']}: " + ", ".join(e["event"] for e in evs) +
                     "; every event is also a JSON line of the audit log")
    except (ApiClientError, OSError, TimeoutError, ValueError) as exc:
        say("ondemand", f"[red]failed: {exc}[/]")
        ok = False
    finally:
        for task in [*tasks, server]:
            task.cancel()
        await asyncio.gather(*tasks, server, return_exceptions=True)
        await device.close()
    return ok


async def _events(call: Callable[..., Any], gid: str, kind: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        evs = await call("GET", f"/v1/grants/{gid}/events")
        if any(e["event"] == kind for e in evs) or time.monotonic() > deadline:
            return evs
        await asyncio.sleep(0.1)

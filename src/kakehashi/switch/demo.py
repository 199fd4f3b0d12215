"""The switch's part of ``kakehashi demo``: a switch server, an ASP's gateway and a
user's gateway on loopback; S1 registration, S2 the catalog (and what mallory sees),
S3-S5 a tunnel, bytes through its pseudo socket, S6-S7 its deletion.

Everything runs in one process and one event loop over real sockets and real HTTP(S)
and WebSocket links, exactly as the separate ``kakehashi switch server`` and ``switch
gateway`` processes do.
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

from kakehashi.core import tls, web
from kakehashi.core.apiclient import ApiClient, ApiClientError
from kakehashi.core.audit import AuditLog
from kakehashi.core.demoapps import sha_service
from kakehashi.core.store import open_store
from kakehashi.core.stream import Listener, open_tcp
from kakehashi.switch.gateway import Gateway, GatewayConfig
from kakehashi.switch.server import SwitchServer, build_app

Say = Callable[[str, str], None]




async def run(say: Say, home: Path, nbytes: int, use_tls: bool) -> bool:
    store = open_store(home / "switch.db")
    srv = SwitchServer(store, audit=AuditLog(home / "switch-audit.jsonl", system="switch"),
                       kdf_n=2**12)
    for name, role in (("asp1", "asp"), ("alice", "user"), ("mallory", "user")):
        srv.add_user(name, role, f"{name}-password")
    say("setup", "users [b]asp1[/] (an ASP), [b]alice[/] and [b]mallory[/] (users)")
    app = Listener("127.0.0.1", 0, sha_service)
    app.start()
    certfile = keyfile = None
    if use_tls:
        c, k = tls.DevCA().issue(["127.0.0.1", "localhost"])
        certfile, keyfile = str(c), str(k)
    sock = web.bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    url = f"{'https' if use_tls else 'http'}://127.0.0.1:{port}"
    started = asyncio.Event()
    serving = asyncio.create_task(web.serve(build_app(srv), sock, certfile=certfile,
                                            keyfile=keyfile, name="switch server",
                                            ready=started.set))
    gws = [Gateway(GatewayConfig(server=url, user=u, password=f"{u}-password", name=n))
           for u, n in (("asp1", "gw-srv"), ("alice", "gw-alice"))]
    tasks = [asyncio.create_task(gw.run()) for gw in gws]

    def api(user: str) -> ApiClient:
        return ApiClient(url, basic=(user, f"{user}-password"), timeout=30)

    async def call(user: str, method: str, path: str, body: Any = None) -> Any:
        return await asyncio.to_thread(api(user).request, method, path, body)

    try:
        await asyncio.wait_for(started.wait(), 15)
        await asyncio.wait_for(asyncio.gather(*(gw.connected.wait() for gw in gws)), 15)
        say("server", f"switch server on {url} ({'TLS, development CA' if use_tls else 'plaintext'}"
                      "): API, catalog and tunnel endpoint on one port")
        say("gateways", "gateways [b]gw-srv[/] (asp1's side) and [b]gw-alice[/] (alice's side) "
                        f"connected out over {gws[1].kind} links")
        target = f"{app.address[0]}:{app.address[1]}"
        await call("asp1", "POST", "/v1/services", {"name": "sha", "gateway": "gw-srv",
                                                     "target": target, "allow": ["alice"]})
        say("S1", f"asp1 registers service [b]sha[/] = tcp {target} behind gw-srv, "
                  "valid for alice")
        seen = [s["name"] for s in await call("alice", "GET", "/v1/services")]
        hidden = [s["name"] for s in await call("mallory", "GET", "/v1/services")]
        if seen != ["sha"] or hidden:
            raise RuntimeError(f"catalog wrong: alice {seen}, mallory {hidden}")
        say("S2", f"alice's catalog: {', '.join(seen)}; mallory's catalog: (empty)")
        t0 = time.perf_counter()
        t = await call("alice", "POST", "/v1/tunnels", {"service": "sha",
                                                         "gateway": "gw-alice",
                                                         "listen": "127.0.0.1:0"})
        say("S3-S5", f"alice selects sha: pseudo sockets set in both gateways, both report "
                     f"done; tunnel {t['tunnel']} [green]{t['state']}[/] in "
                     f"{(time.perf_counter() - t0) * 1000:.0f} ms, listening on {t['listen']}")
        try:
            await call("mallory", "POST", "/v1/tunnels", {"service": "sha",
                                                           "gateway": "gw-alice"})
            raise RuntimeError("mallory opened a tunnel")
        except ApiClientError as exc:
            say("refused", f"mallory asks for sha: [yellow]{exc.message}[/]")
        host, _, lport = t["listen"].rpartition(":")
        conn = await open_tcp(host, int(lport))
        payload = os.urandom(min(nbytes, 1 << 20))
        sent, left = hashlib.sha256(), nbytes
        t0 = time.perf_counter()
        while left:
            chunk = payload[: min(len(payload), left)]
            await conn.send_all(chunk)
            sent.update(chunk)
            left -= len(chunk)
        await conn.shutdown_write()
        reply = b""
        while data := await conn.recv():
            reply += data
        conn.close()
        size, digest = reply.decode().split()
        if digest != sent.hexdigest() or int(size) != nbytes:
            raise RuntimeError("the bytes that arrived at the ASP's application differ")
        say("data", f"{nbytes / 2**20:.0f} MiB from alice's client through the pseudo socket to "
                    f"the ASP's application in {time.perf_counter() - t0:.2f} s; SHA-256 "
                    "[green]matches[/]")
        done = await call("alice", "DELETE", f"/v1/tunnels/{t['tunnel']}")
        try:
            (await open_tcp(host, int(lport), timeout=2)).close()
            raise RuntimeError("the pseudo socket still accepts")
        except ConnectionError:
            pass
        say("S6-S7", f"alice closes it: both gateways delete their pseudo sockets and report; "
                     f"tunnel [b]{done['state']}[/], {t['listen']} refuses connections")
        lines = (home / "switch-audit.jsonl").read_text().splitlines()
        say("audit", f"the switch recorded {len(lines)} decisions (JSON lines)")
        return True
    except (RuntimeError, ApiClientError, OSError, TimeoutError) as exc:
        say("failed", f"[red]{exc}[/]")
        return False
    finally:
        for task in tasks:
            task.cancel()
        serving.cancel()
        for task in (*tasks, serving):
            with contextlib.suppress(BaseException):
                await task
        await app.close()

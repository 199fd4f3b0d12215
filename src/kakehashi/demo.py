"""``kakehashi demo``: every system there is, on loopback, one narrated line per step.

``kakehashi demo`` runs the relay (spec 000), the gateway (spec 001), on-demand
access (spec 002), the socket switch (spec 003) and the proxy chain (spec 004);
``kakehashi demo relay`` (or ``gateway``, ``ondemand``, ``switch``, ``chain``) runs one.
Everything runs on
loopback with a throwaway state directory (a development CA is made in it, TLS is on
as by default), so the demo needs no setup and leaves nothing behind. The servers'
own log lines go to a file in that directory, not between the narration's lines. The
narration follows the step numbers of the specs (Figs. 2-4 of spec 000, Figs. 6 and 11
of spec 001) so a reader can hold the output beside them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from rich.console import Console

from kakehashi.core import runner, tls
from kakehashi.core.audit import AuditLog
from kakehashi.core.demoapps import sha_service
from kakehashi.core.store import open_store
from kakehashi.core.stream import Conn, Listener
from kakehashi.relay import messages as m
from kakehashi.relay.agent import (
    RelayError,
    Terminal,
    TerminalConfig,
    run_session,
    service_acceptor,
)
from kakehashi.relay.control import UserRecord
from kakehashi.relay.server import RelayServer
from kakehashi.relay.users import RelayUsers

#: one line per step, never wrapped in the middle of a sentence
console = Console(stderr=False, highlight=False, soft_wrap=True)


def say(step: str, text: str) -> None:
    console.print(f"[bold cyan]{step:>11}[/]  {text}")


class DemoFailed(Exception):
    """A step did not do what the narration says; the demo stops and exits 1."""


# -- applications behind the NAT / firewall ------------------------------------------------


async def _sized_sha_service(conn: Conn) -> None:
    """An internal TCP service: an 8-byte length, that many bytes, back their SHA-256."""
    data = b""
    while len(data) < 8 and (piece := await conn.recv()):
        data += piece
    want = int.from_bytes(data[:8], "big")
    digest, size = hashlib.sha256(data[8:]), len(data) - 8
    while size < want and (piece := await conn.recv()):
        digest.update(piece)
        size += len(piece)
    await conn.send_all(digest.hexdigest().encode() + b"\n")
    conn.close()


async def _intranet_page(conn: Conn) -> None:
    """An internal web server: one page that says which request and which Via it saw."""
    head = b""
    while b"\r\n\r\n" not in head and (piece := await conn.recv()):
        head += piece
    lines = head.decode("latin-1").split("\r\n")
    via = next((ln.split(":", 1)[1].strip() for ln in lines[1:]
                if ln.lower().startswith("via:")), "-")
    target = lines[0].split(" ")[1] if lines[0].count(" ") >= 2 else "?"
    body = f"the intranet page {target} (it saw Via: {via})\n".encode()
    await conn.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    conn.close()


async def _socketpair() -> tuple[Conn, Conn]:
    import socket

    a, b = socket.socketpair()
    return Conn(a), Conn(b)


# -- the relay (spec 000) ------------------------------------------------------------------
async def _relay(home: Path, nbytes: int, use_tls: bool) -> None:
    console.rule("[bold]relay: reach a device behind NAT by user ID (spec 000)")
    registry = RelayUsers(open_store(home / "relay.db"), kdf_n=2**12)
    registry.add(UserRecord(name="pi"), "pi-password")
    registry.add(UserRecord(name="laptop"), "laptop-password")
    registry.add(UserRecord(name="mallory"), "mallory-password")
    pi_record = registry.get("pi")
    assert pi_record is not None
    registry.update(dataclasses.replace(pi_record, allowed_peers=("laptop",)))
    say("setup", "registered users [b]pi[/] (accepts only laptop), [b]laptop[/], [b]mallory[/]")

    app = Listener("127.0.0.1", 0, sha_service)
    app.start()
    app_addr = app.address
    ctx = tls.server_context()
    server = RelayServer(registry, host="127.0.0.1", port=0,
                         tls=ctx if use_tls else None, starttls=ctx,
                         audit=AuditLog(home / "relay-audit.jsonl", system="relay"))
    host, port = await server.start()
    mode = "TLS, development CA" if use_tls else "plaintext"
    say("relay", f"relay server on {host}:{port} ({mode})"
                 f"; pi's application (a SHA-256 service) on {app_addr[0]}:{app_addr[1]},"
                 " reachable only from pi's side")

    client_ctx = tls.client_context()

    def terminal(user: str, services: list[str] | None = None, spares: int = 2) -> TerminalConfig:
        return TerminalConfig(server=host, port=port, user=user, password=f"{user}-password",
                              tls=client_ctx if use_tls else None, starttls=client_ctx,
                              server_hostname="localhost", spares=spares,
                              attrs=m.Attrs(services=services or []))

    pi_term: Terminal
    pi_term = Terminal(terminal("pi", ["sha"]),
                       accept=service_acceptor({"sha": app_addr}, lambda c: pi_term.spawn(c)))
    tasks = [asyncio.create_task(pi_term.maintain())]
    laptop = Terminal(terminal("laptop"))
    mallory = Terminal(terminal("mallory", spares=0))
    try:
        await asyncio.wait_for(pi_term.connected.wait(), 10)
        async with asyncio.timeout(10):
            while len(pi_term.idle_links()) < 2:
                await asyncio.sleep(0.01)  # the agent opens its spares in the background
        say("Fig.2 1-5", "agent [b]pi[/] connected out, logged in (user ID + password) and keeps "
                         f"{len(pi_term.idle_links())} spare connections alive")

        tasks.append(asyncio.create_task(laptop.maintain()))
        await asyncio.wait_for(laptop.connected.wait(), 10)
        users = await laptop.who()
        say("who", "laptop asks who is online: " + ", ".join(
            f"{u.user} (services: {','.join(u.services) or '-'})" for u in users))

        t0 = time.perf_counter()
        link, info = await laptop.connect("pi", "sha")
        setup_ms = (time.perf_counter() - t0) * 1000
        say("Fig.3 11-16", f"laptop asks for [b]pi/sha[/] by user ID; pi accepts; the relay pairs "
                           f"two held connections in {setup_ms:.1f} ms")

        ours, theirs = await _socketpair()
        session = asyncio.create_task(run_session(link, theirs, info, initiator=True))
        payload = os.urandom(min(nbytes, 1 << 20))
        sent = hashlib.sha256()
        t0 = time.perf_counter()
        left = nbytes
        while left:
            chunk = payload[: min(len(payload), left)]
            await ours.send_all(chunk)
            sent.update(chunk)
            left -= len(chunk)
        await ours.shutdown_write()
        reply = b""
        while data := await ours.recv():
            reply += data
        elapsed = time.perf_counter() - t0
        size, digest = reply.decode().split()
        if digest != sent.hexdigest() or int(size) != nbytes:
            raise DemoFailed("the bytes that arrived at pi's application differ")
        say("Fig.3 22-25", f"{nbytes / 2**20:.0f} MiB went laptop -> relay -> pi's application in "
                           f"{elapsed:.2f} s; its SHA-256 [green]matches[/]")
        await session
        ours.close()
        say("Fig.3 26-28", "end notification passed on, both sides released; the connections "
                           "are idle again, to be reused")

        try:
            await mallory.connect("pi", "sha")
            raise DemoFailed("mallory got through to pi/sha")
        except RelayError as exc:
            say("ACL", f"mallory asks for pi/sha and is refused: [yellow]{exc.message}[/]")
        audit = (home / "relay-audit.jsonl").read_text().splitlines()
        say("audit", f"the relay recorded {len(audit)} allow/deny decisions (JSON lines)")
    finally:
        for task in tasks:
            task.cancel()
        await mallory.close()
        await laptop.close()
        await pi_term.close(logout=True)
        await server.close()
        await app.close()


# -- the gateway (spec 001) ----------------------------------------------------------------
async def _start_gateway(home: Path, allow: list[str], use_tls: bool
                         ) -> tuple[subprocess.Popen[bytes], int]:
    """``kakehashi gateway serve`` as a user starts it, its log in the state directory."""
    args = [sys.executable, "-m", "kakehashi", "--log-format", "text", "gateway", "serve",
            "--listen", "127.0.0.1:0", "--tls", "on" if use_tls else "off",
            "--db", str(home / "gateway.db"), "--audit-log", str(home / "gateway-audit.jsonl"),
            "--access-log", str(home / "gateway-access.jsonl")]
    for item in allow:
        args += ["--allow", item]
    log = home / "gateway.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        async with asyncio.timeout(30):
            while not (found := re.search(r"gateway listening on \S+:(\d+)", log.read_text())):
                if proc.poll() is not None:
                    raise DemoFailed(f"the gateway exited: {log.read_text()[-500:]}")
                await asyncio.sleep(0.05)  # waiting for its log line
    except BaseException:
        _stop(proc)
        raise
    return proc, int(found.group(1))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def _gateway(home: Path, nbytes: int, use_tls: bool) -> None:
    from kakehashi.gateway.client import EventClient, Gateway, open_tunnel, read_response

    console.rule("[bold]gateway: every internal service through one firewall port (spec 001)")
    page = Listener("127.0.0.1", 0, _intranet_page)
    service = Listener("127.0.0.1", 0, _sized_sha_service)
    page.start()
    service.start()
    page_port, svc_port = page.address[1], service.address[1]
    say("setup", f"an intranet web server on 127.0.0.1:{page_port} and a TCP service on "
                 f"127.0.0.1:{svc_port}, behind the firewall")
    proc, port = await _start_gateway(
        home, [f"127.0.0.1:{page_port}", f"127.0.0.1:{svc_port}"], use_tls)
    try:
        say("gateway", f"gateway on one port 127.0.0.1:{port} ({'TLS' if use_tls else 'plaintext'}"
                       "): HTTP proxy, CONNECT and events; only those two targets allowed")
        gw = Gateway("127.0.0.1", port, tls=tls.client_context() if use_tls else None,
                     server_hostname="localhost")

        async def get(target: str) -> tuple[int, bytes]:
            conn = await gw.connect()
            try:
                authority = target.split("/")[2]
                await conn.send_all(f"GET {target} HTTP/1.1\r\nHost: {authority}\r\n"
                                    "Connection: close\r\n\r\n".encode())
                head = await read_response(conn, gw.timeout)
                body = b""
                while data := await asyncio.wait_for(conn.recv(), gw.timeout):
                    body += data
                return head.status, body
            finally:
                conn.close()

        status, body = await get(f"http://127.0.0.1:{page_port}/reports")
        if status != 200:
            raise DemoFailed(f"the proxy answered {status}")
        say("proxy", f"GET http://127.0.0.1:{page_port}/reports through the gateway: {status}, "
                     f"[green]{body.decode().strip()}[/]")
        status, _ = await get("http://127.0.0.1:9/")
        if status != 403:
            raise DemoFailed(f"a target outside the allow-list got {status}")
        say("allow-list", "GET http://127.0.0.1:9/ (not allowed): refused with "
                          f"[yellow]{status}[/]")

        tunnel = await open_tunnel(gw, "127.0.0.1", svc_port)
        try:
            data = os.urandom(min(nbytes, 4 << 20))
            t0 = time.perf_counter()
            await tunnel.send_all(len(data).to_bytes(8, "big") + data)
            reply = b""
            while not reply.endswith(b"\n") and (piece := await asyncio.wait_for(
                    tunnel.recv(), gw.timeout)):
                reply += piece
            elapsed = time.perf_counter() - t0
        finally:
            tunnel.close()
        if reply.strip().decode() != hashlib.sha256(data).hexdigest():
            raise DemoFailed("the tunnelled bytes differ")
        say("CONNECT", f"a tunnel to 127.0.0.1:{svc_port}: {len(data) / 2**20:.0f} MiB there in "
                       f"{elapsed:.2f} s, the service's SHA-256 [green]matches[/]")

        events = EventClient(gw)
        poll = asyncio.create_task(events.poll("alerts", 0, 20))
        await asyncio.sleep(0.3)  # narration pace: the watcher is waiting in its long poll
        t0 = time.perf_counter()
        seq = await events.publish("alerts", b"disk almost full on db1")
        got, cursor, _ = await asyncio.wait_for(poll, 25)
        waited = (time.perf_counter() - t0) * 1000
        if not got or got[0].get("data") != "disk almost full on db1":
            raise DemoFailed(f"the watcher got {got!r}")
        say("events", f"Fig. 11: a watcher long-polls topic alerts; event #{seq} published "
                      f"from inside reached it {waited:.0f} ms later (its cursor is now {cursor})")
        access = (home / "gateway-access.jsonl")
        lines = access.read_text().splitlines() if access.exists() else []
        say("audit", f"the gateway logged {len(lines)} requests and its allow/deny decisions "
                     "(JSON lines)")
    finally:
        _stop(proc)
        await page.close()
        await service.close()


# -- on-demand access (spec 002) -------------------------------------------------------------
async def _ondemand(home: Path, nbytes: int, use_tls: bool) -> None:
    from kakehashi.ondemand import demo as ondemand_demo

    console.rule("[bold]ondemand: time-limited entry ports to devices on a closed network "
                 "(spec 002)")
    if not await ondemand_demo.run(say, home, min(nbytes, 4 << 20)):
        raise DemoFailed("the on-demand access demo did not do what it says")


# -- the socket switch (spec 003) -----------------------------------------------------------
async def _switch(home: Path, nbytes: int, use_tls: bool) -> None:
    from kakehashi.switch import demo as switch_demo

    console.rule("[bold]switch: a catalog of services and tunnels between two gateways "
                 "(spec 003)")
    if not await switch_demo.run(say, home, min(nbytes, 8 << 20), use_tls):
        raise DemoFailed("the socket switch demo did not do what it says")


# -- the proxy chain (spec 004) --------------------------------------------------------------
async def _chain(home: Path, nbytes: int, use_tls: bool) -> None:
    from kakehashi.chain import demo as chain_demo

    console.rule("[bold]chain: UDP across three firewalls with hop-by-hop port exchange "
                 "(spec 004)")
    if not await chain_demo.run(say):
        raise DemoFailed("the proxy chain demo did not do what it says")


PARTS: dict[str, Callable[[Path, int, bool], Awaitable[None]]] = {
    "relay": _relay, "gateway": _gateway, "ondemand": _ondemand, "switch": _switch,
    "chain": _chain}


async def _demo(parts: list[str], nbytes: int, use_tls: bool, home: Path,
                others: list[str]) -> int:
    try:
        for name in parts:
            await PARTS[name](home, nbytes, use_tls)
    except (DemoFailed, RelayError, OSError, TimeoutError) as exc:
        console.rule("[bold red]failed")
        console.print(f"[red]{exc}[/] (server logs: {home})")
        return 1
    console.rule("[bold green]done")
    for name in others:
        console.print(f"{name}: no demo yet; see [b]kakehashi {name} --help[/]")
    console.print("next: " + ", ".join(f"[b]kakehashi {p} --help[/] (docs/{p}.md)"
                                       for p in parts))
    return 0


def run_demo(which: str | None, nbytes: int, use_tls: bool, *, systems: list[str] = (),
             keep: bool = False) -> int:
    """Run the demo parts (all, or the one named); ``systems`` are the CLI's systems, so
    one without a demo part is named rather than silently left out."""
    parts = [which] if which else list(PARTS)
    others = [] if which else [s for s in systems if s not in PARTS]
    home = Path(tempfile.mkdtemp(prefix="kakehashi-demo-"))
    os.environ["KAKEHASHI_HOME"] = str(home)  # the dev CA and databases go here
    # the servers' log lines go to a file, not between the narration's lines
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    file_handler = logging.FileHandler(home / "demo.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(file_handler)
    try:
        return runner.run(_demo(parts, nbytes, use_tls, home, others))
    finally:
        file_handler.close()
        if keep:
            console.print(f"state directory kept: {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)

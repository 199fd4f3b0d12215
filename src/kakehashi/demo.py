"""``kakehashi demo``: a relay, two agents and sessions between them, narrated.

Everything runs on loopback in one process with a throwaway state directory, so it
needs no setup and leaves nothing behind. The narration follows the step numbers of
spec 000 (Figs. 2-4) so a reader can hold the output beside the spec.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path

from rich.console import Console

from kakehashi.core import runner, tls
from kakehashi.core.audit import AuditLog
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

console = Console(stderr=False, highlight=False)


def say(step: str, text: str) -> None:
    console.print(f"[bold cyan]{step:>10}[/]  {text}")


async def _sha_service(conn: Conn) -> None:
    """pi's application: answers with the SHA-256 and size of what it received."""
    digest, size = hashlib.sha256(), 0
    while data := await conn.recv():
        digest.update(data)
        size += len(data)
    await conn.send_all(f"{size} {digest.hexdigest()}\n".encode())
    await conn.shutdown_write()


async def _demo(nbytes: int, use_tls: bool) -> int:
    # decisions go to the demo's audit file; the console is for the narration
    logging.getLogger("kakehashi.audit").setLevel(logging.WARNING)
    home = Path(tempfile.mkdtemp(prefix="kakehashi-demo-"))
    os.environ["KAKEHASHI_HOME"] = str(home)
    console.rule("[bold]kakehashi demo: the rendezvous relay (spec 000)")
    registry = RelayUsers(open_store(home / "relay.db"), kdf_n=2**12)
    registry.add(UserRecord(name="pi"), "pi-password")
    registry.add(UserRecord(name="laptop"), "laptop-password")
    registry.add(UserRecord(name="mallory"), "mallory-password")
    pi_record = registry.get("pi")
    assert pi_record is not None
    registry.update(dataclasses.replace(pi_record, allowed_peers=("laptop",)))
    say("setup", "registered users [b]pi[/] (accepts only laptop), [b]laptop[/], [b]mallory[/]"
                 f" in {home / 'relay.db'}")

    app = Listener("127.0.0.1", 0, _sha_service)
    app.start()
    app_addr = app.address
    say("setup", f"pi's application (a SHA-256 service) listens on {app_addr[0]}:{app_addr[1]}"
                 " - not reachable from outside pi's LAN")

    ctx = tls.server_context()
    server = RelayServer(registry, host="127.0.0.1", port=0,
                         tls=ctx if use_tls else None, starttls=ctx,
                         audit=AuditLog(home / "audit.jsonl", system="relay"))
    host, port = await server.start()
    say("relay", f"relay server on {host}:{port} ({'TLS' if use_tls else 'plaintext'}),"
                 " development CA generated in the demo's state directory")

    client_ctx = tls.client_context()

    def terminal(user: str, services: list[str] | None = None, spares: int = 2) -> TerminalConfig:
        return TerminalConfig(server=host, port=port, user=user, password=f"{user}-password",
                              tls=client_ctx if use_tls else None, starttls=client_ctx,
                              server_hostname="localhost", spares=spares,
                              attrs=m.Attrs(services=services or []))

    pi_term: Terminal
    pi_term = Terminal(terminal("pi", ["sha"]),
                       accept=service_acceptor({"sha": app_addr}, lambda c: pi_term.spawn(c)))
    pi_task = asyncio.create_task(pi_term.maintain())
    await asyncio.wait_for(pi_term.connected.wait(), 10)
    while len(pi_term.idle_links()) < 2:
        await asyncio.sleep(0.01)
    say("Fig.2 1-5", "agent [b]pi[/] connected out, logged in (user ID + password) and keeps "
                     f"{len(pi_term.idle_links())} spare connections alive with keepalives")

    laptop = Terminal(terminal("laptop"))
    lap_task = asyncio.create_task(laptop.maintain())
    await asyncio.wait_for(laptop.connected.wait(), 10)
    users = await laptop.who()
    say("who", "laptop asks who is online: " + ", ".join(
        f"{u.user} (services: {','.join(u.services) or '-'})" for u in users))

    t0 = time.perf_counter()
    link, info = await laptop.connect("pi", "sha")
    setup_ms = (time.perf_counter() - t0) * 1000
    say("Fig.3 11-16", f"laptop requests [b]pi/sha[/] by user ID; pi accepts; the relay pairs "
                       f"the two held connections ({setup_ms:.1f} ms, over a spare connection)")

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
    ok = digest == sent.hexdigest() and int(size) == nbytes
    say("Fig.3 22-25", f"{nbytes / 2**20:.0f} MiB went laptop -> relay -> pi's app in "
                       f"{elapsed:.2f} s ({nbytes / 2**20 / elapsed:.0f} MiB/s); the app's "
                       f"SHA-256 {'[green]matches[/]' if ok else '[red]DIFFERS[/]'}")
    await session
    ours.close()
    say("Fig.3 26-28", "end notification forwarded, both sides released: the connections are "
                       "idle again and will be reused, not reopened")

    mallory = Terminal(terminal("mallory", spares=0))
    try:
        await mallory.connect("pi", "sha")
        say("ACL", "[red]mallory got through - this should not happen[/]")
        ok = False
    except RelayError as exc:
        say("ACL", f"mallory asks for pi/sha and is refused: [yellow]{exc.message}[/]")
    await mallory.close()

    audit = (home / "audit.jsonl").read_text().splitlines()
    say("audit", f"{len(audit)} allow/deny decisions recorded in {home / 'audit.jsonl'}")
    for task in (pi_task, lap_task):
        task.cancel()
    await laptop.close()
    await pi_term.close(logout=True)
    await server.close()
    await app.close()
    console.rule("[bold green]done" if ok else "[bold red]failed")
    console.print("next: [b]kakehashi relay --help[/], docs/relay.md")
    return 0 if ok else 1


async def _socketpair() -> tuple[Conn, Conn]:
    import socket

    a, b = socket.socketpair()
    return Conn(a), Conn(b)


def run_demo(nbytes: int, use_tls: bool) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        return runner.run(_demo(nbytes, use_tls))
    return 130

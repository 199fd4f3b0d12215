"""The chain's part of ``kakehashi demo``: three proxies (three firewalls) on loopback, a
DNS-like exchange through them in both modes, a refused key, the encrypted mode and a
spoofed datagram, narrated with the step numbers of spec 004.

Everything runs in one process and one event loop, over real sockets, exactly as the
separate ``kakehashi chain proxy`` and ``chain forward`` processes do.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Literal

from kakehashi.chain import tables
from kakehashi.chain.forward import ChainForward, ForwardConfig
from kakehashi.chain.proxy import ChainProxy, ProxyConfig
from kakehashi.chain.setup import SetupFailed
from kakehashi.core import crypto, fastpath, kernelpath
from kakehashi.core.audit import AuditLog
from kakehashi.core.datagram import bind_udp

Say = Callable[[str, str], None]
SERVER_HOST = "127.0.0.3"  # the server's LAN, behind fw3
RECORDS = {"pi.lab.example": "10.3.0.22", "printer.lab.example": "10.3.0.40"}


class _DnsLike(asyncio.DatagramProtocol):
    """The server: answers ``A? NAME`` with ``NAME A ADDRESS`` and counts who asked."""

    def __init__(self) -> None:
        self.sources: set[tuple[str, int]] = set()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sources.add(addr)
        name = data.decode(errors="replace").removeprefix("A? ").strip()
        answer = f"{name} A {RECORDS.get(name, 'NXDOMAIN')}".encode()
        assert self.transport is not None
        self.transport.sendto(answer, addr)


async def _ask(port: int, question: bytes, timeout: float = 5.0) -> tuple[bytes, float]:
    loop = asyncio.get_running_loop()
    sock = bind_udp("127.0.0.1")
    try:
        t0 = time.perf_counter()
        sock.sendto(question, ("127.0.0.1", port))
        data = await asyncio.wait_for(loop.sock_recv(sock, 2048), timeout)
        return data, time.perf_counter() - t0
    finally:
        sock.close()


async def run(say: Say) -> bool:
    loop = asyncio.get_running_loop()
    audit = AuditLog(system="chain")
    k = {pair: crypto.new_shared_key() for pair in
         ("alice-fw1", "alice-fw2", "alice-fw3", "fw1-fw2", "fw2-fw3")}
    raw = {pair: crypto.parse_shared_key(v) for pair, v in k.items()}
    say("keys", "chain keygen made five shared keys: alice-fw1, alice-fw2, alice-fw3 (iterative "
                "mode), fw1-fw2, fw2-fw3 (hop by hop)")
    transport, dns = await loop.create_datagram_endpoint(_DnsLike, local_addr=(SERVER_HOST, 0))
    server = transport.get_extra_info("sockname")[:2]
    say("setup", f"the server (a DNS-like service) listens on udp {server[0]}:{server[1]} "
                 "behind fw3")
    acl = tables.parse_acl([{"user": "alice", "from": "127.0.0.0/8", "ports": "any"}])
    proxies: list[ChainProxy] = []
    forwards: list[ChainForward] = []
    ok = True
    try:
        next_route: str = "direct"
        for i, name in reversed(list(enumerate(["fw1", "fw2", "fw3"], 1))):
            keys = {"alice": raw[f"alice-{name}"]}
            if i > 1:
                keys[f"fw{i - 1}"] = raw[f"fw{i - 1}-{name}"]
            if i < 3:
                keys[f"fw{i + 1}"] = raw[f"{name}-fw{i + 1}"]
            low = 40000 + 1000 * i
            cfg = ProxyConfig(name=name, host="127.0.0.1", port=0,
                              udp_ports=tables.PortRange(low, low + 999), keys=keys,
                              routes=tables.parse_routes({f"{SERVER_HOST}/32": next_route}),
                              acl=acl, audit=audit)
            proxy = ChainProxy(cfg)
            await proxy.start()
            proxies.insert(0, proxy)
            next_route = f"{name}@127.0.0.1:{proxy.address[1]}"
        say("setup", "three firewalls' proxies: " + ", ".join(
            f"{p.cfg.name} control port {p.address[1]} (UDP {p.cfg.udp_ports})" for p in proxies)
            + f"; routes: {SERVER_HOST}/32 -> fw2 at fw1, -> fw3 at fw2, direct at fw3")
        kernel, why = kernelpath.shared()  # what the proxies' default (auto) found
        say("data path", fastpath.start_line("the proxies", fastpath.DEFAULT_MODE,
                                             kernel.table if kernel else None, why))

        async def forward(mode: Literal["recursive", "iterative"], encrypt: bool = False,
                          key1: bytes | None = None) -> ChainForward:
            keys = {f"fw{i}": raw[f"alice-fw{i}"] for i in (1, 2, 3)}
            if key1 is not None:
                keys["fw1"] = key1
            fwd = ChainForward(ForwardConfig(
                user="alice", keys=keys,
                first_hop=tables.Hop("fw1", "127.0.0.1", proxies[0].address[1]), to=server,
                udp_listen=("127.0.0.1", 0), mode=mode, encrypt=encrypt))
            forwards.append(fwd)
            await fwd.start()
            return fwd

        # -- recursive (embodiment 1) ---------------------------------------------------
        fwd = await forward("recursive")
        s = fwd.chain.setup  # type: ignore[union-attr]
        say("501-502", f"alice knows the server's endpoint {server[0]}:{server[1]} (P6) and "
                       f"opens her data port P1")
        say("505/602", "alice and fw1 authenticate each other (challenge-response, both "
                       "directions), then fw1 checks its ACL (claim 6)")
        say("603-611", "fw1 takes P2/P3, authenticates with fw2 and asks it (703); fw2 does "
                       "the same with fw3; each answer carries its request's identifier")
        say("704-707", f"answers come back: 2141 = {s.first} (fw1's P2), 2142 = {s.last} "
                       f"(fw3's P5) in {fwd.chain.seconds * 1000:.0f} ms")  # type: ignore[union-attr]
        answer, rtt = await _ask(fwd.address[1], b"A? pi.lab.example")
        say("511/615", f"a query to the local port {fwd.address[1]} crossed "
                       f"{' -> '.join(s.path)}: [b]{answer.decode()}[/] ({rtt * 1000:.1f} ms)")
        ok &= answer == b"pi.lab.example A 10.3.0.22"
        ok &= {src[1] for src in dns.sources} == {s.last.port}  # type: ignore[union-attr]
        say("708", f"the server saw the query come from {s.last} - the P5 alice learned, not "
                   "fw1's P3 (the Fig. 14(b) failure)")

        # a spoofed datagram at fw1's client-facing port is dropped and counted
        spoof = bind_udp("127.0.0.1")
        spoof.sendto(b"A? pi.lab.example", s.first.addr)  # type: ignore[union-attr]
        spoof.close()
        rec = next(iter(proxies[0].sessions)).forwarder.record  # type: ignore[union-attr]
        for _ in range(200):
            if rec.dropped:
                break
            await asyncio.sleep(0.01)
        ok &= rec.dropped == 1
        say("filter", f"a datagram to fw1's P2 from another port: dropped and counted "
                      f"({rec.dropped}); the association is locked to alice's first source")
        fwd.close()

        # -- iterative (embodiment 2) -----------------------------------------------------
        fwd = await forward("iterative")
        s = fwd.chain.setup  # type: ignore[union-attr]
        say("801-812", f"iterative: alice authenticates with fw1, then with fw2 and fw3 "
                       f"through the proxies already built (1002-1009), each proxy with the "
                       f"next as itself; what alice and fw2, fw3 say is sealed end to end; "
                       f"loop counter {s.counter}, 2141 = {s.first}, 2142 = {s.last}")
        answer, rtt = await _ask(fwd.address[1], b"A? printer.lab.example")
        say("815", f"query through the iteratively built chain: [b]{answer.decode()}[/] "
                   f"({rtt * 1000:.1f} ms)")
        ok &= answer == b"printer.lab.example A 10.3.0.40"
        fwd.close()

        # -- a refused key ----------------------------------------------------------------
        try:
            await forward("recursive", key1=os.urandom(32))
            ok = False
            say("refused", "[red]a wrong key was accepted[/]")
        except SetupFailed as exc:
            say("refused", f"alice with a wrong key for fw1: [b]refused by {exc.hop}[/] "
                           f"({exc.reason}); the control connection is cut")
            ok &= exc.hop == "fw1" and exc.reason == "authentication"

        # -- encrypted (claim 7) ------------------------------------------------------------
        fwd = await forward("recursive", encrypt=True)
        s = fwd.chain.setup  # type: ignore[union-attr]
        answer, rtt = await _ask(fwd.address[1], b"A? pi.lab.example")
        say("claim 7", f"encrypted mode: alice and fw3 authenticate end to end through fw1 "
                       f"and fw2 and key AES-256-GCM from it; fw1 and fw2 relay only "
                       f"ciphertext; usable payload {s.max_payload} bytes: "
                       f"[b]{answer.decode()}[/]")
        ok &= answer == b"pi.lab.example A 10.3.0.22"
        fwd.close()
        say("teardown", f"sessions end with their control connections; audit: "
                        f"{audit.counts['allow']} allowed, {audit.counts['deny']} denied")
    except (SetupFailed, TimeoutError, OSError) as exc:
        say("failed", f"[red]{exc}[/]")
        ok = False
    finally:
        for f in forwards:
            f.close()
        for p in proxies:
            await p.close()
        transport.close()
    return bool(ok)

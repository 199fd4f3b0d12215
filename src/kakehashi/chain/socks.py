"""``chain socks``: a SOCKS5 server (RFC 1928) whose UDP associations ride chains.

CONNECT and BIND are refused (reply 7, command not supported): the chain carries
datagrams. A UDP ASSOCIATE gets a UDP port of this server (BND.ADDR/BND.PORT); each
datagram the client sends there names its destination in the SOCKS UDP header, and the
first datagram to a destination builds a chain to it (recursive or iterative, as
configured); answers come back wrapped in a header naming the destination they come
from. The association ends when its TCP connection closes, and its chains with it.

Whose datagrams are accepted: RFC 1928 says DST.ADDR/DST.PORT of the request name where
the client will send from, and a server may use them to filter; behind NAT the client
cannot know them (it often sends zeros). So: if the request names the very address the
TCP connection comes from and a port, only that endpoint is accepted; otherwise the
association locks to the first datagram from the TCP client's address. Anything else is
dropped and counted, like fragments and destinations given by name (routes are by
address). Each association holds at most ``max_destinations`` chains; after a chain to
a destination is refused, that destination's datagrams are dropped for a second,
doubling on each refusal up to 30 s (not a whole setup with the first proxy per
datagram); a chain that fails here (no UDP port for it) is held off the same way and
leaves nothing open. A UDP ASSOCIATE whose port cannot be bound is answered with reply
1 (general failure).

Limits: a UDP association lives as long as its control connection, so one bound covers
both. ``max_connections`` control connections at once in total and ``max_per_client``
from one client address, handshakes included; a connection beyond either is answered,
once its request arrives, with reply 2 (connection not allowed by ruleset) and closed,
without a UDP port being bound for it. The answering is bounded too: the listener
serves at most twice ``max_connections`` connections at once (the rest wait in its
backlog), and a handshake that does not finish within ``handshake_timeout`` is cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass

from kakehashi.chain.forward import Chain, ForwardConfig, build_chain
from kakehashi.chain.setup import SetupFailed
from kakehashi.chain.tables import SessionLimits
from kakehashi.core import socks5
from kakehashi.core.crypto import DatagramChannel
from kakehashi.core.datagram import bind_udp
from kakehashi.core.stream import Conn, ConnClosed, Listener

log = logging.getLogger("kakehashi.chain")
Addr = tuple[str, int]
QUEUE = 16  # datagrams held per destination while its chain is being built
#: after a destination's chain could not be built, its datagrams are dropped for this
#: long, doubling on each failure up to RETRY_MAX (as ``chain forward`` retries): every
#: datagram of an application that keeps sending would otherwise cost the first proxy
#: a whole setup
RETRY_FIRST = 1.0
RETRY_MAX = 30.0
#: destinations whose refusal an association remembers (the oldest forgotten first)
MAX_REFUSED = 256


@dataclass
class SocksConfig:
    host: str
    port: int
    chain: ForwardConfig  #: who, keys, first hop, mode, encryption; ``to`` is per datagram
    max_destinations: int = 16
    handshake_timeout: float = 10.0
    #: control connections (each holds at most one UDP association) at once, in total
    #: and from one client address (0: no limit)
    max_connections: int = 1024
    max_per_client: int = 64


class _Side(asyncio.DatagramProtocol):
    def __init__(self, on: Callable[[bytes, Addr], None]) -> None:
        self.on = on

    def datagram_received(self, data: bytes, addr: Addr) -> None:  # type: ignore[override]
        self.on(data, addr)


class _Route:
    """One destination of an association: its chain and the transport on its P1."""

    def __init__(self) -> None:
        self.chain: Chain | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.queue: list[bytes] = []
        self.seal: Callable[[bytes], bytes] | None = None
        self.open: Callable[[bytes], bytes | None] | None = None
        self.watch: asyncio.Task[None] | None = None

    def close(self) -> None:
        if self.watch is not None:
            self.watch.cancel()
        if self.transport is not None:
            self.transport.close()
        elif self.chain is not None:
            self.chain.data_sock.close()  # type: ignore[attr-defined]
        if self.chain is not None:
            self.chain.close()


class Association:
    def __init__(self, server: SocksServer, client_ip: str, expect: Addr | None) -> None:
        self.server = server
        self.cfg = server.cfg
        self.client_ip = client_ip
        self.client: Addr | None = expect
        self.locked = expect is not None
        self.routes: dict[Addr, _Route] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.dropped = 0
        self.relayed = 0
        #: destinations whose chain was refused: (until when, loop time; next wait)
        self.refused: dict[Addr, tuple[float, float]] = {}

    async def start(self, host: str) -> Addr:
        """Bind the association's UDP port (BND); OSError when it cannot be had, with
        nothing left open."""
        loop = asyncio.get_running_loop()
        sock = bind_udp(host, 0)
        try:
            self.transport, _ = await loop.create_datagram_endpoint(
                lambda: _Side(self.from_client), sock=sock)
        except BaseException:
            sock.close()
            raise
        return sock.getsockname()[:2]

    # client -> chain
    def from_client(self, data: bytes, addr: Addr) -> None:
        if self.client is None and addr[0] == self.client_ip:
            self.client = addr[:2]
        if addr[:2] != self.client:
            self.dropped += 1
            return
        try:
            host, port, payload = socks5.parse_udp(data)
            ipaddress.ip_address(host)
        except (socks5.Socks5Error, ValueError):
            self.dropped += 1
            return
        dst = (host, port)
        route = self.routes.get(dst)
        if route is None:
            if len(self.routes) >= self.cfg.max_destinations:
                self.dropped += 1
                return
            held = self.refused.get(dst)
            if held is not None and asyncio.get_running_loop().time() < held[0]:
                self.dropped += 1  # refused a moment ago: not a setup per datagram
                return
            route = self.routes[dst] = _Route()
            route.queue.append(payload)
            route.watch = asyncio.ensure_future(self.build(dst, route))
            return
        if route.transport is None:
            if len(route.queue) < QUEUE:
                route.queue.append(payload)
            else:
                self.dropped += 1
            return
        self.send(route, payload)

    def send(self, route: _Route, payload: bytes) -> None:
        assert route.transport is not None and route.chain is not None
        if route.seal is not None:
            payload = route.seal(payload)
        route.transport.sendto(payload, route.chain.setup.first.addr)  # type: ignore[union-attr]
        self.relayed += 1

    async def build(self, dst: Addr, route: _Route) -> None:
        """Build the chain to ``dst`` and carry ``route``'s datagrams until it ends.

        A chain that cannot be had - refused, or a local failure such as no UDP port
        for P1 (descriptors exhausted) or no transport for it - leaves nothing behind:
        the route goes (it held one of ``max_destinations``, and every later datagram
        to ``dst`` was queued to it and dropped for the association's life), what it
        opened is closed, and the destination is held off as after a refusal."""
        try:
            chain = await self._connect(dst, route)
        except (SetupFailed, ConnClosed, OSError) as exc:
            route.watch = None  # (this task: not to be cancelled by the close)
            route.close()
            wait = min(self.refused.pop(dst, (0.0, RETRY_FIRST / 2))[1] * 2, RETRY_MAX)
            log.info("socks: no chain to %s:%d: %s; its datagrams dropped for %gs",
                     dst[0], dst[1], exc, wait)
            if self.routes.get(dst) is route:
                del self.routes[dst]
            self.refused[dst] = (asyncio.get_running_loop().time() + wait, wait)
            while len(self.refused) > MAX_REFUSED:
                del self.refused[next(iter(self.refused))]
            return
        self.refused.pop(dst, None)
        try:  # the chain lives until its control connection closes: so does this route
            why = await chain.wait_closed()
            log.info("socks: chain to %s:%d ended: %s", dst[0], dst[1], why)
        finally:
            if self.routes.get(dst) is route:
                del self.routes[dst]
            route.watch = None
            route.close()

    async def _connect(self, dst: Addr, route: _Route) -> Chain:
        """The chain to ``dst``, in ``route`` with its transport, its queue sent."""
        cfg = dataclasses.replace(self.cfg.chain, to=dst)
        route.chain = chain = await build_chain(cfg)
        if chain.setup.session_keys is not None:
            ch = DatagramChannel(*chain.setup.session_keys)
            route.seal, route.open = ch.seal, ch.open
        first = chain.setup.first.addr  # type: ignore[union-attr]
        header = socks5.encode_udp(dst[0], dst[1], b"")

        def from_chain(data: bytes, addr: Addr) -> None:
            if addr[:2] != first or self.client is None or self.transport is None:
                self.dropped += 1
                return
            if route.open is not None:
                opened = route.open(data)
                if opened is None:
                    self.dropped += 1
                    return
                data = opened
            self.transport.sendto(header + data, self.client)
            self.relayed += 1

        loop = asyncio.get_running_loop()
        route.transport, _ = await loop.create_datagram_endpoint(
            lambda: _Side(from_chain), sock=chain.data_sock)
        log.info("socks: chain to %s:%d up through %s", dst[0], dst[1],
                 " -> ".join(chain.setup.path))
        for payload in route.queue:
            self.send(route, payload)
        route.queue.clear()
        return chain

    def close(self) -> None:
        for route in list(self.routes.values()):
            route.close()
        self.routes.clear()
        if self.transport is not None:
            self.transport.close()


class SocksServer:
    def __init__(self, cfg: SocksConfig) -> None:
        self.cfg = cfg
        self.listener: Listener | None = None
        self.associations: set[Association] = set()
        self.limits = SessionLimits(0, cfg.max_per_client, cfg.max_connections,
                                    what="connections", holder="this SOCKS server")
        #: connections answered with reply 2 because of a limit
        self.refused = 0

    async def start(self) -> None:
        # twice the limit: room to answer the connections beyond it with a refusal,
        # while a flood beyond that waits in the backlog
        self.listener = Listener(self.cfg.host, self.cfg.port, self.handle,
                                 max_connections=2 * self.cfg.max_connections)
        self.listener.start()

    @property
    def address(self) -> Addr:
        assert self.listener is not None
        return self.listener.address

    async def close(self) -> None:
        if self.listener is not None:
            await self.listener.close()

    async def _read(self, conn: Conn, buf: bytearray, parse: Callable) -> tuple:
        while True:
            got = parse(bytes(buf))
            if got is not None:
                del buf[: got[1]]
                return got
            if len(buf) > 600:
                raise socks5.Socks5Error(socks5.GENERAL_FAILURE, "request too long")
            data = await conn.recv(1024)
            if not data:
                raise ConnClosed("closed during the SOCKS handshake")
            buf += data

    async def handle(self, conn: Conn) -> None:
        peer_ip = str(conn.peer[0]) if isinstance(conn.peer, tuple) else ""
        over = self.limits.admit("", peer_ip)
        try:
            await self.serve(conn, peer_ip, over)
        finally:
            if over is None:
                self.limits.release("", peer_ip)

    async def serve(self, conn: Conn, peer_ip: str, over: str | None) -> None:
        """One control connection: the handshake, then its UDP association until it
        closes; ``over`` (a limit it is beyond) gets it refused at its request."""
        t = self.cfg.handshake_timeout
        buf = bytearray()
        try:
            methods, _ = await asyncio.wait_for(self._read(conn, buf, socks5.parse_greeting), t)
            if socks5.NO_AUTH not in methods:
                await conn.send_all(bytes([socks5.VERSION, socks5.NO_ACCEPTABLE]))
                return
            await conn.send_all(bytes([socks5.VERSION, socks5.NO_AUTH]))
            req, _ = await asyncio.wait_for(self._read(conn, buf, socks5.parse_request), t)
        except socks5.Socks5Error as exc:
            with contextlib.suppress(OSError):
                await conn.send_all(socks5.encode_reply(exc.reply))
            return
        except (ConnClosed, TimeoutError, OSError):
            return
        if over is not None:
            self.refused += 1
            log.info("socks: refused %s: %s", peer_ip, over)
            with contextlib.suppress(OSError):
                await conn.send_all(socks5.encode_reply(socks5.NOT_ALLOWED))
            return
        if req.command != socks5.UDP_ASSOCIATE:
            # the chain carries datagrams only: CONNECT and BIND are not supported
            await conn.send_all(socks5.encode_reply(socks5.COMMAND_NOT_SUPPORTED))
            return
        expect = (req.host, req.port) if req.host == peer_ip and req.port else None
        assoc = Association(self, peer_ip, expect)
        self.associations.add(assoc)
        try:
            local = conn.sock.getsockname()[0]
            try:
                bnd = await assoc.start(local)
            except OSError as exc:  # no UDP port (descriptors exhausted): say so
                log.warning("socks: no UDP port for %s: %s", peer_ip, exc)
                await conn.send_all(socks5.encode_reply(socks5.GENERAL_FAILURE))
                return
            await conn.send_all(socks5.encode_reply(socks5.SUCCEEDED, *bnd))
            log.info("socks: UDP association for %s at %s:%d", peer_ip, *bnd)
            while await conn.recv(1024):  # the association lives as long as this connection
                pass
        except (ConnClosed, OSError):
            pass
        finally:
            assoc.close()
            self.associations.discard(assoc)
            log.info("socks: UDP association for %s ended: %d datagrams relayed, %d dropped",
                     peer_ip, assoc.relayed, assoc.dropped)


async def run_socks(cfg: SocksConfig) -> int:
    server = SocksServer(cfg)
    await server.start()
    host, port = server.address
    log.info("chain socks listening on %s:%d (UDP ASSOCIATE through %s, %s mode)", host, port,
             cfg.chain.first_hop, cfg.chain.mode)
    try:
        await asyncio.Event().wait()
    finally:
        await server.close()
    return 0

"""One port, several protocols: route each connection by its first bytes.

The gateway's aggregation port (spec 001) must carry HTTP, CONNECT tunnels, event
polling *and* kakehashi's own framed protocol, because the firewall opens exactly
one port. A :class:`ProtocolMux` is a :class:`~kakehashi.core.stream.Listener`
handler that looks at the first bytes of a connection (``MSG_PEEK`` on plain
sockets, so nothing is consumed and the pump can still splice), picks a route, and
hands the connection over. With a TLS context, a first byte of 0x16 (a TLS
handshake record) starts TLS on the spot and the sniffing happens again inside.

The mux knows no protocol itself: systems register matchers, and the command line
composes systems on one port, so no system imports another.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from kakehashi.core.stream import Conn, ConnClosed, start_tls

log = logging.getLogger("kakehashi.mux")

#: True: this route; False: not this route; None: need more bytes to tell
Matcher = Callable[[bytes], bool | None]
Handler = Callable[[Conn], Awaitable[None]]

TLS_RECORD_HANDSHAKE = 0x16


def prefix_matcher(*prefixes: bytes) -> Matcher:
    """Match when the stream starts with one of ``prefixes``."""

    def match(head: bytes) -> bool | None:
        for prefix in prefixes:
            n = min(len(head), len(prefix))
            if head[:n] == prefix[:n]:
                return True if n == len(prefix) else None
        return False

    return match


@dataclass
class Route:
    name: str
    match: Matcher
    handler: Handler


class ProtocolMux:
    def __init__(self, *, tls: ssl.SSLContext | None = None, sniff_bytes: int = 16,
                 timeout: float = 10.0) -> None:
        self.tls = tls
        self.sniff_bytes = sniff_bytes
        self.timeout = timeout
        self.routes: list[Route] = []
        self.fallback: Handler | None = None
        #: refuse plaintext: only TLS may open a connection
        self.require_tls = False

    def add(self, name: str, match: Matcher, handler: Handler) -> None:
        self.routes.append(Route(name, match, handler))

    async def __call__(self, conn: Conn) -> None:
        try:
            head = await asyncio.wait_for(self._peek(conn), self.timeout)
            if self.tls is not None and head[:1] == bytes([TLS_RECORD_HANDSHAKE]):
                conn = await start_tls(conn, self.tls, server_side=True, timeout=self.timeout)
                head = await asyncio.wait_for(self._read_ahead(conn), self.timeout)
            elif self.require_tls:
                log.debug("plaintext from %s refused (TLS required)", conn.peer)
                conn.close()
                return
        except (TimeoutError, OSError, ConnClosed, ssl.SSLError) as exc:
            log.debug("no protocol from %s: %s", conn.peer, exc)
            conn.close()
            return
        route = self._choose(head)
        if route is None:
            if self.fallback is None:
                conn.close()
                return
            await self.fallback(conn)
            return
        await route.handler(conn)

    def _choose(self, head: bytes) -> Route | None:
        for route in self.routes:
            if route.match(head):
                return route
        return None

    def _decided(self, head: bytes) -> bool:
        """Enough bytes to pick a route (or to know that none will match)."""
        if self.tls is not None and head[:1] == bytes([TLS_RECORD_HANDSHAKE]):
            return True
        if len(head) >= self.sniff_bytes:
            return True
        return all(route.match(head) is not None for route in self.routes)

    async def _peek(self, conn: Conn) -> bytes:
        """Look at the first bytes of a plain socket without consuming them."""
        while True:
            try:
                head = conn.sock.recv(self.sniff_bytes, socket.MSG_PEEK)
            except BlockingIOError:
                await conn.wait_readable()
                continue
            if not head:
                raise ConnClosed("closed before saying anything")
            if self._decided(head):
                return head
            # a few bytes are there but not enough to tell: the socket stays
            # readable while we peek, so wait a moment instead of spinning
            await asyncio.sleep(0.005)

    async def _read_ahead(self, conn: Conn) -> bytes:
        """Inside TLS there is no peeking: read, then put the bytes back."""
        head = b""
        while len(head) < self.sniff_bytes:
            data = await conn.recv(self.sniff_bytes - len(head))
            if not data:
                break
            head += data
            if self._decided(head):
                break
        conn.unread(head)
        if not head:
            raise ConnClosed("closed before saying anything inside TLS")
        return head

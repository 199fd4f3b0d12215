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

from kakehashi.core import tlsmismatch
from kakehashi.core.stream import Conn, ConnClosed, Held, StartNow, refuse, start_tls
from kakehashi.core.tls import ServerTLS, context_now

log = logging.getLogger("kakehashi.mux")

#: True: this route; False: not this route; None: need more bytes to tell
Matcher = Callable[[bytes], bool | None]
Handler = Callable[[Conn], Awaitable[None]]

TLS_RECORD_HANDSHAKE = 0x16
#: the most bytes a matcher may look at before the mux decides (a route still
#: undecided then is not taken). Large enough for a grammar, not just a prefix:
#: an HTTP request line is only recognised as such at its version (8 KiB lines).
SNIFF_BYTES = 8 * 1024 + 64
#: seconds between peeks at a connection whose first bytes do not tell yet (doubling)
PEEK_PAUSE, PEEK_PAUSE_MAX = 0.005, 0.2


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
    #: the handler's way to take a connection without a task (see Listener)
    start_now: StartNow | None = None


class ProtocolMux:
    def __init__(self, *, tls: ServerTLS | None = None, sniff_bytes: int = SNIFF_BYTES,
                 timeout: float = 10.0) -> None:
        self.tls = tls
        self.sniff_bytes = sniff_bytes
        self.timeout = timeout
        self.routes: list[Route] = []
        self.fallback: Handler | None = None
        #: refuse plaintext: only TLS may open a connection
        self.require_tls = False
        self._starts_now = False  # a route can take a connection without a task

    def add(self, name: str, match: Matcher, handler: Handler, *,
            start_now: StartNow | None = None) -> None:
        """A route; ``start_now``: the handler's task-free start (see
        :class:`~kakehashi.core.stream.Listener`), offered plain connections whose
        first bytes are already there."""
        self.routes.append(Route(name, match, handler, start_now))
        self._starts_now = self._starts_now or start_now is not None

    def start_now(self, conn: Conn, held: Held, *, again: bool = True) -> Awaitable[None] | None:
        """The listener's offer of a new connection: when its first bytes are there
        and choose a plaintext route that can start without a task, that route takes
        it now; anything else (TLS, no bytes yet, no such route) is this mux's
        coroutine, exactly as without this offer.

        The offer comes straight from accept, often just before the client's first
        bytes: with none yet (``again``) the mux looks once more at the end of this
        loop pass, as a task started now would have, before it waits by coroutine."""
        if self.require_tls or not self._starts_now:
            return self(conn)
        try:
            head = self._peek_now(conn)
        except (OSError, ConnClosed):
            return self(conn)  # (the coroutine peeks again and reports it)
        if head is None and again:
            held.abort = held.end  # (nothing registered yet)
            conn.loop.call_soon(self._start_later, conn, held)
            return None
        if head is None or (self.tls is not None and head[:1] == bytes([TLS_RECORD_HANDSHAKE])):
            return self(conn)
        route = self._choose(head)
        if route is None or route.start_now is None:
            return self(conn)
        return route.start_now(conn, held)

    def _start_later(self, conn: Conn, held: Held) -> None:
        """:meth:`start_now`'s second look (unless the listener closed meanwhile)."""
        if not held.active:
            return
        try:
            work = self.start_now(conn, held, again=False)
        except Exception:  # a bug must cost one connection, not the listener
            log.exception("connection from %s failed at its start", conn.peer)
            held.end()
            return
        if work is not None:
            held.to_task(work)

    async def __call__(self, conn: Conn) -> None:
        try:
            head = self._peek_now(conn)  # usually there already: no timer, no wait
            if head is None:
                # (asyncio.timeout, not wait_for: no second task per connection)
                async with asyncio.timeout(self.timeout):
                    head = await self._peek(conn)
            if self.tls is not None and head[:1] == bytes([TLS_RECORD_HANDSHAKE]):
                conn = await start_tls(conn, context_now(self.tls), server_side=True,
                                     timeout=self.timeout)
                async with asyncio.timeout(self.timeout):
                    head = await self._read_ahead(conn)
            elif self.require_tls:
                log.debug("plaintext from %s refused (TLS required)", conn.peer)
                refuse(conn, tlsmismatch.plaintext_refusal(head))
                return
        except (TimeoutError, OSError, ConnClosed, ssl.SSLError) as exc:
            log.debug("no protocol from %s: %s", conn.peer, exc)
            conn.close()
            return
        route = self._choose(head)
        handler = route.handler if route is not None else self.fallback
        if handler is None and conn.plain and tlsmismatch.is_client_hello(head):
            refuse(conn, tlsmismatch.TLS_REFUSAL)  # TLS on a plaintext port: say so
            return
        try:
            if handler is not None:
                await handler(conn)
        finally:
            # the listener closes the plain connection it accepted; a TLS one made
            # here is this mux's to close (else the client waits for an EOF)
            conn.close()

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

    def _peek_now(self, conn: Conn) -> bytes | None:
        """The first bytes if enough of them are there already to choose a route."""
        try:
            head = conn.sock.recv(self.sniff_bytes, socket.MSG_PEEK)
        except BlockingIOError:
            return None
        if not head:
            raise ConnClosed("closed before saying anything")
        return head if self._decided(head) else None

    async def _peek(self, conn: Conn) -> bytes:
        """Look at the first bytes of a plain socket without consuming them."""
        pause = PEEK_PAUSE
        while True:
            try:
                head = conn.sock.recv(self.sniff_bytes, socket.MSG_PEEK)
            except BlockingIOError:
                await conn.wait_readable()
                continue
            if not head:
                raise ConnClosed("closed before saying anything")
            if self._decided(head) or _peer_done(conn):
                return head  # (after the peer's FIN no more bytes will tell more)
            # a few bytes are there but not enough to tell: the socket stays
            # readable while we peek, so wait a moment instead of spinning - longer
            # each time, so a sender dribbling a request line costs few wake-ups
            await asyncio.sleep(pause)
            pause = min(pause * 2, PEEK_PAUSE_MAX)

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


TCP_CLOSE_WAIT = 8  # linux/tcp_states.h: the peer has sent its FIN


def _peer_done(conn: Conn) -> bool:
    """Has the peer finished sending? A peek shows the bytes before a FIN but never
    the FIN itself, so without this a peer that sent half a greeting and closed
    would be peeked at until the timeout, holding a connection slot."""
    try:
        info = conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)
    except (OSError, AttributeError):  # not TCP, or not Linux
        return False
    return info[:1] == bytes([TCP_CLOSE_WAIT])

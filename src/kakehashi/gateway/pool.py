"""Idle upstream connections shared between client connections.

A client that sends one request per connection (``Connection: close``, HTTP/1.0,
a script running curl in a loop) would otherwise cost the gateway a TCP connect to
the target and a close for every request. When a client connection ends between
exchanges, its kept-alive upstream connection comes here, and the next client
connection to the same checked address takes it instead of connecting.

What is shared is only the TCP connection: every client connection still makes
(and audits) its own allow-list decision before it may take one, and a connection
is only pooled clean - between responses, with nothing unread. Connections are
pooled per proxy user, and one the origin may have tied to its client is never
pooled: a request carried ``Authorization`` or a response offered NTLM/Negotiate
(connection-based authentication, common on intranet servers), as haproxy's
``http-reuse safe`` does. It is checked again
when taken (the origin may have closed it meanwhile) and kept only briefly
(``idle`` seconds, shorter than common origin keep-alive timeouts, so the race of
an origin closing just as a request goes out stays rare; the relay means retries an
idempotent request once when it happens).

A pooled connection stays registered with the event loop: the pool watches it for
readiness (an idle upstream that becomes readable has closed or talked out of turn:
it is closed at once), and whoever takes it takes that registration over - the fast
lane by watching it with its own callback, the coroutine path by unwatching it -
so an upstream moving between client connections costs no epoll registration and
no libuv handle (measured: those were a fifth of the gateway's system calls with
one request per connection).
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time

from kakehashi.core.stream import Conn
from kakehashi.gateway import http
from kakehashi.gateway.exchange import Upstream

log = logging.getLogger("kakehashi.gateway.pool")

Key = tuple[str, int, str]  # (checked address, port, proxy user)

_AUTHORIZATION = re.compile(rb"\r\nauthorization:", re.IGNORECASE)
_CONNECTION_AUTH = re.compile(rb"\r\nwww-authenticate:[ \t]*(?:ntlm|negotiate)", re.IGNORECASE)


def binds_request(head: bytes | http.RequestHead) -> bool:
    """Does this request carry credentials for the origin (``Authorization``)?"""
    if isinstance(head, bytes):
        return _AUTHORIZATION.search(head) is not None
    return b"authorization" in head.headers._lower


def binds_response(head: bytes | http.ResponseHead) -> bool:
    """Does this response start a connection-based authentication (NTLM, Negotiate)?"""
    if isinstance(head, bytes):
        return _CONNECTION_AUTH.search(head) is not None
    return any(v.lstrip(b" \t").lower().startswith((b"ntlm", b"negotiate"))
               for v in head.headers.get_all(b"www-authenticate"))


def pool_key(upstream: Upstream) -> Key | None:
    """Where ``upstream`` may be pooled: per checked address and proxy user; None for
    a private connection or one a client connection used as several proxy users."""
    users = {user for (_, _, user) in upstream.decided}
    if upstream.private or len(users) != 1:
        return None
    return (*upstream.key, users.pop())


#: (a plain int: or-ing the socket module's flag enums costs more than the peek)
_PEEK_NOW = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)


def still_idle(conn: Conn) -> bool:
    """May a kept-alive upstream connection carry the next request? Origins close
    idle connections whenever they like (keep-alive timeouts): one that has sent
    EOF, a reset or stray bytes since its last response is not reused."""
    if conn.closed or conn.has_pushback:
        return False
    try:
        conn.sock.recv(1, _PEEK_NOW)
    except BlockingIOError:
        return True  # nothing to read: still open and quiet
    except OSError:
        return False
    return False  # EOF (b"") or unexpected bytes


class UpstreamPool:
    def __init__(self, *, idle: float = 4.0, per_target: int = 64, total: int = 256) -> None:
        self.idle = idle
        self.per_target = per_target
        self.total = total
        self._idle: dict[Key, list[tuple[float, Conn]]] = {}
        self._count = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self.reused = 0  # connections handed out again (for tests and logs)

    def __len__(self) -> int:
        return self._count

    def has(self, key: Key) -> bool:
        """Whether a connection to ``key`` is pooled (it may still turn out stale)."""
        return bool(self._idle.get(key))

    def take(self, key: Key) -> Conn | None:
        """The most recently pooled live connection to ``key``, or None. It is still
        watched by the pool: the taker replaces the watch (``watch_readable``) or
        ends it (``unwatch_readable``) before it next yields to the loop."""
        entries = self._idle.get(key)
        deadline = time.monotonic() - self.idle
        while entries:
            since, conn = entries.pop()
            self._count -= 1
            if since > deadline and still_idle(conn):
                self.reused += 1
                return conn
            conn.close()
        return None

    def release(self, upstream: Upstream) -> None:
        """A client connection is done with ``upstream`` (clean, between exchanges):
        pooled if it may serve another client connection, else closed."""
        key = pool_key(upstream)
        if key is None:
            log.debug("upstream not pooled: tied to its client connection")
            upstream.conn.close()
        else:
            self.give(key, upstream.conn)

    def give(self, key: Key, conn: Conn) -> None:
        """Keep a clean idle connection for another client connection (or close it).

        No liveness check here (take makes one): the watch set up here closes the
        connection when its origin closes it or sends anything while it waits."""
        if self.idle <= 0 or conn.closed or conn.has_pushback:
            conn.close()
            return
        entries = self._idle.setdefault(key, [])
        if len(entries) >= self.per_target or self._count >= self.total:
            conn.close()
            return
        entries.append((time.monotonic(), conn))
        self._count += 1
        conn.watch_readable(lambda: self._spoke(key, conn))
        # debug lines on what the pool does: for operators, and the moments tests wait for
        log.debug("upstream %s:%d pooled (%d idle)", key[0], key[1], self._count)
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(self.idle, self._sweep)

    def _spoke(self, key: Key, conn: Conn) -> None:
        """A pooled connection became readable: its origin closed it (or sent bytes
        no request asked for). Closed and forgotten."""
        entries = self._idle.get(key, [])
        for i, (_, c) in enumerate(entries):
            if c is conn:
                del entries[i]
                self._count -= 1
                break
        conn.close()
        log.debug("pooled upstream %s:%d closed by its origin", key[0], key[1])

    def _sweep(self) -> None:
        """Close what has idled too long or been closed by its origin."""
        self._sweeper = None
        deadline = time.monotonic() - self.idle
        for key in list(self._idle):
            keep = []
            for since, conn in self._idle[key]:
                if since > deadline and still_idle(conn):
                    keep.append((since, conn))
                else:
                    conn.close()
                    self._count -= 1
                    log.debug("pooled upstream %s:%d closed: idle too long or closed by "
                              "its origin", key[0], key[1])
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if self._count:
            self._sweeper = asyncio.get_running_loop().call_later(self.idle / 2, self._sweep)

    def close(self) -> None:
        for entries in self._idle.values():
            for _, conn in entries:
                conn.close()
        self._idle.clear()
        self._count = 0
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

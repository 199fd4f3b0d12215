"""The gateway's own endpoints: events through the one port (spec 001 Fig. 11) and health.

Origin-form requests (``GET /.well-known/kakehashi/events/TOPIC?cursor=N&wait=S``,
``POST`` to publish, ``GET /healthz``) are answered here, not relayed.

A poll can ask for a large backlog, and the client may never read the answer.
So a reply is never built whole: :mod:`~kakehashi.gateway.event_wire` chooses the
events that fit the reply limit (``max_bytes``, capped by :class:`EventLimits`)
and knows the body's size before any of it is encoded; the events are then encoded
one at a time as the client takes them. Encoded bytes waiting for a client are
bounded per reply (one write and one event) and across all clients: each reply
being written reserves that much from a shared :class:`ByteBudget` (a poll that
finds no room in time gets ``503`` and polls again). Every write has a deadline: a
client that takes nothing for ``read_timeout`` seconds is cut (RST), freeing what
it held, while everyone else is served.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import json
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from kakehashi.core.audit import AuditLog
from kakehashi.core.stream import Conn, ConnClosed
from kakehashi.gateway import http
from kakehashi.gateway.event_wire import SEP, SUFFIX, Reply, encode_event, plan_reply
from kakehashi.gateway.events import EventsUnavailable, TopicHub, b64_size

if TYPE_CHECKING:
    from kakehashi.gateway.server import GatewaySettings

log = logging.getLogger("kakehashi.gateway.events")

EVENTS_PREFIX = "/.well-known/kakehashi/events/"
#: bytes written per deadline: a client must take at least this much per read timeout
WRITE_SLICE = 64 * 1024
#: seconds a poll waits for room in the shared reply budget before a 503
BUDGET_WAIT = 2.0


@dataclass
class EventLimits:
    #: most bytes in one poll reply (a client's ``max_bytes`` may ask for less);
    #: the rest of a backlog comes with the next poll, from the reply's cursor
    reply_bytes: int = 8 * 1024 * 1024
    #: encoded reply bytes not yet taken by their clients, across all of them (each
    #: reply being written reserves what it may hold: about 150 KiB, or its size)
    buffered_bytes: int = 32 * 1024 * 1024


class ByteBudget:
    """Bytes that many tasks share (first come, first served).

    A reply holds its reservation until it is written or its client is cut, and a
    stopped client is cut within the read timeout, so room comes back.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = \
            collections.deque()

    async def acquire(self, n: int) -> int:
        """Take ``n`` bytes (at most the capacity); returns what to :meth:`release`."""
        n = min(n, self.capacity)
        if not self._waiters and self.used + n <= self.capacity:
            self.used += n
            return n
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(n)  # granted just as the waiter went away
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._grant()
            raise
        return n

    def release(self, n: int) -> None:
        self.used -= n
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.capacity:
            n, fut = self._waiters.popleft()
            if not fut.done():
                self.used += n
                fut.set_result(None)


def reply_head(head: http.RequestHead, status: int, ctype: str | None, length: int | None,
               extra: list[tuple[bytes, bytes]] | None = None) -> tuple[bytes, bool]:
    """The head of a reply of the gateway's own and whether the connection stays open
    (the client's Connection wish and version, as for relayed responses)."""
    reason = {200: b"OK", 202: b"Accepted", 204: b"No Content"}.get(status, b"OK")
    lines = [head.version + b" %d " % status + reason]
    if ctype:
        lines.append(b"Content-Type: " + ctype.encode())
    if length is not None:
        lines.append(b"Content-Length: %d" % length)
    for name, value in extra or []:
        lines.append(name + b": " + value)
    keep = http.wants_keep_alive(head)
    if not keep:
        lines.append(b"Connection: close")
    elif head.version != b"HTTP/1.1":
        lines.append(b"Connection: keep-alive")
    return b"\r\n".join(lines) + b"\r\n\r\n", keep


class LocalEndpoints:
    """Answers the origin-form requests a gateway receives (events, ``/healthz``)."""

    def __init__(self, hub: TopicHub, settings: GatewaySettings, audit: AuditLog,
                 authorise: Callable[[http.RequestHead, str, Conn], Awaitable[str]],
                 limits: EventLimits | None = None) -> None:
        self.hub = hub
        self.settings = settings
        self.audit = audit
        self.authorise = authorise
        self.limits = limits or EventLimits()
        self.budget = ByteBudget(self.limits.buffered_bytes)
        self.cut_clients = 0  # clients cut because they did not read

    async def handle(self, conn: Conn, head: http.RequestHead, target: http.Target) -> bool:
        """Answer one request; returns whether the connection stays open."""
        path, _, query = target.path.decode("latin-1").partition("?")
        if http.request_body(head) not in (http.NO_BODY, ("length", 0)) \
                and not (head.method == b"POST" and path.startswith(EVENTS_PREFIX)):
            # an unread body would be taken for the next request: refuse and close
            raise http.HTTPError(400, "this endpoint takes no request body")
        if path == "/healthz":
            return await self.reply(conn, head, 200, b"ok\n", "text/plain")
        if not path.startswith(EVENTS_PREFIX):
            raise http.HTTPError(400, "this is a forward proxy: send absolute-form requests "
                                      "(e.g. curl -x http://gateway:port http://target/)")
        topic = path[len(EVENTS_PREFIX):]
        await self.authorise(head, f"events/{topic}", conn)  # with --auth, events too
        if head.method == b"POST":
            return await self._publish(conn, head, topic)
        if head.method not in (b"GET", b"HEAD"):
            raise http.HTTPError(405, "events: use GET to poll, POST to publish")
        return await self._poll(conn, head, topic, parse_qs(query))

    async def _poll(self, conn: Conn, head: http.RequestHead, topic: str,
                    params: dict[str, list[str]]) -> bool:
        try:
            cursor = int(params.get("cursor", ["0"])[0])
            wait = float(params.get("wait", ["0"])[0])
            if not math.isfinite(wait):
                raise ValueError("wait must be a number of seconds")
            limit = self.limits.reply_bytes
            if "max_bytes" in params:
                limit = min(int(params["max_bytes"][0]), limit)
                if limit < 1:
                    raise ValueError("max_bytes must be positive")
            wait = min(wait, self.settings.max_wait)
            batch = await self.hub.wait(topic, cursor, max(wait, 0.0))
        except ValueError as exc:
            raise http.HTTPError(400, f"events: {exc}") from None
        except EventsUnavailable as exc:
            raise http.HTTPError(503, f"events: not available now ({exc})") from None
        gap = [(b"Kakehashi-Gap", b"1")] if batch.gap else []
        if not batch.events:  # Fig. 11, 702: no event
            return await self.reply(conn, head, 204, b"", None,
                                    [(b"Kakehashi-Cursor", str(batch.cursor).encode()), *gap])
        reply = plan_reply(batch, limit)  # 705: the events that fit, and where to go on
        out, keep = reply_head(head, 200, "application/json", reply.size,
                               [(b"Kakehashi-Cursor", str(reply.cursor).encode()), *gap])
        if head.method == b"HEAD":
            await self.send(conn, out)
            return keep
        # what this reply may hold encoded at once: one write's worth and one event
        need = min(len(out) + reply.size,
                   WRITE_SLICE + b64_size(self.hub.retention.max_event) + 256)
        try:
            async with asyncio.timeout(BUDGET_WAIT):
                held = await self.budget.acquire(need)
        except TimeoutError:
            raise http.HTTPError(503, "events: too many replies in flight, poll again") \
                from None
        try:
            await self._stream(conn, out, reply)
        finally:
            self.budget.release(held)
        return keep

    async def _stream(self, conn: Conn, out: bytes, reply: Reply) -> None:
        """Write the head, then the events encoded one by one as the client takes them
        (at most one write plus one event encoded and not yet sent)."""
        parts = [out, reply.prefix]
        pending = len(out) + len(reply.prefix)
        size = len(reply.prefix) + len(SUFFIX)
        for i, event in enumerate(reply.events):
            data = encode_event(event)
            if i:
                parts.append(SEP)
            parts.append(data)
            pending += len(data) + (len(SEP) if i else 0)
            size += len(data) + (len(SEP) if i else 0)
            if pending >= WRITE_SLICE:
                await self.send(conn, b"".join(parts))
                parts.clear()
                pending = 0
        if size != reply.size:  # a bug: the client would wait for bytes never coming
            log.error("events: a reply of %d bytes was announced as %d", size, reply.size)
            conn.abort()
            raise ConnClosed("event reply size mismatch")
        parts.append(SUFFIX)
        await self.send(conn, b"".join(parts))

    async def _publish(self, conn: Conn, head: http.RequestHead, topic: str) -> bool:
        client = conn.peer[0] if conn.peer else ""
        try:
            addr = ipaddress.ip_address(client)
        except ValueError:
            addr = None
        allowed = addr is not None and any(addr in net for net in self.settings.publishers)
        self.audit.record("publish", allowed, client=client, topic=topic)
        if not allowed:
            raise http.HTTPError(403, "events may only be published from internal networks")
        framing = http.request_body(head)
        if framing[0] != "length":
            raise http.HTTPError(411, "publish with a Content-Length body")
        if framing[1] > self.hub.retention.max_event:
            raise http.HTTPError(413, "event too large")
        data = bytearray()
        while len(data) < framing[1]:
            piece = await asyncio.wait_for(conn.recv(framing[1] - len(data)),
                                           self.settings.read_timeout)
            if not piece:
                raise ConnClosed("publisher closed in the middle of the body")
            data += piece
        key = head.headers.get(b"idempotency-key")
        if key is not None and not (0 < len(key) <= 128 and key.isascii()
                                    and key.decode().isprintable()):
            raise http.HTTPError(400, "events: an Idempotency-Key is 1-128 printable ASCII")
        try:  # stored before the publisher hears "accepted"
            event = await self.hub.publish_stored(topic, bytes(data),
                                                  key.decode() if key is not None else None)
        except ValueError as exc:
            raise http.HTTPError(400, f"events: {exc}") from None
        except EventsUnavailable as exc:
            raise http.HTTPError(503, f"events: the event could not be stored ({exc})") \
                from None
        return await self.reply(conn, head, 202, json.dumps({"seq": event.seq}).encode(),
                                "application/json")

    async def reply(self, conn: Conn, head: http.RequestHead, status: int, body: bytes,
                    ctype: str | None, extra: list | None = None) -> bool:
        """A small reply of the gateway's own; returns whether the connection stays open."""
        out, keep = reply_head(head, status, ctype, None if status == 204 else len(body),
                               extra)
        if head.method != b"HEAD":  # the same head as for GET, no body (RFC 9110 9.3.2)
            out += body
        await self.send(conn, out)
        return keep

    async def send(self, conn: Conn, data: bytes) -> None:
        """All of ``data``, or the client is cut: every slice of it must be taken
        within the read timeout (a slow reader is fine, a stopped one is not)."""
        view = memoryview(data)
        timeout = self.settings.read_timeout
        for start in range(0, len(view), WRITE_SLICE):
            try:
                async with asyncio.timeout(timeout):
                    await conn.send_all(view[start:start + WRITE_SLICE])
            except TimeoutError:
                self.cut_clients += 1
                log.info("events: cut client %s: it read nothing for %g s",
                         conn.peer[0] if conn.peer else "?", timeout)
                conn.abort()
                raise ConnClosed("the client did not read its reply in time") from None

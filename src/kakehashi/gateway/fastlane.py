"""The gateway's fast lane: kept-alive requests served from readiness callbacks.

Awaiting ``sock_recv`` costs an epoll registration, an unregistration and a task
wake-up per read; for small proxied requests that was most of the gateway's CPU.
Once a client connection has a kept-alive upstream and an allow-list decision for
its target (made by the coroutine path on the first request), the requests that
need nothing but socket readiness are served here: both sockets stay registered,
and each callback does its ``recv``, the sans-IO step (``gateway.http``) and its
``send``. That is: no request body or one that already arrived, and a response
with Content-Length (small) or no body.

Everything else is handed back to the coroutine path in the state reached
(:class:`~kakehashi.gateway.exchange.Handoff`): a new target or user, CONNECT,
the gateway's own endpoints, ``Expect``, chunked or large bodies, interim
responses, gzip decoding, errors. Every decision - which requests and responses
the lane takes, the target and upstream, retry, keep-alive, what a timeout or an
EOF means - is asked of the connection's sans-IO
:class:`~kakehashi.gateway.connection.GatewayConnection`, the same object the
coroutine path asks, so the fast lane is only a quicker way through the common
case. What it needs of the server is the :class:`LaneHost` interface.

Limits hold here as in the coroutine path: the head limits of ``HeadReader``,
bounded output buffering (reading stops while the client is not reading), and one
lazily re-armed timer per connection for the idle, head and upstream timeouts.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from kakehashi.core.stream import SMALL_CHUNK, Conn
from kakehashi.gateway import http
from kakehashi.gateway.allow import Decision
from kakehashi.gateway.connection import (
    DECIDED,
    REFUSE,
    SERVE,
    TAKE_POOLED,
    GatewayConnection,
    LaneRoute,
)
from kakehashi.gateway.exchange import Exchange, Handoff, Upstream
from kakehashi.gateway.pool import UpstreamPool, binds_request, binds_response, still_idle
from kakehashi.gateway.quick import (
    QuickRequest,
    QuickResponse,
    quick_request,
    quick_response,
)

READ_HEAD, WAIT_RESPONSE, BODY = range(3)


class LaneHost(Protocol):
    """What the fast lane needs of the server: I/O services, no decisions."""

    pool: UpstreamPool

    def cached_user(self, header: bytes | None) -> str | None:
        """The proxy user of credentials verified recently (no waiting), else None."""

    def record_decision(self, decision: Decision, host: str, port: int, user: str,
                        conn: Conn) -> None:
        """Audit an allow-list decision."""

    def log_request(self, conn: Conn, head: http.RequestHead | QuickRequest, status: int,
                    size: int, start: float, user: str, target: str) -> None:
        """One access-log line."""

    def send_batcher(self) -> SendBatcher:
        """The shared end-of-pass sender."""

    def head_memo(self) -> HeadMemo:
        """The shared memory of rewritten heads."""


@dataclass(slots=True)
class RequestEntry:
    """What :class:`HeadMemo` keeps of a request head.

    The quick request's fields that the lane reads per request are copied out: a
    slot is read at a fixed offset, where a NamedTuple's field is a generic
    attribute lookup in CPython 3.11 (its descriptor is not specialised)."""

    quick: QuickRequest | None  # None: not the common case
    binds: bool  # it carries credentials for the origin (binds_request)
    where: str  # host:port, for the access log
    out: bytes = field(init=False, compare=False, repr=False)
    close: bool = field(init=False, compare=False, repr=False)
    auth: bytes | None = field(init=False, compare=False, repr=False)
    host: str = field(init=False, compare=False, repr=False)
    port: int = field(init=False, compare=False, repr=False)
    method: bytes = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        q = self.quick
        if q is None:
            self.out, self.close, self.auth, self.host, self.port, self.method = \
                b"", False, None, "", 0, b""
        else:
            self.out, self.close, self.auth, self.method = q.out, q.close, q.auth, q.method
            self.host, self.port = q.dest.host, q.dest.port


@dataclass(slots=True)
class ResponseEntry:
    """What :class:`HeadMemo` keeps of a response head (the quick response's fields
    copied out, as in :class:`RequestEntry`)."""

    quick: QuickResponse | None
    binds: bool  # it starts a connection-based authentication (binds_response)
    status: int = field(init=False, compare=False, repr=False)
    length: int = field(init=False, compare=False, repr=False)
    out: bytes = field(init=False, compare=False, repr=False)
    upstream_keep: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        q = self.quick
        if q is None:
            self.status, self.length, self.out, self.upstream_keep = 0, 0, b"", False
        else:
            self.status, self.length, self.out, self.upstream_keep = \
                q.status, q.length, q.out, q.upstream_keep


_NO_REQUEST = RequestEntry(None, False, "")
#: request fields that carry secrets (see HeadMemo)
_CREDENTIALS = re.compile(rb"\r\n(?:proxy-authorization|authorization|cookie):", re.IGNORECASE)
_NO_RESPONSE = ResponseEntry(None, False)


class HeadMemo:
    """:func:`quick_request` and :func:`quick_response` results by head, shared by
    one gateway's lanes.

    Clients repeat their request heads byte for byte (every request of a kept-alive
    client, and every one-request connection of the same program), and an origin
    its response heads (whose Date changes once a second); both functions are pure -
    their result depends on nothing but the head's bytes, this gateway's Via name and
    limits, and for a response the request's method and ``Connection: close`` - so
    an equal head is not validated and rewritten again. Bounded: heads longer than
    :attr:`HEAD_MAX` are not kept, and a full memory starts over (a client sending
    ever new heads costs an insertion each, nothing more).

    Request heads with credentials (``Proxy-Authorization``, ``Authorization``,
    ``Cookie``) are not kept: the memory is shared by every client, and a lookup
    that hits is measurably quicker, so another client could otherwise learn by
    timing whether someone sent exactly that head lately - an oracle on secrets
    that no login throttle counts.
    """

    HEAD_MAX = 2048
    ENTRIES = 512

    def __init__(self, via: bytes, limits: http.HeadLimits) -> None:
        self.via = via
        self.limits = limits
        self.requests: dict[bytes, RequestEntry] = {}
        self.responses: dict[tuple[bytes, bytes, bool], ResponseEntry] = {}

    def request(self, raw: bytes) -> RequestEntry:
        entry = self.requests.get(raw)
        if entry is not None:
            return entry
        quick = quick_request(raw, self.via, self.limits)
        entry = _NO_REQUEST if quick is None else RequestEntry(
            quick, binds_request(quick.out), f"{quick.dest.host}:{quick.dest.port}")
        if len(raw) <= self.HEAD_MAX and _CREDENTIALS.search(raw) is None:
            if len(self.requests) >= self.ENTRIES:
                self.requests.clear()
            self.requests[raw] = entry
        return entry

    def response(self, raw: bytes, method: bytes, close: bool) -> ResponseEntry:
        key = (raw, method, close)
        entry = self.responses.get(key)
        if entry is not None:
            return entry
        quick = quick_response(raw, self.via, method, close, self.limits)
        entry = _NO_RESPONSE if quick is None else ResponseEntry(
            quick, binds_response(quick.out))
        if len(raw) <= self.HEAD_MAX:
            if len(self.responses) >= self.ENTRIES:
                self.responses.clear()
            self.responses[key] = entry
        return entry


class SendBatcher:
    """Sends decided during one pass of the event loop go out together at its end.

    Each send to a sleeping peer (the client, the origin) costs a wake-up of that
    peer's CPU; made back to back instead of between the heads' processing, the
    wake-ups overlap (measured: about 12 % more requests/s on 2 vCPUs). Nothing
    waits longer than the rest of the current pass.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lanes: list[FastLane] = []
        self._flush_soon = self._flush  # (bound once, not per loop pass)

    def add(self, lane: FastLane) -> None:
        lanes = self.lanes
        if not lanes:
            self.loop.call_soon(self._flush_soon)
        lanes.append(lane)

    def _flush(self) -> None:
        lanes, self.lanes = self.lanes, []
        for lane in lanes:
            lane._flush()


class FastLane:
    """Serves one client connection's requests until one needs the coroutine path."""

    # Slots, not an instance dict: the lane's ~40 attributes are more than a shared
    # dict's keys hold (30 in CPython 3.11), so an instance dict was a plain one and
    # every read of an attribute left at a class default missed it first and took
    # the generic lookup; a slot is read at a fixed offset (LOAD_ATTR_SLOT).
    __slots__ = (
        "__weakref__", "batcher", "body_sent", "c_reading", "cfd", "client_eof",
        "client_keep", "conn", "cq", "csock", "deadline", "exchange", "fut", "gc", "host",
        "last_in_flight", "limits", "loop", "memo", "on_end", "out", "pending", "policy",
        "pooled", "queued", "quick", "quick_entry", "quick_raw", "quick_start",
        "quick_user", "reader", "remaining", "resp_entry", "resp_for", "resp_raw",
        "rreader", "size", "spoiled", "state", "status", "timer", "timer_at", "u_reading",
        "uconn", "ufd", "up_out", "up_writing", "upstream_keep", "uq", "usock", "via",
        "writing")

    def __init__(self, host: LaneHost, gc: GatewayConnection, conn: Conn) -> None:
        self.host = host
        self.gc = gc
        self.policy = policy = gc.policy
        self.via = policy.via
        self.limits = policy.limits
        self.loop = conn.loop
        self.conn = conn
        self.csock: socket.socket = conn.sock
        self.cfd = conn.sock.fileno()
        self.uconn: Conn | None = None
        self.usock: socket.socket | None = None
        self.ufd = -1
        self.state = READ_HEAD
        self.exchange: Exchange | None = None
        #: the request in flight when it took the quick common case (gateway.quick):
        #: its raw head, user and start; an Exchange is built only if needed
        self.quick: QuickRequest | None = None
        self.quick_raw = b""
        self.quick_user = "-"
        self.quick_start = 0.0
        #: the memory's entry of the quick request in flight. With quick_raw, it stays
        #: after the exchange: a kept-alive client repeats its head byte for byte, and
        #: comparing with the connection's last one (a memcmp) spares hashing the head
        #: for the shared memory. (Only this connection's own bytes are compared, so
        #: it tells a client nothing about other clients' heads.)
        self.quick_entry = _NO_REQUEST
        #: likewise the upstream's last response head, for which request entry, and
        #: the memory's answer
        self.resp_raw = b""
        self.resp_for = _NO_REQUEST
        self.resp_entry = _NO_RESPONSE
        self.status = 0
        self.client_keep = True
        self.upstream_keep = True
        self.size = 0
        self.remaining = 0
        self.spoiled = False  # the upstream sent bytes beyond its response
        self.body_sent = False  # the request in flight had a body (not repeatable)
        self.queued = False
        self.out = b""  # bytes the client has not taken yet (reading pauses meanwhile)
        self.up_out = b""  # bytes the upstream has not taken yet
        self.client_eof = False
        #: the request in flight asked to close the connection: nothing the client
        #: sends until its response matters, so the client is not read meanwhile
        #: (an EOF or a reset then shows on the response's send)
        self.last_in_flight = False
        self.c_reading = False
        self.u_reading = False
        self.writing = False
        self.up_writing = False
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.pending: Handoff | None = None  # decided, waiting for self.out to drain
        #: called with the handoff as soon as the lane ends (beside :attr:`fut`, whose
        #: waiters wake a loop pass later): a driver without a task ends the connection
        #: at once - its upstream is back in the pool before the next accept looks there
        self.on_end: Callable[[Handoff], None] | None = None
        if gc.upstream is not None:
            self._watch_upstream(gc.upstream)
        self.reader = http.HeadReader(self.limits)  # the client's requests
        self.rreader = http.HeadReader(self.limits)  # the upstream's responses
        self.memo = host.head_memo()
        self.batcher: SendBatcher = host.send_batcher()
        self.pooled = host.pool.has
        self.cq: list[bytes] = []  # for the client, sent at the end of this loop pass
        self.uq: list[bytes] = []  # for the upstream, likewise
        self.fut: asyncio.Future[Handoff] = self.loop.create_future()

    @property
    def clean(self) -> bool:
        """The upstream (if any) is between exchanges: nothing sent or owed."""
        return self.state == READ_HEAD and not self.uq and not self.up_out

    async def run(self) -> Handoff:
        """Serve until a request needs the coroutine path; the upstream stays the
        connection's (``gc.upstream``)."""
        self.start()
        try:
            return await self.fut
        finally:
            self._unregister()

    def stop(self) -> None:
        """Stop every callback now (the lane's end is then its driver's business)."""
        self.on_end = None
        self._unregister()

    def start(self) -> None:
        """Start serving; the end is :attr:`fut`'s result (a Handoff), set from a
        callback - or already, when the first request needs the coroutine path."""
        conn = self.conn
        if conn.has_pushback:
            self.reader.feed(conn.take_pushback(conn.pushback_size))
        up = self.gc.upstream
        if up is not None and not still_idle(up.conn):
            # stray bytes (say a body sent after a HEAD answer) or a close since the
            # coroutine's exchange: the next request must not read them as its answer
            self._drop_upstream()
        self._arm(self.gc.request_timeout)
        if self.gc.first and not self.reader.buffered:
            # a new connection's request is usually there already (the mux saw its
            # first bytes): read it before registering the socket - a client that
            # sends one request and Connection: close is then never registered
            self._on_client()
        if not self.fut.done():
            self._resume()
            self._next_request()

    # -- registration ------------------------------------------------------------
    def _resume(self) -> None:
        """Read what the current state needs (unless output is backed up)."""
        if self.fut.done() or self.out or self.up_out:
            return
        if not self.c_reading and not self.client_eof and not self.last_in_flight \
                and self.reader.buffered <= self.limits.max_head:
            self.loop.add_reader(self.cfd, self._on_client)
            self.c_reading = True
        if not self.u_reading and self.uconn is not None:
            # (through the Conn: a pooled upstream is already watched by the pool,
            # and taking over its registration costs no epoll or libuv handle)
            self.uconn.watch_readable(self._on_upstream)
            self.u_reading = True

    def _pause(self) -> None:
        if self.c_reading:
            self.loop.remove_reader(self.cfd)
            self.c_reading = False
        if self.u_reading:
            assert self.uconn is not None
            self.uconn.unwatch_readable()
            self.u_reading = False

    def _unregister(self, *, idle_upstream: bool = False) -> None:
        """Stop every callback of this lane. ``idle_upstream``: the upstream is left
        between exchanges (it goes to the pool or is closed next), so its readiness
        watch is handed on instead of removed - an idle upstream that speaks or
        closes meanwhile is closed - and the pool takes it over for nothing."""
        if idle_upstream and self.u_reading and self.uconn is not None:
            self.uconn.watch_readable(self.uconn.close)
            self.u_reading = False
        self._pause()
        if self.writing:
            self.loop.remove_writer(self.cfd)
            self.writing = False
        if self.up_writing and self.usock is not None:
            self.loop.remove_writer(self.ufd)
        self.up_writing = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _finish(self, handoff: Handoff) -> None:
        if self.fut.done() or self.pending is not None:
            return
        if self.out or self.cq:  # what was decided waits for the client's bytes to go
            self.pending = handoff
            return
        if handoff.kind in ("head", "response"):  # the coroutine goes on with this
            # connection: requests pipelined behind this one must still be there
            rest = self.reader.take_rest()
            if rest:
                self.conn.unread(rest)
        self._unregister(idle_upstream=handoff.kind in ("eof", "close") and self.clean)
        self.fut.set_result(handoff)
        on_end, self.on_end = self.on_end, None  # (a closure over this lane: no cycle)
        if on_end is not None:
            on_end(handoff)

    def _watch_upstream(self, upstream: Upstream) -> None:
        self.uconn = upstream.conn
        self.usock = upstream.conn.sock
        self.ufd = upstream.conn.sock.fileno()

    def _unwatch_upstream(self, *, keep_watch: bool = False) -> None:
        """Stop serving the upstream (``keep_watch``: its readiness watch goes on,
        for the pool that takes it now)."""
        if self.u_reading:
            if not keep_watch:
                assert self.uconn is not None
                self.uconn.unwatch_readable()
            self.u_reading = False
        if self.up_writing:
            self.loop.remove_writer(self.ufd)
            self.up_writing = False
        self.uconn = None
        self.usock = None
        self.ufd = -1
        self.uq = []

    def _drop_upstream(self) -> None:
        """Let go of the upstream (failed, stale or not to be kept): closed."""
        up = self.gc.detach()
        if up is not None:
            self._unwatch_upstream()
            up.conn.close()

    # -- timeouts: one timer, re-armed only when a deadline comes closer ----------
    def _arm(self, seconds: float) -> None:
        """The deadline is ``seconds`` from now. (Inline in the per-request steps:
        set :attr:`deadline`, and :meth:`_set_timer` only when it comes closer.)"""
        self.deadline = deadline = self.loop.time() + seconds
        if self.timer is None or self.timer_at > deadline:
            self._set_timer(deadline)

    def _set_timer(self, deadline: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_at(deadline, self._on_timer)
        self.timer_at = deadline

    def _on_timer(self) -> None:
        if self.loop.time() < self.deadline:
            self.timer = self.loop.call_at(self.deadline, self._on_timer)
            self.timer_at = self.deadline
            return
        self.timer = None
        if self.out:
            self.pending = None
            self.out = b""
            self.cq = []
            return self._finish(Handoff("abort", reason="client stopped reading"))
        if self.state == READ_HEAD:
            error = self.gc.idle_end(self.reader.buffered, eof=False)
            return self._finish(Handoff("error", error=error) if error else Handoff("eof"))
        self._drop_upstream()
        if self.state == WAIT_RESPONSE:
            return self._finish(Handoff("error", head=self._head(), error=http.HTTPError(
                504, "upstream did not answer in time")))
        return self._finish(Handoff("abort", reason="upstream body stalled"))

    def _head(self) -> http.RequestHead | None:
        ex = self._current()
        return ex.head if ex is not None else None

    def _current(self) -> Exchange | None:
        """The exchange in flight (built from the quick request's bytes on demand)."""
        q = self.quick
        if self.exchange is None and q is not None:
            limits = self.limits
            self.exchange = Exchange(http.parse_request(self.quick_raw, limits),
                                     http.parse_request(q.out[:-4], limits), q.dest,
                                     self.quick_user, self.quick_start)
        return self.exchange

    # -- the client's side ---------------------------------------------------------
    def _on_client(self) -> None:
        try:
            data = self.csock.recv(SMALL_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            return self._finish(Handoff("abort", reason=f"client: {exc}"))
        if not data:
            self.client_eof = True
            if self.c_reading:
                self.loop.remove_reader(self.cfd)
                self.c_reading = False
            if self.state == READ_HEAD:
                error = self.gc.idle_end(self.reader.buffered, eof=True)
                return self._finish(Handoff("error", error=error) if error else Handoff("eof"))
            return None  # the response in flight is still delivered (half-close)
        if self.state == READ_HEAD and not self.reader.buffered \
                and data.find(b"\r\n\r\n") == len(data) - 4 and data[:2] != b"\r\n" \
                and not (self.out or self.pending or self.fut.done()):
            # exactly one whole head, the usual keep-alive request: no reader needed
            raw = data[:-4]
            if raw == self.quick_raw:  # this connection's last quick request again
                entry = self.quick_entry
            else:
                entry = self.memo.requests.get(raw)  # (HeadMemo.request, its hit inline)
                if entry is None:
                    entry = self.memo.request(raw)
            if entry.quick is not None:
                return self._start_quick(entry, raw)
        self.reader.feed(data)
        if self.state == READ_HEAD:
            self._next_request()
        elif self.reader.buffered > self.limits.max_head and self.c_reading:
            self.loop.remove_reader(self.cfd)  # pipelining ahead: wait for our turn
            self.c_reading = False

    def _next_request(self) -> None:
        if self.fut.done() or self.pending is not None or self.out \
                or self.state != READ_HEAD:
            return
        if not self.reader.buffered:  # the usual case after a response: wait
            return self._finish(Handoff("eof")) if self.client_eof else self._resume()
        limits = self.limits
        try:
            raw = self.reader.next_raw(skip_blank=True)
            if raw is None:
                if self.client_eof:
                    return self._finish(Handoff("error", error=self.gc.idle_end(
                        self.reader.buffered, eof=True)))
                return self._resume()
            entry = self.memo.request(raw)
            if entry.quick is not None:
                return self._start_quick(entry, raw)
            head = http.parse_request(raw, limits)
        except http.HTTPError as exc:
            return self._finish(Handoff("error", error=exc))
        self._start(head)

    def _start_quick(self, entry: RequestEntry, raw: bytes) -> None:
        """The common case: checks from the connection's caches, then one send."""
        q = entry.quick
        assert q is not None
        gc = self.gc
        user = self.host.cached_user(entry.auth) if self.policy.auth else "-"
        self.last_in_flight = entry.close  # (before _route, which may resume reading)
        route = gc.lane_route(entry.host, entry.port, user, self.pooled)
        if route is not DECIDED:  # (DECIDED: served on a decision made before)
            ready = self._carry_out(route, q.dest, user)
            if ready is not True:
                head = http.parse_request(raw, self.limits)
                if isinstance(ready, http.HTTPError):  # refused by the allow-list (audited)
                    gc.started()
                    return self._finish(Handoff("error", head=head, error=ready))
                return self._finish(Handoff("head", head=head))
        gc.started()
        if entry.binds:
            up = gc.upstream
            assert up is not None
            up.private = True
        self.quick, self.quick_raw, self.quick_entry = q, raw, entry
        self.quick_user, self.quick_start = user, time.monotonic()  # type: ignore[assignment]
        self.exchange = None
        self.body_sent = False
        self.state = WAIT_RESPONSE
        self.deadline = deadline = self.loop.time() + self.policy.read_timeout  # (_arm)
        if self.timer_at > deadline or self.timer is None:
            self._set_timer(deadline)
        if self.up_out:  # (_to_upstream, inline)
            self.up_out += entry.out
            return
        self.uq.append(entry.out)
        if not self.queued:
            self.queued = True
            self.batcher.add(self)

    def _route(self, dest: http.Target, user: str | None) -> bool | http.HTTPError:
        """Carry out the connection's :meth:`~GatewayConnection.lane_route`: True when
        the upstream is ready for ``dest``, the 403 to answer when refused, False to
        leave the request to the coroutine path."""
        return self._carry_out(self.gc.lane_route(dest.host, dest.port, user, self.pooled),
                               dest, user)

    def _carry_out(self, route: LaneRoute, dest: http.Target,
                   user: str | None) -> bool | http.HTTPError:
        """:meth:`_route` once the connection has answered."""
        gc = self.gc
        host, port = dest.host, dest.port
        action, decision = route
        if action == SERVE and decision is None:
            return True  # the usual case: decided on this connection before
        if decision is None:
            return False
        assert user is not None
        if action == TAKE_POOLED:
            assert decision.address is not None
            key = (decision.address, port)
            pooled = self.host.pool.take((*key, user))
            if pooled is None:  # gone stale since has(): let the coroutine connect
                return False
            self.host.record_decision(decision, host, port, user, self.conn)
            old = gc.attach(Upstream(key, pooled), fresh=False)
            if old is not None:  # clean (between exchanges): pooled
                self._unwatch_upstream(keep_watch=True)
                self.host.pool.release(old)
            self._watch_upstream(gc.upstream)  # type: ignore[arg-type]
            self._resume()
            if not self.u_reading:  # (output backed up) the pool's watch must not stay
                pooled.unwatch_readable()
        else:
            self.host.record_decision(decision, host, port, user, self.conn)
            if action == REFUSE:
                return http.HTTPError(403, decision.reason)
        assert decision.address is not None
        gc.remember(host, port, user, decision.address)
        return True

    def _start(self, head: http.RequestHead) -> None:
        """Send ``head`` upstream if the fast lane can serve it, else hand it over."""
        gc = self.gc
        if not gc.lane_takes_request(head):
            return self._finish(Handoff("head", head=head))
        try:
            target, framing, out_head = http.relay_request(head, self.via)
            if target.form != "absolute":
                return self._finish(Handoff("head", head=head))
            user = self.host.cached_user(head.headers.get(b"proxy-authorization")) \
                if self.policy.auth else "-"
            ready = self._route(target, user)
            if isinstance(ready, http.HTTPError):  # refused by the allow-list (audited)
                gc.started()
                return self._finish(Handoff("error", head=head, error=ready))
            if ready is not True or not gc.lane_takes_body(framing, self.reader.buffered):
                return self._finish(Handoff("head", head=head))
            assert user is not None
            body = b""
            if framing != http.NO_BODY:
                rest = self.reader.take_rest()
                body, rest = rest[: framing[1]], rest[framing[1]:]  # type: ignore[misc]
                if rest:
                    self.reader.feed(rest)
        except http.HTTPError:
            # the coroutine path repeats the check and answers with the error
            return self._finish(Handoff("head", head=head))
        gc.started()
        up = gc.upstream
        assert up is not None
        if binds_request(head):
            up.private = True
        self.body_sent = bool(body)
        self.quick = None
        self.exchange = Exchange(head, out_head, target, user, time.monotonic())
        self.state = WAIT_RESPONSE
        self._arm(self.policy.read_timeout)
        self._to_upstream(out_head.serialize() + body if body else out_head.serialize())

    def _to_client(self, data: bytes) -> None:
        if self.out:  # blocked: behind what the client has not taken
            self.out += data
            return
        self.cq.append(data)
        self._queue()

    def _to_upstream(self, data: bytes) -> None:
        if self.up_out:
            self.up_out += data
            return
        self.uq.append(data)
        self._queue()

    def _queue(self) -> None:
        if not self.queued:
            self.queued = True
            self.batcher.add(self)

    def _flush(self) -> None:
        """The end of the loop pass: send what was queued (see :class:`SendBatcher`).
        Each send is made here, not in a method of its own (a Python call per send);
        what a socket does not take whole goes to :meth:`_upstream_unsent` or
        :meth:`_client_unsent`."""
        self.queued = False
        if self.fut.done():
            return
        uq = self.uq
        if uq:
            data = uq[0] if len(uq) == 1 else b"".join(uq)
            uq.clear()
            assert self.usock is not None
            try:
                n = self.usock.send(data)
            except OSError as exc:
                self._upstream_unsent(data, exc)
            else:
                if n < len(data):
                    self._upstream_unsent(data[n:], None)
        cq = self.cq
        if cq and not self.fut.done():
            data = cq[0] if len(cq) == 1 else b"".join(cq)
            cq.clear()
            try:
                n = self.csock.send(data)
            except OSError as exc:
                self._client_unsent(data, exc)
            else:
                if n < len(data):
                    self._client_unsent(data[n:], None)
        if self.pending is not None and not self.out and not self.cq:
            handoff, self.pending = self.pending, None
            self._finish(handoff)

    def _client_unsent(self, rest: bytes, exc: OSError | None) -> None:
        """The client did not take ``rest`` (``exc``: the send failed, nothing went):
        keep it and wait until the socket is writable, or end on an error."""
        if exc is not None and not isinstance(exc, BlockingIOError | InterruptedError):
            self.pending = None
            return self._finish(Handoff("abort", reason=f"client: {exc}"))
        self.out = rest
        self._pause()
        self.loop.add_writer(self.cfd, self._on_client_writable)
        self.writing = True
        self._arm(self.policy.idle_timeout)

    def _on_client_writable(self) -> None:
        try:
            n = self.csock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.out = b""
            self.pending = None
            return self._finish(Handoff("abort", reason=f"client: {exc}"))
        self.out = self.out[n:]
        if self.out:
            self._arm(self.policy.idle_timeout)
            return
        self.loop.remove_writer(self.cfd)
        self.writing = False
        if self.pending is not None:
            handoff, self.pending = self.pending, None
            return self._finish(handoff)
        self._arm(self.policy.idle_timeout if self.state == READ_HEAD
                  else self.policy.read_timeout)
        self._resume()
        self._next_request()

    # -- the upstream's side -------------------------------------------------------
    def _upstream_unsent(self, rest: bytes, exc: OSError | None) -> None:
        """The upstream did not take ``rest`` (``exc``: the send failed, nothing went):
        keep it and wait until the socket is writable, or treat it as gone."""
        if exc is not None and not isinstance(exc, BlockingIOError | InterruptedError):
            return self._upstream_gone()
        self.up_out = rest
        self._pause()
        self.loop.add_writer(self.ufd, self._on_upstream_writable)
        self.up_writing = True

    def _on_upstream_writable(self) -> None:
        assert self.usock is not None
        try:
            n = self.usock.send(self.up_out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self._upstream_gone()
        self.up_out = self.up_out[n:]
        if not self.up_out:
            self.loop.remove_writer(self.ufd)
            self.up_writing = False
            self._resume()

    def _on_upstream(self) -> None:
        assert self.usock is not None
        try:
            data = self.usock.recv(SMALL_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            return self._upstream_gone()
        if self.state == WAIT_RESPONSE:
            if self.quick is not None and not self.rreader.buffered:
                end = data.find(b"\r\n\r\n")  # the usual case: a whole head arrived
                if end >= 0:
                    # (_quick_response, with the memory's hit inline)
                    raw = data[:end]
                    q = self.quick_entry
                    if raw == self.resp_raw and q is self.resp_for:  # as last time
                        entry = self.resp_entry
                    else:
                        entry = self.memo.responses.get((raw, q.method, q.close))
                        if entry is None:
                            entry = self.memo.response(raw, q.method, q.close)
                        self.resp_raw, self.resp_for, self.resp_entry = raw, q, entry
                    if entry.quick is not None and self.gc.lane_takes_quick_response(
                            entry.length, len(data) - end - 4):
                        return self._send_quick(entry, data[end + 4:])
            self.rreader.feed(data)
            self._response()
        elif self.state == BODY:
            self._body(data)
        else:  # an idle upstream talking out of turn is not reused
            self._drop_upstream()

    def _upstream_gone(self) -> None:
        """The upstream closed (or failed): what that means depends on the state."""
        self._drop_upstream()
        if self.state == READ_HEAD:
            return None  # an idle kept-alive upstream timed out; the next request reopens
        if self.state == WAIT_RESPONSE:
            ex = self._current()
            assert ex is not None
            if self.gc.may_retry(ex.head.method, head_sent=True, body_sent=self.body_sent,
                                 answered=bool(self.rreader.buffered)):
                # closed before answering: the coroutine sends it again (fresh connection)
                self.gc.withdrawn()
                return self._finish(Handoff("head", head=ex.head))
            why = "connection closed in the middle of a head" if self.rreader.buffered \
                else "upstream closed without answering"
            return self._finish(Handoff("error", head=ex.head,
                                        error=http.HTTPError(502, why)))
        return self._finish(Handoff("abort", reason="upstream closed in the middle of a body"))

    def _response(self) -> None:
        q = self.quick
        try:
            raw = self.rreader.next_raw(skip_blank=False)
            if raw is None:
                return None
            if q is not None:
                quick = self._quick_response(raw, self.rreader.buffered)
                if quick is not None:
                    return self._send_quick(quick, self.rreader.take_rest())
            resp = http.parse_response(raw, self.limits)
        except http.HTTPError as exc:
            self._drop_upstream()
            return self._finish(Handoff("error", head=self._head(),
                                        error=http._as_upstream_error(exc)))
        ex = self._current()
        assert ex is not None
        try:
            relayed = http.relay_response(resp, self.via, ex.head, ex.out_head)
        except http.HTTPError:
            return self._hand_response(resp)  # the coroutine path reports it
        framing = relayed.framing
        if not self.gc.lane_takes_response(resp.status, framing, self.rreader.buffered):
            return self._hand_response(resp)
        n: int = framing[1] if framing[0] == "length" else 0  # type: ignore[misc]
        rest = self.rreader.take_rest()
        self.client_keep = relayed.client_keep
        self.upstream_keep = relayed.upstream_keep
        self._send_response(relayed.head.serialize(), resp.status, n, rest)

    def _quick_response(self, raw: bytes, arrived: int) -> ResponseEntry | None:
        """The common case for the quick request in flight (``arrived``: body bytes
        already here), unless its body is big enough for the coroutine's pump."""
        if self.quick is None:
            return None
        q = self.quick_entry
        entry = self.memo.response(raw, q.method, q.close)
        if entry.quick is None or not self.gc.lane_takes_quick_response(entry.length,
                                                                          arrived):
            return None
        return entry

    def _send_quick(self, entry: ResponseEntry, rest: bytes) -> None:
        assert self.quick is not None and entry.quick is not None
        self.client_keep = not self.quick_entry.close
        self.upstream_keep = entry.upstream_keep
        n = entry.length
        if len(rest) != n or entry.binds:
            return self._send_response(entry.out, entry.status, n, rest, entry.binds)
        # the usual case, _send_response inline: the whole body came with the head
        self.status = entry.status
        self.size = n
        data = entry.out + rest if n else entry.out
        if self.out:  # (_to_client, inline)
            self.out += data
        else:
            self.cq.append(data)
            if not self.queued:
                self.queued = True
                self.batcher.add(self)
        self._complete()

    def _send_response(self, head: bytes, status: int, n: int, rest: bytes,
                       binds: bool | None = None) -> None:
        """The client's head and the ``n`` body bytes that follow (``rest`` came
        with the upstream's head); ``binds``: the head starts a connection-based
        authentication (None: not known yet)."""
        self.status = status
        self.size = n
        up = self.gc.upstream
        if up is not None and (binds_response(head) if binds is None else binds):
            up.private = True  # connection-based auth: never pooled
        if len(rest) >= n:
            self.spoiled = len(rest) > n
            self._to_client(head + rest[:n] if n else head)
            return self._complete()
        self._to_client(head + rest)
        self.remaining = n - len(rest)
        self.state = BODY
        self._arm(self.policy.read_timeout)

    def _hand_response(self, resp: http.ResponseHead) -> None:
        up = self.gc.upstream
        assert up is not None
        rest = self.rreader.take_rest()
        if rest:
            up.conn.unread(rest)
        ex = self._current()
        self._finish(Handoff("response", head=ex.head if ex else None, exchange=ex,
                             response=resp))

    def _body(self, data: bytes) -> None:
        if len(data) > self.remaining:
            self.spoiled = True
            data = data[: self.remaining]
        self.remaining -= len(data)
        self._to_client(data)
        if self.remaining == 0:
            return self._complete()
        self._arm(self.policy.read_timeout)

    def _complete(self) -> None:
        q, ex = self.quick, self.exchange
        if ex is not None:
            self.host.log_request(self.conn, ex.head, self.status, self.size, ex.start,
                                  ex.user, ex.where)
        elif q is not None:
            self.host.log_request(self.conn, q, self.status, self.size, self.quick_start,
                                  self.quick_user, self.quick_entry.where)
        keep, drop = self.gc.done(client_keep=self.client_keep,
                                  upstream_keep=self.upstream_keep, spoiled=self.spoiled)
        if drop is not None:
            self._unwatch_upstream()
            drop.conn.close()
        self.spoiled = False
        self.exchange = self.quick = None
        self.last_in_flight = False
        self.state = READ_HEAD
        if self.fut.done():
            return None
        if not keep:
            return self._finish(Handoff("close"))
        self.deadline = deadline = self.loop.time() + self.policy.idle_timeout  # (_arm)
        if self.timer_at > deadline or self.timer is None:
            self._set_timer(deadline)
        if self.c_reading and (self.u_reading or self.uconn is None) \
                and not self.reader.buffered:
            return None  # the usual case: both sockets watched, no next request yet
        self._resume()
        self._next_request()
        return None

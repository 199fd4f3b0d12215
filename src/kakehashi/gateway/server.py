"""The gateway server: an HTTP/1.1 forward proxy on one aggregation port (spec 001).

For each client connection (already routed here by the one-port mux):

* **relay means** (Figs. 5-7): an absolute-form request is checked (proxy
  authentication, target allow-list after name resolution), rewritten to origin
  form with Host restored and the gateway's Via entry added, sent to the target on
  a kept-alive upstream connection, and the response streamed back (Content-Length
  bodies by the core pump, chunked bodies re-framed piece by piece, optional gzip
  decoding: module 219);
* **tunnelling means** (Figs. 8-10): ``CONNECT host:port`` opens the target, answers
  ``200 Connection established`` and hands both sockets to the core pump;
* **events** (Fig. 11): origin-form requests to ``/.well-known/kakehashi/events/``
  reach the event hub (poll, long poll, publish from internal networks).

Every wait is bounded (head, idle, connect, upstream read) and every refusal is a
short 4xx/5xx reply saying why; the protocol decisions live in ``gateway.http``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import ssl
import time
import weakref
from collections.abc import Awaitable
from dataclasses import dataclass, field

from kakehashi.core.audit import AuditLog
from kakehashi.core.pump import Transfer, pump_raw
from kakehashi.core.stream import Conn, ConnClosed, Held, open_tcp
from kakehashi.gateway import body, http
from kakehashi.gateway.allow import AllowList, Decision
from kakehashi.gateway.connection import LOCAL, TUNNEL, GatewayConnection, Policy
from kakehashi.gateway.event_endpoint import LocalEndpoints
from kakehashi.gateway.events import EventHub, TopicHub
from kakehashi.gateway.exchange import Exchange, Handoff, Upstream
from kakehashi.gateway.fastlane import FastLane, HeadMemo, SendBatcher
from kakehashi.gateway.gzipdec import GzipDecoder, decoded_response_head
from kakehashi.gateway.pool import UpstreamPool, binds_request, binds_response, still_idle
from kakehashi.gateway.proxyauth import ProxyAuth
from kakehashi.gateway.quick import QuickRequest

log = logging.getLogger("kakehashi.gateway")
access = logging.getLogger("kakehashi.gateway.access")

LOOPBACK = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]


@dataclass
class GatewaySettings:
    via_name: str = "kakehashi"
    head_timeout: float = 10.0
    idle_timeout: float = 60.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    gzip_decode: bool = False
    max_wait: float = 30.0
    #: seconds an idle upstream connection is kept for other client connections
    #: (0: every client connection opens its own)
    upstream_idle: float = 4.0
    #: serve kept-alive requests from readiness callbacks (False: all by coroutine)
    fast_lane: bool = True
    publishers: list = field(default_factory=lambda: list(LOOPBACK))
    limits: http.HeadLimits = field(default_factory=http.HeadLimits)


class _NoHead(Exception):
    """The wait for a request head ended without one (``eof``: the client closed,
    else the time ran out); what it means is the connection's call (idle_end)."""

    def __init__(self, *, eof: bool) -> None:
        super().__init__("no request head")
        self.eof = eof


class ClosedBeforeAnswer(http.HTTPError):
    """The upstream closed without a byte of response (502, or a retry when the
    connection was a reused one and the request may be sent again)."""


class GatewayServer:
    def __init__(self, allow: AllowList, *, settings: GatewaySettings | None = None,
                 auth: ProxyAuth | None = None, hub: TopicHub | None = None,
                 audit: AuditLog | None = None, access_log: str | None = None) -> None:
        self.allow = allow
        self.settings = settings or GatewaySettings()
        self.auth = auth
        self.hub: TopicHub = hub or EventHub()
        #: this gateway's own upstream connections by local address, to recognise
        #: itself as a client (see _from_itself); entries go with their connections
        self._own_upstreams: weakref.WeakValueDictionary[tuple, Conn] = \
            weakref.WeakValueDictionary()
        self.audit = audit or AuditLog(system="gateway")
        self.local = LocalEndpoints(self.hub, self.settings, self.audit, self._authorise)
        self.via = self.settings.via_name.encode()
        s = self.settings
        #: what every client connection's decisions (GatewayConnection) share
        self.policy = Policy(via=self.via, limits=s.limits, allow=allow,
                             head_timeout=s.head_timeout, idle_timeout=s.idle_timeout,
                             read_timeout=s.read_timeout, gzip_decode=s.gzip_decode,
                             auth=auth is not None, fast_lane=s.fast_lane)
        self._batcher: SendBatcher | None = None
        self._head_memo = HeadMemo(self.via, s.limits)
        self.pool = UpstreamPool(idle=self.settings.upstream_idle)
        #: one JSON line per request (line-buffered: a write per line, no logging stack)
        self.access_file = open(access_log, "a", buffering=1, encoding="utf-8") \
            if access_log else None  # noqa: SIM115
        from kakehashi.core import metrics  # servers only: clients start without it

        self.metrics = metrics.for_system("gateway")
        self._requests = self.metrics.counter("requests", "Requests answered, by status.",
                                              ["status"])
        #: status -> its counter child (a label lookup per request is not free)
        self._by_status: dict[int, object] = {}

    def close(self) -> None:
        """Close the pooled idle upstream connections (at shutdown)."""
        self.pool.close()

    @property
    def requests(self) -> int:
        """Exchanges started so far (by either path)."""
        return self.policy.requests

    def cached_user(self, header: bytes | None) -> str | None:
        """The user of proxy credentials verified recently, without waiting (the
        fast lane's check; None: not verified lately, or authentication is off)."""
        return self.auth.cached(header) if self.auth is not None else None

    def send_batcher(self) -> SendBatcher:
        """The fast lanes' shared end-of-pass sender (made on the serving loop)."""
        if self._batcher is None:
            self._batcher = SendBatcher(asyncio.get_running_loop())
        return self._batcher

    def head_memo(self) -> HeadMemo:
        """The fast lanes' shared memory of rewritten heads."""
        return self._head_memo

    # -- one client connection ---------------------------------------------------
    async def handle_connection(self, conn: Conn) -> None:
        if self._from_itself(conn):
            await self._refuse_loop(conn)
            return
        gc = GatewayConnection(self.policy)
        self._opened()
        await self._serve(conn, gc)

    def start_now(self, conn: Conn, held: Held) -> Awaitable[None] | None:
        """Take a new plain connection without a task (the listener's offer, see
        :class:`~kakehashi.core.stream.Listener`): its fast lane starts from the
        accept callback, and the connection gets a task only if a request needs the
        coroutine path (then :meth:`_serve` goes on from the lane's handoff, as it
        does after any lane). A one-request connection served by the lane - a
        pooled upstream, ``Connection: close`` - is accepted, served and closed
        from callbacks. Part of the fast lane: off with it (``--fast-lane off``)."""
        gc = GatewayConnection(self.policy)
        if not gc.use_lane(conn.plain) or self._from_itself(conn):
            return self.handle_connection(conn)
        self._opened()
        lane = FastLane(self, gc, conn)

        def abort() -> None:  # the listener is closing
            lane.fut.cancel()
            lane.stop()
            self._closed(gc, clean=False)
            held.end()

        def ended(handoff: Handoff) -> None:
            if handoff.kind in ("eof", "close"):
                self._closed(gc, clean=lane.clean)
                held.end()
            else:
                held.to_task(self._serve(conn, gc, handoff, clean=lane.clean))

        held.abort = abort
        lane.on_end = ended
        lane.start()
        return None

    def _opened(self) -> None:
        self.metrics.connections.inc()
        self.metrics.connections_active.inc()

    def _closed(self, gc: GatewayConnection, *, clean: bool) -> None:
        """A client connection is over: its upstream goes to the pool when it is
        between exchanges (``clean``), else it is closed."""
        self.metrics.connections_active.dec()
        upstream = gc.detach()
        if upstream is not None:
            if clean:
                self.pool.release(upstream)
            else:
                upstream.conn.close()

    async def _refuse_loop(self, conn: Conn) -> None:
        self.audit.record("loop", False, client=conn.peer[0] if conn.peer else "?",
                          why="a connection from this gateway to itself")
        with contextlib.suppress(OSError, ConnClosed, TimeoutError):
            await asyncio.wait_for(self._reply_error(
                conn, 508, "the target is this gateway itself (a loop)"), 5)

    async def _serve(self, conn: Conn, gc: GatewayConnection, pending: Handoff | None = None,
                     *, clean: bool = False) -> None:
        """A client connection's requests, from the start or from ``pending``: the
        handoff of a fast lane that ran before (``clean``: its upstream, if any, is
        between exchanges)."""
        reader: http.HeadReader | None = None  # the coroutine path's (made when needed)
        try:
            while True:
                resume: Handoff | None = None
                if pending is not None or gc.use_lane(conn.plain):
                    if pending is not None:
                        resume, pending = pending, None
                    else:
                        # what it can, the fast lane serves from callbacks (fastlane.py)
                        lane = FastLane(self, gc, conn)
                        resume = await lane.run()
                        clean = lane.clean
                    if resume.kind in ("eof", "close"):
                        return
                    if resume.kind == "abort":
                        raise ConnClosed(resume.reason)
                    if resume.kind == "error":
                        assert resume.error is not None
                        await self._reply_error(conn, resume.error.status, resume.error.reason,
                                                head=resume.head)
                        return
                    head = resume.head
                else:
                    if reader is None:
                        reader = http.HeadReader(self.settings.limits)
                    try:
                        head = await self._read_request(conn, reader, gc)
                    except http.HTTPError as exc:
                        await self._reply_error(conn, exc.status, exc.reason)
                        return
                    if head is None:
                        return
                if resume is None or resume.kind == "head":
                    gc.started()  # (the fast lane counts the exchanges it started)
                assert head is not None
                clean = False
                try:
                    if resume is not None and resume.kind == "response":
                        assert resume.exchange is not None and gc.upstream is not None
                        keep = await self._respond(conn, gc, resume.exchange, resume.response,
                                                   http.HeadReader(self.settings.limits))
                    else:
                        keep = await self._one_request(conn, gc, head)
                except http.HTTPError as exc:
                    await self._reply_error(conn, exc.status, exc.reason, head=head)
                    return
                except (OSError, ConnClosed, ssl.SSLError, TimeoutError):
                    raise
                except Exception:  # a bug must cost one request, not the gateway
                    log.exception("internal error on %r", head.target[:200])
                    await self._reply_error(conn, 500, "internal gateway error", head=head)
                    return
                clean = True
                if not keep:
                    return
        except (OSError, ConnClosed, ssl.SSLError, TimeoutError) as exc:
            log.debug("client %s: %s", conn.peer, exc)
        finally:
            self._closed(gc, clean=clean)

    async def _one_request(self, conn: Conn, gc: GatewayConnection,
                           head: http.RequestHead) -> bool:
        """One request by coroutine; returns whether the client connection stays open."""
        start = time.monotonic()
        kind, target = gc.classify(head)
        if kind == TUNNEL:
            await self._tunnel(conn, head, target, start)
            return False
        if kind == LOCAL:
            return await self._local(conn, head, target)
        return await self._relay(conn, gc, head, target, start)

    async def _read_request(self, conn: Conn, reader: http.HeadReader,
                            gc: GatewayConnection) -> http.RequestHead | None:
        """The next request head, or None when the client is done (the connection's
        rules say what an EOF or the timeout means)."""
        try:
            return await self._read_head(conn, reader, "request", gc.request_timeout)
        except _NoHead as end:
            error = gc.idle_end(reader.buffered, eof=end.eof)
            if error is not None:
                raise error from None
            return None

    async def _read_head(self, conn: Conn, reader: http.HeadReader, kind: str,
                         timeout: float):
        """One head within ``timeout`` in total (slow senders are cut off). For a
        request, the end of the wait is _NoHead (the connection decides what it
        means); for a response, an HTTPError to answer."""
        deadline = time.monotonic() + timeout
        while True:
            head = reader.next_head(kind)
            if head is not None:
                rest = reader.take_rest()
                if rest:
                    conn.unread(rest)
                return head
            left = deadline - time.monotonic()
            if left <= 0:
                if kind == "request":
                    raise _NoHead(eof=False)
                raise http.HTTPError(504, "upstream did not answer in time")
            try:
                async with asyncio.timeout(left):
                    data = await conn.recv()
            except TimeoutError:
                continue
            if not data:
                if kind == "request":
                    raise _NoHead(eof=True)
                if reader.buffered:
                    raise http.HTTPError(502, "connection closed in the middle of a head")
                raise ClosedBeforeAnswer(502, "upstream closed without answering")
            reader.feed(data)

    # -- checks -------------------------------------------------------------------
    async def _authorise(self, head: http.RequestHead, what: str, conn: Conn) -> str:
        if self.auth is None:
            return "-"
        addr = conn.peer[0] if conn.peer else "?"
        res = await self.auth.check(head.headers.get(b"proxy-authorization"), addr)
        if res.user is None:
            self.audit.record("proxy-auth", False, target=what, addr=addr,
                              user=res.claimed or None, why=res.why)
            if res.why in ("lockout", "busy"):
                raise http.HTTPError(429, "too many failed proxy logins from your address"
                                     if res.why == "lockout" else
                                     "busy checking other proxy logins; try again later")
            raise http.HTTPError(407, "proxy authentication required")
        return res.user

    async def _decide(self, host: str, port: int, user: str, conn: Conn,
                      gc: GatewayConnection | None = None) -> str:
        """Allow-list decision, audited once per client connection and target (``gc``:
        a decision made on this connection before is not made again)."""
        if gc is not None:
            known = gc.known_address(host, port, user)
            if known is not None:
                return known
        decision = await self.allow.check(host, port)
        self.record_decision(decision, host, port, user, conn)
        if not decision.allowed:
            raise http.HTTPError(403, decision.reason)
        assert decision.address is not None
        return decision.address

    def record_decision(self, decision: Decision, host: str, port: int, user: str,
                        conn: Conn) -> None:
        """Audit an allow-list decision (once per client connection and target)."""
        client = conn.peer[0] if conn.peer else "?"
        self.audit.record("target", decision.allowed, client=client, user=user,
                          target=f"{host}:{port}", address=decision.address,
                          why=decision.reason or None)

    async def _open(self, address: str, port: int, host: str) -> Conn:
        try:
            up = await open_tcp(address, port, timeout=self.settings.connect_timeout)
        except TimeoutError:
            raise http.HTTPError(504, f"{host}:{port} did not accept in time") from None
        except (OSError, ConnectionError) as exc:
            reason = getattr(exc.__cause__, "strerror", None) or str(exc)
            raise http.HTTPError(502, f"cannot connect to {host}:{port}: {reason}") from None
        with contextlib.suppress(OSError):
            self._own_upstreams[up.sock.getsockname()[:2]] = up
        return up

    def _from_itself(self, conn: Conn) -> bool:
        """Does ``conn`` come from one of this gateway's own upstream connections?

        A target that is the gateway itself (its own port reached through an allowed
        address) would let one client chain CONNECTs without end, each hop a new
        connection from the gateway's own address (past ``--max-per-client``), or
        reach the event publisher check from the gateway's own address. Via cannot
        see CONNECT, so the loop is recognised by the source socket instead.
        """
        peer = conn.peer[:2] if conn.peer else None
        own = self._own_upstreams.get(peer) if peer else None
        if own is None or own.closed or own.peer is None:
            return False
        # The same local port may serve several destinations at once (the kernel
        # shares ephemeral ports between 4-tuples): only the whole pair is a loop.
        try:
            return own.peer[:2] == conn.sock.getsockname()[:2]
        except OSError:
            return False

    # -- tunnelling means (Figs. 8-10) -------------------------------------------
    async def _tunnel(self, conn: Conn, head: http.RequestHead, target: http.Target,
                      start: float) -> None:
        user = await self._authorise(head, f"{target.host}:{target.port}", conn)
        address = await self._decide(target.host, target.port, user, conn)
        up = await self._open(address, target.port, target.host)
        await self._carry(conn, up, head, 200, http.connect_established(head.version),
                          start, user, f"{target.host}:{target.port}")

    async def _carry(self, conn: Conn, up: Conn, head: http.RequestHead, status: int,
                     reply: bytes, start: float, user: str, where: str) -> None:
        """A tunnel (CONNECT, or an upgrade the origin accepted): ``reply`` to the
        client, then bytes both ways until both sides have ended. Its access-log line
        is written however it ends - with ``"end": "reset"`` when a side reset or
        failed - since a tunnel that breaks is the one an operator looks for."""
        up_bytes, down_bytes = Transfer(), Transfer()
        end = "reset"
        self.metrics.sessions.inc()  # a tunnel is the gateway's session
        self.metrics.sessions_active.inc()
        try:
            await self._to_client(conn, reply)  # (after pipelined answers: a deadline)
            self.metrics.setup_done(start)
            if conn.has_pushback:  # bytes the client sent right behind its request
                data = await conn.recv()
                await up.send_all(data)
                up_bytes.bytes += len(data)
            await pump_raw(conn, up, up_bytes, down_bytes)
            end = "closed"
        except asyncio.CancelledError:
            end = "cancelled"  # the gateway is shutting down
            raise
        finally:
            self.metrics.sessions_active.dec()
            up.close()
            self.log_request(conn, head, status, down_bytes.bytes, start, user, where,
                             sent=up_bytes.bytes, end=end)

    # -- relay means (Figs. 5-7) -------------------------------------------------
    async def _relay(self, conn: Conn, gc: GatewayConnection, head: http.RequestHead,
                     target: http.Target, start: float) -> bool:
        user = await self._authorise(head, f"{target.host}:{target.port}", conn)
        address = await self._decide(target.host, target.port, user, conn, gc)
        _, out_head = http.to_origin(head, self.via)
        framing = http.request_body(head)
        expect = out_head.headers.get(b"expect")
        if expect is not None and expect.lower() == b"100-continue":
            out_head.headers.remove(b"expect")  # checks passed: the gateway answers itself
            if head.version == b"HTTP/1.1":  # never a 1xx to an HTTP/1.0 client
                await self._to_client(conn, b"HTTP/1.1 100 Continue\r\n\r\n")
        current = gc.upstream
        step = gc.choose_upstream(address, target.port, idle=current is not None
                                  and current.key == (address, target.port)
                                  and still_idle(current.conn))
        if step.release is not None:
            self.pool.release(step.release)  # between exchanges: clean
        if step.close is not None:
            step.close.conn.close()
        if not step.use_current:
            await self._attach(gc, target, user, address, pooled=True)
        binds = binds_request(head)  # the origin may tie the connection to this client
        reader = http.HeadReader(self.settings.limits)
        while True:
            upstream = gc.upstream
            assert upstream is not None
            if binds:
                upstream.private = True
            try:
                await upstream.conn.send_all(out_head.serialize())
            except OSError:
                if not gc.may_retry(head.method, head_sent=False, body_sent=False,
                                    answered=False):
                    raise
                await self._attach(gc, target, user, address, pooled=False)
                continue
            await body.send(conn, upstream.conn, framing, timeout=self.settings.read_timeout)
            try:
                resp = await self._read_head(upstream.conn, reader, "response",
                                             self.settings.read_timeout)
            except ClosedBeforeAnswer:
                if not gc.may_retry(head.method, head_sent=True,
                                    body_sent=framing != http.NO_BODY, answered=False):
                    raise
                await self._attach(gc, target, user, address, pooled=False)
                continue
            break
        exchange = Exchange(head, out_head, target, user, start)
        return await self._respond(conn, gc, exchange, resp, reader)

    async def _attach(self, gc: GatewayConnection, target: http.Target, user: str,
                      address: str, *, pooled: bool) -> None:
        """Give ``gc`` an upstream to the checked address: a pooled connection if
        ``pooled`` and there is one, else a new one (a failed one is closed first)."""
        failed = gc.detach()
        if failed is not None:
            failed.conn.close()
        key = (address, target.port)
        conn = self.pool.take((*key, user)) if pooled else None
        fresh = conn is None
        if conn is not None:
            conn.unwatch_readable()  # the pool's watch: this path reads by awaiting
        if conn is None:
            conn = await self._open(address, target.port, target.host)
        gc.attach(Upstream(key, conn), fresh=fresh)
        gc.remember(target.host, target.port, user, address)

    async def _respond(self, conn: Conn, gc: GatewayConnection, ex: Exchange,
                       resp: http.ResponseHead | None, reader: http.HeadReader) -> bool:
        """From the upstream's response head on: interim responses, then the body;
        returns whether the client connection stays open."""
        upstream = gc.upstream
        assert upstream is not None
        up = upstream.conn
        head = ex.head
        while resp is not None and 100 <= resp.status < 200 and resp.status != 101:
            # interim responses are forwarded (except 101; none to an HTTP/1.0 client,
            # RFC 9110 15.2) and the real one awaited
            if head.version == b"HTTP/1.1":
                await self._to_client(conn,
                                      http.response_for_client(resp, self.via).serialize())
            resp = await self._read_head(up, reader, "response", self.settings.read_timeout)
        if resp is None:
            raise http.HTTPError(502, "upstream closed without a response")
        if binds_response(resp):
            upstream.private = True
        if resp.status == 101:
            return await self._switch(conn, gc, ex, resp)
        relayed = http.relay_response(resp, self.via, head, ex.out_head)
        client_head, resp_framing = relayed.head, relayed.framing
        client_keep = relayed.client_keep
        decoder = None
        if self.settings.gzip_decode and resp_framing[0] != "none":
            decoded = decoded_response_head(client_head)
            if decoded is not None:
                client_head, decoder = decoded, GzipDecoder()
                if head.version == b"HTTP/1.0":  # no chunked for 1.0: end by closing
                    client_head.headers.remove(b"transfer-encoding")
                    client_head.headers.set(b"Connection", b"close")
                client_keep = http.keep_alive(head, client_head)
        client_framing = http.response_body(client_head, head.method)  # how we frame it
        if decoder is None and resp_framing[0] == "length" \
                and resp_framing[1] <= up.pushback_size:
            # the whole (small) body arrived with the head: one send, not two
            await self._to_client(conn, client_head.serialize()
                                  + up.take_pushback(resp_framing[1]))
            return self._done(conn, gc, ex, resp, relayed.upstream_keep, resp_framing[1],
                              client_keep)
        await self._to_client(conn, client_head.serialize())
        try:
            size = await body.send(up, conn, resp_framing, timeout=self.settings.read_timeout,
                                   transform=decoder, chunk_out=client_framing[0] == "chunked",
                                   error_status=502)
        except http.HTTPError as exc:
            # the head is already out: an error reply now would land inside the body.
            # Cut the connection instead (no last chunk), so the client sees the loss.
            self.log_request(conn, head, exc.status, 0, ex.start, ex.user, ex.where)
            raise ConnClosed(f"upstream body broken: {exc.reason}") from None
        return self._done(conn, gc, ex, resp, relayed.upstream_keep, size, client_keep)

    async def _switch(self, conn: Conn, gc: GatewayConnection, ex: Exchange,
                      resp: http.ResponseHead) -> bool:
        """The origin accepted the client's upgrade (e.g. WebSocket): relay the 101,
        then carry bytes both ways, like a CONNECT tunnel to the same checked target,
        until both sides have closed."""
        upstream = gc.detach()  # the tunnel's now, never reused
        assert upstream is not None
        up = upstream.conn
        try:
            head = http.upgraded_response(resp, self.via, ex.out_head.headers.get(b"upgrade"))
        except BaseException:
            up.close()
            raise
        await self._carry(conn, up, ex.head, 101, head.serialize(), ex.start, ex.user,
                          ex.where)
        return False

    def _done(self, conn: Conn, gc: GatewayConnection, ex: Exchange,
              resp: http.ResponseHead, upstream_keep: bool, size: int,
              client_keep: bool) -> bool:
        self.log_request(conn, ex.head, resp.status, size, ex.start, ex.user, ex.where)
        keep, drop = gc.done(client_keep=client_keep, upstream_keep=upstream_keep)
        if drop is not None:
            drop.conn.close()
        return keep

    # -- the gateway's own endpoints (events, health): see event_endpoint.py --------
    async def _local(self, conn: Conn, head: http.RequestHead, target) -> bool:
        return await self.local.handle(conn, head, target)

    # -- replies and logs ----------------------------------------------------------
    async def _to_client(self, conn: Conn, data: bytes) -> None:
        """Send ``data`` to the client, which must take it within the idle timeout.
        A client that pipelines requests and never reads fills the socket buffers;
        without a deadline the send waited for good, holding the connection, this
        coroutine and the upstream. (The fast lane cuts such a client after the same
        timeout - "client stopped reading" - and body.send bounds the body's sends.)
        ConnClosed then ends the connection, as the lane's own cut does."""
        try:
            async with asyncio.timeout(self.settings.idle_timeout):
                await conn.send_all(data)
        except TimeoutError:
            raise ConnClosed("client stopped reading") from None

    async def _reply_error(self, conn: Conn, status: int, reason: str, *,
                           head: http.RequestHead | None = None) -> None:
        extra = [(b"Proxy-Authenticate", b'Basic realm="kakehashi"')] if status == 407 else []
        with contextlib.suppress(OSError, ConnClosed, ssl.SSLError):
            await self._to_client(conn, http.error_response(status, reason,
                                                            extra_headers=extra))
        if head is not None:
            self.log_request(conn, head, status, 0, time.monotonic(), "-", "-")

    def log_request(self, conn: Conn, head: http.RequestHead | QuickRequest, status: int,
                    size: int, start: float, user: str, target: str, *,
                    sent: int | None = None, end: str | None = None) -> None:
        """One access-log line (JSON) for a request that ended (and its metrics)."""
        counter = self._by_status.get(status)
        if counter is None:
            counter = self._by_status[status] = self._requests.labels(str(status))
        counter.inc()  # type: ignore[attr-defined]
        self.metrics.carried(sent or 0, size)
        if self.access_file is None and not access.isEnabledFor(logging.DEBUG):
            return
        entry = {"client": conn.peer[0] if conn.peer else "?", "user": user,
                 "method": head.method.decode(errors="replace"),
                 "target": head.target.decode(errors="replace")[:200], "to": target,
                 "status": status, "bytes": size,
                 "ms": round((time.monotonic() - start) * 1000, 1)}
        if sent is not None:
            entry["bytes_up"] = sent
        if end is not None:
            entry["end"] = end
        line = json.dumps(entry)
        if self.access_file is not None:
            self.access_file.write(line + "\n")
        else:
            access.debug("%s", line)


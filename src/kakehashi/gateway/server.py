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
from dataclasses import dataclass, field

from kakehashi.core.audit import AuditLog
from kakehashi.core.pump import Transfer, pump_raw
from kakehashi.core.stream import Conn, ConnClosed, open_tcp
from kakehashi.gateway import body, http
from kakehashi.gateway.allow import AllowList, Decision
from kakehashi.gateway.event_endpoint import LocalEndpoints
from kakehashi.gateway.events import EventHub
from kakehashi.gateway.exchange import Exchange, Handoff, Upstream
from kakehashi.gateway.fastlane import IDEMPOTENT, FastLane, SendBatcher
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
    publishers: list = field(default_factory=lambda: list(LOOPBACK))
    limits: http.HeadLimits = field(default_factory=http.HeadLimits)


class ClosedBeforeAnswer(http.HTTPError):
    """The upstream closed without a byte of response (502, or a retry when the
    connection was a reused one and the request may be sent again)."""


class GatewayServer:
    def __init__(self, allow: AllowList, *, settings: GatewaySettings | None = None,
                 auth: ProxyAuth | None = None, hub: EventHub | None = None,
                 audit: AuditLog | None = None, access_log: str | None = None) -> None:
        self.allow = allow
        self.settings = settings or GatewaySettings()
        self.auth = auth
        self.hub = hub or EventHub()
        #: this gateway's own upstream connections by local address, to recognise
        #: itself as a client (see _from_itself); entries go with their connections
        self._own_upstreams: weakref.WeakValueDictionary[tuple, Conn] = \
            weakref.WeakValueDictionary()
        self.audit = audit or AuditLog(system="gateway")
        self.local = LocalEndpoints(self.hub, self.settings, self.audit, self._authorise)
        self.via = self.settings.via_name.encode()
        self.requests = 0
        #: serve kept-alive requests from callbacks (False: every request by coroutine)
        self.fast_lane = True
        self._batcher: SendBatcher | None = None
        self.pool = UpstreamPool(idle=self.settings.upstream_idle)
        #: one JSON line per request (line-buffered: a write per line, no logging stack)
        self.access_file = open(access_log, "a", buffering=1, encoding="utf-8") \
            if access_log else None  # noqa: SIM115

    def close(self) -> None:
        """Close the pooled idle upstream connections (at shutdown)."""
        self.pool.close()

    def send_batcher(self) -> SendBatcher:
        """The fast lanes' shared end-of-pass sender (made on the serving loop)."""
        if self._batcher is None:
            self._batcher = SendBatcher(asyncio.get_running_loop())
        return self._batcher

    # -- one client connection ---------------------------------------------------
    async def handle_connection(self, conn: Conn) -> None:
        if self._from_itself(conn):
            self.audit.record("loop", False, client=conn.peer[0] if conn.peer else "?",
                              why="a connection from this gateway to itself")
            with contextlib.suppress(OSError, ConnClosed, TimeoutError):
                await asyncio.wait_for(self._reply_error(
                    conn, 508, "the target is this gateway itself (a loop)"), 5)
            return
        reader = http.HeadReader(self.settings.limits)
        upstream: Upstream | None = None
        clean = False  # the upstream is between exchanges (it may go to the pool)
        first = True
        try:
            while True:
                resume: Handoff | None = None
                if conn.plain and self.fast_lane:
                    # what it can, the fast lane serves from callbacks (see fastlane.py)
                    lane = FastLane(self, conn, upstream, first=first)
                    resume, upstream = await lane.run()
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
                    try:
                        head = await self._read_head(
                            conn, reader, "request",
                            self.settings.head_timeout if first else self.settings.idle_timeout,
                            first=first)
                    except http.HTTPError as exc:
                        await self._reply_error(conn, exc.status, exc.reason)
                        return
                    if head is None:
                        return
                if resume is None or resume.kind == "head":
                    self.requests += 1  # the fast lane counts the exchanges it started
                first = False
                assert head is not None
                clean = False
                try:
                    if resume is not None and resume.kind == "response":
                        assert resume.exchange is not None and upstream is not None
                        keep, upstream = await self._respond(
                            conn, resume.exchange, upstream, resume.response,
                            http.HeadReader(self.settings.limits))
                    else:
                        keep, upstream = await self._one_request(conn, head, upstream)
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
            if upstream is not None:
                if clean:
                    self.pool.release(upstream)
                else:
                    upstream.conn.close()

    async def _one_request(self, conn: Conn, head: http.RequestHead,
                           upstream: Upstream | None) -> tuple[bool, Upstream | None]:
        start = time.monotonic()
        if head.method == b"CONNECT":
            await self._tunnel(conn, head, start)
            return False, upstream
        target = http.parse_target(head)
        if target.form != "absolute":
            return await self._local(conn, head, target), upstream
        return await self._relay(conn, head, target, upstream, start)

    async def _read_head(self, conn: Conn, reader: http.HeadReader, kind: str,
                         timeout: float, *, first: bool = False):
        """One head within ``timeout`` in total (slow senders are cut off)."""
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
                if kind == "request" and not reader.buffered and not first:
                    return None  # an idle keep-alive connection: just close it
                raise http.HTTPError(408 if kind == "request" else 504,
                                     "request head not received in time" if kind == "request"
                                     else "upstream did not answer in time")
            try:
                async with asyncio.timeout(left):
                    data = await conn.recv()
            except TimeoutError:
                continue
            if not data:
                if reader.buffered:
                    raise http.HTTPError(400 if kind == "request" else 502,
                                         "connection closed in the middle of a head")
                if kind == "response":
                    raise ClosedBeforeAnswer(502, "upstream closed without answering")
                return None
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
                      decided: dict | None = None) -> str:
        """Allow-list decision, audited once per client connection and target."""
        key = (host, port, user)
        if decided is not None and key in decided:
            return decided[key]
        decision = await self.allow.check(host, port)
        self.record_decision(decision, host, port, user, conn)
        if not decision.allowed:
            raise http.HTTPError(403, decision.reason)
        assert decision.address is not None
        if decided is not None:
            decided[key] = decision.address
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
    async def _tunnel(self, conn: Conn, head: http.RequestHead, start: float) -> None:
        target = http.parse_target(head)
        if target.form != "authority":
            raise http.HTTPError(400, "CONNECT needs host:port")
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
        try:
            await conn.send_all(reply)
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
            up.close()
            self._log(conn, head, status, down_bytes.bytes, start, user, where,
                      sent=up_bytes.bytes, end=end)

    # -- relay means (Figs. 5-7) -------------------------------------------------
    async def _relay(self, conn: Conn, head: http.RequestHead, target, upstream, start):
        user = await self._authorise(head, f"{target.host}:{target.port}", conn)
        address = await self._decide(target.host, target.port, user, conn,
                                     upstream.decided if upstream is not None else None)
        _, out_head = http.to_origin(head, self.via)
        framing = http.request_body(head)
        expect = out_head.headers.get(b"expect")
        if expect is not None and expect.lower() == b"100-continue":
            out_head.headers.remove(b"expect")  # checks passed: the gateway answers itself
            if head.version == b"HTTP/1.1":  # never a 1xx to an HTTP/1.0 client
                await conn.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
        key = (address, target.port)
        if upstream is not None and upstream.key != key:
            self.pool.release(upstream)  # between exchanges: clean
            upstream = None
        elif upstream is not None and not still_idle(upstream.conn):
            upstream.conn.close()
            upstream = None
        fresh = False
        if upstream is None:
            pooled = self.pool.take((*key, user))
            fresh = pooled is None
            upstream = Upstream(key, pooled or await self._open(address, target.port,
                                                                target.host))
            upstream.decided[(target.host, target.port, user)] = address
        if binds_request(head):
            upstream.private = True  # the origin may tie the connection to this client
        # A reused connection may have been closed by its origin just as the request
        # went out: one fresh try if the head could not be sent, or if nothing came
        # back for a request that may be repeated (idempotent, no body).
        repeatable = framing == http.NO_BODY and head.method in IDEMPOTENT
        reader = http.HeadReader(self.settings.limits)
        while True:
            try:
                await upstream.conn.send_all(out_head.serialize())
            except OSError:
                if fresh:
                    raise
                upstream, fresh = await self._reopen(upstream, target, user), True
                continue
            await body.send(conn, upstream.conn, framing, timeout=self.settings.read_timeout)
            try:
                resp = await self._read_head(upstream.conn, reader, "response",
                                             self.settings.read_timeout)
            except ClosedBeforeAnswer:
                if fresh or not repeatable:
                    raise
                upstream, fresh = await self._reopen(upstream, target, user), True
                continue
            break
        exchange = Exchange(head, out_head, target, user, start)
        return await self._respond(conn, exchange, upstream, resp, reader)

    async def _reopen(self, upstream: Upstream, target: http.Target, user: str) -> Upstream:
        """A fresh connection in place of a reused one that failed."""
        upstream.conn.close()
        address, port = upstream.key
        fresh = Upstream(upstream.key, await self._open(address, port, target.host))
        fresh.decided[(target.host, target.port, user)] = address
        return fresh

    async def _respond(self, conn: Conn, ex: Exchange, upstream: Upstream,
                       resp: http.ResponseHead | None,
                       reader: http.HeadReader) -> tuple[bool, Upstream | None]:
        """From the upstream's response head on: interim responses, then the body."""
        up = upstream.conn
        head = ex.head
        while resp is not None and 100 <= resp.status < 200 and resp.status != 101:
            # interim responses are forwarded (except 101; none to an HTTP/1.0 client,
            # RFC 9110 15.2) and the real one awaited
            if head.version == b"HTTP/1.1":
                await conn.send_all(http.response_for_client(resp, self.via).serialize())
            resp = await self._read_head(up, reader, "response", self.settings.read_timeout)
        if resp is None:
            raise http.HTTPError(502, "upstream closed without a response")
        if binds_response(resp):
            upstream.private = True
        if resp.status == 101:
            return await self._switch(conn, ex, upstream, resp)
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
            await conn.send_all(client_head.serialize() + up.take_pushback(resp_framing[1]))
            return self._done(conn, ex, resp, relayed.upstream_keep, resp_framing[1],
                              client_keep, upstream)
        await conn.send_all(client_head.serialize())
        try:
            size = await body.send(up, conn, resp_framing, timeout=self.settings.read_timeout,
                                   transform=decoder, chunk_out=client_framing[0] == "chunked",
                                   error_status=502)
        except http.HTTPError as exc:
            # the head is already out: an error reply now would land inside the body.
            # Cut the connection instead (no last chunk), so the client sees the loss.
            self._log(conn, head, exc.status, 0, ex.start, ex.user, ex.where)
            raise ConnClosed(f"upstream body broken: {exc.reason}") from None
        return self._done(conn, ex, resp, relayed.upstream_keep, size, client_keep, upstream)

    async def _switch(self, conn: Conn, ex: Exchange, upstream: Upstream,
                      resp: http.ResponseHead) -> tuple[bool, None]:
        """The origin accepted the client's upgrade (e.g. WebSocket): relay the 101,
        then carry bytes both ways, like a CONNECT tunnel to the same checked target,
        until both sides have closed."""
        up = upstream.conn
        try:
            head = http.upgraded_response(resp, self.via, ex.out_head.headers.get(b"upgrade"))
        except BaseException:
            up.close()
            raise
        await self._carry(conn, up, ex.head, 101, head.serialize(), ex.start, ex.user,
                          ex.where)
        return False, None

    def _done(self, conn: Conn, ex: Exchange, resp: http.ResponseHead, upstream_keep: bool,
              size: int, client_keep: bool,
              upstream: Upstream | None) -> tuple[bool, Upstream | None]:
        self._log(conn, ex.head, resp.status, size, ex.start, ex.user, ex.where)
        if not upstream_keep and upstream is not None:
            upstream.conn.close()
            upstream = None
        return client_keep, upstream

    # -- the gateway's own endpoints (events, health): see event_endpoint.py --------
    async def _local(self, conn: Conn, head: http.RequestHead, target) -> bool:
        return await self.local.handle(conn, head, target)

    # -- replies and logs ----------------------------------------------------------
    async def _reply_error(self, conn: Conn, status: int, reason: str, *,
                           head: http.RequestHead | None = None) -> None:
        extra = [(b"Proxy-Authenticate", b'Basic realm="kakehashi"')] if status == 407 else []
        with contextlib.suppress(OSError, ConnClosed, ssl.SSLError):
            await conn.send_all(http.error_response(status, reason, extra_headers=extra))
        if head is not None:
            self._log(conn, head, status, 0, time.monotonic(), "-", "-")

    def _log(self, conn: Conn, head: http.RequestHead | QuickRequest, status: int, size: int,
             start: float, user: str, target: str, *, sent: int | None = None,
             end: str | None = None) -> None:
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


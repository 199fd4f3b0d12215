"""``switch gateway``: the edge client (spec 003, 18/28) and its pseudo sockets.

It connects **outbound only** to the switch server: a WebSocket by default, HTTP/1.1
long polling where WebSockets are blocked (its periodic notifications carry the data,
as in the spec), either one through an HTTP CONNECT proxy with Basic authentication.
Over that one link it obeys the server's instructions:

* S3a ``Setup(side="listen")``: build a **server-side pseudo socket** (it stands in
  for the server) listening where the user asked; each client connection accepted
  there becomes one stream (:class:`~.messages.Open`); report S4a with its address;
* S3b ``Setup(side="connect")``: become the **client-side pseudo socket** for the
  tunnel (it stands in for the client): check that the real server can be reached,
  report S4b, and connect to it for each stream the other side opens;
* S6a/S6b ``Delete``: remove the pseudo socket and its streams; report S7a/S7b.

Streams have credit-based flow control and end-to-end half-close and reset
(:mod:`.mux`). When the link drops, the gateway reconnects with exponential backoff
and jitter, keeps its pseudo sockets (streams in flight are reset) and says which
tunnels it holds in its new hello; the server answers with the ones it still knows.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import logging
import random
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from kakehashi.core import pump
from kakehashi.core.httpdial import DialError, HttpConnection, Proxy, dial
from kakehashi.core.stream import (
    FAST_PATH,
    Conn,
    ConnClosed,
    Listener,
    open_tcp,
    parse_hostport,
)
from kakehashi.switch import messages as m
from kakehashi.switch.mux import (
    ACK_EVERY,
    LinkPacer,
    Outbox,
    RecvWindow,
    SendWindow,
    link_body,
)

log = logging.getLogger("kakehashi.switch.gateway")

BATCH = 1024 * 1024
#: a stream's data goes from the link to its socket without a turn of the event loop
#: when the socket takes it (:meth:`Gateway._write_through`)
WRITE_THROUGH = FAST_PATH
#: how long a new stream waits for the other side to reach the real server
OPEN_TIMEOUT = 15.0
#: a UDP flow (one client address) without a datagram either way this long ends
UDP_IDLE = 60.0
#: refusals that a later attempt may get past (login throttling, a busy server);
#: every other refusal (a wrong password, another user's gateway name) ends the gateway
RETRY_CODES = ("locked-out", "busy")


class Fatal(Exception):
    """The server refused this gateway for a reason retrying does not fix."""


@dataclass
class GatewayConfig:
    server: str
    user: str
    password: str
    name: str
    transport: str = "auto"
    proxy: Proxy | None = None
    ca: str | None = None
    backoff: tuple[float, float] = (0.25, 15.0)
    poll_timeout: float = 60.0


# -- transports ---------------------------------------------------------------------------
class _Transport:
    kind = ""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        u = urllib.parse.urlsplit(cfg.server if "://" in cfg.server else
                                  "https://" + cfg.server)
        self.secure = u.scheme == "https"
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or (443 if self.secure else 80)
        self.auth = "Basic " + base64.b64encode(f"{cfg.user}:{cfg.password}".encode()).decode()

    def tls(self) -> ssl.SSLContext | None:
        if not self.secure:
            return None
        from kakehashi.core import tls

        return tls.client_context(self.cfg.ca)


class WebSocketTransport(_Transport):
    kind = "websocket"

    async def open(self, hello: bytes) -> bytes:
        from websockets.asyncio.client import connect

        sock = await dial(self.host, self.port, proxy=self.cfg.proxy)
        scheme = "wss" if self.secure else "ws"
        self.ws = await connect(
            f"{scheme}://{self.host}:{self.port}/v1/gateway/link", sock=sock,
            ssl=self.tls(), server_hostname=self.host if self.secure else None,
            additional_headers={"Authorization": self.auth}, max_size=m.MAX_BODY,
            compression=None, ping_interval=10, ping_timeout=20, open_timeout=10,
            close_timeout=2, proxy=None)
        await self.ws.send(hello)
        return await asyncio.wait_for(self.ws.recv(decode=False), 30)

    async def run(self, gw: Gateway) -> None:
        async def writer() -> None:
            while True:
                await gw.out_ready.wait()
                body = gw.take_link()
                if body:
                    await self.ws.send(body)

        async def reader() -> None:
            async for body in self.ws:
                if isinstance(body, str):
                    raise m.ProtocolError("text", "the server sent text on the link")
                await gw.receive(body)

        await _race(writer(), reader())

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()


class PollTransport(_Transport):
    """HTTP/1.1 long polling: a "down" connection whose requests are the periodic
    notifications (held by the server until it has data; they carry this gateway's
    data when there is some), and an "up" connection for data that is ready while a
    notification is held. At most one request with data is in flight at a time, so
    data stays in order."""

    kind = "poll"

    async def _conn(self) -> HttpConnection:
        return await HttpConnection.open(self.host, self.port, tls=self.tls(),
                                         proxy=self.cfg.proxy, max_response=m.MAX_BODY * 2)

    async def open(self, hello: bytes) -> bytes:
        self.down = await self._conn()
        self.up: HttpConnection | None = None
        status, headers, body = await self.down.request(
            "POST", "/v1/gateway/poll", hello, timeout=30,
            headers={"Authorization": self.auth, "Content-Type": "application/octet-stream"})
        if status != 200:
            raise _http_refusal(status, body)
        self.token = headers.get("x-kakehashi-link", "")
        return body

    async def _post(self, conn: HttpConnection, body: bytes, down: bool) -> bytes:
        status, _, resp = await conn.request(
            "POST", f"/v1/gateway/poll/link?down={int(down)}", body,
            timeout=self.cfg.poll_timeout,
            headers={"Authorization": f"Bearer {self.token}",
                     "Content-Type": "application/octet-stream"})
        if status != 200:
            raise ConnectionError(f"poll answered HTTP {status}: {resp[:200]!r}")
        return resp

    async def run(self, gw: Gateway) -> None:
        uplock = asyncio.Lock()

        async def notifications() -> None:
            while True:
                async with uplock:
                    body = gw.take()
                    if body:  # answered at once
                        resp = await self._post(self.down, body, True)
                if not body:
                    resp = await self._post(self.down, b"", True)
                if resp:
                    await gw.receive(resp)

        async def up() -> None:
            while True:
                await gw.out_ready.wait()
                async with uplock:
                    body = gw.take()
                    if body:
                        if self.up is None:
                            self.up = await self._conn()
                        await self._post(self.up, body, False)

        await _race(notifications(), up())

    async def close(self) -> None:
        self.down.close()
        if self.up is not None:
            self.up.close()


def _http_refusal(status: int, body: bytes) -> Exception:
    try:
        msgs = m.decode_to_gateway(body)
    except m.ProtocolError:
        msgs = []
    if msgs and isinstance(msgs[0], m.Refused):
        if msgs[0].code in RETRY_CODES:
            return ConnectionError(f"the server refused gateway: {msgs[0].error}")
        return Fatal(f"the server refused gateway: {msgs[0].error} ({msgs[0].code})")
    text = body[:300].decode(errors="replace")
    if status == 429:
        return ConnectionError(f"the server is throttling logins (HTTP 429): {text}")
    if status in (401, 403):
        import json

        with contextlib.suppress(ValueError, KeyError, TypeError):
            text = json.loads(body)["error"]["message"]
        return Fatal(f"the server refused our login: {text} (HTTP {status})")
    return ConnectionError(f"the server answered HTTP {status}: {text}")


def _log_failure(task: asyncio.Task[Any]) -> None:
    """A task beside the link failed in a way nobody awaits: say so."""
    if not task.cancelled() and task.exception() is not None:
        log.error("gateway task failed", exc_info=task.exception())


async def _race(*coros: Any) -> None:
    """Run until the first ends; its exception (or none) is the result."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- pseudo sockets and streams ----------------------------------------------------------------
@dataclass(eq=False)
class Stream:
    tunnel: GwTunnel
    id: int
    send: SendWindow
    recv: RecvWindow
    conn: Conn | None = None
    peer: Any = None  # UDP: the client's address
    inbound: collections.deque[bytes | None] = field(default_factory=collections.deque)
    #: set when data (or its end) arrived / when credit arrived
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    credit_wake: asyncio.Event = field(default_factory=asyncio.Event)
    opened: asyncio.Future[bool] | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    sent_eof: bool = False
    got_eof: bool = False
    udp: Any = None  # connect side of a UDP stream: its transport
    reset: bool = False
    last: float = 0.0  # UDP: when a datagram last passed
    #: the pump waits for this stream's data, everything before written to ``conn``
    #: (:meth:`Gateway._write_through` may then write arriving data itself)
    parked: bool = False


@dataclass(eq=False)
class GwTunnel:
    id: str
    side: str
    proto: str
    address: str
    service: str
    window: int
    listener: Listener | None = None
    udp: asyncio.DatagramTransport | None = None
    streams: dict[int, Stream] = field(default_factory=dict)
    peers: dict[Any, int] = field(default_factory=dict)
    next_stream: int = 1
    sweeper: asyncio.Task[None] | None = None


class _UdpListen(asyncio.DatagramProtocol):
    def __init__(self, gw: Gateway, t: GwTunnel) -> None:
        self.gw, self.t = gw, t

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.gw.udp_in(self.t, data, addr)


class _UdpConnect(asyncio.DatagramProtocol):
    def __init__(self, gw: Gateway, s: Stream) -> None:
        self.gw, self.s = gw, s

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) <= m.MAX_CHUNK and not self.s.reset:
            self.gw.send(m.Data(tunnel=self.s.tunnel.id, stream=self.s.id, data=data))


class StreamEnd:
    """One multiplexed stream seen as a Conn-like endpoint, so that
    :func:`kakehashi.core.pump.pump_raw` (the one byte pump) drives it in its buffered
    mode like any socket.

    Credit flow control stays per stream: :meth:`send_all` waits for the peer's credit
    and queues at most that much (in :data:`~.messages.MAX_CHUNK` pieces) on the
    link's outbox; :meth:`recv_into` hands out what arrived and returns credit for
    bytes the pump has written out (it comes back for more only after writing them),
    so a slow reader holds back its own sender and nothing grows without bound.
    """

    plain = False
    has_pushback = False

    def __init__(self, gw: Gateway, s: Stream) -> None:
        self.gw, self.s = gw, s
        self.key = (s.tunnel.id, s.id)
        self._head: memoryview | None = None  # the rest of a partly read chunk
        self._handed = 0  # bytes given to the pump, credited at its next read
        self._prefix: bytes | None = None  # this stream's Data encoding (m.data_prefix)

    def _check(self) -> None:
        if self.s.reset:
            raise ConnClosed("the stream was reset")

    async def recv_into(self, buf: memoryview | bytearray) -> int:
        s = self.s
        if self._handed:  # the pump wrote the previous bytes out: they free window
            give = s.recv.consumed(self._handed)
            self._handed = 0
            if give:
                self.gw.send(m.Credit(tunnel=s.tunnel.id, stream=s.id, n=give))
        while not self._head:  # (an empty chunk is not the end)
            while not s.inbound:
                self._check()
                s.wake.clear()
                s.parked = True
                try:
                    await s.wake.wait()
                finally:
                    s.parked = False
            data = s.inbound.popleft()
            if data is None:
                s.got_eof = True
                return 0
            self._head = memoryview(data)
        n = min(len(buf), len(self._head))
        buf[:n] = self._head[:n]
        self._head = self._head[n:]
        self._handed = n
        return n

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        s = self.s
        view = memoryview(data)
        while view:
            while s.send.available <= 0:
                self._check()
                s.credit_wake.clear()
                await s.credit_wake.wait()
            self._check()
            n = s.send.take(min(len(view), m.MAX_CHUNK))
            if self._prefix is None:
                self._prefix = m.data_prefix(s.tunnel.id, s.id)
            self.gw.outbox.put_data(self.key, m.encode_data(self._prefix, view[:n]))
            self.gw.out_ready.set()
            view = view[n:]

    async def shutdown_write(self) -> None:
        self._check()
        self.s.sent_eof = True
        self.gw.send(m.Eof(tunnel=self.s.tunnel.id, stream=self.s.id))

    def close(self) -> None:
        """The gateway ends the stream (its socket closes in :meth:`Gateway._pump`)."""

    def abort(self) -> None:
        self.gw._abort(self.s, reason="aborted")


class Gateway:
    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.tunnels: dict[str, GwTunnel] = {}
        self.outbox = Outbox()
        self.out_ready = asyncio.Event()
        self.connected = asyncio.Event()
        self.links = 0
        self.kind = ""
        #: link flow control of the current WebSocket link (None: a long-poll link)
        self.pacer: LinkPacer | None = None
        self.received = 0  # link body bytes received on the current link
        self.ack_sent = 0  # ... and acknowledged
        #: setups (S3) still in progress, by tunnel: each runs beside the link, so a real
        #: server that is slow to answer the S3b check holds up only its own tunnel
        self.setting: dict[str, tuple[asyncio.Task[None], int]] = {}

    # -- the link -------------------------------------------------------------------------
    def send(self, msg: Any) -> None:
        self.outbox.put(msg)
        self.out_ready.set()

    def take(self, limit: int = BATCH) -> bytes:
        body = self.outbox.take(limit)
        if not self.outbox:
            self.out_ready.clear()
        return body

    def take_link(self) -> bytes:
        """A body for the WebSocket link (:func:`~.mux.link_body`); b"" (and not
        ready) when what waits must wait for an acknowledgement."""
        body, more = link_body(self.outbox, self.pacer, time.monotonic())
        if not more:
            self.out_ready.clear()
        return body

    def _transport(self, fallback: bool) -> _Transport:
        if self.cfg.transport == "poll" or (self.cfg.transport == "auto" and fallback):
            return PollTransport(self.cfg)
        return WebSocketTransport(self.cfg)

    async def run(self) -> None:
        """Connect, serve, reconnect (backoff with jitter) until cancelled or refused."""
        from websockets.exceptions import InvalidHandshake

        delay = self.cfg.backoff[0]
        fallback = False
        while True:
            transport = self._transport(fallback)
            started = time.monotonic()
            try:
                acks = transport.kind == "websocket"
                hello = m.encode(m.Hello(name=self.cfg.name, tunnels=list(self.tunnels),
                                         acks=acks))
                raw = await transport.open(hello)
                first = m.decode_to_gateway(raw)
                if not first or isinstance(first[0], m.Refused):
                    why = first[0] if first else None
                    text = (f"the server refused gateway {self.cfg.name}: "
                            f"{why.error if why else 'no answer'}")
                    if why is not None and why.code in RETRY_CODES:
                        raise ConnectionError(text)  # later may work: back off, retry
                    raise Fatal(text)
                welcome = first[0]
                if not isinstance(welcome, m.Welcome):
                    raise m.ProtocolError("bad-welcome", "the server did not welcome us")
                await self._welcome(welcome, transport.kind)
                if acks:  # the server counts the body with the welcome as sent
                    self.pacer = LinkPacer()
                    self.received = self.ack_sent = len(raw)
                    self.send(m.Ack(n=self.received))
                await self._handle(first[1:])
                await transport.run(self)
                log.warning("link to %s ended", self.cfg.server)
            except Fatal:
                raise
            except InvalidHandshake as exc:
                if self.cfg.transport == "auto" and not fallback:
                    log.warning("WebSocket refused (%s); falling back to long polling", exc)
                    fallback = True
                    delay = 0
                else:
                    log.warning("link to %s: %s", self.cfg.server, exc)
            except (OSError, DialError, TimeoutError, ConnectionError, m.ProtocolError,
                    ConnClosed, Exception) as exc:
                if isinstance(exc, asyncio.CancelledError):
                    raise
                log.warning("link to %s: %s", self.cfg.server,
                            getattr(exc, "message", None) or exc or type(exc).__name__)
            finally:
                self.connected.clear()
                with contextlib.suppress(Exception):
                    if hasattr(transport, "ws") or hasattr(transport, "down"):
                        await transport.close()
                self._link_lost()
            if time.monotonic() - started > 30:
                delay = self.cfg.backoff[0]  # it was up for a while: start over
            await asyncio.sleep(max(delay, 0.05) * random.uniform(0.5, 1.0) + 0.05)
            delay = min(max(delay, self.cfg.backoff[0]) * 2, self.cfg.backoff[1])

    async def _welcome(self, w: m.Welcome, kind: str) -> None:
        keep = set(w.tunnels)
        for tid in [t for t in self.tunnels if t not in keep]:
            await self._delete(self.tunnels[tid])
        self.links += 1
        self.kind = kind
        self.connected.set()
        log.info("gateway %s registered as %s's (%s link, %d tunnels kept)", self.cfg.name,
                 w.user, kind, len(keep))

    def _link_lost(self) -> None:
        """Streams in flight cannot survive the link; the pseudo sockets stay."""
        self.outbox = Outbox()
        self.out_ready.clear()
        self.pacer = None
        for task, _ in self.setting.values():  # the server rolled them back meanwhile
            task.cancel()
        self.setting.clear()
        for t in self.tunnels.values():
            for s in list(t.streams.values()):
                self._abort(s, notify=False)

    async def receive(self, body: bytes) -> None:
        await self._handle(m.decode_to_gateway(body))
        if self.pacer is not None:  # taken off the link: the server may send more
            self.received += len(body)
            if self.outbox or self.received - self.ack_sent >= ACK_EVERY:
                self.ack_sent = self.received
                self.send(m.Ack(n=self.received))

    async def _handle(self, msgs: list[Any]) -> None:
        for msg in msgs:
            if isinstance(msg, m.Setup):
                self._start_setup(msg)
            elif isinstance(msg, m.Delete):
                await self._cancel_setup(msg.tunnel)
                t = self.tunnels.get(msg.tunnel)
                if t is not None:
                    await self._delete(t)
                log.info("tunnel %s deleted (%s)", msg.tunnel, msg.reason or "asked")
                self.send(m.Done(req=msg.req, tunnel=msg.tunnel, ok=True))
            elif isinstance(msg, m.Ack):
                if self.pacer is None or not self.pacer.acked(msg.n, time.monotonic()):
                    raise m.ProtocolError("bad-ack", "the server acknowledged bytes never "
                                                     "sent on this link")
                self.out_ready.set()
            elif isinstance(msg, m.Error):
                log.warning("the server refused a message: %s (%s)", msg.error, msg.code)
            elif isinstance(msg, m.Refused):
                raise Fatal(f"the server refused us: {msg.error}")
            elif isinstance(msg, m.Welcome):
                raise m.ProtocolError("welcome-again", "welcome said twice")
            else:
                self._stream_msg(msg)

    # -- S3 -> S4, S6 -> S7 ---------------------------------------------------------------
    def _start_setup(self, msg: m.Setup) -> None:
        """S3 beside the link: the link reader goes on with the next message (other
        tunnels' data, their deletions) while this setup waits for its real server."""
        if msg.tunnel in self.setting:  # the server sends one Setup per tunnel and side
            self.send(m.Done(req=msg.req, tunnel=msg.tunnel, ok=False, code="setup-failed",
                             error="this tunnel is being set up already"))
            return

        async def run() -> None:
            try:
                await self._setup(msg)
            finally:
                if self.setting.get(msg.tunnel, (None,))[0] is task:
                    del self.setting[msg.tunnel]

        task = asyncio.get_running_loop().create_task(run())
        task.add_done_callback(_log_failure)
        self.setting[msg.tunnel] = (task, msg.req)

    async def _cancel_setup(self, tid: str) -> None:
        """A Delete of a tunnel still being set up: the setup stops here and is
        reported failed before the deletion is (S6 overtakes S3)."""
        pending = self.setting.pop(tid, None)
        if pending is None:
            return
        task, req = pending
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if tid not in self.tunnels:
            self.send(m.Done(req=req, tunnel=tid, ok=False, code="deleted",
                             error="deleted during setup"))

    async def _setup(self, msg: m.Setup) -> None:
        old = self.tunnels.get(msg.tunnel)
        if old is not None:
            self.send(m.Done(req=msg.req, tunnel=msg.tunnel, ok=True, address=old.address))
            return
        t = GwTunnel(id=msg.tunnel, side=msg.side, proto=msg.proto, address=msg.address,
                     service=msg.service, window=msg.window)
        try:
            host, port = parse_hostport(msg.address)
            if msg.side == "listen":
                if msg.proto == "tcp":
                    t.listener = Listener(host, port, lambda c: self._accepted(t, c))
                    t.listener.start()
                    bound = t.listener.address
                else:
                    loop = asyncio.get_running_loop()
                    t.udp, _ = await loop.create_datagram_endpoint(
                        lambda: _UdpListen(self, t), local_addr=(host, port))
                    bound = t.udp.get_extra_info("sockname")[:2]
                    t.sweeper = loop.create_task(self._udp_sweep(t))
                t.address = f"{bound[0]}:{bound[1]}"
                log.info("tunnel %s: pseudo socket of %s listening on %s (%s)", t.id,
                         t.service, t.address, t.proto)
            elif msg.proto == "tcp":  # S3b: can the real server be reached?
                probe = await open_tcp(host, port, timeout=5.0)
                probe.close()
                log.info("tunnel %s: %s reaches %s", t.id, t.service, msg.address)
            else:
                await asyncio.get_running_loop().getaddrinfo(host, port,
                                                             type=socket.SOCK_DGRAM)
        except (OSError, ValueError, TimeoutError) as exc:
            what = "cannot listen on" if msg.side == "listen" else "cannot reach"
            log.warning("tunnel %s: %s %s: %s", msg.tunnel, what, msg.address, exc)
            self.send(m.Done(req=msg.req, tunnel=msg.tunnel, ok=False, code="setup-failed",
                             error=f"{what} {msg.address}: {exc}"[:500]))
            return
        self.tunnels[t.id] = t
        self.send(m.Done(req=msg.req, tunnel=t.id, ok=True, address=t.address))

    async def _delete(self, t: GwTunnel) -> None:
        self.tunnels.pop(t.id, None)
        for s in list(t.streams.values()):
            self._abort(s, notify=False)
        if t.listener is not None:
            await t.listener.close()
        if t.udp is not None:
            t.udp.close()
        if t.sweeper is not None:
            t.sweeper.cancel()

    # -- streams --------------------------------------------------------------------------
    def _new_stream(self, t: GwTunnel, sid: int) -> Stream:
        # the peer may send a whole window before our first credit
        s = Stream(tunnel=t, id=sid, send=SendWindow(0 if t.side == "listen" else t.window),
                   recv=RecvWindow(t.window))
        t.streams[sid] = s
        return s

    async def _accepted(self, t: GwTunnel, conn: Conn) -> None:
        """A client connected to the server-side pseudo socket: one stream."""
        sid = t.next_stream
        t.next_stream += 1
        s = self._new_stream(t, sid)
        s.conn = conn
        s.opened = asyncio.get_running_loop().create_future()
        peer = conn.peer
        self.send(m.Open(tunnel=t.id, stream=sid,
                         peer=f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ""))
        try:
            ok = await asyncio.wait_for(s.opened, OPEN_TIMEOUT)
        except TimeoutError:
            ok = False
            self._abort(s, reason="the real server did not answer in time")
        if not ok:
            conn.abort()
            return
        await self._pump(s)

    def _stream_msg(self, msg: Any) -> None:
        t = self.tunnels.get(msg.tunnel)
        if t is None:
            if not isinstance(msg, (m.Reset, m.Credit)):
                self.send(m.Reset(tunnel=msg.tunnel, stream=msg.stream,
                                  reason="no such tunnel in this gateway"))
            return
        s = t.streams.get(msg.stream)
        if isinstance(msg, m.Open):
            if t.side != "connect" or s is not None:
                return
            s = self._new_stream(t, msg.stream)
            task = asyncio.get_running_loop().create_task(self._connect(s))
            s.tasks.append(task)
            return
        if s is None:
            return
        if isinstance(msg, m.Data):
            if t.proto == "udp":
                self._udp_out(s, msg.data)
                return
            if s.got_eof or not s.recv.received(len(msg.data)):
                self._abort(s, reason="the peer overran its window")
                return
            rest = self._write_through(s, msg.data)
            if rest:
                s.inbound.append(rest)
                s.wake.set()
        elif isinstance(msg, m.Credit):
            s.send.credit(msg.n)
            if s.opened is not None and not s.opened.done():
                s.opened.set_result(True)
            s.credit_wake.set()
        elif isinstance(msg, m.Eof):
            s.inbound.append(None)
            s.wake.set()
        elif isinstance(msg, m.Reset):
            log.info("tunnel %s stream %d reset: %s", t.id, s.id, msg.reason or "by the peer")
            if s.opened is not None and not s.opened.done():
                s.opened.set_result(False)
            self._abort(s, notify=False)

    def _write_through(self, s: Stream, data: bytes) -> bytes:
        """Write a stream's data to its socket here, as it comes off the link, when the
        pump waits for it with nothing before it unwritten; returns what is left for
        the pump (all of it when the socket is not free or not a plain one).

        Handing data to the pump costs a turn of the event loop: the pump's task runs
        after every callback already due, such as the bulk streams' reads of up to a
        window each, and on a loaded machine the process may lose the CPU in between.
        An interactive stream's few bytes thus waited about a millisecond per gateway
        for nothing; bulk data saves the copy into the pump's buffer. Order holds:
        while anything waits in ``inbound`` (or the pump is writing), data queues.
        Off with ``KAKEHASHI_FAST_PATH=off``.
        """
        conn = s.conn
        if not (WRITE_THROUGH and s.parked and not s.inbound and conn is not None
                and conn.plain and not conn.closed) or not data:
            return data
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return data
        except OSError:
            return data  # the pump meets the error on its own write and resets the stream
        give = s.recv.consumed(sent)
        if give:
            self.send(m.Credit(tunnel=s.tunnel.id, stream=s.id, n=give))
        return data[sent:]

    async def _connect(self, s: Stream) -> None:
        """The client-side pseudo socket of one stream: connect to the real server."""
        host, port = parse_hostport(s.tunnel.address)
        if s.tunnel.proto == "udp":
            loop = asyncio.get_running_loop()
            try:
                s.udp, _ = await loop.create_datagram_endpoint(
                    lambda: _UdpConnect(self, s), remote_addr=(host, port))
            except OSError as exc:
                self._abort(s, reason=f"cannot reach {s.tunnel.address}: {exc}")
                return
            while s.inbound:
                self._udp_out(s, s.inbound.popleft() or b"")
            return
        try:
            s.conn = await open_tcp(host, port, timeout=10.0)
        except (OSError, TimeoutError) as exc:
            self._abort(s, reason=f"cannot reach {s.tunnel.address}: {exc}")
            return
        if s.reset:
            s.conn.close()
            return
        self.send(m.Credit(tunnel=s.tunnel.id, stream=s.id, n=s.tunnel.window))
        task = asyncio.current_task()
        if task in s.tasks:
            s.tasks.remove(task)
        await self._pump(s)

    async def _pump(self, s: Stream) -> None:
        """Both directions of one stream until both have ended (or a reset), through
        the core's byte pump: the stream is one more Conn-like endpoint to it."""
        assert s.conn is not None
        task = asyncio.ensure_future(pump.pump_raw(s.conn, StreamEnd(self, s)))
        s.tasks.append(task)
        try:
            await task
        except (OSError, ConnClosed) as exc:
            self._abort(s, reason=f"connection error: {exc}")
        except asyncio.CancelledError:
            pass
        finally:
            task.cancel()
            s.tunnel.streams.pop(s.id, None)
            s.conn.close()

    def _abort(self, s: Stream, *, reason: str = "", notify: bool = True) -> None:
        """Reset a stream here and (``notify``) tell the other end why."""
        if s.reset:
            return
        s.reset = True
        s.tunnel.streams.pop(s.id, None)
        self.outbox.drop((s.tunnel.id, s.id))
        if notify:
            self.send(m.Reset(tunnel=s.tunnel.id, stream=s.id, reason=reason[:500]))
        if s.opened is not None and not s.opened.done():
            s.opened.set_result(False)
        s.wake.set()  # a pump waiting on this stream sees the reset
        s.credit_wake.set()
        if s.conn is not None:
            s.conn.abort()
        if s.udp is not None:
            s.udp.close()
        if s.peer is not None:
            s.tunnel.peers.pop(s.peer, None)
        current = asyncio.current_task()
        for task in s.tasks:
            if task is not current:
                task.cancel()

    # -- UDP ----------------------------------------------------------------------------------
    def udp_in(self, t: GwTunnel, data: bytes, addr: Any) -> None:
        """A datagram at the UDP pseudo socket: one stream per client address."""
        if len(data) > m.MAX_CHUNK or self.outbox.bytes > 8 * BATCH:
            return  # datagrams may be dropped; memory may not grow
        sid = t.peers.get(addr)
        if sid is None:
            sid = t.next_stream
            t.next_stream += 1
            s = self._new_stream(t, sid)
            s.peer = addr
            t.peers[addr] = sid
            self.send(m.Open(tunnel=t.id, stream=sid, peer=f"{addr[0]}:{addr[1]}"))
        t.streams[sid].last = time.monotonic()
        self.send(m.Data(tunnel=t.id, stream=sid, data=data))

    async def _udp_sweep(self, t: GwTunnel, idle: float = UDP_IDLE) -> None:
        """End UDP flows that carried nothing for ``idle`` seconds (each holds a socket
        on the other side and counts against the service's limit)."""
        while True:
            await asyncio.sleep(min(5.0, idle / 4))
            now = time.monotonic()
            for s in list(t.streams.values()):
                if now - s.last > idle:
                    self._abort(s, reason=f"no datagram for {idle:g} s")

    def _udp_out(self, s: Stream, data: bytes) -> None:
        t = s.tunnel
        s.last = time.monotonic()
        if t.side == "listen":
            if t.udp is not None and s.peer is not None:
                t.udp.sendto(data, s.peer)
        elif s.udp is not None:
            s.udp.sendto(data)
        elif len(s.inbound) < 256:
            s.inbound.append(data)

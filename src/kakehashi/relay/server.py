"""The relay server: a thin asyncio driver around :class:`ControlUnit`.

Each accepted connection gets one reader task running the core pump's
:func:`forward_frames`: control frames go to the control unit, data frames go to the
paired connection (spliced when both hops are plain TCP). The control unit's
actions are carried out here; sends to a connection go through a small per-link
outbox so a slow peer never blocks another connection's reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from kakehashi.core import tlsmismatch, trace, wire
from kakehashi.core.audit import AuditLog
from kakehashi.core.identity import PasswordChecker
from kakehashi.core.pump import FramedSink, FrameSink, forward_frames
from kakehashi.core.stream import (
    SMALL_CHUNK,
    Conn,
    ConnClosed,
    DirectTLSConn,
    FramedConn,
    Listener,
    TLSConn,
    keep_alive,
    refuse,
    start_tls,
)
from kakehashi.core.tls import TicketKeys
from kakehashi.relay import messages as m
from kakehashi.relay.control import (
    Audit,
    Authenticate,
    Close,
    ControlUnit,
    Forward,
    LeaveTLS,
    OpenTrunk,
    Pair,
    PublishPresence,
    RemoteDeliver,
    Send,
    Settings,
    Shut,
    State,
    Unpair,
    UpgradeTLS,
)
from kakehashi.relay.users import RelayUsers

log = logging.getLogger("kakehashi.relay.server")

HANDSHAKE_TIMEOUT = 10.0
#: serve idle plain connections from readable callbacks (set KAKEHASHI_IDLE_CALLBACKS=0
#: to compare with the coroutine-only path)
IDLE_CALLBACKS = os.environ.get("KAKEHASHI_IDLE_CALLBACKS", "1") != "0"
#: bytes of control messages queued for one connection; a terminal that stops reading
#: (say, asks ``who`` again and again and never reads the answers) is cut off here
#: instead of growing the relay
OUTBOX_BYTES = 1 << 20
SEND_TIMEOUT = 30.0


class _Closing:
    """Outbox marker: close the link once everything before it was sent."""

    def __init__(self, reason: str, delay: float) -> None:
        self.reason = reason
        self.delay = delay


@dataclass(frozen=True)
class _Drain:
    """Action for the connection's coroutine: wait until ``link``'s queued messages
    are out (a pairing applied in a readable callback)."""

    link: Link


class _LeaveTLS:
    """Outbox marker: end TLS here (close_notify) once everything before it was sent."""


class _Shut:
    """Outbox marker: end the write side (the peer of a session-cipher session left)."""


@dataclass(frozen=True)
class _Raw:
    """Outbox item: an encoded frame (a message, or a request's early data)."""

    data: bytes


@dataclass(eq=False)
class Link:
    """The server's view of one terminal connection."""

    cid: int
    framed: FramedConn
    task: asyncio.Task[None] | None = None
    sink: FrameSink | None = None
    upgrade: bool = False
    outbox: deque[object] = field(default_factory=deque)
    outbox_bytes: int = 0
    flusher: asyncio.Task[None] | None = None
    opened: float = 0.0
    closed: bool = False
    #: an inter-node link this node opened (it reads the called node's answers)
    outbound: bool = False
    last_hold: float = 0.0
    #: its session runs under the session cipher: TLS is ending or has ended, and no
    #: control message goes out on it any more
    switched: bool = False
    #: the link paired with this one (for the end of a session-cipher session)
    peer_link: Link | None = None


class RelayServer:
    def __init__(
        self,
        registry: RelayUsers,
        *,
        host: str = "127.0.0.1",
        port: int = 7000,
        tls: ssl.SSLContext | None = None,
        starttls: ssl.SSLContext | None = None,
        settings: Settings | None = None,
        audit: AuditLog | None = None,
        limits: wire.Limits = wire.DEFAULT_LIMITS,
        max_connections: int = 0,
        max_per_client: int = 0,
        tickets: TicketKeys | None = None,
    ) -> None:
        """``tickets``: where the contexts for TLS come from instead of ``tls`` and
        ``starttls`` (session-ticket keys rotated, tickets on or off: ``--tls-resume``);
        ``tls`` still says whether the listener speaks TLS."""
        self.registry = registry
        self.max_connections, self.max_per_client = max_connections, max_per_client
        self.host, self.port = host, port
        self.tls = tls
        self.starttls = starttls or tls
        self.tickets = tickets
        self.core = ControlUnit(settings)
        self.settings = self.core.settings
        self.audit = audit or AuditLog(system="relay")
        self.limits = limits
        self.links: dict[int, Link] = {}
        self.listener: Listener | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._auth_tasks: set[asyncio.Task[None]] = set()
        #: password hashes run here: a few at once per address and in all, never on
        #: the loop's shared default executor
        self.checker = PasswordChecker()
        from kakehashi.core import metrics  # imported by servers only (clients start fast)

        self.metrics = metrics.for_system("relay")
        handshakes = self.metrics.counter(
            "tls_handshakes", "TLS handshakes on terminal and node links: 'resumed' took "
            "a session ticket back (no certificate), 'full' did not.", ["kind"])
        self._handshakes = {True: handshakes.labels("resumed"),
                            False: handshakes.labels("full")}
        #: the cluster layer (:class:`kakehashi.relay.cluster.ClusterNode`) of a node
        self.cluster: Any = None

    # -- lifecycle ----------------------------------------------------------------
    async def start(self) -> tuple[str, int]:
        self._loop = asyncio.get_running_loop()
        self.listener = Listener(self.host, self.port, self.handle_connection,
                                 max_connections=self.max_connections,
                                 max_per_client=self.max_per_client)
        self.listener.start()
        self._watch_start()
        addr = self.listener.address
        log.info("relay listening on %s:%d (%s)", addr[0], addr[1],
                 "TLS" if self.tls else "plaintext, STARTTLS available" if self.starttls
                 else "plaintext")
        return addr

    async def close(self) -> None:
        # the entries held back past a setup (record_soon) first, before any wait: a
        # second signal while the connections shut down cancels this close at its wait
        self.audit.flush()
        if self._watchdog:
            self._watchdog.cancel()
        if self.listener:
            await self.listener.close()
        for link in list(self.links.values()):
            link.framed.conn.close()
        self.checker.close()
        self.audit.flush()  # (and those recorded as the connections closed)

    def now(self) -> float:
        return time.monotonic()

    def _context(self, ctx: ssl.SSLContext) -> ssl.SSLContext:
        """The context for a handshake starting now: the rotating one of ``tickets``
        when there is one."""
        return self.tickets.context() if self.tickets is not None else ctx

    # -- per connection -----------------------------------------------------------
    async def attach(self) -> None:
        """Start the keepalive watchdog without a listener of its own (the gateway's
        one-port mux hands connections to :meth:`handle_connection`)."""
        self._watch_start()

    def _watch_start(self) -> None:
        self._watchdog = asyncio.create_task(self._watch())
        # read when scraped: nothing on the data path; a link's bytes move to the tally
        # when it closes (handle_connection), in the same step it leaves self.links
        m = self.metrics
        m.connections_active.add_source(self, lambda s: len(s.links))
        m.sessions_active.add_source(self, lambda s: sum(
            1 for c in s.core.conns.values() if c.state is State.PAIRED) // 2)
        m.bytes_in.add_source(self, lambda s: sum(
            link.framed.bytes_in for link in s.links.values()))
        m.bytes_out.add_source(self, lambda s: sum(
            link.framed.bytes_out for link in s.links.values()))

    async def handle_connection(self, conn: Conn) -> None:
        """Serve one terminal connection (already TLS if the mux did TLS)."""
        addr = conn.peer[0] if conn.peer else "?"
        try:
            trace.event("new link accepted")
            if self.tls is not None:
                conn = await start_tls(conn, self._context(self.tls), server_side=True,
                                       timeout=HANDSHAKE_TIMEOUT, framed=True)
                trace.event("new link TLS resumed" if conn.resumed else "new link TLS done")
            if isinstance(conn, TLSConn):  # (also when the gateway's port did the TLS)
                self._handshakes[conn.resumed].inc()
            framed = FramedConn(conn, self.limits)
            # asyncio.timeout rather than wait_for: no task of its own, so no cycle
            # between a failure's traceback and that task (see start_tls)
            async with asyncio.timeout(min(HANDSHAKE_TIMEOUT, self.settings.login_timeout)):
                await framed.read_preamble()
                await framed.send(wire.PREAMBLE)  # (within it too)
        except (OSError, ConnClosed, TimeoutError, ssl.SSLError, wire.WireError) as exc:
            log.debug("handshake with %s failed: %s", addr, exc)
            if isinstance(exc, wire.WireError) and exc.code == "tls-mismatch":
                refuse(conn, tlsmismatch.TLS_REFUSAL)  # a TLS client on a plaintext port
            conn.close()
            return
        cid = self.core.connection_made(
            addr, encrypted=not conn.plain,
            leaves_tls=isinstance(conn, DirectTLSConn) and conn.can_leave_tls,
            can_upgrade=not conn.plain or self.starttls is not None)
        await self._serve(cid, framed, addr)

    def add_trunk(self, framed: FramedConn, node: str) -> int:
        """Serve an inter-node link this node opened and authenticated (the cluster
        layer dialed it); its answers are read by the same loop as terminals'."""
        conn = framed.conn
        addr = conn.peer[0] if conn.peer else node
        cid = self.core.connection_made(addr, encrypted=not conn.plain, trunk=node)
        # registered before its task runs: the request it was opened for goes out at once
        link = self.links[cid] = Link(cid, framed, opened=self.now(), outbound=True)
        link.task = asyncio.create_task(self._serve(cid, framed, addr, link))
        self._auth_tasks.add(link.task)
        link.task.add_done_callback(self._auth_tasks.discard)
        return cid

    async def _serve(self, cid: int, framed: FramedConn, addr: str,
                     link: Link | None = None) -> None:
        if link is None:
            link = Link(cid, framed, task=asyncio.current_task(), opened=self.now())
            self.links[cid] = link
        self.metrics.connections.inc()
        try:
            await self._read_loop(link)
        except wire.WireError as exc:
            log.info("conn %d from %s: %s", cid, addr, exc.message)
            self.audit.record("protocol", False, conn=cid, addr=addr, why=exc.message)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(framed.send(m.RELAY_CODEC.encode(
                    m.Error(code=exc.code, message=exc.message))), 2)
        except (OSError, ConnClosed, ssl.SSLError) as exc:
            log.debug("conn %d from %s lost: %s", cid, addr, exc)
        except asyncio.CancelledError:
            pass
        finally:
            link.closed = True
            self.links.pop(cid, None)
            self.metrics.carried(framed.bytes_in, framed.bytes_out)
            if link.sink:
                link.sink.close()
            framed.conn.close()
            await self._apply(self.core.connection_lost(cid, self.now()))

    async def _read_loop(self, link: Link) -> None:
        framed = link.framed

        codec = m.TERMINAL_CODEC if link.outbound else m.RELAY_CODEC

        async def on_ctrl(payload: bytes) -> bool:
            msg = codec.decode(payload)
            if trace.enabled():
                trace.event(f"link {link.cid} {type(msg).__name__}")
            await self._apply(self.core.receive(link.cid, msg, self.now()))
            # back to the idle reader once released (or never paired)
            return link.upgrade or (link.sink is None and self._idle_capable(link))

        while True:
            if self._idle_capable(link) and link.sink is None:
                why, actions = await self._idle_phase(link)
                if why == "eof":
                    return
                await self._apply(actions)
            if not link.upgrade:
                why = await forward_frames(framed, lambda: link.sink, on_ctrl)
                if why == "eof" and await self._left_tls(link):
                    continue  # the terminal's close_notify: plain TCP from here on
                if why != "stop":
                    return
                if not link.upgrade:
                    continue
            # STARTTLS: TLSGo is out; nothing may follow the request in plaintext
            link.upgrade = False
            await self._drain(link)
            if framed.buffered:
                raise wire.WireError("protocol", "data after STARTTLS request")
            if self.starttls is None:
                raise wire.WireError("protocol", "STARTTLS is not available on this server")
            framed.conn = tconn = await start_tls(
                framed.conn, self._context(self.starttls), server_side=True,
                timeout=HANDSHAKE_TIMEOUT, framed=True)
            self._handshakes[tconn.resumed].inc()
            await self._apply(self.core.tls_established(link.cid))
            conn = self.core.conns.get(link.cid)
            self.audit.record("starttls", True, conn=link.cid,
                              user=conn.user if conn else None,
                              version=framed.conn.tls_version)

    @staticmethod
    def _session_over(link: Link) -> bool:
        """Both directions of ``link``'s session ended (each side's EOF was forwarded):
        its terminal closes the link itself, once it has a new spare (so its user stays
        logged in meanwhile); no FIN is needed to tell it its peer has gone."""
        peer = link.peer_link
        return isinstance(link.sink, FramedSink) and link.sink.ended and peer is not None \
            and isinstance(peer.sink, FramedSink) and peer.sink.ended

    async def _left_tls(self, link: Link) -> bool:
        """The TLS input ended: if this link is leaving TLS (our close_notify is out)
        and that was the terminal's close_notify, go on with the plain connection."""
        conn = link.framed.conn
        if not (link.switched and isinstance(conn, DirectTLSConn) and conn.tls_ended_by_peer):
            return False
        if not conn.left_tls_write:
            # close_notify is one-directional: under optimistic pairing the target sends
            # its own right behind its accept, so it can arrive before ours is out (it
            # waits in the outbox behind the pairing's messages)
            await self._drain(link)
            if not conn.left_tls_write:
                return False
        async with link.framed.write_lock:  # no frame is half written meanwhile
            link.framed.conn = conn.left_tls()
        if trace.enabled():
            trace.event(f"link plain {link.cid}")
        keep_alive(link.framed.conn, self.settings.keepalive)
        return True

    # -- idle connections: a readable callback instead of a coroutine per message ---
    @staticmethod
    def _idle_capable(link: Link) -> bool:
        return (IDLE_CALLBACKS and link.framed.conn.plain and not link.framed.conn.has_pushback
                and not link.outbound)

    async def _idle_phase(self, link: Link) -> tuple[str, list[object]]:
        """Serve an unpaired plain connection from a persistent readable callback.

        Thousands of idle agents only exchange keepalives; answering each from a
        callback (no socket registration per read, no coroutine wake-up) is what
        keeps their cost low. Anything that needs waiting - a pairing (whose result
        must be flushed first), a STARTTLS upgrade, data - hands the connection back
        to the coroutine with the actions still to apply.
        """
        loop = asyncio.get_running_loop()
        framed = link.framed
        sock = framed.conn.sock
        fut: asyncio.Future[tuple[str, list[object]]] = loop.create_future()

        def finish(why: str, actions: list[object] | None = None) -> None:
            if not fut.done():
                fut.set_result((why, actions or []))

        def fail(exc: BaseException) -> None:
            if not fut.done():
                fut.set_exception(exc)

        def process() -> None:
            decoder = framed.decoder
            while not fut.done():
                if link.sink is not None or link.upgrade:
                    return finish("switch")
                header = decoder.peek_header()
                if header is None:
                    return None
                if header[0] is not wire.FrameType.CTRL:
                    return finish("switch")  # the coroutine decides what data means here
                frame = decoder.next_frame()
                if frame is None:
                    return None
                framed.bytes_in += wire.HEADER_SIZE + len(frame.payload)
                msg = m.RELAY_CODEC.decode(frame.payload)
                conn_state = self.core.conns.get(link.cid)
                if type(msg) is m.Hold and conn_state is not None and conn_state.user:
                    # the connection-hold reply (Fig. 2, 4-5) is the same decision every
                    # time; answering it here keeps 10,000 idle agents cheap
                    self._enqueue(link.cid, m.HoldAck(seq=msg.seq), 0.0)
                    continue
                actions = self.core.receive(link.cid, msg, self.now())
                if any(isinstance(a, UpgradeTLS) for a in actions):
                    return finish("switch", actions)
                if any(isinstance(a, Pair) for a in actions):
                    # applied in this step (the result and the requester's early data
                    # leave now, not after the coroutine resumes); the coroutine waits
                    # for the result to be out before it forwards this link's frames
                    return finish("switch", [_Drain(x) for x in self._apply_sync(actions)])
                self._apply_now(actions)
            return None

        def on_readable() -> None:
            try:
                data = sock.recv(SMALL_CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                return fail(exc)
            if not data:
                if framed.buffered:
                    return fail(ConnClosed("connection closed in the middle of a frame"))
                return finish("eof")
            framed.received(data)
            try:
                process()
            except (wire.WireError, ValueError) as exc:
                fail(exc)

        process()
        if fut.done():
            return fut.result()
        framed.conn.watch_readable(on_readable)
        try:
            return await fut
        finally:
            framed.conn.unwatch_readable()

    # -- actions ------------------------------------------------------------------
    def _apply_now(self, actions: list[object]) -> None:
        """Actions that need no waiting (everything but Pair's flush and TLS)."""
        for action in actions:
            if isinstance(action, Send):
                self._enqueue(action.conn, action.msg, action.delay)
            elif isinstance(action, Close):
                self._enqueue(action.conn, _Closing(action.reason, action.delay), 0.0)
            elif isinstance(action, Forward):
                # in the target's outbox, so it goes out before any frame the
                # requester sends once it has the result
                self._enqueue(action.conn, _Raw(wire.encode_frame(
                    wire.FrameType.DATA, action.data)), 0.0)
            elif isinstance(action, Audit):
                record = self.audit.record_soon if action.soon else self.audit.record
                record(action.event, action.allow, **action.fields)
            elif isinstance(action, LeaveTLS):
                link = self.links.get(action.conn)
                if link is not None:
                    link.switched = True
                    self._enqueue(action.conn, _LeaveTLS(), 0.0)
            elif isinstance(action, Shut):
                link = self.links.get(action.conn)
                if link is not None and not self._session_over(link):
                    self._enqueue(action.conn, _Shut(), 0.0)
            elif isinstance(action, Unpair):
                link = self.links.get(action.conn)
                if link and link.sink:
                    link.sink.close()
                    link.sink = None
            elif isinstance(action, Authenticate):
                task = asyncio.create_task(self._authenticate(action))
                self._auth_tasks.add(task)
                task.add_done_callback(self._auth_tasks.discard)
            elif isinstance(action, OpenTrunk | PublishPresence | RemoteDeliver):
                if self.cluster is not None:
                    self.cluster.act(action)
                elif isinstance(action, OpenTrunk):  # not a cluster node: cannot happen
                    self._apply_now(self.core.trunk_failed(action.node, action.req,
                                                           "not a cluster node"))
            else:
                raise AssertionError(f"{action!r} needs the connection's coroutine")

    async def _apply(self, actions: list[object]) -> None:
        """All actions; a pairing also waits until the requester's result is out."""
        # The requester must see the positive result (step 16) before the target's
        # first bytes, which this very reader forwards next: let the result go out.
        for link in self._apply_sync(actions):
            await self._drain(link)

    def _apply_sync(self, actions: list[object]) -> list[Link]:
        """All actions but the wait of a pairing: sinks set, messages out or queued.
        Returns the requesters' links whose result must be out (:meth:`_drain`) before
        the reader of a paired connection forwards its first frame."""
        paired: list[Link] = []
        for action in actions:
            if isinstance(action, _Drain):
                paired.append(action.link)
            elif isinstance(action, Pair):
                a, b = self.links.get(action.a), self.links.get(action.b)
                if a and b:
                    a.sink = FramedSink(b.framed)
                    b.sink = FramedSink(a.framed)
                    a.peer_link, b.peer_link = b, a
                    paired.append(a)
                    self.metrics.sessions.inc()
                    if action.since is not None:
                        self.metrics.setup_seconds.observe(max(self.now() - action.since, 0))
            elif isinstance(action, UpgradeTLS):
                link = self.links.get(action.conn)
                if link:
                    link.upgrade = True
            else:
                self._apply_now([action])
        return paired

    async def _authenticate(self, action: Authenticate) -> None:
        conn = self.core.conns.get(action.conn)
        addr = conn.addr if conn is not None else "?"
        try:
            record = await self.checker.run(addr, self.registry.verify, action.user,
                                            action.password)
        except Exception:  # a broken store must not take the server down
            log.exception("user lookup failed")
            record = None
        await self._apply(self.core.authenticated(action.conn, record, self.now()))

    def _enqueue(self, cid: int, item: object, delay: float) -> None:
        link = self.links.get(cid)
        if link is None or link.closed:
            return
        if link.switched and not isinstance(item, _Closing | _LeaveTLS | _Shut | _Raw):
            # nothing the terminal would act on travels on a hop without TLS (the
            # control unit sends none; this holds whatever a later change does)
            log.debug("conn %d: %s not sent (session cipher)", cid, type(item).__name__)
            return
        idle = not link.outbox and (link.flusher is None or link.flusher.done())
        if isinstance(item, _LeaveTLS) and idle and link.framed.leave_tls_now():
            # in the same step as the result before it (the terminals switch one loop
            # round trip sooner, and no other connection's work comes in between)
            return
        if not isinstance(item, _Closing | _LeaveTLS | _Shut):
            try:
                data = item.data if isinstance(item, _Raw) \
                    else m.RELAY_CODEC.encode(item)  # type: ignore[arg-type]
            except wire.WireError as exc:  # a message that cannot go out: a relay bug
                log.error("conn %d: cannot send %s: %s", cid, type(item).__name__, exc)
                self._cut(link)
                return
            if idle and not delay and link.framed.send_now(data, SEND_TIMEOUT):
                return  # out, or its rest on the way with the link's write lock held
            if link.outbox_bytes + len(data) > OUTBOX_BYTES:
                log.warning("conn %d does not read its messages (%d bytes queued); closing it",
                            cid, link.outbox_bytes)
                self.audit.record("outbox", False, conn=cid, why="peer does not read",
                                  queued=link.outbox_bytes)
                self._cut(link)
                return
            link.outbox_bytes += len(data)
            item = _Raw(data)
        link.outbox.append((item, delay))
        if link.flusher is None or link.flusher.done():
            link.flusher = asyncio.create_task(self._flush(link))

    @staticmethod
    def _cut(link: Link) -> None:
        """Drop a connection now (its reader's cleanup tells the control unit)."""
        link.closed = True
        link.outbox.clear()
        link.outbox_bytes = 0
        link.framed.conn.abort()
        if link.task:
            link.task.cancel()

    async def _flush(self, link: Link) -> None:
        while link.outbox and not link.closed:
            item, delay = link.outbox.popleft()
            if delay:
                await asyncio.sleep(delay)
            if isinstance(item, _LeaveTLS | _Shut):
                try:
                    # bounded as a message is: a terminal that reads nothing would hold
                    # this write (its close_notify) and its link for as long, since the
                    # watchdog leaves a link under the session cipher to TCP keepalive
                    async with asyncio.timeout(SEND_TIMEOUT), link.framed.write_lock:
                        if isinstance(item, _Shut):  # (between two frames)
                            await link.framed.conn.shutdown_write()
                        else:
                            await link.framed.conn.leave_tls_write()  # type: ignore[attr-defined]
                except (OSError, ConnClosed, ssl.SSLError, AttributeError, TimeoutError) as exc:
                    log.debug("conn %d: cannot end TLS: %s", link.cid, exc)
                    if link.task:
                        link.task.cancel()
                    return
                continue
            if isinstance(item, _Closing):
                if item.delay:
                    await asyncio.sleep(item.delay)
                log.debug("closing conn %d: %s", link.cid, item.reason)
                if link.task:
                    link.task.cancel()
                return
            data = item.data  # type: ignore[attr-defined]
            link.outbox_bytes -= len(data)
            try:
                await asyncio.wait_for(link.framed.send(data), SEND_TIMEOUT)
            except (OSError, ConnClosed, TimeoutError, ssl.SSLError):
                if link.task:
                    link.task.cancel()
                return

    async def _drain(self, link: Link) -> None:
        """Until every message queued for ``link`` has been written."""
        await link.framed.flushed()
        while link.flusher is not None and not link.flusher.done():
            await asyncio.shield(link.flusher)

    def _hold(self, link: Link) -> None:
        """A connection-hold command on an inter-node link this node opened, also
        during a session: written whole under the link's write lock, between two
        frames the pump forwards (and never inside a message :meth:`_enqueue` wrote
        only in part: its rest holds the lock)."""
        if link.framed.write_lock.locked():
            return  # a frame is going out: the called node hears from this link anyway

        async def send() -> None:
            try:
                await asyncio.wait_for(link.framed.send(m.RELAY_CODEC.encode(m.Hold())),
                                       SEND_TIMEOUT)
            except (OSError, ConnClosed, TimeoutError, ssl.SSLError):
                if link.task:
                    link.task.cancel()

        task = asyncio.create_task(send())
        self._auth_tasks.add(task)
        task.add_done_callback(self._auth_tasks.discard)

    # -- keepalive watchdog -------------------------------------------------------
    async def _watch(self) -> None:
        period = max(0.05, min(self.settings.keepalive / 3, 5.0))
        while True:
            await asyncio.sleep(period)
            now = self.now()
            loop_now = asyncio.get_running_loop().time()
            await self._apply(self.core.tick(now))
            for link in list(self.links.values()):
                conn = self.core.conns.get(link.cid)
                if conn is None:
                    continue
                if link.outbound and loop_now - link.last_hold >= self.settings.keepalive:
                    link.last_hold = loop_now  # the called node's watchdog sees it alive
                    self._hold(link)
                if conn.state is State.CLOSED:
                    continue  # already being closed (a slowed-down login refusal)
                if conn.state in (State.NEW, State.AUTH):
                    if now - link.opened > self.settings.login_timeout and link.task:
                        log.info("conn %d did not log in in time", link.cid)
                        link.task.cancel()
                    continue
                if conn.switched and conn.peer is not None:
                    continue  # no holds under the session cipher: TCP keepalive instead
                if loop_now - link.framed.last_rx > self.settings.dead_after \
                        and not link.framed.stalled:
                    log.info("conn %d (%s) missed its keepalives; closing", link.cid, conn.user)
                    self.audit.record("keepalive", False, conn=link.cid, user=conn.user,
                                      why="dead peer")
                    link.framed.conn.abort()
                    if link.task:
                        link.task.cancel()

"""The first relay (spec 002, device 2): entry ports on a public host.

The manager tells the edge to open a grant's port (S13-S15); on each client connection
the edge asks the manager for the relay information (S22-S25), decides (S26, the pure
:func:`~.grants.check_access` and :func:`~.grants.check_pin`), answers a refusal with
connection error information (S27), and otherwise relays through the inner relay
(S28-S30) with the core pump. TLS of a ``--tls`` grant ends here and the device leg is
plain (claim 12); the link to the inner relay is mutual TLS with the certificate the
manager issued.

Each grant's expiry is a timer on the edge's own clock, so a live connection is cut at
expiry even while the manager is unreachable; revocation and extension arrive over the
control channel and take effect at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import ssl
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kakehashi.core import tls, wire
from kakehashi.core.audit import AuditLog
from kakehashi.core.pump import Transfer, pump_raw
from kakehashi.core.stream import Conn, ConnClosed, FramedConn, Listener, open_tcp, start_tls
from kakehashi.ondemand import grants as g
from kakehashi.ondemand import messages as m
from kakehashi.ondemand.channel import ControlChannel

log = logging.getLogger("kakehashi.ondemand.edge")


@dataclass
class EdgeConfig:
    #: the manager, or several replicas of it (tried in turn, see .channel)
    server: str | tuple[str, ...]
    token: str
    name: str
    public_host: str
    ports: tuple[int, int]
    bind: str
    region: str = ""
    carrier: str = ""
    manager_tls: ssl.SSLContext | None = None
    #: the certificate clients of a --tls grant see (default: the development CA's)
    cert: str | None = None
    key: str | None = None
    burst_rate: float = 50.0
    burst: int = 100
    handshake_timeout: float = 10.0
    dial_timeout: float = 10.0
    relay_info_timeout: float = 3.0


@dataclass(eq=False)
class Session:
    client: str
    started: float
    task: asyncio.Task[Any]
    up: Transfer = field(default_factory=Transfer)    # client -> device
    down: Transfer = field(default_factory=Transfer)  # device -> client
    reason: str | None = None


class EdgeGrant:
    """One open entry port and the connections it carries."""

    def __init__(self, doc: dict[str, Any], listener: Listener, burst: g.BurstLimit) -> None:
        self.doc = doc
        self.view = g.AccessView.from_grant(doc)
        self.listener = listener
        self.sessions: set[Session] = set()
        self.burst = burst
        self.timer: asyncio.TimerHandle | None = None
        #: the client leg's TLS (its session-ticket keys rotate: a grant may last long)
        self.ssl: tls.TicketKeys | None = None
        self.closed = False
        #: burst refusals not yet reported, their clients, and the timer that reports
        #: them (one event a second at most, see :meth:`Edge._refuse_burst`)
        self.burst_refused = 0
        self.burst_clients: set[str] = set()
        self.burst_timer: asyncio.TimerHandle | None = None

    @property
    def id(self) -> str:
        return self.doc["id"]


class Edge:
    def __init__(self, cfg: EdgeConfig, *, audit: AuditLog | None = None) -> None:
        self.cfg = cfg
        self.audit = audit or AuditLog(None, system="ondemand-edge")
        self.grants: dict[str, EdgeGrant] = {}
        self.by_port: dict[int, EdgeGrant] = {}
        self._dir = tempfile.TemporaryDirectory(prefix="kakehashi-edge-")
        key_pem, self._csr = tls.new_key_and_csr(cfg.name)
        self._key = Path(self._dir.name) / "link.key"
        self._key.write_bytes(key_pem)
        self._key.chmod(0o600)
        self.link_ctx: ssl.SSLContext | None = None
        self.channel = ControlChannel(cfg.server, cfg.token, self._hello, self._on_message,
                                      ssl_context=cfg.manager_tls)
        self.closed_bytes = 0
        self._last_total = 0
        from kakehashi.core import metrics  # servers only: clients start without it

        self.metrics = metrics.for_system("ondemand-edge")
        self._opened = self.metrics.counter("grants_opened", "Grants whose port was opened.")
        self._cuts = self.metrics.counter("cuts", "Live connections cut, by why (expired, "
                                          "revoked, ...).", ["reason"])
        self.metrics.gauge("grants_open", "Grants with an open port now.").add_source(
            self, lambda e: len(e.grants))
        self.metrics.sessions_active.add_source(
            self, lambda e: sum(len(eg.sessions) for eg in e.grants.values()))

    def _hello(self) -> m.Hello:
        return m.Hello(kind="edge", name=self.cfg.name, csr=self._csr.decode(),
                       public_host=self.cfg.public_host, ports=self.cfg.ports,
                       region=self.cfg.region, carrier=self.cfg.carrier)

    async def run(self) -> None:
        load = asyncio.get_running_loop().create_task(self._report_load())
        try:
            await self.channel.run()
        finally:
            load.cancel()
            for eg in list(self.grants.values()):
                await self._close(eg, "edge-stopped", notify=False)
            await self.channel.close()
            self._dir.cleanup()

    # -- the manager's commands --------------------------------------------------------
    async def _on_message(self, msg: m.ToRelay) -> None:
        if isinstance(msg, m.Welcome):
            self._welcome(msg)
            live = {d["id"] for d in msg.grants}
            for eg in list(self.grants.values()):  # ended while we were away
                if eg.id not in live:
                    await self._close(eg, "ended")
            for doc in msg.grants:
                if doc["id"] in self.grants:
                    self._update(doc)
                else:
                    err = self._open(doc)
                    if err:
                        log.error("grant %s: cannot re-open port %s: %s", doc["id"],
                                  doc["port"], err[1])
            log.info("edge %s online: %d grants open (manager %s)", self.cfg.name,
                     len(self.grants), self.channel.server)
        elif isinstance(msg, m.Open):
            err = self._open(msg.grant)
            ack = m.Ack(req=msg.req, ok=err is None, code=err[0] if err else "",
                        error=err[1] if err else "")
            await self.channel.send(ack)
        elif isinstance(msg, m.Update):
            self._update(msg.grant)
        elif isinstance(msg, m.Close):
            eg = self.grants.get(msg.grant)
            if eg is not None:
                await self._close(eg, msg.reason)

    def _welcome(self, msg: m.Welcome) -> None:
        cert = Path(self._dir.name) / "link.pem"
        cert.write_text(msg.cert)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cadata=msg.ca)
        ctx.load_cert_chain(cert, self._key)
        self.link_ctx = ctx

    def _open(self, doc: dict[str, Any]) -> tuple[str, str] | None:
        """Listen on the grant's port; (code, message) when that is not possible."""
        port = int(doc["port"])
        if doc["id"] in self.grants:
            return None
        if not self.cfg.ports[0] <= port <= self.cfg.ports[1]:
            return "bad-port", f"port {port} is outside this edge's range"
        if port in self.by_port:
            return "port-in-use", f"port {port} already serves grant {self.by_port[port].id}"
        try:
            ctx = tls.TicketKeys(lambda: self._client_tls(doc)) if doc.get("tls") else None
        except (ssl.SSLError, OSError, ValueError) as exc:
            return "bad-auth-info", f"cannot build the TLS context: {exc}"
        eg: EdgeGrant
        try:
            listener = Listener(self.cfg.bind, port, lambda c: self._serve_logged(eg, c))
        except OSError as exc:
            code = "port-in-use" if exc.errno == errno.EADDRINUSE else "bind-failed"
            return code, f"cannot listen on {self.cfg.bind}:{port}: {exc.strerror or exc}"
        eg = EdgeGrant(doc, listener, g.BurstLimit(self.cfg.burst_rate, self.cfg.burst))
        eg.ssl = ctx
        listener.start()
        self.grants[eg.id] = eg
        self.by_port[port] = eg
        self._opened.inc()
        self._schedule(eg)
        log.info("grant %s: listening on %s:%d until %s", eg.id, self.cfg.bind, port,
                 g.iso(eg.view.expires_at))
        return None

    def _client_tls(self, doc: dict[str, Any]) -> ssl.SSLContext:
        """TLS for the client leg (claim 12): the edge's certificate, and the client
        certificate required and verified against the grant's registered CA."""
        if self.cfg.cert:
            cert, key = Path(self.cfg.cert), (Path(self.cfg.key) if self.cfg.key else None)
        else:
            cert, key = tls.DevCA().issue([self.cfg.public_host, "localhost"])
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert, key)
        if doc.get("ca_pem"):
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cadata=doc["ca_pem"])
        return ctx

    def _update(self, doc: dict[str, Any]) -> None:
        eg = self.grants.get(doc["id"])
        if eg is None:
            return
        eg.doc.update(doc)
        eg.view = g.AccessView.from_grant(eg.doc)
        self._schedule(eg)

    def _schedule(self, eg: EdgeGrant) -> None:
        if eg.timer is not None:
            eg.timer.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, eg.view.expires_at - time.time())
        eg.timer = loop.call_later(delay, lambda: loop.create_task(self._expire(eg)))

    async def _expire(self, eg: EdgeGrant) -> None:
        if eg.closed:
            return
        if eg.view.expires_at > time.time():  # extended meanwhile
            self._schedule(eg)
            return
        await self._close(eg, "expired")

    async def _close(self, eg: EdgeGrant, reason: str, *, notify: bool = True) -> None:
        """Stop listening and cut every live connection of the grant now."""
        if eg.closed:
            return
        eg.closed = True
        if eg.timer is not None:
            eg.timer.cancel()
        if eg.burst_timer is not None:
            eg.burst_timer.cancel()
            self._report_burst(eg, again=False)
        self.grants.pop(eg.id, None)
        if self.by_port.get(eg.doc["port"]) is eg:
            del self.by_port[eg.doc["port"]]
        cut = list(eg.sessions)
        for sess in cut:
            sess.reason = reason
            sess.task.cancel()
        if cut:
            from kakehashi.core.audit import code_label

            self._cuts.labels(code_label(reason)).inc(len(cut))
        await eg.listener.close()
        log.info("grant %s: port %s closed (%s), %d connections cut", eg.id, eg.doc["port"],
                 reason, len(cut))

    # -- client connections (S21-S30) --------------------------------------------------
    def _event(self, eg: EdgeGrant, kind: str, **fields: Any) -> None:
        self.audit.record(kind, kind not in ("denied", "refused"), grant=eg.id,
                          edge=self.cfg.name, port=eg.doc["port"], **fields)
        self.channel.post(m.Event(grant=eg.id, event=kind, fields=fields))

    def _refuse_burst(self, eg: EdgeGrant, client: str) -> None:
        """A connection over the grant's burst limit: refused without asking anyone,
        and reported at most once a second per grant, with how many there were. A
        flood of connections to a public port (each a few hundred bytes on the wire,
        no login) wrote one audit line on the edge and one event in the manager's
        store each: 18,000 connects in a few seconds, 18,000 of both."""
        eg.burst_refused += 1
        if len(eg.burst_clients) < 16:
            eg.burst_clients.add(client)
        if eg.burst_timer is None:  # the first of a quiet second is reported at once
            self._report_burst(eg)

    def _report_burst(self, eg: EdgeGrant, *, again: bool = True) -> None:
        eg.burst_timer = None
        if not eg.burst_refused:
            return  # the flood is over: the next refusal is reported at once
        clients = sorted(eg.burst_clients)
        self._event(eg, "refused", client=clients[0], reason="burst",
                    count=eg.burst_refused, **({"clients": clients} if len(clients) > 1
                                               else {}))
        eg.burst_refused = 0
        eg.burst_clients.clear()
        if again and not eg.closed:
            eg.burst_timer = asyncio.get_running_loop().call_later(
                1.0, self._report_burst, eg)

    async def _refuse(self, conn: Conn, reason: str) -> None:
        """Connection error information (S27): one line, then the connection ends."""
        if conn.plain:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    conn.send_all(f"kakehashi: connection refused ({reason})\r\n".encode()), 2)

    async def _serve_logged(self, eg: EdgeGrant, conn: Conn) -> None:
        try:
            await self._serve(eg, conn)
        except Exception:  # a bug must not pass silently; the port goes on serving
            log.exception("grant %s: connection failed", eg.id)

    async def _serve(self, eg: EdgeGrant, conn: Conn) -> None:
        client = conn.peer[0] if conn.peer else "?"
        now = time.time()
        started = time.monotonic()
        self.metrics.connections.inc()
        if not eg.burst.allow(time.monotonic()):
            self._refuse_burst(eg, client)
            return
        self._event(eg, "access", client=client)
        info = await self._relay_info(eg)
        reason = g.check_access(eg.view, client, now, len(eg.sessions))
        if reason:
            self._event(eg, "denied", client=client, reason=reason)
            await self._refuse(conn, reason)
            return
        sess = Session(client, now, asyncio.current_task())  # type: ignore[arg-type]
        eg.sessions.add(sess)
        link: Conn | None = None
        stream: Conn | None = conn
        try:
            if eg.view.tls:
                stream = await self._handshake(eg, conn, client)
                if stream is None:
                    return
            try:
                link = await self._dial(info)
            except (OSError, ConnClosed, TimeoutError, wire.WireError, _Refused) as exc:
                self._event(eg, "refused", client=client, reason="inner",
                            detail=str(exc) or type(exc).__name__)
                await self._refuse(stream, "the device cannot be reached")
                return
            self._event(eg, "connected", client=client,
                        target=f"{info.get('imsi')}:{info.get('target_port')}")
            self.metrics.sessions.inc()
            self.metrics.setup_done(started)
            await pump_raw(stream, link, sess.up, sess.down)
            sess.reason = sess.reason or "done"
        except asyncio.CancelledError:
            sess.reason = sess.reason or "cancelled"
            raise
        except (OSError, ConnClosed) as exc:
            sess.reason = sess.reason or f"error: {exc}"
        finally:
            eg.sessions.discard(sess)
            if link is not None:
                link.close()
            if sess.reason is not None:  # it got as far as the relay
                self.closed_bytes += sess.up.bytes + sess.down.bytes
                self.metrics.carried(sess.up.bytes, sess.down.bytes)
                self._event(eg, "closed", client=client, reason=sess.reason,
                            bytes_up=sess.up.bytes, bytes_down=sess.down.bytes,
                            duration=round(time.time() - sess.started, 3))
            if stream is not None:
                stream.close()

    async def _relay_info(self, eg: EdgeGrant) -> dict[str, Any]:
        """S22-S25: ask the manager which target and conditions this port has now.
        When it cannot answer in time, what the edge was last told stands."""
        try:
            reply = await self.channel.request("relay-info", timeout=self.cfg.relay_info_timeout,
                                               port=eg.doc["port"])
        except (ConnectionError, TimeoutError, OSError) as exc:
            log.warning("grant %s: no relay information from the manager (%s); using the "
                        "last known conditions", eg.id, exc or "timeout")
            return dict(eg.doc)
        if not reply.ok or reply.data.get("id") != eg.id:
            eg.view.revoked = True  # the manager no longer knows this grant on this port
            return dict(eg.doc)
        data = dict(reply.data)
        ticket = data.pop("ticket", "")  # this connection's alone
        eg.doc.update(data)
        eg.view = g.AccessView.from_grant(eg.doc)
        return {**eg.doc, "ticket": ticket}

    async def _handshake(self, eg: EdgeGrant, conn: Conn, client: str) -> Conn | None:
        assert eg.ssl is not None
        try:
            tconn = await start_tls(conn, eg.ssl.context(), server_side=True,
                                    timeout=self.cfg.handshake_timeout)
        except (ssl.SSLError, OSError, ConnClosed, TimeoutError) as exc:
            self._event(eg, "denied", client=client, reason="certificate",
                        detail=_tls_detail(exc))
            return None
        reason = g.check_pin(eg.view, tconn.ssl_object.getpeercert(binary_form=True)) \
            if eg.doc.get("ca_pem") else None
        if reason:
            self._event(eg, "denied", client=client, reason=reason,
                        detail="the client key does not match the registered pin")
            tconn.close()
            return None
        return tconn

    async def _dial(self, info: dict[str, Any]) -> Conn:
        """S28-S29: mutual TLS to the inner relay, then which device and port."""
        if self.link_ctx is None:
            raise _Refused("no link certificate yet")
        host, _, port = str(info.get("inner_address", "")).rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit():
            raise _Refused(f"inner relay {info.get('inner')} has no address")
        raw = await open_tcp(host, int(port), timeout=self.cfg.dial_timeout)
        if info.get("inner_tls", True):
            try:
                link = await start_tls(raw, self.link_ctx, server_side=False,
                                       server_hostname=host, timeout=self.cfg.dial_timeout)
            except BaseException:
                raw.close()
                raise
        else:  # a plain link (the inner relay said --link-tls off): the pump splices
            link = raw
        try:
            framed = FramedConn(link, m.LINK_LIMITS)
            await link.send_all(wire.PREAMBLE + m.link_codec.encode(m.Dial(
                grant=info["id"], imsi=info["imsi"], address=info["device_address"],
                port=int(info["target_port"]), ticket=info.get("ticket", ""))))
            frame = await asyncio.wait_for(framed.read_frame(), self.cfg.dial_timeout)
            if frame is None or frame.type is not wire.FrameType.CTRL:
                raise _Refused("the inner relay closed the link")
            result = m.link_codec.decode(frame.payload)
            if not isinstance(result, m.DialResult) or not result.ok:
                raise _Refused(getattr(result, "reason", "") or "refused by the inner relay")
            if framed.buffered:  # the device spoke first (an SSH banner): keep its bytes
                link.unread(framed.take_buffer())
            return link
        except BaseException:
            link.close()
            raise

    async def _report_load(self) -> None:
        """Active sessions and bytes per second, for the manager's load policy."""
        while True:
            await asyncio.sleep(2.0)
            sessions = [s for eg in self.grants.values() for s in eg.sessions]
            total = self.closed_bytes + sum(s.up.bytes + s.down.bytes for s in sessions)
            rate = max(0, total - self._last_total) / 2.0
            self._last_total = total
            if self.channel.connected.is_set():
                self.channel.post(m.Load(sessions=len(sessions), bytes_per_second=rate))


class _Refused(Exception):
    pass


def _tls_detail(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return str(exc) or type(exc).__name__

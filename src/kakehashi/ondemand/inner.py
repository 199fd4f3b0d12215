"""The second relay (spec 002, device 3): inside the closed network, next to the devices.

It registers its devices with the manager (``--device IMSI=ADDRESS``, the stand-in for
the P-GW/UPF connection management information, S24) and accepts relay links only from
edges that prove themselves with a certificate the manager issued (mutual TLS, unit
``edge``). For each link it reads one :class:`~.messages.Dial` (S29) and dials only
when the device is one of its own at exactly that address and the manager confirms
that the grant is live and names that device and port; anything else is refused and
audited. Then the core pump relays the bytes (S30); the device leg is plain.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kakehashi.core import tls, wire
from kakehashi.core.audit import AuditLog
from kakehashi.core.pump import Transfer, pump_raw
from kakehashi.core.stream import Conn, ConnClosed, FramedConn, Listener, open_tcp, start_tls
from kakehashi.ondemand import messages as m
from kakehashi.ondemand.channel import ControlChannel

log = logging.getLogger("kakehashi.ondemand.inner")


@dataclass
class InnerConfig:
    #: the manager, or several replicas of it (tried in turn, see .channel)
    server: str | tuple[str, ...]
    token: str
    name: str
    listen: tuple[str, int]
    devices: dict[str, str]
    advertise: str | None = None
    manager_tls: ssl.SSLContext | None = None
    handshake_timeout: float = 10.0
    dial_timeout: float = 10.0
    check_timeout: float = 5.0
    max_connections: int = 0
    #: mutual TLS on the relay link (off: plain TCP inside one trusted network)
    link_tls: bool = True


class Inner:
    def __init__(self, cfg: InnerConfig, *, audit: AuditLog | None = None) -> None:
        self.cfg = cfg
        self.audit = audit or AuditLog(None, system="ondemand-inner")
        self._dir = tempfile.TemporaryDirectory(prefix="kakehashi-inner-")
        key_pem, self._csr = tls.new_key_and_csr(cfg.name)
        self._key = Path(self._dir.name) / "link.key"
        self._key.write_bytes(key_pem)
        self._key.chmod(0o600)
        self.ctx: ssl.SSLContext | None = None
        self.ready = asyncio.Event()
        self.listener = Listener(cfg.listen[0], cfg.listen[1], self._serve_logged,
                                 max_connections=cfg.max_connections)
        host, port = self.listener.address
        self.address = cfg.advertise or f"{cfg.listen[0] or host}:{port}"
        self.channel = ControlChannel(cfg.server, cfg.token, self._hello, self._on_message,
                                      ssl_context=cfg.manager_tls)

    def _hello(self) -> m.Hello:
        return m.Hello(kind="inner", name=self.cfg.name, csr=self._csr.decode(),
                       address=self.address, link_tls=self.cfg.link_tls,
                       devices=[m.Device(imsi=i, address=a) for i, a in self.cfg.devices.items()])

    async def run(self) -> None:
        self.listener.start()
        log.info("inner %s: relay link listening on %s (advertised as %s), %d devices",
                 self.cfg.name, "{}:{}".format(*self.listener.address), self.address,
                 len(self.cfg.devices))
        try:
            await self.channel.run()
        finally:
            await self.listener.close()
            await self.channel.close()
            self._dir.cleanup()

    async def _on_message(self, msg: m.ToRelay) -> None:
        if isinstance(msg, m.Welcome):
            cert = Path(self._dir.name) / "link.pem"
            cert.write_text(msg.cert)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(cert, self._key)
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cadata=msg.ca)
            # no session tickets: the only client is an edge, which dials every link
            # with a full handshake, so tickets would be work for nothing under keys
            # that would last as long as this process
            ctx.num_tickets = 0
            self.ctx = ctx
            self.ready.set()
            log.info("inner %s online (manager %s)", self.cfg.name, self.channel.server)

    def _refused(self, peer: str, reason: str, **fields: Any) -> None:
        self.audit.record("refused", False, inner=self.cfg.name, peer=peer, reason=reason,
                          **fields)
        grant = fields.get("grant")
        if grant:
            self.channel.post(m.Event(grant=grant, event="refused",
                                      fields={"reason": reason, **{k: v for k, v in
                                                                   fields.items()
                                                                   if k != "grant"}}))

    async def _serve_logged(self, conn: Conn) -> None:
        try:
            await self._serve(conn)
        except Exception:  # a bug must not pass silently; the relay goes on serving
            log.exception("relay link from %s failed", conn.peer)

    async def _serve(self, conn: Conn) -> None:
        peer = conn.peer[0] if conn.peer else "?"
        try:
            await asyncio.wait_for(self.ready.wait(), self.cfg.handshake_timeout)
        except TimeoutError:
            return
        assert self.ctx is not None
        link: Conn
        if self.cfg.link_tls:
            try:
                link = await start_tls(conn, self.ctx, server_side=True,
                                       timeout=self.cfg.handshake_timeout)
            except (ssl.SSLError, OSError, ConnClosed, TimeoutError) as exc:
                self._refused(peer, "link-authentication", detail=str(exc)[:200])
                return
        else:  # plain link: the dial's one-time ticket is what the manager vouches for
            link = conn
        try:
            if self.cfg.link_tls:
                who = tls.peer_unit(link.ssl_object)  # type: ignore[attr-defined]
                if who is None or who[0] != "edge":
                    self._refused(peer, "not-an-edge", subject=str(who))
                    return
                edge = who[1]
            else:
                edge = peer
            try:
                framed = FramedConn(link, m.LINK_LIMITS)
                await asyncio.wait_for(framed.read_preamble(), self.cfg.handshake_timeout)
                frame = await asyncio.wait_for(framed.read_frame(), self.cfg.handshake_timeout)
                dial = m.link_codec.decode(frame.payload) if frame is not None and \
                    frame.type is wire.FrameType.CTRL else None
            except (wire.WireError, ConnClosed, OSError, TimeoutError) as exc:
                self._refused(peer, "protocol", edge=edge, detail=str(exc)[:200])
                return
            if not isinstance(dial, m.Dial):
                self._refused(peer, "protocol", edge=edge, detail="expected a dial")
                return
            device = await self._dial(dial, edge, peer, link)
            if device is None:
                return
            if framed.buffered:  # the client's first bytes came right behind the dial
                link.unread(framed.take_buffer())
            try:
                up, down = Transfer(), Transfer()
                await pump_raw(link, device, up, down)
            except (OSError, ConnClosed):
                pass
            finally:
                device.close()
        finally:
            link.close()

    async def _dial(self, dial: m.Dial, edge: str, peer: str, link: Conn) -> Conn | None:
        """Dial the device only when it is granted (S29); else refuse and audit."""
        fields = {"grant": dial.grant, "edge": edge, "imsi": dial.imsi,
                  "target": f"{dial.address}:{dial.port}"}
        why = None
        if self.cfg.devices.get(dial.imsi) != dial.address:
            why = f"{dial.address} is not the address of device {dial.imsi} here"
        else:
            try:
                reply = await self.channel.request(
                    "check", timeout=self.cfg.check_timeout, grant=dial.grant,
                    imsi=dial.imsi, address=dial.address, target_port=dial.port,
                    ticket=dial.ticket)
                if not reply.ok:
                    why = reply.error or "not granted"
            except (ConnectionError, TimeoutError, OSError) as exc:
                why = f"the manager cannot confirm the grant ({exc or 'timeout'})"
        if why:
            self._refused(peer, "not-granted", detail=why, **fields)
            await _answer(link, m.DialResult(ok=False, reason=f"not granted: {why}"))
            return None
        try:
            device = await open_tcp(dial.address, dial.port, timeout=self.cfg.dial_timeout)
        except (OSError, TimeoutError) as exc:
            self._refused(peer, "device-unreachable", detail=str(exc)[:200], **fields)
            await _answer(link, m.DialResult(ok=False, reason="device unreachable"))
            return None
        self.audit.record("dialed", True, inner=self.cfg.name, **fields)
        await _answer(link, m.DialResult(ok=True))
        return device


async def _answer(link: Conn, result: m.DialResult) -> None:
    try:
        await asyncio.wait_for(link.send_all(m.link_codec.encode(result)), 5)
    except (OSError, ConnClosed, TimeoutError):
        pass

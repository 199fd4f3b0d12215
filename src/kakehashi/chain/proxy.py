"""``chain proxy``: one firewall's proxy server (spec 004, Figs. 8 and 11).

A TCP control port takes relay requests; each accepted session gets two UDP ports from
the configured range (step 603/904: the client-facing one, P2 or P4, and the
server-facing one, P3 or P5) and a :class:`~kakehashi.core.datagram.DatagramForwarder`
that rewrites addresses as the session's port record says (615/921).

Per connection: challenge-response authentication of the requester (602/902), then
access control (claim 6), then the route (604/905) and, when another proxy is needed,
either the recursive hop (605-611: this proxy authenticates with the next one and asks
it in turn) or, in iterative mode, a Reply with ``complete=False`` after which the
client's messages to the next proxy are relayed (909-917). Every refusal names this
proxy and the reason and closes the control connection; a refusal from further down is
passed up unchanged, so the client learns which hop refused. The session lives as long
as its control connection: when either neighbour closes it, or no datagram moves for
``idle_timeout``, the ports are closed and both control connections with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
from dataclasses import dataclass, field

from kakehashi.chain import messages as m
from kakehashi.chain.setup import E2E_PURPOSE, HOP_PURPOSE
from kakehashi.chain.tables import Acl, Hop, PortRange, Routes, SessionLimits
from kakehashi.core import wire
from kakehashi.core.audit import AuditLog
from kakehashi.core.crypto import DATAGRAM_OVERHEAD, AuthFailed, DatagramChannel, MutualAuth
from kakehashi.core.datagram import DatagramForwarder, PortRecord, bind_in_range
from kakehashi.core.stream import ConnClosed, FramedConn, Listener, open_tcp, refuse

log = logging.getLogger("kakehashi.chain")

#: the largest UDP payload over IPv4
MAX_UDP_PAYLOAD = 65507


@dataclass
class ProxyConfig:
    name: str
    host: str
    port: int
    udp_ports: PortRange
    keys: dict[str, bytes]
    routes: Routes
    acl: Acl
    udp_host: str | None = None
    auth_timeout: float = 10.0
    connect_timeout: float = 5.0
    idle_timeout: float = 300.0
    max_sessions: int = 0
    max_per_user: int = 16
    max_per_client: int = 64
    audit: AuditLog = field(default_factory=lambda: AuditLog(system="chain"))


class Refusal(Exception):
    """End the session with a Refused naming ``hop`` (this proxy unless passed up)."""

    def __init__(self, msg: m.Refused) -> None:
        super().__init__(msg.describe())
        self.msg = msg


class Ctrl:
    """A control connection: preamble, CTRL frames of :data:`messages.codec`, timeouts."""

    def __init__(self, fc: FramedConn) -> None:
        self.fc = fc

    async def read(self, timeout: float | None) -> m.Message | None:
        """The next message, or None when the peer closed."""
        frame = await asyncio.wait_for(self.fc.read_frame(), timeout)
        if frame is None:
            return None
        if frame.type != wire.FrameType.CTRL:
            raise wire.WireError("bad-frame", "only control frames belong on this connection")
        return m.codec.decode(frame.payload)

    async def send(self, msg: m.Message) -> None:
        await self.fc.send(m.codec.encode(msg))

    def close(self) -> None:
        self.fc.conn.close()


class ChainProxy:
    def __init__(self, cfg: ProxyConfig) -> None:
        self.cfg = cfg
        self.limits = SessionLimits(cfg.max_per_user, cfg.max_per_client, cfg.max_sessions)
        self.listener: Listener | None = None
        self.sessions: set[_Session] = set()
        #: counters for tests and operators
        self.stats = {"accepted": 0, "refused": 0, "dropped": 0, "relayed": 0}

    async def start(self) -> None:
        self.listener = Listener(self.cfg.host, self.cfg.port, self._serve)
        self.listener.start()

    @property
    def address(self) -> tuple[str, int]:
        assert self.listener is not None
        return self.listener.address

    async def close(self) -> None:
        if self.listener is not None:
            await self.listener.close()

    async def _serve(self, conn: object) -> None:
        session = _Session(self, Ctrl(FramedConn(conn, m.LIMITS)))  # type: ignore[arg-type]
        self.sessions.add(session)
        try:
            await session.run()
        except (ConnClosed, ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except TimeoutError:
            log.info("%s: a requester from %s timed out during setup", self.cfg.name,
                     session.peer_ip)
        except wire.WireError as exc:
            log.info("%s: protocol error from %s: %s", self.cfg.name, session.peer_ip, exc)
            # the refusal, then a clean close: unread input would turn the close into a
            # reset that can destroy the refusal before the peer reads it
            refuse(session.up.fc.conn, m.codec.encode(
                m.Refused(session.rid, self.cfg.name, "protocol", exc.message[:300])))
        finally:
            session.close()
            self.sessions.discard(session)


class _Session:
    def __init__(self, proxy: ChainProxy, up: Ctrl) -> None:
        self.proxy = proxy
        self.cfg = proxy.cfg
        self.up = up
        self.down: Ctrl | None = None
        peer = up.fc.conn.peer
        self.peer_ip = str(peer[0]) if isinstance(peer, tuple) else "?"
        self.rid = 0
        self.forwarder: DatagramForwarder | None = None
        self.channel: DatagramChannel | None = None
        self.slot: tuple[str, str] | None = None
        self.user = "?"

    # -- helpers ------------------------------------------------------------------------
    def refusal(self, reason: str, text: str) -> Refusal:
        return Refusal(m.Refused(self.rid, self.cfg.name, reason, text[:400]))  # type: ignore[arg-type]

    def audit(self, event: str, allow: bool, **fields: object) -> None:
        self.cfg.audit.record(event, allow, proxy=self.cfg.name, peer=self.peer_ip, **fields)

    async def expect(self, ctrl: Ctrl, kind: type, what: str, *, timeout: float | None = None,
                     refused_ok: bool = False) -> m.Message:
        msg = await ctrl.read(self.cfg.auth_timeout if timeout is None else timeout)
        if msg is None:
            raise ConnClosed(f"closed while waiting for {what}")
        if refused_ok and isinstance(msg, m.Refused):
            return msg
        if not isinstance(msg, kind):
            raise self.refusal("protocol", f"expected {what}, got {type(msg).__name__.lower()}")
        return msg

    # -- the procedure ------------------------------------------------------------------
    async def run(self) -> None:
        cfg = self.cfg
        try:
            await asyncio.wait_for(self.up.fc.read_preamble(), cfg.auth_timeout)
            await self.setup()
        except Refusal as exc:
            self.proxy.stats["refused"] += 1
            if exc.msg.hop == cfg.name:
                log.info("%s: refused %s from %s: %s: %s", cfg.name, self.user, self.peer_ip,
                         exc.msg.reason, exc.msg.text)
            refuse(self.up.fc.conn, m.codec.encode(
                m.Refused(self.rid, exc.msg.hop, exc.msg.reason, exc.msg.text)))
            return
        self.proxy.stats["accepted"] += 1
        await self.serve()

    async def setup(self) -> None:
        cfg = self.cfg
        # 602/902: mutual authentication with the requester
        auth = MutualAuth("responder", cfg.name, cfg.keys, HOP_PURPOSE)
        await self.up.send(m.Challenge(*auth.challenge()))
        answer = await self.expect(self.up, m.Answer, "an answer to the challenge")
        assert isinstance(answer, m.Answer)
        self.user = answer.id
        try:
            proof = auth.check_answer(answer.id, answer.nonce, answer.mac)
        except AuthFailed as exc:
            self.audit("authenticate", False, id=answer.id, why=str(exc))
            raise self.refusal("authentication", f"{cfg.name} could not authenticate "
                                                 f"{answer.id!r}: {exc}") from None
        self.audit("authenticate", True, id=answer.id)
        await self.up.send(m.Proof(proof))
        req = await self.expect(self.up, m.Request, "a relay request")
        assert isinstance(req, m.Request)
        self.rid = req.rid
        self.user = req.user
        peer = auth.peer_id or ""
        # claim 6: access control right after (and depending on) authentication
        origin, direct = self.requester_origin(peer, req)
        if not cfg.acl.allows(req.user, origin.host, origin.port):
            self.audit("access", False, user=req.user, origin=str(origin), by=peer)
            raise self.refusal("access", f"{cfg.name}'s access control does not admit user "
                                         f"{req.user!r} from {origin}")
        self.audit("access", True, user=req.user, origin=str(origin), by=peer)
        # the per-address bound counts the client's address, not a neighbour proxy's
        # (which carries every user behind it)
        why = self.proxy.limits.admit(req.user, origin.host)
        if why:
            self.audit("limit", False, user=req.user, why=why)
            raise self.refusal("limit", f"{cfg.name}: {why}")
        self.slot = (req.user, origin.host)
        # 604/905: is another proxy needed?
        found, hop = cfg.routes.lookup(req.server.host)
        if not found:
            raise self.refusal("route", f"{cfg.name} has no route to {req.server.host}")
        if len(req.via) >= m.MAX_HOPS - 1:
            raise self.refusal("route", f"more than {m.MAX_HOPS} hops")
        if hop is not None and (hop.name == cfg.name or hop.name in req.via):
            raise self.refusal("route", f"{cfg.name}: the route to {req.server.host} loops "
                                        f"back to {hop.name}")
        # 603/904: the two data ports
        udp_host = cfg.udp_host or cfg.host
        try:
            near_sock = bind_in_range(udp_host, cfg.udp_ports.low, cfg.udp_ports.high)
        except OSError as exc:
            raise self.refusal("ports", f"{cfg.name}: {exc.strerror or exc}") from None
        try:
            far_sock = bind_in_range(udp_host, cfg.udp_ports.low, cfg.udp_ports.high)
        except OSError as exc:
            near_sock.close()
            raise self.refusal("ports", f"{cfg.name}: {exc.strerror or exc}") from None
        # the requester's data arrives from where its control connection comes from
        # (behind NAT its port differs from what it declared: lock to the first seen)
        record = PortRecord(expect_host=self.peer_ip)
        self.forwarder = DatagramForwarder(near_sock, far_sock, record,
                                           near_to_far=_drop, far_to_near=None)
        await self.forwarder.start()
        local_ip = self.up.fc.conn.sock.getsockname()[0]
        near_ep = m.Endpoint(local_ip, near_sock.getsockname()[1])
        far_port = far_sock.getsockname()[1]
        self.far_port = far_port
        self.origin = origin
        max_payload = MAX_UDP_PAYLOAD - (DATAGRAM_OVERHEAD if req.encrypt else 0)
        if hop is None:
            await self.last_hop(req, auth, direct, record, near_ep, udp_host, max_payload)
        elif req.mode == "recursive":
            await self.recursive_hop(req, hop, record, near_ep)
        else:
            self.forwarder.near_to_far = None
            far_ep = m.Endpoint(_report_host(udp_host, local_ip), far_port)
            await self.up.send(m.Reply(req.rid, cfg.name, near_ep, far_ep, complete=False,
                                       path=[cfg.name], max_payload=max_payload))
            self.next_hop = hop

    def requester_origin(self, peer: str, req: m.Request) -> tuple[m.Endpoint, bool]:
        """Who the request is for, and whether the authenticated peer is the client.

        With no ``via``, the peer is the client itself and must be the user it names;
        its origin is the address its connection comes from. Otherwise a proxy that
        authenticated as the last ``via`` entry vouches for the user (recursive mode),
        or the client authenticated itself through relaying proxies (iterative mode);
        a peer that is itself a user of the ACL cannot speak for others.
        """
        if not req.via:
            if peer != req.user:
                raise self.refusal("access", f"authenticated as {peer!r} but asks for user "
                                             f"{req.user!r}")
            return m.Endpoint(self.peer_ip, req.requester.port), True
        if req.origin is None:
            raise self.refusal("protocol", "a forwarded request without its origin")
        if peer == req.user:
            return req.origin, True
        if peer == req.via[-1] and peer not in self.cfg.acl.users:
            return req.origin, False
        raise self.refusal("access", f"{peer!r} may not forward requests for {req.user!r}")

    async def last_hop(self, req: m.Request, auth: MutualAuth, direct: bool,
                       record: PortRecord, near_ep: m.Endpoint, udp_host: str,
                       max_payload: int) -> None:
        """612-614 / 918-920: the server's endpoint goes into 3142; reply with P4, P5."""
        cfg = self.cfg
        assert self.forwarder is not None
        record.far = req.server.addr
        far_ep = m.Endpoint(_report_host(udp_host, near_ep.host), self.far_port)
        challenge = None
        if req.encrypt:
            if direct:
                self.open_channel(auth)
            else:
                self.e2e = MutualAuth("responder", cfg.name, cfg.keys, E2E_PURPOSE)
                challenge = m.Challenge(*self.e2e.challenge())
        else:
            self.forwarder.near_to_far = None
        await self.up.send(m.Reply(req.rid, cfg.name, near_ep, far_ep, complete=True,
                                   path=[cfg.name], challenge=challenge,
                                   max_payload=max_payload))
        self.next_hop = None

    def open_channel(self, auth: MutualAuth) -> None:
        assert self.forwarder is not None
        send_key, recv_key = auth.session_keys()
        self.channel = ch = DatagramChannel(send_key, recv_key)
        # the client seals, this last hop opens towards the server and seals the answers
        self.forwarder.far_to_near = ch.seal
        self.forwarder.near_to_far = ch.open

    async def connect_next(self, hop: Hop) -> Ctrl:
        try:
            conn = await open_tcp(hop.host, hop.port, timeout=self.cfg.connect_timeout)
        except (OSError, TimeoutError) as exc:
            raise self.refusal("next-hop", f"{self.cfg.name} cannot reach the next hop "
                                           f"{hop}: {exc}") from None
        down = Ctrl(FramedConn(conn, m.LIMITS))
        self.down = down
        await down.fc.send(wire.PREAMBLE)
        return down

    async def recursive_hop(self, req: m.Request, hop: Hop, record: PortRecord,
                            near_ep: m.Endpoint) -> None:
        """605-611: authenticate with the next proxy, ask it, pass its answer up."""
        cfg = self.cfg
        down = await self.connect_next(hop)
        try:
            challenge = await self.expect(down, m.Challenge, f"a challenge from {hop.name}")
        except (ConnClosed, TimeoutError, wire.WireError) as exc:
            raise self.refusal("next-hop", f"{hop} did not challenge {cfg.name}: {exc}") \
                from None
        assert isinstance(challenge, m.Challenge)
        if challenge.hop != hop.name:
            raise self.refusal("next-hop", f"the next hop at {hop.host}:{hop.port} says it is "
                                           f"{challenge.hop!r}, the route expects {hop.name!r}")
        auth = MutualAuth("initiator", cfg.name, cfg.keys, HOP_PURPOSE)
        try:
            await down.send(m.Answer(*auth.answer(challenge.hop, challenge.nonce)))
        except AuthFailed as exc:
            raise self.refusal("authentication", f"{cfg.name}: {exc}") from None
        proof = await self.downstream(down, m.Proof, f"{hop.name}'s proof")
        try:
            auth.check_proof(proof.mac)  # type: ignore[union-attr]
        except AuthFailed as exc:
            raise self.refusal("authentication", f"{cfg.name}: {exc}") from None
        rid = secrets.randbits(63)
        far_ep = m.Endpoint(down.fc.conn.sock.getsockname()[0], self.far_port)
        await down.send(m.Request(rid=rid, server=req.server, requester=far_ep, user=req.user,
                                  mode="recursive", encrypt=req.encrypt,
                                  via=[*req.via, cfg.name], origin=self.origin))
        reply = await self.downstream(down, m.Reply, f"{hop.name}'s reply")
        assert isinstance(reply, m.Reply)
        if reply.rid != rid:  # response recognition: only the answer to our request
            raise self.refusal("protocol", f"{hop.name} answered another request")
        record.far = reply.near.addr  # 608: area 3142 = next proxy's P4
        assert self.forwarder is not None
        self.forwarder.near_to_far = None
        await self.up.send(m.Reply(req.rid, cfg.name, near_ep, reply.far, complete=True,
                                   path=[cfg.name, *reply.path][: m.MAX_HOPS],
                                   challenge=reply.challenge, max_payload=reply.max_payload))
        self.next_hop = None

    async def downstream(self, down: Ctrl, kind: type, what: str) -> m.Message:
        """A message from the next hop; its refusal is passed up as it is."""
        try:
            msg = await self.expect(down, kind, what, refused_ok=True)
        except (ConnClosed, TimeoutError, wire.WireError) as exc:
            raise self.refusal("next-hop", f"the next hop failed during setup: {exc}") from None
        except Refusal as exc:
            raise self.refusal("next-hop", exc.msg.text) from None
        if isinstance(msg, m.Refused):
            raise Refusal(msg)
        return msg

    # -- the established session ---------------------------------------------------------
    async def serve(self) -> None:
        """Relay control messages while the session lives; end it on close or idle."""
        cfg = self.cfg
        fwd = self.forwarder
        assert fwd is not None
        tasks = [asyncio.ensure_future(fwd.wait_idle(cfg.idle_timeout)),
                 asyncio.ensure_future(self.from_up())]
        if self.down is not None:
            tasks.append(asyncio.ensure_future(self.from_down()))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if tasks[0] in done:
                log.info("%s: session of %s idle for %gs, closed", cfg.name, self.user,
                         cfg.idle_timeout)
            for t in done:
                exc = t.exception()
                if isinstance(exc, Refusal):
                    with contextlib.suppress(Exception):
                        await self.up.send(exc.msg)
                elif isinstance(exc, wire.WireError):
                    log.info("%s: protocol error in the session of %s: %s", cfg.name,
                             self.user, exc)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def from_up(self) -> None:
        outstanding = self.outstanding = set()
        while True:
            msg = await self.up.read(None)
            if msg is None:
                return
            if isinstance(msg, m.Extend) and self.next_hop is not None and self.down is None:
                if msg.rid != self.rid:
                    raise self.refusal("protocol", "extend for another request")
                await self.connect_next(self.next_hop)
                self.down_task = asyncio.ensure_future(self.from_down())
                self.down_task.add_done_callback(lambda t: self.up.close())
                continue
            if self.down is not None:
                if isinstance(msg, m.Request):  # 909: relay the client's request onward
                    outstanding.add(msg.rid)
                    msg = m.Request(rid=msg.rid, server=msg.server,
                                    requester=m.Endpoint(
                                        self.down.fc.conn.sock.getsockname()[0], self.far_port),
                                    user=msg.user, mode=msg.mode, encrypt=msg.encrypt,
                                    via=[*msg.via, self.cfg.name][: m.MAX_HOPS],
                                    origin=self.origin)
                elif not isinstance(msg, m.Answer | m.Extend | m.Relay):
                    raise self.refusal("protocol", f"unexpected {type(msg).__name__.lower()}")
                await self.down.send(msg)
                continue
            if isinstance(msg, m.Relay) and isinstance(msg.body, m.Answer) and \
                    getattr(self, "e2e", None) is not None and self.channel is None:
                try:
                    proof = self.e2e.check_answer(msg.body.id, msg.body.nonce, msg.body.mac)
                    if msg.body.id != self.user:
                        raise AuthFailed(f"end-to-end answer from {msg.body.id!r}, the session "
                                         f"is {self.user!r}'s")
                except AuthFailed as exc:
                    self.audit("authenticate", False, id=msg.body.id, why=str(exc), e2e=True)
                    refused = m.Refused(self.rid, self.cfg.name, "authentication",
                                        f"{self.cfg.name}: {exc}"[:400])
                    await self.up.send(m.Relay(refused))
                    return
                self.audit("authenticate", True, id=msg.body.id, e2e=True)
                self.open_channel(self.e2e)
                await self.up.send(m.Relay(m.Proof(proof)))
                continue
            raise self.refusal("protocol", f"unexpected {type(msg).__name__.lower()} in an "
                                           "established session")

    async def from_down(self) -> None:
        down = self.down
        assert down is not None
        first = True
        while True:
            msg = await down.read(None)
            if msg is None:
                return
            if isinstance(msg, m.Reply):
                outstanding = getattr(self, "outstanding", set())
                if msg.rid not in outstanding:  # response recognition (Fig. 14(b))
                    raise self.refusal("protocol", "the next hop answered a request this "
                                                   "proxy did not relay")
                outstanding.discard(msg.rid)
                if first and self.forwarder is not None:  # 912/913: P4 of the next proxy
                    self.forwarder.record.far = msg.near.addr
                    first = False
            elif not isinstance(msg, m.Challenge | m.Proof | m.Refused | m.Relay):
                raise self.refusal("protocol", f"unexpected {type(msg).__name__.lower()} "
                                               "from the next hop")
            await self.up.send(msg)

    def close(self) -> None:
        if self.forwarder is not None:
            rec = self.forwarder.record
            self.proxy.stats["dropped"] += rec.dropped
            self.proxy.stats["relayed"] += rec.packets
            self.forwarder.close()
            self.forwarder = None
        if self.slot is not None:
            self.proxy.limits.release(*self.slot)
            self.slot = None
        if self.down is not None:
            self.down.close()
        self.up.close()
        task = getattr(self, "down_task", None)
        if task is not None:
            task.cancel()


def _drop(data: bytes) -> None:
    """Until a session's far side is known (or its key), its datagrams are dropped."""
    return None


def _report_host(udp_host: str, fallback: str) -> str:
    try:
        if ipaddress.ip_address(udp_host).is_unspecified:
            return fallback
    except ValueError:
        pass
    return udp_host

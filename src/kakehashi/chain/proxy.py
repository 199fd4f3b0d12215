"""``chain proxy``: one firewall's proxy server (spec 004, Figs. 8 and 11).

A TCP control port takes relay requests; each accepted session gets two UDP ports from
the configured range (step 603/904: the client-facing one, P2 or P4, and the
server-facing one, P3 or P5) and a :class:`~kakehashi.core.datagram.DatagramForwarder`
that rewrites addresses as the session's port record says (615/921).

Per connection: challenge-response authentication of the requester (602/902), then
access control (claim 6), then the route (604/905) and, when another proxy is needed,
either the recursive hop (605-611: this proxy authenticates with the next one and asks
it in turn) or, in iterative mode, a Reply with ``complete=False`` after which this proxy
authenticates with the next one and relays the client's end-to-end exchange with it
(906-917). Every control connection is sealed once its two ends authenticated. Every
refusal names this proxy and the reason and closes the control connection; a refusal
from further down is passed up unchanged, so the client learns which hop refused. The
session lives as long as its control connection: when either neighbour closes it, or no
datagram moves for ``idle_timeout``, the ports are closed and both control connections
with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from kakehashi.chain import messages as m
from kakehashi.chain.hop import (
    Admitted,
    EndToEnd,
    NextHop,
    Refuse,
    RelayFilter,
    RequesterSide,
    refusal,
)
from kakehashi.chain.tables import Acl, Hop, PortRange, Routes, SessionLimits
from kakehashi.core import fastpath, kernelpath, wire
from kakehashi.core.audit import AuditLog
from kakehashi.core.crypto import (
    DATAGRAM_OVERHEAD,
    ControlChannel,
    ControlError,
    DatagramChannel,
    MutualAuth,
)
from kakehashi.core.datagram import DatagramForwarder, PortAllocator, PortRecord
from kakehashi.core.kernelpath import KernelPath
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
    max_connections: int = 4096
    #: how datagrams are relayed (``--fast-path``, :data:`kakehashi.core.fastpath.MODES`):
    #: ``auto`` offloads sessions that only forward to nftables once their record
    #: locked where this process can (root or CAP_NET_ADMIN, libnftables), else relays them from
    #: readiness callbacks like ``on``; ``kernel`` insists on nftables; ``off``: asyncio
    #: datagram transports. All drive the same port records
    fast_path: str = fastpath.DEFAULT_MODE
    audit: AuditLog = field(default_factory=lambda: AuditLog(system="chain"))
    #: the IDs that may forward requests for users (the proxies before this one); empty:
    #: any key holder that is no user of an ACL without a wildcard
    forwarders: frozenset[str] = frozenset()


class Ctrl:
    """A control connection: preamble, CTRL frames of :data:`messages.codec`, timeouts.

    Once both ends authenticated each other on it, :meth:`seal` makes every later
    message go through a :class:`ControlChannel`; a message that fails its check raises
    ``WireError("integrity")`` naming ``peer``, and the caller cuts the connection.
    """

    def __init__(self, fc: FramedConn, send_timeout: float | None = None) -> None:
        self.fc = fc
        self.channel: ControlChannel | None = None
        self.peer = "?"
        #: how long one message may wait for room towards the peer (None: no limit);
        #: then the connection is cut and TimeoutError raised: a peer that stops reading
        #: (a hung next hop) must not hold whoever forwards to it
        self.send_timeout = send_timeout

    def seal(self, auth: MutualAuth, peer: str) -> None:
        self.channel = ControlChannel.after(auth)
        self.peer = peer

    async def read(self, timeout: float | None) -> m.Message | None:
        """The next message, or None when the peer closed; TimeoutError after
        ``timeout`` seconds (None: no limit).

        ``asyncio.timeout``, not ``wait_for``: on Python 3.11 ``wait_for`` swallows a
        cancellation that arrives as its read completes, and a session's relay task,
        cancelled when its requester left, then went on reading for up to its timeout
        (or for good, without one) and held the session, its ports and its slots."""
        async with asyncio.timeout(timeout):
            frame = await self.fc.read_frame()
        if frame is None:
            return None
        if frame.type != wire.FrameType.CTRL:
            raise wire.WireError("bad-frame", "only control frames belong on this connection")
        payload = frame.payload
        if self.channel is not None:
            try:
                payload = self.channel.open(bytes(payload))
            except ControlError as exc:
                raise wire.WireError("integrity", f"a control message from {self.peer} was "
                                                  f"refused: {exc}") from None
        return m.codec.decode(payload)

    def encode(self, msg: m.Message) -> bytes:
        """The frame for ``msg``, sealed once the connection is."""
        frame = m.codec.encode(msg)
        if self.channel is None:
            return frame
        return wire.encode_frame(wire.FrameType.CTRL,
                                 self.channel.seal(frame[wire.HEADER_SIZE:]))

    async def send(self, msg: m.Message, within: float | None = None) -> None:
        """Send ``msg`` (see :meth:`write`)."""
        await self.write(self.encode(msg), within)

    async def write(self, data: bytes, within: float | None = None) -> None:
        """Send ``data`` within ``within`` seconds (None: ``send_timeout``); past that,
        cut the connection and raise TimeoutError."""
        try:
            async with asyncio.timeout(self.send_timeout if within is None else within):
                await self.fc.send(data)
        except TimeoutError:
            self.close()  # a frame may be half written: the stream is unusable
            raise

    def close(self) -> None:
        self.fc.conn.close()


class ChainProxy:
    def __init__(self, cfg: ProxyConfig) -> None:
        self.cfg = cfg
        self.limits = SessionLimits(cfg.max_per_user, cfg.max_per_client, cfg.max_sessions)
        self.listener: Listener | None = None
        self.sessions: set[_Session] = set()
        #: the data ports (603/904), a port a session freed handed out again last
        self.ports = PortAllocator(cfg.udp_host or cfg.host, cfg.udp_ports.low,
                                   cfg.udp_ports.high)
        #: counters for tests and operators
        self.stats = {"accepted": 0, "refused": 0, "dropped": 0, "relayed": 0, "bytes": 0,
                      "kernel_packets": 0}
        from kakehashi.core import metrics  # servers only: clients start without it

        self.metrics = metrics.for_system("chain")
        #: the kernel fast path's table (``--fast-path kernel`` and available), else None
        self.kernel: KernelPath | None = None
        self._refused = self.metrics.counter(
            "refused", "Requests refused, by the hop that refused and its reason.",
            ["hop", "reason"])
        #: datagrams, read from the sessions' port records when scraped (no cost per
        #: datagram; a session's figures move to self.stats when it closes)
        self._datagrams = self.metrics.counter(
            "datagrams", "Datagrams relayed in user space or dropped by the sessions.",
            ["outcome"])
        #: what the kernel path relayed is counted apart: in packets (a
        #: segmentation-offloaded send of several datagrams is one) and, with user
        #: space's, in payload bytes (exact on both paths)
        self._bytes = self.metrics.counter(
            "bytes", "Payload bytes relayed by the sessions, in user space and in the kernel.")
        self._kernel_packets = self.metrics.counter(
            "kernel_packets", "Packets relayed in the kernel for offloaded sessions "
            "(an offloaded send of several datagrams is one).")

    async def start(self) -> None:
        mode = self.cfg.fast_path
        self.kernel, why = kernelpath.for_mode(mode)  # KernelPathError: kernel, unavailable
        log.info("%s", fastpath.start_line(self.cfg.name, mode,
                                           self.kernel.table if self.kernel else None, why))
        # connections still authenticating count too: a flood of silent ones waits in the
        # backlog instead of exhausting descriptors (each is cut after auth_timeout)
        self.listener = Listener(self.cfg.host, self.cfg.port, self._serve,
                                 max_connections=self.cfg.max_connections)
        self.listener.start()
        self._datagrams.labels("relayed").add_source(
            self, lambda p: p.stats["relayed"] + sum(
                s.forwarder.record.packets for s in p.sessions if s.forwarder is not None))
        self._datagrams.labels("dropped").add_source(
            self, lambda p: p.stats["dropped"] + sum(
                s.forwarder.record.dropped for s in p.sessions if s.forwarder is not None))
        self._bytes.add_source(self, lambda p: p.stats["bytes"] + sum(
            s.forwarder.relayed_bytes for s in p.sessions if s.forwarder is not None))
        self._kernel_packets.add_source(self, lambda p: p.stats["kernel_packets"] + sum(
            sum(s.forwarder.kernel_packets) for s in p.sessions if s.forwarder is not None))
        self.metrics.connections_active.add_source(self, lambda p: len(p.sessions))
        self.metrics.sessions_active.add_source(
            self, lambda p: sum(1 for s in p.sessions if s.established))

    @property
    def address(self) -> tuple[str, int]:
        assert self.listener is not None
        return self.listener.address

    async def close(self) -> None:
        if self.listener is not None:
            await self.listener.close()

    def refused(self, hop: str, reason: str) -> None:
        """Count a refusal (this proxy's or one passed back from a later hop)."""
        from kakehashi.core.audit import code_label

        self._refused.labels(code_label(hop, 64), code_label(reason)).inc()

    async def _serve(self, conn: object) -> None:
        session = _Session(self, Ctrl(FramedConn(conn, m.LIMITS),  # type: ignore[arg-type]
                                      self.cfg.auth_timeout))
        self.sessions.add(session)
        self.metrics.connections.inc()
        try:
            await session.run()
        except TimeoutError:
            # before OSError, its base class: a requester that said nothing (or read
            # nothing) for auth_timeout during setup. The timeouts of the hops after this
            # proxy are refusals naming them (next-hop) and never arrive here. The
            # requester is told (timeout, naming this proxy) if it still listens: a
            # client should learn which hop gave up on it, as from any other refusal
            log.info("%s: a requester from %s timed out during setup", self.cfg.name,
                     session.peer_ip)
            self.refused(self.cfg.name, "timeout")
            outs = session.to_client(m.Refused(
                session.rid, self.cfg.name, "timeout",
                f"{self.cfg.name}: the requester did not go on within "
                f"{self.cfg.auth_timeout:g}s during setup"))
            refuse(session.up.fc.conn, b"".join(session.up.encode(o) for o in outs))
        except (ConnClosed, ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except wire.WireError as exc:
            log.info("%s: protocol error from %s: %s", self.cfg.name, session.peer_ip, exc)
            # the refusal, then a clean close: unread input would turn the close into a
            # reset that can destroy the refusal before the peer reads it
            reason = "integrity" if exc.code == "integrity" else "protocol"
            self.refused(self.cfg.name, reason)
            outs = session.to_client(m.Refused(session.rid, self.cfg.name, reason,
                                               exc.message[:300]))
            refuse(session.up.fc.conn, b"".join(session.up.encode(o) for o in outs))
        finally:
            session.close()
            self.sessions.discard(session)


class _Session:
    """One relay request: drives the sans-IO objects of :mod:`kakehashi.chain.hop`."""

    def __init__(self, proxy: ChainProxy, up: Ctrl) -> None:
        self.proxy = proxy
        self.cfg = proxy.cfg
        self.up = up
        self.down: Ctrl | None = None
        peer = up.fc.conn.peer
        self.peer_ip = str(peer[0]) if isinstance(peer, tuple) else "?"
        self.rid = 0
        self.user = "?"
        self.forwarder: DatagramForwarder | None = None
        #: the data ports this session holds (near, far), freed when it closes
        self.ports: tuple[int, int] | None = None
        self.slot: tuple[str, str] | None = None
        self.pending_hop: Hop | None = None  # iterative: the next proxy, once asked to extend
        #: when this proxy gives up on the hops after it (loop time; None: only each
        #: read's own timeout), from how long its requester said it waits
        self.deadline: float | None = None
        self.relay: RelayFilter | None = None
        self.e2e: EndToEnd | None = None
        self.far_port = 0
        self.side: RequesterSide | None = None
        self.admitted: Admitted | None = None
        self.tasks: list[asyncio.Future[None]] = []
        self.established = False  # set up: relaying datagrams
        #: the connection address whose setup slot this session holds (None: none)
        self.setup_slot: str | None = None
        #: the requester closed its connection while this proxy asked the hops after it
        self.requester_gone = False

    def audit(self, event: str, allow: bool, **fields: object) -> None:
        self.cfg.audit.record(event, allow, proxy=self.cfg.name, peer=self.peer_ip, **fields)

    def refusal(self, reason: str, text: str) -> Refuse:
        return refusal(self.cfg.name, reason, text, self.rid)

    # -- setup ----------------------------------------------------------------------------
    async def run(self) -> None:
        cfg = self.cfg
        started = time.monotonic()
        try:
            # floods: setups in progress are bounded per address too, so connections from
            # one address that never authenticate cannot hold every slot (others would
            # wait in the backlog for their auth timeouts)
            why = self.proxy.limits.begin_setup(self.peer_ip)
            if why:
                self.audit("limit", False, why=why)
                raise self.refusal("limit", f"{cfg.name}: {why}")
            self.setup_slot = self.peer_ip
            try:
                async with asyncio.timeout(cfg.auth_timeout):
                    await self.up.fc.read_preamble()
                await self.setup()
            finally:
                self.end_setup()
        except Refuse as exc:
            self.proxy.stats["refused"] += 1
            self.proxy.refused(exc.msg.hop, exc.msg.reason)
            if exc.msg.hop == cfg.name:
                log.info("%s: refused %s from %s: %s: %s", cfg.name, self.user, self.peer_ip,
                         exc.msg.reason, exc.msg.text)
            # the refusal, then a clean close: unread input would turn the close into a
            # reset that can destroy the refusal before the peer reads it
            outs = self.to_client(m.Refused(self.rid, exc.msg.hop, exc.msg.reason,
                                            exc.msg.text))
            refuse(self.up.fc.conn, b"".join(self.up.encode(o) for o in outs))
            return
        self.proxy.stats["accepted"] += 1
        self.proxy.metrics.sessions.inc()
        self.proxy.metrics.setup_done(started)
        self.established = True
        await self.serve()

    async def setup(self) -> None:
        cfg = self.cfg
        self.side = side = RequesterSide(cfg.name, cfg.keys, cfg.acl, cfg.routes,
                                         self.peer_ip, cfg.forwarders)
        await self.up.send(side.start())  # 602/902
        try:
            while side.admitted is None:
                msg = await self.up.read(cfg.auth_timeout)
                if msg is None:
                    raise ConnClosed("the requester closed during setup")
                if isinstance(msg, m.Answer):
                    self.user = msg.id
                for out in side.receive(msg):
                    await self.up.send(out)
                if side.sealing and self.up.channel is None:  # after the Proof: sealed
                    self.up.seal(side.auth, side.auth.peer_id or "?")
        finally:
            for event, allow, fields in side.audit:
                self.audit(event, allow, **fields)
        self.admitted = adm = side.admitted
        req = adm.request
        self.rid, self.user = req.rid, req.user
        if req.via:
            # a forwarding proxy authenticated and vouches for the user and its origin:
            # its setup slot (counted on its own address, where every user behind it
            # comes from) goes, and the session slot below bounds the setup from here
            # on per user and per origin address, as for a client that came directly
            self.end_setup()
        # floods: the per-address bound counts the client's address, not a neighbour
        # proxy's (which carries every user behind it)
        why = self.proxy.limits.admit(req.user, adm.origin.host)
        if why:
            self.audit("limit", False, user=req.user, why=why)
            raise self.refusal("limit", f"{cfg.name}: {why}")
        self.slot = (req.user, adm.origin.host)
        # 603/904: the two data ports
        udp_host = cfg.udp_host or cfg.host
        ports = self.proxy.ports
        try:
            near_sock = ports.bind()
        except OSError as exc:
            raise self.refusal("ports", f"{cfg.name}: {exc.strerror or exc}") from None
        try:
            far_sock = ports.bind()
        except OSError as exc:
            ports.release(near_sock.getsockname()[1])
            near_sock.close()
            raise self.refusal("ports", f"{cfg.name}: {exc.strerror or exc}") from None
        self.ports = (near_sock.getsockname()[1], far_sock.getsockname()[1])
        # the requester's data comes from where its control connection comes from; its
        # port may differ from what it declared (NAT): the record locks to the first seen
        # When it declared an endpoint on that very address (no NAT between), answers may
        # go there before it sends anything (a server that sends first, spec 510).
        declared = req.requester
        record = PortRecord(expect_host=self.peer_ip, near=declared.addr,
                            tentative=declared.host == self.peer_ip)
        if not record.tentative:
            record.near = None
        # the hop's position (the client is 0) orders the kernel path's rewrites when
        # several hops share a host
        self.forwarder = DatagramForwarder(near_sock, far_sock, record, near_to_far=_drop,
                                           fast_path=fastpath.callbacks(cfg.fast_path),
                                           kernel=self.proxy.kernel,
                                           position=len(req.via) + 1)
        await self.forwarder.start()
        local_ip = self.up.fc.conn.sock.getsockname()[0]
        near_ep = m.Endpoint(local_ip, near_sock.getsockname()[1])
        self.far_port = far_sock.getsockname()[1]
        max_payload = MAX_UDP_PAYLOAD - (DATAGRAM_OVERHEAD if req.encrypt else 0)
        hop = adm.next_hop
        if hop is None:  # 612-614 / 918-920: the server's endpoint goes into 3142
            record.far = req.server.addr
            far_ep = m.Endpoint(_report_host(udp_host, local_ip), self.far_port)
            challenge = None
            if req.encrypt and adm.client_auth is not None:
                self.open_channel(adm.client_auth)
            elif req.encrypt:
                self.e2e = EndToEnd(cfg.name, cfg.keys, req.user)
                challenge = self.e2e.challenge()
            else:
                self.forwarder.near_to_far = None
            await self.send_up(m.Reply(req.rid, cfg.name, near_ep, far_ep, complete=True,
                                       path=[cfg.name], challenge=challenge,
                                       max_payload=max_payload))
        elif req.mode == "recursive":  # 605-611
            self.deadline = _deadline(req.wait_ms)
            with self.watching_requester():
                nh = await self.ask_next(hop, adm)
            record.far = nh.reply.near.addr  # 608: area 3142 = the next proxy's P4
            self.forwarder.near_to_far = None
            await self.send_up(nh.answer_up(near_ep))
        else:  # 904-915: iterative, the client extends the chain through this proxy
            self.forwarder.near_to_far = None
            far_ep = m.Endpoint(_report_host(udp_host, local_ip), self.far_port)
            await self.send_up(m.Reply(req.rid, cfg.name, near_ep, far_ep, complete=False,
                                       path=[cfg.name], max_payload=max_payload))
            self.pending_hop = hop

    async def ask_next(self, hop: Hop, adm: Admitted) -> NextHop:
        """605-609: authenticate with the next hop and have its Reply (recursive)."""
        cfg = self.cfg
        down = await self.connect_next(hop)
        if self.requester_gone:  # (while connecting): ends the read below at once
            down.close()
        nh = NextHop(cfg.name, cfg.keys, hop, adm,
                     m.Endpoint(down.fc.conn.sock.getsockname()[0], self.far_port))
        while nh.reply is None:
            timeout = self.left(cfg.auth_timeout)
            try:
                msg = await down.read(timeout)
            except wire.WireError as exc:
                reason = "integrity" if exc.code == "integrity" else "next-hop"
                raise self.refusal(reason, f"{cfg.name}: {hop} failed during setup: "
                                           f"{exc}") from None
            except TimeoutError:
                raise self.refusal("next-hop", f"{cfg.name}: {hop} did not answer within "
                                               f"{timeout:.3g}s during setup") from None
            except (ConnClosed, OSError) as exc:
                raise self.refusal("next-hop", f"{hop} failed during setup: "
                                               f"{exc or type(exc).__name__}") from None
            if msg is None:
                raise self.refusal("next-hop", f"{hop} closed during setup")
            nh.wait_ms = self.left_ms()  # the Request says how long this proxy waits
            outs = nh.receive(msg)
            if nh.auth.done and down.channel is None:  # the Request on is sealed
                down.seal(nh.auth, hop.name)
            for out in outs:
                with self.sending_down(hop, self.left(cfg.auth_timeout)) as within:
                    await down.send(out, within)
        return nh

    @contextlib.contextmanager
    def watching_requester(self) -> Iterator[None]:
        """While this proxy asks the hops after it (recursive mode), its requester has
        nothing to say: it waits for the Reply, and nobody reads its connection. If it
        closes (or resets) it meanwhile, the setup ends at once: the connection to the
        next hop is cut, which ends the wait for it, and ConnClosed ends the session.
        Before, the session went on for a requester that was gone until the next hop
        answered or the wait ran out (up to auth_timeout per message: the requester
        chooses wait_ms), holding its ports and slots and building the rest of the
        chain for nobody. Bytes from it instead are left for the reads after."""
        conn = self.up.fc.conn

        def readable() -> None:
            try:
                if conn.sock.recv(1, socket.MSG_PEEK):
                    conn.unwatch_readable()  # data: read (and judged) after the setup
                    return
            except (BlockingIOError, InterruptedError):
                return  # a stale readiness
            except OSError:
                pass  # a reset
            conn.unwatch_readable()
            self.requester_gone = True
            if self.down is not None:
                self.down.close()

        conn.watch_readable(readable)
        try:
            yield
        except (Refuse, ConnClosed, OSError, wire.WireError):
            if self.requester_gone:
                raise ConnClosed("the requester left during setup") from None
            raise
        finally:
            conn.unwatch_readable()

    def end_setup(self) -> None:
        """Give back the setup slot of the connection's address, if still held."""
        if self.setup_slot is not None:
            self.proxy.limits.end_setup(self.setup_slot)
            self.setup_slot = None

    def to_client(self, refused: m.Refused) -> list[m.Message]:
        """A refusal as it goes up: this proxy's own is sealed end to end when the client
        authenticated with it through the proxies before (iterative mode) and still talks
        to it (no later proxy's challenge has gone up), so they can neither forge nor
        alter it; one from further down, or after that, passes plainly (the client then
        has it on the first proxy's word)."""
        if refused.hop != self.cfg.name or self.side is None or (
                self.relay is not None and self.relay.client_moved_on):
            return [refused]
        return self.side.to_requester(refused)

    async def send_up(self, msg: m.Message) -> None:
        """To the client: directly, or through the proxies before, sealed end to end."""
        assert self.side is not None
        for out in self.side.to_requester(msg):
            await self.up.send(out)

    def open_channel(self, auth: MutualAuth) -> None:
        """Claim 7: the client seals, this last hop opens towards the server and seals
        the answers, with keys from their authentication."""
        assert self.forwarder is not None
        ch = DatagramChannel(*auth.session_keys())
        self.forwarder.far_to_near = ch.seal
        self.forwarder.near_to_far = ch.open

    def left(self, limit: float) -> float:
        """``limit`` seconds, or less when the deadline for the hops after this proxy
        comes sooner."""
        if self.deadline is None:
            return limit
        return max(min(limit, self.deadline - asyncio.get_running_loop().time()), 0.001)

    def left_ms(self) -> int:
        """How long this proxy still waits for the hops after it, in ms (0: not said)."""
        if self.deadline is None:
            return 0
        left = self.deadline - asyncio.get_running_loop().time()
        return min(max(int(left * 1000), 1), 3_600_000)

    async def connect_next(self, hop: Hop) -> Ctrl:
        try:
            conn = await open_tcp(hop.host, hop.port, timeout=self.left(self.cfg.connect_timeout))
        except (OSError, TimeoutError) as exc:
            raise self.refusal("next-hop", f"{self.cfg.name} cannot reach the next hop "
                                           f"{hop}: {exc}") from None
        self.down = down = Ctrl(FramedConn(conn, m.LIMITS), self.cfg.auth_timeout)
        with self.sending_down(hop, self.left(self.cfg.auth_timeout)) as within:
            await down.write(wire.PREAMBLE, within)
        return down

    @contextlib.contextmanager
    def sending_down(self, hop: Hop, within: float | None) -> Iterator[float | None]:
        """Around a send to the next hop ``hop`` within ``within`` seconds (yielded;
        None: the connection's own send timeout) while the setup through it is
        incomplete: a hop that does not take it in time (it stopped reading: hung, or
        overloaded with its buffers full) or whose connection fails is refused naming
        it (next-hop), as one that does not answer.
        The TimeoutError escaped as the requester's own timeout, the OSError as nothing
        at all (the requester's connection just closed). In iterative mode, once the
        setup through the next hop is complete, the error passes (the session ends)."""
        try:
            yield within
        except (ConnClosed, OSError) as exc:  # TimeoutError is an OSError
            limit = self.cfg.auth_timeout if within is None else within
            why = (f"did not read within {limit:.3g}s" if isinstance(exc, TimeoutError)
                   else f"failed: {exc or type(exc).__name__}")
            if self.relay is not None:
                lost = self.relay.lost(why)
            else:
                lost = self.refusal("next-hop", f"{self.cfg.name}: {hop.name} {why} during "
                                                "setup")
            if lost is None:
                raise
            raise lost from None

    # -- the established session ---------------------------------------------------------
    async def serve(self) -> None:
        """Relay control messages while the session lives; end it on a close or idle."""
        cfg = self.cfg
        fwd = self.forwarder
        assert fwd is not None
        idle = asyncio.ensure_future(fwd.wait_idle(cfg.idle_timeout))
        tasks = [idle, asyncio.ensure_future(self.from_up())]
        if self.down is not None:
            tasks.append(asyncio.ensure_future(self.from_down()))
        self.tasks = tasks
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if idle in done:
                log.info("%s: session of %s idle for %gs, closed", cfg.name, self.user,
                         cfg.idle_timeout)
            for t in done:
                await self.report(t.exception())
        finally:
            for t in self.tasks:
                t.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)

    async def report(self, exc: BaseException | None) -> None:
        """Tell the requester why the session ends, when a refusal or a protocol error
        ended it (a refusal from further down passes up as it is)."""
        if isinstance(exc, Refuse):
            self.proxy.refused(exc.msg.hop, exc.msg.reason)
            with contextlib.suppress(Exception):
                for out in self.to_client(exc.msg):
                    await self.up.send(out)
        elif isinstance(exc, wire.WireError):
            log.info("%s: protocol error in the session of %s: %s", self.cfg.name,
                     self.user, exc)
            reason = "integrity" if exc.code == "integrity" else "protocol"
            self.proxy.refused(self.cfg.name, reason)
            with contextlib.suppress(Exception):
                for out in self.to_client(m.Refused(self.rid, self.cfg.name, reason,
                                                    f"{self.cfg.name}: {exc}"[:400])):
                    await self.up.send(out)

    async def relay_down(self) -> None:
        """Iterative mode, once extended: the next proxy's side until it ends, which ends
        the session (after telling the requester why)."""
        try:
            await self.from_down()
        except (Refuse, wire.WireError) as exc:
            await self.report(exc)
        finally:
            self.up.close()

    async def from_up(self) -> None:
        while True:
            msg = await self.up.read(None)
            if msg is None:
                return
            if self.relay is not None:  # iterative: towards the proxies after this one
                assert self.down is not None
                out = self.relay.from_requester(msg)
                # within the wait for the next hops while the setup through them lasts
                within = self.left(self.cfg.auth_timeout) if self.relay.next.state != "done" \
                    else None
                with self.sending_down(self.relay.next.hop, within):
                    await self.down.send(out, within)
                continue
            if self.side is not None and self.side.channel is not None:
                msg = self.side.open(msg)  # the client's, through the proxies before
            if isinstance(msg, m.Extend) and self.pending_hop is not None:
                if msg.rid != self.rid:
                    raise self.refusal("protocol", "extend for another request")
                hop = self.pending_hop
                self.deadline = _deadline(msg.wait_ms)
                await self.connect_next(hop)
                assert self.down is not None and self.admitted is not None
                # this proxy's part of the request: its server-facing endpoint (its P3),
                # on the address the next proxy sees it at
                self.relay = RelayFilter(self.cfg.name, self.cfg.keys, hop, self.admitted,
                                         m.Endpoint(self.down.fc.conn.sock.getsockname()[0],
                                                    self.far_port))
                self.pending_hop = None
                self.tasks.append(asyncio.ensure_future(self.relay_down()))
            elif self.down is not None and isinstance(msg, m.Relay):
                await self.down.send(msg)  # recursive: end to end, towards the last hop
            elif self.e2e is not None:
                answer = self.e2e.receive(msg)
                ok = self.e2e.done
                self.audit("authenticate", ok, id=self.user, e2e=True)
                if ok:
                    self.open_channel(self.e2e.auth)
                await self.up.send(answer)
                if not ok:
                    return
            else:
                raise self.refusal("protocol", f"unexpected {type(msg).__name__.lower()} in "
                                               "an established session")

    async def from_down(self) -> None:
        down = self.down
        assert down is not None
        while True:
            relay = self.relay
            bound = relay is not None and relay.authenticating
            try:
                timeout = self.left(self.cfg.auth_timeout) if bound else None
                msg = await down.read(timeout)
            except TimeoutError:
                assert relay is not None  # bounded only while authenticating
                silent = relay.lost(f"did not authenticate within {timeout:.3g}s")
                assert silent is not None
                raise silent from None
            except (ConnClosed, OSError) as exc:
                lost = relay.lost("closed the connection") if relay is not None else None
                if lost is not None:
                    raise lost from exc
                raise
            if msg is None:
                lost = relay.lost("closed the connection") if relay is not None else None
                if lost is not None:
                    raise lost
                return
            if self.relay is not None:
                self.relay.next.wait_ms = self.left_ms()  # its Request says so
                step = self.relay.from_next(msg)
                if self.relay.sealing and down.channel is None:  # after the next's Proof
                    down.seal(self.relay.next.auth, self.relay.next.hop.name)
                for out in step.down:
                    with self.sending_down(self.relay.next.hop,
                                           self.left(self.cfg.auth_timeout)) as within:
                        await down.send(out, within)
                if step.p4 is not None and self.forwarder is not None:
                    self.forwarder.record.far = step.p4.addr  # 912/913: area 3142
                for out in step.up:
                    await self.up.send(out)
                continue
            if not isinstance(msg, m.Relay | m.Refused):
                raise self.refusal("protocol", f"unexpected {type(msg).__name__.lower()} "
                                               "from the next hop")
            if isinstance(msg, m.Refused):  # a later hop refused (recursive mode)
                self.proxy.refused(msg.hop, msg.reason)
            await self.up.send(msg)

    def close(self) -> None:
        if self.forwarder is not None:
            rec = self.forwarder.record
            fwd = self.forwarder
            fwd.close()  # first: the kernel path's last reading
            kernel = sum(fwd.kernel_packets)
            self.proxy.stats["dropped"] += rec.dropped
            self.proxy.stats["relayed"] += rec.packets
            self.proxy.stats["bytes"] += fwd.relayed_bytes
            self.proxy.stats["kernel_packets"] += kernel
            log.info("%s: session of %s ended: %d bytes relayed (%d datagrams in user space, "
                     "%d packets in the kernel), %d dropped (no record matched, or failed to "
                     "open)", self.cfg.name, self.user, fwd.relayed_bytes, rec.packets, kernel,
                     rec.dropped)
            self.forwarder = None
        if self.ports is not None:  # closed with the forwarder
            self.proxy.ports.release(*self.ports)
            self.ports = None
        if self.slot is not None:
            self.proxy.limits.release(*self.slot)
            self.slot = None
        if self.down is not None:
            self.down.close()
        self.up.close()
        for t in self.tasks:
            t.cancel()


def _deadline(wait_ms: int) -> float | None:
    """When a proxy whose requester waits ``wait_ms`` gives up on the hops after it
    (:func:`messages.within`), in loop time; None when the requester did not say."""
    budget = m.within(wait_ms)
    return None if budget is None else asyncio.get_running_loop().time() + budget


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

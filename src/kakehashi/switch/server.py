"""``switch server``: the socket management server and the switch server in one port.

* the JSON API under ``/v1`` (OpenAPI at ``/openapi.json``), HTTP Basic per request
  (a verified password is remembered for a minute so a script's few calls cost one
  slow hash): S1 registration, S2 presentation and selection, tunnels, gateways;
* the web catalog (:mod:`.pages`), with session login and CSRF;
* the gateway links: ``/v1/gateway/link`` (WebSocket) and ``/v1/gateway/poll``
  (HTTP/1.1 long polling, for where WebSockets are blocked): the tunnel endpoint.

The decisions are :class:`~.tunnels.Switch` (sans-IO); this module authenticates,
stores, carries messages and waits.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, Request, Response, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, Field

from kakehashi import __version__
from kakehashi.core.audit import AuditLog
from kakehashi.core.identity import LoginThrottle, PasswordChecker, UserRegistry
from kakehashi.core.store import Store
from kakehashi.core.web import ApiError, create_app
from kakehashi.switch import messages as m
from kakehashi.switch import tunnels as tn
from kakehashi.switch.mux import ACK_EVERY, LinkPacer, Outbox, link_body

log = logging.getLogger("kakehashi.switch.server")

USER, SERVICE, GATEWAY, TUNNEL = "sw-user", "sw-service", "sw-gateway", "sw-tunnel"
#: how long a verified password is remembered (per user and password digest)
AUTH_CACHE_TTL = 60.0
#: a link whose peer does not take this much is cut (flow control bounds it far lower)
MAX_OUTBOX = 64 * 1024 * 1024
#: the largest body sent to a gateway at once on a long-poll link (WebSocket: LINK_BODY)
BATCH = 1024 * 1024
#: datagrams for a gateway with this much waiting are dropped
DATAGRAM_DROP_AT = 4 * 1024 * 1024
#: refused (and audited) messages a user's gateways may draw at once, and per second
#: after that (forged tunnel IDs, unknown instructions, window overruns: a real
#: gateway draws a few, late for a tunnel that just ended); past it the link is cut
REFUSAL_BURST = 200
REFUSAL_RATE = 10.0


@dataclass
class ServerSettings:
    setup_timeout: float = tn.SETUP_TIMEOUT
    delete_timeout: float = tn.DELETE_TIMEOUT
    offline_grace: float = tn.OFFLINE_GRACE
    #: how long a long poll is held when there is nothing to send
    poll_hold: float = 20.0
    #: a poll link that makes no request for this long is gone
    poll_dead: float = 45.0
    hello_timeout: float = 10.0
    max_gateways_per_user: int = tn.MAX_GATEWAYS_PER_USER
    max_tunnels_per_user: int = tn.MAX_TUNNELS_PER_USER


class SwitchUsers(UserRegistry[dict]):
    """The switch's users: a role (asp, user, admin) beside the password hash."""

    def __init__(self, store: Store, **kw: Any) -> None:
        super().__init__(store, USER, **kw)


@dataclass(eq=False)
class Link:
    """One gateway's link (WebSocket or long poll): its outbox and liveness."""

    name: str
    user: str
    kind: str
    outbox: Outbox = field(default_factory=Outbox)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    dead: asyncio.Event = field(default_factory=asyncio.Event)
    token: str = ""
    last_seen: float = 0.0
    poll_waiter: asyncio.Future[None] | None = None
    why: str = ""
    #: link flow control, when the gateway asked for acknowledgements (WebSocket)
    pacer: LinkPacer | None = None
    received: int = 0
    ack_sent: int = 0

    def put(self, msg: Any, frame: memoryview | bytes | None = None) -> None:
        """Queue ``msg``; ``frame`` is its encoding when it came so (passed on as is)."""
        if frame is not None and isinstance(msg, m.Data):
            self.outbox.put_data((msg.tunnel, msg.stream), frame)
        else:
            self.outbox.put(msg)
        self.ready.set()
        if self.outbox.bytes > MAX_OUTBOX:
            self.kill("the gateway does not take what is sent to it")

    def take(self, limit: int = BATCH) -> bytes:
        body = self.outbox.take(limit)
        if not self.outbox:
            self.ready.clear()
        return body

    def take_link(self) -> bytes:
        """A body for a WebSocket link (:func:`~.mux.link_body`); b"" (and not ready)
        when what waits must wait for an acknowledgement."""
        body, more = link_body(self.outbox, self.pacer, time.monotonic())
        if not more:
            self.ready.clear()
        return body

    def acked(self, total: int) -> None:
        if self.pacer is None or not self.pacer.acked(total, time.monotonic()):
            raise m.ProtocolError("bad-ack", "acknowledged bytes never sent on this link")
        self.ready.set()

    def kill(self, why: str) -> None:
        self.why = self.why or why
        self.dead.set()
        self.ready.set()


class Who(BaseModel):
    user: str
    role: str


class ServiceIn(BaseModel):
    """S1: the server's socket information and its usage clients."""

    name: str = Field(max_length=64)
    gateway: str = Field(max_length=64, description="the service's (server-side) gateway")
    target: str = Field(max_length=300, description="the real server, HOST:PORT")
    proto: str = Field(default="tcp", pattern="^(tcp|udp)$")
    allow: list[str] = Field(default=[], max_length=1000,
                             description="users for whom the service is valid (* = all)")
    max_connections: int = Field(default=0, ge=0, le=1_000_000)


class TunnelIn(BaseModel):
    """S2 selection: open SERVICE through the user's GATEWAY, listening at LISTEN."""

    service: str = Field(max_length=64)
    gateway: str = Field(max_length=64)
    listen: str = Field(default="127.0.0.1:0", max_length=300)


class SwitchServer:
    def __init__(self, store: Store, *, audit: AuditLog | None = None,
                 settings: ServerSettings | None = None, kdf_n: int | None = None,
                 node: str = "", cluster_url: str = "") -> None:
        self.store = store
        self.audit = audit or AuditLog(None, system="switch")
        self.s = settings or ServerSettings()
        self.users = SwitchUsers(store, **({"kdf_n": kdf_n} if kdf_n else {}))
        self.throttle = LoginThrottle()
        self.checker = PasswordChecker()
        self.switch = tn.Switch(setup_timeout=self.s.setup_timeout,
                                delete_timeout=self.s.delete_timeout,
                                offline_grace=self.s.offline_grace,
                                max_gateways_per_user=self.s.max_gateways_per_user,
                                max_tunnels_per_user=self.s.max_tunnels_per_user)
        for name, doc in store.list(SERVICE):
            self.switch.services[name] = tn.Service(**doc)
        for name, doc in store.list(GATEWAY):
            self.switch.gateway_owner[name] = doc.get("owner", "")
        #: several nodes on one Redis store: this node's name and its cluster part
        self.node = node
        self.cluster: Any = None
        # tunnels of the previous process: audited, half-way ones removed, before any
        # gateway can say hello (restoring sends nothing, so nobody waits on it yet);
        # a node takes back only the tunnels it is the home of
        self.carry(self.switch.restore(
            [(k, d) for k, d in store.list(TUNNEL) if not node or d.get("home") == node],
            time.time()))
        if node:
            from kakehashi.switch.cluster import SwitchCluster

            self.cluster = SwitchCluster(self, cluster_url, node)
        self.links: dict[str, Link] = {}
        self.poll_links: dict[str, Link] = {}
        self.changed = asyncio.Condition()
        self.version = 0
        #: datagrams dropped because their gateway was behind
        self.dropped = 0
        self._auth_cache: dict[str, tuple[str, str, float]] = {}
        #: per user: refusals left and when it was counted (see REFUSAL_BURST)
        self._refusals: dict[str, tuple[float, float]] = {}
        self._ticker: asyncio.Task[None] | None = None
        self.sessions: dict[str, dict[str, Any]] = {}
        self._metrics()

    def _metrics(self) -> None:
        """Gauges read from the switch table when scraped (nothing on the data path)."""
        from kakehashi.core import metrics

        m = self.metrics = metrics.for_system("switch")
        by_state = m.gauge("tunnels", "Tunnels by state.", ["state"])
        for state in tn.State:
            by_state.labels(state.value).add_source(
                self, lambda s, state=state: sum(1 for t in s.switch.tunnels.values()
                                                 if t.state is state))
        # a stream between two gateways is the switch's session
        m.sessions_active.add_source(
            self, lambda s: sum(len(t.streams) for t in s.switch.tunnels.values()))
        m.gauge("gateways", "Gateways with a live link.").add_source(
            self, lambda s: len(s.links) + len(s.poll_links))
        m.counter("datagrams_dropped", "Datagrams dropped because their gateway was "
                  "behind.").add_source(self, lambda s: s.dropped)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    def stop_links(self) -> None:
        """End every gateway link (the server is stopping)."""
        for link in list(self.links.values()):
            link.kill("the server is stopping")

    async def close(self) -> None:
        if self._ticker:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for link in list(self.links.values()):
            link.kill("the server is stopping")
        self.checker.close()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.time()
            for link in list(self.poll_links.values()):
                if link.poll_waiter is None and now - link.last_seen > self.s.poll_dead:
                    self.detach(link, "no poll for too long")
            await self.apply(self.switch.tick(now))
            self.switch.forget(now - 3600)

    # -- carrying out decisions ------------------------------------------------------------
    def persist(self, tids: set[str]) -> None:
        """Write the tunnels' records in one batch (removed once deleted or gone)."""
        ops: list[tuple[str, str, dict[str, Any] | None]] = []
        for tid in sorted(tids):
            t = self.switch.tunnels.get(tid)
            gone = t is None or t.state is tn.State.DELETED
            ops.append((TUNNEL, tid, None if gone else t.doc()))  # type: ignore[union-attr]
        self.store.write_many(ops)

    async def apply(self, actions: list[tn.Action],
                    frames: dict[int, memoryview | bytes] | None = None) -> None:
        if self.carry(actions, frames):
            self.version += 1
            async with self.changed:
                self.changed.notify_all()

    def carry(self, actions: list[tn.Action],
              frames: dict[int, memoryview | bytes] | None = None) -> bool:
        """Send, audit and store what the decisions say; True if a tunnel changed
        (the caller wakes whoever waits on one). ``frames``: the encoding a message
        came in, by ``id`` of the message (alive meanwhile), to pass it on unchanged."""
        changed = False
        persist: set[str] = set()
        remote: dict[str, list[bytes]] = {}
        for act in actions:
            if isinstance(act, tn.Send):
                link = self.links.get(act.gateway)
                if link is None:
                    if self.cluster is not None and act.gateway in self.cluster.remote:
                        remote.setdefault(act.gateway, []).append(m.encode(act.msg))
                    continue
                if act.droppable and link.outbox.bytes > DATAGRAM_DROP_AT:
                    self.dropped += 1
                    continue
                link.put(act.msg, frames.get(id(act.msg)) if frames else None)
            elif isinstance(act, tn.Audit):
                self.audit.record(act.event, act.allow, **act.fields)
            elif isinstance(act, tn.Persist):
                persist.add(act.tunnel)
            else:
                changed = True
        if persist:  # stored before anything is forwarded: another node may look it up
            self.persist(persist)
        for gateway, frames in remote.items():
            self.cluster.to_gateway(gateway, b"".join(frames))
        if self.cluster is not None:  # connections that ended leave the cluster's count
            self.cluster.sync_counts(self.switch.live)
        return changed

    def refresh(self) -> None:
        """Take in what other nodes stored: services and gateway owners."""
        if self.cluster is None:
            return
        self.switch.services = {name: tn.Service(**doc)
                                for name, doc in self.store.list(SERVICE)}
        stored = {name: str(doc.get("owner", "")) for name, doc in self.store.list(GATEWAY)}
        for name in [n for n in self.switch.gateway_owner if n not in stored]:
            if name not in self.links:  # removed on another node
                del self.switch.gateway_owner[name]
        for name, owner in stored.items():
            self.switch.gateway_owner.setdefault(name, owner)

    async def wait_state(self, t: tn.Tunnel, states: tuple[tn.State, ...],
                         timeout: float) -> bool:
        async def until() -> None:
            async with self.changed:
                await self.changed.wait_for(lambda: t.state in states)

        try:
            await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            return False
        return True

    async def wait_change(self, version: int, timeout: float) -> int:
        async def until() -> None:
            async with self.changed:
                await self.changed.wait_for(lambda: self.version != version)

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(until(), timeout)
        return self.version

    # -- who is calling --------------------------------------------------------------------
    def add_user(self, name: str, role: str, password: str) -> bool:
        return self.users.add({"name": name, "role": role}, password)

    async def login(self, user: str, password: str, addr: str) -> Who:
        """Check a password (throttled, off the loop, remembered briefly)."""
        key = hashlib.sha256(f"{user}\0{password}".encode()).hexdigest()
        now = time.monotonic()
        hit = self._auth_cache.get(key)
        if hit is not None and hit[2] > now:
            return Who(user=hit[0], role=hit[1])
        attempt = self.throttle.begin(addr, user, time.time())
        if isinstance(attempt, str):
            self.audit.record("login", False, user=user, address=addr, reason=attempt)
            if attempt == "busy":
                raise ApiError(503, "busy", "too many logins being checked; try again")
            raise ApiError(429, "locked-out", "too many logins failed or in progress for "
                                              "this user from here; try again later")
        rec = await self.checker.run(addr, self.users.verify, user, password)
        if rec is None:
            delay = self.throttle.failed(attempt, time.time())
            self.audit.record("login", False, user=user, address=addr,
                              reason="wrong user or password")
            await asyncio.sleep(delay)
            raise ApiError(401, "unauthenticated", "wrong user or password")
        self.throttle.succeeded(attempt)
        role = str(rec.get("role", "user"))
        if len(self._auth_cache) > 10_000:
            self._auth_cache.clear()
        self._auth_cache[key] = (user, role, now + AUTH_CACHE_TTL)
        return Who(user=user, role=role)

    async def basic(self, header: str | None, addr: str) -> Who:
        scheme, _, value = (header or "").partition(" ")
        if scheme.lower() != "basic" or not value:
            raise ApiError(401, "unauthenticated", "send Authorization: Basic (user, password)")
        try:
            user, sep, pw = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user, sep, pw = "", "", ""
        if not sep or not user or len(user) > 64 or len(pw) > 1024:
            raise ApiError(401, "unauthenticated", "malformed Basic credentials")
        return await self.login(user, pw, addr)

    # -- gateway links ---------------------------------------------------------------------
    async def attach(self, hello: m.Hello, who: Who, kind: str) -> tuple[Link, m.Welcome]:
        old = self.links.get(hello.name)
        if old is not None and self.switch.gateway_owner.get(hello.name) == who.user:
            # a new link of a gateway whose old one is not gone yet: the streams of the
            # old link died with it (the gateway reset them), so the other sides hear so
            old.kill("replaced by a new link of the same gateway")
            self.poll_links.pop(old.token, None)
            del self.links[hello.name]
            await self.apply(self.switch.gateway_lost(hello.name, time.time()))
        try:
            if self.cluster is not None:  # the store says whose a name is now
                self._claim_gateway(hello.name, who)
            welcome, actions = self.switch.gateway_hello(hello.name, who.user,
                                                         list(hello.tunnels), time.time(),
                                                         who.role)
        except tn.Refusal as exc:
            self.audit.record("gateway-online", False, gateway=hello.name, user=who.user,
                              reason=exc.message)
            raise
        link = Link(name=hello.name, user=who.user, kind=kind, last_seen=time.time(),
                    pacer=LinkPacer() if hello.acks and kind == "websocket" else None)
        self.links[hello.name] = link
        if self.store.get(GATEWAY, hello.name) is None:
            self.store.put(GATEWAY, hello.name, {"owner": who.user})
        if self.cluster is not None:
            await self._cluster_hello(hello, who, welcome)
        log.info("gateway %s of %s connected (%s)", hello.name, who.user, kind)
        await self.apply(actions)
        return link, welcome

    def _claim_gateway(self, name: str, who: Who) -> None:
        """On a cluster, claim a new gateway name in the shared store within the user's
        cap (the other nodes' names count too): insert it (atomic, one claim of a
        name wins), then count the user's names there and take the claim back if
        that is over the cap. Of claims racing for the last place none is kept over
        the cap (each counted every claim inserted before it); at worst all of them
        are taken back. The name already someone's: the hello's check says whose
        (as the store has it: another node may have removed the name meanwhile)."""
        doc = self.store.get(GATEWAY, name)
        if doc is not None or not self.store.insert(GATEWAY, name, {"owner": who.user}):
            doc = doc or self.store.get(GATEWAY, name) or {}
            self.switch.gateway_owner[name] = str(doc.get("owner", ""))
            return
        owned = sum(1 for _, doc in self.store.list(GATEWAY) if doc.get("owner") == who.user)
        try:
            self.switch.check_gateway_cap(who.user, who.role, owned - 1)
        except tn.Refusal:
            self.store.delete(GATEWAY, name)
            raise
        self.switch.gateway_owner[name] = who.user

    async def remove_gateway(self, who: Who, name: str) -> dict[str, Any]:
        """Give a gateway name up (see :meth:`~.tunnels.Switch.remove_gateway`); on a
        cluster, not while any node holds its link."""
        self.refresh()
        try:
            if self.cluster is not None and name not in self.links \
                    and await self.cluster.where(name):
                raise tn.Refusal(409, "gateway-online",
                                 f"gateway {name} is connected; stop it first")
            if self.cluster is not None and any(  # tunnels homed on other nodes too
                    name in (doc.get("client_gw"), doc.get("server_gw"))
                    for _, doc in self.store.list(TUNNEL)):
                raise tn.Refusal(409, "gateway-in-use",
                                 f"gateway {name} has tunnels; close them first")
            actions = self.switch.remove_gateway(name, who.user, who.role)
        except tn.Refusal as exc:
            self.audit.record("gateway-removed", False, user=who.user, gateway=name[:64],
                              reason=exc.message)
            raise ApiError(exc.status, exc.code, exc.message) from None
        self.store.delete(GATEWAY, name)
        await self.apply(actions)
        return {"name": name, "removed": True}

    async def _cluster_hello(self, hello: m.Hello, who: Who, welcome: m.Welcome) -> None:
        """The gateway is here now; the homes of its tunnels on other nodes hear its
        re-report, and it keeps the halves they still have."""
        from kakehashi.switch.cluster import Envelope

        c = self.cluster
        c.remote.pop(hello.name, None)
        await c.gateway_here(hello.name)
        held = set(hello.tunnels)
        for home, tids in c.remote_tunnels_of(hello.name).items():
            welcome.tunnels += [tid for tid in tids if tid in held]
            c.send(home, Envelope(kind="gw-hello", gw=hello.name, sender=self.node,
                                  user=who.user, held=sorted(held)))

    def detach(self, link: Link, why: str) -> None:
        """The link is gone: the gateway is offline until a new link says hello."""
        link.kill(why)
        self.poll_links.pop(link.token, None)
        if self.links.get(link.name) is link:
            del self.links[link.name]
            log.info("gateway %s disconnected: %s", link.name, why)
            actions = self.switch.gateway_lost(link.name, time.time())
            task = asyncio.get_running_loop().create_task(self.apply(actions))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            if self.cluster is not None:
                self._cluster_lost(link.name)

    def _cluster_lost(self, name: str) -> None:
        from kakehashi.switch.cluster import Envelope

        c = self.cluster
        for home in c.remote_tunnels_of(name):
            c.send(home, Envelope(kind="gw-lost", gw=name, sender=self.node))
        task = asyncio.get_running_loop().create_task(c._drop_presence(name))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def receive(self, link: Link, body: bytes) -> None:
        """A body from a gateway: reports and stream messages (ProtocolError: cut)."""
        link.last_seen = time.time()
        actions: list[tn.Action] = []
        now = time.time()
        elsewhere: dict[str, list[bytes]] = {}
        decoded = m.decode_frames_to_server(body)
        passed = _data_frames(decoded, len(body))
        for msg, _ in decoded:
            if self.cluster is not None and isinstance(msg, (m.Done, *m.STREAM_TYPES)) \
                    and msg.tunnel not in self.switch.tunnels:
                home = self.cluster.home_of(msg.tunnel)
                if home is not None:  # another node decides about it
                    elsewhere.setdefault(home, []).append(m.encode(msg))
                    continue
            if isinstance(msg, m.Done):
                got = self.switch.on_done(link.name, msg, now)
            elif isinstance(msg, m.Hello):
                raise m.ProtocolError("hello-again", "hello is said once per link")
            elif isinstance(msg, m.Ack):
                link.acked(msg.n)
                continue
            else:
                got = await self.on_stream(link.name, msg)
            actions += got
            if len(got) > 1 and not self._may_refuse(link.user, got, now):
                await self.apply(actions, passed)
                raise m.ProtocolError("too-many-refusals",
                                      f"more than {REFUSAL_BURST} messages refused; "
                                      "this link is cut")
        await self.apply(actions, passed)
        if elsewhere:
            from kakehashi.switch.cluster import Envelope

            for home, frames in elsewhere.items():
                self.cluster.send(home, Envelope(kind="from-gw", gw=link.name,
                                                 sender=self.node, body=b"".join(frames)))
        if link.pacer is not None:  # taken off the link: the gateway may send more
            link.received += len(body)
            if link.outbox or link.received - link.ack_sent >= ACK_EVERY:
                link.ack_sent = link.received
                link.put(m.Ack(n=link.received))

    def _may_refuse(self, user: str, actions: list[tn.Action], now: float) -> bool:
        """Count the refusals among ``actions`` against the user's budget (a token
        bucket over all of the user's links, so reconnecting does not refill it);
        False once it is spent. Each refusal writes an audit line and an answer: a
        link of forged messages must not turn a megabyte in into tens of megabytes of
        audit log."""
        n = sum(1 for a in actions if isinstance(a, tn.Audit) and a.event == "refused")
        if not n:
            return True
        left, at = self._refusals.get(user, (float(REFUSAL_BURST), now))
        left = min(float(REFUSAL_BURST), left + max(0.0, now - at) * REFUSAL_RATE) - n
        self._refusals[user] = (max(left, 0.0), now)
        return left >= 0

    async def on_stream(self, gateway: str, msg: m.StreamMsg) -> list[tn.Action]:
        """A stream message for a tunnel of this node. On a cluster, a new stream of a
        service with a connection limit is first counted in over the cluster (see
        :mod:`.cluster`), so the limit holds over every node together."""
        c = self.cluster
        if c is None or not isinstance(msg, m.Open):
            return self.switch.on_stream(gateway, msg)
        t = self.switch.tunnels.get(msg.tunnel)
        svc = self.switch.services.get(t.service) if t is not None else None
        if t is None or svc is None or not svc.max_connections or gateway != t.client_gw \
                or t.state is not tn.State.ESTABLISHED or t.offline or msg.stream in t.streams:
            return self.switch.on_stream(gateway, msg)  # no limit, or refused anyway
        admitted = await c.admit(svc.name, svc.max_connections)
        before = self.switch.live.get(svc.name, 0)
        actions = self.switch.on_stream(gateway, msg, admitted=admitted)
        if admitted and self.switch.live.get(svc.name, 0) == before:
            c.uncount(svc.name)  # refused for another reason while it was counted in
        return actions

    # -- tunnels ---------------------------------------------------------------------------
    async def open_tunnel(self, who: Who, service: str, gateway: str, listen: str
                          ) -> tn.Tunnel:
        """S2 selection -> S3; returns once the tunnel is established or deleted."""
        t = await self.begin_tunnel(who, service, gateway, listen)
        await self.wait_state(t, (tn.State.ESTABLISHED, tn.State.DELETED),
                              self.s.setup_timeout + self.s.delete_timeout + 5)
        return t

    async def begin_tunnel(self, who: Who, service: str, gateway: str, listen: str
                           ) -> tn.Tunnel:
        """S2 selection -> S3 without waiting (the catalog page watches it live)."""
        if self.cluster is not None:  # the service and a gateway may be another node's
            self.refresh()
            svc = self.switch.services.get(service)
            for name in {gateway, svc.gateway if svc else gateway}:
                if name not in self.links:
                    node = await self.cluster.where(name)
                    if node and node != self.node:
                        self.cluster.remote[name] = node
                        self.switch.online.add(name)
        # the user's tunnels on every node count against the cap: counted in over the
        # cluster first (atomic), as a connection of a service with a limit is
        admitted, key = None, tn.tunnels_key(who.user)
        if self.cluster is not None and self.switch.max_tunnels_per_user \
                and who.role != "admin":
            admitted = await self.cluster.admit(key, self.switch.max_tunnels_per_user)
        try:
            t, actions = self.switch.open_tunnel(who.user, who.role, service, gateway,
                                                 listen, time.time(), admitted=admitted)
            t.home = self.node
        except tn.Refusal as exc:
            if admitted:  # counted in, then refused for another reason
                self.cluster.uncount(key)
            self.audit.record("tunnel-open", False, user=who.user, service=service,
                              gateway=gateway, reason=exc.message)
            raise ApiError(exc.status, exc.code, exc.message) from None
        await self.apply(actions)
        return t

    async def close_anywhere(self, who: Who, tid: str, wait: bool = True) -> dict[str, Any]:
        """S6 -> S7 from any node: a tunnel homed on another node is closed by its home
        (a call through Redis); returns the tunnel's view."""
        c = self.cluster
        if c is not None and tid not in self.switch.tunnels:
            home = c.home_of(tid)
            if home is not None:
                from kakehashi.switch.cluster import ClusterError, Envelope

                try:
                    reply = await c.call(home, Envelope(kind="close", gw="", sender=self.node,
                                                        user=who.user, role=who.role,
                                                        tunnel=tid),
                                         self.s.delete_timeout + 10)
                except ClusterError as exc:
                    raise ApiError(503, "home-unreachable",
                                   f"tunnel {tid[:64]}: its home {exc}") from None
                if not reply.get("ok"):
                    raise ApiError(int(reply.get("status", 502)), str(reply.get("code", "")),
                                   str(reply.get("message", "")))
                return dict(reply["tunnel"])
        return (await self.close_tunnel(who, tid, wait)).view()

    async def close_tunnel(self, who: Who, tid: str, wait: bool = True) -> tn.Tunnel:
        """S6 -> S7 for a tunnel of this node; returns once deleted (or at once without
        ``wait``)."""
        try:
            actions = self.switch.close_tunnel(who.user, who.role, tid, time.time())
        except tn.Refusal as exc:
            self.audit.record("tunnel-close", False, user=who.user, tunnel=tid[:64],
                              reason=exc.message)
            raise ApiError(exc.status, exc.code, exc.message) from None
        await self.apply(actions)
        t = self.switch.tunnels[tid]
        if wait:
            await self.wait_state(t, (tn.State.DELETED,), self.s.delete_timeout + 5)
        return t

    def tunnels_of(self, who: Who, everything: bool = False) -> list[dict[str, Any]]:
        """The caller's tunnels; on a cluster those of every node (a tunnel homed on
        another node as its home last stored it: deleted ones are not stored)."""
        tunnels = list(self.switch.tunnels.values())
        if self.cluster is not None:
            for tid, doc in self.store.list(TUNNEL):
                if tid in self.switch.tunnels:
                    continue
                with contextlib.suppress(AttributeError, KeyError, TypeError, ValueError):
                    if doc.get("home") != self.node:  # (a bad record is not listed)
                        tunnels.append(tn.Tunnel.from_doc(doc))
        return [{**t.view(), "home": t.home or self.node}
                for t in sorted(tunnels, key=lambda t: t.created)
                if (who.role == "admin" or t.user == who.user)
                and (everything or t.state is not tn.State.DELETED)]

    def tunnel_of(self, who: Who, tid: str) -> dict[str, Any]:
        """One tunnel of the caller, wherever its home is."""
        t = self.switch.tunnels.get(tid)
        if t is None and self.cluster is not None:
            doc = self.store.get(TUNNEL, tid)
            with contextlib.suppress(AttributeError, KeyError, TypeError, ValueError):
                t = tn.Tunnel.from_doc(doc) if doc else None
        if t is None or (who.role != "admin" and t.user != who.user):
            raise ApiError(404, "unknown-tunnel", f"no tunnel {tid[:64]!r} of yours")
        return {**t.view(), "home": t.home or self.node}

    async def catalog(self, who: Who) -> list[dict[str, Any]]:
        """S2: the services for the caller, with live connections over the cluster."""
        if self.cluster is None:
            return self.switch.catalog(who.user, who.role)
        self.refresh()
        c = self.cluster
        with contextlib.suppress(Exception):  # Redis away: the last sums read
            c.totals = await c.live_totals(self.switch.services)
        gateways = sorted({svc.gateway for svc in self.switch.services.values()})
        online = set(self.links)
        with contextlib.suppress(Exception):  # Redis away: this node's links only
            online |= await c.present(gateways)
        return self.switch.catalog(who.user, who.role, c.totals, online)

    def register(self, who: Who, body: ServiceIn) -> dict[str, Any]:
        svc = tn.Service(name=body.name, owner=who.user, gateway=body.gateway,
                         target=body.target, proto=body.proto, allow=list(body.allow),
                         max_connections=body.max_connections)
        try:
            actions = self.switch.register(svc, who.role)
        except tn.Refusal as exc:
            self.audit.record("register", False, user=who.user, service=body.name[:64],
                              reason=exc.message)
            raise ApiError(exc.status, exc.code, exc.message) from None
        self.store.put(SERVICE, svc.name, svc.doc())
        for act in actions:
            if isinstance(act, tn.Audit):
                self.audit.record(act.event, act.allow, **act.fields)
        return svc.doc()


def _data_frames(decoded: list[tuple[Any, memoryview]], size: int
                 ) -> dict[int, memoryview | bytes]:
    """The Data messages' frames of a body, to be passed on as they came: a Data message
    goes to the other gateway exactly as it was encoded, so decoding checked it and
    the server need not encode it again (one copy of each chunk and msgspec's work
    less on the busiest process of the path). The frames are views of the body, which
    they keep alive, so when they are less than half of it they are copied instead:
    what a link's outbox counts stays within twice what it holds."""
    data = [(msg, frame) for msg, frame in decoded if isinstance(msg, m.Data)]
    keep = 2 * sum(len(frame) for _, frame in data) >= size
    return {id(msg): frame if keep else bytes(frame) for msg, frame in data}


def _addr(conn: Request | WebSocket) -> str:
    return conn.client.host if conn.client else ""


def build_app(srv: SwitchServer) -> Any:
    app = create_app("kakehashi socket switch", __version__,
                     description="The socket management server and switch server of "
                                 "spec 003: services, gateways and tunnels.",
                     on_start=srv.start, on_stop=srv.close, max_body=m.MAX_BODY + 1024)
    app.state.switch = srv

    async def who(request: Request) -> Who:
        return await srv.basic(request.headers.get("authorization"), _addr(request))

    caller = Depends(who)

    @app.exception_handler(tn.Refusal)
    async def _refusal(_: Request, exc: tn.Refusal) -> Any:
        from fastapi.responses import JSONResponse

        srv.metrics.refused(f"api:{exc.code}")  # the codes are the switch's own, fixed
        return JSONResponse({"error": {"code": exc.code, "message": exc.message}},
                            status_code=exc.status)

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "gateways": len(srv.links)}

    @app.get("/v1/whoami")
    async def whoami(w: Who = caller) -> dict[str, Any]:
        return {"user": w.user, "role": w.role}

    # -- S1 and S2
    @app.post("/v1/services", status_code=201)
    async def register(body: ServiceIn, w: Who = caller) -> dict[str, Any]:
        return srv.register(w, body)

    @app.get("/v1/services")
    async def services(w: Who = caller) -> list[dict[str, Any]]:
        srv.refresh()
        return await srv.catalog(w)

    @app.delete("/v1/services/{name}")
    async def unregister(name: str, w: Who = caller) -> dict[str, Any]:
        try:
            actions = srv.switch.unregister(name, w.user, w.role)
        except tn.Refusal as exc:
            raise ApiError(exc.status, exc.code, exc.message) from None
        srv.store.delete(SERVICE, name)
        await srv.apply(actions)
        return {"name": name, "removed": True}

    @app.get("/v1/gateways")
    async def gateways(w: Who = caller) -> list[dict[str, Any]]:
        return [{"name": name, "user": owner, "online": name in srv.links,
                 "transport": srv.links[name].kind if name in srv.links else None}
                for name, owner in sorted(srv.switch.gateway_owner.items())
                if w.role == "admin" or owner == w.user]

    @app.delete("/v1/gateways/{name}")
    async def remove_gateway(name: str, w: Who = caller) -> dict[str, Any]:
        return await srv.remove_gateway(w, name)

    # -- tunnels (S2 selection -> S3 -> S4 -> S5; S6 -> S7)
    @app.post("/v1/tunnels", status_code=201)
    async def open_tunnel(body: TunnelIn, response: Response, w: Who = caller
                          ) -> dict[str, Any]:
        t = await srv.open_tunnel(w, body.service, body.gateway, body.listen)
        if t.state is not tn.State.ESTABLISHED:
            raise ApiError(502, "setup-failed", t.reason or f"tunnel is {t.state.value}")
        return t.view()

    @app.get("/v1/tunnels")
    async def tunnels(w: Who = caller, all: bool = False) -> list[dict[str, Any]]:
        return srv.tunnels_of(w, all)

    @app.get("/v1/tunnels/{tid}")
    async def tunnel(tid: str, w: Who = caller) -> dict[str, Any]:
        return srv.tunnel_of(w, tid)

    @app.delete("/v1/tunnels/{tid}")
    async def close(tid: str, w: Who = caller) -> dict[str, Any]:
        return await srv.close_anywhere(w, tid)

    # -- the gateway links
    @app.websocket("/v1/gateway/link")
    async def ws_link(ws: WebSocket) -> None:
        # accepted before the login check, so a refusal reaches the gateway as words
        await ws.accept()
        try:
            w = await srv.basic(ws.headers.get("authorization"), _addr(ws))
        except ApiError as exc:
            with contextlib.suppress(Exception):
                await ws.send_bytes(m.encode(m.Refused(code=exc.code, error=exc.message)))
                await ws.close(code=4401 if exc.status == 401 else 4429)
            return
        try:
            # (asyncio.timeout, not wait_for: a disconnect raised through wait_for's
            # future holds that frame, so the whole connection becomes a cycle that
            # waits for the collector; early leavers would pile up in memory)
            async with asyncio.timeout(srv.s.hello_timeout):
                first = await ws.receive_bytes()
            msgs = m.decode_to_server(first)
            if len(msgs) != 1 or not isinstance(msgs[0], m.Hello):
                raise m.ProtocolError("bad-hello", "the first message must be a hello")
            link, welcome = await srv.attach(msgs[0], w, "websocket")
        except (m.ProtocolError, tn.Refusal) as exc:
            with contextlib.suppress(Exception):
                await ws.send_bytes(m.encode(m.Refused(code=exc.code, error=exc.message)))
                await ws.close(code=4400)
            return
        except (TimeoutError, WebSocketDisconnect, KeyError, RuntimeError):
            with contextlib.suppress(Exception):
                await ws.close(code=4408)
            return
        link.put(welcome)

        async def writer() -> None:
            while not link.dead.is_set():
                await link.ready.wait()
                if link.dead.is_set():
                    break
                body = link.take_link()
                if body:
                    await ws.send_bytes(body)

        async def reader() -> None:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    link.kill("the gateway closed the link")
                    return
                body = msg.get("bytes")
                if body is None:
                    raise m.ProtocolError("text", "gateway links carry binary messages")
                await srv.receive(link, body)

        tasks = [asyncio.ensure_future(writer()), asyncio.ensure_future(reader()),
                 asyncio.ensure_future(link.dead.wait())]
        why = "link closed"
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if isinstance(exc, m.ProtocolError):
                    why = exc.message
                    log.warning("gateway %s: %s", link.name, exc.message)
                    with contextlib.suppress(Exception):
                        await ws.send_bytes(m.encode(m.Refused(code=exc.code,
                                                               error=exc.message)))
                        await ws.close(code=4400, reason=exc.message[:100])
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            srv.detach(link, link.why or why)
            with contextlib.suppress(Exception):
                await ws.close()

    @app.post("/v1/gateway/poll")
    async def poll_open(request: Request) -> Response:
        w = await srv.basic(request.headers.get("authorization"), _addr(request))
        try:
            msgs = m.decode_to_server(await request.body())
            if len(msgs) != 1 or not isinstance(msgs[0], m.Hello):
                raise m.ProtocolError("bad-hello", "the first message must be a hello")
            link, welcome = await srv.attach(msgs[0], w, "poll")
        except (m.ProtocolError, tn.Refusal) as exc:
            status = getattr(exc, "status", 400)
            return Response(m.encode(m.Refused(code=exc.code, error=exc.message)),
                            status_code=status, media_type="application/octet-stream")
        link.token = secrets.token_urlsafe(24)
        srv.poll_links[link.token] = link
        link.put(welcome)
        return Response(link.take(), media_type="application/octet-stream",
                        headers={"X-Kakehashi-Link": link.token})

    @app.post("/v1/gateway/poll/link")
    async def poll(request: Request, down: int = 1) -> Response:
        """The periodic connection notification: carries the gateway's data up and,
        held until there is something or ``poll_hold`` passes, the server's down."""
        scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
        link = srv.poll_links.get(token.strip()) if scheme.lower() == "bearer" else None
        if link is None or link.dead.is_set():
            raise ApiError(410, "link-gone", "no such link (open a new one)")
        body = await request.body()
        try:
            await srv.receive(link, body)
        except m.ProtocolError as exc:
            srv.detach(link, exc.message)
            return Response(m.encode(m.Refused(code=exc.code, error=exc.message)),
                            status_code=400, media_type="application/octet-stream")
        if not down:
            return Response(b"", media_type="application/octet-stream")
        if link.poll_waiter is not None and not link.poll_waiter.done():
            link.poll_waiter.set_result(None)  # the newer poll takes over
        if not body and not link.outbox:
            fut = link.poll_waiter = asyncio.get_running_loop().create_future()
            ready = asyncio.ensure_future(link.ready.wait())
            try:
                await asyncio.wait([fut, ready], timeout=srv.s.poll_hold,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                ready.cancel()
                if link.poll_waiter is fut:
                    link.poll_waiter = None
                link.last_seen = time.time()
            if fut.done():  # superseded: the gateway gave up on this one; send nothing
                return Response(b"", media_type="application/octet-stream")
        if link.dead.is_set():
            raise ApiError(410, "link-gone", link.why or "link closed")
        return Response(link.take(), media_type="application/octet-stream")

    from kakehashi.switch import pages

    pages.add_pages(app, srv)
    return app

"""A relay node in a cluster: the thin asyncio layer between the control unit and Redis.

The decisions are the control unit's (:mod:`kakehashi.relay.control`, with the pure
pieces in :mod:`kakehashi.relay.federation`); this module only carries them:

* **membership and presence** - ``node:<name>`` (the advertised address) and
  ``presence:<name>`` (a hash, user -> :class:`~federation.PresenceInfo`) expire
  ``ttl`` seconds after the node last renewed them, so a node that dies or loses
  Redis drops out by itself; a change is written at once and published on
  ``events``, and every node re-reads everything every few renewals (missed events,
  a Redis restart);
* **notifications** - presence on ``events`` (``watch`` cluster-wide), broadcast
  messages on ``inbox:<node>`` (addressed to the target's node);
* **inter-node links** - dialed to the advertised address, authenticated both ways
  with the cluster secret (:func:`federation.node_proof`), then handed to the relay
  server, which serves them like terminal connections (pooled by the control unit);
* **defined states** - Redis unreachable: logins and cross-node requests are refused
  at once; still unreachable after ``ttl`` (its entries are gone from Redis by then)
  the node closes every connection so its terminals move to other nodes; Redis back
  (restarted, maybe empty): the node writes its entries again and serves as before.

Keys live under ``kakehashi:relay:`` (``--cluster-prefix``), so one Redis can hold
several clusters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import ssl
import time
from dataclasses import replace
from typing import Any

from redis.exceptions import RedisError

from kakehashi.core import wire
from kakehashi.core.store.redis import async_client
from kakehashi.core.stream import (
    ConnClosed,
    FramedConn,
    TLSConn,
    open_tcp,
    parse_hostport,
    start_tls,
)
from kakehashi.core.tls import SessionCache
from kakehashi.relay import federation as fed
from kakehashi.relay import messages as m
from kakehashi.relay.control import OpenTrunk, PublishPresence, RemoteDeliver, State

log = logging.getLogger("kakehashi.relay.cluster")

DEFAULT_TTL = 6.0
#: a full re-read of the cluster state every this many renewals (events keep it
#: current in between; a node joining or leaving triggers one at once)
RESYNC_EVERY = 10
#: idle inter-node links kept open per node (beyond: closed when a session ends)
SPARE_TRUNKS = 1
DIAL_TIMEOUT = 5.0


class ClusterError(Exception):
    """The node cannot join (its name is held by another live node, a bad URL)."""


class ClusterNode:
    """See the module docstring. ``server`` is a :class:`~kakehashi.relay.server.RelayServer`."""

    def __init__(self, server: Any, url: str, node: str, advertise: str, *,
                 ttl: float = DEFAULT_TTL, secret: str | None = None,
                 prefix: str = "kakehashi:relay:",
                 trunk_tls: ssl.SSLContext | None = None,
                 trunk_starttls: ssl.SSLContext | None = None,
                 tls_resume: bool = True) -> None:
        self.server = server
        self.core = server.core
        self.url = url
        self.node = node
        self.advertise = advertise
        self.ttl = ttl
        self.period = max(ttl / 3, 0.2)
        self.prefix = prefix
        self.trunk_tls = trunk_tls
        #: nodes listening in plaintext upgrade a link with STARTTLS when a session
        #: that must be encrypted needs one (verified against this context)
        self.trunk_starttls = trunk_starttls
        #: the latest TLS session from each node, offered on the next link to it (a
        #: node dials another for sessions between their users): no certificate
        #: signature there, no chain verification here
        self.tls_sessions = SessionCache() if tls_resume else None
        self._configured_secret = secret
        self.instance = secrets.token_hex(8)
        try:
            self.redis = async_client(url, timeout=self.period,
                                      connect_timeout=self.period, health_check_interval=0)
        except ValueError as exc:
            raise ClusterError(f"bad --cluster URL: {exc}") from None
        self.up = False
        self.last_ok = 0.0
        self.fenced = False
        self._since: dict[str, int] = {}
        self._writes: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dialing: dict[str, int] = {}
        self._addr_cache: dict[str, str] = {}
        self._resync_now = asyncio.Event()
        #: the other nodes alive at the last full read
        self._seen_nodes: set[str] = set()
        self.secret_text = ""

    # -- keys ---------------------------------------------------------------------------
    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Claim the node name (waiting out a dead predecessor's entry), then serve.

        Redis unreachable at start is not fatal: the node starts refusing logins and
        joins when Redis answers.
        """
        self.core.settings.node = self.node
        self.core.cluster_up = False
        try:
            await self._claim_name()
        except (RedisError, OSError) as exc:
            log.warning("cluster state %s unreachable (%s); refusing logins until it is",
                        self.url, exc)
        for coro in (self._renew_loop(), self._event_loop(), self._write_loop()):
            self._spawn(coro)
        from kakehashi.core import metrics

        # /healthz: unhealthy while the node has no cluster state (it refuses logins),
        # so a load balancer sends agents elsewhere
        metrics.add_health_check(f"cluster:{self.node}", lambda: self.up)

    async def _claim_name(self) -> None:
        key = self._k("node", self.node)
        deadline = time.monotonic() + self.ttl + 1
        while True:
            val = json.dumps({"addr": self.advertise, "instance": self.instance})
            if await self.redis.set(key, val, nx=True, px=int(self.ttl * 1000)):
                break
            held = await self.redis.get(key)
            if held is not None and json.loads(held).get("instance") == self.instance:
                break
            if time.monotonic() > deadline:
                raise ClusterError(f"node name {self.node} is in use by another live node "
                                   "(pick another --node)")
            await asyncio.sleep(self.period / 2)  # a killed predecessor's entry expiring
        # whatever a predecessor of this name left is void now
        await self.redis.delete(self._k("presence", self.node))

    async def close(self) -> None:
        from kakehashi.core import metrics

        # the audit entries the relay holds back past a setup (record_soon) first: a
        # node's shutdown closes this layer before the relay server, and a second
        # SIGINT/SIGTERM cancels it at its first wait below, before the server's close
        # (which writes them too) has run; the runner then stops the loop, and the
        # entries' timer never fires
        self.server.audit.flush()
        metrics.remove_health_check(f"cluster:{self.node}")
        for task in list(self._tasks):
            task.cancel()
        # bounded: a Redis command cut by the cancel must not hold the shutdown
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(RedisError, OSError):
            async with asyncio.timeout(1.0):
                # leave at once (the others forget our users without waiting for the ttl)
                pipe = self.redis.pipeline(transaction=True)
                pipe.delete(self._k("presence", self.node))
                pipe.delete(self._k("node", self.node))
                pipe.srem(self._k("nodes"), self.node)
                pipe.publish(self._k("events"), json.dumps({"t": "node-gone",
                                                            "node": self.node}))
                await pipe.execute()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self.redis.aclose()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("cluster task failed: %s", task.exception(), exc_info=task.exception())

    def _apply(self, actions: list[object]) -> None:
        self.server._apply_now(actions)

    # -- actions of the control unit ----------------------------------------------------
    def act(self, action: object) -> None:
        if isinstance(action, PublishPresence):
            if self.up:
                self._writes.put_nowait(("presence", action))
        elif isinstance(action, RemoteDeliver):
            if self.up:
                self._writes.put_nowait(("deliver", action))
        elif isinstance(action, OpenTrunk):
            self._spawn(self._open_trunk(action.node, action.req, tls=action.tls))

    # -- renewal, health, fencing -------------------------------------------------------
    async def _renew_loop(self) -> None:
        rounds = 0
        while True:
            try:
                await self._renew()
                if not self.up:
                    await self._joined()
                rounds += 1
                full = rounds % RESYNC_EVERY == 0 or self._resync_now.is_set()
                if not full:
                    gone, full = await self._membership()
                    if gone and not full:
                        await self._drop_nodes(gone)
                if full:
                    self._resync_now.clear()
                    await self._resync()
                    self._warm_trunks()
            except (RedisError, OSError, TimeoutError) as exc:
                self._lost(exc)
            await asyncio.sleep(self.period)

    async def _renew(self) -> None:
        pipe = self.redis.pipeline(transaction=True)
        val = json.dumps({"addr": self.advertise, "instance": self.instance})
        pipe.set(self._k("node", self.node), val, px=int(self.ttl * 1000))
        pipe.sadd(self._k("nodes"), self.node)
        pipe.pexpire(self._k("presence", self.node), int(self.ttl * 1000))
        if self._configured_secret is not None:
            pipe.set(self._k("secret"), self._configured_secret)
        else:
            # shared through Redis: the first node makes it; after a Redis restart the
            # first node back writes the one everybody already has
            pipe.set(self._k("secret"), self.secret_text or secrets.token_urlsafe(32), nx=True)
        pipe.get(self._k("secret"))
        res = await pipe.execute()
        secret = res[-1].decode() if isinstance(res[-1], bytes) else str(res[-1])
        if secret != self.secret_text:
            self.secret_text = secret
            self.core.settings.cluster_secret = fed.derive_secret(secret)
        expired = not res[2]
        self.last_ok = time.monotonic()
        if expired and self.up:
            await self._rewrite()  # Redis restarted (or lost our hash): write it again

    async def _rewrite(self) -> None:
        """This node's presence hash from the control unit's sessions, at once."""
        local = self.core.local_presence()
        key = self._k("presence", self.node)
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(key)
        if local:
            pipe.hset(key, mapping={u: json.dumps(self._stamp(u, i).to_doc())
                                    for u, i in local.items()})
            pipe.pexpire(key, int(self.ttl * 1000))
        await pipe.execute()

    def _stamp(self, user: str, info: fed.PresenceInfo) -> fed.PresenceInfo:
        since = self._since.setdefault(user, time.time_ns() // 1000)
        return replace(info, seq=since)

    async def _joined(self) -> None:
        """Redis answers (again): write our entries, read everyone's, serve."""
        await self._rewrite()
        await self._resync()
        self.up = True
        self.fenced = False
        log.info("node %s joined the cluster at %s", self.node, self.url)
        self._apply(self.core.cluster_state(True))
        self._warm_trunks()

    def _lost(self, exc: BaseException) -> None:
        if self.up:
            log.warning("node %s lost the cluster state (%s): refusing logins and "
                        "cross-node requests", self.node, exc)
            self.up = False
            self.server.metrics.cluster_members([])  # no cluster state: none known
            while not self._writes.empty():
                self._writes.get_nowait()
            self._apply(self.core.cluster_state(False))
        if not self.fenced and time.monotonic() - self.last_ok > self.ttl:
            # our entries have expired: the others no longer find our users here
            log.warning("node %s: cluster state unreachable for %.0f s; closing every "
                        "connection so terminals move to other nodes", self.node, self.ttl)
            self.fenced = True
            self._since.clear()
            self._apply(self.core.fence("this relay node lost the cluster state"))

    # -- reading the cluster ------------------------------------------------------------
    async def _membership(self) -> tuple[frozenset[str], bool]:
        """The cheap check of every renewal: which nodes are alive (their keys only),
        decided by :func:`federation.membership_change`. A node whose entry expired
        is gone now (its users with it), not at the next full read."""
        nodes = sorted(n.decode() for n in await self.redis.smembers(self._k("nodes"))
                       if n.decode() != self.node)
        alive = await self.redis.mget([self._k("node", n) for n in nodes]) if nodes else []
        live = {n for n, a in zip(nodes, alive, strict=True) if a is not None}
        known = {n for per in self.core.directory.users.values() for n in per}
        return fed.membership_change(live, known, self._seen_nodes)

    async def _drop_nodes(self, gone: frozenset[str]) -> None:
        """Nodes seen alive whose entries expired: forget them and their users (no read
        of the cluster: the survivors' entries have not changed)."""
        for node in sorted(gone):
            self._apply(self.core.node_gone(node))
            self._addr_cache.pop(node, None)
        self._seen_nodes -= gone
        self.server.metrics.cluster_members([self.node, *sorted(self._seen_nodes)])
        await self.redis.srem(self._k("nodes"), *gone)

    async def _resync(self) -> None:
        nodes = sorted(n.decode() for n in await self.redis.smembers(self._k("nodes")))
        others = [n for n in nodes if n != self.node]
        pipe = self.redis.pipeline(transaction=False)
        for n in others:
            pipe.get(self._k("node", n))
            pipe.hgetall(self._k("presence", n))
        res = await pipe.execute() if others else []
        snapshot: dict[str, dict[str, fed.PresenceInfo]] = {}
        gone = []
        for i, n in enumerate(others):
            addr, entries = res[2 * i], res[2 * i + 1]
            if addr is None:
                gone.append(n)
                continue
            with contextlib.suppress(ValueError, KeyError):
                self._addr_cache[n] = json.loads(addr)["addr"]
            users = {}
            for user, doc in entries.items():
                try:
                    users[user.decode()] = fed.PresenceInfo.from_doc(json.loads(doc))
                except (ValueError, UnicodeDecodeError):
                    log.warning("ignoring a malformed presence entry of node %s", n)
            snapshot[n] = users
        if gone:
            await self.redis.srem(self._k("nodes"), *gone)
        self._apply(self.core.set_directory(snapshot))
        self._seen_nodes = set(snapshot)
        self.server.metrics.cluster_members([self.node, *snapshot])

    async def _event_loop(self) -> None:
        delay = 0.2
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._k("events"), self._k("inbox", self.node))
                self._resync_now.set()  # events may have been missed meanwhile
                delay = 0.2
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        self._event(msg["data"])
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("cluster events: %s", exc)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.period)

    def _event(self, data: bytes) -> None:
        try:
            ev = json.loads(data)
            kind = ev["t"]
            if kind == "presence":
                node, user = str(ev["node"]), str(ev["user"])
                info = fed.PresenceInfo.from_doc(ev["info"]) if ev.get("info") else None
                self._apply(self.core.remote_presence(node, user, info))
            elif kind == "node-gone":
                self._apply(self.core.node_gone(str(ev["node"])))
            elif kind == "deliver":
                body = bytes.fromhex(ev["body"])
                self._apply(self.core.remote_deliver(str(ev["sender"]), str(ev["target"]),
                                                     body))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring a malformed cluster event: %s", exc)

    # -- writing ------------------------------------------------------------------------
    async def _write_loop(self) -> None:
        while True:
            kind, action = await self._writes.get()
            try:
                if kind == "presence":
                    await self._write_presence(action)
                else:
                    await self.redis.publish(self._k("inbox", action.node), json.dumps({
                        "t": "deliver", "sender": action.sender, "target": action.target,
                        "body": action.body.hex()}))
            except (RedisError, OSError, TimeoutError) as exc:
                # the renewal notices too; the full rewrite on recovery covers this one
                log.debug("cluster write failed: %s", exc)

    async def _write_presence(self, action: PublishPresence) -> None:
        key = self._k("presence", self.node)
        pipe = self.redis.pipeline(transaction=True)
        if action.info is None:
            self._since.pop(action.user, None)
            pipe.hdel(key, action.user)
            doc = None
        else:
            doc = self._stamp(action.user, action.info).to_doc()
            pipe.hset(key, action.user, json.dumps(doc))
            pipe.pexpire(key, int(self.ttl * 1000))
        pipe.publish(self._k("events"), json.dumps({"t": "presence", "node": self.node,
                                                    "user": action.user, "info": doc}))
        await pipe.execute()

    # -- inter-node links ---------------------------------------------------------------
    def _warm_trunks(self) -> None:
        """Keep one authenticated link ready to every node holding users (a request then
        pays no dial and no authentication), like the agents' spare connections."""
        nodes = {n for per in self.core.directory.users.values() for n in per}
        for node in nodes:
            if node in self._dialing:
                continue
            idle = [c for c in self.core.conns.values()
                    if c.outbound and c.trunk == node and c.state is State.IDLE
                    and c.pending is None]
            if len(idle) < SPARE_TRUNKS:
                self._spawn(self._open_trunk(node, 0))

    async def _address(self, node: str) -> tuple[str, int]:
        raw = await self.redis.get(self._k("node", node))
        if raw is None:
            raise ClusterError(f"node {node} is not in the cluster")
        addr = json.loads(raw)["addr"]
        self._addr_cache[node] = addr
        return parse_hostport(addr)

    async def _open_trunk(self, node: str, req: int, *, tls: bool = False) -> None:
        self._dialing[node] = self._dialing.get(node, 0) + 1
        try:
            framed = await self._dial(node, tls=tls)
        except (OSError, ConnClosed, TimeoutError, ssl.SSLError, wire.WireError, RedisError,
                ClusterError, ValueError) as exc:
            why = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            log.info("no link to node %s: %s", node, why)
            self._apply(self.core.trunk_failed(node, req, why))
            return
        finally:
            self._dialing[node] -= 1
            if not self._dialing[node]:
                del self._dialing[node]
        cid = self.server.add_trunk(framed, node)
        self._apply(self.core.trunk_opened(cid, req))

    async def _dial(self, node: str, *, tls: bool = False) -> FramedConn:
        host, port = await self._address(node)
        conn = await open_tcp(host, port, timeout=DIAL_TIMEOUT)
        try:
            async with asyncio.timeout(DIAL_TIMEOUT):
                if self.trunk_tls is not None:
                    conn = await start_tls(conn, self.trunk_tls, server_side=False,
                                           server_hostname=host, timeout=DIAL_TIMEOUT,
                                           sessions=self.tls_sessions)
                framed = FramedConn(conn, self.server.limits)
                await framed.send(wire.PREAMBLE)
                await framed.read_preamble()
                nonce = fed.new_nonce()
                await framed.send(m.RELAY_CODEC.encode(m.NodeHello(node=self.node,
                                                                   nonce=nonce)))
                challenge = await _read_msg(framed)
                if isinstance(framed.conn, TLSConn):  # its tickets came before this
                    framed.conn.keep_session()
                if not isinstance(challenge, m.NodeChallenge):
                    raise ClusterError(f"node {node} refused the link: {_why(challenge)}")
                secret = self.core.settings.cluster_secret
                expected = fed.node_proof(secret, "callee", node, self.node, nonce,
                                          challenge.nonce)
                if challenge.node != node or not fed.check_proof(expected, challenge.proof):
                    raise ClusterError(f"{host}:{port} did not prove it is node {node} of "
                                       "this cluster")
                await framed.send(m.RELAY_CODEC.encode(m.NodeProof(proof=fed.node_proof(
                    secret, "caller", self.node, node, nonce, challenge.nonce))))
                welcome = await _read_msg(framed)
                if not isinstance(welcome, m.NodeWelcome):
                    raise ClusterError(f"node {node} refused the link: {_why(welcome)}")
                if tls and framed.conn.plain:
                    if self.trunk_starttls is None:
                        raise ClusterError("no TLS context for links between nodes")
                    await framed.send(m.RELAY_CODEC.encode(m.StartTLS()))
                    go = await _read_msg(framed)
                    if not isinstance(go, m.TLSGo):
                        raise ClusterError(f"node {node} refused STARTTLS: {_why(go)}")
                    framed.conn = await start_tls(framed.conn, self.trunk_starttls,
                                                  server_side=False, server_hostname=host,
                                                  timeout=DIAL_TIMEOUT)
        except BaseException:
            conn.close()
            raise
        return framed


async def _read_msg(framed: FramedConn) -> m.Msg:
    frame = await framed.read_frame()
    if frame is None:
        raise ConnClosed("the node closed the link")
    if frame.type is not wire.FrameType.CTRL:
        raise wire.WireError("protocol", "data on an inter-node link being set up")
    return m.TERMINAL_CODEC.decode(frame.payload)


def _why(msg: m.Msg) -> str:
    return msg.message if isinstance(msg, m.Error) else type(msg).__name__

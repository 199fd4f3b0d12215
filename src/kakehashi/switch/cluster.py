"""Several switch server nodes on one Redis store (issue 11): a tunnel whose two
gateways are attached to different nodes.

The smallest sound split: **a tunnel has one home**, the node where it was opened;
that node's :class:`~.tunnels.Switch` makes every decision about it (S3-S7, the switch
table, credit accounting, limits), exactly as on a single server. The other nodes only
carry messages between the home and the gateways attached to them:

* presence: each node keeps ``kakehashi:switch:gw:NAME = NODE`` (with a TTL it renews)
  for the gateways whose links it holds, so a home finds a gateway's node;
* the home sends instructions and stream messages for a remote gateway to that node
  (``to-gw``), which puts them on the gateway's link; the gateway's reports and stream
  messages for a tunnel homed elsewhere go back to the home (``from-gw``), found from
  the tunnel's record in the store (``home``);
* a gateway saying hello on one node while holding tunnels homed on another is told
  to keep them (the welcome lists them) and the home hears it (``gw-hello``, with the
  gateway's re-report, the same reconciliation as after an outage); its link ending
  is told to the homes too (``gw-lost``), and a node that vanishes (its presence
  entries expire) counts as every one of its gateways lost;
* a home that restarted (and took its tunnels back from the store) asks the node of
  each remote gateway of those tunnels for a re-report (``gw-resync``): that node
  renews the gateway's link, and the gateway's new hello re-reports what it holds.
  Only the gateway knows that; renewing its link costs its streams in flight, which
  the restart has cut for these tunnels anyway.

What a user asks may reach any node:

* listing tunnels reads every node's records from the store (each home writes its
  tunnels' records as they change), so ``switch tunnels`` answers the same on every
  node; a tunnel homed elsewhere is shown as its home last stored it;
* closing a tunnel homed elsewhere is a call to its home (``close``, answered with
  ``reply``): the home decides, as if the user had asked it, and the answer (or its
  refusal) comes back;
* live connections per service are counted over the cluster: each node keeps its own
  count in the hash ``kakehashi:switch:live:SERVICE`` (field: the node), and a node is
  counted only while its ``kakehashi:switch:alive:NODE`` key lives (renewed every
  ``RENEW`` s, gone ``PRESENCE_TTL`` s after the node dies), so a dead node's
  connections vanish from the sums. A stream of a service with a connection limit is
  admitted by one atomic Redis script (sum the living nodes' counts, refuse at the
  limit, else count one more here), so a burst of opens spread over the nodes never
  exceeds the limit. Ends are counted down at once; each renewal rewrites this node's
  counts from its own table, which repairs them after a Redis restart. While Redis
  cannot be reached, a node decides from its own count alone (and says so in its log).
  A user's tunnels are counted the same way, under ``kakehashi:switch:live:tunnels:USER``
  (:func:`~.tunnels.tunnels_key`), against ``--max-tunnels-per-user``. A user's
  gateway names are records of the shared store itself (see
  :meth:`~.server.SwitchServer._claim_gateway`).

Messages between nodes travel on Redis pub/sub, one channel per node, published in
order by one task per node (a channel keeps one publisher's order). Nodes trust each
other as far as they trust the store they share: whoever may write the Redis can
already rewrite the users. Per-stream credit still bounds the bytes in flight, so a
slow node or gateway holds back only its own streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

import msgspec

from kakehashi.switch import messages as m

if TYPE_CHECKING:
    from kakehashi.switch.server import SwitchServer

log = logging.getLogger("kakehashi.switch.cluster")

PREFIX = "kakehashi:switch"
#: a node renews its gateways' presence this often; entries live PRESENCE_TTL
RENEW = 2.0
PRESENCE_TTL = 6.0


class Envelope(msgspec.Struct, forbid_unknown_fields=True):
    """One message between nodes."""

    kind: str  # to-gw | from-gw | gw-hello | gw-lost | gw-resync | close | reply
    gw: str
    sender: str
    body: bytes = b""  # encoded link frames (to-gw: for the gateway; from-gw: from it);
    #                    close: nothing; reply: the answer (JSON)
    user: str = ""
    held: list[str] = []
    role: str = ""  # close: the caller's role (the home checks it as its own API does)
    tunnel: str = ""  # close: which tunnel
    req: str = ""  # close/reply: matches an answer to its call


class ClusterError(Exception):
    """Another node did not answer (gone, or Redis away)."""


#: count live connections over the cluster (see the module docstring).
#: KEYS[1]: the service's hash; ARGV: this node, the limit (-1: only sum), the alive
#: key prefix. Returns the sum after counting one more here, -1 when at the limit, or
#: (limit -1) the sum. Fields of nodes whose alive key is gone are deleted.
_LIVE = """
local h = redis.call('HGETALL', KEYS[1])
local sum = 0
for i = 1, #h, 2 do
  if h[i] == ARGV[1] or redis.call('EXISTS', ARGV[3] .. h[i]) == 1 then
    sum = sum + math.max(0, tonumber(h[i + 1]) or 0)
  else
    redis.call('HDEL', KEYS[1], h[i])
  end
end
local limit = tonumber(ARGV[2])
if limit < 0 then return sum end
if limit > 0 and sum >= limit then return -1 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
return sum + 1
"""


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(Envelope)


def channel(node: str) -> str:
    return f"{PREFIX}:node:{node}"


def presence_key(gateway: str) -> str:
    return f"{PREFIX}:gw:{gateway}"


def alive_key(node: str) -> str:
    return f"{PREFIX}:alive:{node}"


def live_key(service: str) -> str:
    return f"{PREFIX}:live:{service}"


class SwitchCluster:
    """This node's part of the cluster: presence, the node channel, forwarding."""

    def __init__(self, srv: SwitchServer, url: str, node: str) -> None:
        self.srv = srv
        self.url = url
        self.node = node
        #: remote gateways this node's tunnels use -> the node that holds their link
        self.remote: dict[str, str] = {}
        #: tunnel id -> its home node (from the store; cached)
        self.homes: dict[str, str] = {}
        self._out: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[Any]] = []
        self.redis: Any = None
        self._calls: dict[str, asyncio.Future[dict[str, Any]]] = {}
        #: service -> this node's count as Redis holds it (see the module docstring)
        self.counted: dict[str, int] = {}
        #: an admission and a renewal of the counts never overlap (a renewal writes
        #: this node's counts whole: one admitted meanwhile would be written over)
        self._counting = asyncio.Lock()
        #: service -> count-downs scheduled and not yet written (a renewal adds them
        #: back, since they are written after it)
        self._down: dict[str, int] = {}
        #: service -> live connections over the cluster, as last read
        self.totals: dict[str, int] = {}

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        from kakehashi.core.store.redis import async_client

        self.redis = async_client(self.url)
        self._live = self.redis.register_script(_LIVE)
        with contextlib.suppress(Exception):  # counted from now; Redis away: the renewal
            await self.redis.set(alive_key(self.node), "1", px=int(PRESENCE_TTL * 1000))
        self.pubsub = self.redis.pubsub()
        await self.pubsub.subscribe(channel(self.node))
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._listen()), loop.create_task(self._publish()),
                       loop.create_task(self._renew())]
        log.info("switch node %s in the cluster", self.node)
        await self.resync_restored()

    async def resync_restored(self) -> None:
        """Ask for re-reports of the remote halves of the tunnels restored here."""
        asked: set[str] = set()
        for t in list(self.srv.switch.tunnels.values()):
            if not t.restored:
                continue
            for name in (t.client_gw, t.server_gw):
                node = await self.where(name)
                if name in asked or not node or node == self.node:
                    continue
                asked.add(name)
                self.remote[name] = node
                self.send(node, Envelope(kind="gw-resync", gw=name, sender=self.node))
                log.info("asked node %s for gateway %s's re-report", node, name)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            for name in list(self.srv.links):
                await self._drop_presence(name)
            await self.redis.delete(alive_key(self.node))  # its counts leave the sums
            for service in list(self.counted):
                await self.redis.hdel(live_key(service), self.node)
            await self.pubsub.aclose()
            await self.redis.aclose()

    # -- presence --------------------------------------------------------------------------
    async def gateway_here(self, name: str) -> None:
        await self.redis.set(presence_key(name), self.node, px=int(PRESENCE_TTL * 1000))

    async def _drop_presence(self, name: str) -> None:
        key = presence_key(name)
        if await self.redis.get(key) == self.node.encode():
            await self.redis.delete(key)

    async def present(self, gateways: list[str]) -> set[str]:
        """Those of ``gateways`` with a link on some node."""
        if not gateways:
            return set()
        found = await self.redis.mget([presence_key(g) for g in gateways])
        return {g for g, node in zip(gateways, found, strict=True) if node}

    async def where(self, gateway: str) -> str | None:
        node = await self.redis.get(presence_key(gateway))
        return node.decode() if node else None

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(RENEW)
            try:
                await self.redis.set(alive_key(self.node), "1", px=int(PRESENCE_TTL * 1000))
                await self.renew_counts()
                for name in list(self.srv.links):
                    await self.gateway_here(name)
                # remote gateways whose node let their entry lapse (it died): lost
                for name, node in list(self.remote.items()):
                    if await self.where(name) != node:
                        log.info("gateway %s is no longer at node %s", name, node)
                        self.remote.pop(name, None)
                        if name not in self.srv.links:
                            await self.srv.apply(self.srv.switch.gateway_lost(name,
                                                                              time.time()))
            except Exception as exc:  # Redis away a moment: try again next round
                log.warning("cluster presence: %s", exc)

    # -- live connections over the cluster ------------------------------------------------
    async def admit(self, service: str, limit: int) -> bool | None:
        """One more live connection of ``service`` (or tunnel of a user, under
        :func:`~.tunnels.tunnels_key`) over the cluster, if under ``limit``: True
        (counted here), False (at the limit), None (Redis away: decide locally)."""
        async with self._counting:
            try:
                n = await self._live(keys=[live_key(service)],
                                     args=[self.node, limit, alive_key("")])
            except Exception as exc:
                log.warning("cluster connection count for %s unknown (%s): deciding from "
                            "this node's count", service, exc)
                return None
            if n < 0:
                return False
            self.counted[service] = self.counted.get(service, 0) + 1
        self.totals[service] = int(n)
        return True

    def uncount(self, service: str, n: int = 1) -> None:
        """Count ``n`` of this node's connections of ``service`` off in Redis."""
        self.counted[service] = max(0, self.counted.get(service, 0) - n)
        self._down[service] = self._down.get(service, 0) + n

        async def down() -> None:  # never in the middle of a renewal
            async with self._counting:
                try:
                    await self.redis.hincrby(live_key(service), self.node, -n)
                finally:  # written, or lost with Redis (the next renewal repairs it)
                    self._down[service] -= n

        task = asyncio.get_running_loop().create_task(down())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def sync_counts(self, live: dict[str, int]) -> None:
        """After the switch decided: connections that ended are counted off at once."""
        for service, n in list(self.counted.items()):
            here = live.get(service, 0)
            if here < n:
                self.uncount(service, n - here)

    async def renew_counts(self) -> None:
        """Rewrite this node's counts from its own table (repairs what a Redis restart
        or a lost decrement left), and read the cluster's sums."""
        async with self._counting:
            live = self.srv.switch.live
            pipe = self.redis.pipeline(transaction=False)
            for service in sorted(set(live) | set(self.counted)):
                n = live.get(service, 0)
                held = n + self._down.get(service, 0)  # what Redis holds before those
                if held:
                    pipe.hset(live_key(service), self.node, held)
                else:
                    pipe.hdel(live_key(service), self.node)
                self.counted[service] = n
            await pipe.execute()
        self.totals = await self.live_totals(self.srv.switch.services)

    async def live_totals(self, services: Any) -> dict[str, int]:
        """Live connections over the cluster of each service named."""
        names = sorted(services)
        if not names:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for service in names:
            await self._live(keys=[live_key(service)], args=[self.node, -1, alive_key("")],
                             client=pipe)
        return {name: int(n) for name, n in zip(names, await pipe.execute(), strict=True)}

    # -- calls to another node -----------------------------------------------------------
    async def call(self, node: str, env: Envelope, timeout: float) -> dict[str, Any]:
        """Send ``env`` to ``node`` and wait for its reply (ClusterError: no answer)."""
        env.req = secrets.token_hex(8)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._calls[env.req] = fut
        try:
            try:
                heard = await self.redis.publish(channel(node), _enc.encode(env))
            except Exception as exc:
                raise ClusterError(f"node {node} cannot be reached: {exc}") from None
            if not heard:
                raise ClusterError(f"node {node} is not running")
            try:
                return await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                raise ClusterError(f"node {node} did not answer in {timeout:g} s") from None
        finally:
            self._calls.pop(env.req, None)

    async def _answer_close(self, env: Envelope) -> None:
        from kakehashi.core.web import ApiError
        from kakehashi.switch.server import Who

        try:
            t = await self.srv.close_tunnel(Who(user=env.user, role=env.role), env.tunnel)
            reply: dict[str, Any] = {"ok": True, "tunnel": t.view()}
        except ApiError as exc:
            reply = {"ok": False, "status": exc.status, "code": exc.code,
                     "message": exc.message}
        self.send(env.sender, Envelope(kind="reply", gw="", sender=self.node, req=env.req,
                                       body=json.dumps(reply).encode()))

    # -- sending to other nodes ------------------------------------------------------------
    def send(self, node: str, env: Envelope) -> None:
        self._out.put_nowait((node, _enc.encode(env)))

    async def _publish(self) -> None:
        while True:
            node, payload = await self._out.get()
            try:
                await self.redis.publish(channel(node), payload)
            except Exception as exc:
                log.warning("cannot reach node %s through Redis: %s", node, exc)

    def to_gateway(self, gateway: str, frames: bytes) -> bool:
        """Frames for a gateway whose link is on another node; False if none known."""
        node = self.remote.get(gateway)
        if node is None:
            return False
        self.send(node, Envelope(kind="to-gw", gw=gateway, sender=self.node, body=frames))
        return True

    def home_of(self, tid: str) -> str | None:
        """The node that decides about tunnel ``tid`` (None: unknown or this one)."""
        home = self.homes.get(tid)
        if home is None:
            from kakehashi.switch.server import TUNNEL

            doc = self.srv.store.get(TUNNEL, tid)
            home = str(doc.get("home", "")) if doc else ""
            if len(self.homes) > 100_000:
                self.homes.clear()
            self.homes[tid] = home
        return home if home and home != self.node else None

    def remote_tunnels_of(self, gateway: str) -> dict[str, list[str]]:
        """Tunnels of ``gateway`` homed on other nodes, by home."""
        from kakehashi.switch.server import TUNNEL

        out: dict[str, list[str]] = {}
        for tid, doc in self.srv.store.list(TUNNEL):
            home = str(doc.get("home", ""))
            if home and home != self.node and gateway in (doc.get("client_gw"),
                                                         doc.get("server_gw")):
                out.setdefault(home, []).append(tid)
        return out

    # -- receiving from other nodes ----------------------------------------------------------
    async def _listen(self) -> None:
        while True:
            try:
                msg = await self.pubsub.get_message(ignore_subscribe_messages=True,
                                                    timeout=5.0)
            except Exception as exc:
                log.warning("cluster channel: %s", exc)
                await asyncio.sleep(0.5)
                continue
            if msg is None:
                continue
            try:
                await self.handle(_dec.decode(msg["data"]))
            except (msgspec.DecodeError, m.ProtocolError) as exc:
                log.warning("a malformed message between nodes: %s", exc)

    async def handle(self, env: Envelope) -> None:
        srv = self.srv
        if env.kind == "to-gw":
            link = srv.links.get(env.gw)
            if link is None:
                return  # it left meanwhile; the home hears gw-lost
            for msg in m.decode_to_gateway(env.body):
                link.put(msg)
        elif env.kind == "from-gw":
            now = time.time()
            self.remote[env.gw] = env.sender
            actions = []
            for msg in m.decode_to_server(env.body):
                if isinstance(msg, m.Done):
                    actions += srv.switch.on_done(env.gw, msg, now)
                elif isinstance(msg, m.STREAM_TYPES):
                    actions += await srv.on_stream(env.gw, msg)
            await srv.apply(actions)
        elif env.kind == "gw-hello":
            self.remote[env.gw] = env.sender
            try:
                _, actions = srv.switch.gateway_hello(env.gw, env.user, env.held, time.time())
            except Exception as exc:
                log.warning("gateway %s at node %s: %s", env.gw, env.sender, exc)
                return
            await srv.apply(actions)
        elif env.kind == "gw-resync":
            link = srv.links.get(env.gw)
            if link is not None:  # its new hello re-reports to every home
                srv.detach(link, f"node {env.sender} restarted and asks for a re-report")
        elif env.kind == "close":  # in a task: the home waits for the deletion
            task = asyncio.get_running_loop().create_task(self._answer_close(env))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        elif env.kind == "reply":
            fut = self._calls.get(env.req)
            if fut is not None and not fut.done():
                with contextlib.suppress(ValueError):
                    fut.set_result(json.loads(env.body))
        elif env.kind == "gw-lost" and self.remote.get(env.gw) == env.sender:
            del self.remote[env.gw]
            if env.gw not in srv.links:
                await srv.apply(srv.switch.gateway_lost(env.gw, time.time()))

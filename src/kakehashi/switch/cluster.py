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

Messages between nodes travel on Redis pub/sub, one channel per node, published in
order by one task per node (a channel keeps one publisher's order). Nodes trust each
other as far as they trust the store they share: whoever may write the Redis can
already rewrite the users. Per-stream credit still bounds the bytes in flight, so a
slow node or gateway holds back only its own streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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

    kind: str  # to-gw | from-gw | gw-hello | gw-lost | gw-resync
    gw: str
    sender: str
    body: bytes = b""  # encoded link frames (to-gw: for the gateway; from-gw: from it)
    user: str = ""
    held: list[str] = []


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(Envelope)


def channel(node: str) -> str:
    return f"{PREFIX}:node:{node}"


def presence_key(gateway: str) -> str:
    return f"{PREFIX}:gw:{gateway}"


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

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        from kakehashi.core.store.redis import async_client

        self.redis = async_client(self.url)
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
            await self.pubsub.aclose()
            await self.redis.aclose()

    # -- presence --------------------------------------------------------------------------
    async def gateway_here(self, name: str) -> None:
        await self.redis.set(presence_key(name), self.node, px=int(PRESENCE_TTL * 1000))

    async def _drop_presence(self, name: str) -> None:
        key = presence_key(name)
        if await self.redis.get(key) == self.node.encode():
            await self.redis.delete(key)

    async def where(self, gateway: str) -> str | None:
        node = await self.redis.get(presence_key(gateway))
        return node.decode() if node else None

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(RENEW)
            try:
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
                    actions += srv.switch.on_stream(env.gw, msg)
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
        elif env.kind == "gw-lost" and self.remote.get(env.gw) == env.sender:
            del self.remote[env.gw]
            if env.gw not in srv.links:
                await srv.apply(srv.switch.gateway_lost(env.gw, time.time()))

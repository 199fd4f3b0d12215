"""Several manager replicas on one Redis: who holds which edge, and word between them.

With ``ondemand manager --db redis://...`` the grants, devices, relays and tokens are
in Redis (the core store), and each replica keeps WebSocket control channels only to
the edges and inner relays attached to it. What a replica does not hold it reaches
through Redis:

* **Edges of other replicas**: each replica announces its edges in keys that expire
  (``<p>od-edge:NAME`` → its replica and the edge's hello, renewed every
  ``EDGE_RENEW`` s, gone ``EDGE_TTL`` s after the replica stops), so a grant created
  on any replica may be placed on any edge. The TTL is short because a replica killed
  outright says nothing: its edges move to a living replica within a second (they
  name every replica, see :mod:`.channel`), which announces them anew at once (the
  newest attachment wins the key), and the announcements of edges that did not come
  back are gone within ``EDGE_TTL`` s. A renewal only refreshes a key that still names
  this replica, so a replica that has not yet noticed that its edge moved on does not
  take the edge back; it forgets it instead.
* **Calls** (open a port on an edge attached elsewhere): a message on the owning
  replica's channel ``<p>od-replica:NAME``, answered on the caller's.
* **Broadcasts** (a grant created, revoked, extended, expired; an event recorded):
  one message on ``<p>od-replicas`` that every replica applies to its own view and
  pushes to its own edges at once (a revocation cuts live connections on every edge
  within milliseconds, not at the next poll).
* **Tickets** (the one-time binding of an edge's dial to the inner relay's check):
  ``<p>od-ticket:T`` with a 10 s expiry, redeemed with ``GETDEL``, since the edge
  and the inner relay may be attached to different replicas.

Pub/sub delivers to replicas that are connected; a replica reloads the grants from
the store each time it (re)subscribes (see ``Manager.resync``), so nothing said
while it was starting or away is missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from kakehashi.core.store.redis import async_client, key_prefix, redacted

log = logging.getLogger("kakehashi.ondemand.replicas")

#: seconds an edge's announcement lives without renewal, and how often it is renewed
EDGE_TTL = 3
EDGE_RENEW = 1.0
#: seconds a one-time dial ticket is valid
TICKET_TTL = 10

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]]

#: renew an announcement only while it names this replica (KEYS[1]: the edge's key;
#: ARGV: the announcement, this replica's name, the TTL); 1 renewed, 0 another holds it
_RENEW = """
local v = redis.call('GET', KEYS[1])
if v and cjson.decode(v)['replica'] ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[3]))
return 1
"""


class ReplicaError(Exception):
    """Another replica did not answer (gone, or Redis away)."""


class Replicas:
    """This replica's link to the others (see the module docstring)."""

    def __init__(self, url: str, name: str | None = None) -> None:
        self.url = url
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        p = key_prefix(url)
        self._broadcast_ch = f"{p}od-replicas"
        self._direct_prefix = f"{p}od-replica:"
        self._edge_prefix = f"{p}od-edge:"
        self._ticket_prefix = f"{p}od-ticket:"
        self.redis = async_client(url)
        self._calls: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._handler: Handler | None = None
        self._on_reconnect: Callable[[], Awaitable[None]] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._edges: dict[str, dict[str, Any]] = {}  # announced by this replica
        self._renew_script = self.redis.register_script(_RENEW)
        self.subscribed = asyncio.Event()

    def __repr__(self) -> str:
        return f"Replicas({self.name!r}, {redacted(self.url)!r})"

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self, handler: Handler,
                    on_reconnect: Callable[[], Awaitable[None]] | None = None) -> None:
        self._handler = handler
        self._on_reconnect = on_reconnect
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._listen()), loop.create_task(self._renew())]
        with contextlib.suppress(TimeoutError):  # a Redis that is away: go on, retrying
            await asyncio.wait_for(self.subscribed.wait(), 10)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            for name in list(self._edges):
                await self.edge_gone(name)
        await self.redis.aclose()

    # -- messages ----------------------------------------------------------------------
    async def broadcast(self, msg: dict[str, Any]) -> None:
        """To every other replica (best effort: a replica that is away resyncs)."""
        try:
            await self.redis.publish(self._broadcast_ch, json.dumps({**msg, "from": self.name}))
        except Exception as exc:
            log.warning("replicas: broadcast %s failed: %s", msg.get("op"), exc)

    async def call(self, replica: str, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Ask ``replica`` and wait for its answer."""
        cid = secrets.token_hex(8)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._calls[cid] = fut
        try:
            body = json.dumps({**msg, "call": cid, "reply_to": self.name, "from": self.name})
            try:
                heard = await self.redis.publish(self._direct_prefix + replica, body)
            except Exception as exc:
                raise ReplicaError(f"replica {replica}: {exc}") from None
            if not heard:
                raise ReplicaError(f"replica {replica} is not listening")
            try:
                return await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                raise ReplicaError(f"replica {replica} did not answer in {timeout:g} s") \
                    from None
        finally:
            self._calls.pop(cid, None)

    async def _listen(self) -> None:
        delay = 0.2
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._broadcast_ch, self._direct_prefix + self.name)
                self.subscribed.set()
                if self._on_reconnect is not None:  # what was said before we listened
                    await self._on_reconnect()      # (or while we were away) is stored
                delay = 0.2
                while True:
                    message = await pubsub.get_message(timeout=5.0)
                    if message is not None and message.get("type") == "message":
                        await self._dispatch(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.subscribed.clear()
                log.warning("replicas: listening on %s failed (%s); retrying",
                            redacted(self.url), exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _dispatch(self, data: bytes) -> None:
        try:
            msg = json.loads(data)
        except ValueError:
            return
        if not isinstance(msg, dict) or msg.get("from") == self.name:
            return
        if "reply" in msg:
            fut = self._calls.get(msg.get("call", ""))
            if fut is not None and not fut.done():
                fut.set_result(msg["reply"])
            return
        if "call" in msg:  # answered in a task of its own: an open waits for an edge
            asyncio.get_running_loop().create_task(self._answer(msg))
            return
        if self._handler is not None:
            try:
                await self._handler(msg)
            except Exception:
                log.exception("replicas: handling %s failed", msg.get("op"))

    async def _answer(self, msg: dict[str, Any]) -> None:
        assert self._handler is not None
        try:
            reply = await self._handler(msg) or {}
        except Exception as exc:
            reply = {"ok": False, "code": "replica-failed", "error": str(exc)}
        with contextlib.suppress(Exception):
            await self.redis.publish(self._direct_prefix + str(msg.get("reply_to")),
                                     json.dumps({"call": msg["call"], "reply": reply,
                                                 "from": self.name}))

    # -- edges -------------------------------------------------------------------------
    async def edge_here(self, name: str, info: dict[str, Any]) -> None:
        """Announce (or refresh) an edge attached to this replica."""
        self._edges[name] = {**info, "replica": self.name}
        with contextlib.suppress(Exception):
            await self.redis.set(self._edge_prefix + name, json.dumps(self._edges[name]),
                                 ex=EDGE_TTL)

    async def edge_gone(self, name: str) -> None:
        self._edges.pop(name, None)
        key = self._edge_prefix + name
        with contextlib.suppress(Exception):
            raw = await self.redis.get(key)
            if raw is not None and json.loads(raw).get("replica") == self.name:
                await self.redis.delete(key)

    async def edges(self) -> dict[str, dict[str, Any]]:
        """Every announced edge (of every replica) by name, but those of a replica that
        no longer listens: a replica killed a moment ago cannot open a port, and its
        announcements may live on for up to ``EDGE_TTL`` s."""
        keys = [k async for k in self.redis.scan_iter(match=self._edge_prefix + "*",
                                                       count=1000)]
        if not keys:
            return {}
        out = {}
        for key, raw in zip(keys, await self.redis.mget(keys), strict=True):
            if raw is not None:
                with contextlib.suppress(ValueError):
                    out[key.decode()[len(self._edge_prefix):]] = json.loads(raw)
        others = sorted({str(i.get("replica")) for i in out.values()} - {self.name})
        if others:
            heard = {k.decode() if isinstance(k, bytes) else k: n
                     for k, n in await self.redis.pubsub_numsub(
                         *[self._direct_prefix + r for r in others])}
            gone = {r for r in others if not heard.get(self._direct_prefix + r)}
            out = {n: i for n, i in out.items() if i.get("replica") not in gone}
        return out

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(EDGE_RENEW)
            try:
                await self.renew_once()
            except Exception as exc:  # Redis away a moment: the next round tries again
                log.warning("replicas: renewing edge announcements failed: %s", exc)

    async def renew_once(self) -> None:
        """Refresh this replica's announcements in one round trip; forget the edges
        another replica announced since (the edge moved there)."""
        items = list(self._edges.items())
        if not items:
            return
        pipe = self.redis.pipeline(transaction=False)
        for name, info in items:
            await self._renew_script(keys=[self._edge_prefix + name],
                                     args=[json.dumps(info), self.name, EDGE_TTL],
                                     client=pipe)
        for (name, info), kept in zip(items, await pipe.execute(), strict=True):
            if not kept and self._edges.get(name) is info:
                log.info("replicas: edge %s is attached to another replica now", name)
                self._edges.pop(name, None)

    # -- tickets -----------------------------------------------------------------------
    async def ticket(self, gid: str) -> str:
        ticket = secrets.token_urlsafe(24)
        await self.redis.set(self._ticket_prefix + ticket, gid, ex=TICKET_TTL)
        return ticket

    async def redeem(self, ticket: str, gid: str) -> bool:
        if not ticket:
            return False
        found = await self.redis.getdel(self._ticket_prefix + ticket)
        return found is not None and found.decode() == gid

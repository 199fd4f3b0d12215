"""The connection management device (spec 002, device 1): REST API and relay control.

It keeps, on the store: auth infos (S1-S4), devices (the stand-in for the P-GW/UPF
connection management information: IMSI -> inner relay and private address), relays,
grants (destination entries, S14) and each grant's events. Edges and inner relays keep
a WebSocket control channel to it (:mod:`.messages`); a grant is returned to the
client only after its edge has the port open (S15), and revocation, extension and
expiry reach the edge over the same channel at once.

The decisions themselves are :mod:`.grants` (sans-IO); this module stores, sends and
waits. With a Redis store several replicas serve one set of grants: what crosses
between them is :mod:`.replicas` (edges of other replicas, broadcasts of grant
changes, shared one-time tickets).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import msgspec
from fastapi import Depends, Query, Request, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, Field

from kakehashi import __version__
from kakehashi.core import tls
from kakehashi.core.audit import AuditLog
from kakehashi.core.identity import ApiTokens, TokenInfo
from kakehashi.core.store import Store
from kakehashi.core.web import ApiError, bearer, create_app, require
from kakehashi.ondemand import grants as g
from kakehashi.ondemand import messages as m
from kakehashi.ondemand.replicas import ReplicaError, Replicas

log = logging.getLogger("kakehashi.ondemand.manager")

GRANT, EVENT, AUTH, DEVICE, RELAY = "od-grant", "od-event", "od-auth-info", "od-device", \
    "od-relay"
#: with replicas: the relay CA every replica issues from, and one record per ended
#: grant (whoever inserts it ended the grant: the others only follow)
RELAY_CA, GRANT_END = "od-relay-ca", "od-grant-end"
#: events kept per grant at most (a flood of refused connections cannot fill the store)
MAX_EVENTS = 10_000


@dataclass
class ManagerSettings:
    limits: g.GrantLimits = field(default_factory=g.GrantLimits)
    region_table: list[tuple[g.Network, str]] = field(default_factory=list)
    carrier_table: list[tuple[g.Network, str]] = field(default_factory=list)
    #: how long a grant waits for its edge to open the port
    open_timeout: float = 5.0
    #: how long a grant waits for a first edge when none is connected
    edge_wait: float = 5.0
    #: how long ended grants and their events stay readable
    retention: float = 3600.0
    #: how long a relay has to say hello
    hello_timeout: float = 10.0
    #: lifetime of the certificates issued to relays
    cert_days: int = 30


class RelaySession:
    """One connected relay (an edge or an inner relay) on its control channel."""

    def __init__(self, ws: WebSocket, hello: m.Hello) -> None:
        self.ws = ws
        self.hello = hello
        self.name = hello.name
        self.kind = hello.kind
        self.pending: dict[int, asyncio.Future[m.Ack]] = {}
        self.next_req = 1
        self.sessions = 0
        self.bytes_per_second = 0.0
        self.closed = False
        self._send_lock = asyncio.Lock()

    async def send(self, msg: msgspec.Struct) -> None:
        async with self._send_lock:
            await self.ws.send_text(m.encode(msg))

    async def open(self, grant: dict[str, Any], timeout: float) -> m.Ack:
        req = self.next_req
        self.next_req += 1
        fut: asyncio.Future[m.Ack] = asyncio.get_running_loop().create_future()
        self.pending[req] = fut
        try:
            await self.send(m.Open(req=req, grant=grant))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.pending.pop(req, None)

    def lost(self) -> None:
        self.closed = True
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError(f"edge {self.name} disconnected"))


class RemoteEdge:
    """An edge attached to another replica, driven like a :class:`RelaySession`."""

    def __init__(self, replicas: Replicas, replica: str, name: str) -> None:
        self.replicas, self.replica, self.name = replicas, replica, name

    async def open(self, grant: dict[str, Any], timeout: float) -> m.Ack:
        try:
            reply = await self.replicas.call(
                self.replica, {"op": "open", "edge": self.name, "grant": grant}, timeout + 1)
        except ReplicaError as exc:
            raise ConnectionError(str(exc)) from None
        return m.Ack(req=0, ok=bool(reply.get("ok")), code=str(reply.get("code", "")),
                     error=str(reply.get("error", "")))

    async def send(self, msg: msgspec.Struct) -> None:
        if isinstance(msg, m.Close):
            await self.replicas.call(self.replica, {"op": "close", "edge": self.name,
                                                    "grant": msg.grant,
                                                    "reason": msg.reason}, 5.0)


class Manager:
    """The manager's state and operations; the routes (:func:`build_app`) call these."""

    def __init__(self, store: Store, *, audit: AuditLog | None = None,
                 settings: ManagerSettings | None = None, ca_home: Path | None = None,
                 replicas: Replicas | None = None) -> None:
        self.store = store
        #: the other replicas on the same Redis (None: this manager is alone)
        self.replicas = replicas
        self.audit = audit or AuditLog(None, system="ondemand")
        self.s = settings or ManagerSettings()
        self.tokens = ApiTokens(store, roles=g.ROLES)
        self.ca_home = ca_home
        self._ca: tls.DevCA | None = None
        self.grants: dict[str, dict[str, Any]] = {gid: doc for gid, doc in store.list(GRANT)}
        self.edges: dict[str, RelaySession] = {}
        self.inners: dict[str, RelaySession] = {}
        self.edge_joined = asyncio.Event()
        self.changed = asyncio.Condition()
        # each grant's trail, read from the store once (one scan at start), then kept
        # here as events are recorded: a long poll answers without touching the store
        self._trails: dict[str, list[dict[str, Any]]] = {}
        self._seqs: dict[str, int] = {}
        for key, doc in store.list(EVENT):
            self._trails.setdefault(key.partition("/")[0], []).append(doc)
        # ports of live grants per edge, and a heap of (when, grant) for expiry and
        # deletion: creating or ending a grant costs O(log n), not a pass over all
        self._used: dict[str, set[int]] = {}
        self._timers: list[tuple[float, str]] = []
        self._deadline = float("inf")
        # (edge, port) -> grant: the S23 lookup; one-time dial tickets -> (grant, until)
        self._by_port: dict[tuple[str, int], str] = {}
        self._tickets: dict[str, tuple[str, float]] = {}
        self._wake = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None
        for doc in self.grants.values():
            if doc["status"] == "active":
                self._used.setdefault(doc["edge"], set()).add(doc["port"])
                self._by_port[(doc["edge"], doc["port"])] = doc["id"]
                self._at(doc["expires_at_ts"], doc["id"])
            else:
                self._at(doc.get("ended_at_ts", 0) + self.s.retention, doc["id"])

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def ca(self) -> tls.DevCA:
        """The relay CA: it issues the certificates edges and inner relays prove
        themselves with on the relay link (created on first use)."""
        if self._ca is None:
            if self.replicas is not None:
                self._shared_ca()
            self._ca = tls.DevCA(self.ca_home)
        return self._ca

    def _shared_ca(self) -> None:
        """Replicas issue relay certificates from one CA (an edge of one replica and
        an inner relay of another must trust each other): the first replica's CA goes
        into the store, the others write it where :class:`tls.DevCA` looks for it.

        The store then holds the CA's key: Redis must be as private as the key file."""
        assert self.ca_home is not None
        doc = self.store.get(RELAY_CA, "ca")
        if doc is None:
            ca = tls.DevCA(self.ca_home)
            mine = {"cert": ca.ca_path.read_text(), "key": ca.key_path.read_text()}
            if self.store.insert(RELAY_CA, "ca", mine):
                return
            doc = self.store.get(RELAY_CA, "ca")
            assert doc is not None
        ca_dir = self.ca_home / "ca"
        ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name, text, mode in (("ca.key", doc["key"], 0o600), ("ca.pem", doc["cert"], 0o644)):
            path = ca_dir / name
            if path.exists() and path.read_text() == text:
                continue
            tmp = path.with_suffix(f".{secrets.token_hex(4)}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            os.replace(tmp, path)

    def start(self) -> None:
        self.ca  # noqa: B018 - create it now, not inside the first hello
        loop = asyncio.get_running_loop()
        self._sweeper = loop.create_task(self._sweep())
        if self.replicas is not None:
            self._replicas_start = loop.create_task(
                self.replicas.start(self._on_replica, self.resync))

    async def close(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self.replicas is not None:
            await self.replicas.close()

    # -- events ------------------------------------------------------------------------
    async def record(self, kind: str, gid: str, **fields: Any) -> dict[str, Any]:
        ev = g.audit_event(kind, gid, **fields)
        trail = self._trails.setdefault(gid, [])
        seq = self._seqs[gid] = self._seqs.get(gid, trail[-1]["seq"] if trail else 0) + 1
        ev["seq"] = seq
        if len(trail) < MAX_EVENTS:  # the audit log still gets the rest
            if self.replicas is None:
                self.store.put(EVENT, f"{gid}/{seq:08d}", ev)
            else:  # another replica may number an event of this grant at the same time
                while not self.store.insert(EVENT, f"{gid}/{seq:08d}", ev):
                    seq = ev["seq"] = seq + 1
                self._seqs[gid] = seq
                await self.replicas.broadcast({"op": "event", "grant": gid, "event": ev})
            self._add_event(gid, ev)
        self.audit.record(kind, kind not in ("denied", "refused"),
                          **{k: v for k, v in ev.items() if k not in ("event", "ts")})
        async with self.changed:
            self.changed.notify_all()
        return ev

    def _add_event(self, gid: str, ev: dict[str, Any]) -> None:
        """Into the grant's trail in order (events of other replicas may come late)."""
        trail = self._trails.setdefault(gid, [])
        if not trail or trail[-1]["seq"] < ev["seq"]:
            trail.append(ev)
        elif all(e["seq"] != ev["seq"] for e in trail):
            trail.append(ev)
            trail.sort(key=lambda e: e["seq"])
        self._seqs[gid] = max(self._seqs.get(gid, 0), ev["seq"])

    def events(self, gid: str, after: int = 0) -> list[dict[str, Any]]:
        return [doc for doc in self._trails.get(gid, ()) if doc.get("seq", 0) > after]

    # -- reads -------------------------------------------------------------------------
    def grant(self, gid: str, who: TokenInfo | None = None) -> dict[str, Any]:
        doc = self.grants.get(gid)
        if doc is None and self.replicas is not None:  # made by a replica a moment ago
            stored = self.store.get(GRANT, gid)
            if stored is not None:
                self._take(stored)
                doc = self.grants.get(gid)
        if doc is None or doc.get("status") == "opening" or (
                who is not None and who.role == "client" and doc.get("owner") != who.id):
            raise ApiError(404, "unknown-grant", f"no grant {gid!r}")
        return doc

    def auth_infos(self) -> dict[str, dict[str, Any]]:
        return dict(self.store.list(AUTH))

    def devices(self) -> dict[str, dict[str, Any]]:
        return dict(self.store.list(DEVICE))

    def _at(self, when: float, gid: str) -> None:
        """Look at grant ``gid`` again at ``when`` (expiry, or deletion after retention)."""
        heapq.heappush(self._timers, (when, gid))
        if when < self._deadline:
            self._wake.set()

    def edge_views(self, remote: dict[str, dict[str, Any]] | None = None) -> list[g.EdgeView]:
        """The edges a grant may go to: this replica's, and ``remote`` (announced by
        other replicas, see :meth:`Replicas.edges`)."""
        views = []
        for name, sess in self.edges.items():
            h = sess.hello
            used = set(self._used.get(name, ()))
            views.append(g.EdgeView(name=name, public_host=h.public_host,
                                    ports=(h.ports[0], h.ports[1]),
                                    region=h.region or None, carrier=h.carrier or None,
                                    sessions=sess.sessions,
                                    bytes_per_second=sess.bytes_per_second, used=used))
        for name, info in (remote or {}).items():
            if name in self.edges or self.replicas is None \
                    or info.get("replica") == self.replicas.name:
                continue
            views.append(g.EdgeView(name=name, public_host=info["public_host"],
                                    ports=(info["ports"][0], info["ports"][1]),
                                    region=info.get("region") or None,
                                    carrier=info.get("carrier") or None,
                                    sessions=info.get("sessions", 0),
                                    bytes_per_second=info.get("bytes_per_second", 0.0),
                                    used=set(self._used.get(name, ()))))
        return views

    async def remote_edges(self) -> dict[str, dict[str, Any]]:
        if self.replicas is None:
            return {}
        try:
            return await self.replicas.edges()
        except Exception as exc:
            log.warning("edges of other replicas unknown: %s", exc)
            return {}

    # -- grants (S11-S15) --------------------------------------------------------------
    async def create_grants(self, req: g.GrantRequest, who: TokenInfo) -> list[dict[str, Any]]:
        req = g.validate_request(req, devices=self.devices(), auth_infos=self.auth_infos(),
                                 limits=self.s.limits)
        remote = await self.remote_edges()
        if not self.edges and not remote and self.s.edge_wait > 0:  # an edge still starting
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.edge_joined.wait(), self.s.edge_wait)
        choice = g.choose_edge(req.policy, self.edge_views(remote),
                               client_address=req.client_address, carrier=req.carrier,
                               region_table=self.s.region_table,
                               carrier_table=self.s.carrier_table)
        sess: RelaySession | RemoteEdge
        if choice.edge.name in self.edges:
            sess = self.edges[choice.edge.name]
        else:  # attached to another replica: it opens the port for us
            assert self.replicas is not None
            sess = RemoteEdge(self.replicas, remote[choice.edge.name]["replica"],
                              choice.edge.name)
        auth = self.auth_infos().get(req.auth_info) if req.auth_info else None
        devices = self.devices()
        now = time.time()
        made: list[dict[str, Any]] = []
        try:
            for imsi, port in req.targets:
                dev = devices[imsi]
                doc = {
                    "id": "g" + secrets.token_hex(8), "imsi": imsi, "target_port": port,
                    "edge": choice.edge.name, "host": choice.edge.public_host, "port": 0,
                    "policy": choice.policy, "reason": choice.reason,
                    "created_at": g.iso(now), "created_at_ts": now,
                    "expires_at": g.iso(now + req.ttl), "expires_at_ts": now + req.ttl,
                    "ttl": req.ttl, "cidrs": req.cidrs, "auth_info": req.auth_info,
                    "tls": req.tls, "pin": (auth or {}).get("pin"),
                    "max_connections": req.max_connections, "status": "opening",
                    "inner": dev["inner"], "device_address": dev["address"],
                    "owner": who.id,
                }
                await self._open(sess, doc, choice.edge, auth)
                made.append(doc)
        except BaseException:
            for doc in made:
                self.grants.pop(doc["id"], None)
                self._used.get(doc["edge"], set()).discard(doc["port"])
                self._by_port.pop((doc["edge"], doc["port"]), None)
                with contextlib.suppress(Exception):
                    await sess.send(m.Close(grant=doc["id"], reason="failed"))
            raise
        for doc in made:
            doc["status"] = "active"
            self.store.put(GRANT, doc["id"], doc)
            await self._tell_replicas(doc)
            await self.record("created", doc["id"], imsi=doc["imsi"],
                              target_port=doc["target_port"], edge=doc["edge"],
                              port=doc["port"], expires_at=doc["expires_at"],
                              policy=doc["policy"], reason=doc["reason"],
                              cidrs=doc["cidrs"], tls=doc["tls"], by=who.name or who.id)
            self._at(doc["expires_at_ts"], doc["id"])
        return made

    async def _open(self, sess: RelaySession | RemoteEdge, doc: dict[str, Any], edge: g.EdgeView,
                    auth: dict[str, Any] | None) -> None:
        """Draw a port and have the edge open it; a port the edge cannot bind is
        excluded and another drawn. Raises GrantError when the edge cannot be reached."""
        tried: set[int] = set()
        used = self._used.setdefault(edge.name, set())
        for _ in range(8):
            port = g.draw_port(edge.ports, used, exclude=tried)
            if port is None:
                raise g.GrantError("no-port", f"edge {edge.name} has no free port", 503)
            doc["port"] = port
            self.grants[doc["id"]] = doc
            used.add(port)
            self._by_port[(edge.name, port)] = doc["id"]
            try:
                ack = await sess.open(self.edge_grant(doc, auth), self.s.open_timeout)
            except (TimeoutError, ConnectionError, OSError, RuntimeError) as exc:
                self.grants.pop(doc["id"], None)
                used.discard(port)
                self._by_port.pop((edge.name, port), None)
                # a slow edge may still open it: tell it to close (no half-open listener)
                with contextlib.suppress(Exception):
                    await sess.send(m.Close(grant=doc["id"], reason="failed"))
                raise g.GrantError("edge-unreachable", f"edge {edge.name} did not open the "
                                                       f"port: {exc or 'timed out'}",
                                   503) from None
            if ack.ok:
                return
            self.grants.pop(doc["id"], None)
            used.discard(port)
            self._by_port.pop((edge.name, port), None)
            if ack.code != "port-in-use":
                raise g.GrantError("edge-failed", f"edge {edge.name}: {ack.error}", 503)
            tried.add(port)
        raise g.GrantError("no-port", f"edge {edge.name} could not bind a free port", 503)

    def edge_grant(self, doc: dict[str, Any], auth: dict[str, Any] | None = None) -> dict[str, Any]:
        """What an edge holds of a grant: the conditions, and the auth info's CA."""
        out = {k: doc[k] for k in ("id", "port", "expires_at_ts", "cidrs", "tls", "pin",
                                   "max_connections", "status", "imsi", "target_port",
                                   "inner", "device_address")}
        inner = self.store.get(RELAY, f"inner/{doc['inner']}") or {}
        out["inner_address"] = inner.get("address", "")
        out["inner_tls"] = inner.get("link_tls", True)
        if doc.get("auth_info"):
            auth = auth or self.store.get(AUTH, doc["auth_info"]) or {}
            out["ca_pem"] = auth.get("ca_pem")
        return out

    async def revoke(self, gid: str, who: TokenInfo) -> dict[str, Any]:
        doc = self.grant(gid, who)
        if doc["status"] != "active" or not await self._end(doc, "revoked"):
            status = self.grants.get(gid, doc)["status"]  # ended by another replica
            raise ApiError(409, "not-active", f"grant {gid} is already "
                                              f"{'ending' if status == 'active' else status}")
        await self.record("deleted", gid, reason="revoked", by=who.name or who.id)
        return doc

    async def extend(self, gid: str, ttl: float, who: TokenInfo) -> dict[str, Any]:
        doc = self.grant(gid, who)
        if doc["status"] != "active":
            raise ApiError(409, "not-active", f"grant {gid} is {doc['status']}")
        if not ttl > 0 or ttl > self.s.limits.max_ttl:
            raise g.GrantError("bad-ttl", f"the TTL must be above zero and at most "
                                          f"{self.s.limits.max_ttl:g}s")
        now = time.time()
        doc["expires_at_ts"] = now + ttl
        doc["expires_at"] = g.iso(now + ttl)
        self.store.put(GRANT, gid, doc)
        await self._tell_replicas(doc)
        sess = self.edges.get(doc["edge"])
        if sess is not None:
            with contextlib.suppress(Exception):
                await sess.send(m.Update(grant=self.edge_grant(doc)))
        await self.record("extended", gid, expires_at=doc["expires_at"],
                          by=who.name or who.id)
        self._at(doc["expires_at_ts"], gid)
        return doc

    async def _end(self, doc: dict[str, Any], status: str) -> bool:
        """End an active grant; False when another replica ended it first (then this
        one only follows what that one stored)."""
        if self.replicas is not None and not self.store.insert(
                GRANT_END, doc["id"], {"status": status, "by": self.replicas.name}):
            stored = self.store.get(GRANT, doc["id"])
            if stored is not None:
                await self._apply(stored, push=True)
            return False
        doc["status"] = status
        doc["ended_at_ts"] = time.time()
        self.store.put(GRANT, doc["id"], doc)
        await self._tell_replicas(doc)
        self._used.get(doc["edge"], set()).discard(doc["port"])
        if self._by_port.get((doc["edge"], doc["port"])) == doc["id"]:
            del self._by_port[(doc["edge"], doc["port"])]
        self._at(doc["ended_at_ts"] + self.s.retention, doc["id"])
        sess = self.edges.get(doc["edge"])
        if sess is not None:
            with contextlib.suppress(Exception):
                await sess.send(m.Close(grant=doc["id"], reason=status))
        return True

    # -- replicas ----------------------------------------------------------------------
    async def _tell_replicas(self, doc: dict[str, Any]) -> None:
        if self.replicas is not None:
            await self.replicas.broadcast({"op": "grant", "doc": doc})

    def _take(self, doc: dict[str, Any]) -> tuple[bool, dict[str, Any] | None]:
        """Take a grant as another replica stored it into this one's view; returns
        whether it was taken and the copy it replaced."""
        gid, edge, port = doc["id"], doc["edge"], doc["port"]
        old = self.grants.get(gid)
        if old is not None and old.get("status") in ("revoked", "expired") \
                and doc["status"] == "active":
            return False, old  # a late copy of a grant that has ended since
        self.grants[gid] = doc
        if doc["status"] == "active":
            self._used.setdefault(edge, set()).add(port)
            self._by_port[(edge, port)] = gid
            self._at(doc["expires_at_ts"], gid)
        elif doc["status"] in ("revoked", "expired"):
            self._used.get(edge, set()).discard(port)
            if self._by_port.get((edge, port)) == gid:
                del self._by_port[(edge, port)]
            self._at(doc.get("ended_at_ts", 0) + self.s.retention, gid)
        return True, old

    async def _apply(self, doc: dict[str, Any], *, push: bool = False) -> None:
        """:meth:`_take`; with ``push``, also tell an edge of this replica what changed
        (a revocation cuts its live connections now)."""
        taken, old = self._take(doc)
        gid = doc["id"]
        sess = self.edges.get(doc["edge"])
        if not taken or not push or sess is None:
            return
        with contextlib.suppress(Exception):
            if doc["status"] in ("revoked", "expired"):
                if old is None or old.get("status") not in ("revoked", "expired"):
                    await sess.send(m.Close(grant=gid, reason=doc["status"]))
            elif doc["status"] == "active" and old is not None \
                    and old.get("expires_at_ts") != doc["expires_at_ts"]:
                await sess.send(m.Update(grant=self.edge_grant(doc)))

    async def _on_replica(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        """A message of another replica (see :mod:`.replicas`)."""
        op = msg.get("op")
        if op == "grant":
            await self._apply(msg["doc"], push=True)
        elif op == "event":
            self._add_event(str(msg["grant"]), msg["event"])
            async with self.changed:
                self.changed.notify_all()
        elif op == "open":
            sess = self.edges.get(str(msg.get("edge")))
            if sess is None:
                return {"ok": False, "code": "edge-gone", "error": "edge not attached here"}
            try:
                ack = await sess.open(msg["grant"], self.s.open_timeout)
            except (TimeoutError, ConnectionError, OSError, RuntimeError) as exc:
                return {"ok": False, "code": "edge-unreachable", "error": str(exc)}
            return {"ok": ack.ok, "code": ack.code, "error": ack.error}
        elif op == "close":
            sess = self.edges.get(str(msg.get("edge")))
            if sess is not None:
                await sess.send(m.Close(grant=str(msg["grant"]), reason=str(msg["reason"])))
            return {"ok": True}
        return None

    async def resync(self) -> None:
        """After an absence from Redis: what other replicas changed is in the store."""
        for _, doc in self.store.list(GRANT):
            await self._apply(doc, push=True)

    async def _sweep(self) -> None:
        """Expire grants at their time (the edge cuts on its own clock too) and delete
        ended grants and their events after the retention time."""
        while True:
            now = time.time()
            while self._timers and self._timers[0][0] <= now:
                _, gid = heapq.heappop(self._timers)
                doc = self.grants.get(gid)
                if doc is None:
                    continue
                if doc["status"] == "active":
                    if doc["expires_at_ts"] <= now and await self._end(doc, "expired"):
                        await self.record("expired", gid)
                elif doc["status"] in ("revoked", "expired") and \
                        doc.get("ended_at_ts", 0) + self.s.retention <= now:
                    self._purge(gid)
            self._deadline = self._timers[0][0] if self._timers else now + 30
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(),
                                       max(0.01, self._deadline - time.time()))

    def _purge(self, gid: str) -> None:
        self.grants.pop(gid, None)
        self.store.delete(GRANT, gid)
        if self.replicas is not None:
            self.store.delete(GRANT_END, gid)
        for ev in self._trails.pop(gid, ()):
            self.store.delete(EVENT, f"{gid}/{ev['seq']:08d}")
        self._seqs.pop(gid, None)

    # -- relays ------------------------------------------------------------------------
    def register(self, hello: m.Hello, ws: WebSocket) -> tuple[RelaySession, m.Welcome]:
        if hello.kind == "edge":
            lo, hi = hello.ports
            if not (1 <= lo <= hi <= 65535) or not hello.public_host:
                raise ApiError(400, "bad-hello", "an edge needs --public-host and --ports")
            names: list[str] = []
        else:
            host = hello.address.rpartition(":")[0].strip("[]")
            if not host:
                raise ApiError(400, "bad-hello", "an inner relay needs its link address")
            names = [host]
        try:
            cert = self.ca.sign_csr(hello.csr.encode(), unit=hello.kind, names=names,
                                    days=self.s.cert_days)
        except ValueError as exc:
            raise ApiError(400, "bad-csr", str(exc)) from None
        sess = RelaySession(ws, hello)
        table = self.edges if hello.kind == "edge" else self.inners
        old = table.get(hello.name)
        if old is not None:
            old.lost()
        table[hello.name] = sess
        self.store.put(RELAY, f"{hello.kind}/{hello.name}", {
            "kind": hello.kind, "name": hello.name, "public_host": hello.public_host,
            "ports": list(hello.ports), "region": hello.region, "carrier": hello.carrier,
            "address": hello.address, "link_tls": hello.link_tls, "seen": time.time()})
        live: list[dict[str, Any]] = []
        if hello.kind == "edge":
            live = [self.edge_grant(d) for d in self.grants.values()
                    if d["edge"] == hello.name and d["status"] == "active"]
            self.edge_joined.set()
            if self.replicas is not None:
                asyncio.get_running_loop().create_task(self.replicas.edge_here(hello.name, {
                    "public_host": hello.public_host, "ports": list(hello.ports),
                    "region": hello.region, "carrier": hello.carrier}))
        else:
            for dev in hello.devices:
                self.store.put(DEVICE, dev.imsi, {"imsi": dev.imsi, "address": dev.address,
                                                  "inner": hello.name})
        log.info("%s %s registered%s", hello.kind, hello.name,
                 f" ({len(live)} live grants)" if hello.kind == "edge" else
                 f" ({len(hello.devices)} devices)")
        return sess, m.Welcome(cert=cert.decode(), ca=self.ca.ca_path.read_text(), grants=live)

    def unregister(self, sess: RelaySession) -> None:
        sess.lost()
        table = self.edges if sess.kind == "edge" else self.inners
        if table.get(sess.name) is sess:
            del table[sess.name]
            log.info("%s %s disconnected", sess.kind, sess.name)
            if self.replicas is not None and sess.kind == "edge":
                asyncio.get_running_loop().create_task(self.replicas.edge_gone(sess.name))
        if not self.edges:
            self.edge_joined.clear()

    async def on_message(self, sess: RelaySession, msg: m.ToManager) -> None:
        if isinstance(msg, m.Ack):
            fut = sess.pending.get(msg.req)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif isinstance(msg, m.Request):
            await sess.send(await self.answer(sess, msg))
        elif isinstance(msg, m.Event):
            if msg.event not in g.EVENTS or msg.event in ("created", "deleted", "expired",
                                                          "extended"):
                return
            if msg.grant not in self.grants:
                return
            fields = {k: v for k, v in msg.fields.items() if k not in ("event", "grant", "seq")}
            with contextlib.suppress(ValueError):
                await self.record(msg.event, msg.grant, **{sess.kind: sess.name, **fields})
        elif isinstance(msg, m.Load):
            sess.sessions, sess.bytes_per_second = msg.sessions, msg.bytes_per_second
            if self.replicas is not None and sess.name in self.replicas._edges:
                self.replicas._edges[sess.name].update(
                    sessions=msg.sessions, bytes_per_second=msg.bytes_per_second)

    async def _ticket(self, gid: str) -> str:
        """A one-time ticket that binds the edge's next dial to this relay information;
        the inner relay redeems it with its check (10 s, once). With replicas it is in
        Redis: the inner relay may be attached to another replica than the edge."""
        if self.replicas is not None:
            return await self.replicas.ticket(gid)
        now = time.time()
        if len(self._tickets) > 10_000:  # unredeemed ones (clients that went away)
            self._tickets = {t: v for t, v in self._tickets.items() if v[1] > now}
        ticket = secrets.token_urlsafe(24)
        self._tickets[ticket] = (gid, now + 10.0)
        return ticket

    async def _redeem(self, ticket: str, gid: str) -> bool:
        if self.replicas is not None:
            return await self.replicas.redeem(ticket, gid)
        found = self._tickets.pop(ticket, None) if ticket else None
        return found is not None and found[0] == gid and found[1] > time.time()

    async def answer(self, sess: RelaySession, req: m.Request) -> m.Reply:
        """Relay information for an edge (S22-S25), or an inner relay's dial check."""
        if req.op == "relay-info":
            if sess.kind != "edge":
                return m.Reply(req=req.req, ok=False, code="forbidden", error="edges only")
            if (sess.name, req.port) not in self._by_port and self.replicas is not None:
                await self.resync()  # a grant of another replica not heard of yet
            doc = self.grants.get(self._by_port.get((sess.name, req.port), ""))
            if doc is None or doc["status"] == "opening":
                return m.Reply(req=req.req, ok=False, code="no-grant",
                               error=f"no grant on port {req.port}")
            data = self.edge_grant(doc)
            data["ticket"] = await self._ticket(doc["id"])
            return m.Reply(req=req.req, ok=True, data=data)
        if sess.kind != "inner":
            return m.Reply(req=req.req, ok=False, code="forbidden", error="inner relays only")
        doc = self.grants.get(req.grant)
        if self.replicas is not None:  # the store has the latest word of every replica
            doc = self.store.get(GRANT, req.grant)
        dev = self.store.get(DEVICE, req.imsi) or {}
        why = None
        if doc is None:
            why = "no such grant"
        elif doc["status"] != "active" or doc["expires_at_ts"] <= time.time():
            why = f"grant is {doc['status'] if doc['status'] != 'active' else 'expired'}"
        elif doc["imsi"] != req.imsi or doc["target_port"] != req.target_port:
            why = f"grant is for {doc['imsi']}:{doc['target_port']}"
        elif dev.get("inner") != sess.name or dev.get("address") != req.address:
            why = f"{req.address} is not the registered address of {req.imsi} here"
        elif not await self._redeem(req.ticket, req.grant):
            why = "no valid ticket: the dial does not follow relay information for it"
        if why:
            return m.Reply(req=req.req, ok=False, code="not-granted", error=why)
        return m.Reply(req=req.req, ok=True)


# --------------------------------------------------------------------------
# The REST API
# --------------------------------------------------------------------------


class TargetIn(BaseModel):
    imsi: str = Field(max_length=15, description="SIM unique number of the device")
    port: int = Field(description="port on the device")


class GrantIn(BaseModel):
    """A connection request (S11)."""

    targets: list[TargetIn] = Field(min_length=1, max_length=64)
    ttl: float | str = Field(description="validity: seconds, or like 30s, 10m, 1h")
    cidrs: list[Annotated[str, Field(max_length=64)]] = Field(default=[], max_length=256)
    auth_info: str | None = Field(default=None, max_length=64)
    tls: bool = False
    policy: str = Field(default="random", max_length=16)
    max_connections: int = 0
    client_address: str | None = Field(default=None, max_length=64,
                                       description="for the region/carrier policies "
                                                   "(default: the caller's address)")
    carrier: str | None = Field(default=None, max_length=64)


class ExtendIn(BaseModel):
    ttl: float | str


class AuthInfoIn(BaseModel):
    """Authentication information (S1): the CA that signs client certificates, and
    optionally the one public key a client must present (PEM)."""

    ca_pem: str = Field(max_length=64 * 1024)
    pin_pem: str | None = Field(default=None, max_length=16 * 1024)


class DeviceIn(BaseModel):
    address: str = Field(max_length=255)
    inner: str = Field(max_length=64)


def _ttl(value: float | str) -> float:
    return g.parse_duration(value)


def _caller_ip(request: Request) -> str | None:
    import ipaddress

    host = request.client.host if request.client else None
    try:
        return str(ipaddress.ip_address(host or ""))
    except ValueError:
        return None


def public(doc: dict[str, Any]) -> dict[str, Any]:
    """A grant as the API shows it."""
    out = {k: doc.get(k) for k in ("id", "host", "port", "expires_at", "edge", "policy",
                                   "reason", "imsi", "target_port", "status", "cidrs",
                                   "auth_info", "tls", "max_connections", "created_at",
                                   "inner")}
    out["expires_in"] = max(0, round(doc["expires_at_ts"] - time.time(), 1))
    out["expires_at_ts"] = round(doc["expires_at_ts"], 3)
    return out


def build_app(mgr: Manager) -> Any:
    app = create_app("kakehashi on-demand manager", __version__, tokens=mgr.tokens,
                     description="Time-limited, randomly placed entry ports to devices on a "
                                 "closed network (spec 002).",
                     on_start=mgr.start, on_stop=mgr.close)
    client = Depends(require("client"))
    admin = Depends(require("admin"))
    inner_or_admin = Depends(require("inner"))

    @app.exception_handler(g.GrantError)
    async def _grant_error(_: Request, exc: g.GrantError) -> Any:
        from fastapi.responses import JSONResponse

        return JSONResponse({"error": {"code": exc.code, "message": exc.message}},
                            status_code=exc.status)

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "edges": len(mgr.edges), "inners": len(mgr.inners)}

    # -- auth infos (S1-S4)
    @app.post("/v1/auth-infos", status_code=201)
    async def add_auth_info(body: AuthInfoIn, who: TokenInfo = client) -> dict[str, Any]:
        ca_pem = g.check_ca_pem(body.ca_pem.encode())
        pin = g.pin_of_pem(body.pin_pem.encode()) if body.pin_pem else None
        aid = "a" + secrets.token_hex(6)
        mgr.store.put(AUTH, aid, {"id": aid, "ca_pem": ca_pem, "pin": pin, "owner": who.id,
                                  "created_at": g.iso(time.time())})
        return {"id": aid, "pin": pin}

    @app.get("/v1/auth-infos")
    async def list_auth_infos(who: TokenInfo = client) -> list[dict[str, Any]]:
        return [{"id": k, "pin": d.get("pin"), "created_at": d.get("created_at")}
                for k, d in mgr.auth_infos().items()
                if who.role == "admin" or d.get("owner") == who.id]

    # -- grants (S11-S15)
    @app.post("/v1/grants", status_code=201)
    async def create_grant(body: GrantIn, request: Request,
                           who: TokenInfo = client) -> dict[str, Any]:
        req = g.GrantRequest(
            targets=[(t.imsi, t.port) for t in body.targets], ttl=_ttl(body.ttl),
            cidrs=body.cidrs, auth_info=body.auth_info, tls=body.tls, policy=body.policy,
            max_connections=body.max_connections,
            client_address=body.client_address or _caller_ip(request),
            carrier=body.carrier)
        made = await mgr.create_grants(req, who)
        return {"grants": [public(d) for d in made]}

    @app.get("/v1/grants")
    async def list_grants(who: TokenInfo = client,
                          all: bool = Query(False, description="ended grants too")
                          ) -> list[dict[str, Any]]:
        return [public(d) for d in mgr.grants.values()
                if d["status"] != "opening" and (all or d["status"] == "active")
                and (who.role == "admin" or d.get("owner") == who.id)]

    @app.get("/v1/grants/{gid}")
    async def get_grant(gid: str, who: TokenInfo = client) -> dict[str, Any]:
        return public(mgr.grant(gid, who))

    @app.delete("/v1/grants/{gid}")
    async def revoke(gid: str, who: TokenInfo = client) -> dict[str, Any]:
        return public(await mgr.revoke(gid, who))

    @app.post("/v1/grants/{gid}/extend")
    async def extend(gid: str, body: ExtendIn, who: TokenInfo = client) -> dict[str, Any]:
        return public(await mgr.extend(gid, _ttl(body.ttl), who))

    @app.get("/v1/grants/{gid}/events")
    async def events(gid: str, who: TokenInfo = client, after: int = Query(0, ge=0),
                     wait: float = Query(0, ge=0, le=30)) -> list[dict[str, Any]]:
        mgr.grant(gid, who)
        found = mgr.events(gid, after)
        if found or not wait:
            return found
        deadline = time.monotonic() + wait
        async with mgr.changed:
            while not found and (left := deadline - time.monotonic()) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(mgr.changed.wait(), left)
                found = mgr.events(gid, after)
        return found

    # -- devices and relays
    @app.get("/v1/devices")
    async def devices(who: TokenInfo = client) -> list[dict[str, Any]]:
        return [{**d, "online": d.get("inner") in mgr.inners}
                for d in mgr.devices().values()]

    @app.put("/v1/devices/{imsi}")
    async def put_device(imsi: str, body: DeviceIn,
                         who: TokenInfo = inner_or_admin) -> dict[str, Any]:
        g.check_imsi(imsi)
        if who.role == "inner" and who.name and who.name != body.inner:
            raise ApiError(403, "forbidden", "an inner relay registers its own devices")
        doc = {"imsi": imsi, "address": body.address, "inner": body.inner}
        mgr.store.put(DEVICE, imsi, doc)
        return doc

    @app.get("/v1/edges")
    async def edges(who: TokenInfo = client) -> list[dict[str, Any]]:
        remote = await mgr.remote_edges()
        views = {v.name: v for v in mgr.edge_views(remote)}
        here = mgr.replicas.name if mgr.replicas is not None else None
        out = []
        for key, d in mgr.store.list(RELAY):
            if not key.startswith("edge/"):
                continue
            v = views.get(d["name"])
            out.append({"name": d["name"], "public_host": d["public_host"],
                        "ports": f"{d['ports'][0]}-{d['ports'][1]}", "region": d["region"],
                        "carrier": d["carrier"], "online": v is not None,
                        "sessions": v.sessions if v else 0,
                        "bytes_per_second": v.bytes_per_second if v else 0,
                        "free_ports": v.free if v else None,
                        # with replicas: the one holding the edge's control channel
                        "replica": (here if d["name"] in mgr.edges else
                                    remote.get(d["name"], {}).get("replica")) if v else None})
        return out

    @app.get("/v1/tokens")
    async def tokens(who: TokenInfo = admin) -> list[dict[str, Any]]:
        return [{"id": t.id, "role": t.role, "name": t.name, "created": c}
                for t, c in mgr.tokens.list()]

    # -- the relays' control channel
    @app.websocket("/v1/relays/control")
    async def control(ws: WebSocket) -> None:
        try:
            who = bearer(mgr.tokens, ws.headers, "edge", "inner")
        except ApiError as exc:
            await ws.close(code=4401 if exc.status == 401 else 4403, reason=exc.message)
            return
        await ws.accept()
        try:
            text = await asyncio.wait_for(ws.receive_text(), mgr.s.hello_timeout)
            hello = m.decode_to_manager(text)
            if not isinstance(hello, m.Hello):
                raise ApiError(400, "bad-hello", "the first message must be a hello")
            if who.role not in ("admin", hello.kind):
                raise ApiError(403, "forbidden", f"a {who.role} token cannot register "
                                                 f"an {hello.kind}")
            if who.role != "admin" and who.name and who.name != hello.name:
                raise ApiError(403, "forbidden", f"this token is for relay {who.name!r}")
            sess, welcome = mgr.register(hello, ws)
        except (ApiError, m.ProtocolError) as exc:
            code = getattr(exc, "code", "protocol")
            with contextlib.suppress(Exception):
                await ws.send_text(m.encode(m.Refused(code=code, error=str(exc))))
                await ws.close(code=4400)
            return
        except (TimeoutError, WebSocketDisconnect, KeyError):  # KeyError: not a text message
            with contextlib.suppress(Exception):
                await ws.close(code=4408)
            return
        try:
            await sess.send(welcome)
            while True:
                try:
                    msg = m.decode_to_manager(await ws.receive_text())
                except (m.ProtocolError, KeyError) as exc:  # KeyError: a binary message
                    log.warning("%s %s: %s", sess.kind, sess.name, exc)
                    await ws.close(code=4400, reason=str(exc)[:100])
                    return
                await mgr.on_message(sess, msg)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            mgr.unregister(sess)

    return app

"""The socket management server's decisions, sans-IO (spec 003, S1-S7).

:class:`Switch` holds the catalog (services registered in S1), which gateways are
online and whose they are, and the tunnels with their explicit states::

    setting --S4a+S4b--> established --close (S6)--> deleting --S7a+S7b--> deleted
       |                                                ^
       +-- one gateway fails or times out (rollback) ---+

It never touches a socket. Every method returns :class:`Action` s for the asyncio
layer to carry out: :class:`Send` a message to a gateway, :class:`Audit` a decision,
:class:`Changed` (a tunnel's state moved: wake whoever waits on it), :class:`Persist`
(a tunnel's record changed: write it to the store, or remove it once deleted).
Refusals of a user's request raise :class:`Refusal` and change nothing.

Tunnels survive a server restart: :meth:`Switch.restore` reloads the records. An
established tunnel comes back with both gateways marked offline; each gateway's new
hello says whether it still holds its half (the same reconciliation as after a
gateway's own outage): when both have, the tunnel carries connections again; a half
that is not back within the offline grace, or a gateway that no longer holds it,
rolls the tunnel back (deleted with a reason, audited). A tunnel caught half-way
(``setting`` or ``deleting``) cannot be finished without the instructions in flight,
so it is deleted at once; its gateways drop their halves when their hello is answered.

The **switch table** is each tunnel's pair (client-side gateway, server-side gateway):
a stream message from one is forwarded to the other, and only if the sender is one of
the two. The server also keeps each stream's flow-control account (bytes in flight in
each direction may not exceed the window the receiver granted), live connection
counts per service against the service's limit, and ends a stream when both
directions have ended or either side reset it.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field
from typing import Any

from kakehashi import switch
from kakehashi.core.identity import valid_name
from kakehashi.core.stream import parse_hostport
from kakehashi.switch import messages as m

ROLES = ("asp", "user", "admin")
#: how long a tunnel may stay in ``setting`` (both S4) or ``deleting`` (both S7)
SETUP_TIMEOUT = 10.0
DELETE_TIMEOUT = 10.0
#: how long a gateway may stay away before its tunnels are deleted
OFFLINE_GRACE = 60.0
#: per-user caps: defined in the package (the CLI's --help shows them without importing
#: this module), see :data:`kakehashi.switch.MAX_GATEWAYS_PER_USER`
MAX_GATEWAYS_PER_USER = switch.MAX_GATEWAYS_PER_USER
MAX_TUNNELS_PER_USER = switch.MAX_TUNNELS_PER_USER


def tunnels_key(user: str) -> str:
    """The key of a user's tunnel count in :attr:`Switch.live` (beside the services'
    connection counts, so a cluster counts both the same way; no service name holds
    a ``:``)."""
    return "tunnels:" + user


class State(enum.StrEnum):
    SETTING = "setting"
    ESTABLISHED = "established"
    DELETING = "deleting"
    DELETED = "deleted"


class Refusal(Exception):
    """A request the server refuses: HTTP ``status``, a stable ``code``, a message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


# -- actions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Send:
    gateway: str
    msg: Any
    #: a datagram: dropped rather than queued when the gateway is behind (UDP has no
    #: flow control, so a flood must not grow the server's memory or cut the link)
    droppable: bool = False


@dataclass(frozen=True)
class Audit:
    event: str
    allow: bool
    fields: dict[str, Any]


@dataclass(frozen=True)
class Changed:
    tunnel: str


@dataclass(frozen=True)
class Persist:
    """The tunnel's durable record changed (state, halves, address): store it, or
    remove it when the tunnel is deleted or gone."""

    tunnel: str


Action = Send | Audit | Changed | Persist


# -- records ---------------------------------------------------------------------------------
@dataclass
class Service:
    """S1: a server's socket information and its usage clients."""

    name: str
    owner: str
    gateway: str
    target: str
    proto: str = "tcp"
    allow: list[str] = field(default_factory=list)
    max_connections: int = 0

    def doc(self) -> dict[str, Any]:
        return {"name": self.name, "owner": self.owner, "gateway": self.gateway,
                "target": self.target, "proto": self.proto, "allow": list(self.allow),
                "max_connections": self.max_connections}


def check_service(svc: Service) -> Service:
    """The service's fields are well-formed (else Refusal 422)."""
    if not valid_name(svc.name):
        raise Refusal(422, "bad-name", "service names are 1-64 of A-Z a-z 0-9 _ . @ -")
    if not valid_name(svc.gateway):
        raise Refusal(422, "bad-gateway", "gateway names are 1-64 of A-Z a-z 0-9 _ . @ -")
    if svc.proto not in ("tcp", "udp"):
        raise Refusal(422, "bad-proto", "proto is tcp or udp")
    try:
        host, port = parse_hostport(svc.target)
    except ValueError as exc:
        raise Refusal(422, "bad-target", f"target: {exc}") from None
    if not port or len(host) > 255:
        raise Refusal(422, "bad-target", "target needs HOST and a port 1-65535")
    if len(svc.allow) > 1000 or not all(valid_name(u) or u == "*" for u in svc.allow):
        raise Refusal(422, "bad-allow", "allow is a list of user names (or *)")
    if not 0 <= svc.max_connections <= 1_000_000:
        raise Refusal(422, "bad-limit", "max_connections is 0 (no limit) to 1000000")
    return svc


def valid_for(svc: Service, user: str, role: str) -> bool:
    """S2 presentation: whether ``svc`` is a valid communication partner for ``user``."""
    return role == "admin" or svc.owner == user or user in svc.allow or "*" in svc.allow


@dataclass
class StreamRec:
    peer: str = ""
    #: bytes in flight towards the server-side gateway (a->b) and back (b->a)
    inflight_ab: int = 0
    inflight_ba: int = 0
    eof_ab: bool = False
    eof_ba: bool = False


@dataclass
class Tunnel:
    id: str
    service: str
    user: str
    client_gw: str  # the first gateway: the server-side pseudo socket (S3a)
    server_gw: str  # the second gateway: the client-side pseudo socket (S3b)
    proto: str
    listen: str
    target: str
    window: int = m.DEFAULT_WINDOW
    state: State = State.SETTING
    reason: str = ""
    address: str = ""
    created: float = 0.0
    deadline: float = 0.0
    #: req id -> (side "a"/"b", "setup"/"delete")
    reqs: dict[int, tuple[str, str]] = field(default_factory=dict)
    built: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    deleting: set[str] = field(default_factory=set)
    offline: dict[str, float] = field(default_factory=dict)
    streams: dict[int, StreamRec] = field(default_factory=dict)
    connections_total: int = 0
    #: reloaded from the store after a server restart, not yet confirmed by both halves
    restored: bool = False
    #: the server node that decides about it (several nodes on one store; "" alone)
    home: str = ""

    def gw(self, side: str) -> str:
        return self.client_gw if side == "a" else self.server_gw

    def doc(self) -> dict[str, Any]:
        """The durable record: what a restarted server needs to take the tunnel back."""
        return {"id": self.id, "service": self.service, "user": self.user,
                "client_gw": self.client_gw, "server_gw": self.server_gw,
                "proto": self.proto, "listen": self.listen, "target": self.target,
                "window": self.window, "state": self.state.value, "reason": self.reason,
                "address": self.address, "created": self.created,
                "built": sorted(self.built), "home": self.home}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Tunnel:
        """The tunnel of a stored record; KeyError, TypeError, ValueError or
        AttributeError when the record is not one (a number out of range too: an
        infinite window or a created time of 10**400 must not stop the server)."""
        try:
            return cls._from_doc(doc)
        except OverflowError as exc:
            raise ValueError(f"a number out of range: {exc}") from None

    @classmethod
    def _from_doc(cls, doc: dict[str, Any]) -> Tunnel:
        return cls(id=str(doc["id"]), service=str(doc["service"]), user=str(doc["user"]),
                   client_gw=str(doc["client_gw"]), server_gw=str(doc["server_gw"]),
                   proto=str(doc["proto"]), listen=str(doc["listen"]),
                   target=str(doc["target"]), window=int(doc["window"]),
                   state=State(doc["state"]), reason=str(doc.get("reason", "")),
                   address=str(doc.get("address", "")),
                   created=float(doc.get("created", 0.0)),
                   built={s for s in doc.get("built", []) if s in ("a", "b")},
                   home=str(doc.get("home", "")))

    def view(self) -> dict[str, Any]:
        return {"tunnel": self.id, "service": self.service, "user": self.user,
                "gateway": self.client_gw, "server_gateway": self.server_gw,
                "proto": self.proto, "listen": self.address or self.listen,
                "state": self.state.value, "reason": self.reason,
                "connections": len(self.streams), "connections_total": self.connections_total,
                "offline": sorted(self.offline), "created": self.created}


class Switch:
    """The catalog, the gateways and the tunnels; see the module docstring."""

    def __init__(self, *, setup_timeout: float = SETUP_TIMEOUT,
                 delete_timeout: float = DELETE_TIMEOUT,
                 offline_grace: float = OFFLINE_GRACE, window: int = m.DEFAULT_WINDOW,
                 max_gateways_per_user: int = MAX_GATEWAYS_PER_USER,
                 max_tunnels_per_user: int = MAX_TUNNELS_PER_USER) -> None:
        self.services: dict[str, Service] = {}
        #: gateway name -> the user it acts for (first come; persisted by the caller)
        self.gateway_owner: dict[str, str] = {}
        self.online: set[str] = set()
        self.tunnels: dict[str, Tunnel] = {}
        #: live connections per service, and tunnels not yet deleted per user (under
        #: :func:`tunnels_key`): the counts a limit is checked against
        self.live: dict[str, int] = {}
        self.max_gateways_per_user = max_gateways_per_user
        self.max_tunnels_per_user = max_tunnels_per_user
        self.setup_timeout = setup_timeout
        self.delete_timeout = delete_timeout
        self.offline_grace = offline_grace
        self.window = window
        self._req = 0

    def _next_req(self) -> int:
        self._req += 1
        return self._req

    # -- S1: registration ------------------------------------------------------------------
    def register(self, svc: Service, role: str) -> list[Action]:
        check_service(svc)
        if role not in ("asp", "admin"):
            raise Refusal(403, "forbidden", "only an asp (or admin) registers services")
        owner = self.gateway_owner.get(svc.gateway)
        if role != "admin" and owner != svc.owner:
            why = "is not known (start it first)" if owner is None else "acts for another user"
            raise Refusal(403, "gateway-not-yours", f"gateway {svc.gateway} {why}")
        old = self.services.get(svc.name)
        if old is not None and old.owner != svc.owner and role != "admin":
            raise Refusal(409, "name-taken", f"service {svc.name} belongs to another asp")
        self.services[svc.name] = svc
        return [Audit("register", True, {"service": svc.name, "by": svc.owner,
                                         "gateway": svc.gateway, "target": svc.target,
                                         "proto": svc.proto, "users": svc.allow})]

    def unregister(self, name: str, user: str, role: str) -> list[Action]:
        svc = self.services.get(name)
        if svc is None or (role != "admin" and svc.owner != user):
            raise Refusal(404, "unknown-service", f"no service {name!r} of yours")
        del self.services[name]
        actions: list[Action] = [Audit("unregister", True, {"service": name, "by": user})]
        for t in list(self.tunnels.values()):
            if t.service == name and t.state in (State.SETTING, State.ESTABLISHED):
                actions += self._delete(t, "the service was withdrawn", 0.0)
        return actions

    # -- S2: presentation ------------------------------------------------------------------
    def catalog(self, user: str, role: str, live: dict[str, int] | None = None,
                online: set[str] | None = None) -> list[dict[str, Any]]:
        """The services valid for ``user``; ``live`` (connections per service) and
        ``online`` (gateways with a link) as a cluster of nodes sees them, else this
        switch's own view."""
        live = self.live if live is None else live
        online = self.online if online is None else online
        out = []
        for svc in sorted(self.services.values(), key=lambda s: s.name):
            if not valid_for(svc, user, role):
                continue
            row = {"name": svc.name, "proto": svc.proto, "owner": svc.owner,
                   "online": svc.gateway in online,
                   "connections": live.get(svc.name, 0),
                   "max_connections": svc.max_connections}
            if role == "admin" or svc.owner == user:  # the ASP sees its socket information
                row.update(gateway=svc.gateway, target=svc.target, allow=list(svc.allow),
                           tunnels=sum(1 for t in self.tunnels.values()
                                       if t.service == svc.name
                                       and t.state is State.ESTABLISHED))
            out.append(row)
        return out

    # -- gateways --------------------------------------------------------------------------
    def gateway_hello(self, name: str, user: str, held: list[str], now: float,
                      role: str | None = None) -> tuple[m.Welcome, list[Action]]:
        """A gateway (re)connected: it acts for ``user`` (Refusal if the name is someone
        else's, or, given the caller's ``role``, a new name beyond the user's cap;
        None: the node holding the link checked that); tunnels it holds that the
        server no longer has are dropped by it."""
        owner = self.gateway_owner.get(name)
        if owner is not None and owner != user:
            raise Refusal(403, "gateway-not-yours",
                          f"gateway {name} acts for another user")
        if owner is None and role is not None:
            self.check_gateway_cap(user, role)
        self.gateway_owner[name] = user
        self.online.add(name)
        actions: list[Action] = [Audit("gateway-online", True, {"gateway": name, "user": user})]
        keep: list[str] = []
        held_set = set(held)
        for t in list(self.tunnels.values()):
            if name not in (t.client_gw, t.server_gw):
                continue
            if t.state is State.ESTABLISHED:
                if t.id in held_set:
                    t.offline.pop(name, None)
                    keep.append(t.id)
                    actions.append(Changed(t.id))
                    if t.restored and not t.offline:
                        t.restored = False
                        actions.append(Audit("tunnel-reestablished", True, {
                            "tunnel": t.id, "service": t.service, "user": t.user,
                            "listen": t.address or t.listen}))
                else:  # it restarted and lost its pseudo socket: the tunnel is gone
                    side = "a" if name == t.client_gw else "b"
                    t.offline.pop(name, None)
                    actions += self._delete(t, f"gateway {name} lost the tunnel", now,
                                            skip={side})
        return m.Welcome(name=name, user=user, tunnels=keep), actions

    def check_gateway_cap(self, user: str, role: str, owned: int | None = None) -> None:
        """Refusal if ``user`` may not own one more gateway name; ``owned``: how many
        they own where the names are kept for several nodes (else this switch's)."""
        cap = self.max_gateways_per_user
        if not cap or role == "admin":
            return
        if owned is None:
            owned = sum(1 for o in self.gateway_owner.values() if o == user)
        if owned >= cap:
            raise Refusal(403, "gateway-limit", f"user {user} has its {cap} gateways "
                          "(--max-gateways-per-user); reuse one of their names, or remove "
                          "one (DELETE /v1/gateways/NAME)")

    def remove_gateway(self, name: str, user: str, role: str) -> list[Action]:
        """Give a gateway name up (its place under the user's cap with it): only its
        owner (or an admin), only while it has no link, no service registered through
        it and no tunnel not yet deleted."""
        owner = self.gateway_owner.get(name)
        if owner is None or (role != "admin" and owner != user):
            raise Refusal(404, "unknown-gateway", f"no gateway {name!r} of yours")
        if name in self.online:
            raise Refusal(409, "gateway-online", f"gateway {name} is connected; stop it first")
        used = sorted(svc.name for svc in self.services.values() if svc.gateway == name)
        if used:
            raise Refusal(409, "gateway-in-use", f"gateway {name} serves {', '.join(used)}; "
                                                 "unregister first")
        if any(name in (t.client_gw, t.server_gw) and t.state is not State.DELETED
               for t in self.tunnels.values()):
            raise Refusal(409, "gateway-in-use", f"gateway {name} has tunnels; close them first")
        del self.gateway_owner[name]
        return [Audit("gateway-removed", True, {"gateway": name, "user": owner, "by": user})]

    def gateway_lost(self, name: str, now: float) -> list[Action]:
        """The gateway's link is gone: its setups fail, its streams are reset, its
        tunnels are marked until it returns (or :meth:`tick` deletes them)."""
        self.online.discard(name)
        actions: list[Action] = [Audit("gateway-offline", True, {"gateway": name})]
        for t in list(self.tunnels.values()):
            if name not in (t.client_gw, t.server_gw):
                continue
            sides = {s for s in ("a", "b") if t.gw(s) == name}
            if t.state is State.SETTING:
                t.failed |= sides
                actions += self._rollback(t, f"gateway {name} went offline", now)
            elif t.state is State.ESTABLISHED:
                t.offline[name] = now
                for sid in list(t.streams):
                    actions += self._end_stream(t, sid, reset_to=[s for s in ("a", "b")
                                                                  if s not in sides],
                                                reason=f"gateway {name} went offline")
                actions.append(Changed(t.id))
            elif t.state is State.DELETING:
                for s in sides:
                    t.deleting.discard(s)
                actions += self._maybe_deleted(t)
        return actions

    # -- S2 selection -> S3 ----------------------------------------------------------------
    def open_tunnel(self, user: str, role: str, service: str, gateway: str, listen: str,
                    now: float, tid: str | None = None, *, admitted: bool | None = None
                    ) -> tuple[Tunnel, list[Action]]:
        """S2 selection -> S3. ``admitted`` as for a stream's Open (:meth:`on_stream`),
        for the user's tunnel cap when a cluster keeps the count."""
        svc = self.services.get(service)
        if svc is None or not valid_for(svc, user, role):
            raise Refusal(404, "unknown-service", f"no service {service!r} for you")
        owner = self.gateway_owner.get(gateway)
        if owner is None or (owner != user and role != "admin"):
            why = "is not known" if owner is None else "acts for another user"
            raise Refusal(403, "gateway-not-yours", f"gateway {gateway} {why}")
        if gateway == svc.gateway:
            raise Refusal(422, "same-gateway", "the client-side gateway must differ from "
                                               "the service's gateway")
        try:
            host, port = parse_hostport(listen)
        except ValueError as exc:
            raise Refusal(422, "bad-listen", f"listen: {exc}") from None
        for name in (gateway, svc.gateway):
            if name not in self.online:
                raise Refusal(503, "gateway-offline", f"gateway {name} is not connected")
        cap = self.max_tunnels_per_user if role != "admin" else 0
        held = self.live.get(tunnels_key(user), 0)
        if cap and (admitted is False or (admitted is None and held >= cap)):
            raise Refusal(403, "tunnel-limit", f"user {user} has its {cap} tunnels "
                          "(--max-tunnels-per-user); close one first")
        self.live[tunnels_key(user)] = held + 1
        tid = tid or "t" + secrets.token_hex(6)
        t = Tunnel(id=tid, service=svc.name, user=user, client_gw=gateway,
                   server_gw=svc.gateway, proto=svc.proto, listen=f"{host}:{port}",
                   target=svc.target, window=self.window, created=now,
                   deadline=now + self.setup_timeout)
        self.tunnels[tid] = t
        ra, rb = self._next_req(), self._next_req()
        t.reqs[ra] = ("a", "setup")
        t.reqs[rb] = ("b", "setup")
        return t, [
            Audit("tunnel-setting", True, {"tunnel": tid, "service": svc.name, "user": user,
                                           "gateway": gateway, "server_gateway": svc.gateway,
                                           "listen": t.listen}),
            Send(gateway, m.Setup(req=ra, tunnel=tid, side="listen", proto=t.proto,
                                  address=t.listen, service=svc.name, window=t.window)),
            Send(svc.gateway, m.Setup(req=rb, tunnel=tid, side="connect", proto=t.proto,
                                      address=t.target, service=svc.name, window=t.window)),
            Changed(tid), Persist(tid),
        ]

    # -- S4 / S7 reports -------------------------------------------------------------------
    def on_done(self, gateway: str, msg: m.Done, now: float) -> list[Action]:
        t = self.tunnels.get(msg.tunnel)
        entry = t.reqs.get(msg.req) if t is not None else None
        if t is None or entry is None or t.gw(entry[0]) != gateway:
            return self._refuse(gateway, "unknown-tunnel",
                                f"no instruction {msg.req} for tunnel {msg.tunnel} here",
                                tunnel=msg.tunnel)
        del t.reqs[msg.req]
        side, kind = entry
        step = ("S4" if kind == "setup" else "S7") + side
        actions: list[Action] = [Audit(f"report-{step}", msg.ok, {
            "tunnel": t.id, "gateway": gateway, "error": msg.error or None})]
        if kind == "setup":
            if msg.ok:
                t.built.add(side)
                if side == "a":
                    t.address = msg.address or t.listen
                if t.state is State.SETTING and t.built == {"a", "b"}:
                    t.state = State.ESTABLISHED
                    actions += [Audit("tunnel-established", True, {
                        "tunnel": t.id, "service": t.service, "user": t.user,
                        "listen": t.address}), Changed(t.id), Persist(t.id)]
            else:
                t.failed.add(side)
                if t.state is State.SETTING:
                    actions += self._rollback(
                        t, f"gateway {gateway} could not set up its pseudo socket: "
                           f"{msg.error or msg.code or 'failed'}", now)
        else:
            t.deleting.discard(side)
            t.built.discard(side)
            actions += self._maybe_deleted(t)
        return actions

    def _rollback(self, t: Tunnel, reason: str, now: float) -> list[Action]:
        """All or nothing: a setup that failed on one side is undone on the other."""
        return self._delete(t, reason, now, skip=set(t.failed))

    def _delete(self, t: Tunnel, reason: str, now: float,
                skip: set[str] | frozenset[str] = frozenset()) -> list[Action]:
        """S6a/S6b to each side that may hold a pseudo socket of ``t``."""
        was = t.state
        t.state = State.DELETING
        t.reason = t.reason or reason
        t.deadline = now + self.delete_timeout
        actions: list[Action] = [Audit("tunnel-deleting", was is not State.SETTING, {
            "tunnel": t.id, "service": t.service, "user": t.user, "reason": reason})]
        for sid in list(t.streams):
            actions += self._end_stream(t, sid, reset_to=["a", "b"], reason=reason)
        for side in ("a", "b"):
            if side in skip or t.gw(side) not in self.online:
                continue
            req = self._next_req()
            t.reqs[req] = (side, "delete")
            t.deleting.add(side)
            actions.append(Send(t.gw(side), m.Delete(req=req, tunnel=t.id, reason=reason)))
        actions += [Changed(t.id), Persist(t.id)]
        return actions + self._maybe_deleted(t)

    def _maybe_deleted(self, t: Tunnel) -> list[Action]:
        if t.state is not State.DELETING or t.deleting:
            return []
        t.state = State.DELETED
        self._uncount(t)
        return [Audit("tunnel-deleted", True, {"tunnel": t.id, "reason": t.reason}),
                Changed(t.id), Persist(t.id)]

    def _uncount(self, t: Tunnel) -> None:
        key = tunnels_key(t.user)
        left = self.live.get(key, 1) - 1
        if left > 0:
            self.live[key] = left
        else:  # (a user without tunnels keeps no entry)
            self.live.pop(key, None)

    # -- S6: deletion on the user's request ------------------------------------------------
    def close_tunnel(self, user: str, role: str, tid: str, now: float) -> list[Action]:
        t = self.tunnels.get(tid)
        if t is None or (role != "admin" and t.user != user):
            raise Refusal(404, "unknown-tunnel", f"no tunnel {tid!r} of yours")
        if t.state in (State.DELETING, State.DELETED):
            return []
        return self._delete(t, f"closed by {user}", now)

    # -- time ------------------------------------------------------------------------------
    def tick(self, now: float) -> list[Action]:
        """Setups and deletions past their deadline; gateways away past the grace."""
        actions: list[Action] = []
        for t in list(self.tunnels.values()):
            if t.state is State.SETTING and now >= t.deadline:
                late = [t.gw(s) for s in ("a", "b") if s not in t.built]
                t.failed |= {s for s in ("a", "b") if s not in t.built}
                actions += self._rollback(
                    t, f"gateway {', '.join(late)} did not report in time", now)
                # a late side may still build it: tell it to delete anyway
                for side in ("a", "b"):
                    if side not in t.built and t.gw(side) in self.online:
                        req = self._next_req()
                        t.reqs[req] = (side, "delete-late")
                        actions.append(Send(t.gw(side), m.Delete(
                            req=req, tunnel=t.id, reason="setup timed out")))
            elif t.state is State.DELETING and now >= t.deadline:
                t.deleting.clear()
                t.reason += " (a gateway did not confirm deletion)"
                actions += self._maybe_deleted(t)
            elif t.state is State.ESTABLISHED and t.offline and \
                    min(t.offline.values()) + self.offline_grace <= now:
                away = ", ".join(sorted(t.offline))
                why = (f"gateway {away} did not come back after the server restarted"
                       if t.restored else f"gateway {away} stayed offline")
                actions += self._delete(t, why, now, skip={s for s in ("a", "b")
                                                           if t.gw(s) in t.offline})
        return actions

    def restore(self, records: list[tuple[str, dict[str, Any]]], now: float
                ) -> list[Action]:
        """Take back the tunnels a previous server process stored (see the module
        docstring): established ones wait for both halves to be re-reported, anything
        caught half-way is deleted with a reason. Records that do not parse are
        dropped (and audited), never half-loaded."""
        self._req = max(self._req, int(now * 1000))  # no clash with reqs before
        actions: list[Action] = []
        for key, doc in records:
            try:
                t = Tunnel.from_doc(doc)
                if t.id != key:
                    raise ValueError(f"record {key!r} holds tunnel {t.id!r}")
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                actions += [Audit("tunnel-restored", False, {
                    "tunnel": key[:64], "reason": f"bad record: {exc}"[:300]}),
                    Persist(key)]
                continue
            t.deadline = now
            self.tunnels[t.id] = t
            if t.state is State.ESTABLISHED:
                self.live[tunnels_key(t.user)] = self.live.get(tunnels_key(t.user), 0) + 1
                t.restored = True
                t.offline = {t.client_gw: now, t.server_gw: now}
                actions += [Audit("tunnel-restored", True, {
                    "tunnel": t.id, "service": t.service, "user": t.user,
                    "gateway": t.client_gw, "server_gateway": t.server_gw,
                    "listen": t.address or t.listen}), Changed(t.id)]
                continue
            was = t.state
            t.state = State.DELETED
            if was is State.SETTING:
                t.reason = "the server restarted during setup"
            elif was is State.DELETING:
                t.reason = (t.reason or "deleted") + " (finished after a server restart)"
            actions += [Audit("tunnel-deleted", True, {"tunnel": t.id, "reason": t.reason}),
                        Changed(t.id), Persist(t.id)]
        return actions

    def forget(self, before: float) -> None:
        """Drop deleted tunnels whose deadline is older than ``before``."""
        for tid in [k for k, t in self.tunnels.items()
                    if t.state is State.DELETED and t.deadline < before]:
            del self.tunnels[tid]

    # -- the switch table: streams -----------------------------------------------------------
    def _refuse(self, gateway: str, code: str, error: str, *, tunnel: str = "",
                stream: int = 0) -> list[Action]:
        return [Send(gateway, m.Error(code=code, error=error, tunnel=tunnel[:64],
                                      stream=stream)),
                Audit("refused", False, {"gateway": gateway, "code": code, "error": error,
                                         "tunnel": tunnel or None})]

    def on_stream(self, gateway: str, msg: m.StreamMsg, *,
                  admitted: bool | None = None) -> list[Action]:
        """A stream message of ``gateway``. ``admitted`` is for an Open of a service
        with a connection limit when the count is kept over a cluster: True the
        cluster counted it in, False it is at the limit, None decide from this
        switch's own count."""
        t = self.tunnels.get(msg.tunnel)
        if t is None or gateway not in (t.client_gw, t.server_gw):
            return self._refuse(gateway, "unknown-tunnel",
                                f"tunnel {msg.tunnel} is not one of gateway {gateway}",
                                tunnel=msg.tunnel, stream=msg.stream)
        side = "a" if gateway == t.client_gw else "b"
        other = "b" if side == "a" else "a"
        dest = t.gw(other)
        sid = msg.stream
        rec = t.streams.get(sid)
        if isinstance(msg, m.Open):
            if side != "a" or t.state is not State.ESTABLISHED or rec is not None:
                why = ("only the client-side gateway opens streams" if side != "a" else
                       f"tunnel is {t.state.value}" if t.state is not State.ESTABLISHED
                       else f"stream {sid} is already open")
                return [Send(gateway, m.Reset(tunnel=t.id, stream=sid, reason=why)),
                        Audit("connection", False, {"tunnel": t.id, "stream": sid,
                                                    "reason": why})]
            if t.offline:
                why = f"gateway {', '.join(t.offline)} is offline"
                return [Send(gateway, m.Reset(tunnel=t.id, stream=sid, reason=why)),
                        Audit("connection", False, {"tunnel": t.id, "reason": why})]
            svc = self.services.get(t.service)
            limit = svc.max_connections if svc else 0
            live = self.live.get(t.service, 0)
            if limit and (admitted is False or (admitted is None and live >= limit)):
                why = f"service {t.service} has its {limit} connections"
                return [Send(gateway, m.Reset(tunnel=t.id, stream=sid, reason=why)),
                        Audit("connection", False, {"tunnel": t.id, "service": t.service,
                                                    "reason": "connection limit",
                                                    "limit": limit})]
            t.streams[sid] = StreamRec(peer=msg.peer)
            t.connections_total += 1
            self.live[t.service] = live + 1
            return [Send(dest, msg), Changed(t.id),
                    Audit("connection", True, {"tunnel": t.id, "service": t.service,
                                               "user": t.user, "stream": sid,
                                               "peer": msg.peer or None,
                                               "live": live + 1})]
        if rec is None:
            if isinstance(msg, (m.Credit, m.Reset)):
                return []  # late: the stream ended meanwhile
            return [Send(gateway, m.Error(code="unknown-stream", error=f"no stream {sid} "
                                          f"in tunnel {t.id}", tunnel=t.id, stream=sid))]
        if isinstance(msg, m.Data):
            if (rec.eof_ab if side == "a" else rec.eof_ba):
                return self._violation(t, sid, gateway, "data after end of stream")
            n = len(msg.data)
            if side == "a":
                rec.inflight_ab += n
                over = rec.inflight_ab > t.window
            else:
                rec.inflight_ba += n
                over = rec.inflight_ba > t.window
            if over and t.proto == "tcp":
                return self._violation(t, sid, gateway, "flow-control window overrun")
            if t.proto == "udp":  # datagrams are not flow-controlled
                rec.inflight_ab = rec.inflight_ba = 0
                return [Send(dest, msg, droppable=True)]
            return [Send(dest, msg)]
        if isinstance(msg, m.Credit):
            if side == "a":  # a took bytes that b sent
                rec.inflight_ba = max(0, rec.inflight_ba - msg.n)
            else:
                rec.inflight_ab = max(0, rec.inflight_ab - msg.n)
            return [Send(dest, msg)]
        if isinstance(msg, m.Eof):
            if side == "a":
                rec.eof_ab = True
            else:
                rec.eof_ba = True
            actions: list[Action] = [Send(dest, msg)]
            if rec.eof_ab and rec.eof_ba:
                actions += self._end_stream(t, sid, reset_to=[], reason="")
            return actions
        # Reset
        return self._end_stream(t, sid, reset_to=[other], reason=msg.reason)

    def _violation(self, t: Tunnel, sid: int, gateway: str, why: str) -> list[Action]:
        return self._refuse(gateway, "flow-control", why, tunnel=t.id, stream=sid) + \
            self._end_stream(t, sid, reset_to=["a", "b"], reason=why)

    def _end_stream(self, t: Tunnel, sid: int, *, reset_to: list[str],
                    reason: str) -> list[Action]:
        if t.streams.pop(sid, None) is None:
            return []
        self.live[t.service] = max(0, self.live.get(t.service, 1) - 1)
        actions: list[Action] = [Changed(t.id)]
        for side in reset_to:
            if t.gw(side) in self.online:
                actions.append(Send(t.gw(side), m.Reset(tunnel=t.id, stream=sid,
                                                        reason=reason[:500])))
        return actions

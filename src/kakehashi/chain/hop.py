"""A proxy's side of the setup as sans-IO state machines (spec 004, Figs. 8 and 11).

* :class:`RequesterSide` — the control connection from the requester (a client or the
  previous proxy): challenge (602/902), check of the answer, then the request and the
  decisions that follow it in this order: who may ask for whom, access control (claim 6),
  the route (604/905). It yields an :class:`Admitted` or raises :class:`Refuse`.
* :class:`NextHop` — recursive mode, this proxy asking the next one (605-611): it
  authenticates as itself, forwards the request under a fresh request identifier and
  accepts only the Reply that carries it (the Fig. 14(b) fix).
* :class:`RelayFilter` — iterative mode, this proxy relaying the client's messages to the
  next proxies (909-917): requests get this proxy's server-facing endpoint, replies must
  answer a request that was relayed, and the first one gives area 3142 (the next P4).
* :class:`EndToEnd` — the last proxy's authentication of the client through the proxies
  between (recursive mode with encryption, claim 7).

None of them touches a socket: the asyncio layer (:mod:`kakehashi.chain.proxy`) moves
their messages, allocates the ports and writes :attr:`RequesterSide.audit` to the audit
log. Every refusal names this proxy, except a refusal from further down, passed up as is.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from kakehashi.chain import messages as m
from kakehashi.chain.setup import E2E_PURPOSE, HOP_PURPOSE
from kakehashi.chain.tables import Acl, Hop, Routes
from kakehashi.core.crypto import AuthFailed, MutualAuth


class Refuse(Exception):
    """End the session with ``msg`` (sent to the requester, then the connection is cut)."""

    def __init__(self, msg: m.Refused) -> None:
        super().__init__(msg.describe())
        self.msg = msg


def refusal(hop: str, reason: str, text: str, rid: int = 0) -> Refuse:
    return Refuse(m.Refused(rid, hop, reason, text[:400]))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Admitted:
    """A request that passed authentication, access control and the route."""

    request: m.Request
    peer: str  #: the authenticated neighbour ID
    origin: m.Endpoint  #: the client's address and data port, as the first proxy saw it
    direct: bool  #: the peer is the client itself (its authentication can key encryption)
    next_hop: Hop | None  #: None: this is the last hop (612-614 / 918-920)


@dataclass
class RequesterSide:
    name: str
    keys: dict[str, bytes]
    acl: Acl
    routes: Routes
    peer_ip: str  #: the address the requester's control connection comes from
    state: str = "answer"
    admitted: Admitted | None = None
    #: decisions to write to the audit log: (event, allow, fields)
    audit: list[tuple[str, bool, dict[str, Any]]] = field(default_factory=list)
    rid: int = 0
    #: the requester answered through relaying proxies (iterative mode)
    relayed: bool = False

    @property
    def sealing(self) -> bool:
        """Whether later messages on this connection are sealed: the requester
        authenticated on it directly (a relayed client's connection is the proxy's)."""
        return self.auth.done and not self.relayed

    def __post_init__(self) -> None:
        self.auth = MutualAuth("responder", self.name, self.keys, HOP_PURPOSE)

    def start(self) -> m.Challenge:
        return m.Challenge(*self.auth.challenge())

    def _refuse(self, reason: str, text: str) -> Refuse:
        return refusal(self.name, reason, text, self.rid)

    def receive(self, msg: m.Message) -> list[m.Message]:
        if self.state == "answer" and isinstance(msg, m.Answer):
            try:
                proof = self.auth.check_answer(msg.id, msg.nonce, msg.mac,
                                               m.RELAYED if msg.relayed else b"")
            except AuthFailed as exc:
                self.audit.append(("authenticate", False, {"id": msg.id, "why": str(exc)}))
                raise self._refuse("authentication", f"{self.name} could not authenticate "
                                                     f"{msg.id!r}: {exc}") from None
            self.audit.append(("authenticate", True, {"id": msg.id}))
            self.relayed = msg.relayed
            self.state = "request"
            return [m.Proof(proof)]
        if self.state == "request" and isinstance(msg, m.Request):
            self.rid = msg.rid
            self.admitted = self.admit(msg)
            self.state = "admitted"
            return []
        want = {"answer": "an answer to the challenge", "request": "a relay request"}.get(
            self.state, "nothing more during setup")
        raise self._refuse("protocol", f"expected {want}, got {type(msg).__name__.lower()}")

    def who(self, peer: str, req: m.Request) -> tuple[m.Endpoint, bool]:
        """Whom the request is for, and whether the authenticated peer is the client.

        With no ``via``, the peer is the client itself and must be the user it names;
        its origin is the address its connection comes from. Otherwise a proxy that
        authenticated as the last ``via`` entry vouches for the user (recursive mode),
        or the client authenticated itself through relaying proxies (iterative mode);
        a peer that is itself a user of the ACL cannot speak for others.
        """
        if self.relayed and not req.via:
            raise self._refuse("protocol", "an answer through relays but a request that "
                                           "no proxy relayed")
        if not req.via:
            if peer != req.user:
                raise self._refuse("access", f"authenticated as {peer!r} but asks for user "
                                             f"{req.user!r}")
            return m.Endpoint(self.peer_ip, req.requester.port), True
        if req.origin is None:
            raise self._refuse("protocol", "a forwarded request without its origin")
        if peer == req.user:
            if not self.relayed:  # on its own connection, a client cannot name an origin
                raise self._refuse("protocol", f"{peer!r} answered directly but its request "
                                               "says it was relayed")
            return req.origin, True
        if peer == req.via[-1] and peer not in self.acl.users:
            return req.origin, False
        raise self._refuse("access", f"{peer!r} may not forward requests for {req.user!r}")

    def admit(self, req: m.Request) -> Admitted:
        peer = self.auth.peer_id or ""
        origin, direct = self.who(peer, req)
        # claim 6: access control right after (and depending on) authentication
        if not self.acl.allows(req.user, origin.host, origin.port):
            self.audit.append(("access", False, {"user": req.user, "origin": str(origin),
                                                 "by": peer}))
            raise self._refuse("access", f"{self.name}'s access control does not admit user "
                                         f"{req.user!r} from {origin}")
        self.audit.append(("access", True, {"user": req.user, "origin": str(origin),
                                            "by": peer}))
        found, hop = self.routes.lookup(req.server.host)  # 604/905
        if not found:
            raise self._refuse("route", f"{self.name} has no route to {req.server.host}")
        if len(req.via) >= m.MAX_HOPS - 1:
            raise self._refuse("route", f"more than {m.MAX_HOPS} hops")
        if hop is not None and (hop.name == self.name or hop.name in req.via):
            raise self._refuse("route", f"{self.name}: the route to {req.server.host} loops "
                                        f"back to {hop.name}")
        return Admitted(req, peer, origin, direct, hop)


class NextHop:
    """605-611: authenticate with the next proxy as this proxy and ask it in turn."""

    def __init__(self, name: str, keys: dict[str, bytes], hop: Hop, admitted: Admitted,
                 requester: m.Endpoint) -> None:
        self.name, self.hop, self.admitted, self.requester = name, hop, admitted, requester
        self.auth = MutualAuth("initiator", name, keys, HOP_PURPOSE)
        self.state = "challenge"
        self.rid = secrets.randbits(63)
        self.reply: m.Reply | None = None

    def _refuse(self, reason: str, text: str) -> Refuse:
        return refusal(self.name, reason, text, self.admitted.request.rid)

    def receive(self, msg: m.Message) -> list[m.Message]:
        if isinstance(msg, m.Refused):  # the next hop (or one after it) refused: pass it up
            raise Refuse(m.Refused(self.admitted.request.rid, msg.hop, msg.reason, msg.text))
        if self.state == "challenge" and isinstance(msg, m.Challenge):
            if msg.hop != self.hop.name:
                raise self._refuse("next-hop", f"the next hop at {self.hop.host}:"
                                               f"{self.hop.port} says it is {msg.hop!r}, the "
                                               f"route expects {self.hop.name!r}")
            try:
                answer = m.Answer(*self.auth.answer(msg.hop, msg.nonce))
            except AuthFailed as exc:
                raise self._refuse("next-hop", f"{self.name}: {exc}") from None
            self.state = "proof"
            return [answer]
        if self.state == "proof" and isinstance(msg, m.Proof):
            try:
                self.auth.check_proof(msg.mac)
            except AuthFailed as exc:
                raise self._refuse("authentication", f"{self.name}: {exc}") from None
            req = self.admitted.request
            self.state = "reply"
            return [m.Request(rid=self.rid, server=req.server, requester=self.requester,
                              user=req.user, mode="recursive", encrypt=req.encrypt,
                              via=[*req.via, self.name], origin=self.admitted.origin)]
        if self.state == "reply" and isinstance(msg, m.Reply):
            if msg.rid != self.rid:  # response recognition: only the answer to our request
                raise self._refuse("protocol", f"{self.hop.name} answered another request")
            self.reply = msg
            self.state = "done"
            return []
        raise self._refuse("next-hop", f"{self.hop.name} sent {type(msg).__name__.lower()} "
                                       f"while {self.name} waited for its {self.state}")

    def answer_up(self, near: m.Endpoint) -> m.Reply:
        """610-611: this proxy's P2 for the requester, the last hop's P5 as received."""
        assert self.reply is not None
        r = self.reply
        return m.Reply(self.admitted.request.rid, self.name, near, r.far, complete=True,
                       path=[self.name, *r.path][: m.MAX_HOPS], challenge=r.challenge,
                       max_payload=r.max_payload)


class RelayFilter:
    """909-917: what an iterative-mode proxy lets through between the client and the
    proxies after it, and what it learns from the first reply (area 3142)."""

    def __init__(self, name: str, far: m.Endpoint, origin: m.Endpoint) -> None:
        self.name, self.far, self.origin = name, far, origin
        self.outstanding: set[int] = set()
        self.replies = 0  # the loop counter of 908/916

    def from_requester(self, msg: m.Message) -> m.Message:
        if isinstance(msg, m.Request):  # relayed onward with this proxy as the requester
            self.outstanding.add(msg.rid)
            return m.Request(rid=msg.rid, server=msg.server, requester=self.far, user=msg.user,
                             mode=msg.mode, encrypt=msg.encrypt,
                             via=[*msg.via, self.name][: m.MAX_HOPS], origin=self.origin)
        if isinstance(msg, m.Answer | m.Extend | m.Relay):
            return msg
        raise refusal(self.name, "protocol", f"unexpected {type(msg).__name__.lower()}")

    def from_next(self, msg: m.Message) -> tuple[m.Message, m.Endpoint | None]:
        """The message to pass up, and the next proxy's P4 when this is its first reply."""
        if isinstance(msg, m.Reply):
            if msg.rid not in self.outstanding:  # response recognition (Fig. 14(b))
                raise refusal(self.name, "protocol", "the next hop answered a request this "
                                                     "proxy did not relay")
            self.outstanding.discard(msg.rid)
            self.replies += 1
            return msg, (msg.near if self.replies == 1 else None)  # 912/913
        if isinstance(msg, m.Challenge | m.Proof | m.Refused | m.Relay):
            return msg, None
        raise refusal(self.name, "protocol", f"unexpected {type(msg).__name__.lower()} from "
                                             "the next hop")


class EndToEnd:
    """The last proxy authenticates the client through the proxies between (claim 7)."""

    def __init__(self, name: str, keys: dict[str, bytes], user: str) -> None:
        self.name, self.user = name, user
        self.auth = MutualAuth("responder", name, keys, E2E_PURPOSE)
        self.done = False

    def challenge(self) -> m.Challenge:
        return m.Challenge(*self.auth.challenge())

    def receive(self, msg: m.Message) -> m.Relay:
        """The answer to send back; ``done`` says whether it authenticated (a refusal
        ends the session after it is sent)."""
        if self.done or not (isinstance(msg, m.Relay) and isinstance(msg.body, m.Answer)):
            raise refusal(self.name, "protocol", f"unexpected {type(msg).__name__.lower()} in "
                                                 "an established session")
        body = msg.body
        try:
            if body.id != self.user:
                raise AuthFailed(f"end-to-end answer from {body.id!r}, the session is "
                                 f"{self.user!r}'s")
            proof = self.auth.check_answer(body.id, body.nonce, body.mac)
        except AuthFailed as exc:
            return m.Relay(m.Refused(0, self.name, "authentication", f"{self.name}: {exc}"[:400]))
        self.done = True
        return m.Relay(m.Proof(proof))

"""A proxy's side of the setup as sans-IO state machines (spec 004, Figs. 8 and 11).

* :class:`RequesterSide` — the control connection from the requester (a client or the
  previous proxy): challenge (602/902), check of the answer, then the request and the
  decisions that follow it in this order: who may ask for whom, access control (claim 6),
  the route (604/905). In iterative mode the client behind a neighbour proxy
  authenticates here as well, through it, and its request arrives sealed end to end.
  It yields an :class:`Admitted` or raises :class:`Refuse`.
* :class:`NextHop` — this proxy asking the next one (605-611, 906-911): it authenticates
  as itself, sends the request under a fresh request identifier and accepts only the
  Reply that carries it (the Fig. 14(b) fix).
* :class:`RelayFilter` — iterative mode, this proxy between the client and the next
  proxies (909-917): a :class:`NextHop` for its own part, then only the client's
  end-to-end messages pass, and the next proxy's Reply gives area 3142 (the next P4).
* :class:`EndToEnd` — the last proxy's authentication of the client through the proxies
  between (recursive mode with encryption, claim 7).

None of them touches a socket: the asyncio layer (:mod:`kakehashi.chain.proxy`) moves
their messages, allocates the ports and writes :attr:`RequesterSide.audit` to the audit
log. Every refusal names this proxy, except a refusal from further down, passed up as is.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from kakehashi.chain import messages as m
from kakehashi.chain.setup import E2E_PURPOSE, HOP_PURPOSE
from kakehashi.chain.tables import Acl, Hop, Routes
from kakehashi.core import wire
from kakehashi.core.crypto import AuthFailed, ControlChannel, ControlError, MutualAuth


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
    #: the client's own authentication with this proxy (directly, or through relays in
    #: iterative mode), which can key encryption; None when a proxy vouches for it
    client_auth: MutualAuth | None
    next_hop: Hop | None  #: None: this is the last hop (612-614 / 918-920)

    @property
    def direct(self) -> bool:
        """Whether the client authenticated with this proxy itself."""
        return self.client_auth is not None


@dataclass
class RequesterSide:
    """602/902 and what follows, for one requester's control connection.

    The requester (the client, or the neighbour proxy before) authenticates on the
    connection itself, which is sealed from then on. A neighbour proxy's Request in
    iterative mode is its own statement (its data endpoint, ``via``, the client's
    origin as the first proxy saw it); the client then authenticates here too, through
    the proxies between (``Relay`` messages, step 1005), and sends its own Request
    ``Sealed`` end to end with the key of that exchange. Its answers go back the same
    way; the neighbour gets a plain Reply with this proxy's P4 (910-913).
    """

    name: str
    keys: dict[str, bytes]
    acl: Acl
    routes: Routes
    peer_ip: str  #: the address the requester's control connection comes from
    #: the IDs that may forward requests for users (the proxies before this one); empty:
    #: any key holder that is no user of an ACL without a wildcard
    forwarders: frozenset[str] = frozenset()
    state: str = "answer"
    admitted: Admitted | None = None
    #: decisions to write to the audit log: (event, allow, fields)
    audit: list[tuple[str, bool, dict[str, Any]]] = field(default_factory=list)
    rid: int = 0
    #: iterative mode: the neighbour proxy's Request, while the client authenticates
    vouched: m.Request | None = None
    #: iterative mode: the client's authentication through the proxies between, and the
    #: channel that seals what this proxy and the client exchange end to end
    client_auth: MutualAuth | None = None
    channel: ControlChannel | None = None

    @property
    def sealing(self) -> bool:
        """Whether later messages on this connection are sealed (after the Proof)."""
        return self.auth.done

    def __post_init__(self) -> None:
        self.auth = MutualAuth("responder", self.name, self.keys, HOP_PURPOSE)

    def start(self) -> m.Challenge:
        return m.Challenge(*self.auth.challenge())

    def _refuse(self, reason: str, text: str) -> Refuse:
        return refusal(self.name, reason, text, self.rid)

    def receive(self, msg: m.Message) -> list[m.Message]:
        if self.state == "answer" and isinstance(msg, m.Answer) and msg.relayed:
            raise self._refuse("protocol", "a relayed answer on the requester's own "
                                           "connection")
        if self.state == "answer" and isinstance(msg, m.Answer):
            try:
                proof = self.auth.check_answer(msg.id, msg.nonce, msg.mac)
            except AuthFailed as exc:
                self.audit.append(("authenticate", False, {"id": msg.id, "why": str(exc)}))
                raise self._refuse("authentication", f"{self.name} could not authenticate "
                                                     f"{msg.id!r}: {exc}") from None
            self.audit.append(("authenticate", True, {"id": msg.id}))
            self.state = "request"
            return [m.Proof(proof)]
        if self.state == "request" and isinstance(msg, m.Request):
            self.rid = msg.rid
            if msg.mode == "iterative" and self.vouches(self.auth.peer_id or "", msg):
                # 1005: the client authenticates with this proxy itself, through the relays
                self.vouched = msg
                self.client_auth = MutualAuth("responder", self.name, self.keys, HOP_PURPOSE)
                self.state = "client-answer"
                return [m.Relay(m.Challenge(*self.client_auth.challenge()))]
            self.admitted = self.admit(msg)
            self.state = "admitted"
            return []
        if self.state == "client-answer" and isinstance(msg, m.Relay) \
                and isinstance(msg.body, m.Answer) and msg.body.relayed:
            return [m.Relay(self._check_client(msg.body))]
        if self.state == "client-request" and isinstance(msg, m.Sealed):
            req = self.open(msg)
            if not isinstance(req, m.Request):
                raise self._refuse("protocol", f"expected the client's relay request, got "
                                               f"{type(req).__name__.lower()}")
            self.admitted = self.admit(self._combine(req))
            self.state = "admitted"
            return []
        want = {"answer": "an answer to the challenge", "request": "a relay request",
                "client-answer": "the client's relayed answer",
                "client-request": "the client's sealed request"}.get(
            self.state, "nothing more during setup")
        raise self._refuse("protocol", f"expected {want}, got {type(msg).__name__.lower()}")

    def _check_client(self, answer: m.Answer) -> m.Proof:
        assert self.client_auth is not None and self.vouched is not None
        user = self.vouched.user
        try:
            if answer.id != user:
                raise AuthFailed(f"the relayed answer is from {answer.id!r}, the request is "
                                 f"{user!r}'s")
            proof = self.client_auth.check_answer(answer.id, answer.nonce, answer.mac,
                                                  m.RELAYED)
        except AuthFailed as exc:
            self.audit.append(("authenticate", False, {"id": answer.id, "why": str(exc),
                                                       "relayed": True}))
            raise self._refuse("authentication", f"{self.name} could not authenticate "
                                                 f"{answer.id!r}: {exc}") from None
        self.audit.append(("authenticate", True, {"id": answer.id, "relayed": True}))
        self.channel = ControlChannel.after(self.client_auth)
        self.state = "client-request"
        return m.Proof(proof)

    def _combine(self, req: m.Request) -> m.Request:
        """The client's sealed request with the neighbour's part (its data endpoint, the
        path so far, the origin): each side vouches for what only it knows."""
        v = self.vouched
        assert v is not None
        if (req.user, req.server, req.encrypt, req.mode) != (v.user, v.server, v.encrypt,
                                                             v.mode):
            raise self._refuse("protocol", f"the client's request and {v.via[-1]}'s "
                                           "disagree (user, server, encryption or mode)")
        return m.Request(rid=req.rid, server=req.server, requester=v.requester, user=req.user,
                         mode=req.mode, encrypt=req.encrypt, via=v.via, origin=v.origin,
                         wait_ms=req.wait_ms)

    def open(self, msg: m.Message) -> m.Message:
        """A message from the client through the relays: it must be sealed end to end."""
        if self.channel is None or not isinstance(msg, m.Sealed):
            raise self._refuse("protocol", f"unexpected {type(msg).__name__.lower()} from "
                                           f"{self.auth.peer_id}")
        try:
            return m.unseal(self.channel, msg)
        except ControlError as exc:
            raise self._refuse("integrity", f"{self.name}: a control message from "
                                            f"{self.vouched.user if self.vouched else '?'} "
                                            f"through {self.auth.peer_id} was refused: "
                                            f"{exc}") from None
        except wire.WireError as exc:
            raise self._refuse("protocol", f"{self.name}: {exc}") from None

    def to_requester(self, msg: m.Message) -> list[m.Message]:
        """What to send for ``msg`` to the client: as is on its own connection; through
        relays, sealed end to end, and a Reply also plainly to the neighbour (its P4)."""
        if self.channel is None:
            return [msg]
        out: list[m.Message] = []
        if isinstance(msg, m.Reply):
            out.append(m.Reply(self.rid, msg.hop, msg.near, msg.far, msg.complete,
                               path=msg.path, max_payload=msg.max_payload))
        return [*out, m.seal(self.channel, msg)]

    def vouches(self, peer: str, req: m.Request) -> bool:
        """Whether ``peer`` speaks for the request's user as the proxy before: it is the
        last ``via`` entry and a forwarder - listed in ``forwarders``, or, without that
        list, no user of the ACL. Under a wildcard ACL every key holder may be a user
        (iterative clients hold a key for each proxy), and a user posing as a forwarder
        would choose the user and the origin the ACL and the bounds check: then only
        listed IDs forward."""
        if not req.via or peer != req.via[-1]:
            return False
        if self.forwarders:
            return peer in self.forwarders
        users = self.acl.users
        return peer not in users and "*" not in users

    def who(self, peer: str, req: m.Request) -> m.Endpoint:
        """Whom the request is for, as the address the ACL checks.

        With no ``via``, the peer is the client itself and must be the user it names;
        its origin is the address its connection comes from. Otherwise the proxy before
        vouches for the origin (the client's address as the first proxy saw it): alone in
        recursive mode, beside the client's own relayed authentication in iterative mode.
        """
        if not req.via:
            if peer != req.user:
                raise self._refuse("access", f"authenticated as {peer!r} but asks for user "
                                             f"{req.user!r}")
            return m.Endpoint(self.peer_ip, req.requester.port)
        if req.origin is None:
            raise self._refuse("protocol", "a forwarded request without its origin")
        if self.vouches(peer, req):
            return req.origin
        raise self._refuse("access", f"{peer!r} may not forward requests for {req.user!r} "
                                     "(only the IDs in forwarders may; without that list, "
                                     "IDs that are no user of an ACL without a wildcard)")

    def admit(self, req: m.Request) -> Admitted:
        peer = self.auth.peer_id or ""
        origin = self.who(peer, req)
        client_auth = self.client_auth if self.client_auth is not None else (
            self.auth if not req.via else None)
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
        return Admitted(req, peer, origin, client_auth, hop)


class NextHop:
    """605-611 / 906-911: authenticate with the next proxy as this proxy and send it the
    request under a fresh request identifier, accepting only the Reply that carries it
    (the Fig. 14(b) fix). In iterative mode the request says so, and the next proxy
    authenticates the client as well before it answers."""

    def __init__(self, name: str, keys: dict[str, bytes], hop: Hop, admitted: Admitted,
                 requester: m.Endpoint,
                 mode: Literal["recursive", "iterative"] = "recursive") -> None:
        self.name, self.hop, self.admitted, self.requester = name, hop, admitted, requester
        self.mode = mode
        self.auth = MutualAuth("initiator", name, keys, HOP_PURPOSE)
        self.state = "challenge"
        self.rid = secrets.randbits(63)
        self.reply: m.Reply | None = None
        #: how long this proxy will still wait for the next hop's Reply, in ms (0: not
        #: said), set by the caller before each :meth:`receive`: the request says so
        self.wait_ms = 0

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
                              user=req.user, mode=self.mode, encrypt=req.encrypt,
                              via=[*req.via, self.name], origin=self.admitted.origin,
                              wait_ms=self.wait_ms)]
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


@dataclass(frozen=True)
class Step:
    """What a relaying proxy does with one message: send ``down`` to the next proxy,
    ``up`` to the requester, and record ``p4`` in area 3142 (912/913) when set."""

    down: list[m.Message] = field(default_factory=list)
    up: list[m.Message] = field(default_factory=list)
    p4: m.Endpoint | None = None


class RelayFilter:
    """906-917: an iterative-mode proxy between the client and the proxies after it.

    It authenticates with the next proxy as itself and sends it its own part of the
    request (:class:`NextHop`, mode ``iterative``: its server-facing endpoint, ``via``,
    the client's origin), sealed on that connection like every message after it. Then
    it passes along, unread, what the client and the later proxies exchange end to end
    (``Relay`` for their authentication, ``Sealed`` after it) and nothing else; the next
    proxy's one plain Reply to its own request gives area 3142 (the next P4)."""

    def __init__(self, name: str, keys: dict[str, bytes], hop: Hop, admitted: Admitted,
                 far: m.Endpoint) -> None:
        self.name = name
        self.next = NextHop(name, keys, hop, admitted, far, mode="iterative")
        #: the next proxy's challenge for the client went up: from then on the client
        #: talks to that proxy (this one's refusals can no longer be sealed for it)
        self.client_moved_on = False

    @property
    def sealing(self) -> bool:
        """Whether the connection to the next proxy is sealed from now on."""
        return self.next.auth.done

    @property
    def authenticating(self) -> bool:
        """This proxy and the next are authenticating each other (a bounded wait)."""
        return self.next.state in ("challenge", "proof")

    def lost(self, why: str) -> Refuse | None:
        """The next proxy's connection ended, or it stayed silent while authenticating:
        while the setup through it is incomplete, a refusal naming it (the next hop is
        down); after, None (the session just ends)."""
        if self.next.state == "done":
            return None
        return refusal(self.name, "next-hop", f"{self.name}: {self.next.hop.name} {why} "
                                              "during setup", self.next.admitted.request.rid)

    def from_next(self, msg: m.Message) -> Step:
        if self.next.state in ("challenge", "proof") or isinstance(msg, m.Refused) \
                or (isinstance(msg, m.Reply) and self.next.state == "reply"):
            down = self.next.receive(msg)  # also: a refusal is passed up as a Refuse
            p4 = self.next.reply.near if isinstance(msg, m.Reply) and self.next.reply else None
            return Step(down=down, p4=p4)
        if isinstance(msg, m.Sealed) or (isinstance(msg, m.Relay) and
                                         isinstance(msg.body, m.Challenge | m.Proof)):
            if isinstance(msg, m.Relay) and isinstance(msg.body, m.Challenge):
                self.client_moved_on = True
            return Step(up=[msg])
        raise refusal(self.name, "protocol", f"unexpected {type(msg).__name__.lower()} from "
                                             f"{self.next.hop.name}",
                      self.next.admitted.request.rid)

    def from_requester(self, msg: m.Message) -> m.Message:
        if self.next.state in ("reply", "done") and (
                isinstance(msg, m.Sealed) or (isinstance(msg, m.Relay) and
                                              isinstance(msg.body, m.Answer))):
            return msg
        raise refusal(self.name, "protocol", f"unexpected {type(msg).__name__.lower()} from "
                                             "the requester while relaying",
                      self.next.admitted.request.rid)


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

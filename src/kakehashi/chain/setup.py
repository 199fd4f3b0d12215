"""The client's setup procedure as a sans-IO state machine (both embodiments).

:class:`ClientSetup` takes the messages the first proxy sends on the control connection
and returns what to send back; the asyncio layer (``chain forward``) only moves them.

* recursive (Fig. 7, steps 501-511): authenticate with the first proxy (505), send the
  relay request (506), receive the first proxy's port for the client (507, area 2141)
  and the last proxy's server-facing port (508, area 2142) in one Reply;
* iterative (Fig. 10, steps 801-815): the same with the first proxy, then, while the
  Reply does not say ``complete`` (812), ask the current last proxy to extend the path
  (:class:`~kakehashi.chain.messages.Extend`), authenticate with the new proxy through
  the ones already built (its challenge and proof arrive, and the answer leaves, in
  :class:`~kakehashi.chain.messages.Relay` messages), and send the request again (807)
  sealed end to end with the key of that exchange, as everything after it both ways
  (:class:`~kakehashi.chain.messages.Sealed`: the proxies between cannot alter it);
  2141 is taken from the first Reply (808/809), 2142 from every Reply (810), so it ends
  as the last hop's P5.

With ``encrypt``, the datagram keys come from the client's authentication with the
last proxy (claim 7): in iterative mode that is the last exchange of the loop; in
recursive mode the last proxy's challenge comes back in the Reply and the exchange
runs end to end in :class:`~kakehashi.chain.messages.Relay` messages.

Every Reply must carry the identifier of the request it answers; anything else is a
protocol error (the spec's Fig. 14(b) failure is a reply taken for another's).
"""

from __future__ import annotations

import secrets
from typing import Literal

from kakehashi.chain import messages as m
from kakehashi.core import wire
from kakehashi.core.crypto import AuthFailed, ControlChannel, ControlError, MutualAuth

HOP_PURPOSE = b"kakehashi-chain-hop"
E2E_PURPOSE = b"kakehashi-chain-e2e"


class SetupFailed(Exception):
    """The chain could not be built; ``hop`` names the proxy that refused (or failed).

    ``reported_by`` is whose word that is: the refusing hop's own (``verified``: it came
    on that hop's connection, or sealed end to end by it) or the first proxy's, which
    passed on a refusal made further down. In recursive mode every refusal by a later
    hop is of the second kind: each link it crossed is authenticated and sealed, so no
    one outside the chain can forge or alter it, but the client shares no key with the
    later hops and cannot tell a hop's refusal from one a proxy between made up in its
    name. In iterative mode the hop being extended seals its refusals end to end, and a
    plain one in its name is refused as an integrity failure."""

    def __init__(self, hop: str, reason: str, text: str, *,
                 reported_by: str | None = None) -> None:
        self.hop, self.reason, self.text = hop, reason, text
        self.reported_by = reported_by or hop
        note = "" if self.verified else f" (reported by {self.reported_by}, not " \
                                        f"authenticated by {hop})"
        super().__init__(f"refused by {hop}: {reason}: {text}{note}")

    @property
    def verified(self) -> bool:
        """Whether the refusing hop itself vouches for this refusal."""
        return self.reported_by == self.hop


State = Literal["challenge", "proof", "reply", "e2e-proof", "done"]


class ClientSetup:
    def __init__(self, user: str, keys: dict[str, bytes], server: m.Endpoint,
                 requester: m.Endpoint, *, mode: Literal["recursive", "iterative"] = "recursive",
                 encrypt: bool = False, max_hops: int = m.MAX_HOPS,
                 expect_first: str | None = None) -> None:
        self.user = user
        self.keys = keys
        self.server = server
        self.requester = requester
        self.mode = mode
        self.encrypt = encrypt
        self.max_hops = max_hops
        self.state: State = "challenge"
        self.counter = 0  # the loop counter of steps 806/811
        self.first: m.Endpoint | None = None  # area 2141: where the client sends
        self.last: m.Endpoint | None = None  # area 2142: what the server is told (P5)
        self.path: list[str] = []
        self.max_payload = 0
        self.rid = 0
        #: the first proxy as configured (``fw1`` of ``fw1@HOST:PORT``): it must prove
        #: that identity, and a failure before it speaks is its own
        self.expect_first = expect_first
        self.hop = expect_first or "?"  # the proxy currently being talked to
        #: the first proxy's name (its challenge): whose connection this is
        self.first_hop: str | None = None
        self.session_keys: tuple[bytes, bytes] | None = None
        self._auth: MutualAuth | None = None
        self._e2e: MutualAuth | None = None
        #: set once the first proxy proved itself: the caller seals the control connection
        #: with it (:class:`~kakehashi.core.crypto.ControlChannel`) before sending on
        self.seal_with: MutualAuth | None = None
        #: iterative mode: the end-to-end channel with the proxy being talked to, when it
        #: is not the first (its messages come and go :class:`~m.Sealed` through relays)
        self._channel: ControlChannel | None = None
        #: every Reply received, in order (``chain trace`` times them)
        self.replies: list[m.Reply] = []
        #: how long the caller will still wait for the setup, in ms (0: not said), set
        #: by it before each :meth:`receive`: requests and extensions say so, and the
        #: proxies give up on a hop after them in time to name it
        self.wait_ms = 0

    @property
    def done(self) -> bool:
        return self.state == "done"

    def _fail(self, reason: str, text: str, hop: str | None = None, *,
              reported_by: str | None = None) -> SetupFailed:
        return SetupFailed(hop or self.hop, reason, text, reported_by=reported_by)

    def receive(self, msg: m.Message) -> list[m.Message]:
        """Take one message from the first proxy; return the messages to send.

        Raises :class:`SetupFailed` on a refusal (naming the hop that refused) or on
        anything out of order; the caller closes the control connection then.
        """
        if isinstance(msg, m.Refused):
            raise self._refused(msg)
        if isinstance(msg, m.Relay) and isinstance(msg.body, m.Refused):
            raise self._refused(msg.body)
        if isinstance(msg, m.Sealed):
            msg = self._open(msg)
            if isinstance(msg, m.Refused):  # the hop's own word, sealed end to end
                raise SetupFailed(msg.hop, msg.reason, msg.text, reported_by=self.hop)
        elif self._channel is not None and self.state == "reply":
            raise self._fail("integrity", f"a {type(msg).__name__.lower()} in {self.hop}'s "
                                          "name that was not sealed end to end")
        handler = getattr(self, "_on_" + self.state.replace("-", "_"))
        return handler(msg)

    def _refused(self, r: m.Refused) -> SetupFailed:
        """A refusal that came plainly on the first proxy's connection: the first proxy's
        own, or one it passed on in a later hop's name (on its word only). The hop being
        extended in iterative mode seals its refusals end to end once the client and it
        have authenticated: a plain one in its name was made up or altered on the way."""
        first = self.first_hop or r.hop  # before any challenge: only the first can speak
        if self._channel is not None and r.hop == self.hop:
            return self._fail("integrity", f"a refusal in {self.hop}'s name that it did not "
                                           f"seal end to end ({r.reason}: {r.text[:200]}), "
                                           f"passed on by the proxies between",
                              reported_by=first)
        return SetupFailed(r.hop, r.reason, r.text, reported_by=first)

    @property
    def _relayed(self) -> bool:
        """Iterative mode past the first proxy: the hop is reached through relays."""
        return self.counter > 0

    def _open(self, sealed: m.Sealed) -> m.Message:
        if self._channel is None:
            raise self._fail("protocol", "a sealed message before authenticating with the hop")
        try:
            return m.unseal(self._channel, sealed)
        except ControlError as exc:
            raise self._fail("integrity", f"a control message from {self.hop} through the "
                                          f"proxies between was refused: {exc}") from None
        except wire.WireError as exc:
            raise self._fail("protocol", str(exc)) from None

    def _to_hop(self, msg: m.Message) -> m.Message:
        """``msg`` as it goes to the hop being talked to: through relays, sealed."""
        return msg if self._channel is None else m.seal(self._channel, msg)

    def _unexpected(self, msg: m.Message) -> SetupFailed:
        want = self.state
        if self._relayed and want in ("challenge", "proof"):
            want = f"the relayed {want} of the next hop"
        return self._fail("protocol", f"unexpected {type(msg).__name__.lower()} while "
                                      f"waiting for {want}")

    def _on_challenge(self, msg: m.Message) -> list[m.Message]:
        relayed = self._relayed  # iterative: through the proxies already built
        if relayed and isinstance(msg, m.Relay) and isinstance(msg.body, m.Challenge):
            msg = msg.body
        elif relayed or not isinstance(msg, m.Challenge):
            raise self._unexpected(msg)
        if self.first_hop is None and self.expect_first not in (None, msg.hop):
            raise self._fail("authentication", f"the first hop calls itself {msg.hop!r}, "
                                               f"not {self.expect_first!r} as configured")
        self.hop = msg.hop
        if self.first_hop is None:
            self.first_hop = msg.hop
        if msg.hop in self.path:
            raise self._fail("protocol", f"{msg.hop} appears twice on the path (a loop)")
        self._auth = MutualAuth("initiator", self.user, self.keys, HOP_PURPOSE)
        self._channel = None
        try:
            my_id, nonce, mac = self._auth.answer(msg.hop, msg.nonce,
                                                  m.RELAYED if relayed else b"")
        except AuthFailed as exc:
            raise self._fail("authentication", f"this client: {exc}") from None
        self.state = "proof"
        answer = m.Answer(my_id, nonce, mac, relayed=relayed)
        return [m.Relay(answer) if relayed else answer]

    def _on_proof(self, msg: m.Message) -> list[m.Message]:
        if self._relayed and isinstance(msg, m.Relay) and isinstance(msg.body, m.Proof):
            msg = msg.body
        elif self._relayed or not isinstance(msg, m.Proof) or self._auth is None:
            raise self._unexpected(msg)
        assert self._auth is not None
        try:
            self._auth.check_proof(msg.mac)
        except AuthFailed as exc:
            raise self._fail("authentication", str(exc)) from None
        if self.counter == 0:  # the first hop, on this very connection: seal from now on
            self.seal_with = self._auth
        else:  # a later hop, through relays: seal end to end from now on
            self._channel = ControlChannel.after(self._auth)
        self.rid = secrets.randbits(63)
        self.state = "reply"
        return [self._to_hop(m.Request(rid=self.rid, server=self.server,
                                       requester=self.requester, user=self.user,
                                       mode=self.mode, encrypt=self.encrypt,
                                       wait_ms=self.wait_ms))]

    def _on_reply(self, msg: m.Message) -> list[m.Message]:
        if not isinstance(msg, m.Reply):
            raise self._unexpected(msg)
        if msg.rid != self.rid:
            raise self._fail("protocol", f"a reply to request {msg.rid}, not to ours")
        self.replies.append(msg)
        if self.counter == 0:
            self.first = msg.near  # 507 / 808-809: area 2141
        self.last = msg.far  # 508 / 810: area 2142
        self.counter += 1
        self.path.extend(msg.path or [msg.hop])
        self.max_payload = msg.max_payload
        if not msg.complete:
            if self.mode != "iterative":
                raise self._fail("protocol", "an incomplete reply in recursive mode")
            if self.counter >= self.max_hops:
                raise self._fail("protocol", f"more than {self.max_hops} hops")
            self.state = "challenge"
            return [self._to_hop(m.Extend(self.rid, wait_ms=self.wait_ms))]
        if not self.encrypt:
            self.state = "done"
            return []
        if msg.challenge is not None:  # recursive: authenticate with the last hop end to end
            self.hop = msg.challenge.hop
            self._e2e = MutualAuth("initiator", self.user, self.keys, E2E_PURPOSE)
            try:
                my_id, nonce, mac = self._e2e.answer(msg.challenge.hop, msg.challenge.nonce)
            except AuthFailed as exc:
                raise self._fail("authentication", f"this client: {exc}") from None
            self.state = "e2e-proof"
            return [m.Relay(m.Answer(my_id, nonce, mac))]
        if self._auth is None or self.path[-1:] != [self.hop]:
            raise self._fail("protocol", "encryption asked for but the last hop sent no "
                                         "challenge", self.path[-1] if self.path else None)
        self.session_keys = self._auth.session_keys()
        self.state = "done"
        return []

    def _on_e2e_proof(self, msg: m.Message) -> list[m.Message]:
        if not (isinstance(msg, m.Relay) and isinstance(msg.body, m.Proof)) or self._e2e is None:
            raise self._unexpected(msg)
        try:
            self._e2e.check_proof(msg.body.mac)
        except AuthFailed as exc:
            raise self._fail("authentication", str(exc)) from None
        self.session_keys = self._e2e.session_keys()
        self.state = "done"
        return []

    def _on_done(self, msg: m.Message) -> list[m.Message]:
        raise self._unexpected(msg)

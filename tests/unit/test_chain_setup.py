"""The client's setup state machine (spec 004 Figs. 7 and 10), driven message by message."""

from __future__ import annotations

import os

import pytest

from kakehashi.chain import messages as m
from kakehashi.chain.setup import E2E_PURPOSE, HOP_PURPOSE, ClientSetup, SetupFailed
from kakehashi.core.crypto import ControlChannel, MutualAuth

KEYS = {f"fw{i}": os.urandom(32) for i in (1, 2, 3)}
SERVER = m.Endpoint("10.3.0.9", 5300)
P1 = m.Endpoint("10.1.0.2", 4000)


def ep(port: int, host: str = "192.0.2.1") -> m.Endpoint:
    return m.Endpoint(host, port)


def client(mode="recursive", encrypt=False, keys=KEYS):
    return ClientSetup("alice", keys, SERVER, P1, mode=mode, encrypt=encrypt)


class Far:
    """Play proxy ``hop`` for the client: the first directly, a later one as the client
    sees it through the proxies between (Relay for the authentication, Sealed after)."""

    def __init__(self, c: ClientSetup, hop: str, key: bytes | None = None,
                 purpose=HOP_PURPOSE) -> None:
        self.c, self.hop = c, hop
        self.auth = MutualAuth("responder", hop, {"alice": key or KEYS[hop]}, purpose)
        self.relayed = c.counter > 0
        self.channel: ControlChannel | None = None

    def wrap(self, msg: m.Message) -> m.Message:
        if self.channel is not None:
            return m.seal(self.channel, msg)
        return m.Relay(msg) if self.relayed else msg  # type: ignore[arg-type]

    def unwrap(self, msg: m.Message) -> m.Message:
        if self.channel is not None:
            assert isinstance(msg, m.Sealed)
            return m.unseal(self.channel, msg)
        if self.relayed:
            assert isinstance(msg, m.Relay)
            return msg.body
        return msg

    def send(self, msg: m.Message) -> list[m.Message]:
        """``msg`` from this proxy to the client; what the client answers, as this proxy
        reads it."""
        return [self.unwrap(o) for o in self.c.receive(self.wrap(msg))]

    def authenticate(self) -> m.Request:
        (answer,) = self.send(m.Challenge(*self.auth.challenge()))
        assert isinstance(answer, m.Answer) and answer.id == "alice"
        assert answer.relayed == self.relayed
        proof = self.auth.check_answer(answer.id, answer.nonce, answer.mac,
                                       m.RELAYED if answer.relayed else b"")
        out = self.c.receive(self.wrap(m.Proof(proof)))
        if self.relayed:
            self.channel = ControlChannel.after(self.auth)
        (req,) = [self.unwrap(o) for o in out]
        assert isinstance(req, m.Request)
        return req


def authenticate(c: ClientSetup, hop: str, key: bytes | None = None, purpose=HOP_PURPOSE):
    """Play proxy ``hop``: challenge, check the answer, prove; returns the Request."""
    far = Far(c, hop, key, purpose)
    return far.authenticate(), far


def test_recursive_one_reply_fills_2141_and_2142():
    c = client()
    req, _ = authenticate(c, "fw1")
    assert (req.server, req.requester, req.user, req.mode) == (SERVER, P1, "alice", "recursive")
    out = c.receive(m.Reply(req.rid, "fw1", near=ep(41000), far=ep(43001, "198.51.100.3"),
                            complete=True, path=["fw1", "fw2", "fw3"], max_payload=65507))
    assert out == [] and c.done
    assert c.first == ep(41000) and c.last == ep(43001, "198.51.100.3")
    assert c.path == ["fw1", "fw2", "fw3"] and c.session_keys is None


def test_iterative_loop_extends_hop_by_hop_and_keeps_first_and_last():
    c = client(mode="iterative")
    ports = {"fw1": (41000, 41001), "fw2": (42000, 42001), "fw3": (43000, 43001)}
    for n, hop in enumerate(["fw1", "fw2", "fw3"]):
        req, proxy = authenticate(c, hop)
        near, far = ports[hop]
        out = proxy.send(m.Reply(req.rid, hop, ep(near), ep(far), complete=hop == "fw3",
                                 path=[hop]))
        assert c.counter == n + 1
        if hop != "fw3":
            assert out == [m.Extend(req.rid)] and c.state == "challenge"
    assert c.done and c.first == ep(41000) and c.last == ep(43001)
    assert c.path == ["fw1", "fw2", "fw3"]


def test_iterative_encryption_keys_come_from_the_last_hop():
    c = client(mode="iterative", encrypt=True)
    r = None
    for hop in ["fw1", "fw2"]:
        req, r = authenticate(c, hop)
        r.send(m.Reply(req.rid, hop, ep(1), ep(2), complete=hop == "fw2", path=[hop]))
    assert c.done and r is not None
    send, recv = c.session_keys
    assert (recv, send) == r.auth.session_keys()


def test_recursive_encryption_authenticates_the_last_hop_end_to_end():
    c = client(encrypt=True)
    req, _ = authenticate(c, "fw1")
    last = MutualAuth("responder", "fw3", {"alice": KEYS["fw3"]}, E2E_PURPOSE)
    (relay,) = c.receive(m.Reply(req.rid, "fw1", ep(1), ep(2), complete=True,
                                 path=["fw1", "fw2", "fw3"],
                                 challenge=m.Challenge(*last.challenge())))
    assert isinstance(relay, m.Relay) and isinstance(relay.body, m.Answer)
    proof = last.check_answer(relay.body.id, relay.body.nonce, relay.body.mac)
    assert c.receive(m.Relay(m.Proof(proof))) == [] and c.done
    assert c.session_keys == last.session_keys()[::-1]


def test_recursive_encryption_with_one_proxy_uses_the_hop_authentication():
    c = client(encrypt=True)
    req, r = authenticate(c, "fw1")
    c.receive(m.Reply(req.rid, "fw1", ep(1), ep(2), complete=True, path=["fw1"]))
    assert c.done and c.session_keys == r.auth.session_keys()[::-1]


def test_encryption_without_a_challenge_from_a_far_last_hop_fails():
    c = client(encrypt=True)
    req, _ = authenticate(c, "fw1")
    with pytest.raises(SetupFailed, match="no challenge"):
        c.receive(m.Reply(req.rid, "fw1", ep(1), ep(2), complete=True, path=["fw1", "fw2"]))


def test_refusal_names_the_hop_that_refused():
    c = client()
    authenticate(c, "fw1")
    with pytest.raises(SetupFailed) as err:
        c.receive(m.Refused(0, "fw2", "access", "no"))
    assert (err.value.hop, err.value.reason) == ("fw2", "access")
    assert "refused by fw2" in str(err.value)


def test_recursive_a_later_hops_refusal_rests_on_the_first_hops_word():
    """Recursive mode: the client shares no key with fw2 and fw3, so their refusals reach
    it on fw1's word (each link authenticated and sealed: no one outside the chain can
    forge or alter them, a proxy between could); the client says so. fw1's own refusal,
    and one before any challenge, are the first hop's own word."""
    c = client()
    authenticate(c, "fw1")
    with pytest.raises(SetupFailed) as err:
        c.receive(m.Refused(0, "fw3", "access", "no"))
    e = err.value
    assert (e.hop, e.reason, e.reported_by, e.verified) == ("fw3", "access", "fw1", False)
    assert "(reported by fw1, not authenticated by fw3)" in str(e)
    c = client()
    authenticate(c, "fw1")
    with pytest.raises(SetupFailed) as own:
        c.receive(m.Refused(0, "fw1", "limit", "too many"))
    assert (own.value.reported_by, own.value.verified) == ("fw1", True)
    with pytest.raises(SetupFailed) as early:  # before the challenge: a flood refusal
        client().receive(m.Refused(0, "fw1", "limit", "too many setups"))
    assert (early.value.hop, early.value.verified) == ("fw1", True)


def test_wrong_proof_fails_naming_the_hop():
    c = client()
    r = MutualAuth("responder", "fw1", {"alice": os.urandom(32)}, HOP_PURPOSE)
    c.receive(m.Challenge(*r.challenge()))
    with pytest.raises(SetupFailed) as err:
        c.receive(m.Proof(os.urandom(32)))
    assert err.value.hop == "fw1" and err.value.reason == "authentication"


def test_challenge_from_a_hop_without_a_key():
    c = client(keys={"fw1": KEYS["fw1"]})
    r = MutualAuth("responder", "fw7", {}, HOP_PURPOSE)
    with pytest.raises(SetupFailed, match="no shared key for 'fw7'") as err:
        c.receive(m.Challenge(*r.challenge()))
    assert err.value.hop == "fw7"


def test_the_first_hop_is_named_before_it_speaks():
    """A first hop that says nothing (then the caller's timeout), or closes, is named
    as configured: before, such failures were reported as refused by '?'."""
    c = ClientSetup("alice", KEYS, SERVER, P1, expect_first="fw1")
    assert c.hop == "fw1"


def test_a_first_hop_proving_another_identity_is_refused():
    """The client authenticates the proxy it was configured to reach, not whichever one
    it holds a key for: fw2 answering at fw1's address (a redirected connection, a
    swapped configuration) would otherwise become the first hop, and the chain skip
    fw1's firewall. Proxies check their next hop's name the same way."""
    c = ClientSetup("alice", KEYS, SERVER, P1, expect_first="fw1")
    r = MutualAuth("responder", "fw2", {"alice": KEYS["fw2"]}, HOP_PURPOSE)
    with pytest.raises(SetupFailed, match="'fw2'") as err:
        c.receive(m.Challenge(*r.challenge()))
    assert err.value.hop == "fw1" and err.value.reason == "authentication"


def test_requests_and_extensions_say_how_long_the_client_waits():
    """So each proxy gives up on the hops after it in time to name them; the nearer
    the client, the later its deadline."""
    c = client(mode="iterative")
    c.wait_ms = 9000
    req, far = authenticate(c, "fw1")
    assert req.wait_ms == 9000
    c.wait_ms = 8000
    (ext,) = far.send(m.Reply(req.rid, "fw1", ep(1), ep(2), complete=False))
    assert isinstance(ext, m.Extend) and ext.wait_ms == 8000
    budgets = [10.0]
    for _ in range(3):
        nxt = m.within(int(budgets[-1] * 1000))
        assert nxt is not None
        budgets.append(nxt)
    assert budgets == sorted(budgets, reverse=True) and budgets[-1] > 4
    assert m.within(0) is None


def test_a_reply_to_another_request_is_refused():
    """Fig. 14(b): a notice that is not the answer to our request is not taken as one."""
    c = client()
    req, _ = authenticate(c, "fw1")
    with pytest.raises(SetupFailed, match="not to ours"):
        c.receive(m.Reply(req.rid ^ 1, "fw1", ep(1), ep(2), complete=True))


def test_incomplete_reply_in_recursive_mode_is_a_protocol_error():
    c = client()
    req, _ = authenticate(c, "fw1")
    with pytest.raises(SetupFailed, match="incomplete"):
        c.receive(m.Reply(req.rid, "fw1", ep(1), ep(2), complete=False))


def test_messages_out_of_order_are_refused():
    c = client()
    with pytest.raises(SetupFailed, match="unexpected"):
        c.receive(m.Proof(os.urandom(32)))
    c = client()
    req, _ = authenticate(c, "fw1")
    c.receive(m.Reply(req.rid, "fw1", ep(1), ep(2), complete=True))
    with pytest.raises(SetupFailed, match="unexpected"):
        c.receive(m.Reply(req.rid, "fw1", ep(1), ep(2), complete=True))


def test_a_loop_in_the_iterative_path_is_refused():
    c = client(mode="iterative")
    req, _ = authenticate(c, "fw1")
    c.receive(m.Reply(req.rid, "fw1", ep(1), ep(2), complete=False, path=["fw1"]))
    r = MutualAuth("responder", "fw1", {"alice": KEYS["fw1"]}, HOP_PURPOSE)
    with pytest.raises(SetupFailed, match="twice"):
        c.receive(m.Relay(m.Challenge(*r.challenge())))


def test_hop_count_is_bounded():
    keys = {f"h{i}": os.urandom(32) for i in range(20)}
    c = ClientSetup("alice", keys, SERVER, P1, mode="iterative", max_hops=3)
    with pytest.raises(SetupFailed, match="more than 3 hops"):
        for i in range(5):
            far = Far(c, f"h{i}", keys[f"h{i}"])
            req = far.authenticate()
            far.send(m.Reply(req.rid, f"h{i}", ep(1), ep(2), complete=False))


# -- iterative: what the client exchanges with a later hop is sealed end to end ----------------
def at_fw2() -> tuple[ClientSetup, Far, m.Request]:
    """A client past fw1, authenticated with fw2 through it; fw2's view and the request."""
    c = client(mode="iterative")
    req, first = authenticate(c, "fw1")
    assert first.send(m.Reply(req.rid, "fw1", ep(41000), ep(41001), complete=False,
                              path=["fw1"])) == [m.Extend(req.rid)]
    fw2 = Far(c, "fw2")
    return c, fw2, fw2.authenticate()


def test_iterative_later_hop_answer_is_relayed_and_request_sealed():
    _, _, req = at_fw2()
    assert req.rid != 0 and req.user == "alice" and req.mode == "iterative"
    c2 = client(mode="iterative")
    req1, first = authenticate(c2, "fw1")
    first.send(m.Reply(req1.rid, "fw1", ep(1), ep(2), complete=False, path=["fw1"]))
    ch = MutualAuth("responder", "fw2", {"alice": KEYS["fw2"]}, HOP_PURPOSE).challenge()
    with pytest.raises(SetupFailed, match="relayed challenge"):  # not on fw1's own terms
        c2.receive(m.Challenge(*ch))


def _reply(req: m.Request, **kw) -> m.Reply:
    return m.Reply(req.rid, "fw2", ep(42000), ep(42001), **{"complete": True,
                                                             "path": ["fw2"], **kw})


def test_iterative_reply_from_a_later_hop_must_be_sealed_end_to_end():
    """fw1 (or anyone between fw1 and fw2) cannot answer in fw2's name."""
    c, _, req = at_fw2()
    with pytest.raises(SetupFailed) as err:
        c.receive(_reply(req))
    assert (err.value.hop, err.value.reason) == ("fw2", "integrity")


def test_iterative_tampered_sealed_reply_is_refused_naming_the_hop():
    c, fw2, req = at_fw2()
    sealed = fw2.wrap(_reply(req))
    assert isinstance(sealed, m.Sealed)
    flipped = m.Sealed(sealed.data[:-1] + bytes([sealed.data[-1] ^ 1]))
    with pytest.raises(SetupFailed) as err:
        c.receive(flipped)
    assert (err.value.hop, err.value.reason) == ("fw2", "integrity")
    assert "integrity check" in err.value.text


def test_iterative_replayed_reordered_or_reflected_sealed_messages_are_refused():
    # replay: fw2's first sealed message again in place of the next
    c, fw2, req = at_fw2()
    first = fw2.wrap(_reply(req, complete=False, path=["fw2"]))
    (sealed_extend,) = c.receive(first)
    assert isinstance(sealed_extend, m.Sealed)
    with pytest.raises(SetupFailed, match="integrity"):
        c.receive(first)
    # reorder: fw2's second message before its first
    c, fw2, req = at_fw2()
    one = fw2.wrap(_reply(req, complete=False))
    two = fw2.wrap(_reply(req))
    with pytest.raises(SetupFailed, match="integrity"):
        c.receive(two)
    assert one is not None
    # reflection: the client's own sealed request sent back to it
    c = client(mode="iterative")
    req1, first_hop = authenticate(c, "fw1")
    first_hop.send(m.Reply(req1.rid, "fw1", ep(1), ep(2), complete=False, path=["fw1"]))
    fw2 = Far(c, "fw2")
    (answer,) = fw2.send(m.Challenge(*fw2.auth.challenge()))
    proof = fw2.auth.check_answer(answer.id, answer.nonce, answer.mac, m.RELAYED)
    (sealed_request,) = c.receive(m.Relay(m.Proof(proof)))
    assert isinstance(sealed_request, m.Sealed)
    with pytest.raises(SetupFailed) as err:
        c.receive(sealed_request)
    assert (err.value.hop, err.value.reason) == ("fw2", "integrity")


def test_iterative_extend_to_a_later_hop_is_sealed_for_it_alone():
    c, fw2, req = at_fw2()
    (sealed,) = c.receive(fw2.wrap(_reply(req, complete=False)))
    assert isinstance(sealed, m.Sealed)  # fw1 cannot read nor forge it
    assert m.unseal(fw2.channel, sealed) == m.Extend(req.rid)


def test_iterative_an_extended_hops_refusal_is_its_own_until_the_next_hop_speaks():
    """fw2, extended towards fw3, refuses (fw3 is down): while the client still talks to
    fw2 the refusal comes sealed by fw2 (its own word); once fw3's challenge has gone up
    the client talks to fw3, and fw2's refusal comes plainly, on fw1's word, not as an
    integrity failure."""
    c, fw2, req = at_fw2()
    (ext,) = fw2.send(_reply(req, complete=False, path=["fw2"]))
    assert isinstance(ext, m.Extend)
    down = m.Refused(0, "fw2", "next-hop", "fw2: fw3 closed the connection during setup")
    with pytest.raises(SetupFailed) as sealed:
        c.receive(fw2.wrap(down))
    assert (sealed.value.hop, sealed.value.reason, sealed.value.verified) == (
        "fw2", "next-hop", True)
    c, fw2, req = at_fw2()
    fw2.send(_reply(req, complete=False, path=["fw2"]))
    fw3 = MutualAuth("responder", "fw3", {"alice": KEYS["fw3"]}, HOP_PURPOSE)
    (answer,) = c.receive(m.Relay(m.Challenge(*fw3.challenge())))
    assert isinstance(answer, m.Relay) and c.hop == "fw3"
    with pytest.raises(SetupFailed) as plain:
        c.receive(down)
    p = plain.value
    assert (p.hop, p.reason, p.reported_by, p.verified) == ("fw2", "next-hop", "fw1", False)

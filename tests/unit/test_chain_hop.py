"""A proxy's setup as sans-IO state machines (spec 004 Figs. 8 and 11): the requester
side (authentication, who may ask, ACL, route), the next hop (recursive), the relay
filter (iterative) and the end-to-end authentication of the last hop; then whole
three-proxy setups in both modes played out in memory, message by message."""

from __future__ import annotations

import os

import pytest

from kakehashi.chain import messages as m
from kakehashi.chain import tables as t
from kakehashi.chain.hop import (
    Admitted,
    EndToEnd,
    NextHop,
    Refuse,
    RelayFilter,
    RequesterSide,
    Step,
)
from kakehashi.chain.setup import E2E_PURPOSE, HOP_PURPOSE, ClientSetup, SetupFailed
from kakehashi.core.crypto import ControlChannel, MutualAuth

KEY = {pair: os.urandom(32) for pair in ("alice-fw1", "alice-fw2", "alice-fw3", "fw1-fw2",
                                         "fw2-fw3", "bob-fw1")}
SERVER = m.Endpoint("10.3.0.9", 5300)
ACL = t.parse_acl([{"user": "alice", "from": "10.1.0.0/16", "ports": "any"}])
ROUTES = {"fw1": t.parse_routes({"10.3.0.0/16": "fw2@192.0.2.2:1092"}),
          "fw2": t.parse_routes({"10.3.0.0/16": "fw3@192.0.2.3:1093"}),
          "fw3": t.parse_routes({"10.3.0.0/16": "direct"})}


#: per proxy, keys that differ from the pairs above (a misconfigured hop)
OVERRIDE: dict[str, dict[str, bytes]] = {}


def keys_of(name: str) -> dict[str, bytes]:
    keys = {pair.replace(name, "").strip("-"): k for pair, k in KEY.items() if name in
            pair.split("-")}
    return {**keys, **OVERRIDE.get(name, {})}


def side(name="fw1", peer_ip="10.1.0.2", acl=ACL, routes=None) -> RequesterSide:
    return RequesterSide(name, keys_of(name), acl, routes or ROUTES[name], peer_ip)


def login(s: RequesterSide, who: str, key: bytes, relayed: bool = False) -> MutualAuth:
    ch = s.start()
    a = MutualAuth("initiator", who, {ch.hop: key}, HOP_PURPOSE)
    ctx = m.RELAYED if relayed else b""
    (proof,) = s.receive(m.Answer(*a.answer(ch.hop, ch.nonce, ctx), relayed=relayed))
    a.check_proof(proof.mac)
    return a


def request(**kw) -> m.Request:
    base = {"rid": 7, "server": SERVER, "requester": m.Endpoint("10.1.0.2", 4000),
            "user": "alice"}
    return m.Request(**{**base, **kw})


def refused(fn, *args) -> m.Refused:
    with pytest.raises(Refuse) as err:
        fn(*args)
    return err.value.msg


# -- requester side ---------------------------------------------------------------------------
def test_client_admitted_with_observed_origin_and_next_hop():
    s = side()
    login(s, "alice", KEY["alice-fw1"])
    assert s.receive(request(requester=m.Endpoint("192.168.0.9", 4000))) == []
    adm = s.admitted
    # the origin is where the connection came from (NAT), the port the declared one
    assert adm.origin == m.Endpoint("10.1.0.2", 4000) and adm.direct and adm.peer == "alice"
    assert adm.next_hop == t.Hop("fw2", "192.0.2.2", 1092)
    assert [(e, a) for e, a, _ in s.audit] == [("authenticate", True), ("access", True)]


def test_wrong_key_refused_for_authentication_and_audited():
    s = side()
    msg = refused(login, s, "alice", os.urandom(32))
    assert (msg.hop, msg.reason) == ("fw1", "authentication")
    assert s.audit[0][:2] == ("authenticate", False)


def test_request_before_authentication_is_a_protocol_error():
    s = side()
    s.start()
    assert refused(s.receive, request()).reason == "protocol"


def test_client_cannot_ask_for_another_user():
    s = side()
    login(s, "bob", KEY["bob-fw1"])
    msg = refused(s.receive, request(user="alice"))
    assert msg.reason == "access" and "'bob'" in msg.text


def test_acl_refuses_an_unlisted_user_and_an_outside_address():
    s = side()
    login(s, "bob", KEY["bob-fw1"])
    assert refused(s.receive, request(user="bob")).reason == "access"
    s = side(peer_ip="172.16.0.1")
    login(s, "alice", KEY["alice-fw1"])
    assert refused(s.receive, request()).reason == "access"
    assert s.audit[-1][:2] == ("access", False)


def test_acl_port_column_is_the_declared_data_port():
    acl = t.parse_acl([{"user": "alice", "from": "10.1.0.0/16", "ports": "4000-4010"}])
    s = side(acl=acl)
    login(s, "alice", KEY["alice-fw1"])
    assert refused(s.receive, request(requester=m.Endpoint("10.1.0.2", 5000))).reason == \
        "access"


def test_proxy_vouches_for_a_user_it_forwards():
    s = side("fw2", peer_ip="192.0.2.1")
    login(s, "fw1", KEY["fw1-fw2"])
    s.receive(request(via=["fw1"], origin=m.Endpoint("10.1.0.2", 4000)))
    assert s.admitted.origin == m.Endpoint("10.1.0.2", 4000) and not s.admitted.direct


def test_an_acl_user_cannot_pose_as_a_forwarding_proxy():
    keys = {**keys_of("fw1"), "alice": KEY["alice-fw1"]}
    s = RequesterSide("fw1", keys, t.parse_acl([{"user": "alice"}, {"user": "bob"}]),
                      ROUTES["fw1"], "10.1.0.2")
    login(s, "alice", KEY["alice-fw1"])
    msg = refused(s.receive, request(user="bob", via=["alice"], origin=m.Endpoint("1.2.3.4", 1)))
    assert msg.reason == "access"


WILDCARD = t.parse_acl([{"user": "*", "from": "10.1.0.0/16", "ports": "any"}])


def test_under_a_wildcard_acl_a_user_cannot_pose_as_a_forwarding_proxy():
    """fw2 admits any authenticated user from the client LAN (``user = "*"``); alice
    holds a key for fw2 (iterative mode needs one) and connects from outside. Posing as
    a proxy that forwards (via=["alice"]) she named another user and an origin inside
    the LAN and was admitted: the LAN restriction, bob's identity and the per-address
    bounds were hers to choose. Under a wildcard every key holder may be a user, so
    only the IDs listed in ``forwarders`` may forward."""
    s = RequesterSide("fw2", keys_of("fw2"), WILDCARD, ROUTES["fw2"], "203.0.113.9")
    login(s, "alice", KEY["alice-fw2"])
    msg = refused(s.receive, request(user="bob", via=["alice"],
                                     origin=m.Endpoint("10.1.0.5", 4000)))
    assert msg.reason == "access" and "forwarders" in msg.text
    # fw1 too, until it is listed; then it forwards as before
    s = RequesterSide("fw2", keys_of("fw2"), WILDCARD, ROUTES["fw2"], "192.0.2.1")
    login(s, "fw1", KEY["fw1-fw2"])
    assert refused(s.receive, request(via=["fw1"], origin=m.Endpoint("10.1.0.2", 4000))
                   ).reason == "access"
    s = RequesterSide("fw2", keys_of("fw2"), WILDCARD, ROUTES["fw2"], "192.0.2.1",
                      forwarders=frozenset({"fw1"}))
    login(s, "fw1", KEY["fw1-fw2"])
    s.receive(request(via=["fw1"], origin=m.Endpoint("10.1.0.2", 4000)))
    assert s.admitted is not None and s.admitted.origin == m.Endpoint("10.1.0.2", 4000)
    # a listed forwarder is the only kind: alice is not one even without a wildcard
    s = RequesterSide("fw2", keys_of("fw2"), ACL, ROUTES["fw2"], "203.0.113.9",
                      forwarders=frozenset({"fw1"}))
    login(s, "alice", KEY["alice-fw2"])
    assert refused(s.receive, request(user="bob", via=["alice"],
                                      origin=m.Endpoint("10.1.0.5", 4000))).reason == "access"


def test_forwarded_request_must_name_its_origin_and_come_from_its_last_via():
    s = side("fw2", peer_ip="192.0.2.1")
    login(s, "fw1", KEY["fw1-fw2"])
    assert refused(s.receive, request(via=["fw1"])).reason == "protocol"
    s = side("fw2", peer_ip="192.0.2.1")
    login(s, "fw1", KEY["fw1-fw2"])
    assert refused(s.receive, request(via=["fwX"], origin=SERVER)).reason == "access"


def vouched_by_fw1(s: RequesterSide, **kw) -> m.Relay:
    """fw1 logs in to fw2 and sends its part of an iterative request; fw2's challenge
    for the client comes back (relayed)."""
    login(s, "fw1", KEY["fw1-fw2"])
    assert s.sealing  # fw1 authenticated on its own connection: sealed from now on
    base = {"via": ["fw1"], "origin": m.Endpoint("10.1.0.2", 4000), "mode": "iterative",
            "requester": m.Endpoint("192.0.2.1", 41001), "rid": 99}
    (ch,) = s.receive(request(**{**base, **kw}))
    assert isinstance(ch, m.Relay) and isinstance(ch.body, m.Challenge)
    assert s.admitted is None  # not before the client authenticated here too (1005)
    return ch


def client_through(s: RequesterSide, ch: m.Relay, key=None, who="alice") -> ControlChannel:
    """The client answers fw2's relayed challenge; returns its end-to-end channel."""
    a = MutualAuth("initiator", who, {"fw2": key or KEY["alice-fw2"]}, HOP_PURPOSE)
    (proof,) = s.receive(m.Relay(m.Answer(*a.answer(ch.body.hop, ch.body.nonce, m.RELAYED),
                                          relayed=True)))
    assert isinstance(proof, m.Relay) and isinstance(proof.body, m.Proof)
    a.check_proof(proof.body.mac)
    return ControlChannel.after(a)


def test_iterative_client_authenticates_through_fw1_and_its_request_is_sealed():
    s = side("fw2", peer_ip="192.0.2.1")
    ch = vouched_by_fw1(s)
    c2 = client_through(s, ch)
    mine = request(rid=5, mode="iterative", requester=m.Endpoint("10.9.9.9", 1))
    assert s.receive(m.seal(c2, mine)) == []
    adm = s.admitted
    # the client's request with fw1's part: fw1's P3 as requester, via, the origin
    assert adm.request.rid == 5 and adm.request.via == ["fw1"]
    assert adm.request.requester == m.Endpoint("192.0.2.1", 41001)
    assert adm.origin == m.Endpoint("10.1.0.2", 4000) and adm.peer == "fw1"
    assert adm.direct and adm.client_auth is s.client_auth  # it keys encryption
    assert [(e, a, f.get("relayed", False)) for e, a, f in s.audit] == [
        ("authenticate", True, False), ("authenticate", True, True), ("access", True, False)]
    # answers: a plain Reply for fw1 (its P4, under fw1's rid), the client's sealed
    reply = m.Reply(5, "fw2", m.Endpoint("192.0.2.2", 42000), m.Endpoint("h", 2), False)
    hop_reply, sealed = s.to_requester(reply)
    assert hop_reply.rid == 99 and hop_reply.near == reply.near
    assert m.unseal(c2, sealed) == reply
    # what comes next from the client must be sealed end to end
    assert s.open(m.seal(c2, m.Extend(5))) == m.Extend(5)
    assert refused(s.open, m.Extend(5)).reason == "protocol"


def test_iterative_request_tampered_replayed_or_reflected_on_the_proxy_leg_is_refused():
    """What fw1 (or a man in the middle of fw1 -> fw2) does to the client's sealed
    messages: every change is an integrity refusal by fw2 naming both."""
    mine = request(rid=5, mode="iterative")

    def fresh() -> tuple[RequesterSide, ControlChannel]:
        s = side("fw2", peer_ip="192.0.2.1")
        return s, client_through(s, vouched_by_fw1(s))

    s, c2 = fresh()
    sealed = m.seal(c2, mine)
    msg = refused(s.receive, m.Sealed(sealed.data[:-1] + bytes([sealed.data[-1] ^ 1])))
    assert (msg.hop, msg.reason) == ("fw2", "integrity")
    assert "alice" in msg.text and "fw1" in msg.text and "integrity check" in msg.text
    # replay: a sealed message of another session of the same client
    s, _ = fresh()
    assert refused(s.receive, sealed).reason == "integrity"
    # reorder: the client's second message in place of its first
    s, c2 = fresh()
    first, second = m.seal(c2, mine), m.seal(c2, m.Extend(5))
    assert first != second
    assert refused(s.receive, second).reason == "integrity"
    # replay within the session: the request again, after it was admitted
    s, c2 = fresh()
    again = m.seal(c2, mine)
    s.receive(again)
    assert refused(s.open, again).reason == "integrity"
    # reflection: fw2's own sealed answer sent back to it
    s, c2 = fresh()
    s.receive(m.seal(c2, mine))
    _, back = s.to_requester(m.Reply(5, "fw2", m.Endpoint("h", 1), m.Endpoint("h", 2), True))
    assert refused(s.open, back).reason == "integrity"
    # plaintext in the client's name after its authentication
    s, _ = fresh()
    assert refused(s.receive, mine).reason == "protocol"


def test_iterative_fw1_and_the_client_must_agree():
    s = side("fw2", peer_ip="192.0.2.1")
    c2 = client_through(s, vouched_by_fw1(s))
    msg = refused(s.receive, m.seal(c2, request(mode="iterative",
                                                server=m.Endpoint("10.3.0.8", 53))))
    assert msg.reason == "protocol" and "disagree" in msg.text
    # the client who answers must be the user fw1 vouches for
    s = side("fw2", peer_ip="192.0.2.1")
    ch = vouched_by_fw1(s, user="bob")
    msg = refused(client_through, s, ch)
    assert msg.reason == "authentication" and "'bob'" in msg.text
    # and must hold its own key for fw2: fw1's say-so is not enough
    s = side("fw2", peer_ip="192.0.2.1")
    msg = refused(client_through, s, vouched_by_fw1(s), os.urandom(32))
    assert (msg.hop, msg.reason) == ("fw2", "authentication")


def test_a_direct_client_cannot_claim_an_origin_nor_strip_the_relayed_mark():
    s = side("fw2", peer_ip="192.0.2.1")
    login(s, "alice", KEY["alice-fw2"])
    assert s.sealing
    msg = refused(s.receive, request(via=["fw1"], origin=m.Endpoint("10.9.0.9", 1),
                                     mode="iterative"))
    assert msg.reason == "access"
    # a relayed answer belongs inside a Relay, not on the requester's own connection
    s = side("fw2", peer_ip="192.0.2.1")
    ch = s.start()
    a = MutualAuth("initiator", "alice", {"fw2": KEY["alice-fw2"]}, HOP_PURPOSE)
    assert refused(s.receive, m.Answer(*a.answer(ch.hop, ch.nonce, m.RELAYED),
                                       relayed=True)).reason == "protocol"
    # the mark is bound into the MAC: flipped on the way, the relayed answer fails
    s = side("fw2", peer_ip="192.0.2.1")
    ch = vouched_by_fw1(s)
    a = MutualAuth("initiator", "alice", {"fw2": KEY["alice-fw2"]}, HOP_PURPOSE)
    msg = refused(s.receive, m.Relay(m.Answer(*a.answer(ch.body.hop, ch.body.nonce),
                                              relayed=True)))
    assert msg.reason == "authentication"
    s = side("fw2", peer_ip="192.0.2.1")
    ch = vouched_by_fw1(s)
    a = MutualAuth("initiator", "alice", {"fw2": KEY["alice-fw2"]}, HOP_PURPOSE)
    msg = refused(s.receive, m.Relay(m.Answer(*a.answer(ch.body.hop, ch.body.nonce,
                                                        m.RELAYED))))
    assert msg.reason == "protocol"


def test_no_route_and_loops_are_refused():
    s = side()
    login(s, "alice", KEY["alice-fw1"])
    assert refused(s.receive, request(server=m.Endpoint("8.8.8.8", 53))).reason == "route"
    s = side("fw2", peer_ip="192.0.2.1")
    login(s, "fw1", KEY["fw1-fw2"])
    msg = refused(s.receive, request(via=["fw3", "fw1"], origin=m.Endpoint("10.1.0.2", 1)))
    assert msg.reason == "route" and "loops" in msg.text
    s = side("fw2", peer_ip="192.0.2.1")
    login(s, "fw1", KEY["fw1-fw2"])
    assert refused(s.receive, request(via=[f"h{i}" for i in range(14)] + ["fw1"],
                                      origin=m.Endpoint("10.1.0.2", 1))).reason == "route"


def test_anything_after_admission_is_refused():
    s = side()
    login(s, "alice", KEY["alice-fw1"])
    s.receive(request())
    assert refused(s.receive, request()).reason == "protocol"


# -- next hop (recursive) -----------------------------------------------------------------------
def admitted() -> Admitted:
    return Admitted(request(), "alice", m.Endpoint("10.1.0.2", 4000), None,
                    t.Hop("fw2", "192.0.2.2", 1092))


def next_hop(keys=None) -> NextHop:
    return NextHop("fw1", keys or keys_of("fw1"), t.Hop("fw2", "192.0.2.2", 1092), admitted(),
                   m.Endpoint("192.0.2.1", 41001))


def test_next_hop_authenticates_asks_and_accepts_only_its_reply():
    nh = next_hop()
    fw2 = side("fw2", peer_ip="192.0.2.1")
    (answer,) = nh.receive(fw2.start())
    (proof,) = fw2.receive(answer)
    (req,) = nh.receive(proof)
    assert req.via == ["fw1"] and req.origin == m.Endpoint("10.1.0.2", 4000)
    assert req.requester == m.Endpoint("192.0.2.1", 41001) and req.rid != 7
    fw2.receive(req)
    assert fw2.admitted is not None and not fw2.admitted.direct
    reply = m.Reply(req.rid, "fw2", m.Endpoint("192.0.2.2", 42000),
                    m.Endpoint("192.0.2.3", 43001), True, path=["fw2", "fw3"])
    with pytest.raises(Refuse, match="another request"):
        next_hop_copy = next_hop()
        next_hop_copy.state, next_hop_copy.rid = "reply", req.rid + 1
        next_hop_copy.receive(reply)
    assert nh.receive(reply) == [] and nh.reply == reply
    up = nh.answer_up(m.Endpoint("198.51.100.1", 41000))
    assert (up.rid, up.near.port, up.far.port, up.path) == (7, 41000, 43001,
                                                           ["fw1", "fw2", "fw3"])


def test_next_hop_passes_a_refusal_from_further_down_up_unchanged():
    nh = next_hop()
    msg = refused(nh.receive, m.Refused(99, "fw3", "access", "not alice"))
    assert (msg.rid, msg.hop, msg.reason, msg.text) == (7, "fw3", "access", "not alice")


def test_next_hop_with_another_name_or_no_key():
    nh = next_hop()
    impostor = side("fw3")
    msg = refused(nh.receive, impostor.start())
    assert msg.reason == "next-hop" and "'fw3'" in msg.text
    nh = next_hop(keys={"alice": KEY["alice-fw1"]})
    msg = refused(nh.receive, side("fw2").start())
    assert msg.reason == "next-hop" and "no shared key" in msg.text and msg.hop == "fw1"


def test_next_hop_that_cannot_prove_is_refused():
    nh = next_hop()
    nh.receive(side("fw2").start())
    msg = refused(nh.receive, m.Proof(os.urandom(32)))
    assert (msg.hop, msg.reason) == ("fw1", "authentication")


# -- relay filter (iterative) -------------------------------------------------------------------
def test_relay_filter_authenticates_as_itself_then_passes_only_end_to_end_messages():
    f = RelayFilter("fw1", keys_of("fw1"), t.Hop("fw2", "192.0.2.2", 1092), admitted(),
                    m.Endpoint("192.0.2.1", 41001))
    fw2 = side("fw2", peer_ip="192.0.2.1")
    # nothing from the client passes before fw1 itself authenticated with fw2
    assert refused(f.from_requester, m.Relay(m.Answer("alice", os.urandom(32),
                                                      os.urandom(32)))).reason == "protocol"
    step = f.from_next(fw2.start())
    (answer,) = step.down
    assert answer.id == "fw1" and not f.sealing
    step = f.from_next(fw2.receive(answer)[0])
    assert f.sealing  # the connection to fw2 is sealed from here on
    (req,) = step.down
    assert (req.mode, req.via, req.requester) == ("iterative", ["fw1"],
                                                  m.Endpoint("192.0.2.1", 41001))
    assert req.origin == m.Endpoint("10.1.0.2", 4000) and req.rid != 7
    (ch,) = fw2.receive(req)
    assert f.from_next(ch) == Step(up=[ch])  # fw2's challenge for the client, passed up
    sealed = m.Sealed(os.urandom(40))
    assert f.from_requester(sealed) is sealed
    assert f.from_next(sealed) == Step(up=[sealed])
    # the client's own plain messages do not pass: only Relay(Answer) and Sealed
    for bad in (request(), m.Extend(7), m.Proof(os.urandom(32)),
                m.Answer("alice", os.urandom(32), os.urandom(32))):
        assert refused(f.from_requester, bad).reason == "protocol"
    # a reply to another request is not taken (Fig. 14(b)); its own gives 3142 = P4
    stray = m.Reply(req.rid ^ 1, "fw2", m.Endpoint("h", 1), m.Endpoint("h", 2), False)
    assert refused(f.from_next, stray).reason == "protocol"
    f2 = RelayFilter("fw1", keys_of("fw1"), t.Hop("fw2", "192.0.2.2", 1092), admitted(),
                     m.Endpoint("192.0.2.1", 41001))
    f2.next.state, f2.next.rid = "reply", req.rid
    own = m.Reply(req.rid, "fw2", m.Endpoint("192.0.2.2", 42000), m.Endpoint("h", 2), False)
    assert f2.from_next(own) == Step(p4=m.Endpoint("192.0.2.2", 42000))
    assert refused(f2.from_next, own).reason == "protocol"  # answered already
    assert refused(f2.from_next, m.Answer("x", os.urandom(32), os.urandom(32))).reason == \
        "protocol"
    # a refusal from further down is passed up, naming who refused
    msg = refused(f2.from_next, m.Refused(1, "fw3", "access", "no"))
    assert (msg.hop, msg.reason, msg.rid) == ("fw3", "access", 7)


# -- end to end (claim 7) ---------------------------------------------------------------------
def test_end_to_end_authentication_and_its_refusals():
    e = EndToEnd("fw3", keys_of("fw3"), "alice")
    ch = e.challenge()
    a = MutualAuth("initiator", "alice", {"fw3": KEY["alice-fw3"]}, E2E_PURPOSE)
    out = e.receive(m.Relay(m.Answer(*a.answer(ch.hop, ch.nonce))))
    assert isinstance(out.body, m.Proof) and e.done
    a.check_proof(out.body.mac)
    assert a.session_keys() == e.auth.session_keys()[::-1]
    assert refused(e.receive, m.Relay(m.Answer("alice", os.urandom(32), os.urandom(32)))) \
        .reason == "protocol"  # once only

    e = EndToEnd("fw3", keys_of("fw3"), "alice")
    ch = e.challenge()
    hop_auth = MutualAuth("initiator", "alice", {"fw3": KEY["alice-fw3"]}, HOP_PURPOSE)
    out = e.receive(m.Relay(m.Answer(*hop_auth.answer(ch.hop, ch.nonce))))
    assert isinstance(out.body, m.Refused) and not e.done  # a hop answer is no e2e answer

    e = EndToEnd("fw3", {**keys_of("fw3"), "bob": os.urandom(32)}, "alice")
    ch = e.challenge()
    bob = MutualAuth("initiator", "bob", {"fw3": e.auth._keys["bob"]}, E2E_PURPOSE)
    out = e.receive(m.Relay(m.Answer(*bob.answer(ch.hop, ch.nonce))))
    assert isinstance(out.body, m.Refused) and "alice" in out.body.text


# -- whole chains in memory -----------------------------------------------------------------------
def client(mode, encrypt=False, **override) -> ClientSetup:
    keys = {f"fw{i}": KEY[f"alice-fw{i}"] for i in (1, 2, 3)}
    keys.update(override)
    return ClientSetup("alice", keys, SERVER, m.Endpoint("10.1.0.2", 4000), mode=mode,
                       encrypt=encrypt)


PORTS = {"fw1": (41000, 41001), "fw2": (42000, 42001), "fw3": (43000, 43001)}
IP = {"fw1": "192.0.2.1", "fw2": "192.0.2.2", "fw3": "192.0.2.3"}


def run_recursive(c: ClientSetup) -> tuple[dict[str, tuple], list[m.Message]]:
    """fw1..fw3 each: RequesterSide, then NextHop towards the next, as proxy.py does."""
    records: dict[str, tuple] = {}

    def serve(name: str, peer_ip: str, talk) -> m.Message:
        """Run proxy ``name`` against a requester given as a talk(msg) -> [replies]."""
        s = side(name, peer_ip=peer_ip)
        pending = talk(s.start())
        while s.admitted is None:
            out = s.receive(pending.pop(0))
            for o in out:
                pending += talk(o)
        adm = s.admitted
        near, far = PORTS[name]
        if adm.next_hop is None:
            records[name] = (adm.origin, adm.request.server)
            ch = EndToEnd(name, keys_of(name), adm.request.user).challenge() \
                if adm.request.encrypt and not adm.direct else None
            return m.Reply(adm.request.rid, name, m.Endpoint(IP[name], near),
                           m.Endpoint(IP[name], far), True, path=[name], challenge=ch)
        nh = NextHop(name, keys_of(name), adm.next_hop, adm, m.Endpoint(IP[name], far))
        nxt = adm.next_hop.name
        def next_talk(msg: m.Message) -> list[m.Message]:
            return list(nh.receive(msg)) if nh.reply is None else []

        reply = serve(nxt, IP[name], next_talk)
        nh.receive(reply)
        records[name] = (adm.origin, nh.reply.near)
        return nh.answer_up(m.Endpoint(IP[name], near))

    def client_talk(msg: m.Message) -> list[m.Message]:
        return c.receive(msg)

    final = serve("fw1", "10.1.0.2", client_talk)
    out = c.receive(final)
    return records, out


def test_recursive_chain_of_three_in_memory():
    c = client("recursive")
    records, out = run_recursive(c)
    assert out == [] and c.done
    assert c.first == m.Endpoint("192.0.2.1", 41000)  # 2141: fw1's P2
    assert c.last == m.Endpoint("192.0.2.3", 43001)  # 2142: fw3's P5
    assert c.path == ["fw1", "fw2", "fw3"]
    # 3141/3142 per proxy (Fig. 9's resulting state)
    assert records["fw1"][1] == m.Endpoint("192.0.2.2", 42000)  # fw2's P4
    assert records["fw2"][1] == m.Endpoint("192.0.2.3", 43000)  # fw3's P4
    assert records["fw3"][1] == SERVER  # the server's P6
    assert all(r[0] == m.Endpoint("10.1.0.2", 4000) for r in records.values())


def test_recursive_with_a_wrong_hop_key_names_that_hop():
    OVERRIDE["fw2"] = {"fw3": os.urandom(32)}  # fw2 and fw3 disagree on their key
    try:
        with pytest.raises(Refuse) as err:
            run_recursive(client("recursive"))
        assert (err.value.msg.hop, err.value.msg.reason) == ("fw3", "authentication")
    finally:
        OVERRIDE.clear()


def test_recursive_encrypted_brings_the_last_hops_challenge():
    c = client("recursive", encrypt=True)
    _, out = run_recursive(c)
    assert len(out) == 1 and isinstance(out[0], m.Relay) and c.state == "e2e-proof"
    assert c.hop == "fw3"


class Iterative:
    """fw1..fw3 and the client in memory, wired as proxy.py wires them: each proxy's
    RequesterSide on its requester connection, and, once extended, its RelayFilter on
    the connection to the next proxy. ``tamper`` may alter what crosses a proxy leg."""

    def __init__(self, c: ClientSetup, tamper=None, acls: dict | None = None) -> None:
        self.c = c
        self.acls = acls or {}
        self.names = ["fw1", "fw2", "fw3"]
        self.sides: list[RequesterSide] = []
        self.filters: list[RelayFilter] = []
        self.p4: dict[str, m.Endpoint] = {}
        self.tamper = tamper or (lambda leg, msg: msg)
        self.legs: list[tuple[str, m.Message]] = []

    def run(self) -> None:
        self.open(0, "10.1.0.2")

    def open(self, k: int, peer_ip: str) -> None:
        s = side(self.names[k], peer_ip=peer_ip, acl=self.acls.get(self.names[k], ACL))
        self.sides.append(s)
        self.up(k, s.start())

    def cross(self, leg: str, msg: m.Message) -> m.Message:
        self.legs.append((leg, msg))
        return self.tamper(leg, msg)

    def down(self, k: int, msg: m.Message) -> None:
        """``msg`` arrives at proxy k from its requester."""
        if k > 0:
            msg = self.cross(f"{self.names[k - 1]}->{self.names[k]}", msg)
        s = self.sides[k]
        if s.admitted is None:
            outs = s.receive(msg)
            if s.admitted is not None:  # admitted by this very message
                self.answer(k)
            for out in outs:
                self.up(k, out)
        elif len(self.filters) > k:
            self.down(k + 1, self.filters[k].from_requester(msg))
        else:
            if s.channel is not None:
                msg = s.open(msg)
            assert isinstance(msg, m.Extend) and msg.rid == s.admitted.request.rid
            name, far = self.names[k], PORTS[self.names[k]][1]
            self.filters.append(RelayFilter(name, keys_of(name), s.admitted.next_hop,
                                            s.admitted, m.Endpoint(IP[name], far)))
            self.open(k + 1, IP[name])

    def answer(self, k: int) -> None:
        s, name = self.sides[k], self.names[k]
        adm = s.admitted
        near, far = PORTS[name]
        reply = m.Reply(adm.request.rid, name, m.Endpoint(IP[name], near),
                        m.Endpoint(IP[name], far), adm.next_hop is None, path=[name])
        for out in s.to_requester(reply):
            self.up(k, out)

    def up(self, k: int, msg: m.Message) -> None:
        """``msg`` leaves proxy k towards its requester."""
        if k == 0:
            for out in self.c.receive(msg):
                self.down(0, out)
            return
        msg = self.cross(f"{self.names[k]}->{self.names[k - 1]}", msg)
        step = self.filters[k - 1].from_next(msg)
        for out in step.down:
            self.down(k, out)
        if step.p4 is not None:
            self.p4[self.names[k - 1]] = step.p4
        for out in step.up:
            self.up(k - 1, out)


def test_iterative_chain_of_three_in_memory():
    """The client authenticates with each proxy through those already built, each proxy
    with the next as itself; the relay filters learn the next P4 from the next proxy."""
    c = client("iterative")
    net = Iterative(c)
    net.run()
    assert c.done and c.path == ["fw1", "fw2", "fw3"]
    assert c.first == m.Endpoint("192.0.2.1", 41000) and c.last == m.Endpoint("192.0.2.3", 43001)
    assert net.p4 == {"fw1": m.Endpoint("192.0.2.2", 42000),
                      "fw2": m.Endpoint("192.0.2.3", 43000)}
    adm3 = net.sides[2].admitted
    # fw3 saw the client authenticate itself, relayed, and fw2 vouch for its part
    assert adm3.direct and adm3.peer == "fw2" and adm3.request.via == ["fw1", "fw2"]
    assert adm3.request.requester == m.Endpoint("192.0.2.2", 42001)
    assert adm3.origin == m.Endpoint("10.1.0.2", 4000)
    assert [s.auth.peer_id for s in net.sides] == ["alice", "fw1", "fw2"]
    # on the proxy legs: each proxy's own authentication and request (sealed on the leg
    # by proxy.py), the client's relayed authentication, and the client's part sealed
    # end to end; a plain Request there is always the sending proxy's own part
    for leg, msg in net.legs:
        assert isinstance(msg, m.Challenge | m.Answer | m.Proof | m.Request | m.Reply |
                          m.Relay | m.Sealed), (leg, msg)
        if isinstance(msg, m.Request):
            assert msg.via[-1] == leg.split("->")[0]
        if isinstance(msg, m.Reply):  # the next proxy's P4 for the relaying one
            assert msg.rid in {f.next.rid for f in net.filters}
    # fw1-fw2: request, reply, extend for fw2; request and reply for fw3; fw2-fw3: those two
    assert sum(isinstance(msg, m.Sealed) for _, msg in net.legs) == 7


def test_iterative_encryption_keys_come_from_the_relayed_authentication():
    c = client("iterative", encrypt=True)
    net = Iterative(c)
    net.run()
    adm3 = net.sides[2].admitted
    assert c.done and c.session_keys == adm3.client_auth.session_keys()[::-1]


@pytest.mark.parametrize("leg", ["fw1->fw2", "fw2->fw1", "fw2->fw3", "fw3->fw2"])
def test_iterative_a_proxy_altering_the_clients_exchange_is_caught(leg):
    """A relaying proxy (not a man in the middle: that one meets the hop seal) changes
    the end-to-end part: the far end refuses it as integrity."""
    def tamper(where, msg):
        if where == leg and isinstance(msg, m.Sealed):
            return m.Sealed(msg.data[:-1] + bytes([msg.data[-1] ^ 1]))
        return msg

    c = client("iterative")
    with pytest.raises((Refuse, SetupFailed)) as err:
        Iterative(c, tamper).run()
    e = err.value
    hop, reason = (e.msg.hop, e.msg.reason) if isinstance(e, Refuse) else (e.hop, e.reason)
    assert reason == "integrity"
    assert hop == {"fw1->fw2": "fw2", "fw2->fw1": "fw2", "fw2->fw3": "fw3",
                   "fw3->fw2": "fw3"}[leg]


def test_iterative_refusal_at_fw2_reaches_the_client_naming_it():
    c = client("iterative", fw2=os.urandom(32))
    net = Iterative(c)
    with pytest.raises(Refuse) as err:
        net.run()
    assert (err.value.msg.hop, err.value.msg.reason) == ("fw2", "authentication")
    with pytest.raises(Refuse) as passed:  # fw1 passes it up as it is
        net.up(1, err.value.msg)
    with pytest.raises(SetupFailed) as failed:
        c.receive(passed.value.msg)
    assert (failed.value.hop, failed.value.reason) == ("fw2", "authentication")


def test_relay_filter_names_a_next_hop_lost_during_setup_only():
    f = RelayFilter("fw1", keys_of("fw1"), t.Hop("fw2", "192.0.2.2", 1092), admitted(),
                    m.Endpoint("192.0.2.1", 41001))
    assert f.authenticating  # a bounded wait: fw2 must speak up
    msg = f.lost("closed the connection").msg
    assert (msg.hop, msg.reason, msg.rid) == ("fw1", "next-hop", 7)
    assert "fw2 closed the connection during setup" in msg.text
    fw2 = side("fw2", peer_ip="192.0.2.1")
    (answer,) = f.from_next(fw2.start()).down
    (req,) = f.from_next(fw2.receive(answer)[0]).down
    assert not f.authenticating and f.lost("closed the connection") is not None
    f.from_next(m.Reply(req.rid, "fw2", m.Endpoint("192.0.2.2", 42000), m.Endpoint("h", 2),
                        True))
    assert f.lost("closed the connection") is None  # set up: the session just ends


def test_iterative_a_later_hops_refusal_is_sealed_and_a_plain_one_in_its_name_refused():
    """fw3 refuses the client's sealed request (its ACL): proxy.py sends that refusal
    sealed end to end (``to_requester``), so the proxies between pass it on unread and
    the client takes it on fw3's own word. A plain refusal in fw3's name (fw2 or fw1
    making one up, or changing the reason) is an integrity failure at the client; on
    the old code the client believed it."""
    deny = t.parse_acl([{"user": "alice", "from": "10.9.0.0/16", "ports": "any"}])
    c = client("iterative")
    net = Iterative(c, acls={"fw3": deny})
    with pytest.raises(Refuse) as err:
        net.run()
    refusal = err.value.msg
    assert (refusal.hop, refusal.reason) == ("fw3", "access")
    (sealed,) = net.sides[2].to_requester(refusal)
    assert isinstance(sealed, m.Sealed)
    with pytest.raises(SetupFailed) as genuine:
        net.up(2, sealed)  # through fw2's and fw1's relay filters, unread
    g = genuine.value
    assert (g.hop, g.reason, g.reported_by, g.verified) == ("fw3", "access", "fw3", True)
    assert "not authenticated" not in str(g)
    for forged in (refusal, m.Refused(0, "fw3", "route", "made up by fw2")):
        c2 = client("iterative")
        net2 = Iterative(c2, acls={"fw3": deny})
        with pytest.raises(Refuse):
            net2.run()
        with pytest.raises(Refuse) as passed:  # fw2, then fw1, pass a plain one up as is
            net2.up(2, forged)
        with pytest.raises(SetupFailed) as failed:
            c2.receive(passed.value.msg)
        f = failed.value
        assert (f.hop, f.reason, f.reported_by, f.verified) == ("fw3", "integrity", "fw1",
                                                                 False)
        assert "did not seal end to end" in f.text


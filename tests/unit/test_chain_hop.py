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
)
from kakehashi.chain.setup import E2E_PURPOSE, HOP_PURPOSE, ClientSetup, SetupFailed
from kakehashi.core.crypto import MutualAuth

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


def test_forwarded_request_must_name_its_origin_and_come_from_its_last_via():
    s = side("fw2", peer_ip="192.0.2.1")
    login(s, "fw1", KEY["fw1-fw2"])
    assert refused(s.receive, request(via=["fw1"])).reason == "protocol"
    s = side("fw2", peer_ip="192.0.2.1")
    login(s, "fw1", KEY["fw1-fw2"])
    assert refused(s.receive, request(via=["fwX"], origin=SERVER)).reason == "access"


def test_iterative_client_authenticated_through_a_relay_is_direct():
    s = side("fw2", peer_ip="192.0.2.1")
    login(s, "alice", KEY["alice-fw2"], relayed=True)
    assert not s.sealing  # the connection is fw1's: not sealed with alice's keys
    s.receive(request(via=["fw1"], origin=m.Endpoint("10.1.0.2", 4000), mode="iterative"))
    assert s.admitted.direct and s.admitted.peer == "alice"


def test_a_direct_client_cannot_claim_an_origin_nor_strip_the_relayed_mark():
    s = side("fw2", peer_ip="192.0.2.1")
    login(s, "alice", KEY["alice-fw2"])
    assert s.sealing
    msg = refused(s.receive, request(via=["fw1"], origin=m.Endpoint("10.9.0.9", 1),
                                     mode="iterative"))
    assert msg.reason == "protocol"
    # the mark is bound into the MAC: flipped on the way, the answer fails
    s = side("fw2", peer_ip="192.0.2.1")
    ch = s.start()
    a = MutualAuth("initiator", "alice", {"fw2": KEY["alice-fw2"]}, HOP_PURPOSE)
    assert refused(s.receive, m.Answer(*a.answer(ch.hop, ch.nonce, m.RELAYED))).reason == \
        "authentication"


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
    return Admitted(request(), "alice", m.Endpoint("10.1.0.2", 4000), True,
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
def test_relay_filter_rewrites_requests_and_accepts_only_relayed_replies():
    f = RelayFilter("fw1", m.Endpoint("192.0.2.1", 41001), m.Endpoint("10.1.0.2", 4000))
    out = f.from_requester(request(rid=11, mode="iterative",
                                   origin=m.Endpoint("6.6.6.6", 1)))
    assert out.requester == m.Endpoint("192.0.2.1", 41001) and out.via == ["fw1"]
    assert out.origin == m.Endpoint("10.1.0.2", 4000)  # a client cannot choose its origin
    stray = m.Reply(12, "fw2", m.Endpoint("h", 1), m.Endpoint("h", 2), False)
    assert refused(f.from_next, stray).reason == "protocol"
    first = m.Reply(11, "fw2", m.Endpoint("192.0.2.2", 42000), m.Endpoint("h", 2), False)
    assert f.from_next(first) == (first, m.Endpoint("192.0.2.2", 42000))
    f.from_requester(request(rid=13, mode="iterative"))
    later = m.Reply(13, "fw3", m.Endpoint("192.0.2.3", 43000), m.Endpoint("h", 3), True)
    assert f.from_next(later) == (later, None)  # 3142 keeps fw2's P4
    assert refused(f.from_next, first).reason == "protocol"  # answered already
    assert refused(f.from_requester, m.Proof(os.urandom(32))).reason == "protocol"
    assert refused(f.from_next, m.Answer("x", os.urandom(32), os.urandom(32))).reason == \
        "protocol"


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


def test_iterative_chain_of_three_in_memory():
    """The client authenticates with each proxy through those already built; each relay
    filter rewrites the request and learns the next P4 from the first reply."""
    c = client("iterative")
    filters: list[RelayFilter] = []
    admitted_by: dict[str, Admitted] = {}
    to_client = []
    for name in ("fw1", "fw2", "fw3"):
        peer_ip = "10.1.0.2" if not filters else IP[f"fw{len(filters)}"]
        s = side(name, peer_ip=peer_ip)

        def up(msg, filters=filters):
            for f in reversed(filters):
                msg, p4 = f.from_next(msg)
                if p4 is not None:
                    f.p4 = p4
            return c.receive(msg)

        def down(msg, filters=filters):
            for f in filters:
                msg = f.from_requester(msg)
            return msg

        pending = [down(x) for x in up(s.start())]
        while s.admitted is None:
            for out in s.receive(pending.pop(0)):
                pending += [down(x) for x in up(out)]
        adm = admitted_by[name] = s.admitted
        near, far = PORTS[name]
        reply = m.Reply(adm.request.rid, name, m.Endpoint(IP[name], near),
                        m.Endpoint(IP[name], far), adm.next_hop is None, path=[name])
        to_client = up(reply)
        if adm.next_hop is not None:
            assert to_client == [m.Extend(adm.request.rid)]
            filters.append(RelayFilter(name, m.Endpoint(IP[name], far), adm.origin))
    assert c.done and to_client == []
    assert c.first == m.Endpoint("192.0.2.1", 41000) and c.last == m.Endpoint("192.0.2.3", 43001)
    assert filters[0].p4 == m.Endpoint("192.0.2.2", 42000)
    assert filters[1].p4 == m.Endpoint("192.0.2.3", 43000)
    # fw2 and fw3 saw the client authenticate itself, relayed, with the first hop's origin
    assert admitted_by["fw3"].peer == "alice" and admitted_by["fw3"].direct
    assert admitted_by["fw3"].request.via == ["fw1", "fw2"]
    assert admitted_by["fw3"].request.requester == m.Endpoint("192.0.2.2", 42001)
    assert admitted_by["fw3"].origin == m.Endpoint("10.1.0.2", 4000)


def test_iterative_refusal_at_fw2_reaches_the_client_naming_it():
    c = client("iterative", fw2=os.urandom(32))
    s1 = side("fw1")
    pending = c.receive(s1.start())
    while s1.admitted is None:
        pending += [x for o in s1.receive(pending.pop(0)) for x in c.receive(o)]
    adm = s1.admitted
    (extend,) = c.receive(m.Reply(adm.request.rid, "fw1", m.Endpoint("h", 1),
                                  m.Endpoint("h", 2), False, path=["fw1"]))
    assert isinstance(extend, m.Extend)
    f = RelayFilter("fw1", m.Endpoint("h", 2), adm.origin)
    s2 = side("fw2", peer_ip="192.0.2.1")
    (answer,) = c.receive(f.from_next(s2.start())[0])
    with pytest.raises(Refuse) as err:
        s2.receive(f.from_requester(answer))
    with pytest.raises(SetupFailed) as failed:
        c.receive(f.from_next(err.value.msg)[0])
    assert (failed.value.hop, failed.value.reason) == ("fw2", "authentication")

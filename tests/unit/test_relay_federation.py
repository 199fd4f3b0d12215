"""Relay federation, sans-IO: two (or three) control units wired by hand.

A requester logged in at node A reaches a target at node B over an inter-node link
("trunk"): A's unit opens it, B's unit authenticates it with the cluster secret and
decides the request as a local one; data is paired on both nodes and the end/release
handshake crosses the link, which is then idle for the next request.
"""

from __future__ import annotations

import pytest

from kakehashi.relay import federation as fed
from kakehashi.relay import messages as m
from kakehashi.relay.control import (
    Close,
    OpenTrunk,
    Pair,
    PublishPresence,
    RemoteDeliver,
    State,
    Unpair,
)
from tests.unit.test_relay_control import Relay, closes, one, sent

SECRET = fed.derive_secret("s3cret")


def node(name: str, **settings) -> Relay:
    r = Relay(node=name, cluster_secret=SECRET, **settings)
    r.cu.cluster_state(True)
    return r


def publish(src: Relay, *dsts: Relay) -> None:
    """Carry the presence ``src`` published (what Redis does) to the other nodes."""
    for action in src.last:
        if isinstance(action, PublishPresence):
            for dst in dsts:
                dst.cu.remote_presence(src.cu.settings.node, action.user, action.info)


def link(a: Relay, b: Relay, *, tls: bool = False) -> tuple[int, int]:
    """An authenticated link from ``a`` to ``b``: (its id at a, its id at b)."""
    tb = b.cu.connection_made("10.9.0.1", encrypted=tls)
    nonce = fed.new_nonce()
    ch = one(b.recv(tb, m.NodeHello(node=a.cu.settings.node, nonce=nonce)), tb,
             m.NodeChallenge)
    assert fed.check_proof(fed.node_proof(SECRET, "callee", b.cu.settings.node,
                                          a.cu.settings.node, nonce, ch.nonce), ch.proof)
    proof = fed.node_proof(SECRET, "caller", a.cu.settings.node, b.cu.settings.node,
                           nonce, ch.nonce)
    one(b.recv(tb, m.NodeProof(proof=proof)), tb, m.NodeWelcome)
    ta = a.cu.connection_made(b.cu.settings.node, encrypted=tls, trunk=b.cu.settings.node)
    return ta, tb


def setup_pair(tls: bool = False, **target):
    a, b = node("a"), node("b")
    pi = b.login("pi", attrs=m.Attrs(services=["echo"]), encrypted=tls, **target)
    publish(b, a)
    laptop = a.login("laptop", encrypted=tls)
    return a, b, pi, laptop


def request(a: Relay, b: Relay, laptop: int, *, req: int = 7, tls: bool = False):
    acts = a.recv(laptop, m.ConnectRequest(req=req, target="pi", service="echo"))
    (opener,) = [x for x in acts if isinstance(x, OpenTrunk)]
    assert opener.node == "b"
    ta, tb = link(a, b, tls=tls)
    nc = one(a.cu.trunk_opened(ta, opener.req), ta, m.NodeConnect)
    assert (nc.requester, nc.target, nc.req) == ("laptop", "pi", req)
    return ta, tb, nc


def test_cross_node_session_pairs_on_both_nodes_and_the_link_is_reused():
    a, b, pi, laptop = setup_pair()
    ta, tb, nc = request(a, b, laptop)
    note = one(b.recv(tb, nc), pi, m.Notify)  # step 14 at the target's node
    assert note.peer == "laptop" and note.service == "echo"
    acts = b.recv(pi, m.Accept(req=note.req))
    assert Pair(tb, pi) in acts
    result = one(acts, tb, m.Result)
    acts = a.recv(ta, result)
    assert Pair(laptop, ta) in acts and one(acts, laptop, m.Result).ok
    assert a.state(laptop) is State.PAIRED and b.state(pi) is State.PAIRED
    # end and release cross the link (steps 26-28')
    end = one(a.recv(laptop, m.End(reason="done")), ta, m.End)
    one(b.recv(tb, end), pi, m.End)
    acts = a.recv(laptop, m.Release())
    assert Unpair(laptop) in acts
    rel = one(acts, ta, m.Release)
    assert not sent(b.recv(tb, rel), tb, m.Released)  # the target has not released yet
    acts = b.recv(pi, m.Release())
    one(acts, pi, m.Released)
    released = one(acts, tb, m.Released)
    acts = a.recv(ta, released)
    one(acts, laptop, m.Released)
    assert not sent(acts, ta)  # the calling node does not answer a release reply
    assert a.state(laptop) is State.IDLE and a.state(ta) is State.IDLE
    assert b.state(tb) is State.IDLE and b.state(pi) is State.IDLE
    # the next request takes the idle link: no new one is opened
    acts = a.recv(laptop, m.ConnectRequest(req=8, target="pi", service="echo"))
    assert not [x for x in acts if isinstance(x, OpenTrunk)]
    assert one(acts, ta, m.NodeConnect).req == 8


def test_refusal_at_the_target_node_reaches_the_requester_and_frees_the_link():
    a, b, pi, laptop = setup_pair()
    ta, tb, nc = request(a, b, laptop)
    note = one(b.recv(tb, nc), pi, m.Notify)
    fail = one(b.recv(pi, m.Refuse(req=note.req, reason="not now")), tb, m.Result)
    res = one(a.recv(ta, fail), laptop, m.Result)
    assert not res.ok and res.message == "not now"
    assert a.state(ta) is State.IDLE and a.state(laptop) is State.IDLE


def test_target_gone_from_its_node_tries_the_next_node():
    a, b, _c = node("a"), node("b"), node("c")
    a.cu.remote_presence("b", "pi", fed.PresenceInfo(services=("echo",), seq=2))
    a.cu.remote_presence("c", "pi", fed.PresenceInfo(services=("echo",), seq=1))
    laptop = a.login("laptop")
    acts = a.recv(laptop, m.ConnectRequest(req=1, target="pi", service="echo"))
    (opener,) = [x for x in acts if isinstance(x, OpenTrunk)]
    assert opener.node == "b"  # the newest claim first
    ta, tb = link(a, b)
    nc = one(a.cu.trunk_opened(ta, opener.req), ta, m.NodeConnect)
    err = one(b.recv(tb, nc), tb, m.Error)  # pi is not at b (any more)
    assert err.code == "not-logged-in"
    acts = a.recv(ta, err)
    assert [x.node for x in acts if isinstance(x, OpenTrunk)] == ["c"]
    assert a.state(ta) is State.IDLE


def test_unreachable_node_is_forgotten_and_the_next_one_tried():
    a = node("a")
    a.cu.remote_presence("b", "pi", fed.PresenceInfo(services=("echo",), seq=2))
    a.cu.remote_presence("c", "pi", fed.PresenceInfo(services=("echo",), seq=1))
    laptop = a.login("laptop")
    (opener,) = [x for x in a.recv(laptop, m.ConnectRequest(req=1, target="pi"))
                 if isinstance(x, OpenTrunk)]
    acts = a.cu.trunk_failed("b", opener.req, "connection refused")
    assert [x.node for x in acts if isinstance(x, OpenTrunk)] == ["c"]
    assert a.cu.directory.nodes_of("pi") == ["c"]
    acts = a.cu.trunk_failed("c", opener.req, "connection refused")
    res = one(acts, laptop, m.Result)
    assert not res.ok and res.code == "target-lost"


def test_requester_lost_while_the_other_node_decides_cuts_the_link():
    a, b, _pi, laptop = setup_pair()
    ta, _tb, _nc = request(a, b, laptop)
    acts = a.cu.connection_lost(laptop, a.now)
    assert Close(ta, "requester lost") in acts


def test_requester_lost_during_a_session_releases_the_link_for_reuse():
    a, b, pi, laptop = setup_pair()
    ta, tb, nc = request(a, b, laptop)
    note = one(b.recv(tb, nc), pi, m.Notify)
    a.recv(ta, one(b.recv(pi, m.Accept(req=note.req)), tb, m.Result))
    acts = a.cu.connection_lost(laptop, a.now)
    one(acts, ta, m.End)
    rel = one(acts, ta, m.Release)
    one(b.recv(tb, m.End(reason="peer connection lost")), pi, m.End)
    b.recv(tb, rel)
    released = one(b.recv(pi, m.Release()), tb, m.Released)
    a.recv(ta, released)
    assert a.state(ta) is State.IDLE


def test_request_timeout_closes_the_busy_link():
    a, b, _pi, laptop = setup_pair()
    ta, _tb, _nc = request(a, b, laptop)
    a.now += 100
    acts = a.cu.tick(a.now)
    assert not one(acts, laptop, m.Result).ok
    assert any(isinstance(x, Close) and x.conn == ta for x in acts)


# -- encryption enforcement across nodes (Figs. 3 and 4) ---------------------------------
def test_fig3_target_requiring_encryption_instructs_the_requester_at_its_own_node():
    a, b = node("a"), node("b")
    b.login("pi", attrs=m.Attrs(services=["echo"]), encrypted=True, encryption="required")
    publish(b, a)
    laptop = a.login("laptop", encrypted=False)
    acts = a.recv(laptop, m.ConnectRequest(req=3, target="pi", service="echo"))
    one(acts, laptop, m.EncryptInstruct)  # step 12 before anything leaves node A
    assert not [x for x in acts if isinstance(x, OpenTrunk)]
    a.cu.tls_established(laptop)  # STARTTLS on this hop, then step 13
    acts = a.recv(laptop, m.EncryptAccept(req=3))
    assert [x.node for x in acts if isinstance(x, OpenTrunk)] == ["b"]


def test_encrypted_session_asks_for_an_encrypted_node_link():
    """Every hop of an encrypted session is encrypted: a plaintext link in the pool does
    not carry it; the calling node opens one upgraded with STARTTLS instead."""
    a, b, _pi, laptop = setup_pair(tls=True, encryption="required")
    plain, _ = link(a, b, tls=False)
    a.cu.trunk_opened(plain, 0)  # an idle plaintext link (a spare)
    acts = a.recv(laptop, m.ConnectRequest(req=3, target="pi", service="echo"))
    (opener,) = [x for x in acts if isinstance(x, OpenTrunk)]
    assert opener.tls and not sent(acts, plain)
    ta, _tb = link(a, b, tls=True)
    assert one(a.cu.trunk_opened(ta, opener.req), ta, m.NodeConnect).hop_encrypted
    # a request that needs no encryption takes the plaintext link (it splices)
    other = a.login("laptop", encrypted=False, attrs=m.Attrs(encryption="optional"))
    b2 = b.login("bob", attrs=m.Attrs(services=["echo"]))
    publish(b, a)
    acts = a.recv(other, m.ConnectRequest(req=4, target="bob", service="echo"))
    assert one(acts, plain, m.NodeConnect).target == "bob" and b2


def test_plaintext_node_link_cannot_carry_an_encrypted_session():
    """The called node checks too: a request that needs encryption on a link that is
    not TLS is refused, whatever the calling node did."""
    a, b, _pi, _laptop = setup_pair(tls=True, encryption="required")
    tb = link(a, b, tls=False)[1]
    nc = m.NodeConnect(req=1, requester="laptop", target="pi", service="echo",
                       hop_encrypted=True)
    res = one(b.recv(tb, nc), tb, m.Result)
    assert not res.ok and res.code == "encryption-required"
    assert "between relay nodes" in res.message


def test_node_link_upgrades_with_starttls_when_idle_only():
    a, b, _pi, _laptop = setup_pair()
    _ta, tb = link(a, b)
    acts = b.recv(tb, m.StartTLS())
    one(acts, tb, m.TLSGo)
    b.cu.tls_established(tb)
    assert b.cu.conns[tb].link_encrypted


def test_encrypted_session_over_a_tls_node_link_is_notified_encrypted():
    a, b, pi, laptop = setup_pair(tls=True, encryption="required")
    _ta, tb, nc = request(a, b, laptop, tls=True)
    assert one(b.recv(tb, nc), pi, m.Notify).encrypt


def test_fig4_requester_that_cannot_encrypt_asks_the_target_node_policy():
    a, b = node("a"), node("b")
    pi = b.login("pi", attrs=m.Attrs(services=["echo"]), encrypted=True,
                 encryption="required", insecure_peer="ask")
    publish(b, a)
    laptop = a.login("laptop", attrs=m.Attrs(encryption="off"))
    _ta, tb, nc = request(a, b, laptop, tls=True)
    assert nc.encryption == "off"
    note = one(b.recv(tb, nc), pi, m.Notify)
    assert note.insecure and not note.encrypt  # para 0037: the target is asked


def test_e2e_keys_cross_the_nodes():
    a, b = node("a"), node("b")
    pi = b.login("pi", attrs=m.Attrs(services=["echo"]), pubkey="PIKEY")
    publish(b, a)
    laptop = a.login("laptop", pubkey="LAPKEY")
    acts = a.recv(laptop, m.ConnectRequest(req=1, target="pi", e2e=True))
    (opener,) = [x for x in acts if isinstance(x, OpenTrunk)]
    ta, tb = link(a, b)
    nc = one(a.cu.trunk_opened(ta, opener.req), ta, m.NodeConnect)
    note = one(b.recv(tb, nc), pi, m.Notify)
    assert note.e2e and note.peer_key == "LAPKEY"
    res = one(b.recv(pi, m.Accept(req=note.req)), tb, m.Result)
    assert one(a.recv(ta, res), laptop, m.Result).peer_key == "PIKEY"


# -- the inter-node link is never open to the public ------------------------------------
def test_wrong_cluster_secret_is_refused():
    b = node("b")
    tb = b.cu.connection_made("203.0.113.9", encrypted=False)
    b.recv(tb, m.NodeHello(node="evil", nonce=fed.new_nonce()))
    acts = b.recv(tb, m.NodeProof(proof=b"\0" * 32))
    assert one(acts, tb, m.Error).code == "node-auth"
    assert closes(acts)
    # whatever it sends next is ignored: it never became a link
    assert b.recv(tb, m.NodeConnect(req=1, requester="x", target="y")) == []


def test_proof_of_another_link_is_refused():
    """A proof is bound to both nonces: one seen on another link does not open this one."""
    b = node("b")
    t1 = b.cu.connection_made("10.9.0.1", encrypted=False)
    n1 = fed.new_nonce()
    ch1 = one(b.recv(t1, m.NodeHello(node="a", nonce=n1)), t1, m.NodeChallenge)
    good = fed.node_proof(SECRET, "caller", "a", "b", n1, ch1.nonce)
    t2 = b.cu.connection_made("203.0.113.9", encrypted=False)
    b.recv(t2, m.NodeHello(node="a", nonce=n1))
    assert one(b.recv(t2, m.NodeProof(proof=good)), t2, m.Error).code == "node-auth"


def test_node_messages_need_an_authenticated_link():
    b = node("b")
    t = b.cu.connection_made("203.0.113.9", encrypted=False)
    acts = b.recv(t, m.NodeConnect(req=1, requester="x", target="y"))
    assert one(acts, t, m.Error).code == "protocol"
    pi = b.login("pi")
    acts = b.recv(pi, m.NodeConnect(req=1, requester="x", target="y"))
    assert "terminal" in one(acts, pi, m.Error).message


def test_a_link_carries_only_requests():
    a, b, _pi, _laptop = setup_pair()
    _ta, tb = link(a, b)
    assert one(b.recv(tb, m.Who()), tb, m.Error).code == "protocol"


def test_standalone_relay_refuses_a_node():
    r = Relay()
    t = r.cu.connection_made("203.0.113.9", encrypted=False)
    acts = r.recv(t, m.NodeHello(node="a", nonce=fed.new_nonce()))
    assert one(acts, t, m.Error).code == "node-auth" and closes(acts)


# -- presence, who, broadcast cluster-wide --------------------------------------------
def test_watchers_hear_of_users_of_other_nodes_once():
    a = node("a")
    w = a.login("watcher")
    a.recv(w, m.Subscribe())
    info = fed.PresenceInfo(services=("echo",), seq=1)
    acts = a.cu.remote_presence("b", "pi", info)
    assert one(acts, w, m.Presence).online
    assert not sent(a.cu.remote_presence("c", "pi", info), w)  # already online
    assert not sent(a.cu.remote_presence("b", "pi", None), w)  # still at c
    assert not one(a.cu.remote_presence("c", "pi", None), w, m.Presence).online


def test_remote_presence_respects_the_notify_policy():
    a = node("a")
    w = a.login("watcher")
    a.recv(w, m.Subscribe())
    hidden = fed.PresenceInfo(notify="only", notify_users=("friend",))
    assert not sent(a.cu.remote_presence("b", "pi", hidden), w)
    who = one(a.recv(w, m.Who()), w, m.WhoList)
    assert "pi" not in [u.user for u in who.users]


def test_who_merges_local_and_remote_users():
    a, _b, _pi, laptop = setup_pair()
    a.cu.remote_presence("c", "pi", fed.PresenceInfo(services=("ssh",), connections=2))
    users = {u.user: u for u in one(a.recv(laptop, m.Who()), laptop, m.WhoList).users}
    assert set(users) == {"laptop", "pi"}
    assert users["pi"].services == ["echo", "ssh"] and users["pi"].connections == 3


def test_broadcast_to_a_user_of_another_node():
    a, b, pi, laptop = setup_pair()
    acts = a.recv(laptop, m.Broadcast(targets=["pi", "nobody"], body=b"hi"))
    assert RemoteDeliver("b", "laptop", "pi", b"hi") in acts
    res = one(acts, laptop, m.BroadcastResult)
    assert res.delivered == ["pi"] and res.missing == ["nobody"]
    one(b.cu.remote_deliver("laptop", "pi", b"hi"), pi, m.Deliver)


def test_local_presence_is_published_and_withdrawn():
    b = node("b")
    pi = b.login("pi", attrs=m.Attrs(services=["echo"]))
    (pub,) = [x for x in b.last if isinstance(x, PublishPresence)]
    assert pub.info is not None and pub.info.services == ("echo",)
    acts = b.cu.connection_lost(pi, b.now)
    assert PublishPresence("pi", None) in acts


# -- defined states without the cluster state ------------------------------------------
def test_node_without_the_cluster_state_refuses_logins_and_requests():
    a, _b, _pi, laptop = setup_pair()
    a.cu.cluster_state(False)
    c = a.cu.connection_made("10.0.0.9", encrypted=False)
    fail = one(a.recv(c, m.Login(user="x", password="pw")), c, m.LoginFail)
    assert fail.code == "cluster-down"
    err = one(a.recv(laptop, m.ConnectRequest(req=1, target="pi")), laptop, m.Error)
    assert err.code == "cluster-down"


def test_fence_closes_every_connection_and_forgets_the_cluster():
    a, b, _pi, laptop = setup_pair()
    ta, _tb = link(a, b)
    acts = a.cu.fence("lost the cluster state")
    assert {x.conn for x in acts if isinstance(x, Close)} == {laptop, ta}
    assert not a.cu.directory.users


def test_set_directory_replaces_what_is_known():
    a = node("a")
    a.cu.set_directory({"b": {"pi": fed.PresenceInfo()}, "c": {"pc": fed.PresenceInfo()}})
    a.cu.set_directory({"c": {"pc": fed.PresenceInfo()}})
    assert not a.cu.directory.online("pi") and a.cu.directory.online("pc")


# -- the shared entries ----------------------------------------------------------------
def test_presence_info_round_trip_and_malformed_entries():
    info = fed.PresenceInfo(encryption="required", services=("echo",), connections=3,
                            notify="except", notify_users=("x",), allowed_peers=("y",),
                            pubkey="K", seq=9)
    assert fed.PresenceInfo.from_doc(info.to_doc()) == info
    for bad in ({"e": "sometimes"}, {"c": "many"}, {"n": "all", "s": 5}, []):
        with pytest.raises(ValueError):
            fed.PresenceInfo.from_doc(bad)  # type: ignore[arg-type]

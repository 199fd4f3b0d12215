"""ControlUnit and TerminalConn on the flows the review of issue 7 found broken:
service routing, the Fig. 4 "ask" path, release without end, cleanup of requests
nobody answers, paged user lists, crossing requests and a hostile end notification.
"""

from __future__ import annotations

import pytest

from kakehashi.core import wire
from kakehashi.relay import messages as m
from kakehashi.relay import terminal as t
from kakehashi.relay.control import Close, Pair, Settings, State
from tests.unit.test_relay_control import Relay, one, pair, sent


@pytest.fixture
def r() -> Relay:
    return Relay()


def _spare(r: Relay, name: str) -> tuple[int, list]:
    """A spare connection logging in (steps 17-19); its actions too."""
    cid = r.cu.connection_made("10.0.1.1", encrypted=False)
    return cid, r.recv(cid, m.Login(user=name, token=r.tokens[name]))


# -- item 3: a request goes to a connection that offers the service ------------------
def test_request_goes_to_the_connection_offering_the_service(r):
    """Two agents of one user ID with different services: the request for the second
    service must not land on the idle link of the first (it would refuse it)."""
    a = r.login("laptop")
    first = r.login("pi", attrs=m.Attrs(services=["ssh"]))
    second = r.spare("pi", attrs=m.Attrs(services=["web"]))
    acts = r.recv(a, m.ConnectRequest(req=1, target="pi", service="web"))
    assert one(acts, second, m.Notify).service == "web"
    assert not sent(acts, first)


def test_request_waits_for_an_idle_connection_offering_the_service(r):
    a = r.login("laptop")
    c = r.login("carol")
    ssh = r.login("pi", attrs=m.Attrs(services=["ssh"]))
    web = r.spare("pi", attrs=m.Attrs(services=["web"]))
    note = one(r.recv(c, m.ConnectRequest(req=1, target="pi", service="web")), web, m.Notify)
    assert Pair(c, web) in r.recv(web, m.Accept(req=note.req))  # the web link is busy now
    acts = r.recv(a, m.ConnectRequest(req=1, target="pi", service="web"))
    assert not sent(acts, ssh)  # the idle ssh link is not bothered
    assert r.cu.waiting["pi"]
    # the ssh link going idle again does not take it either
    r.recv(c, m.End())
    r.recv(c, m.Release())
    acts = r.recv(web, m.Release())
    assert one(acts, web, m.Notify).service == "web"


def test_request_without_service_prefers_an_agent_link(r):
    a = r.login("laptop")
    own_client = r.login("pi")  # pi's own `relay connect`: offers nothing
    agent = r.spare("pi", attrs=m.Attrs(services=["ssh"]))
    acts = r.recv(a, m.ConnectRequest(req=1, target="pi"))
    assert one(acts, agent, m.Notify) and not sent(acts, own_client)


# -- item 4: Fig. 4 ask path: the target gets its choice --------------------------------
def test_fig4_ask_the_target_is_told_and_may_refuse(r):
    c2 = r.login("t21", attrs=m.Attrs(insecure_peer="ask"))
    c1 = r.login("t11", attrs=m.Attrs(encryption="off"))
    assert one(r.recv(c2, m.ConnectRequest(req=4, target="t11", encrypt=True)),
               c2, m.EncryptInstruct)
    r.cu.tls_established(c2)
    ask = one(r.recv(c2, m.EncryptAccept(req=4)), c2, m.Notify)
    assert ask.insecure  # the requester is asked first (it required encryption)
    note = one(r.recv(c2, m.Accept(req=4)), c1, m.Notify)
    assert note.insecure and not note.encrypt  # then the target: its reply decides
    res = one(r.recv(c1, m.Refuse(req=note.req, reason="no thanks")), c2, m.Result)
    assert (res.ok, res.code, res.message) == (False, "refused", "no thanks")
    assert r.state(c1) is r.state(c2) is State.IDLE


# -- item 5: a release without an end tells the peer ----------------------------------
def test_release_without_end_tells_the_peer(r):
    a = r.login("alice")
    b = r.login("bob")
    pair(r, a, b, "bob")
    acts = r.recv(a, m.Release())
    assert one(acts, b, m.End).reason  # the peer learns its session is over
    acts = r.recv(b, m.End()) + r.recv(b, m.Release())
    assert sent(acts, a, m.Released) and sent(acts, b, m.Released)
    assert r.state(a) is r.state(b) is State.IDLE
    pair(r, a, b, "bob", req=2)  # both links are reusable


def test_release_after_end_sends_no_second_end(r):
    a = r.login("alice")
    b = r.login("bob")
    pair(r, a, b, "bob")
    r.recv(a, m.End(reason="done"))
    assert not sent(r.recv(a, m.Release()), b, m.End)


def test_release_answering_the_peers_end_sends_no_end_back(r):
    a = r.login("alice")
    b = r.login("bob")
    pair(r, a, b, "bob")
    r.recv(a, m.End(reason="done"))
    assert not sent(r.recv(b, m.Release()), a, m.End)


# -- item 6: nothing is left behind by requests nobody answers ----------------------
def _no_leftovers(r: Relay) -> None:
    assert r.cu.pending == {}
    assert r.cu.waiting == {}


def test_waiting_requests_are_failed_when_the_target_leaves(r):
    b = r.login("bob")
    c = r.login("carol")
    pair(r, c, b, "bob")  # bob's only link is busy
    requesters = [r.login(f"u{i}") for i in range(5)]
    for i, cid in enumerate(requesters):
        r.recv(cid, m.ConnectRequest(req=i + 1, target="bob"))
    assert len(r.cu.waiting["bob"]) == 5
    acts = r.cu.connection_lost(b, 1.0)
    for cid in requesters:
        assert one(acts, cid, m.Result).code == "target-lost"
        assert r.state(cid) is State.IDLE
    _no_leftovers(r)


def test_waiting_requests_leave_the_queue_on_timeout_and_requester_loss(r):
    b = r.login("bob")
    c = r.login("carol")
    pair(r, c, b, "bob")
    x = r.login("x")
    y = r.login("y")
    r.recv(x, m.ConnectRequest(req=1, target="bob"))
    r.recv(y, m.ConnectRequest(req=1, target="bob"))
    r.cu.connection_lost(y, 0.0)
    assert one(r.cu.tick(Settings().request_timeout), x, m.Result).code == "target-busy"
    _no_leftovers(r)


def test_a_target_that_never_answers_is_cut_off(r):
    """The request is given up (timeout, or its requester left); the target link that
    was notified stays NOTIFIED until it answers - or, when it never does, is closed
    one request timeout later, and nothing of the request is kept."""
    a = r.login("alice")
    b = r.login("bob")
    one(r.recv(a, m.ConnectRequest(req=1, target="bob")), b, m.Notify)
    timeout = Settings().request_timeout
    assert one(r.cu.tick(timeout), a, m.Result).code == "timeout"
    assert r.cu.tick(2 * timeout - 0.5) == []  # still time for a late answer
    acts = r.cu.tick(2 * timeout)
    assert [c.conn for c in acts if isinstance(c, Close)] == [b]
    assert r.cu.pending == {}
    r.cu.connection_lost(b, 2 * timeout)
    _no_leftovers(r)


def test_requester_gone_and_target_silent_is_cleaned_too(r):
    a = r.login("alice")
    b = r.login("bob")
    r.recv(a, m.ConnectRequest(req=1, target="bob"))
    r.cu.connection_lost(a, 1.0)
    acts = r.cu.tick(2 * Settings().request_timeout)
    assert [c.conn for c in acts if isinstance(c, Close)] == [b]
    assert r.cu.pending == {}


# -- item 7: the user list comes in pages that fit a message ------------------------
def test_who_pages_fit_the_message_limit_and_cover_everyone():
    r = Relay()
    services = [f"service-with-a-rather-long-name-{i:02d}" for i in range(40)]
    for i in range(1000):
        r.login(f"user{i:04d}", attrs=m.Attrs(services=services))
    viewer = r.login("viewer")
    seen: list[str] = []
    after, pages = "", 0
    while True:
        page = one(r.recv(viewer, m.Who(after=after)), viewer, m.WhoList)
        frame = m.RELAY_CODEC.encode(page)  # raises if over the limit
        decoded = m.TERMINAL_CODEC.decode(frame[wire.HEADER_SIZE:])
        seen += [u.user for u in decoded.users]
        pages += 1
        if not decoded.more:
            break
        after = decoded.users[-1].user
    assert seen == sorted(seen) and len(seen) == len(set(seen)) == 1001
    assert pages > 1


def test_who_without_paging_fields_is_the_first_page(r):
    r.login("alice")
    v = r.login("viewer")
    page = one(r.recv(v, m.Who()), v, m.WhoList)
    assert [u.user for u in page.users] == ["alice", "viewer"] and not page.more


# -- item 8: crossing requests between two users over their only links --------------
def _crossing(r: Relay, first: str):
    """alice and bob, one link each, request each other at the same moment; the relay
    handles ``first``'s request before the other one arrives."""
    links = {"alice": r.login("alice"), "bob": r.login("bob")}
    other = "bob" if first == "alice" else "alice"
    acts = r.recv(links[first], m.ConnectRequest(req=1, target=other))
    note = one(acts, links[other], m.Notify)  # in flight when `other` sends its own request
    acts = r.recv(links[other], m.ConnectRequest(req=1, target=first))
    return links, note, acts


def test_crossing_lower_user_id_wins_when_its_request_came_first(r):
    links, note, acts = _crossing(r, first="alice")
    # bob's request came second and bob > alice: answered "crossed", alice's stands
    assert one(acts, links["bob"], m.Error).code == "crossed"
    assert r.state(links["bob"]) is State.NOTIFIED
    acts = r.recv(links["bob"], m.Accept(req=note.req))
    assert Pair(links["alice"], links["bob"]) in acts


def test_crossing_lower_user_id_wins_when_its_request_came_second(r):
    links, note, acts = _crossing(r, first="bob")
    # alice's request came second but alice < bob: hers goes on, bob's waits for a link
    assert not sent(acts, links["alice"], m.Error)
    assert r.state(links["alice"]) is State.REQUESTING
    assert r.cu.waiting["alice"] and r.cu.waiting["bob"]
    # a reply to the void notification (from a terminal that did not know) is ignored
    assert r.recv(links["alice"], m.Refuse(req=note.req, reason="busy")) == []
    # spares arrive (steps 17-21): both requests are served, none refused
    spare_alice, acts = _spare(r, "alice")
    bob_note = one(acts, spare_alice, m.Notify)
    assert bob_note.peer == "bob"
    assert Pair(links["bob"], spare_alice) in r.recv(spare_alice, m.Accept(req=bob_note.req))
    spare_bob, acts = _spare(r, "bob")
    alice_note = one(acts, spare_bob, m.Notify)
    assert Pair(links["alice"], spare_bob) in r.recv(spare_bob, m.Accept(req=alice_note.req))


def test_a_yielded_request_goes_to_a_spare_that_is_already_idle(r):
    """alice has a spare that logged in before the crossing: bob's request, which
    yields to alice's, is notified there at once instead of waiting for a connection to
    become idle (none would: it already is) until it fails as "target-busy"."""
    links = {"alice": r.login("alice"), "bob": r.login("bob")}
    one(r.recv(links["bob"], m.ConnectRequest(req=1, target="alice")), links["alice"],
        m.Notify)
    spare_alice, acts = _spare(r, "alice")  # idle, and nothing is waiting yet
    assert not sent(acts, spare_alice, m.Notify)
    acts = r.recv(links["alice"], m.ConnectRequest(req=1, target="bob"))
    bob_note = one(acts, spare_alice, m.Notify)
    assert bob_note.peer == "bob"
    assert not r.cu.waiting.get("alice")
    assert Pair(links["bob"], spare_alice) in r.recv(spare_alice, m.Accept(req=bob_note.req))


@pytest.mark.parametrize("me, peer, wins", [("alice", "bob", True), ("bob", "alice", False)])
def test_terminal_applies_the_same_crossing_rule(me, peer, wins):
    tc = t.TerminalConn()
    tc.login(me, "pw")
    tc.receive(m.LoginOk(conn_id=1, token="x", encryption="optional", keepalive=15,
                         dead_after=45))
    tc.connect(peer)
    ev = tc.receive(m.Notify(req=9, peer=peer))
    assert isinstance(ev, t.RequestCrossed)
    if wins:
        assert ev.incoming is None and tc.state is t.TState.REQUESTING
        assert isinstance(tc.receive(m.Result(req=1, ok=True, peer=peer)), t.Connected)
    else:
        assert ev.incoming is not None and ev.incoming.peer == peer
        assert tc.state is t.TState.NOTIFIED
        # the relay's answer to the withdrawn request changes nothing
        assert isinstance(tc.receive(m.Error(req=1, code="crossed", message="x")), t.Other)
        assert tc.accept() == [m.Accept(req=9)]


def test_terminal_gives_way_to_a_notification_from_a_third_user():
    tc = t.TerminalConn()
    tc.login("alice", "pw")
    tc.receive(m.LoginOk(conn_id=1, token="x", encryption="optional", keepalive=15,
                         dead_after=45))
    tc.connect("bob")
    ev = tc.receive(m.Notify(req=9, peer="carol"))
    assert isinstance(ev, t.RequestCrossed) and ev.incoming.peer == "carol"


def test_relay_gives_way_to_a_notification_from_a_third_user(r):
    c = r.login("carol")
    a = r.login("alice")
    r.login("bob")
    one(r.recv(c, m.ConnectRequest(req=1, target="alice")), a, m.Notify)
    assert one(r.recv(a, m.ConnectRequest(req=1, target="bob")), a, m.Error).code == "crossed"


# -- item 9: an end for a request that was never accepted ---------------------------
def test_end_while_notified_is_a_remote_protocol_error():
    tc = t.TerminalConn()
    tc.login("pi", "pw")
    tc.receive(m.LoginOk(conn_id=1, token="x", encryption="optional", keepalive=15,
                         dead_after=45))
    tc.receive(m.Notify(req=3, peer="mallory"))
    with pytest.raises(t.RemoteProtocolError, match="not accepted"):
        tc.receive(m.End(reason="surprise"))



def test_a_violation_while_paired_still_tells_the_peer(r):
    """After a protocol violation the rest of what a connection sends is ignored, but
    its loss still ends the session of its peer."""
    a = r.login("alice")
    b = r.login("bob")
    pair(r, a, b, "bob")
    assert one(r.recv(a, m.Accept(req=99)), a, m.Error).code == "protocol"
    assert r.recv(a, m.Accept(req=99)) == []  # not audited again
    assert one(r.cu.connection_lost(a, 0.0), b, m.End).reason == "peer connection lost"

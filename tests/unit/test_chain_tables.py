"""The proxy's tables: keys, relay routes, access control, ports, session limits."""

from __future__ import annotations

import pytest

from kakehashi.chain import tables as t
from kakehashi.core import crypto


def test_routes_most_specific_wins_and_direct():
    r = t.parse_routes({"10.0.0.0/8": "fw2@192.0.2.2:1092", "10.3.0.0/16": "direct"})
    assert r.lookup("10.3.0.9") == (True, None)
    found, hop = r.lookup("10.4.0.1")
    assert found and hop == t.Hop("fw2", "192.0.2.2", 1092)
    assert r.lookup("192.168.1.1") == (False, None)
    assert r.lookup("not-an-ip") == (False, None)
    assert r.lookup("::1") == (False, None)


@pytest.mark.parametrize("bad", ["fw2", "fw2@host", "@1.2.3.4:5", "fw 2@1.2.3.4:5",
                                 "fw2@1.2.3.4:0", "fw2@1.2.3.4:99999"])
def test_bad_hops_are_explained(bad):
    with pytest.raises(ValueError):
        t.parse_hop(bad)


def test_bad_route_network():
    with pytest.raises(ValueError, match="not a network"):
        t.parse_routes({"10.0.0.0/33": "direct"})


def test_acl_user_source_and_ports():
    acl = t.parse_acl([{"user": "alice", "from": "127.0.0.0/8", "ports": "any"},
                       {"user": "bob", "from": "10.0.0.0/24", "ports": "5000-5010"}])
    assert acl.allows("alice", "127.0.0.1", 1)
    assert not acl.allows("alice", "10.0.0.1", 1)
    assert acl.allows("bob", "10.0.0.7", 5005)
    assert not acl.allows("bob", "10.0.0.7", 5011)
    assert not acl.allows("carol", "127.0.0.1", 1)
    assert not acl.allows("alice", "garbage", 1)
    assert acl.allows("alice", "::ffff:127.0.0.1", 1)  # an IPv4-mapped address
    assert acl.users == {"alice", "bob"}


def test_acl_errors():
    with pytest.raises(ValueError, match="needs user"):
        t.parse_acl([{"from": "10.0.0.0/8"}])
    with pytest.raises(ValueError, match="unknown keys: port"):
        t.parse_acl([{"user": "a", "port": "1"}])
    with pytest.raises(ValueError, match="not a network"):
        t.parse_acl([{"user": "a", "from": "nowhere"}])
    with pytest.raises(ValueError, match="LOW-HIGH"):
        t.parse_ports("a-b")
    with pytest.raises(ValueError, match="out of range"):
        t.parse_ports("5-3")


def test_keys():
    k = crypto.new_shared_key()
    assert t.parse_keys({"fw1": k}) == {"fw1": crypto.parse_shared_key(k)}
    with pytest.raises(ValueError, match="key for 'fw1'"):
        t.parse_keys({"fw1": "short"})
    with pytest.raises(ValueError):
        t.parse_keys({"bad name": k})


def test_flag_forms():
    assert t.parse_assignments(["a=1", "b = 2"], "x") == {"a": "1", "b": "2"}
    assert t.parse_acl_flag("user=alice,from=10.0.0.0/8,ports=any") == {
        "user": "alice", "from": "10.0.0.0/8", "ports": "any"}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        t.parse_assignments(["novalue"], "key")


def test_session_limits_per_user_and_address():
    lim = t.SessionLimits(per_user=2, per_address=3, total=4)
    assert lim.admit("a", "1.1.1.1") is None
    assert lim.admit("a", "1.1.1.1") is None
    assert "user 'a'" in lim.admit("a", "1.1.1.2")
    assert lim.admit("b", "1.1.1.1") is None
    assert "address 1.1.1.1" in lim.admit("c", "1.1.1.1")
    assert lim.admit("c", "2.2.2.2") is None
    assert "maximum of 4" in lim.admit("d", "3.3.3.3")
    lim.release("a", "1.1.1.1")
    assert lim.admit("a", "1.1.1.9") is None
    for u, a in [("a", "1.1.1.1"), ("a", "1.1.1.9"), ("b", "1.1.1.1"), ("c", "2.2.2.2")]:
        lim.release(u, a)
    assert lim.count == 0 and lim.users == {} and lim.addresses == {}


def test_setups_in_progress_are_bounded_per_address():
    lim = t.SessionLimits(per_user=2, per_address=2, total=0)
    assert lim.begin_setup("6.6.6.6") is None and lim.begin_setup("6.6.6.6") is None
    assert "6.6.6.6 already has 2 setups in progress" in lim.begin_setup("6.6.6.6")
    assert lim.begin_setup("10.1.0.2") is None  # another address goes on being served
    lim.end_setup("6.6.6.6")
    assert lim.begin_setup("6.6.6.6") is None
    for a in ("6.6.6.6", "6.6.6.6", "10.1.0.2"):
        lim.end_setup(a)
    assert lim.setups == {}
    assert t.SessionLimits(per_user=2, per_address=0, total=0).begin_setup("x") is None

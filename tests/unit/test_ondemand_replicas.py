"""Manager replicas on one Redis, in one process (no HTTP): what they share and what
exactly one of them does (issue 11). The processes end to end are in
tests/e2e/test_ondemand_replicas.py."""

from __future__ import annotations

import asyncio
import time

import pytest

from kakehashi.core.store import open_store
from kakehashi.ondemand.manager import GRANT, Manager, ManagerSettings
from kakehashi.ondemand.replicas import Replicas
from tests.support.wait import async_wait_until


@pytest.fixture
async def pair(redis_url, tmp_path):
    managers = []
    for name in ("a", "b"):
        mgr = Manager(open_store(redis_url), settings=ManagerSettings(edge_wait=0),
                      ca_home=tmp_path / f"ca-{name}", replicas=Replicas(redis_url, name))
        mgr.start()
        managers.append(mgr)
    for mgr in managers:
        await asyncio.wait_for(mgr.replicas.subscribed.wait(), 10)
    try:
        yield managers
    finally:
        for mgr in managers:
            await mgr.close()
            mgr.store.close()


def _grant(gid: str, ttl: float = 60.0) -> dict:
    now = time.time()
    return {"id": gid, "imsi": "001010000000001", "target_port": 22, "edge": "e1",
            "host": "127.0.0.1", "port": 30001, "policy": "random", "reason": "",
            "created_at": "", "created_at_ts": now, "expires_at": "",
            "expires_at_ts": now + ttl, "ttl": ttl, "cidrs": [], "auth_info": None,
            "tls": False, "pin": None, "max_connections": 0, "status": "active",
            "inner": "core-1", "device_address": "127.0.0.1", "owner": "t"}


async def test_one_relay_ca_for_every_replica(pair):
    a, b = pair
    assert a.ca.ca_path.read_text() == b.ca.ca_path.read_text()
    assert a.ca.ca_path != b.ca.ca_path  # each its own directory, the same CA


async def test_a_ticket_issued_on_one_replica_is_redeemed_once_on_the_other(pair):
    a, b = pair
    ticket = await a._ticket("g1")
    assert not await b._redeem(ticket, "g2")  # for another grant: refused (and spent)
    ticket = await a._ticket("g1")
    assert await b._redeem(ticket, "g1")
    assert not await a._redeem(ticket, "g1")  # once


async def test_a_grant_stored_and_told_on_one_replica_is_known_on_the_other(pair):
    a, b = pair
    doc = _grant("g1")
    a.store.put(GRANT, "g1", doc)
    await a._tell_replicas(doc)
    await async_wait_until(lambda: "g1" in b.grants, what="b heard of the grant")
    assert b._by_port[("e1", 30001)] == "g1" and 30001 in b._used["e1"]
    # a grant b was not told about (a message lost) is found in the store on request
    a.store.put(GRANT, "g2", {**_grant("g2"), "port": 30002})
    assert b.grant("g2")["id"] == "g2"


async def test_a_grant_ends_once_when_both_replicas_end_it(pair):
    a, b = pair
    doc = _grant("g1")
    a.store.put(GRANT, "g1", doc)
    a._take(doc)
    await a._tell_replicas(doc)
    await async_wait_until(lambda: "g1" in b.grants, what="b heard of the grant")
    won = await asyncio.gather(a._end(a.grants["g1"], "revoked"),
                               b._end(b.grants["g1"], "expired"))
    assert sorted(won) == [False, True]
    stored = a.store.get(GRANT, "g1")
    assert stored["status"] in ("revoked", "expired")
    await async_wait_until(lambda: a.grants["g1"]["status"] == b.grants["g1"]["status"]
                           == stored["status"], what="both replicas agree")


async def test_events_of_one_grant_from_both_replicas_are_numbered_once(pair):
    a, b = pair
    await asyncio.gather(*[(a if i % 2 else b).record("access", "g1", client=f"c{i}")
                           for i in range(40)])
    for mgr in (a, b):
        await async_wait_until(lambda m=mgr: len(m.events("g1")) == 40,
                               what="every event in both trails")
        assert [e["seq"] for e in mgr.events("g1")] == list(range(1, 41))
    assert sorted(e["client"] for e in a.events("g1")) == sorted(f"c{i}" for i in range(40))


async def test_edges_of_the_other_replica_are_offered(pair):
    a, b = pair
    await b.replicas.edge_here("edge-b", {"public_host": "192.0.2.1", "ports": [30000, 30009],
                                          "region": "", "carrier": "b"})
    views = a.edge_views(await a.remote_edges())
    assert [(v.name, v.public_host, v.free) for v in views] == [("edge-b", "192.0.2.1", 10)]
    assert b.edge_views(await b.remote_edges()) == []  # its own are in b.edges
    await b.replicas.edge_gone("edge-b")
    assert await a.remote_edges() == {}


async def test_a_grant_revoked_on_one_replica_is_refused_a_second_revocation_on_the_other(pair):
    from kakehashi.core.identity import TokenInfo
    from kakehashi.core.web import ApiError

    a, b = pair
    admin = TokenInfo(id="t", role="admin")
    doc = _grant("g1")
    a.store.put(GRANT, "g1", doc)
    a._take(doc)
    await a._tell_replicas(doc)
    await async_wait_until(lambda: "g1" in b.grants, what="b heard of the grant")
    stale = dict(b.grants["g1"])  # b has not heard of the revocation yet
    assert (await a.revoke("g1", admin))["status"] == "revoked"
    b.grants["g1"] = stale
    with pytest.raises(ApiError) as info:
        await b.revoke("g1", admin)
    assert info.value.status == 409
    assert [e["event"] for e in a.events("g1")] == ["deleted"]  # recorded once
    await async_wait_until(lambda: [e["event"] for e in b.events("g1")] == ["deleted"],
                           what="b has the one 'deleted' too")


async def test_an_edge_that_moved_is_not_taken_back_by_its_old_replica(pair):
    """Replica a has not noticed that its edge left (a SIGKILL'd peer, a dead TCP
    link): its renewal must not overwrite b's newer announcement; a forgets it."""
    a, b = pair
    info = {"public_host": "127.0.0.1", "ports": [30000, 30009], "region": "",
            "carrier": ""}
    await a.replicas.edge_here("e9", info)
    await b.replicas.edge_here("e9", info)  # the edge re-attached to b
    await a.replicas.renew_once()
    assert "e9" not in a.replicas._edges
    assert (await b.replicas.edges())["e9"]["replica"] == "b"
    await b.replicas.renew_once()
    assert (await a.replicas.edges())["e9"]["replica"] == "b"
    ttl = await a.replicas.redis.ttl(a.replicas._edge_prefix + "e9")
    assert 0 < ttl <= 3  # a dead replica's announcements go within seconds


async def test_edges_of_a_replica_that_no_longer_listens_are_not_offered(pair):
    """A replica killed outright leaves its announcements for up to EDGE_TTL s; no
    grant is placed on them meanwhile (nobody would open the port)."""
    import json

    a, b = pair
    info = {"public_host": "127.0.0.1", "ports": [30000, 30009], "region": "",
            "carrier": ""}
    await b.replicas.edge_here("e-b", info)
    await a.replicas.redis.set(a.replicas._edge_prefix + "e-ghost",
                               json.dumps({**info, "replica": "ghost"}), ex=3)
    assert sorted(await a.replicas.edges()) == ["e-b"]
    assert [v.name for v in a.edge_views(await a.remote_edges())] == ["e-b"]

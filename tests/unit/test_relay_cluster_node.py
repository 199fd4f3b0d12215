"""The relay cluster node's reads of Redis (``relay/cluster.py``) against a real
``redis-server``, with the control unit reduced to what those reads consult."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import redis

from kakehashi.relay import federation as fed
from kakehashi.relay.cluster import ClusterNode


def _node(url: str, users: dict[str, dict[str, object]], seen: set[str]) -> ClusterNode:
    server = SimpleNamespace(core=SimpleNamespace(directory=SimpleNamespace(users=users)))
    node = ClusterNode(server, url, "n1", "127.0.0.1:1", ttl=3.0)
    node._seen_nodes = set(seen)
    return node


def _cluster(url: str, alive: list[str], listed: list[str]) -> None:
    raw = redis.Redis.from_url(url)
    raw.sadd("kakehashi:relay:nodes", "n1", *listed)
    for name in alive:
        raw.set(f"kakehashi:relay:node:{name}", '{"addr": "127.0.0.1:1"}')
    raw.close()


def _changed(node: ClusterNode) -> bool:
    async def main() -> bool:
        try:
            return await node._membership_changed()
        finally:
            await node.redis.aclose()

    return asyncio.run(main())


def test_a_dead_node_whose_users_were_already_dropped_is_noticed_at_once(redis_url):
    """Found at 30,000 agents (docs/benchmarks.md): a request that found n3 unreachable
    had dropped its users, so the cheap check saw nothing to do and n1 counted n3 alive
    until the periodic full read (26 s with --cluster-ttl 6, instead of ttl + a
    renewal)."""
    _cluster(redis_url, alive=["n2"], listed=["n2", "n3"])  # n3's entry expired
    node = _node(redis_url, {"bob": {"n2": object()}}, seen={"n2", "n3"})
    assert _changed(node)


def test_the_last_other_node_dead_is_noticed(redis_url):
    _cluster(redis_url, alive=[], listed=["n3"])
    assert _changed(_node(redis_url, {}, seen={"n3"}))


def test_nothing_changed_no_full_read(redis_url):
    _cluster(redis_url, alive=["n2", "n3"], listed=["n2", "n3"])
    assert not _changed(_node(redis_url, {"bob": {"n2": object()}}, seen={"n2", "n3"}))


def test_membership_decision():
    assert fed.membership_changed({"n2"}, {"n2"}, {"n2", "n3"})      # n3 gone
    assert fed.membership_changed({"n2", "n3"}, {"n2"}, {"n2"})      # n3 joined
    assert fed.membership_changed({"n2"}, {"n2", "n3"}, {"n2"})      # n3's users stale
    assert not fed.membership_changed({"n2"}, {"n2"}, {"n2"})
    assert not fed.membership_changed(set(), set(), set())

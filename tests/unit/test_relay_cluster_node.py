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


def _check(node: ClusterNode) -> tuple[frozenset[str], bool]:
    async def main() -> tuple[frozenset[str], bool]:
        try:
            return await node._membership()
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
    assert _check(node) == (frozenset({"n3"}), False)  # dropped without a full read


def test_the_last_other_node_dead_is_noticed(redis_url):
    _cluster(redis_url, alive=[], listed=["n3"])
    assert _check(_node(redis_url, {"bob": {"n3": object()}}, seen={"n3"})) \
        == (frozenset({"n3"}), False)


def test_nothing_changed_no_full_read(redis_url):
    _cluster(redis_url, alive=["n2", "n3"], listed=["n2", "n3"])
    assert _check(_node(redis_url, {"bob": {"n2": object()}}, seen={"n2", "n3"})) \
        == (frozenset(), False)


def test_a_node_joining_calls_for_a_full_read(redis_url):
    _cluster(redis_url, alive=["n2", "n3"], listed=["n2", "n3"])
    assert _check(_node(redis_url, {}, seen={"n2"})) == (frozenset(), True)


def test_dropping_gone_nodes_forgets_them_and_their_users(redis_url):
    """The survivors' directory and metrics lose a dead node at once, no read."""
    dropped: list[str] = []
    members: list[list[str]] = []
    core = SimpleNamespace(directory=SimpleNamespace(users={}),
                           node_gone=lambda n: dropped.append(n) or [])
    server = SimpleNamespace(core=core, _apply_now=lambda actions: None,
                             metrics=SimpleNamespace(cluster_members=members.append))
    node = ClusterNode(server, redis_url, "n1", "127.0.0.1:1", ttl=3.0)
    node._seen_nodes = {"n2", "n3"}
    _cluster(redis_url, alive=["n2"], listed=["n2", "n3"])

    async def main() -> None:
        try:
            await node._drop_nodes(frozenset({"n3"}))
        finally:
            await node.redis.aclose()

    asyncio.run(main())
    assert dropped == ["n3"] and members == [["n1", "n2"]] and node._seen_nodes == {"n2"}
    raw = redis.Redis.from_url(redis_url)
    assert raw.smembers("kakehashi:relay:nodes") == {b"n1", b"n2"}
    raw.close()


def test_membership_decision():
    change = fed.membership_change
    assert change({"n2"}, {"n2"}, {"n2", "n3"}) == ({"n3"}, False)        # n3 died
    assert change({"n2"}, {"n2", "n3"}, {"n2", "n3"}) == ({"n3"}, False)  # with users
    assert change({"n2", "n3"}, {"n2"}, {"n2"}) == (set(), True)          # n3 joined
    assert change({"n2"}, {"n2", "n3"}, {"n2"}) == (set(), True)          # stale users
    assert change({"n2"}, {"n2"}, {"n2"}) == (set(), False)
    assert change(set(), set(), set()) == (set(), False)

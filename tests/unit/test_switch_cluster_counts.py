"""Live connections per service counted over several switch nodes on a real Redis
(issue 11): admissions at the limit are atomic across nodes, ends are counted off,
and a node whose alive key is gone leaves the sums. The nodes' processes end to end
are in tests/e2e/test_switch_cluster.py."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from kakehashi.switch import cluster as cl
from tests.support.wait import async_wait_until


def _fake_server() -> SimpleNamespace:
    async def apply(actions: list) -> None:
        return None

    switch = SimpleNamespace(tunnels={}, live={}, services={"echo": None}, online=set())
    return SimpleNamespace(switch=switch, links={}, apply=apply)


async def admit(c: cl.SwitchCluster, limit: int) -> bool | None:
    """As the server does: an admitted stream is in its switch's live count at once."""
    ok = await c.admit("echo", limit)
    if ok:
        c.srv.switch.live["echo"] = c.srv.switch.live.get("echo", 0) + 1
    return ok


@pytest.fixture
async def nodes(redis_url):
    made = []
    for name in ("n1", "n2"):
        c = cl.SwitchCluster(_fake_server(), redis_url, name)  # type: ignore[arg-type]
        await c.start()
        made.append(c)
    try:
        yield made
    finally:
        for c in made:
            await c.close()


async def test_a_burst_over_two_nodes_admits_exactly_the_limit(nodes):
    n1, n2 = nodes
    results = await asyncio.gather(*[admit(c, 3) for _ in range(10) for c in nodes])
    assert results.count(True) == 3 and results.count(False) == 17
    assert await n1.live_totals(["echo"]) == {"echo": 3}
    owner = n1 if n1.srv.switch.live.get("echo") else n2
    owner.srv.switch.live["echo"] -= 1  # one ended there
    owner.sync_counts(owner.srv.switch.live)  # counted off in a task of its own...
    await owner.renew_counts()  # ...that a renewal must not count twice
    await async_wait_until(lambda: not owner._down["echo"], what="the count-down written")
    assert await n2.live_totals(["echo"]) == {"echo": 2}
    assert await admit(n2, 3) is True
    assert await admit(n1, 3) is False


async def test_a_dead_nodes_connections_leave_the_sums(nodes):
    n1, n2 = nodes
    assert await admit(n2, 0) is True  # no limit: counted all the same
    assert await admit(n2, 0) is True
    assert await admit(n1, 0) is True
    assert await n1.live_totals(["echo"]) == {"echo": 3}
    for task in n2._tasks:  # n2 stops renewing (killed), and its key expires
        task.cancel()
    await n2.redis.delete(cl.alive_key("n2"))
    assert await n1.live_totals(["echo"]) == {"echo": 1}
    assert await admit(n1, 2) is True  # n2's share is free again
    assert await admit(n1, 2) is False

"""Two users request each other at the same moment over their only links (item 8).

Both requests used to fail with ``busy``: each link got the other's notification
while making its own request. Now the lower user ID's request goes first and the
other one is served right after, on a spare.
"""

from __future__ import annotations

import asyncio

from kakehashi.relay import messages as m
from kakehashi.relay import terminal as t
from kakehashi.relay.agent import Terminal, TerminalConfig, service_acceptor
from tests.e2e.framework import PASSWORD, Env
from tests.support.wait import async_wait_until


def _terminal(user: str, port: int, echo_port: int) -> Terminal:
    cfg = TerminalConfig(server="127.0.0.1", port=port, user=user, password=PASSWORD[user],
                         spares=1, attrs=m.Attrs(services=["echo"]))
    term = Terminal(cfg)
    term._accept = service_acceptor({"echo": ("127.0.0.1", echo_port)}, term.spawn)
    return term


async def test_crossing_requests_are_both_served(env: Env, echo):
    env.add_user("alice")
    env.add_user("bob")
    _, port = env.relay(tls=False, keepalive=30)
    alice, bob = _terminal("alice", port, echo.port), _terminal("bob", port, echo.port)
    keepers: list[asyncio.Task[None]] = []
    try:
        for term in (alice, bob):
            await term.open_link()  # each user's only link
        keepers = [asyncio.create_task(term.maintain()) for term in (alice, bob)]
        for attempt in range(3):  # each round: both ask at once on their idle link
            results = await asyncio.wait_for(asyncio.gather(
                alice.connect("bob", "echo"), bob.connect("alice", "echo"),
                return_exceptions=True), 60)
            for res in results:
                assert not isinstance(res, BaseException), f"round {attempt}: {res!r}"
                link, info = res
                assert isinstance(info, t.Connected)
                await link.send(link.t.end("done"))
        # the relay writes each pairing's record right after its result went out (off
        # the setup path): the last one may land just after the terminal has the result
        await async_wait_until(
            lambda: len([r for r in env.audit() if r["event"] == "pair"]) >= 6,
            what="six pair records")
        pairs = [r for r in env.audit() if r["event"] == "pair"]
        assert len(pairs) == 6
    finally:
        for task in keepers:
            task.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)
        await alice.close()
        await bob.close()

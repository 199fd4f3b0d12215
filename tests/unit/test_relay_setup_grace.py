"""A session's replacement link is opened a little after the session first carried
bytes both ways, not in the same step (kakehashi.relay.agent.SETUP_GRACE).

Why: the setup trace (bench/setup_trace.py, docs/benchmarks.md) showed the replacement
link, opened the moment the agent had sent its first reply, putting its TCP accept and
TLS handshake on the relay ahead of that reply frame (and on the requester's side ahead
of the reply's delivery): 1-2 ms on the first byte echoed."""

from __future__ import annotations

from types import SimpleNamespace

from kakehashi.relay import agent
from tests.support.wait import async_wait_until


class _Owner:
    def __init__(self) -> None:
        self.over: list[object] = []

    def setup_over(self, link: object) -> None:
        self.over.append(link)


async def test_setup_over_waits_for_the_grace_not_the_same_step(monkeypatch) -> None:
    monkeypatch.setattr(agent, "SETUP_GRACE", 0.01, raising=False)
    owner = _Owner()
    link = SimpleNamespace(owner=owner, session=None)
    session = agent.Session(link)  # type: ignore[arg-type]
    link.session = session
    session.carried(sent=True)
    session.carried(received=True)
    assert owner.over == []  # the first reply is still crossing: no new link yet
    await async_wait_until(lambda: owner.over, what="the setup counted as over")
    assert owner.over == [link]


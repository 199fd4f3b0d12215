"""A terminal whose links all closed logs its next burst of links in without tripping
the relay's login throttle.

The relay counts password checks still in flight against its lockout (a parallel
burst of guesses gets no more checks than a sequence would). A terminal's links skip
that check with its resumption token only while the user has a session on the relay;
once every link closed (a burst of sessions under the session cipher ends, each link
closing with its session), the next links log in with the password. Opened all at
once they used to pile up in flight and be refused as "too many failed logins"
although not one had failed (CI, ``test_200_concurrent_sessions``).
"""

from __future__ import annotations

import asyncio

from kakehashi.relay.agent import Terminal, TerminalConfig
from tests.e2e.framework import PASSWORD, Env
from tests.support.wait import async_wait_until, wait_until

LOCKOUT = 3
BURST = 12


def _logins(env: Env, user: str) -> list[dict]:
    return [e for e in env.audit() if e.get("event") == "login" and e.get("user") == user]


async def _burst_after_the_session_went(env: Env, port: int) -> None:
    term = Terminal(TerminalConfig(server="127.0.0.1", port=port, user="laptop",
                                   password=PASSWORD["laptop"]))
    first = await term.open_link()
    assert term.token
    first.close()
    await async_wait_until(lambda: not term.links, timeout=10)
    # the relay let the session go (its token is in its grace period, password only)
    await async_wait_until(
        lambda: any(e.get("event") == "offline" and e.get("user") == "laptop"
                    for e in env.audit()), timeout=10)
    results = await asyncio.gather(*(term.open_link() for _ in range(BURST)),
                                   return_exceptions=True)
    try:
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors
        assert len(term.links) == BURST
    finally:
        await term.close()


def test_a_burst_of_links_after_every_link_closed_is_not_locked_out(env: Env) -> None:
    env.add_user("laptop")
    _, port = env.relay("--login-lockout", str(LOCKOUT), tls=False)
    asyncio.run(_burst_after_the_session_went(env, port))
    logins = _logins(env, "laptop")
    assert not [e for e in logins if e["decision"] == "deny"], logins
    wait_until(lambda: len(_logins(env, "laptop")) == BURST + 1, timeout=10)

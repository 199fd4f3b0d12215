"""Terminal.open_link's first login while no link is logged in, under a burst.

With no link left, a terminal logs one link in first and the others of a burst wait
for it (the relay counts password checks in flight against its lockout). A burst must
not fare worse than that one login: when the first one fails (a relay that hangs until
the login times out, a refusal), the callers that waited for it fail with it, instead
of each trying again in turn behind the previous one (a hundred requests at once would
otherwise wait a hundred login timeouts, holding their clients' sockets meanwhile).
"""

from __future__ import annotations

import asyncio
import traceback

import pytest

from kakehashi.relay.agent import RelayError, RelayLink, Terminal, TerminalConfig
from tests.support.wait import async_wait_until

BURST = 8


class _Relay:
    """Stands in for RelayLink.open: each login waits until the test decides it."""

    def __init__(self) -> None:
        self.logins: list[asyncio.Future[None]] = []

    async def open(self, link: RelayLink, token: str = "") -> None:
        decided = asyncio.get_running_loop().create_future()
        self.logins.append(decided)
        await decided
        link.token = "tok"


def _terminal(monkeypatch: pytest.MonkeyPatch) -> tuple[Terminal, _Relay]:
    relay = _Relay()
    monkeypatch.setattr(RelayLink, "open", lambda link, token="": relay.open(link, token))
    term = Terminal(TerminalConfig(server="127.0.0.1", port=1, user="u", password="p"))
    return term, relay


async def _a_burst_behind_a_failed_first_login_fails_with_it(mp: pytest.MonkeyPatch) -> None:
    term, relay = _terminal(mp)
    calls = [asyncio.ensure_future(term.open_link()) for _ in range(BURST)]
    await async_wait_until(lambda: relay.logins, what="the first login")
    relay.logins[0].set_exception(RelayError("closed", "the relay closed the connection"))
    # every caller has its answer once the one login they waited for has failed; on
    # the old code the next caller logs in now (and hangs like the first)
    await async_wait_until(lambda: all(c.done() for c in calls),
                           timeout=5, what="every caller answered by the first login's failure")
    assert len(relay.logins) == 1
    for call in calls:
        exc = call.exception()
        assert isinstance(exc, RelayError) and exc.code == "closed", exc
        # one failure shared, not re-raised from caller to caller: its traceback (and
        # the frames it keeps alive) does not grow by a frame per caller
        assert len(traceback.extract_tb(exc.__traceback__)) < BURST


def test_a_burst_behind_a_failed_first_login_fails_with_it(
        run, monkeypatch: pytest.MonkeyPatch) -> None:
    run(_a_burst_behind_a_failed_first_login_fails_with_it(monkeypatch))


async def _a_cancelled_first_login_hands_over(mp: pytest.MonkeyPatch) -> None:
    """The first caller going away is no failure: one of the others logs in instead,
    and once it has, the rest log in beside each other (with its token)."""
    term, relay = _terminal(mp)
    calls = [asyncio.ensure_future(term.open_link()) for _ in range(BURST)]
    await async_wait_until(lambda: relay.logins, what="the first login")
    calls[0].cancel()
    await async_wait_until(lambda: len(relay.logins) == 2, what="a second first login")
    relay.logins[1].set_result(None)
    await async_wait_until(lambda: len(relay.logins) == BURST,
                           what="the others logging in beside each other")
    for login in relay.logins[2:]:
        login.set_result(None)
    links = await asyncio.gather(*calls[1:])
    assert len(set(links)) == BURST - 1 and term.links == set(links)
    assert calls[0].cancelled()
    await term.close()


def test_a_cancelled_first_login_hands_over(run, monkeypatch: pytest.MonkeyPatch) -> None:
    run(_a_cancelled_first_login_hands_over(monkeypatch))


@pytest.mark.parametrize("step", ["TLS handshake", "greeting", "login"])
def test_requests_behind_a_first_login_that_hangs_say_where_and_what_to_check(run, step):
    run(_requests_behind_a_first_login_that_hangs(step))


def test_a_relay_that_closes_in_the_middle_of_the_login_is_a_relay_error(run):
    run(_a_relay_that_closes_in_the_middle_of_the_login())


async def _a_relay_that_closes_in_the_middle_of_the_login() -> None:
    """The relay (or whatever answers) ends the connection inside a frame of its login
    reply: the caller gets a RelayError naming the server and the step, as for any
    failed login (a bare ConnClosed went past `relay pipe`'s and `relay connect`'s
    handlers: a traceback)."""
    from kakehashi.core import wire

    async def cut_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(wire.PREAMBLE)
        await reader.readexactly(len(wire.PREAMBLE))
        await reader.read(65536)  # the login (read: a close with it unread is a reset)
        writer.write(b"\x01")  # one byte of the reply's frame header, and the end
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(cut_short, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    term = Terminal(TerminalConfig(server="127.0.0.1", port=port, user="u", password="p"))
    try:
        with pytest.raises(RelayError) as failed:
            await term.connect("pi")
        assert failed.value.code == "closed"
        assert f"127.0.0.1:{port} during the login" in failed.value.message
    finally:
        await term.close()
        server.close()
        await server.wait_closed()


async def _requests_behind_a_first_login_that_hangs(step: str) -> None:
    """A server that takes the connection and then says nothing (not a relay, or one
    too busy to answer) fails the first login when its step times out, and the
    requests waiting for that login with it: the error says which server did not
    answer which step, and what to check. (It was a bare TimeoutError: `relay pipe`
    printed "cannot connect to pi: " and nothing more.)"""
    import ssl

    from kakehashi.core import wire

    writers: list[asyncio.StreamWriter] = []

    async def greet_only(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        writer.write(wire.PREAMBLE)  # and nothing after it: the login is never answered

    if step == "login":
        server = await asyncio.start_server(greet_only, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
    else:  # the kernel takes the connection; nobody ever reads or writes it
        silent = __import__("socket").create_server(("127.0.0.1", 0))
        port = silent.getsockname()[1]
    tls = None
    if step == "TLS handshake":
        tls = ssl.create_default_context()
        tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    term = Terminal(TerminalConfig(server="127.0.0.1", port=port, user="u", password="p",
                                   tls=tls, connect_timeout=0.2))
    try:
        calls = [asyncio.ensure_future(term.connect("pi")) for _ in range(3)]
        await async_wait_until(lambda: all(c.done() for c in calls), timeout=10,
                               what="the requests answered by the first login's failure")
        for call in calls:
            exc = call.exception()
            assert isinstance(exc, RelayError) and exc.code == "timeout", repr(exc)
            assert f"127.0.0.1:{port}" in exc.message and step in exc.message, exc.message
            assert "kakehashi relay" in exc.message, exc.message
    finally:
        await term.close()
        if step == "login":
            for writer in writers:
                writer.close()
            server.close()
            await server.wait_closed()
        else:
            silent.close()

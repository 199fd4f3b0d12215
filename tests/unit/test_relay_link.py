"""The terminal's asyncio driver (relay/agent.py) over a real socket pair."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator

import pytest

from kakehashi.core.stream import Conn, FramedConn
from kakehashi.relay import agent
from kakehashi.relay import messages as m
from kakehashi.relay.agent import RelayLink, TerminalConfig
from tests.support.relay_link import readable_bytes, tls_pair
from tests.support.wait import async_wait_until, loop_turns


async def _messages_sent_together_go_in_one_write() -> None:
    """An end and a release (the close of every session) leave in one write: the relay
    reads both in one go instead of waking up for each."""
    pair, relay = socket.socketpair()
    writes: list[int] = []

    class Counting(socket.socket):  # every write, however the link makes it
        def send(self, data, *args) -> int:  # type: ignore[override]
            writes.append(len(data))
            return super().send(data, *args)

    mine = Counting(fileno=pair.detach())
    try:
        link = RelayLink(TerminalConfig(server="127.0.0.1", port=1, user="u", password="p"))
        link.framed = FramedConn(Conn(mine))
        msgs = [m.End(reason="done"), m.Release()]
        await link.send(msgs)
        expected = b"".join(m.TERMINAL_CODEC.encode(x) for x in msgs)
        assert writes == [len(expected)]
        assert readable_bytes(relay) == len(expected)
        assert relay.recv(4096) == expected
    finally:
        mine.close()
        relay.close()


def test_messages_sent_together_go_in_one_write(run) -> None:
    run(_messages_sent_together_go_in_one_write())


def _live_link(sock: socket.socket) -> RelayLink:
    """A link on ``sock`` logged in with its encryption off (its requests may carry
    early data), its reader running as after a real login."""
    link = RelayLink(TerminalConfig(server="127.0.0.1", port=1, user="u", password="p"))
    link.framed = FramedConn(Conn(sock))
    link.t.login("u", "p")
    link.t.receive(m.LoginOk(conn_id=1, token="tok", encryption="off", keepalive=15.0,
                             dead_after=45.0))
    link.reader = asyncio.create_task(link._read_loop())
    return link


async def _fake_relay(sock: socket.socket, answer) -> None:
    """The relay end of a link: reads the frames the link sends and calls
    ``answer(message)`` for each; the messages it returns are sent, and the link is
    closed after them when the last is an :class:`m.Error` (as a relay does), or at
    once when it returns None."""
    from kakehashi.core import wire

    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    decoder = wire.FrameDecoder()
    while True:
        data = await loop.sock_recv(sock, 65536)
        if not data:
            return
        decoder.feed(data)
        for frame in decoder.frames():
            reply = answer(m.RELAY_CODEC.decode(frame.payload))
            if reply is not None:
                await loop.sock_sendall(sock, b"".join(m.RELAY_CODEC.encode(x)
                                                       for x in reply))
            if reply is None or isinstance(reply[-1], m.Error):
                sock.shutdown(socket.SHUT_RDWR)
                return


@contextlib.asynccontextmanager
async def _terminal_on_fake_relays(answer, *socks: socket.socket
                                   ) -> AsyncIterator[agent.Terminal]:
    """A terminal each of whose links (one per request) is a live link to a
    :func:`_fake_relay` answering with ``answer``; ``socks`` are closed at the end."""
    relays: list[socket.socket] = []
    tasks: list[asyncio.Task[None]] = []
    term = agent.Terminal(TerminalConfig(server="127.0.0.1", port=1, user="u", password="p"))

    async def acquire():
        mine, theirs = socket.socketpair()
        relays.append(theirs)
        tasks.append(asyncio.ensure_future(_fake_relay(theirs, answer)))
        return _live_link(mine)

    term.acquire = acquire  # type: ignore[method-assign]
    try:
        yield term
    finally:
        for task in tasks:
            task.cancel()
        for sock in (*relays, *socks):
            sock.close()


async def _a_relay_that_rejects_early_data_gets_requests_without_it() -> None:
    """A relay that predates early data rejects a request carrying it (an unknown
    field: its error, then the close): the terminal retries on another link without
    early data and keeps it off, so a new `relay connect` still works with an old
    relay. The bytes stay with the application, for the session to send."""
    app_sock, client = socket.socketpair()
    client.sendall(b"hello")
    sent: list[bytes] = []

    def old_relay(msg: m.Msg) -> list[m.Msg] | None:
        assert isinstance(msg, m.ConnectRequest)
        sent.append(msg.data)
        if msg.data:  # (e6d1379's relay: a schema error, then the close)
            return [m.Error(code="schema", message="Object contains unknown field `data`")]
        return [m.Result(req=msg.req, ok=True, peer=msg.target)]

    async with _terminal_on_fake_relays(old_relay, app_sock, client) as term:
        app = Conn(app_sock)
        _, info = await term.connect("bob", app=app)
        assert info.early == 0 and sent == [b"hello", b""]
        assert not term.early_ok
        assert app_sock.recv(16) == b"hello"  # still there for the session to send
        await term.connect("bob", app=app)
        assert sent[-1] == b""  # stays off



def test_a_relay_that_rejects_early_data_gets_requests_without_it(run) -> None:
    run(_a_relay_that_rejects_early_data_gets_requests_without_it())


async def _a_link_lost_after_a_request_with_early_data_is_not_retried() -> None:
    """The link is lost (no error from the relay) after a request carrying early data
    went out: the relay may have sent the bytes to the target, which may have written
    them to its service (optimistic pairing). Sent again on another link they would
    arrive twice: the request fails, saying so, and the bytes stay unsent. Without
    early data the request is retried on another link, as before."""
    from kakehashi.relay.agent import RelayError

    app_sock, client = socket.socketpair()
    sent: list[bytes] = []
    lose = [True]

    def relay(msg: m.Msg) -> list[m.Msg] | None:
        assert isinstance(msg, m.ConnectRequest)
        sent.append(msg.data)
        if lose[0]:
            lose[0] = False
            return None  # the link is lost with the request unanswered
        return [m.Result(req=msg.req, ok=True, peer=msg.target)]

    async with _terminal_on_fake_relays(relay, app_sock, client) as term:
        app = Conn(app_sock)
        failed: list[RelayError] = []
        try:
            await term.connect("bob", app=app)
        except RelayError as exc:
            failed.append(exc)
        assert sent == [b"", b""] and not failed  # nothing went early: retried
        sent.clear()
        lose[0] = True
        client.sendall(b"hello")
        await async_wait_until(lambda: app.peek_now(16) == b"hello", 10, what="the bytes")
        try:
            await term.connect("bob", app=app)
        except RelayError as exc:
            failed.append(exc)
        assert sent == [b"hello"]  # once, and no retry
        assert [exc.code for exc in failed] == ["closed-with-early-data"]
        assert term.early_ok
        assert app_sock.recv(16) == b"hello"  # not taken: nothing pretends they went



def test_a_link_lost_after_a_request_with_early_data_is_not_retried(run) -> None:
    run(_a_link_lost_after_a_request_with_early_data_is_not_retried())


async def _a_link_lost_while_asked_about_an_insecure_peer_is_not_retried() -> None:
    """The same when the link is lost after the relay asked whether to connect to a
    peer that cannot encrypt (para 0037) and this side accepted: the request and its
    early data went on to the target with that answer."""
    from kakehashi.relay.agent import RelayError

    app_sock, client = socket.socketpair()
    sent: list[bytes] = []

    def relay(msg: m.Msg) -> list[m.Msg] | None:
        if isinstance(msg, m.ConnectRequest):
            sent.append(msg.data)
            return [m.Notify(req=msg.req, peer=msg.target, insecure=True)]
        return None  # the answer to the question: the link is lost after it

    async with _terminal_on_fake_relays(relay, app_sock, client) as term:
        term.cfg.insecure_ok = True
        client.sendall(b"hello")
        app = Conn(app_sock)
        await async_wait_until(lambda: app.peek_now(16) == b"hello", 10, what="the bytes")
        with pytest.raises(RelayError) as failed:
            await term.connect("bob", app=app)
        assert failed.value.code == "closed-with-early-data"
        assert sent == [b"hello"]


def test_a_link_lost_while_asked_about_an_insecure_peer_is_not_retried(run) -> None:
    run(_a_link_lost_while_asked_about_an_insecure_peer_is_not_retried())


async def _nothing_is_peeked_where_the_link_may_not_carry_it() -> None:
    """Where the link may not carry early data (e2e, or a plaintext link the relay
    may still instruct to encrypt) the application is not even looked at: peeking
    ``relay pipe``'s stdin reads it ahead into memory. Where it may, it is."""
    from kakehashi.relay import terminal as t
    from kakehashi.relay.agent import Terminal

    peeks: list[int] = []

    class App:
        def peek_now(self, n: int) -> bytes:
            peeks.append(n)
            return b""

    class Link:
        reserved = False
        allowed = False

        def takes_early(self, *, encrypt=False, e2e=False) -> bool:
            return self.allowed and not e2e

        async def connect(self, target, service="", *, encrypt=False, e2e=False,
                          early=b""):
            return t.Connected(target, False, False, "", True, 0)

    link = Link()
    term = Terminal(TerminalConfig(server="127.0.0.1", port=1, user="u", password="p"))

    async def acquire():
        return link

    term.acquire = acquire  # type: ignore[method-assign]
    await term.connect("bob", app=App())  # type: ignore[arg-type]
    assert peeks == []
    link.allowed = True
    await term.connect("bob", app=App(), e2e=True)  # type: ignore[arg-type]
    assert peeks == []
    await term.connect("bob", app=App())  # type: ignore[arg-type]
    assert peeks == [m.EARLY_DATA_MAX]


def test_nothing_is_peeked_where_the_link_may_not_carry_it(run) -> None:
    run(_nothing_is_peeked_where_the_link_may_not_carry_it())


class _PoolLink:
    """A logged-in link as the pool sees it: idle until a request takes it."""

    def __init__(self, term) -> None:
        self.owner = term
        self.reserved = False
        self.busy = False
        self.idle_since = 0.0
        self.session = None

    @property
    def idle(self) -> bool:
        return not self.reserved and not self.busy

    async def connect(self, target, service="", *, encrypt=False, e2e=False, early=b""):
        from kakehashi.relay import terminal as t

        self.busy = True  # paired: it never comes back (the session cipher)
        return t.Connected(target, False, False, "", True, 0)

    def close(self) -> None:
        self.busy = True


async def _no_spare_is_opened_while_a_session_is_set_up() -> None:
    """Under the session cipher every session uses its link up, and the terminal
    replaces it. The replacement costs the relay a TLS handshake and a login: opened
    while the session is being set up, it delays that setup (the relay does it in
    between). With an idle spare left the pool waits until the session has carried
    bytes both ways; a burst that leaves no idle spare opens one at once."""
    from kakehashi.relay import agent
    from kakehashi.relay.agent import Session, Terminal

    term = Terminal(TerminalConfig(server="127.0.0.1", port=1, user="u", password="p",
                                   spares=2))
    term.sessions_close_links = True
    first, second = _PoolLink(term), _PoolLink(term)
    term.links = {first, second}
    opened: list[_PoolLink] = []
    looked = 0

    async def open_link():
        link = _PoolLink(term)
        term.links.add(link)
        opened.append(link)
        return link

    idle_links = term.idle_links

    def counted():
        nonlocal looked
        looked += 1
        return idle_links()

    parked = False
    setups_over = term._setups_over

    async def watched() -> None:
        nonlocal parked
        parked = True  # nothing awaits before its wait: the maintainer is parked there
        await setups_over()

    term.open_link = open_link  # type: ignore[method-assign]
    term.idle_links = counted  # type: ignore[method-assign]
    term._setups_over = watched  # type: ignore[method-assign]
    saved = agent.SETTLE
    agent.SETTLE = 60.0  # the cap on the wait is not what is tested
    maintainer = asyncio.create_task(term.maintain())
    try:
        await async_wait_until(lambda: looked >= 2, what="the pool looked at")
        await async_wait_until(lambda: not term._changed.is_set(),
                               what="the maintainer waiting")
        parked = False
        link, _ = await term.connect("pi")
        # an idle spare is left: the maintainer is not even woken in the middle of the
        # setup (it would only wait for it), and opens no spare
        assert not term._changed.is_set(), "the maintainer was woken by the setup"
        await loop_turns(3)
        assert not parked and opened == [], "the pool acted in the middle of a setup"
        # ... and opens the spare once the session carries bytes both ways
        session = Session(link)  # type: ignore[arg-type]
        link.session = session  # as run_session does
        session.carried(sent=True)
        session.carried(received=True)
        await async_wait_until(lambda: opened, what="the spare opened after the setup")
        assert len(opened) == 1
        # a burst: both spares taken, none idle: a spare is opened at once
        await term.connect("pi")
        await term.connect("pi")
        await async_wait_until(lambda: len(opened) >= 2, what="a spare for the burst")
    finally:
        agent.SETTLE = saved
        term._stop = True
        maintainer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await maintainer


def test_no_spare_is_opened_while_a_session_is_set_up(run) -> None:
    run(_no_spare_is_opened_while_a_session_is_set_up())


async def test_session_info_lines_wait_until_the_setup_is_over(monkeypatch, caplog):
    """The info lines about a session being set up ("session from ...: cipher ...")
    are written :data:`agent.SETUP_GRACE` later, not in the step that starts the
    session nor on the loop's next turns, which are still inside the setup: there its
    first reply waits for this process (issue 12)."""
    monkeypatch.setattr(agent, "SETUP_GRACE", 60.0)  # (a stalled loop does not matter)
    caplog.set_level(logging.INFO, logger="kakehashi.relay.agent")
    agent._log_soon("session %s %s: cipher %s", "to", "pi", m.CIPHER_SESSION)
    await loop_turns(3)
    assert not [r for r in caplog.records if r.name == "kakehashi.relay.agent"]
    monkeypatch.setattr(agent, "SETUP_GRACE", 0.01)
    agent._log_soon("session %s %s: cipher %s", "from", "laptop", m.CIPHER_SESSION)
    await async_wait_until(lambda: any("session from laptop" in r.getMessage()
                                       for r in caplog.records), what="the info line")


def test_the_pool_hears_once_that_links_are_used_up() -> None:
    """The first session under the session cipher tells the pool that links no longer
    come back (it stops settling); later ones do not wake it again in the middle of
    their setup (issue 12)."""
    from kakehashi.relay.agent import Terminal

    term = Terminal(TerminalConfig(server="127.0.0.1", port=1, user="u", password="p"))
    assert not term.sessions_close_links
    term.links_used_up()
    assert term.sessions_close_links and term._changed.is_set()
    term._changed.clear()
    term.links_used_up()
    assert not term._changed.is_set()


def _link_the_relay_does_not_read(sock: socket.socket, *, connect_timeout: float = 10.0,
                                  owner: agent.Terminal | None = None) -> RelayLink:
    """A logged-in link on ``sock`` whose relay end reads nothing: what the kernel
    holds for it is full, so the next write waits."""
    link = RelayLink(TerminalConfig(server="127.0.0.1", port=1, user="u", password="p",
                                    connect_timeout=connect_timeout), owner)
    link.framed = FramedConn(Conn(sock))
    link.t.login("u", "p")
    link.t.receive(m.LoginOk(conn_id=1, token="tok", encryption="off", keepalive=15.0,
                             dead_after=45.0))
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            sock.send(b"\0" * 65536)
    return link


async def _a_request_the_relay_does_not_take_times_out() -> None:
    """A request's deadline covers its send: a relay that stopped reading (its socket
    buffer full) fails the request with the timeout instead of holding the caller for
    as long as it does not read. The link is closed: its stream may hold a frame cut
    short, and a relay that takes nothing is not serving it."""
    from kakehashi.relay.agent import RelayError

    mine, relay = socket.socketpair()
    try:
        link = _link_the_relay_does_not_read(mine)
        failed: list[RelayError] = []

        async def ask() -> None:
            try:
                await link.request(link.t.connect("bob", early=b"x" * 4096), 0.05)
            except RelayError as exc:
                failed.append(exc)

        task = asyncio.ensure_future(ask())
        await async_wait_until(lambda: task.done(), 10,
                               what="the request to fail while the relay reads nothing")
        assert [exc.code for exc in failed] == ["timeout"]
        assert link.closed.is_set()
    finally:
        mine.close()
        relay.close()


def test_a_request_the_relay_does_not_take_times_out(run) -> None:
    run(_a_request_the_relay_does_not_take_times_out())


async def _a_link_lost_while_a_request_is_written_is_a_relay_error() -> None:
    """The link is closed (its reader saw the relay's end, or the keepalive gave up)
    while a request waits to be written: the caller gets the lost link as a
    RelayError, as when it goes while the answer is awaited (a raw ConnClosed went
    past `relay connect`'s and `relay pipe`'s handlers as a traceback)."""
    from kakehashi.relay.agent import RelayError

    mine, relay = socket.socketpair()
    try:
        link = _link_the_relay_does_not_read(mine)
        ask = asyncio.ensure_future(link.request(link.t.connect("bob"), 30))
        await loop_turns()
        assert not ask.done()
        link.close()
        await async_wait_until(ask.done, 10, what="the request to fail with the link")
        exc = ask.exception()
        assert isinstance(exc, RelayError) and exc.code == "closed", repr(exc)
    finally:
        mine.close()
        relay.close()


def test_a_link_lost_while_a_request_is_written_is_a_relay_error(run) -> None:
    run(_a_link_lost_while_a_request_is_written_is_a_relay_error())


async def _an_answer_the_relay_does_not_take_closes_the_link() -> None:
    """The agent's answer to a connection request (here a refusal: this terminal takes
    no connections) has the terminal's connect timeout as its deadline: a relay that
    stopped reading gets the link closed (the pool replaces it) and a warning, where
    the answer waited for as long as the relay did not read (until the keepalive gave
    up, about 45 s) and then failed its task with a raw ConnClosed traceback."""
    mine, relay = socket.socketpair()
    try:
        cfg = TerminalConfig(server="127.0.0.1", port=1, user="u", password="p")
        term = agent.Terminal(cfg)
        link = _link_the_relay_does_not_read(mine, connect_timeout=0.05, owner=term)
        term.links.add(link)
        ev = link.t.receive(m.Notify(req=7, peer="bob"))
        answer = asyncio.ensure_future(term.on_incoming(link, ev))  # type: ignore[arg-type]
        await async_wait_until(answer.done, 10,
                               what="the refusal to give up on a relay that reads nothing")
        assert answer.exception() is None
        assert link.closed.is_set() and link not in term.links
    finally:
        mine.close()
        relay.close()


def test_an_answer_the_relay_does_not_take_closes_the_link(run) -> None:
    run(_an_answer_the_relay_does_not_take_closes_the_link())


async def _an_end_the_relay_does_not_take_ends_the_link_reader() -> None:
    """The link's reader answers a peer's end that came before a session took the link
    (end and release, sent from the reader itself): against a relay that stopped
    reading it gave up on the answer after the connect timeout and closed the link,
    instead of waiting there, reading nothing more from the relay, for as long as the
    relay did not read."""
    mine, relay = socket.socketpair()
    try:
        link = _link_the_relay_does_not_read(mine, connect_timeout=0.05)
        link.t.receive(m.Notify(req=7, peer="bob"))
        link.t.accept()
        link.reader = asyncio.ensure_future(link._read_loop())
        relay.send(m.TERMINAL_CODEC.encode(m.End(reason="bye")))
        await async_wait_until(link.reader.done, 10,
                               what="the reader to give up on a relay that reads nothing")
        assert link.closed.is_set()
        assert link.ended_early == "bye"
    finally:
        mine.close()
        relay.close()


def test_an_end_the_relay_does_not_take_ends_the_link_reader(run) -> None:
    run(_an_end_the_relay_does_not_take_ends_the_link_reader())


async def _a_logout_the_socket_takes_in_part_still_goes_whole() -> None:
    """`relay logout` (Terminal.close(logout=True)) closes the link right after the
    logout message. A socket that takes that message only in part (its buffer nearly
    full) leaves the rest to FramedConn.send_now's background write; the close must
    wait for it (within the logout's bound), or the relay gets a frame cut short and
    the user's other connections are not ended (step 6)."""
    pair, relay = socket.socketpair()
    first = [True]

    class TakesInPart(socket.socket):  # the kernel takes 3 bytes of the first write
        def send(self, data, *args) -> int:  # type: ignore[override]
            if first[0]:
                first[0] = False
                return super().send(bytes(data[:3]), *args)
            return super().send(data, *args)

    mine = TakesInPart(fileno=pair.detach())
    try:
        link = RelayLink(TerminalConfig(server="127.0.0.1", port=1, user="u", password="p"))
        link.framed = FramedConn(Conn(mine))
        link.t.login("u", "p")
        link.t.receive(m.LoginOk(conn_id=1, token="tok", encryption="off", keepalive=15.0,
                                 dead_after=45.0))
        expected = m.TERMINAL_CODEC.encode(m.Logout())
        await link.logout()
        assert not first[0]  # the write was taken in part
        relay.setblocking(False)
        got = b""
        loop = asyncio.get_running_loop()
        while chunk := await loop.sock_recv(relay, 65536):
            got += chunk
        assert got == expected
    finally:
        mine.close()
        relay.close()


def test_a_logout_the_socket_takes_in_part_still_goes_whole(run) -> None:
    run(_a_logout_the_socket_takes_in_part_still_goes_whole())


async def _a_close_notify_the_relay_does_not_take_closes_the_link(home) -> None:
    """The relay leaves TLS for the session cipher (its close_notify) and the link's
    reader answers with the terminal's own: that write has the connect timeout as its
    deadline, as every other write to the relay (RelayLink.sending). Against a relay
    that reads nothing it waited for as long as the relay did not read, holding the
    link's reader - and no keepalive watches a link under the session cipher (TCP
    keepalive sees a peer whose kernel still acknowledges)."""
    from kakehashi.relay import terminal

    relay, mine = await tls_pair(home)
    try:
        link = RelayLink(TerminalConfig(server="127.0.0.1", port=1, user="u", password="p",
                                        connect_timeout=0.05))
        link.framed = FramedConn(mine)
        # paired under the session cipher: the relay's close_notify means "leave TLS"
        link.t.state = terminal.TState.PAIRED
        link.t.session_keys = bytes(32)
        assert link.t.leaving_tls
        raw = mine.sock  # (written past TLS: the relay reads nothing anyway)
        raw.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:  # the relay reads nothing: fill what the kernel holds for it
                socket.socket.send(raw, b"\0" * 65536)
        await relay.leave_tls_write()
        link.reader = asyncio.ensure_future(link._read_loop())
        await async_wait_until(link.reader.done, 10,
                               what="the reader to give up on a relay that takes no "
                                    "close_notify")
        assert link.closed.is_set()
    finally:
        relay.close()
        mine.close()


def test_a_close_notify_the_relay_does_not_take_closes_the_link(run, tmp_path,
                                                                monkeypatch) -> None:
    from kakehashi.core.stream import half_close_ready

    if not half_close_ready():
        pytest.skip("no one-call close_notify in this Python/OpenSSL")
    monkeypatch.setenv("KAKEHASHI_HOME", str(tmp_path / "home"))
    run(_a_close_notify_the_relay_does_not_take_closes_the_link(tmp_path / "home"))

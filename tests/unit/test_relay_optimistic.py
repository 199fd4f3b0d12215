"""Optimistic pairing (issue 12): the decisions of the relay's control unit, of the
terminal's sans-IO connection and of the agent's acceptor, and the sealed close that
carries a reason.

A target that offers :data:`messages.CAP_OPTIMISTIC` gets the requester's early data
with the notification, accepts before it connects its service, and closes the session
with a reason when the service then fails. Where the capability is missing (an old
terminal, the switch off, a requester under the session cipher that cannot read the
sealed close) the old flow stays: notification without data, early data behind the
pairing.
"""

from __future__ import annotations

import asyncio

import pytest

from kakehashi.core import crypto, wire
from kakehashi.core.pump import PeerClosed, UnsealedEnd, open_end, seal_close, seal_end
from kakehashi.relay import agent as agent_mod
from kakehashi.relay import messages as m
from kakehashi.relay import terminal as t
from kakehashi.relay.control import ControlUnit, Forward, LeaveTLS, Pair, Send, Settings
from kakehashi.relay.control import UserRecord as Record

OPT = m.Attrs(ciphers=[m.CIPHER_TLS, m.CAP_OPTIMISTIC])
SESSION = m.Attrs(ciphers=[m.CIPHER_TLS, m.CIPHER_SESSION])
BOTH = m.Attrs(ciphers=[m.CIPHER_TLS, m.CIPHER_SESSION, m.CAP_OPTIMISTIC])
EARLY = b"SSH-2.0-OpenSSH_9.2\r\n"


class Relay:
    def __init__(self, **settings) -> None:
        self.cu = ControlUnit(Settings(**settings))
        self.n = 0

    def login(self, name: str, attrs: m.Attrs | None, *, encrypted: bool = True,
              **record) -> int:
        self.n += 1
        cid = self.cu.connection_made(f"10.0.0.{self.n}", encrypted=encrypted,
                                      leaves_tls=True)
        self.cu.receive(cid, m.Login(user=name, password="pw", attrs=attrs), 0.0)
        self.cu.authenticated(cid, Record(name, **record), 0.0)
        return cid

    def request(self, a: int, *, early: bytes = EARLY, **kw) -> list[object]:
        return self.cu.receive(a, m.ConnectRequest(req=1, target="pi", data=early, **kw), 0.0)


def msgs(actions, cid, kind) -> list:
    return [x.msg for x in actions if isinstance(x, Send) and x.conn == cid
            and isinstance(x.msg, kind)]


def one(actions, cid, kind):
    found = msgs(actions, cid, kind)
    assert len(found) == 1, actions
    return found[0]


# -- the relay's control unit ----------------------------------------------------------
def test_early_data_goes_with_the_notification_and_not_again_at_the_pairing():
    r = Relay()
    b = r.login("pi", OPT)
    a = r.login("laptop", None)  # an old requester: re-encrypting, it needs nothing new
    n = one(r.request(a), b, m.Notify)
    assert n.optimistic and n.data == EARLY and n.cipher == ""
    paired = r.cu.receive(b, m.Accept(req=n.req), 0.0)
    assert any(isinstance(x, Pair) for x in paired)
    assert not [x for x in paired if isinstance(x, Forward)]
    assert one(paired, a, m.Result).early == len(EARLY)  # the requester skips them


def test_a_target_lost_after_it_was_sent_early_data_fails_with_a_code_not_retried():
    """The notified link is lost before its accept arrives: the target may have written
    the early data to its service already, so the requester is told in a code its
    terminal does not retry (a retry delivered the bytes a second time, on another
    session). Without early data in the notification the retryable code stays."""
    for early, code in ((EARLY, "target-lost-early"), (b"", "target-lost")):
        r = Relay()
        b = r.login("pi", OPT)
        a = r.login("laptop", None)
        assert one(r.request(a, early=early), b, m.Notify).data == early
        res = one(r.cu.connection_lost(b, 0.0), a, m.Result)
        assert (res.ok, res.code) == (False, code)
    assert "target-lost-early" not in agent_mod.RETRIED_CODES
    assert "target-lost" in agent_mod.RETRIED_CODES


def test_under_the_session_cipher_the_notification_carries_them_sealed():
    r = Relay()
    b = r.login("pi", BOTH)
    a = r.login("laptop", BOTH)
    n = one(r.request(a), b, m.Notify)
    assert n.optimistic and n.cipher == m.CIPHER_SESSION and EARLY not in n.data
    target = crypto.E2ESession.issued(n.keys[:16], n.keys[16:], suite=crypto.SUITE_AES_128_GCM)
    assert target.open(n.data) == EARLY  # the requester's first message (counter 0)
    paired = r.cu.receive(b, m.Accept(req=n.req), 0.0)
    assert not [x for x in paired if isinstance(x, Forward)]
    res = one(paired, a, m.Result)
    assert res.early == len(EARLY) and res.keys[16:] == n.keys[:16]
    assert [x for x in paired if isinstance(x, LeaveTLS)] == [LeaveTLS(a), LeaveTLS(b)]


@pytest.mark.parametrize("case", ["target-old", "switch-off", "requester-old-session-cipher",
                                  "target-must-upgrade"])
def test_without_the_capability_the_old_flow(case):
    r = Relay(optimistic=case != "switch-off")
    b = r.login("pi", SESSION if case == "target-old" else BOTH,
                encrypted=case != "target-must-upgrade")
    a = r.login("laptop", SESSION if case == "requester-old-session-cipher" else BOTH)
    n = one(r.request(a, encrypt=case == "target-must-upgrade"), b, m.Notify)
    assert not n.optimistic and n.data == b""
    # an old target gets nothing it would not decode (omit_defaults)
    assert b"optimistic" not in m.TERMINAL_CODEC.encode(n)
    r.cu.tls_established(b)  # (the target upgrades before it accepts: STARTTLS)
    paired = r.cu.receive(b, m.Accept(req=n.req), 0.0)
    fwd = [x for x in paired if isinstance(x, Forward)]
    assert len(fwd) == 1 and fwd[0].conn == b  # behind the pairing, as before


@pytest.mark.parametrize("why", ["forbidden", "not-logged-in", "no-such-service"])
def test_no_early_data_leaves_before_the_relays_checks(why):
    r = Relay()
    b = r.login("pi", m.Attrs(ciphers=OPT.ciphers, services=["ssh"]),
                allowed_peers=("bob",) if why == "forbidden" else None)
    a = r.login("laptop", OPT)
    acts = r.cu.receive(a, m.ConnectRequest(
        req=1, target="nobody" if why == "not-logged-in" else "pi",
        service="web" if why == "no-such-service" else "ssh", data=EARLY), 0.0)
    assert not msgs(acts, b, m.Notify)
    assert one(acts, a, m.Error).code == why


def test_a_refusal_keeps_the_targets_link_in_tls_and_idle():
    r = Relay()
    b = r.login("pi", BOTH)
    a = r.login("laptop", BOTH)
    n = one(r.request(a), b, m.Notify)
    acts = r.cu.receive(b, m.Refuse(req=n.req, reason="no service 'x'"), 0.0)
    res = one(acts, a, m.Result)
    assert not res.ok and res.message == "no service 'x'" and res.keys is None
    assert not [x for x in acts if isinstance(x, LeaveTLS | Forward)]
    assert not r.cu.conns[b].switched and r.cu.conns[b].state.value == "idle"


def test_a_service_that_fails_after_the_accept_ends_with_its_reason():
    """Re-encrypting (or plaintext): the agent's end notification right behind its
    accept reaches the requester with the reason; both sides release."""
    r = Relay()
    b = r.login("pi", OPT)
    a = r.login("laptop", None)
    n = one(r.request(a), b, m.Notify)
    r.cu.receive(b, m.Accept(req=n.req), 0.0)
    acts = r.cu.receive(b, m.End(reason="service ssh unavailable"), 0.0)
    assert one(acts, a, m.End).reason == "service ssh unavailable"
    r.cu.receive(b, m.Release(), 0.0)
    done = r.cu.receive(a, m.Release(), 0.0)
    assert msgs(done, a, m.Released) and msgs(done, b, m.Released)


# -- the terminal's connection ---------------------------------------------------------
def _notified_terminal(offers: bool) -> t.TerminalConn:
    tc = t.TerminalConn()
    tc.login("pi", "pw", attrs=OPT if offers else m.Attrs())
    tc.encrypted = True
    tc.receive(m.LoginOk(conn_id=1, token="x", encryption="optional", keepalive=15,
                         dead_after=45))
    return tc


def test_the_terminal_takes_an_optimistic_notification_only_if_it_offered_it():
    ev = _notified_terminal(True).receive(m.Notify(req=7, peer="laptop", optimistic=True,
                                                   data=EARLY))
    assert isinstance(ev, t.IncomingRequest) and ev.optimistic and ev.early_data == EARLY
    with pytest.raises(t.RemoteProtocolError):
        _notified_terminal(False).receive(m.Notify(req=7, peer="laptop", optimistic=True))
    with pytest.raises(t.RemoteProtocolError):  # early data only with the flow
        _notified_terminal(True).receive(m.Notify(req=7, peer="laptop", data=EARLY))


# -- the agent's acceptor --------------------------------------------------------------
class FakeLink:
    """What :func:`service_acceptor` uses of a link, recording the order of events."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.t = t.TerminalConn()
        self.t.encrypted = True
        self.t.state = t.TState.NOTIFIED
        self.cfg = agent_mod.TerminalConfig(server="x", port=1, user="pi", password="")

    async def send(self, msgs_: list[m.Msg], what: str = "") -> None:
        self.log += [f"send {type(x).__name__}" for x in msgs_]

    async def accept_at_once(self, ev: t.IncomingRequest) -> None:
        self.log.append("accept")

    async def close_accepted(self, ev: t.IncomingRequest, reason: str) -> None:
        self.log.append(f"close: {reason}")

    def close(self) -> None:
        self.log.append("link closed")


def _run_acceptor(monkeypatch, ev: t.IncomingRequest, *, service_up: bool) -> list[str]:
    log: list[str] = []

    async def open_tcp(host, port, timeout):
        log.append("service connect")
        if not service_up:
            raise OSError("connection refused")
        return "app"

    async def run_session(link, app, info, *, initiator):
        log.append(f"session {app}")
        return ""

    monkeypatch.setattr(agent_mod, "open_tcp", open_tcp)
    monkeypatch.setattr(agent_mod, "run_session", run_session)
    accept = agent_mod.service_acceptor({"ssh": ("127.0.0.1", 22)}, lambda c: None)
    asyncio.run(accept(FakeLink(log), ev))
    return log


def _incoming(**kw) -> t.IncomingRequest:
    base = dict(req=1, peer="laptop", service="ssh", encrypt=False, e2e=False, peer_key="",
                insecure=False)
    return t.IncomingRequest(**{**base, **kw})


def test_the_agent_accepts_before_it_connects_the_service(monkeypatch):
    log = _run_acceptor(monkeypatch, _incoming(optimistic=True, early_data=EARLY),
                        service_up=True)
    assert log == ["accept", "service connect", "session app"]


def test_a_service_that_fails_after_the_accept_closes_with_the_reason(monkeypatch):
    log = _run_acceptor(monkeypatch, _incoming(optimistic=True), service_up=False)
    assert log == ["accept", "service connect",
                   "close: service ssh unavailable (connection refused)"]


def test_a_refusal_still_comes_before_anything(monkeypatch):
    log = _run_acceptor(monkeypatch, _incoming(optimistic=True, service="web",
                                               early_data=EARLY), service_up=True)
    assert log == ["send Refuse"]  # no accept, no service connect: the bytes are dropped


def test_without_the_flow_the_agent_connects_first(monkeypatch):
    log = _run_acceptor(monkeypatch, _incoming(), service_up=False)
    assert log == ["service connect", "send Refuse"]


# -- the sealed close ------------------------------------------------------------------
def _pair() -> tuple[crypto.E2ESession, crypto.E2ESession]:
    k1, k2 = b"a" * 16, b"b" * 16
    suite = crypto.SUITE_AES_128_GCM
    return (crypto.E2ESession.issued(k1, k2, suite=suite),
            crypto.E2ESession.issued(k2, k1, suite=suite))


def test_a_sealed_close_carries_its_reason_and_an_end_stays_an_end():
    sender, receiver = _pair()
    body = seal_close(sender, "service ssh unavailable")
    assert len(body) <= wire.SEALED_EOF_SIZE + wire.CLOSE_REASON_MAX
    with pytest.raises(PeerClosed) as exc:
        open_end(receiver, body)
    assert exc.value.reason == "service ssh unavailable"
    sender, receiver = _pair()
    open_end(receiver, seal_end(sender))  # a clean end: no exception
    with pytest.raises(UnsealedEnd):
        open_end(receiver, b"")


def test_a_tampered_close_fails_authentication():
    sender, receiver = _pair()
    body = bytearray(seal_close(sender, "service ssh unavailable"))
    body[3] ^= 1
    with pytest.raises(crypto.E2EError):
        open_end(receiver, bytes(body))


def test_the_wire_takes_an_eof_with_a_sealed_reason_within_its_limit():
    limits = wire.DEFAULT_LIMITS
    for ok in (0, wire.SEALED_EOF_SIZE, wire.SEALED_EOF_SIZE + wire.CLOSE_REASON_MAX):
        limits.check(wire.FrameType.EOF, ok)
    for bad in (1, wire.SEALED_EOF_SIZE - 1, wire.SEALED_EOF_SIZE + wire.CLOSE_REASON_MAX + 1):
        with pytest.raises(wire.WireError):
            limits.check(wire.FrameType.EOF, bad)


def test_only_a_handler_that_takes_the_early_data_is_offered_the_flow():
    cfg = agent_mod.TerminalConfig(server="x", port=1, user="pi", password="")

    async def custom(link, ev) -> None:  # accepts the old way: it knows no early data
        return None

    async def build() -> tuple[bool, bool, bool]:
        acceptor = agent_mod.service_acceptor({"ssh": ("127.0.0.1", 22)}, lambda c: None)
        return (agent_mod.Terminal(cfg, accept=custom).cfg.optimistic,
                agent_mod.Terminal(cfg, accept=acceptor).cfg.optimistic,
                agent_mod.Terminal(cfg).cfg.optimistic)  # a requester reads sealed closes

    assert asyncio.run(build()) == (False, True, True)

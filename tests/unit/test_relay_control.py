"""ControlUnit (spec 000, control unit 42): every flow of Figs. 2-4 as actions.

Step numbers in comments refer to the spec summary (shared/spec/000-relay-server.md).
"""

from __future__ import annotations

import pytest

from kakehashi.core import wire
from kakehashi.relay import messages as m
from kakehashi.relay.control import (
    Authenticate,
    Close,
    ControlUnit,
    Forward,
    Pair,
    Send,
    Settings,
    State,
    Unpair,
    UpgradeTLS,
    UserRecord,
)


def sent(actions, cid, kind=m.Msg):
    """Messages of type ``kind`` that ``actions`` send to connection ``cid``."""
    return [a.msg for a in actions if isinstance(a, Send) and a.conn == cid
            and isinstance(a.msg, kind)]


def closes(actions) -> list[Close]:
    return [a for a in actions if isinstance(a, Close)]


def one(actions, cid, kind):
    msgs = sent(actions, cid, kind)
    assert len(msgs) == 1, (kind.__name__, actions)
    return msgs[0]


class Relay:
    """A ControlUnit plus the bookkeeping of a driver: records, tokens, a clock."""

    def __init__(self, **settings) -> None:
        self.cu = ControlUnit(Settings(**settings))
        self.now = 0.0
        self.records: dict[str, UserRecord] = {}
        self.tokens: dict[str, str] = {}

    def login(self, name, *, encrypted=False, attrs=None, **record) -> int:
        """Fig. 2 steps 1-4 with a password: connect, credentials, positive response."""
        self.records.setdefault(name, UserRecord(name, **record))
        cid = self.cu.connection_made(f"10.0.0.{len(self.records)}", encrypted=encrypted)
        acts = self.recv(cid, m.Login(user=name, password="pw", attrs=attrs))
        assert acts == [Authenticate(cid, name, "pw")]
        self.last = self.cu.authenticated(cid, self.records[name], self.now)
        self.tokens[name] = one(self.last, cid, m.LoginOk).token
        return cid

    def spare(self, name, *, encrypted=False, attrs=None) -> int:
        """Steps 17-19: a spare connection, authenticated with the resumption token."""
        cid = self.cu.connection_made("10.0.1.1", encrypted=encrypted)
        acts = self.recv(cid, m.Login(user=name, token=self.tokens[name], attrs=attrs))
        assert not [a for a in acts if isinstance(a, Authenticate)]
        one(acts, cid, m.LoginOk)
        return cid

    def recv(self, cid, msg):
        return self.cu.receive(cid, msg, self.now)

    def state(self, cid) -> State:
        return self.cu.conns[cid].state


@pytest.fixture
def r() -> Relay:
    return Relay()


def pair(r: Relay, a: int, b: int, target: str, req: int = 1) -> None:
    """Steps 11-16 without encryption."""
    note = one(r.recv(a, m.ConnectRequest(req=req, target=target)), b, m.Notify)
    acts = r.recv(b, m.Accept(req=note.req))
    assert Pair(a, b) in acts and one(acts, a, m.Result).ok


# -- Fig. 2: login, keepalive, logout -----------------------------------------------
def test_login_ok_returns_token_and_settings(r):
    cid = r.cu.connection_made("10.0.0.1", encrypted=False)
    assert r.recv(cid, m.Login(user="alice", password="pw")) == [Authenticate(cid, "alice", "pw")]
    ok = one(r.cu.authenticated(cid, UserRecord("alice"), 0.0), cid, m.LoginOk)
    assert ok.token and ok.conn_id == cid and ok.encryption == "optional"
    assert ok.dead_after == Settings().dead_after
    assert r.state(cid) is State.IDLE


def test_bad_password_refused_with_growing_delays(r):
    delays = []
    for _ in range(3):
        cid = r.cu.connection_made("192.0.2.9", encrypted=False)
        r.recv(cid, m.Login(user="alice", password="wrong"))
        acts = r.cu.authenticated(cid, None, 0.0)  # step 3: negative response and close
        assert one(acts, cid, m.LoginFail).reason
        close = closes(acts)
        assert [c.conn for c in close] == [cid]
        delays.append(close[0].delay)
    assert 0 < delays[0] < delays[1] < delays[2]


def test_failures_from_other_addresses_do_not_slow_down(r):
    for addr in ("192.0.2.1", "192.0.2.2"):
        cid = r.cu.connection_made(addr, encrypted=False)
        r.recv(cid, m.Login(user="alice", password="wrong"))
        [close] = closes(r.cu.authenticated(cid, None, 0.0))
        assert close.delay == Settings().fail_base_delay


def test_lockout_after_repeated_failures():
    r = Relay(fail_lockout=3)
    for _ in range(3):
        cid = r.cu.connection_made("192.0.2.9", encrypted=False)
        r.recv(cid, m.Login(user="alice", password="wrong"))
        r.cu.authenticated(cid, None, 0.0)
    cid = r.cu.connection_made("192.0.2.9", encrypted=False)
    acts = r.recv(cid, m.Login(user="alice", password="pw"))
    assert one(acts, cid, m.LoginFail)
    assert not [a for a in acts if isinstance(a, Authenticate)]
    assert [c.conn for c in closes(acts)] == [cid]
    r.now = Settings().fail_window + 1  # the window passes: the address may try again
    cid = r.cu.connection_made("192.0.2.9", encrypted=False)
    assert r.recv(cid, m.Login(user="alice", password="pw")) == [Authenticate(cid, "alice", "pw")]


def _guess(r: Relay, addr: str, user: str = "alice", password: str = "wrong"):
    cid = r.cu.connection_made(addr, encrypted=False)
    return cid, r.recv(cid, m.Login(user=user, password=password))


def test_parallel_burst_checks_at_most_the_lockout_limit():
    """Item 1: 120 guesses sent at once: only the limit's worth are checked at all."""
    r = Relay()
    checks, refused = [], 0
    for i in range(120):
        cid, acts = _guess(r, "192.0.2.9", password=f"guess-{i}")
        if [a for a in acts if isinstance(a, Authenticate)]:
            checks.append(cid)
        else:
            # none has failed yet: the refusal says the limit is full of checks, and
            # that trying later may work (a terminal does not give up on it)
            fail = one(acts, cid, m.LoginFail)
            assert fail.reason.startswith("too many logins from your address are being "
                                          "checked at once") and fail.code == "busy"
            assert [c.reason for c in closes(acts)] == ["lockout"]
            refused += 1
    assert len(checks) == Settings().fail_lockout and refused == 100
    for cid in checks:  # the checks finish later: each is a failure
        assert one(r.cu.authenticated(cid, None, 0.0), cid, m.LoginFail)
    assert r.cu.throttle.pending == 0
    cid, acts = _guess(r, "192.0.2.9")  # now the failures themselves lock it out
    fail = one(acts, cid, m.LoginFail)
    assert fail.reason == "too many failed logins from your address" and not fail.code


def test_correct_password_hidden_in_a_burst_gets_no_login_ok():
    r = Relay(fail_lockout=5)
    r.records["alice"] = UserRecord("alice")
    for _ in range(5):
        _guess(r, "192.0.2.9")  # still being checked
    cid, acts = _guess(r, "192.0.2.9", password="pw")
    assert not [a for a in acts if isinstance(a, Authenticate)]
    assert not sent(acts, cid, m.LoginOk) and one(acts, cid, m.LoginFail)


def test_a_success_does_not_erase_failures_of_other_attempts():
    r = Relay(fail_lockout=3)
    cids = [_guess(r, "192.0.2.9")[0] for _ in range(3)]
    r.cu.authenticated(cids[0], None, 0.0)
    one(r.cu.authenticated(cids[1], UserRecord("alice"), 0.0), cids[1], m.LoginOk)
    r.cu.authenticated(cids[2], None, 0.0)
    cid, acts = _guess(r, "192.0.2.9")  # 2 failures < 3: still checked
    assert [a for a in acts if isinstance(a, Authenticate)]
    r.cu.authenticated(cid, None, 0.0)
    cid, acts = _guess(r, "192.0.2.9", password="pw")  # 3 failures: locked
    assert one(acts, cid, m.LoginFail) and not [a for a in acts if isinstance(a, Authenticate)]


def test_a_guesser_that_hangs_up_early_still_pays():
    r = Relay(fail_lockout=2)
    for _ in range(2):
        cid, _ = _guess(r, "192.0.2.9")
        r.cu.connection_lost(cid, 0.0)  # gone before the hash finished
        assert r.cu.authenticated(cid, None, 0.0) == []
    cid, acts = _guess(r, "192.0.2.9")
    assert not [a for a in acts if isinstance(a, Authenticate)]
    assert [c.reason for c in closes(acts)] == ["lockout"]


def test_others_failures_from_the_same_address_do_not_lock_out_an_agent():
    """Item 1: someone guessing alice's password behind the agent's NAT address."""
    r = Relay(fail_lockout=3)
    r.records["bob"] = UserRecord("bob")
    cid = r.cu.connection_made("192.0.2.9", encrypted=False)
    r.recv(cid, m.Login(user="bob", password="pw"))
    r.tokens["bob"] = one(r.cu.authenticated(cid, r.records["bob"], 0.0), cid, m.LoginOk).token
    for _ in range(5):
        gid, _ = _guess(r, "192.0.2.9", user="alice")
        r.cu.authenticated(gid, None, 0.0)
    assert _guess(r, "192.0.2.9", user="alice")[1][-1].reason == "lockout"
    # bob's spare connections log in with the token from the very same address
    spare = r.cu.connection_made("192.0.2.9", encrypted=False)
    acts = r.recv(spare, m.Login(user="bob", token=r.tokens["bob"]))
    one(acts, spare, m.LoginOk)
    # and bob's own password login is checked, not refused
    cid, acts = _guess(r, "192.0.2.9", user="bob", password="pw")
    assert acts == [Authenticate(cid, "bob", "pw")]


def test_one_address_spraying_many_users_is_limited_too():
    r = Relay(fail_lockout=2, fail_address_lockout=5)
    checked = 0
    for i in range(20):
        _, acts = _guess(r, "192.0.2.9", user=f"user{i}")
        checked += any(isinstance(a, Authenticate) for a in acts)
    assert checked == 5


def test_spare_connection_logs_in_with_token(r):
    first = r.login("alice")
    spare = r.spare("alice")  # asserts: LoginOk without Authenticate
    assert r.cu.sessions["alice"].conns == {first, spare}


def test_invalid_token_with_password_falls_back_to_authenticate(r):
    cid = r.cu.connection_made("10.0.0.1", encrypted=False)
    acts = r.recv(cid, m.Login(user="alice", password="pw", token="forged"))
    assert acts == [Authenticate(cid, "alice", "pw")]


def test_invalid_token_without_password_fails(r):
    cid = r.cu.connection_made("10.0.0.1", encrypted=False)
    acts = r.recv(cid, m.Login(user="alice", token="forged"))
    assert one(acts, cid, m.LoginFail)
    assert not [a for a in acts if isinstance(a, Authenticate)]


def test_token_of_another_user_is_rejected(r):
    r.login("alice")
    cid = r.cu.connection_made("10.0.0.1", encrypted=False)
    assert one(r.recv(cid, m.Login(user="bob", token=r.tokens["alice"])), cid, m.LoginFail)


def test_token_dies_with_logout(r):
    cid = r.login("alice")
    r.recv(cid, m.Logout())
    r.cu.connection_lost(cid, 0.0)
    late = r.cu.connection_made("10.0.0.1", encrypted=False)
    assert one(r.recv(late, m.Login(user="alice", token=r.tokens["alice"])), late, m.LoginFail)


@pytest.mark.parametrize("encrypted", [False, True])
def test_pre_registered_encryption_needs_encrypted_login(r, encrypted):
    cid = r.cu.connection_made("10.0.0.1", encrypted=encrypted)
    r.recv(cid, m.Login(user="bob", password="pw"))
    acts = r.cu.authenticated(cid, UserRecord("bob", encryption="required"), 0.0)
    if encrypted:
        assert one(acts, cid, m.LoginOk).encryption == "required"
    else:
        assert "encryption" in one(acts, cid, m.LoginFail).reason
        assert closes(acts)


def test_starttls_before_login_then_required_user_accepted(r):
    cid = r.cu.connection_made("10.0.0.1", encrypted=False)
    assert r.recv(cid, m.StartTLS()) == [Send(cid, m.TLSGo()), UpgradeTLS(cid)]
    r.cu.tls_established(cid)
    r.recv(cid, m.Login(user="bob", password="pw"))
    assert one(r.cu.authenticated(cid, UserRecord("bob", encryption="required"), 0.0), cid,
               m.LoginOk)


@pytest.mark.parametrize("msg", [m.Hold(seq=1), m.Who(), m.ConnectRequest(req=1, target="x")])
def test_messages_before_login_are_violations(r, msg):
    cid = r.cu.connection_made("10.0.0.1", encrypted=False)
    acts = r.recv(cid, msg)
    assert one(acts, cid, m.Error).code == "protocol"
    assert [c.conn for c in closes(acts)] == [cid]


def test_second_login_on_a_connection_is_a_violation(r):
    cid = r.login("alice")
    assert one(r.recv(cid, m.Login(user="alice", password="pw")), cid, m.Error).code == "protocol"


def test_keepalive_echoes_seq(r):
    cid = r.login("alice")
    assert r.recv(cid, m.Hold(seq=42)) == [Send(cid, m.HoldAck(seq=42))]


def test_logout_closes_every_connection_of_the_user(r):
    a1 = r.login("alice")
    a3 = r.spare("alice")
    other = r.login("bob")
    acts = r.recv(a3, m.Logout())  # step 6: on any one of the connections
    assert sorted(c.conn for c in closes(acts)) == [a1, a3]
    assert not sent(acts, other)


# -- step 11: refusals of a connection request ---------------------------------------
def test_connect_to_user_not_logged_in(r):
    a = r.login("alice")
    err = one(r.recv(a, m.ConnectRequest(req=5, target="nobody")), a, m.Error)
    assert (err.code, err.req) == ("not-logged-in", 5)
    assert r.state(a) is State.IDLE


def test_connect_forbidden_by_targets_allowed_peers(r):
    a = r.login("alice")
    r.login("bob", allowed_peers=("carol",))
    assert one(r.recv(a, m.ConnectRequest(req=1, target="bob")), a, m.Error).code == "forbidden"


def test_connect_forbidden_by_own_allowed_peers(r):
    a = r.login("alice", attrs=m.Attrs(allowed_peers=["carol"]))
    r.login("bob")
    assert one(r.recv(a, m.ConnectRequest(req=1, target="bob")), a, m.Error).code == "forbidden"


def test_connect_unknown_service_lists_offered_ones(r):
    a = r.login("alice")
    r.login("bob", attrs=m.Attrs(services=["ssh", "web"]))
    err = one(r.recv(a, m.ConnectRequest(req=1, target="bob", service="ftp")), a, m.Error)
    assert err.code == "no-such-service"
    assert "ssh" in err.message and "web" in err.message


def test_a_refusal_always_fits_the_message_limit(r):
    """A target exposing many services made the refusal longer than a Text field:
    the requester's terminal then dropped its link instead of showing the reason."""
    a = r.login("alice")
    r.login("bob", attrs=m.Attrs(services=[f"service-number-{i:02d}" for i in range(30)]))
    err = one(r.recv(a, m.ConnectRequest(req=1, target="bob", service="nope")), a, m.Error)
    assert err.code == "no-such-service" and len(err.message) <= m.TEXT_MAX
    frame = m.RELAY_CODEC.encode(err)  # what the terminal parses (the relay encodes with it)
    decoded = m.TERMINAL_CODEC.decode(frame[wire.HEADER_SIZE:])
    assert decoded.message == err.message


def test_connect_target_without_idle_connection(r):
    a = r.login("alice")
    b = r.login("bob")
    c = r.login("carol")
    pair(r, c, b, "bob")
    # refused at once, or after waiting for a spare in vain: either way, bob is not bothered
    acts = r.recv(a, m.ConnectRequest(req=1, target="bob")) + r.cu.tick(Settings().request_timeout)
    assert [f.code for f in sent(acts, a, m.Error | m.Result)] == ["target-busy"]
    assert not sent(acts, b)


def test_connect_e2e_needs_keys(r):
    a = r.login("alice", pubkey="A")
    r.login("bob")
    err = one(r.recv(a, m.ConnectRequest(req=1, target="bob", e2e=True)), a, m.Error)
    assert err.code == "e2e-unavailable"


def test_connect_e2e_with_keys_exchanges_them(r):
    a = r.login("alice", pubkey="A")
    b = r.login("bob", pubkey="B")
    note = one(r.recv(a, m.ConnectRequest(req=1, target="bob", e2e=True)), b, m.Notify)
    assert note.e2e and note.peer_key == "A"
    res = one(r.recv(b, m.Accept(req=note.req)), a, m.Result)
    assert res.ok and res.e2e and res.peer_key == "B"


def test_connect_from_a_busy_connection(r):
    a = r.login("alice")
    r.login("bob")
    r.login("carol")
    r.recv(a, m.ConnectRequest(req=1, target="bob"))
    assert one(r.recv(a, m.ConnectRequest(req=2, target="carol")), a, m.Error).code == "busy"


def test_plain_connect_notifies_target_with_requester_id(r):
    a = r.login("alice")
    b = r.login("bob")
    acts = r.recv(a, m.ConnectRequest(req=7, target="bob", service=""))
    note = one(acts, b, m.Notify)  # step 14
    assert (note.peer, note.encrypt, note.insecure) == ("alice", False, False)
    assert not sent(acts, a)
    acts = r.recv(b, m.Accept(req=note.req))  # steps 15-16
    res = one(acts, a, m.Result)
    assert (res.req, res.ok, res.peer, res.encrypt) == (7, True, "bob", False)
    assert r.state(a) is r.state(b) is State.PAIRED


# -- Fig. 3: the target requires encryption --------------------------------------------
@pytest.fixture
def fig3(r):
    """Terminal 11 (plaintext, capable) and terminal 21 (registered "required", on TLS)."""
    return r, r.login("t11"), r.login("t21", encrypted=True, encryption="required")


def test_fig3_instruction_then_notify_then_pair(fig3):
    r, c1, c2 = fig3
    acts = r.recv(c1, m.ConnectRequest(req=1, target="t21"))  # step 11
    assert one(acts, c1, m.EncryptInstruct).req == 1  # step 12
    assert not sent(acts, c2)  # no notification before the acceptance
    assert r.recv(c1, m.StartTLS()) == [Send(c1, m.TLSGo()), UpgradeTLS(c1)]
    r.cu.tls_established(c1)
    note = one(r.recv(c1, m.EncryptAccept(req=1)), c2, m.Notify)  # steps 13-14
    assert (note.peer, note.encrypt, note.insecure) == ("t11", True, False)
    acts = r.recv(c2, m.Accept(req=note.req))  # steps 15-16
    assert acts.index(Pair(c1, c2)) < acts.index(next(a for a in acts if isinstance(a, Send)))
    res = one(acts, c1, m.Result)
    assert res.ok and res.encrypt and res.peer == "t21"


def test_fig3_accept_without_tls_fails(fig3):
    r, c1, c2 = fig3
    r.recv(c1, m.ConnectRequest(req=1, target="t21"))
    acts = r.recv(c1, m.EncryptAccept(req=1))
    res = one(acts, c1, m.Result)
    assert not res.ok and res.code == "encryption-not-established"
    assert not sent(acts, c2)
    assert r.state(c1) is State.IDLE


def test_fig3_accept_without_instruction_is_a_violation(fig3):
    r, c1, _ = fig3
    assert one(r.recv(c1, m.EncryptAccept(req=1)), c1, m.Error).code == "protocol"


def test_fig3_requester_refuses_and_target_refuses_insecure(fig3):
    r, c1, c2 = fig3  # t21's insecure_peer is "refuse" (para 0037, first option)
    r.recv(c1, m.ConnectRequest(req=1, target="t21"))
    acts = r.recv(c1, m.EncryptRefuse(req=1))
    res = one(acts, c1, m.Result)
    assert (res.ok, res.code) == (False, "encryption-required")
    assert not sent(acts, c2)


@pytest.fixture
def fig3_ask(r):
    c1 = r.login("t11")
    c2 = r.login("t21", encrypted=True, encryption="required", insecure_peer="ask")
    r.recv(c1, m.ConnectRequest(req=1, target="t21"))
    note = one(r.recv(c1, m.EncryptRefuse(req=1, reason="no TLS")), c2, m.Notify)
    assert note.insecure and not note.encrypt  # para 0037, second option: ask t21
    return r, c1, c2, note


def test_fig3_ask_target_refuses(fig3_ask):
    r, c1, c2, note = fig3_ask
    acts = r.recv(c2, m.Refuse(req=note.req, reason="no thanks"))
    res = one(acts, c1, m.Result)
    assert (res.ok, res.code) == (False, "refused")
    assert r.state(c1) is r.state(c2) is State.IDLE


def test_fig3_ask_target_accepts_unencrypted(fig3_ask):
    r, c1, c2, note = fig3_ask
    acts = r.recv(c2, m.Accept(req=note.req))
    assert Pair(c1, c2) in acts
    res = one(acts, c1, m.Result)
    assert res.ok and not res.encrypt


def test_fig3_requester_that_cannot_encrypt_is_refused_at_once(r):
    c1 = r.login("t11", attrs=m.Attrs(encryption="off"))
    c2 = r.login("t21", encrypted=True, encryption="required")
    acts = r.recv(c1, m.ConnectRequest(req=1, target="t21"))
    assert one(acts, c1, m.Result).code == "encryption-required"
    assert not sent(acts, c1, m.EncryptInstruct) and not sent(acts, c2)


def test_fig3_requester_already_on_tls_is_not_instructed(r):
    c1 = r.login("t11", encrypted=True)
    c2 = r.login("t21", encrypted=True, encryption="required")
    acts = r.recv(c1, m.ConnectRequest(req=1, target="t21"))
    assert not sent(acts, c1)
    assert one(acts, c2, m.Notify).encrypt


def test_fig3_encryption_given_as_login_attribute(r):
    c1 = r.login("t11")
    r.login("t21", encrypted=True, attrs=m.Attrs(encryption="required"))  # step 7 of Fig. 2
    assert one(r.recv(c1, m.ConnectRequest(req=1, target="t21")), c1, m.EncryptInstruct)


def test_encryption_given_after_login_counts(r):
    """Para 0029/0068: attributes may follow the positive response in a separate transfer."""
    c1 = r.login("t11")
    c2 = r.login("t21", encrypted=True)
    assert r.recv(c2, m.SetAttrs(attrs=m.Attrs(encryption="required"))) == []
    assert one(r.recv(c1, m.ConnectRequest(req=1, target="t21")), c1, m.EncryptInstruct)


def test_allowed_peers_given_after_login_count(r):
    a = r.login("alice")
    b = r.login("bob")
    r.recv(b, m.SetAttrs(attrs=m.Attrs(allowed_peers=["carol"])))
    assert one(r.recv(a, m.ConnectRequest(req=1, target="bob")), a, m.Error).code == "forbidden"


# -- Fig. 4: the requester requires encryption -----------------------------------------
@pytest.mark.parametrize(
    ("attrs", "encrypt"), [(m.Attrs(encryption="required"), False), (None, True)]
)
def test_fig4_notify_carries_instruction(r, attrs, encrypt):
    c2 = r.login("t21", encrypted=True, attrs=attrs)
    c1 = r.login("t11")
    acts = r.recv(c2, m.ConnectRequest(req=3, target="t11", encrypt=encrypt))  # step 31
    note = one(acts, c1, m.Notify)  # step 32
    assert note.encrypt and note.peer == "t21"
    # step 33: accepting on a plaintext connection is an error, forwarded as a refusal
    res = one(r.recv(c1, m.Accept(req=note.req)), c2, m.Result)
    assert (res.ok, res.code) == (False, "refused")
    assert r.state(c1) is r.state(c2) is State.IDLE
    # again, this time the target upgrades first
    note = one(r.recv(c2, m.ConnectRequest(req=4, target="t11", encrypt=encrypt)), c1, m.Notify)
    assert r.recv(c1, m.StartTLS()) == [Send(c1, m.TLSGo()), UpgradeTLS(c1)]
    r.cu.tls_established(c1)
    acts = r.recv(c1, m.Accept(req=note.req))  # steps 33-34
    assert Pair(c2, c1) in acts
    res = one(acts, c2, m.Result)
    assert res.ok and res.encrypt and res.req == 4


def test_fig4_plaintext_requester_is_instructed_too(r):
    """Both hops must be encrypted (para 0017): a plaintext requester asking for
    encryption is instructed to upgrade before the target is notified."""
    c1 = r.login("t11", encrypted=True)
    c2 = r.login("t21")
    acts = r.recv(c2, m.ConnectRequest(req=1, target="t11", encrypt=True))
    assert one(acts, c2, m.EncryptInstruct) and not sent(acts, c1)
    r.cu.tls_established(c2)
    note = one(r.recv(c2, m.EncryptAccept(req=1)), c1, m.Notify)
    assert note.encrypt
    assert one(r.recv(c1, m.Accept(req=note.req)), c2, m.Result).encrypt


def test_fig4_requester_refusing_its_own_encryption_fails(r):
    r.login("t11", insecure_peer="ask")
    c2 = r.login("t21", attrs=m.Attrs(encryption="required"))
    r.recv(c2, m.ConnectRequest(req=1, target="t11"))
    acts = r.recv(c2, m.EncryptRefuse(req=1))
    assert not one(acts, c2, m.Result).ok
    assert len([a for a in acts if isinstance(a, Send)]) == 1  # nobody else is asked


def test_encrypt_request_with_encryption_off_is_rejected(r):
    c = r.login("t21", encrypted=True, attrs=m.Attrs(encryption="off"))
    r.login("t11")
    err = one(r.recv(c, m.ConnectRequest(req=1, target="t11", encrypt=True)), c, m.Error)
    assert err.code == "bad-request"


def test_fig4_target_cannot_encrypt_refused(r):
    c2 = r.login("t21", encrypted=True, encryption="required")
    c1 = r.login("t11", attrs=m.Attrs(encryption="off"))
    acts = r.recv(c2, m.ConnectRequest(req=1, target="t11"))
    res = one(acts, c2, m.Result)
    assert (res.ok, res.code) == (False, "peer-cannot-encrypt")
    assert not sent(acts, c1)


def test_fig4_target_cannot_encrypt_requester_asked(r):
    c2 = r.login("t21", encrypted=True, encryption="required", insecure_peer="ask")
    c1 = r.login("t11", attrs=m.Attrs(encryption="off"))
    acts = r.recv(c2, m.ConnectRequest(req=9, target="t11"))
    ask = one(acts, c2, m.Notify)
    assert (ask.insecure, ask.req, ask.peer) == (True, 9, "t11")
    assert not sent(acts, c1)
    note = one(r.recv(c2, m.Accept(req=9)), c1, m.Notify)
    # the target is told that the session will be unencrypted: its reply decides
    assert note.insecure and not note.encrypt and note.peer == "t21"
    acts = r.recv(c1, m.Accept(req=note.req))
    assert Pair(c2, c1) in acts and not one(acts, c2, m.Result).encrypt


def test_fig4_requester_declines_insecure(r):
    c2 = r.login("t21", encrypted=True, encryption="required", insecure_peer="ask")
    c1 = r.login("t11", attrs=m.Attrs(encryption="off"))
    r.recv(c2, m.ConnectRequest(req=9, target="t11"))
    acts = r.recv(c2, m.Refuse(req=9))
    assert one(acts, c2, m.Result).code == "refused"
    assert not sent(acts, c1) and r.state(c2) is State.IDLE


# -- end and release, steps 26-28' -------------------------------------------------
def test_end_release_and_reuse(r):
    a = r.login("alice")
    b = r.login("bob")
    pair(r, a, b, "bob")
    assert r.recv(a, m.End(reason="bye")) == [Send(b, m.End(reason="bye"))]  # 26-27
    acts = r.recv(a, m.Release())  # 28
    assert acts == [Unpair(a)]
    acts = r.recv(b, m.Release())  # 28'
    assert acts[0] == Unpair(b)
    assert sent(acts, a) == sent(acts, b) == [m.Released()]
    assert r.state(a) is r.state(b) is State.IDLE
    pair(r, b, a, "alice", req=2)  # the same connections carry the next session


def test_end_crossing_release_is_harmless(r):
    a = r.login("alice")
    b = r.login("bob")
    pair(r, a, b, "bob")
    r.recv(a, m.Release())
    r.recv(b, m.Release())
    assert r.recv(b, m.End()) == []


def test_release_when_not_paired_is_a_violation(r):
    a = r.login("alice")
    assert one(r.recv(a, m.Release()), a, m.Error).code == "protocol"


# -- lost connections and timeouts --------------------------------------------------
def test_lost_while_paired(r):
    a = r.login("alice")
    b = r.login("bob")
    pair(r, a, b, "bob")
    assert sent(r.cu.connection_lost(a, 0.0), b) == [m.End(reason="peer connection lost")]
    acts = r.recv(b, m.Release())
    assert acts == [Unpair(b), Send(b, m.Released())]
    assert r.state(b) is State.IDLE


def test_lost_after_own_release_releases_peer(r):
    a = r.login("alice")
    b = r.login("bob")
    pair(r, a, b, "bob")
    r.recv(b, m.Release())
    assert sent(r.cu.connection_lost(a, 0.0), b) == [m.Released()]
    assert r.state(b) is State.IDLE


def test_target_lost_while_notified(r):
    a = r.login("alice")
    b = r.login("bob")
    r.recv(a, m.ConnectRequest(req=1, target="bob"))
    res = one(r.cu.connection_lost(b, 0.0), a, m.Result)
    assert (res.ok, res.code) == (False, "target-lost")
    assert r.state(a) is State.IDLE


def test_requester_lost_while_target_notified(r):
    a = r.login("alice")
    b = r.login("bob")
    note = one(r.recv(a, m.ConnectRequest(req=1, target="bob")), b, m.Notify)
    r.cu.connection_lost(a, 0.0)
    assert sent(r.recv(b, m.Accept(req=note.req)), b) == [m.End(reason="requester went away")]
    assert r.recv(b, m.Release()) == [Unpair(b), Send(b, m.Released())]
    assert r.state(b) is State.IDLE and not r.cu.pending


def test_request_timeout(r):
    a = r.login("alice")
    b = r.login("bob")
    note = one(r.recv(a, m.ConnectRequest(req=1, target="bob")), b, m.Notify)
    assert r.cu.tick(Settings().request_timeout - 1) == []
    res = one(r.cu.tick(Settings().request_timeout), a, m.Result)
    assert (res.ok, res.code) == (False, "timeout")
    assert r.cu.tick(Settings().request_timeout + 1) == []  # reported once
    assert sent(r.recv(b, m.Accept(req=note.req)), b, m.End)  # the late answer is ended


# -- presence, who, broadcast -------------------------------------------------------
def _subscriber(r: Relay, name="watcher") -> int:
    cid = r.login(name)
    assert r.recv(cid, m.Subscribe()) == []
    return cid


@pytest.mark.parametrize(
    ("notify", "users", "seen"),
    [("all", (), True), ("none", (), False), ("only", ("watcher",), True),
     ("only", ("x",), False), ("except", ("watcher",), False), ("except", ("x",), True)],
)
def test_presence_follows_notify_policy(r, notify, users, seen):
    w = _subscriber(r)
    b = r.login("bob", notify=notify, notify_users=users)
    online = sent(r.last, w, m.Presence)
    offline = sent(r.cu.connection_lost(b, 0.0), w, m.Presence)
    if seen:
        assert [p.online for p in online + offline] == [True, False]
        assert online[0].user == "bob"
    else:
        assert online == offline == []


def test_presence_only_for_first_and_last_connection(r):
    w = _subscriber(r)
    b1 = r.login("bob")
    b3 = r.spare("bob")
    assert not sent(r.cu.connection_lost(b1, 0.0), w)
    assert sent(r.cu.connection_lost(b3, 0.0), w, m.Presence)[0].online is False


def test_unsubscribed_gets_no_presence(r):
    w = r.login("watcher")
    r.login("bob")
    assert not sent(r.last, w)


def test_who_honours_notify_policy(r):
    a = r.login("alice")
    r.login("bob", attrs=m.Attrs(services=["ssh"]), encryption="optional")
    r.login("hidden", notify="none")
    r.login("friend", notify="only", notify_users=("alice",))
    who = one(r.recv(a, m.Who()), a, m.WhoList)
    assert [u.user for u in who.users] == ["alice", "bob", "friend"]
    assert who.users[1].services == ["ssh"]


def test_hidden_user_is_not_connectable(r):
    a = r.login("alice")
    r.login("hidden", notify="none")
    err = one(r.recv(a, m.ConnectRequest(req=1, target="hidden")), a, m.Error)
    assert err.code == "not-logged-in"


def test_broadcast(r):
    a = r.login("alice")
    b = r.login("bob")
    c = r.login("carol", allowed_peers=("bob",))
    r.login("hidden", notify="none")
    acts = r.recv(a, m.Broadcast(targets=["bob", "carol", "ghost", "hidden", "bob"], body=b"hi"))
    assert sent(acts, b) == [m.Deliver(sender="alice", body=b"hi")]
    assert not sent(acts, c)
    res = one(acts, a, m.BroadcastResult)
    assert res.delivered == ["bob"]
    assert sorted(res.missing) == ["carol", "ghost", "hidden"]


# -- spare connections and inherited attributes (steps 17-21, para 0043) ------------
def test_spare_inherits_attributes(r):
    a = r.login("alice")
    b1 = r.login("bob", attrs=m.Attrs(services=["ssh"]))
    pair(r, a, b1, "bob")  # connection 1 of bob is bound
    b4 = r.spare("bob", attrs=m.Attrs(inherit=True))
    a3 = r.spare("alice")
    r.cu.connection_lost(b1, 0.0)  # only the spare is left to offer "ssh"
    assert one(r.recv(a3, m.Who()), a3, m.WhoList).users[1].services == ["ssh"]
    note = one(r.recv(a3, m.ConnectRequest(req=2, target="bob", service="ssh")), b4, m.Notify)
    assert note.service == "ssh"


def test_spare_without_inherit_has_its_own_attributes(r):
    a = r.login("alice")
    b1 = r.login("bob", attrs=m.Attrs(services=["ssh"]))
    r.spare("bob", attrs=m.Attrs(services=["web"]))
    r.cu.connection_lost(b1, 0.0)
    err = one(r.recv(a, m.ConnectRequest(req=1, target="bob", service="ssh")), a, m.Error)
    assert err.code == "no-such-service" and "web" in err.message


def test_spare_inherits_attributes_sent_after_login(r):
    r.login("alice")
    b1 = r.login("bob")
    r.recv(b1, m.SetAttrs(attrs=m.Attrs(services=["ssh"])))
    b4 = r.spare("bob", attrs=m.Attrs(inherit=True))
    assert r.cu.conns[b4].attrs.services == ["ssh"]


def test_spare_of_required_user_is_encrypted_too(r):
    r.login("t21", encrypted=True, encryption="required")
    cid = r.cu.connection_made("10.0.1.1", encrypted=False)
    acts = r.recv(cid, m.Login(user="t21", token=r.tokens["t21"]))
    assert one(acts, cid, m.LoginFail)


# -- review fixes ----------------------------------------------------------------------
def test_login_may_narrow_allowed_peers_but_never_widen(r):
    r.login("t21", allowed_peers=("alice",), attrs=m.Attrs(allowed_peers=["alice", "bob"]))
    alice = r.login("alice")
    bob = r.login("bob")
    assert one(r.recv(bob, m.ConnectRequest(req=1, target="t21")), bob, m.Error).code == \
        "forbidden"
    assert not sent(r.recv(alice, m.ConnectRequest(req=2, target="t21")), alice, m.Error)


def test_notify_policy_given_at_login_hides_the_user(r):
    r.login("shy", attrs=m.Attrs(notify="none"))
    viewer = r.login("viewer")
    who = one(r.recv(viewer, m.Who()), viewer, m.WhoList)
    assert [u.user for u in who.users] == ["viewer"]


def test_logout_revokes_the_token_even_after_a_reconnect_with_it(r):
    first = r.login("t11")
    token = r.tokens["t11"]
    r.cu.connection_lost(first, r.now)  # network loss: the token has a grace period
    cid = r.cu.connection_made("10.0.0.9", encrypted=False)
    r.recv(cid, m.Login(user="t11", password="pw", token=token))
    ok = one(r.cu.authenticated(cid, r.records["t11"], r.now), cid, m.LoginOk)
    assert ok.token == token  # the terminal keeps its token
    r.recv(cid, m.Logout())
    r.cu.connection_lost(cid, r.now)
    again = r.cu.connection_made("10.0.0.9", encrypted=False)
    acts = r.recv(again, m.Login(user="t11", token=token))
    assert one(acts, again, m.LoginFail)


def test_starttls_while_the_password_is_checked_is_a_violation(r):
    cid = r.cu.connection_made("10.0.0.1", encrypted=False)
    r.recv(cid, m.Login(user="alice", password="pw"))
    acts = r.recv(cid, m.StartTLS())
    assert closes(acts) and not [a for a in acts if isinstance(a, m.TLSGo)]


def test_pair_audit_records_the_tls_state_of_both_hops(r):
    a = r.login("t11", encrypted=True)
    b = r.login("t21", encrypted=False)
    note = one(r.recv(a, m.ConnectRequest(req=1, target="t21")), b, m.Notify)
    audit = [x for x in r.recv(b, m.Accept(req=note.req)) if getattr(x, "event", "") == "pair"]
    assert audit[0].fields["hops_tls"] == [True, False]


# -- early data: the requester's first bytes with its request --------------------------
def _forwards(actions) -> list[Forward]:
    return [a for a in actions if isinstance(a, Forward)]


def test_early_data_reaches_the_target_with_the_pairing(r):
    """A session on a spare link takes two messages to the relay from the requester
    (none after the request) and the target's first data frame leaves in the same
    step as the result: the requester's first bytes no longer wait for the result's
    round trip. Nothing goes to the target before its acceptance."""
    a = r.login("alice", encrypted=True)
    b = r.login("bob", encrypted=True)
    acts = r.recv(a, m.ConnectRequest(req=1, target="bob", data=b"SSH-2.0-x\r\n"))
    note = one(acts, b, m.Notify)
    assert not _forwards(acts)  # held: the target has not accepted
    acts = r.recv(b, m.Accept(req=note.req))
    res = one(acts, a, m.Result)
    assert res.ok and res.early == len(b"SSH-2.0-x\r\n")
    assert _forwards(acts) == [Forward(b, b"SSH-2.0-x\r\n")]
    # pairing first (the target's sink), then the result, then the bytes
    assert acts.index(Pair(a, b)) < acts.index(_forwards(acts)[0])
    assert acts.index(next(x for x in acts if isinstance(x, Send))) \
        < acts.index(_forwards(acts)[0])


def test_early_data_is_dropped_with_a_refusal(r):
    a = r.login("alice", encrypted=True)
    b = r.login("bob", encrypted=True)
    note = one(r.recv(a, m.ConnectRequest(req=1, target="bob", data=b"x")), b, m.Notify)
    acts = r.recv(b, m.Refuse(req=note.req, reason="no"))
    assert not one(acts, a, m.Result).ok
    assert not _forwards(acts)


def test_early_data_never_follows_an_encryption_instruction(fig3):
    """Bytes that came over a plaintext hop of a session that must be encrypted are
    not forwarded: the result says none were taken, so the requester sends them
    again once its connection is encrypted."""
    r, c1, c2 = fig3
    acts = r.recv(c1, m.ConnectRequest(req=1, target="t21", data=b"secret"))
    one(acts, c1, m.EncryptInstruct)
    r.recv(c1, m.StartTLS())
    r.cu.tls_established(c1)
    note = one(r.recv(c1, m.EncryptAccept(req=1)), c2, m.Notify)
    acts = r.recv(c2, m.Accept(req=note.req))
    assert one(acts, c1, m.Result).early == 0
    assert not _forwards(acts)


@pytest.mark.parametrize("why", ["e2e", "off"])
def test_early_data_not_taken_in_e2e_mode_or_when_switched_off(why):
    r = Relay(early_data=why != "off")
    a = r.login("alice", encrypted=True, pubkey="A")
    b = r.login("bob", encrypted=True, pubkey="B")
    note = one(r.recv(a, m.ConnectRequest(req=1, target="bob", e2e=why == "e2e",
                                          data=b"x")), b, m.Notify)
    acts = r.recv(b, m.Accept(req=note.req))
    assert one(acts, a, m.Result).early == 0
    assert not _forwards(acts)


def test_early_data_over_the_limit_is_a_decoding_error():
    with pytest.raises(wire.WireError):
        m.RELAY_CODEC.decode(m.TERMINAL_CODEC.encode(m.ConnectRequest(
            req=1, target="bob", data=b"x" * (m.EARLY_DATA_MAX + 1))))

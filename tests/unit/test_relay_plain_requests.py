"""Early data on plaintext connections the relay never instructs to encrypt.

A requester's first bytes may ride with its request only where they cannot cross a
plaintext hop of a session that has to be encrypted. A relay that cannot upgrade a
connection (no TLS context), or whose policy refuses a plaintext requester whose
target requires encryption (``--plaintext-requesters refuse``, para 0037) instead of
instructing it (step 12), says so at login (``LoginOk.plain_requests``, only to a
terminal that lists :data:`messages.CAP_PLAIN_REQUESTS`), and the terminal sends
early data there. A target that requires encryption still refuses such a requester,
and the bytes never reach it.
"""

from __future__ import annotations

import pytest

from kakehashi.relay import messages as m
from kakehashi.relay.control import ControlUnit, Forward, Settings, State, UserRecord
from kakehashi.relay.terminal import (
    Connected,
    ConnectFailed,
    IncomingRequest,
    LoggedIn,
    RemoteProtocolError,
    TerminalConn,
)
from tests.unit.test_relay_control import Relay, one, sent
from tests.unit.test_relay_terminal import Net

CAPABLE = m.Attrs(ciphers=[m.CIPHER_TLS, m.CAP_PLAIN_REQUESTS, m.CAP_OPTIMISTIC])


def _login(r: Relay, name: str, *, encrypted=False, can_upgrade=True, attrs=CAPABLE,
           **record) -> tuple[int, m.LoginOk]:
    r.records.setdefault(name, UserRecord(name, **record))
    cid = r.cu.connection_made("10.0.0.9", encrypted=encrypted, can_upgrade=can_upgrade)
    r.recv(cid, m.Login(user=name, password="pw", attrs=attrs))
    return cid, one(r.cu.authenticated(cid, r.records[name], r.now), cid, m.LoginOk)


# -- the relay's word at login ------------------------------------------------------
@pytest.mark.parametrize(("policy", "encrypted", "can_upgrade", "attrs", "said"), [
    ("upgrade", False, True, CAPABLE, False),       # step 12 may come: nothing said
    ("refuse", False, True, CAPABLE, True),         # the policy: never instructed
    ("upgrade", False, False, CAPABLE, True),       # no TLS to upgrade to
    ("refuse", True, True, CAPABLE, False),         # an encrypted link needs no word
    ("refuse", False, True, m.Attrs(), False),      # a terminal that does not know it
    ("refuse", False, True, m.Attrs(encryption="required", ciphers=CAPABLE.ciphers),
     False),                                        # its every request is encrypted
    ("refuse", False, True, m.Attrs(inherit=True), False),  # not in this very login
])
def test_login_says_plain_requests_only_where_no_instruction_can_come(
        policy, encrypted, can_upgrade, attrs, said):
    r = Relay(instruct_plaintext=policy == "upgrade")
    _login(r, "alice")  # a first connection whose attributes an inheriting one takes
    _, ok = _login(r, "alice", encrypted=encrypted, can_upgrade=can_upgrade, attrs=attrs)
    assert ok.plain_requests is said
    if not said:  # an older terminal's decoder (unknown fields refused) never sees it
        assert b"plain_requests" not in m.TERMINAL_CODEC.encode(ok)


# -- the relay's decisions ------------------------------------------------------------
@pytest.mark.parametrize("why", ["policy", "no-tls"])
def test_a_target_that_requires_encryption_refuses_and_never_gets_the_early_data(why):
    r = Relay(instruct_plaintext=why != "policy")
    c1, ok = _login(r, "t11", can_upgrade=why != "no-tls")
    assert ok.plain_requests
    c2, _ = _login(r, "t21", encrypted=True, encryption="required")
    acts = r.recv(c1, m.ConnectRequest(req=1, target="t21", data=b"secret"))
    res = one(acts, c1, m.Result)
    assert (res.ok, res.code) == (False, "encryption-required")
    assert not sent(acts, c1, m.EncryptInstruct)
    assert not sent(acts, c2)  # not even notified
    assert not [a for a in acts if isinstance(a, Forward)]
    assert r.cu.conns[c1].state is State.IDLE


def test_a_target_that_asks_takes_an_unencrypted_session_without_the_early_data():
    """Para 0037, second option: the target is asked; the bytes that crossed the
    plaintext hop are not forwarded (the result says none were), so the requester
    sends them after the result, into the session the target agreed to."""
    r = Relay(instruct_plaintext=False)
    c1, _ = _login(r, "t11")
    c2, _ = _login(r, "t21", encrypted=True, encryption="required", insecure_peer="ask")
    note = one(r.recv(c1, m.ConnectRequest(req=1, target="t21", data=b"secret")), c2,
               m.Notify)
    assert note.insecure and not note.encrypt and note.data == b""
    acts = r.recv(c2, m.Accept(req=note.req))
    res = one(acts, c1, m.Result)
    assert res.ok and res.early == 0
    assert not [a for a in acts if isinstance(a, Forward)]


def test_a_requester_that_asks_for_encryption_is_still_instructed():
    """The word at login covers requests that do not ask for encryption; one that
    asks is instructed as before (its terminal sends no early data with it)."""
    r = Relay(instruct_plaintext=False)
    c1, _ = _login(r, "t11")
    _login(r, "t21", encrypted=True)
    one(r.recv(c1, m.ConnectRequest(req=1, target="t21", encrypt=True)), c1,
        m.EncryptInstruct)


def test_a_target_without_tls_to_upgrade_to_cannot_encrypt():
    """Fig. 4 with a target on a connection the relay cannot upgrade: refused as one
    that cannot encrypt, rather than notified into a STARTTLS that cannot happen."""
    r = Relay()
    c1, _ = _login(r, "t11", encrypted=True)
    c2, _ = _login(r, "t21", can_upgrade=False)
    acts = r.recv(c1, m.ConnectRequest(req=1, target="t21", encrypt=True))
    assert one(acts, c1, m.Result).code == "peer-cannot-encrypt"
    assert not sent(acts, c2)


def test_plain_requests_refusal_keeps_other_sessions_plain_and_early():
    r = Relay(instruct_plaintext=False)
    c1, _ = _login(r, "alice")
    c2, _ = _login(r, "bob")
    note = one(r.recv(c1, m.ConnectRequest(req=1, target="bob", data=b"hi")), c2,
               m.Notify)
    assert note.optimistic and note.data == b"hi"  # with the notification
    res = one(r.recv(c2, m.Accept(req=note.req)), c1, m.Result)
    assert res.ok and not res.encrypt and res.early == 2


# -- the terminal ---------------------------------------------------------------------
def _terminal(ok: m.LoginOk, attrs: m.Attrs | None = CAPABLE) -> TerminalConn:
    t = TerminalConn()
    t.login("alice", "pw", attrs=attrs)
    ev = t.receive(ok)
    assert isinstance(ev, LoggedIn) and ev.plain_requests == ok.plain_requests
    return t


OK = m.LoginOk(conn_id=3, token="tok", encryption="optional", keepalive=15.0,
               dead_after=45.0)
PLAIN = m.LoginOk(conn_id=3, token="tok", encryption="optional", keepalive=15.0,
                  dead_after=45.0, plain_requests=True)


@pytest.mark.parametrize(("ok", "encrypt", "e2e", "allowed"), [
    (PLAIN, False, False, True),   # never told to encrypt: early data
    (OK, False, False, False),     # an older relay, or one that may instruct: wait
    (PLAIN, True, False, False),   # asks for encryption: it will be instructed
    (PLAIN, False, True, False),   # e2e: sealed after the pairing
])
def test_terminal_sends_early_data_where_the_relay_said_so(ok, encrypt, e2e, allowed):
    t = _terminal(ok)
    assert t.early_data_allowed(encrypt=encrypt, e2e=e2e) is allowed
    [req] = t.connect("bob", encrypt=encrypt, e2e=e2e, early=b"hello")
    assert req.data == (b"hello" if allowed else b"")


@pytest.mark.parametrize("case", ["not-offered", "encrypted"])
def test_plain_requests_where_it_cannot_apply_is_a_protocol_error(case):
    t = TerminalConn()
    if case == "encrypted":
        t.tls_established()
    t.login("alice", "pw", attrs=CAPABLE if case == "encrypted" else m.Attrs())
    with pytest.raises(RemoteProtocolError):
        t.receive(PLAIN)


def test_an_instruction_after_early_data_on_a_plaintext_link_is_a_protocol_error():
    """The relay said no instruction would come; one that comes anyway would make a
    session whose first bytes already crossed a plaintext hop: the link is dropped."""
    t = _terminal(PLAIN)
    t.connect("bob", early=b"secret")
    with pytest.raises(RemoteProtocolError):
        t.receive(m.EncryptInstruct(req=1, reason="bob requires encrypted communication"))


@pytest.mark.parametrize("policy", ["refuse", "upgrade"])
def test_terminals_and_relay_over_the_wire(policy):
    """The terminal and the control unit together: under the policy the first bytes
    reach an ordinary target with the notification and a target that requires
    encryption refuses without ever hearing of them; otherwise (the default) the
    bytes wait for the result and that target gets the requester instructed."""
    net = Net(UserRecord("alice"), UserRecord("bob"), UserRecord("carol"))
    net.cu = ControlUnit(Settings(instruct_plaintext=policy == "upgrade"))
    a = net.login("alice", password="pw", attrs=CAPABLE)
    b = net.login("bob", password="pw", attrs=CAPABLE)
    c = net.login("carol", password="pw", encrypted=True,
                  attrs=m.Attrs(encryption="required", ciphers=CAPABLE.ciphers))
    net.send(a, a.t.connect("bob", early=b"GET /"))
    [note] = b.take()
    assert isinstance(note, IncomingRequest)
    assert note.early_data == (b"GET /" if policy == "refuse" else b"")
    net.send(b, b.t.accept())
    [res] = a.take()
    assert isinstance(res, Connected) and res.early == (5 if policy == "refuse" else 0)
    spare = net.login("alice", password="pw", attrs=CAPABLE)
    net.send(spare, spare.t.connect("carol", early=b"secret"))
    if policy == "refuse":
        [failed] = spare.take()
        assert isinstance(failed, ConnectFailed) and failed.code == "encryption-required"
    else:
        assert type(spare.take()[0]).__name__ == "EncryptionInstructed"
    assert c.take() == [] and c.data == []


# -- across cluster nodes ---------------------------------------------------------------
@pytest.mark.parametrize("ask", [False, True])
def test_across_nodes_the_target_node_decides_as_for_a_requester_that_cannot_encrypt(ask):
    """The requester's node does not instruct it (its policy); the request goes to
    the target's node marked as from one that cannot encrypt, which refuses it or asks
    the target (para 0037). A request across nodes carries no early data."""
    from kakehashi.relay.control import OpenTrunk
    from tests.unit.test_relay_federation import link, node, publish

    a, b = node("a", instruct_plaintext=False), node("b")
    pi = b.login("pi", attrs=m.Attrs(services=["echo"]), encrypted=True,
                 encryption="required", insecure_peer="ask" if ask else "refuse")
    publish(b, a)
    laptop = a.login("laptop", attrs=CAPABLE)
    assert one(a.last, laptop, m.LoginOk).plain_requests
    acts = a.recv(laptop, m.ConnectRequest(req=3, target="pi", service="echo",
                                           data=b"secret"))
    assert not sent(acts, laptop, m.EncryptInstruct)
    (opener,) = [x for x in acts if isinstance(x, OpenTrunk)]
    ta, tb = link(a, b, tls=True)
    nc = one(a.cu.trunk_opened(ta, opener.req), ta, m.NodeConnect)
    assert nc.encryption == "off" and not nc.hop_encrypted
    acts = b.recv(tb, nc)
    if ask:
        note = one(acts, pi, m.Notify)
        assert note.insecure and not note.encrypt and note.data == b""
    else:
        assert not sent(acts, pi)
        assert one(acts, tb, m.Result).code == "encryption-required"

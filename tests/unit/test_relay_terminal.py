"""TerminalConn (spec 000 section 4.5), alone and wired to a ControlUnit.

Step numbers in comments refer to the spec summary (shared/spec/000-relay-server.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from kakehashi.core.wire import FrameDecoder
from kakehashi.relay import messages as m
from kakehashi.relay.control import (
    Authenticate,
    Close,
    ControlUnit,
    Forward,
    Pair,
    Send,
    Unpair,
    UpgradeTLS,
    UserRecord,
)
from kakehashi.relay.terminal import (
    AskInsecure,
    Connected,
    ConnectFailed,
    EncryptionInstructed,
    IncomingRequest,
    LocalProtocolError,
    LoggedIn,
    LoginFailed,
    Other,
    PeerEnded,
    ReleasedEvent,
    RemoteProtocolError,
    TerminalConn,
    TState,
)

LOGIN_OK = m.LoginOk(conn_id=3, token="tok", encryption="optional", keepalive=15.0,
                     dead_after=45.0)


def logged_in() -> TerminalConn:
    t = TerminalConn()
    assert t.login("alice", "pw") == [m.Login(user="alice", password="pw")]
    assert t.receive(LOGIN_OK) == LoggedIn(3, "tok", "optional", 15.0, 45.0)
    return t


def requesting(target="bob") -> TerminalConn:
    t = logged_in()
    assert t.connect(target) == [m.ConnectRequest(req=1, target=target)]
    return t


def notified(encrypt=False) -> TerminalConn:
    t = logged_in()
    ev = t.receive(m.Notify(req=77, peer="bob", service="ssh", encrypt=encrypt))
    assert ev == IncomingRequest(77, "bob", "ssh", encrypt, False, "", False)
    return t


def paired() -> TerminalConn:
    t = requesting()
    assert t.receive(m.Result(req=1, ok=True, peer="bob")) == Connected(
        "bob", False, False, "", True)
    return t


# -- Fig. 2 ----------------------------------------------------------------------------
def test_login_ok():
    t = logged_in()
    assert (t.state, t.conn_id) == (TState.IDLE, 3)


def test_login_fail_closes():
    t = TerminalConn()
    t.login("alice", "bad")
    assert t.receive(m.LoginFail(reason="no")) == LoginFailed("no")
    assert t.state is TState.CLOSED
    with pytest.raises(LocalProtocolError):
        t.connect("bob")


def test_login_twice_is_local_error():
    t = logged_in()
    with pytest.raises(LocalProtocolError):
        t.login("alice", "pw")


def test_keepalive_counts_and_acks():
    t = TerminalConn()
    assert t.hold() == []  # nothing to keep alive before the login
    t = logged_in()
    assert t.hold() + t.hold() == [m.Hold(seq=1), m.Hold(seq=2)]
    assert t.receive(m.HoldAck(seq=2)) == Other(m.HoldAck(seq=2))
    t.receive(m.HoldAck(seq=1))  # a late ack does not go backwards
    assert t.acked_seq == 2


def test_logout():
    t = logged_in()
    assert t.logout() == [m.Logout()]
    assert t.state is TState.CLOSED


# -- connection request from this side ------------------------------------------------
def test_connect_before_login_is_local_error():
    with pytest.raises(LocalProtocolError):
        TerminalConn().connect("bob")


def test_connect_while_requesting_is_local_error():
    t = requesting()
    with pytest.raises(LocalProtocolError):
        t.connect("carol")


def test_connected():
    t = paired()
    assert (t.state, t.peer) == (TState.PAIRED, "bob")


def test_result_refused():
    t = requesting()
    assert t.receive(m.Result(req=1, ok=False, peer="bob", code="refused", message="no")) == \
        ConnectFailed("refused", "no")
    assert (t.state, t.peer) == (TState.IDLE, None)


def test_error_for_the_request_fails_it():
    t = requesting()
    ev = t.receive(m.Error(req=1, code="not-logged-in", message="bob is not logged in"))
    assert ev == ConnectFailed("not-logged-in", "bob is not logged in")
    assert t.state is TState.IDLE


def test_error_for_another_request_is_passed_on():
    t = requesting()
    assert isinstance(t.receive(m.Error(req=9, code="x", message="y")), Other)
    assert t.state is TState.REQUESTING


def test_result_for_another_request_is_remote_error():
    t = requesting()
    with pytest.raises(RemoteProtocolError):
        t.receive(m.Result(req=2, ok=True, peer="bob"))


def test_request_ids_increase():
    t = requesting()
    t.receive(m.Error(req=1, code="x", message="y"))
    assert t.connect("bob", "ssh", encrypt=True) == [
        m.ConnectRequest(req=2, target="bob", service="ssh", encrypt=True)]


# -- step 12-13: encryption instruction --------------------------------------------------
def test_encryption_instructed_needs_tls_before_accepting():
    t = requesting()
    assert t.receive(m.EncryptInstruct(req=1, reason="bob requires it")) == \
        EncryptionInstructed(1, "bob requires it")
    with pytest.raises(LocalProtocolError):
        t.accept_encryption()
    assert t.starttls() == [m.StartTLS()]
    t.tls_established()
    assert t.accept_encryption() == [m.EncryptAccept(req=1)]
    with pytest.raises(LocalProtocolError):
        t.starttls()


def test_refuse_encryption():
    t = requesting()
    t.receive(m.EncryptInstruct(req=1))
    assert t.refuse_encryption("no TLS here") == [m.EncryptRefuse(req=1, reason="no TLS here")]


def test_encryption_instruction_when_idle_is_remote_error():
    with pytest.raises(RemoteProtocolError):
        logged_in().receive(m.EncryptInstruct(req=1))


def test_ask_insecure_accept_and_refuse():
    t = requesting()
    assert t.receive(m.Notify(req=1, peer="bob", insecure=True)) == AskInsecure(1, "bob")
    assert t.accept() == [m.Accept(req=1)]
    assert t.refuse("no") == [m.Refuse(req=1, reason="no")]
    assert t.state is TState.REQUESTING  # the relay's Result decides


# -- steps 14-15: a request for this side -------------------------------------------------
def test_incoming_plain_accept():
    t = notified()
    assert t.accept() == [m.Accept(req=77)]
    assert (t.state, t.peer) == (TState.PAIRED, "bob")


def test_incoming_encrypted_needs_tls():
    t = notified(encrypt=True)
    with pytest.raises(LocalProtocolError):
        t.accept()
    assert t.state is TState.NOTIFIED
    t.tls_established()
    assert t.accept() == [m.Accept(req=77)]


def test_incoming_refuse():
    t = notified()
    assert t.refuse("busy") == [m.Refuse(req=77, reason="busy")]
    assert (t.state, t.peer) == (TState.IDLE, None)


def test_notify_while_paired_is_remote_error():
    with pytest.raises(RemoteProtocolError):
        paired().receive(m.Notify(req=5, peer="carol"))


def test_accept_when_idle_is_local_error():
    with pytest.raises(LocalProtocolError):
        logged_in().accept()


# -- steps 26-28': end and release ------------------------------------------------------
def test_end_is_idempotent():
    t = paired()
    assert t.end("bye") == [m.End(reason="bye"), m.Release()]
    assert t.end("bye") == []
    assert t.state is TState.RELEASING
    assert t.receive(m.Released()) == ReleasedEvent()
    assert (t.state, t.peer) == (TState.IDLE, None)


def test_peer_ended_then_only_release():
    t = paired()
    assert t.receive(m.End(reason="done")) == PeerEnded("done")
    assert t.end() == [m.Release()]


def test_release_alone():
    t = paired()
    assert t.release() == [m.Release()]
    assert t.release() == []


def test_end_when_idle_is_local_error():
    with pytest.raises(LocalProtocolError):
        logged_in().end()


def test_new_session_after_release_sends_end_again():
    t = paired()
    t.end()
    t.receive(m.Released())
    t.connect("bob")
    t.receive(m.Result(req=2, ok=True, peer="bob"))
    assert t.end() == [m.End(), m.Release()]


@pytest.mark.parametrize(
    ("make", "msg"),
    [
        (logged_in, m.Released()),
        (logged_in, m.Result(req=1, ok=True, peer="bob")),
        (logged_in, LOGIN_OK),
        (TerminalConn, m.Notify(req=1, peer="bob")),
        (paired, m.Released()),
        (paired, m.LoginFail(reason="x")),
    ],
)
def test_unexpected_messages_are_remote_errors(make, msg):
    with pytest.raises(RemoteProtocolError):
        make().receive(msg)


@pytest.mark.parametrize(
    "msg",
    [m.Presence(user="bob", online=True), m.TLSGo(), m.WhoList(users=[]),
     m.Deliver(sender="bob", body=b"x"), m.Error(code="protocol", message="no")],
)
def test_informational_messages_pass_through(msg):
    assert logged_in().receive(msg) == Other(msg)


# -- a ControlUnit and terminals on an in-memory network ----------------------------------
def over_the_wire(codec, msg):
    """Encode, frame, deframe and decode, one byte at a time."""
    dec = FrameDecoder()
    frames = []
    for byte in codec.encode(msg):
        dec.feed(bytes([byte]))
        frames += dec.frames()
    [frame] = frames
    return codec.decode(frame.payload)


@dataclass
class Term:
    name: str
    cid: int
    t: TerminalConn = field(default_factory=TerminalConn)
    events: list = field(default_factory=list)
    closed: bool = False
    token: str = ""
    #: DATA frames the relay wrote to this terminal (early data forwarded)
    data: list = field(default_factory=list)
    #: control messages this terminal sent
    sent: int = 0

    def take(self) -> list:
        """Events for the application, without keepalive/TLS chatter."""
        out, self.events = [e for e in self.events if not isinstance(e, Other)], []
        return out


class Net:
    """Plays the relay's driver: carries messages both ways and executes actions."""

    def __init__(self, *records: UserRecord) -> None:
        self.cu = ControlUnit()
        self.records = {r.name: r for r in records}
        self.terms: dict[int, Term] = {}
        self.pairs: set[tuple[int, int]] = set()
        self.now = 0.0

    def connect(self, name: str, *, encrypted=False) -> Term:
        term = Term(name, self.cu.connection_made(f"addr-{name}", encrypted=encrypted))
        if encrypted:
            term.t.tls_established()
        self.terms[term.cid] = term
        return term

    def login(self, name: str, *, encrypted=False, **kw) -> Term:
        term = self.connect(name, encrypted=encrypted)
        self.send(term, term.t.login(name, **kw))
        [ev] = term.take()
        assert isinstance(ev, LoggedIn), ev
        term.token = ev.token
        return term

    def send(self, term: Term, msgs: list[m.Msg]) -> None:
        for msg in msgs:
            term.sent += 1
            self.run(self.cu.receive(term.cid, over_the_wire(m.RELAY_CODEC, msg), self.now))

    def run(self, actions) -> None:
        for a in actions:
            if isinstance(a, Send):
                term = self.terms[a.conn]
                term.events.append(term.t.receive(over_the_wire(m.TERMINAL_CODEC, a.msg)))
            elif isinstance(a, Authenticate):
                self.run(self.cu.authenticated(a.conn, self.records.get(a.user), self.now))
            elif isinstance(a, UpgradeTLS):  # the TLS handshake succeeds at once
                self.terms[a.conn].t.tls_established()
                self.run(self.cu.tls_established(a.conn))
            elif isinstance(a, Pair):
                self.pairs.add((a.a, a.b))
            elif isinstance(a, Forward):
                assert any(a.conn in p for p in self.pairs), "data before the pairing"
                self.terms[a.conn].data.append(a.data)
            elif isinstance(a, Unpair):
                self.pairs = {p for p in self.pairs if a.conn not in p}
            elif isinstance(a, Close):
                self.terms[a.conn].closed = True


def end_session(net: Net, first: Term, second: Term) -> None:
    """Steps 26-28': ``first`` ends, ``second`` releases, both idle again."""
    net.send(first, first.t.end("done"))
    assert second.take() == [PeerEnded("done")]
    net.send(second, second.t.end())
    assert first.take() == second.take() == [ReleasedEvent()]
    assert first.t.state is second.t.state is TState.IDLE
    assert not net.pairs


@pytest.fixture
def net() -> Net:
    return Net(UserRecord("t11"), UserRecord("t21", encryption="required"),
               UserRecord("t31", insecure_peer="ask"))


def test_fig3_round_trip_then_second_session(net):
    t11 = net.login("t11", password="pw")
    t21 = net.login("t21", password="pw", encrypted=True)
    net.send(t11, t11.t.connect("t21"))  # step 11
    assert t11.take() == [EncryptionInstructed(1, "t21 requires encrypted communication")]
    assert t21.take() == []
    net.send(t11, t11.t.starttls())
    net.send(t11, t11.t.accept_encryption())  # step 13
    [req] = t21.take()  # step 14
    assert isinstance(req, IncomingRequest) and (req.peer, req.encrypt) == ("t11", True)
    net.send(t21, t21.t.accept())  # steps 15-16
    assert t11.take() == [Connected("t21", True, False, "", True)]
    assert net.pairs == {(t11.cid, t21.cid)}
    end_session(net, t11, t21)
    # Fig. 4 on the same two connections, no reconnect: t21 asks t11
    net.send(t21, t21.t.connect("t11"))
    [req] = t11.take()
    assert req.encrypt and req.peer == "t21"
    net.send(t11, t11.t.accept())
    assert t21.take() == [Connected("t11", True, False, "", True)]
    assert net.pairs == {(t21.cid, t11.cid)}
    end_session(net, t21, t11)


def test_fig4_round_trip(net):
    t21 = net.login("t21", password="pw", encrypted=True)
    t11 = net.login("t11", password="pw")
    net.send(t21, t21.t.connect("t11"))  # step 31
    [req] = t11.take()  # step 32
    assert isinstance(req, IncomingRequest) and req.encrypt
    with pytest.raises(LocalProtocolError):
        t11.t.accept()
    net.send(t11, t11.t.starttls())
    net.send(t11, t11.t.accept())  # step 33
    assert t21.take() == [Connected("t11", True, False, "", True)]  # step 34
    assert net.cu.conns[t11.cid].encrypted
    end_session(net, t21, t11)


def test_fig4_plaintext_requester_asking_for_encryption(net):
    t11 = net.login("t11", password="pw")
    t31 = net.login("t31", password="pw", encrypted=True)
    net.send(t11, t11.t.connect("t31", encrypt=True))
    [ev] = t11.take()
    assert isinstance(ev, EncryptionInstructed)
    net.send(t11, t11.t.starttls())
    net.send(t11, t11.t.accept_encryption())
    [req] = t31.take()
    net.send(t31, t31.t.accept())
    assert req.encrypt and t11.take() == [Connected("t31", True, False, "", True)]


def test_para_0037_ask_the_target(net):
    t11 = net.login("t11", password="pw", attrs=m.Attrs(encryption="off"))
    t31 = net.login("t31", password="pw", encrypted=True,
                    attrs=m.Attrs(encryption="required"))
    net.send(t11, t11.t.connect("t31"))  # t11 cannot encrypt: t31 is asked
    [req] = t31.take()
    assert req.insecure and not req.encrypt
    net.send(t31, t31.t.refuse("not without encryption"))
    assert t11.take() == [ConnectFailed("refused", "not without encryption")]
    net.send(t11, t11.t.connect("t31"))
    t31.take()
    net.send(t31, t31.t.accept())
    assert t11.take() == [Connected("t31", False, False, "", True)]


def test_spare_connection_takes_the_next_request(net):
    t11 = net.login("t11", password="pw")
    t21 = net.login("t21", password="pw", encrypted=True)
    t31 = net.login("t31", password="pw", encrypted=True)
    net.send(t31, t31.t.connect("t21"))
    assert isinstance(t21.take()[0], IncomingRequest)
    net.send(t21, t21.t.accept())
    assert isinstance(t31.take()[0], Connected)
    spare = net.login("t21", token=t21.token, encrypted=True)  # steps 17'-21'
    net.send(spare, spare.t.hold())
    assert spare.t.acked_seq == 1
    net.send(t11, t11.t.connect("t21"))
    net.send(t11, t11.t.starttls())
    net.send(t11, t11.t.accept_encryption())
    assert isinstance(spare.take()[0], IncomingRequest)
    assert t21.take() == []


def test_error_from_relay_fails_the_request(net):
    t11 = net.login("t11", password="pw")
    net.send(t11, t11.t.connect("nobody"))
    assert t11.take() == [ConnectFailed("not-logged-in", "nobody is not logged in")]
    assert t11.t.state is TState.IDLE


def test_wrong_password_over_the_network(net):
    t11 = net.connect("t11")
    net.records["t11"] = None  # what the driver reports for a bad password
    net.send(t11, t11.t.login("t11", password="bad"))
    assert isinstance(t11.take()[0], LoginFailed) and t11.closed


def test_requester_vanishes_before_target_accepts(net):
    t11 = net.login("t11", password="pw")
    t31 = net.login("t31", password="pw", encrypted=True)
    net.send(t11, t11.t.connect("t31"))
    assert isinstance(t31.take()[0], IncomingRequest)
    net.run(net.cu.connection_lost(t11.cid, 0.0))
    net.send(t31, t31.t.accept())
    assert t31.take() == [PeerEnded("requester went away")]
    net.send(t31, t31.t.end())
    assert t31.take() == [ReleasedEvent()]
    assert t31.t.state is TState.IDLE


# -- early data: the requester's first bytes with its request --------------------------
@pytest.mark.parametrize(("encrypted", "encryption", "encrypt", "e2e", "allowed"), [
    (True, "optional", False, False, True),    # an encrypted hop
    (True, "optional", True, False, True),
    (False, "off", False, False, True),        # no encrypted session is made from here
    (False, "optional", False, False, False),  # step 12 may still come: wait
    (False, "off", True, False, False),
    (True, "optional", False, True, False),    # e2e: sealed after the pairing
])
def test_early_data_only_where_it_cannot_cross_a_plaintext_hop(
        encrypted, encryption, encrypt, e2e, allowed):
    t = TerminalConn()
    t.login("alice", "pw")
    t.receive(m.LoginOk(conn_id=3, token="tok", encryption=encryption, keepalive=15.0,
                        dead_after=45.0))
    if encrypted:
        t.tls_established()
    assert t.early_data_allowed(encrypt=encrypt, e2e=e2e) is allowed
    [req] = t.connect("bob", encrypt=encrypt, e2e=e2e, early=b"hello")
    assert req.data == (b"hello" if allowed else b"")


def test_a_relay_claiming_more_early_data_than_sent_is_a_protocol_error():
    t = logged_in()
    t.tls_established()
    t.connect("bob", early=b"hi")
    with pytest.raises(RemoteProtocolError):
        t.receive(m.Result(req=1, ok=True, peer="bob", early=3))


def test_session_setup_round_trips_with_early_data():
    """The round trips of a session on spare connections, counted on the sans-IO
    pair: the requester sends one message (its request) and the target has the
    requester's first bytes as soon as its acceptance is in - the result's trip to
    the requester and the data's trip back are off the path. Without early data
    (a plaintext hop that may yet be told to encrypt) the bytes wait for the result."""
    for encrypted, expect in ((True, [b"GET /"]), (False, [])):
        net = Net(UserRecord("alice"), UserRecord("bob"))
        a = net.login("alice", password="pw", encrypted=encrypted)
        b = net.login("bob", password="pw", encrypted=encrypted)
        a.sent = 0
        net.send(a, a.t.connect("bob", early=b"GET /"))
        [note] = b.take()
        assert isinstance(note, IncomingRequest) and b.data == []
        net.send(b, b.t.accept())
        assert a.sent == 1  # the request, nothing else from the requester
        assert b.data == expect
        [res] = a.take()
        assert isinstance(res, Connected) and res.early == len(b"".join(expect))

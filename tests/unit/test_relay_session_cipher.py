"""The relay's session cipher (spec 000 step 23, "with some ciphers this step is not
needed and the data is relayed unchanged"): the one decision in the control unit, the
keys it issues, and what it refuses to do on a connection once TLS has ended there.

Both terminals must offer :data:`messages.CIPHER_SESSION` on the very connections of the
session, both hops must be TLS the driver can end in place, the session must stay on
this node and not be end-to-end, and the switch (``--session-cipher``) must be on;
otherwise the session re-encrypts as before.
"""

from __future__ import annotations

import pytest

from kakehashi.core import crypto
from kakehashi.relay import messages as m
from kakehashi.relay.control import (
    Close,
    ControlUnit,
    Forward,
    LeaveTLS,
    Pair,
    Send,
    Settings,
    Shut,
    UserRecord,
)

OFFER = m.Attrs(ciphers=[m.CIPHER_TLS, m.CIPHER_SESSION])


class Relay:
    def __init__(self, **settings) -> None:
        self.cu = ControlUnit(Settings(**settings))
        self.n = 0

    def login(self, name: str, *, attrs: m.Attrs | None = OFFER, encrypted: bool = True,
              leaves_tls: bool = True, services: list[str] | None = None, **record) -> int:
        self.n += 1
        cid = self.cu.connection_made(f"10.0.0.{self.n}", encrypted=encrypted,
                                      leaves_tls=leaves_tls)
        if services:
            attrs = m.Attrs(ciphers=list(attrs.ciphers) if attrs else [], services=services)
        self.cu.receive(cid, m.Login(user=name, password="pw", attrs=attrs), 0.0)
        self.cu.authenticated(cid, UserRecord(name, **record), 0.0)
        return cid

    def session(self, a: int, b: int, target: str = "pi", *, early: bytes = b"",
                e2e: bool = False) -> tuple[list[object], list[object]]:
        """Request from ``a`` to ``target`` (whose idle connection is ``b``) and accept:
        the notification's actions and the pairing's."""
        notify = self.cu.receive(a, m.ConnectRequest(req=1, target=target, data=early,
                                                     e2e=e2e), 0.0)
        req = next(x.msg for x in notify if isinstance(x, Send) and x.conn == b).req
        return notify, self.cu.receive(b, m.Accept(req=req), 0.0)


def msg(actions, cid, kind):
    found = [a.msg for a in actions if isinstance(a, Send) and a.conn == cid
             and isinstance(a.msg, kind)]
    assert len(found) == 1, actions
    return found[0]


def test_both_offer_it_keys_issued_and_both_links_leave_tls():
    r = Relay()
    b = r.login("pi")
    a = r.login("laptop")
    notify, paired = r.session(a, b)
    n = msg(notify, b, m.Notify)
    res = msg(paired, a, m.Result)
    assert n.cipher == res.cipher == m.CIPHER_SESSION
    # each side: its send key then its receive key; one key per direction
    assert len(res.keys) == 32 and res.keys[:16] == n.keys[16:] and res.keys[16:] == n.keys[:16]
    assert res.keys[:16] != res.keys[16:]
    leave = [x for x in paired if isinstance(x, LeaveTLS)]
    assert leave == [LeaveTLS(a), LeaveTLS(b)]
    # the result goes out before TLS ends on the requester's link
    assert paired.index(leave[0]) > paired.index(
        next(x for x in paired if isinstance(x, Send) and x.conn == a))
    assert any(isinstance(x, Pair) for x in paired)
    audit = next(x for x in paired if type(x).__name__ == "Audit" and x.event == "pair")
    assert audit.fields["cipher"] == m.CIPHER_SESSION


def test_fresh_keys_for_every_session():
    r = Relay()
    b1, b2 = r.login("pi"), r.login("pi")
    a1, a2 = r.login("laptop"), r.login("laptop")
    _, p1 = r.session(a1, b1)
    _, p2 = r.session(a2, b2)
    k1, k2 = msg(p1, a1, m.Result).keys, msg(p2, a2, m.Result).keys
    assert k1[:16] != k2[:16] and k1[16:] != k2[16:]


def test_early_data_goes_sealed_as_the_requesters_first_message():
    r = Relay()
    b = r.login("pi")
    a = r.login("laptop")
    notify, paired = r.session(a, b, early=b"SSH-2.0-hello\r\n")
    fwd = [x for x in paired if isinstance(x, Forward)]
    assert len(fwd) == 1 and fwd[0].conn == b and b"SSH" not in fwd[0].data
    keys = msg(notify, b, m.Notify).keys
    target = crypto.E2ESession.issued(keys[:16], keys[16:], suite=crypto.SUITE_AES_128_GCM)
    assert target.open(fwd[0].data) == b"SSH-2.0-hello\r\n"
    assert msg(paired, a, m.Result).early == len(b"SSH-2.0-hello\r\n")
    # the early data goes before TLS ends on the target's link
    assert paired.index(fwd[0]) < paired.index(LeaveTLS(b))


@pytest.mark.parametrize("case", ["requester-old", "target-old", "switch-off", "plain-hop",
                                  "cannot-leave-tls", "e2e"])
def test_otherwise_the_session_re_encrypts_as_before(case):
    r = Relay(session_cipher=case != "switch-off")
    b = r.login("pi", attrs=None if case == "target-old" else OFFER,
                leaves_tls=case != "cannot-leave-tls", pubkey="x" if case == "e2e" else "")
    a = r.login("laptop", attrs=None if case == "requester-old" else OFFER,
                encrypted=case != "plain-hop", pubkey="y" if case == "e2e" else "")
    notify, paired = r.session(a, b, e2e=case == "e2e")
    n, res = msg(notify, b, m.Notify), msg(paired, a, m.Result)
    assert n.cipher == res.cipher == "" and n.keys is None and res.keys is None
    assert not [x for x in paired if isinstance(x, LeaveTLS)]
    # an old terminal gets nothing it would not decode (omit_defaults)
    assert b"keys" not in m.TERMINAL_CODEC.encode(res)
    assert not r.cu.conns[a].switched and not r.cu.conns[b].switched


def test_a_session_across_nodes_keeps_tls():
    """A requester arriving over an inter-node link (the trunk stands in for it)."""
    r = Relay(node="n1", cluster_secret=b"k" * 32)
    r.cu.cluster_state(True)
    b = r.login("pi")
    trunk = r.cu.connection_made("10.9.9.9", encrypted=True, leaves_tls=True)
    conn = r.cu.conns[trunk]
    conn.trunk, conn.link_encrypted, conn.state = "n2", True, r.cu.conns[b].state
    conn.attrs = OFFER
    acts = r.cu.receive(trunk, m.NodeConnect(req=1, requester="laptop", target="pi",
                                             hop_encrypted=True), 0.0)
    n = msg(acts, b, m.Notify)
    assert n.cipher == "" and n.keys is None


def test_after_the_switch_the_relay_takes_no_control_message_and_sends_none():
    r = Relay()
    b = r.login("pi")
    a = r.login("laptop")
    r.session(a, b)
    assert r.cu.receive(a, m.Hold(seq=3), 0.0) == []  # sent inside TLS as it paired
    acts = r.cu.receive(a, m.End(reason="injected"), 0.0)
    assert [x for x in acts if isinstance(x, Close) and x.conn == a]
    # presence notices skip it
    watcher = r.login("bob", attrs=None)
    r.cu.receive(watcher, m.Subscribe(), 0.0)
    r.cu.subscribers.add(b)
    r.cu.conns[b].subscribed = True
    acts = [x for x in r.cu.connection_lost(watcher, 0.0)]
    assert not [x for x in acts if isinstance(x, Send) and x.conn == b]


def test_peer_lost_under_the_session_cipher_ends_with_a_fin_not_a_message():
    r = Relay()
    b = r.login("pi")
    a = r.login("laptop")
    r.session(a, b)
    acts = r.cu.connection_lost(a, 0.0)
    assert Shut(b) in acts
    assert not [x for x in acts if isinstance(x, Send) and x.conn == b]


def test_the_pairings_audit_entry_is_written_past_the_setup():
    """The pair entry is decided with the pairing, but written once the first reply is
    through (``Audit.soon``: :meth:`AuditLog.record_soon`), not in the step that sends
    the result (issue 12); a refusal is written at once."""
    r = Relay()
    b = r.login("pi")
    a = r.login("laptop")
    _, paired = r.session(a, b)
    audit = next(x for x in paired if type(x).__name__ == "Audit" and x.event == "pair")
    assert audit.soon
    refused = r.cu.receive(a, m.ConnectRequest(req=2, target="nobody"), 0.0)
    assert [x.soon for x in refused if type(x).__name__ == "Audit"] == [False]

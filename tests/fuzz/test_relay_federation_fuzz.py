"""Property tests of what relay nodes read from each other: presence entries from
Redis (another node wrote them, a damaged or hostile one maybe) and the inter-node
link's messages, decided by a node's control unit."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kakehashi.relay import federation as fed
from kakehashi.relay import messages as m
from kakehashi.relay.control import Close, ControlUnit, Send, Settings, State

FAST = settings(max_examples=300, deadline=None)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                 max_size=4),
    max_leaves=12,
)
docs = st.dictionaries(st.sampled_from(["e", "s", "c", "n", "nu", "ap", "k", "q", "x"]),
                       json_values, max_size=8)


@FAST
@given(docs)
def test_presence_entry_is_read_or_refused_with_value_error(doc):
    try:
        info = fed.PresenceInfo.from_doc(doc)
    except ValueError:
        return
    assert info.encryption in ("required", "optional", "off")
    assert fed.PresenceInfo.from_doc(info.to_doc()) == info


def test_presence_entry_with_an_infinite_count_is_refused():
    import pytest

    with pytest.raises(ValueError):
        fed.PresenceInfo.from_doc({"c": float("inf")})


names = st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True)
node_msgs = st.one_of(
    st.builds(m.NodeHello, node=names, nonce=st.binary(min_size=16, max_size=64)),
    st.builds(m.NodeProof, proof=st.binary(min_size=32, max_size=64)),
    st.builds(m.NodeConnect, req=st.integers(0, 10), requester=names, target=names),
    st.builds(m.Hold), st.builds(m.Release), st.builds(m.End), st.builds(m.Who),
    st.builds(m.Accept, req=st.integers(0, 10)), st.builds(m.StartTLS),
)


@FAST
@given(st.lists(node_msgs, max_size=8))
def test_unauthenticated_peer_never_gets_a_link(msgs):
    """Whatever a peer without the cluster secret sends, it never becomes a link, and
    nothing it sends is forwarded anywhere but back to itself."""
    cu = ControlUnit(Settings(node="n1", cluster_secret=fed.derive_secret("secret")))
    cu.cluster_up = True
    cid = cu.connection_made("203.0.113.7", encrypted=False)
    for msg in msgs:
        for action in cu.receive(cid, msg, 0.0):
            if isinstance(action, Send | Close):
                assert action.conn == cid
        conn = cu.conns.get(cid)
        assert conn is None or not conn.trunk
        assert conn is None or conn.state in (State.NEW, State.CLOSED) or conn.violated

"""What may be pooled for other client connections, and under which key."""

from __future__ import annotations

from types import SimpleNamespace

from kakehashi.gateway import http
from kakehashi.gateway.allow import AllowList
from kakehashi.gateway.exchange import Upstream
from kakehashi.gateway.pool import binds_request, binds_response, pool_key
from kakehashi.gateway.server import GatewayServer


def _upstream(*users: str, private: bool = False) -> Upstream:
    up = Upstream(("10.0.0.5", 80), conn=None)  # type: ignore[arg-type]
    up.decided = {("app", 80, user): "10.0.0.5" for user in users}
    up.private = private
    return up


def test_pooled_per_proxy_user():
    assert pool_key(_upstream("alice")) == ("10.0.0.5", 80, "alice")
    assert pool_key(_upstream("-")) == ("10.0.0.5", 80, "-")


def test_not_pooled_when_private_or_used_by_several_users():
    assert pool_key(_upstream("alice", private=True)) is None
    assert pool_key(_upstream("alice", "bob")) is None


def test_what_ties_a_connection_to_its_client():
    assert binds_request(b"GET / HTTP/1.1\r\nHost: a\r\nauthorization: Basic eA==\r\n")
    assert not binds_request(b"GET / HTTP/1.1\r\nHost: a\r\nProxy-Authorization: Basic x\r\n")
    assert binds_response(b"HTTP/1.1 401 X\r\nWWW-Authenticate: Negotiate\r\n")
    assert binds_response(b"HTTP/1.1 401 X\r\nwww-authenticate:NTLM\r\n")
    assert not binds_response(b"HTTP/1.1 401 X\r\nWWW-Authenticate: Basic realm=x\r\n")
    head = http.ResponseHead(b"HTTP/1.1", 401, b"X",
                             http.Headers([(b"WWW-Authenticate", b"Basic realm=x"),
                                           (b"WWW-Authenticate", b" NTLM")]))
    assert binds_response(head)
    req = http.RequestHead(b"GET", b"/", b"HTTP/1.1",
                           http.Headers([(b"Host", b"a"), (b"Authorization", b"NTLM x")]))
    assert binds_request(req)


class _FakeConn:
    """Just what the loop check reads of a connection (weakly referenced, as Conns are)."""

    def __init__(self, peer: tuple[str, int], local: tuple[str, int]) -> None:
        self.peer, self.closed = peer, False
        self.sock = SimpleNamespace(getsockname=lambda: local)


_fake_conn = _FakeConn


def test_a_loop_is_the_whole_address_pair_not_a_shared_source_port():
    """The kernel gives one local port to connections with different destinations:
    a client may connect from the port an upstream connection also uses. Seen in
    the one-shot benchmark as stray 508s before the check took both ends."""
    server = GatewayServer(AllowList(["127.0.0.1"]))
    upstream = _fake_conn(peer=("127.0.0.1", 8080), local=("127.0.0.1", 40000))  # to origin
    server._own_upstreams[("127.0.0.1", 40000)] = upstream
    client = _fake_conn(peer=("127.0.0.1", 40000), local=("127.0.0.1", 3128))  # to gateway
    assert not server._from_itself(client)
    itself = _fake_conn(peer=("127.0.0.1", 40000), local=("127.0.0.1", 8080))
    assert server._from_itself(itself)  # the upstream's own other end: a loop
    upstream.closed = True
    assert not server._from_itself(itself)

"""What may be pooled for other client connections, and under which key."""

from __future__ import annotations

import socket
from types import SimpleNamespace

from kakehashi.core.stream import Conn
from kakehashi.gateway import http
from kakehashi.gateway.allow import AllowList
from kakehashi.gateway.exchange import Upstream
from kakehashi.gateway.pool import UpstreamPool, binds_request, binds_response, pool_key
from kakehashi.gateway.server import GatewayServer
from tests.support.wait import async_wait_until


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


async def test_a_pooled_upstream_its_origin_closes_is_closed_and_forgotten_at_once():
    """The pool watches its idle connections: an origin's keep-alive timeout (EOF)
    takes the connection out of the pool when it happens, not at the next sweep."""
    ours, origin = socket.socketpair()
    conn = Conn(ours)
    pool = UpstreamPool(idle=60)  # no sweep during the test
    key = ("10.0.0.5", 80, "-")
    try:
        pool.give(key, conn)
        assert len(pool) == 1 and pool.has(key)
        origin.close()
        await async_wait_until(lambda: len(pool) == 0, 5, what="the pool empty")
        assert conn.closed and not pool.has(key) and pool.take(key) is None
    finally:
        pool.close()
        origin.close()


async def test_a_taken_upstream_is_the_takers_to_watch():
    """Whoever takes a pooled connection takes over its registration: bytes that
    arrive later are the taker's response, never a reason for the pool to close it."""
    ours, origin = socket.socketpair()
    conn = Conn(ours)
    pool = UpstreamPool(idle=60)
    key = ("10.0.0.5", 80, "-")
    got: list[bytes] = []
    try:
        pool.give(key, conn)
        taken = pool.take(key)
        assert taken is conn and len(pool) == 0
        taken.watch_readable(lambda: got.append(conn.sock.recv(100)))
        origin.sendall(b"HTTP/1.1 200 OK\r\n")
        await async_wait_until(lambda: bool(got), 5, what="the origin's bytes")
        assert got == [b"HTTP/1.1 200 OK\r\n"] and not conn.closed
    finally:
        conn.close()
        pool.close()
        origin.close()

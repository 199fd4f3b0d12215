"""What may be pooled for other client connections, and under which key."""

from __future__ import annotations

from kakehashi.gateway import http
from kakehashi.gateway.exchange import Upstream
from kakehashi.gateway.pool import binds_request, binds_response, pool_key


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

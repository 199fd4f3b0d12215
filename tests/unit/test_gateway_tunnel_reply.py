"""The tunnel's own reply (200 to CONNECT, 101 to an upgrade) has a deadline, as every
other send to a gateway client."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from kakehashi.core.stream import Conn, ConnClosed
from kakehashi.gateway import http
from kakehashi.gateway.allow import AllowList
from kakehashi.gateway.server import GatewayServer, GatewaySettings


def _fill(sock: socket.socket) -> None:
    """Fill the send buffer of ``sock`` and its peer's receive buffer: what the answers
    to a client's pipelined requests leave there when it reads none of them."""
    sock.setblocking(False)
    chunk = b"x" * 65536
    while True:
        try:
            sock.send(chunk)
        except BlockingIOError:
            return


async def test_a_tunnel_reply_to_a_client_that_never_reads_is_given_up():
    """A client that pipelined requests ahead of its CONNECT and reads nothing: the
    tunnel's reply went out with no deadline, and the coroutine, the connection and
    the target's connection waited for as long as the client did not read. It now goes
    within the idle timeout, as the replies of e6c524d, and the tunnel is let go."""
    server = GatewayServer(AllowList(["127.0.0.1"]),
                           settings=GatewaySettings(idle_timeout=0.5))
    client_end, ours = socket.socketpair()
    up_ours, target_end = socket.socketpair()
    try:
        _fill(ours)
        conn, up = Conn(ours), Conn(up_ours)
        head = http.RequestHead(b"CONNECT", b"target.test:443", b"HTTP/1.1",
                                http.Headers([(b"Host", b"target.test:443")]))
        with pytest.raises(ConnClosed, match="stopped reading"):
            async with asyncio.timeout(10):  # (the old code waits here for good)
                await server._carry(conn, up, head, 200,
                                    http.connect_established(b"HTTP/1.1"),
                                    time.monotonic(), "-", "test")
        assert up.closed  # the target's connection went with it
    finally:
        for s in (client_end, ours, up_ours, target_end):
            s.close()

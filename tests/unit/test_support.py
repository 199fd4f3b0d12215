"""The test suite's own helpers: ports that are never handed out twice, waiting."""

from __future__ import annotations

import socket

import pytest

from tests.support import ports
from tests.support.wait import accept_queue, wait_until


def test_ports_are_unique_free_and_below_the_ephemeral_range():
    got = [ports.free_port() for _ in range(200)]
    assert len(set(got)) == len(got)
    assert all(ports._LOW <= p <= ports._HIGH for p in got)
    with socket.socket() as s:
        s.bind(("127.0.0.1", got[-1]))  # nothing holds it


def test_wait_until_returns_the_value_or_says_what_it_waited_for():
    values = iter([0, None, "ready"])
    assert wait_until(lambda: next(values), 5, interval=0) == "ready"
    with pytest.raises(AssertionError, match="the moon"):
        wait_until(lambda: False, 0.05, what="the moon")


def test_accept_queue_counts_connections_not_yet_accepted():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert accept_queue(port) == 0
        with socket.create_connection(("127.0.0.1", port)):
            wait_until(lambda: accept_queue(port) == 1)
            server.accept()[0].close()
            assert accept_queue(port) == 0


@pytest.mark.parametrize("server", ["echo", "origin"])
def test_a_closed_test_server_leaves_no_thread_that_could_take_another_sockets_connections(
        server):
    """Closing a listener under a thread about to ``accept`` freed its descriptor
    number for the next socket, and the old thread then accepted that socket's
    connections: an echo server answered a device's and an origin's requests with the
    request itself (two CI flakes). After close() the accept thread must be gone."""
    from tests.e2e.framework import EchoServer
    from tests.e2e.gateway_fixtures import Origin

    srv = EchoServer() if server == "echo" else Origin()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5):
        pass  # the accept loop has run once and waits in accept() again
    wait_until(lambda: srv.connections == 1, 5, what="the connection accepted")
    srv.close()
    assert not srv._thread.is_alive()
    # and the freed number serves a new listener with no stranger on it
    with socket.create_server(("127.0.0.1", 0)) as fresh:
        fresh.settimeout(5)
        with socket.create_connection(fresh.getsockname(), timeout=5) as c:
            conn, _ = fresh.accept()
            with conn:
                c.sendall(b"mine")
                assert conn.recv(4) == b"mine"

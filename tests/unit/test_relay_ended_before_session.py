"""A session whose peer ended before it began (an optimistic accept whose service then
failed): the terminal released the link on the end notification already, so the
session must not send the application's bytes after that release - the relay takes a
data frame on a released connection for a protocol violation and closes the link,
and the peer's reason was lost with it (`relay pipe` then exited 0 without saying
why, about one run in ten of tests/e2e/test_relay_optimistic.py)."""

from __future__ import annotations

import socket

from kakehashi.core import wire
from kakehashi.core.stream import Conn
from kakehashi.relay import messages as m
from kakehashi.relay.agent import run_session
from tests.support.relay_link import paired_link


def _frames(sock: socket.socket) -> list[wire.Frame]:
    """The frames written to ``sock``'s peer so far (a few small ones: one read)."""
    sock.setblocking(False)
    dec = wire.FrameDecoder()
    dec.feed(sock.recv(1 << 20))
    return list(dec.frames())


async def _ended_before_the_session_began() -> None:
    mine, relay = socket.socketpair()
    app_sock, client = socket.socketpair()
    client.sendall(b"hello")  # the application has spoken already
    client.shutdown(socket.SHUT_WR)
    try:
        link, info = paired_link(mine)
        # what the link's reader does before the caller starts the session: the
        # result, the target's end with its reason (answered with our release), and
        # the relay's release reply
        await link._dispatch(info)
        await link._dispatch(link.t.receive(m.End(reason="service dead unavailable")))
        await link._dispatch(link.t.receive(m.Released()))
        why = await run_session(link, Conn(app_sock), info, initiator=True)
        assert why == "closed by bob: service dead unavailable"
        sent = [m.RELAY_CODEC.decode(f.payload) if f.type is wire.FrameType.CTRL
                else f.type for f in _frames(relay)]
        assert sent == [m.Release()], sent  # nothing after the release
    finally:
        for s in (mine, relay, app_sock, client):
            s.close()


def test_no_bytes_follow_the_release_of_a_session_ended_before_it_began(run) -> None:
    run(_ended_before_the_session_began())

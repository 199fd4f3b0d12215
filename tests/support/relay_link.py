"""A terminal's relay link driven over a socket pair, without a relay process: for
unit tests of what the link's driver (relay/agent.py) does once a session is paired."""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import termios
from pathlib import Path

from kakehashi.core.stream import Conn, DirectTLSConn, FramedConn, start_tls
from kakehashi.relay import messages as m
from kakehashi.relay import terminal as t
from kakehashi.relay.agent import RelayLink, TerminalConfig


def readable_bytes(sock: socket.socket) -> int:
    """Bytes waiting in ``sock``'s receive buffer (FIONREAD): what nobody read yet."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


async def tls_pair(home: Path) -> tuple[DirectTLSConn, DirectTLSConn]:
    """The relay's and the terminal's ends of a TLS link over a socket pair (the dev
    CA under ``home``, which is ``KAKEHASHI_HOME``)."""
    from kakehashi.core.tls import client_context, server_context

    a, b = socket.socketpair()
    relay, terminal = await asyncio.gather(
        start_tls(Conn(a), server_context(names=["localhost"]), server_side=True,
                  timeout=10, framed=True),
        start_tls(Conn(b), client_context(ca=home / "ca" / "ca.pem"), server_side=False,
                  server_hostname="localhost", timeout=10, framed=True))
    assert isinstance(relay, DirectTLSConn) and isinstance(terminal, DirectTLSConn)
    return relay, terminal


def paired_link(sock: socket.socket, peer: str = "bob") -> tuple[RelayLink, t.Connected]:
    """A link on ``sock`` (the relay at the other end) logged in with its encryption off,
    whose connection request to ``peer`` has just succeeded: the result has not been
    dispatched yet (``link._dispatch(info)`` does what the link's reader would)."""
    link = RelayLink(TerminalConfig(server="127.0.0.1", port=1, user="u", password="p"))
    link.framed = FramedConn(Conn(sock))
    link.t.login("u", "p")
    link.t.receive(m.LoginOk(conn_id=1, token="tok", encryption="off", keepalive=15.0,
                             dead_after=45.0))
    link.t.connect(peer)
    info = link.t.receive(m.Result(req=1, ok=True, peer=peer))
    assert isinstance(info, t.Connected)
    return link, info

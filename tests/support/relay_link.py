"""A terminal's relay link driven over a socket pair, without a relay process: for
unit tests of what the link's driver (relay/agent.py) does once a session is paired."""

from __future__ import annotations

import fcntl
import socket
import struct
import termios

from kakehashi.core.stream import Conn, FramedConn
from kakehashi.relay import messages as m
from kakehashi.relay import terminal as t
from kakehashi.relay.agent import RelayLink, TerminalConfig


def readable_bytes(sock: socket.socket) -> int:
    """Bytes waiting in ``sock``'s receive buffer (FIONREAD): what nobody read yet."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


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

"""The terminal's asyncio driver (relay/agent.py) over a real socket pair."""

from __future__ import annotations

import fcntl
import socket
import struct
import termios

from kakehashi.core.stream import Conn, FramedConn
from kakehashi.relay import messages as m
from kakehashi.relay.agent import RelayLink, TerminalConfig


def _readable_bytes(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


async def _messages_sent_together_go_in_one_write() -> None:
    """An end and a release (the close of every session) leave in one write: the relay
    reads both in one go instead of waking up for each."""
    mine, relay = socket.socketpair()
    writes: list[int] = []

    class Counting(Conn):
        async def send_all(self, data) -> None:
            writes.append(len(data))
            await super().send_all(data)

    try:
        link = RelayLink(TerminalConfig(server="127.0.0.1", port=1, user="u", password="p"))
        link.framed = FramedConn(Counting(mine))
        msgs = [m.End(reason="done"), m.Release()]
        await link.send(msgs)
        expected = b"".join(m.TERMINAL_CODEC.encode(x) for x in msgs)
        assert writes == [len(expected)]
        assert _readable_bytes(relay) == len(expected)
        assert relay.recv(4096) == expected
    finally:
        mine.close()
        relay.close()


def test_messages_sent_together_go_in_one_write(run) -> None:
    run(_messages_sent_together_go_in_one_write())

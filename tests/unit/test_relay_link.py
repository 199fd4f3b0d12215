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


async def _a_relay_that_rejects_early_data_gets_requests_without_it() -> None:
    """A relay that predates early data rejects a request carrying it (an unknown
    field) and closes the link: the terminal retries on another link without early
    data and keeps it off, so a new `relay connect` still works with an old relay."""
    from kakehashi.relay import terminal as t
    from kakehashi.relay.agent import RelayError, Terminal

    app_sock, client = socket.socketpair()
    client.sendall(b"hello")
    sent: list[bytes] = []

    class OldRelayLink:
        reserved = False

        async def connect(self, target, service="", *, encrypt=False, e2e=False,
                          early=b""):
            sent.append(early)
            if early:
                raise RelayError("closed", "connection to the relay was lost")
            return t.Connected(target, False, False, "", True, 0)

    term = Terminal(TerminalConfig(server="127.0.0.1", port=1, user="u", password="p"))

    async def acquire():
        return OldRelayLink()

    term.acquire = acquire  # type: ignore[method-assign]
    try:
        app = Conn(app_sock)
        _, info = await term.connect("bob", app=app)
        assert info.early == 0 and sent == [b"hello", b""]
        assert not term.early_ok
        assert app_sock.recv(16) == b"hello"  # still there for the session to send
        await term.connect("bob", app=app)
        assert sent[-1] == b""  # stays off
    finally:
        app_sock.close()
        client.close()


def test_a_relay_that_rejects_early_data_gets_requests_without_it(run) -> None:
    run(_a_relay_that_rejects_early_data_gets_requests_without_it())

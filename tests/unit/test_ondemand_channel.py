"""A relay's control channel naming several manager replicas (issue 11): it holds one
channel, to the first that welcomes it, and moves on in turn when that one is dead
or goes away. Real WebSocket servers on loopback stand in for the managers."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from websockets.asyncio.server import serve

from kakehashi.ondemand import messages as m
from kakehashi.ondemand.channel import ControlChannel
from tests.support.wait import async_wait_until


def _dead_url() -> str:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _hello() -> m.Hello:
    return m.Hello(kind="edge", name="e1", csr="-", public_host="127.0.0.1",
                   ports=(30000, 30001))


class Manager:
    """Welcomes every relay; ``kick`` ends the channels it holds."""

    def __init__(self) -> None:
        self.welcomed = 0
        self.held: list = []

    async def handler(self, ws) -> None:
        m.decode_to_manager(await ws.recv())
        await ws.send(m.encode(m.Welcome(cert="-", ca="-")))
        self.welcomed += 1
        self.held.append(ws)
        with contextlib.suppress(Exception):
            await ws.wait_closed()

    async def kick(self) -> None:
        for ws in self.held:
            await ws.close()
        self.held.clear()


async def test_a_dead_first_manager_is_passed_over_and_a_lost_one_left() -> None:
    mgr = Manager()
    async with serve(mgr.handler, "127.0.0.1", 0) as server:
        live = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        dead = _dead_url()
        seen: list[str] = []

        async def on_message(msg: m.ToRelay) -> None:
            if isinstance(msg, m.Welcome):
                seen.append(channel.server)

        channel = ControlChannel([dead, live], "token", _hello, on_message,
                                 backoff=(0.05, 0.5))
        task = asyncio.get_running_loop().create_task(channel.run())
        try:
            await async_wait_until(lambda: channel.connected.is_set(), 10,
                                   what="attached to the live manager")
            assert channel.server == live and seen == [live]
            await mgr.kick()  # the live one ends our channel: the dead one is tried
            await async_wait_until(lambda: mgr.welcomed == 2 and channel.connected.is_set(),
                                   10, what="back on the live manager")
            assert seen == [live, live] and channel.welcomed == 2
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_one_server_still_works_as_before() -> None:
    mgr = Manager()
    async with serve(mgr.handler, "127.0.0.1", 0) as server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

        async def on_message(msg: m.ToRelay) -> None:
            return None

        channel = ControlChannel(url, "token", _hello, on_message, backoff=(0.05, 0.5))
        assert channel.servers == [url] and channel.url.startswith("ws://")
        task = asyncio.get_running_loop().create_task(channel.run())
        try:
            await async_wait_until(lambda: channel.connected.is_set(), 10, what="attached")
            await mgr.kick()
            await async_wait_until(lambda: mgr.welcomed == 2 and channel.connected.is_set(),
                                   10, what="attached again")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

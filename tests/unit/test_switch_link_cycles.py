"""Gateway links that come and go leave nothing for the cycle collector: each is freed
by reference counting when it ends. The server processes collect cycles seldom (see
core/runner.tune_gc), so a connection that ended inside a cycle stayed in memory for a
long while: ten rounds of link churn grew a switch server's memory by 50 MB and more.
Two cycles did that: uvicorn's HTTP protocol and its parser kept each other after a
WebSocket upgrade, and a disconnect raised through ``asyncio.wait_for`` (the wait
for the hello) held the whole connection through that future. And websockets' sans-IO
connection and its parser (a generator waiting for the end of the stream, which
uvicorn never feeds it) kept each other, with the permessage-deflate state, after the
connection was lost."""

from __future__ import annotations

import asyncio
import base64
import gc
import os

from kakehashi.core import web
from kakehashi.core.store import open_store
from kakehashi.switch import messages as m
from kakehashi.switch.server import SwitchServer, build_app
from tests.support.wait import async_wait_until


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


#: server-side objects of one WebSocket connection
SERVER_TYPES = ("WebSocketsSansIOProtocol", "WSProtocol", "Protocol", "HttpRequestParser",
                "WebSocket")


def server_connections() -> int:
    """websockets' sans-IO server connections alive (the client's are ClientProtocol)."""
    return sum(1 for o in gc.get_objects() if type(o).__name__ == "ServerProtocol"
               and type(o).__module__ == "websockets.server")


async def test_links_that_end_are_freed_without_the_collector(tmp_path):
    srv = SwitchServer(open_store(str(tmp_path / "sw.db")), kdf_n=2**4)
    srv.add_user("alice", "user", "alice-password")
    sock = web.bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    serving = asyncio.ensure_future(web.serve(build_app(srv), sock))
    import websockets

    auth = "Basic " + base64.b64encode(b"alice:alice-password").decode()
    url = f"ws://127.0.0.1:{port}/v1/gateway/link"

    async def leave_before_hello() -> None:
        async with websockets.connect(url, additional_headers={"Authorization": auth}):
            pass

    async def hello_and_leave(i: int) -> None:
        async with websockets.connect(url, additional_headers={"Authorization": auth}) as ws:
            await ws.send(m.encode(m.Hello(name=f"gw-{i}")))
            await ws.recv()

    async def churn() -> None:
        await asyncio.gather(*(leave_before_hello() for _ in range(20)),
                             *(hello_and_leave(i) for i in range(20)))
        await async_wait_until(lambda: not srv.links and not srv.checker.running, 10,
                               what="every link's handler finished on the server")

    try:
        await asyncio.wait_for(hello_and_leave(99), 60)  # one login, then remembered
        await asyncio.wait_for(churn(), 60)  # warm up: first imports and allocations
        gc.collect()
        gc.disable()
        before, connections = open_fds(), server_connections()
        try:
            await asyncio.wait_for(churn(), 60)
            # the transports' last callbacks have run once their sockets are closed
            await async_wait_until(lambda: open_fds() <= before, 10,
                                   what="the churn's sockets closed on both sides")
            alive = server_connections()  # before the collector looks
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            left = [type(o).__name__ for o in gc.garbage
                    if type(o).__name__ in SERVER_TYPES
                    and not type(o).__module__.startswith("websockets.asyncio")]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert left == [], sorted(set(left))
        assert alive == connections  # (old code: 40 more, one per link upgraded)
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await srv.close()

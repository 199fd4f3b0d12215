"""A relay's control channel to the manager: one WebSocket, kept up with backoff.

Both relays (edge and inner) use it the same way: say :class:`~.messages.Hello` with a
fresh certificate request, get :class:`~.messages.Welcome` (the certificate for the
relay link, the relay CA, and for an edge the live grants it serves), then handle the
manager's commands and ask it questions (:meth:`ControlChannel.request`). When the
connection drops it is re-opened with exponential backoff and jitter, and the hello
is said again, so a restarted manager finds every relay back within seconds. Events
produced while disconnected wait in a bounded queue.

A relay may name several managers (replicas on one Redis, ``--server`` repeated):
it holds one channel, to the first that welcomes it, and when that one goes away
(killed, unreachable) it moves to the next in turn. Each attempt waits a short
jittered delay; the delay doubles only after a whole round of managers has failed,
so a dead replica costs a relay one fraction of a second, and a site with every
manager down is not hammered. The welcome of the new manager carries the grants the
relay serves (the replicas share the store), so an edge re-syncs on arrival.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from kakehashi.ondemand import messages as m

log = logging.getLogger("kakehashi.ondemand.channel")

Handler = Callable[[m.ToRelay], Awaitable[None]]


class RegistrationRefused(Exception):
    """The manager refused this relay; retrying would not help."""


def ws_url(server: str) -> str:
    """``http://host:port`` -> ``ws://host:port/v1/relays/control`` (https -> wss)."""
    base = server.rstrip("/")
    if base.startswith("https://"):
        base = "wss://" + base[len("https://"):]
    elif base.startswith("http://"):
        base = "ws://" + base[len("http://"):]
    elif "://" not in base:
        base = "ws://" + base
    return base + "/v1/relays/control"


class ControlChannel:
    def __init__(self, server: str | Sequence[str], token: str, hello: Callable[[], m.Hello],
                 handler: Handler, *, ssl_context: ssl.SSLContext | None = None,
                 backoff: tuple[float, float] = (0.2, 10.0),
                 request_timeout: float = 5.0) -> None:
        servers = [server] if isinstance(server, str) else list(server)
        if not servers:
            raise ValueError("a control channel needs at least one manager")
        #: the managers' base URLs (as given) and their channel URLs, in turn
        self.servers = servers
        self.urls = [ws_url(s) for s in servers]
        self._at = 0  # the manager tried (or held) now
        self.token = token
        self.hello = hello
        self.handler = handler
        self.ssl_context = ssl_context
        self.backoff = backoff
        self.request_timeout = request_timeout
        self._ws: Any = None
        self._pending: dict[int, asyncio.Future[m.Reply]] = {}
        self._next = 1
        self._outbox: collections.deque[str] = collections.deque(maxlen=10_000)
        self.connected = asyncio.Event()
        self.welcomed = 0  # how many times a Welcome came (reconnects count)

    @property
    def url(self) -> str:
        """The channel URL of the manager tried (or held) now."""
        return self.urls[self._at]

    @property
    def server(self) -> str:
        """The base URL of the manager tried (or held) now."""
        return self.servers[self._at]

    async def run(self) -> None:
        """Connect, register and serve until cancelled (or a manager refuses us)."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus, WebSocketException

        delay = self.backoff[0]
        failed = 0  # attempts in a row that ended without a welcome
        while True:
            welcomed = False
            url = self.url
            ctx = self.ssl_context if url.startswith("wss://") else None
            try:
                async with connect(url, ssl=ctx, open_timeout=10,
                                   additional_headers={"Authorization": f"Bearer {self.token}"},
                                   max_size=m.MAX_MESSAGE, ping_interval=5, ping_timeout=10,
                                   close_timeout=2, compression=None) as ws:
                    await ws.send(m.encode(self.hello()))
                    first = m.decode_to_relay(await asyncio.wait_for(ws.recv(), 15))
                    if isinstance(first, m.Refused):
                        raise RegistrationRefused(f"{first.code}: {first.error}")
                    if not isinstance(first, m.Welcome):
                        raise m.ProtocolError("the manager did not welcome us")
                    self._ws = ws
                    welcomed = True
                    await self.handler(first)
                    self.welcomed += 1
                    self.connected.set()
                    while self._outbox:
                        await ws.send(self._outbox[0])
                        self._outbox.popleft()
                    async for text in ws:
                        msg = m.decode_to_relay(text)
                        if isinstance(msg, m.Reply):
                            fut = self._pending.pop(msg.req, None)
                            if fut is not None and not fut.done():
                                fut.set_result(msg)
                        else:
                            await self.handler(msg)
            except RegistrationRefused:
                raise
            except InvalidStatus as exc:
                code = exc.response.status_code
                if code in (401, 403):
                    log.error("the manager refused our token (HTTP %d); retrying", code)
                else:
                    log.warning("manager at %s answered HTTP %d", url, code)
            except (OSError, TimeoutError, WebSocketException, m.ProtocolError) as exc:
                log.warning("control channel to %s: %s", url, exc or type(exc).__name__)
            finally:
                self._lost()
            if welcomed:  # it served us, then went away: the next one, at the base delay
                delay, failed = self.backoff[0], 0
            else:
                failed += 1
            # the next manager in turn (the same one when there is only one)
            self._at = (self._at + 1) % len(self.urls)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            if failed and failed % len(self.urls) == 0:  # a whole round failed: back off
                delay = min(delay * 2, self.backoff[1])

    def _lost(self) -> None:
        self._ws = None
        self.connected.clear()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("control channel lost"))
        self._pending.clear()

    async def send(self, msg: Any) -> None:
        """Send now when connected, else queue (bounded; the oldest go first)."""
        text = m.encode(msg)
        ws = self._ws
        if ws is None:
            self._outbox.append(text)
            return
        try:
            await ws.send(text)
        except Exception:
            self._outbox.append(text)

    def post(self, msg: Any) -> None:
        """Send without waiting (events, load reports)."""
        task = asyncio.get_running_loop().create_task(self.send(msg))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def request(self, op: str, timeout: float | None = None, **fields: Any) -> m.Reply:
        """Ask the manager (relay information, a dial check); ConnectionError or
        TimeoutError when it cannot answer in time."""
        ws = self._ws
        if ws is None:
            raise ConnectionError("not connected to the manager")
        req = self._next
        self._next += 1
        fut: asyncio.Future[m.Reply] = asyncio.get_running_loop().create_future()
        self._pending[req] = fut
        try:
            await ws.send(m.encode(m.Request(req=req, op=op, **fields)))  # type: ignore[arg-type]
            return await asyncio.wait_for(fut, timeout or self.request_timeout)
        finally:
            self._pending.pop(req, None)

    async def close(self) -> None:
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()

"""A small Python API for chain-aware programs (spec 004, Fig. 7: steps 501-511).

A client that has its own control connection to the server (step 501: the server told it
its data endpoint P6) opens a chain with :func:`open_chain`, tells the server
:attr:`ChainSocket.server_sees` (P5, step 510) over that control connection, and then
exchanges datagrams (511). Because every hop knows its neighbours once the chain is up,
the server may send first (a media stream): its datagrams to P5 reach the client
without the client sending anything (unless NAT sits in front of the client, whose
mapping only an outbound datagram creates). When the chain ends (a proxy's idle
timeout, a teardown, a proxy restarting), :meth:`ChainSocket.recv` and
:meth:`ChainSocket.send` raise :class:`ChainClosed` saying why.

    sock = await open_chain("alice", {"fw1": key1}, "fw1@fw1.example:1091",
                            ("10.3.0.9", 5004))
    await control.send(f"send to {sock.server_sees}")      # step 510
    async for datagram in sock: ...                        # step 511
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Literal

from kakehashi.chain import messages as m
from kakehashi.chain.forward import Chain, ForwardConfig, build_chain
from kakehashi.chain.setup import SetupFailed
from kakehashi.chain.tables import Hop, parse_hop
from kakehashi.core.crypto import DatagramChannel

__all__ = ["ChainClosed", "ChainSocket", "SetupFailed", "open_chain"]


class ChainClosed(ConnectionError):
    """The chain ended; the message says why (as the first proxy told it)."""


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, owner: ChainSocket) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        self.owner._received(data, addr)


class ChainSocket:
    """Datagrams to and from the server through an established chain."""

    def __init__(self, chain: Chain, queue_size: int) -> None:
        self.chain = chain
        setup = chain.setup
        assert setup.first is not None and setup.last is not None
        self.first: m.Endpoint = setup.first  #: area 2141: where datagrams go (P2)
        self.server_sees: m.Endpoint = setup.last  #: area 2142: tell the server (P5)
        self.path = list(setup.path)
        self.max_payload = setup.max_payload
        self._channel = DatagramChannel(*setup.session_keys) if setup.session_keys else None
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(queue_size)
        self._transport: asyncio.DatagramTransport | None = None
        self.dropped = 0
        #: watches the control connection: the chain lives as long as it does
        self._watch: asyncio.Future[str] | None = None
        #: why the chain ended, once it has
        self.ended: str | None = None

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self), sock=self.chain.data_sock)
        self._watch = asyncio.ensure_future(self.chain.wait_closed())
        self._watch.add_done_callback(self._chain_ended)

    def _chain_ended(self, watch: asyncio.Future[str]) -> None:
        self.ended = "the chain socket was closed" if watch.cancelled() else watch.result()
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self.chain.close()

    def _received(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr[:2] != self.first.addr:
            self.dropped += 1
            return
        if self._channel is not None:
            opened = self._channel.open(data)
            if opened is None:
                self.dropped += 1
                return
            data = opened
        try:
            self._queue.put_nowait(data)
        except asyncio.QueueFull:  # a slow reader loses datagrams, it never grows memory
            self.dropped += 1

    def send(self, data: bytes) -> None:
        """Send one datagram to the server through the chain (:class:`ChainClosed` once
        it ended)."""
        if self._transport is None:
            raise ChainClosed(self.ended or "the chain is closed")
        if self._channel is not None:
            data = self._channel.seal(data)
        self._transport.sendto(data, self.first.addr)

    async def recv(self) -> bytes:
        """The next datagram from the server; :class:`ChainClosed` once the chain ended
        and every datagram that arrived before has been taken."""
        if not self._queue.empty():
            return self._queue.get_nowait()
        watch = self._watch
        if watch is None or watch.done():
            raise ChainClosed(self.ended or "the chain is closed")
        getter = asyncio.ensure_future(self._queue.get())
        try:
            await asyncio.wait((getter, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()
        if getter.done() and not getter.cancelled():
            return getter.result()
        raise ChainClosed(self.ended or "the chain is closed")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            yield await self.recv()

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()  # its callback closes the rest
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self.chain.close()

    async def __aenter__(self) -> ChainSocket:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


async def open_chain(user: str, keys: dict[str, bytes], first_hop: str | Hop,
                     server: tuple[str, int], *,
                     mode: Literal["recursive", "iterative"] = "recursive",
                     encrypt: bool = False, setup_timeout: float = 10.0,
                     queue_size: int = 1024) -> ChainSocket:
    """Build a chain to ``server`` (P6); SetupFailed names the hop that refused."""
    hop = parse_hop(first_hop) if isinstance(first_hop, str) else first_hop
    chain = await build_chain(ForwardConfig(user, keys, hop, server, ("127.0.0.1", 0),
                                            mode=mode, encrypt=encrypt,
                                            setup_timeout=setup_timeout))
    sock = ChainSocket(chain, queue_size)
    try:
        await sock._start()
    except BaseException:
        with contextlib.suppress(Exception):
            chain.data_sock.close()  # type: ignore[attr-defined]
        chain.close()
        raise
    return sock

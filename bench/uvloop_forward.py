"""The least a Python TCP forwarder can do: a reference for what Python costs per hop.

    python bench/uvloop_forward.py LISTEN_PORT TARGET_PORT

Accepts on 127.0.0.1:LISTEN_PORT, connects to 127.0.0.1:TARGET_PORT for each accepted
connection and copies bytes both ways with asyncio protocols on uvloop (no streams, no
tasks, no parsing, no logging, no limits). It is not a product path: the relay bench
chains three of them (``uvloop x3``) beside ``haproxy x3`` so that the setup rows show
how much of the relay's setup time any Python process on the path costs, before the
relay does any work of its own.
"""

from __future__ import annotations

import asyncio
import socket
import sys

LOOPBACK = "127.0.0.1"


class Upstream(asyncio.Protocol):
    """The connection to the target: copies what it reads to the accepted client."""

    def __init__(self, client: Downstream) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class Downstream(asyncio.Protocol):
    """An accepted client: bytes that arrive before the upstream is connected wait."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.upstream: Upstream | None = None
        self.pending: list[bytes] = []
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(
                lambda: Upstream(self), LOOPBACK, self.target)
        except OSError:
            self.transport.close()
            return
        self.upstream = upstream
        for data in self.pending:
            upstream.transport.write(data)  # type: ignore[union-attr]
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.transport.write(data)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


async def serve(port: int, target: int) -> None:
    server = await asyncio.get_running_loop().create_server(
        lambda: Downstream(target), LOOPBACK, port, backlog=512)
    print(f"forwarding {port} -> {target}", flush=True)
    await server.serve_forever()


def main() -> None:
    port, target = int(sys.argv[1]), int(sys.argv[2])
    try:
        import uvloop

        uvloop.run(serve(port, target))
    except ImportError:
        asyncio.run(serve(port, target))


if __name__ == "__main__":
    main()

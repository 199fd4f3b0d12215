"""Target servers for the benchmarks, run as their own process (uvloop).

    python bench/servers.py echo PORT        # echo every byte back (session setup time)
    python bench/servers.py sink PORT        # discard; on EOF reply the byte count (8 bytes)
    python bench/servers.py sha PORT         # on EOF reply the SHA-256 of what came (32 bytes)

The sink is the Python fallback for iperf3: the sender half-closes when done and
times until the count comes back, so bytes still in flight are not counted as sent.
Both exit by themselves after ``--max-seconds`` (a benchmark that died leaves no
server behind for long).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket

LOOPBACK = "127.0.0.1"


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool:
        return False  # close once our side is flushed


class Sink(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.count = 0

    def data_received(self, data: bytes) -> None:
        self.count += len(data)

    def eof_received(self) -> bool:
        self.transport.write(self.count.to_bytes(8, "big"))  # type: ignore[attr-defined]
        return False


class Sha(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        import hashlib

        self.transport = transport
        self.digest = hashlib.sha256()

    def data_received(self, data: bytes) -> None:
        self.digest.update(data)

    def eof_received(self) -> bool:
        self.transport.write(self.digest.digest())  # type: ignore[attr-defined]
        return False


async def serve(kind: str, port: int, max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    factory = {"echo": Echo, "sink": Sink, "sha": Sha}[kind]
    server = await loop.create_server(factory, LOOPBACK, port, backlog=1024,
                                      reuse_address=True)
    async with server:
        await asyncio.sleep(max_seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["echo", "sink", "sha"])
    ap.add_argument("port", type=int)
    ap.add_argument("--max-seconds", type=float, default=3600.0)
    args = ap.parse_args()
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        run(serve(args.kind, args.port, args.max_seconds))


if __name__ == "__main__":
    main()

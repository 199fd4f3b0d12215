"""A chain-aware stream: the server sends first (spec 004, Fig. 7, steps 501-511).

    python examples/chain_stream.py server 127.0.0.3:6000
    python examples/chain_stream.py client 127.0.0.3:6000 alice fw1@127.0.0.1:1091 KEY_B64

The server listens on a TCP control port; on each control connection it tells the
client its UDP data endpoint P6 (501/701), waits for the endpoint the chain shows it
(P5, 510/708) and then streams numbered datagrams there without waiting for the client
(a media source). The client opens the chain with kakehashi.chain.api, announces P5 and
counts what arrives.
"""

from __future__ import annotations

import asyncio
import socket
import sys

from kakehashi.chain.api import open_chain
from kakehashi.core.crypto import parse_shared_key

COUNT = 100


async def server(host: str, port: int) -> None:
    data = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    data.bind((host, 0))

    async def control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"{host} {data.getsockname()[1]}\n".encode())  # 701: P6
        await writer.drain()
        p5_host, p5_port = (await reader.readline()).decode().split()  # 708: P5
        for i in range(COUNT):  # the server sends first
            data.sendto(f"frame {i}".encode(), (p5_host, int(p5_port)))
            await asyncio.sleep(0.001)
        writer.close()

    srv = await asyncio.start_server(control, host, port)
    print(f"stream server on {host}:{port}", flush=True)
    async with srv:
        await srv.serve_forever()


async def client(host: str, port: int, user: str, first_hop: str, key: str) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    p6_host, p6_port = (await reader.readline()).decode().split()  # 501
    hop_name = first_hop.split("@", 1)[0]
    sock = await open_chain(user, {hop_name: parse_shared_key(key)}, first_hop,
                            (p6_host, int(p6_port)))
    writer.write(f"{sock.server_sees.host} {sock.server_sees.port}\n".encode())  # 510
    await writer.drain()
    got = 0
    try:
        while got < COUNT:
            await asyncio.wait_for(sock.recv(), 5)
            got += 1
    except TimeoutError:
        pass
    finally:
        sock.close()
        writer.close()
    print(f"{got}/{COUNT} frames through {' -> '.join(sock.path)}", flush=True)
    return 0 if got >= COUNT * 0.99 else 1


if __name__ == "__main__":
    role, addr = sys.argv[1], sys.argv[2]
    h, p = addr.rsplit(":", 1)
    if role == "server":
        asyncio.run(server(h, int(p)))
    else:
        sys.exit(asyncio.run(client(h, int(p), *sys.argv[3:6])))

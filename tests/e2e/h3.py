"""A minimal HTTP/3 server and client on aioquic, for requests through the chain.

    python -m tests.e2e.h3 server HOST PORT CERT KEY   # answers every GET with its path
    python -m tests.e2e.h3 get HOST PORT PATH          # prints the status and the body
"""

from __future__ import annotations

import asyncio
import ssl
import sys

from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent


class _Server(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.h3: H3Connection | None = None

    def quic_event_received(self, event: QuicEvent) -> None:
        if self.h3 is None:
            self.h3 = H3Connection(self._quic)
        for ev in self.h3.handle_event(event):
            if isinstance(ev, HeadersReceived):
                path = dict(ev.headers).get(b":path", b"/")
                body = b"HTTP/3 through the chain: " + path + b"\n" + b"x" * 20000
                self.h3.send_headers(ev.stream_id, [(b":status", b"200"),
                                                    (b"content-length", str(len(body)).encode())])
                self.h3.send_data(ev.stream_id, body, end_stream=True)
        self.transmit()


class _Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.done: asyncio.Future[tuple[bytes, bytes]] = asyncio.get_event_loop().create_future()
        self.status = b""
        self.body = b""

    def quic_event_received(self, event: QuicEvent) -> None:
        for ev in self.h3.handle_event(event):
            if isinstance(ev, HeadersReceived):
                self.status = dict(ev.headers).get(b":status", b"")
            elif isinstance(ev, DataReceived):
                self.body += ev.data
                if ev.stream_ended and not self.done.done():
                    self.done.set_result((self.status, self.body))

    async def get(self, authority: str, path: str) -> tuple[bytes, bytes]:
        sid = self._quic.get_next_available_stream_id()
        self.h3.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"https"),
                                   (b":authority", authority.encode()), (b":path", path.encode())],
                             end_stream=True)
        self.transmit()
        return await asyncio.wait_for(self.done, 20)


async def run_server(host: str, port: int, cert: str, key: str) -> None:
    cfg = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
    cfg.load_cert_chain(cert, key)
    await serve(host, port, configuration=cfg, create_protocol=_Server)
    print(f"h3 server ready on {host}:{port}", flush=True)
    await asyncio.Event().wait()


async def get(host: str, port: int, path: str) -> tuple[bytes, bytes]:
    cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
    cfg.verify_mode = ssl.CERT_NONE
    async with connect(host, port, configuration=cfg, create_protocol=_Client) as client:
        return await client.get(f"{host}:{port}", path)  # type: ignore[attr-defined]


if __name__ == "__main__":
    if sys.argv[1] == "server":
        asyncio.run(run_server(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]))
    else:
        status, body = asyncio.run(get(sys.argv[2], int(sys.argv[3]), sys.argv[4]))
        print(status.decode(), len(body), body.splitlines()[0].decode())

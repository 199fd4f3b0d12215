"""Moving HTTP message bodies between two connections, for any framing.

Shared by the gateway server and the client module. A Content-Length body without
a transformation goes through the core pump (``copy_length``, splice where both
sides are plain sockets); chunked bodies are validated piece by piece and re-framed;
a transformation (the gzip decoder, module 219) turns any framing into pieces that
are emitted chunked (HTTP/1.1) or raw (close-delimited). Nothing is buffered whole.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

from kakehashi.core.pump import copy_length, copy_until_eof
from kakehashi.core.stream import RECV_CHUNK, Conn, ConnClosed
from kakehashi.gateway import http


class Transform(Protocol):
    def decode(self, data: bytes) -> bytes: ...
    def finish(self) -> bytes: ...


async def pieces(src: Conn, framing: tuple, timeout: float,
                 error_status: int = 400) -> AsyncIterator[bytes]:
    """The body's payload as it arrives, whatever its framing.

    ``error_status``: 400 for a client's body, 502 for an upstream's.
    """
    kind = framing[0]
    if kind == "length":
        left = framing[1]
        while left:
            data = await asyncio.wait_for(src.recv(min(left, RECV_CHUNK)), timeout)
            if not data:
                raise ConnClosed(f"peer closed with {left} body bytes missing")
            left -= len(data)
            yield data
    elif kind == "chunked":
        chunks = http.ChunkedDecoder(error_status=error_status)
        while True:
            for event in chunks.events():
                if isinstance(event, bytes | bytearray | memoryview):
                    yield bytes(event)
                elif isinstance(event, http.End):
                    rest = chunks.unconsumed()
                    if rest:
                        src.unread(rest)  # a pipelined next message
                    return
            data = await asyncio.wait_for(src.recv(), timeout)
            if not data:
                raise ConnClosed("peer closed in the middle of a chunked body")
            chunks.feed(data)
    elif kind == "close":
        while data := await asyncio.wait_for(src.recv(), timeout):
            yield data


async def send(src: Conn, dst: Conn, framing: tuple, *, timeout: float,
               transform: Transform | None = None, chunk_out: bool | None = None,
               error_status: int = 400) -> int:
    """Move one body from ``src`` to ``dst``; returns the payload bytes sent.

    ``chunk_out`` (default: as the source was framed) chooses chunked output; a
    transformed body must be chunked or close-delimited since its length changes.
    """
    kind = framing[0]
    if kind == "none":
        return 0
    if chunk_out is None:
        chunk_out = kind == "chunked"
    if transform is None and kind == "length" and not chunk_out:
        return await copy_fixed(src, dst, framing[1], timeout)
    if transform is None and kind == "close" and not chunk_out:
        return await copy_until_eof(src, dst, idle=timeout)
    size = 0
    async for data in pieces(src, framing, timeout, error_status):
        if transform is not None:
            data = transform.decode(data)
        size += await _emit(dst, data, chunk_out, timeout)
    if transform is not None:
        size += await _emit(dst, transform.finish(), chunk_out, timeout)
    if chunk_out:
        await asyncio.wait_for(dst.send_all(http.LAST_CHUNK), timeout)
    return size


async def copy_fixed(src: Conn, dst: Conn, n: int, timeout: float) -> int:
    """A Content-Length body: bytes read along with the head first, then the pump."""
    total = n
    while n and src.has_pushback:
        data = await src.recv(min(n, RECV_CHUNK))
        await asyncio.wait_for(dst.send_all(data), timeout)
        n -= len(data)
    if n:  # every wait of the pump is bounded: a slow body is fine, a stalled one not
        await copy_length(src, dst, n, idle=timeout)
    return total


async def _emit(dst: Conn, data: bytes, chunk_out: bool, timeout: float) -> int:
    """Send one piece; a receiver that takes nothing for ``timeout`` ends the body."""
    if data:
        await asyncio.wait_for(dst.send_all(http.encode_chunk(data) if chunk_out else data),
                               timeout)
    return len(data)

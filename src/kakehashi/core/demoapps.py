"""Small applications the demos put behind each system, so that what a demo narrates
("the bytes arrived intact") is checked by the far side, not assumed."""

from __future__ import annotations

import hashlib

from kakehashi.core.stream import Conn


async def sha_service(conn: Conn) -> None:
    """Read to EOF, then answer ``"<size> <sha256 hex>\\n"`` and half-close."""
    digest, size = hashlib.sha256(), 0
    while data := await conn.recv():
        digest.update(data)
        size += len(data)
    await conn.send_all(f"{size} {digest.hexdigest()}\n".encode())
    await conn.shutdown_write()

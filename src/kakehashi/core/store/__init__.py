"""Persistence behind one interface.

Every system keeps its records as small JSON documents addressed by ``(kind, key)``:
the relay's users, later the gateway's proxy users, the switch's tables. SQLite is
the embedded default (no setup); Redis (``redis://HOST:PORT[/DB]``) is the backend for
several nodes sharing one state (:mod:`kakehashi.core.store.redis`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, Protocol

from kakehashi.core.store.redis import RedisStore, StoreUnavailable, is_redis_url, redacted
from kakehashi.core.store.sqlite import SQLiteStore

Doc = dict[str, Any]


class Store(Protocol):
    def get(self, kind: str, key: str) -> Doc | None: ...
    def put(self, kind: str, key: str, doc: Doc) -> None: ...
    def insert(self, kind: str, key: str, doc: Doc) -> bool: ...
    def delete(self, kind: str, key: str) -> bool: ...
    def list(self, kind: str) -> list[tuple[str, Doc]]: ...
    def write_many(self, ops: Iterable[tuple[str, str, Doc | None]]) -> None: ...
    def close(self) -> None: ...


def is_url(db: str | os.PathLike[str]) -> bool:
    """True when ``db`` names a store server (``redis://...``) rather than a file.

    For code that derives files from ``--db`` (a CA directory beside it): with a URL
    there is no "beside", and such files go to the state directory instead.
    """
    return is_redis_url(os.fspath(db))


def describe(db: str | os.PathLike[str]) -> str:
    """``db`` as it may appear in logs (a Redis URL without its password)."""
    db = os.fspath(db)
    return redacted(db) if is_redis_url(db) else db


def open_store(url: str | os.PathLike[str]) -> Store:
    """Open a store from a path or URL: a plain path or ``sqlite:///path`` (SQLite),
    ``redis://HOST:PORT[/DB]``, ``rediss://...`` (TLS) or ``unix:///path.sock`` (Redis).

    Raises :class:`StoreUnavailable` when a Redis server cannot be reached.
    """
    url = os.fspath(url)
    if is_redis_url(url):
        return RedisStore(url)
    if url.startswith("sqlite://"):
        url = url[len("sqlite://"):]
    if "://" in url:
        raise ValueError(f"unsupported store URL {url!r} (use a SQLite file path or "
                         "redis://HOST:PORT[/DB])")
    return SQLiteStore(url)


__all__ = ["Doc", "RedisStore", "SQLiteStore", "Store", "StoreUnavailable", "describe",
           "is_url", "open_store"]

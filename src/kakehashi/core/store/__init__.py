"""Persistence behind one interface.

Every system keeps its records as small JSON documents addressed by ``(kind, key)``:
the relay's users, later the gateway's proxy users, the switch's tables. SQLite is
the embedded default (no setup); a Redis backend can implement the same
:class:`Store` protocol for several nodes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, Protocol

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


def open_store(url: str | os.PathLike[str]) -> Store:
    """Open a store from a path or URL (``sqlite:///path`` or a plain path)."""
    url = os.fspath(url)
    if url.startswith("sqlite://"):
        url = url[len("sqlite://"):]
    if "://" in url:
        raise ValueError(f"unsupported store URL {url!r} (use a SQLite file path)")
    return SQLiteStore(url)


__all__ = ["Doc", "SQLiteStore", "Store", "open_store"]

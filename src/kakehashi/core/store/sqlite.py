"""SQLite implementation of the store interface (WAL, one table of JSON documents)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (
    kind    TEXT NOT NULL,
    key     TEXT NOT NULL,
    doc     TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (kind, key)
) WITHOUT ROWID;
"""
UPSERT = ("INSERT INTO docs(kind,key,doc,updated) VALUES(?,?,?,?) "
          "ON CONFLICT(kind,key) DO UPDATE SET doc=excluded.doc, updated=excluded.updated")
DELETE = "DELETE FROM docs WHERE kind=? AND key=?"


class SQLiteStore:
    """Thread-safe (one connection per thread) document store in one SQLite file.

    Several processes may share the file (the CLI edits users while the server runs);
    WAL mode lets readers proceed during a write.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._db().executescript(SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
            with self._lock:
                self._conns.append(db)
        return db

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        row = self._db().execute(
            "SELECT doc FROM docs WHERE kind=? AND key=?", (kind, key)
        ).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, kind: str, key: str, doc: dict[str, Any]) -> None:
        self._db().execute(UPSERT, (kind, key, json.dumps(doc, sort_keys=True), time.time()))

    def write_many(self, ops: Iterable[tuple[str, str, dict[str, Any] | None]]) -> None:
        """Put (a document) or delete (None) several documents in one transaction:
        one commit for a batch instead of one per document."""
        db = self._db()
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            for kind, key, doc in ops:
                if doc is None:
                    db.execute(DELETE, (kind, key))
                else:
                    db.execute(UPSERT, (kind, key, json.dumps(doc, sort_keys=True), now))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def insert(self, kind: str, key: str, doc: dict[str, Any]) -> bool:
        """Create only; False when the key already exists."""
        cur = self._db().execute(
            "INSERT OR IGNORE INTO docs(kind,key,doc,updated) VALUES(?,?,?,?)",
            (kind, key, json.dumps(doc, sort_keys=True), time.time()),
        )
        return cur.rowcount == 1

    def delete(self, kind: str, key: str) -> bool:
        cur = self._db().execute(DELETE, (kind, key))
        return cur.rowcount == 1

    def list(self, kind: str) -> list[tuple[str, dict[str, Any]]]:
        rows = self._db().execute(
            "SELECT key, doc FROM docs WHERE kind=? ORDER BY key", (kind,)
        ).fetchall()
        return [(k, json.loads(d)) for k, d in rows]

    def close(self) -> None:
        with self._lock:
            for db in self._conns:
                db.close()
            self._conns.clear()
        self._local = threading.local()

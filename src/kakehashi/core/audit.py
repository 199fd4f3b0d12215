"""Audit log: one JSON line per allow/deny decision, separate from operational logs.

Security reviews need a record of *decisions* (who was let in, who was refused and
why) that is easy to grep and to ship elsewhere; the operational log is for people
debugging. Without a file, decisions go to the operational log (stderr) at info
level; with one, they go to the file only (a busy gateway makes one decision per
client connection, and writing each twice cost about a fifth of a one-shot request).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger("kakehashi.audit")


class AuditLog:
    def __init__(self, path: str | Path | None = None, *, system: str = "") -> None:
        self.system = system
        self._fh: TextIO | None = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self.counts = {"allow": 0, "deny": 0}

    def record(self, event: str, allow: bool, **fields: Any) -> None:
        self.counts["allow" if allow else "deny"] += 1
        if self._fh is None and not log.isEnabledFor(logging.INFO):
            return
        entry = {"ts": round(time.time(), 3), "system": self.system, "event": event,
                 "decision": "allow" if allow else "deny", **fields}
        if self._fh is not None:
            self._fh.write(json.dumps(entry, default=str) + "\n")
        else:
            # the JSON log formatter takes ``audit`` as fields of its own line; a text
            # log shows the same JSON as the message (encoded only if shown)
            log.info("%s", _Line(entry), extra={"audit": entry})

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class _Line:
    """An audit entry that becomes its JSON text only when a text log formats it."""

    __slots__ = ("entry",)

    def __init__(self, entry: dict[str, Any]) -> None:
        self.entry = entry

    def __str__(self) -> str:
        return json.dumps(self.entry, default=str)

"""Audit log: one JSON line per allow/deny decision, separate from operational logs.

Security reviews need a record of *decisions* (who was let in, who was refused and
why) that is easy to grep and to ship elsewhere; the operational log is for people
debugging. Both may point at the same file descriptor (stderr) if no file is given.
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
        line = json.dumps(entry, default=str, sort_keys=False)
        if self._fh is not None:
            self._fh.write(line + "\n")
        log.info("%s", line)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

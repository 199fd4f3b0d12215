"""Audit log: one JSON line per allow/deny decision, separate from operational logs.

Security reviews need a record of *decisions* (who was let in, who was refused and
why) that is easy to grep and to ship elsewhere; the operational log is for people
debugging. Without a file, decisions go to the operational log (stderr) at info
level; with one, they go to the file only (a busy gateway makes one decision per
client connection, and writing each twice cost about a fifth of a one-shot request).

Every decision is also counted in the process's Prometheus registry
(:mod:`kakehashi.core.metrics`): ``kakehashi_decisions_total{system,event,decision}``
and, for a deny, ``kakehashi_refusals_total{system,reason}`` where the reason is the
event, followed by ``:CODE`` when the decision names a short code (``why``/``reason``
such as ``bad-password``, ``not-allowed``). Free-text reasons are left out of the
label, so its values stay a small fixed set.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger("kakehashi.audit")

#: a reason that may become a metric label: a short code, not free text
_CODE = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def code_label(value: object, limit: int = 32) -> str:
    """``value`` as a metric label when it is a short code (``bad-password``), else
    ``other``: labels that carry free text or peer input would grow without bound."""
    if isinstance(value, str) and len(value) <= limit and _LABEL.fullmatch(value):
        return value
    return "other"


_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]*")


class AuditLog:
    def __init__(self, path: str | Path | None = None, *, system: str = "") -> None:
        self.system = system
        self._fh: TextIO | None = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self.counts = {"allow": 0, "deny": 0}
        from kakehashi.core import metrics

        self._decisions = metrics.counter(
            "kakehashi_decisions", "Allow/deny decisions (the audit log's entries).",
            ["system", "event", "decision"])
        self._refusals = metrics.REFUSALS
        #: (event, allow, code) -> the counters to move (label lookups are not free)
        self._children: dict[tuple[str, bool, str], tuple[Any, Any]] = {}

    def _count(self, event: str, allow: bool, fields: dict[str, Any]) -> None:
        code = fields.get("why") or fields.get("reason") or ""
        if not isinstance(code, str) or not _CODE.fullmatch(code):
            code = ""
        key = (event, allow, code)
        found = self._children.get(key)
        if found is None:
            if len(self._children) > 512:  # a caller naming events from input: stop
                return
            decision = self._decisions.labels(self.system, event,
                                              "allow" if allow else "deny")
            refusal = None if allow else self._refusals.labels(
                self.system or "kakehashi", f"{event}:{code}" if code else event)
            found = self._children[key] = (decision, refusal)
        found[0].inc()
        if found[1] is not None:
            found[1].inc()

    def record(self, event: str, allow: bool, **fields: Any) -> None:
        self.counts["allow" if allow else "deny"] += 1
        self._count(event, allow, fields)
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

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

import asyncio
import logging
import re
import time
from pathlib import Path
from typing import Any, TextIO

from kakehashi.core import logs

log = logging.getLogger("kakehashi.audit")

#: seconds :meth:`AuditLog.record_soon` holds an entry: past a session's setup (its
#: first reply crosses the relay within a few milliseconds of the pairing)
SOON = 0.02

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
        #: entries :meth:`record_soon` holds, and the timer that writes them
        self._pending: list[dict[str, Any]] = []
        self._flusher: asyncio.TimerHandle | None = None

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
        """Count the decision and write its entry now (after any entry :meth:`record_soon`
        still holds, so the log keeps the order of the decisions)."""
        entry = self._entry(event, allow, fields)
        if self._pending:
            self.flush()
        if entry is not None:
            self._write(entry)

    def record_soon(self, event: str, allow: bool, **fields: Any) -> None:
        """Count the decision now and write its entry :data:`SOON` seconds later (or
        with the next :meth:`record` or :meth:`flush`, whichever comes first).

        For a decision taken in the middle of a latency-critical step: the relay's
        pairing, whose first reply is on its way through this very process. Writing
        the entry (JSON, a log record, a write) took 0.1-0.7 ms there, in the window
        in which the session's first bytes wait for this process (issue 12). The
        entry keeps the time of the decision and its place among the other entries;
        :meth:`flush` (the server's close) writes what is still held. Outside a
        running loop it is written at once.
        """
        entry = self._entry(event, allow, fields)
        if entry is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            self._write(entry)
            return
        self._pending.append(entry)
        if self._flusher is None:
            self._flusher = loop.call_later(SOON, self.flush)

    def flush(self) -> None:
        """Write the entries :meth:`record_soon` holds, in order."""
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        pending, self._pending = self._pending, []
        for entry in pending:
            self._write(entry)

    def _entry(self, event: str, allow: bool, fields: dict[str, Any]) -> dict[str, Any] | None:
        """Count the decision; its log entry, or None when nobody would see it."""
        self.counts["allow" if allow else "deny"] += 1
        self._count(event, allow, fields)
        if self._fh is None and not log.isEnabledFor(logging.INFO):
            return None
        return {"ts": round(time.time(), 3), "system": self.system, "event": event,
                "decision": "allow" if allow else "deny", **fields}

    def _write(self, entry: dict[str, Any]) -> None:
        if self._fh is not None:
            self._fh.write(logs.dumps_default_str(entry) + "\n")
        elif logs.audit_writer is not None and _direct(log):
            logs.audit_writer(entry)  # the same line, without the logging machinery
        else:
            # the JSON log formatter takes ``audit`` as fields of its own line; a text
            # log shows the same JSON as the message (encoded only if shown)
            log.info("%s", _Line(entry), extra={"audit": entry})

    def close(self) -> None:
        self.flush()
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _direct(logger: logging.Logger) -> bool:
    """Whether the only handler an audit record would reach is the one
    :func:`logs.setup_logging` installed (so its direct writer writes the same line)."""
    handlers: list[logging.Handler] = []
    node: logging.Logger | None = logger
    while node is not None:
        handlers += node.handlers
        if not node.propagate:
            break
        node = node.parent  # type: ignore[assignment]
    return len(handlers) == 1 and getattr(handlers[0], "kakehashi_audit_direct", False)


class _Line:
    """An audit entry that becomes its JSON text only when a text log formats it."""

    __slots__ = ("entry",)

    def __init__(self, entry: dict[str, Any]) -> None:
        self.entry = entry

    def __str__(self) -> str:
        return logs.dumps_default_str(self.entry)

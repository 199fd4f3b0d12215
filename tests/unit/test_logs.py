"""core/logs: the logging set-up every command shares, and the audit line's writer."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from kakehashi.core import logs
from kakehashi.core.audit import AuditLog


@pytest.fixture
def restored(monkeypatch):
    """setup_logging changes process-wide state: give it back after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    audit_level = logging.getLogger("kakehashi.audit").level
    monkeypatch.setattr(logs, "audit_writer", logs.audit_writer)
    monkeypatch.setattr(logging.Formatter, "converter", logging.Formatter.converter)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("kakehashi.audit").setLevel(audit_level)


def _stderr(monkeypatch) -> io.StringIO:
    """A stderr of the test's own (set in the test: pytest's capture replaces it when
    the test starts)."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


def _lines(fmt: str, direct: bool, monkeypatch) -> list[str]:
    monkeypatch.setattr(logs, "AUDIT_DIRECT", direct)
    stream = _stderr(monkeypatch)
    logs.setup_logging("info", fmt=fmt)
    assert (logs.audit_writer is not None) is direct
    audit = AuditLog(system="gateway")
    audit.record("target", True, client="127.0.0.1", user=None, target="h:1", n=3)
    audit.record("login", False, why="bad-password", addr="192.0.2.1")
    return stream.getvalue().splitlines()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_direct_audit_writer_writes_the_lines_logging_would(restored, fmt, monkeypatch):
    """The fast path (no logging machinery per line) and the slow one write the same
    bytes, apart from the time, for both formats."""
    direct = _lines(fmt, True, monkeypatch)
    slow = _lines(fmt, False, monkeypatch)
    assert len(direct) == len(slow) == 2, (direct, slow)
    if fmt == "json":
        strip = [{k: v for k, v in json.loads(x).items() if k != "ts"} for x in direct]
        assert strip == [{k: v for k, v in json.loads(x).items() if k != "ts"} for x in slow]
        assert strip[0]["event"] == "target" and strip[0]["logger"] == "kakehashi.audit"
    else:
        def split(line: str) -> tuple[str, dict]:
            head, _, body = line[8:].partition(": {")  # (past the time of day)
            return head, {k: v for k, v in json.loads("{" + body).items() if k != "ts"}

        assert [split(x) for x in direct] == [split(x) for x in slow]
        assert slow[0][8:].startswith(" INFO    kakehashi.audit: {")


def test_another_handler_gets_the_audit_records_through_logging(restored, monkeypatch):
    """A handler added after setup (a test's, an embedding application's) still sees
    every audit decision as a record: the direct writer is used only while the set-up
    handler is the one the records would reach."""
    monkeypatch.setattr(logs, "AUDIT_DIRECT", True)
    stream = _stderr(monkeypatch)
    logs.setup_logging("info", fmt="json")
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    keep = Keep()
    logging.getLogger("kakehashi").addHandler(keep)
    try:
        AuditLog(system="relay").record("login", True, user="alice")
    finally:
        logging.getLogger("kakehashi").removeHandler(keep)
    assert [r.audit["user"] for r in seen] == ["alice"]  # type: ignore[attr-defined]
    assert json.loads(stream.getvalue())["user"] == "alice"  # and its line as before


@pytest.mark.parametrize("entry", [
    {"ts": 1.5, "user": "alice", "peer": ("127.0.0.1", 5), "n": None, "ok": True},
    {"name": "東京\u2028\"quoted\"", "nan": float("nan"), "nested": {"a": [1, 2.0]}},
    {"error": ValueError("no"), "path": __import__("pathlib").PurePosixPath("a/b")},
])
def test_the_cached_encoder_writes_what_json_dumps_writes(entry: dict) -> None:
    """Audit lines keep their exact text (tests and log readers match it): the encoder
    made once is json.dumps(default=str) byte for byte."""
    assert logs.dumps_default_str(entry) == json.dumps(entry, default=str)

"""Audit decisions: one JSON object per decision, in the file or in the log, not both."""

from __future__ import annotations

import io
import json
import logging

import pytest

from kakehashi.core.audit import AuditLog
from kakehashi.core.logs import JSONFormatter


@pytest.fixture
def captured():
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    logger = logging.getLogger("kakehashi.audit")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield handler, buf
    logger.removeHandler(handler)
    logger.setLevel(old)


def test_without_a_file_a_json_log_line_carries_the_decision_as_fields(captured):
    handler, buf = captured
    handler.setFormatter(JSONFormatter())
    AuditLog(system="gateway").record("target", False, client="192.0.2.1", why="not allowed")
    line = json.loads(buf.getvalue())
    assert line["logger"] == "kakehashi.audit" and line["decision"] == "deny"
    assert line["client"] == "192.0.2.1" and line["why"] == "not allowed"
    assert "msg" not in line  # not a JSON string inside JSON


def test_a_text_log_shows_the_decision_as_json(captured):
    handler, buf = captured
    handler.setFormatter(logging.Formatter("%(message)s"))
    AuditLog(system="relay").record("login", True, user="pi")
    assert json.loads(buf.getvalue())["user"] == "pi"


def test_with_a_file_decisions_go_to_the_file_only(captured, tmp_path):
    _, buf = captured
    audit = AuditLog(tmp_path / "audit.jsonl", system="gateway")
    audit.record("target", True, client="192.0.2.1")
    audit.record("target", False, client="192.0.2.2")
    audit.close()
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [x["decision"] for x in lines] == ["allow", "deny"]
    assert buf.getvalue() == "" and audit.counts == {"allow": 1, "deny": 1}

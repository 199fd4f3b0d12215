"""Audit decisions: one JSON object per decision, in the file or in the log, not both."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Awaitable, Callable

import pytest

from kakehashi.core import audit as audit_module
from kakehashi.core.audit import AuditLog
from kakehashi.core.logs import JSONFormatter
from tests.support.wait import async_wait_until, loop_turns


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


async def test_an_entry_recorded_soon_is_held_past_the_step_and_keeps_its_place(
        tmp_path, monkeypatch):
    """The relay records a pairing in the middle of its setup (issue 12): the entry
    is counted at once but written a moment later, never out of order with the
    decisions recorded after it, and not lost when the log closes."""
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, system="relay")

    def events() -> list[str]:
        return [json.loads(x)["event"] for x in path.read_text().splitlines()]

    monkeypatch.setattr(audit_module, "SOON", 60.0)  # (a stalled loop does not matter)
    audit.record_soon("pair", True, conns=[1, 2])
    assert audit.counts == {"allow": 1, "deny": 0}
    await loop_turns(3)  # the rest of the step and the loop's next turns
    assert events() == []
    audit.record("login", False, why="bad-password")  # a later decision: written after it
    assert events() == ["pair", "login"]
    monkeypatch.setattr(audit_module, "SOON", 0.01)
    audit.record_soon("pair", True, conns=[3, 4])
    await async_wait_until(lambda: events() == ["pair", "login", "pair"],
                           what="the held entry written by its timer")
    audit.record_soon("pair", True, conns=[5, 6])
    audit.close()
    assert events() == ["pair", "login", "pair", "pair"]
    assert json.loads(path.read_text().splitlines()[-1])["conns"] == [5, 6]


def test_outside_a_loop_an_entry_recorded_soon_is_written_at_once(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl", system="relay")
    audit.record_soon("pair", True)
    assert json.loads((tmp_path / "audit.jsonl").read_text())["event"] == "pair"


async def test_a_relay_stopped_twice_still_writes_the_entries_it_holds(tmp_path, monkeypatch):
    """The relay's close writes what :meth:`AuditLog.record_soon` holds before it waits
    for anything: a second Ctrl-C (or SIGTERM) while its connections are still being
    shut down cancels the close there, and the entries were lost with it."""
    from kakehashi.relay.server import RelayServer

    path = tmp_path / "audit.jsonl"
    monkeypatch.setattr(audit_module, "SOON", 3600.0)
    server = RelayServer(None, port=0, audit=AuditLog(path, system="relay"))  # type: ignore[arg-type]
    await server.start()
    assert server.listener is not None
    shutting_down = asyncio.Event()
    real_close = server.listener.close

    async def slow_close() -> None:  # a connection whose shutdown takes its time
        shutting_down.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(server.listener, "close", slow_close)
    await _stop_twice(server.audit, server.close, shutting_down)
    assert [json.loads(x)["event"] for x in path.read_text().splitlines()] == ["pair"]
    await real_close()


async def _stop_twice(audit: AuditLog, close: Callable[[], Awaitable[None]],
                      waiting: asyncio.Event) -> None:
    """A pair entry held back (record_soon), then ``close`` cancelled where it waits
    (``waiting`` set): the second signal of a stop."""
    audit.record_soon("pair", True, conns=[1, 2])
    closing = asyncio.ensure_future(close())
    await async_wait_until(waiting.is_set, what="the close waiting")
    closing.cancel()  # the second signal
    with pytest.raises(asyncio.CancelledError):
        await closing


async def test_a_cluster_node_stopped_twice_still_writes_the_entries_it_holds(tmp_path,
                                                                             monkeypatch):
    """A cluster node's shutdown closes its cluster layer before the relay server: the
    layer's close writes the entries :meth:`AuditLog.record_soon` holds before it
    waits for anything (its tasks, Redis), since a second Ctrl-C (or SIGTERM) cancels
    the shutdown at that wait and the server's close, which writes them too, never
    runs."""
    from types import SimpleNamespace

    from kakehashi.relay.cluster import ClusterNode

    path = tmp_path / "audit.jsonl"
    monkeypatch.setattr(audit_module, "SOON", 3600.0)
    server = SimpleNamespace(core=SimpleNamespace(), audit=AuditLog(path, system="relay"))
    node = ClusterNode(server, "redis://127.0.0.1:1", "n1", "127.0.0.1:1", ttl=3.0)
    stopping = asyncio.Event()

    async def redis_command() -> None:  # one that holds the shutdown (cut by the cancel)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            stopping.set()
            await asyncio.Event().wait()

    held = node._spawn(redis_command())
    await loop_turns()
    await _stop_twice(server.audit, node.close, stopping)
    assert [json.loads(x)["event"] for x in path.read_text().splitlines()] == ["pair"]
    held.cancel()
    await node.redis.aclose()

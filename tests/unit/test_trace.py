"""The opt-in setup trace (KAKEHASHI_TRACE_SETUP, kakehashi.core.trace): the steps of a
session's setup are recorded with the shared monotonic clock, and nothing is recorded
when it is off."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kakehashi.core import trace, wire
from kakehashi.relay import messages as m


@pytest.fixture
def traced(tmp_path: Path):
    path = tmp_path / "trace.txt"
    assert trace.start(str(path))
    try:
        yield path
    finally:
        trace.stop()


def _events(path: Path) -> list[tuple[int, int, str]]:
    out = []
    for line in path.read_text().splitlines():
        ns, pid, what = line.split(" ", 2)
        out.append((int(ns), int(pid), what))
    return out


def test_control_messages_are_recorded_when_encoded_and_decoded(traced: Path) -> None:
    before = time.monotonic_ns()
    wire_bytes = m.RELAY_CODEC.encode(m.ConnectRequest(req=1, target="pi"))
    m.RELAY_CODEC.decode(wire_bytes[wire.HEADER_SIZE:])
    trace.event("custom step")
    events = _events(traced)
    assert [e[2] for e in events] == ["enc ConnectRequest", "dec ConnectRequest", "custom step"]
    assert all(e[1] == os.getpid() for e in events)
    times = [e[0] for e in events]
    assert times == sorted(times) and times[0] >= before  # the shared monotonic clock


def test_nothing_is_recorded_when_off(tmp_path: Path) -> None:
    path = tmp_path / "trace.txt"
    trace.start(str(path))
    trace.stop()
    assert not trace.enabled()
    m.RELAY_CODEC.encode(m.ConnectRequest(req=1, target="pi"))
    trace.event("step")
    assert path.read_text() == ""

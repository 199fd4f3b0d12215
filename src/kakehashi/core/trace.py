"""Opt-in timeline of a relay session's setup across processes (a debug facility).

Why: a setup crosses four processes (the client's ``relay connect``, the relay, the
agent, the service) and its cost is a chain of wake-ups; per-process profiles do not
show where the milliseconds sit between them. With ``KAKEHASHI_TRACE_SETUP=path`` set,
every process appends one line per event to *path*: ``<CLOCK_MONOTONIC ns> <pid>
<event>``. CLOCK_MONOTONIC is one clock for all processes on a machine, so the lines
of several processes merge into one timeline (``bench/setup_trace.py``).

Off (the default) an event costs one global load and a comparison. Events are
written with one ``os.write`` on an ``O_APPEND`` descriptor, so lines from several
processes do not interleave.
"""

from __future__ import annotations

import os
import time

#: the trace file's descriptor, or None when tracing is off
_fd: int | None = None


def start(path: str | None = None) -> bool:
    """Open the trace file (``KAKEHASHI_TRACE_SETUP`` when *path* is None); True when on."""
    global _fd
    path = path if path is not None else os.environ.get("KAKEHASHI_TRACE_SETUP")
    if _fd is not None:
        os.close(_fd)
        _fd = None
    if path:
        _fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    return _fd is not None


def stop() -> None:
    """Close the trace file: events are no-ops again."""
    start("")


def event(what: str) -> None:
    """Record *what* with the monotonic clock, when tracing is on."""
    if _fd is not None:
        os.write(_fd, f"{time.monotonic_ns()} {os.getpid()} {what}\n".encode())


def enabled() -> bool:
    """Whether events are being recorded (to skip building their text when off)."""
    return _fd is not None


start()

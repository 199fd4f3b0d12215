"""Waiting for what a test can observe, instead of sleeping and hoping.

A test that sleeps "long enough" either wastes time on a quiet machine or fails on a
busy one (two cores shared by several test runs). These helpers poll a condition the
test can see (a log line, a port, a counter, a file) until it holds or a generous
deadline passes, and then fail with a message that says what was awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 15.0, *, what: str = "",
               interval: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something truthy and return that.

    Raises AssertionError naming ``what`` (or the predicate) after ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not seen within {timeout}s: "
                                 f"{what or getattr(predicate, '__name__', predicate)}")
        time.sleep(interval)


async def async_wait_until(predicate: Callable[[], T], timeout: float = 10.0, *,
                           what: str = "") -> T:
    """:func:`wait_until` for coroutine tests: yields to the loop between polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not seen within {timeout}s: "
                                 f"{what or getattr(predicate, '__name__', predicate)}")
        await asyncio.sleep(0.005)


async def loop_turns(turns: int = 3) -> None:
    """Until the running loop has gone round ``turns`` times: a callback handed on
    with ``call_soon`` that many times has run. For a test that shows something does
    *not* happen in the current step nor on the loop's next turns (what ``call_soon``
    or a finished I/O wait would run), without sleeping for a time."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def hop(left: int) -> None:
        if left <= 0:
            if not done.done():
                done.set_result(None)
            return
        loop.call_soon(hop, left - 1)

    loop.call_soon(hop, turns - 1)
    await done


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    """Wait until something accepts TCP connections on ``host:port``."""
    def accepts() -> bool:
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
            return True
        return False

    wait_until(accepts, timeout, what=f"something listening on {host}:{port}")


def wait_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Read from ``sock`` until the peer closes it (EOF or reset) and return what came.

    Fails if the peer keeps the connection open past ``timeout``.
    """
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    chunks = []
    try:
        while data := sock.recv(65536):
            chunks.append(data)
            if time.monotonic() > deadline:
                raise AssertionError(f"still open after {timeout}s")
            sock.settimeout(max(0.01, deadline - time.monotonic()))
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        raise AssertionError(f"peer kept the connection open for {timeout}s") from None
    return b"".join(chunks)


def accept_queue(port: int) -> int | None:
    """Connections to the loopback listener on ``port`` that the kernel completed but
    the server has not accepted yet (its accept queue), from /proc/net/tcp; None when
    no listener is found. 0 means the server has taken every connection made so far."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                next(fh)
                for line in fh:
                    fields = line.split()
                    local, state, queues = fields[1], fields[3], fields[4]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        return int(queues.split(":")[1], 16)
        except OSError:
            continue
    return None


def wait_accepted(port: int, timeout: float = 15.0) -> None:
    """Wait until the server on ``port`` has accepted every connection made to it."""
    wait_until(lambda: accept_queue(port) == 0, timeout,
               what=f"the server on port {port} accepting its connections")


def wait_log(proc, log, text: str, timeout: float = 30.0) -> None:
    """Wait until ``text`` appears in the file ``log`` written by the process ``proc``
    (a ``subprocess.Popen``); fails at once with the log when the process exits first."""
    def seen() -> bool:
        assert proc.poll() is None, f"exited before {text!r}:\n{log.read_text()}"
        return text in log.read_text(errors="replace")

    wait_until(seen, timeout, what=f"{text!r} in {log.name}")

"""Run a command's main coroutine: uvloop when installed, clean Ctrl-C and SIGTERM.

On the first signal the main task is cancelled so every ``finally`` runs (logout,
listeners closed); the process exits 130 (SIGINT) or 0 (SIGTERM).

Inside :func:`collecting`, :func:`run` does not run its coroutine but hands it to the
collector: that is how ``kakehashi serve`` runs several commands' mains (each built by
its own command from its own options) in one loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sys
from collections.abc import Coroutine, Iterator
from typing import Any

_collector: list[Coroutine[Any, Any, int | None]] | None = None


@contextlib.contextmanager
def collecting() -> Iterator[list[Coroutine[Any, Any, int | None]]]:
    """While the block runs, :func:`run` appends its coroutine to the yielded list and
    returns 0 at once instead of running it."""
    global _collector
    previous, _collector = _collector, []
    try:
        yield _collector
    finally:
        _collector = previous


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # non-Linux or uvloop not installed
        return asyncio.new_event_loop()


def tune_gc() -> None:
    """Collect the young generation less often.

    A server holding tens of thousands of connections keeps hundreds of thousands
    of long-lived objects; with the default thresholds the collector walks them far
    more often than the few short-lived cycles a message creates justify. Reference
    counting still frees almost everything at once.
    """
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, 50_000), max(gen1, 20), max(gen2, 100))


def run(main: Coroutine[Any, Any, int | None]) -> int:
    if _collector is not None:
        _collector.append(main)
        return 0
    tune_gc()
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    task = loop.create_task(main)
    got: list[int] = []

    def stop(signum: int) -> None:
        got.append(signum)
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop, sig)
    try:
        result = loop.run_until_complete(task)
        return int(result or 0)
    except asyncio.CancelledError:
        if got:
            print("stopped.", file=sys.stderr)
            return 130 if got[0] == signal.SIGINT else 0
        raise
    finally:
        with contextlib.suppress(Exception):
            pending = asyncio.all_tasks(loop)
            for t in pending:
                t.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

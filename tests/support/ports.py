"""Test ports that no other test, and no outgoing connection, can take in the meantime.

The old way (bind port 0, read the number, close, hand it to a server) races: the
kernel hands the same ephemeral number to the next outgoing connection or to another
test before the server binds it. So:

* servers that can report the port they bound (``relay serve``, ``gateway serve``,
  ``relay connect`` and ``gateway forward`` log it) are started on port 0, and the
  framework reads the number from their log line (see ``tests.e2e.framework``);
* where a test needs the number first (a restart on the same port, iperf3, sshd,
  a port nothing listens on), :func:`free_port` hands out numbers from a range below
  the kernel's ephemeral range, so no outgoing connection can hold one, never the
  same number twice in one process, starting at a random place so that parallel
  test processes rarely meet; a spawn that still meets ``EADDRINUSE`` retries with a
  new number (:func:`tests.e2e.framework.Env.relay` and friends).
"""

from __future__ import annotations

import itertools
import os
import random
import socket
import threading
from pathlib import Path

_LOCK = threading.Lock()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_LOW = 20000
_HIGH = max(_LOW + 1000, min(_ephemeral_low(), 32768)) - 1
_SPAN = _HIGH - _LOW + 1
_START = random.Random(os.getpid() ^ int.from_bytes(os.urandom(4), "big")).randrange(_SPAN)
_COUNTER = itertools.count()


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback TCP port below the ephemeral range that this process has not handed
    out before and that nothing is bound to right now."""
    with _LOCK:
        for _ in range(_SPAN):
            port = _LOW + (_START + next(_COUNTER)) % _SPAN
            if _bindable(port):
                return port
    raise RuntimeError(f"no free port left in {_LOW}-{_HIGH}")

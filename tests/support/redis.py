"""A real ``redis-server`` for tests: loopback only, no persistence, its own port.

Every test that needs Redis gets its own server (``redis_url`` / ``redis_server`` in
``tests/conftest.py``): it starts in a few milliseconds, and a private server also
isolates pub/sub channels, which Redis does not scope by database number. A test that
restarts Redis (to see a cluster recover) calls :meth:`RedisServer.restart`, which
comes back on the same port.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.support.ports import free_port
from tests.support.wait import wait_until

REDIS_SERVER = shutil.which("redis-server")


def _ping(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5) as s:
        s.settimeout(2.0)
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith(b"+PONG")
    return False


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:port`` (no RDB, no AOF)."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log = self.workdir / f"redis-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, *, keep_port: bool = False) -> None:
        """Start (or start again) and wait until it answers PING; a port taken in the
        meantime is replaced by another unless ``keep_port``."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        for attempt in range(5):
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(
                    [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                     "--save", "", "--appendonly", "no", "--daemonize", "no",
                     "--dir", str(self.workdir), "--protected-mode", "yes",
                     "--loglevel", "warning"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

            def up() -> bool:
                if self.proc is not None and self.proc.poll() is not None:
                    return True  # exited: reported below
                return _ping(self.port)

            wait_until(up, 15.0, what=f"redis-server answering on port {self.port}")
            if self.proc.poll() is None:
                return
            text = self.log.read_text(errors="replace")
            if "Address already in use" not in text or attempt == 4:
                raise RuntimeError(f"redis-server exited:\n{text}")
            if keep_port:
                time.sleep(0.2)  # the old server's socket is going away
            else:  # someone took the port in the meantime
                self.port = free_port()
                self.log = self.workdir / f"redis-{self.port}.log"

    def stop(self, *, kill: bool = False) -> None:
        """Stop it (SIGKILL with ``kill``: an outage, not a shutdown)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, *, kill: bool = False) -> None:
        """Stop and start again on the same port, empty (nothing is persisted)."""
        self.stop(kill=kill)
        self.start(keep_port=True)

    def close(self) -> None:
        self.stop()

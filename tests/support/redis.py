"""A real ``redis-server`` for tests: loopback only, no persistence, its own port.

Every test that needs Redis gets its own server (``redis_url`` / ``redis_server`` in
``tests/conftest.py``): it starts in a few milliseconds, and a private server also
isolates pub/sub channels, which Redis does not scope by database number. A test that
restarts Redis (to see a cluster recover) calls :meth:`RedisServer.restart`, which
comes back on the same port.

:class:`RedisSentinelSet` is a master, a replica and one ``redis-server --sentinel``
watching them (quorum 1, a master down after ``down_after_ms``), for the
``redis+sentinel://`` URLs and a real failover.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
from pathlib import Path

from tests.support.ports import free_port
from tests.support.wait import wait_until

REDIS_SERVER = shutil.which("redis-server")


def _reusable(port: int) -> bool:
    """Whether redis-server (which sets SO_REUSEADDR) can bind ``port`` now."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ping(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5) as s:
        s.settimeout(2.0)
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))  # up (maybe with a password)
    return False


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:port`` (no RDB, no AOF)."""

    def __init__(self, workdir: Path, port: int | None = None, *,
                 extra_args: tuple[str, ...] = ()) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log = self.workdir / f"redis-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra_args = extra_args
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
                     "--loglevel", "warning", *self.extra_args],
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
                wait_until(lambda: _reusable(self.port), 10,  # the old server's socket
                           what=f"port {self.port} free again")  # is going away
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


def _info(port: int, section: str, password: str | None = None) -> dict[str, str]:
    """``INFO section`` of the server on ``port`` as a dict (empty when unreachable)."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
        s.settimeout(2.0)
        if password is not None:
            s.sendall(f"AUTH {password}\r\n".encode())
            if not s.recv(64).startswith(b"+OK"):
                return out
        s.sendall(f"INFO {section}\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            head, _, body = data.partition(b"\r\n")
            if head.startswith(b"$") and len(body) >= int(head[1:]):
                break
        for line in data.decode(errors="replace").splitlines()[1:]:
            key, sep, value = line.partition(":")
            if sep:
                out[key] = value.strip()
    return out


def _skip_ok(data: bytes, password: str | None) -> bytes:
    """The answer after the ``+OK`` of an ``AUTH`` sent before it (when one was)."""
    return data.split(b"\r\n", 1)[1] if password and data.startswith(b"+OK") else data


class RedisSentinel:
    """One ``redis-server --sentinel`` on loopback monitoring ``master`` as ``name``.

    Its config file is generated (a sentinel rewrites it, so it lives in ``workdir``).
    """

    def __init__(self, workdir: Path, master_port: int, *, name: str = "kk",
                 down_after_ms: int = 1000, failover_timeout_ms: int = 3000,
                 auth_pass: str | None = None, password: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        for attempt in range(5):
            self.port = free_port()
            conf = self.workdir / f"sentinel-{self.port}.conf"
            conf.write_text(
                f"port {self.port}\nbind 127.0.0.1\ndaemonize no\n"
                f"dir {self.workdir}\nloglevel notice\n"
                f"sentinel monitor {name} 127.0.0.1 {master_port} 1\n"
                f"sentinel down-after-milliseconds {name} {down_after_ms}\n"
                f"sentinel failover-timeout {name} {failover_timeout_ms}\n"
                f"sentinel parallel-syncs {name} 1\n"
                + (f"sentinel auth-pass {name} {auth_pass}\n" if auth_pass else "")
                + (f"requirepass {password}\n" if password else ""))
            self.password = password
            self.log = self.workdir / f"sentinel-{self.port}.log"
            with open(self.log, "ab") as log:
                assert REDIS_SERVER is not None
                self.proc = subprocess.Popen(
                    [REDIS_SERVER, str(conf), "--sentinel"], stdout=log,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

            def up() -> bool:
                return self.proc is None or self.proc.poll() is not None or _ping(self.port)

            wait_until(up, 15.0, what=f"redis sentinel answering on port {self.port}")
            if self.proc.poll() is None:
                return
            text = self.log.read_text(errors="replace")
            if "Address already in use" not in text or attempt == 4:
                raise RuntimeError(f"redis sentinel exited:\n{text}")

    def master_port(self) -> int | None:
        """The port of the master this sentinel names now (None when it has none)."""
        with contextlib.suppress(OSError), \
                socket.create_connection(("127.0.0.1", self.port), 1) as s:
            s.settimeout(2.0)
            s.sendall(self._auth() + f"SENTINEL get-master-addr-by-name {self.name}\r\n"
                      .encode())
            data = _skip_ok(s.recv(4096), self.password).decode(errors="replace") \
                .split("\r\n")
            if data[0] == "*2":
                return int(data[4])
        return None

    def _auth(self) -> bytes:
        return f"AUTH {self.password}\r\n".encode() if self.password else b""

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class RedisSentinelSet:
    """A master, a replica of it and a sentinel watching both, all on loopback.

    ``url`` is the ``redis+sentinel://`` URL of the set; :meth:`kill_master` and
    :meth:`wait_failover` make and observe a real failover.
    """

    def __init__(self, workdir: Path, *, name: str = "kk", down_after_ms: int = 1000,
                 password: str | None = None, sentinel_password: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.password = password
        # no wait before the full sync (the default waits 5 s for more replicas)
        fast_sync: tuple[str, ...] = ("--repl-diskless-sync-delay", "0")
        if password:
            fast_sync += ("--requirepass", password, "--masterauth", password)
        self.master = RedisServer(self.workdir / "master", extra_args=fast_sync)
        self.replica = RedisServer(
            self.workdir / "replica",
            extra_args=(*fast_sync, "--replicaof", "127.0.0.1", str(self.master.port)))
        wait_until(lambda: _info(self.replica.port, "replication", password)
                   .get("master_link_status") == "up", 15.0,
                   what="the replica in sync with the master")
        self.sentinel = RedisSentinel(self.workdir / "sentinel", self.master.port, name=name,
                                      down_after_ms=down_after_ms, auth_pass=password,
                                      password=sentinel_password)
        # the sentinel learns of the replica from the master's INFO (every 10 s at
        # first, at once after it connects): a failover needs it known
        wait_until(self._replica_known, 30.0, what="the sentinel knowing the replica")

    def _replica_known(self) -> bool:
        with contextlib.suppress(OSError), \
                socket.create_connection(("127.0.0.1", self.sentinel.port), 1) as s:
            s.settimeout(2.0)
            s.sendall(self.sentinel._auth()
                      + f"SENTINEL replicas {self.sentinel.name}\r\n".encode())
            return str(self.replica.port).encode() in s.recv(65536)
        return False

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{self.sentinel.name}"

    def wait_replicated(self, timeout: float = 20.0) -> None:
        """Until the replica has applied every write the master has taken (its
        replication offset has reached the master's)."""
        def caught_up() -> bool:
            done = _info(self.master.port, "replication", self.password) \
                .get("master_repl_offset")
            got = _info(self.replica.port, "replication", self.password) \
                .get("slave_repl_offset")
            return done is not None and got is not None and int(got) >= int(done)

        wait_until(caught_up, timeout, what="the replica catching up with the master")

    def kill_master(self) -> None:
        """SIGKILL the master (an outage: the sentinel promotes the replica)."""
        self.master.stop(kill=True)

    def wait_failover(self, timeout: float = 60.0) -> None:
        """Until the sentinel names the replica as master and it answers as one."""
        wait_until(lambda: self.sentinel.master_port() == self.replica.port
                   and _info(self.replica.port, "replication", self.password)
                   .get("role") == "master",
                   timeout, what="the sentinel promoting the replica")

    def close(self) -> None:
        self.sentinel.close()
        self.replica.close()
        self.master.close()

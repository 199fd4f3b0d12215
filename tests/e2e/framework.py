"""End-to-end test framework: real ``kakehashi`` processes started through the CLI.

Like frp's ``test/e2e``: the framework spawns processes, allocates ports, runs mock
servers, and cleans up; the cases themselves stay a few lines long.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.listener import stop_listener
from tests.support.ports import free_port
from tests.support.wait import wait_port, wait_until

PASSWORD = {"pi": "pi-secret", "laptop": "laptop-secret", "alice": "alice-secret",
            "bob": "bob-secret", "carol": "carol-secret"}


__all__ = ["free_port", "wait_port", "wait_until"]  # re-exported for the test modules

_LISTENING = re.compile(r"(?:listening on|forwarding|tunnel) (?:http://)?"
                        r"(?:\[[^\]\s]*\]|[0-9a-fA-F]*:[0-9a-fA-F:]*|[^\s:]+):(\d+)")
"""The line a server or forwarder logs once it has bound: the port it got (after an IPv4
address, a name, ``[v6]`` or a bare IPv6 address such as ``::1``)."""

_IN_USE = re.compile(r"[Aa]ddress already in use|Cannot bind any address")


@dataclass
class Proc:
    """A spawned kakehashi (or other) process with its combined output in a file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    _read: bytearray = field(default_factory=bytearray, repr=False)

    def output(self) -> str:
        """All the process wrote so far. Only what was appended since the last call is
        read from the file: :meth:`wait_for` asks every 10 ms, and a chatty process's
        log grows large."""
        with open(self.log, "rb") as fh:
            if os.fstat(fh.fileno()).st_size < len(self._read):  # rewritten: start over
                self._read.clear()
            fh.seek(len(self._read))
            self._read += fh.read()
        return self._read.decode(errors="replace")

    def wait_for(self, text: str | re.Pattern[str], timeout: float = 15.0) -> str:
        """Wait until the output holds ``text`` (a string or a pattern); return the
        matched text. Fails at once if the process exits first."""
        def seen() -> str | None:
            out = self.output()
            if isinstance(text, re.Pattern):
                match = text.search(out)
                found = match.group(0) if match else None
            else:
                found = text if text in out else None
            if found is None and self.popen.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited ({self.popen.returncode}) before {text!r}:\n"
                    + self.output()[-3000:])
            return found

        try:
            return wait_until(seen, timeout, what=f"{self.name}: {text!r}", interval=0.01)
        except AssertionError as exc:
            if "not seen within" not in str(exc):
                raise
            raise AssertionError(f"{self.name}: {text!r} not seen in {timeout}s:\n"
                                 + self.output()[-3000:]) from None

    def bound_port(self, timeout: float = 15.0) -> int:
        """The port a server started on port 0 logged that it bound."""
        match = _LISTENING.search(self.wait_for(_LISTENING, timeout))
        assert match is not None
        return int(match.group(1))

    def stop(self, sig: int = signal.SIGINT, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def kill9(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class Env:
    """A private kakehashi home (dev CA, database) and the processes of one test."""

    root: Path
    procs: list[Proc] = field(default_factory=list)
    keepalive: float = 1.0

    def __post_init__(self) -> None:
        self.home = self.root / "home"
        self.db = str(self.root / "relay.db")
        self.env = {**os.environ, "KAKEHASHI_HOME": str(self.home), "PYTHONUNBUFFERED": "1",
                    "KAKEHASHI_LOG": os.environ.get("KH_TEST_LOG", "info")}
        self.env.pop("KAKEHASHI_PASSWORD", None)

    # -- running the CLI ----------------------------------------------------------
    def cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "kakehashi", "--log-format", "text", *args]

    def run(self, *args: str, input: bytes | None = None, env: dict | None = None,
            timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        res = subprocess.run(self.cmd(*args), input=input, capture_output=True,
                             env={**self.env, **(env or {})}, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"kakehashi {' '.join(args)} -> {res.returncode}\n"
                                 f"{res.stderr.decode(errors='replace')}")
        return res

    def spawn(self, name: str, *args: str, env: dict | None = None, raw: bool = False,
              stdin=subprocess.DEVNULL) -> Proc:
        log = self.root / f"{name}-{len(self.procs)}.log"
        fh = open(log, "wb")  # noqa: SIM115
        argv = list(args) if raw else self.cmd(*args)
        popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=stdin,
                                 env={**self.env, **(env or {})})
        fh.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def spawn_on_port(self, name: str, argv: Callable[[int], list[str]], ready: str, *,
                      raw: bool = True, attempts: int = 5) -> tuple[Proc, int]:
        """Start a server that must be told its port (sshd, iperf3): on a port from
        :func:`free_port`, waiting for its ``ready`` log line; when the port was taken
        in the meantime (EADDRINUSE), try again on another one."""
        for _ in range(attempts):
            port = free_port()
            proc = self.spawn(name, *argv(port), raw=raw)
            try:
                proc.wait_for(ready)
                return proc, port
            except AssertionError:
                if proc.alive or not _IN_USE.search(proc.output()):
                    raise
        raise AssertionError(f"{name}: no free port in {attempts} attempts")

    def close(self, timeout: float = 5.0) -> None:
        """Stop the test's processes: SIGINT to all of them first, then wait for them
        together (each still gets ``timeout`` s from its signal before SIGKILL), so a
        teardown lasts as long as the slowest shutdown, not the sum of them all."""
        alive = [proc for proc in reversed(self.procs) if proc.alive]
        for proc in alive:
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGINT)
        deadline = time.monotonic() + timeout
        for proc in alive:
            try:
                proc.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill9()

    # -- relay building blocks ----------------------------------------------------
    def add_user(self, name: str, *attrs: str) -> None:
        self.run("relay", "user", "add", name, "--db", self.db, "--password-stdin",
                 "--kdf-n", "1024", *attrs, input=(PASSWORD[name] + "\n").encode())

    def relay(self, *extra: str, port: int | None = None, tls: bool = True,
              keepalive: float | None = None) -> tuple[Proc, int]:
        """``relay serve`` on ``port``, or on a port of its own choosing (port 0, read
        back from its log line) when none is given."""
        proc = self.spawn("relay", "relay", "serve", "--listen", f"127.0.0.1:{port or 0}",
                          "--db", self.db, "--tls", "on" if tls else "off",
                          "--keepalive", str(keepalive or self.keepalive),
                          "--audit-log", str(self.root / "audit.jsonl"), *extra)
        return proc, proc.bound_port()

    def client_args(self, user: str, port: int, tls: bool = True) -> list[str]:
        return ["--server", f"127.0.0.1:{port}", "--user", user,
                "--tls", "on" if tls else "off"]

    def user_env(self, user: str) -> dict[str, str]:
        return {"KAKEHASHI_PASSWORD": PASSWORD[user]}

    def agent(self, user: str, port: int, *expose: str, tls: bool = True,
              extra: tuple[str, ...] = (), wait: bool = True,
              env: dict[str, str] | None = None) -> Proc:
        args = ["relay", "agent", *self.client_args(user, port, tls)]
        for item in expose:
            args += ["--expose", item]
        proc = self.spawn(f"agent-{user}", *args, *extra, env={**self.user_env(user),
                                                                **(env or {})})
        if wait:
            proc.wait_for(f"agent {user} online")
        return proc

    def forward(self, user: str, port: int, target: str, *extra: str,
                tls: bool = True) -> tuple[Proc, int]:
        proc = self.spawn(f"connect-{user}", "relay", "connect",
                          *self.client_args(user, port, tls), target,
                          "--listen", "127.0.0.1:0", *extra, env=self.user_env(user))
        return proc, proc.bound_port()

    def pipe(self, user: str, port: int, target: str, data: bytes, *extra: str,
             tls: bool = True, timeout: float = 60.0, check: bool = True,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        return self.run("relay", "pipe", *self.client_args(user, port, tls), target, *extra,
                        input=data, env={**self.user_env(user), **(env or {})},
                        timeout=timeout, check=check)

    def audit(self) -> list[dict]:
        import json

        path = self.root / "audit.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def pairs(self, at_least: int = 1, timeout: float = 15.0) -> list[dict]:
        """The relay's pair entries, once at least ``at_least`` are written: a
        pairing's entry is written just past the session's setup (``AuditLog.record_soon``),
        so a session that has carried bytes may not be in the file yet. ``at_least=0``
        reads the file as it is (for "no pairing at all", after what would have paired)."""
        from tests.support.wait import wait_until

        def found() -> list[dict]:
            return [a for a in self.audit() if a["event"] == "pair"]

        def enough() -> list[dict] | None:
            pairs = found()
            return pairs if len(pairs) >= at_least else None

        if at_least <= 0:
            return found()
        return wait_until(enough, timeout, what=f"{at_least} pair entries in the audit log")


# -- mock servers -------------------------------------------------------------------
class EchoServer:
    """A threaded TCP echo server (the "application" behind an agent)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(1 << 18):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop = True
        stop_listener(self.sock, self._thread)


def stream_through(port: int, total: int, *, chunk: int = 1 << 20,
                   timeout: float = 120.0) -> tuple[str, str, int]:
    """Send ``total`` random bytes to an echo path; return (sent sha, received sha, n)."""
    sent_hash, recv_hash = hashlib.sha256(), hashlib.sha256()
    received = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        def reader() -> None:
            nonlocal received
            # a session cut short (reset) ends the read: ``received`` says how far it got
            with contextlib.suppress(OSError):
                while data := sock.recv(1 << 20):
                    recv_hash.update(data)
                    received += len(data)

        th = threading.Thread(target=reader, daemon=True)
        th.start()
        block = os.urandom(chunk)
        left = total
        i = 0
        while left:
            piece = block[: min(chunk, left)]
            # vary the content so a misordered or repeated block changes the digest
            piece = i.to_bytes(8, "big") + piece[8:] if len(piece) > 8 else piece
            sock.sendall(piece)
            sent_hash.update(piece)
            left -= len(piece)
            i += 1
        sock.shutdown(socket.SHUT_WR)
        th.join(timeout)
    return sent_hash.hexdigest(), recv_hash.hexdigest(), received


@contextlib.contextmanager
def echo_server() -> Iterator[EchoServer]:
    srv = EchoServer()
    try:
        yield srv
    finally:
        srv.close()


def roundtrip(port: int, payload: bytes, timeout: float = 15.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


# -- gateway building blocks (spec 001: the aggregation port) ---------------------------
def _env_gateway(self: Env, *allow: str, extra: tuple[str, ...] | list[str] = (),
                 port: int | None = None, name: str = "gateway",
                 env: dict | None = None) -> tuple[Proc, int]:
    """``kakehashi gateway serve`` on a free loopback port, allowing ``allow``; its
    audit log is ``audit.jsonl`` (read with ``env.audit()``), its access log
    ``access.jsonl`` (``env.access()``)."""
    args = ["gateway", "serve", "--listen", f"127.0.0.1:{port or 0}", "--db", self.db,
            "--audit-log", str(self.root / "audit.jsonl"),
            "--access-log", str(self.root / "access.jsonl")]
    for item in allow:
        args += ["--allow-target", item]
    lane = getattr(self, "gateway_fast_lane", None)  # set per test by gateway_fixtures
    if lane is not None and "--fast-lane" not in extra:
        args += ["--fast-lane", lane]
    proc = self.spawn(name, *args, *extra, env=env)
    return proc, proc.bound_port()


def _env_access(self: Env, until=bool, timeout: float = 5.0) -> list[dict]:
    """The gateway's access log: one dict per request. A request is logged when it
    ends (a tunnel when both sides have closed), which can be a moment after the
    client is done, so wait up to ``timeout`` for ``until(entries)`` to hold."""
    import json

    path = self.root / "access.jsonl"

    def entries() -> list[dict]:
        text = path.read_text() if path.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

    with contextlib.suppress(AssertionError):
        wait_until(lambda: until(entries()), timeout, interval=0.05)
    return entries()


def _env_add_proxy_user(self: Env, name: str, password: str) -> None:
    self.run("gateway", "user", "add", name, "--db", self.db, "--password-stdin",
             "--kdf-n", "1024", input=(password + "\n").encode())


Env.gateway = _env_gateway  # type: ignore[attr-defined]
Env.access = _env_access  # type: ignore[attr-defined]
Env.add_proxy_user = _env_add_proxy_user  # type: ignore[attr-defined]

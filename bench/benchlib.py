"""Small helpers shared by the benchmark scripts: processes, ports, /proc, statistics.

Everything a benchmark starts goes through :class:`Procs`, which stops it again
(SIGTERM, then SIGKILL; also the children it forked) when the benchmark ends, fails
or is interrupted.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# -- ports ---------------------------------------------------------------------------
def free_port() -> int:
    """A port the kernel just considered free on loopback (others may run benchmarks too)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def listening_ports() -> set[int]:
    """TCP ports in LISTEN state (from /proc, so waiting never connects to a server)."""
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            next(fh)
            for line in fh:
                fields = line.split()
                if fields[3] == "0A":
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def wait_listening(port: int, timeout: float = 15.0, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port in listening_ports():
            return
        if proc is not None and not proc.alive:
            raise RuntimeError(f"{proc.name} exited before listening on {port}:\n"
                               + proc.output()[-2000:])
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


# -- processes -----------------------------------------------------------------------
def raise_nofile(wanted: int) -> int:
    """Raise RLIMIT_NOFILE to ``wanted`` if allowed (root may raise the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if not self.alive:
                raise RuntimeError(f"{self.name} exited ({self.popen.returncode}) before "
                                   f"{text!r}:\n{self.output()[-2000:]}")
            time.sleep(0.02)
        raise TimeoutError(f"{self.name}: {text!r} not seen in {timeout}s:\n"
                           + self.output()[-2000:])


class Procs:
    """The processes of one benchmark step; ``with Procs(dir) as procs: ...`` stops them all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def spawn(self, name: str, argv: list[str], *, env: dict[str, str] | None = None,
              nofile: int | None = None, stdin=subprocess.DEVNULL) -> Proc:
        log = self.workdir / f"{name}-{len(self.procs)}.log"
        preexec = (lambda: raise_nofile(nofile)) if nofile else None
        with open(log, "wb") as fh:
            popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=stdin,
                                     env={**os.environ, **(env or {})},
                                     start_new_session=True, preexec_fn=preexec)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 5.0) -> None:
        """SIGTERM the process, its process group and its descendants; SIGKILL if needed."""
        victims = [proc.pid, *descendants(proc.pid)] if proc.alive else []
        for pid in victims:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        for pid in victims:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (socat and sshd fork per connection)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def install_signal_exit() -> None:
    """Make SIGTERM/SIGHUP unwind like Ctrl-C, so every ``finally`` stops its processes."""
    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


# -- /proc accounting ----------------------------------------------------------------
def cpu_seconds(pid: int, *, children: bool = True) -> float:
    """utime+stime (and reaped children's) of one process, in seconds; 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def tree_cpu_seconds(pids: list[int]) -> float:
    """CPU seconds of processes and all their live descendants."""
    seen = {p for pid in pids for p in (pid, *descendants(pid))}
    return sum(cpu_seconds(p) for p in seen)


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


# -- statistics and output -----------------------------------------------------------
def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def ratio(value: float | None, base: float | None) -> str:
    if not value or not base:
        return "-"
    return f"{value / base:.2f}x"


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (readable in a terminal, pasteable into docs)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def say(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def machine() -> str:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")),
                     "")
    return (f"{os.cpu_count()} CPU {model}, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def source_version() -> str:
    """The last commit that changed src/ (+ "modified" if tracked files in src/ changed):
    commits to tests or docs during a run do not change what is measured."""
    import kakehashi

    repo = Path(__file__).resolve().parent.parent
    if not Path(kakehashi.__file__).resolve().is_relative_to((repo / "src").resolve()):
        return "imported from outside this checkout"
    try:
        head = subprocess.run(["git", "-C", str(repo), "log", "-1", "--format=%h", "--",
                               "src"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain",
                                "--untracked-files=no", "src"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + modified src" if dirty else "")


def select_rows(groups: dict[str, list[str]], only: list[str] | None,
                baselines: dict[str, list[str]]) -> dict[str, list[str]]:
    """Rows to run per group from ``--only`` (GROUP, GROUP:ROW or ROW); a chosen group's
    baselines always come along so its ratios can be computed."""
    if not only:
        return {g: list(rows) for g, rows in groups.items()}
    chosen: dict[str, list[str]] = {}
    for name in only:
        group, _, row = name.partition(":")
        if group in groups and not row:
            chosen[group] = list(groups[group])
            continue
        if not row:
            group, row = "", name
        hits = [g for g, rows in groups.items() if (not group or g == group) and row in rows]
        if not hits:
            raise SystemExit(f"unknown benchmark {name!r} (see --list)")
        for g in hits:
            chosen.setdefault(g, [])
            if row not in chosen[g]:
                chosen[g].append(row)
    return {g: [r for r in groups[g] if r in rows or r in baselines.get(g, [])]
            for g, rows in chosen.items()}

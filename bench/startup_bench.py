"""Start-up time of the ``kakehashi`` command, beside a bare ``python3 -c pass``.

Every e2e test starts real ``kakehashi`` processes, and people run ``--help`` and
short commands by hand, so the time from ``exec`` to a usable process matters. Two
kinds of rows:

* ``help``: ``python3 -m kakehashi [SYSTEM CMD] --help`` to exit (the import cost of
  the command line itself);
* ``listen``: a server (``relay serve``, ``gateway serve``, ``chain proxy``, ``switch
  server``, ``ondemand manager``) on loopback port 0 until it logs the line saying it
  listens, then SIGINT until it has exited.

Each source tree given with ``--src`` (default: this checkout's ``src``) is measured in
the same rounds, interleaved, so a change in the machine's load hits all alike; the
table gives the median wall time and the median CPU time (user + system, from
``wait4``) per row and tree, and the ratio to the first tree. ``--pyc`` says whether the
processes may cache bytecode: ``off`` is how the test suite runs when the environment
sets ``PYTHONDONTWRITEBYTECODE`` (every module compiled from source at every start),
``on`` caches it in a private ``PYTHONPYCACHEPREFIX`` (warmed before measuring), as an
installed package would have it.

    python3 bench/startup_bench.py --rounds 7
    python3 bench/startup_bench.py --src /tmp/old/src --src src --pyc on
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import machine, table

HELP_ROWS: dict[str, list[str]] = {
    "python -c pass": [],
    "kakehashi --help": ["--help"],
    "relay --help": ["relay", "--help"],
    "relay serve --help": ["relay", "serve", "--help"],
    "gateway serve --help": ["gateway", "serve", "--help"],
    "chain proxy --help": ["chain", "proxy", "--help"],
    "switch server --help": ["switch", "server", "--help"],
    "ondemand manager --help": ["ondemand", "manager", "--help"],
}

LISTEN_ROWS: dict[str, list[str]] = {
    "relay serve (TLS)": ["relay", "serve", "--listen", "127.0.0.1:0", "--tls", "on"],
    "gateway serve": ["gateway", "serve", "--listen", "127.0.0.1:0", "--tls", "auto",
                      "--allow-target", "127.0.0.1"],
    "chain proxy": ["chain", "proxy", "--name", "fw1", "--listen", "127.0.0.1:0",
                    "--udp-ports", "45000-45099"],
    "switch server": ["switch", "server", "--listen", "127.0.0.1:0", "--tls", "off"],
    "ondemand manager": ["ondemand", "manager", "--listen", "127.0.0.1:0", "--tls", "off"],
}

_LISTENING = re.compile(rb"listening on (?:http://)?[^\s:]+:\d+")


def _env(src: str, home: Path, pyc: Path | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": src, "KAKEHASHI_HOME": str(home),
           "PYTHONUNBUFFERED": "1"}
    if pyc is None:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    else:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pyc)
    return env


def _cpu(rusage: object) -> float:
    return rusage.ru_utime + rusage.ru_stime  # type: ignore[attr-defined]


def run_help(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall, cpu) seconds of one ``--help`` (or ``-c pass``) process."""
    argv = [sys.executable, "-c", "pass"] if not args else [sys.executable, "-m", "kakehashi",
                                                             *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _, status, rusage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} exited {proc.returncode}")
    return wall, _cpu(rusage)


def run_listen(args: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """(seconds to the listening line, seconds from SIGINT to exit, cpu seconds)."""
    argv = [sys.executable, "-m", "kakehashi", "--log-format", "text", *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    seen = b""
    try:
        while not _LISTENING.search(seen):
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{argv} exited before listening:\n{seen.decode()}")
            seen += line
        ready = time.perf_counter() - t0
        t1 = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        proc.stdout.read()
        _, _, rusage = os.wait4(proc.pid, 0)
        proc.returncode = 0
        return ready, time.perf_counter() - t1, _cpu(rusage)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", action="append",
                    help="a source tree (…/src) to measure; repeat to compare (default: ./src)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pyc", choices=["on", "off", "both"], default="off",
                    help="bytecode caching (both: each tree measured both ways)")
    ap.add_argument("--only", choices=["help", "listen"], help="one kind of rows")
    opts = ap.parse_args()
    trees = [str(Path(s).resolve()) for s in
             (opts.src or [str(Path(__file__).resolve().parent.parent / "src")])]
    pycs = ["off", "on"] if opts.pyc == "both" else [opts.pyc]
    #: what is measured: (tree, pyc) pairs, each with its own home and bytecode cache
    srcs = [f"{tree} (pyc {pyc})" for tree in trees for pyc in pycs]
    with tempfile.TemporaryDirectory(prefix="kh-startup-") as tmp:
        work = Path(tmp)
        envs = {}
        for i, src in enumerate(srcs):
            tree, _, pyc_mode = src.rpartition(" (pyc ")
            pyc = work / f"pyc{i}" if pyc_mode.startswith("on") else None
            envs[src] = _env(tree, work / f"home{i}", pyc)
        results: dict[tuple[str, str], list[tuple[float, ...]]] = {}
        kinds = [opts.only] if opts.only else ["help", "listen"]
        # warm-up: bytecode caches (with --pyc on), the development CA, the databases
        for src in srcs:
            for args in HELP_ROWS.values():
                run_help(args, envs[src])
            if "listen" in kinds:
                for args in LISTEN_ROWS.values():
                    run_listen(args, envs[src])
        for _ in range(opts.rounds):
            for src in srcs:
                if "help" in kinds:
                    for name, args in HELP_ROWS.items():
                        results.setdefault((name, src), []).append(run_help(args, envs[src]))
                if "listen" in kinds:
                    for name, args in LISTEN_ROWS.items():
                        results.setdefault((name, src), []).append(
                            run_listen(args, envs[src]))
    print(f"# kakehashi start-up ({machine()}; {opts.rounds} rounds; "
          f"load {os.getloadavg()[0]:.2f})")
    for i, src in enumerate(srcs):
        print(f"# tree {i}: {src}")
    headers = ["row"]
    for i in range(len(srcs)):
        headers += [f"wall ms [{i}]", f"cpu ms [{i}]"] + ([f"exit ms [{i}]"]
                                                          if "listen" in kinds else [])
        if i:
            headers.append(f"wall [{i}]/[0]")
    rows = []
    for name in [*HELP_ROWS, *LISTEN_ROWS]:
        if (name, srcs[0]) not in results:
            continue
        row = [name]
        base = None
        for i, src in enumerate(srcs):
            samples = results[(name, src)]
            wall = statistics.median(s[0] for s in samples) * 1000
            cpu = statistics.median(s[-1] for s in samples) * 1000
            row += [f"{wall:.0f}", f"{cpu:.0f}"]
            if "listen" in kinds:
                row.append(f"{statistics.median(s[1] for s in samples) * 1000:.0f}"
                           if len(samples[0]) == 3 else "")
            if i:
                row.append(f"{wall / base:.2f}" if base else "")
            else:
                base = wall
        rows.append(row)
    print(table(headers, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

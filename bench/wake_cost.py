"""What an idle process costs to wake: CPU per one-byte round trip of an echo server,
back to back and with idle gaps, a uvloop (Python) echo beside ``socat ... PIPE``.

    python bench/wake_cost.py                 # gaps 0, 10 and 50 ms
    python bench/wake_cost.py --gaps 0,50 --rounds 400

Why: the relay's setup rows (``relay_bench.py --only setup:...``, 50 ms between
sessions) cross several processes that were idle a moment before; on this kind of
machine a wake-up after idling costs a process several times the CPU of the same event
when it is warm, and more for an interpreter's working set than for a small C program.
The echo's CPU (utime + stime from /proc, its children included) over the round trips,
divided by their number, is the figure; the client is this process and is not counted.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (
    LOOPBACK,
    Procs,
    cpu_seconds,
    free_port,
    install_signal_exit,
    machine,
    table,
    wait_listening,
)

UVLOOP_ECHO = textwrap.dedent("""
    import asyncio, sys, uvloop
    async def main():
        async def echo(reader, writer):
            while data := await reader.read(65536):
                writer.write(data)
        server = await asyncio.start_server(echo, "127.0.0.1", int(sys.argv[1]))
        await server.serve_forever()
    uvloop.run(main())
""")


def cpu_per_round_trip(pid: int, sock: socket.socket, gap: float, rounds: int) -> float:
    """Microseconds of the echo's CPU per one-byte round trip, ``gap`` seconds apart."""
    for _ in range(50):  # first-use costs out of the figure
        sock.sendall(b"x")
        sock.recv(16)
    before = cpu_seconds(pid)
    for _ in range(rounds):
        if gap:
            time.sleep(gap)  # the idle time is what is measured (pacing)
        sock.sendall(b"x")
        sock.recv(16)
    return (cpu_seconds(pid) - before) / rounds * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gaps", default="0,10,50", help="idle ms between round trips")
    ap.add_argument("--rounds", type=int, default=300,
                    help="round trips per gap (20,000 back to back)")
    args = ap.parse_args()
    install_signal_exit()
    gaps = [float(g) / 1000 for g in args.gaps.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, Procs(Path(tmp)) as procs:
        echoes = {}
        port = free_port()
        script = Path(tmp) / "echo.py"
        script.write_text(UVLOOP_ECHO)
        echoes["uvloop echo (Python)"] = (procs.spawn("uvloop", [sys.executable, str(script),
                                                                  str(port)]), port)
        port = free_port()
        echoes["socat PIPE (C)"] = (procs.spawn(
            "socat", ["socat", f"TCP-LISTEN:{port},bind={LOOPBACK},reuseaddr", "PIPE"]), port)
        for proc, port in echoes.values():
            wait_listening(port, proc=proc)
        for name, (proc, port) in echoes.items():
            row = [name]
            # one connection for every gap (socat without fork serves one)
            with socket.create_connection((LOOPBACK, port)) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for gap in gaps:
                    n = 20000 if gap == 0 else args.rounds
                    row.append(f"{cpu_per_round_trip(proc.pid, sock, gap, n):.0f} µs")
            rows.append(row)
    print(machine())
    print(table(["echo", *[f"CPU per round trip, {g * 1000:g} ms apart" for g in gaps]],
                rows))


if __name__ == "__main__":
    main()

"""CPU per datagram at one sealing end of an encrypted chain (issue 9, claim 7).

    python bench/sealing_bench.py                            # this tree
    python bench/sealing_bench.py --src /tmp/old/src --src src --rounds 7
    python bench/sealing_bench.py --spin 10 --lane open      # for py-spy record

With the kernel path, an encrypted chain's only user-space work is at its two sealing
ends: ``chain forward`` seals what the application sends and opens the answers; the last
proxy opens and seals the other way. Each relays datagrams with one forwarder lane
(:class:`kakehashi.core.datagram.DatagramForwarder`), so what a sealing end costs per
datagram is what one readiness callback of such a lane costs, divided by the datagrams it
relayed. This measures exactly that, in one process and with nothing else in the way:

- a client socket queues ``--batch`` datagrams of ``--size`` bytes on the lane's near
  socket (plaintext for the ``seal`` lane, one send each, as the forward gets them from
  an application; sealed by a peer channel for the ``open`` lane and sent as the forward
  sends a burst, in segmentation-offloaded runs), untimed;
- the lane's readiness callback runs once, timed with ``time.thread_time_ns`` (user and
  kernel CPU of this thread: ``recvmmsg``, the port record, the AEAD, the queue, and
  ``sendmmsg`` with the kernel's loopback delivery into the sink's socket);
- the sink takes what arrived and checks the count and the first payload, untimed; it
  stands for the next hop, so it takes runs as one message (receive offload) when the
  tree under test does.

With the CPU time, the kernel's share of it (``getrusage``: the system calls, the
loopback delivery, nftables), which no change in Python can take away.

A batch of 64 is the burst path (``recvmmsg``/``sendmmsg``); a batch of 1 is a lone
datagram's path (``recvfrom_into``/``sendto``). The figure is the median over
``--batches`` callbacks, then the median over rounds; trees given with ``--src`` run in
child processes, interleaved round by round (the machine is shared: compare trees from
the same run only). Not counted: the event loop's wake-up (one per callback).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _sockets() -> tuple[socket.socket, socket.socket]:
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sink.bind(("127.0.0.1", 0))
    sink.setblocking(False)
    return client, sink


async def _measure(lane: str, batch: int, size: int, batches: int,
                   spin: float) -> dict[str, float]:
    """One lane's CPU per datagram, in ns (median over ``batches`` callbacks)."""
    from kakehashi.core import udpbatch
    from kakehashi.core.crypto import DatagramChannel
    from kakehashi.core.datagram import DatagramForwarder, PortRecord, bind_udp

    k1, k2 = os.urandom(32), os.urandom(32)
    here, peer = DatagramChannel(k1, k2), DatagramChannel(k2, k1)
    client, sink = _sockets()
    near, far = bind_udp("127.0.0.1"), bind_udp("127.0.0.1")
    dst = sink.getsockname()
    if lane == "seal":  # chain forward: the application's datagrams, sealed on
        record = PortRecord(lock="latest", far=dst)
        fwd = DatagramForwarder(near, far, record, near_to_far=here.seal,
                                far_to_near=here.open)
    else:  # the last proxy: the client's sealed datagrams, opened towards the server
        record = PortRecord(expect_host="127.0.0.1", far=dst)
        fwd = DatagramForwarder(near, far, record, near_to_far=here.open,
                                far_to_near=here.seal)
    await fwd.start()
    if getattr(fwd, "_gro", (False,))[0] and hasattr(udpbatch, "UDP_GRO"):
        # the sink stands for the next kakehashi hop, which takes runs as this tree does
        sink.setsockopt(udpbatch.SOL_UDP, udpbatch.UDP_GRO, 1)
    sending, taking = udpbatch.Batch(), udpbatch.Batch()
    loop = asyncio.get_running_loop()
    for s in (near, far):  # the callback runs here, timed, not from the loop
        loop.remove_reader(s.fileno())
    relay = fwd._lane(0)
    to = near.getsockname()
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    times: list[int] = []
    user = system = 0.0  # getrusage(RUSAGE_THREAD) around the callbacks, summed
    lost = 0
    deadline = time.monotonic() + spin if spin else None
    i = 0
    while (deadline is not None and time.monotonic() < deadline) or (
            deadline is None and i < batches):
        i += 1
        if lane == "seal":  # an application: one datagram per send
            for _ in range(batch):
                client.sendto(payload, to)
        else:  # the forward's burst, through the kernel path: offloaded runs
            for _ in range(batch):
                sending.put(int(client.family), peer.seal(payload), to)
            sending.flush(client)
        if batch > 1:
            fwd._burst[0] = True  # a lane in a burst (as after its first full batch)
        else:
            fwd._burst[0] = False
            fwd._wakes[0] = 0  # not the probing wakeup: a lone datagram's path
        r0 = resource.getrusage(resource.RUSAGE_THREAD)
        t0 = time.thread_time_ns()
        relay()
        t1 = time.thread_time_ns()
        r1 = resource.getrusage(resource.RUSAGE_THREAD)
        user += r1.ru_utime - r0.ru_utime
        system += r1.ru_stime - r0.ru_stime
        got = 0
        while n := taking.recv(sink):
            if got == 0:
                first = taking.payload(0).tobytes()
                if (peer.open(first) if lane == "seal" else first) != payload:
                    raise SystemExit(f"{lane}: the sink got another payload")
            got += n
        lost += batch - got
        times.append(t1 - t0)
    fwd.close()
    client.close()
    sink.close()
    if lost:
        print(f"warning: {lost} datagrams lost", file=sys.stderr)
    return {"ns": statistics.median(times) / batch, "batches": len(times),
            "sys": system / (user + system or 1)}


def child(args: argparse.Namespace) -> None:
    out = {}
    for lane in args.lane:
        for batch in args.batch:
            r = asyncio.run(_measure(lane, batch, args.size, args.batches, args.spin))
            out[f"{lane}:{batch}"] = r["ns"]
            out[f"{lane}:{batch}:sys"] = r["sys"]
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", action="append", default=[],
                   help="a source tree to measure (its src/ directory); repeatable; "
                        "default: this one's")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batches", type=int, default=400, help="callbacks timed per round")
    p.add_argument("--batch", type=int, action="append", default=[],
                   help="datagrams per callback (default: 64 and 1)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--lane", action="append", default=[], choices=["seal", "open"])
    p.add_argument("--spin", type=float, default=0.0,
                   help="run one lane for this many seconds (for a profiler) and exit")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.batch = args.batch or [64, 1]
    args.lane = args.lane or ["seal", "open"]
    if args.child or args.spin:
        child(args)
        return
    srcs = args.src or [str(HERE.parent / "src")]
    results: dict[str, dict[str, list[float]]] = {s: {} for s in srcs}
    for rnd in range(args.rounds):
        for k in range(len(srcs)):
            src = srcs[(rnd + k) % len(srcs)]
            env = {**os.environ, "PYTHONPATH": src}
            cmd = [sys.executable, str(HERE / "sealing_bench.py"), "--child",
                   "--batches", str(args.batches), "--size", str(args.size)]
            for b in args.batch:
                cmd += ["--batch", str(b)]
            for lane in args.lane:
                cmd += ["--lane", lane]
            r = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True,
                                          text=True).stdout)
            for key, v in r.items():
                results[src].setdefault(key, []).append(v)
    print(f"load {os.getloadavg()[0]:.2f}; {args.rounds} rounds x {args.batches} callbacks; "
          f"{args.size} B; CPU per datagram (us), median of rounds [min-max]; the kernel's "
          "share of it (getrusage, summed over the callbacks)")
    keys = [f"{lane}:{b}" for b in args.batch for lane in args.lane]
    print("| tree | " + " | ".join(f"{k.split(':')[0]}, batch {k.split(':')[1]}"
                                    for k in keys) + " |")
    print("|---|" + "---|" * len(keys))
    for src in srcs:
        cells = []
        for key in keys:
            v = results[src][key]
            sys_share = statistics.median(results[src][key + ":sys"])
            cells.append(f"{statistics.median(v) / 1000:.2f} [{min(v) / 1000:.2f}-"
                         f"{max(v) / 1000:.2f}], kernel {sys_share:.0%}")
        print(f"| {src} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

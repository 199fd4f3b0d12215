"""The gateway fast lane's own Python cost per kept-alive request, without sockets.

    PYTHONPATH=src python bench/gateway_lane_cost.py [REQUESTS]
    for t in /tmp/old/src src; do PYTHONPATH=$t python bench/gateway_lane_cost.py; done

Drives one :class:`~kakehashi.gateway.fastlane.FastLane` of a real
:class:`~kakehashi.gateway.server.GatewayServer` (allow-list, memory of heads, metrics,
decisions by ``GatewayConnection``) through the keep-alive common case: the client's
readiness callback with a whole request head, the end-of-pass send, the upstream's
readiness callback with a whole response (nginx's head, a 100-byte body), the send
again. Sockets and the loop are stand-ins that answer at once, so what is measured is
the lane's Python work per request and nothing of the kernel's or the machine's load:
under wrk, noise of 10-20 % between runs on a shared machine hides changes of a few
per cent in the lane, which this shows. Prints the best of 25 rounds (process CPU
time / requests); compare trees by running it alternately.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

from kakehashi.gateway.allow import AllowList
from kakehashi.gateway.connection import GatewayConnection
from kakehashi.gateway.exchange import Upstream
from kakehashi.gateway.fastlane import FastLane, SendBatcher
from kakehashi.gateway.server import GatewayServer

REQUEST = (b"GET http://127.0.0.1:8080/x HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
           b"User-Agent: curl/8.0\r\nAccept: */*\r\n\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 18:00:00 GMT"
            b"\r\nContent-Type: application/octet-stream\r\nContent-Length: 100\r\n"
            b"Last-Modified: Tue, 01 Dec 2026 17:00:00 GMT\r\nConnection: keep-alive\r\n"
            b'ETag: "abc-64"\r\nAccept-Ranges: bytes\r\n\r\n' + b"x" * 100)
CLIENT_FD, UPSTREAM_FD = 10, 11


class _Timer:
    def cancel(self) -> None:
        pass


class StandInLoop:
    """What the lane asks of a loop: time, timers, readers, call_soon (run by hand)."""

    def __init__(self) -> None:
        self.real = asyncio.new_event_loop()  # only for the lane's future
        self.soon: list = []
        self.readers: dict = {}
        self.now = 0.0

    def time(self) -> float:
        self.now += 1e-6
        return self.now

    def call_at(self, when: float, callback) -> _Timer:
        return _Timer()

    def call_soon(self, callback, *args) -> None:
        self.soon.append(callback)

    def add_reader(self, fd: int, callback) -> None:
        self.readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)

    def add_writer(self, fd: int, callback) -> None:
        raise AssertionError("a stand-in socket takes every send whole")

    def remove_writer(self, fd: int) -> None:
        pass

    def create_future(self) -> asyncio.Future:
        return self.real.create_future()

    def end_of_pass(self) -> None:
        soon, self.soon = self.soon, []
        for callback in soon:
            callback()


class StandInSocket:
    """recv answers what was put in ``incoming`` (else would block); send takes all."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.incoming = b""
        self.sends = 0

    def fileno(self) -> int:
        return self.fd

    def recv(self, size: int, flags: int = 0) -> bytes:
        data, self.incoming = self.incoming, b""
        if flags or not data:  # (the pool's liveness peek: nothing there)
            self.incoming = data
            raise BlockingIOError
        return data

    def send(self, data: bytes) -> int:
        self.sends += 1
        return len(data)


class StandInConn:
    """The parts of core.stream.Conn the lane uses."""

    has_pushback = False
    closed = False
    plain = True

    def __init__(self, loop: StandInLoop, sock: StandInSocket) -> None:
        self.loop = loop
        self.sock = sock
        self.peer = ("127.0.0.1", 40000)
        self.on_readable = None

    def watch_readable(self, callback) -> None:
        self.on_readable = callback

    def unwatch_readable(self) -> None:
        self.on_readable = None

    def close(self) -> None:
        self.closed = True


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    logging.disable(logging.CRITICAL)  # as --log-level error: no access lines
    loop = StandInLoop()
    server = GatewayServer(AllowList(["127.0.0.1:8080"]))
    server._batcher = SendBatcher(loop)  # type: ignore[arg-type]
    client, origin = StandInSocket(CLIENT_FD), StandInSocket(UPSTREAM_FD)
    upstream = StandInConn(loop, origin)
    gc = GatewayConnection(server.policy, Upstream(("127.0.0.1", 8080), upstream))  # type: ignore[arg-type]
    gc.first = False
    lane = FastLane(server, gc, StandInConn(loop, client))  # type: ignore[arg-type]
    lane.start()

    def one() -> None:
        client.incoming = REQUEST
        loop.readers[CLIENT_FD]()
        loop.end_of_pass()
        origin.incoming = RESPONSE
        upstream.on_readable()  # type: ignore[misc]
        loop.end_of_pass()

    for _ in range(1000):  # the first decision, the memory filled, warm
        one()
    if client.sends != 1000 or origin.sends != 1000 or lane.fut.done():
        raise SystemExit(f"the lane did not serve every request in the common case "
                         f"({client.sends} answers, {origin.sends} requests sent)")
    best = float("inf")
    for _ in range(25):
        start = time.process_time()
        for _ in range(n):
            one()
        best = min(best, (time.process_time() - start) / n)
    print(f"{best * 1e6:.2f} us of Python per kept-alive request (fast lane, stand-in sockets)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

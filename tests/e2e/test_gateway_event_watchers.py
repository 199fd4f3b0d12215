"""Event watchers that read slowly, never, or ask for more than they can take
(issue 7, items 10 and 11; spec 001 Fig. 11).

A poll reply is streamed (never built whole), bounded in bytes with a cursor to go
on from, carries binary payloads as base64 (never 6x escapes), and a client that
does not read within ``--read-timeout`` is cut while everyone else is served.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import ssl
import time

from kakehashi.core.stream import Listener
from kakehashi.gateway.allow import AllowList
from kakehashi.gateway.client import EventClient, Gateway
from kakehashi.gateway.event_endpoint import ByteBudget
from kakehashi.gateway.event_wire import event_data, parse_reply
from kakehashi.gateway.events import EventHub
from kakehashi.gateway.server import GatewayServer, GatewaySettings
from tests.e2e.gateway_fixtures import plain
from tests.support.wait import wait_until

EVENTS = "/.well-known/kakehashi/events/"


def _publish_raw(port: int, topic: str, data: bytes, count: int) -> None:
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST %s%s HTTP/1.1\r\nHost: g\r\nConnection: close\r\n"
                      b"Content-Length: %d\r\n\r\n" % (EVENTS.encode(), topic.encode(),
                                                        len(data)) + data)
            assert b" 202 " in s.recv(200)


def _get(port: int, target: str, timeout: float = 30) -> tuple[bytes, dict[str, str], bytes]:
    """A poll on its own connection: status line, headers, the whole body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"GET %s HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n" % target.encode())
        data = b""
        while chunk := s.recv(1 << 20):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    assert len(body) == int(headers.get("content-length", len(body)))
    return status.encode(), headers, body


def _rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    raise AssertionError("no VmRSS")


def _non_reading_watcher(port: int, topic: str) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET %s%s?cursor=0&wait=1 HTTP/1.1\r\nHost: g\r\n\r\n"
              % (EVENTS.encode(), topic.encode()))
    return s


def _ended(s: socket.socket, timeout: float = 10) -> bool:
    """Read what is left; True when the connection ends (EOF or reset)."""
    s.settimeout(timeout)
    try:
        while s.recv(1 << 20):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


def test_non_reading_watchers_are_cut_and_memory_stays_bounded(env):
    """Issue 7 item 10: 10 watchers of an 18 MB backlog that never read took the
    gateway from 102 to 430 MB, held for ever. Now the growth is small, each is cut
    once it has not read for --read-timeout, and other clients are served meanwhile."""
    gw_proc, gw = env.gateway("127.0.0.1", extra=["--read-timeout", "2"])
    _publish_raw(gw, "big", b"x" * 60000, 300)
    base = peak = _rss_mb(gw_proc.popen.pid)
    watchers = [_non_reading_watcher(gw, "big") for _ in range(10)]
    try:
        # while they hang, the gateway answers others
        status, _, body = _get(gw, f"{EVENTS}big?cursor=299&wait=0")
        assert status.endswith(b"200 OK") and parse_reply(body)[1] == 300

        def all_cut() -> bool:
            nonlocal peak
            peak = max(peak, _rss_mb(gw_proc.popen.pid))  # sampled while they hang
            return gw_proc.output().count("events: cut client") >= 10

        wait_until(all_cut, 2 + 30, what="10 non-reading watchers cut", interval=0.1)
        assert peak - base < 100, f"RSS {base} -> {peak} MB"
        assert all(_ended(s) for s in watchers)  # really cut: EOF or reset, not idle
    finally:
        for s in watchers:
            s.close()


def test_a_non_reading_watcher_over_tls_is_cut_too(env):
    """The deadline is on the connection's writes, whatever carries them (TLS here)."""
    gw_proc, gw = env.gateway("127.0.0.1", extra=["--tls", "on", "--read-timeout", "2"])
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # loopback, test only

    def tls(rcvbuf: int | None = None) -> ssl.SSLSocket:
        s = socket.socket()
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.connect(("127.0.0.1", gw))
        return ctx.wrap_socket(s, server_hostname="localhost")

    for _ in range(150):  # 12 MB of base64: more than the kernel buffers hold
        with tls() as s:
            s.sendall(b"POST %sbig HTTP/1.1\r\nHost: g\r\nConnection: close\r\n"
                      b"Content-Length: 60000\r\n\r\n" % EVENTS.encode() + os.urandom(60000))
            assert b" 202 " in s.recv(200)
    with tls(4096) as watcher:
        watcher.sendall(b"GET %sbig?cursor=0 HTTP/1.1\r\nHost: g\r\n\r\n" % EVENTS.encode())
        wait_until(lambda: "events: cut client" in gw_proc.output(), 2 + 30,
                   what="the TLS watcher cut")


def test_binary_events_cost_base64_in_a_reply(env):
    """Issue 7 item 11: events of \\x01 bytes were escaped 6x (137 MB for 350)."""
    _, gw = env.gateway("127.0.0.1")
    payload = b"\x01" * 65536
    _publish_raw(gw, "bin", payload, 10)
    status, _, body = _get(gw, f"{EVENTS}bin?cursor=0")
    assert status.endswith(b"200 OK")
    assert len(body) < 10 * 88 * 1024  # base64 and a little JSON, not 10 x 384 KiB
    events, cursor, _ = parse_reply(body)
    assert cursor == 10 and all(event_data(e) == payload for e in events)
    assert all("data_b64" in e for e in events)


def test_a_reply_over_the_limit_is_split_and_the_watcher_goes_on(env):
    """The issue's 350 events of 64 KiB of \\x01: a reply too big for the client made
    it retry for ever. The gateway honours max_bytes and the cursor says where to go
    on; ``gateway events watch`` receives every event once, in order."""
    _, gw = env.gateway("127.0.0.1")
    payload = b"\x01" * 65536
    _publish_raw(gw, "big", payload, 350)
    _, headers, body = _get(gw, f"{EVENTS}big?cursor=0&max_bytes=1000000")
    events, cursor, _ = parse_reply(body)
    assert len(body) <= 1_000_000 and 0 < cursor < 350
    assert headers["kakehashi-cursor"] == str(cursor) == str(events[-1]["seq"])
    _, _, rest = _get(gw, f"{EVENTS}big?cursor={cursor}&max_bytes=1000000")
    assert parse_reply(rest)[0][0]["seq"] == cursor + 1  # the next reply goes on from there
    res = env.run("gateway", "events", "watch", "big", *plain(gw),
                  "--count", "350", "--wait", "1", timeout=120)
    got = [json.loads(line) for line in res.stdout.decode().splitlines()]
    assert [e["seq"] for e in got] == list(range(1, 351))
    assert all(base64.b64decode(e["data_b64"]) == payload for e in got)


def test_a_slow_but_reading_watcher_gets_everything(env):
    """Reading slowly is not "not reading": nothing is cut or lost."""
    gw_proc, gw = env.gateway("127.0.0.1", extra=["--read-timeout", "2"])
    events = [os.urandom(60000) for _ in range(30)]
    for data in events:
        _publish_raw(gw, "slow", data, 1)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", gw))
    s.settimeout(30)
    s.sendall(b"GET %sslow?cursor=0 HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
              % EVENTS.encode())
    data = b""
    start = time.monotonic()
    with s:
        while chunk := s.recv(4096):  # at most 400 KB/s: slow, but steady
            data += chunk
            time.sleep(0.01)
    assert time.monotonic() - start > 2  # the reply took longer than the read timeout
    body = data.partition(b"\r\n\r\n")[2]
    got, cursor, _ = parse_reply(body)
    assert cursor == 30 and [event_data(e) for e in got] == events
    assert "cut client" not in gw_proc.output()


async def test_stuck_watchers_share_a_bounded_budget_and_others_are_still_served():
    """The buffered bytes of all replies together are bounded: watchers beyond the
    budget wait for room (or get a 503 and poll again), stuck ones are cut, and a
    reading watcher gets every event."""
    hub = EventHub()
    payloads = [os.urandom(60000) for _ in range(150)]  # 12 MB as base64
    for data in payloads:
        hub.publish("big", data)
    server = GatewayServer(AllowList([]), settings=GatewaySettings(read_timeout=1.5), hub=hub)
    peak = 0

    class Watched(ByteBudget):
        async def acquire(self, n: int) -> int:
            nonlocal peak
            got = await super().acquire(n)
            peak = max(peak, self.used)
            return got

    budget = server.local.budget = Watched(400 * 1024)  # room for two replies at a time
    listener = Listener("127.0.0.1", 0, server.handle_connection)
    listener.start()
    port = listener.address[1]
    stuck = [_non_reading_watcher(port, "big") for _ in range(8)]
    try:
        client = EventClient(Gateway("127.0.0.1", port, timeout=30))
        seen: list[bytes] = []

        async def read_all() -> None:
            async for event in client.watch("big", 0, wait=0):
                seen.append(event_data(event))
                if len(seen) == len(payloads):
                    return

        await asyncio.wait_for(read_all(), 120)
        assert seen == payloads
        assert 0 < peak <= budget.capacity
        assert server.local.cut_clients >= 1
        ended = await asyncio.gather(*(asyncio.to_thread(_ended, s, 30) for s in stuck))
        assert all(ended)
        assert budget.used == 0
    finally:
        for s in stuck:
            s.close()
        await listener.close()
        with contextlib.suppress(Exception):
            server.close()


def test_publish_answers_after_the_journal_has_the_event(env):
    """With --durable-events a 202 means stored: a gateway killed right after the
    answer still has the event (the writes happen off the loop, batched)."""
    gw_proc, gw = env.gateway("127.0.0.1")
    _publish_raw(gw, "kept", b"stored before 202", 5)
    gw_proc.kill9()
    env.gateway("127.0.0.1", port=gw, name="gateway-again")
    _, _, body = _get(gw, f"{EVENTS}kept?cursor=0")
    events, cursor, _ = parse_reply(body)
    assert cursor == 5 and {event_data(e) for e in events} == {b"stored before 202"}

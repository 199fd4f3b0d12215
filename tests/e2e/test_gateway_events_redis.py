"""Two gateways serving the same event topics from one Redis (``--db redis://``):
a watcher's cursor is valid on either, and a gateway killed mid-stream loses and
repeats nothing (issue 11, "Gateway event topics on Redis Streams")."""

from __future__ import annotations

import json
import logging
import socket
import threading

from tests.e2e.gateway_fixtures import plain
from tests.support.wait import wait_until

log = logging.getLogger(__name__)
EVENTS = "/.well-known/kakehashi/events/"


def _publish(port: int, topic: str, data: bytes, key: str | None = None) -> int:
    """One publish on its own connection; the event's number from the 202."""
    extra = b"Idempotency-Key: %s\r\n" % key.encode() if key else b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST %s%s HTTP/1.1\r\nHost: g\r\nConnection: close\r\n%s"
                  b"Content-Length: %d\r\n\r\n" % (EVENTS.encode(), topic.encode(), extra,
                                                    len(data)) + data)
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b" 202 " in head.split(b"\r\n")[0], reply
    return json.loads(body)["seq"]


def _lines(proc) -> list[dict]:
    text = proc.log.read_text(errors="replace")
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _watch(env, name: str, port: int, topic: str, *extra: str):
    return env.spawn(name, "--log-level", "warning", "gateway", "events", "watch", topic,
                     *plain(port), "--wait", "20", *extra)


def test_cursor_valid_on_both_gateways(env, redis_url):
    env.db = redis_url
    _, a = env.gateway("127.0.0.1", name="gateway-a")
    _, b = env.gateway("127.0.0.1", name="gateway-b")
    assert [_publish(a if i % 2 else b, "builds", b"build %d" % i) for i in range(6)] \
        == [1, 2, 3, 4, 5, 6]
    res = env.run("gateway", "events", "watch", "builds", *plain(a), "--count", "3",
                  "--wait", "1")
    first = [json.loads(line) for line in res.stdout.decode().splitlines()]
    assert [e["seq"] for e in first] == [1, 2, 3]
    res = env.run("gateway", "events", "watch", "builds", *plain(b), "--cursor", "3",
                  "--count", "3", "--wait", "1")
    rest = [json.loads(line) for line in res.stdout.decode().splitlines()]
    assert [(e["seq"], e["data"]) for e in rest] == [(4, "build 3"), (5, "build 4"),
                                                    (6, "build 5")]
    # a publisher that lost A's answer sends again, to B, with its Idempotency-Key
    assert _publish(a, "builds", b"deploy", key="d-1") == 7
    assert _publish(b, "builds", b"deploy", key="d-1") == 7
    assert _publish(b, "builds", b"next") == 8
    with socket.create_connection(("127.0.0.1", a), timeout=30) as s:
        s.sendall(b"POST %sbuilds HTTP/1.1\r\nHost: g\r\nConnection: close\r\n"
                  b"Idempotency-Key: %s\r\nContent-Length: 1\r\n\r\nx"
                  % (EVENTS.encode(), b"k" * 129))
        assert b" 400 " in s.recv(200).split(b"\r\n")[0]


def test_a_gateway_killed_mid_stream_loses_and_repeats_nothing(env, redis_url):
    """A publisher on gateway B, watchers on A and on B; A is killed with SIGKILL while
    events flow, A's watcher resumes on B with its cursor: both watchers end with every
    event exactly once, in order."""
    env.db = redis_url
    total = 300
    gw_a, a = env.gateway("127.0.0.1", name="gateway-a")
    _, b = env.gateway("127.0.0.1", name="gateway-b")
    on_a = _watch(env, "watch-a", a, "feed", "--count", str(total))
    on_b = _watch(env, "watch-b", b, "feed", "--count", str(total))

    published: list[tuple[int, bytes]] = []
    go_on = threading.Event()

    def publisher() -> None:
        for i in range(total):
            data = b"event %d" % i
            published.append((_publish(b, "feed", data), data))
            if i == total // 3:
                go_on.wait(60)  # the rest after gateway A is gone

    thread = threading.Thread(target=publisher)
    thread.start()
    try:
        wait_until(lambda: len(_lines(on_a)) >= 50, 60, what="A's watcher mid-stream")
        gw_a.kill9()
        go_on.set()
        # A's watcher can only retry a dead gateway; it stops, and resumes on B
        on_a.stop()
        before = _lines(on_a)
        cursor = before[-1]["seq"]
        log.info("gateway A killed; its watcher saw #1-#%d and resumes on B", cursor)
        resumed = _watch(env, "watch-a-on-b", b, "feed", "--cursor", str(cursor),
                         "--count", str(total - len(before)))
    finally:
        go_on.set()
        thread.join(120)
    assert not thread.is_alive()
    assert [seq for seq, _ in published] == list(range(1, total + 1))
    expected = [(seq, data.decode()) for seq, data in published]
    assert on_b.popen.wait(60) == 0
    assert resumed.popen.wait(60) == 0
    assert [(e["seq"], e["data"]) for e in _lines(on_b)] == expected
    got = before + _lines(resumed)
    assert [(e["seq"], e["data"]) for e in got] == expected  # each once, in order

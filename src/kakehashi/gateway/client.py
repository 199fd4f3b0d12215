"""The client communication module (spec 001 Fig. 6, claims 6-7), as a Python API.

For applications that cannot be told to use a proxy:

* :func:`open_tunnel` - a CONNECT tunnel through the gateway (then TLS or any other
  protocol end to end over it);
* :func:`serve_forward` - a local port where an application speaks plain HTTP to a
  fixed target; each request is rewritten to absolute form addressed to the gateway
  (Fig. 6, 501 -> 503) and the responses are passed back;
* :class:`EventClient` - publish to and watch an event topic through the gateway's
  one port, by long polling from a cursor (claim 7: repeat the request until data
  arrives), resuming after reconnects without losing or repeating events.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass

from kakehashi.core import tlsmismatch
from kakehashi.core.pump import pump_raw
from kakehashi.core.stream import Conn, ConnClosed, Listener, open_tcp, start_tls
from kakehashi.gateway import body, http
from kakehashi.gateway.event_wire import EventReplyError, parse_reply
from kakehashi.gateway.events import TOPIC_RE

log = logging.getLogger("kakehashi.gateway.client")

#: the poll reply size a watcher asks for (``max_bytes``); the gateway sends the rest
#: of a backlog with the next poll
EVENT_REPLY_BYTES = 8 * 1024 * 1024
#: what a watcher accepts: its limit, or one event alone if that is larger (an event
#: is at most 64 KiB, about 87 KiB in base64)
MAX_EVENT_RESPONSE = EVENT_REPLY_BYTES + 256 * 1024


class GatewayError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message


@dataclass
class Gateway:
    """Where the gateway is and how to talk to it."""

    host: str
    port: int
    tls: ssl.SSLContext | None = None
    server_hostname: str | None = None
    user: str | None = None
    password: str | None = None
    timeout: float = 10.0

    @property
    def authority(self) -> bytes:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}".encode()

    def auth_header(self) -> list[tuple[bytes, bytes]]:
        if self.user is None:
            return []
        token = base64.b64encode(f"{self.user}:{self.password or ''}".encode())
        return [(b"Proxy-Authorization", b"Basic " + token)]

    async def connect(self) -> Conn:
        conn = await open_tcp(self.host, self.port, timeout=self.timeout)
        if self.tls is not None:
            try:
                conn = await start_tls(conn, self.tls, server_side=False,
                                       server_hostname=self.server_hostname or self.host,
                                       timeout=self.timeout)
            except ssl.SSLError as exc:
                if tlsmismatch.server_speaks_plaintext(exc):
                    raise tlsmismatch.TLSMismatch(self.authority.decode(),
                                                  server_tls=False) from None
                raise
        return conn


async def read_response(conn: Conn, timeout: float,
                        reader: http.HeadReader | None = None) -> http.ResponseHead:
    reader = reader or http.HeadReader()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    first = True
    while (head := reader.next_head("response")) is None:
        data = await asyncio.wait_for(conn.recv(), max(deadline - loop.time(), 0.001))
        if not data:
            raise GatewayError(502, "the gateway closed the connection")
        if first and conn.plain:  # a TLS gateway answers a plaintext client in TLS
            tlsmismatch.check_plaintext_reply(data, _peer(conn))
        first = False
        reader.feed(data)
    rest = reader.take_rest()
    if rest:
        conn.unread(rest)
    return head  # type: ignore[return-value]


def _peer(conn: Conn) -> str:
    peer = conn.peer
    return f"{peer[0]}:{peer[1]}" if peer else "the gateway"


async def _error_body(conn: Conn, head: http.ResponseHead) -> str:
    framing = http.response_body(head, b"GET")
    if framing[0] == "length" and framing[1] <= 4096:
        data = b""
        while len(data) < framing[1]:
            piece = await conn.recv(framing[1] - len(data))
            if not piece:
                break
            data += piece
        return data.decode(errors="replace").strip()
    return head.reason.decode(errors="replace")


async def open_tunnel(gw: Gateway, host: str, port: int) -> Conn:
    """CONNECT host:port through the gateway; returns the tunnelled connection."""
    conn = await gw.connect()
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1".encode(), b"Host: " + authority.encode()]
    lines += [name + b": " + value for name, value in gw.auth_header()]
    await conn.send_all(b"\r\n".join(lines) + b"\r\n\r\n")
    try:
        head = await read_response(conn, gw.timeout)
    except BaseException:
        conn.close()
        raise
    if head.status != 200:
        message = await _error_body(conn, head)
        conn.close()
        raise GatewayError(head.status, message)
    return conn


async def serve_forward(gw: Gateway, target_host: str, target_port: int,
                        listen_host: str, listen_port: int) -> Listener:
    """A local port speaking plain HTTP to ``target``, forwarded through the gateway."""

    async def handle(app: Conn) -> None:
        reader = http.HeadReader()
        upstream: Conn | None = None
        try:
            while True:
                head = await _read_request(app, reader)
                if head is None:
                    return
                if upstream is None:
                    upstream = await gw.connect()
                out = http.to_absolute(head, target_host, target_port, gw.authority)
                for name, value in gw.auth_header():
                    out.headers.set(name, value)
                await upstream.send_all(out.serialize())
                resp, sent, replies = None, False, http.HeadReader()
                expect = head.headers.get(b"expect")
                if expect is not None and expect.lower() == b"100-continue":
                    # the app waits for "100 Continue" before its body: relay it (or a
                    # refusal) now instead of waiting for a body that is not coming
                    with contextlib.suppress(TimeoutError):
                        resp = await read_response(upstream, 1.0, replies)
                    if resp is not None and resp.status == 100:
                        await app.send_all(resp.serialize())
                        resp = None
                if resp is None:
                    await body.send(app, upstream, http.request_body(head), timeout=60)
                    sent = True
                    resp = await read_response(upstream, 60, replies)
                while 100 <= resp.status < 200 and resp.status != 101:  # interim replies
                    await app.send_all(resp.serialize())
                    resp = await read_response(upstream, 60, replies)
                await app.send_all(resp.serialize())
                if resp.status == 101:  # switched (e.g. WebSocket): bytes both ways now
                    await pump_raw(app, upstream)
                    return
                framing = http.response_body(resp, head.method)
                await body.send(upstream, app, framing, timeout=60)
                if framing[0] == "close" or not http.keep_alive(head, resp):
                    return
                if not sent and http.request_body(head) != http.NO_BODY:
                    return  # refused before the body: it is still unread on the app side
        except http.HTTPError as exc:  # the application's request is not HTTP we relay
            log.warning("forward to %s:%d: %s", target_host, target_port, exc.reason)
            with contextlib.suppress(OSError, ConnClosed):
                await app.send_all(http.error_response(exc.status, exc.reason))
        except ValueError as exc:
            log.warning("forward to %s:%d: %s", target_host, target_port, exc)
            with contextlib.suppress(OSError, ConnClosed):
                await app.send_all(http.error_response(
                    400, "send origin-form requests (GET /path) to this local port"))
        except (OSError, ConnClosed, GatewayError, TimeoutError) as exc:
            log.warning("forward to %s:%d failed: %s", target_host, target_port, exc)
        finally:
            if upstream is not None:
                upstream.close()

    listener = Listener(listen_host, listen_port, handle)
    listener.start()
    return listener


async def _read_request(conn: Conn, reader: http.HeadReader) -> http.RequestHead | None:
    while (head := reader.next_head("request")) is None:
        data = await asyncio.wait_for(conn.recv(), 300)
        if not data:
            return None
        reader.feed(data)
    rest = reader.take_rest()
    if rest:
        conn.unread(rest)
    return head  # type: ignore[return-value]


def _events_path(topic: str) -> str:
    """The topic's path; the name is checked here so it can never break the request."""
    if not TOPIC_RE.match(topic):
        raise ValueError(f"bad topic {topic!r}: 1-128 of A-Z a-z 0-9 _ . -")
    return f"/.well-known/kakehashi/events/{topic}"


class EventClient:
    """Publish and watch event topics through the gateway (plain HTTP requests)."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def _request(self, method: bytes, path: str, data: bytes = b"",
                       timeout: float | None = None) -> tuple[http.ResponseHead, bytes]:
        conn = await self.gw.connect()
        try:
            lines = [method + b" " + path.encode() + b" HTTP/1.1", b"Host: " + self.gw.authority,
                     b"Connection: close", b"Content-Length: %d" % len(data)]
            lines += [name + b": " + value for name, value in self.gw.auth_header()]
            await conn.send_all(b"\r\n".join(lines) + b"\r\n\r\n" + data)
            head = await read_response(conn, timeout or self.gw.timeout)
            framing = http.response_body(head, method)
            if framing[0] == "length" and framing[1] > MAX_EVENT_RESPONSE:
                raise GatewayError(502, f"event response of {framing[1]} bytes is too large")
            payload = bytearray()
            if framing[0] == "length":
                while len(payload) < framing[1]:
                    piece = await asyncio.wait_for(conn.recv(framing[1] - len(payload)),
                                                   self.gw.timeout)
                    if not piece:
                        raise GatewayError(502, "the gateway closed in the middle of a reply")
                    payload += piece
            return head, bytes(payload)
        finally:
            conn.close()

    async def publish(self, topic: str, data: bytes) -> int:
        head, payload = await self._request(b"POST", _events_path(topic), data)
        if head.status != 202:
            raise GatewayError(head.status, payload.decode(errors="replace").strip())
        return int(json.loads(payload)["seq"])

    async def poll(self, topic: str, cursor: int, wait: float) -> tuple[list[dict], int, bool]:
        """One (long) poll: the events after ``cursor`` (dicts with seq, ts and ``data``
        text or ``data_b64``; :func:`~kakehashi.gateway.event_wire.event_data` gives the
        bytes), the cursor to poll from next, and whether events expired unseen."""
        path = (f"{_events_path(topic)}?cursor={cursor}&wait={wait:g}"
                f"&max_bytes={EVENT_REPLY_BYTES}")
        head, payload = await self._request(b"GET", path, timeout=wait + self.gw.timeout)
        if head.status == 204:  # no event (Fig. 11, 702)
            value = head.headers.get(b"kakehashi-cursor") or b"%d" % cursor
            if not value.removeprefix(b"-").isdigit():
                raise GatewayError(502, "bad event reply: a malformed Kakehashi-Cursor")
            return [], int(value), head.headers.get(b"kakehashi-gap") is not None
        if head.status != 200:
            raise GatewayError(head.status, payload.decode(errors="replace").strip())
        try:
            return parse_reply(payload)
        except EventReplyError as exc:
            raise GatewayError(502, f"bad event reply: {exc}") from None

    async def watch(self, topic: str, cursor: int = 0, wait: float = 25.0
                    ) -> AsyncIterator[dict]:
        """Yield events forever, long polling; reconnects resume from the cursor."""
        delay = 0.5
        polled = False
        while True:
            try:
                events, cursor, gap = await self.poll(topic, cursor, wait)
            except (OSError, TimeoutError, GatewayError) as exc:
                if isinstance(exc, tlsmismatch.TLSMismatch) and not polled:
                    raise  # a wrong --tls will not fix itself: stop with the message
                log.warning("event poll failed: %s (retrying in %.1fs)", exc, delay)
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 30.0)
                continue
            delay, polled = 0.5, True
            if gap:
                log.warning("some events of %s expired before they were seen", topic)
            for event in events:
                yield event

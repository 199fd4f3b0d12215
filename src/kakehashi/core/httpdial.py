"""Outbound HTTP from behind a firewall: through an HTTP CONNECT proxy, and a small
keep-alive HTTP/1.1 client on asyncio (h11, sans-IO).

* :class:`Proxy` and :func:`dial` - a TCP connection to ``host:port``, directly or
  through an HTTP proxy's ``CONNECT`` with Basic authentication (the corporate proxy
  case); the result is a plain socket any client can put TLS or WebSocket on;
* :class:`HttpConnection` - requests on one such socket (TLS optional), bounded
  response sizes and a timeout per request; used by clients that must speak plain
  HTTP/1.1 where WebSockets are blocked (the socket switch's long-poll transport).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import ssl
import urllib.parse
from dataclasses import dataclass

import h11

from kakehashi.core import identity
from kakehashi.core.stream import refuse_self_connect

#: the longest proxy reply head read
MAX_PROXY_HEAD = 16 * 1024
PROXY_PASSWORD_ENV = "KAKEHASHI_PROXY_PASSWORD"


class DialError(ConnectionError):
    """The server or the proxy could not be reached, or the proxy said no."""


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    user: str = ""
    password: str = ""

    @classmethod
    def parse(cls, url: str, user: str | None = None) -> Proxy:
        """``http://[USER[:PASSWORD]@]HOST:PORT``; a user without a password in the URL
        takes it from ``KAKEHASHI_PROXY_PASSWORD``."""
        if "://" not in url:
            url = "http://" + url
        u = urllib.parse.urlsplit(url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"proxy {url!r}: expected http://[USER@]HOST:PORT")
        name = user or urllib.parse.unquote(u.username or "")
        pw = urllib.parse.unquote(u.password or "")
        if name and not pw:
            with contextlib.suppress(identity.PasswordError):  # the proxy may need none
                pw = identity.read_password(env=PROXY_PASSWORD_ENV, allow_prompt=False)
        return cls(u.hostname, u.port or 8080, name, pw)

    def authorization(self) -> str | None:
        if not self.user:
            return None
        return "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()


async def dial(host: str, port: int, *, proxy: Proxy | None = None,
               timeout: float = 10.0) -> socket.socket:
    """A connected non-blocking socket to ``host:port`` (through ``proxy`` when given)."""
    loop = asyncio.get_running_loop()
    target = (proxy.host, proxy.port) if proxy else (host, port)
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(target[0], target[1], type=socket.SOCK_STREAM), timeout)
    except (OSError, TimeoutError) as exc:
        raise DialError(f"cannot resolve {target[0]}: {exc}") from None
    last: Exception | None = None
    sock: socket.socket | None = None
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, addr), timeout)
            refuse_self_connect(sock)
            break
        except (OSError, TimeoutError) as exc:
            sock.close()
            sock, last = None, exc
    if sock is None:
        what = "proxy" if proxy else "server"
        raise DialError(f"cannot connect to {what} {target[0]}:{target[1]}: {last}")
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if proxy is None:
        return sock
    try:
        await asyncio.wait_for(_connect_through(loop, sock, host, port, proxy), timeout)
    except BaseException as exc:
        sock.close()
        if isinstance(exc, TimeoutError):
            raise DialError(f"proxy {proxy.host}:{proxy.port} did not answer CONNECT") \
                from None
        raise
    return sock


async def _connect_through(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                           host: str, port: int, proxy: Proxy) -> None:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
    auth = proxy.authorization()
    if auth:
        head += f"Proxy-Authorization: {auth}\r\n"
    await loop.sock_sendall(sock, (head + "\r\n").encode())
    buf = b""
    # read byte-wise up to the blank line so nothing of the tunnel is consumed here
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_PROXY_HEAD:
            raise DialError("the proxy's answer to CONNECT is too long")
        piece = await loop.sock_recv(sock, 1)
        if not piece:
            raise DialError(f"proxy {proxy.host}:{proxy.port} closed during CONNECT")
        buf += piece
    status_line = buf.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    if code != 200:
        hint = " (proxy authentication required or refused)" if code == 407 else ""
        raise DialError(f"proxy {proxy.host}:{proxy.port} refused CONNECT to "
                        f"{authority}: {status_line}{hint}")


class HttpConnection:
    """Sequential HTTP/1.1 requests on one connection (keep-alive), via h11."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 host: str, max_response: int) -> None:
        self.reader = reader
        self.writer = writer
        self.host = host
        self.max_response = max_response
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)

    @classmethod
    async def open(cls, host: str, port: int, *, tls: ssl.SSLContext | None = None,
                   proxy: Proxy | None = None, timeout: float = 10.0,
                   max_response: int = 4 << 20) -> HttpConnection:
        sock = await dial(host, port, proxy=proxy, timeout=timeout)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                sock=sock, ssl=tls, server_hostname=host if tls else None,
                limit=256 * 1024), timeout)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            sock.close()
            raise DialError(f"cannot open {'https' if tls else 'http'} to {host}:{port}: "
                            f"{exc}") from None
        authority = f"{host}:{port}"
        return cls(reader, writer, authority, max_response)

    async def request(self, method: str, target: str, body: bytes = b"", *,
                      headers: dict[str, str] | None = None,
                      timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
        """One request; (status, headers with lower-case names, body)."""
        return await asyncio.wait_for(self._request(method, target, body, headers or {}),
                                      timeout)

    async def _request(self, method: str, target: str, body: bytes,
                       headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        hdrs = [("Host", self.host), ("Content-Length", str(len(body))),
                *headers.items()]
        out = self.h11.send(h11.Request(method=method, target=target, headers=hdrs))
        out += self.h11.send(h11.Data(data=body)) if body else b""
        out += self.h11.send(h11.EndOfMessage())
        self.writer.write(out)
        await self.writer.drain()
        status, rh, chunks, size = 0, {}, [], 0
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                data = await self.reader.read(256 * 1024)
                self.h11.receive_data(data)
                if not data and self.h11.their_state is not h11.DONE:
                    raise ConnectionError("the server closed the connection")
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                rh = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.max_response:
                    raise ConnectionError("the server's answer is too large")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return status, rh, b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the server closed the connection")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

"""The shared ASGI pieces for systems with an HTTP API (FastAPI on uvicorn with uvloop).

* :func:`create_app` - a FastAPI application with the house error shape
  ``{"error": {"code": ..., "message": ...}}`` for every failure (validation included),
  a request body limit, and its OpenAPI document at ``/openapi.json``;
* :func:`require` - a dependency that authenticates the bearer token (core identity
  :class:`~kakehashi.core.identity.ApiTokens`) and checks its role; ``admin`` may do
  everything;
* :func:`bearer` - the same check for a WebSocket handshake;
* :func:`serve` - run an app on a socket bound here (port 0 works: the bound port is
  logged as ``listening on HOST:PORT``), with TLS from the core when asked;
* every app answers ``GET /metrics`` (Prometheus, :mod:`kakehashi.core.metrics`) and
  ``GET /healthz`` (200, or 503 when a registered health check fails), without a token
  (like any exporter: keep the port internal, or turn them off with ``metrics=False``).

Systems build their routes on top; nothing here knows any one system.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from kakehashi.core.identity import ApiTokens, TokenInfo

log = logging.getLogger("kakehashi.web")

#: the largest request body an API takes (a CA certificate is the biggest thing sent)
MAX_BODY = 256 * 1024
#: seconds a request body may pause between two pieces before the request gets a 408
BODY_TIMEOUT = 30.0
#: seconds a client may take to send a request's head, and a response may wait for the
#: client to take it, before the connection is cut (uvicorn has neither deadline)
CLIENT_TIMEOUT = 30.0
#: the largest request head (request line and headers) taken; a longer one gets a 431
MAX_HEAD = 64 * 1024


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a request head over MAX_HEAD."""


class ApiError(Exception):
    """An error the API answers with: HTTP ``status``, a stable ``code``, a message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


class _BodyLimit:
    """Refuse request bodies over ``limit`` bytes (declared or streamed) with 413, and
    bodies whose next piece takes longer than ``timeout`` seconds with 408: a client that
    trickles a body must not hold a request (and its worker state) for ever."""

    def __init__(self, app: Any, limit: int, timeout: float = BODY_TIMEOUT) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                await _too_large(send, self.limit)
                return
        seen = 0
        complete = False

        async def limited() -> dict:
            nonlocal seen, complete
            if complete:  # later receives wait for the disconnect: no deadline on those
                return await receive()
            try:
                async with asyncio.timeout(self.timeout):
                    message = await receive()
            except TimeoutError:
                raise ApiError(408, "body-timeout",
                               f"no request body bytes for {self.timeout:g} s") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise ApiError(413, "too-large", f"request body over {self.limit} bytes")
                complete = not message.get("more_body", False)
            return message

        await self.app(scope, limited, send)


async def _too_large(send: Callable, limit: int) -> None:
    import json

    body = json.dumps(error_body("too-large", f"request body over {limit} bytes")).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def create_app(title: str, version: str, *, tokens: ApiTokens | None = None,
               description: str = "", max_body: int = MAX_BODY,
               on_start: Callable[[], Any] | None = None,
               on_stop: Callable[[], Awaitable[Any]] | None = None,
               metrics: bool = True) -> FastAPI:
    """A FastAPI app with the house conventions; ``tokens`` authenticate :func:`require`;
    ``on_start``/``on_stop`` run when the server starts and stops (its lifespan);
    ``metrics`` adds ``/metrics`` and ``/healthz``."""
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        if on_start is not None:
            on_start()
        try:
            yield
        finally:
            if on_stop is not None:
                await on_stop()

    app = FastAPI(title=title, version=version, description=description, lifespan=lifespan,
                  openapi_url="/openapi.json", docs_url=None, redoc_url=None)
    app.state.tokens = tokens

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return JSONResponse(error_body("bad-request", "; ".join(parts) or "invalid request"),
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    if metrics:
        _add_metrics_routes(app)
    app.add_middleware(_BodyLimit, limit=max_body)
    return app


def _add_metrics_routes(app: FastAPI) -> None:
    from kakehashi.core import metrics as m

    @app.get("/metrics", include_in_schema=False)
    async def _metrics(request: Request) -> Response:
        body, content_type = m.exposition(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    @app.get("/healthz", include_in_schema=False)
    async def _healthz() -> JSONResponse:
        ok, checks = m.health()
        return JSONResponse({"status": "ok" if ok else "unhealthy", "checks": checks},
                            status_code=200 if ok else 503)


def _check(tokens: ApiTokens | None, header: str | None, roles: tuple[str, ...]) -> TokenInfo:
    if tokens is None:
        raise ApiError(500, "no-tokens", "this server has no token store")
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not value:
        raise ApiError(401, "unauthenticated", "send Authorization: Bearer <token>")
    info = tokens.verify(value.strip())
    if info is None:
        raise ApiError(401, "unauthenticated", "unknown or invalid token")
    if info.role != "admin" and info.role not in roles:
        raise ApiError(403, "forbidden", f"a {info.role} token may not do this "
                                         f"(needs {' or '.join(roles)})")
    return info


def require(*roles: str) -> Callable[[Request], Awaitable[TokenInfo]]:
    """A FastAPI dependency: the caller's token, which must have one of ``roles``
    (or ``admin``); 401 without a valid token, 403 with the wrong role."""

    async def dependency(request: Request) -> TokenInfo:
        return _check(request.app.state.tokens, request.headers.get("authorization"), roles)

    dependency.__name__ = f"require_{'_'.join(roles)}"
    return dependency


def bearer(tokens: ApiTokens | None, headers: Mapping[str, str], *roles: str) -> TokenInfo:
    """:func:`require` for a WebSocket handshake (raises :class:`ApiError`)."""
    return _check(tokens, headers.get("authorization"), roles)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket for :func:`serve` (bound here so port 0 can be reported)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def _protocol_class(timeout: float) -> type:
    """uvicorn's HTTP protocol (httptools) with the two deadlines it lacks.

    * the request head: from the connection (or the first byte of the next request)
      to the end of its headers; a client that connects and says nothing, or trickles
      a header, held its socket and memory for ever (the keep-alive timer only starts
      after a first response, and any byte stops it);
    * taking a response: once the transport's buffer is over its high-water mark, the
      client must take some of it within ``timeout``; a client that stops reading
      held the request's task, its reply and the socket for ever (uvicorn waits for
      the buffer to drain without a deadline).

    Either way the connection is aborted (``close`` would wait for the unread buffer).
    A request's body has its own deadline (:class:`_BodyLimit`); a WebSocket, once
    upgraded, its pings.

    And a size: a request head over :data:`MAX_HEAD` is refused with 431 (uvicorn
    kept every header of an endless head: 300 MiB of small headers took a server to
    4.6 GB of memory within seconds, before any login).
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class Protocol(HttpToolsProtocol):  # type: ignore[misc]
        _head_timer: asyncio.TimerHandle | None = None
        _send_timer: asyncio.TimerHandle | None = None
        #: the request whose reply is being sent (``cycle`` is the last one parsed,
        #: which is another one when requests are pipelined)
        _running: Any = None
        #: bytes of the request head so far; set once it is over MAX_HEAD
        _head_size = 0
        _too_large = False

        def on_url(self, url: bytes) -> None:
            self._count_head(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_head(len(name) + len(value) + 4)
            super().on_header(name, value)

        def _count_head(self, n: int) -> None:
            self._head_size += n
            if self._head_size > MAX_HEAD:
                self._too_large = True
                raise _HeadTooLarge  # the parser stops; uvicorn answers (see below)

        def send_400_response(self, msg: str) -> None:
            if not self._too_large:
                super().send_400_response(msg)
                return
            text = f"request head over {MAX_HEAD} bytes".encode()
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                                 b"content-type: text/plain; charset=utf-8\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                                 % (len(text), text))
            self.transport.close()

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            self._running = cycle
            super()._start_asgi_task(cycle, app)

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_head()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_size = 0
            self._arm_head()

        def on_headers_complete(self) -> None:
            self._stop_head()
            super().on_headers_complete()

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._send_timer is None:
                self._send_timer = self.loop.call_later(timeout, self._cut)

        def resume_writing(self) -> None:
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None
            super().resume_writing()

        def handle_websocket_upgrade(self) -> None:
            self._stop_timers()
            super().handle_websocket_upgrade()
            # this protocol is done (the WebSocket one has the transport) and never
            # hears connection_lost, which is where uvicorn drops its parser: the
            # parser and this protocol hold each other, so every WebSocket left a
            # cycle (with the connection's transport) for the collector to find
            self.parser = None

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_timers()
            super().connection_lost(exc)

        def _arm_head(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(timeout, self._cut)

        def _stop_head(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _stop_timers(self) -> None:
            self._stop_head()
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None

        def _cut(self) -> None:
            self._head_timer = self._send_timer = None
            self.pipeline.clear()  # requests queued behind it are not started
            for cycle in (self._running, self.cycle):  # their sends return at once now
                if cycle is not None:
                    cycle.disconnected = True
            self.transport.abort()

    return Protocol


def _ws_protocol_class() -> type:
    """uvicorn's WebSocket protocol (websockets' sans-IO connection) that leaves no
    cycle behind.

    websockets' connection keeps its parser, a generator whose frame holds the
    connection, until the end and after (``discard()`` waits at its last ``yield``
    even after the end of the stream), so every WebSocket that ended stayed in memory
    as a cycle, with its request, its headers and the permessage-deflate state (zlib's,
    outside Python's allocator), until the collector found it - seldom, in a server
    (core/runner.tune_gc): a switch server's memory grew about 3 MB per round of 120
    gateway links that came and went. The connection being lost, nothing is parsed
    any more: the parser is closed, which lets reference counting free it all.
    """
    from uvicorn.protocols.websockets.websockets_sansio_impl import (
        WebSocketsSansIOProtocol,
    )

    class WSProtocol(WebSocketsSansIOProtocol):  # type: ignore[misc]
        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            with contextlib.suppress(RuntimeError):  # (a parser that will not close)
                self.conn.parser.close()

    return WSProtocol


def _server_class() -> type:
    import contextlib

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn without its signal handlers: the core runner owns the signals and
        cancels the main task, which stops the server."""

        @contextlib.contextmanager
        def capture_signals(self):  # type: ignore[override]
            yield

    return Server


async def serve(app: Any, sock: socket.socket, *, certfile: str | None = None,
                keyfile: str | None = None, name: str = "api",
                ready: Callable[[], None] | None = None,
                client_timeout: float = CLIENT_TIMEOUT) -> None:
    """Serve ``app`` on ``sock`` until cancelled (uvicorn, httptools, uvloop's loop
    when the caller runs on it). Logs ``listening on HOST:PORT`` once it accepts.
    ``client_timeout``: see :func:`_protocol_class`."""
    import uvicorn

    _Server = _server_class()
    # log_config=None: uvicorn's records go through the process's own logging setup
    # (text or JSON, the demo's file) instead of handlers of its own on stderr
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            log_config=None,
                            ssl_certfile=certfile, ssl_keyfile=keyfile,
                            timeout_keep_alive=30, ws=_ws_protocol_class(),
                            http=_protocol_class(client_timeout), ws_max_size=1 << 20,
                            ws_ping_interval=10.0, ws_ping_timeout=20.0,
                            h11_max_incomplete_event_size=64 * 1024)
    server = _Server(config)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                await task
                raise RuntimeError(f"{name} did not start")
            await asyncio.sleep(0.01)
        host, port = sock.getsockname()[:2]
        log.info("%s listening on %s:%d (%s)", name, host, port,
                 "https" if certfile else "http")
        if ready is not None:
            ready()
        await asyncio.shield(task)
    finally:
        server.should_exit = True
        if not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), 5)
            except (TimeoutError, asyncio.CancelledError, Exception):
                task.cancel()

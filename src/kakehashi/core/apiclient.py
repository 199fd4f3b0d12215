"""A small JSON-over-HTTP client for the command-line tools of systems with an API.

Standard library only (``http.client``), on purpose: a command such as ``ondemand
revoke`` should start, ask and exit in a fraction of a second, and an HTTP client
library costs more to import than the whole request takes. Errors come back as
:class:`ApiClientError` with the server's ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.parse
from pathlib import Path
from typing import Any

#: the largest answer a command reads
MAX_RESPONSE = 64 * 1024 * 1024


class ApiClientError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} ({self.code}, HTTP {self.status})" if self.status else \
            self.message


def read_token(path: str | os.PathLike[str]) -> str:
    """An API token from the first line of a file (``--token-file``)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ApiClientError(0, "token-file", f"cannot read token file {os.fspath(path)}: "
                                              f"{exc}") from None
    token = lines[0].strip() if lines else ""
    if not token:
        raise ApiClientError(0, "token-file", f"token file {os.fspath(path)} is empty")
    return token


class ApiClient:
    """Requests to ``server`` (``http://host:port`` or ``https://...``) with a bearer
    token; ``ca`` is the trust anchor for https (default: system + development CA)."""

    def __init__(self, server: str, token: str | None = None, *, ca: str | None = None,
                 timeout: float = 30.0, basic: tuple[str, str] | None = None,
                 proxy: Any = None) -> None:
        if "://" not in server:
            server = "http://" + server
        url = urllib.parse.urlsplit(server)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ApiClientError(0, "bad-server", f"--server {server!r}: expected "
                                                  "http://HOST:PORT or https://HOST:PORT")
        self.scheme = url.scheme
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.base = url.path.rstrip("/")
        self.token = token
        #: HTTP Basic (user, password) instead of a bearer token (APIs of user accounts)
        self.basic = basic
        self.ca = ca
        self.timeout = timeout
        #: a :class:`kakehashi.core.httpdial.Proxy`: requests go through its CONNECT
        self.proxy = proxy

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        host, port = (self.proxy.host, self.proxy.port) if self.proxy else \
            (self.host, self.port)
        conn: http.client.HTTPConnection
        if self.scheme == "https":
            from kakehashi.core import tls

            conn = http.client.HTTPSConnection(host, port, timeout=timeout,
                                               context=tls.client_context(self.ca))
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        if self.proxy is not None:
            auth = self.proxy.authorization()
            conn.set_tunnel(self.host, self.port,
                            headers={"Proxy-Authorization": auth} if auth else None)
        return conn

    def request(self, method: str, path: str, body: Any = None,
                params: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        target = self.base + path
        if params:
            target += "?" + urllib.parse.urlencode(params)
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        elif self.basic:
            import base64

            pair = f"{self.basic[0]}:{self.basic[1]}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn = self._connection(timeout or self.timeout)
        try:
            conn.request(method, target, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read(MAX_RESPONSE + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise ApiClientError(0, "unreachable", f"cannot reach {self.scheme}://{self.host}:"
                                                   f"{self.port}: {exc}") from None
        finally:
            conn.close()
        if len(raw) > MAX_RESPONSE:
            raise ApiClientError(resp.status, "too-large", "the answer is too large")
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            doc = None
        if resp.status >= 400:
            err = (doc or {}).get("error") if isinstance(doc, dict) else None
            if isinstance(err, dict):
                raise ApiClientError(resp.status, str(err.get("code")), str(err.get("message")))
            raise ApiClientError(resp.status, "http-error",
                                 raw[:200].decode(errors="replace") or resp.reason)
        return doc

"""The relay means' common case in bulk byte operations.

Most proxied requests are plain: an absolute-form ``GET`` with a Host header and
nothing hop-by-hop but perhaps ``Proxy-Connection``/``Connection: keep-alive``
(what curl, browsers and HTTP libraries send), answered with a Content-Length
body. For those, building :class:`~kakehashi.gateway.http.Headers` objects and
serialising them again is most of the gateway's CPU per request. The functions
here validate such a head with a handful of C-level scans (one ``translate``, one
regular expression over the field block, substring counts) and rewrite it by
slicing, keeping every field line as received.

They answer ``None`` for anything outside that common case, and for anything the
full parser would refuse, so :mod:`kakehashi.gateway.http` stays the one place that
decides and explains errors. A differential test (tests/fuzz) checks that whenever
these functions accept a head, the full parser accepts it too and means the same
thing by it.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

from kakehashi.gateway import http

_FIELDS: Final = re.compile(rb"(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\r\n]*)*")
_TCHAR_DEL: Final = http._TCHAR
_VCHAR_DEL: Final = http._VCHAR
_HEAD_OK: Final = http._HEAD_OK

#: request fields that leave the common case (the full parser handles them)
_REQ_SPECIAL: Final = re.compile(
    rb"\r\n(?:connection|keep-alive|proxy-connection|proxy-authorization|proxy-authenticate"
    rb"|te|trailer|transfer-encoding|upgrade|content-length|via|expect):")
#: response fields that need a look line by line (Content-Length alone does not)
_RESP_SPECIAL: Final = re.compile(
    rb"\r\n(?:connection|keep-alive|proxy-connection|proxy-authenticate|proxy-authorization"
    rb"|te|trailer|transfer-encoding|upgrade|close):")
_CONTENT_LENGTH: Final = b"\r\ncontent-length:"
_CONNECTION_OK: Final = frozenset((b"keep-alive", b"close"))


class QuickRequest(NamedTuple):
    """A common-case request, already rewritten for the destination server."""

    method: bytes
    target: bytes  # as received (absolute form), for the access log
    dest: http.Target
    out: bytes  # the origin-form head to send, blank line included
    close: bool  # the client asked to close after this exchange
    auth: bytes | None  # the Proxy-Authorization value, if any


class QuickResponse(NamedTuple):
    """A common-case response, already rewritten for the client."""

    status: int
    length: int  # body bytes that follow the head
    out: bytes  # the head to send to the client, blank line included
    upstream_keep: bool  # the upstream connection may carry another request


def _plain_head(raw: bytes, limits: http.HeadLimits) -> bool:
    """No control bytes, CRLF line ends only, short enough that no line limit applies."""
    if len(raw) > limits.max_line or raw.translate(None, _HEAD_OK):
        return False
    n = raw.count(b"\r\n")
    return raw.count(b"\r") == n and raw.count(b"\n") == n and n <= limits.max_headers


def _connection_tokens(value: bytes) -> set[bytes] | None:
    tokens = {t.strip(b" \t") for t in value.lower().split(b",")} - {b""}
    return tokens if tokens <= _CONNECTION_OK else None


def quick_request(raw: bytes, via_name: bytes,
                  limits: http.HeadLimits = http.DEFAULT_LIMITS) -> QuickRequest | None:
    """``raw`` (a request head without its blank line) rewritten to origin form, or
    None when it is not the common case."""
    if not _plain_head(raw, limits):
        return None
    eol = raw.find(b"\r\n")
    if eol < 0:
        return None  # HTTP/1.1 without Host: the full parser says so
    parts = raw[:eol].split(b" ")
    if len(parts) != 3:
        return None
    method, target, version = parts
    if version != http.HTTP_11 or not method or method == b"CONNECT" \
            or method.translate(None, _TCHAR_DEL) or target.translate(None, _VCHAR_DEL):
        return None
    m = http._HTTP_TARGET.match(target)
    block = raw[eol:]
    if m is None or _FIELDS.fullmatch(block) is None:
        return None
    low = block.lower()
    if low.count(b"\r\nhost:") != 1:
        return None
    close = False
    auth = None
    if _REQ_SPECIAL.search(low) is not None:
        kept = []
        for line, lower in zip(block.split(b"\r\n")[1:], low.split(b"\r\n")[1:], strict=True):
            name, _, value = lower.partition(b":")
            if name == b"connection":
                tokens = _connection_tokens(value)
                if tokens is None:
                    return None  # names other fields as hop-by-hop
                close = close or b"close" in tokens
            elif name == b"proxy-authorization":
                if auth is not None:
                    return None
                auth = line[len(name) + 1:].strip(b" \t")
            elif name in (b"keep-alive", b"proxy-connection"):
                pass  # hop-by-hop, dropped
            elif name == b"close":
                return None  # dropped too when Connection names it: the full path
            elif _REQ_SPECIAL.match(b"\r\n" + name + b":") is not None:
                return None
            else:
                kept.append(line)
        block = b"\r\n" + b"\r\n".join(kept) if kept else b""
        low = block.lower()
    try:
        dest = http._absolute_from_match(m)
    except http.HTTPError:
        return None
    i = low.find(b"\r\nhost:")
    j = block.find(b"\r\n", i + 2)
    if j < 0:
        j = len(block)
    block = block[:i + 2] + block[i + 2:i + 6] + b": " + dest.authority + block[j:]
    out = b"%s %s HTTP/1.1%s\r\nVia: %s\r\n\r\n" % (
        method, dest.path, block, http._via_value(http.HTTP_11, via_name))
    return QuickRequest(method, target, dest, out, close, auth)


def quick_response(raw: bytes, via_name: bytes, method: bytes, client_close: bool,
                   limits: http.HeadLimits = http.DEFAULT_LIMITS) -> QuickResponse | None:
    """``raw`` (a final response head to a :func:`quick_request`) rewritten for the
    client, or None when it is not the common case (no length, chunked, 1xx, 1.0)."""
    if not _plain_head(raw, limits):
        return None
    eol = raw.find(b"\r\n")
    if eol < 0:
        eol = len(raw)
    version, _, rest = raw[:eol].partition(b" ")
    status, _, reason = rest.partition(b" ")
    if version != http.HTTP_11 or len(status) != 3 or not status.isdigit() \
            or not b"200" <= status <= b"599":
        return None
    block = raw[eol:]
    if _FIELDS.fullmatch(block) is None:
        return None
    code = int(status)
    low = block.lower()
    lengths = low.count(_CONTENT_LENGTH)
    if lengths > 1:
        return None  # repeated: the full parser decides whether they agree
    upstream_close = False
    if _RESP_SPECIAL.search(low) is not None:
        kept = []
        for line, lower in zip(block.split(b"\r\n")[1:], low.split(b"\r\n")[1:], strict=True):
            name, _, value = lower.partition(b":")
            if name == b"connection":
                tokens = _connection_tokens(value)
                if tokens is None:
                    return None
                upstream_close = upstream_close or b"close" in tokens
            elif name == b"keep-alive":
                pass  # hop-by-hop, dropped
            elif _RESP_SPECIAL.match(b"\r\n" + name + b":") is not None:
                return None  # other hop-by-hop fields, and Close (Connection may name it)
            else:
                kept.append(line)
        block = b"\r\n" + b"\r\n".join(kept) if kept else b""
    if method == b"HEAD" or code == 204 or code == 304:
        length = 0  # no body, whatever Content-Length says
    elif lengths == 1:
        i = low.find(_CONTENT_LENGTH) + len(_CONTENT_LENGTH)
        j = low.find(b"\r\n", i)
        value = low[i:j if j >= 0 else len(low)].strip(b" \t")
        if not value.isdigit() or len(value) > 18 or (value[:1] == b"0" and value != b"0"):
            return None  # not canonical: the full parser decides
        length = int(value)
    else:
        return None  # delimited by close: the full path
    out = b"HTTP/1.1 %s %s%s%s\r\nVia: %s\r\n\r\n" % (
        status, reason, block, b"\r\nConnection: close" if client_close else b"",
        http._via_value(http.HTTP_11, via_name))
    return QuickResponse(code, length, out, not upstream_close)

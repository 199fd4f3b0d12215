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

#: field lines: a token name, a colon, a value without control bytes (HTAB allowed) -
#: so also no bare CR or LF
_FIELDS: Final = re.compile(
    rb"(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*)*")
#: the common request line: token method, http:// absolute target (VCHARs, no
#: fragment; authority up to the first / or ?), HTTP/1.1 - the full parser's rules
#: (parse_request, parse_target) for this one shape
_REQUEST_LINE: Final = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([hH][tT][tT][pP]://([!\"$-.0->@-~]*)([/?][!\"$-~]*)?)"
    rb" HTTP/1\.1")
_STATUS_LINE: Final = re.compile(rb"HTTP/1\.1 ([2-5][0-9][0-9]) ([^\x00-\x08\x0a-\x1f\x7f]*)")

#: fields that need a closer look; Content-Length is handled on its own (requests with
#: a body and responses without one are not the common case)
_REQ_SPECIAL: Final = re.compile(
    rb"\r\n(connection|keep-alive|proxy-connection|proxy-authorization|proxy-authenticate"
    rb"|te|trailer|transfer-encoding|upgrade|content-length|via|expect|close):")
_RESP_SPECIAL: Final = re.compile(
    rb"\r\n(connection|keep-alive|proxy-connection|proxy-authenticate|proxy-authorization"
    rb"|te|trailer|transfer-encoding|upgrade|close):")
#: of those, the hop-by-hop fields the common case simply drops
_REQ_DROPPED: Final = frozenset((b"connection", b"keep-alive", b"proxy-connection",
                                 b"proxy-authorization"))
_RESP_DROPPED: Final = frozenset((b"connection", b"keep-alive"))
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


def _plain_fields(block: bytes, limits: http.HeadLimits) -> bool:
    """The field block (``\r\nname: value`` lines) is well formed and within the
    field count. (The caller checks the first line, and keeps the head short enough
    that no line limit applies.)"""
    return block.count(b"\r\n") <= limits.max_headers and _FIELDS.fullmatch(block) is not None


def _drop_hop_by_hop(block: bytes, low: bytes, special: re.Pattern[bytes],
                     dropped: frozenset[bytes]) -> tuple[bytes, bool, bytes | None] | None:
    """``block`` without its droppable hop-by-hop lines, whether Connection said
    ``close``, and the Proxy-Authorization value; None when a field needs the full
    parser (another hop-by-hop or framing field, a Connection naming other fields, a
    field called Close that Connection could name, a repeated Proxy-Authorization)."""
    m = special.search(low)
    if m is None:
        return block, False, None  # the usual case: nothing hop-by-hop
    end = low.find(b"\r\n", m.end())
    if m.group(1) == b"proxy-connection" and (end < 0 or special.search(low, end) is None):
        # what curl and browsers send, alone: cut the one line out
        return (block[:m.start()] + block[end:] if end >= 0 else block[:m.start()]), False, None
    pieces = []
    pos = 0
    close = False
    auth = None
    for m in special.finditer(low):
        name = m.group(1)
        if name not in dropped:
            return None
        end = low.find(b"\r\n", m.end())
        if end < 0:
            end = len(low)
        if name == b"connection":
            tokens = {t.strip(b" \t") for t in low[m.end():end].split(b",")} - {b""}
            if not tokens <= _CONNECTION_OK:
                return None
            close = close or b"close" in tokens
        elif name == b"proxy-authorization":
            if auth is not None:
                return None
            auth = block[m.end():end].strip(b" \t")
        pieces.append(block[pos:m.start()])
        pos = end
    pieces.append(block[pos:])
    return b"".join(pieces), close, auth


def quick_request(raw: bytes, via_name: bytes,
                  limits: http.HeadLimits = http.DEFAULT_LIMITS) -> QuickRequest | None:
    """``raw`` (a request head without its blank line) rewritten to origin form, or
    None when it is not the common case."""
    eol = raw.find(b"\r\n")
    if eol < 0 or len(raw) > limits.max_line:
        return None  # no Host, or long enough for the line limits to matter
    line = _REQUEST_LINE.fullmatch(raw, 0, eol)
    if line is None:
        return None
    method, target, authority, path = line.groups()
    block = raw[eol:]
    if method == b"CONNECT" or not _plain_fields(block, limits):
        return None
    low = block.lower()
    if low.count(b"\r\nhost:") != 1:
        return None
    stripped = _drop_hop_by_hop(block, low, _REQ_SPECIAL, _REQ_DROPPED)
    if stripped is None:
        return None
    if stripped[0] is not block:
        block = stripped[0]
        low = block.lower()
    close, auth = stripped[1], stripped[2]
    try:
        host, port = http._parse_authority(authority, 80)
    except http.HTTPError:
        return None
    if not path:
        path = b"/"
    elif path[0] == 63:  # "?query" with an empty path
        path = b"/" + path
    dest = http.Target("absolute", "http", host, port, path)
    i = low.find(b"\r\nhost:")
    j = block.find(b"\r\n", i + 2)
    if j < 0:
        j = len(block)
    block = block[:i + 2] + block[i + 2:i + 6] + b": " + dest.authority + block[j:]
    out = b"%s %s HTTP/1.1%s\r\nVia: %s\r\n\r\n" % (
        method, path, block, http._via_value(http.HTTP_11, via_name))
    return QuickRequest(method, target, dest, out, close, auth)


def quick_response(raw: bytes, via_name: bytes, method: bytes, client_close: bool,
                   limits: http.HeadLimits = http.DEFAULT_LIMITS) -> QuickResponse | None:
    """``raw`` (a final response head to a :func:`quick_request`) rewritten for the
    client, or None when it is not the common case (no length, chunked, 1xx, 1.0)."""
    if len(raw) > limits.max_line:
        return None
    eol = raw.find(b"\r\n")
    if eol < 0:
        eol = len(raw)
    line = _STATUS_LINE.fullmatch(raw, 0, eol)
    if line is None:
        return None
    status, reason = line.groups()
    block = raw[eol:]
    if not _plain_fields(block, limits):
        return None
    code = int(status)
    low = block.lower()
    lengths = low.count(_CONTENT_LENGTH)
    if lengths > 1:
        return None  # repeated: the full parser decides whether they agree
    stripped = _drop_hop_by_hop(block, low, _RESP_SPECIAL, _RESP_DROPPED)
    if stripped is None:
        return None
    block, upstream_close = stripped[0], stripped[1]
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

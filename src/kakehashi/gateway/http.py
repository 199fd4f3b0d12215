"""HTTP/1.1 message core of the gateway, sans-IO (bytes in, heads and decisions out).

The gateway is the relay server of spec 001: an HTTP forward proxy listening on the
single aggregation port. This module holds everything about HTTP messages that does
not need a socket, so that the hostile-input paths can be fuzzed and benchmarked
without an event loop (in the spirit of h11):

* :class:`HeadReader` cuts request/response heads out of a byte stream and validates
  them (RFC 9112 sections 2-5), with size limits that bound the memory an attacker
  can make the gateway hold;
* :func:`parse_target` classifies the request target (origin, absolute, authority,
  asterisk form) and extracts the destination device and port (claim 2: "read the
  third device and second port out of the processing-content info");
* :func:`request_body` / :func:`response_body` decide message framing (RFC 9112
  section 6), rejecting the ambiguities that enable request smuggling;
* :class:`ChunkedDecoder` / :func:`encode_chunk` are the "chunk" streams (modules 214,
  215); Content-Length framing (the "size-management" streams 217, 218) needs no
  codec, only a byte count;
* :func:`to_origin` is the relay means 22 (Figs. 5 and 7): absolute-form request ->
  origin-form with the destination restored into ``Host``, hop-by-hop fields removed,
  the gateway's own ``Via`` entry recognised (loop -> 508) and appended;
  :func:`response_for_client` is the reverse rewrite for the response;
* :func:`to_absolute` is the client communication module's rewrite (Fig. 6, 501 ->
  503, claim 6); ``to_origin(to_absolute(h))`` gives back ``h`` (504 == 501).

Errors are :class:`HTTPError` carrying the status the gateway should answer with and
a short sentence that becomes the reply body (:func:`error_response`).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final, Literal, NamedTuple

__all__ = [
    "CHUNKED",
    "HOP_BY_HOP",
    "LAST_CHUNK",
    "NO_BODY",
    "UNTIL_CLOSE",
    "BodyFraming",
    "ChunkedDecoder",
    "End",
    "HTTPError",
    "HeadLimits",
    "HeadReader",
    "Headers",
    "RelayedResponse",
    "RequestHead",
    "ResponseHead",
    "Target",
    "Trailers",
    "connect_established",
    "encode_chunk",
    "error_response",
    "format_authority",
    "keep_alive",
    "last_chunk",
    "looks_like_request",
    "parse_request",
    "parse_response",
    "parse_target",
    "relay_request",
    "relay_response",
    "request_body",
    "response_body",
    "response_for_client",
    "strip_hop_by_hop",
    "to_absolute",
    "to_origin",
    "wants_keep_alive",
]

HTTP_11: Final = b"HTTP/1.1"
HTTP_10: Final = b"HTTP/1.0"
CRLF: Final = b"\r\n"

# -- character classes (precompiled for bytes.translate: deleting the allowed bytes
#    leaves b"" exactly when every byte was allowed, in one C-level pass) ---------------
_ALL = bytes(range(256))
_DIGIT = b"0123456789"
_ALPHA = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_TCHAR = b"!#$%&'*+-.^_`|~" + _DIGIT + _ALPHA
_HEXDIG = _DIGIT + b"abcdefABCDEF"
_VCHAR = bytes(range(0x21, 0x7F))
# Bytes that may appear anywhere in a head: no CTL except HTAB, plus CR/LF which are
# then checked to occur only as CRLF pairs.
_HEAD_OK = bytes(b for b in _ALL if b >= 0x20 and b != 0x7F) + b"\t\r\n"
# Hostnames the gateway will resolve: the DNS subset of RFC 3986 reg-name.
_HOST_CHARS = _ALPHA + _DIGIT + b"-._"
_IPV6_CHARS = _HEXDIG + b":."


def _only(data: bytes, allowed: bytes) -> bool:
    """True when every byte of ``data`` is in ``allowed`` (one C pass, no regex)."""
    return not data.translate(None, allowed)


# -- errors and limits -------------------------------------------------------------------
class HTTPError(Exception):
    """A message the gateway must refuse: ``status`` to answer, ``reason`` for people.

    The reason is short and free of secrets because it is sent verbatim as the body of
    the error reply (:func:`error_response`).
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class HeadLimits:
    """Bounds on what one head may cost the gateway (memory and parse time).

    ``max_head`` covers the whole head including its terminating blank line;
    ``max_line`` one request/status/field line; ``max_headers`` the field count.
    """

    max_head: int = 64 * 1024
    max_line: int = 8 * 1024
    max_headers: int = 100


DEFAULT_LIMITS: Final = HeadLimits()


# -- headers -----------------------------------------------------------------------------
def _check_field(name: bytes, value: bytes) -> None:
    """Refuse fields the gateway itself would emit broken (header injection guard)."""
    if not name or not _only(name, _TCHAR):
        raise ValueError(f"invalid header name {name!r}")
    if not _only(value, _HEAD_OK) or b"\r" in value or b"\n" in value:
        raise ValueError(f"invalid header value {value!r}")


class Headers:
    """Ordered header fields with case-insensitive lookup.

    Raw names are kept as received so forwarding does not change their spelling
    (some origins and tests care); a parallel list of lower-cased names makes lookups
    a C-level ``list.index``/``count`` instead of a Python loop.
    """

    __slots__ = ("_items", "_lower")

    def __init__(self, items: Iterable[tuple[bytes, bytes]] = ()) -> None:
        self._items: list[tuple[bytes, bytes]] = []
        self._lower: list[bytes] = []
        for name, value in items:
            self.add(name, value)

    @classmethod
    def _trusted(cls, items: list[tuple[bytes, bytes]], lower: list[bytes]) -> Headers:
        """Build from already validated lists (the parser's fast path)."""
        h = cls.__new__(cls)
        h._items = items
        h._lower = lower
        return h

    def copy(self) -> Headers:
        return Headers._trusted(self._items.copy(), self._lower.copy())

    def get(self, name: bytes, default: bytes | None = None) -> bytes | None:
        """Value of the first field called ``name``."""
        try:
            return self._items[self._lower.index(name.lower())][1]
        except ValueError:
            return default

    def get_all(self, name: bytes) -> list[bytes]:
        """Values of every field called ``name``, in order."""
        return self._values(name.lower())

    def _values(self, key: bytes) -> list[bytes]:
        """``get_all`` for an already lower-cased name; one field is the fast case."""
        lower = self._lower
        n = lower.count(key)
        if n <= 1:
            return [self._items[lower.index(key)][1]] if n else []
        return [v for k, (_, v) in zip(lower, self._items, strict=True) if k == key]

    def tokens(self, name: bytes) -> list[bytes]:
        """Lower-cased comma-separated list members of every ``name`` field.

        For list-valued fields (Connection, Transfer-Encoding, TE) where RFC 9110 5.3
        makes several field lines equivalent to one joined with commas.
        """
        return self._tokens(name.lower())

    def _tokens(self, key: bytes) -> list[bytes]:
        """``tokens`` for an already lower-cased name."""
        if key not in self._lower:
            return []
        out: list[bytes] = []
        for value in self._values(key):
            for member in value.lower().split(b","):
                member = member.strip(b" \t")
                if member:
                    out.append(member)
        return out

    def count(self, name: bytes) -> int:
        return self._lower.count(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, bytes) and name.lower() in self._lower

    def remove(self, name: bytes) -> int:
        """Delete every field called ``name``; return how many there were."""
        key = name.lower()
        n = self._lower.count(key)
        if n:
            keep = [i for i, k in enumerate(self._lower) if k != key]
            self._items = [self._items[i] for i in keep]
            self._lower = [self._lower[i] for i in keep]
        return n

    def set(self, name: bytes, value: bytes) -> None:
        """Give ``name`` exactly one value, in the position (and spelling) of its first
        occurrence so a rewrite does not reorder the head; append when absent."""
        _check_field(name, value)
        self._set_trusted(name, name.lower(), value)

    def _set_trusted(self, name: bytes, key: bytes, value: bytes) -> None:
        """``set`` for fields this module built from validated parts (hot path)."""
        try:
            i = self._lower.index(key)
        except ValueError:
            self._items.append((name, value))
            self._lower.append(key)
            return
        self._items[i] = (self._items[i][0], value)
        if self._lower.count(key) > 1:
            keep = [j for j, k in enumerate(self._lower) if k != key or j == i]
            self._items = [self._items[j] for j in keep]
            self._lower = [self._lower[j] for j in keep]

    def add(self, name: bytes, value: bytes) -> None:
        """Append a field (a repeated name adds a list member, e.g. another Via)."""
        _check_field(name, value)
        self._items.append((name, value))
        self._lower.append(name.lower())

    def _add_trusted(self, name: bytes, lower: bytes, value: bytes) -> None:
        """``add`` for fields this module built from validated parts (hot path)."""
        self._items.append((name, value))
        self._lower.append(lower)

    def insert(self, index: int, name: bytes, value: bytes) -> None:
        """Insert a field at ``index`` (Host conventionally goes first)."""
        _check_field(name, value)
        self._items.insert(index, (name, value))
        self._lower.insert(index, name.lower())

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self._items == other._items

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"

    def _serialize(self, first_line: bytes) -> bytes:
        """``first_line``, the fields and the blank line, CRLF-joined in one go (a
        single comprehension and join measured fastest for ten-odd fields)."""
        return CRLF.join([first_line, *[n + b": " + v for n, v in self._items], b"", b""])


# -- heads -------------------------------------------------------------------------------
@dataclass(slots=True)
class RequestHead:
    """A parsed request line plus header fields (no body)."""

    method: bytes
    target: bytes
    version: bytes
    headers: Headers

    def serialize(self) -> bytes:
        return self.headers._serialize(b"%s %s %s" % (self.method, self.target, self.version))


@dataclass(slots=True)
class ResponseHead:
    """A parsed status line plus header fields (no body)."""

    version: bytes
    status: int
    reason: bytes
    headers: Headers

    def serialize(self) -> bytes:
        return self.headers._serialize(b"%s %d %s" % (self.version, self.status, self.reason))


# -- head parsing ------------------------------------------------------------------------
def _parse_fields(lines: list[bytes], limits: HeadLimits) -> Headers:
    """Field lines -> Headers (RFC 9112 section 5). Lines are CRLF-free already.

    Every refusal is a 400 naming the rule, because a proxy that is lenient here is
    one that can be used for request smuggling. Names are validated and
    lower-cased in bulk (one join, one translate, one lower) rather than per line.
    """
    if len(lines) > limits.max_headers:
        raise HTTPError(431, f"more than {limits.max_headers} header fields")
    items: list[tuple[bytes, bytes]] = []
    names: list[bytes] = []
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep:
            raise _field_error(line, sep)
        names.append(name)
        items.append((name, value.strip(b" \t")))
    joined = b"\n".join(names)  # no name holds LF: bare LF was refused before
    if joined.translate(None, _TCHAR) != b"\n" * (len(names) - 1) or not all(names):
        for line in lines:  # slow path: find the offending line and say what is wrong
            name, sep, _ = line.partition(b":")
            if not name or name.translate(None, _TCHAR):
                raise _field_error(line, sep)
    return Headers._trusted(items, joined.lower().split(b"\n") if names else [])


def _field_error(line: bytes, sep: bytes) -> HTTPError:
    """Say which field-line rule was broken (slow path only)."""
    if line[:1] in (b" ", b"\t"):
        return HTTPError(400, "obsolete line folding in header")
    if not sep:
        return HTTPError(400, "header line without a colon")
    name = line.partition(b":")[0]
    if name and name.rstrip(b" \t") != name:
        return HTTPError(400, "whitespace between header name and colon")
    return HTTPError(400, "invalid header name")


def _split_head(head: bytes, limits: HeadLimits) -> list[bytes]:
    """Validate the raw bytes of a head and cut it into lines.

    Whole-head checks first (control bytes, bare CR or LF) so the per-line work is
    only splitting; line lengths are examined only when the head is long enough for
    one of them to exceed the limit.
    """
    if head.translate(None, _HEAD_OK):
        raise HTTPError(400, "control character in message head")
    lines = head.split(CRLF)
    n = len(lines) - 1
    if head.count(b"\r") != n or head.count(b"\n") != n:
        raise HTTPError(400, "bare CR or LF in message head (lines must end in CRLF)")
    if len(head) > limits.max_line and len(lines[0]) > limits.max_line:
        raise HTTPError(414, "request line too long")
    if len(head) > limits.max_line and max(map(len, lines)) > limits.max_line:
        raise HTTPError(431, "header line too long")
    return lines


def _parse_version(version: bytes) -> bytes:
    if version in (HTTP_11, HTTP_10):
        return version
    if (
        len(version) == 8
        and version.startswith(b"HTTP/")
        and version[5:6].isdigit()
        and version[6:7] == b"."
        and version[7:8].isdigit()
    ):
        raise HTTPError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    raise HTTPError(400, "malformed HTTP version")


def _parse_request(lines: list[bytes], limits: HeadLimits) -> RequestHead:
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        if len(parts) == 2:
            raise HTTPError(400, "request line without HTTP version (HTTP/0.9 is not supported)")
        raise HTTPError(400, "malformed request line")
    method, target, version = parts
    version = _parse_version(version)
    if not method or method.translate(None, _TCHAR):
        raise HTTPError(400, "invalid request method")
    if not target or target.translate(None, _VCHAR):
        raise HTTPError(400, "invalid request target")
    headers = _parse_fields(lines[1:], limits)
    hosts = headers._lower.count(b"host")
    if hosts > 1:
        raise HTTPError(400, "more than one Host header")
    if hosts == 0 and version == HTTP_11:
        raise HTTPError(400, "HTTP/1.1 request without a Host header")
    return RequestHead(method, target, version, headers)


def _parse_response(lines: list[bytes], limits: HeadLimits) -> ResponseHead:
    version, _, rest = lines[0].partition(b" ")
    status, _, reason = rest.partition(b" ")
    if version != HTTP_11 and version != HTTP_10:
        raise HTTPError(502, "upstream speaks an unsupported HTTP version")
    if len(status) != 3 or not status.isdigit() or not b"100" <= status <= b"599":
        raise HTTPError(502, "upstream sent a malformed status code")
    return ResponseHead(version, int(status), reason, _parse_fields(lines[1:], limits))


def parse_request(raw: bytes, limits: HeadLimits = DEFAULT_LIMITS) -> RequestHead:
    """A request head's bytes (without the blank line) -> RequestHead, or HTTPError."""
    return _parse_request(_split_head(raw, limits), limits)


def parse_response(raw: bytes, limits: HeadLimits = DEFAULT_LIMITS) -> ResponseHead:
    """A response head's bytes -> ResponseHead; every refusal is a 502."""
    try:
        return _parse_response(_split_head(raw, limits), limits)
    except HTTPError as exc:
        raise _as_upstream_error(exc) from None


def _as_upstream_error(exc: HTTPError) -> HTTPError:
    if exc.status == 502:
        return exc
    return HTTPError(502, f"upstream sent a bad response head: {exc.reason}")

MAX_LEADING_BLANK: Final = 64  # bytes of CRLF ignored before one request line


class HeadReader:
    """Incremental head parser: ``feed()`` bytes, ask ``next_head()``.

    It holds at most ``max_head`` bytes while waiting for a head (plus whatever one
    ``feed`` brought), refusing with 414/431 as soon as a limit is certainly
    exceeded, so a slow or endless head costs bounded memory. Heads must end in
    CRLF CRLF (strict: a bare LF head is refused, not guessed at). Errors in a
    response head are reported as 502: the gateway's client is told the upstream
    misbehaved.
    """

    __slots__ = ("_buf", "_line_done", "_scan", "buffered", "limits")

    def __init__(self, limits: HeadLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._buf: bytes | bytearray = b""
        #: bytes held (``len(self._buf)``, kept beside it: the fast lane asks once or
        #: twice per request, and a property is a Python call each time)
        self.buffered = 0
        self._scan = 0  # where to resume looking for CRLF CRLF
        self._line_done = False  # the first line's CRLF has been seen

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes. A whole head in one segment is never copied here."""
        if not self._buf:
            self._buf = bytes(data)
        else:
            if isinstance(self._buf, bytes):
                self._buf = bytearray(self._buf)
            self._buf += data
        self.buffered = len(self._buf)

    def take_rest(self) -> bytes:
        """Bytes received beyond the last head (start of a body, pipelined requests)."""
        rest = bytes(self._buf)
        self._buf = b""
        self.buffered = 0
        self._scan = 0
        self._line_done = False
        return rest

    def next_head(
        self, kind: Literal["request", "response"] = "request"
    ) -> RequestHead | ResponseHead | None:
        """The next complete head, or None when more bytes are needed."""
        if kind == "request":
            return self.next_request()
        return self.next_response()

    def next_request(self) -> RequestHead | None:
        """Like ``next_head("request")``, typed."""
        raw = self.next_raw(skip_blank=True)
        return None if raw is None else parse_request(raw, self.limits)

    def next_response(self) -> ResponseHead | None:
        """Like ``next_head("response")``, typed; every refusal is a 502."""
        try:
            raw = self.next_raw(skip_blank=False)
        except HTTPError as exc:
            raise _as_upstream_error(exc) from None
        return None if raw is None else parse_response(raw, self.limits)

    def next_raw(self, *, skip_blank: bool) -> bytes | None:
        """The next complete head's bytes (without its blank line), unparsed, once the
        size limits are known to hold; for callers with a quicker common case
        (``gateway.quick``) that fall back to :func:`parse_request` /
        :func:`parse_response`."""
        buf = self._buf
        if skip_blank and buf[:2] == CRLF:
            # RFC 9112 2.2: ignore empty lines before a request line (old clients
            # send a CRLF after a POST body). Bounded, so a flood of them is cut in
            # one copy; more than that in one go reads as an empty request line.
            k = 2
            while k < MAX_LEADING_BLANK and buf.startswith(CRLF, k):
                k += 2
            buf = buf[k:]
            self._buf = buf
            self.buffered = len(buf)
            self._scan = 0
        end = buf.find(b"\r\n\r\n", self._scan)
        if end < 0:
            self._check_partial(buf)
            return None
        limits = self.limits
        if end + 4 > limits.max_head:
            raise HTTPError(431, "request header section too large")
        head = bytes(buf[:end])
        self._buf = buf = buf[end + 4 :]
        self.buffered = len(buf)
        self._scan = 0
        self._line_done = False
        return head

    def _check_partial(self, buf: bytes | bytearray) -> None:
        """Refuse an incomplete head that can no longer fit the limits."""
        limits = self.limits
        if not self._line_done:
            eol = buf.find(CRLF, 0, limits.max_line + 2)
            if eol < 0:
                if len(buf) > limits.max_line + 1:
                    raise HTTPError(414, "request line too long")
            else:
                self._line_done = True
        if len(buf) > limits.max_head:
            raise HTTPError(431, "request header section too large")
        if buf.find(b"\n\n", max(0, self._scan - 1)) >= 0:
            # a bare-LF blank line: the head will never end in CRLF CRLF, so say so
            # now rather than after a timeout
            raise HTTPError(400, "bare LF in message head (lines must end in CRLF)")
        self._scan = max(0, len(buf) - 3)


# -- is this HTTP at all? (the one-port mux asks, on a connection's first bytes) -----------
_T = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
#: a whole request-line start: token SP target SP HTTP/x.y (RFC 9112 3), after at most
#: MAX_LEADING_BLANK bytes of empty lines. The target takes any byte but SP, CR and
#: LF: which targets are valid is the parser's to say (with a 400 that explains).
_REQUEST_LINE_START: Final = re.compile(
    rb"(?:\r\n){0,%d}%s+ [^ \r\n]+ HTTP/[0-9]\.[0-9]" % (MAX_LEADING_BLANK // 2, _T))
#: every proper prefix of one (what a sender may have sent so far)
_REQUEST_LINE_PREFIX: Final = re.compile(
    rb"(?:\r\n){0,%d}(?:\r|%s+(?: (?:[^ \r\n]+(?: (?:H(?:T(?:T(?:P(?:/(?:[0-9]\.?)?)?)?)?)?)?)?)?)?)?"  # noqa: E501
    % (MAX_LEADING_BLANK // 2, _T))


def looks_like_request(first: bytes, max_line: int = DEFAULT_LIMITS.max_line) -> bool | None:
    """Do a connection's first bytes start an HTTP/1.x request? (a mux matcher)

    True once ``method SP target SP HTTP/x.y`` is there - any token method, so
    WebDAV's PROPFIND or a method registered tomorrow is HTTP as much as GET - or
    once a request line that is still well formed has grown past ``max_line`` (so
    the parser answers 414 rather than the connection being dropped). None while
    the bytes so far could still become one; False as soon as they cannot, so
    other protocols on the same port (a TLS record, kakehashi's ``KKH`` preamble,
    SSH's banner) are told apart after a few bytes. Incremental: once True or
    False, more bytes never change the answer.
    """
    if _REQUEST_LINE_START.match(first) is not None:
        return True
    if _REQUEST_LINE_PREFIX.fullmatch(first) is None:
        return False
    return True if len(first) >= max_line else None


# -- request targets ---------------------------------------------------------------------
TargetForm = Literal["origin", "absolute", "authority", "asterisk"]
DEFAULT_PORTS: Final = {"http": 80, "https": 443}


class Target(NamedTuple):
    """Where a request is going (RFC 9112 3.2).

    ``host`` is a str ready for a resolver (IPv6 without brackets, spelling kept as
    sent); ``port`` is explicit or the scheme default; ``path`` is the origin-form
    target (path and query) for absolute and origin form. Origin and asterisk forms
    carry no destination (``host == ""``, ``port == 0``): such requests are addressed
    to the gateway itself, not proxied. (A NamedTuple: immutable and, unlike a
    frozen dataclass, cheap to build once per request.)
    """

    form: TargetForm
    scheme: str | None
    host: str
    port: int
    path: bytes

    @property
    def authority(self) -> bytes:
        """``host[:port]`` for a Host header: the scheme's default port is omitted."""
        default = DEFAULT_PORTS.get(self.scheme) if self.scheme else None
        return format_authority(self.host, self.port, default)


@functools.lru_cache(maxsize=1024)
def format_authority(host: str, port: int, default_port: int | None = None) -> bytes:
    """``host:port`` with IPv6 literals bracketed and ``default_port`` left out."""
    h = host.encode("ascii")
    if b":" in h and not h.startswith(b"["):
        h = b"[" + h + b"]"
    if port == default_port:
        return h
    return b"%s:%d" % (h, port)


def _parse_host(raw: bytes) -> str:
    """reg-name (DNS subset), IPv4 or bracketed IPv6 -> resolver-ready str."""
    if raw.startswith(b"["):
        inner = raw[1:-1]
        if not raw.endswith(b"]") or not inner or not _only(inner, _IPV6_CHARS):
            raise HTTPError(400, "invalid IPv6 address in request target")
        try:
            ipaddress.IPv6Address(inner.decode("ascii"))
        except ValueError:
            raise HTTPError(400, "invalid IPv6 address in request target") from None
        return inner.decode("ascii")  # spelling kept, like hostnames
    if not raw or len(raw) > 253 or not _only(raw, _HOST_CHARS):
        raise HTTPError(400, "invalid host in request target")
    return raw.decode("ascii")


@functools.lru_cache(maxsize=1024)
def _parse_authority(authority: bytes, default_port: int | None) -> tuple[str, int]:
    """``host[:port]`` -> (host, port); no default means the port is required.

    Cached: a proxy sees the same few authorities over and over, and refusals
    (exceptions) are not cached, so hostile input only ever takes the slow path.
    """
    if b"@" in authority:
        raise HTTPError(400, "credentials in the request target are not accepted")
    if authority.startswith(b"["):
        close = authority.find(b"]")
        host_raw, rest = authority[: close + 1], authority[close + 1 :]
        if close < 0 or (rest and not rest.startswith(b":")):
            raise HTTPError(400, "invalid IPv6 address in request target")
        port_raw = rest[1:] if rest else None
    else:
        host_raw, colon, port_raw_ = authority.partition(b":")
        port_raw = port_raw_ if colon else None
    host = _parse_host(host_raw)
    if not port_raw:  # absent, or empty after ':' (RFC 3986 allows that)
        if default_port is None:
            raise HTTPError(400, "CONNECT target needs an explicit port (host:port)")
        return host, default_port
    if len(port_raw) > 5 or not port_raw.isdigit() or not 0 < int(port_raw) < 65536:
        raise HTTPError(400, "invalid port in request target")
    return host, int(port_raw)


# The common case in one C-level match: http://authority[/path][?query], no fragment.
_HTTP_TARGET: Final = re.compile(rb"[hH][tT][tT][pP]://([^/?#]*)([/?][^#]*)?\Z")


def _absolute_from_match(m: re.Match[bytes]) -> Target:
    authority, path = m.groups()
    host, port = _parse_authority(authority, 80)
    if not path:
        path = b"/"
    elif path[0] == 63:  # "?query" with an empty path
        path = b"/" + path
    return Target("absolute", "http", host, port, path)


def _absolute_target(target: bytes) -> Target:
    """Everything the fast match refused: explain why, or parse the odd case."""
    scheme_raw, _, rest = target.partition(b"://")
    scheme = scheme_raw.lower()
    if scheme == b"https":
        raise HTTPError(400, "https:// targets are not proxied in plain HTTP; use CONNECT")
    if scheme != b"http":
        raise HTTPError(400, "only http:// targets are proxied")
    if b"#" in rest:
        raise HTTPError(400, "fragment in request target")
    cut = len(rest)
    for sep in (b"/", b"?"):
        i = rest.find(sep)
        if 0 <= i < cut:
            cut = i
    authority, path = rest[:cut], rest[cut:]
    host, port = _parse_authority(authority, 80)
    if not path.startswith(b"/"):
        path = b"/" + path
    return Target("absolute", "http", host, port, path)


def parse_target(head: RequestHead) -> Target:
    """Classify the request target and read the destination out of it (claim 2).

    CONNECT must use authority form and only CONNECT may; ``*`` only with OPTIONS;
    absolute form only for http:// (https goes through CONNECT).
    """
    target = head.target
    method = head.method
    if method != b"CONNECT" and (m := _HTTP_TARGET.match(target)) is not None:
        return _absolute_from_match(m)  # the proxy's common case first
    if method == b"CONNECT":
        if b"/" in target:
            raise HTTPError(400, "CONNECT needs a host:port target")
        host, port = _parse_authority(target, None)
        return Target("authority", None, host, port, b"")
    if target.startswith(b"/"):
        if b"#" in target:
            raise HTTPError(400, "fragment in request target")
        return Target("origin", None, "", 0, target)
    if target == b"*":
        if method != b"OPTIONS":
            raise HTTPError(400, "asterisk target is only valid for OPTIONS")
        return Target("asterisk", None, "", 0, b"*")
    if b"://" in target:
        return _absolute_target(target)
    raise HTTPError(400, "invalid request target")


# -- body framing ------------------------------------------------------------------------
BodyFraming = tuple[str] | tuple[str, int]
NO_BODY: Final = ("none",)
CHUNKED: Final = ("chunked",)
UNTIL_CLOSE: Final = ("close",)
MAX_CONTENT_LENGTH_DIGITS: Final = 18  # < 2**63: Python ints are fine, peers' are not


def _content_length(values: list[bytes], status: int) -> int:
    """One Content-Length from possibly repeated/listed values (RFC 9110 8.6).

    ``5, 5`` or two equal fields are accepted as 5; anything that disagrees is a
    framing ambiguity and refused.
    """
    if len(values) == 1:
        value = values[0]
        if value.isdigit() and len(value) <= MAX_CONTENT_LENGTH_DIGITS:
            return int(value)
    lengths = set()
    for value in values:
        for member in value.split(b","):
            member = member.strip(b" \t")
            if not member.isdigit() or len(member) > MAX_CONTENT_LENGTH_DIGITS:
                raise HTTPError(status, "invalid Content-Length")
            lengths.add(int(member))
    if len(lengths) != 1:
        raise HTTPError(status, "conflicting Content-Length values")
    return lengths.pop()


def request_body(head: RequestHead) -> BodyFraming:
    """How the request body is delimited (RFC 9112 6.3), refusing smuggling vectors.

    Only ``Transfer-Encoding: chunked`` alone is accepted: the gateway re-frames the
    body it forwards, so it could not preserve another transfer coding (501), and
    a final coding other than chunked leaves the length unknowable (400).
    """
    headers = head.headers
    if b"transfer-encoding" in headers._lower:
        if head.version == HTTP_10:
            raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if b"content-length" in headers._lower:
            raise HTTPError(400, "request has both Content-Length and Transfer-Encoding")
        codings = headers._tokens(b"transfer-encoding")
        if not codings or codings[-1] != b"chunked":
            raise HTTPError(400, "request transfer coding does not end in chunked")
        if codings.count(b"chunked") > 1:
            raise HTTPError(400, "chunked applied more than once")
        if len(codings) != 1:
            raise HTTPError(501, "transfer codings other than chunked are not supported")
        return CHUNKED
    if b"content-length" in headers._lower:
        n = _content_length(headers._values(b"content-length"), 400)
        return ("length", n)
    return NO_BODY


def response_body(head: ResponseHead, request_method: bytes) -> BodyFraming:
    """How the response body is delimited (RFC 9112 6.3), for ``request_method``.

    A 2xx to CONNECT has no body: the connection becomes a tunnel. Framing the
    gateway cannot follow exactly is a 502 rather than a guess.
    """
    status = head.status
    if request_method == b"HEAD" or status < 200 or status == 204 or status == 304:
        return NO_BODY
    if request_method == b"CONNECT" and status < 300:
        return NO_BODY
    headers = head.headers
    if b"transfer-encoding" in headers._lower:
        if head.version == HTTP_10:
            raise HTTPError(502, "upstream sent Transfer-Encoding in an HTTP/1.0 response")
        if headers._tokens(b"transfer-encoding") != [b"chunked"]:
            raise HTTPError(502, "upstream used a transfer coding other than chunked")
        return CHUNKED  # overrides any Content-Length (RFC 9112 6.3 rule 3)
    if b"content-length" in headers._lower:
        return ("length", _content_length(headers._values(b"content-length"), 502))
    return UNTIL_CLOSE


# -- chunked coding ----------------------------------------------------------------------
LAST_CHUNK: Final = b"0\r\n\r\n"
MAX_CHUNK_SIZE: Final = 1 << 40
MAX_CHUNK_SIZE_DIGITS: Final = 16


def encode_chunk(data: bytes) -> bytes:
    """One chunk; empty data gives b"" because an empty chunk would end the body."""
    if not data:
        return b""
    return b"".join((b"%x\r\n" % len(data), data, CRLF))


def last_chunk(trailers: Headers | None = None) -> bytes:
    """The terminating chunk, with trailer fields when there are any."""
    if not trailers:
        return LAST_CHUNK
    return trailers._serialize(b"0")


@dataclass(frozen=True, slots=True)
class Trailers:
    """Trailer fields that followed the last chunk."""

    headers: Headers


@dataclass(frozen=True, slots=True)
class End:
    """The chunked body is complete."""


_END: Final = End()
_SIZE, _DATA, _DATA_CRLF, _TRAILERS, _DONE = range(5)


class ChunkedDecoder:
    """Streaming chunked-body decoder: ``feed()`` bytes, drain ``events()``.

    Data is yielded as soon as it arrives, so a chunk of any size costs at most one
    received segment of memory; only chunk-size lines (<= ``max_line``) and the
    trailer section (<= ``max_head``) are ever held back. While in a chunk, a fed
    ``bytes`` object is yielded without copying when it lies wholly inside the chunk.
    ``error_status`` is 400 for request bodies and 502 for response bodies (the
    upstream broke framing). Drain ``events()`` after every ``feed()``.
    """

    __slots__ = ("_buf", "_pos", "_remaining", "_scan", "_state", "error_status", "limits")

    def __init__(self, limits: HeadLimits = DEFAULT_LIMITS, *, error_status: int = 400) -> None:
        self.limits = limits
        self.error_status = error_status
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._scan = 0  # trailer search resumes here (relative to _pos)
        self._state = _SIZE
        self._remaining = 0

    @property
    def done(self) -> bool:
        return self._state == _DONE

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes.

        Leftovers (a partial size line or trailer section) are accumulated in a
        bytearray so that a peer dribbling one byte per segment costs linear, not
        quadratic, copying.
        """
        buf, pos = self._buf, self._pos
        if self.done and len(buf) - pos + len(data) > self.limits.max_head:
            # what follows the last chunk is the next message: the caller must take it
            # with unconsumed(); the decoder will not hold more than a head's worth
            raise self._fail("too much data after the end of a chunked body")
        if pos >= len(buf):
            self._buf = data if type(data) is bytes else bytes(data)
        else:
            if type(buf) is bytes:
                buf = bytearray(buf[pos:])
            else:
                del buf[:pos]
            buf += data
            self._buf = buf
        self._pos = 0

    def unconsumed(self) -> bytes:
        """Bytes after the end of the body (the next pipelined message)."""
        return bytes(self._buf[self._pos :])

    def events(self) -> Iterator[bytes | Trailers | End]:
        """Data pieces (bytes), then ``Trailers`` if any were sent, then ``End``."""
        while True:
            state = self._state
            if state == _DATA:
                piece = self._data()
            elif state == _SIZE:
                piece = self._size_line()
            elif state == _DATA_CRLF:
                piece = self._data_crlf()
            elif state == _TRAILERS:
                piece = self._trailers()
            else:
                return
            if piece is None:
                return
            if piece:  # b"" means "state advanced, nothing to report"
                yield piece

    def _fail(self, reason: str) -> HTTPError:
        return HTTPError(self.error_status, reason)

    def _data(self) -> bytes | None:
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if not avail:
            return None
        k = min(avail, self._remaining)
        whole = pos == 0 and k == avail and type(buf) is bytes
        piece = buf if whole else bytes(buf[pos : pos + k])
        self._pos = pos + k
        self._remaining -= k
        if not self._remaining:
            self._state = _DATA_CRLF
        return piece

    def _data_crlf(self) -> bytes | None:
        buf, pos = self._buf, self._pos
        got = buf[pos : pos + 2]
        if got != CRLF:
            if got == b"\r" or not got:
                return None
            raise self._fail("chunk data not followed by CRLF")
        self._pos = pos + 2
        self._state = _SIZE
        return b""

    def _size_line(self) -> bytes | None:
        buf, pos = self._buf, self._pos
        max_line = self.limits.max_line
        eol = buf.find(CRLF, pos, pos + max_line + 2)
        if eol < 0:
            if len(buf) - pos > max_line + 1:
                raise self._fail("chunk size line too long")
            return None
        size, _, ext = bytes(buf[pos:eol]).partition(b";")
        size = size.rstrip(b" \t")  # BWS before a chunk extension
        if not size or len(size) > MAX_CHUNK_SIZE_DIGITS or size.translate(None, _HEXDIG):
            raise self._fail("invalid chunk size")
        if ext and (not _only(ext, _HEAD_OK) or b"\r" in ext or b"\n" in ext):
            raise self._fail("invalid chunk extension")
        n = int(size, 16)
        if n > MAX_CHUNK_SIZE:
            raise self._fail("chunk too large")
        self._pos = eol + 2
        if n:
            self._remaining = n
            self._state = _DATA
        else:
            self._state = _TRAILERS
            self._scan = 0
        return b""

    def _trailers(self) -> Trailers | End | None:
        buf, pos = self._buf, self._pos
        head = buf[pos : pos + 2]
        if head == CRLF:
            self._pos = pos + 2
            self._state = _DONE
            return _END
        if len(head) < 2:
            return None
        max_head = self.limits.max_head
        end = buf.find(b"\r\n\r\n", pos + self._scan, pos + max_head)
        if end < 0:
            if len(buf) - pos >= max_head:
                raise self._fail("chunked trailer section too large")
            self._scan = max(0, len(buf) - pos - 3)
            return None
        try:
            fields = _parse_fields(_split_head(bytes(buf[pos:end]), self.limits), self.limits)
        except HTTPError as exc:
            raise self._fail(f"bad chunked trailer: {exc.reason}") from None
        self._pos = end + 2  # the final CRLF is left to produce End on the next step
        return Trailers(fields)


# -- connection management ---------------------------------------------------------------
def wants_keep_alive(req_head: RequestHead) -> bool:
    """Does the client ask to keep its connection after this exchange? (its
    Connection field and version: the one client-side rule, for relayed responses
    and the gateway's own replies alike)"""
    tokens = req_head.headers._tokens(b"connection")
    return b"close" not in tokens and (req_head.version == HTTP_11 or b"keep-alive" in tokens)


def keep_alive(req_head: RequestHead, resp_head: ResponseHead,
               framing: BodyFraming | None = None) -> bool:
    """May this connection carry another request after this exchange? (RFC 9112 9.3)

    ``close`` from either side ends it; an HTTP/1.0 side must have asked for
    ``keep-alive``; a close-delimited response or a tunnel ends it too. ``framing``:
    the response's :func:`response_body`, when the caller has it already.
    """
    if not wants_keep_alive(req_head):
        return False
    resp_conn = resp_head.headers._tokens(b"connection")
    if b"close" in resp_conn:
        return False
    if resp_head.version == HTTP_10 and b"keep-alive" not in resp_conn:
        return False
    if resp_head.status == 101 or (req_head.method == b"CONNECT" and 200 <= resp_head.status < 300):
        return False
    if framing is not None:  # already known to the caller
        return framing != UNTIL_CLOSE
    try:
        return response_body(resp_head, req_head.method) != UNTIL_CLOSE
    except HTTPError:
        return False


# -- proxy rewriting ---------------------------------------------------------------------
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


def strip_hop_by_hop(headers: Headers) -> Headers:
    """A copy without hop-by-hop fields, including those named in Connection.

    Framing fields (Transfer-Encoding) go too: the sender of the next hop decides
    framing and adds them back (:func:`to_origin`, :func:`response_for_client`).
    """
    lower = headers._lower
    drop = HOP_BY_HOP
    if b"connection" in lower:
        drop = drop.union(headers._tokens(b"connection"))
    elif drop.isdisjoint(lower):
        return headers.copy()
    items: list[tuple[bytes, bytes]] = []
    kept: list[bytes] = []
    for k, item in zip(lower, headers._items, strict=False):  # a loop: 3.11 comprehensions
        if k not in drop:  # cost a function call each, heavy for ten headers
            items.append(item)
            kept.append(k)
    return Headers._trusted(items, kept)


@functools.lru_cache(maxsize=64)
def _via_value(version: bytes, via_name: bytes) -> bytes:
    """``1.1 name`` for a message received as ``version``; validated once per name
    (it is configuration, the same on every request)."""
    if not via_name or via_name.translate(None, _VCHAR):
        raise ValueError(f"invalid via name {via_name!r}")
    return (b"1.0 " if version == HTTP_10 else b"1.1 ") + via_name


def check_via_loop(headers: Headers, via_name: bytes) -> None:
    """Raise 508 when a Via entry already names this gateway (a forwarding loop).

    Each Via member is ``protocol received-by [comment]``; the received-by word is
    compared case-insensitively.
    """
    if b"via" not in headers._lower:
        return
    me = via_name.lower()
    for value in headers._values(b"via"):
        for member in value.split(b","):
            words = member.split()
            if len(words) >= 2 and words[1].lower() == me:
                raise HTTPError(508, "request loops through this gateway")


def _set_framing(headers: Headers, framing: BodyFraming) -> None:
    """Write the framing fields for an outgoing message whose body is ``framing``."""
    if framing[0] == "length":
        n = b"%d" % framing[1]  # type: ignore[misc]
        headers._set_trusted(b"Content-Length", b"content-length", n)
    elif framing == CHUNKED:
        headers.remove(b"content-length")
        headers._add_trusted(b"Transfer-Encoding", b"transfer-encoding", b"chunked")


def to_origin(req: RequestHead, via_name: bytes) -> tuple[Target, RequestHead]:
    """:func:`relay_request` without the body framing."""
    target, _, out = relay_request(req, via_name)
    return target, out


def relay_request(req: RequestHead, via_name: bytes) -> tuple[Target, BodyFraming, RequestHead]:
    """Relay means 22 (Figs. 5, 7): the request to send to the destination server,
    where it goes and how its body is framed (one pass for the proxy's hot path).

    Absolute form ``GET http://host:port/p`` becomes ``GET /p`` with ``Host`` restored
    to the destination (in place, so the head is otherwise unchanged), hop-by-hop
    fields removed, the body framing re-declared (Content-Length kept, or chunked)
    and ``Via`` appended. The HTTP version is kept as received so the spec's
    round trip holds (504 == 501), although RFC 9110 2.5 would have a proxy send its
    own. Other forms are returned unchanged with their :class:`Target`: origin and
    asterisk forms are for the gateway itself, authority form is a CONNECT tunnel;
    the caller dispatches on ``target.form``. A Via entry naming ``via_name`` is a
    loop: HTTPError 508.
    """
    target = parse_target(req)
    framing = request_body(req)  # decided on the received fields, before stripping
    if target.form == "origin" or target.form == "asterisk":
        return target, framing, req
    check_via_loop(req.headers, via_name)
    if target.form == "authority":
        return target, framing, req
    headers = strip_hop_by_hop(req.headers)
    authority = target.authority  # built from validated parts
    if b"host" in headers._lower:
        headers._set_trusted(b"Host", b"host", authority)
    else:
        headers._items.insert(0, (b"Host", authority))
        headers._lower.insert(0, b"host")
    _set_framing(headers, framing)
    offer = upgrade_offer(req, framing)
    if offer is not None:  # relayed on purpose: the origin decides whether to switch
        headers._add_trusted(b"Connection", b"connection", b"Upgrade")
        headers._add_trusted(b"Upgrade", b"upgrade", offer)
    headers._add_trusted(b"Via", b"via", _via_value(req.version, via_name))
    return target, framing, RequestHead(req.method, target.path, req.version, headers)


# -- protocol upgrade (RFC 9110 7.8), e.g. WebSocket through the relay means -------------
def _protocols(value: bytes) -> list[bytes] | None:
    """The members of an Upgrade value (``name[/version]``), or None if malformed."""
    out = []
    for member in value.split(b","):
        member = member.strip(b" \t")
        name, slash, version = member.partition(b"/")
        if not name or not _only(name, _TCHAR) or (slash and not (
                version and _only(version, _TCHAR))):
            return None
        out.append(member)
    return out or None


def upgrade_offer(req: RequestHead, framing: BodyFraming) -> bytes | None:
    """The Upgrade value the gateway forwards for ``req``, or None.

    Upgrade is hop-by-hop, so a proxy only passes it on deliberately: the request
    must be HTTP/1.1 without a body, name ``upgrade`` in Connection and carry one
    well-formed Upgrade field. Anything else is stripped as before and the origin
    answers as plain HTTP. After a 101 the connection is a byte tunnel to the same
    checked target, as with CONNECT.
    """
    if req.version != HTTP_11 or framing != NO_BODY:
        return None
    if b"upgrade" not in req.headers._lower or \
            b"upgrade" not in req.headers._tokens(b"connection"):
        return None
    values = req.headers._values(b"upgrade")
    if len(values) != 1 or _protocols(values[0]) is None:
        return None
    return values[0]


def upgraded_response(resp: ResponseHead, via_name: bytes, offered: bytes | None) -> ResponseHead:
    """The 101 to send to the client, after checking the origin switched to a protocol
    the client offered (RFC 9110 7.8: a 101 names it in Upgrade); else HTTPError 502."""
    chosen = resp.headers._values(b"upgrade")
    if offered is None:
        raise HTTPError(502, "upstream switched protocols without being asked")
    protocols = _protocols(chosen[0]) if len(chosen) == 1 else None
    wanted = {p.lower() for p in _protocols(offered) or ()}
    if not protocols or any(p.lower() not in wanted for p in protocols):
        raise HTTPError(502, "upstream switched to a protocol the client did not offer")
    headers = strip_hop_by_hop(resp.headers)
    headers._add_trusted(b"Connection", b"connection", b"Upgrade")
    headers._add_trusted(b"Upgrade", b"upgrade", chosen[0])
    headers._add_trusted(b"Via", b"via", _via_value(resp.version, via_name))
    return ResponseHead(resp.version, resp.status, resp.reason, headers)


class RelayedResponse(NamedTuple):
    """Everything the relay needs to know about one upstream response, in one pass."""

    head: ResponseHead  # what the client gets
    framing: BodyFraming  # how the upstream frames the body
    client_keep: bool  # the client connection may carry another request
    upstream_keep: bool  # the upstream connection may carry another request


def relay_response(resp: ResponseHead, via_name: bytes, request: RequestHead,
                   sent: RequestHead) -> RelayedResponse:
    """Fig. 5 step 6 for a final response to ``request`` (forwarded as ``sent``):
    :func:`response_for_client`, both framings and both keep-alive decisions."""
    framing = response_body(resp, request.method)
    head = response_for_client(resp, via_name, request=request, framing=framing)
    client_framing = framing
    if framing == CHUNKED and request.version != HTTP_11:
        client_framing = UNTIL_CLOSE
    return RelayedResponse(head, framing,
                           keep_alive(request, head, client_framing),
                           keep_alive(sent, resp, framing))


def response_for_client(
    resp: ResponseHead, via_name: bytes, *, request: RequestHead | None = None,
    framing: BodyFraming | None = None,
) -> ResponseHead:
    """The reverse rewrite (Fig. 5 step 6): the response head to send to the client.

    Hop-by-hop fields go, ``Via`` is appended, and the body keeps its framing:
    Content-Length stays (normalised), chunked stays chunked, and a close-delimited
    body gets ``Connection: close`` because the client can only see its end as a
    close. ``request`` (the client's request) adds the client's view: an HTTP/1.0
    client cannot read chunked, so the body becomes close-delimited, and its
    ``keep-alive``/``close`` wish is answered. Apply :func:`response_body` to the
    result to learn how to frame what is written to the client.
    """
    if framing is None:
        framing = response_body(resp, request.method if request is not None else b"GET")
    headers = strip_hop_by_hop(resp.headers)
    close = framing == UNTIL_CLOSE
    if framing == CHUNKED:
        headers.remove(b"content-length")
        if request is None or request.version == HTTP_11:
            headers.add(b"Transfer-Encoding", b"chunked")
        else:
            close = True
    elif framing[0] == "length":
        _set_framing(headers, framing)
    if request is not None:
        wants = request.headers._tokens(b"connection")
        if b"close" in wants or (request.version == HTTP_10 and b"keep-alive" not in wants):
            close = True
        elif request.version == HTTP_10 and not close:
            headers.add(b"Connection", b"keep-alive")
    if close:
        headers.add(b"Connection", b"close")
    headers._add_trusted(b"Via", b"via", _via_value(resp.version, via_name))
    return ResponseHead(HTTP_11, resp.status, resp.reason, headers)


def to_absolute(
    req: RequestHead, target_host: str, target_port: int, gateway_authority: bytes
) -> RequestHead:
    """Client communication module rewrite (Fig. 6, 501 -> 503; claim 6).

    The destination moves into the request line (``GET http://host[:port]/path``) and
    ``Host`` is set to the gateway's authority, as in row 503 of the spec's table;
    :func:`to_origin` undoes both steps. Only origin-form requests can be rewritten.
    """
    if not req.target.startswith(b"/"):
        raise ValueError("to_absolute needs an origin-form request (target starting with /)")
    host = target_host.strip("[]")
    authority = format_authority(host, target_port, 80)
    headers = req.headers.copy()
    if b"host" in headers._lower:
        headers.set(b"Host", gateway_authority)
    else:
        headers.insert(0, b"Host", gateway_authority)
    return RequestHead(req.method, b"http://" + authority + req.target, req.version, headers)


# -- replies the gateway makes itself ----------------------------------------------------
PROXY_AUTHENTICATE: Final = (b"Proxy-Authenticate", b'Basic realm="kakehashi"')


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b"Error"


def error_response(
    status: int,
    reason: str,
    *,
    version: bytes = HTTP_11,
    close: bool = True,
    extra_headers: Iterable[tuple[bytes, bytes]] = (),
) -> bytes:
    """A complete small text/plain reply whose body is ``reason``.

    407 always carries a Proxy-Authenticate challenge (clients only retry with
    credentials when challenged); pass your own in ``extra_headers`` to override it.
    """
    body = reason.encode("utf-8", "replace") + b"\n"
    headers = Headers()
    headers.add(b"Content-Type", b"text/plain; charset=utf-8")
    headers.add(b"Content-Length", b"%d" % len(body))
    for name, value in extra_headers:
        headers.add(name, value)
    if status == 407 and b"proxy-authenticate" not in headers._lower:
        headers.add(*PROXY_AUTHENTICATE)
    if close:
        headers.add(b"Connection", b"close")
    return ResponseHead(version, status, _phrase(status), headers).serialize() + body


def connect_established(version: bytes = HTTP_11) -> bytes:
    """The gateway's own success reply to CONNECT (the spec's "proxy notification")."""
    return version + b" 200 Connection established\r\n\r\n"

"""The gateway's sans-IO HTTP/1.1 core: parsing, limits, framing, rewriting, gzip."""

from __future__ import annotations

import gzip
import itertools

import pytest

from kakehashi.gateway import http as h
from kakehashi.gateway.gzipdec import GzipDecoder, decoded_response_head
from kakehashi.gateway.http import (
    CHUNKED,
    LAST_CHUNK,
    NO_BODY,
    UNTIL_CLOSE,
    ChunkedDecoder,
    End,
    Headers,
    HeadLimits,
    HeadReader,
    HTTPError,
    RequestHead,
    ResponseHead,
    Trailers,
)

CURL = (
    b"GET http://example.com/index.html?q=1 HTTP/1.1\r\n"
    b"Host: example.com\r\n"
    b"User-Agent: curl/8.5.0\r\n"
    b"Accept: */*\r\n"
    b"Proxy-Connection: Keep-Alive\r\n"
    b"\r\n"
)
BROWSER = (
    b"GET http://www.example.com/static/app.js?v=123 HTTP/1.1\r\n"
    b"Host: www.example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:126.0) Gecko/20100101 Firefox/126.0\r\n"
    b"Accept: */*\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br, zstd\r\n"
    b"Referer: http://www.example.com/\r\n"
    b"Connection: keep-alive\r\n"
    b"Cookie: a=b; session=0123456789abcdef\r\n"
    b"Sec-Fetch-Dest: script\r\n"
    b"Sec-Fetch-Mode: no-cors\r\n"
    b"Sec-Fetch-Site: same-origin\r\n"
    b"Pragma: no-cache\r\n"
    b"Cache-Control: no-cache\r\n"
    b"\r\n"
)
NGINX = (
    b"HTTP/1.1 200 OK\r\n"
    b"Server: nginx/1.24.0\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
    b"Content-Type: text/html\r\n"
    b"Content-Length: 615\r\n"
    b"Connection: keep-alive\r\n"
    b'ETag: "6597f1a0-267"\r\n'
    b"Accept-Ranges: bytes\r\n"
    b"\r\n"
)


def parse_req(raw: bytes, limits: HeadLimits = h.DEFAULT_LIMITS) -> RequestHead:
    r = HeadReader(limits)
    r.feed(raw)
    head = r.next_request()
    assert head is not None
    return head


def parse_resp(raw: bytes) -> ResponseHead:
    r = HeadReader()
    r.feed(raw)
    head = r.next_response()
    assert head is not None
    return head


def req(target: bytes = b"/", *fields: tuple[bytes, bytes], method: bytes = b"GET",
        version: bytes = b"HTTP/1.1") -> RequestHead:
    return RequestHead(method, target, version, Headers(fields or [(b"Host", b"a")]))


def resp(status: int = 200, *fields: tuple[bytes, bytes],
         version: bytes = b"HTTP/1.1") -> ResponseHead:
    return ResponseHead(version, status, b"X", Headers(fields))


def refused(status: int, raw: bytes, limits: HeadLimits = h.DEFAULT_LIMITS,
            kind: str = "request") -> HTTPError:
    r = HeadReader(limits)
    r.feed(raw)
    with pytest.raises(HTTPError) as info:
        r.next_head(kind)  # type: ignore[arg-type]
    assert info.value.status == status, info.value.reason
    return info.value


# -- Headers ------------------------------------------------------------------------------
def test_headers_are_case_insensitive_and_keep_raw_names():
    hs = Headers([(b"Content-Type", b"a"), (b"X-Dup", b"1"), (b"x-dup", b"2")])
    assert hs.get(b"content-type") == b"a"
    assert hs.get(b"CONTENT-TYPE") == b"a"
    assert hs.get(b"missing") is None
    assert hs.get(b"missing", b"d") == b"d"
    assert hs.get_all(b"X-DUP") == [b"1", b"2"]
    assert b"x-dup" in hs and b"nope" not in hs
    assert list(hs) == [(b"Content-Type", b"a"), (b"X-Dup", b"1"), (b"x-dup", b"2")]
    assert len(hs) == 3


def test_headers_set_keeps_position_and_spelling_and_drops_duplicates():
    hs = Headers([(b"host", b"a"), (b"X", b"1"), (b"HOST", b"b"), (b"Y", b"2")])
    hs.set(b"Host", b"c")
    assert list(hs) == [(b"host", b"c"), (b"X", b"1"), (b"Y", b"2")]
    hs.set(b"Z", b"3")
    assert list(hs)[-1] == (b"Z", b"3")
    assert hs.remove(b"x") == 1 and hs.remove(b"x") == 0
    hs.insert(0, b"First", b"0")
    hs.add(b"y", b"4")
    assert hs.get_all(b"Y") == [b"2", b"4"]
    assert next(iter(hs)) == (b"First", b"0")


@pytest.mark.parametrize(
    ("name", "value"),
    [(b"Bad Name", b"v"), (b"", b"v"), (b"X", b"a\r\nInjected: 1"), (b"X", b"a\nb"),
     (b"X", b"nul\0"), (b"X:", b"v")],
)
def test_headers_refuse_what_would_be_emitted_broken(name, value):
    with pytest.raises(ValueError):
        Headers().add(name, value)
    with pytest.raises(ValueError):
        Headers().set(name, value)


def test_tokens_split_lists_across_lines():
    hs = Headers([(b"Connection", b"Keep-Alive, X-A"), (b"connection", b" ,close ,")])
    assert hs.tokens(b"Connection") == [b"keep-alive", b"x-a", b"close"]


# -- request heads ------------------------------------------------------------------------
def test_curl_head():
    head = parse_req(CURL)
    assert head.method == b"GET"
    assert head.target == b"http://example.com/index.html?q=1"
    assert head.version == b"HTTP/1.1"
    assert head.headers.get(b"user-agent") == b"curl/8.5.0"
    assert [n for n, _ in head.headers] == [b"Host", b"User-Agent", b"Accept",
                                            b"Proxy-Connection"]
    assert head.serialize() == CURL


def test_browser_head_with_many_headers():
    head = parse_req(BROWSER)
    assert len(head.headers) == 13
    assert head.headers.get(b"Cookie") == b"a=b; session=0123456789abcdef"
    assert head.headers.get(b"accept-encoding") == b"gzip, deflate, br, zstd"
    assert head.serialize() == BROWSER


def test_head_fed_one_byte_at_a_time_then_body_and_pipelined_head():
    r = HeadReader()
    raw = CURL.replace(b"GET", b"POST").replace(b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\n")
    stream = raw + b"hello" + CURL
    heads = []
    for i in range(len(raw)):
        r.feed(stream[i : i + 1])
        got = r.next_request()
        if got is not None:
            heads.append(got)
    assert len(heads) == 1 and heads[0].method == b"POST"
    r.feed(stream[len(raw) :])
    assert r.take_rest() == b"hello" + CURL
    assert r.buffered == 0
    r.feed(CURL + CURL)
    assert r.next_request() is not None
    assert r.next_request() is not None
    assert r.next_request() is None


def test_incomplete_head_waits():
    r = HeadReader()
    r.feed(CURL[:-2])
    assert r.next_request() is None
    r.feed(b"\r\n")
    assert r.next_request() is not None


def test_ows_is_stripped_and_empty_values_allowed():
    head = parse_req(b"GET / HTTP/1.1\r\nHost:a\r\nX:  v w \t\r\nEmpty:\r\n\r\n")
    assert head.headers.get(b"x") == b"v w"
    assert head.headers.get(b"host") == b"a"
    assert head.headers.get(b"empty") == b""


def test_leading_empty_lines_before_request_are_ignored():
    head = parse_req(b"\r\n\r\n" + CURL)
    assert head.method == b"GET"


def test_flood_of_empty_lines_is_refused_not_looped_over():
    refused(400, b"\r\n" * 10_000 + CURL)


def test_http10_request_without_host_is_fine():
    head = parse_req(b"GET /index.html HTTP/1.0\r\n\r\n")
    assert head.version == b"HTTP/1.0" and len(head.headers) == 0


# -- every refusal ------------------------------------------------------------------------
SMALL = HeadLimits(max_head=1024, max_line=100, max_headers=5)


def test_431_too_many_headers():
    raw = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: 1\r\n" * 5 + b"\r\n"
    assert "header fields" in refused(431, raw, SMALL).reason
    assert parse_req(b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: 1\r\n" * 4 + b"\r\n", SMALL)


def test_431_header_section_too_large_complete_or_not():
    big = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: " + b"y" * 90 + b"\r\n"
    refused(431, big * 12, SMALL)  # never completes: refused once over max_head
    refused(431, b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 95 + b"\r\n\r\n",
            HeadLimits(max_head=100, max_line=100))


def test_431_header_line_too_long():
    refused(431, b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 200 + b"\r\n\r\n", SMALL)


def test_414_request_line_too_long_complete_or_not():
    line = b"GET /" + b"a" * 200 + b" HTTP/1.1\r\n"
    refused(414, line + b"Host: a\r\n\r\n", SMALL)
    refused(414, line[:150], SMALL)  # no CRLF yet, already too long


def test_400_obs_fold():
    assert "folding" in refused(400, b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n").reason
    refused(400, b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n\tb\r\n\r\n")


def test_400_whitespace_before_colon():
    err = refused(400, b"GET / HTTP/1.1\r\nHost : a\r\n\r\n")
    assert "whitespace" in err.reason
    refused(400, b"GET / HTTP/1.1\r\nHost\t: a\r\n\r\n")


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n: empty name\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nBad(Name): v\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: nul\0byte\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: bell\x07\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: bare\rcr\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\nX: bare lf\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a\n\n",  # bare-LF head: refused early, not waited on
        b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n",
        b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /\x80 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTX/1.1\r\nHost: a\r\n\r\n",
        b"GET /\r\n\r\n",  # HTTP/0.9
        b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 needs Host
        b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
    ],
)
def test_400_malformed(raw):
    refused(400, raw)


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/1.2", b"HTTP/0.9", b"HTTP/3.0"])
def test_505_unsupported_version(version):
    refused(505, b"GET / " + version + b"\r\nHost: a\r\n\r\n")


# -- response heads -----------------------------------------------------------------------
def test_response_head():
    head = parse_resp(NGINX)
    assert (head.version, head.status, head.reason) == (b"HTTP/1.1", 200, b"OK")
    assert head.headers.get(b"content-length") == b"615"
    assert head.serialize() == NGINX


def test_response_without_reason_phrase():
    assert parse_resp(b"HTTP/1.1 204\r\n\r\n").status == 204
    assert parse_resp(b"HTTP/1.0 404 \r\n\r\n").reason == b""


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 600 Nope\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Name: v\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
    ],
)
def test_bad_response_heads_are_502(raw):
    refused(502, raw, kind="response")


def test_oversize_response_head_is_502():
    err = refused(502, b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 10 + b"\r\n", SMALL,
                  kind="response")
    assert "header fields" in err.reason
    refused(502, b"HTTP/1.1 200 OK\r\nX: " + b"y" * 200 + b"\r\n\r\n", SMALL,
            kind="response")
    refused(502, b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 300, SMALL, kind="response")


# -- request targets ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("target", "host", "port", "path", "authority"),
    [
        (b"http://example.com/index.html", "example.com", 80, b"/index.html", b"example.com"),
        (b"http://example.com", "example.com", 80, b"/", b"example.com"),
        (b"http://example.com?q=1", "example.com", 80, b"/?q=1", b"example.com"),
        (b"http://example.com:8080/a?b=c", "example.com", 8080, b"/a?b=c",
         b"example.com:8080"),
        (b"http://example.com:80/", "example.com", 80, b"/", b"example.com"),
        (b"http://example.com:/", "example.com", 80, b"/", b"example.com"),
        (b"HTTP://Example.COM/x", "Example.COM", 80, b"/x", b"Example.COM"),
        (b"http://10.0.0.1:81/", "10.0.0.1", 81, b"/", b"10.0.0.1:81"),
        (b"http://[::1]:8080/p", "::1", 8080, b"/p", b"[::1]:8080"),
        (b"http://[2001:db8::1]/", "2001:db8::1", 80, b"/", b"[2001:db8::1]"),
    ],
)
def test_absolute_form(target, host, port, path, authority):
    t = h.parse_target(req(target))
    assert (t.form, t.scheme, t.host, t.port, t.path) == ("absolute", "http", host, port, path)
    assert t.authority == authority


@pytest.mark.parametrize(
    ("target", "words"),
    [
        (b"https://example.com/", "use CONNECT"),
        (b"ftp://example.com/", "only http"),
        (b"http://user:pw@example.com/", "credentials"),
        (b"http://user@example.com/", "credentials"),
        (b"http://example.com/#frag", "fragment"),
        (b"http:///path", "invalid host"),
        (b"http://exa%6dple.com/", "invalid host"),
        (b"http://example.com:0/", "port"),
        (b"http://example.com:65536/", "port"),
        (b"http://example.com:8o/", "port"),
        (b"http://[::1/", "IPv6"),
        (b"http://[zz::1]/", "IPv6"),
        (b"http://[1:2:3]/", "IPv6"),
        (b"http://[::1]x/", "IPv6"),
        (b"example.com/", "invalid request target"),
    ],
)
def test_bad_absolute_targets(target, words):
    with pytest.raises(HTTPError) as info:
        h.parse_target(req(target))
    assert info.value.status == 400
    assert words in info.value.reason


def test_connect_authority_form():
    t = h.parse_target(req(b"example.com:443", method=b"CONNECT"))
    assert (t.form, t.scheme, t.host, t.port, t.path) == ("authority", None, "example.com",
                                                          443, b"")
    assert t.authority == b"example.com:443"
    t6 = h.parse_target(req(b"[::1]:8443", method=b"CONNECT"))
    assert (t6.host, t6.port, t6.authority) == ("::1", 8443, b"[::1]:8443")


@pytest.mark.parametrize(
    "target", [b"example.com", b"example.com:", b"/", b"http://example.com:443/",
               b"user@example.com:443", b"example.com:99999"],
)
def test_connect_needs_host_and_port(target):
    with pytest.raises(HTTPError) as info:
        h.parse_target(req(target, method=b"CONNECT"))
    assert info.value.status == 400


def test_origin_and_asterisk_forms():
    t = h.parse_target(req(b"/a?b"))
    assert (t.form, t.host, t.port, t.path) == ("origin", "", 0, b"/a?b")
    a = h.parse_target(req(b"*", method=b"OPTIONS"))
    assert a.form == "asterisk"
    with pytest.raises(HTTPError):
        h.parse_target(req(b"*"))


# -- body framing -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "version", "framing"),
    [
        ([], b"HTTP/1.1", NO_BODY),
        ([(b"Content-Length", b"5")], b"HTTP/1.1", ("length", 5)),
        ([(b"Content-Length", b"0")], b"HTTP/1.0", ("length", 0)),
        ([(b"Content-Length", b"5, 5")], b"HTTP/1.1", ("length", 5)),
        ([(b"Content-Length", b"5"), (b"content-length", b"5")], b"HTTP/1.1", ("length", 5)),
        ([(b"Transfer-Encoding", b"chunked")], b"HTTP/1.1", CHUNKED),
        ([(b"Transfer-Encoding", b"Chunked")], b"HTTP/1.1", CHUNKED),
    ],
)
def test_request_framing(fields, version, framing):
    assert h.request_body(req(b"/", (b"Host", b"a"), *fields, version=version)) == framing


@pytest.mark.parametrize(
    ("fields", "version", "status", "words"),
    [
        ([(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")], b"HTTP/1.1", 400,
         "both Content-Length and Transfer-Encoding"),
        ([(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5")], b"HTTP/1.1", 400,
         "both"),
        ([(b"Transfer-Encoding", b"chunked")], b"HTTP/1.0", 400, "HTTP/1.0"),
        ([(b"Transfer-Encoding", b"gzip")], b"HTTP/1.1", 400, "does not end in chunked"),
        ([(b"Transfer-Encoding", b"chunked, gzip")], b"HTTP/1.1", 400, "does not end"),
        ([(b"Transfer-Encoding", b"")], b"HTTP/1.1", 400, "does not end"),
        ([(b"Transfer-Encoding", b"chunked, chunked")], b"HTTP/1.1", 400, "more than once"),
        ([(b"Transfer-Encoding", b"gzip, chunked")], b"HTTP/1.1", 501, "not supported"),
        ([(b"Transfer-Encoding", b"gzip"), (b"Transfer-Encoding", b"chunked")], b"HTTP/1.1",
         501, "not supported"),
        ([(b"Content-Length", b"5"), (b"Content-Length", b"6")], b"HTTP/1.1", 400,
         "conflicting"),
        ([(b"Content-Length", b"5, 6")], b"HTTP/1.1", 400, "conflicting"),
        ([(b"Content-Length", b"-1")], b"HTTP/1.1", 400, "invalid Content-Length"),
        ([(b"Content-Length", b"+5")], b"HTTP/1.1", 400, "invalid"),
        ([(b"Content-Length", b"0x5")], b"HTTP/1.1", 400, "invalid"),
        ([(b"Content-Length", b"5 5")], b"HTTP/1.1", 400, "invalid"),
        ([(b"Content-Length", b"")], b"HTTP/1.1", 400, "invalid"),
        ([(b"Content-Length", b"1" * 19)], b"HTTP/1.1", 400, "invalid"),
        ([(b"Content-Length", "\u0665".encode())], b"HTTP/1.1", 400, "invalid"),
    ],
)
def test_request_framing_refusals(fields, version, status, words):
    with pytest.raises(HTTPError) as info:
        h.request_body(req(b"/", (b"Host", b"a"), *fields, version=version))
    assert info.value.status == status
    assert words in info.value.reason


CL5 = (b"Content-Length", b"5")
TE = (b"Transfer-Encoding", b"chunked")


@pytest.mark.parametrize(
    ("method", "status", "fields", "framing"),
    [
        (b"HEAD", 200, [CL5], NO_BODY),
        (b"HEAD", 200, [TE], NO_BODY),
        (b"GET", 100, [], NO_BODY),
        (b"GET", 103, [CL5], NO_BODY),
        (b"GET", 204, [CL5], NO_BODY),
        (b"GET", 304, [CL5], NO_BODY),
        (b"CONNECT", 200, [], NO_BODY),
        (b"CONNECT", 407, [CL5], ("length", 5)),
        (b"GET", 200, [TE], CHUNKED),
        (b"GET", 200, [CL5, TE], CHUNKED),
        (b"GET", 200, [CL5], ("length", 5)),
        (b"POST", 404, [(b"Content-Length", b"0")], ("length", 0)),
        (b"GET", 200, [], UNTIL_CLOSE),
        (b"GET", 500, [], UNTIL_CLOSE),
    ],
)
def test_response_framing_table(method, status, fields, framing):
    assert h.response_body(resp(status, *fields), method) == framing


@pytest.mark.parametrize(
    ("fields", "version"),
    [
        ([TE], b"HTTP/1.0"),
        ([(b"Transfer-Encoding", b"gzip")], b"HTTP/1.1"),
        ([(b"Transfer-Encoding", b"gzip, chunked")], b"HTTP/1.1"),
        ([(b"Content-Length", b"abc")], b"HTTP/1.1"),
        ([CL5, (b"Content-Length", b"6")], b"HTTP/1.1"),
    ],
)
def test_response_framing_refusals_are_502(fields, version):
    with pytest.raises(HTTPError) as info:
        h.response_body(resp(200, *fields, version=version), b"GET")
    assert info.value.status == 502


# -- chunked coding -----------------------------------------------------------------------
CHUNKED_BODY = (
    b"5;name=value\r\nhello\r\n"
    b"6 ; quoted=\"a;b\"\r\n world\r\n"
    b"0000A\r\n0123456789\r\n"
    b"0;last\r\n"
    b"Expires: never\r\nX-Checksum: abc\r\n"
    b"\r\n"
)


def decode_all(stream: bytes, pieces: list[int] | None = None,
               dec: ChunkedDecoder | None = None) -> tuple[bytes, list, ChunkedDecoder]:
    dec = dec or ChunkedDecoder()
    cuts = [0, *(pieces or []), len(stream)]
    data = b""
    other = []
    for a, b in itertools.pairwise(cuts):
        dec.feed(stream[a:b])
        for ev in dec.events():
            if isinstance(ev, bytes):
                data += ev
            else:
                other.append(ev)
    return data, other, dec


def test_chunked_with_extensions_and_trailers():
    data, other, dec = decode_all(CHUNKED_BODY + b"NEXT")
    assert data == b"hello world0123456789"
    assert isinstance(other[0], Trailers)
    assert other[0].headers.get(b"expires") == b"never"
    assert other[0].headers.get(b"x-checksum") == b"abc"
    assert isinstance(other[1], End) and len(other) == 2
    assert dec.done and dec.unconsumed() == b"NEXT"


def test_chunked_without_trailers_ends_with_end_only():
    data, other, dec = decode_all(b"3\r\nabc\r\n0\r\n\r\n")
    assert data == b"abc" and other == [End()]
    assert dec.unconsumed() == b""


def test_chunked_split_at_every_byte_boundary():
    for i in range(len(CHUNKED_BODY) + 1):
        for j in range(i, len(CHUNKED_BODY) + 1, 7):
            data, other, dec = decode_all(CHUNKED_BODY, [i, j])
            assert data == b"hello world0123456789", (i, j)
            assert [type(o) for o in other] == [Trailers, End]
            assert dec.unconsumed() == b""


def test_chunked_one_byte_at_a_time():
    data, other, _ = decode_all(CHUNKED_BODY, list(range(1, len(CHUNKED_BODY))))
    assert data == b"hello world0123456789" and len(other) == 2


def test_big_chunk_is_streamed_not_buffered():
    dec = ChunkedDecoder()
    dec.feed(b"%x\r\n" % (1 << 30))
    assert list(dec.events()) == []
    piece = b"x" * 65536
    for _ in range(16):
        dec.feed(piece)
        got = list(dec.events())
        assert got == [piece] and got[0] is piece  # handed on as is, no copy
        assert dec.buffered == 0


@pytest.mark.parametrize(
    ("stream", "words"),
    [
        (b"x\r\n", "invalid chunk size"),
        (b"-1\r\n", "invalid chunk size"),
        (b" 5\r\n", "invalid chunk size"),
        (b"\r\n", "invalid chunk size"),
        (b"0x5\r\n", "invalid chunk size"),
        (b"1" * 17 + b"\r\n", "invalid chunk size"),
        (b"10000000001\r\n", "chunk too large"),
        (b"5\r\nhelloXX", "not followed by CRLF"),
        (b"5\r\nhello\n", "not followed by CRLF"),
        (b"5;a=\x01\r\n", "chunk extension"),
        (b"5" + b" " * 9000, "too long"),
        (b"5;" + b"e" * 9000, "too long"),
        (b"0\r\nX: a\r\n folded\r\n\r\n", "trailer"),
        (b"0\r\nNoColon\r\n\r\n", "trailer"),
        (b"0\r\n" + b"X: y\r\n" * 20000, "trailer section too large"),
    ],
)
def test_chunked_refusals(stream, words):
    dec = ChunkedDecoder()
    dec.feed(stream)
    with pytest.raises(HTTPError) as info:
        list(dec.events())
    assert info.value.status == 400
    assert words in info.value.reason


def test_chunked_refusal_status_for_upstream_bodies():
    dec = ChunkedDecoder(error_status=502)
    dec.feed(b"zz\r\n")
    with pytest.raises(HTTPError) as info:
        list(dec.events())
    assert info.value.status == 502


def test_chunked_size_at_the_limit_is_accepted():
    dec = ChunkedDecoder()
    dec.feed(b"0000010000000000\r\n")  # 16 digits, exactly 2**40
    assert list(dec.events()) == []


def test_encode_chunk_and_last_chunk():
    assert h.encode_chunk(b"") == b""
    assert h.encode_chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"
    assert LAST_CHUNK == b"0\r\n\r\n" == h.last_chunk() == h.last_chunk(Headers())
    trailer = h.last_chunk(Headers([(b"X-Sum", b"1")]))
    assert trailer == b"0\r\nX-Sum: 1\r\n\r\n"
    data, other, _ = decode_all(h.encode_chunk(b"abc") + trailer)
    assert data == b"abc" and other[0].headers.get(b"x-sum") == b"1"


# -- keep-alive ---------------------------------------------------------------------------
KA = (b"Connection", b"keep-alive")
CLOSE = (b"Connection", b"close")


@pytest.mark.parametrize(
    ("req_version", "req_fields", "resp_version", "resp_fields", "method", "status", "keep"),
    [
        (b"HTTP/1.1", [], b"HTTP/1.1", [CL5], b"GET", 200, True),
        (b"HTTP/1.1", [CLOSE], b"HTTP/1.1", [CL5], b"GET", 200, False),
        (b"HTTP/1.1", [], b"HTTP/1.1", [CL5, CLOSE], b"GET", 200, False),
        (b"HTTP/1.1", [(b"Connection", b"Keep-Alive, Close")], b"HTTP/1.1", [CL5], b"GET",
         200, False),
        (b"HTTP/1.0", [], b"HTTP/1.1", [CL5], b"GET", 200, False),
        (b"HTTP/1.0", [KA], b"HTTP/1.1", [CL5], b"GET", 200, True),
        (b"HTTP/1.0", [(b"Connection", b"Keep-Alive")], b"HTTP/1.0", [CL5, KA], b"GET", 200,
         True),
        (b"HTTP/1.1", [], b"HTTP/1.0", [CL5], b"GET", 200, False),
        (b"HTTP/1.1", [], b"HTTP/1.0", [CL5, KA], b"GET", 200, True),
        (b"HTTP/1.1", [], b"HTTP/1.1", [], b"GET", 200, False),  # close-delimited
        (b"HTTP/1.1", [], b"HTTP/1.1", [TE], b"GET", 200, True),
        (b"HTTP/1.1", [], b"HTTP/1.1", [], b"HEAD", 200, True),
        (b"HTTP/1.1", [], b"HTTP/1.1", [], b"GET", 204, True),
        (b"HTTP/1.1", [], b"HTTP/1.1", [], b"GET", 304, True),
        (b"HTTP/1.1", [], b"HTTP/1.1", [], b"CONNECT", 200, False),  # now a tunnel
        (b"HTTP/1.1", [], b"HTTP/1.1", [], b"GET", 101, False),
    ],
)
def test_keep_alive_table(req_version, req_fields, resp_version, resp_fields, method, status,
                          keep):
    q = req(b"/", (b"Host", b"a"), *req_fields, method=method, version=req_version)
    r = resp(status, *resp_fields, version=resp_version)
    assert h.keep_alive(q, r) is keep


# -- relay rewriting (to_origin) ----------------------------------------------------------
def test_to_origin_curl():
    target, out = h.to_origin(parse_req(CURL), b"gw.example:8080")
    assert (target.form, target.host, target.port) == ("absolute", "example.com", 80)
    assert out.serialize() == (
        b"GET /index.html?q=1 HTTP/1.1\r\n"
        b"Host: example.com\r\n"
        b"User-Agent: curl/8.5.0\r\n"
        b"Accept: */*\r\n"
        b"Via: 1.1 gw.example:8080\r\n"
        b"\r\n"
    )


def test_to_origin_restores_host_and_strips_hop_by_hop():
    head = parse_req(
        b"POST http://internal.example:8081/api HTTP/1.1\r\n"
        b"Host: proxy.abc.co.jp:8080\r\n"
        b"Connection: keep-alive, X-Secret-Hop\r\n"
        b"X-Secret-Hop: 1\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Proxy-Authorization: Basic dTpw\r\n"
        b"TE: trailers\r\n"
        b"Trailer: X-Sum\r\n"
        b"Upgrade: websocket\r\n"
        b"Content-Length: 3, 3\r\n"
        b"X-End-To-End: kept\r\n"
        b"\r\n"
    )
    target, out = h.to_origin(head, b"gw")
    assert (target.host, target.port) == ("internal.example", 8081)
    assert out.target == b"/api"
    assert list(out.headers) == [
        (b"Host", b"internal.example:8081"),
        (b"Content-Length", b"3"),
        (b"X-End-To-End", b"kept"),
        (b"Via", b"1.1 gw"),
    ]
    assert head.headers.get(b"x-secret-hop") == b"1"  # the input is not modified


def test_to_origin_rechunks_chunked_requests_and_keeps_via_chain():
    head = parse_req(
        b"PUT http://h/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
        b"Via: 1.0 fred, 1.1 other.example (Apache/2.4)\r\n\r\n"
    )
    _, out = h.to_origin(head, b"gw")
    assert out.headers.get_all(b"transfer-encoding") == [b"chunked"]
    assert out.headers.get_all(b"via") == [b"1.0 fred, 1.1 other.example (Apache/2.4)",
                                           b"1.1 gw"]
    assert h.request_body(out) == CHUNKED


def test_to_origin_via_protocol_follows_the_request():
    _, out = h.to_origin(parse_req(b"GET http://h/ HTTP/1.0\r\n\r\n"), b"gw")
    assert out.headers.get(b"via") == b"1.0 gw"
    assert next(iter(out.headers)) == (b"Host", b"h")  # added first when absent


@pytest.mark.parametrize(
    "via", [b"1.1 gw", b"1.1 GW", b"1.0 fred, 1.1 gw (kakehashi)", b"HTTP/1.1 gw"],
)
def test_to_origin_detects_loops_through_itself(via):
    head = parse_req(b"GET http://h/ HTTP/1.1\r\nHost: h\r\nVia: " + via + b"\r\n\r\n")
    with pytest.raises(HTTPError) as info:
        h.to_origin(head, b"gw")
    assert info.value.status == 508
    assert "loops" in info.value.reason


def test_connect_loop_is_detected_but_head_is_left_alone():
    head = parse_req(b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n")
    target, out = h.to_origin(head, b"gw")
    assert target.form == "authority" and out is head
    looped = parse_req(b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\nVia: 1.1 gw\r\n\r\n")
    with pytest.raises(HTTPError):
        h.to_origin(looped, b"gw")


def test_origin_form_is_not_proxied():
    head = parse_req(b"GET /events/x HTTP/1.1\r\nHost: proxy\r\nVia: 1.1 gw\r\n\r\n")
    target, out = h.to_origin(head, b"gw")
    assert target.form == "origin" and out is head


def test_to_origin_refuses_smuggling():
    head = parse_req(
        b"POST http://h/ HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    with pytest.raises(HTTPError) as info:
        h.to_origin(head, b"gw")
    assert info.value.status == 400


def test_strip_hop_by_hop_leaves_input_alone():
    hs = Headers([(b"Connection", b"close"), (b"A", b"1")])
    out = h.strip_hop_by_hop(hs)
    assert list(out) == [(b"A", b"1")] and len(hs) == 2
    plain = Headers([(b"A", b"1")])
    copy = h.strip_hop_by_hop(plain)
    assert copy == plain and copy is not plain


def test_invalid_via_name_is_a_programming_error():
    with pytest.raises(ValueError):
        h.to_origin(parse_req(CURL), b"gw\r\nX: 1")


# -- the spec's Fig. 6/7 example ----------------------------------------------------------
def test_fig6_fig7_example_501_503_504():
    original = parse_req(b"GET /index.html HTTP/1.0\r\nHost: www.def.co.jp\r\n\r\n")  # 501
    converted = h.to_absolute(original, "www.def.co.jp", 80, b"proxy.abc.co.jp")  # 503
    assert converted.serialize() == (
        b"GET http://www.def.co.jp/index.html HTTP/1.0\r\nHost: proxy.abc.co.jp\r\n\r\n"
    )
    # through the aggregation port: the gateway parses exactly what the client sent
    target, relayed = h.to_origin(parse_req(converted.serialize()), b"proxy.abc.co.jp")  # 504
    assert (target.host, target.port) == ("www.def.co.jp", 80)
    assert (relayed.method, relayed.target, relayed.version) == (
        original.method, original.target, original.version)
    assert relayed.headers.get_all(b"host") == original.headers.get_all(b"host")
    relayed.headers.remove(b"via")
    assert relayed.serialize() == original.serialize()  # 504 == 501


def test_to_absolute_ports_ipv6_and_missing_host():
    head = RequestHead(b"GET", b"/a", b"HTTP/1.0", Headers())
    out = h.to_absolute(head, "::1", 8080, b"gw:8080")
    assert out.target == b"http://[::1]:8080/a"
    assert list(out.headers) == [(b"Host", b"gw:8080")]
    assert h.to_absolute(head, "[::1]", 80, b"gw").target == b"http://[::1]/a"
    with pytest.raises(ValueError):
        h.to_absolute(req(b"http://x/"), "x", 80, b"gw")
    with pytest.raises(ValueError):
        h.to_absolute(req(b"/"), "x", 80, b"gw\r\nInjected: 1")


# -- response rewriting -------------------------------------------------------------------
def test_response_for_client_keeps_length_and_adds_via():
    out = h.response_for_client(parse_resp(NGINX), b"gw")
    assert out.version == b"HTTP/1.1" and out.status == 200
    names = [n for n, _ in out.headers]
    assert b"Connection" not in names
    assert out.headers.get(b"content-length") == b"615"
    assert out.headers.get(b"via") == b"1.1 gw"
    assert h.response_body(out, b"GET") == ("length", 615)


def test_response_for_client_strips_hop_by_hop_and_listed_fields():
    up = parse_resp(
        b"HTTP/1.1 407 Proxy Auth\r\nProxy-Authenticate: Basic realm=up\r\n"
        b"Connection: X-Up\r\nX-Up: 1\r\nKeep-Alive: timeout=5\r\nUpgrade: h2c\r\n"
        b"Transfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n"
    )
    out = h.response_for_client(up, b"gw")
    assert [n.lower() for n, _ in out.headers] == [b"transfer-encoding", b"via"]
    assert h.response_body(out, b"GET") == CHUNKED


def test_response_for_client_close_delimited_stays_close_delimited():
    out = h.response_for_client(parse_resp(b"HTTP/1.0 200 OK\r\nX: 1\r\n\r\n"), b"gw")
    assert out.headers.get(b"connection") == b"close"
    assert out.headers.get(b"via") == b"1.0 gw"
    assert h.response_body(out, b"GET") == UNTIL_CLOSE


def test_response_for_http10_client():
    chunked = parse_resp(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    q10 = parse_req(b"GET http://h/ HTTP/1.0\r\n\r\n")
    out = h.response_for_client(chunked, b"gw", request=q10)
    assert b"transfer-encoding" not in out.headers
    assert out.headers.get(b"connection") == b"close"
    assert h.response_body(out, b"GET") == UNTIL_CLOSE
    assert not h.keep_alive(q10, out)
    q10ka = parse_req(b"GET http://h/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    out = h.response_for_client(parse_resp(NGINX), b"gw", request=q10ka)
    assert out.headers.get(b"connection") == b"keep-alive"
    assert h.keep_alive(q10ka, out)
    q11close = parse_req(b"GET http://h/ HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    out = h.response_for_client(parse_resp(NGINX), b"gw", request=q11close)
    assert out.headers.get(b"connection") == b"close"
    head_out = h.response_for_client(chunked, b"gw", request=parse_req(
        b"HEAD http://h/ HTTP/1.1\r\nHost: h\r\n\r\n"))
    assert h.response_body(head_out, b"HEAD") == NO_BODY


# -- the gateway's own replies ------------------------------------------------------------
def test_error_response_is_a_complete_reply():
    raw = h.error_response(502, "cannot connect to db:5432: refused")
    r = HeadReader()
    r.feed(raw)
    head = r.next_response()
    assert head is not None
    assert (head.status, head.reason) == (502, b"Bad Gateway")
    assert head.headers.get(b"content-type") == b"text/plain; charset=utf-8"
    assert head.headers.get(b"connection") == b"close"
    body = r.take_rest()
    assert body == b"cannot connect to db:5432: refused\n"
    assert h.response_body(head, b"GET") == ("length", len(body))


def test_error_response_407_and_options():
    raw = h.error_response(407, "proxy authentication required", close=False)
    assert b'Proxy-Authenticate: Basic realm="kakehashi"\r\n' in raw
    assert b"Connection" not in raw
    own = h.error_response(407, "x", extra_headers=[(b"Proxy-Authenticate", b"Basic realm=o")])
    assert own.count(b"Proxy-Authenticate") == 1
    assert h.error_response(508, "loop", version=b"HTTP/1.0").startswith(
        b"HTTP/1.0 508 Loop Detected\r\n")
    assert h.error_response(599, "odd").startswith(b"HTTP/1.1 599 Error\r\n")
    assert h.error_response(400, "x", extra_headers=[(b"Retry-After", b"1")]).count(
        b"Retry-After: 1\r\n") == 1


def test_connect_established():
    assert h.connect_established() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert h.connect_established(b"HTTP/1.0") == b"HTTP/1.0 200 Connection established\r\n\r\n"
    head = parse_resp(h.connect_established())
    assert h.response_body(head, b"CONNECT") == NO_BODY


# -- gzip (module 219) --------------------------------------------------------------------
def gunzip_all(data: bytes, step: int, dec: GzipDecoder | None = None) -> bytes:
    dec = dec or GzipDecoder()
    out = b"".join(dec.decode(data[i : i + step]) for i in range(0, len(data), step))
    return out + dec.finish()


def test_gzip_decodes_in_any_piece_size():
    plain = b"".join(b"line %d\n" % i for i in range(2000))
    packed = gzip.compress(plain)
    for step in (1, 2, 3, 7, 64, 1000, len(packed)):
        assert gunzip_all(packed, step) == plain


def test_gzip_multi_member_and_padding():
    packed = gzip.compress(b"first ") + gzip.compress(b"") + gzip.compress(b"second")
    for step in (1, 5, len(packed)):
        assert gunzip_all(packed, step) == b"first second"
        assert gunzip_all(packed + b"\0" * 10, step) == b"first second"


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"not gzip at all", "corrupt"),
        (gzip.compress(b"abc")[:-3], "truncated"),
        (gzip.compress(b"abc")[:5], "truncated"),
        (gzip.compress(b"abc") + b"garbage", "corrupt"),
        (gzip.compress(b"abc") + b"\0\0x", "trailing garbage"),
        (gzip.compress(b"abc")[:-8] + b"\0" * 8, "corrupt"),  # bad CRC
    ],
)
def test_gzip_bad_data_is_502(data, words):
    with pytest.raises(HTTPError) as info:
        gunzip_all(data, 4)
    assert info.value.status == 502
    assert words in info.value.reason


def test_gzip_empty_body():
    dec = GzipDecoder()
    assert dec.decode(b"") == b""
    assert dec.finish() == b""


def test_gzip_bomb_guard_ratio():
    bomb = gzip.compress(b"\0" * (64 << 20), 9)  # ~64 KiB expanding 1000:1
    dec = GzipDecoder()
    with pytest.raises(HTTPError) as info:
        dec.decode(bomb)  # fed whole: the guard counts the input zlib has consumed
    assert info.value.status == 502
    assert "expands too much" in info.value.reason
    assert dec.total_out < 4 << 20  # tripped early, did not inflate 64 MiB


def test_gzip_bomb_guard_absolute_cap_and_ratio_grace():
    plain = bytes(range(256)) * 4096  # 1 MiB, barely compressible
    packed = gzip.compress(plain)
    with pytest.raises(HTTPError):
        gunzip_all(packed, 4096, GzipDecoder(max_output=512 * 1024))
    small = gzip.compress(b"a" * 500_000)  # ~1000:1 but under the grace size
    assert gunzip_all(small, 100) == b"a" * 500_000


def test_decoded_response_head():
    up = parse_resp(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: 123\r\nContent-MD5: xyz\r\nVary: Accept-Encoding\r\n"
        b'ETag: "abc"\r\nAccept-Ranges: bytes\r\n\r\n'
    )
    out = decoded_response_head(up)
    assert out is not None
    assert list(out.headers) == [
        (b"Content-Type", b"text/html"),
        (b"Vary", b"Accept-Encoding"),
        (b"ETag", b'W/"abc"'),
        (b"Transfer-Encoding", b"chunked"),
    ]
    assert h.response_body(out, b"GET") == CHUNKED
    assert up.headers.get(b"content-encoding") == b"gzip"  # input untouched


def test_decoded_response_head_http10_and_weak_etag():
    up = parse_resp(b"HTTP/1.0 200 OK\r\nContent-Encoding: X-GZIP\r\nETag: W/\"a\"\r\n\r\n")
    out = decoded_response_head(up)
    assert out is not None
    assert list(out.headers) == [(b"ETag", b'W/"a"')]
    assert h.response_body(out, b"GET") == UNTIL_CLOSE


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip, br\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Encoding: identity\r\n\r\n",
        b"HTTP/1.1 206 Partial\r\nContent-Encoding: gzip\r\n\r\n",
    ],
)
def test_decoded_response_head_leaves_others_alone(raw):
    assert decoded_response_head(parse_resp(raw)) is None


# -- protocol upgrade (RFC 9110 7.8) -------------------------------------------------------
WS_OFFER = ((b"Host", b"a"), (b"Connection", b"keep-alive, Upgrade"), (b"Upgrade", b"websocket"),
            (b"Keep-Alive", b"timeout=5"))


def test_a_well_formed_upgrade_offer_is_passed_on_and_nothing_else_hop_by_hop():
    _, out = h.to_origin(req(b"http://a/ws", *WS_OFFER), b"gw")
    assert out.headers.get_all(b"connection") == [b"Upgrade"]
    assert out.headers.get_all(b"upgrade") == [b"websocket"]
    assert b"keep-alive" not in out.headers


@pytest.mark.parametrize("case", ["http/1.0", "body", "not in connection", "two fields",
                                  "bad token", "empty version"])
def test_upgrade_offers_the_gateway_does_not_pass_on(case):
    fields = list(WS_OFFER)
    version = b"HTTP/1.1"
    if case == "http/1.0":
        version = b"HTTP/1.0"
    elif case == "body":
        fields.append((b"Content-Length", b"3"))
    elif case == "not in connection":
        fields[1] = (b"Connection", b"keep-alive")
    elif case == "two fields":
        fields.append((b"Upgrade", b"h2c"))
    elif case == "bad token":
        fields[2] = (b"Upgrade", b"web socket")
    else:
        fields[2] = (b"Upgrade", b"websocket/")
    head = req(b"http://a/ws", *fields, version=version)
    assert h.upgrade_offer(head, h.request_body(head)) is None
    _, out = h.to_origin(head, b"gw")
    assert b"upgrade" not in out.headers and b"connection" not in out.headers


def test_a_101_is_relayed_only_for_a_protocol_the_client_offered():
    switched = resp(101, (b"Connection", b"Upgrade"), (b"Upgrade", b"WebSocket"),
                    (b"Sec-WebSocket-Accept", b"x"), (b"Keep-Alive", b"timeout=5"))
    head = h.upgraded_response(switched, b"gw", b"websocket")
    assert head.status == 101 and head.headers.get(b"upgrade") == b"WebSocket"
    assert head.headers.get(b"connection") == b"Upgrade"
    assert head.headers.get(b"sec-websocket-accept") == b"x"
    assert b"keep-alive" not in head.headers and head.headers.get(b"via") == b"1.1 gw"
    with pytest.raises(HTTPError) as unasked:
        h.upgraded_response(switched, b"gw", None)
    assert unasked.value.status == 502
    with pytest.raises(HTTPError) as other:
        h.upgraded_response(switched, b"gw", b"h2c")
    assert other.value.status == 502
    with pytest.raises(HTTPError):
        h.upgraded_response(resp(101, (b"Connection", b"Upgrade")), b"gw", b"websocket")


# -- recognising HTTP on the shared port (item 12: WebDAV and other methods) ------------------
@pytest.mark.parametrize("method", [b"PROPFIND", b"MKCOL", b"REPORT", b"MKCALENDAR", b"SEARCH",
                                    b"PURGE", b"LINK", b"M-SEARCH", b"QUERY", b"GET", b"CONNECT"])
def test_any_token_method_is_http(method):
    line = method + b" http://h.example/x HTTP/1.1\r\n"
    assert h.looks_like_request(line) is True
    assert h.looks_like_request(method) is None  # not yet known: wait for more


@pytest.mark.parametrize(("first", "answer"), [
    (b"", None), (b"GET / HTTP/1.", None), (b"GET / HTTP/1.1", True),
    (b"\r\nGET / HTTP/1.0", True),  # an empty line before the request (RFC 9112 2.2)
    (b"GET  / HTTP/1.1", False), (b"GET / HTTP/x", False), (b"GET\t/ HTTP/1.1", False),
    (b"G(T / HTTP/1.1", False), (b"KKH\x01", False), (b"\x16\x03\x01", False),
    (b"SSH-2.0-x y\r\n", False), (b"GET /" + b"a" * 9000, True),  # the parser says 414
])
def test_request_line_grammar(first, answer):
    assert h.looks_like_request(first) is answer


@pytest.mark.parametrize(("version", "connection", "keep"), [
    (b"HTTP/1.1", None, True), (b"HTTP/1.1", b"close", False),
    (b"HTTP/1.1", b"Keep-Alive, Close", False), (b"HTTP/1.0", None, False),
    (b"HTTP/1.0", b"keep-alive", True), (b"HTTP/1.0", b"keep-alive, close", False),
])
def test_the_one_client_keep_alive_rule(version, connection, keep):
    fields = [(b"Host", b"h")] + ([(b"Connection", connection)] if connection else [])
    req = h.RequestHead(b"GET", b"/", version, h.Headers(fields))
    assert h.wants_keep_alive(req) is keep
    ok = h.ResponseHead(b"HTTP/1.1", 200, b"OK", h.Headers([(b"Content-Length", b"0")]))
    assert h.keep_alive(req, ok) is keep  # relayed responses follow the same rule

"""Differential tests of ``gateway.quick`` against the full parser (``gateway.http``).

Whenever the quick common case accepts a head, the full parser must accept it too
and mean the same thing: the same destination, the same fields sent on (names,
values, order), the same keep-alive decisions and body length. Generated heads mix
every field the relay treats specially, in odd spellings, with hostile bytes.
"""

from __future__ import annotations

from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from kakehashi.gateway import http as h
from kakehashi.gateway.quick import quick_request, quick_response

FAST = settings(max_examples=1000, deadline=None)
VIA = b"kakehashi"

NAMES = [b"Host", b"host", b"HOST", b"User-Agent", b"Accept", b"Connection", b"connection",
         b"Proxy-Connection", b"Keep-Alive", b"Proxy-Authorization", b"TE", b"Trailer",
         b"Transfer-Encoding", b"Upgrade", b"Content-Length", b"content-length", b"Via",
         b"Expect", b"Close", b"X-Host", b"Content-Type", b"Date", b"Server",
         b"Proxy-Authenticate", b"Host ", b" Host", b"Ho st", b"", b"X\x00"]
VALUES = [b"h", b"h:81", b"example.test", b"*/*", b"keep-alive", b"Keep-Alive", b"close",
          b"close, keep-alive", b"upgrade", b"x-foo", b"", b"  100 ", b"100", b"0", b"007",
          b"5, 5", b"chunked", b"gzip, chunked", b"1.1 kakehashi", b"1.1 other",
          b"100-continue", b"Basic dTpw", b"a\rb", b"a\nb", b"\x7f", b"text/plain"]
METHODS = [b"GET", b"HEAD", b"POST", b"DELETE", b"OPTIONS", b"CONNECT", b"G T", b"", b"get"]
TARGETS = [b"http://h/", b"http://h:81/p?q=1", b"HTTP://H/x", b"http://h", b"http://h?q",
           b"http://[::1]:8080/", b"/origin", b"https://h/", b"http://u@h/", b"http://h/#f",
           b"http://h:99999/", b"h:443", b"http://h/ x", b"http://bad_host!/",
           b"http://h/%7e", b"http://h/p#", b"http://h:80/", b"http://h:/", b"http://H/",
           b"http://h/\x7f", b'http://h/"q"', b"http://h/a?b=c&d", b"http://h?",
           b"http://[::1]/", b"http://h/\xc3\xa9", b"http://h\t/", b"http://h//x"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"http/1.1"]

GOOD_NAMES = NAMES[:24]
SEPARATORS = [b": ", b": ", b":", b":  ", b" :"]
field = st.tuples(st.sampled_from(GOOD_NAMES), st.sampled_from(SEPARATORS),
                  st.sampled_from(VALUES[:20]))
hostile = st.tuples(st.sampled_from(NAMES), st.sampled_from(SEPARATORS), st.sampled_from(VALUES))
#: mostly plausible heads (so the quick path is exercised), some hostile ones
fields = st.one_of(
    st.lists(field, max_size=6).map(lambda f: [(b"Host", b": ", b"h"), *f]),
    st.lists(st.one_of(field, hostile), max_size=8),
)


def request_bytes(method: bytes, target: bytes, version: bytes, items) -> bytes:
    lines = [b"%s %s %s" % (method, target, version)]
    lines += [n + sep + v for n, sep, v in items]
    return b"\r\n".join(lines)


def both_accept(quick, full):
    """The full parser's result when both paths accept the head, else None - after
    checking that the quick path never accepts what the full parser refuses."""
    try:
        result = full()
    except h.HTTPError:
        assert quick is None, "quick accepted what the full parser refuses"
        event("refused by both")
        return None
    event("full path only" if quick is None else "quick")
    return None if quick is None else result


def same_head(a, b) -> None:
    assert [(n.lower(), v) for n, v in a.headers] == [(n.lower(), v) for n, v in b.headers]


@FAST
@given(st.sampled_from(METHODS[:5] * 3 + METHODS), st.sampled_from(TARGETS[:6] * 3 + TARGETS),
       st.sampled_from(VERSIONS[:1] * 6 + VERSIONS), fields)
@example(b"GET", b"http://h/", b"HTTP/1.1", [(b"Host", b": ", b"h")])
@example(b"GET", b"http://h/", b"HTTP/1.1",
         [(b"Host", b": ", b"h"), (b"Proxy-Connection", b": ", b"keep-alive")])
def test_quick_request_means_what_the_full_parser_means(method, target, version, items):
    raw = request_bytes(method, target, version, items)
    quick = quick_request(raw, VIA)
    full = both_accept(quick, lambda: (head := h.parse_request(raw),
                                       *h.relay_request(head, VIA)))
    if full is None:
        return
    head, dest, framing, out = full
    assert dest == quick.dest and dest.form == "absolute"
    assert framing == h.NO_BODY
    assert quick.method == head.method and quick.target == head.target
    sent = h.parse_request(quick.out[:-4])
    assert quick.out.endswith(b"\r\n\r\n") and b"\r\n\r\n" not in quick.out[:-4]
    assert (sent.method, sent.target, sent.version) == (out.method, out.target, out.version)
    same_head(sent, out)
    assert quick.close == (b"close" in head.headers.tokens(b"connection"))
    assert quick.auth == head.headers.get(b"proxy-authorization")


STATUS_LINES = [b"HTTP/1.1 200 OK", b"HTTP/1.1 204 No Content", b"HTTP/1.1 304 Not Modified",
                b"HTTP/1.1 404 Not Found", b"HTTP/1.1 100 Continue", b"HTTP/1.1 101 Switching",
                b"HTTP/1.0 200 OK", b"HTTP/1.1 200", b"HTTP/1.1 600 X", b"HTTP/1.1 20 X",
                b"HTTP/2 200 OK", b"HTTP/1.1 200 OK with words", b"HTTP/1.1 200 OK\t",
                b"HTTP/1.1 200  two", b"HTTP/1.1 099 x", b"HTTP/1.1 200 \x01", b"HTTP/1.1 2000 x",
                b"HTTP/1.1 200 caf\xc3\xa9", b"HTTP/1.1  200 OK"]


@FAST
@given(st.sampled_from(STATUS_LINES[:4] * 4 + STATUS_LINES), fields,
       st.sampled_from([b"GET", b"HEAD", b"POST"]), st.booleans())
@example(b"HTTP/1.1 200 OK", [(b"content-length", b": ", b"100")], b"GET", False)
@example(b"HTTP/1.1 200 OK", [(b"Content-Length", b": ", b"100"),
                              (b"Connection", b": ", b"close")], b"GET", True)
def test_quick_response_means_what_the_full_parser_means(status_line, items, method, close):
    raw = b"\r\n".join([status_line, *[n + sep + v for n, sep, v in items]])
    request = h.parse_request(b"%s http://h/ HTTP/1.1\r\nHost: h%s" % (
        method, b"\r\nConnection: close" if close else b""))
    _, _, sent = h.relay_request(request, VIA)
    quick = quick_response(raw, VIA, method, close)
    full = both_accept(quick, lambda: (resp := h.parse_response(raw),
                                       h.relay_response(resp, VIA, request, sent)))
    if full is None:
        return
    resp, relayed = full
    assert quick.status == resp.status
    if relayed.framing == h.NO_BODY:
        assert quick.length == 0
    else:
        assert relayed.framing == ("length", quick.length)
    assert quick.upstream_keep == relayed.upstream_keep
    assert relayed.client_keep == (not close)
    client = h.parse_response(quick.out[:-4])
    assert quick.out.endswith(b"\r\n\r\n") and b"\r\n\r\n" not in quick.out[:-4]
    assert (client.version, client.status, client.reason) == (
        relayed.head.version, relayed.head.status, relayed.head.reason)
    same_head(client, relayed.head)


def test_quick_covers_what_common_clients_send():
    """curl, browsers and requests all take the quick path (else it is not worth it)."""
    curl = (b"GET http://h:81/x HTTP/1.1\r\nHost: h:81\r\nUser-Agent: curl/8\r\n"
            b"Accept: */*\r\nProxy-Connection: Keep-Alive")
    requests_lib = (b"GET http://h/ HTTP/1.1\r\nHost: h\r\nUser-Agent: python-requests\r\n"
                    b"Accept-Encoding: gzip\r\nAccept: */*\r\nConnection: keep-alive")
    chromium = (b"GET http://h/p HTTP/1.1\r\nHost: h\r\nProxy-Connection: keep-alive\r\n"
                b"Upgrade-Insecure-Requests: 1\r\nUser-Agent: Mozilla/5.0\r\nAccept: text/html")
    for raw in (curl, requests_lib, chromium):
        quick = quick_request(raw, VIA)
        assert quick is not None, raw
        assert b"roxy-Connection" not in quick.out and b"Connection" not in quick.out
        assert quick.out.endswith(b"\r\nVia: 1.1 kakehashi\r\n\r\n")
    assert quick_request(curl, VIA).out.startswith(b"GET /x HTTP/1.1\r\nHost: h:81\r\n")


def test_quick_response_rewrites_and_keeps_the_length():
    raw = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
           b"Connection: keep-alive\r\nKeep-Alive: timeout=5")
    quick = quick_response(raw, VIA, b"GET", True)
    assert quick is not None and quick.length == 5 and quick.upstream_keep
    assert quick.out == (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5"
                         b"\r\nConnection: close\r\nVia: 1.1 kakehashi\r\n\r\n")
    assert quick_response(raw.replace(b"keep-alive", b"close"), VIA, b"GET", False) \
        .upstream_keep is False
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked"
    assert quick_response(chunked, VIA, b"GET", False) is None  # the full path re-frames

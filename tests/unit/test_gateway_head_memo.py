"""The fast lanes' shared memory of rewritten heads (gateway.fastlane.HeadMemo).

It may only ever answer what quick_request / quick_response answer for the same
inputs, and it must stay bounded whatever heads clients send.
"""

from __future__ import annotations

from kakehashi.gateway import http
from kakehashi.gateway.fastlane import HeadMemo
from kakehashi.gateway.quick import quick_request, quick_response

VIA = b"kakehashi"
REQ = (b"GET http://127.0.0.1:8080/x HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
       b"User-Agent: curl/8.0\r\nAccept: */*")
RESP = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5"


def test_a_remembered_request_is_what_quick_request_answers():
    memo = HeadMemo(VIA, http.DEFAULT_LIMITS)
    first = memo.request(REQ)
    assert first.quick == quick_request(REQ, VIA)
    assert memo.request(bytes(bytearray(REQ))) is first  # an equal head, another object
    assert first.where == "127.0.0.1:8080" and not first.binds
    with_auth = memo.request(REQ + b"\r\nAuthorization: Basic eDp5")
    assert with_auth.binds and with_auth.quick is not None


def test_an_entry_carries_the_fields_the_lane_reads_as_the_quick_result_has_them():
    """The lane reads the quick request's and response's fields from the entries
    (slots, copied at insertion): they must be those of the quick result, and the
    empty ones of an entry for a head outside the common case."""
    memo = HeadMemo(VIA, http.DEFAULT_LIMITS)
    for raw in (REQ, REQ + b"\r\nProxy-Authorization: Basic eDp5\r\nConnection: close"):
        entry, q = memo.request(raw), quick_request(raw, VIA)
        assert q is not None
        assert (entry.out, entry.close, entry.auth, entry.host, entry.port, entry.method) \
            == (q.out, q.close, q.auth, q.dest.host, q.dest.port, q.method)
    assert memo.request(b"GET / HTTP/1.1\r\nHost: a").quick is None
    assert memo.request(b"GET / HTTP/1.1\r\nHost: a").out == b""
    for method, close in ((b"GET", False), (b"HEAD", True)):
        r, qr = memo.response(RESP, method, close), quick_response(RESP, VIA, method, close)
        assert qr is not None
        assert (r.status, r.length, r.out, r.upstream_keep) \
            == (qr.status, qr.length, qr.out, qr.upstream_keep)
    assert memo.response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", b"GET",
                         False).quick is None


def test_heads_with_credentials_are_not_kept():
    """The memory is shared by all clients: a hit must not tell one client by its
    timing that another sent a secret lately."""
    memo = HeadMemo(VIA, http.DEFAULT_LIMITS)
    for field in (b"Proxy-Authorization: Basic eDp5", b"authorization: Bearer t",
                  b"Cookie: session=s3cret", b"Authorization: x\r\nTransfer-Encoding: gzip"):
        entry = memo.request(REQ + b"\r\n" + field)
        assert entry == memo.request(REQ + b"\r\n" + field)  # the same answer, computed
    assert memo.requests == {}
    memo.request(REQ + b"\r\nX-Cookie-Note: none")
    assert len(memo.requests) == 1


def test_heads_outside_the_common_case_are_remembered_as_such():
    memo = HeadMemo(VIA, http.DEFAULT_LIMITS)
    smuggle = REQ + b"\r\nContent-Length: 3\r\nTransfer-Encoding: chunked"
    assert quick_request(smuggle, VIA) is None
    assert memo.request(smuggle).quick is None
    assert memo.request(smuggle).quick is None


def test_a_response_is_remembered_per_method_and_close():
    memo = HeadMemo(VIA, http.DEFAULT_LIMITS)
    get = memo.response(RESP, b"GET", False)
    head = memo.response(RESP, b"HEAD", False)
    close = memo.response(RESP, b"GET", True)
    assert get.quick is not None and get.quick.length == 5
    assert head.quick is not None and head.quick.length == 0  # the same bytes, no body
    assert close.quick is not None and b"Connection: close" in close.quick.out
    for (method, c), entry in {(b"GET", False): get, (b"HEAD", False): head,
                               (b"GET", True): close}.items():
        assert entry.quick == quick_response(RESP, VIA, method, c)
        assert memo.response(RESP, method, c) is entry
    ntlm = memo.response(RESP + b"\r\nWWW-Authenticate: NTLM", b"GET", False)
    assert ntlm.binds and not get.binds


def test_the_memory_stays_bounded():
    memo = HeadMemo(VIA, http.DEFAULT_LIMITS)
    for i in range(3 * HeadMemo.ENTRIES):
        memo.request(REQ + b"\r\nX-N: %d" % i)
        memo.response(RESP + b"\r\nX-N: %d" % i, b"GET", False)
    assert len(memo.requests) <= HeadMemo.ENTRIES
    assert len(memo.responses) <= HeadMemo.ENTRIES
    long = REQ + b"\r\nX-Pad: " + b"p" * HeadMemo.HEAD_MAX
    assert memo.request(long).quick == quick_request(long, VIA)
    assert long not in memo.requests  # long heads are rewritten, not kept

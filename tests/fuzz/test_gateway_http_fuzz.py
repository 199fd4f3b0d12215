"""Property tests of the gateway's HTTP core: hostile bytes, framing and rewrite round trips."""

from __future__ import annotations

import itertools
import string

from hypothesis import event, given, settings
from hypothesis import strategies as st

from kakehashi.gateway import http as h
from kakehashi.gateway.http import (
    ChunkedDecoder,
    End,
    Headers,
    HeadLimits,
    HeadReader,
    HTTPError,
    RequestHead,
    Trailers,
)

FAST = settings(max_examples=200, deadline=None)  # whole file well under 10 s
SMALL = HeadLimits(max_head=512, max_line=128, max_headers=8)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def mutate(data: bytes, edits: list[tuple[int, bytes]]) -> bytes:
    """Overwrite a few spots so near-valid input probes each check."""
    for pos, new in edits:
        pos %= len(data) + 1
        data = data[:pos] + new + data[pos + len(new) :]
    return data


some_edits = st.lists(st.tuples(st.integers(min_value=0),
                           st.sampled_from([b" ", b"\t", b"\n", b"\r", b"\0", b":", b"\xff",
                                            b"\r\n", b"\r\n\r\n", b"@", b"["])),
                      min_size=1, max_size=3)
edits = st.one_of(st.just([]), some_edits)  # half the cases stay as generated
request_line = st.sampled_from([
    b"GET / HTTP/1.1", b"GET http://a.example:81/x?y HTTP/1.1", b"POST /p HTTP/1.0",
    b"CONNECT a.example:443 HTTP/1.1", b"OPTIONS * HTTP/1.1", b"GET http://[::1]/ HTTP/1.1",
    b"GET / HTTP/2.0", b"GET /", b"", b"G ET / HTTP/1.1", b"GET /" + b"a" * 200 + b" HTTP/1.1",
])
status_line = st.sampled_from([
    b"HTTP/1.1 200 OK", b"HTTP/1.0 404", b"HTTP/1.1 204 No Content", b"HTTP/1.1 99 Low",
    b"HTTP/1.1 200 " + b"r" * 200, b"HTTP/2 200", b"",
])
good_field = st.tuples(
    st.sampled_from([b"X-A", b"Content-Length", b"Via", b"Transfer-Encoding", b"Connection",
                     b"Accept"]),
    st.sampled_from([b"a.example", b"5", b"chunked", b"close", b"", b"1.1 gw", b" spaced\t"]),
).map(b": ".join)
bad_field = st.sampled_from([b" folded", b"\tfolded", b"Bad Name: x", b"X : y", b"NoColon",
                             b"X: nul\0", b": v", b"X: " + b"x" * 200, b"Host: again"])
field_lines = st.one_of(
    st.lists(good_field, max_size=9),
    st.lists(st.one_of(good_field, good_field, good_field, bad_field), max_size=9),
)


def near_heads(kind: str) -> st.SearchStrategy[bytes]:
    """Mostly valid heads of ``kind`` with the odd broken line or overwritten byte."""
    first = request_line if kind == "request" else status_line
    host = st.sampled_from([[b"Host: a.example"], [b"Host: a.example"], []])
    return st.tuples(first, host, field_lines, edits).map(
        lambda t: mutate(b"\r\n".join([t[0], *t[1], *t[2]]) + b"\r\n\r\n", t[3]))


def hostile(kind: str) -> st.SearchStrategy[tuple[str, bytes]]:
    data = st.one_of(st.binary(max_size=600), near_heads(kind),
                     st.lists(near_heads(kind), min_size=2, max_size=3).map(b"".join))
    return st.tuples(st.just(kind), data)


def drain_heads(reader: HeadReader, chunks: list[bytes], kind: str) -> list:
    heads = []
    for chunk in chunks:
        reader.feed(chunk)
        while (head := reader.next_head(kind)) is not None:  # type: ignore[arg-type]
            heads.append(head)
        # waiting for the rest of a head never holds more than the limit
        assert reader.buffered <= SMALL.max_head
    # the count kept beside the buffer is the bytes held (the reader is done with)
    assert reader.buffered == len(reader.take_rest()) and not reader.buffered
    return heads


# -- head reader --------------------------------------------------------------------------
@FAST
@given(st.one_of(hostile("request"), hostile("response")),
       st.lists(st.integers(min_value=0), max_size=10))
def test_head_reader_raises_only_http_errors_and_stays_bounded(case, cuts):
    kind, data = case
    reader = HeadReader(SMALL)
    try:
        heads = drain_heads(reader, split(data, cuts), kind)
    except HTTPError as exc:
        event(f"{kind} refused {exc.status}")
        assert 400 <= exc.status <= 599 and exc.reason
        if kind == "response":
            assert exc.status == 502
        return
    event(f"{kind}: {len(heads)} heads accepted")
    for head in heads:  # whatever was accepted serialises to something parseable again
        again = HeadReader(SMALL)
        again.feed(head.serialize())
        assert again.next_head(kind) == head  # type: ignore[arg-type]


token = st.text(alphabet=string.ascii_letters + string.digits + "-!#$%&'*+.^_`|~",
                min_size=1, max_size=12).map(str.encode)
field_value = st.text(alphabet=string.ascii_letters + string.digits + " ;,=/\"()",
                      max_size=20).map(lambda s: s.strip().encode())
fields = st.lists(st.tuples(token, field_value), max_size=6)


@FAST
@given(st.sampled_from([b"GET", b"POST", b"OPTIONS", b"X-CUSTOM"]),
       st.text(alphabet=string.ascii_letters + string.digits + "/?=&%-._~", max_size=30),
       st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]), fields,
       st.lists(st.integers(min_value=0), max_size=6))
def test_valid_request_heads_parse_back_in_any_chunking(method, path, version, extra, cuts):
    extra = [(n, v) for n, v in extra if n.lower() != b"host"]
    head = RequestHead(method, b"/" + path.encode(), version,
                       Headers([(b"Host", b"example.com"), *extra]))
    raw = head.serialize()
    reader = HeadReader()
    got = drain_heads(reader, split(raw + raw, cuts), "request")
    assert got == [head, head]


# -- chunked ------------------------------------------------------------------------------
def drain_chunked(dec: ChunkedDecoder, chunks: list[bytes]) -> tuple[bytes, list]:
    data = b""
    other: list = []
    for chunk in chunks:
        dec.feed(chunk)
        for ev in dec.events():
            if isinstance(ev, bytes):
                data += ev
            else:
                other.append(ev)
        assert dec.buffered <= SMALL.max_head + len(chunk)
    return data, other


def chunk_stream(parts: list[tuple[int, bytes, bytes]], trailer: list[bytes]) -> bytes:
    """Chunks whose declared size may disagree with their data, then a last chunk."""
    out = b"".join(b"%x%s\r\n%s\r\n" % (size, ext, data) for size, ext, data in parts)
    return out + b"0\r\n" + b"".join(t + b"\r\n" for t in trailer) + b"\r\n"


near_chunked = st.tuples(
    st.lists(st.tuples(st.binary(max_size=40), st.sampled_from([0, 0, 0, 0, 0, 1, -1]))
             .map(lambda t: (max(0, len(t[0]) + t[1]), t[0])), max_size=5)
    .flatmap(lambda parts: st.tuples(
        st.just(parts),
        st.lists(st.sampled_from([b"", b"", b";a=b", b' ;q="x"', b";" + b"e" * 200]),
                 min_size=len(parts), max_size=len(parts))))
    .map(lambda t: [(size, ext, data) for (size, data), ext in zip(*t, strict=True)]),
    st.lists(st.sampled_from([b"X: 1", b"Bad Name: 2", b" fold", b"Y:2"]), max_size=3),
    edits,
).map(lambda t: mutate(chunk_stream(t[0], t[1]), t[2]))


@FAST
@given(st.one_of(st.binary(max_size=300), near_chunked),
       st.lists(st.integers(min_value=0), max_size=10))
def test_chunked_decoder_raises_only_http_errors(data, cuts):
    dec = ChunkedDecoder(SMALL)
    try:
        _, other = drain_chunked(dec, split(data, cuts))
    except HTTPError as exc:
        event(f"refused: {exc.reason}")
        assert exc.status == 400 and exc.reason
        return
    event("ended" if other else "waiting")
    if other:
        assert isinstance(other[-1], End) and dec.done


@FAST
@given(st.lists(st.binary(min_size=0, max_size=300), max_size=8),
       st.lists(st.tuples(token, field_value), max_size=3),
       st.binary(max_size=20),
       st.lists(st.integers(min_value=0), max_size=12))
def test_chunked_round_trip_in_any_split(pieces, trailer_fields, after, cuts):
    trailers = Headers(trailer_fields)
    stream = b"".join(map(h.encode_chunk, pieces)) + h.last_chunk(trailers) + after
    dec = ChunkedDecoder(SMALL)
    data, other = drain_chunked(dec, split(stream, cuts))
    assert data == b"".join(pieces)
    if trailer_fields:
        assert isinstance(other[0], Trailers) and other[0].headers == trailers
    assert isinstance(other[-1], End)
    assert dec.unconsumed() == after


# -- client module -> gateway round trip (Fig. 6/7: 501 -> 503 -> 504 == 501) ---------------
label = st.text(alphabet=string.ascii_lowercase + string.digits, min_size=1, max_size=10)
hostname = st.lists(label, min_size=1, max_size=4).map(".".join)
ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
ipv6 = st.sampled_from(["::1", "2001:db8::1", "fe80::a:b:c:d", "::"])
hop_names = st.sampled_from([b"Connection", b"Keep-Alive", b"Proxy-Connection", b"TE",
                             b"Upgrade", b"Trailer", b"Proxy-Authorization",
                             b"Transfer-Encoding", b"Proxy-Authenticate"])
END_TO_END_EXCLUDED = h.HOP_BY_HOP | {b"host", b"via", b"content-length"}
end_to_end = st.lists(
    st.tuples(token, field_value).filter(lambda f: f[0].lower() not in END_TO_END_EXCLUDED),
    max_size=6,
)


@FAST
@given(st.sampled_from([b"GET", b"POST", b"DELETE", b"PUT"]),
       st.text(alphabet=string.ascii_letters + string.digits + "/?=&%-._~", max_size=30),
       st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]),
       st.one_of(hostname, ipv4, ipv6), st.integers(1, 65535), end_to_end,
       st.booleans(), st.integers(0, 3))
def test_client_rewrite_round_trip(method, path, version, host, port, others, with_length,
                                   host_pos):
    authority = h.format_authority(host, port, 80)
    fields = list(others)
    if with_length:
        fields.append((b"Content-Length", b"7"))
    fields.insert(min(host_pos, len(fields)), (b"Host", authority))
    original = RequestHead(method, b"/" + path.encode(), version, Headers(fields))  # 501
    converted = h.to_absolute(original, host, port, b"gw.example:8080")  # 503
    assert converted.headers.get(b"host") == b"gw.example:8080"
    reader = HeadReader()  # through the aggregation port, as bytes
    reader.feed(converted.serialize())
    received = reader.next_request()
    assert received is not None
    target, relayed = h.to_origin(received, b"gw.example:8080")  # 504
    assert (target.host, target.port) == (host, port)
    assert relayed.headers.get_all(b"via")[-1].endswith(b" gw.example:8080")
    relayed.headers.remove(b"via")
    assert relayed == original  # request line, Host and every other field, in order


# -- to_origin never forwards hop-by-hop fields -------------------------------------------
@FAST
@given(st.lists(st.one_of(st.tuples(hop_names, field_value),
                          st.tuples(token, field_value)), max_size=10),
       st.lists(token, max_size=3), st.sampled_from([b"", b"chunked", b"length"]))
def test_to_origin_never_emits_hop_by_hop(fields, listed, framing):
    fields = [(n, v) for n, v in fields
              if n.lower() not in (b"host", b"transfer-encoding", b"content-length", b"via")]
    if listed:
        fields.append((b"Connection", b", ".join(listed)))
    if framing == b"chunked":
        fields.append((b"Transfer-Encoding", b"chunked"))
    elif framing == b"length":
        fields.append((b"Content-Length", b"3"))
    head = RequestHead(b"POST", b"http://example.com/x", b"HTTP/1.1",
                       Headers([(b"Host", b"example.com"), *fields]))
    _, out = h.to_origin(head, b"gw")
    names = [n.lower() for n, _ in out.headers]
    refilled = {b"host", b"via", b"content-length", b"transfer-encoding"}
    offer = h.upgrade_offer(head, h.request_body(head))
    if offer is not None:  # the one deliberate exception: a well-formed upgrade offer
        event("upgrade offer relayed")
        assert out.headers.get_all(b"connection") == [b"Upgrade"]
        assert out.headers.get_all(b"upgrade") == [offer]
        refilled |= {b"connection", b"upgrade"}
    for name in names:
        if name == b"transfer-encoding":  # the framing the gateway itself declares
            assert framing == b"chunked" and out.headers.get_all(name) == [b"chunked"]
        elif name not in refilled - {b"transfer-encoding"}:
            assert name not in h.HOP_BY_HOP
        assert name in refilled or name not in {t.lower() for t in listed}
    assert h.request_body(out) == h.request_body(head)


# -- recognising HTTP on a shared port (gateway.http.looks_like_request) --------------------
METHOD_NAMES = ["GET", "PROPFIND", "MKCOL", "REPORT", "MKCALENDAR", "SEARCH", "PURGE", "LINK",
                "M-SEARCH", "QUERY", "CONNECT", "X.Y_Z~1"]
tokens = st.text(alphabet=string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~",
                 min_size=1, max_size=20)
targets = st.text(alphabet="".join(chr(c) for c in range(0x21, 0x7F)), min_size=1, max_size=60)


@FAST
@given(st.one_of(st.sampled_from(METHOD_NAMES), tokens), targets,
       st.sampled_from(["1.1", "1.0", "2.0", "0.9"]), st.integers(0, 3))
def test_every_prefix_of_a_request_line_waits_and_the_line_is_http(method, target, version,
                                                                    blank):
    line = ("\r\n" * blank + f"{method} {target} HTTP/{version}\r\nHost: x\r\n\r\n").encode()
    end = line.index(b" HTTP/") + len(b" HTTP/1.1")
    for n in range(end):
        assert h.looks_like_request(line[:n]) is None, line[:n]
    for n in range(end, len(line) + 1):
        assert h.looks_like_request(line[:n]) is True


@FAST
@given(st.binary(max_size=40))
def test_the_answer_never_changes_once_given(data):
    """Monotone on any bytes: a False stays False and a True stays True as more come,
    so the mux may decide on whatever prefix it has peeked."""
    answers = [h.looks_like_request(data[:n]) for n in range(len(data) + 1)]
    for a, b in itertools.pairwise(answers):
        if a is not None:
            assert b is a
    if answers[-1] is True:  # and True means the request-line grammar holds
        parts = data.lstrip(b"\r\n").split(b" ", 2)
        assert len(parts) == 3 and parts[2].startswith(b"HTTP/")
        assert not parts[0].translate(None, h._TCHAR)


@FAST
@given(st.binary(max_size=30))
def test_other_protocols_on_the_port_are_not_http(tail):
    from kakehashi.core import wire

    for other in (wire.PREAMBLE, b"\x16\x03\x01\x02\x00", b"SSH-2.0-OpenSSH_9.6 Ubuntu\r\n",
                  b"\x00\x00\x00\x08"):
        assert h.looks_like_request(other + tail) is False

"""Property tests of the frame codec and the relay message schema (hostile input)."""

from __future__ import annotations

import asyncio
import re
import string

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kakehashi.core.stream import ConnClosed, FramedConn
from kakehashi.core.wire import (
    HEADER_SIZE,
    MAX_FRAME,
    PREAMBLE,
    FrameDecoder,
    FrameType,
    Limits,
    WireError,
    encode_frame,
    encode_header,
    split_frames,
)
from kakehashi.relay import messages as m

FAST = settings(max_examples=300, deadline=None)
SMALL = Limits(max_ctrl=64, max_data=256)
MOST = HEADER_SIZE + max(SMALL.max_ctrl, SMALL.max_data)

frames = st.one_of(
    st.binary(max_size=SMALL.max_ctrl).map(lambda p: (FrameType.CTRL, p)),
    st.binary(max_size=SMALL.max_data).map(lambda p: (FrameType.DATA, p)),
    st.just((FrameType.EOF, b"")),
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def drain(dec: FrameDecoder, chunks) -> list:
    out = []
    for chunk in chunks:
        dec.feed(chunk)
        out += dec.frames()
    return out


# -- framing ----------------------------------------------------------------------------
@FAST
@given(st.lists(frames, max_size=8), st.lists(st.integers(min_value=0), max_size=12),
       st.booleans())
def test_frames_round_trip_in_any_chunking(sent, cuts, preamble):
    stream = (PREAMBLE if preamble else b"") + b"".join(encode_frame(t, p) for t, p in sent)
    dec = FrameDecoder(SMALL, expect_preamble=preamble)
    got = drain(dec, chunked(stream, cuts))
    assert [(f.type, f.payload) for f in got] == sent
    assert dec.buffered == 0


@FAST
@given(st.sampled_from([b"", PREAMBLE]), st.lists(st.binary(max_size=300), max_size=8),
       st.booleans())
def test_garbage_raises_only_wire_error_and_buffer_stays_bounded(prefix, chunks, preamble):
    dec = FrameDecoder(SMALL, expect_preamble=preamble)
    try:
        for chunk in [prefix, *chunks]:
            dec.feed(chunk)
            for frame in dec.frames():
                assert len(frame.payload) <= SMALL.max_data
            assert dec.buffered < MOST
    except WireError as exc:
        assert exc.code in {"too-large", "bad-frame", "not-kakehashi", "version"}


@FAST
@given(st.lists(frames, max_size=8))
def test_split_frames_reads_whole_bodies_in_place(sent):
    """The in-place splitter (whole bodies: switch link messages) agrees with the
    incremental decoder, and its payloads are views, not copies."""
    body = b"".join(encode_frame(t, p) for t, p in sent)
    got = split_frames(body, SMALL)
    assert [(t, bytes(p)) for t, p, _ in got] == sent
    assert b"".join(bytes(f) for _, _, f in got) == body
    assert all(isinstance(p, memoryview) for _, p, _ in got)


@FAST
@given(st.binary(max_size=400))
def test_split_frames_of_garbage_raises_only_wire_error(body):
    """Anything that is not whole frames within the limits is a WireError, and what
    comes back is within the limits."""
    try:
        for ftype, payload, _ in split_frames(body, SMALL):
            assert len(payload) <= (SMALL.max_ctrl if ftype == FrameType.CTRL
                                    else SMALL.max_data)
    except WireError as exc:
        assert exc.code in {"too-large", "bad-frame", "truncated"}


@FAST
@given(st.sampled_from([FrameType.CTRL, FrameType.DATA]), st.data())
def test_oversized_header_rejected_before_payload(ftype, data):
    limit = SMALL.max_ctrl if ftype is FrameType.CTRL else SMALL.max_data
    length = data.draw(st.integers(min_value=limit + 1, max_value=MAX_FRAME))
    dec = FrameDecoder(SMALL)
    dec.feed(encode_header(ftype, length))  # no payload byte yet
    with pytest.raises(WireError) as err:
        dec.next_frame()
    assert err.value.code == "too-large"


@pytest.mark.parametrize(("ftype", "limit"), [(FrameType.CTRL, 64), (FrameType.DATA, 256)])
def test_frame_of_exactly_the_limit_is_accepted(ftype, limit):
    dec = FrameDecoder(SMALL)
    dec.feed(encode_frame(ftype, bytes(limit)))
    assert len(dec.next_frame().payload) == limit


@pytest.mark.parametrize(
    ("header", "code"),
    [((FrameType.EOF << 24 | 1).to_bytes(4, "big"), "bad-frame"),
     ((0).to_bytes(4, "big"), "bad-frame"),
     ((9 << 24).to_bytes(4, "big"), "bad-frame")],
)
def test_bad_headers(header, code):
    dec = FrameDecoder()
    dec.feed(header)
    with pytest.raises(WireError) as err:
        dec.next_frame()
    assert err.value.code == code


@pytest.mark.parametrize(
    ("first", "code"), [(b"H", "not-kakehashi"), (b"KKX", "not-kakehashi"), (b"KKH\x07", "version")]
)
def test_bad_preamble_detected_early(first, code):
    dec = FrameDecoder(expect_preamble=True)
    dec.feed(first)
    with pytest.raises(WireError) as err:
        dec.next_frame()
    assert err.value.code == code


def test_partial_preamble_waits():
    dec = FrameDecoder(expect_preamble=True)
    dec.feed(PREAMBLE[:3])
    assert dec.next_frame() is None
    dec.feed(PREAMBLE[3:] + encode_frame(FrameType.EOF))
    assert dec.next_frame().type is FrameType.EOF


def test_take_buffer_hands_over_unparsed_bytes():
    dec = FrameDecoder()
    dec.feed(encode_frame(FrameType.DATA, b"abc") + b"\x16\x03\x01")
    assert dec.next_frame().payload == b"abc"
    assert dec.take_buffer() == b"\x16\x03\x01"
    assert dec.buffered == 0


# -- message schema -----------------------------------------------------------------------
NAME_CHARS = string.ascii_letters + string.digits + "_.@-"
NAME = re.compile(r"^[A-Za-z0-9_.@-]+\Z")
SERVICE = re.compile(r"^[A-Za-z0-9_.@-]*\Z")


def strategy(t: mi.Type) -> st.SearchStrategy:
    """Valid values of a msgspec type, honouring its declared bounds."""
    if isinstance(t, mi.StructType):
        return st.builds(t.cls, **{f.name: strategy(f.type) for f in t.fields})
    if isinstance(t, mi.UnionType):
        return st.one_of([strategy(x) for x in t.types])
    if isinstance(t, mi.StrType):
        lo, hi = t.min_length or 0, min(t.max_length or 64, 64)
        if t.pattern:
            assert t.pattern in (NAME.pattern, SERVICE.pattern), "a new pattern: teach me"
            return st.text(NAME_CHARS, min_size=lo, max_size=hi)
        return st.text(min_size=lo, max_size=hi)
    if isinstance(t, mi.IntType):
        lo = -(2**63) if t.ge is None else t.ge
        lo = lo if t.gt is None else max(lo, t.gt + 1)
        hi = 2**64 - 1 if t.lt is None else t.lt - 1
        hi = hi if t.le is None else min(hi, t.le)
        return st.integers(lo, hi)
    if isinstance(t, mi.ListType):
        return st.lists(strategy(t.item_type), max_size=min(t.max_length or 4, 4))
    if isinstance(t, mi.LiteralType):
        return st.sampled_from(t.values)
    if isinstance(t, mi.BytesType):
        lo = t.min_length or 0
        return st.binary(min_size=lo, max_size=max(min(t.max_length or 64, 64), lo))
    simple = {mi.BoolType: st.booleans(), mi.NoneType: st.none(),
              mi.FloatType: st.floats(allow_nan=False)}
    return simple[type(t)]


CODECS = [(m.RELAY_CODEC, m.ToRelay), (m.TERMINAL_CODEC, m.ToTerminal)]
messages = st.one_of([strategy(mi.type_info(schema)).map(lambda msg, c=codec: (c, msg))
                      for codec, schema in CODECS])


@FAST
@given(messages)
def test_valid_messages_round_trip(pair):
    codec, msg = pair
    dec = FrameDecoder()
    dec.feed(codec.encode(msg))
    [frame] = dec.frames()
    assert frame.type is FrameType.CTRL
    assert codec.decode(frame.payload) == msg


@FAST
@given(st.sampled_from([c for c, _ in CODECS]), st.binary(max_size=200))
def test_decoding_garbage_raises_only_wire_error(codec, data):
    try:
        assert isinstance(codec.decode(data), m.Msg)
    except WireError as exc:
        assert exc.code in {"schema", "decode"}


TAGS = sorted({info.tag for _, s in CODECS for info in mi.type_info(s).types})
leaf = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=80)
        | st.binary(max_size=20) | st.floats())
loose = (leaf | st.lists(leaf, max_size=3)
         | st.dictionaries(st.sampled_from(["services", "encryption", "user", "x"]),
                           leaf | st.lists(leaf, max_size=3), max_size=3))


@FAST
@given(st.sampled_from([c for c, _ in CODECS]), st.sampled_from(TAGS),
       st.dictionaries(st.sampled_from(["user", "req", "target", "attrs", "users", "body",
                                        "ok", "peer", "seq", "x"]), loose, max_size=5))
def test_well_formed_msgpack_with_wrong_fields_raises_only_wire_error(codec, tag, fields):
    data = msgspec.msgpack.encode({**fields, "t": tag})
    try:
        assert isinstance(codec.decode(data), m.Msg)
    except WireError as exc:
        assert exc.code == "schema"


@FAST
@given(st.text(max_size=70) | st.from_regex(r"[a-z]{1,5}\s?", fullmatch=True))
def test_names_are_validated(name):
    data = m.RELAY_CODEC.encode(m.ConnectRequest(req=1, target=name))[HEADER_SIZE:]
    if NAME.match(name) and len(name) <= 64:
        assert m.RELAY_CODEC.decode(data).target == name
    else:
        with pytest.raises(WireError) as err:
            m.RELAY_CODEC.decode(data)
        assert err.value.code == "schema"


@pytest.mark.parametrize(
    "msg",
    [m.Login(user="al ice"), m.Login(user="a" * 65), m.Login(user=""), m.Login(user="alice\n"),
     m.ConnectRequest(req=-1, target="bob"), m.ConnectRequest(req=1, target="bob",
                                                              service="s s"),
     m.Broadcast(targets=["ok", "not ok"], body=b""),
     m.SetAttrs(attrs=m.Attrs(services=["ssh\n"]))],
)
def test_invalid_fields_rejected(msg):
    with pytest.raises(WireError) as err:
        m.RELAY_CODEC.decode(m.RELAY_CODEC.encode(msg)[HEADER_SIZE:])
    assert err.value.code == "schema"


def test_unknown_field_and_unknown_tag_rejected():
    for raw in ({"t": "hold", "seq": 1, "extra": 1}, {"t": "nope"}, {"seq": 1}):
        with pytest.raises(WireError):
            m.RELAY_CODEC.decode(msgspec.msgpack.encode(raw))


def test_relay_rejects_terminal_bound_messages():
    with pytest.raises(WireError):
        m.RELAY_CODEC.decode(m.TERMINAL_CODEC.encode(m.Released())[HEADER_SIZE:])


def test_oversized_control_message_refused_on_encode():
    codec = m.RELAY_CODEC.__class__(m.ToRelay, Limits(max_ctrl=32))
    with pytest.raises(WireError) as err:
        codec.encode(m.Login(user="alice", password="x" * 40))
    assert err.value.code == "too-large"


# -- the production reader runs this codec ------------------------------------------------
class _ScriptedConn:
    """What FramedConn needs of a connection: ``recv`` of the stream cut at ``cuts``."""

    plain = True

    def __init__(self, data: bytes, cuts: list[int]) -> None:
        self.chunks = chunked(data, cuts)
        self.loop = asyncio.get_running_loop()

    async def recv(self, n: int) -> bytes:
        while self.chunks and not self.chunks[0]:
            self.chunks.pop(0)
        if not self.chunks:
            return b""
        chunk = self.chunks[0]
        self.chunks[0] = chunk[n:]
        return chunk[:n]


async def _read_all(data: bytes, cuts: list[int], preamble: bool) -> list[tuple]:
    framed = FramedConn(_ScriptedConn(data, cuts), SMALL)  # type: ignore[arg-type]
    if preamble:
        await framed.read_preamble()
    out = []
    while True:
        header = await framed.read_header(exact=bool(len(out) % 2))
        if header is None:
            return out
        ftype, length = header
        if ftype is FrameType.DATA and length > 1:  # the pump's way: part buffered, part spliced
            head = framed.take_buffered_payload(length // 2)
            out.append((ftype, head + await framed.read_payload(length - len(head))))
        else:
            out.append((ftype, await framed.read_payload(length)))


@FAST
@given(st.lists(frames, max_size=8), st.lists(st.integers(min_value=0), max_size=12),
       st.booleans())
def test_framed_conn_reads_what_the_decoder_reads(sent, cuts, preamble):
    """FramedConn (production) is a reader around FrameDecoder: any chunking gives the
    frames that were sent, header by header and payload by payload."""
    stream = (PREAMBLE if preamble else b"") + b"".join(encode_frame(t, p) for t, p in sent)
    assert asyncio.run(_read_all(stream, cuts, preamble)) == sent


@FAST
@given(st.sampled_from([b"", PREAMBLE]), st.binary(max_size=600),
       st.lists(st.integers(min_value=0), max_size=6))
def test_framed_conn_raises_only_clear_errors_on_garbage(prefix, garbage, cuts):
    try:
        for ftype, payload in asyncio.run(_read_all(prefix + garbage, cuts, bool(prefix))):
            assert len(payload) <= SMALL.max_data and ftype in FrameType
    except WireError as exc:
        assert exc.code in {"too-large", "bad-frame", "not-kakehashi", "version",
                            "tls-mismatch"}
    except ConnClosed:
        pass  # the stream ended in the middle of a frame


@FAST
@given(st.lists(frames, max_size=8), st.lists(st.integers(min_value=0), max_size=12))
def test_header_then_payload_agrees_with_whole_frames(sent, cuts):
    stream = b"".join(encode_frame(t, p) for t, p in sent)
    dec = FrameDecoder(SMALL)
    got: list[tuple] = []
    current: list = []
    for chunk in chunked(stream, cuts):
        dec.feed(chunk)
        while True:
            if current:
                ftype, length, parts = current
                parts.append(dec.take_payload(length - sum(map(len, parts))))
                if sum(map(len, parts)) < length:
                    break
                got.append((ftype, b"".join(parts)))
                current = []
            header = dec.next_header()
            if header is None:
                break
            current = [header[0], header[1], []]
    if current:
        got.append((current[0], b"".join(current[2])))
    assert got == sent and dec.payload_left == 0

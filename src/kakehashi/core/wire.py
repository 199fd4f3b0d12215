"""Control-frame codec, sans-IO.

Every kakehashi stream protocol speaks the same framing so that one byte pump can
forward it and one fuzz target covers it:

* a 4-byte **preamble** ``b"KKH" + version`` opens the stream (the gateway's single
  port recognises kakehashi traffic from these first bytes);
* then **frames**: a 4-byte big-endian header ``type << 24 | length`` followed by
  ``length`` payload bytes.

Frame types:

``CTRL``
    a control message: msgpack, validated against the system's message schema
    (a ``msgspec`` tagged union), at most ``Limits.max_ctrl`` bytes.
``DATA``
    opaque application bytes (the relay never looks inside), at most
    ``Limits.max_data`` bytes. Keeping data framed after pairing is what lets the
    end/release notifications of the relay protocol travel in-band, so a connection
    returns to idle and is reused instead of reopened.
``EOF``
    the sender will send no more DATA in this session (half-close). Empty, or
    exactly :data:`SEALED_EOF_SIZE` bytes: the authentication tag that makes the end
    of a stream sealed end to end (a session under the relay-issued session cipher)
    as hard to forge as its data; or that tag behind a sealed reason of at most
    :data:`CLOSE_REASON_MAX` bytes (the stream was closed rather than ended, and why).

Nothing here touches a socket: :class:`FrameDecoder` takes bytes and yields
frames (it is the parser production runs, and the one the fuzzer exercises),
:func:`encode_frame` makes bytes. Malformed input raises
:class:`WireError` with a message meant for a human.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec

from kakehashi.core import tlsmismatch, trace

MAGIC = b"KKH"
VERSION = 1
PREAMBLE = MAGIC + bytes([VERSION])
HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
MAX_FRAME = (1 << 24) - 1
#: the one payload size an EOF frame may have besides 0: a sealed empty message
#: (the 16-byte AEAD tag) that authenticates the end of a sealed stream
SEALED_EOF_SIZE = 16
#: the longest reason a sealed close carries (``kakehashi.core.pump.seal_close``)
CLOSE_REASON_MAX = 512


class FrameType(enum.IntEnum):
    CTRL = 1
    DATA = 2
    EOF = 3


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits a receiver enforces; the sender must respect the peer's."""

    max_ctrl: int = 64 * 1024
    max_data: int = 1024 * 1024

    def check(self, ftype: int, length: int) -> None:
        if ftype == FrameType.CTRL:
            if length > self.max_ctrl:
                raise WireError(
                    "too-large", f"control frame of {length} bytes exceeds {self.max_ctrl}"
                )
        elif ftype == FrameType.DATA:
            if length > self.max_data:
                raise WireError(
                    "too-large", f"data frame of {length} bytes exceeds {self.max_data}"
                )
        elif ftype == FrameType.EOF:
            if length and not SEALED_EOF_SIZE <= length <= SEALED_EOF_SIZE + CLOSE_REASON_MAX:
                raise WireError("bad-frame", "EOF frame must be empty or carry a "
                                f"{SEALED_EOF_SIZE}-byte seal (and at most "
                                f"{CLOSE_REASON_MAX} bytes of sealed reason)")
        else:
            raise WireError("bad-frame", f"unknown frame type {ftype}")


DEFAULT_LIMITS = Limits()


class WireError(Exception):
    """A peer broke the framing or the schema. ``code`` is stable, the text is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def encode_header(ftype: FrameType, length: int) -> bytes:
    if not 0 <= length <= MAX_FRAME:
        raise ValueError(f"frame length {length} out of range")
    return HEADER.pack((int(ftype) << 24) | length)


def decode_header(header: bytes | bytearray | memoryview) -> tuple[int, int]:
    (word,) = HEADER.unpack(header)
    return word >> 24, word & MAX_FRAME


def encode_frame(ftype: FrameType, payload: bytes = b"") -> bytes:
    return encode_header(ftype, len(payload)) + payload


def check_preamble(data: bytes) -> None:
    """Validate a 4-byte preamble; raise WireError saying what was wrong."""
    if data[:3] != MAGIC:
        if tlsmismatch.is_tls_record(data):
            raise WireError("tls-mismatch", "the peer speaks TLS and this side does not")
        raise WireError("not-kakehashi", "peer does not speak the kakehashi protocol")
    if data[3] != VERSION:
        raise WireError(
            "version", f"peer speaks protocol version {data[3]}, this side speaks {VERSION}"
        )


def split_frames(body: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS
                 ) -> list[tuple[int, memoryview, memoryview]]:
    """Every frame of a body that holds whole frames, read in place: ``(type,
    payload, frame)`` with views into ``body`` (no buffer to feed, no copy).

    For bodies that arrive whole (a switch link's WebSocket message or poll body),
    where :class:`FrameDecoder`'s incremental buffering would copy each payload.
    Each header is checked against ``limits`` before its payload is looked at; a
    body that ends inside a frame raises WireError ``truncated``."""
    view = memoryview(body)
    out = []
    at, end = 0, len(view)
    while at < end:
        if end - at < HEADER_SIZE:
            raise WireError("truncated", "body ends in the middle of a frame header")
        (word,) = HEADER.unpack_from(view, at)
        ftype, length = word >> 24, word & MAX_FRAME
        limits.check(ftype, length)
        stop = at + HEADER_SIZE + length
        if stop > end:
            raise WireError("truncated", "body ends in the middle of a frame")
        out.append((ftype, view[at + HEADER_SIZE:stop], view[at:stop]))
        at = stop
    return out


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    payload: bytes


class FrameDecoder:
    """Incremental frame parser: the one place that parses and checks frames.

    Production (``stream.FramedConn`` and the relay's idle-connection callback) and
    the fuzzer use this class. Bytes go in with :meth:`feed`; they come out either as
    whole frames (:meth:`next_frame`, :meth:`frames`) or as a header first and its
    payload after (:meth:`next_header`, then :meth:`take_payload`, or :meth:`skip`
    for payload bytes that bypassed the decoder: the byte pump splices a payload from
    socket to socket, kernel to kernel, once its header has been checked here).

    ``expect_preamble`` makes the first four bytes a preamble check. Memory is
    bounded: a header is checked against the limits before its payload is buffered.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS, *, expect_preamble: bool = False) -> None:
        self.limits = limits
        self._buf = bytearray()
        self._need_preamble = expect_preamble
        #: payload bytes of the header last returned by next_header, not yet taken
        self._left = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def payload_left(self) -> int:
        """Payload bytes still owed to the frame whose header was handed out."""
        return self._left

    def take_buffer(self) -> bytes:
        """Hand over unparsed bytes (when the stream switches to another reader)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def expect_preamble(self) -> None:
        """The next bytes are a preamble (a stream that starts now)."""
        self._need_preamble = True

    def read_preamble(self) -> bool:
        """Check and consume the preamble; False while fewer than four bytes are
        buffered (a prefix that cannot be one already raises WireError)."""
        if not self._need_preamble:
            return True
        buf = self._buf
        if len(buf) < len(PREAMBLE):
            if buf and not MAGIC.startswith(bytes(buf[:3])):
                check_preamble(bytes(buf).ljust(4, b"\0"))
            return False
        check_preamble(bytes(buf[:4]))
        del buf[:4]
        self._need_preamble = False
        return True

    def peek_header(self) -> tuple[FrameType, int] | None:
        """The next frame's checked header, left in the buffer; None if incomplete."""
        if self._left:
            raise RuntimeError(f"{self._left} payload bytes of the last frame not taken")
        if self._need_preamble and not self.read_preamble():
            return None
        if len(self._buf) < HEADER_SIZE:
            return None
        ftype, length = decode_header(self._buf[:HEADER_SIZE])
        self.limits.check(ftype, length)
        return FrameType(ftype), length

    def next_header(self) -> tuple[FrameType, int] | None:
        """Consume the next frame's header; its payload is owed until taken or skipped."""
        header = self.peek_header()
        if header is not None:
            del self._buf[:HEADER_SIZE]
            self._left = header[1]
        return header

    def take_payload(self, n: int) -> bytes:
        """Up to ``n`` buffered payload bytes of the current frame."""
        n = min(n, self._left, len(self._buf))
        data = bytes(self._buf[:n])
        del self._buf[:n]
        self._left -= n
        return data

    def skip(self, n: int) -> None:
        """``n`` payload bytes of the current frame were read past the decoder."""
        if n > self._left:
            raise RuntimeError(f"skipping {n} payload bytes, {self._left} owed")
        self._left -= n

    def next_frame(self) -> Frame | None:
        header = self.peek_header()
        if header is None:
            return None
        ftype, length = header
        end = HEADER_SIZE + length
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[HEADER_SIZE:end])
        del self._buf[:end]
        return Frame(ftype, payload)

    def frames(self) -> Iterator[Frame]:
        while (frame := self.next_frame()) is not None:
            yield frame


M = TypeVar("M")


class ControlCodec(Generic[M]):
    """Encode/decode the control messages of one system.

    ``schema`` is a ``msgspec`` tagged union of ``Struct`` types; decoding validates
    types, required fields and string/list bounds declared with ``msgspec.Meta``.
    """

    def __init__(self, schema: Any, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(schema)

    def encode(self, message: M) -> bytes:
        if trace.enabled():
            trace.event(f"enc {type(message).__name__}")
        body = self._encoder.encode(message)
        if len(body) > self.limits.max_ctrl:
            raise WireError("too-large", f"control message of {len(body)} bytes is too large")
        return encode_header(FrameType.CTRL, len(body)) + body

    def decode(self, payload: bytes) -> M:
        try:
            msg = self._decoder.decode(payload)
        except msgspec.ValidationError as exc:
            raise WireError("schema", f"invalid control message: {exc}") from None
        except msgspec.DecodeError as exc:
            raise WireError("decode", f"undecodable control message: {exc}") from None
        if trace.enabled():
            trace.event(f"dec {type(msg).__name__}")
        return msg

"""What the switch server and the gateways say to each other on a gateway link.

A gateway link is one WebSocket (binary messages) or one long-poll session (HTTP
bodies); either way its bodies are sequences of kakehashi wire frames
(:mod:`kakehashi.core.wire`), each a CTRL frame holding one msgpack message below.
One link carries every tunnel of its gateway.

* link set-up: the gateway says :class:`Hello` (its name and the tunnels it still
  holds, so state is re-reported after a reconnect), the server answers
  :class:`Welcome` or :class:`Refused`;
* instructions (server -> gateway): :class:`Setup` is S3a (``side="listen"``: build the
  server-side pseudo socket in the client-side gateway) or S3b (``side="connect"``: the
  client-side pseudo socket in the server-side gateway, which reaches the real server);
  :class:`Delete` is S6a/S6b;
* reports (gateway -> server): :class:`Done` is S4a/S4b (after a Setup) or S7a/S7b
  (after a Delete), with ``ok=False`` and a reason when it failed;
* streams, routed through the switch table between the two gateways of a tunnel:
  :class:`Open` (a client connected to the server-side pseudo socket, or a new UDP
  peer), :class:`Data`, :class:`Eof` (half-close), :class:`Reset` (abort, with a
  reason) and :class:`Credit` (flow control: the receiver took ``n`` more bytes);
* :class:`Error`: the server refused one message (forged tunnel, unknown stream,
  window overrun); nothing else changes;
* :class:`Ack` (WebSocket links whose hello asked for them, both ways): the receiver
  has taken ``n`` bytes of link bodies off the link in all, so the sender can keep
  what is in flight on the link small (:class:`~.mux.LinkPacer`).

Every field is bounded and every message is decoded against this schema.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Literal

import msgspec

from kakehashi.core import wire

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")]
TunnelId = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_-]+$")]
StreamId = Annotated[int, msgspec.Meta(ge=1, le=2**31)]
Text = Annotated[str, msgspec.Meta(max_length=512)]
ReqId = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**31)]

#: the largest payload of one Data message (a datagram fits: 65,507 bytes)
MAX_CHUNK = 64 * 1024
#: frame limits on a link: a Data message is a CTRL frame of one chunk plus a few bytes
LIMITS = wire.Limits(max_ctrl=MAX_CHUNK + 1024, max_data=0)
#: the largest link body (a WebSocket message or a long-poll body) either side takes
MAX_BODY = 2 * 1024 * 1024
#: what a stream's receiver lets its sender have in flight (bytes), unless set up otherwise
DEFAULT_WINDOW = 512 * 1024
MAX_WINDOW = 16 * 1024 * 1024


class ProtocolError(Exception):
    """A link broke the framing or the schema; the text is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# -- link set-up -------------------------------------------------------------------------
class Hello(msgspec.Struct, tag="hello", forbid_unknown_fields=True):
    name: Name
    tunnels: Annotated[list[TunnelId], msgspec.Meta(max_length=100_000)] = []
    #: link-level acknowledgements both ways (the gateway sends and wants :class:`Ack`)
    acks: bool = False


class Ack(msgspec.Struct, tag="ack", forbid_unknown_fields=True):
    """Link flow control: ``n`` bytes of link bodies received on this link so far."""

    n: Annotated[int, msgspec.Meta(ge=0, le=2**62)]


class Welcome(msgspec.Struct, tag="welcome", forbid_unknown_fields=True):
    name: Name
    user: Name
    #: tunnels of this gateway the server knows; the gateway drops any other it holds
    tunnels: Annotated[list[TunnelId], msgspec.Meta(max_length=100_000)] = []


class Refused(msgspec.Struct, tag="refused", forbid_unknown_fields=True):
    code: Text
    error: Text


# -- instructions and reports (S3, S4, S6, S7) -------------------------------------------
class Setup(msgspec.Struct, tag="setup", forbid_unknown_fields=True):
    """S3a (``side="listen"``, ``address`` = where the pseudo socket listens) or S3b
    (``side="connect"``, ``address`` = the real server's HOST:PORT)."""

    req: ReqId
    tunnel: TunnelId
    side: Literal["listen", "connect"]
    proto: Literal["tcp", "udp"]
    address: Text
    service: Name
    window: Annotated[int, msgspec.Meta(ge=MAX_CHUNK, le=MAX_WINDOW)] = DEFAULT_WINDOW


class Delete(msgspec.Struct, tag="delete", forbid_unknown_fields=True):
    """S6a/S6b: delete the tunnel's pseudo socket (and its streams)."""

    req: ReqId
    tunnel: TunnelId
    reason: Text = ""


class Done(msgspec.Struct, tag="done", forbid_unknown_fields=True):
    """S4a/S4b (answer to a Setup) or S7a/S7b (answer to a Delete)."""

    req: ReqId
    tunnel: TunnelId
    ok: bool
    code: Text = ""
    error: Text = ""
    #: where the pseudo socket listens (S4a), HOST:PORT
    address: Text = ""


class Error(msgspec.Struct, tag="error", forbid_unknown_fields=True):
    code: Text
    error: Text
    tunnel: Annotated[str, msgspec.Meta(max_length=64)] = ""
    stream: Count = 0


# -- streams -------------------------------------------------------------------------------
class Open(msgspec.Struct, tag="open", forbid_unknown_fields=True):
    tunnel: TunnelId
    stream: StreamId
    #: who connected to the pseudo socket (for the audit line), HOST:PORT
    peer: Text = ""


class Data(msgspec.Struct, tag="data", forbid_unknown_fields=True):
    tunnel: TunnelId
    stream: StreamId
    data: Annotated[bytes, msgspec.Meta(max_length=MAX_CHUNK)]


class Eof(msgspec.Struct, tag="eof", forbid_unknown_fields=True):
    tunnel: TunnelId
    stream: StreamId


class Reset(msgspec.Struct, tag="reset", forbid_unknown_fields=True):
    tunnel: TunnelId
    stream: StreamId
    reason: Text = ""


class Credit(msgspec.Struct, tag="credit", forbid_unknown_fields=True):
    tunnel: TunnelId
    stream: StreamId
    n: Annotated[int, msgspec.Meta(ge=1, le=MAX_WINDOW)]


StreamMsg = Open | Data | Eof | Reset | Credit
ToServer = Hello | Done | Ack | Open | Data | Eof | Reset | Credit
ToGateway = Welcome | Refused | Setup | Delete | Error | Ack | Open | Data | Eof | Reset | Credit
STREAM_TYPES = (Open, Data, Eof, Reset, Credit)

_to_server = wire.ControlCodec(ToServer, LIMITS)
_to_gateway = wire.ControlCodec(ToGateway, LIMITS)


def encode(msg: msgspec.Struct) -> bytes:
    """One message as one CTRL frame."""
    codec = _to_gateway if isinstance(msg, (Welcome, Refused, Setup, Delete, Error)) \
        else _to_server
    return codec.encode(msg)


def data_prefix(tunnel: str, stream: int) -> bytes:
    """The encoding of a :class:`Data` message of this stream up to its payload's length
    (for :func:`encode_data`): msgspec's own, cut before its empty payload."""
    empty = msgspec.msgpack.encode(Data(tunnel=tunnel, stream=stream, data=b""))
    assert empty.endswith(b"\xc4\x00")  # msgpack bin 8 of length 0
    return empty[:-2]


def encode_data(prefix: bytes, payload: bytes | bytearray | memoryview) -> bytes:
    """A :class:`Data` message as one CTRL frame, the same bytes as :func:`encode` makes,
    with one copy of the payload (the bulk path's hot spot: ``encode`` costs a copy into
    the message, msgspec's and the frame header's)."""
    n = len(payload)
    if n > MAX_CHUNK:
        raise ValueError(f"a Data payload of {n} bytes exceeds {MAX_CHUNK}")
    if n < 0x100:
        size = b"\xc4" + n.to_bytes(1, "big")
    elif n < 0x10000:
        size = b"\xc5" + n.to_bytes(2, "big")
    else:
        size = b"\xc6" + n.to_bytes(4, "big")
    header = wire.encode_header(wire.FrameType.CTRL, len(prefix) + len(size) + n)
    return b"".join((header, prefix, size, payload))


def encode_many(msgs: Iterable[msgspec.Struct]) -> bytes:
    return b"".join(encode(m) for m in msgs)


def _decode(codec: wire.ControlCodec, body: bytes) -> list:
    return [msg for msg, _ in _decode_frames(codec, body)]


def _decode_frames(codec: wire.ControlCodec, body: bytes | memoryview
                   ) -> list[tuple[msgspec.Struct, memoryview]]:
    """Each message of a body with its frame (a view into ``body``, so a message that
    is only passed on need not be encoded again). A body is whole, so its frames are
    read in place: no buffer to feed, and no copy of a payload but msgspec's own."""
    if len(body) > MAX_BODY:
        raise ProtocolError("too-large", f"link body of {len(body)} bytes exceeds {MAX_BODY}")
    try:
        frames = wire.split_frames(body, LIMITS)
        out = []
        for ftype, payload, frame in frames:
            if ftype != wire.FrameType.CTRL:
                raise ProtocolError("bad-frame", "only control frames are used on a link")
            out.append((codec.decode(payload), frame))
    except wire.WireError as exc:
        if exc.code == "truncated":
            raise ProtocolError("truncated",
                                "link body ends in the middle of a frame") from None
        raise ProtocolError(exc.code, exc.message) from None
    return out


def decode_to_server(body: bytes) -> list[ToServer]:
    """Messages of a gateway's body; ProtocolError for anything malformed."""
    return _decode(_to_server, body)


def decode_to_gateway(body: bytes) -> list[ToGateway]:
    return _decode(_to_gateway, body)


def decode_frames_to_server(body: bytes) -> list[tuple[ToServer, memoryview]]:
    """:func:`decode_to_server` with each message's frame (see :func:`_decode_frames`)."""
    return _decode_frames(_to_server, body)  # type: ignore[return-value]

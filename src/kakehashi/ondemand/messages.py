"""What the parts of the on-demand system say to each other, as validated types.

Two conversations:

* the **control channel** (JSON text messages over a WebSocket, ``/v1/relays/control``)
  between the manager and each relay: a relay says :class:`Hello` (registration, with a
  certificate request) and gets :class:`Welcome` (its certificate, the relay CA, the
  live grants it serves); then the manager tells an edge to :class:`Open`,
  :class:`Update` (extend) or :class:`Close` (revoke, expiry) a grant's port, and the
  relays ask it for relay information (:class:`Request`, S22-S25) and report
  :class:`Event` s and :class:`Load`;
* the **relay link** (kakehashi wire frames over mutual TLS) from an edge to an inner
  relay: one :class:`Dial` (S29: grant, IMSI, device address and port), one
  :class:`DialResult`, then the bytes of one client connection.

Every message is size-bounded and decoded against its schema; anything else is a clear
protocol error.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from kakehashi.core import wire

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")]
Text = Annotated[str, msgspec.Meta(max_length=512)]
Pem = Annotated[str, msgspec.Meta(max_length=64 * 1024)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Imsi = Annotated[str, msgspec.Meta(pattern=r"^\d{6,15}$")]
GrantId = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
ReqId = Annotated[int, msgspec.Meta(ge=0, le=2**53)]

#: the largest control-channel message either side accepts
MAX_MESSAGE = 1 << 20


class Device(msgspec.Struct, forbid_unknown_fields=True):
    imsi: Imsi
    address: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]


# -- relay -> manager ------------------------------------------------------------------
class Hello(msgspec.Struct, tag="hello", forbid_unknown_fields=True):
    kind: Literal["edge", "inner"]
    name: Name
    csr: Pem
    # an edge's entry ports and tags
    public_host: Text = ""
    ports: tuple[Port, Port] = (0, 0)
    region: Text = ""
    carrier: Text = ""
    # an inner relay's link address and devices
    address: Text = ""
    #: whether the relay link to this inner relay is mutual TLS (off: plain TCP, for a
    #: link inside one trusted network; each dial still needs a ticket)
    link_tls: bool = True
    devices: Annotated[list[Device], msgspec.Meta(max_length=100_000)] = []


class Ack(msgspec.Struct, tag="ack", forbid_unknown_fields=True):
    """An edge's answer to :class:`Open`: the listener is up (or why not)."""

    req: ReqId
    ok: bool
    code: Text = ""
    error: Text = ""


class Request(msgspec.Struct, tag="request", forbid_unknown_fields=True):
    """``relay-info`` (an edge, S22: which grant owns ``port``) or ``check`` (an inner
    relay: may ``grant`` reach ``imsi`` at ``address``:``target_port``)."""

    req: ReqId
    op: Literal["relay-info", "check"]
    port: Port = 0
    grant: Annotated[str, msgspec.Meta(max_length=64)] = ""
    imsi: Annotated[str, msgspec.Meta(max_length=15)] = ""
    address: Text = ""
    target_port: Port = 0
    ticket: Annotated[str, msgspec.Meta(max_length=64)] = ""


class Event(msgspec.Struct, tag="event", forbid_unknown_fields=True):
    grant: GrantId
    event: Annotated[str, msgspec.Meta(max_length=32)]
    fields: Annotated[dict[str, Any], msgspec.Meta(max_length=32)] = {}


class Load(msgspec.Struct, tag="load", forbid_unknown_fields=True):
    sessions: Annotated[int, msgspec.Meta(ge=0)]
    bytes_per_second: Annotated[float, msgspec.Meta(ge=0)]


ToManager = Hello | Ack | Request | Event | Load


# -- manager -> relay ------------------------------------------------------------------
class Welcome(msgspec.Struct, tag="welcome"):
    cert: Pem
    ca: Pem
    grants: list[dict[str, Any]] = []


class Open(msgspec.Struct, tag="open"):
    req: ReqId
    grant: dict[str, Any]


class Update(msgspec.Struct, tag="update"):
    grant: dict[str, Any]


class Close(msgspec.Struct, tag="close"):
    grant: GrantId
    reason: Text


class Reply(msgspec.Struct, tag="reply"):
    req: ReqId
    ok: bool
    data: dict[str, Any] = {}
    code: Text = ""
    error: Text = ""


class Refused(msgspec.Struct, tag="refused"):
    """Registration refused (the relay stops: retrying would not help)."""

    code: Text
    error: Text


ToRelay = Welcome | Open | Update | Close | Reply | Refused

_to_manager = msgspec.json.Decoder(ToManager)
_to_relay = msgspec.json.Decoder(ToRelay)
_encoder = msgspec.json.Encoder()


class ProtocolError(ValueError):
    pass


def encode(msg: msgspec.Struct) -> str:
    return _encoder.encode(msg).decode()


def _decode(decoder: msgspec.json.Decoder, data: str | bytes) -> Any:
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"control message of {len(data)} bytes is too large")
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid control message: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"undecodable control message: {exc}") from None


def decode_to_manager(data: str | bytes) -> ToManager:
    return _decode(_to_manager, data)


def decode_to_relay(data: str | bytes) -> ToRelay:
    return _decode(_to_relay, data)


# -- the relay link (edge -> inner) ----------------------------------------------------
class Dial(msgspec.Struct, tag="dial", forbid_unknown_fields=True):
    grant: GrantId
    imsi: Imsi
    address: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    port: Port
    #: the one-time ticket of the relay information this dial follows (S25)
    ticket: Annotated[str, msgspec.Meta(max_length=64)] = ""


class DialResult(msgspec.Struct, tag="dial-result", forbid_unknown_fields=True):
    ok: bool
    reason: Text = ""


LinkMsg = Dial | DialResult
LINK_LIMITS = wire.Limits(max_ctrl=4096)
link_codec: wire.ControlCodec[LinkMsg] = wire.ControlCodec(LinkMsg, LINK_LIMITS)

"""Control-connection messages of the proxy chain, carried by the core wire codec.

One control connection joins each pair of neighbours (client -> first proxy, proxy ->
next proxy). Every message is a CTRL frame of :mod:`kakehashi.core.wire` validated
against :data:`Message`; strings and byte fields are bounded so a hostile peer cannot
make a proxy hold more than a few hundred bytes per message.

Sequence (spec 004 step numbers; see docs/chain.md)::

    proxy -> requester   Challenge(hop, nonce)                 602/902 authentication
    requester -> proxy   Answer(id, nonce, mac)
    proxy -> requester   Proof(mac)          or Refused
    requester -> proxy   Request(rid, server, requester, ...)   506/607/807/909
    proxy -> requester   Reply(rid, ...)     or Refused         610-611, 613-614, 915, 919-920
    requester -> proxy   Extend(rid)         iterative mode: "build the next hop through you"
    either way           Relay(body)         an end-to-end message for the last hop (recursive
                                             mode with encryption: client <-> last proxy auth)

After the Proof, every message on that connection is sealed (AEAD keyed from the
authentication, one implicit sequence number per direction: see
:class:`~kakehashi.core.crypto.ControlChannel`); an answer marked ``relayed`` (the client
through the proxies already built, iterative mode) does not seal the connection it
arrived on, which belongs to the proxy before.

``rid`` is the response identifier: a proxy accepts a Reply only if it answers the
request it sent (the Fig. 14(b) fix), and the client matches every Reply to its Request.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from kakehashi.core import wire
from kakehashi.core.crypto import CONTROL_OVERHEAD

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Host = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Nonce = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
Mac = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
Rid = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Text = Annotated[str, msgspec.Meta(max_length=400)]
MAX_HOPS = 16
Hops = Annotated[list[Name], msgspec.Meta(max_length=MAX_HOPS)]

#: why a hop refused (stable codes; the text says more)
REASONS = ("authentication", "access", "route", "next-hop", "limit", "ports", "protocol",
           "timeout", "integrity")
Reason = Literal["authentication", "access", "route", "next-hop", "limit", "ports",
                 "protocol", "timeout", "integrity"]


class Endpoint(msgspec.Struct, frozen=True, array_like=True):
    host: Host
    port: Port

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)


class Challenge(msgspec.Struct, tag="challenge", frozen=True):
    hop: Name
    nonce: Nonce


class Answer(msgspec.Struct, tag="answer", frozen=True):
    id: Name
    nonce: Nonce
    mac: Mac
    #: the initiator answers through relaying proxies (iterative mode), not on its own
    #: control connection; bound into the MAC, so it cannot be flipped on the way
    relayed: bool = False


class Proof(msgspec.Struct, tag="proof", frozen=True):
    mac: Mac


class Request(msgspec.Struct, tag="request", frozen=True):
    """A relay request: the server's endpoint (P6) and the requester's data endpoint."""

    rid: Rid
    server: Endpoint
    requester: Endpoint
    user: Name
    mode: Literal["recursive", "iterative"] = "recursive"
    encrypt: bool = False
    #: hops that forwarded or relayed this request, nearest the client first
    via: Hops = []
    #: the client's address and data port as the first hop saw them (ACL input)
    origin: Endpoint | None = None


class Reply(msgspec.Struct, tag="reply", frozen=True):
    """The answer to request ``rid``: the port this hop assigned for its requester
    (``near``: P2 or P4) and the server-facing port of the hop the client will use
    (``far``: this hop's P3 in iterative mode, the last hop's P5 when ``complete``)."""

    rid: Rid
    hop: Name
    near: Endpoint
    far: Endpoint
    complete: bool
    path: Hops = []
    #: the last hop's challenge for the client (recursive mode with encryption)
    challenge: Challenge | None = None
    #: the largest datagram the path carries for the client (after sealing overhead)
    max_payload: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0


class Extend(msgspec.Struct, tag="extend", frozen=True):
    rid: Rid


class Refused(msgspec.Struct, tag="refused", frozen=True):
    rid: Rid
    hop: Name
    reason: Reason
    text: Text = ""

    def describe(self) -> str:
        return f"refused by {self.hop}: {self.reason}: {self.text}"


class Relay(msgspec.Struct, tag="relay", frozen=True):
    """An end-to-end auth message for the client or the last hop, passed along unread."""

    body: Answer | Proof | Refused


Message = Challenge | Answer | Proof | Request | Reply | Extend | Refused | Relay

#: messages are at most 2048 bytes; sealed ones (after authentication) carry the overhead
LIMITS = wire.Limits(max_ctrl=2048 + CONTROL_OVERHEAD, max_data=0)
#: the context an answer through relays is bound to (see :class:`Answer`)
RELAYED = b"relayed"
codec: wire.ControlCodec[Message] = wire.ControlCodec(Message, LIMITS)

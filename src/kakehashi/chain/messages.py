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
    either way           Relay(body)         a message between the client and a later proxy,
                                             passed along unread: its authentication with
                                             that proxy (iterative mode; recursive mode with
                                             encryption: client <-> last proxy)
    either way           Sealed(data)        iterative mode: a message between the client and
                                             a later proxy, sealed end to end with the key of
                                             their (relayed) authentication

After the Proof, every message on that connection is sealed (AEAD keyed from the
authentication, one implicit sequence number per direction: see
:class:`~kakehashi.core.crypto.ControlChannel`). Every connection is authenticated by
the two ends it joins (the client and the first proxy, or two neighbouring proxies), in
both modes. In iterative mode the client also authenticates with each later proxy
through the ones already built (its ``Answer`` travels in a ``Relay``, marked
``relayed``); what it then exchanges with that proxy travels as ``Sealed`` messages that
the proxies between can neither read nor alter (:func:`seal`, :func:`unseal`).

``rid`` is the response identifier: a proxy accepts a Reply only if it answers the
request it sent (the Fig. 14(b) fix), and the client matches every Reply to its Request.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from kakehashi.core import wire
from kakehashi.core.crypto import CONTROL_OVERHEAD, ControlChannel

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Host = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Nonce = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
Mac = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
Rid = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Text = Annotated[str, msgspec.Meta(max_length=400)]
MAX_HOPS = 16
Hops = Annotated[list[Name], msgspec.Meta(max_length=MAX_HOPS)]
#: how long the sender of a request waits for its answer, in ms (0: not said)
WaitMs = Annotated[int, msgspec.Meta(ge=0, le=3_600_000)]

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
    #: how long the sender waits for the answer: a proxy gives up on the hops after it
    #: within that, so its refusal naming them arrives before the sender gives up
    wait_ms: WaitMs = 0


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
    #: how long the client waits for the next hop's Reply (as :attr:`Request.wait_ms`)
    wait_ms: WaitMs = 0


def within(wait_ms: int) -> float | None:
    """Seconds a proxy may spend on the hops after it when its requester waits
    ``wait_ms`` (None: it did not say): a fifth (at least 0.1 s) is left for the refusal
    to travel back, so at every hop the nearer proxy's deadline comes later and the
    hop that actually failed is the one named."""
    if not wait_ms:
        return None
    wait = wait_ms / 1000
    return max(wait - max(0.1, wait / 5), 0.001)


class Refused(msgspec.Struct, tag="refused", frozen=True):
    rid: Rid
    hop: Name
    reason: Reason
    text: Text = ""

    def describe(self) -> str:
        return f"refused by {self.hop}: {self.reason}: {self.text}"


class Relay(msgspec.Struct, tag="relay", frozen=True):
    """An authentication message between the client and a later proxy, passed along
    unread (its MACs protect it end to end)."""

    body: Challenge | Answer | Proof | Refused


#: the largest message before sealing
MAX_MESSAGE = 2048


class Sealed(msgspec.Struct, tag="sealed", frozen=True):
    """A message between the client and a later proxy (iterative mode), sealed with the
    :class:`~kakehashi.core.crypto.ControlChannel` of their authentication: the proxies
    between pass it along and can neither read nor alter, replay, reorder or reflect it."""

    data: Annotated[bytes, msgspec.Meta(min_length=CONTROL_OVERHEAD,
                                        max_length=MAX_MESSAGE + CONTROL_OVERHEAD)]


Message = Challenge | Answer | Proof | Request | Reply | Extend | Refused | Relay | Sealed

#: messages are at most 2048 bytes; a Sealed one carries a sealed message and its
#: envelope, and everything after authentication the overhead of its connection's seal
LIMITS = wire.Limits(max_ctrl=MAX_MESSAGE + 2 * CONTROL_OVERHEAD + 32, max_data=0)
#: the context an answer through relays is bound to (see :class:`Answer`)
RELAYED = b"relayed"
codec: wire.ControlCodec[Message] = wire.ControlCodec(Message, LIMITS)


def seal(channel: ControlChannel, msg: Message) -> Sealed:
    """``msg`` sealed end to end (iterative mode: the client and a later proxy)."""
    body = codec.encode(msg)[wire.HEADER_SIZE:]
    if len(body) > MAX_MESSAGE:
        raise wire.WireError("too-large", f"control message of {len(body)} bytes is too large")
    return Sealed(channel.seal(body))


def unseal(channel: ControlChannel, sealed: Sealed) -> Message:
    """The message inside ``sealed``; :class:`~kakehashi.core.crypto.ControlError` if it
    fails its check (the channel then refuses everything), ``WireError`` if what it holds
    is not one message (a Sealed inside a Sealed is refused too)."""
    msg = codec.decode(channel.open(sealed.data))
    if isinstance(msg, Sealed):
        raise wire.WireError("schema", "a sealed message inside a sealed message")
    return msg

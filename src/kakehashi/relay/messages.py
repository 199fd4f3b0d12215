"""Control messages of the relay protocol (spec 000), one ``msgspec`` Struct each.

Names follow the spec: login / positive and negative response (Fig. 2 steps 2-3),
connection-hold command and reply (4-5), connection request (11), encryption
instruction and acceptance (12-13), connection-request notification (14), reply
(15-16), end notification (26-27), release notification (28), logout (6-7).
Every string and list is bounded, so a hostile peer cannot make the decoder allocate
without limit; the frame limit bounds the rest.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

import msgspec

from kakehashi.core.identity import NAME_CHARS, NAME_MAX
from kakehashi.core.wire import ControlCodec

# ``\Z``, not ``$``: ``$`` also matches before a trailing newline ("alice\n")
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=NAME_MAX,
                                   pattern=rf"^{NAME_CHARS}+\Z")]
Service = Annotated[str, msgspec.Meta(max_length=NAME_MAX, pattern=rf"^{NAME_CHARS}*\Z")]
TEXT_MAX = 512
Text = Annotated[str, msgspec.Meta(max_length=TEXT_MAX)]


def fit(text: str) -> str:
    """``text`` cut to what a :data:`Text` field carries (a longer one would make the
    receiver drop the whole connection as a protocol violation)."""
    return text if len(text) <= TEXT_MAX else text[: TEXT_MAX - 1] + "\u2026"
Secret = Annotated[str, msgspec.Meta(max_length=1024)]
Names = Annotated[list[Name], msgspec.Meta(max_length=256)]
ReqId = Annotated[int, msgspec.Meta(ge=0, lt=2**53)]

Encryption = Literal["required", "optional", "off"]
NotifyPolicy = Literal["all", "none", "only", "except"]
InsecurePeer = Literal["refuse", "ask"]

#: Ciphers an endpoint can run: relay-level TLS and end-to-end X25519 + ChaCha20-Poly1305.
CIPHER_TLS = "tls"
CIPHER_E2E = "e2e-x25519-chacha20poly1305"
#: the relay's session cipher (spec 000 step 23, "with some ciphers this step is not
#: needed and the data is relayed unchanged"): the relay issues each session fresh
#: AES-128-GCM keys, one per direction, inside both TLS links; both links then leave
#: TLS and the terminals seal every DATA frame and the end of each direction with those
#: keys, and the relay forwards the frames unchanged. A terminal that can do it lists
#: this name in its login attributes (``Attrs.ciphers``): a relay that predates it
#: ignores the name, and a terminal that does not list it never sees the new fields.
CIPHER_SESSION = "session-aes-128-gcm"
#: ``KAKEHASHI_SESSION_CIPHER=tls`` turns the session cipher off in relays (they keep
#: re-encrypting, step 23 as written) and terminals (they do not offer it); the relay's
#: ``--session-cipher`` says the same
SESSION_CIPHER = os.environ.get("KAKEHASHI_SESSION_CIPHER", "relay") != "tls"
#: optimistic pairing, a capability a terminal lists with its ciphers (``Attrs.ciphers``,
#: the list a relay that predates it ignores, as it ignores an unknown cipher): as a
#: target, it takes the requester's early data with the notification and may accept
#: before its local service is connected (a service that then fails to connect ends
#: the session with a reason); as a requester, it understands such an end under the
#: session cipher (:func:`kakehashi.core.pump.seal_close`). The relay uses it only
#: where the target offers it (and, under the session cipher, the requester too), so
#: an old terminal keeps the flow it knows: notify, connect, accept, result.
CAP_OPTIMISTIC = "optimistic-pairing"
#: ``KAKEHASHI_OPTIMISTIC_PAIRING=0`` turns it off in terminals (they do not offer it)
#: and relays (they do not use it)
OPTIMISTIC = os.environ.get("KAKEHASHI_OPTIMISTIC_PAIRING", "1") != "0"
#: a capability a terminal lists with its ciphers (``Attrs.ciphers``): it understands
#: ``LoginOk.plain_requests``. A relay sends that field only to a terminal that lists
#: this (an older terminal's decoder refuses unknown fields), and a relay that predates
#: it ignores the name: the terminal then keeps its first bytes on a plaintext link
#: until the result, as before.
CAP_PLAIN_REQUESTS = "plain-requests"
#: this terminal's send key then its receive key (AES-128: 16 bytes each)
SessionKeys = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]


class Attrs(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """Attribute information (spec 000 section 4.3); ``None`` means "as registered"."""

    encryption: Encryption | None = None
    ciphers: Annotated[list[Text], msgspec.Meta(max_length=8)] = []
    notify: NotifyPolicy | None = None
    notify_users: Names | None = None
    allowed_peers: Names | None = None
    insecure_peer: InsecurePeer | None = None
    services: Annotated[list[Service], msgspec.Meta(max_length=64)] = []
    #: take the attributes of this user's first connection (spec 000 para 0043)
    inherit: bool = False


class Msg(msgspec.Struct, tag_field="t", omit_defaults=True, forbid_unknown_fields=True):
    pass


# -- terminal -> relay ------------------------------------------------------------
class Login(Msg, tag="login"):
    user: Name
    password: Secret = ""
    #: resumption token from an earlier positive response: spare connections
    #: authenticate with it instead of paying the password hash again
    token: Secret = ""
    attrs: Attrs | None = None
    agent: Text = ""


class SetAttrs(Msg, tag="attrs"):
    attrs: Attrs


class Hold(Msg, tag="hold"):
    seq: ReqId = 0


#: the most a connection request carries of the requester's first bytes (``data``)
EARLY_DATA_MAX = 16384
#: early data on (the default); ``KAKEHASHI_EARLY_DATA=0`` turns it off in terminals
#: (they send no first bytes with a request) and relays (they take none)
EARLY_DATA = os.environ.get("KAKEHASHI_EARLY_DATA", "1") != "0"


class ConnectRequest(Msg, tag="connect"):
    req: ReqId
    target: Name
    service: Service = ""
    encrypt: bool = False
    e2e: bool = False
    #: early data: the requester's first bytes, which the relay holds and forwards to
    #: the target right behind the pairing (step 16), saving the round trip of the
    #: result to the requester before the first bytes leave it. Sent only where it
    #: cannot cross a plaintext hop of a session that must be encrypted; the result
    #: says how much of it the relay took (``Result.early``; the rest is sent as data).
    data: Annotated[bytes, msgspec.Meta(max_length=EARLY_DATA_MAX)] = b""


class EncryptAccept(Msg, tag="enc-ok"):
    req: ReqId


class EncryptRefuse(Msg, tag="enc-no"):
    req: ReqId
    reason: Text = ""


class StartTLS(Msg, tag="starttls"):
    pass


class Accept(Msg, tag="accept"):
    req: ReqId


class Refuse(Msg, tag="refuse"):
    req: ReqId
    reason: Text = ""


class End(Msg, tag="end"):
    reason: Text = ""


class Release(Msg, tag="release"):
    pass


class Logout(Msg, tag="logout"):
    pass


class Who(Msg, tag="who"):
    #: paging: list the users whose ID sorts after this one ("": from the first)
    after: Service = ""


class Subscribe(Msg, tag="subscribe"):
    on: bool = True


class Broadcast(Msg, tag="broadcast"):
    targets: Names
    body: Annotated[bytes, msgspec.Meta(max_length=16384)]


# -- relay -> terminal ------------------------------------------------------------
class LoginOk(Msg, tag="login-ok"):
    conn_id: ReqId
    token: Secret
    encryption: Encryption
    keepalive: float
    dead_after: float
    server: Text = ""
    #: (only to a terminal that lists :data:`CAP_PLAIN_REQUESTS`) this link is
    #: plaintext and the relay never instructs it to encrypt (step 12) for a target
    #: that requires encryption: it cannot (no TLS to upgrade to), or its policy
    #: (``relay serve --plaintext-requesters refuse``) treats such a requester as one
    #: that cannot encrypt (refused, or the target asked, para 0037). A request from
    #: it that does not ask for encryption never becomes an encrypted session, so its
    #: first bytes may cross this hop with the request (early data).
    plain_requests: bool = False


class LoginFail(Msg, tag="login-fail"):
    reason: Text
    #: "cluster-down": this node cannot reach the cluster state; another node may
    #: (a terminal given several servers moves on instead of giving up)
    code: Text = ""


class HoldAck(Msg, tag="hold-ack"):
    seq: ReqId = 0


class Error(Msg, tag="error"):
    code: Text
    message: Text
    req: ReqId = 0


class EncryptInstruct(Msg, tag="encrypt"):
    """Step 12: the party you asked for requires encryption; accept or refuse."""

    req: ReqId
    reason: Text = ""


class Notify(Msg, tag="notify"):
    """Steps 14/32: a connection request from ``peer``, with the encryption instruction."""

    req: ReqId
    peer: Name
    service: Service = ""
    encrypt: bool = False
    e2e: bool = False
    peer_key: Secret = ""
    #: the requester cannot encrypt and you require it: you are being asked (para 0037)
    insecure: bool = False
    #: :data:`CIPHER_SESSION` when the session, once you accept, runs under the
    #: relay-issued keys ``keys`` (your send key, your receive key): the relay ends TLS
    #: on this connection right after the pairing; "" for TLS re-encryption as before
    cipher: Text = ""
    keys: SessionKeys | None = None
    #: optimistic pairing (:data:`CAP_OPTIMISTIC`, only to a target that offered it):
    #: the relay takes this target's accept before its service is connected, and an
    #: end of the session with a reason if the service then fails
    optimistic: bool = False
    #: with ``optimistic``: the requester's early data, forwarded after the relay's own
    #: checks of the request (sealed as the requester's first message under the
    #: session cipher). The target writes it to its service only once it has accepted,
    #: and drops it with a refusal.
    data: Annotated[bytes, msgspec.Meta(max_length=EARLY_DATA_MAX + 64)] = b""


class Result(Msg, tag="result"):
    """Steps 16/34: the target's reply, forwarded to the requester."""

    req: ReqId
    ok: bool
    peer: Name
    encrypt: bool = False
    e2e: bool = False
    peer_key: Secret = ""
    code: Text = ""
    message: Text = ""
    #: bytes of the request's early data the relay forwarded to the target (0: none;
    #: the requester sends them as ordinary data)
    early: Annotated[int, msgspec.Meta(ge=0, le=EARLY_DATA_MAX)] = 0
    #: as in :class:`Notify`: the session cipher and this side's keys. Early data the
    #: relay forwarded went sealed as the first message of this side's direction.
    cipher: Text = ""
    keys: SessionKeys | None = None


class Released(Msg, tag="released"):
    """Both sides released: the connection is idle again (the optional reply of 0048)."""


class TLSGo(Msg, tag="tls-go"):
    pass


class UserInfo(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    user: Name
    encryption: Encryption
    services: Annotated[list[Service], msgspec.Meta(max_length=64)] = []
    connections: int = 0


class WhoList(Msg, tag="who-list"):
    """One page of the user list, in user-ID order, sized to fit the message limit."""

    users: Annotated[list[UserInfo], msgspec.Meta(max_length=100_000)]
    #: more users follow: ask again with ``who(after=<the last user of this page>)``
    more: bool = False


class Presence(Msg, tag="presence"):
    user: Name
    online: bool
    encryption: Encryption = "optional"


class Deliver(Msg, tag="deliver"):
    sender: Name
    body: Annotated[bytes, msgspec.Meta(max_length=16384)]


class BroadcastResult(Msg, tag="broadcast-result"):
    delivered: Names
    missing: Names


# -- relay node <-> relay node (the inter-node link of a cluster) -------------------
Nonce = Annotated[bytes, msgspec.Meta(min_length=16, max_length=64)]
Proof = Annotated[bytes, msgspec.Meta(min_length=32, max_length=64)]


class NodeHello(Msg, tag="node-hello"):
    """Instead of a login: a relay node of the same cluster opens an inter-node link."""

    node: Name
    nonce: Nonce


class NodeChallenge(Msg, tag="node-challenge"):
    """The called node proves it knows the cluster secret and challenges the caller."""

    node: Name
    nonce: Nonce
    proof: Proof


class NodeProof(Msg, tag="node-proof"):
    proof: Proof


class NodeWelcome(Msg, tag="node-welcome"):
    """The link is authenticated: it carries connection requests from now on."""


class NodeConnect(Msg, tag="node-connect"):
    """A connection request (step 11) forwarded by the requester's node to the node
    that holds the target, with what that node needs to decide about the requester
    (who it is, its attributes, whether its hop is encrypted)."""

    req: ReqId
    requester: Name
    target: Name
    service: Service = ""
    encrypt: bool = False
    e2e: bool = False
    requester_key: Secret = ""
    #: the requester's own hop to its node is encrypted
    hop_encrypted: bool = False
    requester_requires: bool = False
    encryption: Encryption | None = None
    insecure_peer: InsecurePeer | None = None
    allowed_peers: Names | None = None


ToRelay = (
    Login | SetAttrs | Hold | ConnectRequest | EncryptAccept | EncryptRefuse | StartTLS
    | Accept | Refuse | End | Release | Logout | Who | Subscribe | Broadcast
    | NodeHello | NodeProof | NodeConnect
)
ToTerminal = (
    LoginOk | LoginFail | HoldAck | Error | EncryptInstruct | Notify | Result | End
    | Released | TLSGo | WhoList | Presence | Deliver | BroadcastResult
    | NodeChallenge | NodeWelcome
)

def crossing_request_wins(own_user: str, notifier: str, own_target: str) -> bool:
    """A connection request and a notification crossed on one connection.

    The relay notified a connection of ``own_user`` of a request from ``notifier``
    while that connection was sending its own request for ``own_target``. Both ends
    decide with this rule, each on its own, and reach the same answer: the
    connection's own request wins only when the two users are asking for each other
    and its user ID is the lower one; otherwise the notification stands and the own
    request is answered ``crossed`` (the terminal retries it on another connection).
    """
    return notifier == own_target and own_user < notifier


#: codec the relay uses (decodes what terminals send)
RELAY_CODEC: ControlCodec[ToRelay] = ControlCodec(ToRelay)
#: codec terminals use (decodes what the relay sends)
TERMINAL_CODEC: ControlCodec[ToTerminal] = ControlCodec(ToTerminal)

"""The relay server's control unit (spec 000, control unit 42), sans-IO.

:class:`ControlUnit` is told what happened (a connection arrived, a control message
was received, credentials were checked, a connection was lost, time passed) and
answers with *actions* for the asyncio driver to carry out (send, close, pair,
unpair, upgrade to TLS, check a password, write an audit record). It never touches a
socket or a clock, which is what makes every flow of Figs. 2-5 unit-testable in
both orders, with every refusal path.

Encryption enforcement (the claims of spec 000):

* Fig. 3 - the *target* requires encryption: the relay sends the requester an
  :class:`EncryptInstruct` (step 12) and only after :class:`EncryptAccept` (13) on an
  encrypted connection notifies the target (14).
* Fig. 4 - the *requester* requires encryption (pre-registered, at login, or in the
  request): the :class:`Notify` to the target carries ``encrypt=True`` (32) and the
  relay only pairs when the target accepts on an encrypted connection (33-34).
* A side that cannot encrypt is refused, or the side that requires encryption is
  asked (``insecure_peer = "ask"``), para 0037.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import secrets
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec

from kakehashi.core import crypto
from kakehashi.core.identity import Attempt, LoginThrottle, ThrottleSettings
from kakehashi.relay import federation as fed
from kakehashi.relay import messages as m

_ENCODE = msgspec.msgpack.Encoder().encode

Action = ("Send | Close | Authenticate | UpgradeTLS | Pair | Forward | Unpair | Audit"
          " | LeaveTLS | Shut | OpenTrunk | PublishPresence | RemoteDeliver")


@dataclass(frozen=True, slots=True)
class UserRecord:
    """A registered user (the "connection information" of para 0026) and its attributes."""

    name: str
    password_hash: str = ""
    encryption: m.Encryption = "optional"
    notify: m.NotifyPolicy = "all"
    notify_users: tuple[str, ...] = ()
    allowed_peers: tuple[str, ...] | None = None
    insecure_peer: m.InsecurePeer = "refuse"
    pubkey: str = ""


# -- actions ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Send:
    conn: int
    msg: m.Msg
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class Close:
    conn: int
    reason: str
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class Authenticate:
    """Ask the driver to look the user up and verify the password (slow hash, off-loop)."""

    conn: int
    user: str
    password: str


@dataclass(frozen=True, slots=True)
class UpgradeTLS:
    """The driver sent TLSGo on ``conn``: upgrade it to TLS before reading on."""

    conn: int


@dataclass(frozen=True, slots=True)
class Pair:
    a: int
    b: int
    #: when the request that led here arrived (for the setup-latency histogram)
    since: float | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Forward:
    """Write ``data`` to ``conn`` as one DATA frame: a request's early data, sent to
    the target right behind the pairing, before anything the requester sends next."""

    conn: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Unpair:
    """Stop forwarding data *from* ``conn`` (its release notification arrived)."""

    conn: int


@dataclass(frozen=True, slots=True)
class LeaveTLS:
    """The session on ``conn`` runs under the relay-issued session cipher: once what
    is queued for it is out, end TLS on it (close_notify; from then on it is plain
    TCP both ways after the terminal's close_notify) and send it no control message
    again. Its frames are forwarded unchanged."""

    conn: int


@dataclass(frozen=True, slots=True)
class Shut:
    """The peer of ``conn`` (a session under the session cipher) is gone: end the
    write side of ``conn`` (a TCP FIN after whatever is queued). Its terminal tells
    an authenticated end from this one; no unauthenticated message is sent."""

    conn: int


@dataclass(frozen=True, slots=True)
class Audit:
    event: str
    allow: bool
    fields: dict[str, object]
    #: a decision in the middle of a session's setup (a pairing): its entry is written
    #: a moment later, past the first reply (:meth:`AuditLog.record_soon`)
    soon: bool = False


# -- cluster actions (relay federation; see :mod:`kakehashi.relay.federation`) ---------
@dataclass(frozen=True, slots=True)
class OpenTrunk:
    """Open an authenticated inter-node link to ``node`` for request ``req``; answer
    with :meth:`ControlUnit.trunk_opened` or :meth:`ControlUnit.trunk_failed`."""

    node: str
    req: int
    #: the request needs an encrypted link: TLS (STARTTLS on a plaintext port)
    tls: bool = False


@dataclass(frozen=True, slots=True)
class PublishPresence:
    """Tell the cluster that ``user`` is here (``info``) or no longer here (None)."""

    user: str
    info: fed.PresenceInfo | None


@dataclass(frozen=True, slots=True)
class RemoteDeliver:
    """A broadcast message for ``target``, who is logged in at ``node``."""

    node: str
    sender: str
    target: str
    body: bytes


class State(enum.Enum):
    NEW = "new"
    AUTH = "authenticating"
    IDLE = "idle"
    REQUESTING = "requesting"
    NOTIFIED = "notified"
    PAIRED = "paired"
    CLOSED = "closed"


@dataclass
class Pending:
    """A connection request in flight (steps 11-16 / 31-34)."""

    id: int
    client_req: int
    requester_conn: int
    requester: str
    target: str
    service: str
    encrypt: bool
    e2e: bool
    deadline: float
    target_conn: int | None = None
    phase: str = "new"  # encrypt-wait | ask-wait | target-wait
    insecure: bool = False
    insecure_ok: bool = False
    cancelled: bool = False
    #: the requester itself asked for encryption (Fig. 4), not only the target
    requester_requires: bool = False
    #: ``now`` when the request arrived
    created: float | None = None
    #: the requester's X25519 key (handed to the target for end-to-end mode)
    requester_key: str = ""
    #: the target is at another node: candidates, the one being asked first
    nodes: list[str] = field(default_factory=list)
    #: the requester refused the encryption instruction (it is asked as one that
    #: cannot encrypt at the target's node)
    requester_refused: bool = False
    #: the requester's first bytes, sent with the request (forwarded once paired)
    early: bytes = b""
    #: the session cipher's keys (requester to target, target to requester), issued
    #: when the target is notified; the relay forgets them once both sides have them
    keys: tuple[bytes, bytes] | None = None
    #: the early data went to the target with the notification (optimistic pairing),
    #: so the pairing forwards nothing more
    early_sent: bool = False

    @property
    def remote(self) -> bool:
        return bool(self.nodes)


@dataclass
class Connection:
    id: int
    addr: str
    encrypted: bool
    state: State = State.NEW
    user: str | None = None
    attrs: m.Attrs = field(default_factory=m.Attrs)
    peer: int | None = None
    released: bool = False
    #: this side's end notification was forwarded in the current pairing
    sent_end: bool = False
    #: broke the protocol: closing; what it still sends is ignored
    violated: bool = False
    #: a notification this connection's own request won a crossing against: a reply
    #: to it (from a terminal that answered before it knew) is ignored
    yielded: int | None = None
    pending: Pending | None = None
    subscribed: bool = False
    login: m.Login | None = None
    #: the throttle slot reserved while the password is being checked
    attempt: Attempt | None = None
    #: an inter-node link: the node at the other end ("" for a terminal)
    trunk: str = ""
    #: this node opened the link (it carries our requesters' requests out)
    outbound: bool = False
    #: the inter-node link itself is TLS (``encrypted`` is per request on a trunk)
    link_encrypted: bool = False
    #: an inbound trunk's current requester's X25519 key
    requester_key: str = ""
    #: node authentication in progress: (calling node, its nonce, our nonce)
    node_auth: tuple[str, bytes, bytes] | None = None
    #: the driver can end TLS on this connection in place (:class:`LeaveTLS`)
    leaves_tls: bool = False
    #: the driver can upgrade this connection to TLS (STARTTLS) if it is plaintext
    can_upgrade: bool = True
    #: its session runs under the session cipher: TLS has ended (or is ending) and
    #: nothing but the paired terminal's sealed frames may travel on it
    switched: bool = False


@dataclass
class UserSession:
    """A logged-in user: its record, connections and resumption token."""

    record: UserRecord
    conns: set[int] = field(default_factory=set)
    base_attrs: m.Attrs | None = None
    token_hash: str = ""


@dataclass
class Settings:
    keepalive: float = 15.0
    dead_missed: int = 3
    request_timeout: float = 15.0
    login_timeout: float = 15.0
    token_grace: float = 300.0
    fail_window: float = 600.0
    fail_base_delay: float = 0.5
    fail_max_delay: float = 8.0
    fail_lockout: int = 20
    #: failed or in-flight logins from one address over all users (0: 5 x fail_lockout)
    fail_address_lockout: int = 0
    server_name: str = "kakehashi"
    #: bytes of user entries per ``who-list`` page (the control-message limit is 64 KiB)
    who_page_bytes: int = 48 * 1024
    #: this node's name in a cluster ("" : a standalone relay)
    node: str = ""
    #: key of the inter-node link proofs (:func:`federation.derive_secret`)
    cluster_secret: bytes = b""
    #: idle inter-node links kept per node once a burst of sessions is over
    trunk_spares: int = 4
    #: take early data with connection requests (``ConnectRequest.data``); off, the
    #: relay ignores it and the requester sends those bytes after the result
    early_data: bool = m.EARLY_DATA
    #: issue the session cipher (:data:`messages.CIPHER_SESSION`) where both terminals
    #: offer it; off (``--session-cipher tls``), every session re-encrypts (step 23)
    session_cipher: bool = m.SESSION_CIPHER
    #: optimistic pairing (:data:`messages.CAP_OPTIMISTIC`) with targets that offer it;
    #: off, every target gets the notify-connect-accept flow
    optimistic: bool = m.OPTIMISTIC
    #: a requester on a plaintext connection whose target requires encryption is
    #: instructed to upgrade (step 12, Fig. 3); off (``--plaintext-requesters
    #: refuse``), it is treated as one that cannot encrypt (refused, or the target
    #: asked, para 0037), and its terminal may send early data (``LoginOk.plain_requests``)
    instruct_plaintext: bool = True

    @property
    def dead_after(self) -> float:
        return self.keepalive * self.dead_missed

    def throttle(self) -> ThrottleSettings:
        return ThrottleSettings(lockout=self.fail_lockout,
                                address_lockout=self.fail_address_lockout,
                                window=self.fail_window, base_delay=self.fail_base_delay,
                                max_delay=self.fail_max_delay)


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _visible(record: UserRecord, viewer: str, attrs: m.Attrs | None = None) -> bool:
    """Whether ``viewer`` may learn of a user's presence (its notify policy).

    The policy given at login (``attrs``) wins over the registered one.
    """
    if viewer == record.name:
        return True
    policy = (attrs.notify if attrs else None) or record.notify
    users = attrs.notify_users if attrs and attrs.notify_users is not None \
        else record.notify_users
    if policy == "all":
        return True
    if policy == "none":
        return False
    if policy == "only":
        return viewer in users
    return viewer not in users


def _narrow(registered: tuple[str, ...] | None, given: list[str] | None) -> list[str] | None:
    """Allowed peers: a login may narrow the registered list, never widen it."""
    if given is None:
        return list(registered) if registered is not None else None
    if registered is None:
        return list(given)
    return [peer for peer in given if peer in registered]


class ControlUnit:
    """All relay decisions; see the module docstring."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.conns: dict[int, Connection] = {}
        self.sessions: dict[str, UserSession] = {}
        self.pending: dict[int, Pending] = {}
        self.throttle = LoginThrottle(self.settings.throttle())
        #: password checks in flight, settled by :meth:`authenticated` even when the
        #: connection is gone by then (closing early must not make a guess free)
        self.attempts: dict[int, Attempt] = {}
        self._tokens: dict[str, tuple[str, float]] = {}  # hash -> (user, expiry or 0=live)
        #: connections that asked for presence notices (scanned on every login/logout)
        self.subscribers: set[int] = set()
        #: requests waiting for one of the target's connections to become idle
        self.waiting: dict[str, deque[Pending]] = {}
        self._next_conn = 1
        self._next_req = 1
        #: the other nodes' users (cluster mode)
        self.directory = fed.Directory()
        #: the cluster state is reachable: logins and cross-node requests are served
        self.cluster_up = not self.settings.node
        #: what was last published about each local user
        self._published: dict[str, fed.PresenceInfo] = {}

    # -- events -------------------------------------------------------------------
    def connection_made(self, addr: str, *, encrypted: bool, trunk: str = "",
                        leaves_tls: bool = False, can_upgrade: bool = True) -> int:
        """A new connection; ``trunk`` names the node of an inter-node link this node
        opened and authenticated (it is idle at once, see :meth:`trunk_opened`);
        ``leaves_tls``: the driver can end TLS on it in place (:class:`LeaveTLS`);
        ``can_upgrade``: it can do STARTTLS (a relay without a TLS context cannot)."""
        cid = self._next_conn
        self._next_conn += 1
        conn = self.conns[cid] = Connection(cid, addr, encrypted, leaves_tls=leaves_tls,
                                            can_upgrade=can_upgrade)
        if trunk:
            conn.trunk, conn.outbound, conn.link_encrypted = trunk, True, encrypted
            conn.state = State.IDLE
        return cid

    def tls_established(self, cid: int) -> list[object]:
        conn = self.conns.get(cid)
        if conn is not None:
            conn.encrypted = True
            if conn.trunk:
                conn.link_encrypted = True  # an inter-node link upgraded (STARTTLS)
        return []

    def receive(self, cid: int, msg: m.Msg, now: float) -> list[object]:
        conn = self.conns.get(cid)
        if conn is None or conn.state is State.CLOSED or conn.violated:
            return []
        if conn.outbound:
            return self._trunk_receive(conn, msg, now)
        if conn.switched and isinstance(msg, m.Hold):
            return []  # sent inside TLS as the pairing happened: nothing to answer
        if conn.switched:
            # after TLS ended nothing on this hop is authenticated but the sealed frames
            # the terminals exchange: a terminal never sends a control message then
            return self._violation(conn, f"{type(msg).__name__} after the session cipher "
                                         "took over")
        handler = getattr(self, "_on_" + type(msg).__name__, None)
        if conn.state in (State.NEW, State.AUTH) and not isinstance(
                msg, m.Login | m.StartTLS | m.NodeHello | m.NodeProof):
            return self._violation(conn, "login first")
        if conn.trunk and not isinstance(msg, _TRUNK_MESSAGES):
            return self._violation(conn, f"{type(msg).__name__} on an inter-node link")
        if not conn.trunk and isinstance(msg, m.NodeConnect):
            return self._violation(conn, "node-connect from a terminal")
        if handler is None:
            return self._violation(conn, f"unexpected message {type(msg).__name__}")
        return handler(conn, msg, now)

    def authenticated(self, cid: int, record: UserRecord | None, now: float) -> list[object]:
        """The driver's answer to :class:`Authenticate`."""
        attempt = self.attempts.pop(cid, None)
        conn = self.conns.get(cid)
        if conn is None or conn.state is not State.AUTH or conn.login is None:
            if attempt is not None:  # the guesser left early: it still counts
                if record is None:
                    self.throttle.failed(attempt, now)
                else:
                    self.throttle.succeeded(attempt)
            return []
        conn.attempt = attempt
        login = conn.login
        if record is None:
            return self._login_failed(conn, login.user, "bad user ID or password", now)
        return self._login_ok(conn, record, login, now)

    def connection_lost(self, cid: int, now: float) -> list[object]:
        conn = self.conns.pop(cid, None)
        self.subscribers.discard(cid)
        if conn is None:
            return []
        out: list[object] = []
        conn.state, prev = State.CLOSED, conn.state
        p = conn.pending
        if p is not None:
            out += self._cancel_pending(p, lost=cid)
        if prev is State.PAIRED and conn.peer is not None:
            peer = self.conns.get(conn.peer)
            if peer is not None and peer.peer == cid and peer.outbound:
                # the other node ends its side and answers with its release reply,
                # after which the link is idle again
                peer.peer = None
                if not peer.released:
                    out += [Send(peer.id, m.End(reason="peer connection lost")),
                            Send(peer.id, m.Release())]
                    peer.released = True
                else:
                    out += self._finish_trunk(peer)
            elif peer is not None and peer.peer == cid and peer.switched:
                # no end notification on a hop without TLS: its terminal sees the TCP
                # end, which is a clean end only after the peer's sealed EOF
                peer.peer = None
                out.append(Shut(peer.id))
            elif peer is not None and peer.peer == cid:
                if peer.released:
                    out += self._finish_pair(peer)
                else:
                    peer.peer = None
                    out.append(Send(peer.id, m.End(reason="peer connection lost")))
        if conn.user is not None and not conn.trunk:
            out += self._detach(conn, now)
        return out

    def tick(self, now: float) -> list[object]:
        """Expire connection requests whose target never answered."""
        out: list[object] = []
        for p in list(self.pending.values()):
            if now >= p.deadline and p.cancelled:
                out += self._expire_cancelled(p)
            elif now >= p.deadline:
                if p.phase == "idle-wait":
                    out += self._fail_request(
                        p, "target-busy", f"{p.target} had no idle connection in time")
                else:
                    out += self._fail_request(p, "timeout", f"{p.target} did not answer in time")
        for tok, (_, expiry) in list(self._tokens.items()):
            if expiry and now > expiry:
                del self._tokens[tok]
        return out

    # -- login (Fig. 2) -----------------------------------------------------------
    def _on_Login(self, conn: Connection, msg: m.Login, now: float) -> list[object]:
        if conn.state is not State.NEW or conn.node_auth is not None:
            return self._violation(conn, "already logged in")
        if not self.cluster_up:
            # a node cut off from the cluster state takes nobody in: a user logged in
            # here could not be found by the other nodes (and might be logged in there)
            conn.state = State.CLOSED
            return [
                Audit("login", False, {"user": msg.user, "addr": conn.addr,
                                       "why": "cluster-down"}),
                Send(conn.id, m.LoginFail(
                    reason=f"relay node {self.settings.node} cannot reach the cluster "
                           "state; use another node", code="cluster-down")),
                Close(conn.id, "cluster down"),
            ]
        conn.login = msg
        conn.state = State.AUTH
        if msg.token:
            # a live resumption token is no guess (192 random bits, no hash to run): an
            # agent's spare connections log in even while others' failures lock its
            # address out
            entry = self._tokens.get(_hash_token(msg.token))
            session = self.sessions.get(msg.user)
            live = entry is not None and (not entry[1] or now <= entry[1])
            if live and entry[0] == msg.user and session is not None:  # type: ignore[index]
                return self._login_ok(conn, session.record, msg, now)
        # reserve the attempt before anything is checked: attempts still being checked
        # count against the limit, so a parallel burst gets no more guesses than a row
        attempt = self.throttle.begin(conn.addr, msg.user, now)
        if isinstance(attempt, str):
            conn.state = State.CLOSED
            code = ""  # a terminal gives up (wrong password)
            if attempt != "lockout":
                reason, code = "the server is busy checking other logins; try again later", \
                    "busy"
            elif self.throttle.failed_out(conn.addr, msg.user, now):
                reason = "too many failed logins from your address"
            else:  # the limit is full of checks still running: nothing failed (yet)
                reason, code = ("too many logins from your address are being checked at "
                                "once; try again in a moment"), "busy"
            return [
                Audit("login", False, {"user": msg.user, "addr": conn.addr, "why": attempt}),
                Send(conn.id, m.LoginFail(reason=reason, code=code)),
                Close(conn.id, attempt),
            ]
        conn.attempt = attempt
        if msg.token and not msg.password:
            return self._login_failed(conn, msg.user, "resumption token expired", now)
        if not msg.password:
            return self._login_failed(conn, msg.user, "password required", now)
        conn.attempt = None
        self.attempts[conn.id] = attempt
        return [Authenticate(conn.id, msg.user, msg.password)]

    def _login_failed(self, conn: Connection, user: str, reason: str, now: float) -> list[object]:
        attempt, conn.attempt = conn.attempt, None
        if attempt is not None:
            delay = self.throttle.failed(attempt, now)
        else:  # refused after a token login (no attempt was reserved)
            delay = self.throttle.fail_now(conn.addr, user, now)
        conn.state = State.CLOSED
        return [
            Audit("login", False, {"user": user, "addr": conn.addr, "why": reason}),
            Send(conn.id, m.LoginFail(reason=reason), delay=delay),
            Close(conn.id, "login failed", delay=delay),
        ]

    def _effective(self, record: UserRecord, attrs: m.Attrs) -> m.Attrs:
        """Merge login attributes over the registered ones; registration is the floor."""
        enc = attrs.encryption or record.encryption
        if record.encryption == "required":
            enc = "required"
        return m.Attrs(
            encryption=enc,
            ciphers=attrs.ciphers or [m.CIPHER_TLS],
            notify=attrs.notify or record.notify,
            notify_users=attrs.notify_users
            if attrs.notify_users is not None
            else list(record.notify_users),
            allowed_peers=_narrow(record.allowed_peers, attrs.allowed_peers),
            insecure_peer=attrs.insecure_peer or record.insecure_peer,
            services=attrs.services,
            inherit=attrs.inherit,
        )

    def _login_ok(
        self, conn: Connection, record: UserRecord, login: m.Login, now: float
    ) -> list[object]:
        if record.encryption == "required" and not conn.encrypted:
            return self._login_failed(
                conn, record.name,
                f"user {record.name} requires encryption: connect with TLS or STARTTLS first",
                now,
            )
        attempt, conn.attempt = conn.attempt, None
        if attempt is not None:  # returns this attempt's slot; others' failures stay
            self.throttle.succeeded(attempt)
        session = self.sessions.get(record.name)
        first = session is None or not session.conns
        if session is None:
            session = self.sessions[record.name] = UserSession(record)
        session.record = record
        attrs = login.attrs or m.Attrs()
        if attrs.inherit and session.base_attrs is not None:
            attrs = session.base_attrs
        conn.attrs = self._effective(record, attrs)
        if session.base_attrs is None or first:
            session.base_attrs = conn.attrs
        conn.user = record.name
        conn.state = State.IDLE
        session.conns.add(conn.id)
        entry = self._tokens.get(_hash_token(login.token)) if login.token else None
        valid = entry is not None and entry[0] == record.name and (not entry[1] or now <= entry[1])
        token = login.token if valid else ""  # a still-valid token is kept and live again
        if not token:
            token = secrets.token_urlsafe(24)
        if session.token_hash and session.token_hash != _hash_token(token):
            self._tokens.pop(session.token_hash, None)  # one live token per user session
        session.token_hash = _hash_token(token)
        self._tokens[session.token_hash] = (record.name, 0.0)
        out: list[object] = [
            Audit("login", True, {"user": record.name, "addr": conn.addr, "conn": conn.id,
                                  "encrypted": conn.encrypted}),
            Send(
                conn.id,
                m.LoginOk(
                    conn_id=conn.id,
                    token=token,
                    encryption=conn.attrs.encryption or "optional",
                    keepalive=self.settings.keepalive,
                    dead_after=self.settings.dead_after,
                    server=self.settings.server_name,
                    plain_requests=self._plain_requests(conn, login),
                ),
            ),
        ]
        if first and not self.directory.online(record.name):
            out += self._presence(record, True, conn.attrs.encryption or "optional")
        return out + self._publish(record.name) + self._became_idle(conn)

    def _on_SetAttrs(self, conn: Connection, msg: m.SetAttrs, now: float) -> list[object]:
        session = self.sessions[conn.user]  # type: ignore[index]
        is_base = session.base_attrs is conn.attrs
        conn.attrs = self._effective(session.record, msg.attrs)
        if is_base or session.base_attrs is None:  # para 0029: sent after the positive reply
            session.base_attrs = conn.attrs
        return self._publish(session.record.name)

    def _on_StartTLS(self, conn: Connection, msg: m.StartTLS, now: float) -> list[object]:
        if conn.trunk:  # an inter-node link that will carry encrypted sessions
            if conn.state is not State.IDLE:
                return self._violation(conn, "STARTTLS on a busy inter-node link")
            if conn.link_encrypted:
                return [Send(conn.id, m.Error(code="already-encrypted", message="already TLS"))]
            return [Send(conn.id, m.TLSGo()), UpgradeTLS(conn.id)]
        if conn.state is State.AUTH:
            return self._violation(conn, "STARTTLS while the login is being checked")
        if conn.encrypted:
            return [Send(conn.id, m.Error(code="already-encrypted", message="already TLS"))]
        if conn.attrs.encryption == "off" and conn.state is not State.NEW:
            return [Send(conn.id, m.Error(code="bad-request", message="encryption is off"))]
        return [Send(conn.id, m.TLSGo()), UpgradeTLS(conn.id)]

    # -- keepalive ----------------------------------------------------------------
    def _on_Hold(self, conn: Connection, msg: m.Hold, now: float) -> list[object]:
        return [Send(conn.id, m.HoldAck(seq=msg.seq))]

    # -- logout (steps 6-7) -------------------------------------------------------
    def _on_Logout(self, conn: Connection, msg: m.Logout, now: float) -> list[object]:
        session = self.sessions.get(conn.user or "")
        targets = sorted(session.conns) if session else [conn.id]
        if session:
            self._tokens.pop(session.token_hash, None)
        return [Audit("logout", True, {"user": conn.user, "conns": len(targets)})] + [
            Close(c, "logout") for c in targets
        ]

    # -- presence and broadcast ---------------------------------------------------
    def _on_Who(self, conn: Connection, msg: m.Who, now: float) -> list[object]:
        """One page of the users ``conn`` may see, after ``msg.after`` in ID order.

        A page stops before it would pass ``Settings.who_page_bytes``, so it always
        fits the control-message limit however many users are online; the terminal
        asks for the next page while ``more`` is set.
        """
        users: list[m.UserInfo] = []
        size = 0
        more = False
        viewer = conn.user or ""
        names = {n for n in self.sessions if n > msg.after}
        names.update(n for n in self.directory.users if n > msg.after)
        for name in sorted(names):
            s = self.sessions.get(name)
            remote = self.directory.merged(name)
            if s is not None and s.conns:
                if not _visible(s.record, viewer, s.base_attrs):
                    continue
                services = {sv for c in s.conns for sv in self.conns[c].attrs.services}
                encryption, count = self._user_encryption(s), len(s.conns)
            elif remote is not None:  # cluster-wide: a user of another node
                if not remote.visible_to(viewer, name):
                    continue
                services, encryption, count = set(), remote.encryption, 0
            else:
                continue
            if remote is not None:
                services.update(remote.services)
                count += remote.connections
            info = m.UserInfo(user=name, encryption=encryption,
                              services=sorted(services)[:64], connections=count)
            entry = len(_ENCODE(info))
            if users and size + entry > self.settings.who_page_bytes:
                more = True
                break
            users.append(info)
            size += entry
        return [Send(conn.id, m.WhoList(users=users, more=more))]

    def _on_Subscribe(self, conn: Connection, msg: m.Subscribe, now: float) -> list[object]:
        conn.subscribed = msg.on
        if msg.on:
            self.subscribers.add(conn.id)
        else:
            self.subscribers.discard(conn.id)
        return []

    def _presence(self, record: UserRecord, online: bool, enc: m.Encryption,
                  attrs: m.Attrs | None = None) -> list[object]:
        return self._presence_to(record.name, online, enc,
                                 lambda viewer: _visible(record, viewer, attrs))

    def _presence_to(self, name: str, online: bool, enc: m.Encryption,
                     visible: Callable[[str], bool]) -> list[object]:
        out: list[object] = []
        for cid in list(self.subscribers):
            c = self.conns.get(cid)
            if c is None:
                self.subscribers.discard(cid)
                continue
            if c.user and c.user != name and visible(c.user) and not c.switched:
                out.append(Send(c.id, m.Presence(user=name, online=online, encryption=enc)))
        return out

    def _on_Broadcast(self, conn: Connection, msg: m.Broadcast, now: float) -> list[object]:
        out: list[object] = []
        delivered, missing = [], []
        sender = conn.user or ""
        for target in dict.fromkeys(msg.targets):
            s = self.sessions.get(target)
            if not s or not s.conns:
                remote = self.directory.merged(target) if self.cluster_up else None
                if remote is not None and remote.visible_to(sender, target) \
                        and remote.allows(sender, target):
                    node = self.directory.nodes_of(target)[0]
                    out.append(RemoteDeliver(node, sender, target, bytes(msg.body)))
                    delivered.append(target)
                else:
                    missing.append(target)
                continue
            if not _visible(s.record, sender, s.base_attrs) or not self._allows(s, sender):
                missing.append(target)
                continue
            dest = self._pick_conn(s, prefer_idle=True)
            out.append(Send(dest, m.Deliver(sender=conn.user or "", body=msg.body)))
            delivered.append(target)
        out.append(Send(conn.id, m.BroadcastResult(delivered=delivered, missing=missing)))
        return out

    # -- connection request (Figs. 3 and 4) ---------------------------------------
    def _on_ConnectRequest(self, conn: Connection, msg: m.ConnectRequest, now: float):
        """A request; when it crosses a notification on the same connection and wins
        (:meth:`_yield_notification`), the request that yielded goes to another idle
        connection of its target at once. Queued only, it would wait for a connection
        to *become* idle, and one already idle (a spare that logged in a moment
        before) never does: the request failed with "target-busy" after the request
        timeout (seen as a flaky tests/e2e/test_relay_crossing.py)."""
        crossed = conn.pending if conn.state is State.NOTIFIED else None
        out = self._connect_request(conn, msg, now)
        if crossed is not None and crossed.phase == "idle-wait" \
                and self.pending.get(crossed.id) is crossed:
            other = self._idle_conn(self.sessions.get(crossed.target),
                                    exclude=crossed.requester_conn, service=crossed.service)
            if other is not None:
                out += self._became_idle(self.conns[other])
        return out

    def _connect_request(self, conn: Connection, msg: m.ConnectRequest, now: float):
        def refuse(code: str, text: str) -> list[object]:
            return [
                Audit("connect", False, {"from": conn.user, "to": msg.target, "why": code}),
                Send(conn.id, m.Error(req=msg.req, code=code, message=m.fit(text))),
            ]

        if conn.state is State.NOTIFIED and conn.pending is not None:
            crossed = conn.pending
            if not m.crossing_request_wins(conn.user or "", crossed.requester, msg.target):
                return refuse("crossed", f"{crossed.requester} is connecting to you at the "
                                         "same moment and its request goes first")
            self._yield_notification(conn, crossed)
        if conn.state is not State.IDLE:
            return refuse("busy", "this connection is not idle; use a spare connection")
        requester_key = conn.requester_key if conn.trunk \
            else self.sessions[conn.user].record.pubkey  # type: ignore[index]
        target = self.sessions.get(msg.target)
        if not conn.trunk and self.settings.node and self._elsewhere(target, msg):
            return self._request_remote(conn, msg, requester_key, now, refuse)
        if conn.trunk and not self.cluster_up:
            return refuse("cluster-down",
                          f"relay node {self.settings.node} cannot reach the cluster state")
        if target is None or not target.conns or not _visible(
                target.record, conn.user or "", target.base_attrs):
            return refuse("not-logged-in", f"{msg.target} is not logged in")
        if not self._allows(target, conn.user or ""):
            return refuse("forbidden", f"{msg.target} does not accept connections from you")
        if conn.attrs.allowed_peers is not None and msg.target not in conn.attrs.allowed_peers:
            return refuse("forbidden", f"your attributes do not allow connecting to {msg.target}")
        if msg.service:
            offered = {sv for c in target.conns for sv in self.conns[c].attrs.services}
            if msg.service not in offered:
                return refuse(
                    "no-such-service",
                    f"{msg.target} does not expose {msg.service!r}"
                    + (f" (it exposes: {', '.join(sorted(offered))})" if offered else ""),
                )
        if msg.e2e and not (requester_key and target.record.pubkey):
            return refuse(
                "e2e-unavailable",
                "end-to-end encryption needs an X25519 key registered for both users",
            )
        if msg.encrypt and conn.attrs.encryption == "off":
            return refuse("bad-request", "you asked for encryption but your encryption is off")
        target_requires = self._user_encryption(target) == "required"
        requester_requires = conn.attrs.encryption == "required" or msg.encrypt
        p = Pending(
            id=self._next_req,
            client_req=msg.req,
            requester_conn=conn.id,
            requester=conn.user or "",
            target=msg.target,
            service=msg.service,
            encrypt=target_requires or requester_requires,
            e2e=msg.e2e,
            deadline=now + self.settings.request_timeout,
            requester_requires=requester_requires,
            created=now,
            requester_key=requester_key,
        )
        self._next_req += 1
        self.pending[p.id] = p
        conn.pending = p
        conn.state = State.REQUESTING
        if msg.data and self.settings.early_data and not msg.e2e and not conn.trunk \
                and not (p.encrypt and not conn.encrypted):
            # held until the target accepts; never taken where the session must be
            # encrypted and this hop is not (the requester sends them again after its
            # upgrade), nor in end-to-end mode (the bytes must be sealed first)
            p.early = msg.data
        if p.encrypt and not conn.encrypted and conn.trunk \
                and conn.attrs.encryption != "off":
            # every hop must be encrypted (para 0017), the one between the nodes too;
            # the requester's node instructed its own hop already (step 12)
            why = ("the link between relay nodes is not encrypted (run the nodes with "
                   "--tls on)" if not conn.link_encrypted
                   else "the requester's connection is not encrypted")
            return self._fail_request(p, "encryption-required", why)
        if p.encrypt and not conn.encrypted:
            # both hops must be encrypted (para 0017): step 12 for Fig. 3, and for Fig. 4
            # when the requester asked for encryption on a plaintext connection
            if conn.attrs.encryption != "off" and (requester_requires
                                                   or self.instructs(conn)):
                p.phase = "encrypt-wait"  # step 12: instruct the requester, wait for 13
                why = (f"{msg.target} requires encrypted communication" if target_requires
                       else "you asked for encryption: upgrade this connection")
                return [Send(conn.id, m.EncryptInstruct(req=msg.req, reason=why))]
            return self._requester_cannot_encrypt(
                p, target, "" if conn.attrs.encryption == "off" else
                f"{p.target} requires encryption and this relay does not upgrade a "
                "requester's plaintext connection: connect with TLS")
        return self._notify_target(p)

    def _yield_notification(self, conn: Connection, p: Pending) -> None:
        """The request ``conn`` was notified of lost a crossing to ``conn``'s own request
        (:func:`messages.crossing_request_wins`): it waits for another idle connection
        of its target, first in line, and ``conn`` is idle for its own request. The
        terminal ignores the notification by the same rule, so no reply comes."""
        conn.pending = None
        conn.state = State.IDLE
        conn.yielded = p.id
        p.target_conn = None
        if p.cancelled:  # its requester is gone: nothing to wait for
            self.pending.pop(p.id, None)
            return
        p.phase = "idle-wait"
        self.waiting.setdefault(p.target, deque()).appendleft(p)

    def _requester_cannot_encrypt(self, p: Pending, target: UserSession,
                                  why: str = "") -> list[object]:
        """Para 0037: refuse (``why``: the reason, when not "cannot encrypt"), or ask
        the target whether to connect anyway."""
        if target.record.insecure_peer == "ask" or self._base_policy(target) == "ask":
            p.insecure = True
            p.encrypt = False
            return self._notify_target(p)
        return self._fail_request(
            p, "encryption-required",
            why or f"{p.target} requires encryption and this connection cannot encrypt",
        )

    def _on_EncryptAccept(self, conn: Connection, msg: m.EncryptAccept, now: float):
        p = conn.pending
        if p is None or p.client_req != msg.req or p.phase != "encrypt-wait":
            return self._violation(conn, "encryption acceptance without instruction")
        if not conn.encrypted:
            return self._fail_request(
                p, "encryption-not-established",
                "accepted encryption but the connection is not encrypted (send STARTTLS first)",
            )
        return self._notify_target(p)

    def _on_EncryptRefuse(self, conn: Connection, msg: m.EncryptRefuse, now: float):
        p = conn.pending
        if p is None or p.client_req != msg.req or p.phase != "encrypt-wait":
            return self._violation(conn, "encryption refusal without instruction")
        if p.requester_requires:
            return self._fail_request(
                p, "encryption-required", "you asked for encryption but refused to encrypt")
        if p.remote:  # the target's node decides as for one that cannot encrypt
            p.requester_refused = True
            return self._forward_remote(p)
        target = self.sessions.get(p.target)
        if target is None:
            return self._fail_request(p, "not-logged-in", f"{p.target} is not logged in")
        return self._requester_cannot_encrypt(p, target)

    def _notify_target(self, p: Pending) -> list[object]:
        if p.remote:
            return self._forward_remote(p)
        target = self.sessions.get(p.target)
        req_conn = self.conns[p.requester_conn]
        if target is None:
            return self._fail_request(p, "not-logged-in", f"{p.target} is not logged in")
        tconn_id = self._idle_conn(target, exclude=p.requester_conn, service=p.service)
        if tconn_id is None:
            # all of the target's connections (that offer the service) are busy: its
            # agent opens a spare at once (steps 17-21), so wait for one instead of
            # refusing (bounded by the timeout)
            p.phase = "idle-wait"
            self.waiting.setdefault(p.target, deque()).append(p)
            return []
        tconn = self.conns[tconn_id]
        if p.encrypt and not tconn.encrypted and (tconn.attrs.encryption == "off"
                                                  or not tconn.can_upgrade):
            # Fig. 4 with a target that cannot encrypt: refuse or ask the requester.
            if req_conn.attrs.insecure_peer == "ask":
                p.phase = "ask-wait"
                return [Send(req_conn.id, m.Notify(
                    req=p.client_req, peer=p.target, service=p.service, insecure=True))]
            return self._fail_request(
                p, "peer-cannot-encrypt", f"{p.target} cannot use encrypted communication"
            )
        return self._send_notify(p, tconn)

    def _became_idle(self, conn: Connection) -> list[object]:
        """Hand a waiting request to a connection that just became idle: the oldest
        one this connection can serve (a request for a service goes only to a
        connection that offers it)."""
        if conn.trunk:
            return []  # an inter-node link serves requests from its other end only
        user = conn.user or ""
        queue = self.waiting.get(user)
        if not queue:
            return []
        for p in list(queue):
            if self.pending.get(p.id) is not p or p.phase != "idle-wait":
                queue.remove(p)  # answered or failed meanwhile
                continue
            if p.requester_conn != conn.id and self._serves(conn, p.service):
                queue.remove(p)
                if not queue:
                    del self.waiting[user]
                return self._notify_target(p)
        if not queue:
            del self.waiting[user]
        return []

    def _unqueue(self, p: Pending) -> None:
        """Take ``p`` out of the queue of requests waiting for an idle connection."""
        queue = self.waiting.get(p.target)
        if queue is None:
            return
        with contextlib.suppress(ValueError):
            queue.remove(p)
        if not queue:
            del self.waiting[p.target]

    def instructs(self, conn: Connection) -> bool:
        """The one decision whether a requester on plaintext connection ``conn`` whose
        target requires encryption is instructed to upgrade (step 12, Fig. 3), or
        treated as one that cannot encrypt (para 0037: refused, or the target asked).

        Instructed unless the relay cannot upgrade the connection (no TLS context) or
        its policy says not to (:attr:`Settings.instruct_plaintext`). Where it is not,
        a request that does not itself ask for encryption never becomes an encrypted
        session, which the relay tells a terminal that understands it at login
        (``LoginOk.plain_requests``): its first bytes may then cross the plaintext hop
        with the request (early data), as on a connection whose encryption is off.
        """
        return conn.can_upgrade and self.settings.instruct_plaintext

    def _plain_requests(self, conn: Connection, login: m.Login) -> bool:
        """``LoginOk.plain_requests`` for ``conn``: only to a terminal that listed
        :data:`messages.CAP_PLAIN_REQUESTS` in this very login (not in attributes it
        inherited: an older terminal's decoder refuses the field), on a plaintext
        connection that is not instructed (:meth:`instructs`) and whose attributes do
        not require encryption (its every request would)."""
        return (login.attrs is not None and m.CAP_PLAIN_REQUESTS in login.attrs.ciphers
                and not conn.encrypted and conn.attrs.encryption != "required"
                and not self.instructs(conn))

    def session_cipher(self, p: Pending, req_conn: Connection, tconn: Connection) -> bool:
        """The one decision between re-encrypting (spec 000 step 23 as written) and
        relaying the data unchanged under relay-issued session keys ("with some ciphers
        this step is not needed").

        Only when the switch is on, both terminals offer :data:`messages.CIPHER_SESSION`
        on these very connections, both hops are TLS that the driver can end in place
        (so both are encrypted now and stay encrypted with keys only the relay and the
        two terminals know), and the session stays on this node (inter-node links and
        their requesters keep TLS). End-to-end sessions keep TLS too: their end of
        stream is not authenticated by their own keys, so their hops keep TLS integrity.
        """
        return (self.settings.session_cipher and not p.e2e and not p.insecure
                and not p.remote
                and all(c.encrypted and c.leaves_tls and not c.trunk and not c.outbound
                        and m.CIPHER_SESSION in c.attrs.ciphers for c in (req_conn, tconn)))

    def optimistic(self, p: Pending, req_conn: Connection, tconn: Connection) -> bool:
        """The one decision for optimistic pairing: the notification carries the early
        data and the target may accept before its service is connected.

        Only when the switch is on and the target offers :data:`messages.CAP_OPTIMISTIC`
        on this connection; under the session cipher (``p.keys`` issued) the requester
        must offer it too, since only then can it read the target's sealed end with a
        reason (:func:`kakehashi.core.pump.seal_close`). Never where the target would
        first have to upgrade to TLS (the early data must not cross its plaintext hop
        of a session that must be encrypted), nor across nodes (the far node's relay
        and its links keep the flow they know).
        """
        return (self.settings.optimistic and not p.remote
                and not req_conn.trunk and not tconn.trunk and not tconn.outbound
                and m.CAP_OPTIMISTIC in tconn.attrs.ciphers
                and not (p.encrypt and not tconn.encrypted)
                and (p.keys is None or m.CAP_OPTIMISTIC in req_conn.attrs.ciphers))

    def _send_notify(self, p: Pending, tconn: Connection) -> list[object]:
        p.target_conn = tconn.id
        p.phase = "target-wait"
        tconn.state = State.NOTIFIED
        tconn.pending = p
        req_conn = self.conns.get(p.requester_conn)
        p.keys = None
        if req_conn is not None and self.session_cipher(p, req_conn, tconn):
            # fresh keys for each session and direction, never reused (os.urandom)
            p.keys = (secrets.token_bytes(16), secrets.token_bytes(16))
        optimistic = req_conn is not None and self.optimistic(p, req_conn, tconn)
        # the early data, after every check above (this target is the one asked for,
        # and may take a request from this requester): the target holds it until it
        # accepts, so it reaches the service one hop sooner than behind the pairing
        p.early_sent = optimistic and bool(p.early)
        return [Send(tconn.id, m.Notify(
            req=p.id, peer=p.requester, service=p.service, encrypt=p.encrypt, e2e=p.e2e,
            peer_key=p.requester_key if p.e2e else "", insecure=p.insecure,
            cipher=m.CIPHER_SESSION if p.keys else "",
            keys=p.keys[1] + p.keys[0] if p.keys else None,
            optimistic=optimistic,
            data=self._sealed_early(p) if p.early_sent else b"",
        ))]

    @staticmethod
    def _sealed_early(p: Pending) -> bytes:
        """The early data as the target receives it: under the session cipher sealed
        as the first message of the requester's direction (counter 0: every DATA frame
        of the session is sealed, and the target opens all alike)."""
        if p.keys is None:
            return p.early
        return crypto.E2ESession.issued(
            p.keys[0], p.keys[1], suite=crypto.SUITE_AES_128_GCM).seal(p.early)

    def _on_Accept(self, conn: Connection, msg: m.Accept, now: float) -> list[object]:
        p = conn.pending
        if conn.state is State.REQUESTING and p and p.phase == "remote-ask":
            return self._remote_answer(conn, p, msg)
        if conn.state is State.REQUESTING and p and p.phase == "ask-wait":
            if msg.req != p.client_req:
                return self._violation(conn, "accept for an unknown request")
            target = self.sessions.get(p.target)
            tconn_id = self._idle_conn(target, exclude=conn.id, service=p.service) \
                if target else None
            if tconn_id is None:
                return self._fail_request(p, "target-busy", f"{p.target} has no idle connection")
            p.encrypt = False
            p.insecure_ok = True  # the requester accepted an unencrypted target
            # the target is told too: the session it is offered is unencrypted although
            # its peer required encryption, and its reply decides (para 0037)
            p.insecure = True
            return self._send_notify(p, self.conns[tconn_id])
        if conn.state is not State.NOTIFIED or p is None or p.id != msg.req:
            if msg.req == conn.yielded:
                return []  # the notification lost a crossing; it waits elsewhere
            return self._violation(conn, "accept without a pending notification")
        if p.cancelled:  # the requester went away meanwhile: end at once
            del self.pending[p.id]
            conn.pending = None
            conn.state = State.PAIRED
            conn.peer = None
            return [Send(conn.id, m.End(reason="requester went away"))]
        if p.encrypt and not conn.encrypted:
            return self._on_Refuse(conn, m.Refuse(
                req=msg.req, reason="target accepted but its connection is not encrypted"), now)
        req_conn = self.conns[p.requester_conn]
        del self.pending[p.id]
        conn.pending = req_conn.pending = None
        conn.state = req_conn.state = State.PAIRED
        conn.peer, req_conn.peer = req_conn.id, conn.id
        conn.released = req_conn.released = False
        conn.sent_end = req_conn.sent_end = False
        target = self.sessions[p.target]
        # the requester's first bytes, the target's first data frame (unless they went
        # with the notification)
        early = [Forward(conn.id, self._sealed_early(p))] \
            if p.early and not p.early_sent else []
        keys, p.keys = p.keys, None
        leave: list[object] = []
        if keys:
            conn.switched = req_conn.switched = True
            # after the result and the early data, in each connection's queue
            leave = [LeaveTLS(req_conn.id), LeaveTLS(conn.id)]
        return [
            Pair(req_conn.id, conn.id, since=p.created),
            Send(req_conn.id, m.Result(
                req=p.client_req, ok=True, peer=p.target, encrypt=p.encrypt, e2e=p.e2e,
                peer_key=target.record.pubkey if p.e2e else "", early=len(p.early),
                cipher=m.CIPHER_SESSION if keys else "",
                keys=keys[0] + keys[1] if keys else None,
            )),
            *early,  # the requester's first bytes: the target's first data frame
            *leave,
            Audit("pair", True, {
                "from": p.requester, "to": p.target, "service": p.service,
                "encrypted": p.encrypt, "e2e": p.e2e,
                "insecure_ok": p.insecure or p.insecure_ok,
                "hops_tls": [req_conn.encrypted, conn.encrypted],
                "early": len(p.early),  # bytes of the requester's early data forwarded
                "cipher": m.CIPHER_SESSION if keys else
                ("tls" if req_conn.encrypted and conn.encrypted else "mixed"),
                "conns": [req_conn.id, conn.id],
            }, soon=True),  # written once the first reply is through (off the setup path)
        ]

    def _on_Refuse(self, conn: Connection, msg: m.Refuse, now: float) -> list[object]:
        p = conn.pending
        if conn.state is State.REQUESTING and p and p.phase == "remote-ask":
            return self._remote_answer(conn, p, msg)
        if conn.state is State.REQUESTING and p and p.phase == "ask-wait":
            return self._fail_request(p, "refused", "you declined the unencrypted connection")
        if conn.state is not State.NOTIFIED or p is None or p.id != msg.req:
            if msg.req == conn.yielded:
                return []  # the notification lost a crossing; it waits elsewhere
            return self._violation(conn, "refuse without a pending notification")
        conn.state = State.IDLE
        conn.pending = None
        return self._fail_request(p, "refused", msg.reason or f"{p.target} refused") + \
            self._became_idle(conn)

    def _fail_request(self, p: Pending, code: str, text: str) -> list[object]:
        self.pending.pop(p.id, None)
        self._unqueue(p)
        out: list[object] = [
            Audit("connect", False, {"from": p.requester, "to": p.target, "why": code})
        ]
        req_conn = self.conns.get(p.requester_conn)
        if req_conn is not None and req_conn.pending is p:
            req_conn.pending = None
            req_conn.state = State.IDLE
            out.append(Send(req_conn.id, m.Result(
                req=p.client_req, ok=False, peer=p.target, code=code, message=text)))
        if p.target_conn is not None:
            tconn = self.conns.get(p.target_conn)
            if tconn is not None and tconn.pending is p and tconn.outbound:
                # the other node is still at it: this link cannot be reused
                tconn.pending = None
                out.append(Close(tconn.id, "request given up"))
            elif tconn is not None and tconn.pending is p:
                # still waiting for the target: its late reply gets "requester went away"
                self._keep_cancelled(p)
        return out

    def _keep_cancelled(self, p: Pending) -> None:
        """Keep a request whose requester is gone until its notified target answers,
        for one more request timeout (:meth:`_expire_cancelled` after that)."""
        if not p.cancelled:
            p.cancelled = True
            p.deadline += self.settings.request_timeout
        self.pending[p.id] = p

    def _expire_cancelled(self, p: Pending) -> list[object]:
        """A notified target never answered a request that was given up: its
        connection is stuck in the middle of the protocol, so it is closed (the
        terminal reconnects) and nothing about the request is kept."""
        del self.pending[p.id]
        tconn = self.conns.get(p.target_conn) if p.target_conn is not None else None
        if tconn is None or tconn.pending is not p:
            return []
        tconn.pending = None
        return [
            Audit("protocol", False, {"conn": tconn.id, "user": tconn.user,
                                      "why": "did not answer a connection request"}),
            Close(tconn.id, "did not answer a connection request"),
        ]

    def _cancel_pending(self, p: Pending, *, lost: int) -> list[object]:
        if lost == p.requester_conn:
            self.pending.pop(p.id, None)
            self._unqueue(p)
            tconn = self.conns.get(p.target_conn) if p.target_conn is not None else None
            if tconn is not None and tconn.outbound:
                p.cancelled = True
                if tconn.pending is p:  # the other node is still at it: cut that link
                    tconn.pending = None
                    return [Close(tconn.id, "requester lost"),
                            Audit("connect", False, {"from": p.requester, "to": p.target,
                                                     "why": "requester lost"})]
            elif p.target_conn is not None and p.target_conn in self.conns:
                self._keep_cancelled(p)  # keep until the target replies
            else:
                p.cancelled = True
            return [Audit("connect", False, {"from": p.requester, "to": p.target,
                                             "why": "requester lost"})]
        p.target_conn = None
        if p.early_sent:
            # the early data went with the notification (optimistic pairing): the
            # target may have accepted and written it to its service before its link
            # went. A retry would deliver those bytes a second time, on another
            # session, so the request fails with a code a terminal does not retry
            return self._fail_request(
                p, "target-lost-early",
                f"{p.target} disconnected after it was sent your first bytes; they may "
                "have reached its service, so the request is not repeated: connect again")
        return self._fail_request(p, "target-lost", f"{p.target} disconnected")

    # -- end and release (steps 26-28', 44-46') -----------------------------------
    def _on_End(self, conn: Connection, msg: m.End, now: float) -> list[object]:
        if conn.state is not State.PAIRED:
            return []  # an end crossing a release is harmless
        conn.sent_end = True
        if conn.peer is not None and conn.peer in self.conns:
            return [Send(conn.peer, m.End(reason=msg.reason))]
        return []

    def _on_Release(self, conn: Connection, msg: m.Release, now: float) -> list[object]:
        if conn.state is not State.PAIRED:
            return self._violation(conn, "release of a connection that is not paired")
        conn.released = True
        out: list[object] = [Unpair(conn.id)]
        peer = self.conns.get(conn.peer) if conn.peer is not None else None
        if peer is not None and peer.peer == conn.id and not peer.released \
                and not (conn.sent_end or peer.sent_end):
            # a release without an end notification: the peer must still learn that
            # this side is gone, or both connections would stay paired forever
            conn.sent_end = True
            out.append(Send(peer.id, m.End(reason="peer released the connection")))
        if peer is not None and peer.outbound and peer.peer == conn.id:
            # the far node releases its side for us; its release reply ends the pairing
            if not peer.released:
                peer.released = True
                out.append(Send(peer.id, m.Release()))
            return out
        if peer is None or peer.released or peer.peer != conn.id:
            out += self._finish_pair(conn)
            if peer is not None and peer.peer == conn.id:
                out += self._finish_pair(peer)
        return out

    def _finish_pair(self, conn: Connection) -> list[object]:
        if conn.outbound:
            return self._finish_trunk(conn)
        conn.state = State.IDLE
        conn.peer = None
        conn.released = conn.sent_end = False
        return [Send(conn.id, m.Released()), *self._became_idle(conn)]

    # -- relay federation: requests to users of other nodes --------------------------
    def _elsewhere(self, target: UserSession | None, msg: m.ConnectRequest) -> bool:
        """Whether to ask another node: the target is not here, or it is here without
        the named service while another node's connection of it offers it."""
        if target is None or not target.conns:
            return True
        if not msg.service:
            return False
        if any(msg.service in self.conns[c].attrs.services for c in target.conns):
            return False
        return bool(self.directory.nodes_of(msg.target, msg.service))

    def _request_remote(self, conn: Connection, msg: m.ConnectRequest, requester_key: str,
                        now: float, refuse: Callable[[str, str], list[object]]) -> list[object]:
        """The checks the requester's node can make from the directory; the target's
        node makes them all again with the real session when the request arrives."""
        user = conn.user or ""
        info = self.directory.merged(msg.target) if self.cluster_up else None
        if not self.cluster_up:
            return refuse("cluster-down",
                          f"relay node {self.settings.node} cannot reach the cluster state")
        if info is None or not info.visible_to(user, msg.target):
            return refuse("not-logged-in", f"{msg.target} is not logged in")
        if not info.allows(user, msg.target):
            return refuse("forbidden", f"{msg.target} does not accept connections from you")
        if conn.attrs.allowed_peers is not None and msg.target not in conn.attrs.allowed_peers:
            return refuse("forbidden", f"your attributes do not allow connecting to {msg.target}")
        nodes = self.directory.nodes_of(msg.target, msg.service)
        if not nodes:
            return refuse("no-such-service",
                          f"{msg.target} does not expose {msg.service!r}"
                          + (f" (it exposes: {', '.join(info.services)})"
                             if info.services else ""))
        if msg.e2e and not (requester_key and info.pubkey):
            return refuse("e2e-unavailable",
                          "end-to-end encryption needs an X25519 key registered for both users")
        if msg.encrypt and conn.attrs.encryption == "off":
            return refuse("bad-request", "you asked for encryption but your encryption is off")
        target_requires = info.encryption == "required"
        requester_requires = conn.attrs.encryption == "required" or msg.encrypt
        p = Pending(
            id=self._next_req, client_req=msg.req, requester_conn=conn.id, requester=user,
            target=msg.target, service=msg.service,
            encrypt=target_requires or requester_requires, e2e=msg.e2e,
            deadline=now + self.settings.request_timeout,
            requester_requires=requester_requires, requester_key=requester_key, nodes=nodes,
            created=now)
        self._next_req += 1
        self.pending[p.id] = p
        conn.pending = p
        conn.state = State.REQUESTING
        if p.encrypt and not conn.encrypted and conn.attrs.encryption != "off":
            if not (requester_requires or self.instructs(conn)):
                # not instructed (as for a local target): the target's node decides as
                # for a requester that cannot encrypt
                p.requester_refused = True
                return self._forward_remote(p)
            p.phase = "encrypt-wait"  # step 12 on this hop, as for a local target
            why = (f"{msg.target} requires encrypted communication" if target_requires
                   else "you asked for encryption: upgrade this connection")
            return [Send(conn.id, m.EncryptInstruct(req=msg.req, reason=why))]
        return self._forward_remote(p)

    def _forward_remote(self, p: Pending) -> list[object]:
        """Send ``p`` to its first candidate node over an idle inter-node link, or ask
        the driver for a new link (pooled: a link is reused once its session ends)."""
        if not p.nodes:
            return self._fail_request(p, "not-logged-in", f"{p.target} is not logged in")
        node = p.nodes[0]
        idle = [c for c in self.conns.values()
                if c.outbound and c.trunk == node and c.state is State.IDLE
                and c.pending is None and self._fits(c, p)]
        if idle:  # a plaintext link first when it will do (it splices)
            return self._send_node_connect(p, min(idle, key=lambda c: c.link_encrypted))
        p.phase = "trunk-wait"
        return [OpenTrunk(node, p.id, tls=p.encrypt)]

    @staticmethod
    def _fits(trunk: Connection, p: Pending) -> bool:
        """Every hop of an encrypted session is encrypted, the inter-node one too."""
        return trunk.link_encrypted or not p.encrypt

    def _send_node_connect(self, p: Pending, trunk: Connection) -> list[object]:
        req_conn = self.conns[p.requester_conn]
        trunk.state = State.REQUESTING
        trunk.pending = p
        p.target_conn = trunk.id
        p.phase = "remote-wait"
        attrs = req_conn.attrs
        return [Send(trunk.id, m.NodeConnect(
            req=p.client_req, requester=p.requester, target=p.target, service=p.service,
            encrypt=p.requester_requires, e2e=p.e2e, requester_key=p.requester_key,
            hop_encrypted=req_conn.encrypted, requester_requires=p.requester_requires,
            encryption="off" if p.requester_refused else attrs.encryption,
            insecure_peer=attrs.insecure_peer, allowed_peers=attrs.allowed_peers,
        ))]

    def trunk_opened(self, cid: int, req: int) -> list[object]:
        """The driver opened (and authenticated) the link asked for by ``OpenTrunk``;
        it was registered with ``connection_made(..., trunk=node)``."""
        trunk = self.conns.get(cid)
        if trunk is None:
            return []
        p = self.pending.get(req)
        if p is not None and p.phase == "trunk-wait" and p.nodes and p.nodes[0] == trunk.trunk \
                and self._fits(trunk, p):
            return self._send_node_connect(p, trunk)
        return self._trunk_idle(trunk)

    def trunk_failed(self, node: str, req: int, why: str) -> list[object]:
        """No link to ``node``: its users are taken as gone until the cluster says
        otherwise, and the request tries the next node that holds its target."""
        out = self._forget_node(node)
        p = self.pending.get(req)
        if p is None or p.phase != "trunk-wait":
            return out
        p.nodes = [n for n in p.nodes if n != node]
        if not p.nodes:
            return out + self._fail_request(
                p, "target-lost", f"{p.target} was at relay node {node}, which is "
                                  f"unreachable ({why})")
        return out + self._forward_remote(p)

    def _trunk_idle(self, trunk: Connection) -> list[object]:
        """A link to a node is free: a request waiting for a link to that node takes it."""
        for p in self.pending.values():
            if p.phase == "trunk-wait" and p.nodes and p.nodes[0] == trunk.trunk \
                    and self._fits(trunk, p):
                return self._send_node_connect(p, trunk)
        return []

    def _finish_trunk(self, trunk: Connection) -> list[object]:
        trunk.state = State.IDLE
        trunk.peer = None
        trunk.pending = None
        trunk.released = trunk.sent_end = False
        out = self._trunk_idle(trunk)
        if out:
            return out
        idle = sum(1 for c in self.conns.values() if c.outbound and c.trunk == trunk.trunk
                   and c.state is State.IDLE and c.pending is None)
        if idle > self.settings.trunk_spares:  # a burst is over: keep the pool small
            return [Close(trunk.id, "spare inter-node link not needed")]
        return []

    def _remote_answer(self, conn: Connection, p: Pending,
                       msg: m.Accept | m.Refuse) -> list[object]:
        """The requester's answer to "the target cannot encrypt, connect anyway?",
        forwarded to the target's node, which decides."""
        if msg.req != p.client_req or p.target_conn is None:
            return self._violation(conn, "answer for an unknown request")
        p.phase = "remote-wait"
        return [Send(p.target_conn, msg)]

    def _trunk_receive(self, trunk: Connection, msg: m.Msg, now: float) -> list[object]:
        """What the target's node answers on a link this node opened."""
        p = trunk.pending
        if isinstance(msg, m.HoldAck):
            return []
        if trunk.state is State.REQUESTING and p is not None:
            if isinstance(msg, m.Result | m.Error) and msg.req == p.client_req:
                ok = isinstance(msg, m.Result) and msg.ok
                if ok:
                    return self._remote_paired(trunk, p, msg)  # type: ignore[arg-type]
                trunk.state = State.IDLE
                trunk.pending = None
                p.target_conn = None
                if msg.code in ("not-logged-in", "cluster-down") and len(p.nodes) > 1:
                    p.nodes.pop(0)  # that node no longer holds the target: the next one
                    return self._forward_remote(p) + self._trunk_idle(trunk)
                return self._fail_request(p, msg.code or "refused",
                                          msg.message or f"{p.target} refused") \
                    + self._trunk_idle(trunk)
            if isinstance(msg, m.Notify) and msg.insecure and p.phase == "remote-wait":
                p.phase = "remote-ask"
                return [Send(p.requester_conn, m.Notify(
                    req=p.client_req, peer=p.target, service=p.service, insecure=True))]
        if trunk.state is State.PAIRED:
            if isinstance(msg, m.End):
                return self._on_End(trunk, msg, now)
            if isinstance(msg, m.Released) and trunk.released:
                peer = self.conns.get(trunk.peer) if trunk.peer is not None else None
                out: list[object] = [Unpair(trunk.id)]
                if peer is not None and peer.peer == trunk.id:
                    out += self._finish_pair(peer)
                return out + self._finish_trunk(trunk)
        text = f"relay node {trunk.trunk} sent {type(msg).__name__} in state {trunk.state.value}"
        if isinstance(msg, m.Error):
            text += f": {msg.message}"
        return [Audit("node-link", False, {"node": trunk.trunk, "why": text}),
                Close(trunk.id, text)]

    def _remote_paired(self, trunk: Connection, p: Pending, msg: m.Result) -> list[object]:
        req_conn = self.conns.get(p.requester_conn)
        self.pending.pop(p.id, None)
        trunk.pending = None
        if req_conn is None or req_conn.pending is not p:  # not expected: cut the link
            return [Close(trunk.id, "requester gone")]
        req_conn.pending = None
        trunk.state = req_conn.state = State.PAIRED
        trunk.peer, req_conn.peer = req_conn.id, trunk.id
        trunk.released = req_conn.released = False
        trunk.sent_end = req_conn.sent_end = False
        if msg.early:  # a request across nodes carries no early data
            msg = msgspec.structs.replace(msg, early=0)
        return [
            Pair(req_conn.id, trunk.id, since=p.created),
            Send(req_conn.id, msg),
            Audit("pair", True, {
                "from": p.requester, "to": p.target, "service": p.service,
                "encrypted": msg.encrypt, "e2e": msg.e2e, "via": trunk.trunk,
                "hops_tls": [req_conn.encrypted, trunk.link_encrypted],
                "conns": [req_conn.id, trunk.id],
            }, soon=True),
        ]

    # -- relay federation: the called side of an inter-node link ---------------------
    def _node_refusal(self, conn: Connection, why: str, now: float) -> list[object]:
        delay = self.throttle.fail_now(conn.addr, "relay-node", now)
        conn.violated = True
        return [
            Audit("node-link", False, {"addr": conn.addr, "why": why}),
            Send(conn.id, m.Error(code="node-auth", message=why), delay=delay),
            Close(conn.id, why, delay=delay),
        ]

    def _on_NodeHello(self, conn: Connection, msg: m.NodeHello, now: float) -> list[object]:
        s = self.settings
        if conn.state is not State.NEW or conn.node_auth is not None:
            return self._violation(conn, "node hello out of place")
        if not s.node or not s.cluster_secret:
            return self._node_refusal(conn, "this relay is not a cluster node", now)
        if msg.node == s.node:
            return self._node_refusal(conn, f"a link from a node named {msg.node} like this "
                                            "one", now)
        nonce = fed.new_nonce()
        conn.node_auth = (msg.node, msg.nonce, nonce)
        return [Send(conn.id, m.NodeChallenge(node=s.node, nonce=nonce, proof=fed.node_proof(
            s.cluster_secret, "callee", s.node, msg.node, msg.nonce, nonce)))]

    def _on_NodeProof(self, conn: Connection, msg: m.NodeProof, now: float) -> list[object]:
        if conn.state is not State.NEW or conn.node_auth is None:
            return self._violation(conn, "node proof without a hello")
        peer, caller_nonce, nonce = conn.node_auth
        expected = fed.node_proof(self.settings.cluster_secret, "caller", peer,
                                  self.settings.node, caller_nonce, nonce)
        if not fed.check_proof(expected, msg.proof):
            return self._node_refusal(conn, f"node {peer} did not prove the cluster secret",
                                      now)
        conn.node_auth = None
        conn.trunk = peer
        conn.link_encrypted = conn.encrypted
        conn.state = State.IDLE
        return [Audit("node-link", True, {"node": peer, "addr": conn.addr, "conn": conn.id,
                                          "tls": conn.encrypted}),
                Send(conn.id, m.NodeWelcome())]

    def _on_NodeConnect(self, conn: Connection, msg: m.NodeConnect, now: float):
        """A request from a user of the calling node: decided here exactly as a local
        one, with this link standing in for the requester's connection."""
        if conn.state is not State.IDLE:
            return self._violation(conn, "node-connect on a busy link")
        conn.user = msg.requester
        conn.requester_key = msg.requester_key
        conn.attrs = m.Attrs(encryption=msg.encryption or "optional",
                             insecure_peer=msg.insecure_peer, allowed_peers=msg.allowed_peers)
        conn.encrypted = conn.link_encrypted and msg.hop_encrypted
        return self._on_ConnectRequest(conn, m.ConnectRequest(
            req=msg.req, target=msg.target, service=msg.service,
            encrypt=msg.requester_requires, e2e=msg.e2e), now)

    # -- relay federation: presence across the cluster --------------------------------
    def presence_info(self, name: str) -> fed.PresenceInfo | None:
        """What the other nodes learn of local user ``name`` (None: not here)."""
        s = self.sessions.get(name)
        if s is None or not s.conns:
            return None
        attrs = s.base_attrs
        services = sorted({sv for c in s.conns for sv in self.conns[c].attrs.services})
        peers = attrs.allowed_peers if attrs and attrs.allowed_peers is not None else \
            s.record.allowed_peers
        return fed.PresenceInfo(
            encryption=self._user_encryption(s), services=tuple(services[:64]),
            connections=len(s.conns),
            notify=(attrs.notify if attrs else None) or s.record.notify,
            notify_users=tuple(attrs.notify_users) if attrs and attrs.notify_users is not None
            else s.record.notify_users,
            allowed_peers=tuple(peers) if peers is not None else None,
            pubkey=s.record.pubkey)

    def local_presence(self) -> dict[str, fed.PresenceInfo]:
        """Every local user, for a full rewrite of this node's entries."""
        out = {}
        for name in self.sessions:
            info = self.presence_info(name)
            if info is not None:
                out[name] = info
        self._published = dict(out)
        return out

    def _publish(self, name: str) -> list[object]:
        if not self.settings.node:
            return []
        info = self.presence_info(name)
        if info == self._published.get(name):
            return []
        if info is None:
            self._published.pop(name, None)
        else:
            self._published[name] = info
        return [PublishPresence(name, info)]

    def _here(self, name: str) -> bool:
        s = self.sessions.get(name)
        return s is not None and bool(s.conns)

    def remote_presence(self, node: str, user: str,
                        info: fed.PresenceInfo | None) -> list[object]:
        """Another node says ``user`` is (``info``) or is no longer there (None);
        local watchers hear of it when it changes the user's cluster-wide presence."""
        if node == self.settings.node:
            return []
        before = self._here(user) or self.directory.online(user)
        old = self.directory.merged(user)
        self.directory.set(node, user, info)
        after = self._here(user) or self.directory.online(user)
        if before == after:
            return []
        shown = info or old
        assert shown is not None
        return self._presence_to(user, after, shown.encryption,
                                 lambda viewer: shown.visible_to(viewer, user))

    def set_directory(self, nodes: dict[str, dict[str, fed.PresenceInfo]]) -> list[object]:
        """Replace what is known of the other nodes (a full read of the cluster state)."""
        out: list[object] = []
        for user in list(self.directory.users):
            for node in list(self.directory.get(user)):
                if user not in nodes.get(node, {}):
                    out += self.remote_presence(node, user, None)
        for node, users in nodes.items():
            for user, info in users.items():
                if self.directory.get(user).get(node) != info:
                    out += self.remote_presence(node, user, info)
        return out

    def _forget_node(self, node: str) -> list[object]:
        out: list[object] = []
        for user in list(self.directory.users):
            if node in self.directory.get(user):
                out += self.remote_presence(node, user, None)
        return out

    def node_gone(self, node: str) -> list[object]:
        """``node`` stopped renewing its entries: its users are gone."""
        return self._forget_node(node)

    def remote_deliver(self, sender: str, target: str, body: bytes) -> list[object]:
        """A broadcast message from a user of another node."""
        s = self.sessions.get(target)
        if s is None or not s.conns:
            return []
        return [Send(self._pick_conn(s, prefer_idle=True), m.Deliver(sender=sender, body=body))]

    def cluster_state(self, up: bool) -> list[object]:
        """The cluster state became reachable (logins and cross-node requests are
        served) or unreachable (refused until it is back)."""
        self.cluster_up = up or not self.settings.node
        return [Audit("cluster", up, {"node": self.settings.node})]

    def fence(self, why: str) -> list[object]:
        """This node's entries have expired in the cluster state while it could not
        renew them: the other nodes no longer know its users, so it lets them all go
        (their terminals move to other nodes) rather than serve users nobody can find."""
        out: list[object] = [Audit("cluster", False, {"node": self.settings.node,
                                                      "why": why, "closed": len(self.conns)})]
        out += [Close(cid, why) for cid in sorted(self.conns)]
        self.directory = fed.Directory()
        self._published.clear()
        return out

    # -- helpers ------------------------------------------------------------------
    def _violation(self, conn: Connection, text: str) -> list[object]:
        # what it sends until the close is ignored (not audited again); its state stays,
        # so that losing it still tells a paired peer
        conn.violated = True
        return [
            Audit("protocol", False, {"conn": conn.id, "user": conn.user, "why": text}),
            Send(conn.id, m.Error(code="protocol", message=text)),
            Close(conn.id, f"protocol violation: {text}"),
        ]

    def _detach(self, conn: Connection, now: float) -> list[object]:
        session = self.sessions.get(conn.user or "")
        if session is None:
            return []
        session.conns.discard(conn.id)
        if session.conns:
            return []
        if session.token_hash in self._tokens:
            expiry = now + self.settings.token_grace
            self._tokens[session.token_hash] = (session.record.name, expiry)
        del self.sessions[session.record.name]
        out: list[object] = [Audit("offline", True, {"user": session.record.name})]
        for p in list(self.waiting.pop(session.record.name, ())):
            if self.pending.get(p.id) is p:  # nobody is left to serve them
                out += self._fail_request(p, "target-lost", f"{p.target} went offline")
        out += self._publish(session.record.name)
        if self.directory.online(session.record.name):
            return out  # still online at another node: nothing changed cluster-wide
        return out + self._presence(session.record, False, session.record.encryption)

    def _allows(self, target: UserSession, requester: str) -> bool:
        peers = target.base_attrs.allowed_peers if target.base_attrs else None
        if peers is None:
            peers = list(target.record.allowed_peers) if target.record.allowed_peers else None
        return peers is None or requester in peers or requester == target.record.name

    def _user_encryption(self, s: UserSession) -> m.Encryption:
        if s.base_attrs and s.base_attrs.encryption:
            return s.base_attrs.encryption
        return s.record.encryption

    def _base_policy(self, s: UserSession) -> str:
        return (s.base_attrs.insecure_peer if s.base_attrs else None) or s.record.insecure_peer

    def _idle_conn(self, s: UserSession | None, exclude: int, service: str = "") -> int | None:
        """An idle connection of ``s`` to notify: one that offers ``service`` when a
        service is named, else preferably one that offers any service (an agent
        rather than the user's own client that happens to be idle)."""
        if s is None:
            return None
        fallback = None
        for cid in sorted(s.conns):
            conn = self.conns[cid]
            if cid == exclude or conn.state is not State.IDLE:
                continue
            if service:
                if service in conn.attrs.services:
                    return cid
            elif conn.attrs.services:
                return cid
            elif fallback is None:
                fallback = cid
        return fallback

    @staticmethod
    def _serves(conn: Connection, service: str) -> bool:
        return not service or service in conn.attrs.services

    def _pick_conn(self, s: UserSession, *, prefer_idle: bool) -> int:
        idle = self._idle_conn(s, exclude=-1)
        if idle is not None and prefer_idle:
            return idle
        # a connection under the session cipher takes no control message
        return min((c for c in s.conns if not self.conns[c].switched), default=min(s.conns))

    def stats(self) -> dict[str, int]:
        states: dict[str, int] = {}
        for c in self.conns.values():
            states[c.state.value] = states.get(c.state.value, 0) + 1
        return {"users": len(self.sessions), "connections": len(self.conns), **states}


_TRUNK_MESSAGES = (m.Hold, m.NodeConnect, m.Accept, m.Refuse, m.End, m.Release, m.StartTLS)


def send_targets(actions: Iterable[object]) -> list[int]:
    """Connection ids that actions send to (test helper)."""
    return [a.conn for a in actions if isinstance(a, Send)]

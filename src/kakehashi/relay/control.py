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
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec

from kakehashi.core.identity import Attempt, LoginThrottle, ThrottleSettings
from kakehashi.relay import messages as m

_ENCODE = msgspec.msgpack.Encoder().encode

Action = "Send | Close | Authenticate | UpgradeTLS | Pair | Unpair | Audit"


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
class Unpair:
    """Stop forwarding data *from* ``conn`` (its release notification arrived)."""

    conn: int


@dataclass(frozen=True, slots=True)
class Audit:
    event: str
    allow: bool
    fields: dict[str, object]


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

    # -- events -------------------------------------------------------------------
    def connection_made(self, addr: str, *, encrypted: bool) -> int:
        cid = self._next_conn
        self._next_conn += 1
        self.conns[cid] = Connection(cid, addr, encrypted)
        return cid

    def tls_established(self, cid: int) -> list[object]:
        conn = self.conns.get(cid)
        if conn is not None:
            conn.encrypted = True
        return []

    def receive(self, cid: int, msg: m.Msg, now: float) -> list[object]:
        conn = self.conns.get(cid)
        if conn is None or conn.state is State.CLOSED or conn.violated:
            return []
        handler = getattr(self, "_on_" + type(msg).__name__, None)
        if conn.state in (State.NEW, State.AUTH) and not isinstance(msg, m.Login | m.StartTLS):
            return self._violation(conn, "login first")
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
            if peer is not None and peer.peer == cid:
                if peer.released:
                    out += self._finish_pair(peer)
                else:
                    peer.peer = None
                    out.append(Send(peer.id, m.End(reason="peer connection lost")))
        if conn.user is not None:
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
        if conn.state is not State.NEW:
            return self._violation(conn, "already logged in")
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
            reason = ("too many failed logins from your address" if attempt == "lockout"
                      else "the server is busy checking other logins; try again later")
            return [
                Audit("login", False, {"user": msg.user, "addr": conn.addr, "why": attempt}),
                Send(conn.id, m.LoginFail(reason=reason)),
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
                ),
            ),
        ]
        if first:
            out += self._presence(record, True, conn.attrs.encryption or "optional")
        return out + self._became_idle(conn)

    def _on_SetAttrs(self, conn: Connection, msg: m.SetAttrs, now: float) -> list[object]:
        session = self.sessions[conn.user]  # type: ignore[index]
        is_base = session.base_attrs is conn.attrs
        conn.attrs = self._effective(session.record, msg.attrs)
        if is_base or session.base_attrs is None:  # para 0029: sent after the positive reply
            session.base_attrs = conn.attrs
        return []

    def _on_StartTLS(self, conn: Connection, msg: m.StartTLS, now: float) -> list[object]:
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
        for name in sorted(n for n in self.sessions if n > msg.after):
            s = self.sessions[name]
            if not s.conns or not _visible(s.record, conn.user or "", s.base_attrs):
                continue
            services = sorted({sv for c in s.conns for sv in self.conns[c].attrs.services})
            info = m.UserInfo(user=name, encryption=self._user_encryption(s),
                              services=services[:64], connections=len(s.conns))
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
        out: list[object] = []
        for cid in list(self.subscribers):
            c = self.conns.get(cid)
            if c is None:
                self.subscribers.discard(cid)
                continue
            if c.user and c.user != record.name and _visible(record, c.user, attrs):
                out.append(Send(c.id, m.Presence(user=record.name, online=online, encryption=enc)))
        return out

    def _on_Broadcast(self, conn: Connection, msg: m.Broadcast, now: float) -> list[object]:
        out: list[object] = []
        delivered, missing = [], []
        for target in dict.fromkeys(msg.targets):
            s = self.sessions.get(target)
            if (not s or not s.conns or not _visible(s.record, conn.user or "", s.base_attrs)
                    or not self._allows(s, conn.user or "")):
                missing.append(target)
                continue
            dest = self._pick_conn(s, prefer_idle=True)
            out.append(Send(dest, m.Deliver(sender=conn.user or "", body=msg.body)))
            delivered.append(target)
        out.append(Send(conn.id, m.BroadcastResult(delivered=delivered, missing=missing)))
        return out

    # -- connection request (Figs. 3 and 4) ---------------------------------------
    def _on_ConnectRequest(self, conn: Connection, msg: m.ConnectRequest, now: float):
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
        requester = self.sessions[conn.user]  # type: ignore[index]
        target = self.sessions.get(msg.target)
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
        if msg.e2e and not (requester.record.pubkey and target.record.pubkey):
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
        )
        self._next_req += 1
        self.pending[p.id] = p
        conn.pending = p
        conn.state = State.REQUESTING
        if p.encrypt and not conn.encrypted:
            # both hops must be encrypted (para 0017): step 12 for Fig. 3, and for Fig. 4
            # when the requester asked for encryption on a plaintext connection
            if conn.attrs.encryption != "off":
                p.phase = "encrypt-wait"  # step 12: instruct the requester, wait for 13
                why = (f"{msg.target} requires encrypted communication" if target_requires
                       else "you asked for encryption: upgrade this connection")
                return [Send(conn.id, m.EncryptInstruct(req=msg.req, reason=why))]
            return self._requester_cannot_encrypt(p, target)
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

    def _requester_cannot_encrypt(self, p: Pending, target: UserSession) -> list[object]:
        """Para 0037: refuse, or ask the target whether to connect anyway."""
        if target.record.insecure_peer == "ask" or self._base_policy(target) == "ask":
            p.insecure = True
            p.encrypt = False
            return self._notify_target(p)
        return self._fail_request(
            p, "encryption-required",
            f"{p.target} requires encryption and this connection cannot encrypt",
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
        target = self.sessions.get(p.target)
        if target is None:
            return self._fail_request(p, "not-logged-in", f"{p.target} is not logged in")
        return self._requester_cannot_encrypt(p, target)

    def _notify_target(self, p: Pending) -> list[object]:
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
        if p.encrypt and not tconn.encrypted and tconn.attrs.encryption == "off":
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

    def _send_notify(self, p: Pending, tconn: Connection) -> list[object]:
        requester = self.sessions[p.requester]
        p.target_conn = tconn.id
        p.phase = "target-wait"
        tconn.state = State.NOTIFIED
        tconn.pending = p
        return [Send(tconn.id, m.Notify(
            req=p.id, peer=p.requester, service=p.service, encrypt=p.encrypt, e2e=p.e2e,
            peer_key=requester.record.pubkey if p.e2e else "", insecure=p.insecure,
        ))]

    def _on_Accept(self, conn: Connection, msg: m.Accept, now: float) -> list[object]:
        p = conn.pending
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
        return [
            Pair(req_conn.id, conn.id, since=p.created),
            Send(req_conn.id, m.Result(
                req=p.client_req, ok=True, peer=p.target, encrypt=p.encrypt, e2e=p.e2e,
                peer_key=target.record.pubkey if p.e2e else "",
            )),
            Audit("pair", True, {
                "from": p.requester, "to": p.target, "service": p.service,
                "encrypted": p.encrypt, "e2e": p.e2e,
                "insecure_ok": p.insecure or p.insecure_ok,
                "hops_tls": [req_conn.encrypted, conn.encrypted],
                "conns": [req_conn.id, conn.id],
            }),  # written after the result is on its way (off the setup path)
        ]

    def _on_Refuse(self, conn: Connection, msg: m.Refuse, now: float) -> list[object]:
        p = conn.pending
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
            if tconn is not None and tconn.pending is p:
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
            if p.target_conn is not None and p.target_conn in self.conns:
                self._keep_cancelled(p)  # keep until the target replies
            else:
                p.cancelled = True
            return [Audit("connect", False, {"from": p.requester, "to": p.target,
                                             "why": "requester lost"})]
        p.target_conn = None
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
        if peer is None or peer.released or peer.peer != conn.id:
            out += self._finish_pair(conn)
            if peer is not None and peer.peer == conn.id:
                out += self._finish_pair(peer)
        return out

    def _finish_pair(self, conn: Connection) -> list[object]:
        conn.state = State.IDLE
        conn.peer = None
        conn.released = conn.sent_end = False
        return [Send(conn.id, m.Released()), *self._became_idle(conn)]

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
        return idle if idle is not None and prefer_idle else min(s.conns)

    def stats(self) -> dict[str, int]:
        states: dict[str, int] = {}
        for c in self.conns.values():
            states[c.state.value] = states.get(c.state.value, 0) + 1
        return {"users": len(self.sessions), "connections": len(self.conns), **states}


def send_targets(actions: Iterable[object]) -> list[int]:
    """Connection ids that actions send to (test helper)."""
    return [a.conn for a in actions if isinstance(a, Send)]

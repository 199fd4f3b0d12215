"""The terminal's side of one relay connection, sans-IO (spec 000, section 4.5).

A :class:`TerminalConn` tracks one connection of a terminal (agent or client):
logged in or not, idle or bound to a peer, encrypted or not. Local calls
(:meth:`connect`, :meth:`accept`, :meth:`end` ...) return the control messages to
send; :meth:`receive` turns a message from the relay into an *event* for the
application. Calls that make no sense in the current state raise
:class:`LocalProtocolError`; messages from the relay that make no sense raise
:class:`RemoteProtocolError` (the driver then closes the connection).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kakehashi.relay import messages as m


class LocalProtocolError(Exception):
    pass


class RemoteProtocolError(Exception):
    pass


class TState(enum.Enum):
    NEW = "new"
    LOGIN_SENT = "login-sent"
    IDLE = "idle"
    REQUESTING = "requesting"
    NOTIFIED = "notified"
    PAIRED = "paired"
    RELEASING = "releasing"
    CLOSED = "closed"


# -- events for the application ---------------------------------------------------
@dataclass(frozen=True)
class LoggedIn:
    conn_id: int
    token: str
    encryption: str
    keepalive: float
    dead_after: float
    #: ``LoginOk.plain_requests``: no request from this link that does not ask for
    #: encryption becomes an encrypted session (early data may cross its plaintext hop)
    plain_requests: bool = False


@dataclass(frozen=True)
class LoginFailed:
    reason: str
    code: str = ""


@dataclass(frozen=True)
class EncryptionInstructed:
    """Step 12: the target requires encryption. Call accept_encryption/refuse_encryption
    (after a STARTTLS upgrade if this connection is plaintext)."""

    req: int
    reason: str


@dataclass(frozen=True)
class IncomingRequest:
    """Steps 14/32: somebody asks for this terminal; call accept() or refuse()."""

    req: int
    peer: str
    service: str
    encrypt: bool
    e2e: bool
    peer_key: str
    insecure: bool
    #: the relay's session cipher (:data:`messages.CIPHER_SESSION`) and this side's
    #: send key then receive key, if the session runs under it once accepted
    cipher: str = ""
    keys: bytes = b""
    #: optimistic pairing (``Notify.optimistic``): accept at once, then connect the
    #: service; ``early_data``: the requester's first bytes (sealed under the session
    #: cipher), for the service once accepted, dropped with a refusal
    optimistic: bool = False
    early_data: bytes = b""


@dataclass(frozen=True)
class AskInsecure:
    """Para 0037: the target cannot encrypt; do we connect anyway? accept()/refuse()."""

    req: int
    peer: str


@dataclass(frozen=True)
class Connected:
    """Steps 16/34: the pairing is recorded; bytes may flow."""

    peer: str
    encrypt: bool
    e2e: bool
    peer_key: str
    initiator: bool
    #: bytes of this side's early data the relay forwarded (the requester skips them)
    early: int = 0
    #: as in :class:`IncomingRequest`
    cipher: str = ""
    keys: bytes = b""


@dataclass(frozen=True)
class ConnectFailed:
    code: str
    message: str


@dataclass(frozen=True)
class PeerEnded:
    reason: str


@dataclass(frozen=True)
class ReleasedEvent:
    pass


@dataclass(frozen=True)
class RequestCrossed:
    """A notification crossed this connection's own request (``req``), decided by
    :func:`messages.crossing_request_wins` exactly as the relay decides it.

    ``incoming`` None: our request won; the notification is void and needs no reply.
    Otherwise our request is withdrawn (the relay answers it ``crossed``; retry it on
    another connection) and ``incoming`` is to be answered like any notification.
    """

    req: int
    target: str
    incoming: IncomingRequest | None


@dataclass(frozen=True)
class Other:
    """Who lists, presence notices, broadcast deliveries, keepalive replies, TLS go."""

    msg: m.Msg


class TerminalConn:
    def __init__(self) -> None:
        self.state = TState.NEW
        self.encrypted = False
        self.conn_id = 0
        self.peer: str | None = None
        self.encrypt_session = False
        self.req: int | None = None
        self._next_req = 1
        self._sent_end = False
        self._sent_release = False
        self._hold_seq = 0
        self.acked_seq = 0
        self.user = ""
        #: our request withdrawn by a crossing: the relay's "crossed" answer to it
        self._withdrawn: int | None = None
        #: this connection's encryption attribute as the relay applies it (login)
        self.encryption: m.Encryption = "optional"
        #: bytes of early data sent with the pending request
        self._early = 0
        #: the current session's relay-issued keys: the relay's close_notify on this
        #: connection now means "leave TLS" (:attr:`leaving_tls`)
        self.session_keys: bytes | None = None
        #: TLS has ended and the session cipher carries the session: every control
        #: message from here on is unauthenticated, and refused
        self.switched = False
        #: this connection offered the session cipher at login
        self.offers_session_cipher = False
        #: this connection offered optimistic pairing at login (:data:`m.CAP_OPTIMISTIC`)
        self.offers_optimistic = False
        #: this connection listed :data:`m.CAP_PLAIN_REQUESTS` at login
        self.offers_plain_requests = False
        #: the relay said at login that it never instructs this plaintext connection
        #: to encrypt (``LoginOk.plain_requests``)
        self.plain_requests = False

    # -- local calls --------------------------------------------------------------
    def _expect(self, *states: TState) -> None:
        if self.state not in states:
            raise LocalProtocolError(f"not allowed in state {self.state.value}")

    def login(self, user: str, password: str = "", token: str = "",
              attrs: m.Attrs | None = None, agent: str = "") -> list[m.Msg]:
        self._expect(TState.NEW)
        self.state = TState.LOGIN_SENT
        self.user = user
        self.offers_session_cipher = attrs is not None and m.CIPHER_SESSION in attrs.ciphers
        self.offers_optimistic = attrs is not None and m.CAP_OPTIMISTIC in attrs.ciphers
        self.offers_plain_requests = attrs is not None \
            and m.CAP_PLAIN_REQUESTS in attrs.ciphers
        return [m.Login(user=user, password=password, token=token, attrs=attrs, agent=agent)]

    def tls_established(self) -> None:
        self.encrypted = True

    @property
    def leaving_tls(self) -> bool:
        """A TLS end on this connection now is the relay leaving TLS for the session
        cipher (answer with our close_notify and go on in plain TCP), not a lost link."""
        return self.session_keys is not None and self.state is TState.PAIRED \
            and not self.switched

    def tls_left(self) -> None:
        """Both close_notify are through: only sealed frames are accepted from now on."""
        if not self.leaving_tls:
            raise LocalProtocolError("not leaving TLS")
        self.switched = True

    def hold(self) -> list[m.Msg]:
        if self.state in (TState.NEW, TState.CLOSED):
            return []
        self._hold_seq += 1
        return [m.Hold(seq=self._hold_seq)]

    def early_data_allowed(self, *, encrypt: bool = False, e2e: bool = False) -> bool:
        """Whether a request may carry the requester's first bytes (early data).

        Only where they cannot cross a plaintext hop of a session that has to be
        encrypted: on an encrypted connection, or on one that is never told to
        encrypt for a request that does not ask for it - its encryption is off, or
        the relay said so at login (``LoginOk.plain_requests``: it cannot upgrade the
        connection, or its policy refuses such a requester) - so a target that
        requires encryption refuses it (para 0037) and the relay drops the bytes. A
        plaintext connection that could still be told to encrypt (step 12) waits for
        the result, as does end-to-end mode (its bytes are sealed with keys agreed
        after the pairing).
        """
        if e2e:
            return False
        never_told = self.encryption == "off" or (
            self.plain_requests and self.encryption != "required")
        return self.encrypted or (never_told and not encrypt)

    def connect(self, target: str, service: str = "", *, encrypt: bool = False,
                e2e: bool = False, early: bytes = b"") -> list[m.Msg]:
        """The connection request (step 11); ``early``: the requester's first bytes,
        sent with it when :meth:`early_data_allowed` (``Connected.early`` says how
        many the relay forwarded)."""
        self._expect(TState.IDLE)
        self.state = TState.REQUESTING
        self.req = self._next_req
        self._next_req += 1
        self.peer = target
        if not self.early_data_allowed(encrypt=encrypt, e2e=e2e):
            early = b""
        early = early[: m.EARLY_DATA_MAX]
        self._early = len(early)
        return [m.ConnectRequest(req=self.req, target=target, service=service,
                                 encrypt=encrypt, e2e=e2e, data=early)]

    def accept_encryption(self) -> list[m.Msg]:
        self._expect(TState.REQUESTING)
        if not self.encrypted:
            raise LocalProtocolError("upgrade to TLS (STARTTLS) before accepting encryption")
        return [m.EncryptAccept(req=self.req or 0)]

    def refuse_encryption(self, reason: str = "cannot encrypt") -> list[m.Msg]:
        self._expect(TState.REQUESTING)
        return [m.EncryptRefuse(req=self.req or 0, reason=reason)]

    def accept(self) -> list[m.Msg]:
        if self.state is TState.REQUESTING:  # answering AskInsecure
            return [m.Accept(req=self.req or 0)]
        self._expect(TState.NOTIFIED)
        if self.encrypt_session and not self.encrypted:
            raise LocalProtocolError("the relay instructed encryption: STARTTLS first")
        self.state = TState.PAIRED
        self._sent_end = self._sent_release = False
        return [m.Accept(req=self.req or 0)]

    def refuse(self, reason: str = "") -> list[m.Msg]:
        if self.state is TState.REQUESTING:
            return [m.Refuse(req=self.req or 0, reason=reason)]
        self._expect(TState.NOTIFIED)
        self.session_keys = None
        self.state = TState.IDLE
        self.peer = None
        return [m.Refuse(req=self.req or 0, reason=reason)]

    def end(self, reason: str = "") -> list[m.Msg]:
        """End notification (26/44) followed by this side's release (28/46)."""
        self._expect(TState.PAIRED, TState.RELEASING)
        out: list[m.Msg] = []
        if not self._sent_end:
            self._sent_end = True
            out.append(m.End(reason=reason))
        out += self.release()
        return out

    def release(self) -> list[m.Msg]:
        self._expect(TState.PAIRED, TState.RELEASING)
        if self._sent_release:
            return []
        self._sent_release = True
        self.state = TState.RELEASING
        return [m.Release()]

    def logout(self) -> list[m.Msg]:
        self.state = TState.CLOSED
        return [m.Logout()]

    def starttls(self) -> list[m.Msg]:
        if self.encrypted:
            raise LocalProtocolError("already encrypted")
        return [m.StartTLS()]

    # -- from the relay -----------------------------------------------------------
    def receive(self, msg: m.Msg) -> object:
        st = self.state
        if self.switched:
            # no TLS on this hop any more: whatever the relay (or anyone on the path)
            # sends as a control message is unauthenticated; the session is aborted
            raise RemoteProtocolError(f"{type(msg).__name__} after the session cipher took "
                                      "over (unauthenticated; session aborted)")
        if isinstance(msg, m.LoginOk) and st is TState.LOGIN_SENT:
            self.state = TState.IDLE
            if msg.plain_requests and (self.encrypted or not self.offers_plain_requests):
                raise RemoteProtocolError("the relay said plain_requests on a connection "
                                          "that is encrypted or did not ask for it")
            self.conn_id = msg.conn_id
            self.encryption = msg.encryption
            self.plain_requests = msg.plain_requests
            return LoggedIn(msg.conn_id, msg.token, msg.encryption, msg.keepalive,
                            msg.dead_after, msg.plain_requests)
        if isinstance(msg, m.LoginFail) and st is TState.LOGIN_SENT:
            self.state = TState.CLOSED
            return LoginFailed(msg.reason, msg.code)
        if isinstance(msg, m.HoldAck):
            self.acked_seq = max(self.acked_seq, msg.seq)
            return Other(msg)
        if isinstance(msg, m.EncryptInstruct) and st is TState.REQUESTING:
            if self._early and not self.encrypted:
                # early data crossed this plaintext hop on the relay's word that no
                # request of ours would be told to encrypt (plain_requests)
                raise RemoteProtocolError("encryption instruction for a request that "
                                          "carried early data on a plaintext connection")
            return EncryptionInstructed(msg.req, msg.reason)
        if isinstance(msg, m.Notify):
            if st is TState.REQUESTING and msg.insecure and msg.req == self.req:
                return AskInsecure(msg.req, msg.peer)
            if st is TState.REQUESTING:
                return self._crossed(msg)
            if st is TState.IDLE:
                return self._notified(msg)
        if isinstance(msg, m.Result) and st is TState.REQUESTING and msg.req == self.req:
            if msg.ok:
                if msg.early > self._early:
                    raise RemoteProtocolError(
                        f"the relay forwarded {msg.early} bytes of early data; "
                        f"{self._early} were sent")
                self.state = TState.PAIRED
                self.encrypt_session = msg.encrypt
                self._sent_end = self._sent_release = False
                self.session_keys = self._issued(msg.cipher, msg.keys, msg.e2e)
                return Connected(msg.peer, msg.encrypt, msg.e2e, msg.peer_key, True,
                                 msg.early, msg.cipher if self.session_keys else "",
                                 self.session_keys or b"")
            self.state = TState.IDLE
            self.peer = None
            return ConnectFailed(msg.code, msg.message)
        if isinstance(msg, m.Error) and msg.req == self._withdrawn and msg.code == "crossed":
            self._withdrawn = None
            return Other(msg)  # the answer to a request already given up
        if isinstance(msg, m.Error) and st is TState.REQUESTING and msg.req == self.req:
            self.state = TState.IDLE
            self.peer = None
            return ConnectFailed(msg.code, msg.message)
        if isinstance(msg, m.End):
            self.session_keys = None  # ended inside TLS (a request given up): no switch
            if st in (TState.PAIRED, TState.RELEASING):
                self._sent_end = True  # no need to echo the end notification
                return PeerEnded(msg.reason)
            if st is TState.NOTIFIED:
                # nothing is paired yet (a relay ends a request given up only after
                # our accept): a relay that says otherwise is broken or hostile
                raise RemoteProtocolError("end notification for a connection request "
                                          "that was not accepted")
            return Other(msg)
        if isinstance(msg, m.Released) and st is TState.RELEASING:
            self.session_keys = None
            self.state = TState.IDLE
            self.peer = None
            return ReleasedEvent()
        if isinstance(msg, m.WhoList | m.Presence | m.Deliver | m.BroadcastResult | m.TLSGo):
            return Other(msg)
        if isinstance(msg, m.Error):
            return Other(msg)
        raise RemoteProtocolError(f"unexpected {type(msg).__name__} in state {st.value}")

    def _notified(self, msg: m.Notify) -> IncomingRequest:
        self.state = TState.NOTIFIED
        self.req = msg.req
        self.peer = msg.peer
        self.encrypt_session = msg.encrypt
        self.session_keys = self._issued(msg.cipher, msg.keys, msg.e2e)
        if (msg.optimistic or msg.data) and not self.offers_optimistic:
            raise RemoteProtocolError("the relay sent an optimistic notification to a "
                                      "terminal that did not offer it")
        if msg.data and not msg.optimistic:
            raise RemoteProtocolError("early data with a notification that is not optimistic")
        return IncomingRequest(msg.req, msg.peer, msg.service, msg.encrypt, msg.e2e,
                               msg.peer_key, msg.insecure,
                               msg.cipher if self.session_keys else "",
                               self.session_keys or b"", msg.optimistic, bytes(msg.data))

    def _issued(self, cipher: str, keys: bytes | None, e2e: bool) -> bytes | None:
        """Session keys from the relay, checked: only the cipher this terminal offered,
        only on a TLS connection (they must never cross a hop in the clear)."""
        if not cipher and keys is None:
            return None
        if cipher != m.CIPHER_SESSION or keys is None or not self.encrypted or e2e \
                or not self.offers_session_cipher:
            raise RemoteProtocolError(f"the relay issued session keys ({cipher!r}) this "
                                      "terminal cannot take here")
        return bytes(keys)

    def _crossed(self, msg: m.Notify) -> RequestCrossed:
        own, target = self.req or 0, self.peer or ""
        if m.crossing_request_wins(self.user, msg.peer, target):
            return RequestCrossed(own, target, None)
        self._withdrawn = own
        return RequestCrossed(own, target, self._notified(msg))

"""Terminal side of the relay: links, the spare-connection pool, and sessions.

* :class:`RelayLink` - one logged-in connection to the relay, driving a
  :class:`TerminalConn`; one reader task runs the core pump's ``forward_frames``
  so control messages and session data share the connection (keepalives go on
  during a session, and a released connection is reused, not reopened).
* :class:`Terminal` - a user's pool: it keeps ``spares`` idle links (refilled when
  one is paired, steps 17-21), reconnects with exponential backoff and jitter, and
  offers :meth:`Terminal.connect` (request by user ID) and incoming-request dispatch.
* :func:`run_session` - moves an application stream over a paired link (optionally
  sealed end to end) and performs the end/release handshake (steps 26-28').
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import msgspec

from kakehashi.core import crypto, tlsmismatch, trace, wire
from kakehashi.core.pump import (
    DiscardSink,
    FrameSink,
    PeerClosed,
    RawSink,
    Transfer,
    UnsealedEnd,
    forward_frames,
    open_end,
    raw_to_frames,
    seal_close,
)
from kakehashi.core.stream import (
    Conn,
    ConnClosed,
    DirectTLSConn,
    FramedConn,
    TLSConn,
    keep_alive,
    open_tcp,
    start_tls,
)
from kakehashi.core.tls import SessionCache
from kakehashi.relay import messages as m
from kakehashi.relay import terminal as t

log = logging.getLogger("kakehashi.relay.agent")

#: idle links beyond twice the spare count are closed after resting this long
TRIM_AFTER = 30.0
#: how long the pool waits, while a spare is left, before refilling
SETTLE = 0.25
#: how long after a session first carried bytes both ways its setup counts as over
#: (:meth:`Session.carried`): the first reply is then still crossing the relay and the
#: other terminal (the setup trace, docs/benchmarks.md: a replacement link opened at
#: once put its TLS handshake on the relay ahead of that reply, ~1-2 ms)
SETUP_GRACE = 0.02


#: failures that retrying cannot cure until the user changes something: a client that
#: never got in stops with the message instead of retrying forever
FATAL_CODES = frozenset({"login-failed", "tls-mismatch"})
#: refusals that say "not this server, maybe another": a terminal given several
#: servers moves on to the next one at once
FAILOVER_CODES = frozenset({"cluster-down"})
#: request failures :meth:`Terminal.connect` retries on another link: nothing of the
#: request reached a service. Never ``target-lost-early`` (the target may have written
#: the early data to its service) nor ``closed-with-early-data`` (the link was lost
#: after its request carried early data, which the relay may have forwarded): a retry
#: would deliver those bytes twice
RETRIED_CODES = frozenset({"target-lost", "closed", "crossed"})


#: why a session ended when its link did (not a reason its peer gave)
LINK_LOST = "connection to the relay lost"


class RelayError(Exception):
    """A refusal or failure reported by the relay; ``code`` is stable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} [{code}]")
        self.code = code
        self.message = message


@dataclass
class TerminalConfig:
    server: str
    port: int
    user: str
    password: str
    tls: ssl.SSLContext | None = None
    server_hostname: str | None = None
    #: context used for a STARTTLS upgrade when ``tls`` is None
    starttls: ssl.SSLContext | None = None
    attrs: m.Attrs = field(default_factory=m.Attrs)
    spares: int = 2
    keepalive: float | None = None  # None: the relay's value
    connect_timeout: float = 10.0
    identity: crypto.X25519PrivateKey | None = None
    peer_keys: dict[str, str] = field(default_factory=dict)
    #: answer to "the peer cannot encrypt, connect anyway?" (para 0037)
    insecure_ok: bool = False
    agent_name: str = "kakehashi"
    #: every server to use, in order (the nodes of a cluster); empty: ``server:port``
    servers: list[tuple[str, int]] = field(default_factory=list)
    #: send the application's first bytes with a connection request (early data)
    early_data: bool = m.EARLY_DATA
    #: offer the relay's session cipher (:data:`messages.CIPHER_SESSION`) on links
    #: that can leave TLS in place
    session_cipher: bool = m.SESSION_CIPHER
    #: offer optimistic pairing (:data:`messages.CAP_OPTIMISTIC`): as a target, accept
    #: before the local service is connected
    optimistic: bool = m.OPTIMISTIC
    #: TLS session resumption (``--tls-resume``): a terminal's links after the first
    #: offer the session of the latest one (:attr:`Terminal.tls_sessions`)
    tls_resume: bool = True

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return self.servers or [(self.server, self.port)]

    @property
    def can_encrypt(self) -> bool:
        return self.attrs.encryption != "off" and (self.tls or self.starttls) is not None


def _frames(msgs: list[m.Msg]) -> bytes:
    """``msgs`` as the frames of one write (an end and a release reach the relay in
    one segment: one wake-up and one read there, not two)."""
    return b"".join(m.TERMINAL_CODEC.encode(msg) for msg in msgs)


class RelayLink:
    """One connection to the relay (see module docstring)."""

    def __init__(self, cfg: TerminalConfig, owner: Terminal | None = None,
                 addr: tuple[str, int] | None = None) -> None:
        self.cfg = cfg
        self.owner = owner
        self.host, self.port = addr or (cfg.server, cfg.port)
        self.t = t.TerminalConn()
        self.framed: FramedConn | None = None
        self.sink: FrameSink | None = None
        self.reader: asyncio.Task[None] | None = None
        self.keeper: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self.token = ""
        self.keepalive = 15.0
        self.dead_after = 45.0
        self._waiter: asyncio.Future[object] | None = None
        self._tls_ready: asyncio.Event | None = None
        self._upgrade = False
        self.session: Session | None = None
        self.reserved = False
        self.idle_since = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        #: the link ended on a failed check under the session cipher (forged, tampered,
        #: replayed or unauthenticated input): the session was aborted, not ended
        self.aborted = False
        #: the peer closed the session with this reason (:class:`PeerClosed`, a sealed
        #: close under the session cipher): it could not set its side up
        self.close_reason = ""
        #: the peer's end notification came before :func:`run_session` took the link
        #: (its reason), and the relay's release reply (a session that closed at once)
        self.ended_early: str | None = None
        self.released_early = False
        #: the relay's error without a request id (it rejected what this link sent and
        #: closes it): a request then failed for that, not for a lost link
        self.relay_error: m.Error | None = None

    @property
    def tls_sessions(self) -> SessionCache | None:
        """Where this link's TLS session comes from and goes (its terminal's)."""
        return self.owner.tls_sessions if self.owner is not None else None

    # -- setup --------------------------------------------------------------------
    async def open(self, token: str = "") -> t.LoggedIn:
        cfg = self.cfg
        conn = await open_tcp(self.host, self.port, timeout=cfg.connect_timeout)
        where = f"{self.host}:{self.port}"
        step = "TLS handshake"  # what the relay has to answer next (for a timeout)
        try:
            if cfg.tls is not None:
                try:
                    conn = await start_tls(conn, cfg.tls, server_side=False,
                                           server_hostname=cfg.server_hostname or self.host,
                                           timeout=cfg.connect_timeout, framed=True,
                                           sessions=self.tls_sessions)
                except ssl.SSLCertVerificationError as exc:
                    raise RelayError("tls", f"cannot verify the relay's certificate: "
                                     f"{exc.verify_message}; pass --ca with the relay's CA "
                                     "certificate") from None
                except (ssl.SSLError, ConnectionError, ConnClosed) as exc:
                    if tlsmismatch.server_speaks_plaintext(exc):
                        raise RelayError("tls-mismatch", tlsmismatch.TLSMismatch(
                            where, server_tls=False).message) from None
                    raise RelayError("tls", f"TLS handshake with {where} failed ({exc}); if "
                                     "the relay runs with --tls off, use --tls off here too"
                                     ) from None
            self.framed = framed = FramedConn(conn)
            self.t.encrypted = conn.encrypted
            step = "greeting"
            # every step within the connect timeout, its sends too (a relay that reads
            # nothing is named below, as one that does not answer)
            async with asyncio.timeout(cfg.connect_timeout):
                await framed.send(wire.PREAMBLE)
            try:
                await asyncio.wait_for(framed.read_preamble(), cfg.connect_timeout)
            except (ConnClosed, ConnectionError) as exc:
                hint = ("; the relay speaks TLS by default: drop --tls off"
                        if cfg.tls is None else "")
                raise RelayError("closed", f"{where} closed the connection ({exc}){hint}"
                                 ) from None
            except wire.WireError as exc:
                if exc.code == "tls-mismatch":  # its first bytes were a TLS record
                    raise RelayError("tls-mismatch", tlsmismatch.TLSMismatch(
                        where, server_tls=True).message) from None
                raise RelayError("protocol", f"{where}: {exc.message}") from None
            if not conn.encrypted and cfg.attrs.encryption == "required":
                step = "STARTTLS"
                await self._starttls_inline()
            step = "login"
            attrs = cfg.attrs
            offers = [m.CIPHER_SESSION] if cfg.session_cipher and isinstance(
                conn, DirectTLSConn) and conn.can_leave_tls else []
            if cfg.optimistic:
                offers.append(m.CAP_OPTIMISTIC)
            if not conn.encrypted:  # LoginOk.plain_requests: early data on this link
                offers.append(m.CAP_PLAIN_REQUESTS)
            if offers:
                attrs = msgspec.structs.replace(attrs, ciphers=[
                    *(attrs.ciphers or [m.CIPHER_TLS]), *offers])
            async with asyncio.timeout(cfg.connect_timeout):
                await framed.send(_frames(self.t.login(cfg.user, cfg.password, token, attrs,
                                                       cfg.agent_name)))
            while True:
                frame = await asyncio.wait_for(framed.read_frame(), cfg.connect_timeout)
                if frame is None:
                    raise RelayError("closed", "the relay closed the connection during login")
                if frame.type is not wire.FrameType.CTRL:
                    raise RelayError("protocol", "unexpected data during login")
                ev = self.t.receive(m.TERMINAL_CODEC.decode(frame.payload))
                if isinstance(ev, t.LoginFailed):
                    raise RelayError(ev.code or "login-failed", ev.reason)
                if isinstance(ev, t.LoggedIn):
                    break
        except BaseException as exc:
            conn.close()
            if self.framed:
                self.framed.conn.close()
            if isinstance(exc, TimeoutError):  # (bare, it said nothing: "cannot connect to pi: ")
                raise RelayError("timeout", f"{where} took the connection but did not answer "
                                 f"the {step} within {cfg.connect_timeout:g}s: check that it "
                                 "is a kakehashi relay (--server), and that it is running and "
                                 "not overloaded") from None
            if isinstance(exc, ConnClosed | wire.WireError | OSError):
                # (raw, a ConnClosed reached `relay pipe` and `relay connect` as a
                # traceback, and a reset said nothing of which server)
                why = exc.message if isinstance(exc, wire.WireError) else str(exc)
                raise RelayError("protocol" if isinstance(exc, wire.WireError) else "closed",
                                 f"{where} during the {step}: {why}") from None
            raise
        conn = self.framed.conn  # (after an inline STARTTLS, the TLS one)
        if isinstance(conn, TLSConn):
            conn.keep_session()  # the relay's tickets came before its login reply
            log.debug("link %s to %s: %s, session reused: %s", self.t.conn_id, where,
                      conn.tls_version, conn.resumed)
            trace.event("link TLS resumed" if conn.resumed else "link TLS full")
        self.token = ev.token
        self.keepalive = cfg.keepalive or ev.keepalive
        if self.keepalive >= ev.dead_after / 2:
            log.warning("keepalive %.1fs is too long for this relay (it drops connections "
                        "silent for %.0fs); using %.1fs", self.keepalive, ev.dead_after,
                        ev.keepalive)
            self.keepalive = ev.keepalive
        self.dead_after = max(ev.dead_after, self.keepalive * 3)
        self.idle_since = asyncio.get_running_loop().time()
        self.reader = asyncio.create_task(self._read_loop())
        self.keeper = asyncio.create_task(self._keepalive())
        return ev

    async def _starttls_inline(self) -> None:
        """Upgrade before login (a user whose encryption is pre-registered)."""
        assert self.framed is not None
        ctx = self.cfg.starttls
        if ctx is None:
            raise RelayError("no-tls", "encryption required but no TLS context configured")
        async with asyncio.timeout(self.cfg.connect_timeout):  # (open() names the step)
            await self.framed.send(_frames(self.t.starttls()))
        frame = await asyncio.wait_for(self.framed.read_frame(), self.cfg.connect_timeout)
        if frame is None or not isinstance(
            self.t.receive(m.TERMINAL_CODEC.decode(frame.payload)), t.Other
        ):
            raise RelayError("protocol", "relay did not accept STARTTLS")
        self.framed.conn = await start_tls(
            self.framed.conn, ctx, server_side=False,
            server_hostname=self.cfg.server_hostname or self.host, framed=True,
            sessions=self.tls_sessions)
        self.t.tls_established()

    async def starttls(self) -> None:
        """STARTTLS on a live link (the reader performs the switch on TLSGo)."""
        if self.t.encrypted:
            return
        if self.cfg.starttls is None:
            raise RelayError("no-tls", "no TLS context for STARTTLS")
        self._tls_ready = asyncio.Event()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.connect_timeout  # the send within it too
        await self._send(self.t.starttls(), "STARTTLS")
        async with asyncio.timeout_at(deadline):
            await self._tls_ready.wait()
        if not self.t.encrypted:
            raise RelayError("tls-failed", "STARTTLS upgrade failed")

    @property
    def idle(self) -> bool:
        return self.t.state is t.TState.IDLE and not self.reserved and not self.closed.is_set()

    @contextlib.asynccontextmanager
    async def sending(self, what: str, timeout: float | None = None) -> AsyncIterator[None]:
        """Bound a write to the relay (a control message, a handshake frame, the end of
        TLS): it must be taken within ``timeout`` (the terminal's connect timeout by
        default) or the link is closed and :class:`RelayError` ``timeout`` says so.

        A relay that stopped reading this link (its socket buffer full, or a frame
        ahead of ours on the write lock) would otherwise hold the writer until the
        keepalive gave up on the link (``dead_after``, about 45 s), and the write then
        failed with a raw ConnClosed (a traceback in the task that answered a
        request). The stream is cut at once: it may hold a frame cut short, and
        nothing may be written after it. A link lost during the write is a
        :class:`RelayError` ``closed``."""
        assert self.framed is not None
        limit = self.cfg.connect_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                yield
        except TimeoutError:
            self.framed.conn.cut()
            self.close()
            raise RelayError("timeout", f"the relay did not take {what} within {limit:g}s "
                             "(it is not reading this connection); link closed") from None
        except (ConnClosed, OSError) as exc:
            self.close()
            raise RelayError("closed", f"connection to the relay was lost while sending "
                             f"{what} ({exc})") from None

    async def _send(self, msgs: list[m.Msg], what: str = "a control message",
                    timeout: float | None = None) -> None:
        """Send ``msgs`` in one write (:func:`_frames`) within :meth:`sending`'s
        deadline.

        A message the socket takes at once goes without a timer (a deadline costs
        about 10 us, twice per session setup); one it takes in part has its rest
        sent within the deadline, else the stream is cut and the reader's end closes
        the link (:meth:`FramedConn.send_now`)."""
        assert self.framed is not None
        if msgs:
            data = _frames(msgs)
            limit = self.cfg.connect_timeout if timeout is None else timeout
            if self.framed.send_now(data, limit):
                return
            async with self.sending(what, limit):
                await self.framed.send(data)

    async def send(self, msgs: list[m.Msg], what: str = "a control message") -> None:
        await self._send(msgs, what)

    # -- reading ------------------------------------------------------------------
    async def _read_loop(self) -> None:
        assert self.framed is not None
        framed = self.framed
        try:
            while True:
                why = await forward_frames(framed, lambda: self.sink, self._on_ctrl)
                if why == "eof" and await self._leave_tls():
                    continue
                if why != "stop":
                    break
                self._upgrade = False
                framed.conn = await start_tls(
                    framed.conn, self.cfg.starttls, server_side=False,  # type: ignore[arg-type]
                    server_hostname=self.cfg.server_hostname or self.host, framed=True)
                self.t.tls_established()
                if self._tls_ready:
                    self._tls_ready.set()
        except PeerClosed as exc:
            log.debug("link %s: the peer closed the session: %s", self.t.conn_id, exc.reason)
            self.close_reason = exc.reason
        except (crypto.E2EError, UnsealedEnd) as exc:
            log.warning("%s check failed, aborting the session: %s",
                        "session cipher" if self.t.switched else "end-to-end", exc)
            self.aborted = True
        except t.RemoteProtocolError as exc:
            log.warning("relay protocol error on link %s, closing it: %s", self.t.conn_id, exc)
            self.aborted = self.t.switched
        except t.LocalProtocolError as exc:  # a bug here, but never an unhandled task error
            log.error("link %s: %s; closing it", self.t.conn_id, exc)
        except RelayError as exc:  # an answer the relay did not take (:meth:`sending`)
            log.warning("link %s: %s", self.t.conn_id, exc.message)
        except (OSError, ConnClosed, wire.WireError, ssl.SSLError) as exc:
            log.debug("link %s lost: %s", self.t.conn_id, exc)
        except asyncio.CancelledError:
            pass
        finally:
            self._shutdown()

    async def _leave_tls(self) -> bool:
        """The relay's close_notify on a link whose session was issued the session
        cipher: answer with ours, and go on in plain TCP (frames are sealed from here
        on). False when the end is just the end (the link is lost)."""
        assert self.framed is not None
        conn = self.framed.conn
        if not (self.t.leaving_tls and isinstance(conn, DirectTLSConn)
                and conn.tls_ended_by_peer):
            return False
        # within the deadline of every write to the relay (:meth:`sending`): a relay
        # that reads nothing would hold this reader, and no keepalive watches a link
        # under the session cipher
        async with self.sending("the end of TLS"), self.framed.write_lock:
            await conn.leave_tls_write()  # (between two frames)
            self.framed.conn = conn.left_tls()
        self.t.tls_left()
        keep_alive(self.framed.conn, self.keepalive)
        log.debug("link %s left TLS: session cipher %s", self.t.conn_id, m.CIPHER_SESSION)
        return True

    async def _on_ctrl(self, payload: bytes) -> bool:
        msg = m.TERMINAL_CODEC.decode(payload)
        ev = self.t.receive(msg)
        if isinstance(ev, t.Other) and isinstance(ev.msg, m.TLSGo):
            self._upgrade = True
            return True
        await self._dispatch(ev)
        return False

    async def _dispatch(self, ev: object) -> None:
        if isinstance(ev, t.RequestCrossed):
            if ev.incoming is None:
                return  # our request won the crossing: the notification is void
            # our request gave way: the caller retries it on another link
            if self._waiter and not self._waiter.done():
                self._waiter.set_result(t.ConnectFailed(
                    "crossed", f"{ev.incoming.peer} is connecting to you at the same moment "
                               "and its request goes first"))
            ev = ev.incoming
        if isinstance(ev, t.Connected):
            self.sink = EarlySink()  # the peer may speak first
            self.ended_early, self.released_early = None, False
        if isinstance(ev, t.Connected | t.ConnectFailed | t.AskInsecure) or (
            isinstance(ev, t.Other) and isinstance(ev.msg, m.WhoList | m.BroadcastResult)
        ):
            if self._waiter and not self._waiter.done():
                self._waiter.set_result(ev)
            return
        if isinstance(ev, t.EncryptionInstructed):
            if self.owner is not None:
                self.owner.spawn(self._on_encrypt_instruction(ev))
            else:
                self._tasks.add(task := asyncio.create_task(self._on_encrypt_instruction(ev)))
                task.add_done_callback(self._tasks.discard)
            return
        if isinstance(ev, t.IncomingRequest):
            if self.owner is None:
                await self._send(self.t.refuse("not accepting connections"), "a refusal")
            else:
                self.owner.spawn(self.owner.on_incoming(self, ev))
            return
        if isinstance(ev, t.PeerEnded | t.ReleasedEvent):
            if self.session is not None:
                self.session.event(ev)
            elif isinstance(ev, t.PeerEnded):
                self.ended_early = ev.reason  # for the session about to start, if any
                await self._send(self.t.end(), "the end notification")
            else:
                self.released_early = True
                if self.owner:
                    self.owner.changed()
            if isinstance(ev, t.ReleasedEvent):
                self.idle_since = asyncio.get_running_loop().time()
            return
        if isinstance(ev, t.Other) and isinstance(ev.msg, m.Error) and not ev.msg.req:
            self.relay_error = ev.msg
        if isinstance(ev, t.Other) and self.owner is not None:
            self.owner.on_message(ev.msg)

    async def _on_encrypt_instruction(self, ev: t.EncryptionInstructed) -> None:
        """Step 13: accept (after STARTTLS if this link is plaintext) or refuse."""
        try:
            if not self.cfg.can_encrypt:
                await self._send(self.t.refuse_encryption("this terminal cannot encrypt"),
                                 "the encryption answer")
                return
            await self.starttls()
            await self._send(self.t.accept_encryption(), "the encryption answer")
        except (RelayError, OSError, TimeoutError, ConnClosed, t.LocalProtocolError) as exc:
            log.warning("cannot follow the encryption instruction: %s", exc)
            if not self.closed.is_set():
                with contextlib.suppress(Exception):
                    await self._send(self.t.refuse_encryption(str(exc)),
                                     "the encryption answer")

    async def _keepalive(self) -> None:
        """Connection-hold command every interval; a silent relay is a dead relay."""
        assert self.framed is not None
        loop = asyncio.get_running_loop()
        try:
            while True:
                await asyncio.sleep(self.keepalive)
                if self.t.switched or self.t.leaving_tls:
                    # no control message under the session cipher (the relay would take
                    # it for an attack): TCP keepalive watches the link (keep_alive)
                    continue
                if self.framed.write_lock.locked() and self.framed.stalled:
                    # a frame waits for the relay to take it (a slow consumer at the
                    # far end): the link is busy, not dead, and a hold would only
                    # queue behind that frame
                    continue
                if loop.time() - self.framed.last_rx > self.dead_after \
                        and not self.framed.stalled:
                    log.warning("relay missed %d keepalives; dropping link",
                                int(self.dead_after / self.keepalive))
                    break
                await self._send(self.t.hold(), "a keepalive", self.dead_after)
        except (OSError, ConnClosed, RelayError, ssl.SSLError):
            pass
        except asyncio.CancelledError:
            return
        self.close()

    # -- requests -----------------------------------------------------------------
    async def request(self, msgs: list[m.Msg], timeout: float) -> object:
        """Send and wait for the answer (a lost link fails the wait at once)."""
        if self.closed.is_set():
            raise RelayError("closed", "connection to the relay was lost")
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        deadline = loop.time() + timeout
        try:
            # the send within the request's deadline (:meth:`sending`: a relay that
            # stopped reading closes the link); a link lost meanwhile is a lost link,
            # as for the answer
            await self._send(msgs, "the request", timeout)
        except RelayError:
            if not waiter.done():
                waiter.cancel()
            elif not waiter.cancelled():
                waiter.exception()  # (the same loss, said once)
            raise
        try:
            # a deadline on this task, not wait_for's extra future and callbacks: the
            # answer wakes the caller in the same loop iteration (it is on the setup
            # path of every session)
            async with asyncio.timeout_at(deadline):
                return await waiter
        except TimeoutError:
            raise RelayError("timeout", "the relay did not answer in time") from None

    def takes_early(self, *, encrypt: bool = False, e2e: bool = False) -> bool:
        """Whether a request on this link may carry the application's first bytes
        (the terminal protocol's one decision, :meth:`TerminalConn.early_data_allowed`)."""
        return self.t.early_data_allowed(encrypt=encrypt, e2e=e2e)

    async def connect(self, target: str, service: str = "", *, encrypt: bool = False,
                      e2e: bool = False, timeout: float = 30.0,
                      early: bytes = b"") -> t.Connected:
        """Connection request by user ID (step 11); returns once paired (16).

        ``early``: the application's first bytes, sent with the request where the
        terminal protocol allows it; ``Connected.early`` is how many of them the
        relay forwarded to the target (the caller must not send those again).

        A link lost after a request with early data went out fails with
        ``closed-with-early-data``: the relay may have sent those bytes to the target,
        which may have written them to its service (optimistic pairing), and nobody can
        tell this side; sent again on another link they would arrive twice."""
        msgs = self.t.connect(target, service, encrypt=encrypt, e2e=e2e, early=early)
        carried = len(msgs[0].data) if isinstance(msgs[0], m.ConnectRequest) else 0
        try:
            ev = await self.request(msgs, timeout)
            if isinstance(ev, t.AskInsecure):  # (the request, early data and all, waits)
                if not self.cfg.insecure_ok:
                    ev = await self.request(self.t.refuse("encryption required"), timeout)
                else:
                    ev = await self.request(self.t.accept(), timeout)
        except RelayError as exc:
            if exc.code == "closed" and carried:
                raise RelayError(
                    "closed-with-early-data",
                    f"the connection to the relay was lost while the request to {target} "
                    f"carried the first {carried} bytes; they may have reached its service, "
                    "so the request is not repeated: connect again") from None
            raise
        if isinstance(ev, t.ConnectFailed):
            raise RelayError(ev.code, ev.message)
        assert isinstance(ev, t.Connected)
        return ev

    async def accept_at_once(self, ev: t.IncomingRequest) -> None:
        """Optimistic pairing, the target's side: accept now, before the service is
        connected (the relay pairs on it and sends the requester its result while the
        service connect runs). The requester's early data waits in the link's sink for
        the session; under the session cipher this side's close_notify goes right
        behind the accept (close_notify is one-directional: the relay's comes later,
        ahead of whatever it forwards), so that exchange is off the first reply's path.
        """
        assert self.framed is not None
        sink = EarlySink()
        if ev.early_data:
            sink.items.append(ev.early_data)
            sink.size = len(ev.early_data)
        self.sink = sink
        await self._send(self.t.accept(), "the accept")
        conn = self.framed.conn
        if self.t.session_keys is not None and isinstance(conn, DirectTLSConn):
            async with self.sending("the end of TLS"), self.framed.write_lock:
                await conn.leave_tls_write()  # (between two frames)

    async def close_accepted(self, ev: t.IncomingRequest, reason: str) -> None:
        """End a session accepted at once whose service then failed, with ``reason``
        for the requester (it logs it as it logs a refusal). Nothing the requester sent
        reached a service: its bytes are dropped. Under the session cipher the reason
        goes sealed (:func:`kakehashi.core.pump.seal_close`) and the link closes; else
        as an end notification, and the link is released."""
        assert self.framed is not None
        if self.sink is not None:
            self.sink.close()  # (a reader it holds back goes on to read the release)
        self.sink = DiscardSink()
        session = Session(self)
        self.session = session
        try:
            if ev.cipher:
                sealing = crypto.E2ESession.issued(ev.keys[:16], ev.keys[16:],
                                                   suite=crypto.SUITE_AES_128_GCM)
                async with self.sending("the sealed close"):
                    await self.framed.send_frame(wire.FrameType.EOF,
                                                 seal_close(sealing, reason))
                if self.owner is not None and not self.closed.is_set():
                    await self.owner.spare_ready(self.cfg.connect_timeout)
                # until the relay ends the link (the requester read the close and left):
                # closed now, with the relay's bytes unread, the socket would reset and
                # could take the close with it before the relay forwarded it
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.closed.wait(), self.dead_after)
                self.close()
                return
            await self.send(self.t.end(m.fit(reason)), "the end notification")
            await asyncio.wait_for(session.released.wait(), self.dead_after)
        except (OSError, ConnClosed, TimeoutError, ssl.SSLError, t.LocalProtocolError,
                RelayError):
            self.close()
        finally:
            if self.session is session:
                self.session = None
                if not ev.cipher:
                    self.sink = None
            if self.owner is not None:
                self.owner.setup_over(self)
                self.owner.changed()

    # -- teardown -----------------------------------------------------------------
    def _shutdown(self) -> None:
        if self.closed.is_set():
            return
        self.t.state = t.TState.CLOSED
        self.closed.set()
        if self._waiter is not None and not self._waiter.done():
            err = self.relay_error
            self._waiter.set_exception(
                RelayError("rejected", f"the relay rejected the request and closed the "
                           f"connection: {err.message} [{err.code}]") if err is not None
                else RelayError("closed", "connection to the relay was lost"))
        if self.framed:
            self.framed.conn.close()
        if self.sink:
            self.sink.close()
        if self.keeper:
            self.keeper.cancel()
        if self.session is not None:
            self.session.event(t.PeerEnded(self.close_reason or LINK_LOST))
        if self.owner:
            self.owner.lost(self)

    def close(self) -> None:
        if self.reader and not self.reader.done():
            self.reader.cancel()
        else:
            self._shutdown()

    async def logout(self) -> None:
        with contextlib.suppress(Exception):
            await self._send(self.t.logout(), "the logout", min(2, self.cfg.connect_timeout))
            # a write the socket took in part has its rest on the way (send_now), within
            # the same bound: the close below would cut the frame short, and the relay
            # would not end the user's other connections (step 6)
            if self.framed is not None:
                await self.framed.flushed()
        self.close()


class _NotifyingRawSink(RawSink):
    def __init__(self, dst: Conn, session: Session,
                 sealing: crypto.E2ESession | None = None, *, end_sealed: bool = False) -> None:
        super().__init__(dst, sealing=sealing, end_sealed=end_sealed)
        self.session = session

    async def data(self, src: FramedConn, length: int) -> None:
        if not self.session.received:
            self.session.carried(received=True)
        await super().data(src, length)

    async def eof(self, body: bytes = b"") -> None:
        await super().eof(body)
        self.session.got_eof.set()


@dataclass(frozen=True)
class EndMark:
    """An EOF frame held by :class:`EarlySink` (``body``: its seal, if any)."""

    body: bytes = b""


class EarlySink(FrameSink):
    """Holds the frames that arrive between pairing and the session taking over.

    The peer may speak first (an SSH banner, the end-to-end hello, a requester's bytes
    behind an optimistic accept while the service is still being connected) before
    this side has set up its session, or faster than the session's first writes to a
    slow application; those bytes are kept here, in order, not dropped. Past
    :attr:`WINDOW` bytes held the link's reader waits for the session to take some
    (backpressure, as the pump applies: the relay and the peer wait too), so what is
    held stays bounded and a fast sender never ends the session.

    The session takes over only from an empty sink with no frame arriving into it
    (:meth:`settled`): a frame whose payload is still being read would otherwise land
    here after the session's own sink replaced this one, and be lost.
    """

    #: bytes held before the link's reader waits for the session to take some
    WINDOW = 256 * 1024

    def __init__(self) -> None:
        self.items: list[bytes | EndMark] = []
        #: bytes held (taken ones no longer count)
        self.size = 0
        #: a frame's payload is being read into this sink
        self.receiving = False
        #: the link's reader waits for the session to take some bytes
        self.waiting = False
        self._closed = False
        self._arrived = asyncio.Event()
        self._taken = asyncio.Event()

    async def data(self, src: FramedConn, length: int) -> None:
        self.receiving = True
        try:
            payload = await src.read_payload(length)
        finally:
            self.receiving = False
            self._arrived.set()
        self.items.append(payload)
        self.size += length
        if self.size <= self.WINDOW or self._closed:
            return
        self.waiting = True
        try:
            with src.stalling():  # a slow application is not a dead relay
                while self.size > self.WINDOW and not self._closed:
                    self._taken.clear()
                    await self._taken.wait()
        finally:
            self.waiting = False

    async def eof(self, body: bytes = b"") -> None:
        self.items.append(EndMark(body))
        self._arrived.set()

    def take(self) -> bytes | EndMark:
        """The oldest item held (there must be one); makes room for the reader."""
        item = self.items.pop(0)
        if not isinstance(item, EndMark):
            self.size -= len(item)
            self._taken.set()
        return item

    async def get(self, timeout: float) -> bytes | EndMark:
        while not self.items:
            self._arrived.clear()
            await asyncio.wait_for(self._arrived.wait(), timeout)
        return self.take()

    def settled(self) -> bool:
        """Nothing held and no frame arriving (or none will: the sink was given up):
        another sink may take over now."""
        return not self.items and (not self.receiving or self._closed)

    async def arrival(self) -> None:
        """Until the frame arriving into this sink has landed (or the sink closed)."""
        while self.receiving and not self._closed:
            self._arrived.clear()
            await self._arrived.wait()

    def close(self) -> None:
        """Given up (the link closed, the session replaced it): a reader held back by
        a full window goes on (into whichever sink the link has now)."""
        self._closed = True
        self._taken.set()
        self._arrived.set()


class Session:
    """A paired link carrying one application stream."""

    def __init__(self, link: RelayLink) -> None:
        self.link = link
        self.got_eof = asyncio.Event()
        self.ended = asyncio.Event()
        self.released = asyncio.Event()
        self.peer_reason = ""
        #: the application's bytes have gone each way (the setup is over once both did)
        self.sent = self.received = False

    def event(self, ev: object) -> None:
        if isinstance(ev, t.PeerEnded):
            self.peer_reason = ev.reason
            self.ended.set()
        elif isinstance(ev, t.ReleasedEvent):
            self.released.set()
            self.ended.set()

    def carried(self, *, sent: bool = False, received: bool = False) -> None:
        """Bytes went one way; once both ways did, the session is set up and the
        terminal may open the link that replaces this one (:meth:`Terminal.setup_over`),
        :data:`SETUP_GRACE` later: at that moment the first reply is still on its way
        through the relay, and a new link's TLS handshake there would go before it."""
        if self.sent and self.received:
            return  # already over (or about to be)
        self.sent |= sent
        self.received |= received
        if self.sent and self.received and self.link.owner is not None:
            asyncio.get_running_loop().call_later(SETUP_GRACE, self._setup_over)

    def _setup_over(self) -> None:
        owner = self.link.owner
        if owner is not None and self.link.session is self:  # not the link's next session
            owner.setup_over(self.link)


class _SentCounter(Transfer):
    """The bytes a session sent; tells the session when the first ones went."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._bytes = 0

    @property  # type: ignore[override]
    def bytes(self) -> int:
        return self._bytes

    @bytes.setter
    def bytes(self, value: int) -> None:
        self._bytes = value
        if not self.session.sent:
            self.session.carried(sent=True)


async def _e2e_handshake(link: RelayLink, info: t.Connected | t.IncomingRequest,
                         initiator: bool) -> crypto.E2ESession:
    cfg = link.cfg
    peer = info.peer
    if cfg.identity is None:
        raise RelayError("e2e-unavailable", "no identity key configured for end-to-end mode")
    pinned = cfg.peer_keys.get(peer)
    key_text = pinned or info.peer_key
    if pinned and info.peer_key and pinned != info.peer_key:
        raise RelayError("e2e-key-mismatch",
                         f"the relay presented a different key for {peer} than the pinned one")
    if not key_text:
        raise RelayError("e2e-unavailable", f"no public key known for {peer}")
    early = _early(link)
    assert link.framed is not None
    hs = crypto.E2EHandshake("initiator" if initiator else "responder", cfg.identity,
                             crypto.parse_public_b64(key_text),
                             prologue=b"kakehashi-relay-e2e")
    async with link.sending("the end-to-end hello"):
        await link.framed.send_frame(wire.FrameType.DATA, hs.hello())
    hs.receive(_handshake_item(await early.get(cfg.connect_timeout)))
    session = hs.finish()
    async with link.sending("the end-to-end confirmation"):
        await link.framed.send_frame(wire.FrameType.DATA, session.confirm_tag())
    session.check_confirm(_handshake_item(await early.get(cfg.connect_timeout)))
    log.info("end-to-end session with %s sealed with %s", peer, session.suite)
    return session


def _early(link: RelayLink) -> EarlySink:
    if not isinstance(link.sink, EarlySink):
        link.sink = EarlySink()
    return link.sink


def _handshake_item(item: bytes | EndMark) -> bytes:
    if isinstance(item, EndMark):
        raise RelayError("e2e", "peer ended during the end-to-end handshake")
    if len(item) > 1024:
        raise RelayError("e2e", "oversized end-to-end handshake message")
    return item


def _log_soon(msg: str, *args: object) -> None:
    """An info line about a session being set up, written :data:`SETUP_GRACE` later,
    once its first bytes went both ways.

    Not now, and not on the loop's next turn either: that turn is still inside the
    setup, in which the session's first reply waits for this process (the agent
    reads it from the service and seals it; ``relay connect`` opens it and writes it
    to the client), and a log line (a record, its formatting, a write) cost up to
    0.3 ms of it there (issue 12, a profile of the setup window)."""
    if log.isEnabledFor(logging.INFO):
        asyncio.get_running_loop().call_later(SETUP_GRACE,
                                              functools.partial(log.info, msg, *args))


async def run_session(link: RelayLink, app: Conn,
                      info: t.Connected | t.IncomingRequest, *, initiator: bool) -> str:
    """Carry ``app`` over the paired ``link`` until both ends are done, then release.

    Returns "" when the session ran, else why it did not (for the caller's exit code).
    """
    assert link.framed is not None
    session = Session(link)
    link.session = session
    if initiator and link.ended_early is not None:
        # the peer ended (and the relay released) before this session began: a
        # target that could not set its side up after an optimistic accept
        session.event(t.PeerEnded(link.ended_early))
        if link.released_early:
            session.event(t.ReleasedEvent())
    link.ended_early, link.released_early = None, False
    up: asyncio.Task[int] | None = None
    reason = ""
    trace.event("session start")
    # the relay's session cipher: every frame sealed with the keys it issued, the end
    # of each direction too (the hops leave TLS right after the pairing)
    issued = bool(info.cipher) and not info.e2e
    if issued and link.owner is not None:
        link.owner.links_used_up()
    if initiator and getattr(info, "early", 0):
        session.carried(sent=True)  # the first bytes went with the request
    _log_soon("session %s %s: cipher %s", "to" if initiator else "from", info.peer,
              m.CIPHER_SESSION if issued else "e2e" if info.e2e else
              "tls" if link.t.encrypted else "none")
    try:
        if issued:
            e2e: crypto.E2ESession | None = crypto.E2ESession.issued(
                info.keys[:16], info.keys[16:], suite=crypto.SUITE_AES_128_GCM,
                # the relay sealed our early data as our first message
                sent=1 if initiator and getattr(info, "early", 0) else 0)
        else:
            e2e = await _e2e_handshake(link, info, initiator) if info.e2e else None
        open_ = e2e.open if e2e else None
        early = _early(link)
        while not early.settled():  # what the peer sent before we were ready, in order
            if not early.items:  # a frame is still arriving into it
                await early.arrival()
                continue
            item = early.take()
            if isinstance(item, EndMark):
                if issued:
                    open_end(e2e, item.body)  # type: ignore[arg-type]
                elif item.body:
                    raise UnsealedEnd()
                await app.shutdown_write()
                session.got_eof.set()
            else:
                await app.send_all(open_(item) if open_ else item)
                trace.event("early data written")
                session.carried(received=True)
        # no await since the check
        link.sink = _NotifyingRawSink(app, session, e2e, end_sealed=issued)
        if link.t.state is t.TState.PAIRED:
            up = asyncio.create_task(raw_to_frames(app, link.framed, sealing=e2e,
                                                   end_sealed=issued,
                                                   counter=_SentCounter(session)))
            both_done = asyncio.ensure_future(_both(up, session.got_eof))
            ended = asyncio.ensure_future(session.ended.wait())
            await asyncio.wait({both_done, ended}, return_when=asyncio.FIRST_COMPLETED)
            both_done.cancel()
            ended.cancel()
        # else the peer ended before this session began and the link has released
        # (RelayLink._dispatch): a byte of ours now would reach the relay after our
        # release, which it takes for a protocol violation and closes the link on,
        # and the peer's reason would be lost with it
        if up is not None and up.done() and up.exception() is not None:
            reason = f"local stream error: {up.exception()}"
        if session.peer_reason not in ("", LINK_LOST) and not session.received \
                and not session.got_eof.is_set():
            # ended before it carried a byte to us, with a reason: the target could not
            # set its side up after it accepted (optimistic pairing), as a refusal says
            reason = f"closed by {info.peer}: {session.peer_reason}"
    except PeerClosed as exc:  # the same, under the session cipher (sealed close)
        link.close_reason = exc.reason
    except (crypto.E2EError, RelayError, TimeoutError, ValueError, wire.WireError,
            OSError, ConnClosed) as exc:
        reason = f"end-to-end setup failed: {exc}"
        log.warning("%s", reason)
        link.aborted = issued
    finally:
        if link.owner is not None:
            link.owner.setup_over(link)  # (a session that never carried bytes both ways)
        if up is not None and not up.done():
            up.cancel()
            with contextlib.suppress(BaseException):
                await up
        if link.sink is not None:
            link.sink.close()
        link.sink = DiscardSink()
        clean = session.got_eof.is_set() and up is not None and up.done() \
            and not up.cancelled() and up.exception() is None
        if link.close_reason:
            reason = f"closed by {info.peer}: {link.close_reason}"
            log.warning("session with %s: %s", info.peer, reason)
            app.close()  # authenticated: a close as after a refusal, not a reset
        elif issued and (link.aborted or not clean):
            # the session did not end by both authenticated ends: the application must
            # not take it for a clean end (a reset, as a TLS MAC failure would give)
            reason = "session aborted: " + (
                "input failed authentication" if link.aborted
                else "the link ended without the peer's authenticated end") \
                + (f" ({reason})" if reason else "")
            log.warning("session with %s: %s", info.peer, reason)
            app.abort()
        else:
            app.close()
    if issued:
        # the hop has no TLS any more: the link is not reused (no release in plain
        # text); closing it is the end, once the pool has a new spare
        if link.owner is not None and not link.closed.is_set():
            await link.owner.spare_ready(link.cfg.connect_timeout)
        link.close()
        if link.session is session:
            link.session = None
        return reason
    if link.closed.is_set():
        if link.session is session:
            link.session = None
        return reason
    try:
        await link.send(link.t.end(reason), "the end notification")
        await asyncio.wait_for(session.released.wait(), link.dead_after)
    except (OSError, ConnClosed, TimeoutError, t.LocalProtocolError, RelayError):
        link.close()
    finally:
        if link.session is session:  # a new session may already own the link
            link.session = None
            link.sink = None
        if link.owner:
            link.owner.changed()
    return reason


async def _both(up: asyncio.Task[int], got_eof: asyncio.Event) -> None:
    """Both directions are done: ours sent its EOF and the peer's EOF came. If our
    application's stream broke (a reset), the session is over now: waiting for the
    peer's EOF could last forever when its application is quiet."""
    try:
        await asyncio.shield(up)
    except Exception:
        return
    await got_eof.wait()


IncomingHandler = Callable[["RelayLink", t.IncomingRequest], Awaitable[None]]
#: attribute of an :data:`IncomingHandler` that handles optimistic pairing (it takes
#: ``IncomingRequest.early_data``, see :meth:`RelayLink.accept_at_once`); a terminal
#: with any other handler does not offer the capability
OPTIMISTIC_HANDLER = "handles_optimistic_pairing"


class Terminal:
    """A user's pool of relay links with spare connections (steps 17-21)."""

    def __init__(self, cfg: TerminalConfig, *, accept: IncomingHandler | None = None,
                 on_message: Callable[[m.Msg], None] | None = None) -> None:
        if accept is not None and not getattr(accept, OPTIMISTIC_HANDLER, False):
            # a handler that does not take the early data from the notification (nor
            # accept at once) must not be offered the flow: it would lose those bytes
            cfg = dataclasses.replace(cfg, optimistic=False)
        self.cfg = cfg
        self.links: set[RelayLink] = set()
        self.token = ""
        self._accept = accept
        self._on_message = on_message
        self._changed = asyncio.Event()
        self._stop = False
        self._tasks: set[asyncio.Task[object]] = set()
        self.connected = asyncio.Event()
        self.last_error: Exception | None = None
        self.ever_connected = False
        self._subscribed = False
        self._sub_link: RelayLink | None = None
        self._current = 0
        #: set whenever a new link has logged in (:meth:`spare_ready`)
        self._spare_opened = asyncio.Event()
        #: :meth:`maintain` runs: spares are opened as links are used up
        self._maintained = False
        #: a session ran under the session cipher: links are used up, not released
        self.sessions_close_links = False
        #: links whose session is being set up: taken for a request or notified, and
        #: not yet carrying bytes both ways (:meth:`setup_over`)
        self._setting_up: set[RelayLink] = set()
        #: early data with requests; off once a relay closed a link on such a request
        #: (a relay that predates early data rejects the unknown field)
        self.early_ok = cfg.early_data
        #: the latest TLS session from each relay, offered on the next link there: a
        #: spare opened after a session costs no certificate signature on the relay and
        #: no chain verification here (``resumed``/``full`` count the handshakes)
        self.tls_sessions = SessionCache() if cfg.tls_resume else None
        #: while no link is logged in, the login that goes first (:meth:`open_link`)
        #: (done when it is: with the error it failed with, which its waiters share)
        self._first_login: asyncio.Future[None] | None = None

    # -- pool ---------------------------------------------------------------------
    def spawn(self, coro: Awaitable[object]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[object]) -> None:
        """Forget a finished task; say why it failed (never "exception never retrieved")."""
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("relay task failed: %s", task.exception(), exc_info=task.exception())

    def changed(self) -> None:
        self._changed.set()

    def setup_over(self, link: RelayLink) -> None:
        """``link``'s session carries bytes both ways (or never will): its setup no
        longer competes with the opening of a spare (:meth:`maintain`)."""
        if link in self._setting_up:
            self._setting_up.discard(link)
            self._changed.set()

    def lost(self, link: RelayLink) -> None:
        self.setup_over(link)
        self.links.discard(link)
        if not self.links:
            self.connected.clear()
        self._changed.set()

    def on_message(self, msg: m.Msg) -> None:
        if self._on_message:
            self._on_message(msg)

    async def on_incoming(self, link: RelayLink, ev: t.IncomingRequest) -> None:
        self._setting_up.add(link)
        self._taken()  # one fewer idle link: refill a spare
        try:
            if self._accept is None:
                await link.send(link.t.refuse("this terminal does not accept connections"),
                                "a refusal")
                return
            await self._accept(link, ev)
        except RelayError as exc:
            # an answer the relay did not take in time, or a link lost while it was
            # written (:meth:`RelayLink.sending`): the link is closed and the pool
            # replaces it; a warning, not a traceback in a failed task
            log.warning("cannot answer the request from %s: %s", ev.peer, exc.message)
        finally:
            self.setup_over(link)

    def links_used_up(self) -> None:
        """A session runs under the session cipher here: its link will not come back
        (:attr:`sessions_close_links`), so the pool settles no more and opens a new
        spare once this session is set up (:meth:`maintain`). :meth:`maintain` is told
        the first time only; at every session it was a wake-up in the middle of the
        setup for nothing (it waits for the setup, :meth:`_setups_over`)."""
        if not self.sessions_close_links:
            self.sessions_close_links = True
            self._changed.set()

    def _taken(self) -> None:
        """A link was taken for a session: wake :meth:`maintain` if it has something to
        do now. Where links are used up (:meth:`_links_come_back` False) it would only
        wait for this setup while an idle link is left (:meth:`_setups_over`), and
        :meth:`setup_over` wakes it then: waking it now cost the setup a task step, a
        ``wait_for`` and its timer in this process, 0.1-0.2 ms (issue 12, a profile of
        the setup window). With no idle link left (a burst) it opens a spare now."""
        if self._links_come_back() or not self.idle_links():
            self._changed.set()

    def idle_links(self) -> list[RelayLink]:
        return [link for link in self.links if link.idle]

    @property
    def server(self) -> tuple[str, int]:
        """The server in use (the first of ``--server`` until it fails)."""
        addrs = self.cfg.addresses
        return addrs[self._current % len(addrs)]

    def fail_over(self, failed: tuple[str, int]) -> bool:
        """Move on to the next server after ``failed`` (if it is still the current one);
        False when there is no other server to try."""
        addrs = self.cfg.addresses
        if len(addrs) < 2:
            return False
        if self.server == failed:
            self._current = (self._current + 1) % len(addrs)
            self.token = ""  # a resumption token is only good at the server that gave it
            log.warning("relay %s:%d failed; trying %s:%d", *failed, *self.server)
        return True

    async def open_link(self) -> RelayLink:
        """A new logged-in link to the current server; when it cannot be reached (or
        says it is cut off from its cluster), each other server is tried once.

        With no link logged in here, the relay may have let the user's session go:
        the token then needs the password, and the relay counts password checks in
        flight against its lockout, so a burst of links opened at once (every session
        of a burst ending, each link closing with its session) would be refused as
        failed logins although none failed. Then the first login goes alone and the
        others follow it, each with the token its session made live again.

        When that first login fails, those that waited for it fail with it: each
        trying again in turn would make the last of a burst wait as many login
        timeouts as there were callers (a relay that hangs), where at once it waits
        one. Only a first login whose caller went away (cancelled) hands over to one
        of them."""
        while not self.links and self._first_login is not None:
            # its failure raised here as a future's: each waiter's traceback starts
            # from the failure's own, not from those of the waiters before it
            await asyncio.shield(self._first_login)
        if self.links:
            return await self._open_link()
        first = self._first_login = asyncio.get_running_loop().create_future()
        try:
            return await self._open_link()
        except Exception as exc:  # (not a cancellation: that hands over)
            first.set_exception(exc)
            first.exception()  # retrieved: nobody may be waiting
            raise
        finally:
            self._first_login = None
            if not first.done():
                first.set_result(None)

    async def _open_link(self) -> RelayLink:
        tried = 0
        while True:
            addr = self.server
            link = RelayLink(self.cfg, self, addr)
            try:
                await link.open(self.token)
            except (RelayError, OSError, TimeoutError, ConnClosed) as exc:
                fatal = isinstance(exc, RelayError) and exc.code in FATAL_CODES
                tried += 1
                if fatal or tried >= len(self.cfg.addresses) or not self.fail_over(addr):
                    raise
                continue
            break
        self.token = link.token
        self.links.add(link)
        self.connected.set()
        self.ever_connected = True
        self._spare_opened.set()
        return link

    async def spare_ready(self, timeout: float) -> None:
        """Until the pool has an idle link (at most ``timeout`` seconds): a link that
        carried a session under the session cipher is closed only then, so that the
        user never drops off the relay between a session's end and its spare's login
        (a request meanwhile waits for the spare instead of finding nobody)."""
        if not self._maintained or self.cfg.spares <= 0:
            return  # nobody opens spares (``relay pipe``): nothing to wait for
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._changed.set()  # the maintainer opens the spare now
        while not self.idle_links() and not self._stop:
            self._spare_opened.clear()
            left = deadline - loop.time()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._spare_opened.wait(), left)

    def _links_come_back(self) -> bool:
        """Whether busy links become idle again (sessions released in TLS). Once a
        session has run under the session cipher here, its links never do (each closes
        when its session ends), so the pool refills at once instead of settling: a
        burst of sessions would otherwise wait for spares."""
        return not self.sessions_close_links

    async def _setups_over(self) -> None:
        """Until no session is being set up here, at most :data:`SETTLE` seconds, while
        an idle link is left. A new link costs the relay a TLS handshake and a login:
        opened while a session is set up on the same relay, it delays that session
        (on a relay with the session cipher, both terminals replace their link at
        every session). With no idle link left (a burst) a spare is needed now."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE
        while self._setting_up and self.idle_links() and not self._stop:
            left = deadline - loop.time()
            if left <= 0:
                return
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def maintain(self) -> None:
        """Keep ``spares`` idle links open; reconnect with backoff and jitter."""
        delay = 0.5
        self._maintained = True
        while not self._stop:
            self._changed.clear()
            if not self._links_come_back() and \
                    len(self.idle_links()) < max(self.cfg.spares, 1):
                await self._setups_over()
            missing = max(self.cfg.spares, 1) - len(self.idle_links())
            self._trim()
            if missing > 0:
                results = await asyncio.gather(
                    *(self.open_link() for _ in range(missing)), return_exceptions=True)
                errors = [r for r in results if isinstance(r, BaseException)]
                if errors:
                    err = errors[0]
                    self.last_error = err  # type: ignore[assignment]
                    if isinstance(err, RelayError) and err.code in FATAL_CODES:
                        if not self.ever_connected:
                            raise err  # a wrong password or --tls will not fix itself
                        log.error("cannot log in: %s", err.message)
                    else:
                        log.warning("cannot reach relay %s:%d: %s (retrying in %.1fs)",
                                    *self.server, err, delay)
                    await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                    delay = min(delay * 2, 30.0)
                    continue
                if delay > 0.5:
                    log.info("connected to relay %s:%d", *self.server)
                delay = 0.5
            try:
                await self._resubscribe()
            except (RelayError, OSError, ConnClosed) as exc:
                log.warning("cannot subscribe to presence notices: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 5.0)
            if self.idle_links() and self._links_come_back():
                # a spare is still there: let sessions finish first (a released link is
                # idle again) instead of opening connections in the middle of a setup
                await asyncio.sleep(SETTLE)

    def _trim(self) -> None:
        """Close idle links beyond twice the spare count once they have rested a while.

        Only long-idle links are closed: a link that just became idle may be the one
        the relay is handing a new request to at this very moment.
        """
        now = asyncio.get_running_loop().time()
        idle = sorted(self.idle_links(), key=lambda link: link.idle_since)
        extra = len(idle) - 2 * max(self.cfg.spares, 1)
        for link in idle[:max(extra, 0)]:
            if now - link.idle_since > TRIM_AFTER:
                link.close()

    async def acquire(self) -> RelayLink:
        for link in self.idle_links():
            link.reserved = True
            self._taken()
            return link
        link = await self.open_link()
        link.reserved = True
        return link

    async def connect(self, target: str, service: str = "", *, encrypt: bool = False,
                      e2e: bool = False,
                      app: Conn | None = None) -> tuple[RelayLink, t.Connected]:
        """A session to ``target`` on a spare link. ``app``: the application stream
        the session will carry; whatever it has already sent goes with the request
        (early data, when allowed), and is taken off ``app`` once the relay has
        forwarded it - so the target gets it one round trip sooner."""
        for attempt in range(3):
            link = await self.acquire()
            self._setting_up.add(link)
            # looked at, not taken: a request that fails leaves the bytes in place;
            # not even looked at where this link may not carry them (``relay pipe``'s
            # stdin cannot be peeked: looking reads it ahead into memory)
            early = app.peek_now(m.EARLY_DATA_MAX) \
                if app is not None and self.early_ok \
                and link.takes_early(encrypt=encrypt, e2e=e2e) else b""
            try:
                info = await link.connect(target, service, encrypt=encrypt, e2e=e2e,
                                          early=early)
                if info.early:
                    app.skip_now(info.early)  # type: ignore[union-attr]
            except RelayError as exc:
                link.reserved = False
                self.setup_over(link)
                self._changed.set()
                if exc.code == "rejected" and early:
                    # the relay rejected a request with early data and closed the link:
                    # one that does not know the field does (an error, then the close;
                    # nothing of the request went on); go on without it
                    log.info("the relay rejected a request with early data (%s); "
                             "sending first bytes after the result from now on", exc.message)
                    self.early_ok = False
                    if attempt < 2:
                        continue
                # the target's chosen connection vanished (it was closing), or the
                # target's own request to us crossed ours and went first: try again
                if exc.code in RETRIED_CODES and attempt < 2:
                    continue
                raise
            except BaseException:
                link.reserved = False
                self.setup_over(link)
                self._changed.set()
                raise
            link.reserved = False
            return link, info
        raise AssertionError("unreachable")

    async def who(self) -> list[m.UserInfo]:
        """Every user this terminal may see, page by page (a page fits one message)."""
        users: list[m.UserInfo] = []
        link = await self.acquire()
        try:
            while True:
                after = users[-1].user if users else ""
                ev = await link.request([m.Who(after=after)], 10)
                assert isinstance(ev, t.Other) and isinstance(ev.msg, m.WhoList)
                page = ev.msg
                if page.users and page.users[0].user <= after:
                    raise RelayError("protocol", "the relay repeated a page of the user list")
                users += page.users
                if not page.more or not page.users:
                    return users
        finally:
            link.reserved = False

    async def broadcast(self, targets: list[str], body: bytes) -> m.BroadcastResult:
        link = await self.acquire()
        try:
            ev = await link.request([m.Broadcast(targets=targets, body=body)], 10)
        finally:
            link.reserved = False
        assert isinstance(ev, t.Other) and isinstance(ev.msg, m.BroadcastResult)
        return ev.msg

    async def subscribe(self) -> None:
        """Ask for presence notices; kept up across reconnects by :meth:`maintain`."""
        self._subscribed = True
        await self._resubscribe()

    async def _resubscribe(self) -> None:
        if not self._subscribed or (self._sub_link and not self._sub_link.closed.is_set()):
            return
        link = await self.acquire()
        link.reserved = False
        self._sub_link = link
        await link.send([m.Subscribe(on=True)], "the subscription")

    async def close(self, *, logout: bool = False) -> None:
        """Close every link; ``logout`` also ends the user's other connections (step 6)."""
        self._stop = True
        self._changed.set()
        links = list(self.links)
        if logout and links:
            await links[0].logout()
        for link in links:
            link.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def service_acceptor(services: dict[str, tuple[str, int]],
                     spawn: Callable[[Awaitable[object]], None]) -> IncomingHandler:
    """The agent's answer to a connection-request notification (step 15).

    Its policy checks come first (a refusal is still a refusal, and the early data of
    a refused request is dropped). Under optimistic pairing (``ev.optimistic``) it then
    accepts at once and connects the service while the result travels to the
    requester; a service that fails then closes the session with the reason, which the
    requester reports as it reports a refusal. Otherwise it connects the service first,
    so a dead service is a refusal; it upgrades to TLS if instructed.
    """

    async def accept(link: RelayLink, ev: t.IncomingRequest) -> None:
        if ev.insecure and not _takes_insecure(link.cfg):
            log.warning("refusing %s: the session would be unencrypted and this agent does "
                        "not accept that (--insecure-peer ask would)", ev.peer)
            await link.send(link.t.refuse("the session would be unencrypted; "
                                          f"{link.cfg.user} does not accept that"),
                            "a refusal")
            return
        name = ev.service or (next(iter(services)) if len(services) == 1 else "")
        target = services.get(name)
        if target is None:
            await link.send(link.t.refuse(
                f"no service {ev.service!r}" if ev.service else "name a service"),
                "a refusal")
            return
        optimistic = ev.optimistic and not (ev.encrypt and not link.t.encrypted)
        if optimistic:
            # optimistic pairing: every check above passed, so accept now and connect
            # the service while the relay sends the requester its result
            try:
                await link.accept_at_once(ev)
            except (OSError, ConnClosed, ssl.SSLError, t.LocalProtocolError,
                    RelayError) as exc:
                log.warning("cannot accept request from %s: %s", ev.peer, exc)
                link.close()
                return
        try:
            app = await open_tcp(*target, timeout=5.0)
            trace.event("service connected")
        except (OSError, ConnectionError, TimeoutError) as exc:
            log.warning("service %s (%s:%d) unavailable: %s", name, *target, exc)
            if optimistic:  # accepted already: the session closes with the reason
                await link.close_accepted(ev, f"service {name} unavailable ({exc})")
            else:
                await link.send(link.t.refuse(f"service {name} unavailable"), "a refusal")
            return
        if not optimistic:
            try:
                if ev.encrypt and not link.t.encrypted:
                    await link.starttls()
                link.sink = EarlySink()  # the requester may speak as soon as it is paired
                await link.send(link.t.accept(), "the accept")
            except (RelayError, OSError, TimeoutError, ConnClosed,
                    t.LocalProtocolError) as exc:
                app.close()
                link.sink = None
                log.warning("cannot accept request from %s: %s", ev.peer, exc)
                with contextlib.suppress(Exception):
                    await link.send(link.t.refuse(str(exc)), "a refusal")
                return
        _log_soon("session from %s to service %s (encrypted=%s, e2e=%s%s)", ev.peer, name,
                  link.t.encrypted, ev.e2e, ", unencrypted by agreement" if ev.insecure else "")
        await run_session(link, app, ev, initiator=False)

    setattr(accept, OPTIMISTIC_HANDLER, True)
    return accept


def _takes_insecure(cfg: TerminalConfig) -> bool:
    """Whether this agent accepts a session that a peer wanted encrypted but that will
    not be (para 0037): with ``--insecure-peer ask``, or when its own encryption is
    ``off`` and it did not say ``--insecure-peer refuse``."""
    if cfg.insecure_ok:
        return True
    return cfg.attrs.encryption == "off" and cfg.attrs.insecure_peer != "refuse"

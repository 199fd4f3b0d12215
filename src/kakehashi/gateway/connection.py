"""One client connection of the gateway, as decisions (sans-IO).

Like the relay's :class:`~kakehashi.relay.control.ControlUnit`, a
:class:`GatewayConnection` never touches a socket, a clock or the event loop: its
drivers - the coroutine path (``gateway.server``) and the fast lane
(``gateway.fastlane``, readiness callbacks) - tell it what happened and ask it what
to do, and carry the answer out. Every rule that both drivers need is here once:

* **target**: what a request is (a CONNECT tunnel, the gateway's own endpoint, a
  request to relay) and where it goes (:meth:`GatewayConnection.classify`);
* **authorisation outcome**: no verified user is a 407; the fast lane only serves
  users verified recently, everything else waits for the slow check
  (:meth:`~GatewayConnection.authorised`, :meth:`~GatewayConnection.lane_route`);
* **upstream choice**: keep the connection's kept-alive upstream, give it back to
  the pool (another target) or drop it (stale), take a pooled one or open a new one
  (:meth:`~GatewayConnection.choose_upstream`, :meth:`~GatewayConnection.lane_route`),
  always after an allow-list decision made (and audited) on this client connection;
* **retry**: a request is sent again on a fresh connection only when the upstream was
  a reused one that failed before answering, and the request may be repeated
  (:meth:`~GatewayConnection.may_retry`);
* **keep-alive**: what stays open after an exchange (:meth:`~GatewayConnection.done`),
  which timeout applies while waiting for the next request and what its expiry or
  an EOF means (:meth:`~GatewayConnection.request_timeout`,
  :meth:`~GatewayConnection.idle_end`);
* **handoff**: whether the fast lane may take a request or a response, or must hand
  it to the coroutine path (:meth:`~GatewayConnection.use_lane`,
  :meth:`~GatewayConnection.lane_takes_request`,
  :meth:`~GatewayConnection.lane_takes_response`).

The upstream is held as an opaque :class:`~kakehashi.gateway.exchange.Upstream`
(the drivers own its socket); the pool is asked only whether it holds a connection
(a dictionary lookup), taking from it and giving back is the drivers' I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from kakehashi.gateway import http
from kakehashi.gateway.allow import AllowList, Decision
from kakehashi.gateway.exchange import Upstream

#: requests that may be sent again on a fresh connection when a kept-alive upstream
#: closes before answering (RFC 9110 9.2.2, RFC 9112 9.3.1)
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))
#: a response body larger than this (beyond what arrived with its head) goes to the
#: coroutine path, whose pump splices it kernel to kernel
FAST_BODY_MAX = 64 * 1024

# what a request is (classify)
TUNNEL, LOCAL, RELAY = "tunnel", "local", "relay"
# the fast lane's way to a target (lane_route)
SERVE, HANDOFF, REFUSE, TAKE_POOLED = "serve", "handoff", "refuse", "take-pooled"


@dataclass
class Policy:
    """What every connection of one gateway shares: settings and counters, no I/O."""

    via: bytes
    limits: http.HeadLimits = field(default_factory=http.HeadLimits)
    allow: AllowList = field(default_factory=lambda: AllowList([]))
    head_timeout: float = 10.0
    idle_timeout: float = 60.0
    read_timeout: float = 60.0
    gzip_decode: bool = False
    #: proxy authentication is on (users must be verified)
    auth: bool = False
    #: serve what can be served from readiness callbacks (False: all by coroutine)
    fast_lane: bool = True
    #: exchanges started (both drivers count through :meth:`GatewayConnection.started`)
    requests: int = 0


class UpstreamStep(NamedTuple):
    """What to do about the upstream before a request to a checked address."""

    use_current: bool  # the connection's upstream goes on carrying requests
    release: Upstream | None  # between exchanges and clean: give it to the pool
    close: Upstream | None  # stale (closed or talked out of turn): close it


class LaneRoute(NamedTuple):
    """The fast lane's way to a request's target (see :meth:`GatewayConnection.lane_route`)."""

    action: str  # SERVE, HANDOFF, REFUSE (audit, 403) or TAKE_POOLED (audit, take, serve)
    decision: Decision | None = None  # made now (to audit), for REFUSE/TAKE_POOLED/SERVE


#: the answer to most requests - SERVE on a decision made on this connection before -
#: made once, not per request (a driver may test for it by identity)
DECIDED = LaneRoute(SERVE)
_HANDOFF = LaneRoute(HANDOFF)


class GatewayConnection:
    """The decisions for one client connection (see the module docstring)."""

    def __init__(self, policy: Policy, upstream: Upstream | None = None) -> None:
        self.policy = policy
        #: no request seen yet: the head timeout applies, and silence is a 408
        self.first = True
        #: the kept-alive upstream connection (opaque: its socket is the drivers')
        self.upstream = upstream
        #: the upstream was opened for the request in flight (not reused): a failure
        #: on it is the target's answer, not a keep-alive race, so it is not retried
        self.fresh = False

    # -- waiting for the next request ----------------------------------------------------
    @property
    def request_timeout(self) -> float:
        """Seconds for the next request head: the whole first head within the head
        timeout (slowloris), later ones may idle up to the idle timeout."""
        return self.policy.head_timeout if self.first else self.policy.idle_timeout

    def idle_end(self, buffered: int, *, eof: bool) -> http.HTTPError | None:
        """The wait for a request head ended (``eof``: the client closed; else the
        timeout passed) with ``buffered`` bytes of a head: the error to answer, or
        None to close quietly (an idle kept-alive connection, a client done)."""
        if eof:
            return http.HTTPError(400, "connection closed in the middle of a head") \
                if buffered else None
        if buffered or self.first:
            return http.HTTPError(408, "request head not received in time")
        return None

    def started(self) -> None:
        """An exchange starts (counted once, whichever driver runs it)."""
        self.first = False
        self.policy.requests += 1

    def withdrawn(self) -> None:
        """The exchange just counted goes back to be started again (a retry)."""
        self.policy.requests -= 1

    # -- target ----------------------------------------------------------------------------
    @staticmethod
    def classify(head: http.RequestHead) -> tuple[str, http.Target]:
        """TUNNEL (CONNECT host:port), LOCAL (origin form: the gateway's own endpoints)
        or RELAY (absolute form), with the target; HTTPError when malformed."""
        target = http.parse_target(head)
        if head.method == b"CONNECT":
            if target.form != "authority":
                raise http.HTTPError(400, "CONNECT needs host:port")
            return TUNNEL, target
        return (RELAY if target.form == "absolute" else LOCAL), target

    # -- authorisation ----------------------------------------------------------------------
    def authorised(self, user: str | None) -> str:
        """The outcome of checking a request's proxy credentials (None: not verified):
        the user to act as ("-" when authentication is off), or a 407."""
        if not self.policy.auth:
            return "-"
        if user is None:
            raise http.HTTPError(407, "proxy authentication required")
        return user

    # -- allow-list decisions made on this connection ----------------------------------------
    def known_address(self, host: str, port: int, user: str) -> str | None:
        """The checked address of (host, port) for ``user`` when the decision was made
        on this connection before (not made or audited again)."""
        up = self.upstream
        return up.decided.get((host, port, user)) if up is not None else None

    def remember(self, host: str, port: int, user: str, address: str) -> None:
        """A decision made (and audited) for the current upstream's target."""
        assert self.upstream is not None
        self.upstream.decided[(host, port, user)] = address

    # -- upstream choice -------------------------------------------------------------------
    def choose_upstream(self, address: str, port: int, *, idle: bool) -> UpstreamStep:
        """Before relaying to the checked ``address``: keep the current upstream if it
        goes there and is ``idle`` (quiet and open, as the driver found it); else let
        it go - pooled when it is clean and goes elsewhere, closed when stale - and
        the driver takes a pooled connection or opens one (:meth:`attach`)."""
        up = self.upstream
        if up is None:
            return UpstreamStep(False, None, None)
        if up.key == (address, port):
            if idle:
                return UpstreamStep(True, None, None)
            self.upstream = None
            return UpstreamStep(False, None, up)
        self.upstream = None
        return UpstreamStep(False, up, None)

    def attach(self, upstream: Upstream, *, fresh: bool) -> Upstream | None:
        """``upstream`` carries the next request (``fresh``: opened for it, not taken
        from the pool); returns the one it replaces, clean, for the pool."""
        old, self.upstream = self.upstream, upstream
        self.fresh = fresh
        return old if old is not upstream else None

    def detach(self) -> Upstream | None:
        """Let go of the upstream (it failed, or a tunnel took it over)."""
        up, self.upstream = self.upstream, None
        return up

    # -- retry --------------------------------------------------------------------------------
    def may_retry(self, method: bytes, *, head_sent: bool, body_sent: bool,
                  answered: bool) -> bool:
        """The upstream failed or closed during a request: send it again on a fresh
        connection? Only when the upstream was a reused one (an origin may close an
        idle connection just as a request goes out) - and the head could not even be
        sent, or nothing came back for a request that may be repeated (idempotent, no
        body). A fresh connection's failure is the target's answer (502)."""
        if self.fresh:
            return False
        if not head_sent:
            return True
        return not answered and not body_sent and method in IDEMPOTENT

    # -- after an exchange ---------------------------------------------------------------------
    def done(self, *, client_keep: bool, upstream_keep: bool,
             spoiled: bool = False) -> tuple[bool, Upstream | None]:
        """A response has been relayed whole. Returns whether the client connection
        stays open (its wish and version, as :func:`http.relay_response` read them)
        and an upstream to close (the origin will close it, or it sent bytes beyond
        its response: ``spoiled``)."""
        self.fresh = False
        drop = None
        if not upstream_keep or spoiled:
            drop, self.upstream = self.upstream, None
        return client_keep, drop

    # -- the fast lane -------------------------------------------------------------------------
    def use_lane(self, plain: bool) -> bool:
        """Does the fast lane serve this connection now (a plain socket, lane on)?"""
        return plain and self.policy.fast_lane

    def lane_route(self, host: str, port: int, user: str | None,
                   pooled: Callable[[tuple[str, int, str]], bool]) -> LaneRoute:
        """May the fast lane send a request to (host, port) for ``user`` (None: the
        credentials are not verified recently) without waiting? SERVE on the current
        upstream when the decision was made on this connection; with an address
        literal the decision is made now (``decision``, for the driver to audit):
        REFUSE (403), SERVE on the current upstream, or TAKE_POOLED when the pool
        holds a connection there. HANDOFF for anything that needs waiting (a
        credential check, a name to resolve, a connect)."""
        if user is None:
            if self.policy.auth:
                return _HANDOFF
            user = "-"
        up = self.upstream
        if up is not None:
            address = up.decided.get((host, port, user))
            if address is not None and up.key == (address, port):
                return DECIDED
        decision = self.policy.allow.decide_literal(host, port)
        if decision is None:
            return _HANDOFF  # a name: resolving it needs the coroutine path
        if not decision.allowed:
            return LaneRoute(REFUSE, decision)
        assert decision.address is not None
        key = (decision.address, port)
        if up is not None and up.key == key:
            return LaneRoute(SERVE, decision)
        if pooled((*key, user)):
            return LaneRoute(TAKE_POOLED, decision)
        return _HANDOFF  # a connect is needed: the coroutine path opens it

    def lane_takes_request(self, head: http.RequestHead) -> bool:
        """Whether a request that the quick path did not take may still be served by
        the fast lane (its target then goes through :meth:`lane_route`): a plain
        request on an upstream - not CONNECT, ``Expect`` or an upgrade."""
        lower = head.headers._lower
        return self.upstream is not None and head.method != b"CONNECT" \
            and b"expect" not in lower and b"upgrade" not in lower

    def lane_takes_body(self, framing: http.BodyFraming, buffered: int) -> bool:
        """A request body the fast lane sends along with the head: none, or a
        Content-Length body that has already arrived whole."""
        return framing == http.NO_BODY or (framing[0] == "length"
                                           and framing[1] <= buffered)  # type: ignore[operator]

    def lane_takes_response(self, status: int, framing: http.BodyFraming,
                            arrived: int) -> bool:
        """A response the fast lane relays itself: final, not to be decoded, with a
        Content-Length (at most FAST_BODY_MAX still to come) or no body. Interim
        responses, chunked or close-delimited bodies, big bodies (the coroutine's
        pump splices them) and gzip decoding are handed over."""
        if status < 200 or self.policy.gzip_decode:
            return False
        if framing == http.NO_BODY:
            return True
        return framing[0] == "length" and framing[1] - arrived <= FAST_BODY_MAX  # type: ignore[operator]

    def lane_takes_quick_response(self, length: int, arrived: int) -> bool:
        """The same rule for a response the quick path parsed (final, with a length)."""
        return not self.policy.gzip_decode and length - arrived <= FAST_BODY_MAX

"""The gateway's sans-IO connection object: every decision both drivers ask of it
(issue 7 item 19). No sockets: upstreams are opaque markers."""

from __future__ import annotations

import itertools

import pytest

from kakehashi.gateway import http
from kakehashi.gateway.allow import AllowList
from kakehashi.gateway.connection import (
    DECIDED,
    FAST_BODY_MAX,
    HANDOFF,
    IDEMPOTENT,
    LOCAL,
    REFUSE,
    RELAY,
    SERVE,
    TAKE_POOLED,
    TUNNEL,
    GatewayConnection,
    Policy,
)
from kakehashi.gateway.exchange import Upstream

METHODS = [b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE", b"POST", b"PATCH",
           b"PROPFIND", b"MKCOL", b"CONNECT"]


def policy(**kw) -> Policy:
    kw.setdefault("allow", AllowList(["10.0.0.0/8:80", "intranet.example"]))
    return Policy(via=b"kakehashi", head_timeout=10, idle_timeout=60, read_timeout=30, **kw)


def up(address: str = "10.0.0.1", port: int = 80) -> Upstream:
    return Upstream((address, port), object())  # type: ignore[arg-type]


def head(line: bytes, *fields: bytes) -> http.RequestHead:
    return http.parse_request(line + b"\r\nHost: h" + b"".join(b"\r\n" + f for f in fields))


# -- waiting for requests ----------------------------------------------------------------
def test_the_first_head_has_the_head_timeout_later_ones_the_idle_timeout():
    gc = GatewayConnection(policy())
    assert gc.request_timeout == 10 and gc.first
    gc.started()
    assert gc.request_timeout == 60 and not gc.first


@pytest.mark.parametrize(("first", "eof", "buffered"),
                         list(itertools.product([True, False], [True, False], [0, 5])))
def test_what_the_end_of_a_wait_for_a_head_means(first, eof, buffered):
    gc = GatewayConnection(policy())
    if not first:
        gc.started()
    error = gc.idle_end(buffered, eof=eof)
    # the client closed: half a head is a 400, none is a client done; the time ran
    # out: half a head, or silence on a new connection, is a 408, else a quiet close
    closed = 400 if buffered else None
    timed_out = 408 if (buffered or first) else None
    assert (error.status if error else None) == (closed if eof else timed_out)


def test_exchanges_are_counted_once_and_a_retry_is_withdrawn():
    p = policy()
    a, b = GatewayConnection(p), GatewayConnection(p)
    a.started()
    b.started()
    b.started()
    assert p.requests == 3
    b.withdrawn()
    assert p.requests == 2


# -- target -----------------------------------------------------------------------------
@pytest.mark.parametrize(("line", "kind", "where"), [
    (b"CONNECT h.example:443 HTTP/1.1", TUNNEL, ("h.example", 443)),
    (b"GET http://h.example:8080/x HTTP/1.1", RELAY, ("h.example", 8080)),
    (b"PROPFIND http://h.example/dav/ HTTP/1.1", RELAY, ("h.example", 80)),
    (b"GET /.well-known/kakehashi/events/t HTTP/1.1", LOCAL, ("", 0)),
    (b"OPTIONS * HTTP/1.1", LOCAL, ("", 0)),
])
def test_what_a_request_is(line, kind, where):
    got, target = GatewayConnection.classify(head(line))
    assert got == kind and (target.host, target.port) == where


@pytest.mark.parametrize("line", [b"CONNECT h.example:443/x HTTP/1.1", b"GET * HTTP/1.1",
                                  b"GET https://h.example/ HTTP/1.1"])
def test_malformed_targets_are_400(line):
    with pytest.raises(http.HTTPError) as err:
        GatewayConnection.classify(head(line))
    assert err.value.status == 400


# -- authorisation ------------------------------------------------------------------------
@pytest.mark.parametrize(("auth", "user", "expect"), [
    (False, None, "-"), (False, "alice", "-"), (True, "alice", "alice"), (True, None, 407)])
def test_authorisation_outcome(auth, user, expect):
    gc = GatewayConnection(policy(auth=auth))
    if expect == 407:
        with pytest.raises(http.HTTPError) as err:
            gc.authorised(user)
        assert err.value.status == 407
    else:
        assert gc.authorised(user) == expect


# -- upstream choice ------------------------------------------------------------------------
def test_no_upstream_means_take_or_open():
    step = GatewayConnection(policy()).choose_upstream("10.0.0.1", 80, idle=True)
    assert step == (False, None, None)


def test_the_same_address_idle_goes_on_on_the_same_upstream():
    u = up()
    gc = GatewayConnection(policy(), u)
    assert gc.choose_upstream("10.0.0.1", 80, idle=True) == (True, None, None)
    assert gc.upstream is u


def test_the_same_address_stale_is_closed_and_replaced():
    u = up()
    gc = GatewayConnection(policy(), u)
    assert gc.choose_upstream("10.0.0.1", 80, idle=False) == (False, None, u)
    assert gc.upstream is None


@pytest.mark.parametrize("idle", [True, False])
@pytest.mark.parametrize("other", [("10.0.0.2", 80), ("10.0.0.1", 81)])
def test_another_address_gives_the_clean_upstream_to_the_pool(idle, other):
    u = up()
    gc = GatewayConnection(policy(), u)
    assert gc.choose_upstream(*other, idle=idle) == (False, u, None)
    assert gc.upstream is None


def test_attach_detach_and_fresh():
    gc = GatewayConnection(policy())
    a, b = up(), up("10.0.0.2")
    assert gc.attach(a, fresh=True) is None and gc.fresh
    assert gc.attach(b, fresh=False) is a and not gc.fresh  # the replaced one, for the pool
    assert gc.detach() is b and gc.upstream is None and gc.detach() is None


def test_decisions_are_remembered_per_target_and_user_on_the_upstream():
    gc = GatewayConnection(policy(), up())
    assert gc.known_address("h", 80, "-") is None
    gc.remember("h", 80, "-", "10.0.0.1")
    assert gc.known_address("h", 80, "-") == "10.0.0.1"
    assert gc.known_address("h", 80, "alice") is None  # another user decides again
    assert gc.known_address("h", 81, "-") is None
    gc.detach()
    assert gc.known_address("h", 80, "-") is None


# -- retry ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("fresh", "head_sent", "body_sent", "answered", "method"),
                         list(itertools.product([True, False], [True, False], [True, False],
                                                [True, False], METHODS)))
def test_retry_rule(fresh, head_sent, body_sent, answered, method):
    gc = GatewayConnection(policy())
    gc.attach(up(), fresh=fresh)
    got = gc.may_retry(method, head_sent=head_sent, body_sent=body_sent, answered=answered)
    if fresh:  # a connection opened for this request: its failure is the answer
        assert got is False
    elif not head_sent:  # nothing went out on the reused connection
        assert got is True
    else:  # something went out: only a repeatable request that got nothing back
        assert got is (not answered and not body_sent and method in IDEMPOTENT)


def test_a_reused_upstream_is_retried_once_then_the_fresh_one_is_final():
    gc = GatewayConnection(policy(), up())
    assert gc.may_retry(b"GET", head_sent=True, body_sent=False, answered=False)
    gc.attach(up(), fresh=True)  # the retry's connection
    assert not gc.may_retry(b"GET", head_sent=True, body_sent=False, answered=False)
    gc.done(client_keep=True, upstream_keep=True)  # after an exchange it is a reused one
    assert gc.may_retry(b"GET", head_sent=True, body_sent=False, answered=False)


# -- keep-alive -----------------------------------------------------------------------------
@pytest.mark.parametrize(("client_keep", "upstream_keep", "spoiled"),
                         list(itertools.product([True, False], repeat=3)))
def test_what_stays_open_after_an_exchange(client_keep, upstream_keep, spoiled):
    u = up()
    gc = GatewayConnection(policy(), u)
    keep, drop = gc.done(client_keep=client_keep, upstream_keep=upstream_keep, spoiled=spoiled)
    assert keep is client_keep
    if upstream_keep and not spoiled:
        assert drop is None and gc.upstream is u
    else:
        assert drop is u and gc.upstream is None


def test_done_without_an_upstream():
    assert GatewayConnection(policy()).done(client_keep=True, upstream_keep=False) == (True, None)


# -- the fast lane --------------------------------------------------------------------------
@pytest.mark.parametrize(("plain", "lane"), list(itertools.product([True, False], repeat=2)))
def test_the_lane_serves_plain_connections_when_on(plain, lane):
    assert GatewayConnection(policy(fast_lane=lane)).use_lane(plain) is (plain and lane)


def never_pooled(key) -> bool:
    return False


def test_lane_route_serves_what_this_connection_decided():
    gc = GatewayConnection(policy(), up())
    gc.remember("intranet.example", 80, "-", "10.0.0.1")
    assert gc.lane_route("intranet.example", 80, "-", never_pooled) == (SERVE, None)
    # the same name to another port, or for another user, was not decided here
    assert gc.lane_route("intranet.example", 8080, "-", never_pooled).action == HANDOFF
    assert GatewayConnection(policy(auth=True), gc.upstream).lane_route(
        "intranet.example", 80, "bob", never_pooled).action == HANDOFF


def test_a_decision_made_before_is_answered_with_decided_itself():
    """The fast lane tells the usual answer by identity (``is DECIDED``) and skips the
    rest of the routing for it: only a decision made on this connection before may be
    that object - one made now must come with its decision, to be audited."""
    gc = GatewayConnection(policy(), up("10.0.0.1"))
    fresh = gc.lane_route("10.0.0.1", 80, "-", never_pooled)
    assert fresh is not DECIDED and fresh.decision is not None
    refused = gc.lane_route("192.0.2.1", 80, "-", never_pooled)
    assert refused is not DECIDED
    gc.remember("10.0.0.1", 80, "-", "10.0.0.1")
    assert gc.lane_route("10.0.0.1", 80, "-", never_pooled) is DECIDED
    assert DECIDED == (SERVE, None)


def test_lane_route_hands_over_what_needs_waiting():
    gc = GatewayConnection(policy(auth=True), up())
    gc.remember("10.0.0.1", 80, "alice", "10.0.0.1")
    # credentials not verified lately: the coroutine verifies them
    assert gc.lane_route("10.0.0.1", 80, None, never_pooled).action == HANDOFF
    assert gc.lane_route("10.0.0.1", 80, "alice", never_pooled).action == SERVE
    # a name needs resolving; a literal elsewhere needs a connect
    gc = GatewayConnection(policy())
    assert gc.lane_route("intranet.example", 80, "-", never_pooled).action == HANDOFF
    assert gc.lane_route("10.0.0.9", 80, "-", never_pooled).action == HANDOFF


def test_lane_route_decides_address_literals_on_the_spot():
    gc = GatewayConnection(policy(), up("10.0.0.1"))
    refused = gc.lane_route("192.0.2.1", 80, "-", never_pooled)
    assert refused.action == REFUSE and not refused.decision.allowed  # to audit, then 403
    assert gc.lane_route("10.0.0.1", 81, "-", never_pooled).action == REFUSE  # port not allowed
    same = gc.lane_route("10.0.0.1", 80, "-", never_pooled)
    assert same.action == SERVE and same.decision.address == "10.0.0.1"  # audit, remember
    asked = []

    def pooled(key) -> bool:
        asked.append(key)
        return True

    taken = gc.lane_route("10.0.0.7", 80, "-", pooled)
    assert taken.action == TAKE_POOLED and taken.decision.address == "10.0.0.7"
    assert asked == [("10.0.0.7", 80, "-")]  # pooled per checked address and user


@pytest.mark.parametrize(("line", "fields", "with_upstream", "expect"), [
    (b"GET http://h/ HTTP/1.1", (), True, True),
    (b"GET http://h/ HTTP/1.1", (), False, False),
    (b"CONNECT h:443 HTTP/1.1", (), True, False),
    (b"POST http://h/ HTTP/1.1", (b"Expect: 100-continue", b"Content-Length: 3"), True, False),
    (b"GET http://h/ HTTP/1.1", (b"Connection: upgrade", b"Upgrade: websocket"), True, False),
])
def test_which_requests_the_lane_takes(line, fields, with_upstream, expect):
    gc = GatewayConnection(policy(), up() if with_upstream else None)
    assert gc.lane_takes_request(head(line, *fields)) is expect


@pytest.mark.parametrize(("framing", "buffered", "expect"), [
    (http.NO_BODY, 0, True), (("length", 0), 0, True), (("length", 10), 10, True),
    (("length", 10), 9, False), (http.CHUNKED, 100, False),
])
def test_which_request_bodies_the_lane_sends(framing, buffered, expect):
    assert GatewayConnection(policy()).lane_takes_body(framing, buffered) is expect


@pytest.mark.parametrize(("status", "framing", "arrived", "gzip", "expect"), [
    (200, ("length", 100), 0, False, True),
    (200, ("length", FAST_BODY_MAX), 0, False, True),
    (200, ("length", FAST_BODY_MAX + 1), 0, False, False),  # big: the pump splices it
    (200, ("length", FAST_BODY_MAX + 1), 1, False, True),
    (204, http.NO_BODY, 0, False, True),
    (200, http.CHUNKED, 0, False, False),
    (200, http.UNTIL_CLOSE, 0, False, False),
    (103, http.NO_BODY, 0, False, False),  # interim responses: the coroutine path
    (200, ("length", 100), 0, True, False),  # gzip decoding: the coroutine path
])
def test_which_responses_the_lane_relays(status, framing, arrived, gzip, expect):
    gc = GatewayConnection(policy(gzip_decode=gzip))
    assert gc.lane_takes_response(status, framing, arrived) is expect
    if status >= 200 and framing[0] == "length":  # the quick path's answer agrees
        assert gc.lane_takes_quick_response(framing[1], arrived) is expect


# -- the switch, in a real server on loopback ----------------------------------------------
async def _serve_once(lane: bool, monkeypatch) -> tuple[list[str], bytes]:
    """One keep-alive client sends two requests through a GatewayServer; which
    drivers ran (the fast lane is recorded when it starts)."""
    import asyncio

    from kakehashi.core.stream import Listener
    from kakehashi.gateway import fastlane, server

    ran: list[str] = []
    real = fastlane.FastLane.run

    async def recorded(self):
        ran.append("lane")
        return await real(self)

    monkeypatch.setattr(fastlane.FastLane, "run", recorded)

    async def origin(reader, writer):
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    osrv = await asyncio.start_server(origin, "127.0.0.1", 0)
    oport = osrv.sockets[0].getsockname()[1]
    gw = server.GatewayServer(AllowList(["127.0.0.1"]),
                              settings=server.GatewaySettings(fast_lane=lane))
    listener = Listener("127.0.0.1", 0, gw.handle_connection)
    listener.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.address[1])
        req = f"GET http://127.0.0.1:{oport}/ HTTP/1.1\r\nHost: 127.0.0.1:{oport}\r\n\r\n"
        got = b""
        for _ in range(2):
            writer.write(req.encode())
            got += await asyncio.wait_for(reader.readuntil(b"ok"), 10)
        writer.close()
    finally:
        await listener.close()
        gw.close()
        osrv.close()
    assert gw.requests == 2
    return ran, got


@pytest.mark.parametrize("lane", [True, False])
async def test_the_switch_turns_the_fast_lane_off_and_the_answers_stay(lane, monkeypatch):
    ran, got = await _serve_once(lane, monkeypatch)
    assert got.count(b"HTTP/1.1 200 OK") == 2
    assert (ran != []) is lane

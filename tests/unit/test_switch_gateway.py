"""Pieces of the gateway that need no server: UDP flow expiry, stream bookkeeping."""

from __future__ import annotations

import asyncio

from kakehashi.switch import messages as m
from kakehashi.switch.gateway import Gateway, GatewayConfig, GwTunnel
from tests.support.wait import async_wait_until


def gateway() -> Gateway:
    return Gateway(GatewayConfig(server="http://127.0.0.1:1", user="u", password="p",
                                 name="gw"))


async def test_idle_udp_flows_end_and_tell_the_other_side() -> None:
    gw = gateway()
    t = GwTunnel(id="t1", side="listen", proto="udp", address="127.0.0.1:0", service="s",
                 window=m.DEFAULT_WINDOW)
    gw.tunnels[t.id] = t
    gw.udp_in(t, b"hello", ("127.0.0.1", 5000))
    gw.udp_in(t, b"again", ("127.0.0.1", 5000))
    gw.udp_in(t, b"other", ("127.0.0.1", 5001))
    assert len(t.streams) == 2 and t.peers == {("127.0.0.1", 5000): 1,
                                              ("127.0.0.1", 5001): 2}
    sweep = asyncio.ensure_future(gw._udp_sweep(t, idle=0.05))
    try:
        await async_wait_until(lambda: not t.streams, 5, what="idle flows ended")
    finally:
        sweep.cancel()
    assert t.peers == {}
    sent = m.decode_to_server(gw.take())
    assert [type(x).__name__ for x in sent].count("Reset") == 2
    assert [x for x in sent if isinstance(x, m.Open)] == [
        m.Open(tunnel="t1", stream=1, peer="127.0.0.1:5000"),
        m.Open(tunnel="t1", stream=2, peer="127.0.0.1:5001")]


async def test_datagrams_are_dropped_not_queued_without_bound() -> None:
    gw = gateway()
    t = GwTunnel(id="t1", side="listen", proto="udp", address="127.0.0.1:0", service="s",
                 window=m.DEFAULT_WINDOW)
    for _ in range(400):
        gw.udp_in(t, b"x" * 60_000, ("127.0.0.1", 5000))
    assert gw.outbox.bytes <= 9 * 1024 * 1024


async def test_messages_for_unknown_tunnels_get_a_reset() -> None:
    gw = gateway()
    gw._stream_msg(m.Data(tunnel="tnope", stream=3, data=b"x"))
    gw._stream_msg(m.Credit(tunnel="tnope", stream=3, n=5))  # late credit: nothing
    assert m.decode_to_server(gw.take()) == [
        m.Reset(tunnel="tnope", stream=3, reason="no such tunnel in this gateway")]


def test_throttled_logins_are_retried_wrong_passwords_are_not() -> None:
    import json

    from kakehashi.switch.gateway import Fatal, _http_refusal

    body = json.dumps({"error": {"code": "x", "message": "wrong user or password"}}).encode()
    assert isinstance(_http_refusal(401, body), Fatal)
    assert not isinstance(_http_refusal(429, body), Fatal)
    assert not isinstance(_http_refusal(400, m.encode(m.Refused(code="locked-out",
                                                                error="later"))), Fatal)
    assert isinstance(_http_refusal(403, m.encode(m.Refused(code="gateway-not-yours",
                                                            error="no"))), Fatal)


async def test_the_gateways_link_window_holds_data_not_control() -> None:
    from kakehashi.switch.mux import LinkPacer

    gw = gateway()
    gw.pacer = LinkPacer(floor=128 * 1024)
    for i in range(20):
        gw.send(m.Data(tunnel="t1", stream=1 + i % 2, data=b"x" * m.MAX_CHUNK))
    first = b""
    while body := gw.take_link():
        first += body
    assert 128 * 1024 <= len(first) < 128 * 1024 + 3 * m.MAX_CHUNK
    assert not gw.out_ready.is_set() and gw.outbox
    gw.send(m.Reset(tunnel="t1", stream=3))
    assert m.decode_to_server(gw.take_link()) == [m.Reset(tunnel="t1", stream=3)]
    await gw._handle([m.Ack(n=len(first))])  # the server took it: room again
    assert gw.out_ready.is_set() and gw.take_link()
    # each body from the server is acknowledged with the running total
    body = m.encode(m.Credit(tunnel="tnope", stream=1, n=1))
    gw.received = 10
    await gw.receive(body)
    assert m.Ack(n=10 + len(body)) in m.decode_to_server(gw.take(1 << 30))
    import pytest

    with pytest.raises(m.ProtocolError):
        await gw._handle([m.Ack(n=gw.pacer.sent_total + 1)])

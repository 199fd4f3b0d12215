"""The relay link without TLS (``inner --link-tls off``, for a link inside one trusted
network): bytes move by splice, and a dial still needs the one-time ticket of the
relay information it follows, so reaching the inner relay's port is not enough."""

from __future__ import annotations

import socket

from kakehashi.core import wire
from kakehashi.ondemand import messages as m
from tests.e2e.framework import stream_through
from tests.e2e.ondemand_fixtures import IMSI, OnDemand


def _dial(port: int, dial: m.Dial) -> m.DialResult:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(wire.PREAMBLE + m.link_codec.encode(dial))
        dec = wire.FrameDecoder(m.LINK_LIMITS)
        while (frame := dec.next_frame()) is None:
            data = s.recv(4096)
            assert data, "closed without an answer"
            dec.feed(data)
    return m.link_codec.decode(frame.payload)


def test_plain_link_with_tickets(env, echo):
    od = OnDemand(env, inner_args=("--link-tls", "off")).start()
    g = od.grant(f"{IMSI}:{echo.port}", "--ttl", "60s")
    sent, got, n = stream_through(g["port"], 8 << 20)
    assert n == 8 << 20 and sent == got
    inner_port = od.procs["core-1"].bound_port()
    before = echo.connections
    for ticket in ("", "forged-ticket"):
        res = _dial(inner_port, m.Dial(grant=g["id"], imsi=IMSI, address="127.0.0.1",
                                       port=echo.port, ticket=ticket))
        assert not res.ok and "ticket" in res.reason
    assert echo.connections == before

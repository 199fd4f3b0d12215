"""Two on-demand manager replicas on one Redis (``--db redis://``), edges attached to
either (issue 11, "The on-demand manager with its store in Redis"): a grant made on
one replica is enforced by an edge of the other, and a revocation or extension made
on either reaches the edge at once, cutting a live connection."""

from __future__ import annotations

import json
import logging
import socket
import time
from typing import Any

import pytest

from tests.e2e.framework import Env, roundtrip, stream_through, wait_until
from tests.e2e.ondemand_fixtures import IMSI, OnDemand
from tests.support.wait import wait_closed

log = logging.getLogger(__name__)


class Replicas:
    """Managers A and B on one Redis; edge-a (carrier a) on A, edge-b (carrier b) and
    the inner relay of the device on B."""

    def __init__(self, env: Env, redis_url: str) -> None:
        self.od = OnDemand(env, db=redis_url)
        self.env = env
        self.url: dict[str, str] = {}
        for name in ("A", "B"):
            proc = env.spawn(f"manager-{name}", "ondemand", "manager", "--listen",
                             "127.0.0.1:0", "--db", redis_url, "--tls", "off",
                             "--audit-log", str(env.root / f"audit-{name}.jsonl"))
            self.url[name] = f"http://127.0.0.1:{proc.bound_port()}"
        lo, hi = self.od.ports
        mid = (lo + hi) // 2
        inner = env.spawn("inner", "ondemand", "inner", "--server", self.url["B"],
                          "--token-file", self.od.tokens["inner"], "--name", "core-1",
                          "--listen", "127.0.0.1:0", "--device", f"{IMSI}=127.0.0.1")
        edges = [self._edge("edge-a", "A", (lo, mid), "a"),
                 self._edge("edge-b", "B", (mid + 1, hi), "b")]
        inner.wait_for("inner core-1 online")
        for name, proc in edges:
            proc.wait_for(f"edge {name} online")

    def _edge(self, name: str, replica: str, ports: tuple[int, int], carrier: str):
        return name, self.env.spawn(
            name, "ondemand", "edge", "--server", self.url[replica], "--token-file",
            self.od.tokens["edge"], "--name", name, "--public-host", "127.0.0.1",
            "--ports", f"{ports[0]}-{ports[1]}", "--carrier", carrier)

    def cli(self, replica: str, *args: str) -> Any:
        res = self.env.run("ondemand", *args, "--server", self.url[replica], "--token-file",
                           self.od.tokens["admin"], "--json")
        return json.loads(res.stdout) if res.stdout.strip() else None

    def grant(self, replica: str, target: str, carrier: str, *opts: str) -> dict[str, Any]:
        return self.cli(replica, "grant", target, "--policy", "carrier", "--carrier", carrier,
                        *opts)

    def events(self, replica: str, gid: str, pred, what: str) -> list[dict]:
        return wait_until(lambda: (lambda e: e if pred(e) else None)(
            self.cli(replica, "events", gid)), 20, what=what, interval=0.2)


@pytest.fixture
def two(env, redis_url):
    return Replicas(env, redis_url)


def test_a_grant_made_on_one_replica_works_through_the_edge_of_the_other(two, echo):
    g = two.grant("A", f"{IMSI}:{echo.port}", "b", "--ttl", "60s")
    assert g["edge"] == "edge-b"  # attached to replica B: A had B open the port
    sent, got, n = stream_through(g["port"], 1 << 20)
    assert n == 1 << 20 and sent == got
    # both replicas know the grant and its trail (the edge reported to B)
    for replica in ("A", "B"):
        evs = two.events(replica, g["id"],
                         lambda e: any(x["event"] == "closed" for x in e), "closed")
        kinds = [e["event"] for e in evs]
        assert kinds[0] == "created" and "connected" in kinds
        assert [e["seq"] for e in evs] == sorted({e["seq"] for e in evs})
    assert g["id"] in {x["id"] for x in two.cli("B", "grants")}
    online = {e["name"]: e["online"] for e in two.cli("A", "edges")}
    assert online == {"edge-a": True, "edge-b": True}  # A lists B's edge as online too


def test_extend_and_revoke_on_one_replica_reach_the_edge_of_the_other(two, echo):
    """The grant is made on A for edge-a (attached to A), the device's inner relay is on
    B (the dial ticket crosses replicas); B extends it past its first expiry, then B
    revokes it and the live connection through edge-a is cut."""
    g = two.grant("A", f"{IMSI}:{echo.port}", "a", "--ttl", "6s")
    assert g["edge"] == "edge-a"
    c = socket.create_connection(("127.0.0.1", g["port"]), timeout=10)
    try:
        c.sendall(b"a")
        assert c.recv(10) == b"a"
        assert two.cli("B", "extend", g["id"], "--ttl", "60s")["expires_in"] > 30
        wait_until(lambda: time.time() >= g["expires_at_ts"] + 0.5, 10,
                   what="the first expiry passed")
        c.sendall(b"b")
        assert c.recv(10) == b"b"  # edge-a heard the extension made on B
        assert roundtrip(g["port"], b"new connection") == b"new connection"
        t0 = time.monotonic()
        two.cli("B", "revoke", g["id"])
        revoked = time.monotonic()
        wait_closed(c, timeout=10)
        cut = time.monotonic()
    finally:
        c.close()
    assert cut - t0 < 10  # generous: the broadcast itself takes milliseconds
    evs = two.events("A", g["id"], lambda e: any(x["event"] == "closed" and
                                                 x["reason"] == "revoked" for x in e),
                     "the live connection closed by the revocation")
    deleted = next(e for e in evs if e["event"] == "deleted")
    closed = next(e for e in evs if e["event"] == "closed" and e["reason"] == "revoked")
    assert deleted["reason"] == "revoked"
    log.info("revoke on B: the CLI took %.3f s (process start included), the live "
             "connection through edge-a (on A) was cut %.3f s after the CLI returned; "
             "edge-a's 'closed' is %+.3f s from B's 'deleted' record",
             revoked - t0, cut - revoked, closed["ts"] - deleted["ts"])
    assert [e["event"] for e in evs].count("deleted") == 1
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", g["port"]), timeout=2).close()

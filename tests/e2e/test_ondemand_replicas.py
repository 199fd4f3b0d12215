"""Two on-demand manager replicas on one Redis (``--db redis://``), edges attached to
either (issue 11, "The on-demand manager with its store in Redis"): a grant made on
one replica is enforced by an edge of the other, and a revocation or extension made
on either reaches the edge at once, cutting a live connection."""

from __future__ import annotations

import json
import logging
import re
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


# -- a replica killed outright ------------------------------------------------------------
class Failover:
    """Managers A and B on one Redis; every relay names both (``--server`` twice), A
    first for edge-a and the inner relay, B first for edge-b."""

    def __init__(self, env: Env, redis_url: str) -> None:
        self.od = OnDemand(env, db=redis_url)
        self.env = env
        self.url: dict[str, str] = {}
        self.procs: dict[str, Any] = {}
        self.name: dict[str, str] = {}  # replica names, from their logs
        for name in ("A", "B"):
            proc = env.spawn(f"manager-{name}", "ondemand", "manager", "--listen",
                             "127.0.0.1:0", "--db", redis_url, "--tls", "off")
            self.url[name] = f"http://127.0.0.1:{proc.bound_port()}"
            self.procs[name] = proc
            self.name[name] = re.search(r"manager replica (\S+) on",
                                        proc.wait_for(re.compile(r"manager replica \S+ on")))[1]
        lo, hi = self.od.ports
        mid = (lo + hi) // 2
        first = {"edge-a": ("A", "B"), "edge-b": ("B", "A"), "inner": ("A", "B")}
        self.relays = {
            "inner": env.spawn("inner", "ondemand", "inner", *self._servers(first["inner"]),
                               "--token-file", self.od.tokens["inner"], "--name", "core-1",
                               "--listen", "127.0.0.1:0", "--device", f"{IMSI}=127.0.0.1"),
            "edge-a": self._edge("edge-a", first["edge-a"], (lo, mid), "a"),
            "edge-b": self._edge("edge-b", first["edge-b"], (mid + 1, hi), "b"),
        }
        self.relays["inner"].wait_for(f"inner core-1 online (manager {self.url['A']})")
        for name, order in first.items():
            if name != "inner":
                self.relays[name].wait_for(
                    re.compile(rf"edge {name} online: \d+ grants open "
                               rf"\(manager {re.escape(self.url[order[0]])}\)"))

    def _servers(self, order: tuple[str, ...]) -> list[str]:
        return [arg for r in order for arg in ("--server", self.url[r])]

    def _edge(self, name: str, order: tuple[str, ...], ports: tuple[int, int], carrier: str):
        return self.env.spawn(name, "ondemand", "edge", *self._servers(order), "--token-file",
                              self.od.tokens["edge"], "--name", name, "--public-host",
                              "127.0.0.1", "--ports", f"{ports[0]}-{ports[1]}",
                              "--carrier", carrier)

    def api(self, replica: str, method: str, path: str, body: Any = None) -> Any:
        """The REST API straight (no CLI start: a revocation is timed through it)."""
        import urllib.request
        from pathlib import Path

        token = Path(self.od.tokens["admin"]).read_text().strip()
        req = urllib.request.Request(
            self.url[replica] + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def grant(self, replica: str, carrier: str, port: int) -> dict[str, Any]:
        made = self.api(replica, "POST", "/v1/grants", {
            "targets": [{"imsi": IMSI, "port": port}], "ttl": 120, "policy": "carrier",
            "carrier": carrier})["grants"]
        return made[0]

    def holders(self, replica: str) -> dict[str, Any]:
        return {e["name"]: e["replica"] for e in self.api(replica, "GET", "/v1/edges")}


def _connect(port: int) -> socket.socket:
    c = socket.create_connection(("127.0.0.1", port), timeout=10)
    c.sendall(b"ping")
    assert c.recv(10) == b"ping"
    return c


def test_a_replica_killed_its_edges_fail_over_and_obey_the_survivor(env, redis_url, echo):
    """kill -9 of replica A: edge-a and the inner relay (attached to A) move to B; B's
    grants are enforced by edge-a; a live connection of a grant made on A survives and
    is cut by B's revocation; every revocation reaches its edge within a second; the
    dead replica's announcements are gone."""
    two = Failover(env, redis_url)
    a, b = two.name["A"], two.name["B"]
    assert two.holders("B") == {"edge-a": a, "edge-b": b}
    old = two.grant("A", "a", echo.port)
    assert old["edge"] == "edge-a"
    c_old = _connect(old["port"])

    two.procs["A"].kill9()
    two.relays["edge-a"].wait_for(re.compile(
        rf"edge edge-a online: 1 grants open \(manager {re.escape(two.url['B'])}\)"))
    two.relays["inner"].wait_for(f"inner core-1 online (manager {two.url['B']})")
    # nothing is left announced by the dead replica: B holds both edges
    wait_until(lambda: two.holders("B") == {"edge-a": b, "edge-b": b}, 10,
               what="both edges held by B", interval=0.1)
    c_old.sendall(b"still")  # the live connection went on through the failover
    assert c_old.recv(10) == b"still"

    new = two.grant("B", "a", echo.port)  # made on the survivor, for the moved edge
    assert new["edge"] == "edge-a"
    other = two.grant("B", "b", echo.port)
    assert other["edge"] == "edge-b"
    live = {g["id"]: _connect(g["port"]) for g in (new, other)}
    live[old["id"]] = c_old
    try:
        for gid, conn in live.items():
            t0 = time.monotonic()
            two.api("B", "DELETE", f"/v1/grants/{gid}")
            wait_closed(conn, timeout=10)
            took = time.monotonic() - t0
            log.info("revocation of %s on B: the live connection was cut after %.3f s",
                     gid, took)
            assert took < 1.0, f"revocation of {gid} took {took:.3f} s to reach its edge"
    finally:
        for conn in live.values():
            conn.close()
    for g in (old, new, other):
        with pytest.raises(OSError):
            _connect(g["port"])

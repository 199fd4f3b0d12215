"""Restarts: the manager keeps its grants in the store and the relays find it again; an
edge that restarts re-opens the ports of the live grants it serves (one system for both,
processes cost seconds to start)."""

from __future__ import annotations

from tests.e2e.framework import roundtrip, wait_until
from tests.e2e.ondemand_fixtures import IMSI, OnDemand


def test_manager_and_edge_restarts(env, echo):
    od = OnDemand(env).start()
    g = od.grant(f"{IMSI}:{echo.port}", "--ttl", "60s")
    ended = od.grant(f"{IMSI}:{echo.port}", "--ttl", "60s")

    # the manager restarts (same port, same database): grants are kept
    od.procs["manager"].stop()
    od.manager()
    edge, inner = od.procs["edge-1"], od.procs["core-1"]
    wait_until(lambda: edge.output().count("edge edge-1 online") >= 2
               and inner.output().count("inner core-1 online") >= 2, 20,
               what="edge and inner back on the restarted manager")
    assert {x["id"] for x in od.cli("grants")} == {g["id"], ended["id"]}
    assert roundtrip(g["port"], b"still granted") == b"still granted"
    kinds = [e["event"] for e in od.events(g["id"])]
    assert kinds[0] == "created" and "connected" in kinds

    # the edge dies; a grant ends meanwhile; the new edge re-opens only the live one
    edge.kill9()
    od.cli("revoke", ended["id"])
    od.edge()
    assert roundtrip(g["port"], b"re-opened") == b"re-opened"
    assert "1 grants open" in od.procs["edge-1"].output()

"""Per-user caps of the switch server: gateway names a user may own and tunnels a user
may hold (``--max-gateways-per-user``, ``--max-tunnels-per-user``). A burst of
requests at once admits no more than the cap, with a clear refusal (HTTP status, code,
message) and an audit line for each of the rest; on several nodes sharing a Redis
store the cap holds over all of them together."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import httpx
import pytest

from kakehashi.core.audit import AuditLog
from kakehashi.core.store import open_store
from kakehashi.core.web import ApiError
from kakehashi.switch import messages as m
from kakehashi.switch import tunnels as tn
from kakehashi.switch.server import (
    GATEWAY,
    Link,
    ServerSettings,
    ServiceIn,
    SwitchServer,
    Who,
    build_app,
)
from tests.support.wait import async_wait_until

ASP, ALICE = Who(user="asp1", role="asp"), Who(user="alice", role="user")
PASSWORD = "caps-password-1"


async def answer_setups(srv: SwitchServer, links: list[Link]) -> None:
    """Both gateways, reduced to answering every instruction at once with success."""
    while True:
        waits = [asyncio.ensure_future(link.ready.wait()) for link in links]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        for link in links:
            for msg in m.decode_to_gateway(link.take()) if link.outbox else []:
                if isinstance(msg, (m.Setup, m.Delete)):
                    await srv.receive(link, m.encode(m.Done(
                        req=msg.req, tunnel=msg.tunnel, ok=True, address="127.0.0.1:9")))


def audit_lines(path: Path, event: str) -> list[dict]:
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    return [x for x in lines if x["event"] == event]


async def test_a_burst_of_100_opens_admits_the_cap_and_refuses_the_rest(tmp_path):
    audit = tmp_path / "audit.jsonl"
    srv = SwitchServer(open_store(tmp_path / "s.db"), audit=AuditLog(str(audit)),
                       settings=ServerSettings(max_tunnels_per_user=10), kdf_n=2**10)
    srv.add_user("alice", "user", PASSWORD)
    srv_link, _ = await srv.attach(m.Hello(name="gw-srv"), ASP, "websocket")
    alice_link, _ = await srv.attach(m.Hello(name="gw-alice"), ALICE, "websocket")
    srv.register(ASP, ServiceIn(name="echo", gateway="gw-srv", target="127.0.0.1:7",
                                allow=["alice"]))
    gateways = asyncio.create_task(answer_setups(srv, [srv_link, alice_link]))
    auth = {"authorization": "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()
                                                         ).decode()}
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(srv)),
                                     base_url="http://switch", headers=auth,
                                     timeout=60) as api:
            await api.get("/v1/whoami")  # the password checked once, then remembered
            body = {"service": "echo", "gateway": "gw-alice", "listen": "127.0.0.1:0"}
            answers = await asyncio.gather(*[api.post("/v1/tunnels", json=body)
                                             for _ in range(100)])
            statuses = sorted(r.status_code for r in answers)
            assert statuses == [201] * 10 + [403] * 90
            refused = next(r.json() for r in answers if r.status_code == 403)["error"]
            assert refused["code"] == "tunnel-limit"
            assert "10 tunnels" in refused["message"]
            assert "--max-tunnels-per-user" in refused["message"]
            assert len(srv.switch.tunnels) == 10
            denied = [x for x in audit_lines(audit, "tunnel-open")
                      if x["decision"] == "deny"]
            assert len(denied) == 90 and "10 tunnels" in denied[0]["reason"]
            # closing one frees its place for exactly one more
            tid = next(r.json()["tunnel"] for r in answers if r.status_code == 201)
            assert (await api.delete(f"/v1/tunnels/{tid}")).status_code == 200
            again = await asyncio.gather(*[api.post("/v1/tunnels", json=body)
                                           for _ in range(5)])
            assert sorted(r.status_code for r in again) == [201] + [403] * 4
    finally:
        gateways.cancel()
        await srv.close()


async def test_a_burst_of_new_gateway_names_admits_the_cap(tmp_path):
    audit = tmp_path / "audit.jsonl"
    srv = SwitchServer(open_store(tmp_path / "s.db"), audit=AuditLog(str(audit)),
                       settings=ServerSettings(max_gateways_per_user=5))
    results = await asyncio.gather(*[srv.attach(m.Hello(name=f"gw-{i}"), ALICE, "poll")
                                     for i in range(100)], return_exceptions=True)
    refused = [r for r in results if isinstance(r, tn.Refusal)]
    assert len(refused) == 95 and {r.code for r in refused} == {"gateway-limit"}
    assert {r.status for r in refused} == {403}
    owned = sorted(n for n, o in srv.switch.gateway_owner.items() if o == "alice")
    assert len(owned) == 5 and len(srv.store.list(GATEWAY)) == 5
    denied = [x for x in audit_lines(audit, "gateway-online") if x["decision"] == "deny"]
    assert len(denied) == 95 and "5 gateways" in denied[0]["reason"]
    # a name of theirs comes back (a new link) at the cap; another user has their own
    await srv.attach(m.Hello(name=owned[0]), ALICE, "poll")
    await srv.attach(m.Hello(name="gw-bob"), Who(user="bob", role="user"), "poll")


# -- several nodes on one Redis store ---------------------------------------------------------
@pytest.fixture
async def two_nodes(redis_url):
    made = []
    for name in ("n1", "n2"):
        srv = SwitchServer(open_store(redis_url), node=name, cluster_url=redis_url,
                           settings=ServerSettings(max_gateways_per_user=5,
                                                   max_tunnels_per_user=10))
        await srv.cluster.start()
        made.append(srv)
    try:
        yield made
    finally:
        for srv in made:
            await srv.cluster.close()


async def test_the_tunnel_cap_holds_over_two_nodes(two_nodes):
    n1, n2 = two_nodes
    await n1.attach(m.Hello(name="gw-srv"), ASP, "websocket")
    await n1.attach(m.Hello(name="gw-alice"), ALICE, "websocket")
    n1.register(ASP, ServiceIn(name="echo", gateway="gw-srv", target="127.0.0.1:7",
                               allow=["alice"]))

    async def begin(node: SwitchServer) -> bool:
        try:
            await node.begin_tunnel(ALICE, "echo", "gw-alice", "127.0.0.1:0")
        except ApiError as exc:
            assert (exc.status, exc.code) == (403, "tunnel-limit")
            return False
        return True

    admitted = await asyncio.gather(*[begin(node) for _ in range(50) for node in two_nodes])
    assert admitted.count(True) == 10
    assert len(n1.switch.tunnels) + len(n2.switch.tunnels) == 10
    # one deleted on its home frees one place, on either node
    home = n1 if n1.switch.tunnels else n2
    t = next(iter(home.switch.tunnels.values()))
    await home.close_tunnel(ALICE, t.id, wait=False)
    for req, (side, what) in list(t.reqs.items()):  # both gateways confirm the deletion
        if what == "delete":
            await home.apply(home.switch.on_done(t.gw(side), m.Done(
                req=req, tunnel=t.id, ok=True), 0))
    assert t.state is tn.State.DELETED
    await async_wait_until(lambda: not home.cluster._down.get(tn.tunnels_key("alice")),
                           what="the count-down written")
    other = n2 if home is n1 else n1
    assert await begin(other) is True
    assert await begin(home) is False


async def test_the_gateway_name_cap_holds_over_two_nodes(two_nodes):
    results = await asyncio.gather(*[node.attach(m.Hello(name=f"gw-{i}-{node.node}"), ALICE,
                                                 "poll")
                                     for i in range(20) for node in two_nodes],
                                   return_exceptions=True)
    kept = [r for r in results if not isinstance(r, BaseException)]
    assert all(isinstance(r, tn.Refusal) and r.code == "gateway-limit"
               for r in results if isinstance(r, BaseException))
    stored = [n for n, doc in two_nodes[0].store.list(GATEWAY) if doc["owner"] == "alice"]
    assert 1 <= len(kept) == len(stored) <= 5


async def test_a_removed_gateway_name_frees_its_place(tmp_path):
    srv = SwitchServer(open_store(tmp_path / "s.db"),
                       settings=ServerSettings(max_gateways_per_user=1))
    link, _ = await srv.attach(m.Hello(name="gw-1"), ALICE, "poll")
    with pytest.raises(tn.Refusal):
        await srv.attach(m.Hello(name="gw-2"), ALICE, "poll")
    with pytest.raises(ApiError) as exc:
        await srv.remove_gateway(ALICE, "gw-1")
    assert (exc.value.status, exc.value.code) == (409, "gateway-online")
    srv.detach(link, "stopped")
    with pytest.raises(ApiError) as exc:
        await srv.remove_gateway(Who(user="mallory", role="user"), "gw-1")
    assert exc.value.status == 404
    assert await srv.remove_gateway(ALICE, "gw-1") == {"name": "gw-1", "removed": True}
    assert srv.store.get(GATEWAY, "gw-1") is None
    await srv.attach(m.Hello(name="gw-2"), ALICE, "poll")
    # a server started on the store later knows it is gone too
    assert "gw-1" not in SwitchServer(srv.store).switch.gateway_owner


async def test_a_name_removed_on_one_node_is_free_on_the_other(two_nodes):
    n1, n2 = two_nodes
    link, _ = await n1.attach(m.Hello(name="gw-x"), ALICE, "poll")
    n1.detach(link, "stopped")
    await n1.cluster._drop_presence("gw-x")  # (detach drops it in a task of its own)
    n2.refresh()
    assert n2.switch.gateway_owner.get("gw-x") == "alice"
    assert await n2.remove_gateway(ALICE, "gw-x") == {"name": "gw-x", "removed": True}
    # n1 still remembered alice as its owner: the store decides, for mallory now
    await n1.attach(m.Hello(name="gw-x"), Who(user="mallory", role="user"), "poll")
    with pytest.raises(tn.Refusal) as exc:
        await n2.attach(m.Hello(name="gw-x"), ALICE, "poll")
    assert exc.value.code == "gateway-not-yours"
    with pytest.raises(ApiError) as exc:  # connected on n1: n2 will not remove it
        await n2.remove_gateway(Who(user="mallory", role="user"), "gw-x")
    assert exc.value.code == "gateway-online"

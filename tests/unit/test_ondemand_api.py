"""The manager's REST API in-process: tokens and roles, clear errors that change nothing,
the OpenAPI document, and a grant opened by a (simulated) edge over the control channel."""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from kakehashi.core import tls
from kakehashi.core.identity import ApiTokens
from kakehashi.core.store import open_store
from kakehashi.ondemand import messages as m
from kakehashi.ondemand.manager import Manager, ManagerSettings, build_app
from tests.support.wait import wait_until

IMSI = "001010000000001"


def test_api_tokens_store_only_a_hash():
    store = open_store(":memory:")
    tokens = ApiTokens(store, roles=("client", "admin"))
    info, text = tokens.create("client", "alice")
    assert tokens.verify(text) == info
    assert text.split("_", 2)[2] not in str(store.list("api-token"))
    for bad in [None, "", "kkt", text + "x", "kkt_" + info.id + "_wrong", "Bearer " + text,
                "kkt_000000000000_" + text.split("_", 2)[2]]:
        assert tokens.verify(bad) is None
    with pytest.raises(ValueError):
        tokens.create("root")
    assert tokens.remove(info.id) and tokens.verify(text) is None


@pytest.fixture
def api(tmp_path):
    store = open_store(tmp_path / "od.db")
    mgr = Manager(store, settings=ManagerSettings(edge_wait=0, open_timeout=2),
                  ca_home=tmp_path / "relay-ca")
    tokens = {r: mgr.tokens.create(r)[1] for r in ("client", "edge", "inner", "admin")}
    with TestClient(build_app(mgr)) as client:
        client.tokens = tokens  # type: ignore[attr-defined]
        client.mgr = mgr  # type: ignore[attr-defined]
        yield client


def auth(api, role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api.tokens[role]}"}


def register_device(api) -> None:
    r = api.put(f"/v1/devices/{IMSI}", json={"address": "127.0.0.1", "inner": "core-1"},
                headers=auth(api, "inner"))
    assert r.status_code == 200, r.text


def test_openapi_document_and_error_shape(api):
    doc = api.get("/openapi.json").json()
    assert "/v1/grants" in doc["paths"] and "/v1/grants/{gid}/events" in doc["paths"]
    r = api.get("/v1/grants")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
    r = api.get("/v1/grants", headers={"Authorization": "Bearer kkt_nope"})
    assert r.status_code == 401
    r = api.get("/v1/nothing-here", headers=auth(api, "admin"))
    assert r.status_code == 404 and "error" in r.json()


def test_roles(api):
    # an edge token cannot ask for grants, a client cannot register devices
    r = api.post("/v1/grants", json={"targets": [{"imsi": IMSI, "port": 22}], "ttl": 60},
                 headers=auth(api, "edge"))
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = api.put(f"/v1/devices/{IMSI}", json={"address": "127.0.0.1", "inner": "core-1"},
                headers=auth(api, "client"))
    assert r.status_code == 403
    assert api.get("/v1/tokens", headers=auth(api, "client")).status_code == 403
    assert api.get("/v1/tokens", headers=auth(api, "admin")).status_code == 200


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"targets": [{"imsi": "001010000000009", "port": 22}], "ttl": 60}, 404, "unknown-imsi"),
    ({"targets": [{"imsi": IMSI, "port": 0}], "ttl": 60}, 400, "bad-port"),
    ({"targets": [{"imsi": IMSI, "port": 22}], "ttl": 0}, 400, "bad-ttl"),
    ({"targets": [{"imsi": IMSI, "port": 22}], "ttl": "2d"}, 400, "bad-ttl"),
    ({"targets": [{"imsi": IMSI, "port": 22}], "ttl": "soon"}, 400, "bad-duration"),
    ({"targets": [{"imsi": IMSI, "port": 22}], "ttl": 60, "cidrs": ["1.2.3.4/99"]}, 400,
     "bad-cidr"),
    ({"targets": [{"imsi": IMSI, "port": 22}], "ttl": 60, "tls": True, "auth_info": "a0"},
     404, "unknown-auth-info"),
    ({"targets": [{"imsi": IMSI, "port": 22}], "ttl": 60}, 503, "no-edge"),
    ({"targets": "x", "ttl": 60}, 422, "bad-request"),
])
def test_bad_grants_change_nothing(api, body, status, code):
    register_device(api)
    before = api.mgr.store.list("od-grant"), api.mgr.store.list("od-event")
    r = api.post("/v1/grants", json=body, headers=auth(api, "client"))
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert (api.mgr.store.list("od-grant"), api.mgr.store.list("od-event")) == before
    assert api.get("/v1/grants", headers=auth(api, "admin")).json() == []


def test_body_limit(api):
    r = api.post("/v1/auth-infos", content=b"x" * 300_000, headers={
        **auth(api, "client"), "Content-Type": "application/json"})
    assert r.status_code == 413


def test_auth_info_registration(api, tmp_path):
    ca = tls.DevCA(tmp_path / "clients")
    r = api.post("/v1/auth-infos", json={"ca_pem": ca.ca_path.read_text()},
                 headers=auth(api, "client"))
    assert r.status_code == 201 and r.json()["id"].startswith("a")
    r = api.post("/v1/auth-infos", json={"ca_pem": "nonsense"}, headers=auth(api, "client"))
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad-ca"


def fake_edge(api, name="edge-1", ports=(31000, 31009), *, answer=True):
    """An edge on the control channel that acknowledges every open (in a thread)."""
    _, csr = tls.new_key_and_csr(name)
    ws_cm = api.websocket_connect("/v1/relays/control", headers=auth(api, "edge"))
    ws = ws_cm.__enter__()
    ws.send_text(m.encode(m.Hello(kind="edge", name=name, csr=csr.decode(),
                                  public_host="127.0.0.1", ports=ports)))
    welcome = m.decode_to_relay(ws.receive_text())
    assert isinstance(welcome, m.Welcome) and "BEGIN CERTIFICATE" in welcome.cert
    opened: list[dict] = []

    def loop() -> None:
        try:
            while True:
                msg = m.decode_to_relay(ws.receive_text())
                if isinstance(msg, m.Open):
                    opened.append(msg.grant)
                    if answer:
                        ws.send_text(m.encode(m.Ack(req=msg.req, ok=True)))
                elif isinstance(msg, m.Close):
                    opened.append({"closed": msg.grant, "reason": msg.reason})
        except Exception:
            return

    threading.Thread(target=loop, daemon=True).start()
    return ws_cm, opened


def test_grant_revoke_extend_and_events(api):
    register_device(api)
    ws_cm, opened = fake_edge(api)
    try:
        r = api.post("/v1/grants", json={"targets": [{"imsi": IMSI, "port": 22}],
                                         "ttl": "10m", "cidrs": ["10.0.0.0/8"]},
                     headers=auth(api, "client"))
        assert r.status_code == 201, r.text
        gr = r.json()["grants"][0]
        assert 31000 <= gr["port"] <= 31009 and gr["edge"] == "edge-1"
        assert gr["policy"] == "random" and gr["reason"] and gr["expires_at"].endswith("Z")
        assert opened[0]["id"] == gr["id"] and opened[0]["cidrs"] == ["10.0.0.0/8"]
        # another client's token does not see it; admin does
        other = api.mgr.tokens.create("client")[1]
        r = api.get(f"/v1/grants/{gr['id']}", headers={"Authorization": f"Bearer {other}"})
        assert r.status_code == 404
        r = api.post(f"/v1/grants/{gr['id']}/extend", json={"ttl": "1h"},
                     headers=auth(api, "admin"))
        assert r.status_code == 200 and r.json()["expires_in"] > 3000
        r = api.delete(f"/v1/grants/{gr['id']}", headers=auth(api, "client"))
        assert r.status_code == 200 and r.json()["status"] == "revoked"
        assert api.delete(f"/v1/grants/{gr['id']}",
                          headers=auth(api, "client")).status_code == 409
        evs = api.get(f"/v1/grants/{gr['id']}/events", headers=auth(api, "client")).json()
        assert [e["event"] for e in evs] == ["created", "extended", "deleted"]
        assert evs[2]["reason"] == "revoked"
    finally:
        ws_cm.__exit__(None, None, None)


def test_an_edge_that_does_not_answer_fails_the_grant_cleanly(api):
    register_device(api)
    ws_cm, opened = fake_edge(api, answer=False)
    try:
        r = api.post("/v1/grants", json={"targets": [{"imsi": IMSI, "port": 22}], "ttl": 60},
                     headers=auth(api, "client"))
        assert r.status_code == 503 and r.json()["error"]["code"] == "edge-unreachable"
        # the edge is told to close what it may still open late
        gid = opened[0]["id"]
        wait_until(lambda: {"closed": gid, "reason": "failed"} in opened, 10,
                   what="the edge told to close the failed grant's port")
        assert api.mgr.store.list("od-grant") == []
        assert api.get("/v1/grants", headers=auth(api, "admin")).json() == []
    finally:
        ws_cm.__exit__(None, None, None)


def test_a_wrong_role_cannot_register_a_relay(api):
    _, csr = tls.new_key_and_csr("x")
    with api.websocket_connect("/v1/relays/control", headers=auth(api, "inner")) as ws:
        ws.send_text(m.encode(m.Hello(kind="edge", name="x", csr=csr.decode(),
                                      public_host="127.0.0.1", ports=(1, 2))))
        msg = m.decode_to_relay(ws.receive_text())
        assert isinstance(msg, m.Refused) and msg.code == "forbidden"


def test_a_relay_token_with_a_name_registers_only_that_relay(api):
    tok = api.mgr.tokens.create("edge", "edge-7")[1]
    _, csr = tls.new_key_and_csr("edge-8")
    with api.websocket_connect("/v1/relays/control",
                               headers={"Authorization": f"Bearer {tok}"}) as ws:
        ws.send_text(m.encode(m.Hello(kind="edge", name="edge-8", csr=csr.decode(),
                                      public_host="127.0.0.1", ports=(1, 2))))
        msg = m.decode_to_relay(ws.receive_text())
        assert isinstance(msg, m.Refused) and "edge-7" in msg.error


def test_garbage_on_the_control_channel_is_refused(api):
    with api.websocket_connect("/v1/relays/control", headers=auth(api, "edge")) as ws:
        ws.send_text('{"type": "hello", "kind": "edge"}')
        msg = m.decode_to_relay(ws.receive_text())
        assert isinstance(msg, m.Refused) and msg.code == "protocol"
    with api.websocket_connect("/v1/relays/control", headers=auth(api, "edge")) as ws:
        ws.send_bytes(b"\x00" * 10)
        with pytest.raises(WebSocketDisconnect):
            ws.receive_text()


def test_several_targets_in_one_request(api):
    register_device(api)
    api.put("/v1/devices/001010000000002", json={"address": "127.0.0.2", "inner": "core-1"},
            headers=auth(api, "inner"))
    ws_cm, opened = fake_edge(api, ports=(31000, 31001))
    try:
        r = api.post("/v1/grants", json={"targets": [{"imsi": IMSI, "port": 22},
                                                     {"imsi": "001010000000002", "port": 80}],
                                         "ttl": 60}, headers=auth(api, "client"))
        assert r.status_code == 201, r.text
        made = r.json()["grants"]
        assert {g["port"] for g in made} == {31000, 31001}  # one port each, same edge
        assert {g["imsi"] for g in made} == {IMSI, "001010000000002"}
        assert len({g["expires_at"] for g in made}) == 1
        # the edge's range is now full: the next grant fails cleanly
        r = api.post("/v1/grants", json={"targets": [{"imsi": IMSI, "port": 23}], "ttl": 60},
                     headers=auth(api, "client"))
        assert r.status_code == 503 and r.json()["error"]["code"] == "no-port"
        assert len(opened) == 2
    finally:
        ws_cm.__exit__(None, None, None)


def test_grants_expire_and_ended_ones_are_deleted_after_retention(api):

    api.mgr.s.retention = 0.3
    register_device(api)
    ws_cm, opened = fake_edge(api)
    try:
        r = api.post("/v1/grants", json={"targets": [{"imsi": IMSI, "port": 22}], "ttl": 0.5},
                     headers=auth(api, "client"))
        gid = r.json()["grants"][0]["id"]
        wait_until(lambda: api.get(f"/v1/grants/{gid}",
                                   headers=auth(api, "admin")).status_code != 200, 10,
                   what="the expired grant deleted")
        assert {"closed": gid, "reason": "expired"} in opened  # the edge was told
        assert api.mgr.store.list("od-grant") == [] and api.mgr.store.list("od-event") == []
    finally:
        ws_cm.__exit__(None, None, None)

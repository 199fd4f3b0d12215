"""The switch's sans-IO decisions: S1-S7, rollback, the switch table, limits."""

from __future__ import annotations

import pytest

from kakehashi.switch import messages as m
from kakehashi.switch import tunnels as tn
from kakehashi.switch.tunnels import Audit, Changed, Send, State


def sends(actions: list, gateway: str | None = None) -> list:
    return [a.msg for a in actions if isinstance(a, Send)
            and (gateway is None or a.gateway == gateway)]


def audits(actions: list) -> list[tuple[str, bool]]:
    return [(a.event, a.allow) for a in actions if isinstance(a, Audit)]


@pytest.fixture
def sw() -> tn.Switch:
    s = tn.Switch(setup_timeout=5, delete_timeout=5, offline_grace=30, window=128 * 1024)
    s.gateway_hello("gw-srv", "asp1", [], 0)
    s.gateway_hello("gw-alice", "alice", [], 0)
    s.gateway_hello("gw-mallory", "mallory", [], 0)
    s.register(tn.Service(name="echo", owner="asp1", gateway="gw-srv",
                          target="127.0.0.1:7007", allow=["alice"], max_connections=2), "asp")
    return s


def setups(actions: list) -> tuple[m.Setup, m.Setup]:
    a = next(x for x in sends(actions, "gw-alice") if isinstance(x, m.Setup))
    b = next(x for x in sends(actions, "gw-srv") if isinstance(x, m.Setup))
    return a, b


def established(sw: tn.Switch) -> tn.Tunnel:
    t, actions = sw.open_tunnel("alice", "user", "echo", "gw-alice", "127.0.0.1:7100", 0)
    a, b = setups(actions)
    sw.on_done("gw-alice", m.Done(req=a.req, tunnel=t.id, ok=True, address="127.0.0.1:7100"), 0)
    sw.on_done("gw-srv", m.Done(req=b.req, tunnel=t.id, ok=True), 0)
    assert t.state is State.ESTABLISHED
    return t


def test_s1_registration_needs_the_asps_own_gateway(sw: tn.Switch) -> None:
    svc = tn.Service(name="x", owner="asp1", gateway="gw-alice", target="h:1")
    with pytest.raises(tn.Refusal) as exc:
        sw.register(svc, "asp")
    assert exc.value.code == "gateway-not-yours"
    with pytest.raises(tn.Refusal) as exc:
        sw.register(tn.Service(name="y", owner="alice", gateway="gw-alice", target="h:1"),
                    "user")
    assert exc.value.status == 403
    for bad in ("h", "h:0", "h:99999"):
        with pytest.raises(tn.Refusal):
            sw.register(tn.Service(name="z", owner="asp1", gateway="gw-srv", target=bad), "asp")
    assert set(sw.services) == {"echo"}


def test_s2_presentation_shows_only_valid_services(sw: tn.Switch) -> None:
    assert [r["name"] for r in sw.catalog("alice", "user")] == ["echo"]
    assert sw.catalog("mallory", "user") == []
    own = sw.catalog("asp1", "asp")[0]
    assert own["target"] == "127.0.0.1:7007" and own["connections"] == 0
    assert "target" not in sw.catalog("alice", "user")[0]


def test_s3_to_s5_then_s6_s7(sw: tn.Switch) -> None:
    t, actions = sw.open_tunnel("alice", "user", "echo", "gw-alice", "127.0.0.1:7100", 0)
    assert t.state is State.SETTING
    a, b = setups(actions)
    assert (a.side, a.address) == ("listen", "127.0.0.1:7100")  # S3a: server-side pseudo socket
    assert (b.side, b.address) == ("connect", "127.0.0.1:7007")  # S3b: client-side
    out = sw.on_done("gw-srv", m.Done(req=b.req, tunnel=t.id, ok=True), 0)
    assert t.state is State.SETTING and ("report-S4b", True) in audits(out)
    out = sw.on_done("gw-alice", m.Done(req=a.req, tunnel=t.id, ok=True,
                                        address="127.0.0.1:7100"), 0)
    assert t.state is State.ESTABLISHED and Changed(t.id) in out
    assert t.view()["listen"] == "127.0.0.1:7100"
    out = sw.close_tunnel("alice", "user", t.id, 1)
    assert t.state is State.DELETING
    deletes = {a.gateway: a.msg for a in out if isinstance(a, Send)}
    assert set(deletes) == {"gw-alice", "gw-srv"}
    sw.on_done("gw-alice", m.Done(req=deletes["gw-alice"].req, tunnel=t.id, ok=True), 1)
    assert t.state is State.DELETING
    out = sw.on_done("gw-srv", m.Done(req=deletes["gw-srv"].req, tunnel=t.id, ok=True), 1)
    assert t.state is State.DELETED and ("tunnel-deleted", True) in audits(out)


def test_rollback_when_one_gateway_fails(sw: tn.Switch) -> None:
    t, actions = sw.open_tunnel("alice", "user", "echo", "gw-alice", "127.0.0.1:7100", 0)
    a, b = setups(actions)
    sw.on_done("gw-alice", m.Done(req=a.req, tunnel=t.id, ok=True, address="x:1"), 0)
    out = sw.on_done("gw-srv", m.Done(req=b.req, tunnel=t.id, ok=False,
                                      error="cannot reach 127.0.0.1:7007"), 0)
    assert t.state is State.DELETING and "cannot reach" in t.reason
    # only the side that built its half is told to delete it
    assert [type(x) for x in sends(out, "gw-alice")] == [m.Delete]
    assert sends(out, "gw-srv") == []
    d = sends(out, "gw-alice")[0]
    sw.on_done("gw-alice", m.Done(req=d.req, tunnel=t.id, ok=True), 0)
    assert t.state is State.DELETED and "cannot reach" in t.reason


def test_rollback_when_a_gateway_times_out(sw: tn.Switch) -> None:
    t, actions = sw.open_tunnel("alice", "user", "echo", "gw-alice", "127.0.0.1:7100", 0)
    a, _ = setups(actions)
    sw.on_done("gw-alice", m.Done(req=a.req, tunnel=t.id, ok=True, address="x:1"), 0)
    assert sw.tick(4.9) == []
    out = sw.tick(5.0)
    assert t.state is State.DELETING and "gw-srv did not report in time" in t.reason
    assert {type(x) for x in sends(out, "gw-alice")} == {m.Delete}
    # the late side is told to delete too, in case its setup still arrives
    assert {type(x) for x in sends(out, "gw-srv")} == {m.Delete}
    d = sends(out, "gw-alice")[0]
    sw.on_done("gw-alice", m.Done(req=d.req, tunnel=t.id, ok=True), 5)
    assert t.state is State.DELETED


def test_deletion_that_is_never_confirmed_ends_anyway(sw: tn.Switch) -> None:
    t = established(sw)
    sw.close_tunnel("alice", "user", t.id, 10)
    sw.tick(14.9)
    assert t.state is State.DELETING
    sw.tick(15)
    assert t.state is State.DELETED and "did not confirm" in t.reason


@pytest.mark.parametrize("user,service,gateway,code", [
    ("mallory", "echo", "gw-mallory", "unknown-service"),
    ("alice", "nope", "gw-alice", "unknown-service"),
    ("alice", "echo", "gw-mallory", "gateway-not-yours"),
    ("alice", "echo", "gw-unknown", "gateway-not-yours"),
])
def test_refusals_change_nothing(sw: tn.Switch, user: str, service: str, gateway: str,
                                 code: str) -> None:
    with pytest.raises(tn.Refusal) as exc:
        sw.open_tunnel(user, "user", service, gateway, "127.0.0.1:0", 0)
    assert exc.value.code == code
    assert sw.tunnels == {}


def test_offline_gateway_refuses_setup(sw: tn.Switch) -> None:
    sw.gateway_lost("gw-srv", 0)
    with pytest.raises(tn.Refusal) as exc:
        sw.open_tunnel("alice", "user", "echo", "gw-alice", "127.0.0.1:0", 0)
    assert exc.value.status == 503


def test_a_gateway_name_is_its_users(sw: tn.Switch) -> None:
    with pytest.raises(tn.Refusal):
        sw.gateway_hello("gw-alice", "mallory", [], 0)
    assert sw.gateway_owner["gw-alice"] == "alice"


def test_switch_table_routes_between_the_two_gateways(sw: tn.Switch) -> None:
    t = established(sw)
    out = sw.on_stream("gw-alice", m.Open(tunnel=t.id, stream=1))
    assert sends(out, "gw-srv") == [m.Open(tunnel=t.id, stream=1)]
    assert sw.live["echo"] == 1
    out = sw.on_stream("gw-alice", m.Data(tunnel=t.id, stream=1, data=b"hi"))
    assert sends(out, "gw-srv") == [m.Data(tunnel=t.id, stream=1, data=b"hi")]
    out = sw.on_stream("gw-srv", m.Data(tunnel=t.id, stream=1, data=b"ho"))
    assert sends(out, "gw-alice") == [m.Data(tunnel=t.id, stream=1, data=b"ho")]
    sw.on_stream("gw-alice", m.Eof(tunnel=t.id, stream=1))
    assert 1 in t.streams  # half-closed: the other way still runs
    sw.on_stream("gw-srv", m.Data(tunnel=t.id, stream=1, data=b"more"))
    sw.on_stream("gw-srv", m.Eof(tunnel=t.id, stream=1))
    assert t.streams == {} and sw.live["echo"] == 0


def test_forged_tunnel_and_stream_ids_are_refused(sw: tn.Switch) -> None:
    t = established(sw)
    out = sw.on_stream("gw-mallory", m.Open(tunnel=t.id, stream=1))
    assert [type(x) for x in sends(out)] == [m.Error] and sends(out, "gw-srv") == []
    assert ("refused", False) in audits(out)
    out = sw.on_stream("gw-alice", m.Data(tunnel="tforged", stream=1, data=b"x"))
    assert sends(out, "gw-alice")[0].code == "unknown-tunnel"
    out = sw.on_stream("gw-alice", m.Data(tunnel=t.id, stream=9, data=b"x"))
    assert sends(out, "gw-alice")[0].code == "unknown-stream" and sends(out, "gw-srv") == []
    out = sw.on_stream("gw-srv", m.Open(tunnel=t.id, stream=1))  # wrong side
    assert isinstance(sends(out, "gw-srv")[0], m.Reset) and t.streams == {}
    out = sw.on_done("gw-mallory", m.Done(req=1, tunnel=t.id, ok=True), 0)
    assert sends(out, "gw-mallory")[0].code == "unknown-tunnel"
    assert t.state is State.ESTABLISHED


def test_connection_limit_and_live_counts(sw: tn.Switch) -> None:
    t = established(sw)
    sw.on_stream("gw-alice", m.Open(tunnel=t.id, stream=1))
    sw.on_stream("gw-alice", m.Open(tunnel=t.id, stream=2))
    out = sw.on_stream("gw-alice", m.Open(tunnel=t.id, stream=3))
    assert isinstance(sends(out, "gw-alice")[0], m.Reset)
    assert "2 connections" in sends(out, "gw-alice")[0].reason
    assert ("connection", False) in audits(out) and sw.live["echo"] == 2
    assert sw.catalog("asp1", "asp")[0]["connections"] == 2
    sw.on_stream("gw-srv", m.Reset(tunnel=t.id, stream=1, reason="refused"))
    assert sw.live["echo"] == 1
    out = sw.on_stream("gw-alice", m.Open(tunnel=t.id, stream=3))
    assert sends(out, "gw-srv")


def test_a_cluster_decides_the_limit_when_it_counts(sw: tn.Switch) -> None:
    """admitted=True/False (the cluster's count) overrides this switch's own count;
    None falls back to it (Redis away)."""
    t = established(sw)
    out = sw.on_stream("gw-alice", m.Open(tunnel=t.id, stream=1), admitted=False)
    assert isinstance(sends(out, "gw-alice")[0], m.Reset) and sw.live.get("echo", 0) == 0
    for sid in (2, 3, 4):  # the cluster counted them in: the local count is not the limit
        assert sends(sw.on_stream("gw-alice", m.Open(tunnel=t.id, stream=sid),
                                  admitted=True), "gw-srv")
    assert sw.live["echo"] == 3
    out = sw.on_stream("gw-alice", m.Open(tunnel=t.id, stream=5), admitted=None)
    assert isinstance(sends(out, "gw-alice")[0], m.Reset)  # 3 here, limit 2
    assert sw.catalog("asp1", "asp", {"echo": 7})[0]["connections"] == 7


def test_window_overrun_resets_the_stream(sw: tn.Switch) -> None:
    t = established(sw)
    sw.on_stream("gw-alice", m.Open(tunnel=t.id, stream=1))
    chunk = b"x" * m.MAX_CHUNK
    for _ in range(2):  # the window is 128 KiB
        assert sends(sw.on_stream("gw-alice", m.Data(tunnel=t.id, stream=1, data=chunk)),
                     "gw-srv")
    sw.on_stream("gw-srv", m.Credit(tunnel=t.id, stream=1, n=m.MAX_CHUNK))
    assert sends(sw.on_stream("gw-alice", m.Data(tunnel=t.id, stream=1, data=chunk)), "gw-srv")
    out = sw.on_stream("gw-alice", m.Data(tunnel=t.id, stream=1, data=b"y"))
    assert any(isinstance(x, m.Error) and x.code == "flow-control" for x in sends(out))
    assert {type(x) for x in sends(out, "gw-srv")} == {m.Reset}
    assert t.streams == {}


def test_gateway_loss_resets_streams_and_return_restores(sw: tn.Switch) -> None:
    t = established(sw)
    sw.on_stream("gw-alice", m.Open(tunnel=t.id, stream=1))
    out = sw.gateway_lost("gw-srv", 100)
    assert [type(x) for x in sends(out, "gw-alice")] == [m.Reset]
    assert t.state is State.ESTABLISHED and "gw-srv" in t.offline and sw.live["echo"] == 0
    out = sw.on_stream("gw-alice", m.Open(tunnel=t.id, stream=2))
    assert isinstance(sends(out, "gw-alice")[0], m.Reset)
    welcome, _ = sw.gateway_hello("gw-srv", "asp1", [t.id], 110)
    assert welcome.tunnels == [t.id] and not t.offline


def test_gateway_that_lost_its_tunnel_gets_it_deleted(sw: tn.Switch) -> None:
    t = established(sw)
    sw.gateway_lost("gw-srv", 100)
    welcome, out = sw.gateway_hello("gw-srv", "asp1", [], 101)
    assert welcome.tunnels == []
    assert t.state is State.DELETING
    assert [type(x) for x in sends(out, "gw-alice")] == [m.Delete]


def test_gateway_away_past_the_grace_deletes_its_tunnels(sw: tn.Switch) -> None:
    t = established(sw)
    sw.gateway_lost("gw-srv", 100)
    assert sw.tick(129) == [] or t.state is State.ESTABLISHED
    out = sw.tick(130)
    assert t.state is State.DELETING and "stayed offline" in t.reason
    assert [type(x) for x in sends(out, "gw-alice")] == [m.Delete]


def test_only_the_tunnels_user_closes_it(sw: tn.Switch) -> None:
    t = established(sw)
    with pytest.raises(tn.Refusal):
        sw.close_tunnel("mallory", "user", t.id, 1)
    assert t.state is State.ESTABLISHED
    sw.close_tunnel("root", "admin", t.id, 1)
    assert t.state is State.DELETING


def test_withdrawing_a_service_deletes_its_tunnels(sw: tn.Switch) -> None:
    t = established(sw)
    with pytest.raises(tn.Refusal):
        sw.unregister("echo", "alice", "user")
    sw.unregister("echo", "asp1", "asp")
    assert t.state is State.DELETING and "echo" not in sw.services


# -- durable tunnels: a server restart --------------------------------------------------------
def persisted(actions: list) -> set[str]:
    return {a.tunnel for a in actions if isinstance(a, tn.Persist)}


def restarted(sw: tn.Switch, now: float) -> tuple[tn.Switch, list]:
    """A new Switch with the same catalog and gateways, fed the stored tunnel records
    (as the server keeps them: every tunnel a Persist named, unless deleted)."""
    records = [(t.id, t.doc()) for t in sw.tunnels.values() if t.state is not State.DELETED]
    new = tn.Switch(setup_timeout=5, delete_timeout=5, offline_grace=30, window=128 * 1024)
    new.services = dict(sw.services)
    new.gateway_owner = dict(sw.gateway_owner)
    return new, new.restore(records, now)


def test_every_state_change_asks_for_the_record_to_be_stored(sw: tn.Switch) -> None:
    t, out = sw.open_tunnel("alice", "user", "echo", "gw-alice", "127.0.0.1:7100", 0)
    assert persisted(out) == {t.id}
    a, b = setups(out)
    sw.on_done("gw-alice", m.Done(req=a.req, tunnel=t.id, ok=True, address="127.0.0.1:7"), 0)
    out = sw.on_done("gw-srv", m.Done(req=b.req, tunnel=t.id, ok=True), 0)
    assert persisted(out) == {t.id} and t.doc()["state"] == "established"
    assert t.doc()["address"] == "127.0.0.1:7"
    # a connection is not a state change: no write per connection
    assert persisted(sw.on_stream("gw-alice", m.Open(tunnel=t.id, stream=1))) == set()
    out = sw.close_tunnel("alice", "user", t.id, 1)
    assert persisted(out) == {t.id} and t.state is State.DELETING
    dels = [x for x in sends(out) if isinstance(x, m.Delete)]
    out = []
    for d, gw in zip(dels, ("gw-alice", "gw-srv"), strict=True):
        out += sw.on_done(gw, m.Done(req=d.req, tunnel=t.id, ok=True), 2)
    assert t.state is State.DELETED and persisted(out) == {t.id}


def test_restored_tunnel_comes_back_when_both_halves_report(sw: tn.Switch) -> None:
    t = established(sw)
    new, out = restarted(sw, 1000)
    r = new.tunnels[t.id]
    assert r.state is State.ESTABLISHED and set(r.offline) == {"gw-alice", "gw-srv"}
    assert ("tunnel-restored", True) in audits(out)
    assert r.view()["listen"] == "127.0.0.1:7100" and r.view()["user"] == "alice"
    # no connection while a half is missing
    new.gateway_hello("gw-alice", "alice", [t.id], 1001)
    rst = sends(new.on_stream("gw-alice", m.Open(tunnel=t.id, stream=1)), "gw-alice")
    assert isinstance(rst[0], m.Reset) and "gw-srv" in rst[0].reason
    welcome, out = new.gateway_hello("gw-srv", "asp1", [t.id], 1002)
    assert welcome.tunnels == [t.id] and not r.offline
    assert ("tunnel-reestablished", True) in audits(out)
    out = new.on_stream("gw-alice", m.Open(tunnel=t.id, stream=1))
    assert isinstance(sends(out, "gw-srv")[0], m.Open)
    assert new.tick(1000 + 31) == [] and r.state is State.ESTABLISHED
    # new instructions never reuse a number from before the restart
    assert new._next_req() > max(sw._req, 1000)


def test_restored_half_that_does_not_come_back_is_rolled_back(sw: tn.Switch) -> None:
    t = established(sw)
    new, _ = restarted(sw, 1000)
    new.gateway_hello("gw-alice", "alice", [t.id], 1001)
    assert new.tick(1029) == []
    out = new.tick(1030)
    r = new.tunnels[t.id]
    assert r.state is State.DELETING
    assert r.reason == "gateway gw-srv did not come back after the server restarted"
    assert [type(x) for x in sends(out, "gw-alice")] == [m.Delete]
    assert ("tunnel-deleting", True) in audits(out) and t.id in persisted(out)
    d = sends(out, "gw-alice")[0]
    out = new.on_done("gw-alice", m.Done(req=d.req, tunnel=t.id, ok=True), 1031)
    assert r.state is State.DELETED and ("tunnel-deleted", True) in audits(out)


def test_restored_half_that_the_gateway_lost_deletes_the_tunnel(sw: tn.Switch) -> None:
    t = established(sw)
    new, _ = restarted(sw, 1000)
    new.gateway_hello("gw-alice", "alice", [t.id], 1001)
    welcome, out = new.gateway_hello("gw-srv", "asp1", [], 1002)
    assert welcome.tunnels == [] and new.tunnels[t.id].state is State.DELETING
    assert [type(x) for x in sends(out, "gw-alice")] == [m.Delete]


def test_tunnels_caught_half_way_are_deleted_at_restore(sw: tn.Switch) -> None:
    setting, _ = sw.open_tunnel("alice", "user", "echo", "gw-alice", "127.0.0.1:7100", 0)
    closing = established(sw)
    sw.close_tunnel("alice", "user", closing.id, 1)
    new, out = restarted(sw, 1000)
    assert new.tunnels[setting.id].state is State.DELETED
    assert new.tunnels[setting.id].reason == "the server restarted during setup"
    assert new.tunnels[closing.id].state is State.DELETED
    assert "after a server restart" in new.tunnels[closing.id].reason
    assert persisted(out) == {setting.id, closing.id}  # their records are removed
    assert audits(out) == [("tunnel-deleted", True)] * 2
    # their gateways are told to drop them by the welcome, which lists neither
    welcome, _ = new.gateway_hello("gw-alice", "alice", [setting.id, closing.id], 1001)
    assert welcome.tunnels == []


@pytest.mark.parametrize("doc", [{}, {"id": "tX"}, {"id": "other", "state": "established"},
                                 {**{"id": "tX", "service": "echo", "user": "alice",
                                     "client_gw": "a", "server_gw": "b", "proto": "tcp",
                                     "listen": "h:1", "target": "h:2", "window": 1},
                                  "state": "bogus"}])
def test_a_bad_tunnel_record_is_dropped_not_half_loaded(doc: dict) -> None:
    sw = tn.Switch()
    out = sw.restore([("tX", doc)], 5)
    assert sw.tunnels == {} and persisted(out) == {"tX"}
    assert audits(out) == [("tunnel-restored", False)]


def test_a_user_owns_at_most_the_cap_of_gateway_names() -> None:
    sw = tn.Switch(max_gateways_per_user=2)
    sw.gateway_hello("gw-1", "alice", [], 0, "user")
    sw.gateway_hello("gw-2", "alice", [], 0, "user")
    with pytest.raises(tn.Refusal) as exc:
        sw.gateway_hello("gw-3", "alice", [], 0, "user")
    assert (exc.value.status, exc.value.code) == (403, "gateway-limit")
    assert "2 gateways" in exc.value.message and "gw-3" not in sw.gateway_owner
    sw.gateway_lost("gw-1", 1)
    sw.gateway_hello("gw-1", "alice", [], 2, "user")  # a name of theirs comes back
    sw.gateway_hello("gw-b", "bob", [], 0, "user")  # another user's cap is their own
    sw.gateway_hello("gw-x", "root", [], 0, "admin")
    sw.gateway_hello("gw-y", "root", [], 0, "admin")
    sw.gateway_hello("gw-z", "root", [], 0, "admin")  # an admin has none


def test_a_user_holds_at_most_the_cap_of_tunnels_until_one_is_deleted(sw: tn.Switch) -> None:
    sw.max_tunnels_per_user = 2
    t1, _ = sw.open_tunnel("alice", "user", "echo", "gw-alice", "127.0.0.1:0", 0)
    t2, _ = sw.open_tunnel("alice", "user", "echo", "gw-alice", "127.0.0.1:0", 0)
    with pytest.raises(tn.Refusal) as exc:
        sw.open_tunnel("alice", "user", "echo", "gw-alice", "127.0.0.1:0", 0)
    assert (exc.value.status, exc.value.code) == (403, "tunnel-limit")
    assert "2 tunnels" in exc.value.message and set(sw.tunnels) == {t1.id, t2.id}
    sw.close_tunnel("alice", "user", t1.id, 1)
    assert t1.state is State.DELETING  # not deleted yet: still holds its place
    with pytest.raises(tn.Refusal):
        sw.open_tunnel("alice", "user", "echo", "gw-alice", "127.0.0.1:0", 1)
    sw.tick(100)  # t1's deletion and t2's setup time out
    sw.tick(200)
    assert t1.state is State.DELETED and t2.state is State.DELETED
    assert tn.tunnels_key("alice") not in sw.live
    sw.open_tunnel("alice", "user", "echo", "gw-alice", "127.0.0.1:0", 200)
    with pytest.raises(tn.Refusal):  # a cluster counted the others: at the cap
        sw.open_tunnel("alice", "user", "echo", "gw-alice", "127.0.0.1:0", 200,
                       admitted=False)
    sw.open_tunnel("alice", "user", "echo", "gw-alice", "127.0.0.1:0", 200)
    assert sw.live[tn.tunnels_key("alice")] == 2
    sw.open_tunnel("root", "admin", "echo", "gw-alice", "127.0.0.1:0", 200)  # no cap


def test_a_gateway_name_given_up_frees_its_place(sw: tn.Switch) -> None:
    sw.max_gateways_per_user = 1
    with pytest.raises(tn.Refusal) as exc:
        sw.remove_gateway("gw-alice", "mallory", "user")
    assert exc.value.code == "unknown-gateway"
    with pytest.raises(tn.Refusal) as exc:  # connected
        sw.remove_gateway("gw-alice", "alice", "user")
    assert (exc.value.status, exc.value.code) == (409, "gateway-online")
    t, _ = sw.open_tunnel("alice", "user", "echo", "gw-alice", "127.0.0.1:0", 0)
    sw.gateway_lost("gw-alice", 1)  # the setup rolled back: deleting, not yet deleted
    with pytest.raises(tn.Refusal) as exc:
        sw.remove_gateway("gw-alice", "alice", "user")
    assert exc.value.code == "gateway-in-use"
    sw.tick(100)
    assert t.state is State.DELETED
    sw.gateway_lost("gw-srv", 100)
    with pytest.raises(tn.Refusal) as exc:  # a service is registered through it
        sw.remove_gateway("gw-srv", "asp1", "asp")
    assert exc.value.code == "gateway-in-use" and "echo" in exc.value.message
    with pytest.raises(tn.Refusal):
        sw.gateway_hello("gw-alice-2", "alice", [], 100, "user")  # at the cap
    assert audits(sw.remove_gateway("gw-alice", "alice", "user")) == [
        ("gateway-removed", True)]
    assert "gw-alice" not in sw.gateway_owner
    sw.gateway_hello("gw-alice-2", "alice", [], 100, "user")
    sw.gateway_hello("gw-alice", "bob", [], 100, "user")  # the name is free again

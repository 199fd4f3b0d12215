"""The socket switch refuses bad input clearly and nothing else changes: wrong
passwords, services and gateways that are not the caller's, malformed and oversized
link bodies, forged tunnel and stream IDs; and a gateway behind an HTTP proxy that
requires authentication."""

from __future__ import annotations

import socket

import pytest

from kakehashi.core import wire
from kakehashi.core.apiclient import ApiClientError
from kakehashi.switch import messages as m
from tests.e2e.framework import EchoServer, Env, stream_through
from tests.e2e.switch_fixtures import Switch, password, port_of, raw_link


@pytest.fixture(scope="module")
def sw(tmp_path_factory, echo_mod):
    env = Env(tmp_path_factory.mktemp("switch-hostile"))
    try:
        s = Switch(env).start()
        s.gateway("asp1", "gw-srv")
        s.gateway("alice", "gw-alice")
        s.gateway("mallory", "gw-mallory")
        s.register("echo", echo_mod.addr, allow=("alice",))
        yield s
    finally:
        env.close()


def still_works(sw: Switch, t: dict) -> None:
    sent, got, n = stream_through(port_of(t), 256 * 1024)
    assert sent == got and n == 256 * 1024


def test_wrong_password_is_refused(sw: Switch) -> None:
    res = sw.cli("alice", "list", check=False, pw="not-her-password")
    assert res.returncode != 0 and b"wrong user or password" in res.stderr
    with pytest.raises(ApiClientError) as exc:
        sw.api("nobody", "x").request("GET", "/v1/services")
    assert exc.value.status == 401
    assert any(e["event"] == "login" and e["decision"] == "deny" for e in sw.audit())


def test_services_and_gateways_of_others(sw: Switch, echo_mod: EchoServer) -> None:
    res = sw.cli("mallory", "open", "echo", "--gateway", "gw-mallory", "--json", check=False)
    assert res.returncode != 0 and b"no service 'echo' for you" in res.stderr
    with pytest.raises(ApiClientError) as exc:  # alice through mallory's gateway
        sw.open("echo", gateway="gw-mallory")
    assert exc.value.code == "gateway-not-yours"
    with pytest.raises(ApiClientError) as exc:  # an ASP registering via alice's gateway
        sw.register("sneaky", echo_mod.addr, gateway="gw-alice")
    assert exc.value.code == "gateway-not-yours"
    with pytest.raises(ApiClientError) as exc:  # a user registering at all
        sw.api("alice").request("POST", "/v1/services", {
            "name": "mine", "gateway": "gw-alice", "target": echo_mod.addr})
    assert exc.value.status == 403
    names = [s["name"] for s in sw.api("root").request("GET", "/v1/services")]
    assert "sneaky" not in names and "mine" not in names
    assert sw.api("alice").request("GET", "/v1/tunnels") == []


def test_a_gateway_acting_for_another_user_is_refused(sw: Switch) -> None:
    proc = sw.gateway("mallory", "gw-alice", wait=False)
    assert proc.popen.wait(30) == 1
    assert "acts for another user" in proc.output()
    assert {g["name"]: g["online"] for g in sw.api("alice").request(
        "GET", "/v1/gateways")}["gw-alice"] is True


def test_forged_tunnel_and_stream_ids(sw: Switch) -> None:
    t = sw.open("echo")
    with raw_link(sw, "mallory", "gw-mal-raw") as ws:
        ws.send(m.encode_many([m.Open(tunnel=t["tunnel"], stream=1),
                               m.Data(tunnel=t["tunnel"], stream=1, data=b"x"),
                               m.Data(tunnel="tforged", stream=7, data=b"x"),
                               m.Done(req=1, tunnel=t["tunnel"], ok=False, error="fake")]))
        codes = []
        while len(codes) < 4:
            codes += [x.code for x in m.decode_to_gateway(ws.recv(timeout=10))
                      if isinstance(x, m.Error)]
        assert set(codes) == {"unknown-tunnel"}
    still_works(sw, t)
    assert sw.api("alice").request("GET", f"/v1/tunnels/{t['tunnel']}")["state"] == \
        "established"
    sw.close(t["tunnel"])


@pytest.mark.parametrize("body,code", [
    (b"\x01\x00\x00\x01\xc1", "decode"),  # not msgpack
    (b"\x01\x00\x00\x05hello", "schema"),  # msgpack, not a message
    (wire.encode_header(wire.FrameType.CTRL, m.LIMITS.max_ctrl + 1), "too-large"),
    (wire.encode_frame(wire.FrameType.DATA, b"raw"), "too-large"),  # no raw frames here
    (m.encode(m.Hello(name="again")), "hello-again"),
    (m.encode(m.Data(tunnel="t1", stream=1, data=b"x"))[:-1], "truncated"),
])
def test_malformed_link_bodies_close_only_that_link(sw: Switch, body: bytes,
                                                    code: str) -> None:
    t = sw.open("echo")
    with raw_link(sw, "mallory", "gw-mal-raw") as ws:
        ws.send(body)
        answer = m.decode_to_gateway(ws.recv(timeout=10))[0]
        assert isinstance(answer, m.Refused) and answer.code == code, answer
    still_works(sw, t)
    sw.close(t["tunnel"])


def test_oversized_websocket_message_is_refused(sw: Switch) -> None:
    with raw_link(sw, "mallory", "gw-mal-raw") as ws, pytest.raises(Exception):  # noqa: B017
        ws.send(b"\0" * (m.MAX_BODY + 4096))  # closed by the server: 1009 or a reset
        ws.recv(timeout=10)
    assert sw.api("alice").request("GET", "/v1/health")["ok"]


def test_gateway_behind_an_authenticating_proxy(sw: Switch) -> None:
    """The user's gateway reaches the server only through kakehashi's own gateway as a
    forward proxy with Basic authentication; a wrong proxy password is said clearly."""
    env = sw.env
    env.add_proxy_user("px", "px-password")
    _, pport = env.gateway(f"127.0.0.1:{sw.port}", extra=["--auth", "--tls", "auto"])
    bad = sw.gateway("alice", "gw-alice-px", "--proxy", f"http://px@127.0.0.1:{pport}",
                     wait=False, env={"KAKEHASHI_PROXY_PASSWORD": "wrong"})
    bad.wait_for("407")
    bad.stop()
    sw.gateway("alice", "gw-alice-px", "--proxy", f"http://px@127.0.0.1:{pport}",
               env={"KAKEHASHI_PROXY_PASSWORD": "px-password"})
    # the CLI goes through the same proxy
    res = sw.env.run("switch", "open", "echo", "--server", sw.url, "--user", "alice",
                     "--gateway", "gw-alice-px", "--json", "--proxy",
                     f"http://px@127.0.0.1:{pport}",
                     env={"KAKEHASHI_PASSWORD": password("alice"),
                          "KAKEHASHI_PROXY_PASSWORD": "px-password"})
    import json

    t = json.loads(res.stdout)
    sent, got, n = stream_through(port_of(t), 2 << 20)
    assert sent == got and n == 2 << 20
    assert any(e.get("method") == "CONNECT" for e in env.access(
        lambda es: any(e.get("method") == "CONNECT" for e in es)))
    sw.close(t["tunnel"])


def test_openapi_document(sw: Switch) -> None:
    import json
    import urllib.request

    doc = json.load(urllib.request.urlopen(f"{sw.url}/openapi.json", timeout=10))
    for path in ("/v1/services", "/v1/tunnels", "/v1/tunnels/{tid}", "/v1/gateways"):
        assert path in doc["paths"], sorted(doc["paths"])
    assert "/login" not in doc["paths"]  # pages are not API


def test_refused_connections_leave_the_server_serving(sw: Switch) -> None:
    with socket.create_connection(("127.0.0.1", sw.port), 5) as s:
        s.sendall(b"GARBAGE / NOT-HTTP\r\n\r\n")
        s.recv(1024)
    assert sw.api("alice").request("GET", "/v1/health")["ok"]


def test_per_user_caps_from_the_command_line(tmp_path, echo_mod) -> None:
    """--max-gateways-per-user and --max-tunnels-per-user of a real server: a gateway
    with a name beyond the cap stops with the refusal, a tunnel beyond it is refused
    with its reason, both audited; a name already owned and a tunnel after a close go on."""
    env = Env(tmp_path)
    try:
        sw = Switch(env).start("--max-gateways-per-user", "1", "--max-tunnels-per-user", "1")
        sw.gateway("asp1", "gw-srv")
        sw.gateway("alice", "gw-alice")
        sw.register("echo", echo_mod.addr, allow=("alice",))
        extra = sw.gateway("alice", "gw-alice-2", wait=False)
        assert extra.popen.wait(15) != 0  # refused for good: it does not retry
        assert "has its 1 gateways (--max-gateways-per-user)" in extra.output()
        t = sw.open("echo")
        res = sw.cli("alice", "open", "echo", "--gateway", "gw-alice", check=False)
        assert res.returncode != 0 and b"1 tunnels" in res.stderr
        still_works(sw, t)
        sw.close(t["tunnel"])
        still_works(sw, sw.open("echo"))
        denied = {(e["event"], e["decision"]) for e in sw.audit()
                  if "gateways" in str(e.get("reason")) or "tunnels" in str(e.get("reason"))}
        assert denied == {("gateway-online", "deny"), ("tunnel-open", "deny")}
    finally:
        env.close()

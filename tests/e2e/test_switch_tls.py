"""The switch as deployed: HTTPS on by default (development CA), the gateways and the
CLI verify it; both transports over TLS; a client that does not trust the CA refuses."""

from __future__ import annotations

import json

from tests.e2e.framework import EchoServer, Env, stream_through
from tests.e2e.switch_fixtures import Switch, password, port_of


def test_https_end_to_end(env: Env, echo: EchoServer) -> None:
    sw = Switch(env)
    from kakehashi.core.store import open_store
    from kakehashi.switch.server import SwitchUsers

    store = open_store(sw.db)
    for name, role in (("asp1", "asp"), ("alice", "user")):
        SwitchUsers(store, kdf_n=2**10).add({"name": name, "role": role}, password(name))
    store.close()
    proc = env.spawn("switch-server", "switch", "server", "--listen", "127.0.0.1:0",
                     "--db", sw.db)  # --tls on is the default
    sw.port = proc.bound_port()
    assert "(https)" in proc.output()
    url = f"https://127.0.0.1:{sw.port}"
    for user, name, extra in (("asp1", "gw-srv", ()), ("alice", "gw-alice", ()),
                              ("alice", "gw-alice-poll", ("--transport", "poll"))):
        env.spawn(name, "switch", "gateway", "--server", url, "--user", user, "--name", name,
                  *extra, env={"KAKEHASHI_PASSWORD": password(user)}
                  ).wait_for(f"gateway {name} registered")

    def cli(user: str, *args: str) -> str:
        return env.run("switch", *args, "--server", url, "--user", user,
                       env={"KAKEHASHI_PASSWORD": password(user)}).stdout.decode()

    cli("asp1", "register", "echo", "--gateway", "gw-srv", "--target", echo.addr,
        "--allow", "alice")
    for gw in ("gw-alice", "gw-alice-poll"):
        t = json.loads(cli("alice", "open", "echo", "--gateway", gw, "--json"))
        sent, got, n = stream_through(port_of(t), 2 << 20)
        assert sent == got and n == 2 << 20
        assert json.loads(cli("alice", "close", t["tunnel"], "--json"))["state"] == "deleted"
    # plaintext to the TLS port is not spoken to
    res = env.run("switch", "list", "--server", f"http://127.0.0.1:{sw.port}", "--user",
                  "alice", env={"KAKEHASHI_PASSWORD": password("alice")}, check=False)
    assert res.returncode != 0
    # a CA that did not issue the server's certificate is not trusted
    from kakehashi.core import tls

    other = tls.DevCA(env.root / "other-ca")
    other.issue(["127.0.0.1"])
    res = env.run("switch", "list", "--server", url, "--user", "alice", "--ca",
                  str(other.ca_path), env={"KAKEHASHI_PASSWORD": password("alice")},
                  check=False)
    assert res.returncode != 0 and b"CERTIFICATE_VERIFY_FAILED" in res.stderr

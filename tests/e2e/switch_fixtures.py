"""Building blocks for the socket switch's end-to-end tests (spec 003): a switch server
and gateways started through the CLI, users, and API calls.

The server binds port 0 and the framework reads the port from its log; a gateway is
ready when it logs that it registered; nothing sleeps.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kakehashi.core.apiclient import ApiClient
from tests.e2e.framework import Env, Proc

ROLES = {"asp1": "asp", "alice": "user", "mallory": "user", "root": "admin"}


def password(user: str) -> str:
    return f"{user}-password-123"


@dataclass
class Switch:
    env: Env
    port: int = 0
    procs: dict[str, Proc] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.db = str(self.env.root / "sw.db")
        self.audit_path = self.env.root / "sw-audit.jsonl"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *extra: str) -> Switch:
        # users straight on the store, at a low hash cost (the CLI path has its own test)
        from kakehashi.core.store import open_store
        from kakehashi.switch.server import SwitchUsers

        store = open_store(self.db)
        users = SwitchUsers(store, kdf_n=2**10)
        for name, role in ROLES.items():
            users.add({"name": name, "role": role}, password(name))
        store.close()
        proc = self.env.spawn("switch-server", "switch", "server", "--listen", "127.0.0.1:0",
                              "--db", self.db, "--tls", "off", "--audit-log",
                              str(self.audit_path), "--setup-timeout", "5", *extra)
        self.port = proc.bound_port()
        self.procs["server"] = proc
        return self

    def gateway(self, user: str, name: str, *extra: str, wait: bool = True,
                env: dict | None = None) -> Proc:
        proc = self.env.spawn(name, "switch", "gateway", "--server", self.url, "--user", user,
                              "--name", name, *extra,
                              env={"KAKEHASHI_PASSWORD": password(user), **(env or {})})
        if wait:
            proc.wait_for(f"gateway {name} registered")
        self.procs[name] = proc
        return proc

    def cli(self, user: str, *args: str, check: bool = True, pw: str | None = None):
        return self.env.run("switch", *args, "--server", self.url, "--user", user,
                            env={"KAKEHASHI_PASSWORD": pw or password(user)}, check=check)

    def api(self, user: str, pw: str | None = None) -> ApiClient:
        return ApiClient(self.url, basic=(user, pw or password(user)), timeout=60)

    def register(self, name: str, target: str, *, allow: tuple[str, ...] = ("alice",),
                 gateway: str = "gw-srv", proto: str = "tcp",
                 max_connections: int = 0) -> dict[str, Any]:
        return self.api("asp1").request("POST", "/v1/services", {
            "name": name, "gateway": gateway, "target": target, "proto": proto,
            "allow": list(allow), "max_connections": max_connections})

    def open(self, service: str, gateway: str = "gw-alice", user: str = "alice",
             listen: str = "127.0.0.1:0") -> dict[str, Any]:
        return self.api(user).request("POST", "/v1/tunnels", {
            "service": service, "gateway": gateway, "listen": listen})

    def close(self, tid: str, user: str = "alice") -> dict[str, Any]:
        return self.api(user).request("DELETE", f"/v1/tunnels/{tid}")

    def audit(self) -> list[dict[str, Any]]:
        text = self.audit_path.read_text() if self.audit_path.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]


def port_of(tunnel: dict[str, Any]) -> int:
    return int(tunnel["listen"].rpartition(":")[2])


@contextlib.contextmanager
def raw_link(sw: Switch, user: str, name: str) -> Iterator[Any]:
    """A gateway link said hello on by hand, to send what a real gateway never would."""
    from websockets.sync.client import connect

    from kakehashi.switch import messages as m

    auth = base64.b64encode(f"{user}:{password(user)}".encode()).decode()
    with connect(f"ws://127.0.0.1:{sw.port}/v1/gateway/link",
                 additional_headers={"Authorization": f"Basic {auth}"}, max_size=None) as ws:
        ws.send(m.encode(m.Hello(name=name)))
        assert isinstance(m.decode_to_gateway(ws.recv(timeout=10))[0], m.Welcome)
        yield ws

"""Building blocks for the on-demand end-to-end tests (spec 002): a manager, an edge and
an inner relay started through the CLI, tokens, and the client commands.

Every process binds what it can on port 0 and the framework reads the port back from
its log; readiness is a log line (``edge ... online``, ``inner ... online``), never a
sleep.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tests.e2e.framework import Env, Proc, free_port

IMSI = "001010000000001"


@dataclass
class OnDemand:
    env: Env
    devices: dict[str, str] = field(default_factory=lambda: {IMSI: "127.0.0.1"})
    manager_port: int = 0
    procs: dict[str, Proc] = field(default_factory=dict)
    ports: tuple[int, int] = (0, 0)
    inner_args: tuple[str, ...] = ()
    #: the manager's --db (default: a SQLite file of the test; or a redis:// URL)
    db: str = ""

    def __post_init__(self) -> None:
        self.db = self.db or str(self.env.root / "od.db")
        self.audit = self.env.root / "od-audit.jsonl"
        # the admin token through the CLI; the others straight on the store (a CLI
        # start costs a second on a busy machine, and they are made the same way)
        from kakehashi.core.identity import ApiTokens
        from kakehashi.core.store import open_store

        self.tokens = {}
        admin = self.env.run("ondemand", "token", "create", "--db", self.db, "--role", "admin")
        store = open_store(self.db)
        texts = {"admin": admin.stdout.decode(),
                 **{r: ApiTokens(store).create(r)[1] for r in ("client", "edge", "inner")}}
        store.close()
        for role, text in texts.items():
            path = self.env.root / f"{role}.tok"
            path.write_text(text)
            self.tokens[role] = str(path)
        lo = free_port()
        self.ports = (lo, lo + 39) if lo + 39 < 32768 else (lo - 39, lo)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.manager_port}"

    # -- processes ---------------------------------------------------------------------
    def manager(self, *extra: str) -> Proc:
        proc = self.env.spawn("manager", "ondemand", "manager", "--listen",
                              f"127.0.0.1:{self.manager_port}", "--db", self.db, "--tls", "off",
                              "--audit-log", str(self.audit), *extra)
        self.manager_port = proc.bound_port()
        self.procs["manager"] = proc
        return proc

    def inner(self, name: str = "core-1", *, wait: bool = True) -> Proc:
        args = ["ondemand", "inner", "--server", self.url, "--token-file",
                self.tokens["inner"], "--name", name, "--listen", "127.0.0.1:0"]
        for imsi, addr in self.devices.items():
            args += ["--device", f"{imsi}={addr}"]
        args += self.inner_args
        proc = self.env.spawn(f"inner-{name}", *args)
        if wait:
            proc.wait_for(f"inner {name} online")
        self.procs[name] = proc
        return proc

    def edge(self, name: str = "edge-1", *extra: str, wait: bool = True) -> Proc:
        proc = self.env.spawn(f"edge-{name}", "ondemand", "edge", "--server", self.url,
                              "--token-file", self.tokens["edge"], "--name", name,
                              "--public-host", "127.0.0.1",
                              "--ports", f"{self.ports[0]}-{self.ports[1]}", *extra)
        if wait:
            proc.wait_for(f"edge {name} online")
        self.procs[name] = proc
        return proc

    def start(self) -> OnDemand:
        self.manager()
        inner, edge = self.inner(wait=False), self.edge(wait=False)  # both start at once
        inner.wait_for("inner core-1 online")
        edge.wait_for("edge edge-1 online")
        return self

    # -- the client side ---------------------------------------------------------------
    def cli(self, *args: str, role: str = "admin", check: bool = True) -> Any:
        res = self.env.run("ondemand", *args, "--server", self.url, "--token-file",
                           self.tokens[role], "--json", check=check)
        if not check and res.returncode:
            return res
        return json.loads(res.stdout) if res.stdout.strip() else None

    def grant(self, target: str, *opts: str, role: str = "admin") -> dict[str, Any]:
        return self.cli("grant", target, *opts, role=role)

    def events(self, grant_id: str) -> list[dict[str, Any]]:
        return self.cli("events", grant_id)

"""The ``kakehashi`` command: ``kakehashi <system> <role>``, plus ``serve`` and ``demo``."""

from __future__ import annotations

import atexit
import gc
import importlib
import sys
from collections.abc import Iterator
from typing import Any

import click

from kakehashi import __version__, config
from kakehashi.core.logs import setup_logging

#: the systems' command groups, imported when first used
SYSTEMS = {
    "relay": "kakehashi.relay.cli:relay",
    "gateway": "kakehashi.gateway.cli:gateway",
    "ondemand": "kakehashi.ondemand.cli:ondemand",
    "switch": "kakehashi.switch.cli:switch",
    "chain": "kakehashi.chain.cli:chain",
}


class _Commands(dict):
    """``main.commands`` with the systems' groups imported on first use.

    A command of one system (``kakehashi ondemand revoke``, a ProxyCommand) starts
    without importing every other system: on a busy machine that was most of its
    start-up time. Listing the names imports nothing; looking a command up, or
    listing the commands themselves, imports it.
    """

    def __init__(self, lazy: dict[str, str]) -> None:
        super().__init__()
        self._lazy = dict(lazy)

    def _load(self, name: object) -> None:
        spec = self._lazy.pop(name, None) if isinstance(name, str) else None
        if spec is not None:
            module, _, attr = spec.partition(":")
            dict.__setitem__(self, name, getattr(importlib.import_module(module), attr))

    def _load_all(self) -> None:
        for name in list(self._lazy):
            self._load(name)

    def __getitem__(self, name: Any) -> Any:
        self._load(name)
        return super().__getitem__(name)

    def get(self, name: Any, default: Any = None) -> Any:
        self._load(name)
        return super().get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self._lazy or super().__contains__(name)

    def __iter__(self) -> Iterator[Any]:
        return iter([*super().keys(), *self._lazy])

    def __len__(self) -> int:
        return super().__len__() + len(self._lazy)

    def keys(self) -> Any:
        self._load_all()
        return super().keys()

    def values(self) -> Any:
        self._load_all()
        return super().values()

    def items(self) -> Any:
        self._load_all()
        return super().items()


class _Main(click.Group):
    """The top-level group: a store that cannot be reached (``--db redis://...`` with
    Redis down) ends any command with one clear line, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            # StoreUnavailable can only have been raised once its module was imported;
            # looking it up here instead of importing it keeps the store (and Redis's
            # client) out of every command that never opens one, --help above all
            redis = sys.modules.get("kakehashi.core.store.redis")
            if redis is not None and isinstance(exc, redis.StoreUnavailable):
                raise click.ClickException(str(exc)) from None
            raise


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"],
                                          "max_content_width": 100})
@click.version_option(__version__, "--version", "-V", prog_name="kakehashi")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="KAKEHASHI_CONFIG",
              help="TOML file with a table per command, e.g. [relay.agent].")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]), envvar="KAKEHASHI_LOG")
@click.option("--log-format", default="auto", show_default=True,
              type=click.Choice(["auto", "text", "json"]))
@click.pass_context
def main(ctx: click.Context, config_path: str | None, log_level: str, log_format: str) -> None:
    """kakehashi: reach services behind NAT and firewalls.

    Start with 'kakehashi demo', then 'kakehashi relay --help'.
    """
    setup_logging(log_level, fmt=log_format)
    _skip_final_collection()
    ctx.obj = {"relay_attach": _relay_attach}
    if config_path:
        ctx.default_map = config.to_default_map(main, config.load(config_path))


_final_collection_skipped = False


def _skip_final_collection() -> None:
    """At exit, let the interpreter skip the garbage collector's last walk over every
    object (:func:`gc.freeze` moves them out of its reach).

    Interpreter teardown runs a full collection; in a process holding FastAPI's and
    pydantic's models (the switch server, the on-demand manager) that walk was most of
    the 0.5 s from Ctrl-C to exit, after every ``finally`` had run. Memory goes back to
    the system with the process anyway; what this leaves alone is unreachable cycles,
    whose finalizers Python does not promise to run at exit, and nothing of kakehashi's
    waits for them: the SQLite store commits each write (autocommit), audit lines are
    written line-buffered, and logging flushes its handlers in its own exit handler
    (registered earlier, so it runs after this one). Registered once per process, also
    when the group is invoked in the tests' own process (where it only shortens
    pytest's exit).
    """
    global _final_collection_skipped
    if not _final_collection_skipped:
        _final_collection_skipped = True
        atexit.register(gc.freeze)


#: commands other than the systems, imported when first used too
COMMANDS = {"serve": "kakehashi.site:serve"}

main.commands = _Commands({**SYSTEMS, **COMMANDS})


async def _relay_attach(mux: Any, db: str, audit_log: str | None) -> None:
    """Carry relay sessions on another system's port (the gateway's one open port).

    Composition happens here, at the top, so that no system imports another.
    """
    from kakehashi.core import tls, wire
    from kakehashi.core.audit import AuditLog
    from kakehashi.core.mux import prefix_matcher
    from kakehashi.core.store import open_store
    from kakehashi.relay.server import RelayServer
    from kakehashi.relay.users import RelayUsers

    registry = RelayUsers(open_store(db))
    tickets = tls.TicketKeys(lambda: tls.server_context(cache=False))  # (keys rotate)
    server = RelayServer(registry, tls=None, starttls=tickets.context(), tickets=tickets,
                         audit=AuditLog(audit_log, system="relay"))
    await server.attach()
    mux.add("relay", prefix_matcher(wire.MAGIC), server.handle_connection)


@main.command()
@click.argument("system", required=False,
                type=click.Choice(["relay", "gateway", "ondemand", "switch", "chain"]))
@click.option("--bytes", "nbytes", default=8 * 1024 * 1024, show_default=True,
              help="Bytes to send through the demo's sessions and tunnels.")
@click.option("--tls", "tls_mode", type=click.Choice(["on", "off"]), default="on",
              show_default=True)
@click.option("--keep", is_flag=True, help="Keep the demo's state directory (logs, audit).")
def demo(system: str | None, nbytes: int, tls_mode: str, keep: bool) -> None:
    """Every system on loopback, narrated step by step: the relay, the gateway,
    on-demand access, the socket switch, then the proxy chain (or only SYSTEM)."""
    try:  # Ctrl-C at any moment ends the demo quietly (its servers stop with it)
        from kakehashi.demo import run_demo

        systems = [name for name in main.commands if name in SYSTEMS]
        code = run_demo(system, nbytes, tls_mode == "on", systems=systems, keep=keep)
    except KeyboardInterrupt:
        click.echo("stopped.", err=True)
        code = 130
    sys.exit(code)

"""``kakehashi serve``: several roles in one process, for a small site.

A site file is an ordinary ``--config`` file: one table per command, keys named like
its flags (``[relay.serve]``, ``[gateway.serve]``, ``[ondemand.edge]``, ...), plus a
``[serve]`` table::

    [serve]
    roles = ["relay.serve", "gateway.serve", "chain.proxy"]   # default: every server table
    metrics-listen = "127.0.0.1:9100"                        # one /metrics for all

Each role is its own command, built from its own table exactly as on the command line
(the same checks, the same defaults); instead of running, its main coroutine is
collected (:func:`kakehashi.core.runner.collecting`) and all of them run together in
one event loop, logging to one log. Ctrl-C or SIGTERM cancels them all (every role's
``finally`` runs: listeners closed, links said goodbye); a role that stops on its own
(a port already taken, say) stops the others too and the process exits 1.

Sharing one port: the gateway's one-port mux already carries relay sessions beside
HTTP (``relay = true`` in ``[gateway.serve]``, relay users in the gateway's ``--db``);
use that instead of a ``[relay.serve]`` table to run both on one port. The other
roles keep ports of their own (the chain's control protocol starts like the relay's,
so the mux could not tell them apart; an on-demand edge opens a port per grant).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

import click

from kakehashi import config
from kakehashi.core import options as opt

log = logging.getLogger("kakehashi.serve")

#: the commands that serve, in the order they start (a table of one of these in the
#: site file makes it a role unless ``roles`` says otherwise)
SERVER_ROLES = ("ondemand.manager", "switch.server", "relay.serve", "gateway.serve",
                "chain.proxy", "ondemand.inner", "ondemand.edge")


def _lookup(table: dict[str, Any], path: list[str]) -> Any:
    for part in path:
        if not isinstance(table, dict):
            return None
        table = table.get(part)  # type: ignore[assignment]
    return table


def roles_of(default_map: dict[str, Any], named: tuple[str, ...] | list[str]) -> list[str]:
    """The roles to run: those named, else every server command with a table."""
    if named:
        return list(dict.fromkeys(named))
    return [r for r in SERVER_ROLES if isinstance(_lookup(default_map, r.split(".")), dict)]


def build_role(ctx: click.Context, role: str,
               default_map: dict[str, Any]) -> Coroutine[Any, Any, int | None]:
    """Build ``role`` (``SYSTEM.COMMAND``) from its table as its command would, and
    return its main coroutine (not started)."""
    from kakehashi.core import runner

    parts = role.split(".")
    group: click.Command = ctx.find_root().command
    for part in parts:
        if not isinstance(group, click.Group):
            raise click.UsageError(f"serve: {role!r} is not a command (use SYSTEM.COMMAND, "
                                   "e.g. relay.serve)")
        sub = group.get_command(ctx, part)
        if sub is None:
            raise click.UsageError(f"serve: no command {role!r}")
        group = sub
    if isinstance(group, click.Group):
        raise click.UsageError(f"serve: {role!r} is a group, not a command")
    table = _lookup(default_map, parts) or {}
    with runner.collecting() as collected:
        try:
            sub_ctx = group.make_context(role, [], parent=ctx, default_map=table)
            with sub_ctx:
                group.invoke(sub_ctx)
        except SystemExit as exc:
            if exc.code not in (0, None) or not collected:
                raise click.ClickException(f"serve: role {role} stopped at start "
                                           f"(exit {exc.code})") from None
        except click.ClickException as exc:
            exc.message = f"role {role}: {exc.format_message()}"
            raise
    if len(collected) != 1:
        for coro in collected:
            coro.close()
        raise click.UsageError(f"serve: {role} is not a role that keeps running "
                               "(it did its work at once)")
    return collected[0]


async def run_roles(mains: dict[str, Coroutine[Any, Any, int | None]],
                    metrics_listen: str | None) -> int:
    """Run the roles' mains together until a signal (0) or until one stops (1)."""
    import asyncio

    from kakehashi.core import metrics

    tasks = {name: asyncio.ensure_future(coro) for name, coro in mains.items()}
    for name, task in tasks.items():
        metrics.add_health_check(f"role:{name}", lambda task=task: not task.done())
    log.info("serving %d roles in one process: %s", len(tasks), ", ".join(tasks))
    try:
        async with metrics.exporter(metrics_listen):
            done, _ = await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_COMPLETED)
        for name, task in tasks.items():
            if task in done:
                exc = task.exception() if not task.cancelled() else None
                if isinstance(exc, click.ClickException):
                    log.error("role %s stopped: %s", name, exc.format_message())
                elif exc is not None:
                    log.error("role %s failed", name, exc_info=exc)
                else:
                    log.error("role %s stopped", name)
        return 1
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        for name in tasks:
            metrics.remove_health_check(f"role:{name}")


@click.command("serve")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Site file: a table per role ([relay.serve], [gateway.serve], "
                   "[chain.proxy], ...) and [serve] roles = [...] (default: every server "
                   "table). Same format as 'kakehashi --config FILE'.")
@click.option("--role", "roles", multiple=True, metavar="SYSTEM.COMMAND",
              help="A role to run, e.g. relay.serve (repeatable; config: roles).")
@opt.metrics_listen_option
@click.pass_context
def serve(ctx: click.Context, config_path: str | None, roles: tuple[str, ...],
          metrics_listen: str | None) -> None:
    """Run several roles in one process (a small site): relay, gateway, chain proxy,
    on-demand edge... each from its own table of the site file, one log; Ctrl-C or
    SIGTERM stops them all."""
    import sys

    sys.exit(serve_site(ctx, config_path, roles, metrics_listen))


def serve_site(ctx: click.Context, config_path: str | None, roles: tuple[str, ...],
               metrics_listen: str | None) -> int:
    """The ``serve`` command's body (see the module's docstring)."""
    if config_path:
        default_map = config.to_default_map(ctx.find_root().command,  # type: ignore[arg-type]
                                            config.load(config_path))
    else:
        default_map = (ctx.find_root().default_map or {})
    table = default_map.get("serve", {})
    roles = roles or tuple(table.get("roles") or ())
    metrics_listen = metrics_listen or table.get("metrics_listen")
    names = roles_of(default_map, roles)
    if not names:
        raise click.UsageError("serve: no roles (give --config with tables such as "
                               "[relay.serve] and [gateway.serve], or [serve] roles = [...])")
    mains: dict[str, Coroutine[Any, Any, int | None]] = {}
    try:
        for name in names:
            mains[name] = build_role(ctx, name, default_map)
    except BaseException:
        for coro in mains.values():
            coro.close()
        raise
    from kakehashi.core import runner

    with contextlib.suppress(KeyboardInterrupt):
        return runner.run(run_roles(mains, metrics_listen))
    return 130

"""Configuration files: TOML, one table per command, keys named like the flags.

    [relay.agent]
    server = "relay.example.org:7000"
    user = "pi"
    password-file = "/etc/kakehashi/pi.pass"
    expose = ["ssh=127.0.0.1:22"]

Every flag of a command is a key of its table (dashes or underscores). Values on the
command line win over the file; environment variables named in ``--help`` win over
the file too. Unknown keys are an error, so a typo does not silently do nothing.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import click


class ConfigError(click.ClickException):
    pass


def hostport(text: str, hint: str, default: int | None = None) -> tuple[str, int]:
    """Parse a HOST:PORT option; a bad value is a usage error naming the option."""
    from kakehashi.core.stream import parse_hostport

    try:
        return parse_hostport(text, default)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None


def connection_limit_options(max_connections: int, hint: str = ""):
    """``--max-connections`` and ``--max-per-client`` for a serving command (the
    core Listener's limits), with this command's default for the first."""

    def decorate(f):
        f = click.option(
            "--max-per-client", type=click.IntRange(min=0), default=0, show_default=True,
            help="Connections one client address may hold (0: no limit); more are "
                 "closed at once. Mind clients behind one NAT address.")(f)
        return click.option(
            "--max-connections", type=click.IntRange(min=0), default=max_connections,
            show_default=True,
            help="Connections served at once (0: no limit); beyond it new ones wait in "
                 "the listen backlog." + (f" {hint}" if hint else ""))(f)

    return decorate


def load(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    return _normalise(data)


def _normalise(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        k = key.replace("-", "_")
        out[k] = _normalise(value) if isinstance(value, dict) else value
    return out


def _flag_names(cmd: click.Command) -> dict[str, str]:
    """Config key -> parameter name: every long flag (without dashes) and the name."""
    names: dict[str, str] = {}
    for param in cmd.params:
        if not isinstance(param, click.Option) or param.name is None:
            continue
        names[param.name] = param.name
        for opt in param.opts + param.secondary_opts:
            if opt.startswith("--"):
                names[opt[2:].replace("-", "_")] = param.name
    return names


def to_default_map(group: click.Group, data: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Check a loaded file against the commands and turn it into click's default_map.

    Keys that name no command or flag are rejected, so a typo is an error.
    """
    out: dict[str, Any] = {}
    for key, value in data.items():
        cmd = group.commands.get(key) or group.commands.get(key.replace("_", "-"))
        if cmd is None:
            raise ConfigError(f"config: unknown section [{where}{key}]")
        if not isinstance(value, dict):
            raise ConfigError(f"config: [{where}{key}] must be a table")
        if isinstance(cmd, click.Group):
            out[cmd.name or key] = to_default_map(cmd, value, f"{where}{key}.")
            continue
        names = _flag_names(cmd)
        table: dict[str, Any] = {}
        for opt, val in value.items():
            if opt not in names:
                known = sorted({k.replace("_", "-") for k in names if names[k] != k or
                                k.replace("_", "-") in {o[2:] for p in cmd.params
                                                        for o in getattr(p, "opts", [])}})
                raise ConfigError(
                    f"config: unknown key {opt.replace('_', '-')!r} in [{where}{key}] "
                    f"(known: {', '.join(known)})")
            table[names[opt]] = val
        out[cmd.name or key] = table
    return out

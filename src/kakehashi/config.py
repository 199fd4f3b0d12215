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
            param = next(p for p in cmd.params if p.name == names[opt])
            if getattr(param, "multiple", False) and isinstance(val, str):
                val = [val]  # one value for a repeatable flag (server = "host:port")
            table[names[opt]] = val
        out[cmd.name or key] = table
    return out

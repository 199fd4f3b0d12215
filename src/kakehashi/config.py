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


def check_keys(group: click.Group, data: dict[str, Any], where: str = "") -> None:
    """Reject keys that name no command or option."""
    for key, value in data.items():
        cmd = group.commands.get(key) or group.commands.get(key.replace("_", "-"))
        if cmd is None:
            raise ConfigError(f"config: unknown section [{where}{key}]")
        if isinstance(cmd, click.Group):
            if not isinstance(value, dict):
                raise ConfigError(f"config: [{where}{key}] must be a table")
            check_keys(cmd, value, f"{where}{key}.")
        else:
            names = {p.name for p in cmd.params}
            for opt in value:
                if opt not in names:
                    raise ConfigError(
                        f"config: unknown key {opt.replace('_', '-')!r} in [{where}{key}] "
                        f"(known: {', '.join(sorted(n.replace('_', '-') for n in names))})")

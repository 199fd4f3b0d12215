"""examples/systemd: the unit files parse, are hardened, keep secrets off the command
line, and their command lines and config files are ones the CLI accepts."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from kakehashi import config
from kakehashi.cli import main

UNITS_DIR = Path(__file__).resolve().parents[2] / "examples" / "systemd"
UNITS = sorted(UNITS_DIR.glob("*.service"))
CONFIGS = sorted(UNITS_DIR.glob("*.toml"))
BINARY = "/opt/kakehashi/bin/kakehashi"


def _unit(path: Path) -> configparser.ConfigParser:
    # systemd repeats keys (LoadCredential=, SystemCallFilter=): keep them all
    parser = configparser.ConfigParser(strict=False, interpolation=None,
                                       dict_type=_MultiDict, empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


class _MultiDict(dict):
    """Values of a repeated key joined by newlines (configparser keeps the last only)."""

    def __setitem__(self, key, value):  # type: ignore[no-untyped-def]
        if key in self and isinstance(value, list) and isinstance(self[key], list):
            value = self[key] + value
        super().__setitem__(key, value)


def _values(unit: configparser.ConfigParser, key: str) -> list[str]:
    raw = unit["Service"].get(key)
    return [v for v in (raw or "").splitlines() if v]


def test_there_are_units_and_configs() -> None:
    names = {p.name for p in UNITS}
    assert {"kakehashi-relay.service", "kakehashi-gateway.service",
            "kakehashi-ondemand-manager.service", "kakehashi-site.service"} <= names
    assert CONFIGS


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_unit_is_hardened_and_keeps_secrets_off_the_command_line(path: Path) -> None:
    unit = _unit(path)
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    svc = unit["Service"]
    assert svc.get("DynamicUser") == "yes" or svc.get("User")
    for key, want in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                      "ProtectHome": "yes", "PrivateTmp": "yes",
                      "KillSignal": "SIGTERM"}.items():
        assert svc.get(key) == want, (path.name, key)
    assert "CapabilityBoundingSet" in svc and "RestrictAddressFamilies" in svc
    exec_start = _values(unit, "ExecStart")
    assert len(exec_start) == 1
    argv = shlex.split(exec_start[0])
    assert argv[0] == BINARY
    text = exec_start[0].lower()
    for secret in ("redis://", "password", "token=", "secret="):
        assert secret not in text, f"{path.name}: {secret!r} on the command line"
    for env in _values(unit, "Environment"):
        assert "PASSWORD" not in env.upper() and "redis://" not in env
    # every %d/NAME the command line reads is a credential the unit loads
    loaded = {c.split(":", 1)[0] for c in _values(unit, "LoadCredential")}
    for arg in argv:
        if arg.startswith("%d/"):
            assert arg[3:] in loaded, (path.name, arg)
    # a port below 1024 needs CAP_NET_BIND_SERVICE (and then only that)
    low = any(str(p) in (UNITS_DIR / c).read_text()
              for c in loaded if c.endswith(".toml") for p in ('0:443"', '0:80"'))
    caps = svc.get("CapabilityBoundingSet", "").split()
    assert caps == (["CAP_NET_BIND_SERVICE"] if low else []), path.name
    if low:
        assert svc.get("AmbientCapabilities") == "CAP_NET_BIND_SERVICE"


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_unit_command_line_and_its_config_are_accepted_by_the_cli(path: Path) -> None:
    argv = shlex.split(_values(_unit(path), "ExecStart")[0])[1:]
    args = [str(UNITS_DIR / a[3:]) if a.startswith("%d/") else a for a in argv]
    # --help: every option on the line is known (an unknown one is a usage error), and
    # the --config file given to the top level is checked against the commands
    res = CliRunner().invoke(main, [*args, "--help"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_configs_name_only_known_commands_and_keys(path: Path) -> None:
    config.to_default_map(main, config.load(path))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd's own parser: no unknown keys or bad values (the binary path is swapped
    for one that exists here; verify checks that it is executable)."""
    true = shutil.which("true")
    assert true
    for unit in UNITS:
        (tmp_path / unit.name).write_text(unit.read_text().replace(BINARY, true))
    res = subprocess.run(["systemd-analyze", "verify", *sorted(str(p) for p in
                                                              tmp_path.glob("*.service"))],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    complaints = [line for line in (res.stdout + res.stderr).splitlines()
                  if "kakehashi-" in line]
    assert res.returncode == 0 and not complaints, res.stdout + res.stderr

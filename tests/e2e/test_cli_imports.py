"""What a command loads: only the modules of the system it belongs to.

Thousands of ``kakehashi`` processes start in the test suite, and every ProxyCommand
(``relay pipe``) or ``--help`` someone types starts one too; when ``kakehashi.cli``
imported every system's servers, TLS, crypto and the web stack up front, that import
was most of each process's life. These tests run the real command (``python -m
kakehashi ...``) and look at ``sys.modules`` when it exits: a structural check, not a
timing one.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SYSTEMS = ("relay", "gateway", "ondemand", "switch", "chain")

#: third-party and standard-library packages no --help needs: the crypto and TLS
#: stacks, the event loop, the web stack, templates, the store's clients, rich output
HEAVY = ("cryptography", "ssl", "asyncio", "uvloop", "msgspec", "fastapi", "starlette",
         "uvicorn", "jinja2", "rich", "redis", "sqlite3", "httpx", "prometheus_client",
         "websockets", "h11")

# Run the command as ``python -m kakehashi`` does, and print the loaded modules at exit
# (click ends --help with sys.exit, which runs atexit handlers).
_PROBE = """
import atexit, json, runpy, sys
atexit.register(lambda: print("MODULES=" + json.dumps(sorted(sys.modules)), file=sys.stderr))
sys.argv = ["kakehashi", *sys.argv[1:]]
runpy.run_module("kakehashi", run_name="__main__", alter_sys=True)
"""


def loaded_modules(*args: str, env: dict[str, str] | None = None) -> set[str]:
    res = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True,
                         timeout=60, env=env)
    line = next((ln for ln in res.stderr.decode().splitlines() if ln.startswith("MODULES=")),
                None)
    assert line is not None, res.stderr.decode()[-2000:]
    return set(json.loads(line.removeprefix("MODULES=")))


def _top(name: str) -> str:
    return name.split(".")[0]


def _systems_in(modules: set[str]) -> dict[str, set[str]]:
    """The kakehashi system modules loaded, by system."""
    out: dict[str, set[str]] = {}
    for mod in modules:
        parts = mod.split(".")
        if len(parts) >= 2 and parts[0] == "kakehashi" and parts[1] in SYSTEMS:
            out.setdefault(parts[1], set()).add(mod)
    return out


#: one command of each system, and its group
COMMANDS = [("relay", "serve"), ("relay", "pipe"), ("relay", "user", "add"),
            ("gateway", "serve"), ("gateway", "tunnel"), ("ondemand", "manager"),
            ("ondemand", "grant"), ("switch", "server"), ("switch", "gateway"),
            ("chain", "proxy"), ("chain", "forward"), ("relay",), ("chain",), ("serve",)]


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_help_of_one_command_loads_only_its_system_and_no_heavy_stack(path):
    modules = loaded_modules(*path, "--help")
    others = {name: mods for name, mods in _systems_in(modules).items() if name != path[0]}
    assert not others, f"'{' '.join(path)} --help' imported other systems: {others}"
    mine = _systems_in(modules).get(path[0], set())
    assert mine <= {f"kakehashi.{path[0]}", f"kakehashi.{path[0]}.cli"}, (
        f"'{' '.join(path)} --help' imported more than its command line: {sorted(mine)}")
    heavy = sorted(m for m in modules if _top(m) in HEAVY)
    assert not heavy, f"'{' '.join(path)} --help' imported {heavy[:20]}"


def test_top_level_help_loads_every_command_line_and_nothing_behind_them():
    """``kakehashi --help`` lists every system with its summary, so it loads each
    system's command line; none of their servers, clients or protocols."""
    modules = loaded_modules("--help")
    loaded = _systems_in(modules)
    assert set(loaded) == set(SYSTEMS)
    for name, mods in loaded.items():
        assert mods <= {f"kakehashi.{name}", f"kakehashi.{name}.cli"}, sorted(mods)
    heavy = sorted(m for m in modules if _top(m) in HEAVY)
    assert not heavy, f"'kakehashi --help' imported {heavy[:20]}"


def test_a_store_command_loads_its_system_only(tmp_path):
    """A real command (``relay user list`` on a SQLite file) loads the store and the
    relay's registry, not another system nor the web stack."""
    modules = loaded_modules("relay", "user", "list", "--db", str(tmp_path / "relay.db"))
    assert "kakehashi.relay.users" in modules  # the command did run
    assert set(_systems_in(modules)) == {"relay"}
    heavy = sorted(m for m in modules
                   if _top(m) in ("fastapi", "starlette", "uvicorn", "jinja2", "rich"))
    assert not heavy, heavy


_FREEZE_PROBE = """
import atexit, gc, runpy, sys
# registered before the command runs, so it runs after the command's own exit handlers
atexit.register(lambda: print(f"FROZEN={gc.get_freeze_count()}", file=sys.stderr))
sys.argv = ["kakehashi", *sys.argv[1:]]
runpy.run_module("kakehashi", run_name="__main__", alter_sys=True)
"""


def test_a_command_leaves_its_objects_out_of_the_exit_collection(tmp_path):
    """A command's process skips the collector's last walk over every object at exit
    (gc.freeze in an exit handler): that walk was most of a web server's time from
    Ctrl-C to exit. Checked structurally: the objects are frozen when the process's
    last exit handler runs."""
    res = subprocess.run([sys.executable, "-c", _FREEZE_PROBE, "relay", "user", "list",
                          "--db", str(tmp_path / "relay.db")], capture_output=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    frozen = [ln for ln in res.stderr.decode().splitlines() if ln.startswith("FROZEN=")]
    assert frozen and int(frozen[0].removeprefix("FROZEN=")) > 10_000, res.stderr.decode()

"""The command line itself: help, version, config files, user registry."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest

from kakehashi import __version__
from kakehashi.cli import main


def _commands(group: click.Group, prefix=()):
    for name, cmd in group.commands.items():
        yield (*prefix, name)
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))


@pytest.mark.parametrize("path", [(), *_commands(main)], ids=lambda p: " ".join(p) or "root")
def test_every_command_has_help(path):
    res = subprocess.run([sys.executable, "-m", "kakehashi", *path, "--help"],
                         capture_output=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert b"Usage:" in res.stdout and len(res.stdout) > 100


def test_version():
    res = subprocess.run([sys.executable, "-m", "kakehashi", "--version"], capture_output=True)
    assert res.stdout.decode().strip().endswith(__version__)


def test_user_registry_lifecycle(env):
    env.add_user("pi", "--encryption", "required", "--allowed-peers", "laptop,alice")
    out = env.run("relay", "user", "list", "--db", env.db).stdout.decode()
    assert "pi\tencryption=required" in out and "peers=laptop,alice" in out
    env.run("relay", "user", "set", "pi", "--db", env.db, "--encryption", "optional")
    assert "encryption=optional" in env.run("relay", "user", "list", "--db", env.db).stdout.decode()
    env.run("relay", "user", "passwd", "pi", "--db", env.db, "--password-stdin",
            input=b"new-secret\n")
    dup = env.run("relay", "user", "add", "pi", "--db", env.db, "--password-stdin",
                  input=b"x\n", check=False)
    assert dup.returncode == 1 and b"already exists" in dup.stderr
    bad = env.run("relay", "user", "add", "bad name", "--db", env.db, "--password-stdin",
                  input=b"x\n", check=False)
    assert bad.returncode == 2
    env.run("relay", "user", "remove", "pi", "--db", env.db)
    assert "pi" not in env.run("relay", "user", "list", "--db", env.db).stdout.decode()


def test_config_file_drives_every_option(env, echo):
    env.add_user("pi")
    env.add_user("laptop")
    _, port = env.relay()
    (env.root / "pi.pass").write_text("pi-secret\n")
    cfg = env.root / "kakehashi.toml"
    cfg.write_text(f"""
[relay.agent]
server = "127.0.0.1:{port}"
user = "pi"
password-file = "{env.root / 'pi.pass'}"
expose = ["echo={echo.addr}"]
spares = 3
""")
    agent = env.spawn("agent", "--config", str(cfg), "relay", "agent")
    agent.wait_for("agent pi online")
    assert env.pipe("laptop", port, "pi/echo", b"configured").stdout == b"configured"
    cfg.write_text("[relay.agent]\nservre = 'typo'\n")
    res = env.run("--config", str(cfg), "relay", "agent", check=False)
    assert res.returncode == 1 and b"unknown key 'servre'" in res.stderr


def test_missing_password_says_what_to_do(env):
    res = env.run("relay", "who", "--server", "127.0.0.1:1", "--user", "x", check=False)
    assert res.returncode == 2
    assert b"--password-stdin, --password-file or KAKEHASHI_PASSWORD" in res.stderr

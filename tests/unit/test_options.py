"""core.options: the shared vocabulary, deprecated spellings and their config keys."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from kakehashi import config
from kakehashi.core import options as opt


@click.group()
def root() -> None:
    pass


@root.command()
@opt.client_options("The server", 9000, user_help="who", server_required=False,
                    user_required=False)
@click.option("--allowed-peers", "allowed", multiple=True)
@opt.deprecated_alias("--allow", "allowed", "--allowed-peers", multiple=True)
@opt.deprecated_alias("--via", "server", "--server")
def client(server, user, password_stdin, password_file, tls_mode, ca, allowed) -> None:
    addr = opt.parse_server(server, "--server", 9000)
    click.echo(f"{addr.host} {addr.port} {addr.tls} {tls_mode} {user} {','.join(allowed)}")


def run(*args: str, default_map: dict | None = None) -> tuple[str, str]:
    res = CliRunner().invoke(root, list(args), default_map=default_map)
    assert res.exit_code == 0, res.output
    return res.stdout.strip(), res.stderr


def test_new_spellings():
    out, err = run("client", "--server", "h:1", "--user", "u", "--allowed-peers", "a,b")
    assert out == "h 1 None on u a,b" and not err


def test_old_spellings_fill_the_new_parameter_with_a_note():
    out, err = run("client", "--via", "h:2", "--allow", "x")
    assert out == "h 2 None on None x"
    assert "--via is deprecated; use --server" in err
    assert "--allow is deprecated; use --allowed-peers" in err


def test_the_new_spelling_wins_when_both_are_given():
    out, _ = run("client", "--via", "old:1", "--server", "new:2")
    assert out.startswith("new 2")


def test_config_keys_old_and_new():
    dm = config.to_default_map(root, {"client": {"server": "c:3", "allow": ["p"]}})
    out, err = run("client", default_map=dm)
    assert out == "c 3 None on None p" and "--allow is deprecated" in err
    with pytest.raises(config.ConfigError):
        config.to_default_map(root, {"client": {"servr": "x"}})


@pytest.mark.parametrize("text,expect", [
    ("gw.example", ("gw.example", 9000, None)),
    ("https://gw.example", ("gw.example", 443, True)),
    ("http://gw.example:81/", ("gw.example", 81, False)),
    ("tls://[::1]:7000", ("::1", 7000, True)),
])
def test_parse_server(text, expect):
    a = opt.parse_server(text, default_port=9000)
    assert (a.host, a.port, a.tls) == expect


def test_parse_server_refuses_unknown_schemes():
    with pytest.raises(click.BadParameter, match="unknown scheme"):
        opt.parse_server("ftp://x:1")


def test_ondemand_relays_take_several_managers_by_flag_and_by_config_key():
    """``--server`` repeated (manager replicas), and ``server = [...]`` in a config
    file; a single string still works, and HOST:PORT alone means https."""
    from kakehashi.cli import main

    for cmd in ("edge", "inner"):
        params = {p.name: p for p in main.commands["ondemand"].commands[cmd].params}
        assert params["server"].multiple
        ctx = click.Context(main.commands["ondemand"].commands[cmd])
        assert params["server"].process_value(ctx, ("h1:8700", "http://h2:8700",
                                                    "h1:8700")) == \
            ("https://h1:8700", "http://h2:8700")
    dm = config.to_default_map(main, {"ondemand": {
        "edge": {"server": ["http://h1:8700", "http://h2:8700"]},
        "inner": {"server": "http://h1:8700"}}})
    assert dm["ondemand"]["edge"]["server"] == ["http://h1:8700", "http://h2:8700"]
    assert dm["ondemand"]["inner"]["server"] == ["http://h1:8700"]


@pytest.mark.parametrize("command", [["relay", "who"], ["relay", "pipe", "pi/ssh"]])
def test_terminals_refuse_an_unknown_session_cipher_setting(command, monkeypatch):
    """`relay serve` refuses KAKEHASHI_SESSION_CIPHER=bogus (a click choice); the
    terminals (every one builds its configuration in the same place) read the same
    variable and must not take a typo for "on"."""
    from kakehashi.cli import main

    monkeypatch.setenv("KAKEHASHI_SESSION_CIPHER", "Tls")
    monkeypatch.setenv("KAKEHASHI_PASSWORD", "x")
    res = CliRunner().invoke(main, [*command, "--server", "127.0.0.1:1", "--user", "laptop"])
    assert res.exit_code == 2, res.output
    assert "KAKEHASHI_SESSION_CIPHER" in res.output and "'Tls' is not one of" in res.output

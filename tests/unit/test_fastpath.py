"""The ``--fast-path`` modes (core/fastpath.py, kernelpath.for_mode) and the chain's CLI:
``auto`` is the default and falls back to the user-space fast path with one line saying
why; ``kernel`` asked for by name is an error at start where it is unavailable; ``on``
and ``off`` never try the kernel. Without root: the kernel path's availability is a
stand-in here."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from kakehashi.cli import main
from kakehashi.core import fastpath, kernelpath
from kakehashi.core.kernelpath import KernelPathError


def test_the_modes_and_what_each_drives():
    assert fastpath.DEFAULT_MODE == "auto"
    assert fastpath.MODES == ("auto", "on", "off", "kernel")
    assert [fastpath.callbacks(m) for m in fastpath.MODES] == [True, True, False, True]
    assert [fastpath.wants_kernel(m) for m in fastpath.MODES] == [True, False, False, True]


def test_the_start_line_says_which_path_and_why():
    line = fastpath.start_line("fw1", "auto", None, "not running as root")
    assert line == ("fw1: kernel path unavailable: not running as root; using the "
                    "user-space fast path (--fast-path auto)")
    assert fastpath.start_line("fw1", "auto", "kakehashi_dgram_7", None).startswith(
        "fw1: kernel fast path on (--fast-path auto, nftables table kakehashi_dgram_7)")
    assert fastpath.start_line("", "kernel", None, "datagrams are sealed and opened here "
                               "(--encrypt)").startswith(
        "kernel path unavailable: datagrams are sealed and opened here (--encrypt); using")
    assert "user-space fast path (--fast-path on)" in fastpath.start_line("fw2", "on", None,
                                                                          None)
    assert "asyncio datagram transports" in fastpath.start_line("fw2", "off", None, None)


def _unavailable(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []

    def shared() -> tuple[None, str]:
        calls.append(1)
        return None, "not running as root"

    monkeypatch.setattr(kernelpath, "shared", shared)
    return calls


def test_auto_falls_back_and_kernel_by_name_is_an_error(monkeypatch):
    calls = _unavailable(monkeypatch)
    assert kernelpath.for_mode("auto") == (None, "not running as root")
    with pytest.raises(KernelPathError, match="--fast-path kernel: kernel path unavailable: "
                                              "not running as root"):
        kernelpath.for_mode("kernel")
    n = len(calls)
    assert kernelpath.for_mode("on") == (None, None)
    assert kernelpath.for_mode("off") == (None, None)
    assert len(calls) == n  # on and off never look at the kernel path


@pytest.mark.parametrize("command", [["chain", "proxy", "--name", "fw1", "--udp-ports",
                                      "40000-40009"],
                                     ["chain", "forward", "--id", "alice", "--first-hop",
                                      "fw1@127.0.0.1:1", "--to", "127.0.0.1:2"]])
def test_the_cli_refuses_fast_path_kernel_where_it_is_unavailable(monkeypatch, command):
    _unavailable(monkeypatch)
    res = CliRunner().invoke(main, [*command, "--fast-path", "kernel"])
    assert res.exit_code == 1, res.output
    assert "--fast-path kernel: kernel path unavailable: not running as root" in res.output
    assert "--fast-path auto falls back" in res.output


@pytest.mark.parametrize("command", ["proxy", "forward"])
def test_auto_is_the_default_in_help(command):
    res = CliRunner().invoke(main, ["chain", command, "--help"])
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    assert "--fast-path [auto|on|off|kernel]" in text
    assert "[default: auto]" in text


def test_clean_kernel_says_why_it_cannot_run(monkeypatch):
    monkeypatch.setattr(kernelpath.KernelPath, "unavailable",
                        staticmethod(lambda: "not running as root or with CAP_NET_ADMIN"))
    monkeypatch.setattr(kernelpath, "clean_stale", lambda: pytest.fail("must not run"))
    res = CliRunner().invoke(main, ["chain", "clean-kernel"])
    assert res.exit_code == 1, res.output
    assert "cannot change nftables here: not running as root or with CAP_NET_ADMIN" \
        in res.output

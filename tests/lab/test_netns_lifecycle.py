"""Labs never leak namespaces or processes, and never collide with each other.

Leaks matter more than usual here: a leftover namespace keeps its listeners
bound and its nftables state, and CI boxes run many suites back to back.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.support.netns import (
    NS_PREFIX,
    NatLab,
    cleanup_stale_namespaces,
    list_lab_namespaces,
)

pytestmark = pytest.mark.lab


def _all_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_teardown_removes_namespaces_and_processes_even_on_error() -> None:
    lab = NatLab()
    names = {ns.name for ns in lab.namespaces.values()}
    with pytest.raises(RuntimeError, match="boom"), lab:
        assert names <= _all_namespaces()
        server = lab.pub.start_whoami(5000)
        # Also a process the lab did not start itself, via plain `ip netns exec`.
        stray = subprocess.Popen([*lab.hosta.exec_prefix, "sleep", "60"])
        raise RuntimeError("boom")

    assert not names & _all_namespaces()
    assert server.poll() is not None
    assert stray.wait(timeout=5) != 0


def test_parallel_labs_are_isolated() -> None:
    with NatLab() as first, NatLab() as second:
        assert first.prefix != second.prefix
        assert all(len(name) <= 64 for name in list_lab_namespaces())
        first.pub.start_whoami(5000)
        second.pub.start_whoami(5000)  # same address and port, separate namespaces
        assert first.hosta.tcp_probe(first.pub.addr, 5000).reply == "198.18.0.1"
        assert second.hostb.tcp_probe(second.pub.addr, 5000).reply == "198.18.0.2"


def test_interface_names_fit_kernel_limit(nat_lab: NatLab) -> None:
    for ns in nat_lab.namespaces.values():
        links = ns.run(["ip", "-o", "link", "show"]).stdout.splitlines()
        for line in links:
            ifname = line.split(":")[1].strip().split("@")[0]
            assert len(ifname) <= 15, ifname


def test_stale_namespaces_of_dead_processes_are_removed() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{NS_PREFIX}{dead.pid}-1-pub"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        removed = cleanup_stale_namespaces()
        assert stale in removed
        assert stale not in _all_namespaces()
        # Our own live namespaces are never swept.
        with NatLab() as lab:
            assert not {ns.name for ns in lab.namespaces.values()} & set(cleanup_stale_namespaces())
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True, check=False)

"""Fixtures for network-namespace lab tests.

Everything under ``tests/lab`` needs root, ``ip`` and ``nft``. Instead of
failing with a wall of RTNETLINK errors on laptops and unprivileged CI, each
test is skipped with the concrete reason :func:`lab_available` found.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.netns import FirewallLab, NatLab, lab_available

_HERE = Path(__file__).resolve().parent

GATEWAY_PORT = 8443
"""Port the FirewallLab fixture exposes on ``gw`` (tests read ``lab.gateway_port``)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test in this directory ``lab`` so ``-m "not lab"`` always works.

    Test modules set ``pytestmark`` too; this catches a module that forgets.
    The hook sees the whole session, hence the path filter.
    """
    for item in items:
        if item.path.resolve().is_relative_to(_HERE):
            item.add_marker(pytest.mark.lab)


@pytest.fixture(autouse=True)
def _require_lab() -> None:
    """Skip before any lab fixture runs when namespaces are not usable here."""
    ok, reason = lab_available()
    if not ok:
        pytest.skip(reason)


@pytest.fixture
def nat_lab() -> Iterator[NatLab]:
    """A fresh NatLab per test: building one takes ~0.2 s, sharing risks leaks."""
    with NatLab() as lab:
        yield lab


@pytest.fixture
def firewall_lab() -> Iterator[FirewallLab]:
    """A fresh FirewallLab exposing :data:`GATEWAY_PORT` on ``gw``."""
    with FirewallLab(gateway_port=GATEWAY_PORT) as lab:
        yield lab

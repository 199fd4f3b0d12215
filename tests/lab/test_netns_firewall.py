"""FirewallLab exposes exactly one TCP port of ``gw`` and nothing else."""

from __future__ import annotations

import pytest

from tests.support.netns import FirewallLab

pytestmark = pytest.mark.lab

OTHER_PORT = 9000
PROBE_TIMEOUT = 2.0


def test_outside_reaches_gateway_port_without_nat(firewall_lab: FirewallLab) -> None:
    port = firewall_lab.gateway_port
    firewall_lab.gw.start_whoami(port)

    result = firewall_lab.outside.tcp_probe(firewall_lab.gw.addr, port, timeout=PROBE_TIMEOUT)

    assert result.connected, result.error
    assert result.reply == firewall_lab.outside.addr == "198.18.4.10"


def test_outside_blocked_from_other_gateway_port(firewall_lab: FirewallLab) -> None:
    firewall_lab.gw.start_whoami(OTHER_PORT)
    control = firewall_lab.inner.tcp_probe(firewall_lab.gw.addr, OTHER_PORT)
    assert control.connected, control.error

    result = firewall_lab.outside.tcp_probe(firewall_lab.gw.addr, OTHER_PORT, PROBE_TIMEOUT)

    assert not result.connected
    assert "timed out" in result.error


def test_outside_cannot_reach_inner_but_gw_can(firewall_lab: FirewallLab) -> None:
    # Same port number as the exposed one: the rule must be bound to gw's address.
    port = firewall_lab.gateway_port
    firewall_lab.inner.start_whoami(port)

    from_gw = firewall_lab.gw.tcp_probe(firewall_lab.inner.addr, port)
    from_outside = firewall_lab.outside.tcp_probe(firewall_lab.inner.addr, port, PROBE_TIMEOUT)

    assert from_gw.connected, from_gw.error
    assert from_gw.reply == firewall_lab.gw.addr == "198.18.3.10"
    assert not from_outside.connected


def test_inside_cannot_open_outbound_by_default(firewall_lab: FirewallLab) -> None:
    firewall_lab.outside.start_whoami(OTHER_PORT)

    result = firewall_lab.gw.tcp_probe(firewall_lab.outside.addr, OTHER_PORT, PROBE_TIMEOUT)

    assert not result.connected


def test_allow_outbound_opens_inside_to_outside() -> None:
    with FirewallLab(gateway_port=8443, allow_outbound=True) as lab:
        lab.outside.start_whoami(OTHER_PORT)
        result = lab.inner.tcp_probe(lab.outside.addr, OTHER_PORT, PROBE_TIMEOUT)
        assert result.connected, result.error
        assert result.reply == lab.inner.addr


def test_gateway_port_is_validated() -> None:
    with pytest.raises(ValueError):
        FirewallLab(gateway_port=0)

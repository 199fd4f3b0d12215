"""NatLab really behaves like two NATed LANs and a public host.

Later relay tests rely on exactly these properties: if hosta could reach hostb
directly, a "works through the relay" test would prove nothing.
"""

from __future__ import annotations

import pytest

from tests.support.netns import NatLab

pytestmark = pytest.mark.lab

PORT = 5000
PROBE_TIMEOUT = 2.0
# A blocked connect may use the whole probe timeout; allow interpreter start-up
# on a loaded CI box on top, but no more -- a hang is a failure too.
MAX_FAILURE_SECONDS = PROBE_TIMEOUT + 2.0


def test_lan_hosts_reach_pub_through_masquerade(nat_lab: NatLab) -> None:
    nat_lab.pub.start_whoami(PORT)

    from_a = nat_lab.hosta.tcp_probe(nat_lab.pub.addr, PORT, timeout=PROBE_TIMEOUT)
    from_b = nat_lab.hostb.tcp_probe(nat_lab.pub.addr, PORT, timeout=PROBE_TIMEOUT)

    assert from_a.connected, from_a.error
    assert from_b.connected, from_b.error
    # pub sees the routers' public addresses, never the LAN addresses.
    assert from_a.reply == nat_lab.rtra.addr == "198.18.0.1"
    assert from_b.reply == nat_lab.rtrb.addr == "198.18.0.2"


def test_addresses_and_pub_has_no_route_to_lans(nat_lab: NatLab) -> None:
    assert nat_lab.pub.addr == "198.18.0.10"
    assert nat_lab.hosta.addr == "198.18.1.10"
    assert nat_lab.hostb.addr == "198.18.2.10"
    assert nat_lab.rtra.addrs == {"wan0": "198.18.0.1", "lan0": "198.18.1.1"}
    assert nat_lab.rtrb.addrs == {"wan0": "198.18.0.2", "lan0": "198.18.2.1"}

    routes = nat_lab.pub.run(["ip", "-4", "route", "show"]).stdout
    assert routes.split()[0] == NatLab.PUBLIC_NET
    assert "default" not in routes
    for lan_host in (nat_lab.hosta, nat_lab.hostb):
        lookup = nat_lab.pub.run(["ip", "route", "get", lan_host.addr], check=False)
        assert lookup.returncode != 0, lookup.stdout


@pytest.mark.parametrize("direction", ["a_to_b", "b_to_a"])
def test_lan_hosts_cannot_connect_to_each_other(nat_lab: NatLab, direction: str) -> None:
    if direction == "a_to_b":
        client, server, server_router = nat_lab.hosta, nat_lab.hostb, nat_lab.rtrb
    else:
        client, server, server_router = nat_lab.hostb, nat_lab.hosta, nat_lab.rtra
    server.start_whoami(PORT)
    # Control: the listener is reachable inside its own LAN, so a failure
    # below is the NAT's doing and not a dead server.
    control = server_router.tcp_probe(server.addr, PORT, timeout=PROBE_TIMEOUT)
    assert control.connected, control.error

    for target in (server.addr, server_router.addr):
        result = client.tcp_probe(target, PORT, timeout=PROBE_TIMEOUT)
        assert not result.connected, f"{client.role} reached {target}:{PORT}: {result.reply}"
        assert result.elapsed < MAX_FAILURE_SECONDS


def test_router_drops_inbound_even_when_routed(nat_lab: NatLab) -> None:
    """Unreachability must come from the stateful filter, not only from routing.

    Leak routes to LAN B into pub and rtra (as a misconfigured ISP might) so
    packets do arrive at rtrb's public side; rtrb must still drop them.
    """
    lan_b = NatLab.LAN_B_NET
    nat_lab.pub.run(["ip", "route", "add", lan_b, "via", nat_lab.rtrb.addr])
    nat_lab.rtra.run(["ip", "route", "add", lan_b, "via", nat_lab.rtrb.addr])
    nat_lab.hostb.start_whoami(PORT)

    for client in (nat_lab.pub, nat_lab.hosta):
        result = client.tcp_probe(nat_lab.hostb.addr, PORT, timeout=PROBE_TIMEOUT)
        assert not result.connected, f"{client.role} reached hostb: {result.reply}"
        assert "timed out" in result.error  # silently dropped, not refused or unroutable
        assert result.elapsed < MAX_FAILURE_SECONDS

    # Outbound from LAN B still works while inbound is dropped.
    nat_lab.pub.start_whoami(PORT)
    outbound = nat_lab.hostb.tcp_probe(nat_lab.pub.addr, PORT, timeout=PROBE_TIMEOUT)
    assert outbound.connected, outbound.error

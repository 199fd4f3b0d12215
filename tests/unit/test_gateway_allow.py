"""The target allow-list, decided after name resolution."""

from __future__ import annotations

import pytest

from kakehashi.gateway.allow import AllowList, PortSet, parse_entry


def test_networks_names_and_ports():
    allow = AllowList(["10.1.0.0/16", "intranet.example:80,443", "*.corp.example:8000-8100",
                       "[2001:db8::]/32"])
    assert allow.decide("10.1.2.3", 22, ["10.1.2.3"]).allowed
    assert not allow.decide("10.2.0.1", 80, ["10.2.0.1"]).allowed
    assert allow.decide("intranet.example", 443, ["192.0.2.10"]).allowed
    assert not allow.decide("intranet.example", 22, ["192.0.2.10"]).allowed
    assert allow.decide("a.b.corp.example", 8050, ["192.0.2.11"]).allowed
    assert not allow.decide("corp.example", 8050, ["192.0.2.11"]).allowed
    assert allow.decide("v6", 1, ["2001:db8::5"]).allowed


def test_decision_names_the_checked_address():
    allow = AllowList(["10.0.0.0/8"])
    decision = allow.decide("svc", 80, ["192.0.2.1", "10.0.0.7"])
    assert decision.allowed and decision.address == "10.0.0.7"


def test_allowed_name_pointing_at_loopback_is_refused():
    allow = AllowList(["intranet.example"])
    d = allow.decide("intranet.example", 80, ["127.0.0.1"])
    assert not d.allowed and "forbidden address" in d.reason
    assert not allow.decide("intranet.example", 80, ["169.254.169.254"]).allowed


def test_loopback_is_allowed_only_by_an_address_entry():
    assert AllowList(["127.0.0.1"]).decide("localhost", 80, ["127.0.0.1"]).allowed


@pytest.mark.parametrize("bad", ["", "host:70000", "host:0", "bad host", "a..b", "h:x"])
def test_bad_entries_are_rejected(bad):
    with pytest.raises(ValueError):
        parse_entry(bad)


def test_port_sets():
    ports = PortSet.parse("80,8000-8002")
    assert 80 in ports and 8001 in ports and 81 not in ports
    assert 1 in PortSet()


async def test_check_resolves_names():
    allow = AllowList(["127.0.0.0/8:1-65535"])
    decision = await allow.check("localhost", 80)
    assert decision.allowed and decision.address.startswith("127.")
    assert not (await AllowList(["10.0.0.0/8"]).check("localhost", 80)).allowed
    assert not (await allow.check("no-such-host.invalid", 80)).allowed


@pytest.mark.parametrize("mapped", ["::ffff:127.0.0.1", "::ffff:169.254.169.254",
                                    "::ffff:7f00:1"])
def test_ipv4_mapped_addresses_are_judged_as_the_ipv4_address(mapped):
    allow = AllowList(["*.corp.example"])
    assert not allow.decide("app.corp.example", 80, [mapped]).allowed
    assert allow.decide("app.corp.example", 80, ["::ffff:10.1.2.3"]).allowed
    by_net = AllowList(["10.0.0.0/8"])
    assert by_net.decide("::ffff:10.1.2.3", 80, ["::ffff:10.1.2.3"]).allowed
    assert not by_net.decide(mapped, 80, [mapped]).allowed

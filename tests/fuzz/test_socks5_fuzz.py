"""SOCKS5 parsers (core/socks5.py) against hostile bytes, and round trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kakehashi.core import socks5


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parsers_only_raise_socks5_error(data):
    for parse in (socks5.parse_greeting, socks5.parse_request):
        try:
            got = parse(data)
        except socks5.Socks5Error:
            continue
        assert got is None or got[1] <= len(data)
    try:
        socks5.parse_udp(data)
    except socks5.Socks5Error:
        pass


hosts = st.one_of(st.ip_addresses().map(str),
                  st.text("abcdefghijklmnopqrstuvwxyz.-0123456789", min_size=1, max_size=255))


@settings(max_examples=200, deadline=None)
@given(hosts, st.integers(0, 65535), st.binary(max_size=100))
def test_udp_header_round_trip(host, port, data):
    got = socks5.parse_udp(socks5.encode_udp(host, port, data))
    assert got[1:] == (port, data)
    assert got[0] == host or socks5.encode_address(got[0], 0) == socks5.encode_address(host, 0)


def test_request_and_greeting_incomplete_then_complete():
    msg = b"\x05\x03\x00\x01\x7f\x00\x00\x01\x00\x35"
    for i in range(len(msg)):
        assert socks5.parse_request(msg[:i]) is None
    req, used = socks5.parse_request(msg + b"extra")
    assert (req.command, req.host, req.port, used) == (3, "127.0.0.1", 53, len(msg))
    assert socks5.parse_greeting(b"\x05\x02\x00") is None
    assert socks5.parse_greeting(b"\x05\x02\x00\x02") == ({0, 2}, 4)


@pytest.mark.parametrize(("data", "reply"), [
    (b"\x04\x01\x00", socks5.GENERAL_FAILURE),
    (b"\x05\x00", socks5.GENERAL_FAILURE),
])
def test_bad_greetings(data, reply):
    with pytest.raises(socks5.Socks5Error) as err:
        socks5.parse_greeting(data)
    assert err.value.reply == reply


def test_bad_requests_and_datagrams():
    with pytest.raises(socks5.Socks5Error) as err:
        socks5.parse_request(b"\x05\x01\x00\x09\x00")
    assert err.value.reply == socks5.ATYP_NOT_SUPPORTED
    with pytest.raises(socks5.Socks5Error, match="fragmented"):
        socks5.parse_udp(b"\0\0\x01\x01\x7f\0\0\x01\0\x35x")
    with pytest.raises(socks5.Socks5Error, match="truncated"):
        socks5.parse_udp(b"\0\0\0\x01\x7f\0")

"""The one recogniser of "TLS on one side only" (issue 7, item 23)."""

from __future__ import annotations

import ssl

import pytest

from kakehashi.core import tlsmismatch as tm
from kakehashi.core import wire

CLIENT_HELLO = bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01])


def test_tls_records_are_recognised_and_kakehashi_or_http_bytes_are_not():
    assert tm.is_tls_record(CLIENT_HELLO) and tm.is_client_hello(CLIENT_HELLO)
    assert tm.is_tls_record(tm.TLS_ALERT) and not tm.is_client_hello(tm.TLS_ALERT)
    for other in (wire.PREAMBLE, b"GET / HTTP/1.1\r\n", b"HTTP/1.1 200 OK", b"\x16\x00", b""):
        assert not tm.is_tls_record(other), other


def test_a_tls_server_refuses_http_in_http_and_anything_else_with_an_alert():
    http = tm.plaintext_refusal(b"CONNECT example:443 HTTP/1.1\r\n")
    assert http.startswith(b"HTTP/1.1 400 ") and tm.MARK in http
    assert tm.plaintext_refusal(wire.PREAMBLE) == tm.TLS_ALERT


def test_a_plaintext_client_learns_that_the_server_speaks_tls():
    for reply in (tm.TLS_ALERT, tm.plaintext_refusal(b"GET / HTTP/1.1\r\n"), CLIENT_HELLO):
        with pytest.raises(tm.TLSMismatch, match="use --tls on"):
            tm.check_plaintext_reply(reply, "relay:7000")
    tm.check_plaintext_reply(b"HTTP/1.1 400 Bad Request\r\n\r\n", "gw:8080")  # a real 400
    tm.check_plaintext_reply(wire.PREAMBLE, "relay:7000")


def test_a_tls_client_learns_that_the_server_speaks_plaintext():
    """Feed a client-side SSLObject the plaintext refusal: the error it raises is the
    one :func:`server_speaks_plaintext` recognises."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    incoming.write(tm.TLS_REFUSAL)
    with pytest.raises(ssl.SSLError) as info:
        obj.do_handshake()
    assert tm.server_speaks_plaintext(info.value)
    assert "use --tls off" in str(tm.TLSMismatch("gw:8080", server_tls=False))
    assert not tm.server_speaks_plaintext(ConnectionResetError())


def test_the_preamble_check_names_a_tls_peer():
    with pytest.raises(wire.WireError) as info:
        wire.check_preamble(tm.TLS_ALERT[:4])
    assert info.value.code == "tls-mismatch"
    with pytest.raises(wire.WireError) as info:
        wire.check_preamble(b"GET ")
    assert info.value.code == "not-kakehashi"

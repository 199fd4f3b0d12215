"""One side speaks TLS and the other does not: recognise it and say which flag to change.

A client started with ``--tls off`` against a TLS server (or ``--tls on`` against a
plaintext one) used to wait for its timeout and print ``stopped.``, because neither
side understood the other's first bytes and neither said anything. This module is the
one place that knows what such a mismatch looks like on the wire; the servers and
clients of every system call it:

* a **TLS server** whose peer opens with something that is not a TLS handshake record
  answers at once with :func:`plaintext_refusal` (an HTTP 400 for an HTTP request, so
  curl shows it; a TLS alert record otherwise) and closes;
* a **plaintext server** whose peer opens with a TLS ClientHello answers
  :data:`TLS_REFUSAL` (plain text) and closes, so the client's TLS layer fails at once
  instead of waiting for a ServerHello;
* a **plaintext client** that finds a TLS record (or that HTTP 400) where it expects
  the server's first bytes calls :func:`check_plaintext_reply`;
* a **TLS client** whose handshake failed asks :func:`server_speaks_plaintext`.

Both client cases end in :class:`TLSMismatch`, whose message names the flag.
"""

from __future__ import annotations

import re
import ssl

#: TLS record content types a peer can send first: alert (21) and handshake (22)
_ALERT, _HANDSHAKE = 0x15, 0x16

#: a fatal ``protocol_version`` alert in a TLS 1.0 record: what a TLS server says to a
#: peer that did not open with a handshake (a TLS client would understand it too)
TLS_ALERT = bytes([_ALERT, 0x03, 0x01, 0x00, 0x02, 0x02, 0x46])

#: marks the HTTP refusal below, so a client can tell it from an ordinary 400
MARK = b"Kakehashi-Error: tls-required"

#: what a plaintext server answers to a TLS ClientHello; a TLS client's record layer
#: rejects it at once ("wrong version number") instead of waiting for a ServerHello
TLS_REFUSAL = b"kakehashi: this port does not speak TLS; use --tls off\r\n"

_HTTP_REQUEST = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+ ")


def is_tls_record(head: bytes | bytearray | memoryview) -> bool:
    """Do these first bytes begin a TLS handshake or alert record (type, major version 3)?"""
    head = bytes(head[:2])
    return bool(head) and head[0] in (_ALERT, _HANDSHAKE) and (len(head) < 2 or head[1] == 3)


def is_client_hello(head: bytes | bytearray | memoryview) -> bool:
    """Do these first bytes begin a TLS handshake record (what a TLS client sends first)?"""
    return bool(head) and head[0] == _HANDSHAKE and (len(head) < 2 or head[1] == 3)


def plaintext_refusal(head: bytes) -> bytes:
    """What a TLS server answers to a peer whose first bytes ``head`` are not TLS."""
    if _HTTP_REQUEST.match(head):
        body = (b"This port speaks TLS: connect with TLS (kakehashi clients: --tls on; "
                b"curl: -x https://...).\n")
        return (b"HTTP/1.1 400 Bad Request\r\n" + MARK + b"\r\n"
                b"Content-Type: text/plain\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body)
    return TLS_ALERT


class TLSMismatch(ConnectionError):
    """The server and this client disagree about TLS; the message says which flag."""

    def __init__(self, where: str, *, server_tls: bool) -> None:
        self.where = where
        self.server_tls = server_tls
        if server_tls:
            message = (f"{where} speaks TLS and this client connected without it: "
                       "use --tls on (drop --tls off)")
        else:
            message = (f"{where} does not speak TLS (it answered in plaintext): use --tls "
                       "off here, or start the server with --tls on")
        super().__init__(message)
        self.message = message


def check_plaintext_reply(head: bytes | bytearray | memoryview, where: str) -> None:
    """A plaintext client's look at the server's first bytes; raise :class:`TLSMismatch`
    when they show that the server speaks TLS."""
    head = bytes(head)
    if is_tls_record(head) or (head.startswith(b"HTTP/1.") and MARK in head):
        raise TLSMismatch(where, server_tls=True)


#: OpenSSL's reasons for "the first bytes back were not a TLS record"
_PLAINTEXT_REASONS = frozenset({
    "WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
    "HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "UNKNOWN_PROTOCOL", "RECORD_LENGTH_MISMATCH",
})


def server_speaks_plaintext(exc: BaseException) -> bool:
    """Does this handshake error of a TLS client mean the server answered in plaintext?"""
    return isinstance(exc, ssl.SSLError) and not isinstance(
        exc, ssl.SSLCertVerificationError) and exc.reason in _PLAINTEXT_REASONS

"""SOCKS5 (RFC 1928) message parsing and building, sans-IO.

Only what a server needs: the method greeting, the request, the reply, and the UDP
request header that wraps every datagram of a UDP ASSOCIATE. Parsers take the bytes
received so far and return None while a message is incomplete, so the caller owns the
reading; malformed input raises :class:`Socks5Error` with a reply code to answer with.
Domain names are bounded by the format (255 bytes); nothing here resolves them.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

VERSION = 5
NO_AUTH = 0x00
NO_ACCEPTABLE = 0xFF
CONNECT, BIND, UDP_ASSOCIATE = 1, 2, 3
ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 1, 3, 4

SUCCEEDED = 0x00
GENERAL_FAILURE = 0x01
NOT_ALLOWED = 0x02
NETWORK_UNREACHABLE = 0x03
HOST_UNREACHABLE = 0x04
COMMAND_NOT_SUPPORTED = 0x07
ATYP_NOT_SUPPORTED = 0x08


class Socks5Error(Exception):
    def __init__(self, reply: int, message: str) -> None:
        super().__init__(message)
        self.reply = reply


def parse_greeting(buf: bytes) -> tuple[set[int], int] | None:
    """``VER NMETHODS METHODS...`` -> (methods, bytes used)."""
    if len(buf) < 2:
        return None
    if buf[0] != VERSION:
        raise Socks5Error(GENERAL_FAILURE, f"not SOCKS5 (version byte {buf[0]})")
    end = 2 + buf[1]
    if buf[1] == 0:
        raise Socks5Error(GENERAL_FAILURE, "no authentication methods offered")
    if len(buf) < end:
        return None
    return set(buf[2:end]), end


def _parse_address(buf: bytes, at: int) -> tuple[str, int, int] | None:
    """ATYP ADDR PORT at ``at`` -> (host, port, end offset)."""
    if len(buf) < at + 1:
        return None
    atyp = buf[at]
    if atyp == ATYP_IPV4:
        end = at + 1 + 4 + 2
        if len(buf) < end:
            return None
        host = str(ipaddress.IPv4Address(buf[at + 1 : at + 5]))
    elif atyp == ATYP_IPV6:
        end = at + 1 + 16 + 2
        if len(buf) < end:
            return None
        host = str(ipaddress.IPv6Address(buf[at + 1 : at + 17]))
    elif atyp == ATYP_DOMAIN:
        if len(buf) < at + 2:
            return None
        n = buf[at + 1]
        end = at + 2 + n + 2
        if len(buf) < end:
            return None
        if n == 0:
            raise Socks5Error(GENERAL_FAILURE, "empty domain name")
        try:
            host = buf[at + 2 : at + 2 + n].decode("ascii")
        except UnicodeDecodeError:
            raise Socks5Error(GENERAL_FAILURE, "domain name is not ASCII") from None
    else:
        raise Socks5Error(ATYP_NOT_SUPPORTED, f"address type {atyp} is not supported")
    (port,) = struct.unpack_from(">H", buf, end - 2)
    return host, port, end


@dataclass(frozen=True)
class Request:
    command: int
    host: str
    port: int


def parse_request(buf: bytes) -> tuple[Request, int] | None:
    """``VER CMD RSV ATYP DST.ADDR DST.PORT`` -> (request, bytes used)."""
    if len(buf) < 4:
        return None
    if buf[0] != VERSION:
        raise Socks5Error(GENERAL_FAILURE, f"not SOCKS5 (version byte {buf[0]})")
    if buf[2] != 0:
        raise Socks5Error(GENERAL_FAILURE, "reserved byte is not zero")
    addr = _parse_address(buf, 3)
    if addr is None:
        return None
    host, port, end = addr
    return Request(buf[1], host, port), end


def encode_address(host: str, port: int) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raw = host.encode("ascii")
        if not 0 < len(raw) < 256:
            raise ValueError(f"domain name {host!r} does not fit SOCKS5") from None
        return bytes([ATYP_DOMAIN, len(raw)]) + raw + struct.pack(">H", port)
    atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
    return bytes([atyp]) + ip.packed + struct.pack(">H", port)


def encode_reply(reply: int, host: str = "0.0.0.0", port: int = 0) -> bytes:
    return bytes([VERSION, reply, 0]) + encode_address(host, port)


def parse_udp(datagram: bytes) -> tuple[str, int, bytes]:
    """``RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA`` -> (host, port, data).

    Fragments (FRAG != 0) are refused: RFC 1928 lets a server that does not reassemble
    drop them, and reassembly would be a memory lever for the sender."""
    if len(datagram) < 4:
        raise Socks5Error(GENERAL_FAILURE, "short UDP request header")
    if datagram[0] or datagram[1]:
        raise Socks5Error(GENERAL_FAILURE, "reserved bytes of the UDP header are not zero")
    if datagram[2]:
        raise Socks5Error(GENERAL_FAILURE, "fragmented datagrams are not supported")
    addr = _parse_address(datagram, 3)
    if addr is None:
        raise Socks5Error(GENERAL_FAILURE, "truncated UDP request header")
    host, port, end = addr
    return host, port, datagram[end:]


def encode_udp(host: str, port: int, data: bytes) -> bytes:
    return b"\0\0\0" + encode_address(host, port) + data

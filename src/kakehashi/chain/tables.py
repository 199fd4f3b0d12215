"""The proxy's tables (spec 004 section 3), parsed and decided without any I/O.

* authentication info (343/244): neighbour ID -> shared key;
* relay routes (342/243): destination network -> next hop ``NAME@HOST:PORT`` or direct;
* access control (344): user ID, source network, source ports;
* limits on concurrent sessions per user and per source address (setup floods).

Each parser takes the values a TOML table or a repeated flag gives and raises
ValueError with a message naming the entry, so configuration errors are found at start.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kakehashi.core import crypto
from kakehashi.core.identity import check_name
from kakehashi.core.stream import parse_hostport

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_name(name: str, what: str = "ID") -> str:
    try:
        return check_name(name, what)
    except ValueError as exc:
        raise ValueError(str(exc)) from None


def parse_keys(entries: Mapping[str, str]) -> dict[str, bytes]:
    """``{peer ID: base64 key}`` -> ``{peer ID: key bytes}``."""
    out: dict[str, bytes] = {}
    for name, text in entries.items():
        parse_name(name, "peer IDs")
        out[name] = crypto.parse_shared_key(text, f"key for {name!r}")
    return out


@dataclass(frozen=True)
class Hop:
    """A next proxy: its ID (whose key authenticates it) and its control endpoint."""

    name: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.name}@{self.host}:{self.port}"


def parse_hop(text: str) -> Hop:
    """``NAME@HOST:PORT``."""
    name, sep, rest = str(text).partition("@")
    if not sep:
        raise ValueError(f"hop {text!r}: expected NAME@HOST:PORT (e.g. fw2@192.0.2.7:1092)")
    parse_name(name, "proxy IDs")
    host, port = parse_hostport(rest)
    if not port:
        raise ValueError(f"hop {text!r}: port must not be 0")
    return Hop(name, host, port)


@dataclass(frozen=True)
class Routes:
    """Relay route table: the most specific network containing the destination wins;
    a destination no row covers is refused (a firewall relays only what it is told)."""

    rows: tuple[tuple[IPNet, Hop | None], ...]

    def lookup(self, host: str) -> tuple[bool, Hop | None]:
        """(found, next hop or None for direct)."""
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False, None
        best: tuple[IPNet, Hop | None] | None = None
        for net, hop in self.rows:
            if addr.version == net.version and addr in net and (
                    best is None or net.prefixlen > best[0].prefixlen):
                best = (net, hop)
        return (False, None) if best is None else (True, best[1])


def parse_routes(entries: Mapping[str, str]) -> Routes:
    rows = []
    for net_text, target in entries.items():
        try:
            net = ipaddress.ip_network(net_text, strict=False)
        except ValueError:
            raise ValueError(f"route {net_text!r}: not a network (e.g. 10.2.0.0/16)") from None
        hop = None if str(target).strip().lower() == "direct" else parse_hop(target)
        rows.append((net, hop))
    return Routes(tuple(rows))


@dataclass(frozen=True)
class PortRange:
    low: int
    high: int

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high

    def __str__(self) -> str:
        return f"{self.low}-{self.high}"


ANY_PORT = PortRange(0, 65535)


def parse_ports(text: Any) -> PortRange:
    """``any``, ``N`` or ``LOW-HIGH``."""
    t = str(text).strip().lower()
    if t in ("any", "*", ""):
        return ANY_PORT
    low_s, _, high_s = t.partition("-")
    try:
        low, high = int(low_s), int(high_s or low_s)
    except ValueError:
        raise ValueError(f"ports {text!r}: expected any, N or LOW-HIGH") from None
    if not 0 <= low <= high <= 65535:
        raise ValueError(f"ports {text!r}: out of range")
    return PortRange(low, high)


@dataclass(frozen=True)
class AclRule:
    """One row of the access control table (3441 user, 3442 source, 3443 source port)."""

    user: str
    source: IPNet
    ports: PortRange


@dataclass(frozen=True)
class Acl:
    rules: tuple[AclRule, ...]

    @property
    def users(self) -> frozenset[str]:
        return frozenset(r.user for r in self.rules)

    def allows(self, user: str, host: str, port: int) -> bool:
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(r.user in (user, "*") and addr.version == r.source.version
                   and addr in r.source and port in r.ports for r in self.rules)


def parse_acl(entries: Iterable[Mapping[str, Any]]) -> Acl:
    rules = []
    for i, entry in enumerate(entries):
        unknown = set(entry) - {"user", "from", "ports"}
        if unknown or "user" not in entry:
            raise ValueError(f"acl entry {i + 1}: needs user (and from, ports); "
                             f"unknown keys: {', '.join(sorted(unknown)) or 'none'}")
        user = str(entry["user"])
        if user != "*":
            parse_name(user, "user IDs")
        try:
            source = ipaddress.ip_network(str(entry.get("from", "0.0.0.0/0")), strict=False)
        except ValueError:
            raise ValueError(f"acl entry {i + 1}: from {entry.get('from')!r} is not a "
                             "network") from None
        rules.append(AclRule(user, source, parse_ports(entry.get("ports", "any"))))
    return Acl(tuple(rules))


def parse_assignments(items: Iterable[str], what: str) -> dict[str, str]:
    """Repeated ``NAME=VALUE`` flags as a table."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = str(item).partition("=")
        if not sep:
            raise ValueError(f"{what} {item!r}: expected NAME=VALUE")
        out[name.strip()] = value.strip()
    return out


def parse_acl_flag(item: str) -> dict[str, str]:
    """``user=alice,from=10.0.0.0/8,ports=any`` (the form of a repeated ``--acl``)."""
    return parse_assignments(item.split(","), "acl")


class SessionLimits:
    """Concurrent sessions per user and per source address: a flood of setups from one
    user or one address is refused once it holds its share, others go on being served.

    Setups still in progress (before and during authentication, when the user is not
    known yet) are bounded per address of the connection as well (``per_address``):
    the connection's address is the client's, or a neighbour proxy's. A neighbour
    proxy carries every user behind it, so its slot counts only while it authenticates
    and sends the request (one round trip): once an authenticated forwarder's request
    is admitted, the setup counts where the session does - on the user and the origin
    address it vouches for - and a flood from one user or origin behind it is bounded
    as if it came directly. The forwarder itself stays bounded by the slots of its
    authentications in progress, by ``max_connections`` and by ``total``."""

    def __init__(self, per_user: int, per_address: int, total: int, *,
                 what: str = "sessions", holder: str = "this proxy") -> None:
        self.per_user, self.per_address, self.total = per_user, per_address, total
        #: how refusals name what is counted and who holds it (the SOCKS server counts
        #: UDP associations)
        self.what, self.holder = what, holder
        self.users: dict[str, int] = {}
        self.addresses: dict[str, int] = {}
        self.setups: dict[str, int] = {}
        self.count = 0

    def begin_setup(self, address: str) -> str | None:
        """Take a setup slot for a new control connection, or return why not."""
        if self.per_address and self.setups.get(address, 0) >= self.per_address:
            return f"address {address} already has {self.per_address} setups in progress here"
        self.setups[address] = self.setups.get(address, 0) + 1
        return None

    def end_setup(self, address: str) -> None:
        left = self.setups.get(address, 1) - 1
        if left > 0:
            self.setups[address] = left
        else:
            self.setups.pop(address, None)

    def admit(self, user: str, address: str) -> str | None:
        """Take a slot, or return why not."""
        if self.total and self.count >= self.total:
            return f"{self.holder} holds its maximum of {self.total} {self.what}"
        if self.per_user and self.users.get(user, 0) >= self.per_user:
            return f"user {user!r} already holds {self.per_user} {self.what} here"
        if self.per_address and self.addresses.get(address, 0) >= self.per_address:
            return f"address {address} already holds {self.per_address} {self.what} here"
        self.users[user] = self.users.get(user, 0) + 1
        self.addresses[address] = self.addresses.get(address, 0) + 1
        self.count += 1
        return None

    def release(self, user: str, address: str) -> None:
        for table, key in ((self.users, user), (self.addresses, address)):
            left = table.get(key, 1) - 1
            if left > 0:
                table[key] = left
            else:
                table.pop(key, None)
        self.count = max(0, self.count - 1)

"""The gateway's target allow-list: nothing outside it is reachable (no SSRF).

Entries (``--allow``, repeatable, or several separated by spaces):

* ``10.1.0.0/16`` or ``10.1.2.3`` - addresses (IPv4/IPv6 networks), any port;
* ``intranet.example.com`` / ``*.corp.example`` - host names (exact, or any subdomain);
* any of them with ports: ``10.1.2.3:80,443``, ``*.corp.example:8000-8100``.

The decision is made *after* name resolution, and the gateway then connects to the
very address it checked (no second lookup), so DNS rebinding cannot move an allowed
name onto a forbidden address: a name entry admits the name only when every
resolved address is also outside the always-forbidden set (loopback, link-local,
unspecified, multicast), unless that set is explicitly allowed by an address entry.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass, field

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class PortSet:
    ranges: tuple[tuple[int, int], ...] = ()  # empty: any port

    def __contains__(self, port: int) -> bool:
        return not self.ranges or any(lo <= port <= hi for lo, hi in self.ranges)

    @classmethod
    def parse(cls, text: str) -> PortSet:
        ranges = []
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            lo, _, hi = part.partition("-")
            try:
                a, b = int(lo), int(hi or lo)
            except ValueError:
                raise ValueError(f"bad port {part!r}") from None
            if not (0 < a <= b <= 65535):
                raise ValueError(f"bad port range {part!r}")
            ranges.append((a, b))
        return cls(tuple(ranges))


@dataclass(frozen=True)
class Entry:
    network: IPNetwork | None = None
    name: str | None = None  # lower case; "*.x" matches subdomains of x
    ports: PortSet = field(default_factory=PortSet)

    def matches_name(self, host: str) -> bool:
        if self.name is None:
            return False
        if self.name.startswith("*."):
            return host.endswith(self.name[1:]) and host != self.name[2:]
        return host == self.name


def _split_ports(item: str) -> tuple[str, str]:
    """``host:ports``, ``[v6]:ports``, a bare v6 network, or no ports at all."""
    if item.startswith("["):  # [2001:db8::]/32:443 or [2001:db8::/32]:443
        host, _, rest = item[1:].partition("]")
        if rest.startswith("/"):
            prefix, _, ports = rest.partition(":")
            return host + prefix, ports
        return host, rest[1:] if rest.startswith(":") else ""
    if item.count(":") == 1:
        host, ports = item.split(":")
        return host, ports
    return item, ""


def parse_entry(item: str) -> Entry:
    host, ports = _split_ports(item.strip())
    if not host:
        raise ValueError(f"empty allow-list entry {item!r}")
    portset = PortSet.parse(ports) if ports else PortSet()
    try:
        return Entry(network=ipaddress.ip_network(host, strict=False), ports=portset)
    except ValueError:
        pass
    name = host.lower().rstrip(".")
    label = name[2:] if name.startswith("*.") else name
    if not label or any(not part or len(part) > 63 for part in label.split(".")) or not all(
            c.isalnum() or c in "-." for c in label):
        raise ValueError(f"{item!r} is neither an address, a network nor a host name")
    return Entry(name=name, ports=portset)


ALWAYS_SUSPECT = [ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "::1/128", "0.0.0.0/8", "::/128", "169.254.0.0/16", "fe80::/10",
    "224.0.0.0/4", "ff00::/8",
)]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    address: str | None = None  # the checked address to connect to
    reason: str = ""


#: address-literal decisions remembered per AllowList (cleared when full)
LITERAL_CACHE = 4096


class AllowList:
    def __init__(self, items: list[str]) -> None:
        self.entries = [parse_entry(part) for item in items for part in item.split()]
        #: decide_literal's answers: the entries never change, and parsing an address
        #: per client connection was a tenth of the one-request-per-connection CPU
        self._literal: dict[tuple[str, int], Decision | None] = {}

    def __bool__(self) -> bool:
        return bool(self.entries)

    def _address_allowed(self, ip: IPAddress, port: int) -> bool:
        return any(e.network is not None and ip in e.network and port in e.ports
                   for e in self.entries)

    def _name_allowed(self, host: str, port: int) -> bool:
        return any(e.matches_name(host) and port in e.ports for e in self.entries)

    def decide(self, host: str, port: int, addresses: list[str]) -> Decision:
        """Pure decision given the resolved ``addresses`` of ``host``."""
        host = host.lower().rstrip(".")
        if not addresses:
            return Decision(False, reason=f"{host} does not resolve")
        by_name = self._name_allowed(host, port)
        for text in addresses:
            ip = ipaddress.ip_address(text.split("%", 1)[0])
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                # ::ffff:a.b.c.d reaches a.b.c.d: judged as that address (a name whose
                # AAAA is ::ffff:127.0.0.1 must not slip past the loopback guard)
                ip = ip.ipv4_mapped
            if self._address_allowed(ip, port):
                return Decision(True, text)
            if by_name and not any(ip in net for net in ALWAYS_SUSPECT):
                return Decision(True, text)
        if by_name:
            return Decision(False, reason=f"{host} resolves to a forbidden address")
        return Decision(False, reason=f"{host}:{port} is not on the gateway's allow-list")

    def decide_literal(self, host: str, port: int) -> Decision | None:
        """The decision for an address literal (no resolution needed), else None."""
        key = (host, port)
        try:
            return self._literal[key]
        except KeyError:
            pass
        try:
            ipaddress.ip_address(host)
        except ValueError:
            decision = None
        else:
            decision = self.decide(host, port, [host])
        if len(self._literal) >= LITERAL_CACHE:
            self._literal.clear()
        self._literal[key] = decision
        return decision

    async def check(self, host: str, port: int) -> Decision:
        """Resolve ``host`` and decide; the caller connects to ``Decision.address``."""
        try:
            ipaddress.ip_address(host)
            addresses = [host]
        except ValueError:
            loop = asyncio.get_running_loop()
            try:
                infos = await asyncio.wait_for(
                    loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), 10)
            except (OSError, TimeoutError):
                return Decision(False, reason=f"{host} does not resolve")
            addresses = list(dict.fromkeys(info[4][0] for info in infos))
        return self.decide(host, port, addresses)

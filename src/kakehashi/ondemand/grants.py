"""The sans-IO core of the on-demand system: every decision, none of the sockets.

What the manager decides when a client asks for access (spec 002, S11-S15):
:func:`validate_request` (bad input -> :class:`GrantError`, nothing changes),
:func:`choose_edge` (the first relay, by policy, with the reason), :func:`draw_port`
(the entry port, drawn with a CSPRNG among the edge's free ports). What the edge
decides when a client connects (S26): :func:`check_access` (address range, validity,
revocation, connection cap), :func:`check_pin` (the registered public key of the client
certificate) and :class:`BurstLimit` (connection attempts per second). What is written
down: :func:`audit_event`.

Everything here is a pure function of its arguments (the clock and the random source
are passed in), so the tests can cover every refusal and every policy exhaustively.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
import time
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

ROLES = ("client", "edge", "inner", "admin")
POLICIES = ("random", "region", "carrier", "load")
#: why a connection on a granted port was not relayed (S26/S27)
DENY_REASONS = ("cidr", "certificate", "expired", "revoked", "limit")
#: what the audit trail of a grant records
EVENTS = ("created", "access", "connected", "denied", "refused", "closed", "deleted",
          "expired", "extended")

IMSI_RE = re.compile(r"\d{6,15}")
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class GrantError(ValueError):
    """A request that cannot be granted. ``code`` is stable, ``status`` the HTTP status,
    the message is for people."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


# --------------------------------------------------------------------------
# Parsing what people type
# --------------------------------------------------------------------------


def parse_duration(text: str | float | int) -> float:
    """``"10m"``, ``"30s"``, ``"1.5h"``, ``"2d"``, ``"250ms"`` or a number of seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text)
    else:
        match = _DURATION_RE.fullmatch(str(text).strip().lower())
        if not match:
            raise GrantError("bad-duration", f"{text!r} is not a duration "
                                             "(like 30s, 10m, 1h, 2d)")
        value = float(match.group(1)) * _UNITS[match.group(2)]
    if value != value or value in (float("inf"), float("-inf")):
        raise GrantError("bad-duration", f"{text!r} is not a duration")
    return value


def parse_target(text: str) -> tuple[str, int]:
    """``IMSI:PORT`` -> (imsi, port), with clear errors."""
    imsi, sep, port_s = text.strip().rpartition(":")
    if not sep:
        raise GrantError("bad-target", f"{text!r}: expected IMSI:PORT, e.g. 001010000000001:22")
    return check_imsi(imsi), check_port(port_s)


def check_imsi(imsi: object) -> str:
    if not isinstance(imsi, str) or not IMSI_RE.fullmatch(imsi):
        raise GrantError("bad-imsi", f"{imsi!r} is not an IMSI (6-15 digits)")
    return imsi


def check_port(port: object, what: str = "port") -> int:
    try:
        value = int(port)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise GrantError("bad-port", f"{what} {port!r} is not a number") from None
    if isinstance(port, bool) or not 1 <= value <= 65535:
        raise GrantError("bad-port", f"{what} {port!r} is out of range (1-65535)")
    return value


def parse_port_range(text: str) -> tuple[int, int]:
    """``"30000-30999"`` (or one port) -> (low, high)."""
    lo_s, _, hi_s = text.strip().partition("-")
    lo = check_port(lo_s, "port")
    hi = check_port(hi_s or lo_s, "port")
    if hi < lo:
        raise GrantError("bad-port", f"port range {text!r} ends before it starts")
    return lo, hi


def parse_cidr(text: object) -> Network:
    """One client address range; a bare address is a /32 (or /128)."""
    if not isinstance(text, str) or len(text) > 64:
        raise GrantError("bad-cidr", f"{text!r} is not an address range")
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise GrantError("bad-cidr", f"{text!r} is not an address range "
                                     "(like 203.0.113.0/24)") from None


def parse_table(items: Iterable[str], what: str) -> list[tuple[Network, str]]:
    """``CIDR=NAME`` entries (the region and carrier tables), most specific first."""
    table = []
    for item in items:
        cidr, sep, name = item.partition("=")
        if not sep or not name.strip():
            raise GrantError("bad-table", f"{what} entry {item!r}: expected CIDR=NAME")
        table.append((parse_cidr(cidr), name.strip()))
    table.sort(key=lambda e: e[0].prefixlen, reverse=True)
    return table


def lookup(table: Sequence[tuple[Network, str]], address: str | None) -> tuple[str, str] | None:
    """(name, matching range) for ``address`` in a table, or None."""
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    for net, name in table:
        if ip.version == net.version and ip in net:
            return name, str(net)
    return None


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------
# Validating a grant request (S11)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class GrantLimits:
    """What a manager allows (``ondemand manager`` options)."""

    max_ttl: float = 86400.0
    max_targets: int = 16
    max_cidrs: int = 64
    max_connections: int = 10_000


@dataclass
class GrantRequest:
    """A client's connection request, as it arrives (S11)."""

    targets: list[tuple[str, int]]
    ttl: float
    cidrs: list[str] = field(default_factory=list)
    auth_info: str | None = None
    tls: bool = False
    policy: str = "random"
    max_connections: int = 0
    client_address: str | None = None
    carrier: str | None = None


def validate_request(req: GrantRequest, *, devices: Mapping[str, Any],
                     auth_infos: Container[str], limits: GrantLimits) -> GrantRequest:
    """The request with normalised values, or :class:`GrantError` naming the first
    problem. Checks come before any state changes, so a refusal changes nothing."""
    if not req.targets:
        raise GrantError("bad-target", "no target: give IMSI:PORT")
    if len(req.targets) > limits.max_targets:
        raise GrantError("bad-target", f"at most {limits.max_targets} targets in one request")
    targets = []
    for imsi, port in req.targets:
        imsi = check_imsi(imsi)
        port = check_port(port, "target port")
        if imsi not in devices:
            raise GrantError("unknown-imsi", f"no device with IMSI {imsi} is registered "
                                             "(an inner relay registers its devices)", 404)
        if (imsi, port) not in targets:
            targets.append((imsi, port))
    ttl = req.ttl
    if not ttl > 0:
        raise GrantError("bad-ttl", "the TTL must be longer than zero")
    if ttl > limits.max_ttl:
        raise GrantError("bad-ttl", f"the TTL {ttl:g}s is beyond this manager's maximum "
                                    f"of {limits.max_ttl:g}s")
    if len(req.cidrs) > limits.max_cidrs:
        raise GrantError("bad-cidr", f"at most {limits.max_cidrs} address ranges")
    cidrs = [str(parse_cidr(c)) for c in req.cidrs]
    if req.auth_info is not None and req.auth_info not in auth_infos:
        raise GrantError("unknown-auth-info", f"no auth info {req.auth_info!r} is registered",
                         404)
    if req.tls is not True and req.auth_info is not None:
        raise GrantError("bad-auth-info", "an auth info checks client certificates, which "
                                          "needs a TLS grant (--tls)")
    if req.policy not in POLICIES:
        raise GrantError("bad-policy", f"policy {req.policy!r} is not one of "
                                       f"{', '.join(POLICIES)}")
    if isinstance(req.max_connections, bool) or not isinstance(req.max_connections, int) \
            or not 0 <= req.max_connections <= limits.max_connections:
        raise GrantError("bad-limit", f"max connections must be 0 (no limit) to "
                                      f"{limits.max_connections}")
    if req.client_address is not None:
        try:
            ipaddress.ip_address(req.client_address)
        except ValueError:
            raise GrantError("bad-address", f"{req.client_address!r} is not an IP address") \
                from None
    return GrantRequest(targets=targets, ttl=ttl, cidrs=cidrs, auth_info=req.auth_info,
                        tls=bool(req.tls), policy=req.policy,
                        max_connections=req.max_connections,
                        client_address=req.client_address, carrier=req.carrier)


# --------------------------------------------------------------------------
# Choosing the edge (S12) and the port (S13)
# --------------------------------------------------------------------------


@dataclass
class EdgeView:
    """What the manager knows of a connected first relay."""

    name: str
    public_host: str
    ports: tuple[int, int]
    region: str | None = None
    carrier: str | None = None
    sessions: int = 0
    bytes_per_second: float = 0.0
    used: set[int] = field(default_factory=set)

    @property
    def free(self) -> int:
        lo, hi = self.ports
        return hi - lo + 1 - sum(1 for p in self.used if lo <= p <= hi)


@dataclass(frozen=True)
class Choice:
    edge: EdgeView
    policy: str
    reason: str


def choose_edge(policy: str, edges: Sequence[EdgeView], *, client_address: str | None = None,
                carrier: str | None = None,
                region_table: Sequence[tuple[Network, str]] = (),
                carrier_table: Sequence[tuple[Network, str]] = (),
                rng: secrets.SystemRandom | Any = None) -> Choice:
    """Pick the first relay for a grant and say why (S12).

    ``random`` (default): any edge with a free port, drawn with a CSPRNG. ``region``:
    an edge in the client's region (client address -> region table). ``carrier``: an
    edge run by the client's carrier (given in the request, or client address ->
    carrier table). ``load``: the edge with the fewest active sessions, then the
    fewest bytes per second. When region or carrier find no edge, the choice falls
    back to random and the reason says so.
    """
    rng = rng or secrets.SystemRandom()
    if policy not in POLICIES:
        raise GrantError("bad-policy", f"policy {policy!r} is not one of {', '.join(POLICIES)}")
    usable = [e for e in edges if e.free > 0]
    if not usable:
        if edges:
            raise GrantError("no-port", "every connected edge has all its ports in use", 503)
        raise GrantError("no-edge", "no edge relay is connected to the manager", 503)
    if policy == "random":
        edge = rng.choice(usable)
        return Choice(edge, policy, f"drawn at random among {_count(usable, 'edge')} "
                                    "with free ports")
    if policy == "load":
        least = min((e.sessions, e.bytes_per_second) for e in usable)
        ties = [e for e in usable if (e.sessions, e.bytes_per_second) == least]
        edge = rng.choice(ties)
        return Choice(edge, policy, f"least loaded of {_count(usable, 'edge')}: "
                                    f"{edge.sessions} active sessions, "
                                    f"{edge.bytes_per_second:.0f} B/s")
    if policy == "region":
        found = lookup(region_table, client_address)
        if found is None:
            why = (f"client address {client_address} is in no region of the table"
                   if client_address else "the client address is unknown")
            return _fallback(usable, policy, why, rng)
        region, net = found
        same = [e for e in usable if e.region == region]
        if not same:
            return _fallback(usable, policy, f"no edge with free ports in region {region}", rng)
        edge = rng.choice(same)
        return Choice(edge, policy, f"client {client_address} is in region {region} "
                                    f"({net}); {_count(same, 'edge')} there")
    # carrier
    if carrier:
        source = "named in the request"
    else:
        found = lookup(carrier_table, client_address)
        if found is None:
            return _fallback(usable, policy, "the client's carrier is unknown (name it in "
                                             "the request or in the carrier table)", rng)
        carrier, net = found
        source = f"of client {client_address} ({net})"
    same = [e for e in usable if e.carrier == carrier]
    if not same:
        return _fallback(usable, policy, f"no edge with free ports run by carrier {carrier}",
                         rng)
    edge = rng.choice(same)
    return Choice(edge, policy, f"carrier {carrier} ({source}) runs {_count(same, 'edge')}")


def _count(items: Sequence[Any], noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _fallback(usable: Sequence[EdgeView], policy: str, why: str, rng: Any) -> Choice:
    edge = rng.choice(usable)
    return Choice(edge, policy, f"{why}; drawn at random among {_count(usable, 'edge')}")


def draw_port(ports: tuple[int, int], used: Container[int], rng: Any = None,
              *, exclude: Container[int] = ()) -> int | None:
    """An entry port drawn with a CSPRNG among the free ports of ``ports`` (S13), so a
    third party cannot guess it; None when every port is taken."""
    rng = rng or secrets.SystemRandom()
    lo, hi = ports
    span = hi - lo + 1
    for _ in range(32):  # a mostly free range: a few draws find a port
        port = lo + rng.randrange(span)
        if port not in used and port not in exclude:
            return port
    free = [p for p in range(lo, hi + 1) if p not in used and p not in exclude]
    return rng.choice(free) if free else None


# --------------------------------------------------------------------------
# The access decision at the edge (S26)
# --------------------------------------------------------------------------


@dataclass
class AccessView:
    """What the first relay holds of a grant to decide on a connection (S25)."""

    grant: str
    expires_at: float
    cidrs: tuple[Network, ...] = ()
    max_connections: int = 0
    revoked: bool = False
    tls: bool = False
    pin: str | None = None  # SHA-256 (hex) of the client's public key, when pinned

    @classmethod
    def from_grant(cls, g: Mapping[str, Any]) -> AccessView:
        return cls(grant=g["id"], expires_at=float(g["expires_at_ts"]),
                   cidrs=tuple(parse_cidr(c) for c in g.get("cidrs") or ()),
                   max_connections=int(g.get("max_connections") or 0),
                   revoked=g.get("status") == "revoked", tls=bool(g.get("tls")),
                   pin=g.get("pin"))


def check_access(view: AccessView, client_ip: str, now: float, active: int) -> str | None:
    """None to relay, else the reason to refuse (S26): ``revoked``, ``expired``, ``cidr``
    (the client address is outside every range; no range means any address) or
    ``limit`` (``active`` connections already at the grant's cap). The certificate
    is checked after the TLS handshake (:func:`check_pin`)."""
    if view.revoked:
        return "revoked"
    if now >= view.expires_at:
        return "expired"
    if view.cidrs:
        try:
            ip = ipaddress.ip_address(client_ip.partition("%")[0])
        except ValueError:
            return "cidr"
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not any(ip.version == n.version and ip in n for n in view.cidrs):
            return "cidr"
    if view.max_connections and active >= view.max_connections:
        return "limit"
    return None


def spki_sha256(cert_der: bytes) -> str:
    """SHA-256 (hex) of a certificate's SubjectPublicKeyInfo: what a pin names."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_der_x509_certificate(cert_der)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def pin_of_pem(pem: bytes) -> str:
    """The pin of a public key (or of a certificate's key) given as PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        if b"CERTIFICATE" in pem:
            key = x509.load_pem_x509_certificate(pem).public_key()
        else:
            key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise GrantError("bad-pin", f"not a PEM public key or certificate: {exc}") from None
    spki = key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def check_ca_pem(pem: bytes) -> str:
    """The CA certificate of an auth info (S1), checked: PEM, a CA, at most 64 KiB."""
    from cryptography import x509

    if len(pem) > 64 * 1024:
        raise GrantError("bad-ca", "the CA certificate is larger than 64 KiB")
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise GrantError("bad-ca", f"not a PEM certificate: {exc}") from None
    for cert in certs:
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise GrantError("bad-ca", f"{cert.subject.rfc4514_string()} is not a CA "
                                       "certificate")
    return pem.decode("ascii", "replace")


def check_pin(view: AccessView, cert_der: bytes | None) -> str | None:
    """None if the verified client certificate satisfies the grant's pin, else
    ``"certificate"``. The chain itself is verified by the TLS handshake against the
    registered CA; a grant without TLS or pin passes."""
    if not view.tls:
        return None
    if cert_der is None:
        return "certificate"
    if view.pin is not None and spki_sha256(cert_der) != view.pin:
        return "certificate"
    return None


class BurstLimit:
    """Connection attempts one grant may take per second (a token bucket); beyond it
    the edge refuses at once (``refused``, reason ``burst``) without asking anyone."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp: float | None = None

    def allow(self, now: float) -> bool:
        if self.rate <= 0:
            return True
        if self.stamp is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


# --------------------------------------------------------------------------
# Audit events
# --------------------------------------------------------------------------


def audit_event(kind: str, grant: str, now: float | None = None, **fields: Any) -> dict[str, Any]:
    """One event of a grant's trail (a JSON line, and ``GET /v1/grants/{id}/events``)."""
    if kind not in EVENTS:
        raise ValueError(f"unknown event {kind!r}")
    if kind == "denied" and fields.get("reason") not in DENY_REASONS:
        raise ValueError(f"a denial needs a reason of {DENY_REASONS}")
    ts = time.time() if now is None else now
    return {"event": kind, "grant": grant, "ts": round(ts, 3), "time": iso(ts), **fields}

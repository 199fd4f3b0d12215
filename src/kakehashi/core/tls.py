"""TLS contexts and a development certificate authority.

Every kakehashi system speaks TLS, and most deployments start on a laptop or a
lab box without a real PKI. So instead of teaching each system about
certificates, this module keeps one development CA in the state directory
(``state_dir()/ca/``), issues server certificates from it on demand
(``state_dir()/certs/``), and builds ``ssl.SSLContext`` objects with the same
safe defaults everywhere (TLS >= 1.2, verification on unless explicitly
disabled, optional mutual TLS).

The development CA vouches only for the names it issued certificates for: its own
certificate carries X.509 name constraints listing them (the loopback and host names
from the start, each ``--name`` added when a certificate is issued for it, by
re-signing the CA certificate with the same key). So a client that trusts the CA of
its state directory, or a copy of ``ca.pem``, trusts it for those servers and nothing
else, even if the CA key were stolen. A CA made by an older kakehashi without
constraints is upgraded in place the first time it is loaded (same key, so every
certificate it issued stays valid).

Building contexts is not free (loading the system trust store takes tens of
milliseconds), so contexts are cached in-process, keyed by their arguments and
by the identity of the files they were built from: replacing a certificate on
disk yields a fresh context on the next call. Cached contexts are shared, so
treat them as read-only; pass ``cache=False`` for a private one you may
change (for example to set ALPN protocols).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kakehashi.core.paths import state_dir, write_atomic

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt

__all__ = ["DevCA", "ServerTLS", "SessionCache", "TicketKeys", "client_context",
           "context_now", "default_names", "server_context"]

log = logging.getLogger("kakehashi.tls")

StrPath = str | os.PathLike[str]

CA_VALIDITY = timedelta(days=3650)
# Certificates are backdated a little so a peer with a slightly slow clock
# does not reject a certificate issued a second ago.
_BACKDATE = timedelta(hours=1)
# A reused certificate must still have this much life left (capped at a
# quarter of the requested validity so short-lived certs are still reused).
_RENEW_MARGIN = timedelta(days=30)
_CACHE_LIMIT = 64


def default_names() -> list[str]:
    """Names a development server certificate covers when none are given.

    Loopback in both address families plus the host name, so the same
    certificate works for local tests and for peers on the LAN that use the
    machine's name.
    """
    names = ["localhost", "127.0.0.1", "::1"]
    host = socket.gethostname()
    with suppress(ValueError):  # an odd host name must not break the default
        if _general_name(host) not in map(_general_name, names):
            names.append(host)
    return names


# --------------------------------------------------------------------------
# Small file helpers
# --------------------------------------------------------------------------


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` across processes.

    The lock belongs to the open file, so the operating system drops it if the
    process dies; no stale lock files to clean up by hand.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:  # pragma: no cover - Windows
            msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
        yield
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    write_atomic(path, data, mode)


FileSig = tuple[str, int, int, int] | None


def _sig(path: StrPath | None) -> FileSig:
    """Identify a file's current version (cheap ``stat``, no read)."""
    if path is None:
        return None
    st = os.stat(path)
    return (os.fspath(path), st.st_ino, st.st_size, st.st_mtime_ns)


# --------------------------------------------------------------------------
# Certificate names
# --------------------------------------------------------------------------

_DNS_RE = re.compile(r"^(\*\.)?[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*$")


def _general_name(raw: str) -> x509.GeneralName:
    """Turn ``"10.0.0.1"``, ``"[::1]"`` or ``"Host.Example"`` into a SAN entry.

    IP literals become IP SANs because TLS clients match IP addresses only
    against those, never against DNS names.
    """
    name = raw.strip()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if not name:
        raise ValueError("certificate names must not be empty")
    try:
        return x509.IPAddress(ipaddress.ip_address(name.partition("%")[0]))
    except ValueError:
        pass
    dns = name.rstrip(".").lower()
    if not dns.isascii():
        dns = dns.encode("idna").decode("ascii")
    if len(dns) > 253 or not _DNS_RE.match(dns):
        raise ValueError(f"not a valid DNS name or IP address: {raw!r}")
    return x509.DNSName(dns)


def _general_names(names: Iterable[str]) -> list[x509.GeneralName]:
    """Parse and de-duplicate names, keeping the caller's order."""
    out: list[x509.GeneralName] = []
    for raw in names:
        gn = _general_name(raw)
        if gn not in out:
            out.append(gn)
    if not out:
        raise ValueError("a certificate needs at least one name")
    return out


def _name_key(gn: x509.GeneralName) -> str:
    kind = "ip" if isinstance(gn, x509.IPAddress) else "dns"
    return f"{kind}:{gn.value}"


def _slug(gns: Sequence[x509.GeneralName]) -> str:
    """File stem for a name set: readable prefix, hash of the whole set.

    The hash makes the stem depend on the set, not on order or duplicates, so
    asking again for the same names finds the same files.
    """
    keys = sorted(map(_name_key, gns))
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()
    # Label from the set too (DNS names sort before IPs), not from the order.
    first = next((k for k in keys if k.startswith("dns:")), keys[0]).partition(":")[2]
    label = re.sub(r"[^A-Za-z0-9.-]+", "_", first).strip("._")[:40] or "cert"
    return f"{label}-{digest[:12]}"


def _subtree(gn: x509.GeneralName) -> x509.GeneralName:
    """The name-constraint subtree that admits ``gn``: the address itself (a /32 or
    /128), or the DNS name (with its subdomains; a wildcard's base name)."""
    if isinstance(gn, x509.IPAddress):
        return x509.IPAddress(ipaddress.ip_network(gn.value))
    name = str(gn.value)
    return x509.DNSName(name[2:] if name.startswith("*.") else name)


def _permitted(cert: x509.Certificate) -> list[x509.GeneralName] | None:
    """The permitted subtrees of a CA certificate, None when it has no constraints."""
    try:
        nc = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None
    return list(nc.permitted_subtrees or [])


def _leaf_cn(gns: Sequence[x509.GeneralName]) -> str:
    """A leaf's common name: its first DNS name, else a phrase that is no host name
    (a CN that looks like one is checked against the CA's DNS name constraints)."""
    dns = next((str(g.value) for g in gns if isinstance(g, x509.DNSName)), None)
    return dns[:64] if dns else f"kakehashi {gns[0].value}"[:64]


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _same_key(a: ec.EllipticCurvePublicKey, b: object) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    return isinstance(b, ec.EllipticCurvePublicKey) and a.public_bytes(
        serialization.Encoding.DER, fmt
    ) == b.public_bytes(serialization.Encoding.DER, fmt)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# --------------------------------------------------------------------------
# Development CA
# --------------------------------------------------------------------------


class DevCA:
    """The development CA in ``state_dir()/ca/``, created on first use.

    Creation happens under a lock file and both files are written atomically
    (key first, then certificate), so when several processes start at once
    exactly one generates the CA and the others load that same CA. An existing
    but broken CA is reported, never silently replaced: peers may already
    trust it.
    """

    def __init__(self, home: Path | None = None) -> None:
        # ``home``: a CA of its own in another directory (a system that issues
        # identities to its parts, like the on-demand manager, keeps them apart from
        # the development CA that signs server certificates). Only the development CA
        # is name-constrained: the other vouches for roles (its certificates' units),
        # not for server names.
        constrain = home is None
        home = home if home is not None else state_dir()
        self._dir = home / "ca"
        self._certs_dir = home / "certs"
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._issued: dict[str, tuple[FileSig, FileSig, datetime]] = {}
        with _locked(self._dir / ".lock"):
            if self.ca_path.exists():
                self._cert, self._key = self._load()
                if constrain and _permitted(self._cert) is None:
                    self._cert = self._upgrade()
            else:
                self._cert, self._key = self._create(constrain)

    @property
    def ca_path(self) -> Path:
        """PEM certificate to hand to clients as their trust anchor."""
        return self._dir / "ca.pem"

    @property
    def key_path(self) -> Path:
        """PEM private key of the CA (mode 0600)."""
        return self._dir / "ca.key"

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the CA certificate, hex; what a user compares by eye."""
        return self._cert.fingerprint(hashes.SHA256()).hex()

    def _load(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        try:
            cert = x509.load_pem_x509_certificate(self.ca_path.read_bytes())
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise RuntimeError(
                f"development CA in {self._dir} is unreadable ({exc}); "
                "remove that directory to create a new CA"
            ) from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not _same_key(
            key.public_key(), cert.public_key()
        ):
            raise RuntimeError(
                f"development CA in {self._dir}: ca.key does not match ca.pem; "
                "remove that directory to create a new CA"
            )
        return cert, key

    def _create(self, constrain: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kakehashi"),
                x509.NameAttribute(
                    NameOID.COMMON_NAME,
                    f"kakehashi development CA {socket.gethostname()}"[:64],
                ),
            ]
        )
        permitted = [_subtree(g) for g in _general_names(default_names())] \
            if constrain else None
        cert = self._sign_ca(key, name, now - _BACKDATE, now + CA_VALIDITY, permitted)
        _write_atomic(self.key_path, _key_pem(key), 0o600)
        _write_atomic(self.ca_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return cert, key

    @staticmethod
    def _sign_ca(key: ec.EllipticCurvePrivateKey, name: x509.Name, not_before: datetime,
                 not_after: datetime,
                 permitted: list[x509.GeneralName] | None) -> x509.Certificate:
        """The self-signed CA certificate; the same key and name every time, so
        re-signing it (with more permitted names) keeps every issued certificate valid."""
        public = key.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False
            )
        )
        if permitted is not None:
            builder = builder.add_extension(
                x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=None),
                critical=True)
        return builder.sign(key, hashes.SHA256())

    def _resign(self, permitted: list[x509.GeneralName]) -> x509.Certificate:
        cert = self._sign_ca(self._key, self._cert.subject, self._cert.not_valid_before_utc,
                             self._cert.not_valid_after_utc, permitted)
        _write_atomic(self.ca_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return cert

    def _upgrade(self) -> x509.Certificate:
        """Name-constrain a CA made without constraints (call with the CA lock held):
        the loopback and host names plus every name of a valid certificate it issued."""
        permitted = [_subtree(g) for g in _general_names(default_names())]
        now = datetime.now(UTC)
        for pem in sorted(self._certs_dir.glob("*.pem")) if self._certs_dir.is_dir() else []:
            try:
                leaf = x509.load_pem_x509_certificate(pem.read_bytes())
                leaf.verify_directly_issued_by(self._cert)
                san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            except (OSError, ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
                continue
            if leaf.not_valid_after_utc <= now:
                continue
            for gn in san:
                if isinstance(gn, x509.DNSName | x509.IPAddress) \
                        and _subtree(gn) not in permitted:
                    permitted.append(_subtree(gn))
        log.warning("development CA in %s had no name constraints: it now vouches only for "
                    "%s (same key: the certificates it issued stay valid; copies of the "
                    "old ca.pem elsewhere still trust it for any name - replace them)",
                    self._dir, ", ".join(str(g.value) for g in permitted))
        return self._resign(permitted)

    def _permit(self, gns: Sequence[x509.GeneralName]) -> None:
        """Make sure a name-constrained CA admits ``gns``, adding what it lacks."""
        permitted = _permitted(self._cert)
        if permitted is None or all(_subtree(g) in permitted for g in gns):
            return
        with _locked(self._dir / ".lock"):
            with suppress(OSError, ValueError):  # another process may have added names
                on_disk = x509.load_pem_x509_certificate(self.ca_path.read_bytes())
                if _same_key(self._key.public_key(), on_disk.public_key()):
                    self._cert = on_disk
            permitted = _permitted(self._cert) or []
            missing = [_subtree(g) for g in gns if _subtree(g) not in permitted]
            if missing:
                log.info("development CA: now vouching for %s too",
                         ", ".join(str(g.value) for g in missing))
                self._cert = self._resign(permitted + missing)

    @property
    def permitted_names(self) -> list[str] | None:
        """The names this CA vouches for (None: any name, i.e. not constrained)."""
        permitted = _permitted(self._cert)
        return None if permitted is None else [str(g.value) for g in permitted]

    def issue(self, names: list[str], *, days: int = 825) -> tuple[Path, Path]:
        """Return ``(cert_path, key_path)`` of a server certificate for ``names``.

        An existing certificate for exactly these names, issued by this CA and
        not close to expiry, is reused, so repeated calls (and restarts) keep
        the same certificate. The certificate is also valid for client auth,
        so one identity serves both ends of a mutual-TLS link.
        """
        if days < 1:
            raise ValueError("days must be at least 1")
        gns = _general_names(names)
        self._permit(gns)
        slug = _slug(gns)
        cert_path = self._certs_dir / f"{slug}.pem"
        key_path = self._certs_dir / f"{slug}.key"
        now = datetime.now(UTC)
        margin = min(_RENEW_MARGIN, timedelta(days=days) / 4)

        memo = self._issued.get(slug)
        if memo is not None and now < memo[2]:
            with suppress(OSError):
                if memo[:2] == (_sig(cert_path), _sig(key_path)):
                    return cert_path, key_path

        self._certs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with _locked(self._certs_dir / ".lock"):
            not_after = self._reusable(cert_path, key_path, gns)
            if not_after is None or not_after - now <= margin:
                not_after = self._write_leaf(cert_path, key_path, gns, days)
            self._issued[slug] = (_sig(cert_path), _sig(key_path), not_after - margin)
        return cert_path, key_path

    def _reusable(
        self, cert_path: Path, key_path: Path, gns: list[x509.GeneralName]
    ) -> datetime | None:
        """Expiry of the stored certificate if it fits the request, else None."""
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert.verify_directly_issued_by(self._cert)
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (OSError, ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
            return None
        if set(map(_name_key, san)) != set(map(_name_key, gns)):
            return None
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not cns or cns[0].value != _leaf_cn(gns):
            return None  # an older leaf whose CN the name constraints would refuse
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not _same_key(
            key.public_key(), cert.public_key()
        ):
            return None
        return cert.not_valid_after_utc

    def _write_leaf(
        self, cert_path: Path, key_path: Path, gns: list[x509.GeneralName], days: int
    ) -> datetime:
        key = ec.generate_private_key(ec.SECP256R1())
        public = key.public_key()
        now = datetime.now(UTC)
        not_after = min(now + timedelta(days=days), self._cert.not_valid_after_utc)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kakehashi"),
                x509.NameAttribute(NameOID.COMMON_NAME, _leaf_cn(gns)),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(gns), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        _write_atomic(key_path, _key_pem(key), 0o600)
        _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return not_after


    def sign_csr(self, csr_pem: bytes, *, unit: str, names: Sequence[str] = (),
                 days: int = 30) -> bytes:
        """Sign a certificate request; the subject is the request's common name with
        organisational unit ``unit`` (the role the issuer vouches for, which a peer
        checks), valid for server and client auth, ``names`` as its SANs.

        Only the request's public key and common name are taken; the issuer decides
        everything else, so a request cannot ask for more than it gets.
        """
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise ValueError(f"not a PEM certificate request: {exc}") from None
        if not csr.is_signature_valid:
            raise ValueError("the certificate request's signature is invalid")
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not cns:
            raise ValueError("the certificate request has no common name")
        public = csr.public_key()
        now = datetime.now(UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kakehashi"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
                x509.NameAttribute(NameOID.COMMON_NAME, str(cns[0].value)[:64]),
            ]))
            .issuer_name(self._cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(min(now + timedelta(days=days), self._cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self._key.public_key()), critical=False)
        )
        if names:
            gns = _general_names(names)
            self._permit(gns)
            builder = builder.add_extension(
                x509.SubjectAlternativeName(gns), critical=False)
        return builder.sign(self._key, hashes.SHA256()).public_bytes(
            serialization.Encoding.PEM)


def new_key_and_csr(common_name: str) -> tuple[bytes, bytes]:
    """A fresh private key (PEM) and a certificate request for it (PEM): the key never
    leaves the process that asks an issuer (:meth:`DevCA.sign_csr`) for a certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])]))
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), csr.public_bytes(serialization.Encoding.PEM)


def peer_unit(tls_object: ssl.SSLObject | ssl.SSLSocket) -> tuple[str, str] | None:
    """(organisational unit, common name) of a verified peer certificate, or None."""
    der = tls_object.getpeercert(binary_form=True)
    if not der:
        return None
    subject = x509.load_der_x509_certificate(der).subject
    units = subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    cns = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return (str(units[0].value) if units else "", str(cns[0].value) if cns else "")


# --------------------------------------------------------------------------
# In-process caches
# --------------------------------------------------------------------------

_lock = threading.Lock()
_contexts: dict[tuple[object, ...], ssl.SSLContext] = {}
_devcas: dict[Path, tuple[FileSig, DevCA]] = {}


def _dev_ca() -> DevCA:
    """The DevCA of the current state directory, loaded once per process.

    Re-loaded only when ``ca.pem`` changes on disk (or ``KAKEHASHI_HOME``
    points somewhere else), so a CA is never regenerated per call.
    """
    path = state_dir() / "ca" / "ca.pem"
    with _lock:
        hit = _devcas.get(path)
    with suppress(OSError):
        if hit is not None and hit[0] == _sig(path):
            return hit[1]
    ca = DevCA()
    with _lock:
        _devcas[path] = (_sig(path), ca)
    return ca


def _cached(key: tuple[object, ...], build: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    with _lock:
        ctx = _contexts.get(key)
    if ctx is not None:
        return ctx
    ctx = build()
    with _lock:
        if len(_contexts) >= _CACHE_LIMIT:
            _contexts.clear()
        return _contexts.setdefault(key, ctx)


def listener_cert(host: str, cert: StrPath | None, key: StrPath | None
                  ) -> tuple[str, str | None]:
    """The certificate and key files a TLS listener on ``host`` serves: ``cert``/``key``
    when given, else one issued by the development CA for ``host`` (or, for a wildcard
    address, :func:`default_names`), so an API server is secure with zero setup."""
    if cert:
        return str(cert), (str(key) if key else None)
    names = [host] if host not in ("", "0.0.0.0", "::") else default_names()
    c, k = _dev_ca().issue(names)
    return str(c), str(k)


# --------------------------------------------------------------------------
# Contexts
# --------------------------------------------------------------------------


def server_context(
    cert: StrPath | None = None,
    key: StrPath | None = None,
    *,
    names: list[str] | None = None,
    client_ca: StrPath | None = None,
    cache: bool = True,
) -> ssl.SSLContext:
    """A TLS >= 1.2 server context.

    Without ``cert`` a certificate for ``names`` (default: :func:`default_names`)
    is issued from the development CA, so a server runs securely with zero
    configuration. ``key`` may be omitted when ``cert`` also holds the key.
    With ``client_ca`` every client must present a certificate signed by it
    (mutual TLS).
    """
    if cert is None:
        if key is not None:
            raise ValueError("key given without cert")
        cert_path, key_path = _dev_ca().issue(names or default_names())
    else:
        cert_path, key_path = Path(cert), (Path(key) if key is not None else None)

    def build() -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert_path, key_path)
        if client_ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cafile=client_ca)
        return ctx

    if not cache:
        return build()
    return _cached(("server", _sig(cert_path), _sig(key_path), _sig(client_ca)), build)


def client_context(
    ca: StrPath | None = None,
    *,
    verify: bool = True,
    cert: StrPath | None = None,
    key: StrPath | None = None,
    cache: bool = True,
) -> ssl.SSLContext:
    """A TLS >= 1.2 client context that verifies the server and its host name.

    Trust comes from ``ca`` alone when given; otherwise from the system store
    plus the development CA if one exists (it is never created here, so a
    client-only machine gets no CA it does not need). ``verify=False`` turns
    all checking off and must be asked for explicitly. ``cert``/``key`` add a
    client certificate for mutual TLS.
    """
    if key is not None and cert is None:
        raise ValueError("key given without cert")
    dev_pem = state_dir(create=False) / "ca" / "ca.pem"
    extra: Path | None
    if not verify:
        extra, system = None, False
    elif ca is not None:
        extra, system = Path(ca), False
    else:
        extra, system = (dev_pem if dev_pem.is_file() else None), True

    def build() -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if verify:
            if system:
                ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
            if extra is not None:
                ctx.load_verify_locations(cafile=extra)
        else:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if cert is not None:
            ctx.load_cert_chain(cert, key)
        return ctx

    if not cache:
        return build()
    return _cached(("client", verify, system, _sig(extra), _sig(cert), _sig(key)), build)


# --------------------------------------------------------------------------
# Session resumption (TLS 1.3 session tickets)
# --------------------------------------------------------------------------
# A client that opens many connections to one server (a relay terminal refilling its
# spare links, a cluster node dialing another) pays a full handshake for each: the
# server signs with its certificate's key and the client verifies the chain, about
# 0.45 ms of the client's CPU and 0.05 ms of the server's more than a resumed one on
# this project's machine (docs/benchmarks.md, "TLS session resumption"). With the session
# of an earlier connection offered in the ClientHello, the server takes the ticket
# back instead: no certificate, no signature, no chain. The key exchange still runs
# (OpenSSL offers and accepts only psk_dhe_ke unless told otherwise), so resumed
# connections keep forward secrecy; no early data is sent (Python has no API for
# it and a server context accepts none by default).

#: seconds a server keeps one set of ticket keys (:class:`TicketKeys`): no ticket is
#: taken back later than this after its keys were made (OpenSSL's tickets say 7200 s)
TICKET_KEY_LIFETIME = 3600.0
#: servers one :class:`SessionCache` remembers (a terminal knows a few, a cluster
#: node the other nodes)
SESSION_CACHE_LIMIT = 256
#: seconds a kept session is offered again before a resumed connection's newer one
#: replaces it (:meth:`SessionCache.keep`): taking a session out of a connection costs
#: Python 3.11 a copy through DER, peer certificate included (233 us measured, half of
#: what resuming saves the client), so it is not done for every connection
SESSION_REFRESH = 600.0

TLSObject = ssl.SSLObject | ssl.SSLSocket
SessionKey = tuple[str, str, int]


class TicketKeys:
    """A TLS server's context whose session-ticket keys change every ``lifetime``
    seconds, kept in memory only.

    OpenSSL encrypts the tickets it issues with keys it draws at random when a context
    is made and keeps them in that context: never on disk, never shared with another
    process. A ticket issued by another relay process or cluster node, or by this one
    before a restart or a rotation, does not decrypt, and the client falls back to a
    full handshake (with the certificate checks) - which is all a failed resumption
    costs, so nodes need not share keys. Python can neither set nor rotate those keys
    on a live context, so a rotation is a fresh context from ``build`` (its own, not the
    cached one of :func:`server_context`: the ticket count is set on it). Connections
    already open keep theirs.

    ``resume=False``: the contexts issue no tickets, so every handshake is a full one.

    A rotation reads the certificate and key files again. Where they cannot be read
    at that moment (being renewed, moved away) the context in use goes on serving -
    it issues no more tickets under its keys, which are due - and the rotation is
    tried again :attr:`RETRY` seconds later, not on every connection: a relay that
    has served for an hour does not start refusing every handshake.
    """

    #: seconds before a rotation that failed is tried again
    RETRY = 60.0

    def __init__(self, build: Callable[[], ssl.SSLContext], *, resume: bool = True,
                 lifetime: float = TICKET_KEY_LIFETIME,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._build = build
        self.resume = resume
        self.lifetime = lifetime
        self._clock = clock
        self._ctx = self._fresh()
        self._since = clock()
        #: how many times the keys were replaced
        self.rotations = 0

    def _fresh(self) -> ssl.SSLContext:
        ctx = self._build()
        # one ticket per handshake: a client keeps only its latest session (OpenSSL's
        # default of two is one more ticket to encrypt, send and parse per connection)
        ctx.num_tickets = 1 if self.resume else 0
        return ctx

    def context(self) -> ssl.SSLContext:
        """The context for a connection accepted now (rotated when its keys are due)."""
        if self.resume and self._clock() - self._since >= self.lifetime:
            try:
                fresh = self._fresh()
            except (OSError, ssl.SSLError, ValueError) as exc:
                log.warning("cannot load the TLS certificate to rotate the session-ticket "
                            "keys (%s): going on with the current ones, issuing no more "
                            "tickets; trying again in %.0fs", exc, self.RETRY)
                self._ctx.num_tickets = 0
                self._since = self._clock() - self.lifetime + self.RETRY
                return self._ctx
            self._ctx = fresh
            self._since = self._clock()
            self.rotations += 1
            log.debug("TLS session-ticket keys rotated (%d)", self.rotations)
        return self._ctx


#: what a TLS server takes its contexts from: a fixed context, or one whose ticket keys
#: rotate (:class:`TicketKeys`; every long-lived listener that issues tickets uses one)
ServerTLS = ssl.SSLContext | TicketKeys


def context_now(source: ServerTLS) -> ssl.SSLContext:
    """The context for a server handshake starting now: the current one of a
    :class:`TicketKeys` (rotated when its keys are due), or ``source`` itself."""
    return source.context() if isinstance(source, TicketKeys) else source


class SessionCache:
    """A recent TLS session a client got from each server, offered on its next
    connections to that server (:func:`kakehashi.core.stream.start_tls` ``sessions=``).

    The ticket is offered again until the session is :data:`SESSION_REFRESH` seconds
    old or refused. (RFC 8446 asks clients not to reuse a ticket so that a passive
    observer cannot link their connections; a terminal's links to its relay come from
    one address anyway, and it logs in by name on each.)

    A session is offered only to the server it came from: the same server name (the
    name the certificate was checked against), the same address and the same client
    context (its trust anchors; Python refuses a session of another context anyway).
    The first connection to a server is always a full handshake with certificate and
    host-name verification, and so is every connection whose offer the server does
    not take (another relay, a restarted one, rotated keys, a tampered or expired
    ticket): the offer is then dropped, and the session of that full handshake kept
    instead. A handshake that fails with an offer drops it too, so the next attempt
    offers nothing.

    Counts are kept here (:attr:`resumed`, :attr:`full`) for the terminal's logs and
    tests; one cache belongs to one event loop (no lock).
    """

    def __init__(self, *, refresh: float = SESSION_REFRESH,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.refresh = refresh
        self._clock = clock
        self._latest: dict[SessionKey, tuple[ssl.SSLContext, ssl.SSLSession, float]] = {}
        #: handshakes that resumed an offered session, and full ones
        self.resumed = 0
        self.full = 0

    @staticmethod
    def key(server_name: str | None, peer: tuple | None) -> SessionKey | None:
        """Which server a session belongs to; None (no resumption) without a name or
        an address."""
        if not server_name or not peer:
            return None
        return (server_name, str(peer[0]), int(peer[1]))

    def offer(self, context: ssl.SSLContext, key: SessionKey | None) -> ssl.SSLSession | None:
        """The session to offer on a new connection to ``key`` with ``context``."""
        hit = self._latest.get(key) if key is not None else None
        if hit is None or hit[0] is not context:
            return None
        return hit[1]

    def handshake_done(self, tls_object: TLSObject, key: SessionKey | None,
                       offered: ssl.SSLSession | None) -> bool:
        """Count a finished handshake; an offer the server refused is dropped.
        Returns whether it resumed."""
        reused = bool(tls_object.session_reused)
        if reused:
            self.resumed += 1
        else:
            self.full += 1
            if offered is not None:
                log.debug("%s at %s:%s did not take the session offered (another server, "
                          "restarted, or its ticket keys changed): a full handshake", *key)
                self.forget(key, offered)
        return reused

    def keep(self, context: ssl.SSLContext, key: SessionKey | None,
             tls_object: TLSObject) -> None:
        """Remember the connection's session for the next one. Call it after the
        peer's first bytes were read: a TLS 1.3 server sends its tickets after the
        handshake, so before that the session has none.

        A connection that resumed the session kept for its server leaves it in place
        until it is :data:`SESSION_REFRESH` seconds old (its ticket is offered again
        meanwhile: the server's tickets are not single-use, and taking the newer one
        out costs more than it saves); every full handshake replaces it."""
        if key is None:
            return
        now = self._clock()
        hit = self._latest.get(key)
        if hit is not None and hit[0] is context and now - hit[2] < self.refresh \
                and tls_object.session_reused:
            return
        session = tls_object.session
        if session is None or not session.has_ticket:
            return
        if hit is None and len(self._latest) >= SESSION_CACHE_LIMIT:
            self._latest.pop(next(iter(self._latest)))
        self._latest[key] = (context, session, now)

    def forget(self, key: SessionKey | None, session: ssl.SSLSession | None = None) -> None:
        """Drop the session kept for ``key`` (only if it is ``session``, when given: a
        newer one kept meanwhile by another connection stays)."""
        hit = self._latest.get(key) if key is not None else None
        if hit is not None and (session is None or hit[1] is session):
            del self._latest[key]  # type: ignore[arg-type]

"""DevCA persistence/concurrency and real TLS handshakes over loopback sockets."""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

import kakehashi
from kakehashi.core.tls import DevCA, client_context, server_context


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv("KAKEHASHI_HOME", str(path))
    return path


def _handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str = "localhost"
) -> tuple[BaseException | None, BaseException | None]:
    """Handshake over a socket pair and exchange one byte each way.

    Returns (server_error, client_error); both None means success.
    """
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    errors: dict[str, BaseException | None] = {"server": None, "client": None}

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as tls:
                assert tls.recv(1) == b"?"
                tls.sendall(b"!")
        except BaseException as exc:
            errors["server"] = exc
            a.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname=hostname) as tls:
            tls.sendall(b"?")
            if tls.recv(1) != b"!":
                raise ConnectionError("server closed without answering")
    except BaseException as exc:
        errors["client"] = exc
        b.close()
    thread.join(10)
    assert not thread.is_alive()
    return errors["server"], errors["client"]


def test_devca_created_once_and_reused(home: Path) -> None:
    first = DevCA()
    second = DevCA()
    assert first.fingerprint == second.fingerprint
    assert first.ca_path == home / "ca" / "ca.pem"
    assert stat.S_IMODE(os.stat(first.key_path).st_mode) == 0o600

    cert = first.certificate
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert bc.ca and ku.key_cert_sign
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days >= 3650


def test_devca_concurrent_creation_threads(home: Path) -> None:
    barrier = threading.Barrier(8)
    prints: list[str] = []

    def make() -> None:
        barrier.wait()
        prints.append(DevCA().fingerprint)

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(prints) == 8
    assert len(set(prints)) == 1
    assert prints[0] == DevCA().fingerprint


def test_devca_concurrent_creation_processes(home: Path) -> None:
    src = Path(kakehashi.__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
    }
    code = "from kakehashi.core.tls import DevCA; print(DevCA().fingerprint)"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outs)) == 1
    assert outs[0] == DevCA().fingerprint


def test_issue_reuses_and_sets_names(home: Path) -> None:
    ca = DevCA()
    cert_path, key_path = ca.issue(["localhost", "127.0.0.1", "::1"])
    assert cert_path.parent == home / "certs"
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    pem = cert_path.read_bytes()

    # Same set in another order, via a fresh instance: same files, same cert.
    again = DevCA().issue(["::1", "LOCALHOST", "127.0.0.1", "localhost"])
    assert again == (cert_path, key_path)
    assert cert_path.read_bytes() == pem

    cert = x509.load_pem_x509_certificate(pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    cert.verify_directly_issued_by(ca.certificate)

    other, _ = ca.issue(["example.test"])
    assert other != cert_path


def test_issue_replaces_cert_from_other_ca(home: Path) -> None:
    cert_path, _ = DevCA().issue(["localhost"])
    old = cert_path.read_bytes()
    for f in (home / "ca").iterdir():
        f.unlink()
    new_ca = DevCA()
    assert new_ca.issue(["localhost"])[0] == cert_path
    assert cert_path.read_bytes() != old
    x509.load_pem_x509_certificate(cert_path.read_bytes()).verify_directly_issued_by(
        new_ca.certificate
    )


def test_issue_rejects_bad_names(home: Path) -> None:
    with pytest.raises(ValueError):
        DevCA().issue([])
    with pytest.raises(ValueError):
        DevCA().issue(["bad name"])


def test_tls_handshake_localhost(home: Path) -> None:
    server = server_context(names=["localhost"])
    client = client_context()
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
    assert server.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert _handshake(server, client) == (None, None)


def test_tls_certs_pass_strict_x509(home: Path) -> None:
    """Python 3.13 turns on VERIFY_X509_STRICT by default; our certs must pass."""
    client = client_context(DevCA().ca_path, cache=False)
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    assert _handshake(server_context(), client) == (None, None)


def test_tls_wrong_hostname_fails(home: Path) -> None:
    _, client_err = _handshake(
        server_context(names=["localhost"]), client_context(), "example.test"
    )
    assert isinstance(client_err, ssl.SSLCertVerificationError)


def test_tls_other_ca_fails(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = server_context(names=["localhost"])
    monkeypatch.setenv("KAKEHASHI_HOME", str(tmp_path / "other"))
    other_ca = DevCA()
    _, client_err = _handshake(server, client_context(other_ca.ca_path))
    assert isinstance(client_err, ssl.SSLCertVerificationError)


def test_tls_verify_false_accepts_unknown_ca(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = server_context(names=["localhost"])
    monkeypatch.setenv("KAKEHASHI_HOME", str(tmp_path / "empty"))
    client = client_context(verify=False)
    assert client.verify_mode == ssl.CERT_NONE
    assert _handshake(server, client, "anything") == (None, None)


def test_mtls(home: Path) -> None:
    ca = DevCA()
    # issued before the server loads the CA: a name the CA vouches for is in ca.pem
    # (a server that loaded ca.pem earlier knows the names of that moment)
    cert, key = ca.issue(["client.test"])
    server = server_context(names=["localhost"], client_ca=ca.ca_path)
    assert server.verify_mode == ssl.CERT_REQUIRED

    server_err, client_err = _handshake(server, client_context(ca.ca_path))
    assert isinstance(server_err, ssl.SSLError)
    assert client_err is not None

    ok = client_context(ca.ca_path, cert=cert, key=key)
    assert _handshake(server, ok) == (None, None)


def test_contexts_cached(home: Path) -> None:
    assert server_context() is server_context()
    assert client_context() is client_context()
    assert client_context(cache=False) is not client_context(cache=False)
    assert client_context(verify=False) is not client_context()


def test_server_context_args(home: Path) -> None:
    cert, key = DevCA().issue(["localhost"])
    with pytest.raises(ValueError):
        server_context(key=key)
    assert _handshake(server_context(cert, key), client_context()) == (None, None)


def test_start_tls_uses_bytes_already_read_ahead(home: Path) -> None:
    """A client that read past a CONNECT reply holds the first TLS bytes as
    pushback: the upgrade must start from them, not from the socket."""
    import asyncio

    from kakehashi.core.stream import Conn, start_tls

    ca = DevCA()
    server_ctx = server_context(*ca.issue(["localhost"]), cache=False)
    client_ctx = client_context(ca.ca_path, cache=False)

    async def main() -> bytes:
        a, b = socket.socketpair()
        a.setblocking(False)
        conn = Conn(a)
        thread = threading.Thread(target=lambda: _client(b), daemon=True)
        thread.start()
        first = await conn.recv(10)  # read ahead, then given back
        conn.unread(first)
        tls = await start_tls(conn, server_ctx, server_side=True, timeout=10)
        data = await tls.recv(1)
        await tls.send_all(b"!")
        thread.join(10)
        tls.close()
        return data

    def _client(sock: socket.socket) -> None:
        sock.settimeout(10)
        with client_ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(b"?")
            tls.recv(1)

    assert asyncio.run(main()) == b"?"


# -- the development CA vouches only for the names it issued (item 17) ------------------
def _forge(ca: DevCA, name: str, tmp: Path) -> tuple[Path, Path]:
    """A certificate for ``name`` signed with the CA's key but never issued through it
    (what a thief of the key, or a bug, would make)."""
    from datetime import UTC, datetime, timedelta

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.certificate.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(ca._key, hashes.SHA256()))
    cp, kp = tmp / f"{name}.pem", tmp / f"{name}.key"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return cp, kp


def test_devca_is_trusted_only_for_names_it_issued(home: Path, tmp_path: Path) -> None:
    ca = DevCA()
    assert set(ca.permitted_names or []) >= {"localhost", "127.0.0.1/32", "::1/128"}
    assert _handshake(server_context(names=["localhost"]), client_context()) == (None, None)
    forged = server_context(*_forge(ca, "bank.example", tmp_path))
    _, err = _handshake(forged, client_context(cache=False), "bank.example")
    assert isinstance(err, ssl.SSLCertVerificationError) and "subtree" in str(err)


def test_devca_adds_names_it_issues_for(home: Path, tmp_path: Path) -> None:
    ca = DevCA()
    server = server_context(names=["relay.example.org", "192.0.2.10"])
    assert {"relay.example.org", "192.0.2.10/32"} <= set(DevCA().permitted_names or [])
    assert _handshake(server, client_context(cache=False), "relay.example.org") == (None, None)
    assert _handshake(server, client_context(cache=False), "192.0.2.10") == (None, None)
    # the same key signs: what was issued before stays valid, nothing else is admitted
    cert, _ = ca.issue(["localhost"])
    x509.load_pem_x509_certificate(cert.read_bytes()).verify_directly_issued_by(
        DevCA().certificate)
    _, err = _handshake(server_context(*_forge(ca, "other.example.org", tmp_path)),
                        client_context(cache=False), "other.example.org")
    assert isinstance(err, ssl.SSLCertVerificationError)


def test_devca_ip_only_certificate_passes_the_constraints(home: Path) -> None:
    server = server_context(names=["127.0.0.1"])
    assert _handshake(server, client_context(cache=False), "127.0.0.1") == (None, None)


def test_an_old_unconstrained_devca_is_upgraded_in_place(home: Path, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    from kakehashi.core import tls

    ca = DevCA()
    old_leaf, old_key = ca.issue(["old.example", "10.1.2.3"])
    # what an older kakehashi wrote: the same CA without name constraints
    unconstrained = ca._sign_ca(ca._key, ca.certificate.subject,
                                ca.certificate.not_valid_before_utc,
                                ca.certificate.not_valid_after_utc, None)
    ca.ca_path.write_bytes(unconstrained.public_bytes(serialization.Encoding.PEM))
    tls._devcas.clear()
    upgraded = DevCA()
    assert {"old.example", "10.1.2.3/32", "localhost"} <= set(upgraded.permitted_names or [])
    # the certificate issued before the upgrade still works with the upgraded ca.pem
    server = server_context(old_leaf, old_key)
    assert _handshake(server, client_context(cache=False), "old.example") == (None, None)
    _, err = _handshake(server_context(*_forge(upgraded, "evil.example", tmp_path)),
                        client_context(cache=False), "evil.example")
    assert isinstance(err, ssl.SSLCertVerificationError)


def test_other_cas_are_not_name_constrained(tmp_path: Path) -> None:
    assert DevCA(tmp_path / "identities").permitted_names is None

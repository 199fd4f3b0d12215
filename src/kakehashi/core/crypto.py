"""Passwords, identity keys and end-to-end sealing.

kakehashi relays traffic it should not be able to read, so peers that know
each other's static X25519 keys agree on session keys end to end and seal
their messages; the relay only ever sees ciphertext. The handshake is
deliberately small and sans-IO (bytes in, bytes out) so any transport can
carry it. Password hashing lives here too so every system uses the same,
reviewed primitive (who may log in is :mod:`kakehashi.core.identity`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import logging
import os
import re
import struct
from collections import deque
from collections.abc import Callable, Sequence
from itertools import repeat
from pathlib import Path
from typing import Literal, Protocol, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kakehashi.core.paths import write_atomic

try:  # the optional C extension (setup.py builds it where a compiler and OpenSSL exist)
    from kakehashi.core import _dgaead
except ImportError:  # pragma: no cover - depends on the build
    _dgaead = None  # type: ignore[assignment]

log = logging.getLogger("kakehashi.core.crypto")

__all__ = [
    "DATAGRAM_OVERHEAD",
    "OVERHEAD",
    "SUITES",
    "SUITE_AES_128_GCM",
    "SUITE_CHACHA20_POLY1305",
    "AuthFailed",
    "DatagramChannel",
    "E2EError",
    "E2EHandshake",
    "E2ESession",
    "E2ESuite",
    "MutualAuth",
    "generate_identity",
    "hash_password",
    "load_identity",
    "load_or_create_identity",
    "new_shared_key",
    "parse_public_b64",
    "parse_shared_key",
    "public_b64",
    "save_identity",
    "verify_password",
]


class E2EError(Exception):
    """An end-to-end check failed: wrong peer key, tampering, replay, reorder."""


# --------------------------------------------------------------------------
# Passwords (scrypt)
# --------------------------------------------------------------------------

_SCRYPT_DEFAULT_N = 2**14
_SCRYPT_MAX_N = 2**20
_SCRYPT_MAX_R = 32
_SCRYPT_MAX_P = 16
# scrypt needs about 128 * n * r bytes; hashlib refuses more than INT_MAX, and
# a stored string must not be able to make us allocate gigabytes.
_SCRYPT_MAX_MEM = 2**30
_SALT_LEN = 16
_HASH_LEN = 32
_ENCODED_RE = re.compile(
    r"scrypt\$([0-9]{1,8})\$([0-9]{1,3})\$([0-9]{1,3})\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)"
)


def _check_scrypt_params(n: int, r: int, p: int) -> None:
    if n < 2 or n & (n - 1) or n > _SCRYPT_MAX_N:
        raise ValueError(f"scrypt n must be a power of two in [2, {_SCRYPT_MAX_N}]")
    if not 1 <= r <= _SCRYPT_MAX_R or not 1 <= p <= _SCRYPT_MAX_P:
        raise ValueError(f"scrypt needs 1 <= r <= {_SCRYPT_MAX_R} and 1 <= p <= {_SCRYPT_MAX_P}")
    if 128 * n * r > _SCRYPT_MAX_MEM:
        raise ValueError("scrypt parameters need more than 1 GiB of memory")


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    # OpenSSL needs 128*r*(n+2) for V plus 128*r*p for B; give it exactly that
    # (plus slack) instead of its 32 MiB default, which would reject r=16.
    maxmem = 128 * r * (n + 2 + p) + 2**20
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=dklen
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, *, n: int = _SCRYPT_DEFAULT_N, r: int = 8, p: int = 1) -> str:
    """Hash a password as ``scrypt$<n>$<r>$<p>$<salt_b64>$<hash_b64>``.

    The string carries its own parameters, so they can be raised later
    without invalidating stored hashes.
    """
    _check_scrypt_params(n, r, p)
    salt = os.urandom(_SALT_LEN)
    digest = _scrypt(password, salt, n, r, p, _HASH_LEN)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def _parse_encoded(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    """Split and validate a stored hash; ValueError on anything odd."""
    m = _ENCODED_RE.fullmatch(encoded)
    if m is None:
        raise ValueError("not an scrypt password hash")
    n, r, p = (int(m.group(i)) for i in (1, 2, 3))
    _check_scrypt_params(n, r, p)
    try:
        salt = base64.b64decode(m.group(4), validate=True)
        digest = base64.b64decode(m.group(5), validate=True)
    except binascii.Error as exc:
        raise ValueError("bad base64 in password hash") from exc
    if not 8 <= len(salt) <= 64 or not 16 <= len(digest) <= 64:
        raise ValueError("bad salt or hash length in password hash")
    return n, r, p, salt, digest


def verify_password(password: str, encoded: str) -> bool:
    """Check ``password`` against a string from :func:`hash_password`.

    Never raises: a malformed or hostile string (absurd parameters included)
    simply does not verify, so callers cannot turn bad data into a crash.
    """
    if not isinstance(password, str) or not isinstance(encoded, str):
        return False
    try:
        n, r, p, salt, expected = _parse_encoded(encoded)
        actual = _scrypt(password, salt, n, r, p, len(expected))
    except (ValueError, TypeError, MemoryError):
        return False
    return hmac.compare_digest(actual, expected)


# --------------------------------------------------------------------------
# Identity keys (X25519)
# --------------------------------------------------------------------------

KEY_LEN = 32


def generate_identity() -> X25519PrivateKey:
    """A new static X25519 identity key."""
    return X25519PrivateKey.generate()


def _write_private(path: Path, data: bytes, *, exclusive: bool = False) -> bool:
    """A 0600 file written atomically (see :func:`kakehashi.core.paths.write_atomic`)."""
    return write_atomic(path, data, 0o600, exclusive=exclusive)


def save_identity(key: X25519PrivateKey, path: str | os.PathLike[str]) -> None:
    """Store ``key`` as base64 of its raw 32 bytes in a 0600 text file."""
    _write_private(Path(path), (_b64(key.private_bytes_raw()) + "\n").encode("ascii"))


def load_identity(path: str | os.PathLike[str]) -> X25519PrivateKey:
    """Load a key written by :func:`save_identity`; ValueError if malformed."""
    text = Path(path).read_text(encoding="ascii", errors="replace").strip()
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error:
        raw = b""
    if len(raw) != KEY_LEN:
        raise ValueError(f"{os.fspath(path)}: not a base64 X25519 private key (32 bytes)")
    return X25519PrivateKey.from_private_bytes(raw)


def load_or_create_identity(path: str | os.PathLike[str]) -> X25519PrivateKey:
    """Load the identity at ``path``, creating it on first use.

    Safe when several processes start together: all end up with one key.
    """
    target = Path(path)
    if not target.exists():
        key = generate_identity()
        _write_private(
            target, (_b64(key.private_bytes_raw()) + "\n").encode("ascii"), exclusive=True
        )
    return load_identity(target)


def public_b64(key: X25519PrivateKey | X25519PublicKey) -> str:
    """Base64 of the raw 32-byte public key: the form users copy around."""
    pub = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return _b64(pub.public_bytes_raw())


def parse_public_b64(text: str) -> X25519PublicKey:
    """Parse :func:`public_b64` output, with a message that says what is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"X25519 public key must be a base64 string, not {type(text).__name__}")
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"X25519 public key is not valid base64: {text!r}") from exc
    if len(raw) != KEY_LEN:
        raise ValueError(f"X25519 public key must be 32 bytes, got {len(raw)}: {text!r}")
    return X25519PublicKey.from_public_bytes(raw)


# --------------------------------------------------------------------------
# End-to-end handshake and sessions
# --------------------------------------------------------------------------

#: the AEAD suites an :class:`E2ESession` can seal with, by the names peers announce
SUITE_CHACHA20_POLY1305 = "chacha20-poly1305"
SUITE_AES_128_GCM = "aes-128-gcm"
SUITES = (SUITE_AES_128_GCM, SUITE_CHACHA20_POLY1305)
E2ESuite = Literal["chacha20-poly1305", "aes-128-gcm"]
#: what an :class:`E2EHandshake` offers unless told otherwise: every suite, unless
#: KAKEHASHI_E2E_SUITES names fewer (a comma list; "chacha20-poly1305" alone makes
#: this side speak exactly as peers from before suites were negotiated)
E2E_SUITES: tuple[str, ...] = tuple(
    name.strip() for name in os.environ.get("KAKEHASHI_E2E_SUITES", ",".join(SUITES)).split(",")
    if name.strip()
)

OVERHEAD = 16
E2E_VERSION = 1
_PROTOCOL = b"kakehashi-e2e-v1"
_NONCE_LEN = 16
HELLO_LEN = 1 + KEY_LEN + _NONCE_LEN
#: the hello's nonce ends with an offer: this magic, then one byte of suite bits. A
#: peer that predates suite negotiation sends 16 random bytes there and reads none of
#: it, so the hello keeps its length and version and old peers still take it; a
#: random tail looks like an offer once in 2**56 sessions (which then fail their key
#: confirmation, never seal with a suite one side lacks: the suite is in the keys).
_OFFER_MAGIC = b"kkh-ste"
_OFFER_LEN = len(_OFFER_MAGIC) + 1
_SUITE_BITS = {SUITE_AES_128_GCM: 0x01}
_MAX_COUNTER = 2**64 - 1  # reserved, never used as a nonce


def _aead(suite: str, key: bytes) -> AESGCM | ChaCha20Poly1305:
    """The AEAD for ``suite`` under ``key``.

    AES-128-GCM takes a 16-byte key; a 32-byte key (what the handshake and the
    relay hand out for either suite) is cut to its first 16 bytes, which is exactly
    the HKDF output of length 16 for the same inputs, so nothing is weakened.
    """
    if suite == SUITE_CHACHA20_POLY1305:
        return ChaCha20Poly1305(key)
    if suite == SUITE_AES_128_GCM:
        if len(key) not in (16, 32):
            raise ValueError(f"aes-128-gcm needs a 16- or 32-byte key, got {len(key)}")
        return AESGCM(bytes(key[:16]))
    raise ValueError(f"unknown e2e suite {suite!r} (known: {', '.join(SUITES)})")


class E2ESession:
    """Two directional AEAD channels (ChaCha20-Poly1305 or AES-128-GCM) from one handshake.

    Nonces are 96 bits: four zero bytes and a per-direction 64-bit counter that is
    never sent, so each message costs exactly :data:`OVERHEAD` bytes (both suites
    have a 16-byte tag) and the receiver only accepts the next message in order: a
    replayed, dropped-and-later-injected or reordered message fails authentication.
    The two directions have different keys, so a counter value never meets the same
    key twice. A failed :meth:`open` does not advance the counter. AES-128-GCM is
    there because it runs about twice as fast as ChaCha20-Poly1305 on CPUs with AES
    instructions; which one a session uses is negotiated by :class:`E2EHandshake`
    (or chosen by whoever issued the keys). Not thread-safe; use one session per
    connection.
    """

    def __init__(
        self,
        send_key: bytes,
        recv_key: bytes,
        my_tag: bytes,
        peer_tag: bytes,
        hh: bytes,
        *,
        suite: E2ESuite = SUITE_CHACHA20_POLY1305,
    ) -> None:
        self._send = _aead(suite, send_key)
        self._recv = _aead(suite, recv_key)
        self.suite: E2ESuite = suite
        self._send_n = 0
        self._recv_n = 0
        self._my_tag = my_tag
        self._peer_tag = peer_tag
        self.handshake_hash = hh
        self.confirmed = False

    @classmethod
    def issued(cls, send_key: bytes, recv_key: bytes, *, suite: E2ESuite,
               sent: int = 0) -> E2ESession:
        """A session from keys somebody issued (the relay's session cipher) instead of
        a handshake; ``sent``: messages of the send direction the issuer sealed already
        (the early data the relay forwards sealed), so the counter starts behind them."""
        session = cls(send_key, recv_key, b"", b"", b"", suite=suite)
        session._send_n = sent
        return session

    @staticmethod
    def _nonce(counter: int) -> bytes:
        return b"\x00\x00\x00\x00" + counter.to_bytes(8, "little")

    def confirm_tag(self) -> bytes:
        """Send this to the peer right after the handshake."""
        return self._my_tag

    def check_confirm(self, tag: bytes) -> None:
        """Verify the peer's tag; E2EError if it does not hold its claimed key.

        Only a peer that computed all four Diffie-Hellman values, i.e. owns
        the static private key we expect, can produce this tag; a relay that
        swapped keys in between cannot.
        """
        if not isinstance(tag, bytes | bytearray) or not hmac.compare_digest(
            bytes(tag), self._peer_tag
        ):
            raise E2EError("key confirmation failed: peer does not hold the expected static key")
        self.confirmed = True

    def seal(self, plaintext: bytes, *, aad: bytes = b"") -> bytes:
        """Encrypt and authenticate the next outgoing message."""
        if self._send_n >= _MAX_COUNTER:
            raise E2EError("send counter exhausted; start a new handshake")
        out = self._send.encrypt(self._nonce(self._send_n), plaintext, aad)
        self._send_n += 1
        return out

    #: bytes a sealed message adds (for callers that size buffers)
    overhead = OVERHEAD

    def seal_into(self, plaintext: bytes | memoryview, out: memoryview) -> None:
        """:meth:`seal` into ``out`` (exactly ``len(plaintext) + OVERHEAD`` bytes): the
        bulk path reuses one buffer instead of allocating (and zeroing) one per message."""
        if self._send_n >= _MAX_COUNTER:
            raise E2EError("send counter exhausted; start a new handshake")
        self._send.encrypt_into(self._nonce(self._send_n), plaintext, None, out)
        self._send_n += 1

    def open_into(self, ciphertext: bytes | memoryview, out: memoryview) -> None:
        """:meth:`open` into ``out`` (exactly ``len(ciphertext) - OVERHEAD`` bytes)."""
        if self._recv_n >= _MAX_COUNTER:
            raise E2EError("receive counter exhausted; start a new handshake")
        if len(ciphertext) < OVERHEAD:
            raise E2EError("message too short")
        try:
            self._recv.decrypt_into(self._nonce(self._recv_n), ciphertext, None, out)
        except InvalidTag as exc:
            raise E2EError(
                "message failed authentication (tampered, replayed or reordered)"
            ) from exc
        self._recv_n += 1

    def open(self, ciphertext: bytes, *, aad: bytes = b"") -> bytes:
        """Decrypt the next incoming message; E2EError on any mismatch."""
        if self._recv_n >= _MAX_COUNTER:
            raise E2EError("receive counter exhausted; start a new handshake")
        if len(ciphertext) < OVERHEAD:
            raise E2EError("message too short")
        try:
            out = self._recv.decrypt(self._nonce(self._recv_n), ciphertext, aad)
        except InvalidTag as exc:
            raise E2EError(
                "message failed authentication (tampered, replayed or reordered)"
            ) from exc
        self._recv_n += 1
        return out


class E2EHandshake:
    """Mutually authenticated key agreement between two known static keys.

    Each side sends one hello ``version(1) || ephemeral_pub(32) || nonce(16)``, where
    the nonce is ``random(8) || "kkh-ste" || suite_bits(1)`` (bit 0: AES-128-GCM) from
    a side that offers more than ChaCha20-Poly1305, and 16 random bytes otherwise (as
    every peer did before suites were negotiated). Both sides then pick the same
    suite: AES-128-GCM when both hellos offer it, else ChaCha20-Poly1305. With
    ``i``/``r`` the initiator/responder, ``s``/``e`` static/ephemeral keys::

        h   = SHA256("kakehashi-e2e-v1" || u32be(len(prologue)) || prologue
                     || s_i.pub || s_r.pub || hello_i || hello_r)
        ikm = DH(e_i, e_r) || DH(s_i, e_r) || DH(e_i, s_r) || DH(s_i, s_r)
        info = "kakehashi-e2e-v1 keys"                        (ChaCha20-Poly1305)
               "kakehashi-e2e-v1 keys aes-128-gcm"            (AES-128-GCM)
        k_ir || k_ri || k_c = HKDF-SHA256(ikm, salt=h, info=info, 96)
        tag_i = HMAC(k_c, "initiator"),  tag_r = HMAC(k_c, "responder")

    (AES-128-GCM uses the first 16 bytes of ``k_ir``/``k_ri``.) The offers are inside
    the hellos, so inside ``h``: a relay that strips or alters one to force the slower
    suite makes the two sides hash different transcripts and key confirmation fails;
    the suite is in ``info`` too, so two sides can never agree on keys but not on the
    suite. With a peer that predates negotiation, the ChaCha20-Poly1305 schedule above
    is exactly the one it runs.

    ``DH(e,e)`` gives forward secrecy; the mixed terms bind each static key to
    the other side's fresh ephemeral, so only the real owners of ``s_i`` and
    ``s_r`` reach the same keys (and compromise of one's own static key does
    not let an attacker impersonate others to it). Each side sends its tag and
    checks the peer's; role-specific tags stop a tag being reflected back. The
    prologue binds any context both sides already agree on (e.g. a channel id).
    """

    def __init__(
        self,
        role: Literal["initiator", "responder"],
        static: X25519PrivateKey,
        peer_static: X25519PublicKey,
        prologue: bytes = b"",
        *,
        suites: Sequence[str] | None = None,
    ) -> None:
        if role not in ("initiator", "responder"):
            raise ValueError(f"role must be 'initiator' or 'responder', not {role!r}")
        if not isinstance(static, X25519PrivateKey) or not isinstance(peer_static, X25519PublicKey):
            raise TypeError("static must be an X25519PrivateKey, peer_static an X25519PublicKey")
        offered = frozenset(suites if suites is not None else E2E_SUITES)
        if unknown := offered - set(SUITES):
            raise ValueError(f"unknown e2e suites {sorted(unknown)} (known: {', '.join(SUITES)})")
        if SUITE_CHACHA20_POLY1305 not in offered:
            raise ValueError("chacha20-poly1305 must be offered: peers that predate suite "
                             "negotiation know only it")
        self.role = role
        self._static = static
        self._peer_static = peer_static
        self._prologue = bytes(prologue)
        self._ephemeral = X25519PrivateKey.generate()
        bits = sum(_SUITE_BITS[name] for name in offered if name in _SUITE_BITS)
        nonce = (os.urandom(_NONCE_LEN - _OFFER_LEN) + _OFFER_MAGIC + bytes([bits]) if bits
                 else os.urandom(_NONCE_LEN))
        self._hello = bytes([E2E_VERSION]) + self._ephemeral.public_key().public_bytes_raw() + nonce
        self._peer_hello: bytes | None = None

    @staticmethod
    def _offer(hello: bytes) -> int:
        """The suite bits a hello offers (0: ChaCha20-Poly1305 only, as old peers)."""
        tail = hello[-_OFFER_LEN:]
        return tail[-1] if tail[:-1] == _OFFER_MAGIC else 0

    @property
    def suite(self) -> E2ESuite:
        """The suite both sides pick once the peer's hello is in (the one both offer)."""
        if self._peer_hello is None:
            raise RuntimeError("suite before receive()")
        both = self._offer(self._hello) & self._offer(self._peer_hello)
        return SUITE_AES_128_GCM if both & _SUITE_BITS[SUITE_AES_128_GCM] else \
            SUITE_CHACHA20_POLY1305

    def hello(self) -> bytes:
        """This side's handshake message (the same bytes on every call)."""
        return self._hello

    def receive(self, peer_hello: bytes) -> None:
        """Take the peer's hello; ValueError if it is malformed."""
        if self._peer_hello is not None:
            raise ValueError("peer hello already received")
        if not isinstance(peer_hello, bytes | bytearray) or len(peer_hello) != HELLO_LEN:
            raise ValueError(f"peer hello must be {HELLO_LEN} bytes")
        if peer_hello[0] != E2E_VERSION:
            raise ValueError(f"unsupported e2e version {peer_hello[0]} (expected {E2E_VERSION})")
        if bytes(peer_hello) == self._hello:
            raise ValueError("peer hello is our own hello reflected back")
        self._peer_hello = bytes(peer_hello)

    def finish(self) -> E2ESession:
        """Derive the session; E2EError if a peer key is unusable (low order)."""
        if self._peer_hello is None:
            raise RuntimeError("finish() before receive()")
        peer_eph = X25519PublicKey.from_public_bytes(self._peer_hello[1 : 1 + KEY_LEN])
        me_pub = self._static.public_key().public_bytes_raw()
        peer_pub = self._peer_static.public_bytes_raw()
        initiator = self.role == "initiator"
        try:
            ee = self._ephemeral.exchange(peer_eph)
            if initiator:
                se = self._static.exchange(peer_eph)  # DH(s_i, e_r)
                es = self._ephemeral.exchange(self._peer_static)  # DH(e_i, s_r)
            else:
                se = self._ephemeral.exchange(self._peer_static)  # DH(e_r, s_i)
                es = self._static.exchange(peer_eph)  # DH(s_r, e_i)
            ss = self._static.exchange(self._peer_static)
        except ValueError as exc:  # all-zero shared secret from a low-order point
            raise E2EError("peer key is invalid (low-order point)") from exc

        s_i, s_r = (me_pub, peer_pub) if initiator else (peer_pub, me_pub)
        h_i, h_r = (self._hello, self._peer_hello) if initiator else (self._peer_hello, self._hello)
        th = hashlib.sha256(
            _PROTOCOL
            + struct.pack(">I", len(self._prologue))
            + self._prologue
            + s_i
            + s_r
            + h_i
            + h_r
        ).digest()
        suite = self.suite
        info = _PROTOCOL + b" keys"
        if suite != SUITE_CHACHA20_POLY1305:  # the old schedule stays as it was
            info += b" " + suite.encode("ascii")
        okm = HKDF(algorithm=hashes.SHA256(), length=96, salt=th, info=info).derive(
            ee + se + es + ss
        )
        k_ir, k_ri, k_c = okm[:32], okm[32:64], okm[64:]
        tag_i = hmac.new(k_c, b"initiator", hashlib.sha256).digest()
        tag_r = hmac.new(k_c, b"responder", hashlib.sha256).digest()
        if initiator:
            return E2ESession(k_ir, k_ri, tag_i, tag_r, th, suite=suite)
        return E2ESession(k_ri, k_ir, tag_r, tag_i, th, suite=suite)


# --------------------------------------------------------------------------
# Shared keys and mutual challenge-response (ISO/IEC 9798-4 style)
# --------------------------------------------------------------------------

SHARED_KEY_LEN = 32
_MIN_SHARED_KEY = 16
_NONCE = 32
_AUTH_LABEL = b"kakehashi-mutual-v1"
#: the key a verifier checks against when the claimed ID has none, so that an unknown
#: ID costs the same time as a wrong key and the two cannot be told apart
_DUMMY_KEY = os.urandom(SHARED_KEY_LEN)


def new_shared_key() -> str:
    """A fresh random shared key (32 bytes) as base64, the form configuration files hold."""
    return _b64(os.urandom(SHARED_KEY_LEN))


def parse_shared_key(text: str, what: str = "shared key") -> bytes:
    """Decode a base64 shared key; ValueError saying what is wrong (never echoing it)."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a base64 string, not {type(text).__name__}")
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except binascii.Error:
        raise ValueError(f"{what} is not valid base64") from None
    if len(raw) < _MIN_SHARED_KEY:
        raise ValueError(f"{what} must be at least {_MIN_SHARED_KEY} bytes, got {len(raw)}")
    return raw


class AuthFailed(Exception):
    """The peer did not prove it holds the shared key (or broke the exchange)."""


def _len_prefixed(*parts: bytes) -> bytes:
    return b"".join(struct.pack(">H", len(p)) + p for p in parts)


class MutualAuth:
    """One side of a three-pass mutual challenge-response with a shared key.

    The accepting side (``responder``, the verifier of the spec's [0036]) speaks first::

        1. responder -> initiator   ID_R, N_R                      (challenge)
        2. initiator -> responder   ID_I, N_I, MAC_K("I" | ID_R | ID_I | N_R | N_I)
        3. responder -> initiator   MAC_K("R" | ID_R | ID_I | N_R | N_I)

    ``K`` is the key each side holds for the other's ID (looked up by ``keys``). Both
    MACs cover both identities and both fresh nonces: an answer recorded earlier is
    worthless against a new ``N_R`` (replay), and the direction label makes a proof
    unusable as an answer and vice versa (reflection; an initiator echoing ``N_R`` as
    its own nonce is refused too). Comparisons are constant-time, and an unknown ID is
    checked against a dummy key so it takes as long as a wrong key. ``purpose`` binds
    the exchange to one protocol. :meth:`session_keys` derives two directional keys
    for data that follows (the spec's claim 7: encryption keyed from authentication).
    Sans-IO: values in, values out.
    """

    def __init__(self, role: Literal["initiator", "responder"], my_id: str,
                 keys: dict[str, bytes], purpose: bytes) -> None:
        if role not in ("initiator", "responder"):
            raise ValueError(f"role must be 'initiator' or 'responder', not {role!r}")
        self.role = role
        self.my_id = my_id
        self.peer_id: str | None = None
        self._keys = keys
        self._purpose = purpose
        self._nonce = os.urandom(_NONCE)
        self._peer_nonce: bytes | None = None
        self._key: bytes | None = None
        self.done = False

    def _mac(self, key: bytes, direction: bytes, id_r: str, id_i: str, n_r: bytes,
             n_i: bytes) -> bytes:
        msg = _len_prefixed(_AUTH_LABEL, self._purpose, direction, id_r.encode(),
                            id_i.encode(), n_r, n_i)
        return hmac.new(key, msg, hashlib.sha256).digest()

    # responder ---------------------------------------------------------------
    def challenge(self) -> tuple[str, bytes]:
        """Message 1: this side's ID and a fresh nonce."""
        assert self.role == "responder"
        return self.my_id, self._nonce

    def _bind(self, context: bytes) -> None:
        """Bind the exchange (both MACs, the session keys) to ``context`` as well, e.g.
        whether the initiator speaks directly or through relays, so it cannot be altered."""
        if context:
            self._purpose = self._purpose + b"|" + context

    def check_answer(self, peer_id: str, peer_nonce: bytes, mac: bytes,
                     context: bytes = b"") -> bytes:
        """Check message 2; return message 3 (the proof) or raise :class:`AuthFailed`."""
        assert self.role == "responder"
        if self.peer_id is not None:
            raise AuthFailed("answer already received")
        self._bind(context)
        if not isinstance(peer_nonce, bytes) or len(peer_nonce) != _NONCE:
            raise AuthFailed("malformed answer (nonce)")
        key = self._keys.get(peer_id)
        expected = self._mac(key or _DUMMY_KEY, b"I", self.my_id, peer_id, self._nonce,
                             peer_nonce)
        good = isinstance(mac, bytes) and hmac.compare_digest(expected, mac)
        if not good or key is None:
            raise AuthFailed(f"{peer_id!r} did not prove it holds the shared key "
                             "(wrong key or unknown ID)")
        if hmac.compare_digest(peer_nonce, self._nonce):
            raise AuthFailed("the answer reflects our own challenge")
        self.peer_id, self._peer_nonce, self._key = peer_id, peer_nonce, key
        self.done = True
        return self._mac(key, b"R", self.my_id, peer_id, self._nonce, peer_nonce)

    # initiator ---------------------------------------------------------------
    def answer(self, peer_id: str, peer_nonce: bytes,
               context: bytes = b"") -> tuple[str, bytes, bytes]:
        """Message 2 for a challenge; :class:`AuthFailed` if no key is held for the ID."""
        assert self.role == "initiator"
        if self.peer_id is not None:
            raise AuthFailed("challenge already answered")
        self._bind(context)
        if not isinstance(peer_nonce, bytes) or len(peer_nonce) != _NONCE:
            raise AuthFailed("malformed challenge (nonce)")
        key = self._keys.get(peer_id)
        if key is None:
            known = ", ".join(sorted(self._keys)) or "none"
            raise AuthFailed(f"no shared key for {peer_id!r} (keys held for: {known})")
        self.peer_id, self._peer_nonce, self._key = peer_id, peer_nonce, key
        return self.my_id, self._nonce, self._mac(key, b"I", peer_id, self.my_id, peer_nonce,
                                                  self._nonce)

    def check_proof(self, mac: bytes) -> None:
        """Check message 3: the responder holds the key too, or :class:`AuthFailed`."""
        assert self.role == "initiator"
        if self._key is None or self.peer_id is None or self._peer_nonce is None:
            raise AuthFailed("proof before the challenge was answered")
        expected = self._mac(self._key, b"R", self.peer_id, self.my_id, self._peer_nonce,
                             self._nonce)
        if not (isinstance(mac, bytes) and hmac.compare_digest(expected, mac)):
            raise AuthFailed(f"{self.peer_id!r} did not prove it holds the shared key "
                             "(wrong key, or not the real peer)")
        self.done = True

    def session_keys(self) -> tuple[bytes, bytes]:
        """(key for what this side sends, key for what it receives), fresh per exchange."""
        if not self.done or self._key is None or self._peer_nonce is None:
            raise RuntimeError("session keys before the exchange completed")
        n_r, n_i = ((self._nonce, self._peer_nonce) if self.role == "responder"
                    else (self._peer_nonce, self._nonce))
        id_r, id_i = ((self.my_id, self.peer_id or "") if self.role == "responder"
                      else (self.peer_id or "", self.my_id))
        okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=n_r + n_i,
                   info=_len_prefixed(_AUTH_LABEL + b" keys", self._purpose, id_r.encode(),
                                      id_i.encode())).derive(self._key)
        i2r, r2i = okm[:32], okm[32:]
        return (i2r, r2i) if self.role == "initiator" else (r2i, i2r)


# --------------------------------------------------------------------------
# Datagram sealing (AEAD with a replay window)
# --------------------------------------------------------------------------

DATAGRAM_OVERHEAD = 8 + 16
_WINDOW = 1024
_WINDOW_MASK = (1 << _WINDOW) - 1
#: a datagram's nonce: four zero bytes, then its sequence number as sent (8, big-endian)
_pack_nonce = struct.Struct(">4xQ").pack
_pack_head = struct.Struct(">Q").pack_into
_unpack_seq = struct.Struct(">Q").unpack_from
_HEADS: dict[tuple[int, int], struct.Struct] = {}


def _advance(top: int, seen: int, seq: int) -> tuple[int, int] | None:
    """The replay window (the highest sequence accepted, and bit i set for each of the
    :data:`_WINDOW` before it that was) once ``seq`` is accepted too, or None when it was
    accepted before or is older than the window. The caller keeps it only after the
    datagram authenticated."""
    if seq > top:
        shift = seq - top
        return seq, (((seen << shift) | 1) & _WINDOW_MASK if shift < _WINDOW else 1)
    age = top - seq
    if age >= _WINDOW or (seen >> age) & 1:
        return None
    return top, seen | (1 << age)


def _heads(n: int, size: int) -> struct.Struct:
    """The heads of ``n`` sealed datagrams of ``size`` plaintext bytes each, laid out
    back to back (zeros between: the ciphertext goes there after), as one ``struct``
    (kept in :data:`_HEADS`: a relay sees few sizes and batch lengths)."""
    if len(_HEADS) >= 512:
        _HEADS.clear()
    st = _HEADS[(n, size)] = struct.Struct(">" + f"Q{size + DATAGRAM_OVERHEAD - 8}x" * n)
    return st


#: whether :meth:`DatagramChannel.seal_batch` and :meth:`DatagramChannel.open_batch` take
#: a burst of one size at a regular stride (a sender's burst, every wakeup of a sealing
#: end) with views made once (:func:`_strided`) and their AEAD calls driven by ``map``
#: (no bytecode per datagram); off, every batch takes the loop (tests run both)
STRIDED = True
#: (id(buffer), start, step, width) -> (the buffer, views ``buffer[start + i * step:][:
#: width]`` for i in range(len(views))): the buffer is held, so its id is not reused
_VIEWS: dict[tuple[int, int, int, int], tuple[object, list[memoryview]]] = {}
#: (datagrams, stride) -> a struct reading their sequence numbers (see _seqs)
_SEQS: dict[tuple[int, int], struct.Struct] = {}
#: runs an iterator to its end in C, keeping nothing
_consume = deque(maxlen=0).extend


def _strided(buf: object, start: int, step: int, width: int, n: int) -> list[memoryview]:
    """At least ``n`` views of ``width`` bytes into ``buf`` every ``step`` bytes from
    ``start``, made once per layout: a relay's buffers are fixed and its bursts repeat
    the same layout, and making the two views of each datagram (two slices) cost about
    as much as the Python loop around the AEAD call. Only ``n`` are made: views beyond
    the buffer's end would be cut short, not refused."""
    key = (id(buf), start, step, width)
    hit = _VIEWS.get(key)
    if hit is not None and len(hit[1]) >= n:
        return hit[1]
    if len(_VIEWS) >= 16:  # a relay uses a few layouts per datagram size
        _VIEWS.clear()
    mv = memoryview(buf)  # type: ignore[arg-type]
    views = [mv[at:at + width] for at in range(start, start + n * step, step)]
    _VIEWS[key] = (buf, views)
    return views


def _stride(starts: Sequence[int], n: int) -> int:
    """The distance between consecutive ``starts[:n]`` if it is one (n > 1), else 0."""
    if type(starts) is range:
        return starts.step
    first = starts[0]
    step = starts[1] - first
    if step > 0 and starts[:n] == list(range(first, first + n * step, step)):
        return step
    return 0


def _seqs(n: int, step: int) -> struct.Struct:
    """A struct that reads the sequence numbers of ``n`` sealed datagrams ``step`` bytes
    apart with one call."""
    st = _SEQS.get((n, step))
    if st is None:
        if len(_SEQS) >= 512:
            _SEQS.clear()
        st = _SEQS[(n, step)] = struct.Struct(">" + f"Q{step - 8}x" * (n - 1) + "Q")
    return st


#: whether :meth:`DatagramChannel.seal_batch` and :meth:`DatagramChannel.open_batch` run
#: in C (:mod:`kakehashi.core._dgaead`: one OpenSSL AES-256-GCM context per direction,
#: keyed once, and the whole batch in one call): at a sealing end the Python loop around
#: each AEAD call and the context ``cryptography`` builds for every call were most of a
#: datagram's cost (docs/benchmarks.md). On where the extension imports, unless
#: ``KAKEHASHI_NATIVE_AEAD=0``; off, the Python code below (the reference) runs, with the
#: same bytes and decisions (tests run both)
NATIVE = _dgaead is not None and os.environ.get("KAKEHASHI_NATIVE_AEAD", "1") != "0"
_told = False


def aead_path() -> str:
    """Which code seals and opens datagram batches: ``native`` or ``python`` (for logs
    and benchmark output: a figure means little without it)."""
    return "native" if NATIVE and _dgaead is not None else "python"


#: what a lane turn did (:meth:`DatagramChannel.seal_turn`): datagrams taken from the
#: peer, their bytes, refused (not authentic, replays), sends failed, sends dropped for
#: a full buffer, a receive error (0/1), whether offloaded sends may still be made, and
#: the datagrams received but not taken (None, or [(payload, sockaddr), ...])
TurnResult = tuple[int, int, int, int, int, int, int, list[tuple[bytes, bytes]] | None]


class DatagramTransform(Protocol):
    """One direction of a :class:`DatagramChannel` (sealing or opening) as a payload
    transform: called on one datagram it returns the result (None: refused); its
    :attr:`batch` does the same for many at once, between the buffers a batched relay
    already holds (:meth:`DatagramChannel.seal_batch`, :meth:`DatagramChannel.open_batch`),
    which is how :class:`kakehashi.core.datagram.DatagramForwarder` uses it: one Python
    call per burst instead of one per datagram, no ``bytes`` in between."""

    batch: Callable[..., list[int]]
    #: a whole readiness callback of a relay's lane in C, where the extension has it
    #: (:meth:`DatagramChannel.seal_turn`, :meth:`DatagramChannel.open_turn`), else None
    turn: Callable[..., TurnResult | None] | None

    def __call__(self, data: bytes) -> bytes | None: ...


def _transform(one: Callable[[bytes], bytes | None], batch: Callable[..., list[int]],
               turn: Callable[..., TurnResult | None] | None = None) -> DatagramTransform:
    """``one`` with ``batch`` (and ``turn``) beside it: a ``functools.partial`` carries
    the attributes and is called as fast as the method itself (no Python wrapper per
    datagram)."""
    fn = functools.partial(one)
    fn.batch = batch  # type: ignore[attr-defined]
    fn.turn = turn  # type: ignore[attr-defined]
    return cast(DatagramTransform, fn)


class DatagramChannel:
    """AES-256-GCM for datagrams that may be lost or reordered, with replay protection.

    Each datagram is ``seq(8, big-endian) || ciphertext || tag(16)``; the nonce is the
    sequence number under a per-direction key, so it never repeats. The receiver keeps
    the highest sequence seen and a bitmap of the :data:`_WINDOW` before it: a datagram
    seen before, or older than the window, is refused — as is anything that fails
    authentication. :attr:`open` returns None for every refusal (the caller counts them);
    the window moves only after a datagram authenticated.

    :attr:`seal` and :attr:`open` are :class:`DatagramTransform` objects: callables on
    one datagram, with a batch form over buffers. Opening one datagram runs
    :meth:`open_batch`, so the replay check exists once; sealing one is the same three
    steps as sealing a batch (a test holds them to the same bytes). The batch forms run
    in C where :mod:`kakehashi.core._dgaead` is built (:data:`NATIVE`), with the same
    bytes and decisions as the Python code here, which is their reference. AES-256-GCM
    stays: on this machine the AEAD call costs the same for 128- and 256-bit keys and a
    little more for ChaCha20-Poly1305 (its per-call overhead in ``cryptography``, not the
    cipher, is the cost at datagram sizes), so a faster suite would buy nothing here.
    """

    __slots__ = ("_opener", "_recv", "_sealer", "_seen", "_send", "_send_seq", "_top", "open",
                 "refused", "seal")

    def __init__(self, send_key: bytes, recv_key: bytes) -> None:
        global _told
        self._send = AESGCM(send_key)
        self._recv = AESGCM(recv_key)
        # the native contexts exist whenever the extension does, so :data:`NATIVE` can be
        # switched at any time (the tests do): the window stays in _top/_seen either way
        self._sealer = _dgaead.Sealer(send_key) if _dgaead is not None else None
        self._opener = _dgaead.Opener(recv_key) if _dgaead is not None else None
        if not _told:  # once per process: which path the figures come from
            _told = True
            log.debug("datagram sealing: %s batch path", aead_path())
        self._send_seq = 0
        self._top = -1
        self._seen = 0  # bit i: sequence (top - i) was accepted
        self.refused = 0
        lanes = self._sealer is not None and hasattr(self._sealer, "turn")
        self.seal = _transform(self._seal_one, self.seal_batch,
                               self.seal_turn if lanes else None)
        self.open = _transform(self._open_one, self.open_batch,
                               self.open_turn if lanes else None)

    def _seal_one(self, payload: bytes) -> bytes:
        """:meth:`seal_batch` for one datagram, as ``bytes`` (what the one-datagram paths
        send: the chain's SOCKS server, the client library, the protocol path)."""
        seq = self._send_seq
        if seq >= _MAX_COUNTER:
            raise E2EError("datagram sequence exhausted; authenticate again")
        self._send_seq = seq + 1
        nonce = _pack_nonce(seq)
        return nonce[4:] + self._send.encrypt(nonce, payload, None)

    def _open_one(self, data: bytes) -> bytes | None:
        """:meth:`open_batch` for one datagram, as ``bytes``: the same checks in the same
        order, and the same window (:func:`_advance`)."""
        if len(data) < DATAGRAM_OVERHEAD:
            self.refused += 1
            return None
        seq = _unpack_seq(data)[0]
        window = _advance(self._top, self._seen, seq)
        if window is None:
            self.refused += 1
            return None
        try:
            out = self._recv.decrypt(_pack_nonce(seq), data[8:], None)
        except InvalidTag:
            self.refused += 1
            return None
        self._top, self._seen = window
        return out

    def seal_batch(self, src: memoryview, starts: Sequence[int], lengths: Sequence[int],
                   n: int, out: memoryview, at: int) -> list[int]:
        """Seal datagrams ``src[starts[i]:starts[i] + lengths[i]]`` for i < n, one after
        the other into ``out`` from ``at``; returns each one's sealed length.

        Every step in the loop is paid per datagram, so there is nothing in it but the
        AEAD call and its two buffer views: the heads (sequence numbers) of a batch of
        one size are written with one ``struct`` call before it."""
        seq = self._send_seq
        if n < 0:  # (it would move the sequence back: a nonce used twice)
            raise ValueError(f"a batch of {n} datagrams")
        if seq + n > _MAX_COUNTER:
            raise E2EError("datagram sequence exhausted; authenticate again")
        self._send_seq = seq + n
        if NATIVE and self._sealer is not None:
            return self._sealer.seal(seq, src, starts, lengths, n, out, at)
        encrypt_into = self._send.encrypt_into
        k = lengths[0] if n else 0
        if n > 1 and len(lengths) == n and lengths.count(k) == n:
            heads = _HEADS.get((n, k)) or _heads(n, k)
            heads.pack_into(out, at, *range(seq, seq + n))
            step = k + DATAGRAM_OVERHEAD
            stride = _stride(starts, n) if STRIDED else 0
            if stride:  # (a burst in the receive slots, or one coalesced run)
                _consume(map(encrypt_into, map(_pack_nonce, range(seq, seq + n)),
                             _strided(src, starts[0], stride, k, n), repeat(None),
                             _strided(out, at + 8, step, step - 8, n)))
                return [step] * n
            sealed = step - 8
            at += 8
            # (the loop's indexing and nonces in C: zip and map, not bytecode each)
            for s, nonce in zip(starts[:n], map(_pack_nonce, range(seq, seq + n)), strict=True):
                encrypt_into(nonce, src[s:s + k], None, out[at:at + sealed])
                at += step
            return [step] * n
        sizes = []
        for i in range(n):
            s = starts[i]
            k = lengths[i]
            end = at + k + DATAGRAM_OVERHEAD
            _pack_head(out, at, seq + i)
            encrypt_into(_pack_nonce(seq + i), src[s:s + k], None, out[at + 8:end])
            sizes.append(end - at)
            at = end
        return sizes

    def open_batch(self, src: memoryview, starts: Sequence[int], lengths: Sequence[int],
                   n: int, out: memoryview, at: int) -> list[int]:
        """Open datagrams as :meth:`seal_batch` lays them out, the accepted ones one after
        the other into ``out`` from ``at``; returns each one's opened length, -1 for a
        refusal (counted in :attr:`refused`). The replay window sees them in order, so a
        datagram repeated within one batch is refused like one repeated later."""
        if NATIVE and self._opener is not None:
            sizes, self._top, self._seen, refused = self._opener.open(
                self._top, self._seen, src, starts, lengths, n, out, at)
            self.refused += refused
            return sizes
        decrypt_into = self._recv.decrypt_into
        top, seen = self._top, self._seen
        if STRIDED and n > 1 and self._open_run(src, starts, lengths, n, out, at):
            return [lengths[0] - DATAGRAM_OVERHEAD] * n
        sizes = []
        refused = 0
        try:  # what was accepted stays accepted, whatever ends the loop
            for s, size in zip(starts[:n], lengths[:n], strict=True):
                k = size - DATAGRAM_OVERHEAD
                if k < 0:
                    refused += 1
                    sizes.append(-1)
                    continue
                seq = _unpack_seq(src, s)[0]
                if seq == top + 1:
                    # the next one in order (nearly every datagram): what _advance gives,
                    # without a call and a tuple per datagram; the bits shifted beyond
                    # the window are never read and are cut once, below
                    new_top, new_seen = seq, (seen << 1) | 1
                else:
                    window = _advance(top, seen, seq)
                    if window is None:  # seen before, or older than the window
                        refused += 1
                        sizes.append(-1)
                        continue
                    new_top, new_seen = window
                try:
                    decrypt_into(_pack_nonce(seq), src[s + 8:s + size], None, out[at:at + k])
                except InvalidTag:
                    refused += 1
                    sizes.append(-1)
                    continue
                top, seen = new_top, new_seen
                sizes.append(k)
                at += k
        finally:
            self._top, self._seen = top, seen & _WINDOW_MASK
            self.refused += refused
        return sizes

    def seal_turn(self, fd_in: int, fd_out: int, peer: bytes, dst: bytes, gso: bool,
                  bound: int) -> TurnResult | None:
        """A relay lane's readiness callback in C (:mod:`kakehashi.core._dgaead`): take
        what socket ``fd_in`` holds from ``peer`` (a ``sockaddr``), seal it and send it
        on ``fd_out`` to ``dst``, until the socket is empty or ``bound`` datagrams were
        taken. The caller has made the port record's decision (datagrams from ``peer``
        go to ``dst``) and counts what was taken in the record; anything from another
        source comes back unsent, in order, for the record to decide. None when the C
        batch path is off (:data:`NATIVE`): the caller's Python path then runs."""
        if not NATIVE or self._sealer is None:
            return None
        # Until the turn returns, the sequence numbers from ``seq`` on are C's, and how
        # many it used is known only from its result: meanwhile the channel counts as
        # exhausted. A seal that runs during the turn (Python code a garbage collection
        # starts inside it: a finalizer, a gc callback, another thread) is refused
        # instead of sealing under a number the turn also uses, and a turn that raises
        # after sealing (no memory for its result) leaves the channel exhausted, not
        # where the next turn would use the same numbers again.
        seq, self._send_seq = self._send_seq, _MAX_COUNTER
        r = self._sealer.turn(seq, _MAX_COUNTER, fd_in, fd_out, peer, dst, gso, bound)
        if r is None:  # (another turn is under way: re-entered; nothing was sealed)
            self._send_seq = seq
            return None
        self._send_seq = r[0]
        return r[1:]  # type: ignore[no-any-return]

    def open_turn(self, fd_in: int, fd_out: int, peer: bytes, dst: bytes, gso: bool,
                  bound: int) -> TurnResult | None:
        """:meth:`seal_turn` for opening: the same checks and window as
        :meth:`open_batch`; refusals are counted in :attr:`refused` and returned."""
        if not NATIVE or self._opener is None:
            return None
        # (as in seal_turn: until the turn returns the window is C's, and meanwhile the
        # channel's refuses every sequence number (the highest, and all before it, seen):
        # an open that runs during the turn accepts nothing the turn accepts too, and a
        # turn that raises after it opened datagrams (no memory for its result) does not
        # let them be accepted again)
        top, seen = self._top, self._seen
        self._top, self._seen = _MAX_COUNTER, _WINDOW_MASK
        r = self._opener.turn(top, seen, fd_in, fd_out, peer, dst, gso, bound)
        if r is None:
            self._top, self._seen = top, seen
            return None
        self._top, self._seen = r[0], r[1]
        self.refused += r[4]
        return r[2:]  # type: ignore[no-any-return]

    def _open_run(self, src: memoryview, starts: Sequence[int], lengths: Sequence[int],
                  n: int, out: memoryview, at: int) -> bool:
        """:meth:`open_batch` for a burst that is a sender's run as sent: ``n`` datagrams
        of one size at a regular stride, each the next in order, all authentic. Those are
        exactly the batches the loop would accept whole, and it leaves what the loop
        would: the outputs back to back, the window moved past all of them. Anything
        else (a gap, a replay, a forgery, another size) returns False with nothing
        changed but ``out``, and the loop decides each datagram."""
        size = lengths[0]
        if size < DATAGRAM_OVERHEAD or lengths[:n].count(size) != n:
            return False
        stride = _stride(starts, n)
        if stride < size:
            return False
        first = starts[0]
        top = self._top
        if _seqs(n, stride).unpack_from(src, first) != tuple(range(top + 1, top + 1 + n)):
            return False
        k = size - DATAGRAM_OVERHEAD
        try:
            _consume(map(self._recv.decrypt_into, map(_pack_nonce, range(top + 1, top + 1 + n)),
                         _strided(src, first + 8, stride, size - 8, n), repeat(None),
                         _strided(out, at, k, k, n) if k else repeat(out[at:at])))
        except InvalidTag:  # one of them is not authentic: the loop finds which
            return False
        self._top = top + n
        self._seen = ((self._seen << n) | ((1 << n) - 1)) & _WINDOW_MASK
        return True


# --------------------------------------------------------------------------
# Control messages after authentication (AEAD, one sequence per direction)
# --------------------------------------------------------------------------

CONTROL_VERSION = 1
CONTROL_OVERHEAD = 1 + 16
_CTRL_LABEL = b"kakehashi-ctrl-v1"


class ControlError(Exception):
    """A control message failed its check (altered, replayed, reordered, dropped,
    reflected, or not sealed); the connection must be cut."""


class ControlChannel:
    """AES-256-GCM for the ordered control messages that follow a :class:`MutualAuth`.

    Each message is ``version(1) || ciphertext || tag(16)``. The nonce is an implicit
    per-direction sequence number (never sent): the receiver expects exactly the next
    one, so a replayed, reordered or dropped message fails authentication like an
    altered one. The two directions use different keys, derived (HKDF) from the
    exchange's :meth:`MutualAuth.session_keys` under their own label so they never
    coincide with datagram keys from the same exchange; a message sent back to its
    sender (reflection) therefore fails too. After a failure the channel refuses
    everything: the caller cuts the connection. Sans-IO.
    """

    __slots__ = ("_aad", "_broken", "_recv", "_recv_seq", "_send", "_send_seq")

    def __init__(self, send_key: bytes, recv_key: bytes) -> None:
        self._send = AESGCM(self._derive(send_key))
        self._recv = AESGCM(self._derive(recv_key))
        self._send_seq = 0
        self._recv_seq = 0
        self._broken = False
        self._aad = _CTRL_LABEL + bytes([CONTROL_VERSION])

    @classmethod
    def after(cls, auth: MutualAuth) -> ControlChannel:
        """The channel keyed from a completed authentication."""
        return cls(*auth.session_keys())

    @staticmethod
    def _derive(key: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=_CTRL_LABEL).derive(key)

    def seal(self, message: bytes) -> bytes:
        seq = self._send_seq
        if seq >= _MAX_COUNTER:
            raise ControlError("control sequence exhausted")
        self._send_seq = seq + 1
        return bytes([CONTROL_VERSION]) + self._send.encrypt(seq.to_bytes(12, "big"), message,
                                                             self._aad)

    def open(self, data: bytes) -> bytes:
        if self._broken:
            raise ControlError("the control channel already failed")
        if len(data) < CONTROL_OVERHEAD or data[0] != CONTROL_VERSION:
            self._broken = True
            raise ControlError("not a sealed control message (version "
                               f"{data[0] if data else 'missing'})")
        try:
            out = self._recv.decrypt(self._recv_seq.to_bytes(12, "big"), data[1:], self._aad)
        except InvalidTag:
            self._broken = True
            raise ControlError(f"control message {self._recv_seq} failed its integrity check "
                               "(altered, replayed, reordered or dropped)") from None
        self._recv_seq += 1
        return out

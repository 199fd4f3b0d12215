"""Passwords, identity keys, the E2E handshake/session and challenge-response."""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from kakehashi.core import crypto
from kakehashi.core.crypto import (
    OVERHEAD,
    E2EError,
    E2EHandshake,
    E2ESession,
    generate_identity,
    hash_password,
    load_identity,
    load_or_create_identity,
    parse_public_b64,
    public_b64,
    save_identity,
    verify_password,
)

N = 2**10  # keep scrypt fast in tests


# ----------------------------------------------------------------- passwords


def test_password_roundtrip() -> None:
    encoded = hash_password("correct horse", n=N)
    assert encoded.startswith(f"scrypt${N}$8$1$")
    assert verify_password("correct horse", encoded)
    assert not verify_password("correct horsE", encoded)
    assert not verify_password("", encoded)
    assert hash_password("correct horse", n=N) != encoded  # random salt


def test_password_params_honoured() -> None:
    encoded = hash_password("pw", n=2**8, r=4, p=2)
    _, n, r, p, _, _ = encoded.split("$")
    assert (n, r, p) == ("256", "4", "2")
    assert verify_password("pw", encoded)
    # Changing a parameter in the string changes the derived hash.
    assert not verify_password("pw", encoded.replace("scrypt$256$4$2$", "scrypt$512$4$2$"))
    assert not verify_password("pw", encoded.replace("scrypt$256$4$2$", "scrypt$256$4$1$"))


def test_password_unicode() -> None:
    encoded = hash_password("pässwörd 橋", n=N)
    assert verify_password("pässwörd 橋", encoded)
    assert not verify_password("passwort 橋", encoded)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "scrypt",
        "bcrypt$1024$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$1024$8$1$not base64!$AAAA",
        "scrypt$1024$8$1$AAAAAAAAAAAAAAAAAAAAAA==",
        "scrypt$1000$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$-1024$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$1024$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAA",
        "scrypt$1024$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=$x",
    ],
)
def test_password_malformed_is_false(bad: str) -> None:
    assert verify_password("pw", bad) is False


@pytest.mark.parametrize("params", ["2097152$8$1", "1024$33$1", "1024$8$17", "1024$0$1"])
def test_password_absurd_params_rejected(params: str) -> None:
    good = hash_password("pw", n=N)
    _, _, _, _, salt, digest = good.split("$")
    assert verify_password("pw", f"scrypt${params}${salt}${digest}") is False


def test_password_non_str_is_false() -> None:
    encoded = hash_password("pw", n=N)
    assert verify_password(b"pw", encoded) is False  # type: ignore[arg-type]
    assert verify_password("pw", None) is False  # type: ignore[arg-type]


def test_hash_password_rejects_bad_params() -> None:
    with pytest.raises(ValueError):
        hash_password("pw", n=1000)
    with pytest.raises(ValueError):
        hash_password("pw", n=2**21)


# ------------------------------------------------------------ identity keys


def test_identity_save_load(tmp_path: Path) -> None:
    key = generate_identity()
    path = tmp_path / "keys" / "id.key"
    save_identity(key, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert public_b64(load_identity(path)) == public_b64(key)

    path.write_text("not a key\n")
    with pytest.raises(ValueError, match="X25519"):
        load_identity(path)


def test_load_or_create_identity(tmp_path: Path) -> None:
    path = tmp_path / "id.key"
    first = load_or_create_identity(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert public_b64(load_or_create_identity(path)) == public_b64(first)


def test_public_b64_roundtrip() -> None:
    key = generate_identity()
    text = public_b64(key)
    assert text == public_b64(key.public_key())
    assert parse_public_b64(text).public_bytes_raw() == key.public_key().public_bytes_raw()
    assert public_b64(parse_public_b64(f"  {text}\n")) == text


@pytest.mark.parametrize("bad", ["", "!!!!", "AAAA", "A" * 44 + "A", "QUFB" * 12])
def test_parse_public_b64_bad(bad: str) -> None:
    with pytest.raises(ValueError, match="X25519 public key"):
        parse_public_b64(bad)


# -------------------------------------------------------------- E2E handshake


_CHACHA_ONLY = (crypto.SUITE_CHACHA20_POLY1305,)
#: what each side offers -> the suite both pick
_OFFERS = {"both-new": (None, None), "initiator-chacha-only": (_CHACHA_ONLY, None),
           "responder-chacha-only": (None, _CHACHA_ONLY)}


def _pair(prologue: bytes = b"", suites: tuple[str, ...] | None = None,
          ) -> tuple[E2ESession, E2ESession]:
    si, sr = generate_identity(), generate_identity()
    ini = E2EHandshake("initiator", si, sr.public_key(), prologue, suites=suites)
    res = E2EHandshake("responder", sr, si.public_key(), prologue, suites=suites)
    ini.receive(res.hello())
    res.receive(ini.hello())
    a, b = ini.finish(), res.finish()
    b.check_confirm(a.confirm_tag())
    a.check_confirm(b.confirm_tag())
    return a, b


def test_handshake_both_directions_many_messages() -> None:
    a, b = _pair(b"channel-7")
    assert a.confirmed and b.confirmed
    assert a.handshake_hash == b.handshake_hash
    for i in range(500):
        msg = os.urandom(i % 97)
        ct = a.seal(msg)
        assert len(ct) == len(msg) + OVERHEAD
        assert b.open(ct) == msg
        back = b"reply %d" % i
        assert a.open(b.seal(back)) == back


def test_directions_use_different_keys() -> None:
    a, b = _pair()
    ct = a.seal(b"hello")
    with pytest.raises(E2EError):
        a.open(ct)  # own message reflected back
    assert b.open(ct) == b"hello"


def test_hello_format() -> None:
    hs = E2EHandshake("initiator", generate_identity(), generate_identity().public_key())
    hello = hs.hello()
    assert len(hello) == 49 and hello[0] == 1
    assert hello[-8:] == b"kkh-ste\x01"  # the offer: AES-128-GCM besides ChaCha20-Poly1305
    assert hs.hello() == hello
    old_style = E2EHandshake("initiator", generate_identity(),
                             generate_identity().public_key(), suites=_CHACHA_ONLY)
    assert len(old_style.hello()) == 49 and b"kkh-ste" not in old_style.hello()


@pytest.mark.parametrize("offers", list(_OFFERS))
def test_suite_negotiation_both_ways(offers: str) -> None:
    ini_suites, res_suites = _OFFERS[offers]
    si, sr = generate_identity(), generate_identity()
    ini = E2EHandshake("initiator", si, sr.public_key(), suites=ini_suites)
    res = E2EHandshake("responder", sr, si.public_key(), suites=res_suites)
    ini.receive(res.hello())
    res.receive(ini.hello())
    expected = "aes-128-gcm" if offers == "both-new" else "chacha20-poly1305"
    assert ini.suite == res.suite == expected
    a, b = ini.finish(), res.finish()
    assert a.suite == b.suite == expected
    b.check_confirm(a.confirm_tag())
    a.check_confirm(b.confirm_tag())
    assert b.open(a.seal(b"ping")) == b"ping" and a.open(b.seal(b"pong")) == b"pong"


def _assert_no_common_keys(a: E2ESession, b: E2ESession) -> None:
    """Neither side's confirmation holds for the other, and nothing sealed opens."""
    with pytest.raises(E2EError):
        a.check_confirm(b.confirm_tag())
    with pytest.raises(E2EError):
        b.check_confirm(a.confirm_tag())
    with pytest.raises(E2EError):
        b.open(a.seal(b"x"))


def _strip_offer(hello: bytes) -> bytes:
    """What a relay forcing the slower suite would do: the offer made random again."""
    return hello[:-8] + os.urandom(8)


@pytest.mark.parametrize("stripped", ["initiator", "responder", "both"])
def test_downgrade_by_stripping_an_offer_fails_key_confirmation(stripped: str) -> None:
    si, sr = generate_identity(), generate_identity()
    ini = E2EHandshake("initiator", si, sr.public_key())
    res = E2EHandshake("responder", sr, si.public_key())
    to_res = _strip_offer(ini.hello()) if stripped in ("initiator", "both") else ini.hello()
    to_ini = _strip_offer(res.hello()) if stripped in ("responder", "both") else res.hello()
    ini.receive(to_ini)
    res.receive(to_res)
    if stripped == "both":  # each side sees an old peer: the slower suite, but...
        assert ini.suite == res.suite == "chacha20-poly1305"
    else:
        assert ini.suite != res.suite
    _assert_no_common_keys(ini.finish(), res.finish())


def test_suite_offer_is_validated() -> None:
    si, pub = generate_identity(), generate_identity().public_key()
    with pytest.raises(ValueError, match="unknown"):
        E2EHandshake("initiator", si, pub, suites=("aes-256-gcm", "chacha20-poly1305"))
    with pytest.raises(ValueError, match="chacha20-poly1305 must be offered"):
        E2EHandshake("initiator", si, pub, suites=("aes-128-gcm",))
    with pytest.raises(RuntimeError):
        E2EHandshake("initiator", si, pub).suite  # noqa: B018 - before the peer's hello


def _documented_keys(si: X25519PrivateKey, sr: X25519PrivateKey, ei: X25519PrivateKey,
                     er: X25519PrivateKey, hello_i: bytes, hello_r: bytes, prologue: bytes,
                     info: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """h, k_ir, k_ri, k_c as the E2EHandshake docstring writes them, computed by hand."""
    ikm = (
        ei.exchange(er.public_key())
        + si.exchange(er.public_key())
        + ei.exchange(sr.public_key())
        + si.exchange(sr.public_key())
    )
    h = hashlib.sha256(
        b"kakehashi-e2e-v1"
        + struct.pack(">I", len(prologue))
        + prologue
        + si.public_key().public_bytes_raw()
        + sr.public_key().public_bytes_raw()
        + hello_i
        + hello_r
    ).digest()
    okm = HKDF(hashes.SHA256(), 96, salt=h, info=info).derive(ikm)
    return h, okm[:32], okm[32:64], okm[64:]


@pytest.mark.parametrize("new_role", ["initiator", "responder"])
def test_peer_from_before_negotiation_interoperates_on_chacha(new_role: str) -> None:
    """An old peer: 16 random nonce bytes, the ChaCha20-Poly1305 schedule, by hand."""
    si, sr, old_eph = generate_identity(), generate_identity(), generate_identity()
    old_hello = b"\x01" + old_eph.public_key().public_bytes_raw() + os.urandom(16)
    if new_role == "initiator":
        new = E2EHandshake("initiator", si, sr.public_key(), b"ctx")
        new.receive(old_hello)
        h, k_ir, k_ri, k_c = _documented_keys(si, sr, new._ephemeral, old_eph, new.hello(),
                                              old_hello, b"ctx", b"kakehashi-e2e-v1 keys")
        k_old_sends, k_old_receives, old_tag = k_ri, k_ir, b"responder"
    else:
        new = E2EHandshake("responder", sr, si.public_key(), b"ctx")
        new.receive(old_hello)
        h, k_ir, k_ri, k_c = _documented_keys(si, sr, old_eph, new._ephemeral, old_hello,
                                              new.hello(), b"ctx", b"kakehashi-e2e-v1 keys")
        k_old_sends, k_old_receives, old_tag = k_ir, k_ri, b"initiator"
    session = new.finish()
    assert session.suite == "chacha20-poly1305" and session.handshake_hash == h
    session.check_confirm(hmac.new(k_c, old_tag, hashlib.sha256).digest())
    for counter in range(3):
        nonce = bytes(4) + counter.to_bytes(8, "little")
        assert ChaCha20Poly1305(k_old_receives).decrypt(nonce, session.seal(b"n"), b"") == b"n"
        assert session.open(ChaCha20Poly1305(k_old_sends).encrypt(nonce, b"o", b"")) == b"o"


def test_wrong_peer_static_fails_confirm() -> None:
    si, sr, mallory = generate_identity(), generate_identity(), generate_identity()
    ini = E2EHandshake("initiator", si, mallory.public_key())  # expects the wrong key
    res = E2EHandshake("responder", sr, si.public_key())
    ini.receive(res.hello())
    res.receive(ini.hello())
    _assert_no_common_keys(ini.finish(), res.finish())


def test_relay_substituting_ephemerals_fails() -> None:
    """A relay without the static keys runs its own handshakes with each side."""
    si, sr, relay = generate_identity(), generate_identity(), generate_identity()
    ini = E2EHandshake("initiator", si, sr.public_key())
    res = E2EHandshake("responder", sr, si.public_key())
    # The relay pretends to be each peer but only holds its own static key.
    fake_r = E2EHandshake("responder", relay, si.public_key())
    fake_i = E2EHandshake("initiator", relay, sr.public_key())
    ini.receive(fake_r.hello())
    fake_r.receive(ini.hello())
    res.receive(fake_i.hello())
    fake_i.receive(res.hello())
    with pytest.raises(E2EError):
        ini.finish().check_confirm(fake_r.finish().confirm_tag())
    with pytest.raises(E2EError):
        res.finish().check_confirm(fake_i.finish().confirm_tag())


class _Impostor:
    """Claims someone else's public key but can only compute DH with its own."""

    def __init__(self, own: X25519PrivateKey, claimed: X25519PublicKey) -> None:
        self._own, self._claimed = own, claimed

    def public_key(self) -> X25519PublicKey:
        return self._claimed

    def exchange(self, peer: X25519PublicKey) -> bytes:
        return self._own.exchange(peer)


@pytest.mark.parametrize("impersonated", ["initiator", "responder"])
def test_impostor_with_right_public_key_fails(impersonated: str) -> None:
    """Knowing both public keys is not enough: the static DH terms must match."""
    si, sr, relay = generate_identity(), generate_identity(), generate_identity()
    if impersonated == "responder":
        honest = E2EHandshake("initiator", si, sr.public_key())
        fake = E2EHandshake("responder", relay, si.public_key())
        fake._static = _Impostor(relay, sr.public_key())  # type: ignore[assignment]
    else:
        honest = E2EHandshake("responder", sr, si.public_key())
        fake = E2EHandshake("initiator", relay, sr.public_key())
        fake._static = _Impostor(relay, si.public_key())  # type: ignore[assignment]
    honest.receive(fake.hello())
    fake.receive(honest.hello())
    good, evil = honest.finish(), fake.finish()
    assert good.handshake_hash == evil.handshake_hash  # same transcript, different keys
    with pytest.raises(E2EError):
        good.check_confirm(evil.confirm_tag())
    with pytest.raises(E2EError):
        good.open(evil.seal(b"hi"))


class _KciImpostor:
    """Stole the victim's static key and poses as the victim's peer to it.

    It can compute DH(peer, victim) via the victim's key (symmetry), but not
    DH(peer_static, victim_ephemeral): that needs the real peer's key.
    """

    def __init__(self, victim: X25519PrivateKey, claimed: X25519PublicKey) -> None:
        self._victim, self._claimed = victim, claimed
        self._junk = generate_identity()

    def public_key(self) -> X25519PublicKey:
        return self._claimed

    def exchange(self, peer: X25519PublicKey) -> bytes:
        if peer.public_bytes_raw() == self._victim.public_key().public_bytes_raw():
            return self._victim.exchange(self._claimed)
        return self._junk.exchange(peer)


@pytest.mark.parametrize("victim_role", ["initiator", "responder"])
def test_key_compromise_impersonation_fails(victim_role: str) -> None:
    """A stolen static key must not let the thief impersonate others to its owner."""
    si, sr = generate_identity(), generate_identity()
    if victim_role == "responder":
        victim = E2EHandshake("responder", sr, si.public_key())
        fake = E2EHandshake("initiator", generate_identity(), sr.public_key())
        fake._static = _KciImpostor(sr, si.public_key())  # type: ignore[assignment]
    else:
        victim = E2EHandshake("initiator", si, sr.public_key())
        fake = E2EHandshake("responder", generate_identity(), si.public_key())
        fake._static = _KciImpostor(si, sr.public_key())  # type: ignore[assignment]
    victim.receive(fake.hello())
    fake.receive(victim.hello())
    with pytest.raises(E2EError):
        victim.finish().check_confirm(fake.finish().confirm_tag())


@pytest.mark.parametrize("suites", [None, _CHACHA_ONLY])
def test_derivation_matches_documented_formula(suites: tuple[str, ...] | None) -> None:
    """Pin the key schedule in the E2EHandshake docstring (all four DH terms), per suite."""
    si, sr = generate_identity(), generate_identity()
    ini = E2EHandshake("initiator", si, sr.public_key(), b"ctx", suites=suites)
    res = E2EHandshake("responder", sr, si.public_key(), b"ctx", suites=suites)
    ini.receive(res.hello())
    res.receive(ini.hello())
    a, b = ini.finish(), res.finish()
    aes = suites is None
    info = b"kakehashi-e2e-v1 keys" + (b" aes-128-gcm" if aes else b"")
    h, k_ir, _, k_c = _documented_keys(si, sr, ini._ephemeral, res._ephemeral, ini.hello(),
                                       res.hello(), b"ctx", info)
    assert a.handshake_hash == b.handshake_hash == h
    assert a.confirm_tag() == hmac.new(k_c, b"initiator", hashlib.sha256).digest()
    assert b.confirm_tag() == hmac.new(k_c, b"responder", hashlib.sha256).digest()
    aead = AESGCM(k_ir[:16]) if aes else ChaCha20Poly1305(k_ir)
    for counter in range(3):  # nonce = 4 zero bytes || 64-bit little-endian counter
        nonce = bytes(4) + counter.to_bytes(8, "little")
        assert aead.decrypt(nonce, a.seal(b"x"), b"") == b"x"


def test_prologue_mismatch_fails() -> None:
    si, sr = generate_identity(), generate_identity()
    ini = E2EHandshake("initiator", si, sr.public_key(), b"a")
    res = E2EHandshake("responder", sr, si.public_key(), b"b")
    ini.receive(res.hello())
    res.receive(ini.hello())
    with pytest.raises(E2EError):
        res.finish().check_confirm(ini.finish().confirm_tag())


def test_confirm_tag_not_reflectable() -> None:
    a, _ = _pair()
    with pytest.raises(E2EError):
        a.check_confirm(a.confirm_tag())
    with pytest.raises(E2EError):
        a.check_confirm(b"\x00" * 32)


@pytest.mark.parametrize(
    "bad", [b"", b"\x01" + b"\x00" * 47, b"\x01" + b"\x00" * 49, b"\x02" + b"\x00" * 48]
)
def test_receive_validates(bad: bytes) -> None:
    hs = E2EHandshake("responder", generate_identity(), generate_identity().public_key())
    with pytest.raises(ValueError):
        hs.receive(bad)


def test_receive_rejects_reflection_and_twice() -> None:
    hs = E2EHandshake("responder", generate_identity(), generate_identity().public_key())
    with pytest.raises(ValueError):
        hs.receive(hs.hello())
    other = E2EHandshake("initiator", generate_identity(), generate_identity().public_key())
    hs.receive(other.hello())
    with pytest.raises(ValueError):
        hs.receive(other.hello())


def test_low_order_ephemeral_rejected() -> None:
    hs = E2EHandshake("responder", generate_identity(), generate_identity().public_key())
    hs.receive(b"\x01" + b"\x00" * 32 + os.urandom(16))  # the all-zero point
    with pytest.raises(E2EError):
        hs.finish()


def test_bad_role() -> None:
    with pytest.raises(ValueError):
        E2EHandshake("observer", generate_identity(), generate_identity().public_key())  # type: ignore[arg-type]


def test_finish_before_receive() -> None:
    hs = E2EHandshake("initiator", generate_identity(), generate_identity().public_key())
    with pytest.raises(RuntimeError):
        hs.finish()


# ---------------------------------------------------------------- sessions


@pytest.mark.parametrize("suites", [None, _CHACHA_ONLY])
def test_tampered_ciphertext_raises(suites: tuple[str, ...] | None) -> None:
    a, b = _pair(suites=suites)
    ct = bytearray(a.seal(b"pay 10 to bob"))
    ct[3] ^= 0x01
    with pytest.raises(E2EError):
        b.open(bytes(ct))
    with pytest.raises(E2EError):
        b.open(b"short")


@pytest.mark.parametrize("suites", [None, _CHACHA_ONLY])
def test_replay_raises(suites: tuple[str, ...] | None) -> None:
    a, b = _pair(suites=suites)
    ct = a.seal(b"once")
    assert b.open(ct) == b"once"
    with pytest.raises(E2EError):
        b.open(ct)
    assert b.open(a.seal(b"next")) == b"next"  # failed open does not desync


@pytest.mark.parametrize("suites", [None, _CHACHA_ONLY])
def test_reorder_raises(suites: tuple[str, ...] | None) -> None:
    a, b = _pair(suites=suites)
    first, second = a.seal(b"1"), a.seal(b"2")
    with pytest.raises(E2EError):
        b.open(second)
    assert b.open(first) == b"1"
    assert b.open(second) == b"2"


@pytest.mark.parametrize("suites", [None, _CHACHA_ONLY])
def test_aad_bound(suites: tuple[str, ...] | None) -> None:
    a, b = _pair(suites=suites)
    with pytest.raises(E2EError):
        b.open(a.seal(b"x", aad=b"hdr1"), aad=b"hdr2")


def test_counter_exhaustion() -> None:
    a, b = _pair()
    a._send_n = 2**64 - 2
    a.seal(b"last")
    with pytest.raises(E2EError):
        a.seal(b"one too many")
    b._recv_n = 2**64 - 1
    with pytest.raises(E2EError):
        b.open(b"\x00" * 32)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=2048), flip=st.data())
def test_property_roundtrip_and_any_flip_detected(data: bytes, flip: st.DataObject) -> None:
    a, b = _pair()
    ct = a.seal(data)
    assert len(ct) == len(data) + OVERHEAD
    index = flip.draw(st.integers(0, len(ct) - 1))
    mask = flip.draw(st.integers(1, 255))
    bad = bytearray(ct)
    bad[index] ^= mask
    with pytest.raises(E2EError):
        b.open(bytes(bad))
    assert b.open(ct) == data


# ------------------------------------------------- sessions keyed from outside, either suite

_SUITES = [crypto.SUITE_CHACHA20_POLY1305, crypto.SUITE_AES_128_GCM]


def _keyed_pair(suite: str, key_len: int = 32) -> tuple[E2ESession, E2ESession]:
    """Two ends of a session built from keys someone else issued (as a relay would)."""
    k1, k2 = os.urandom(key_len), os.urandom(key_len)
    ta, tb, hh = os.urandom(32), os.urandom(32), os.urandom(32)
    a = E2ESession(k1, k2, ta, tb, hh, suite=suite)  # type: ignore[arg-type]
    b = E2ESession(k2, k1, tb, ta, hh, suite=suite)  # type: ignore[arg-type]
    b.check_confirm(a.confirm_tag())
    a.check_confirm(b.confirm_tag())
    return a, b


@pytest.mark.parametrize("suite", _SUITES)
def test_keyed_session_roundtrip_both_ways(suite: str) -> None:
    a, b = _keyed_pair(suite)
    assert a.suite == b.suite == suite and a.overhead == OVERHEAD
    for i in range(50):
        msg = os.urandom(i * 37)
        ct = a.seal(msg)
        assert len(ct) == len(msg) + OVERHEAD
        assert b.open(ct) == msg
        assert a.open(b.seal(msg)) == msg


@pytest.mark.parametrize("suite", _SUITES)
def test_keyed_session_into_buffers(suite: str) -> None:
    a, b = _keyed_pair(suite)
    for size in (0, 1, 1000, 65536):
        msg = os.urandom(size)
        sealed = bytearray(size + a.overhead)
        a.seal_into(msg, memoryview(sealed))
        opened = bytearray(size)
        b.open_into(memoryview(sealed), memoryview(opened))
        assert opened == msg


@pytest.mark.parametrize("suite", _SUITES)
def test_keyed_session_refuses_tamper_replay_reorder(suite: str) -> None:
    a, b = _keyed_pair(suite)
    ct = bytearray(a.seal(b"pay 10 to bob"))
    ct[3] ^= 0x01
    with pytest.raises(E2EError):
        b.open(bytes(ct))
    ct[3] ^= 0x01
    assert b.open(bytes(ct)) == b"pay 10 to bob"
    with pytest.raises(E2EError):
        b.open(bytes(ct))  # replay
    first, second = a.seal(b"1"), a.seal(b"2")
    out = memoryview(bytearray(1))
    with pytest.raises(E2EError):
        b.open_into(second, out)  # reorder
    b.open_into(first, out)
    assert bytes(out) == b"1"
    with pytest.raises(E2EError):
        a.open(first)  # reflected: the other direction's key
    assert b.open(second) == b"2"


def test_suites_do_not_open_each_other() -> None:
    k1, k2, t = os.urandom(32), os.urandom(32), os.urandom(32)
    aes = E2ESession(k1, k2, t, t, t, suite="aes-128-gcm")
    chacha = E2ESession(k2, k1, t, t, t, suite="chacha20-poly1305")
    with pytest.raises(E2EError):
        chacha.open(aes.seal(b"x"))


@pytest.mark.parametrize("key_len", [16, 32])
def test_aes_nonce_layout_and_key_use_are_pinned(key_len: int) -> None:
    """AES-128-GCM under the key's first 16 bytes, nonce = 4 zero bytes || u64le counter."""
    key = os.urandom(key_len)
    t = os.urandom(32)
    s = E2ESession(key, os.urandom(32), t, t, t, suite="aes-128-gcm")
    aead = AESGCM(key[:16])
    for counter in range(3):
        nonce = bytes(4) + counter.to_bytes(8, "little")
        assert aead.decrypt(nonce, s.seal(b"x%d" % counter), b"") == b"x%d" % counter


def test_default_suite_is_chacha_for_existing_callers() -> None:
    key, t = os.urandom(32), os.urandom(32)
    s = E2ESession(key, os.urandom(32), t, t, t)
    assert s.suite == "chacha20-poly1305"
    assert ChaCha20Poly1305(key).decrypt(bytes(12), s.seal(b"x"), b"") == b"x"


@pytest.mark.parametrize("suite,key_len", [("aes-256-gcm", 32), ("aes-128-gcm", 24),
                                           ("chacha20-poly1305", 16)])
def test_unknown_suite_or_wrong_key_length_refused(suite: str, key_len: int) -> None:
    t = os.urandom(32)
    with pytest.raises(ValueError):
        E2ESession(os.urandom(key_len), os.urandom(key_len), t, t, t, suite=suite)  # type: ignore[arg-type]


def test_module_exports() -> None:
    for name in crypto.__all__:
        assert hasattr(crypto, name)
    # dead code of issue 7 item 20 stays gone
    for gone in ("make_challenge", "respond", "check_response", "needs_rehash"):
        assert not hasattr(crypto, gone)

"""The on-demand system's sans-IO decisions: validation, port drawing, edge policies,
the S26 access decision and audit events."""

from __future__ import annotations

import ipaddress
import random

import pytest

from kakehashi.ondemand import grants as g

DEVICES = {"001010000000001": {"inner": "core-1", "address": "127.0.0.1"}}


def req(**kw) -> g.GrantRequest:
    base = {"targets": [("001010000000001", 22)], "ttl": 600.0}
    return g.GrantRequest(**{**base, **kw})


def validate(r: g.GrantRequest, **kw) -> g.GrantRequest:
    return g.validate_request(r, devices=DEVICES, auth_infos={"a1"},
                              limits=g.GrantLimits(max_ttl=3600), **kw)


# -- parsing -------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30), ("10m", 600), ("1h", 3600), ("2d", 172800), ("250ms", 0.25), ("90", 90),
    ("1.5h", 5400), (45, 45), (" 5 s ", 5)])
def test_durations(text, seconds):
    assert g.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten minutes", "5x", "-5s", "1e9999", "nan", "5 m s"])
def test_bad_durations(text):
    with pytest.raises(g.GrantError) as exc:
        g.parse_duration(text)
    assert exc.value.code == "bad-duration"


def test_targets_and_port_ranges():
    assert g.parse_target("001010000000001:22") == ("001010000000001", 22)
    for bad, code in [("001010000000001", "bad-target"), ("abc:22", "bad-imsi"),
                      ("001010000000001:0", "bad-port"), ("001010000000001:65536", "bad-port"),
                      ("001010000000001:ssh", "bad-port"), ("12345:22", "bad-imsi")]:
        with pytest.raises(g.GrantError) as exc:
            g.parse_target(bad)
        assert exc.value.code == code, bad
    assert g.parse_port_range("30000-30999") == (30000, 30999)
    assert g.parse_port_range("30000") == (30000, 30000)
    for bad in ["30999-30000", "0-10", "a-b", "1-70000"]:
        with pytest.raises(g.GrantError):
            g.parse_port_range(bad)


def test_tables_prefer_the_most_specific_range():
    table = g.parse_table(["10.0.0.0/8=jp", "10.1.0.0/16=us"], "--region")
    assert g.lookup(table, "10.1.2.3") == ("us", "10.1.0.0/16")
    assert g.lookup(table, "10.2.0.1") == ("jp", "10.0.0.0/8")
    assert g.lookup(table, "192.0.2.1") is None
    assert g.lookup(table, "not-an-ip") is None
    assert g.lookup(table, None) is None
    with pytest.raises(g.GrantError):
        g.parse_table(["10.0.0.0/8"], "--region")
    with pytest.raises(g.GrantError):
        g.parse_table(["10.0.0/33=x"], "--region")


# -- validation: every refusal ---------------------------------------------------------
def test_a_good_request_is_normalised():
    out = validate(req(cidrs=["203.0.113.7/24", "2001:db8::1"], targets=[
        ("001010000000001", 22), ("001010000000001", 22), ("001010000000001", 80)]))
    assert out.cidrs == ["203.0.113.0/24", "2001:db8::1/128"]
    assert out.targets == [("001010000000001", 22), ("001010000000001", 80)]


@pytest.mark.parametrize(("change", "code"), [
    ({"targets": [("001010000000009", 22)]}, "unknown-imsi"),
    ({"targets": [("00101", 22)]}, "bad-imsi"),
    ({"targets": [("001010000000001", 0)]}, "bad-port"),
    ({"targets": [("001010000000001", 70000)]}, "bad-port"),
    ({"targets": []}, "bad-target"),
    ({"targets": [("001010000000001", p) for p in range(1, 40)]}, "bad-target"),
    ({"ttl": 0.0}, "bad-ttl"),
    ({"ttl": -5.0}, "bad-ttl"),
    ({"ttl": 3601.0}, "bad-ttl"),
    ({"ttl": float("nan")}, "bad-ttl"),
    ({"cidrs": ["203.0.113.0/33"]}, "bad-cidr"),
    ({"cidrs": ["not a range"]}, "bad-cidr"),
    ({"cidrs": ["10.0.0.0/8"] * 65}, "bad-cidr"),
    ({"auth_info": "nope", "tls": True}, "unknown-auth-info"),
    ({"auth_info": "a1", "tls": False}, "bad-auth-info"),
    ({"policy": "fastest"}, "bad-policy"),
    ({"max_connections": -1}, "bad-limit"),
    ({"max_connections": 10**6}, "bad-limit"),
    ({"client_address": "somewhere"}, "bad-address"),
])
def test_every_bad_request_is_refused_clearly(change, code):
    with pytest.raises(g.GrantError) as exc:
        validate(req(**change))
    assert exc.value.code == code
    assert exc.value.message  # a sentence for people
    assert 400 <= exc.value.status < 500


def test_validation_changes_nothing():
    devices = dict(DEVICES)
    auth = {"a1"}
    with pytest.raises(g.GrantError):
        g.validate_request(req(ttl=0.0), devices=devices, auth_infos=auth,
                           limits=g.GrantLimits())
    assert devices == DEVICES and auth == {"a1"}


# -- ports -----------------------------------------------------------------------------
def test_ports_are_drawn_among_free_ones_only():
    rng = random.Random(1)
    used = set(range(30000, 30999))  # one port left
    assert g.draw_port((30000, 30999), used, rng) == 30999
    assert g.draw_port((30000, 30999), used | {30999}, rng) is None
    assert g.draw_port((30000, 30001), set(), rng, exclude={30000}) == 30001


def test_ports_spread_over_the_range():
    seen = {g.draw_port((30000, 30009), set()) for _ in range(500)}
    assert seen == set(range(30000, 30010))


def test_the_default_random_source_is_a_csprng(monkeypatch):
    import secrets

    calls = []
    orig = secrets.SystemRandom.randrange

    def spy(self, *a):
        calls.append(a)
        return orig(self, *a)

    monkeypatch.setattr(secrets.SystemRandom, "randrange", spy)
    g.draw_port((30000, 30999), set())
    assert calls


# -- edge selection ---------------------------------------------------------------------
def edges() -> list[g.EdgeView]:
    return [
        g.EdgeView("tokyo-1", "198.51.100.1", (30000, 30009), region="tokyo", carrier="docomo",
                   sessions=5, bytes_per_second=100.0),
        g.EdgeView("osaka-1", "198.51.100.2", (30000, 30009), region="osaka", carrier="kddi",
                   sessions=1, bytes_per_second=900.0),
        g.EdgeView("osaka-2", "198.51.100.3", (30000, 30009), region="osaka", carrier="kddi",
                   sessions=1, bytes_per_second=10.0),
    ]


REGIONS = g.parse_table(["10.1.0.0/16=tokyo", "10.2.0.0/16=osaka"], "--region")
CARRIERS = g.parse_table(["10.1.0.0/16=docomo"], "--carrier")


def test_random_policy():
    names = {g.choose_edge("random", edges()).edge.name for _ in range(200)}
    assert names == {"tokyo-1", "osaka-1", "osaka-2"}
    c = g.choose_edge("random", edges())
    assert c.policy == "random" and "at random among 3 edges" in c.reason


def test_region_policy_and_its_fallback():
    c = g.choose_edge("region", edges(), client_address="10.1.5.5", region_table=REGIONS)
    assert c.edge.name == "tokyo-1" and "region tokyo" in c.reason and "10.1.0.0/16" in c.reason
    c = g.choose_edge("region", edges(), client_address="10.2.5.5", region_table=REGIONS)
    assert c.edge.region == "osaka"
    c = g.choose_edge("region", edges(), client_address="192.0.2.1", region_table=REGIONS)
    assert "in no region" in c.reason and "at random" in c.reason
    full = edges()
    full[0].used = set(range(30000, 30010))
    c = g.choose_edge("region", full, client_address="10.1.5.5", region_table=REGIONS)
    assert c.edge.name != "tokyo-1" and "no edge with free ports in region tokyo" in c.reason


def test_carrier_policy_from_request_or_table():
    c = g.choose_edge("carrier", edges(), carrier="kddi")
    assert c.edge.carrier == "kddi" and "named in the request" in c.reason
    c = g.choose_edge("carrier", edges(), client_address="10.1.0.9", carrier_table=CARRIERS)
    assert c.edge.name == "tokyo-1" and "docomo" in c.reason
    c = g.choose_edge("carrier", edges(), client_address="192.0.2.1", carrier_table=CARRIERS)
    assert "carrier is unknown" in c.reason
    c = g.choose_edge("carrier", edges(), carrier="softbank")
    assert "carrier softbank" in c.reason and "at random" in c.reason


def test_load_policy_prefers_fewest_sessions_then_bytes():
    c = g.choose_edge("load", edges())
    assert c.edge.name == "osaka-2"
    assert "1 active sessions" in c.reason and "10 B/s" in c.reason


def test_no_edge_and_no_port():
    with pytest.raises(g.GrantError) as exc:
        g.choose_edge("random", [])
    assert exc.value.code == "no-edge" and exc.value.status == 503
    full = edges()
    for e in full:
        e.used = set(range(30000, 30010))
    with pytest.raises(g.GrantError) as exc:
        g.choose_edge("load", full)
    assert exc.value.code == "no-port"
    with pytest.raises(g.GrantError):
        g.choose_edge("cheapest", edges())


# -- the access decision (S26) ---------------------------------------------------------
def view(**kw) -> g.AccessView:
    base = {"grant": "g1", "expires_at": 1000.0}
    return g.AccessView(**{**base, **kw})


NET = (ipaddress.ip_network("203.0.113.0/24"),)


@pytest.mark.parametrize(("v", "client", "now", "active", "reason"), [
    (view(), "127.0.0.1", 10, 0, None),
    (view(cidrs=NET), "203.0.113.9", 10, 0, None),
    (view(cidrs=NET), "::ffff:203.0.113.9", 10, 0, None),
    (view(cidrs=NET), "127.0.0.1", 10, 0, "cidr"),
    (view(cidrs=NET), "2001:db8::1", 10, 0, "cidr"),
    (view(cidrs=NET), "garbage", 10, 0, "cidr"),
    (view(), "127.0.0.1", 1000, 0, "expired"),
    (view(), "127.0.0.1", 1001, 0, "expired"),
    (view(revoked=True), "127.0.0.1", 10, 0, "revoked"),
    (view(revoked=True, cidrs=NET), "127.0.0.1", 2000, 0, "revoked"),
    (view(max_connections=2), "127.0.0.1", 10, 1, None),
    (view(max_connections=2), "127.0.0.1", 10, 2, "limit"),
    (view(max_connections=0), "127.0.0.1", 10, 10_000, None),
    (view(cidrs=NET, max_connections=1), "127.0.0.1", 10, 5, "cidr"),
])
def test_access_decision(v, client, now, active, reason):
    assert g.check_access(v, client, now, active) == reason


def _cert_der(tmp_path):
    from kakehashi.core import tls

    ca = tls.DevCA(tmp_path)
    _, csr = tls.new_key_and_csr("client")
    pem = ca.sign_csr(csr, unit="client")
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(pem)
    return cert.public_bytes(serialization.Encoding.DER), pem, ca


def test_certificate_pin(tmp_path):
    der, pem, ca = _cert_der(tmp_path)
    pin = g.pin_of_pem(pem)
    assert g.spki_sha256(der) == pin
    assert g.check_pin(view(tls=True, pin=pin), der) is None
    assert g.check_pin(view(tls=True, pin="0" * 64), der) == "certificate"
    assert g.check_pin(view(tls=True), None) == "certificate"
    assert g.check_pin(view(tls=True), der) is None
    assert g.check_pin(view(tls=False), None) is None
    with pytest.raises(g.GrantError):
        g.pin_of_pem(b"not pem")
    assert g.check_ca_pem(ca.ca_path.read_bytes())
    with pytest.raises(g.GrantError) as exc:
        g.check_ca_pem(pem)  # a leaf is not a CA
    assert exc.value.code == "bad-ca"
    with pytest.raises(g.GrantError):
        g.check_ca_pem(b"x" * 70_000)


def test_burst_limit():
    b = g.BurstLimit(rate=10, burst=3)
    assert [b.allow(0.0) for _ in range(4)] == [True, True, True, False]
    assert b.allow(0.1)  # one token back after 0.1 s
    assert not b.allow(0.1)
    assert g.BurstLimit(rate=0, burst=0).allow(0.0)


# -- audit events ----------------------------------------------------------------------
def test_audit_events():
    ev = g.audit_event("closed", "g1", now=0.0, bytes_up=5, bytes_down=7, duration=1.5,
                       reason="expired")
    assert ev == {"event": "closed", "grant": "g1", "ts": 0.0, "time": "1970-01-01T00:00:00Z",
                  "bytes_up": 5, "bytes_down": 7, "duration": 1.5, "reason": "expired"}
    for reason in g.DENY_REASONS:
        assert g.audit_event("denied", "g1", reason=reason)["reason"] == reason
    with pytest.raises(ValueError):
        g.audit_event("denied", "g1", reason="bored")
    with pytest.raises(ValueError):
        g.audit_event("exploded", "g1")

"""core/metrics: one registry, the common families, /metrics and /healthz."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from kakehashi.core import metrics, web


def scrape_value(text: str, name: str, **labels: str) -> float | None:
    """The value of sample ``name{labels}`` in a scrape, None when absent."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def test_declaring_twice_returns_the_same_family_and_a_new_shape_is_refused() -> None:
    a = metrics.counter("kakehashi_test_twice", "doc", ["x"])
    assert metrics.counter("kakehashi_test_twice", "doc", ["x"]) is a
    with pytest.raises(ValueError):
        metrics.counter("kakehashi_test_twice", "doc", ["y"])
    with pytest.raises(ValueError):
        metrics.gauge("kakehashi_test_twice", "doc", ["x"])


def test_system_metrics_move_the_common_families() -> None:
    m = metrics.for_system("unittest")
    assert metrics.for_system("unittest") is m
    with m.session(), m.connection():
        text = metrics.exposition(None)[0].decode()
        assert scrape_value(text, "kakehashi_sessions_active", system="unittest") == 1
        assert scrape_value(text, "kakehashi_connections_active", system="unittest") == 1
    m.refused("bad-password")
    m.carried(10, 20)
    m.setup_done(0.0)
    text = metrics.exposition(None)[0].decode()
    assert scrape_value(text, "kakehashi_sessions_active", system="unittest") == 0
    assert scrape_value(text, "kakehashi_sessions_total", system="unittest") == 1
    assert scrape_value(text, "kakehashi_refusals_total", system="unittest",
                        reason="bad-password") == 1
    assert scrape_value(text, "kakehashi_bytes_total", system="unittest", direction="in") == 10
    assert scrape_value(text, "kakehashi_bytes_total", system="unittest", direction="out") == 20
    assert scrape_value(text, "kakehashi_setup_seconds_count", system="unittest") == 1
    assert scrape_value(text, "process_resident_memory_bytes") is not None


def test_cluster_membership_gauge_follows_the_set() -> None:
    m = metrics.for_system("unitcluster")
    m.cluster_members(["a", "b", "c"])
    text = metrics.exposition(None)[0].decode()
    assert scrape_value(text, "kakehashi_cluster_nodes", system="unitcluster") == 3
    m.cluster_members(["a", "c"])
    text = metrics.exposition(None)[0].decode()
    assert scrape_value(text, "kakehashi_cluster_nodes", system="unitcluster") == 2
    assert scrape_value(text, "kakehashi_cluster_node_up", system="unitcluster", node="b") \
        is None
    assert scrape_value(text, "kakehashi_cluster_node_up", system="unitcluster", node="c") == 1


def test_openmetrics_when_asked() -> None:
    body, ctype = metrics.exposition("application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_every_web_app_has_metrics_and_healthz() -> None:
    app = web.create_app("t", "0")

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as client:
            r = await client.get("/metrics")
            assert r.status_code == 200
            assert "kakehashi_sessions_active" in r.text
            r = await client.get("/healthz")
            assert r.status_code == 200 and r.json()["status"] == "ok"
            metrics.add_health_check("unit-broken", lambda: 1 / 0)
            try:
                r = await client.get("/healthz")
                assert r.status_code == 503
                assert r.json()["checks"]["unit-broken"] is False
            finally:
                metrics.remove_health_check("unit-broken")
            assert "/metrics" not in (await client.get("/openapi.json")).json()["paths"]

    asyncio.run(go())


def test_exporter_serves_on_its_own_port_and_closes() -> None:
    async def go() -> None:
        async with metrics.exporter("127.0.0.1:0") as addr:
            assert addr is not None
            host, port = addr
            async with httpx.AsyncClient() as client:
                r = await client.get(f"http://{host}:{port}/metrics")
                assert r.status_code == 200 and "kakehashi_sessions_active" in r.text
                assert (await client.get(f"http://{host}:{port}/healthz")).status_code == 200
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient() as client:
                await client.get(f"http://{host}:{port}/metrics")
        async with metrics.exporter(None) as none:
            assert none is None

    asyncio.run(go())


def test_sources_are_read_when_scraped_while_their_owner_lives() -> None:
    import gc

    class Owner:
        def __init__(self, n: int) -> None:
            self.n = n

    family = metrics.counter("kakehashi_test_sources", "doc", ["outcome"])
    a, b = Owner(1), Owner(10)
    family.labels("relayed").add_source(a, lambda o: o.n)
    family.labels("relayed").add_source(b, lambda o: o.n)
    family.labels("relayed").inc(100)  # the tally of what has left the sources
    a.n = 5
    text = metrics.exposition(None)[0].decode()
    assert scrape_value(text, "kakehashi_test_sources_total", outcome="relayed") == 115
    del b
    gc.collect()
    text = metrics.exposition(None)[0].decode()
    assert scrape_value(text, "kakehashi_test_sources_total", outcome="relayed") == 105


def test_histogram_buckets_are_cumulative_and_readers_that_fail_are_skipped() -> None:
    h = metrics.histogram("kakehashi_test_hist", "doc", ["x"], buckets=(0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 2.0):
        h.labels("a").observe(v)
    g = metrics.gauge("kakehashi_test_broken", "doc")
    g.add_source(h, lambda _: 1 / 0)
    text = metrics.exposition(None)[0].decode()
    assert scrape_value(text, "kakehashi_test_hist_bucket", x="a", le="0.1") == 2
    assert scrape_value(text, "kakehashi_test_hist_bucket", x="a", le="1.0") == 3
    assert scrape_value(text, "kakehashi_test_hist_bucket", x="a", le="+Inf") == 4
    assert scrape_value(text, "kakehashi_test_hist_count", x="a") == 4
    assert scrape_value(text, "kakehashi_test_hist_sum", x="a") == pytest.approx(2.65)
    assert scrape_value(text, "kakehashi_test_broken") is None
    with pytest.raises(ValueError):
        h.labels("a", "b")


def test_a_family_holds_a_bounded_number_of_series() -> None:
    family = metrics.counter("kakehashi_test_bounded", "doc", ["peer"])
    for i in range(metrics.MAX_SERIES + 50):
        family.labels(f"hop{i}").inc()
    assert len(family.series) == metrics.MAX_SERIES
    family.labels("hop0").inc()  # an existing series still counts
    text = metrics.exposition(None)[0].decode()
    assert scrape_value(text, "kakehashi_test_bounded_total", peer="hop0") == 2
    assert scrape_value(text, "kakehashi_test_bounded_total", peer=f"hop{metrics.MAX_SERIES}") \
        is None

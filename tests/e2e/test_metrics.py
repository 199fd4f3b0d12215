"""Prometheus /metrics and /healthz of real server processes after real traffic."""

from __future__ import annotations

from tests.e2e.framework import PASSWORD
from tests.support.scrape import METRICS_LINE, get, sample, scrape


def metrics_port(proc) -> int:
    match = METRICS_LINE.search(proc.wait_for(METRICS_LINE))
    assert match is not None
    return int(match.group(1))


def test_relay_counts_logins_sessions_bytes_and_setup(env, echo):
    env.add_user("pi")
    env.add_user("laptop")
    proc, port = env.relay("--metrics-listen", "127.0.0.1:0")
    mport = metrics_port(proc)
    before = scrape(mport)
    assert sample(before, "kakehashi_sessions_total", system="relay") == 0
    env.agent("pi", port, f"echo={echo.addr}")
    data = b"x" * 100_000
    res = env.pipe("laptop", port, "pi/echo", data)
    assert res.stdout == data
    bad = env.run("relay", "pipe", *env.client_args("laptop", port), "pi/echo", input=b"",
                  env={"KAKEHASHI_PASSWORD": PASSWORD["laptop"] + "-wrong"}, check=False)
    assert bad.returncode != 0
    text = scrape(mport)
    assert sample(text, "kakehashi_sessions_total", system="relay") >= 1
    assert sample(text, "kakehashi_setup_seconds_count", system="relay") >= 1
    # the pipe's connection has closed: its bytes are counted (both ways, with framing);
    # the agent's end of the session is still open (counted when it closes)
    assert sample(text, "kakehashi_bytes_total", system="relay", direction="in") >= len(data)
    assert sample(text, "kakehashi_bytes_total", system="relay", direction="out") >= len(data)
    assert sample(text, "kakehashi_decisions_total", system="relay", event="login",
                  decision="allow") >= 2
    assert sample(text, "kakehashi_refusals_total", system="relay") >= 1
    assert any(s.startswith("login") for s in _reasons(text, "relay"))
    assert sample(text, "kakehashi_connections_active", system="relay") >= 1  # the agent
    status, body = get(f"http://127.0.0.1:{mport}/healthz")
    assert status == 200 and '"ok"' in body


def _reasons(text: str, system: str) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.labels["reason"] for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "kakehashi_refusals_total" and s.labels.get("system") == system}


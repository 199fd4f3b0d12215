"""Reading a Prometheus ``/metrics`` page in tests (the library's own parser)."""

from __future__ import annotations

import re
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

METRICS_LINE = re.compile(r"metrics listening on [^\s:]+:(\d+)")
"""The line ``--metrics-listen`` logs once bound: its port."""


def get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    """Status and body of a plain GET (an error status is returned, not raised)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` whose labels include ``labels`` (0 if none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def scrape(port: int, host: str = "127.0.0.1", path: str = "/metrics") -> str:
    status, body = get(f"http://{host}:{port}{path}")
    assert status == 200, (status, body[:500])
    return body

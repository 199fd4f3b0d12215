"""Prometheus metrics and health for every server, on ``prometheus-client``.

One registry per process (:data:`REGISTRY`): when ``kakehashi serve`` runs several roles
in one process, their figures sit side by side in one scrape, told apart by the
``system`` label. The common families (declared once here, so every system spells them
the same way):

=====================================  ===========================================
``kakehashi_sessions_active``          sessions open now (gauge)
``kakehashi_sessions_total``           sessions set up (counter)
``kakehashi_connections_active``       client connections open now (gauge)
``kakehashi_connections_total``        client connections accepted (counter)
``kakehashi_bytes_total{direction}``   bytes carried: ``in`` received from clients,
                                       ``out`` sent to them (docs/operations.md says
                                       what each system counts)
``kakehashi_refusals_total{reason}``   requests refused, by the reason the system
                                       already gives (audit log, error code)
``kakehashi_setup_seconds``            session setup latency (histogram)
``kakehashi_cluster_nodes``            cluster nodes seen alive (gauge)
``kakehashi_cluster_node_up{node}``    1 per node seen alive
=====================================  ===========================================

each with a ``system`` label (``relay``, ``gateway``, ``ondemand`` (the manager),
``ondemand-edge``, ``ondemand-inner``, ``switch``, ``chain``). A system that needs a
figure of its own declares it through :meth:`SystemMetrics.counter` (named
``kakehashi_<system>_<name>``). Declaring is idempotent: a second declaration of the
same name returns the first family.

The registry, the exposition formats and the process collector are the library's; the
series themselves are plain tallies (:class:`Value`, :class:`Buckets`) turned into the
library's metric families when scraped, because the library's own metric classes take a
lock per increment (about six times the cost, measured interleaved), which a gateway
pays on every request. Servers count on their event loop thread only.

Serving: FastAPI servers get ``/metrics`` and ``/healthz`` as routes of their own app
(:func:`kakehashi.core.web.create_app`); servers without HTTP take ``--metrics-listen
HOST:PORT`` (:func:`kakehashi.core.options.metrics_listen_option`) and run
:func:`exporter`, the same two routes on uvicorn beside the server in its event loop.
Health is the AND of the checks registered with :func:`add_health_check` (none: healthy
while the process answers).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import choose_encoder

log = logging.getLogger("kakehashi.metrics")

#: the process's one registry (also the process, platform and GC collectors)
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

#: setup latencies: a loopback session takes about a millisecond, a far one a second
SETUP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                 1.0, 2.5, 5.0, 10.0, 30.0)

_FAMILIES: dict[str, Any] = {}
#: series one family may hold; label values from peers (a neighbour proxy's hop name)
#: must not grow a process's memory or a scrape without bound
MAX_SERIES = 1000


# -- the families: plain tallies, turned into Prometheus samples when scraped ---------
class Value:
    """One counter or gauge series: a tally, plus sources read when scraped.

    Counting is an attribute addition (about a tenth of a microsecond): the library's
    own metric classes take a lock on every increment, which is a few per cent of a
    gateway request. Every server counts on its one event loop thread, so no lock is
    needed; the registry reads the numbers when scraped.

    A source is ``(owner, fn)``: ``fn(owner)`` is added to the tally when scraped, for
    figures a server already keeps (its open links, the datagrams its port records
    counted) so that nothing is counted twice on a hot path. The owner is held weakly:
    a server that is gone stops counting. For a counter, a source must never go down
    (move a closed session's figures to the tally in the same step it leaves the source).
    """

    __slots__ = ("sources", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.sources: list[tuple[weakref.ref[Any], Callable[[Any], float]]] = []

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value

    def add_source(self, owner: Any, fn: Callable[[Any], float]) -> None:
        """Add ``fn(owner)`` when scraped, while ``owner`` lives (``fn`` must not hold
        the owner itself, or it never goes)."""
        self.sources.append((weakref.ref(owner), fn))

    def get(self) -> float:
        total = self.value
        live = []
        for ref, fn in self.sources:
            owner = ref()
            if owner is not None:
                total += fn(owner)
                live.append((ref, fn))
        self.sources = live
        return float(total)


class Buckets:
    """One histogram series: cumulative counts per upper bound, a sum and a count."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


class Family:
    """A metric family in :data:`REGISTRY`: series by label values (``labels()``), or
    the one series of an unlabelled family used directly (``inc``, ``add_source``)."""

    def __init__(self, kind: str, name: str, doc: str, labelnames: tuple[str, ...],
                 buckets: tuple[float, ...] = SETUP_BUCKETS) -> None:
        self.kind, self.name, self.doc = kind, name, doc
        self.labelnames = labelnames
        self.buckets = tuple(sorted(buckets))
        self.series: dict[tuple[str, ...], Any] = {}
        self.overflowed = False

    def labels(self, *values: str) -> Any:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}")
        key = tuple(str(v) for v in values)
        found = self.series.get(key)
        if found is None:
            found = Buckets(self.buckets) if self.kind == "histogram" else Value()
            if len(self.series) >= MAX_SERIES:  # counted nowhere: a bound, not a crash
                if not self.overflowed:
                    log.warning("metric %s: more than %d series; new ones are not "
                                "exported", self.name, MAX_SERIES)
                    self.overflowed = True
                return found
            self.series[key] = found
        return found

    def remove(self, *values: str) -> None:
        self.series.pop(tuple(str(v) for v in values), None)

    # the one series of an unlabelled family
    def inc(self, amount: float = 1) -> None:
        self.labels().inc(amount)

    def dec(self, amount: float = 1) -> None:
        self.labels().dec(amount)

    def set(self, value: float) -> None:
        self.labels().set(value)

    def add_source(self, owner: Any, fn: Callable[[Any], float]) -> None:
        self.labels().add_source(owner, fn)

    def observe(self, value: float) -> None:
        self.labels().observe(value)

    # the registry's side
    def describe(self) -> list[Any]:
        return [self._empty()]

    def _empty(self) -> Any:
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        if self.kind == "gauge":
            return GaugeMetricFamily(self.name, self.doc, labels=self.labelnames)
        return HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)

    def collect(self) -> list[Any]:
        family = self._empty()
        for key, series in sorted(self.series.items()):
            if self.kind == "histogram":
                cumulative, running = [], 0
                for bound, n in zip((*self.buckets, math.inf), series.counts, strict=True):
                    running += n
                    cumulative.append((_le(bound), running))
                family.add_metric(list(key), cumulative, series.sum)
            else:
                try:
                    family.add_metric(list(key), series.get())
                except Exception:  # a broken reader must not break the whole scrape
                    log.debug("metric %s%s could not be read", self.name, key,
                              exc_info=True)
        return [family]


def _le(bound: float) -> str:
    return "+Inf" if bound == math.inf else repr(float(bound))


def _declare(kind: str, name: str, doc: str, labels: Iterable[str],
             **kwargs: Any) -> Family:
    labelnames = tuple(labels)
    known = _FAMILIES.get(name)
    if known is not None:
        if not isinstance(known, Family) or known.kind != kind \
                or known.labelnames != labelnames:
            raise ValueError(f"metric {name} declared twice with different shapes")
        return known
    family = Family(kind, name, doc, labelnames, **kwargs)
    REGISTRY.register(family)
    _FAMILIES[name] = family
    return family


def counter(name: str, doc: str, labels: Iterable[str] = ()) -> Family:
    """A counter family in :data:`REGISTRY` (``name`` without ``_total``)."""
    return _declare("counter", name, doc, labels)


def gauge(name: str, doc: str, labels: Iterable[str] = ()) -> Family:
    return _declare("gauge", name, doc, labels)


def histogram(name: str, doc: str, labels: Iterable[str] = (),
              buckets: tuple[float, ...] = SETUP_BUCKETS) -> Family:
    return _declare("histogram", name, doc, labels, buckets=buckets)


SESSIONS_ACTIVE = gauge("kakehashi_sessions_active", "Sessions open now.", ["system"])
SESSIONS = counter("kakehashi_sessions", "Sessions set up.", ["system"])
CONNECTIONS_ACTIVE = gauge("kakehashi_connections_active", "Client connections open now.",
                           ["system"])
CONNECTIONS = counter("kakehashi_connections", "Client connections accepted.", ["system"])
BYTES = counter("kakehashi_bytes", "Bytes carried (in: received from clients, "
                "out: sent to them).", ["system", "direction"])
REFUSALS = counter("kakehashi_refusals", "Requests refused, by reason.", ["system", "reason"])
SETUP = histogram("kakehashi_setup_seconds", "Session setup latency.", ["system"])
CLUSTER_NODES = gauge("kakehashi_cluster_nodes", "Cluster nodes seen alive.", ["system"])
CLUSTER_NODE_UP = gauge("kakehashi_cluster_node_up", "1 for each cluster node seen alive.",
                        ["system", "node"])


class SystemMetrics:
    """The common families bound to one system's label, plus its own figures."""

    def __init__(self, system: str) -> None:
        self.system = system
        self.sessions_active = SESSIONS_ACTIVE.labels(system)
        self.sessions = SESSIONS.labels(system)
        self.connections_active = CONNECTIONS_ACTIVE.labels(system)
        self.connections = CONNECTIONS.labels(system)
        self.bytes_in = BYTES.labels(system, "in")
        self.bytes_out = BYTES.labels(system, "out")
        self.setup_seconds = SETUP.labels(system)
        self._nodes: set[str] = set()

    def refused(self, reason: str) -> None:
        """Count one refusal; ``reason`` is the system's own word (audit reason,
        error code), a short fixed vocabulary, never user input."""
        REFUSALS.labels(self.system, reason).inc()

    def carried(self, bytes_in: int, bytes_out: int) -> None:
        if bytes_in:
            self.bytes_in.inc(bytes_in)
        if bytes_out:
            self.bytes_out.inc(bytes_out)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Count a session set up and hold the active gauge while the block runs."""
        self.sessions.inc()
        self.sessions_active.inc()
        try:
            yield
        finally:
            self.sessions_active.dec()

    @contextlib.contextmanager
    def connection(self) -> Iterator[None]:
        self.connections.inc()
        self.connections_active.inc()
        try:
            yield
        finally:
            self.connections_active.dec()

    def setup_done(self, started: float) -> None:
        """Observe a setup that began at ``time.monotonic()`` value ``started``."""
        self.setup_seconds.observe(max(time.monotonic() - started, 0.0))

    def counter(self, name: str, doc: str, labels: Iterable[str] = ()) -> Family:
        """This system's own counter ``kakehashi_<system>_<name>`` (a ``-`` in the
        system's name becomes ``_``: ``ondemand-edge`` -> ``kakehashi_ondemand_edge_``)."""
        return counter(f"kakehashi_{self.system.replace('-', '_')}_{name}", doc, labels)

    def gauge(self, name: str, doc: str, labels: Iterable[str] = ()) -> Family:
        return gauge(f"kakehashi_{self.system.replace('-', '_')}_{name}", doc, labels)

    def cluster_members(self, nodes: Iterable[str]) -> None:
        """Set the cluster membership this node sees: ``kakehashi_cluster_nodes`` and
        one ``kakehashi_cluster_node_up`` per node (nodes gone are removed)."""
        now = set(nodes)
        for gone in self._nodes - now:
            CLUSTER_NODE_UP.remove(self.system, gone)
        for node in now:
            CLUSTER_NODE_UP.labels(self.system, node).set(1)
        self._nodes = now
        CLUSTER_NODES.labels(self.system).set(len(now))


_SYSTEMS: dict[str, SystemMetrics] = {}


def for_system(system: str) -> SystemMetrics:
    """The (one per process) :class:`SystemMetrics` of ``system``."""
    found = _SYSTEMS.get(system)
    if found is None:
        found = _SYSTEMS[system] = SystemMetrics(system)
    return found


# -- health ---------------------------------------------------------------------------
_HEALTH: dict[str, Callable[[], bool]] = {}


def add_health_check(name: str, check: Callable[[], bool]) -> None:
    """Register a check for ``/healthz`` (e.g. "the listener is open", "Redis answers");
    a check that raises counts as failed."""
    _HEALTH[name] = check


def remove_health_check(name: str) -> None:
    _HEALTH.pop(name, None)


def health() -> tuple[bool, dict[str, bool]]:
    """Whether every registered check passes, and each one's result."""
    results: dict[str, bool] = {}
    for name, check in list(_HEALTH.items()):
        try:
            results[name] = bool(check())
        except Exception:  # a broken check is an unhealthy one, not a 500
            log.debug("health check %s raised", name, exc_info=True)
            results[name] = False
    return all(results.values()), results


def exposition(accept: str | None) -> tuple[bytes, str]:
    """The registry in the format the scraper asked for (Prometheus text or
    OpenMetrics): body and content type."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(REGISTRY), content_type


# -- serving without an HTTP server of one's own -------------------------------------
def metrics_app() -> Any:
    """An app serving only ``/metrics`` and ``/healthz`` (the routes every
    :func:`kakehashi.core.web.create_app` app has)."""
    from kakehashi import __version__
    from kakehashi.core import web

    return web.create_app("kakehashi metrics", __version__)


@contextlib.asynccontextmanager
async def exporter(listen: str | None) -> AsyncIterator[tuple[str, int] | None]:
    """Serve ``/metrics`` and ``/healthz`` on ``listen`` (``HOST:PORT``; None: nothing)
    while the block runs, on uvicorn in the running loop. Yields the bound address; logs
    ``metrics listening on HOST:PORT``."""
    if not listen:
        yield None
        return
    import asyncio

    from kakehashi.core import web
    from kakehashi.core.stream import parse_hostport

    host, port = parse_hostport(listen)
    sock = web.bind(host, port)
    ready = asyncio.Event()
    task = asyncio.ensure_future(web.serve(metrics_app(), sock, name="metrics",
                                           ready=ready.set))
    try:
        waiter = asyncio.ensure_future(ready.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task.done():
            await task  # raises why it did not start
        yield sock.getsockname()[:2]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        sock.close()

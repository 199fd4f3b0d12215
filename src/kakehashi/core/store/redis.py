"""Redis implementation of the store interface, for several nodes sharing one state.

Layout: one Redis hash per kind, ``<prefix><kind>``, whose fields are the documents'
keys and whose values are the documents as JSON (the same text the SQLite store keeps).
A hash per kind keeps every operation of the :class:`~kakehashi.core.store.Store`
protocol one atomic command — ``HSETNX`` for :meth:`RedisStore.insert` (two nodes
creating the same user: exactly one wins), ``HDEL`` for delete, ``HGETALL`` for list —
and :meth:`RedisStore.write_many` one ``MULTI``/``EXEC`` transaction.

The client is redis-py's synchronous one (the store protocol is synchronous, like
SQLite's); it is thread-safe through its connection pool, so the asyncio servers may
also call it from a worker thread. A Redis that cannot be reached, or that answers
with an error, raises :class:`StoreUnavailable` naming the server, never a bare
redis-py exception.

Every Redis connection of kakehashi (stores, the relay cluster, gateway topics, the
on-demand replicas, the switch nodes) is opened here, from one URL syntax
(:func:`parse_url`): a server (``redis://``, ``rediss://``, ``unix://``, redis-py's own)
or a master found through Redis Sentinel
(``redis+sentinel://[USER:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/MASTER[/DB]``, TLS
with ``rediss+sentinel://``), whose clients follow a failover by themselves.
Redis Cluster (``redis+cluster://``) is refused: see :data:`CLUSTER_REFUSAL`.

redis-py is imported when a Redis store is first opened, not with this module: it takes
about a third of a second, which a command that uses SQLite should not pay.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    import redis

#: URL schemes of one server (redis-py's own: TCP, TLS, a Unix socket)
DIRECT_SCHEMES = ("redis", "rediss", "unix")
#: a master found through Redis Sentinel (plain, TLS to the sentinels and the master)
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
#: recognised as Redis URLs, refused with :data:`CLUSTER_REFUSAL`
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
#: URL schemes this backend knows
SCHEMES = DIRECT_SCHEMES + SENTINEL_SCHEMES + CLUSTER_SCHEMES
SENTINEL_PORT = 26379
#: why Redis Cluster is not supported (said to whoever gives a redis+cluster:// URL)
CLUSTER_REFUSAL = (
    "Redis Cluster (redis+cluster://) is not supported: kakehashi's batches are "
    "MULTI/EXEC transactions over keys of several kinds and nodes (the store's "
    "write_many, the relay cluster's renewal and presence writes), which Redis Cluster "
    "refuses across hash slots, and its pub/sub and streams would all sit on one slot "
    "anyway; use one Redis server, or Redis Sentinel for failover "
    "(redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER[/DB])")
#: query options that are kakehashi's, not redis-py's
OWN_OPTIONS = ("prefix", "sentinel_username", "sentinel_password")
MAX_URL = 4096
MAX_SENTINELS = 32
DEFAULT_PREFIX = "kakehashi:"
CONNECT_TIMEOUT = 5.0   # seconds to reach the server
COMMAND_TIMEOUT = 10.0  # seconds for one command's answer
MAX_CONNECTIONS = 64    # per client: a burst of commands shares them
POOL_WAIT = 10.0        # seconds a command waits for a free connection


class StoreUnavailable(RuntimeError):
    """The store's server cannot be reached or refused a command (a clear message for
    people: which server, and what went wrong)."""


def is_redis_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SCHEMES and "://" in url


@dataclass(frozen=True)
class RedisTarget:
    """Where a Redis URL points, parsed once (:func:`parse_url`).

    ``sentinels`` is empty for one server (``client_url``: the URL redis-py opens);
    otherwise the master named ``service`` is asked of those sentinels, and
    ``master_kwargs`` / ``sentinel_kwargs`` are the connection options of each (login,
    database, TLS and the other query options redis-py takes on a ``redis://`` URL).
    """

    url: str
    prefix: str
    client_url: str = ""
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""
    master_kwargs: dict[str, Any] = field(default_factory=dict)
    sentinel_kwargs: dict[str, Any] = field(default_factory=dict)


def _hostports(netloc: str) -> tuple[tuple[str, int], ...]:
    """``HOST[:PORT][,HOST[:PORT]...]`` (IPv6 in brackets) -> pairs, port 26379 by default."""
    out = []
    for item in netloc.split(","):
        if not item:
            raise ValueError("an empty sentinel address (two commas, or a trailing one)")
        if item.startswith("["):
            host, sep, rest = item[1:].partition("]")
            if not sep or not host or (rest and not rest.startswith(":")):
                raise ValueError(f"bad sentinel address {item!r} (IPv6 as [ADDR]:PORT)")
            port_text = rest[1:] if rest else ""
        else:
            host, _, port_text = item.partition(":")
            if not host or ":" in port_text:
                raise ValueError(f"bad sentinel address {item!r} (HOST:PORT)")
        port = SENTINEL_PORT
        if port_text or item.endswith(":"):
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise ValueError(f"bad port in sentinel address {item!r}")
            port = int(port_text)
        if any(c.isspace() or c in "/?#@" for c in host):
            raise ValueError(f"bad sentinel host {host!r}")
        out.append((host, port))
    if len(out) > MAX_SENTINELS:
        raise ValueError(f"more than {MAX_SENTINELS} sentinels")
    return tuple(out)


def parse_url(url: str) -> RedisTarget:
    """Parse a Redis URL of any form kakehashi accepts (see the module docstring).

    Sentinel form: ``redis+sentinel://[USER[:PASSWORD]@]HOST[:PORT][,HOST[:PORT]...]``
    ``/MASTER[/DB][?OPTIONS]``. The user and password are the master's (as in
    ``redis://``); ``sentinel_username`` / ``sentinel_password`` options log in to the
    sentinels; ``rediss+sentinel`` speaks TLS to both, with redis-py's ``ssl_*``
    options. Raises :class:`ValueError` with the reason (never echoing a password).
    """
    import redis.connection

    if len(url) > MAX_URL:
        raise ValueError(f"Redis URL longer than {MAX_URL} characters")
    scheme, sep, _ = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise ValueError("a Redis URL starts with redis://, rediss://, unix:// or "
                         "redis+sentinel://")
    if scheme in CLUSTER_SCHEMES:
        raise ValueError(CLUSTER_REFUSAL)
    prefix = key_prefix(url)
    if scheme in DIRECT_SCHEMES:
        client_url = _client_url(url)
        redis.connection.parse_url(client_url)  # its errors now, not at the first command
        return RedisTarget(url=url, prefix=prefix, client_url=client_url)
    parts = urlsplit(url)
    if parts.fragment:
        raise ValueError("a Redis URL has no #fragment")
    netloc = parts.netloc
    auth, at, hosts = netloc.rpartition("@")
    if not at:
        auth, hosts = "", netloc
    if not hosts:
        raise ValueError("a redis+sentinel:// URL names at least one sentinel HOST:PORT")
    sentinels = _hostports(hosts)
    path = [unquote(p) for p in parts.path.split("/")[1:]]
    if not path or not path[0] or len(path) > 2 or (len(path) == 2 and not path[1]):
        raise ValueError("a redis+sentinel:// URL ends in /MASTER or /MASTER/DB (the "
                         "name the sentinels monitor)")
    service = path[0]
    if any(c.isspace() or ord(c) < 32 for c in service):
        raise ValueError("bad master name")
    query = parse_qs(parts.query, keep_blank_values=True)
    if len(path) == 2:
        if not path[1].isdigit() or len(path[1]) > 6:
            raise ValueError("the database after the master name is a number")
        if "db" in query:
            raise ValueError("the database given twice (/DB and ?db=)")
    # the master's options are parsed by redis-py itself, as for a redis:// URL: what one
    # server accepts (db, timeouts, ssl_*), the master through a sentinel accepts too
    direct = ("rediss" if scheme.startswith("rediss") else "redis") + "://" \
        + (auth + "@" if at else "") + "sentinel" \
        + ("/" + path[1] if len(path) == 2 else "")
    own = {k: v[-1] for k, v in query.items() if k in OWN_OPTIONS}
    rest_query = "&".join(p for p in parts.query.split("&")
                          if p and p.split("=", 1)[0] not in OWN_OPTIONS)
    master = dict(redis.connection.parse_url(direct + ("?" + rest_query if rest_query
                                                       else "")))
    for k in ("host", "port", "connection_class"):
        master.pop(k, None)
    tls = {k: v for k, v in master.items() if k.startswith("ssl_")}
    if scheme.startswith("rediss"):
        master["ssl"] = True
        tls["ssl"] = True
    sentinel_kwargs: dict[str, Any] = dict(tls)
    if own.get("sentinel_username"):
        sentinel_kwargs["username"] = own["sentinel_username"]
    if own.get("sentinel_password"):
        sentinel_kwargs["password"] = own["sentinel_password"]
    return RedisTarget(url=url, prefix=prefix, sentinels=sentinels, service=service,
                       master_kwargs=master, sentinel_kwargs=sentinel_kwargs)


def redacted(url: str) -> str:
    """``url`` without its passwords (the login's and ``sentinel_password=``), for logs
    and error messages."""
    parts = urlsplit(url)
    if parts.query:
        query = "&".join(
            f"{p.split('=', 1)[0]}=***" if p.split("=", 1)[0] == "sentinel_password" else p
            for p in parts.query.split("&"))
        parts = parts._replace(query=query)
    if parts.password is None:
        return parts.geturl()
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()


def key_prefix(url: str) -> str:
    """The prefix of every key (``?prefix=NAME:`` in the URL; ``kakehashi:`` by default),
    so several deployments can share one Redis database."""
    values = parse_qs(urlsplit(url).query).get("prefix")
    return values[-1] if values else DEFAULT_PREFIX


def _client_url(url: str) -> str:
    """``url`` without the options that are ours (redis-py rejects unknown ones)."""
    parts = urlsplit(url)
    query = "&".join(p for p in parts.query.split("&")
                     if p and p.split("=", 1)[0] not in OWN_OPTIONS)
    return parts._replace(query=query).geturl()


def _retry(retry_class: Any) -> Any:
    """Try a command twice more on a connection error: a pooled connection to a Redis
    that restarted fails once before the pool notices (commands that must not run
    twice make themselves idempotent, see ``gateway.event_redis``)."""
    from redis.backoff import ExponentialBackoff

    return retry_class(ExponentialBackoff(cap=0.5, base=0.05), 2)


def _options(connect_timeout: float | None, timeout: float | None,
             health_check_interval: float) -> dict[str, Any]:
    return {"socket_connect_timeout": connect_timeout or CONNECT_TIMEOUT,
            "socket_timeout": timeout, "health_check_interval": health_check_interval}


def sync_client(url: str) -> redis.Redis:
    """A redis-py client for ``url`` with kakehashi's timeouts (bytes in, bytes out).

    Raises :class:`ValueError` for a URL :func:`parse_url` refuses.
    """
    import redis
    import redis.sentinel
    from redis.retry import Retry

    target = parse_url(url)
    opts = _options(None, COMMAND_TIMEOUT, 30)
    if not target.sentinels:
        pool = redis.BlockingConnectionPool.from_url(
            target.client_url, max_connections=MAX_CONNECTIONS, timeout=POOL_WAIT,
            retry=_retry(Retry), **opts)
        return redis.Redis.from_pool(pool)

    class Pool(redis.sentinel.SentinelConnectionPool, redis.BlockingConnectionPool):
        """The sentinel's master lookup with the blocking pool's wait for a free
        connection (as for one server)."""

    sentinel = redis.sentinel.Sentinel(
        target.sentinels, sentinel_kwargs={**target.sentinel_kwargs,
                                           "socket_connect_timeout": CONNECT_TIMEOUT,
                                           "socket_timeout": CONNECT_TIMEOUT})
    return sentinel.master_for(target.service, connection_pool_class=Pool,
                               max_connections=MAX_CONNECTIONS, timeout=POOL_WAIT,
                               retry=_retry(Retry),
                               **{**opts, **target.master_kwargs})


def async_client(url: str, *, timeout: float | None = None,
                 connect_timeout: float | None = None,
                 health_check_interval: float = 30) -> Any:
    """A ``redis.asyncio`` client for ``url`` with kakehashi's connect timeout.

    No command timeout unless ``timeout``: blocking reads (``XREAD BLOCK``, pub/sub)
    wait as long as they ask. At most ``MAX_CONNECTIONS`` connections: a burst of
    commands beyond that waits for one (up to ``POOL_WAIT`` s) instead of failing.
    Through Redis Sentinel, a connection asks the sentinels where the master is when it
    connects (and after a failover: a connection to a demoted master reconnects).
    Raises :class:`ValueError` for a URL :func:`parse_url` refuses.
    """
    import redis.asyncio
    import redis.asyncio.sentinel
    from redis.asyncio.retry import Retry

    target = parse_url(url)
    opts = _options(connect_timeout, timeout, health_check_interval)
    if not target.sentinels:
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            target.client_url, max_connections=MAX_CONNECTIONS, timeout=POOL_WAIT,
            retry=_retry(Retry), **opts)
        return redis.asyncio.Redis.from_pool(pool)

    class Pool(redis.asyncio.sentinel.SentinelConnectionPool,
               redis.asyncio.BlockingConnectionPool):
        """See :func:`sync_client`."""

    wait = connect_timeout or CONNECT_TIMEOUT
    sentinel = redis.asyncio.sentinel.Sentinel(
        target.sentinels, sentinel_kwargs={**target.sentinel_kwargs,
                                           "socket_connect_timeout": wait,
                                           "socket_timeout": wait})
    return sentinel.master_for(target.service, connection_pool_class=Pool,
                               max_connections=MAX_CONNECTIONS, timeout=POOL_WAIT,
                               retry=_retry(Retry),
                               **{**opts, **target.master_kwargs})


@contextmanager
def unavailable_as_store_error(url: str) -> Iterator[None]:
    """Turn redis-py's errors into :class:`StoreUnavailable` naming the server."""
    import redis.exceptions

    try:
        yield
    except redis.exceptions.AuthenticationError as exc:
        raise StoreUnavailable(f"Redis at {redacted(url)} refused the login: {exc}") from None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise StoreUnavailable(f"cannot reach Redis at {redacted(url)}: {exc}") from None
    except redis.exceptions.RedisError as exc:
        raise StoreUnavailable(f"Redis at {redacted(url)} answered with an error: {exc}") \
            from None


class RedisStore:
    """Documents in Redis hashes, one hash per kind (see the module docstring)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.prefix = key_prefix(url)
        try:
            self.redis = sync_client(url)
        except ValueError as exc:
            raise StoreUnavailable(f"bad Redis URL {redacted(url)}: {exc}") from None
        with unavailable_as_store_error(url):
            self.redis.ping()

    def __repr__(self) -> str:
        return f"RedisStore({redacted(self.url)!r})"

    def _hash(self, kind: str) -> str:
        return f"{self.prefix}{kind}"

    @staticmethod
    def _encode(doc: dict[str, Any]) -> str:
        return json.dumps(doc, sort_keys=True)

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        with unavailable_as_store_error(self.url):
            raw = self.redis.hget(self._hash(kind), key)
        return json.loads(raw) if raw is not None else None

    def put(self, kind: str, key: str, doc: dict[str, Any]) -> None:
        with unavailable_as_store_error(self.url):
            self.redis.hset(self._hash(kind), key, self._encode(doc))

    def insert(self, kind: str, key: str, doc: dict[str, Any]) -> bool:
        """Create only; False when the key already exists (atomic: ``HSETNX``)."""
        with unavailable_as_store_error(self.url):
            return bool(self.redis.hsetnx(self._hash(kind), key, self._encode(doc)))

    def delete(self, kind: str, key: str) -> bool:
        with unavailable_as_store_error(self.url):
            return bool(self.redis.hdel(self._hash(kind), key))

    def list(self, kind: str) -> list[tuple[str, dict[str, Any]]]:
        with unavailable_as_store_error(self.url):
            raw = self.redis.hgetall(self._hash(kind))
        return sorted(((k.decode(), json.loads(v)) for k, v in raw.items()),
                      key=lambda item: item[0])

    def write_many(self, ops: Iterable[tuple[str, str, dict[str, Any] | None]]) -> None:
        """Put (a document) or delete (None) several documents in one ``MULTI``/``EXEC``
        transaction: other clients see all of the batch or none of it."""
        with unavailable_as_store_error(self.url):
            pipe = self.redis.pipeline(transaction=True)
            for kind, key, doc in ops:
                if doc is None:
                    pipe.hdel(self._hash(kind), key)
                else:
                    pipe.hset(self._hash(kind), key, self._encode(doc))
            pipe.execute()

    def close(self) -> None:
        self.redis.close()

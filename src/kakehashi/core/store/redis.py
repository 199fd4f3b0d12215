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

redis-py is imported when a Redis store is first opened, not with this module: it takes
about a third of a second, which a command that uses SQLite should not pay.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

if TYPE_CHECKING:
    import redis

#: URL schemes this backend opens (redis-py's own: TCP, TLS, a Unix socket)
SCHEMES = ("redis", "rediss", "unix")
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


def redacted(url: str) -> str:
    """``url`` without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
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
    query = "&".join(p for p in parts.query.split("&") if p and not p.startswith("prefix="))
    return parts._replace(query=query).geturl()


def _retry() -> Any:
    """Try a command twice more on a connection error: a pooled connection to a Redis
    that restarted fails once before the pool notices (commands that must not run
    twice make themselves idempotent, see ``gateway.event_redis``)."""
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    return Retry(ExponentialBackoff(cap=0.5, base=0.05), 2)


def sync_client(url: str) -> redis.Redis:
    """A redis-py client for ``url`` with kakehashi's timeouts (bytes in, bytes out)."""
    import redis

    pool = redis.BlockingConnectionPool.from_url(
        _client_url(url), max_connections=MAX_CONNECTIONS, timeout=POOL_WAIT,
        socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=COMMAND_TIMEOUT,
        health_check_interval=30, retry=_retry())
    return redis.Redis.from_pool(pool)


def async_client(url: str) -> Any:
    """A ``redis.asyncio`` client for ``url`` with kakehashi's connect timeout.

    No command timeout: blocking reads (``XREAD BLOCK``, pub/sub) wait as long as they
    ask. At most ``MAX_CONNECTIONS`` connections: a burst of commands beyond that waits
    for one (up to ``POOL_WAIT`` s) instead of failing.
    """
    import redis.asyncio
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff

    pool = redis.asyncio.BlockingConnectionPool.from_url(
        _client_url(url), max_connections=MAX_CONNECTIONS, timeout=POOL_WAIT,
        socket_connect_timeout=CONNECT_TIMEOUT, health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2))
    return redis.asyncio.Redis.from_pool(pool)


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

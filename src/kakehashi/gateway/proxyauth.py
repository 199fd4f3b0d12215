"""Proxy authentication (``Proxy-Authorization: Basic``) against the gateway's users.

Everything about who the user is comes from :mod:`kakehashi.core.identity`: the user
registry on the store, the verification that costs the same for unknown names, the
login throttle (attempts reserved before hashing, per address and user) and the
bounded pool the hashes run on. What is gateway-specific is only the Basic header and
a cache, so a keep-alive client does not pay the slow hash on every request.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kakehashi.core.identity import (
    DEFAULT_KDF_N,
    NAME_MAX,
    LoginThrottle,
    PasswordChecker,
    ThrottleSettings,
    UserRegistry,
    verify_user,
)
from kakehashi.core.store import Doc, Store

USER_KIND = "gateway.user"
#: verified headers remembered at most (the oldest are forgotten first)
CACHE_SIZE = 10_000


class ProxyUsers(UserRegistry[dict[str, Any]]):
    """The gateway's proxy users: plain documents, a name and a password hash."""

    def __init__(self, store: Store, *, kdf_n: int = DEFAULT_KDF_N) -> None:
        super().__init__(store, USER_KIND, kdf_n=kdf_n)


@dataclass
class AuthResult:
    """The outcome of one check: ``user`` when allowed; else who was claimed and why not."""

    user: str | None
    claimed: str = ""
    why: str = ""

    @property
    def allowed(self) -> bool:
        return self.user is not None


@dataclass
class _Verified:
    user: str
    pw_hash: str
    expires: float
    checked: float


def parse_basic(header: bytes) -> tuple[str, str] | None:
    """``(user, password)`` of a Basic credentials header, or None if it is not one."""
    scheme, _, value = header.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode(
            "utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


class ProxyAuth:
    """Basic proxy authentication with a cache, the shared throttle and bounded hashing.

    Verified credentials are cached for ``ttl`` by a hash of the header. The user's
    record is read again (off the event loop) at most every ``recheck`` seconds, so
    removing a user or changing a password locks them out within that time, on
    connections already open too. Until then :meth:`cached` answers without any I/O,
    which is what the fast lane calls.
    """

    def __init__(self, store: Store, ttl: float = 60.0, recheck: float = 1.0, *,
                 throttle: LoginThrottle | None = None,
                 checker: PasswordChecker | None = None,
                 kdf_n: int = DEFAULT_KDF_N,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.users = ProxyUsers(store, kdf_n=kdf_n)
        self.ttl = ttl
        self.recheck = recheck
        self.throttle = throttle if throttle is not None else LoginThrottle(ThrottleSettings())
        self.checker = checker if checker is not None else PasswordChecker()
        self.clock = clock
        self._cache: OrderedDict[str, _Verified] = OrderedDict()
        self._reads: dict[str, asyncio.Future[Doc | None]] = {}

    @property
    def store(self) -> Store:
        return self.users.store

    @staticmethod
    def _key(header: bytes) -> str:
        return hashlib.sha256(header.strip()).hexdigest()

    def cached(self, header: bytes | None) -> str | None:
        """The user of a header verified within ``ttl`` and re-read within ``recheck``
        seconds, else None (no hashing, no store read, no waiting)."""
        if not header:
            return None
        hit = self._cache.get(self._key(header))
        if hit is None:
            return None
        now = self.clock()
        if hit.expires <= now or now - hit.checked >= self.recheck:
            return None  # the coroutine path re-reads the record off the loop
        return hit.user

    async def _read(self, user: str) -> Doc | None:
        """The user's document, read on a worker thread; one read per user at a time
        however many connections ask (the store is not touched on the event loop)."""
        fut = self._reads.get(user)
        if fut is None:
            loop = asyncio.get_running_loop()
            fut = loop.run_in_executor(None, self.users.get_doc, user)
            self._reads[user] = fut
            fut.add_done_callback(lambda _f: self._reads.pop(user, None))
        return await asyncio.shield(fut)

    async def check(self, header: bytes | None, addr: str = "?") -> AuthResult:
        """Authenticate a request's ``Proxy-Authorization`` from client ``addr``."""
        if not header:
            return AuthResult(None, why="no credentials")
        key = self._key(header)
        hit = self._cache.get(key)
        now = self.clock()
        if hit is not None:
            if hit.expires <= now:
                del self._cache[key]
            elif now - hit.checked < self.recheck:
                return AuthResult(hit.user, hit.user)
            else:
                doc = await self._read(hit.user)
                if doc is not None and doc.get("password_hash") == hit.pw_hash:
                    hit.checked = self.clock()
                    return AuthResult(hit.user, hit.user)
                self._cache.pop(key, None)  # removed, or the password changed
        creds = parse_basic(header)
        if creds is None:
            return AuthResult(None, why="malformed credentials")
        user, password = creds
        if len(user) > NAME_MAX:  # no user has such a name: nothing to check or count
            return AuthResult(None, user[:NAME_MAX], "bad user or password")
        attempt = self.throttle.begin(addr, user, now)
        if isinstance(attempt, str):  # "lockout" or "busy": no hash is run
            return AuthResult(None, user, attempt)
        try:
            doc = await self._read(user)
            ok = await self.checker.run(addr, _verify, doc, password, self.users.kdf_n)
        except BaseException:
            self.throttle.succeeded(attempt)  # not a verdict: return the slot
            raise
        if not ok or doc is None:
            self.throttle.failed(attempt, self.clock())
            return AuthResult(None, user, "bad user or password")
        self.throttle.succeeded(attempt)
        now = self.clock()
        self._cache[key] = _Verified(user, doc.get("password_hash", ""), now + self.ttl, now)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return AuthResult(user, user)

    def close(self) -> None:
        self.checker.close()


def _verify(doc: Doc | None, password: str, kdf_n: int) -> bool:
    return verify_user(doc, password, kdf_n=kdf_n)

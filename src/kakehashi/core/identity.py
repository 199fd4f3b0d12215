"""Who is calling: the one identity module every system authenticates through.

* :class:`UserRegistry` - users on the store (one JSON document per user, a salted
  scrypt hash in ``password_hash``); a system keeps its own attributes beside it by
  subclassing the record conversion (the relay does, the gateway's proxy users do not).
* :func:`read_password` - the password sources of every command: ``--password-stdin``,
  ``--password-file``, ``KAKEHASHI_PASSWORD``, then a prompt on a terminal.
* :func:`verify_user` - a login check that costs the same for unknown users (one dummy
  hash per cost, :func:`dummy_hash`), so timing does not tell which names exist.
* :func:`check_name` - the one validator for user IDs and service names.
* :class:`LoginThrottle` - the brute-force limit (pure: the caller passes ``now``):
  an attempt *reserves* its slot before the slow hash starts, so a burst sent in
  parallel gets no more guesses than a sequence; a success erases nothing; attempts
  are counted per (address, user) and, with a higher limit, per address.
* :class:`PasswordChecker` - runs the slow hashes off the event loop on a bounded
  pool, at most a few at once per address and globally.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import os
import re
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from kakehashi.core.store import Doc, Store

__all__ = [
    "DEFAULT_KDF_N",
    "NAME_CHARS",
    "NAME_MAX",
    "PASSWORD_ENV",
    "Attempt",
    "LoginThrottle",
    "PasswordChecker",
    "PasswordError",
    "ThrottleSettings",
    "UserRegistry",
    "check_name",
    "dummy_hash",
    "read_password",
    "valid_name",
    "verify_user",
]

#: scrypt cost of new hashes (and of the dummy hash unknown users are checked against)
DEFAULT_KDF_N = 2**14
#: the environment variable every command reads a password from
PASSWORD_ENV = "KAKEHASHI_PASSWORD"

# --------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------

#: the characters of user IDs and service names, and their longest length: the one
#: definition (the relay's message schema and every command's checks use it)
NAME_CHARS = r"[A-Za-z0-9_.@-]"
NAME_MAX = 64
NAME_RE = re.compile(f"{NAME_CHARS}{{1,{NAME_MAX}}}")


def valid_name(name: object) -> bool:
    """Whether ``name`` is a valid user ID (or service name): 1-64 of A-Z a-z 0-9 _ . @ -.

    No ':' (Basic credentials split there), no spaces, nothing a log line or a
    header could be confused by.
    """
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def check_name(name: object, what: str = "user IDs") -> str:
    """``name`` if valid, else ValueError with a message that says what is allowed."""
    if not valid_name(name):
        raise ValueError(f"{what} are 1-64 of A-Z a-z 0-9 _ . @ -")
    return name  # type: ignore[return-value]


# --------------------------------------------------------------------------
# Passwords: sources and verification
# --------------------------------------------------------------------------


class PasswordError(ValueError):
    """No password could be read (or it was empty); the message says what to do."""


def read_password(*, stdin: bool = False, file: str | os.PathLike[str] | None = None,
                  env: str = PASSWORD_ENV, confirm: bool = False, prompt: str = "Password",
                  allow_prompt: bool = True) -> str:
    """Read a password from the first source given, in the one order every command uses.

    ``--password-stdin`` (one line), ``--password-file`` (its first line), the
    environment variable ``env``, then a prompt when stdin is a terminal. Never from
    the command line: it would show in ``ps`` and shell histories.
    """
    if stdin:
        pw = sys.stdin.readline().rstrip("\r\n")
    elif file:
        try:
            lines = Path(file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise PasswordError(f"cannot read password file {os.fspath(file)}: {exc}") from None
        pw = lines[0].strip() if lines else ""
    elif os.environ.get(env):
        pw = os.environ[env]
    elif allow_prompt and sys.stdin is not None and sys.stdin.isatty():
        pw = getpass.getpass(f"{prompt}: ")
        if confirm and getpass.getpass("Again: ") != pw:
            raise PasswordError("passwords do not match")
    else:
        raise PasswordError(f"no password: use --password-stdin, --password-file or {env}")
    if not pw:
        raise PasswordError("empty password")
    return pw


def hash_password(password: str, *, n: int = DEFAULT_KDF_N) -> str:
    """:func:`kakehashi.core.crypto.hash_password`, imported when first needed: every
    command imports this module (the option vocabulary names :data:`PASSWORD_ENV`), and
    most of them, ``--help`` above all, never hash a password, so they start without
    loading ``cryptography``."""
    from kakehashi.core import crypto

    return crypto.hash_password(password, n=n)


def verify_password(password: str, encoded: str) -> bool:
    """:func:`kakehashi.core.crypto.verify_password`, imported when first needed (see
    :func:`hash_password`)."""
    from kakehashi.core import crypto

    return crypto.verify_password(password, encoded)


@functools.cache
def dummy_hash(n: int = DEFAULT_KDF_N) -> str:
    """A valid hash of nothing anyone types, at cost ``n``: what an unknown user's
    password is checked against, so a miss takes as long as a hit."""
    return hash_password("\x00 not a user \x00", n=n)


def _cost(encoded: str) -> int | None:
    parts = encoded.split("$")
    if len(parts) == 6 and parts[0] == "scrypt" and parts[1].isdigit():
        return int(parts[1])
    return None


def verify_user(doc: Doc | None, password: str, *, kdf_n: int = DEFAULT_KDF_N) -> bool:
    """Check ``password`` against a user document (slow on purpose: call it off the loop).

    A missing user or one without a hash costs one hash at the registry's cost too.
    """
    pw_hash = (doc or {}).get("password_hash") or ""
    if not isinstance(pw_hash, str) or not pw_hash:
        verify_password(password, dummy_hash(kdf_n))
        return False
    return verify_password(password, pw_hash)


# --------------------------------------------------------------------------
# The user registry on the store
# --------------------------------------------------------------------------

R = TypeVar("R")


class UserRegistry(Generic[R]):
    """Users of one system (``kind``) on the store.

    The base class deals in plain documents (``{"password_hash": ...}`` plus whatever
    the system keeps); a system with a record type overrides :meth:`decode` and
    :meth:`encode` and nothing else, so hashing, verification and the dummy hash stay
    here.
    """

    def __init__(self, store: Store, kind: str, *, kdf_n: int = DEFAULT_KDF_N) -> None:
        self.store = store
        self.kind = kind
        self.kdf_n = kdf_n

    # -- the system's record type (documents by default) -------------------------
    def decode(self, name: str, doc: Doc) -> R:
        return {"name": name, **doc}  # type: ignore[return-value]

    def encode(self, rec: R) -> Doc:
        doc = dict(rec)  # type: ignore[call-overload]
        doc.pop("name", None)
        return doc

    @staticmethod
    def name_of(rec: R) -> str:
        return rec["name"] if isinstance(rec, dict) else rec.name  # type: ignore[attr-defined]

    # -- reads ----------------------------------------------------------------------
    def get(self, name: str) -> R | None:
        doc = self.store.get(self.kind, name)
        return self.decode(name, doc) if doc is not None else None

    def get_doc(self, name: str) -> Doc | None:
        """The stored document (with its ``password_hash``), or None."""
        return self.store.get(self.kind, name)

    def list(self) -> list[R]:
        return [self.decode(name, doc) for name, doc in self.store.list(self.kind)]

    def names(self) -> list[str]:
        return [name for name, _ in self.store.list(self.kind)]

    # -- writes ---------------------------------------------------------------------
    def add(self, rec: R, password: str) -> bool:
        """Register ``rec`` with ``password``; False if the name is taken."""
        doc = self.encode(rec)
        doc["password_hash"] = hash_password(password, n=self.kdf_n)
        return self.store.insert(self.kind, self.name_of(rec), doc)

    def update(self, rec: R) -> None:
        """Store changed attributes (the password hash is kept)."""
        name = self.name_of(rec)
        doc = self.encode(rec)
        old = self.store.get(self.kind, name) or {}
        if "password_hash" in old and not doc.get("password_hash"):
            doc["password_hash"] = old["password_hash"]
        self.store.put(self.kind, name, doc)

    def set_password(self, name: str, password: str) -> bool:
        doc = self.store.get(self.kind, name)
        if doc is None:
            return False
        doc = {**doc, "password_hash": hash_password(password, n=self.kdf_n)}
        self.store.put(self.kind, name, doc)
        return True

    def remove(self, name: str) -> bool:
        return self.store.delete(self.kind, name)

    # -- logins ---------------------------------------------------------------------
    def verify(self, name: str, password: str) -> R | None:
        """The user's record if ``password`` is theirs, else None (slow on purpose;
        the same cost for unknown names; call it off the event loop)."""
        doc = self.store.get(self.kind, name)
        if not verify_user(doc, password, kdf_n=self.kdf_n) or doc is None:
            return None
        return self.decode(name, doc)


# --------------------------------------------------------------------------
# The login throttle
# --------------------------------------------------------------------------


@dataclass
class ThrottleSettings:
    """Limits of :class:`LoginThrottle` (the relay maps its ``fail_*`` settings here)."""

    #: failed or in-flight attempts for one user from one address within ``window``
    lockout: int = 20
    #: the same for one address over all users (a spray of names); 0: 5 x lockout
    address_lockout: int = 0
    window: float = 600.0
    base_delay: float = 0.5
    max_delay: float = 8.0
    #: attempts being checked at once, over all addresses (more are refused as busy)
    max_pending: int = 512
    #: keys remembered at most (the oldest are forgotten first, in O(1))
    max_keys: int = 100_000

    @property
    def address_limit(self) -> int:
        return self.address_lockout or 5 * self.lockout


@dataclass
class _Count:
    failures: int = 0
    inflight: int = 0
    last: float = 0.0


@dataclass(eq=False)
class Attempt:
    """A reserved login attempt; settle it exactly once with :meth:`LoginThrottle.failed`
    or :meth:`LoginThrottle.succeeded`."""

    addr: str
    user: str
    settled: bool = field(default=False)


class LoginThrottle:
    """Counts login attempts per (address, user) and per address, in flight included.

    ``begin`` reserves a slot *before* the password is checked and refuses once
    failures plus attempts still being checked reach the limit: 120 guesses sent at
    once get exactly ``lockout`` checks, like 120 sent one after another. A success
    only returns its own slot; it never erases failures (a correct password hidden
    in a burst must not reset the count for the guesses around it). Counts expire
    ``window`` seconds after a key's last failure; keys live in insertion order, so
    expiring and evicting the oldest is O(1) per key.
    """

    def __init__(self, settings: ThrottleSettings | None = None) -> None:
        self.s = settings or ThrottleSettings()
        self._counts: OrderedDict[tuple[str, str | None], _Count] = OrderedDict()
        self.pending = 0

    # -- reading --------------------------------------------------------------------
    def _get(self, key: tuple[str, str | None], now: float) -> _Count | None:
        self._expire(now)
        return self._counts.get(key)

    def _expire(self, now: float) -> None:
        counts = self._counts
        while counts:
            key, c = next(iter(counts.items()))
            if c.inflight or now - c.last <= self.s.window:
                break
            del counts[key]

    def failures(self, addr: str, user: str | None, now: float) -> int:
        """Failures recorded for (addr, user), or for the whole address when user is None."""
        c = self._get((addr, user), now)
        return c.failures if c else 0

    def _used(self, key: tuple[str, str | None], now: float) -> int:
        c = self._get(key, now)
        return c.failures + c.inflight if c else 0

    def locked_out(self, addr: str, user: str, now: float) -> bool:
        """Whether a new attempt for ``user`` from ``addr`` would be refused."""
        return (self._used((addr, user), now) >= self.s.lockout
                or self._used((addr, None), now) >= self.s.address_limit)

    def failed_out(self, addr: str, user: str, now: float) -> bool:
        """Whether failures alone, not attempts still being checked, lock ``user`` at
        ``addr`` out: what a refusal may call "too many failed logins"."""
        return (self.failures(addr, user, now) >= self.s.lockout
                or self.failures(addr, None, now) >= self.s.address_limit)

    # -- attempts -------------------------------------------------------------------
    def begin(self, addr: str, user: str, now: float) -> Attempt | str:
        """Reserve an attempt, or the reason it is refused: ``"lockout"`` or ``"busy"``."""
        if self.locked_out(addr, user, now):
            return "lockout"
        if self.pending >= self.s.max_pending:
            return "busy"
        for key in ((addr, user), (addr, None)):
            c = self._touch(key, now)
            c.inflight += 1
        self.pending += 1
        return Attempt(addr, user)

    def _touch(self, key: tuple[str, str | None], now: float) -> _Count:
        c = self._counts.get(key)
        if c is None:
            c = self._counts[key] = _Count(last=now)
            while len(self._counts) > self.s.max_keys:  # a spray of addresses: oldest go
                self._counts.popitem(last=False)
        return c

    def _settle(self, attempt: Attempt) -> None:
        if attempt.settled:
            raise RuntimeError("login attempt settled twice")
        attempt.settled = True
        self.pending -= 1
        for key in ((attempt.addr, attempt.user), (attempt.addr, None)):
            c = self._counts.get(key)
            if c is not None and c.inflight:
                c.inflight -= 1

    def failed(self, attempt: Attempt, now: float) -> float:
        """Count the attempt as a failure; returns how long to delay the refusal."""
        self._settle(attempt)
        count = 0
        for key in ((attempt.addr, attempt.user), (attempt.addr, None)):
            c = self._touch(key, now)
            c.failures += 1
            c.last = now
            self._counts.move_to_end(key)  # newest failure last: expiry stays O(1)
            if key[1] is not None:
                count = c.failures
        return min(self.s.base_delay * 2 ** (max(count, 1) - 1), self.s.max_delay)

    def succeeded(self, attempt: Attempt) -> None:
        """Return the attempt's slot; failures of other attempts stay counted."""
        self._settle(attempt)

    def fail_now(self, addr: str, user: str, now: float) -> float:
        """A failure that needed no check (e.g. an expired resumption token)."""
        attempt = self.begin(addr, user, now)
        if isinstance(attempt, str):
            return self.s.max_delay
        return self.failed(attempt, now)

    def __len__(self) -> int:
        return len(self._counts)


# --------------------------------------------------------------------------
# Running the slow hashes off the event loop, bounded
# --------------------------------------------------------------------------


class PasswordChecker:
    """Runs password checks on a small dedicated thread pool, bounded.

    At most ``per_address`` checks of one address run at once (its other reserved
    attempts wait their turn) and at most ``workers`` over all; nothing else shares
    the pool, so a burst of guesses cannot hold up store reads or other work queued
    on the loop's default executor. Waiting attempts are bounded by the throttle's
    reservations.
    """

    def __init__(self, workers: int | None = None, per_address: int = 2) -> None:
        self.workers = workers or max(2, min(4, os.cpu_count() or 2))
        self.per_address = per_address
        self._pool: ThreadPoolExecutor | None = None
        self._global: asyncio.Semaphore | None = None
        self._by_addr: dict[str, tuple[asyncio.Semaphore, int]] = {}
        #: checks running right now (for tests and metrics)
        self.running = 0
        self.peak = 0

    @contextlib.asynccontextmanager
    async def _slot(self, addr: str) -> Any:
        import asyncio

        if self._global is None:
            self._global = asyncio.Semaphore(self.workers)
        sem, users = self._by_addr.get(addr) or (asyncio.Semaphore(self.per_address), 0)
        self._by_addr[addr] = (sem, users + 1)
        try:
            async with sem, self._global:
                self.running += 1
                self.peak = max(self.peak, self.running)
                try:
                    yield
                finally:
                    self.running -= 1
        finally:
            sem, users = self._by_addr[addr]
            if users <= 1:
                del self._by_addr[addr]
            else:
                self._by_addr[addr] = (sem, users - 1)

    async def run(self, addr: str, fn: Callable[..., R], *args: Any) -> R:
        """``fn(*args)`` on the pool, once this address and the pool have room."""
        import asyncio
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="kakehashi-pw")
        async with self._slot(addr):
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None



# --------------------------------------------------------------------------
# API tokens with roles
# --------------------------------------------------------------------------

TOKEN_PREFIX = "kkt"


@dataclass(frozen=True)
class TokenInfo:
    """Who an API token says the caller is."""

    id: str
    role: str
    name: str = ""


class ApiTokens:
    """Bearer tokens for HTTP APIs, each with one role, on the store.

    A token is ``kkt_<id>_<secret>``: the id finds the record, and only the SHA-256 of
    the 256-bit secret is stored (a secret that long needs no slow hash; a leaked
    database gives no usable token). The token is shown once, when created. Checks
    compare digests in constant time and cost the same for unknown ids.
    """

    def __init__(self, store: Store, kind: str = "api-token",
                 roles: tuple[str, ...] | None = None) -> None:
        self.store = store
        self.kind = kind
        self.roles = roles

    @staticmethod
    def _digest(secret: str) -> str:
        import hashlib

        return hashlib.sha256(secret.encode()).hexdigest()

    def create(self, role: str, name: str = "") -> tuple[TokenInfo, str]:
        """A new token for ``role``: (its record, the token text to hand out once)."""
        import secrets
        import time

        if self.roles is not None and role not in self.roles:
            raise ValueError(f"role {role!r} is not one of {', '.join(self.roles)}")
        if name:
            check_name(name, "token names")
        while True:
            tid = secrets.token_hex(6)
            secret = secrets.token_urlsafe(32)
            doc = {"role": role, "name": name, "sha256": self._digest(secret),
                   "created": round(time.time(), 3)}
            if self.store.insert(self.kind, tid, doc):
                return TokenInfo(tid, role, name), f"{TOKEN_PREFIX}_{tid}_{secret}"

    def verify(self, token: str | None) -> TokenInfo | None:
        """The token's record, or None (malformed, unknown, or a wrong secret)."""
        import hmac

        parts = (token or "").strip().split("_", 2)
        ok_shape = (len(parts) == 3 and parts[0] == TOKEN_PREFIX and len(parts[1]) == 12
                    and len(parts[2]) <= 128)
        doc = self.store.get(self.kind, parts[1]) if ok_shape else None
        want = (doc or {}).get("sha256") or "0" * 64
        good = hmac.compare_digest(self._digest(parts[2] if ok_shape else ""), want)
        if doc is None or not good:
            return None
        return TokenInfo(parts[1], str(doc.get("role", "")), str(doc.get("name", "")))

    def list(self) -> list[tuple[TokenInfo, float]]:
        return [(TokenInfo(tid, d.get("role", ""), d.get("name", "")), d.get("created", 0))
                for tid, d in self.store.list(self.kind)]

    def remove(self, tid: str) -> bool:
        return self.store.delete(self.kind, tid)

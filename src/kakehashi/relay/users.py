"""The relay's user registry: registered users and their attributes, in the store."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from kakehashi.core.crypto import hash_password, verify_password
from kakehashi.core.store import Store
from kakehashi.relay.control import UserRecord

KIND = "relay.user"
#: a valid hash of nothing, verified against when a user does not exist so the time
#: taken does not tell an attacker which user IDs are registered
_DUMMY_HASH: str | None = None


def _to_doc(rec: UserRecord) -> dict[str, Any]:
    doc = asdict(rec)
    doc["notify_users"] = list(rec.notify_users)
    doc["allowed_peers"] = list(rec.allowed_peers) if rec.allowed_peers is not None else None
    return doc


def _from_doc(doc: dict[str, Any]) -> UserRecord:
    peers = doc.get("allowed_peers")
    return UserRecord(
        name=doc["name"],
        password_hash=doc.get("password_hash", ""),
        encryption=doc.get("encryption", "optional"),
        notify=doc.get("notify", "all"),
        notify_users=tuple(doc.get("notify_users") or ()),
        allowed_peers=tuple(peers) if peers is not None else None,
        insecure_peer=doc.get("insecure_peer", "refuse"),
        pubkey=doc.get("pubkey", ""),
    )


class UserRegistry:
    def __init__(self, store: Store, *, kdf_n: int = 2**14) -> None:
        self.store = store
        self.kdf_n = kdf_n

    def get(self, name: str) -> UserRecord | None:
        doc = self.store.get(KIND, name)
        return _from_doc(doc) if doc else None

    def add(self, rec: UserRecord, password: str) -> bool:
        rec = UserRecord(**{**asdict(rec), "password_hash": hash_password(password, n=self.kdf_n)})
        return self.store.insert(KIND, rec.name, _to_doc(rec))

    def update(self, rec: UserRecord) -> None:
        self.store.put(KIND, rec.name, _to_doc(rec))

    def set_password(self, name: str, password: str) -> bool:
        rec = self.get(name)
        if rec is None:
            return False
        self.update(UserRecord(**{**asdict(rec),
                                  "password_hash": hash_password(password, n=self.kdf_n)}))
        return True

    def remove(self, name: str) -> bool:
        return self.store.delete(KIND, name)

    def list(self) -> list[UserRecord]:
        return [_from_doc(doc) for _, doc in self.store.list(KIND)]

    def verify(self, name: str, password: str) -> UserRecord | None:
        """Check a login (slow on purpose; call it off the event loop)."""
        global _DUMMY_HASH
        rec = self.get(name)
        if rec is None or not rec.password_hash:
            if _DUMMY_HASH is None:
                _DUMMY_HASH = hash_password("-", n=self.kdf_n)
            verify_password(password, _DUMMY_HASH)
            return None
        return rec if verify_password(password, rec.password_hash) else None

"""The relay's users: the core :class:`~kakehashi.core.identity.UserRegistry` with the
relay's attributes (:class:`UserRecord`) beside the password hash."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from kakehashi.core.identity import DEFAULT_KDF_N, UserRegistry
from kakehashi.core.store import Store
from kakehashi.relay.control import UserRecord

KIND = "relay.user"


class RelayUsers(UserRegistry[UserRecord]):
    """Registered relay users (Fig. 2's user information) on the store."""

    def __init__(self, store: Store, *, kdf_n: int = DEFAULT_KDF_N) -> None:
        super().__init__(store, KIND, kdf_n=kdf_n)

    def encode(self, rec: UserRecord) -> dict[str, Any]:
        doc = asdict(rec)
        doc["notify_users"] = list(rec.notify_users)
        doc["allowed_peers"] = list(rec.allowed_peers) if rec.allowed_peers is not None \
            else None
        return doc

    def decode(self, name: str, doc: dict[str, Any]) -> UserRecord:
        peers = doc.get("allowed_peers")
        return UserRecord(
            name=doc.get("name", name),
            password_hash=doc.get("password_hash", ""),
            encryption=doc.get("encryption", "optional"),
            notify=doc.get("notify", "all"),
            notify_users=tuple(doc.get("notify_users") or ()),
            allowed_peers=tuple(peers) if peers is not None else None,
            insecure_peer=doc.get("insecure_peer", "refuse"),
            pubkey=doc.get("pubkey", ""),
        )

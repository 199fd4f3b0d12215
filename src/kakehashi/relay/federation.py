"""Relay federation (spec 000: relay servers forwarding connection requests), sans-IO.

What the nodes of a cluster share, as plain values and pure functions that the
control unit (:mod:`kakehashi.relay.control`) decides with and the asyncio layer
(:mod:`kakehashi.relay.cluster`) carries through Redis:

* :class:`PresenceInfo` - what a node tells the others about one of its logged-in
  users (enough for the requester's node to refuse early and for ``who``/``watch``);
  the target's node decides again with its own, authoritative session.
* :class:`Directory` - the users of the *other* nodes, by user and node.
* the inter-node link's mutual authentication: an HMAC challenge-response over both
  nonces and both node names, keyed by the cluster secret (:func:`node_proof`), so
  neither side can be replayed or reflected and an outsider gets nothing but a refusal.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import Any

from kakehashi.relay import messages as m

NONCE_BYTES = 32


@dataclass(frozen=True, slots=True)
class PresenceInfo:
    """One user on one node, as the other nodes see it."""

    encryption: m.Encryption = "optional"
    services: tuple[str, ...] = ()
    connections: int = 0
    notify: m.NotifyPolicy = "all"
    notify_users: tuple[str, ...] = ()
    allowed_peers: tuple[str, ...] | None = None
    pubkey: str = ""
    #: when the node first saw this user (its monotonic clock does not travel, so a
    #: sequence of the cluster layer: the newest claim is tried first)
    seq: int = 0

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"e": self.encryption, "s": list(self.services),
                               "c": self.connections, "n": self.notify,
                               "nu": list(self.notify_users), "k": self.pubkey,
                               "q": self.seq}
        if self.allowed_peers is not None:
            doc["ap"] = list(self.allowed_peers)
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> PresenceInfo:
        """Decode what another node wrote; a malformed entry raises ValueError."""
        try:
            enc = doc.get("e", "optional")
            notify = doc.get("n", "all")
            if enc not in ("required", "optional", "off") or notify not in (
                    "all", "none", "only", "except"):
                raise ValueError("bad policy")
            peers = doc.get("ap")
            return cls(encryption=enc, services=tuple(str(s) for s in doc.get("s", ())[:64]),
                       connections=int(doc.get("c", 0)), notify=notify,
                       notify_users=tuple(str(u) for u in doc.get("nu", ())),
                       allowed_peers=tuple(str(u) for u in peers) if peers is not None
                       else None,
                       pubkey=str(doc.get("k", "")), seq=int(doc.get("q", 0)))
        except (AttributeError, TypeError, OverflowError) as exc:
            raise ValueError(f"malformed presence entry: {exc}") from None

    def visible_to(self, viewer: str, name: str) -> bool:
        """The same rule as the local one (:func:`control._visible`)."""
        if viewer == name or self.notify == "all":
            return True
        if self.notify == "none":
            return False
        if self.notify == "only":
            return viewer in self.notify_users
        return viewer not in self.notify_users

    def allows(self, requester: str, name: str) -> bool:
        return (self.allowed_peers is None or requester in self.allowed_peers
                or requester == name)


@dataclass
class Directory:
    """Users logged in at the other nodes: ``user -> node -> info``."""

    users: dict[str, dict[str, PresenceInfo]] = field(default_factory=dict)

    def get(self, user: str) -> dict[str, PresenceInfo]:
        return self.users.get(user, {})

    def online(self, user: str) -> bool:
        return bool(self.users.get(user))

    def set(self, node: str, user: str, info: PresenceInfo | None) -> None:
        if info is None:
            nodes = self.users.get(user)
            if nodes is not None:
                nodes.pop(node, None)
                if not nodes:
                    del self.users[user]
        else:
            self.users.setdefault(user, {})[node] = info

    def drop_node(self, node: str) -> list[str]:
        """Forget every user of ``node``; returns the users that were there."""
        gone = []
        for user in list(self.users):
            if node in self.users[user]:
                self.set(node, user, None)
                gone.append(user)
        return gone

    def nodes_of(self, user: str, service: str = "") -> list[str]:
        """Nodes holding ``user`` (offering ``service`` if named), newest claim first."""
        entries = self.get(user).items()
        fit = [(info.seq, node) for node, info in entries
               if not service or service in info.services]
        return [node for _, node in sorted(fit, reverse=True)]

    def merged(self, user: str) -> PresenceInfo | None:
        """One user over all other nodes: services and connections summed up, the
        policies of its newest claim."""
        nodes = self.get(user)
        if not nodes:
            return None
        newest = max(nodes.values(), key=lambda i: i.seq)
        services = sorted({s for i in nodes.values() for s in i.services})
        return PresenceInfo(
            encryption=newest.encryption, services=tuple(services),
            connections=sum(i.connections for i in nodes.values()),
            notify=newest.notify, notify_users=newest.notify_users,
            allowed_peers=newest.allowed_peers, pubkey=newest.pubkey, seq=newest.seq)


# -- inter-node link authentication -----------------------------------------------------
def membership_change(live: set[str], known: set[str],
                      seen: set[str]) -> tuple[frozenset[str], bool]:
    """What a node's cheap check of every renewal calls for: ``(gone, full_read)``.

    ``live``: the other nodes whose entries are in Redis now; ``known``: the nodes the
    directory lists users at; ``seen``: the nodes alive at the last full read.
    ``gone`` are the nodes seen alive then and dead now: their users are dropped at
    once, with no read (their entries have expired: there is nothing to read). A full
    read is due when a node joined, or when a node holding users is dead without
    having been seen alive (the directory is stale).

    A gone node counts even when its users were already dropped (a request that found
    it unreachable forgets them at once): otherwise it would still be counted, in
    ``kakehashi_cluster_nodes`` and the warm links, until the periodic full read.
    """
    gone = seen - live
    return frozenset(gone), bool(live - seen) or bool(known - live - gone)


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def node_proof(secret: bytes, role: str, prover: str, verifier: str,
               caller_nonce: bytes, callee_nonce: bytes) -> bytes:
    """HMAC-SHA256 over the role, both node names and both nonces.

    ``role`` ("callee" / "caller") keeps one side's proof from being reflected as the
    other's; both nonces make every proof fresh for this link only.
    """
    msg = b"\x00".join([b"kakehashi-relay-node-v1", role.encode(), prover.encode(),
                        verifier.encode(), caller_nonce, callee_nonce])
    return hmac.new(secret, msg, hashlib.sha256).digest()


def check_proof(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, got)


def derive_secret(text: str | bytes) -> bytes:
    """The key used for proofs, from a configured or shared cluster secret."""
    raw = text.encode() if isinstance(text, str) else text
    return hashlib.sha256(b"kakehashi-relay-cluster-secret\x00" + raw).digest()

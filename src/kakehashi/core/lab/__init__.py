"""Test-lab helpers: real network topologies in throwaway Linux namespaces.

Re-exported here so tests write ``from kakehashi.core.lab import NatLab``
without caring which module implements what.
"""

from kakehashi.core.lab.netns import (
    NS_PREFIX,
    FirewallLab,
    LabCommandError,
    LabError,
    Namespace,
    NatLab,
    ProbeResult,
    cleanup_stale_namespaces,
    lab_available,
    list_lab_namespaces,
)

__all__ = [
    "NS_PREFIX",
    "FirewallLab",
    "LabCommandError",
    "LabError",
    "Namespace",
    "NatLab",
    "ProbeResult",
    "cleanup_stale_namespaces",
    "lab_available",
    "list_lab_namespaces",
]

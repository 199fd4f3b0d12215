"""The ``--fast-path`` modes of the datagram forwarder and the decisions that follow from
them, apart from the kernel path's I/O (:mod:`kakehashi.core.kernelpath`) so the CLI can
name the modes without importing it, and each decision is tested without root.

Why ``auto`` is the default: only the kernel path meets the chain's target against
three chained socat relays (latency: four Python processes cannot beat three C ones,
see docs/benchmarks.md), and since a session's offload is a few set elements in one
table made per process, its cost no longer grows with the number of sessions; where
the process cannot use it (not root, no libnftables, nftables refusing the table) the
user-space fast path is what remains, and one line at start says which and why.
"""

from __future__ import annotations

#: ``--fast-path`` values: ``auto`` (the default) is the kernel path where this process
#: can use it and the user-space fast path elsewhere; ``kernel`` insists on the kernel
#: path; ``on`` is the user-space fast path alone; ``off`` asyncio datagram transports
MODES = ("auto", "on", "off", "kernel")
DEFAULT_MODE = "auto"


def callbacks(mode: str) -> bool:
    """Does ``mode`` relay in user space from readiness callbacks (the forwarder's
    ``fast_path``)? Every mode but ``off`` does, the kernel path's first datagrams and
    its sessions that stay in user space included."""
    return mode != "off"


def wants_kernel(mode: str) -> bool:
    """Does ``mode`` hand sessions to the kernel when it can?"""
    return mode in ("auto", "kernel")


def start_line(who: str, mode: str, table: str | None, why: str | None) -> str:
    """The one line a proxy or forward logs at start about its data path: which path and
    why (``why``: the kernel path's reason to be unavailable here; ``table``: its table
    when it is on). Pure, so each case is unit-tested."""
    prefix = f"{who}: " if who else ""
    if mode == "off":
        return f"{prefix}fast path off (--fast-path off): asyncio datagram transports"
    if mode == "on":
        return f"{prefix}user-space fast path (--fast-path on): the kernel path not tried"
    if table is not None:
        return (f"{prefix}kernel fast path on (--fast-path {mode}, nftables table {table}): "
                f"sessions that only forward are relayed by the kernel once their port "
                f"record locks; the others in the user-space fast path")
    return (f"{prefix}kernel path unavailable: {why}; using the user-space fast path "
            f"(--fast-path {mode})")

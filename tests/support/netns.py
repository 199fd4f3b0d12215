"""Throwaway network-namespace topologies for the lab tests (tests/lab).

kakehashi exists to cross NATs and firewalls, and mocks cannot prove that a
connection really survives masquerading or really is refused by a stateful
filter. This module therefore builds *real* kernel topologies -- network
namespaces joined by veth pairs and bridges, with nftables doing the NAT and
filtering -- that a test can start processes in and probe.

Rules the code follows, and why:

* Every address lives in 198.18.0.0/15 (RFC 2544 benchmarking range), so a
  lab can never collide with, or leak traffic to, a real network.
* Namespace names carry a per-lab prefix ``kklab<pid>-<n>-`` so parallel
  test processes (pytest-xdist, two CI jobs on one box) never collide, and a
  later run can recognise and delete namespaces whose owning process died
  (e.g. SIGKILLed by a CI timeout) -- see :func:`cleanup_stale_namespaces`.
* Interfaces are created *directly inside* their namespaces
  (``ip link add X netns A type veth peer name Y netns B``). The kernel checks
  names per namespace, so short fixed names such as ``wan0`` can never clash
  with the host or with another lab, and nothing is ever left behind in the
  root namespace: deleting a namespace deletes its veth ends and bridges.
* IPv6 is disabled in every lab namespace so that the only path between hosts
  is the IPv4 path we built (no link-local side doors around the NAT, no
  router-solicitation noise).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Self

__all__ = [
    "NS_PREFIX",
    "ChainLab",
    "ClusterLab",
    "FirewallLab",
    "LabCommandError",
    "LabError",
    "Namespace",
    "NatLab",
    "OnDemandLab",
    "ProbeResult",
    "cleanup_stale_namespaces",
    "lab_available",
    "list_lab_namespaces",
]

log = logging.getLogger(__name__)

NS_PREFIX = "kklab"
"""Leading part of every namespace name this module creates."""

_NS_NAME_RE = re.compile(rf"^{NS_PREFIX}(\d+)-(\d+)-")
_lab_counter = itertools.count(1)

DEFAULT_TIMEOUT = 10.0
"""Seconds a single setup command may take; generous because CI boxes stall."""

_READY_TIMEOUT = 5.0

# A tiny TCP server that answers every connection with the peer address it
# sees and closes. Tests use it to prove *who* a connection appears to come
# from (masquerade) without needing any project code.
_WHOAMI_SERVER = """\
import socket, sys
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(64)
print("READY", flush=True)
while True:
    conn, peer = srv.accept()
    with conn:
        try:
            conn.sendall(peer[0].encode() + b"\\n")
        except OSError:
            pass
"""

_TCP_PROBE = """\
import socket, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    with socket.create_connection((host, port), timeout=timeout) as conn:
        data = conn.recv(256)
except OSError as exc:
    print(f"ERR {type(exc).__name__}: {exc}", flush=True)
    sys.exit(1)
print("OK " + data.decode(errors="replace").strip(), flush=True)
"""

# Loaded into a scratch namespace by lab_available(): if the kernel lacks
# nf_tables NAT or conntrack we want to know up front, not halfway through a lab.
_PROBE_RULESET = """\
table ip kklab_probe {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "probe0" masquerade
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
    }
}
"""


class LabError(RuntimeError):
    """A lab could not be built or used."""


class LabCommandError(subprocess.CalledProcessError):
    """A command failed; unlike the base class, ``str()`` includes stderr.

    Lab setup failures are almost always explained by the tool's stderr
    ("RTNETLINK answers: File exists", an nft syntax error ...), so hiding it
    would make CI logs useless.
    """

    def __str__(self) -> str:
        detail = (self.stderr or "").strip()
        base = super().__str__()
        return f"{base}: {detail}" if detail else base


def _run_host(
    cmd: list[str],
    *,
    check: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in the current (root) namespace with captured text output."""
    proc = subprocess.run(
        cmd, input=input, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise LabCommandError(proc.returncode, cmd, proc.stdout, proc.stderr)
    return proc


def _new_prefix() -> str:
    """Return a fresh ``kklab<pid>-<n>-`` prefix, unique within this host."""
    return f"{NS_PREFIX}{os.getpid()}-{next(_lab_counter)}-"


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists (a process we may not signal still counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_pids(name: str) -> list[int]:
    proc = _run_host(["ip", "netns", "pids", name], check=False)
    return [int(tok) for tok in proc.stdout.split() if tok.isdigit()]


def _destroy_namespace(name: str) -> None:
    """Kill everything still running in ``name`` and delete it, best effort.

    Processes must go first: a namespace with live processes survives
    ``ip netns del`` anonymously and keeps its sockets and ports alive.
    """
    for pid in _netns_pids(name):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc = _run_host(["ip", "netns", "del", name], check=False)
    if proc.returncode != 0:
        log.debug("ip netns del %s: %s", name, proc.stderr.strip())


def _veth_argv(a: Namespace, a_if: str, b: Namespace, b_if: str) -> list[str]:
    """``ip link add`` argv creating a veth pair directly inside two namespaces.

    Creating the ends in place (instead of in the root namespace and moving
    them) means their names are only checked against the target namespace,
    so labs can use short fixed names and can never collide with each other.
    """
    return [
        *("ip", "link", "add", a_if, "netns", a.name),
        *("type", "veth", "peer", "name", b_if, "netns", b.name),
    ]


def list_lab_namespaces() -> list[str]:
    """Names of all namespaces on this host created by this module (any process)."""
    proc = _run_host(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    return [name for name in names if _NS_NAME_RE.match(name)]


def cleanup_stale_namespaces() -> list[str]:
    """Delete lab namespaces whose creating process no longer exists.

    Context managers cannot run when a test process is SIGKILLed, so every new
    lab sweeps up after dead predecessors. Namespaces of live processes --
    including other pytest workers running right now -- are never touched.
    Returns the names removed.
    """
    removed: list[str] = []
    for name in list_lab_namespaces():
        match = _NS_NAME_RE.match(name)
        if match is None:  # pragma: no cover - list_lab_namespaces filters already
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        log.info("removing stale lab namespace %s (pid %d is gone)", name, pid)
        _destroy_namespace(name)
        removed.append(name)
    return removed


@functools.cache
def lab_available() -> tuple[bool, str]:
    """Check whether namespace labs can run here; ``(False, reason)`` if not.

    Rather than guessing from capabilities, this actually creates a scratch
    namespace, a veth pair and an nftables NAT + conntrack ruleset, because
    containers and minimal kernels fail in all of those places differently.
    The answer is cached for the life of the process.
    """
    if not sys.platform.startswith("linux"):
        return False, f"network namespaces need Linux (platform is {sys.platform})"
    if os.geteuid() != 0:
        return False, f"network-namespace labs need root (euid is {os.geteuid()})"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return False, f"'{tool}' not found in PATH (install {package})"
    probe = Namespace(_new_prefix() + "probe", "probe")
    try:
        probe.create()
        _run_host(_veth_argv(probe, "probe0", probe, "probe1"))
        probe.nft(_PROBE_RULESET)
    except (LabError, OSError, subprocess.SubprocessError) as exc:
        return False, f"cannot build a network-namespace lab here: {exc}"
    finally:
        _destroy_namespace(probe.name)
    return True, ""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """Outcome of :meth:`Namespace.tcp_probe`.

    ``reply`` is what the server sent -- for :meth:`Namespace.start_whoami`
    servers, the client address as seen by the server.
    """

    connected: bool
    reply: str = ""
    error: str = ""
    elapsed: float = 0.0


class Namespace:
    """One network namespace of a lab: a host, router or L2 switch.

    Attributes:
        name: full kernel name (``ip netns`` name), unique on the host.
        role: short role in the lab (``"pub"``, ``"rtra"`` ...).
        addrs: interface name -> IPv4 address (without prefix length).
    """

    def __init__(self, name: str, role: str) -> None:
        self.name = name
        self.role = role
        self.addrs: dict[str, str] = {}
        self._primary_iface: str | None = None
        self._procs: list[subprocess.Popen[Any]] = []

    def __repr__(self) -> str:
        return f"Namespace({self.name!r}, addr={self.addr!r})"

    @property
    def addr(self) -> str:
        """Primary IPv4 address: the public side of routers, the only one elsewhere."""
        if self._primary_iface is None:
            return ""
        return self.addrs[self._primary_iface]

    @property
    def exec_prefix(self) -> list[str]:
        """Argv prefix that runs a command inside this namespace."""
        return ["ip", "netns", "exec", self.name]

    def create(self) -> None:
        """Create the namespace, bring ``lo`` up and switch IPv6 off."""
        _run_host(["ip", "netns", "add", self.name])
        self.ip("link", "set", "lo", "up")
        # -e: tolerate kernels built without IPv6, where these keys do not exist.
        self.run(
            [
                "sysctl",
                "-q",
                "-e",
                "-w",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
            check=False,
        )

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``ip -n <ns> ARGS`` (no exec into the namespace needed)."""
        return _run_host(["ip", "-n", self.name, *args], check=check)

    def run(
        self,
        cmd: list[str],
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the namespace, wait, and capture text output.

        Raises :class:`LabCommandError` on a non-zero exit when ``check``, and
        :class:`subprocess.TimeoutExpired` after ``timeout`` seconds.
        """
        return _run_host([*self.exec_prefix, *cmd], check=check, timeout=timeout, input=input)

    def popen(self, cmd: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a long-running ``cmd`` inside the namespace.

        ``ip netns exec`` execs the command in place, so the returned
        process's pid is the command itself and signals reach it directly.
        The lab terminates it on teardown; callers may stop it earlier.
        """
        proc: subprocess.Popen[Any] = subprocess.Popen([*self.exec_prefix, *cmd], **kw)
        self._procs.append(proc)
        return proc

    def sysctl(self, **settings: str | int) -> None:
        """Set sysctls in this namespace; dots become ``__`` in keyword names.

        Example: ``ns.sysctl(net__ipv4__ip_forward=1)``.
        """
        pairs = [f"{key.replace('__', '.')}={value}" for key, value in settings.items()]
        self.run(["sysctl", "-q", "-w", *pairs])

    def nft(self, ruleset: str) -> None:
        """Load an nftables ruleset (``nft -f -`` syntax) into this namespace.

        The load is atomic: on a syntax error nothing is applied.
        """
        self.run(["nft", "-f", "-"], input=ruleset)

    def pids(self) -> list[int]:
        """Pids of every process currently inside this namespace."""
        return _netns_pids(self.name)

    def start_whoami(self, port: int, bind: str = "0.0.0.0") -> subprocess.Popen[Any]:
        """Start a TCP server on ``bind:port`` that replies with the client's address.

        Returns once the socket is listening, so callers can probe immediately
        without sleeps or retries.
        """
        proc = self.popen(
            [sys.executable, "-I", "-c", _WHOAMI_SERVER, bind, str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], _READY_TIMEOUT)
        line = proc.stdout.readline() if ready else ""
        if line.strip() != "READY":
            proc.kill()
            _, err = proc.communicate(timeout=DEFAULT_TIMEOUT)
            raise LabError(f"whoami server on {self.name} {bind}:{port} did not start: {err}")
        return proc

    def tcp_probe(self, host: str, port: int, timeout: float = 2.0) -> ProbeResult:
        """Try a TCP connection from this namespace and read the first reply.

        ``timeout`` bounds both the connect and the read, so a silently dropped
        SYN costs at most that long. Never raises for network failures; look
        at :attr:`ProbeResult.connected`.
        """
        start = time.monotonic()
        proc = self.run(
            [sys.executable, "-I", "-c", _TCP_PROBE, host, str(port), str(timeout)],
            check=False,
            timeout=2 * timeout + DEFAULT_TIMEOUT,
        )
        elapsed = time.monotonic() - start
        out = proc.stdout.strip()
        if proc.returncode == 0 and out.startswith("OK"):
            return ProbeResult(True, reply=out[2:].strip(), elapsed=elapsed)
        error = out.removeprefix("ERR").strip() or proc.stderr.strip()
        return ProbeResult(False, error=error, elapsed=elapsed)

    def stop_processes(self, timeout: float = 2.0) -> None:
        """Terminate processes started with :meth:`popen`; kill after ``timeout``."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
        self._procs.clear()

    def destroy(self) -> None:
        """Stop our processes, kill any others inside, and delete the namespace."""
        self.stop_processes()
        _destroy_namespace(self.name)


class _Lab:
    """Common lifecycle of a lab: create namespaces, build, always tear down.

    Namespace objects are constructed in ``__init__`` (so attributes such as
    ``lab.pub`` exist and are typed before entry) but only created in the
    kernel in ``__enter__``.
    """

    def __init__(self) -> None:
        self.prefix = _new_prefix()
        self.namespaces: dict[str, Namespace] = {}

    def _namespace(self, role: str) -> Namespace:
        ns = Namespace(self.prefix + role, role)
        self.namespaces[role] = ns
        return ns

    def __enter__(self) -> Self:
        cleanup_stale_namespaces()
        try:
            for ns in self.namespaces.values():
                ns.create()
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Tear everything down; safe to call twice and after a failed build."""
        # One misbehaving process must not leave the remaining namespaces behind.
        for ns in self.namespaces.values():
            try:
                ns.stop_processes()
            except Exception:
                log.warning("stopping processes in %s failed", ns.name, exc_info=True)
        for ns in self.namespaces.values():
            _destroy_namespace(ns.name)

    def _build(self) -> None:
        raise NotImplementedError

    # -- building blocks -------------------------------------------------

    @staticmethod
    def _veth(a: Namespace, a_if: str, b: Namespace, b_if: str) -> None:
        """Create a veth pair with one end in each namespace, both ends up."""
        _run_host(_veth_argv(a, a_if, b, b_if))
        a.ip("link", "set", a_if, "up")
        b.ip("link", "set", b_if, "up")

    @staticmethod
    def _bridge(switch: Namespace, ports: list[str], bridge: str = "br0") -> None:
        """Join ``ports`` of ``switch`` into one L2 segment.

        Bridges live in their own namespace with no nftables rules, so a
        filtering namespace never accidentally sees bridged traffic.
        """
        switch.ip("link", "add", bridge, "type", "bridge")
        for port in ports:
            switch.ip("link", "set", port, "master", bridge)
        switch.ip("link", "set", bridge, "up")

    @staticmethod
    def _address(ns: Namespace, iface: str, cidr: str, primary: bool = False) -> None:
        ns.ip("addr", "add", cidr, "dev", iface)
        ns.addrs[iface] = cidr.split("/", 1)[0]
        if primary or ns._primary_iface is None:
            ns._primary_iface = iface


class NatLab(_Lab):
    """Two LANs behind two masquerading routers, plus one public host.

    ::

        hosta 198.18.1.10 --lan0-- rtra 198.18.0.1 --+
                                                     +-- sw (bridge) -- pub 198.18.0.10
        hostb 198.18.2.10 --lan0-- rtrb 198.18.0.2 --+

    The routers behave like home/carrier NAT gateways: LAN traffic leaving
    ``wan0`` is masqueraded to the router's public address, replies come back
    via conntrack, and anything *new* arriving from the public side -- to a
    LAN host or to the router itself (ICMP excepted) -- is dropped. ``pub``
    (where a relay server runs) has only its connected /24: no route to either
    LAN, exactly like a server on the internet. So hosta and hostb can both
    reach pub, but never each other directly.
    """

    PUBLIC_NET: ClassVar[str] = "198.18.0.0/24"
    LAN_A_NET: ClassVar[str] = "198.18.1.0/24"
    LAN_B_NET: ClassVar[str] = "198.18.2.0/24"

    def __init__(self) -> None:
        super().__init__()
        self.sw = self._namespace("sw")
        self.pub = self._namespace("pub")
        self.rtra = self._namespace("rtra")
        self.rtrb = self._namespace("rtrb")
        self.hosta = self._namespace("hosta")
        self.hostb = self._namespace("hostb")

    def _build(self) -> None:
        self._veth(self.pub, "eth0", self.sw, "p-pub")
        self._address(self.pub, "eth0", "198.18.0.10/24")
        sides = (
            (self.rtra, self.hosta, "198.18.0.1", "198.18.1", self.LAN_A_NET),
            (self.rtrb, self.hostb, "198.18.0.2", "198.18.2", self.LAN_B_NET),
        )
        for router, host, wan_addr, lan_base, lan_net in sides:
            self._veth(router, "wan0", self.sw, f"p-{router.role}")
            self._address(router, "wan0", f"{wan_addr}/24", primary=True)
            self._veth(router, "lan0", host, "eth0")
            self._address(router, "lan0", f"{lan_base}.1/24")
            self._address(host, "eth0", f"{lan_base}.10/24")
            host.ip("route", "add", "default", "via", f"{lan_base}.1")
            router.sysctl(net__ipv4__ip_forward=1)
            router.nft(self._router_ruleset(lan_net))
        self._bridge(self.sw, ["p-pub", "p-rtra", "p-rtrb"])

    @staticmethod
    def _router_ruleset(lan_net: str) -> str:
        return f"""\
table inet kklab_filter {{
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        ct state invalid drop
        iifname "lan0" oifname "wan0" accept
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "wan0" ct state established,related accept
        iifname "wan0" meta l4proto icmp accept
        iifname "wan0" drop
    }}
}}
table ip kklab_nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan0" ip saddr {lan_net} masquerade
    }}
}}
"""


class ClusterLab(NatLab):
    """The :class:`NatLab` plus a second public relay host and a Redis host::

        hosta, hostb behind their NAT routers (as in NatLab)
        pub  198.18.0.10  (relay node n1)
        pub2 198.18.0.11  (relay node n2)
        redis 198.18.0.5  (redis-server)

    all on the public switch. :meth:`cut_from_redis` silently drops one host's
    traffic to Redis with nftables (no reset, no ICMP: a partition as a broken link
    or firewall makes it), :meth:`heal` removes the rule.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pub2 = self._namespace("pub2")
        self.redis = self._namespace("redis")

    def _build(self) -> None:
        super()._build()
        for host, addr in ((self.pub2, "198.18.0.11"), (self.redis, "198.18.0.5")):
            self._veth(host, "eth0", self.sw, f"p-{host.role}")
            self._address(host, "eth0", f"{addr}/24")
            self.sw.ip("link", "set", f"p-{host.role}", "master", "br0")

    def cut_from_redis(self, host: Namespace) -> None:
        host.nft(f"""\
table inet kklab_cut {{
    chain output {{
        type filter hook output priority filter; policy accept;
        ip daddr {self.redis.addr} drop
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        ip saddr {self.redis.addr} drop
    }}
}}
""")

    def heal(self, host: Namespace) -> None:
        host.run(["nft", "delete", "table", "inet", "kklab_cut"])


class FirewallLab(_Lab):
    """An inside network behind a stateful firewall that exposes one TCP port.

    ::

        outside 198.18.4.10 --out0-- fw 198.18.4.1 | 198.18.3.1 --in0-- sw (bridge)
                                                                          |-- gw    198.18.3.10
                                                                          |-- inner 198.18.3.20

    ``fw`` forwards with policy drop, admitting only new TCP connections from
    outside to ``gw:gateway_port`` plus established/related traffic; it also
    drops new connections to itself from outside. There is no NAT: ``gw`` sees
    the real outside address. ``gw`` and ``inner`` share an open L2 segment, so
    ``gw`` can reach ``inner`` -- the situation a gateway on the one exposed
    port exists for. With ``allow_outbound=True`` inside hosts may also open
    connections to outside (default off: nothing but the gateway port works).
    """

    OUTSIDE_NET: ClassVar[str] = "198.18.4.0/24"
    INSIDE_NET: ClassVar[str] = "198.18.3.0/24"

    def __init__(self, gateway_port: int = 8443, *, allow_outbound: bool = False) -> None:
        if not 0 < gateway_port < 65536:
            raise ValueError(f"gateway_port out of range: {gateway_port}")
        super().__init__()
        self.gateway_port = gateway_port
        self.allow_outbound = allow_outbound
        self.sw = self._namespace("sw")
        self.outside = self._namespace("outside")
        self.fw = self._namespace("fw")
        self.gw = self._namespace("gw")
        self.inner = self._namespace("inner")

    def _build(self) -> None:
        self._veth(self.outside, "eth0", self.fw, "out0")
        self._address(self.outside, "eth0", "198.18.4.10/24")
        self._address(self.fw, "out0", "198.18.4.1/24", primary=True)
        self.outside.ip("route", "add", "default", "via", "198.18.4.1")

        self._veth(self.fw, "in0", self.sw, "p-fw")
        self._address(self.fw, "in0", "198.18.3.1/24")
        for host, addr in ((self.gw, "198.18.3.10"), (self.inner, "198.18.3.20")):
            self._veth(host, "eth0", self.sw, f"p-{host.role}")
            self._address(host, "eth0", f"{addr}/24")
            host.ip("route", "add", "default", "via", "198.18.3.1")
        self._bridge(self.sw, ["p-fw", "p-gw", "p-inner"])

        self.fw.sysctl(net__ipv4__ip_forward=1)
        self.fw.nft(self._fw_ruleset())

    def _fw_ruleset(self) -> str:
        outbound = 'iifname "in0" oifname "out0" accept' if self.allow_outbound else ""
        return f"""\
table inet kklab_fw {{
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        ct state invalid drop
        iifname "out0" oifname "in0" ip daddr {self.gw.addr} tcp dport {self.gateway_port} \
ct state new accept
        {outbound}
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "out0" ct state established,related accept
        iifname "out0" meta l4proto icmp accept
        iifname "out0" drop
    }}
}}
"""


class OnDemandLab(_Lab):
    """A closed network behind an inner relay, a public network, and a client (spec 002).

    ::

        public 198.18.5.0/24 (sw, a bridge):
          edge    198.18.5.10   (manager + edge relay)
          core    198.18.5.20   (inner relay) --closed0-- dev 100.64.0.10/24
          client  198.18.5.30 and 198.18.5.31

    The device ``dev`` has only its closed-network address (100.64.0.0/10, the
    carrier's private range) and no route anywhere else; ``core`` has a leg on both
    networks but does not forward (IP forwarding off, and a forward filter that drops
    everything as a second lock). So the direct path from ``client`` to the device fails
    and only a relay running on ``core`` can reach it. The client's two addresses let a
    test connect from inside and from outside a grant's address range.
    """

    PUBLIC_NET: ClassVar[str] = "198.18.5.0/24"
    CLOSED_NET: ClassVar[str] = "100.64.0.0/24"

    def __init__(self) -> None:
        super().__init__()
        self.sw = self._namespace("sw")
        self.edge = self._namespace("edge")
        self.core = self._namespace("core")
        self.dev = self._namespace("dev")
        self.client = self._namespace("client")

    def _build(self) -> None:
        for host, addr in ((self.edge, "198.18.5.10"), (self.core, "198.18.5.20"),
                           (self.client, "198.18.5.30")):
            self._veth(host, "eth0", self.sw, f"p-{host.role}")
            self._address(host, "eth0", f"{addr}/24", primary=True)
        self._address(self.client, "eth0", "198.18.5.31/24")
        self._bridge(self.sw, [f"p-{h.role}" for h in (self.edge, self.core, self.client)])
        self._veth(self.core, "closed0", self.dev, "eth0")
        self._address(self.core, "closed0", "100.64.0.1/24")
        self._address(self.dev, "eth0", "100.64.0.10/24", primary=True)
        self.core.sysctl(net__ipv4__ip_forward=0)
        self.core.nft("""\
table inet kklab_core {
    chain forward {
        type filter hook forward priority filter; policy drop;
    }
}
""")


class ChainLab(_Lab):
    """Three firewalls in a row, each running a proxy; a NAT in front of the client.

    ::

        client 198.18.20.10 --lan0-- nat 198.18.20.1 | 198.18.21.2 --- fw1 198.18.21.1
            fw1 198.18.22.1 --- fw2 198.18.22.2 | 198.18.23.1 --- fw3 198.18.23.2
            fw3 198.18.24.1 --- server 198.18.24.10

    The NAT masquerades the client LAN to 198.18.21.2. Every firewall routes but forwards
    nothing (policy drop), and admits to itself only established traffic, ICMP, its
    control port ``CONTROL_PORT`` and its UDP range ``udp_range(i)``: the direct path
    from the client to the server is closed, only the proxies can carry datagrams.
    """

    CONTROL_PORT: ClassVar[int] = 1091

    def __init__(self) -> None:
        super().__init__()
        self.client = self._namespace("client")
        self.nat = self._namespace("nat")
        self.fw1 = self._namespace("fw1")
        self.fw2 = self._namespace("fw2")
        self.fw3 = self._namespace("fw3")
        self.server = self._namespace("server")

    @staticmethod
    def udp_range(i: int) -> tuple[int, int]:
        return 40000 + 1000 * i, 40000 + 1000 * i + 99

    @staticmethod
    def forward_drops(fw: Namespace) -> int:
        """Packets ``fw`` was asked to forward (and dropped: it forwards nothing)."""
        out = fw.run(["nft", "list", "chain", "inet", "kklab_chain", "forward"]).stdout
        m = re.search(r"counter packets (\d+)", out)
        return int(m.group(1)) if m else 0

    def _build(self) -> None:
        self._veth(self.client, "eth0", self.nat, "lan0")
        self._address(self.client, "eth0", "198.18.20.10/24", primary=True)
        self._address(self.nat, "lan0", "198.18.20.1/24")
        self.client.ip("route", "add", "default", "via", "198.18.20.1")
        self._veth(self.nat, "wan0", self.fw1, "lan0")
        self._address(self.nat, "wan0", "198.18.21.2/24", primary=True)
        self._address(self.fw1, "lan0", "198.18.21.1/24", primary=True)
        self.nat.ip("route", "add", "default", "via", "198.18.21.1")
        self._veth(self.fw1, "wan0", self.fw2, "lan0")
        self._address(self.fw1, "wan0", "198.18.22.1/24")
        self._address(self.fw2, "lan0", "198.18.22.2/24", primary=True)
        self._veth(self.fw2, "wan0", self.fw3, "lan0")
        self._address(self.fw2, "wan0", "198.18.23.1/24")
        self._address(self.fw3, "lan0", "198.18.23.2/24", primary=True)
        self._veth(self.fw3, "wan0", self.server, "eth0")
        self._address(self.fw3, "wan0", "198.18.24.1/24")
        self._address(self.server, "eth0", "198.18.24.10/24", primary=True)
        self.server.ip("route", "add", "default", "via", "198.18.24.1")
        # routes, so that only the firewall rules (not a missing route) stop direct traffic
        self.fw1.ip("route", "add", "198.18.23.0/24", "via", "198.18.22.2")
        self.fw1.ip("route", "add", "198.18.24.0/24", "via", "198.18.22.2")
        self.fw1.ip("route", "add", "198.18.20.0/24", "via", "198.18.21.2")
        self.fw2.ip("route", "add", "198.18.24.0/24", "via", "198.18.23.2")
        self.fw2.ip("route", "add", "default", "via", "198.18.22.1")
        self.fw3.ip("route", "add", "default", "via", "198.18.23.1")
        self.nat.sysctl(net__ipv4__ip_forward=1)
        self.nat.nft("""\
table ip kklab_nat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan0" ip saddr 198.18.20.0/24 masquerade
    }
}
""")
        for i, fw in enumerate((self.fw1, self.fw2, self.fw3), 1):
            fw.sysctl(net__ipv4__ip_forward=1)
            low, high = self.udp_range(i)
            fw.nft(f"""\
table inet kklab_chain {{
    chain input {{
        type filter hook input priority filter; policy drop;
        iifname "lo" accept
        ct state established,related accept
        meta l4proto icmp accept
        tcp dport {self.CONTROL_PORT} accept
        udp dport {low}-{high} accept
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        counter
    }}
}}
""")

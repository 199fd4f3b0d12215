"""The paths a benchmark client can take to a target server on loopback.

Each ``start_*`` function starts what the path needs (through ``procs``, which stops
it again) and returns a :class:`Route`: the port the client connects to and the
processes doing the forwarding (their CPU time is accounted per row).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import LOOPBACK, Procs, free_port, wait_listening

KDF_N = 1024  # cheap password hashes: logins in the benchmark are not the thing measured
PASSWORDS = {"pi": "pi-bench-secret", "laptop": "laptop-bench-secret"}


@dataclass
class Route:
    name: str
    port: int
    pids: list[int] = field(default_factory=list)


def direct(target: int) -> Route:
    return Route("direct", target)


# -- classic forwarders --------------------------------------------------------------
def start_socat(procs: Procs, target: int) -> Route:
    port = free_port()
    proc = procs.spawn("socat", ["socat", f"TCP-LISTEN:{port},bind={LOOPBACK},reuseaddr,fork",
                                 f"TCP:{LOOPBACK}:{target}"])
    wait_listening(port, proc=proc)
    return Route("socat", port, [proc.pid])


HAPROXY_CFG = """\
global
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend bench
    bind {loopback}:{port}
    default_backend target
backend target
    server t1 {loopback}:{target}
"""


def start_haproxy(procs: Procs, target: int) -> Route:
    port = free_port()
    cfg = procs.workdir / f"haproxy-{port}.cfg"
    cfg.write_text(HAPROXY_CFG.format(loopback=LOOPBACK, port=port, target=target))
    proc = procs.spawn("haproxy", ["haproxy", "-f", str(cfg), "-db"])
    wait_listening(port, proc=proc)
    return Route("haproxy", port, [proc.pid])


def start_haproxy_chain(procs: Procs, target: int, hops: int = 3) -> Route:
    """Three haproxy processes in a row: the same number of forwarding processes and TCP
    connections as the relay path (connect -> relay -> agent), a fair reference for it."""
    pids = []
    for _ in range(hops):
        route = start_haproxy(procs, target)
        target = route.port
        pids += route.pids
    return Route(f"haproxy x{hops} (chained)", target, pids)


def start_uvloop_chain(procs: Procs, target: int, hops: int = 3) -> Route:
    """Three minimal Python forwarders in a row (bench/uvloop_forward.py: uvloop protocols,
    no parsing, no logging): what three Python processes on the path cost by themselves,
    the floor under the relay's three (connect -> relay -> agent)."""
    script = str(Path(__file__).resolve().parent / "uvloop_forward.py")
    pids = []
    for _ in range(hops):
        port = free_port()
        proc = procs.spawn("uvloop-forward", [sys.executable, script, str(port), str(target)])
        wait_listening(port, proc=proc)
        target = port
        pids.append(proc.pid)
    return Route(f"uvloop x{hops} (minimal Python forwarders, chained)", target, pids)


SSHD_CFG = """\
Port {port}
ListenAddress {loopback}
HostKey {dir}/host_ed25519
AuthorizedKeysFile {dir}/authorized_keys
PidFile none
UsePAM no
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
LogLevel ERROR
"""


def _ssh_keys(workdir: Path) -> Path:
    keydir = workdir / "ssh"
    if not (keydir / "user_ed25519").exists():
        keydir.mkdir(exist_ok=True)
        for name in ("host_ed25519", "user_ed25519"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                            str(keydir / name)], check=True)
        shutil.copy(keydir / "user_ed25519.pub", keydir / "authorized_keys")
    return keydir


def ssh_available() -> str | None:
    """None if an sshd can run here, else why not."""
    if not os.path.exists("/usr/sbin/sshd") or not shutil.which("ssh"):
        return "sshd/ssh not installed (bash scripts/install-deps.sh)"
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        try:
            os.makedirs("/run/sshd", mode=0o755)  # sshd's privilege separation directory
        except OSError as exc:
            return f"cannot create /run/sshd: {exc}"
    return None


def start_ssh(procs: Procs, target: int) -> Route:
    return start_ssh_forwards(procs, [target])[0]


def start_ssh_forwards(procs: Procs, targets: list[int]) -> list[Route]:
    """One ``ssh -L`` per target, all over ONE ssh connection (one TCP connection whose
    channels ssh multiplexes, like a switch gateway's link): a Route per target, in
    order, each naming both processes (sshd forks the connection's own process; its CPU
    is accounted as sshd's descendants)."""
    keydir = _ssh_keys(procs.workdir)
    sshd_port = free_port()
    ports = [free_port() for _ in targets]
    cfg = keydir / f"sshd-{sshd_port}.conf"
    cfg.write_text(SSHD_CFG.format(port=sshd_port, loopback=LOOPBACK, dir=keydir))
    sshd = procs.spawn("sshd", ["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)])
    wait_listening(sshd_port, proc=sshd)
    user = os.environ.get("USER") or subprocess.run(
        ["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    forwards = [a for port, target in zip(ports, targets, strict=True)
                for a in ("-L", f"{LOOPBACK}:{port}:{LOOPBACK}:{target}")]
    ssh = procs.spawn("ssh", [
        "ssh", "-F", "/dev/null", "-i", str(keydir / "user_ed25519"), "-p", str(sshd_port),
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR",
        "-o", "ExitOnForwardFailure=yes", "-c", "aes128-gcm@openssh.com",
        "-N", *forwards, f"{user}@{LOOPBACK}"])
    for port in ports:
        wait_listening(port, proc=ssh)
    return [Route("ssh -L (aes128-gcm)", port, [sshd.pid, ssh.pid]) for port in ports]


# -- kakehashi -----------------------------------------------------------------------
class Kakehashi:
    """A private KAKEHASHI_HOME (dev CA) and relay database with users pi and laptop."""

    def __init__(self, workdir: Path) -> None:
        self.home = workdir / "kakehashi-home"
        self.db = str(workdir / "relay.db")
        self.ca = self.home / "ca" / "ca.pem"  # the dev CA, made by the first TLS relay
        self.env = {"KAKEHASHI_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}
        # in-process terminals (setup rows) must not touch the user's own kakehashi home
        os.environ["KAKEHASHI_HOME"] = str(self.home)
        for user, password in PASSWORDS.items():
            self.cli("relay", "user", "add", user, "--db", self.db, "--password-stdin",
                     "--kdf-n", str(KDF_N), input=password + "\n")

    @staticmethod
    def argv(*args: str) -> list[str]:
        return [sys.executable, "-m", "kakehashi", "--log-format", "text", *args]

    def cli(self, *args: str, input: str | None = None) -> None:
        subprocess.run(self.argv(*args), input=input, text=True, capture_output=True,
                       env={**os.environ, **self.env}, check=True, timeout=60)

    def serve(self, procs: Procs, *, tls: bool, env: dict[str, str] | None = None,
              db: str | None = None, extra: tuple[str, ...] = (),
              nofile: int | None = None) -> tuple[int, int]:
        """Start ``relay serve``; returns (port, pid)."""
        port = free_port()
        proc = procs.spawn("relay", self.argv(
            "relay", "serve", "--listen", f"{LOOPBACK}:{port}", "--db", db or self.db,
            "--tls", "on" if tls else "off", *extra), env={**self.env, **(env or {})},
            nofile=nofile)
        proc.wait_for("relay listening on")
        return port, proc.pid

    def terminal_args(self, user: str, relay_port: int, tls: bool,
                      encryption: str | None = None) -> list[str]:
        return ["--server", f"{LOOPBACK}:{relay_port}", "--user", user,
                "--tls", "on" if tls else "off",
                *(["--encryption", encryption] if encryption else [])]

    def agent(self, procs: Procs, relay_port: int, services: dict[str, int], *, tls: bool,
              env: dict[str, str] | None = None, identity: Path | None = None,
              encryption: str | None = None) -> int:
        """Start ``relay agent`` as pi exposing NAME=127.0.0.1:PORT; returns its pid."""
        expose = [a for name, port in services.items()
                  for a in ("--expose", f"{name}={LOOPBACK}:{port}")]
        ident = ["--identity", str(identity)] if identity else []
        proc = procs.spawn("agent", self.argv(
            "relay", "agent", *self.terminal_args("pi", relay_port, tls, encryption), *ident,
            *expose),
            env={**self.env, "KAKEHASHI_PASSWORD": PASSWORDS["pi"], **(env or {})})
        proc.wait_for("agent pi online")
        return proc.pid

    def connect(self, procs: Procs, relay_port: int, service: str, *, tls: bool,
                env: dict[str, str] | None = None, identity: Path | None = None,
                encryption: str | None = None) -> tuple[int, int]:
        """Start ``relay connect`` as laptop to pi/SERVICE; returns (local port, pid)."""
        port = free_port()
        ident = ["--identity", str(identity), "--e2e"] if identity else []
        proc = procs.spawn("connect", self.argv(
            "relay", "connect", *self.terminal_args("laptop", relay_port, tls, encryption),
            *ident,
            f"pi/{service}", "--listen", f"{LOOPBACK}:{port}"),
            env={**self.env, "KAKEHASHI_PASSWORD": PASSWORDS["laptop"], **(env or {})})
        proc.wait_for("forwarding")
        return port, proc.pid

    def identities(self) -> dict[str, Path]:
        """X25519 identity keys for pi and laptop (end-to-end mode), registered once."""
        if not hasattr(self, "_identities"):
            self._identities = {}
            for user in PASSWORDS:
                path = self.home.parent / f"{user}.identity"
                out = subprocess.run(self.argv("relay", "keygen", str(path)), text=True,
                                     capture_output=True, env={**os.environ, **self.env},
                                     check=True, timeout=60).stdout.split()[-1]
                self.cli("relay", "user", "set", user, "--db", self.db, "--pubkey", out)
                self._identities[user] = path
        return self._identities

    def start_route(self, procs: Procs, target: int, *, tls: bool,
                    splice: bool = True, e2e: bool = False, fast_path: bool = True,
                    early: bool = True, encryption: str | None = None,
                    env: dict[str, str] | None = None,
                    serve_extra: tuple[str, ...] = ()) -> Route:
        """client -> connect -> relay -> agent -> target, all three processes started here.

        ``e2e``: the session is sealed end to end (the relay forwards sealed frames);
        ``fast_path=False``: KAKEHASHI_FAST_PATH=off (TLS through memory BIOs);
        ``early=False``: KAKEHASHI_EARLY_DATA=0 (no first bytes with the request);
        ``encryption``: both terminals' ``--encryption``;
        ``env``: more environment for the three processes (e.g. PYTHONPATH);
        ``serve_extra``: more ``relay serve`` options."""
        env = dict(env or {})
        if not splice:
            env["KAKEHASHI_NO_SPLICE"] = "1"
        if not fast_path:
            env["KAKEHASHI_FAST_PATH"] = "off"
        if not early:
            env["KAKEHASHI_EARLY_DATA"] = "0"
        ids = self.identities() if e2e else {}
        relay_port, relay_pid = self.serve(procs, tls=tls, env=env, extra=serve_extra)
        agent_pid = self.agent(procs, relay_port, {"target": target}, tls=tls, env=env,
                               identity=ids.get("pi"), encryption=encryption)
        port, connect_pid = self.connect(procs, relay_port, "target", tls=tls, env=env,
                                         identity=ids.get("laptop"), encryption=encryption)
        name = "kakehashi relay " + ("TLS" if tls else "plaintext") + \
            (" + e2e" if e2e else "") + ("" if splice else " (no splice)") + \
            ("" if fast_path else " (fast path off)") + \
            (f", --encryption {encryption}" if encryption else "") + \
            (f", {' '.join(serve_extra)}" if serve_extra else "") + \
            ("" if early else " (early data off)")
        return Route(name, port, [relay_pid, agent_pid, connect_pid])

"""A private OpenSSH server on loopback for end-to-end tests (keys made per test)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.framework import Env, Proc

SSHD = "/usr/sbin/sshd"


def available() -> tuple[bool, str]:
    if not Path(SSHD).exists() or not shutil.which("ssh"):
        return False, "OpenSSH server/client not installed (run scripts/install-deps.sh)"
    return True, ""


@dataclass
class SSHServer:
    port: int
    proc: Proc
    user_key: Path
    known_hosts: Path

    def ssh_args(self, *extra: str) -> list[str]:
        return ["ssh", "-F", "/dev/null", "-i", str(self.user_key), "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "ConnectTimeout=20", *extra]


def start_sshd(env: Env) -> SSHServer:
    d = env.root / "ssh"
    d.mkdir()
    Path("/run/sshd").mkdir(exist_ok=True)
    host_key, user_key = d / "host_ed25519", d / "user_ed25519"
    for key in (host_key, user_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True)
    (d / "authorized_keys").write_text((d / "user_ed25519.pub").read_text())
    pub = (d / "host_ed25519.pub").read_text().split()
    # the host key is pinned for the alias "pi" and for 127.0.0.1 so ssh checks it
    known = d / "known_hosts"
    known.write_text(f"pi {pub[0]} {pub[1]}\n[127.0.0.1]:* {pub[0]} {pub[1]}\n")
    cfg = d / "sshd_config"

    def argv(port: int) -> list[str]:
        cfg.write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            "StrictModes no\nPermitRootLogin prohibit-password\nLogLevel VERBOSE\n"
            "Subsystem sftp internal-sftp\n"
        )
        return [SSHD, "-D", "-e", "-f", str(cfg)]

    # its own log line says it listens (a port probe could reach someone else's server)
    proc, port = env.spawn_on_port("sshd", argv, "Server listening on 127.0.0.1")
    return SSHServer(port, proc, user_key, known)

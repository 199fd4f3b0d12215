"""Where kakehashi keeps its state (development CA, keys, default database).

One place decides this so every system agrees: ``KAKEHASHI_HOME`` wins, then
``$XDG_DATA_HOME/kakehashi``, then ``~/.local/share/kakehashi``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def state_dir(create: bool = True) -> Path:
    """Return the state directory, creating it (mode 0700) on first use."""
    env = os.environ.get("KAKEHASHI_HOME")
    if env:
        path = Path(env)
    else:
        base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        path = Path(base) / "kakehashi"
    if create:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def write_atomic(path: Path, data: bytes, mode: int = 0o600, *, exclusive: bool = False) -> bool:
    """Write ``data`` so readers see either no file, the old one or the whole new one.

    The temporary file is created 0600 by ``mkstemp`` and only then widened to
    ``mode``, so private keys are never readable by others, not even briefly. With
    ``exclusive`` an existing file is never replaced (False is returned): linking the
    finished file into place makes "create if missing" race-free between processes.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        if not exclusive:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links
            if path.exists():
                return False
            os.replace(tmp, path)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)

"""Where kakehashi keeps its state (development CA, keys, default database).

One place decides this so every system agrees: ``KAKEHASHI_HOME`` wins, then
``$XDG_DATA_HOME/kakehashi``, then ``~/.local/share/kakehashi``.
"""

from __future__ import annotations

import os
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

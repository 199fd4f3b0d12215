"""The web catalog (filled in below)."""

from __future__ import annotations

from typing import Any


def add_pages(app: Any, srv: Any) -> None:
    return None

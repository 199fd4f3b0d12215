"""The three ways :class:`kakehashi.core.crypto.DatagramChannel` seals and opens a batch,
for tests that must hold every one of them to the same bytes and decisions: ``native``
(the C extension, :data:`crypto.NATIVE`), ``strided`` (the Python burst form,
:data:`crypto.STRIDED`) and ``loop`` (the Python loop, the reference for both)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from kakehashi.core import crypto

PATH_NAMES = ["native", "strided", "loop"]
#: parametrize a test over the three paths (``path`` argument)
PATHS = pytest.mark.parametrize("path", PATH_NAMES)


@contextlib.contextmanager
def batch_path(path: str) -> Iterator[None]:
    """Switch the batch path for the block (a context manager, not a fixture, so
    hypothesis tests can take it too); ``native`` skips where the extension is not built
    (tests/unit/test_native_aead.py fails instead where it should have been)."""
    if path == "native" and crypto._dgaead is None:
        pytest.skip("kakehashi.core._dgaead is not built")
    before = crypto.NATIVE, crypto.STRIDED
    crypto.NATIVE, crypto.STRIDED = path == "native", path != "loop"
    try:
        yield
    finally:
        crypto.NATIVE, crypto.STRIDED = before


def use_path(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """:func:`batch_path` for the rest of a test, through ``monkeypatch``."""
    if path == "native" and crypto._dgaead is None:
        pytest.skip("kakehashi.core._dgaead is not built")
    monkeypatch.setattr(crypto, "NATIVE", path == "native")
    monkeypatch.setattr(crypto, "STRIDED", path != "loop")

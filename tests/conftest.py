"""Fixtures shared by every test directory."""

from __future__ import annotations

import pytest

from tests.e2e.framework import EchoServer, Env


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A private kakehashi home and a process group that is cleaned up after the test."""
    monkeypatch.setenv("KAKEHASHI_HOME", str(tmp_path / "home"))
    e = Env(tmp_path)
    try:
        yield e
    finally:
        e.close()


@pytest.fixture
def echo():
    srv = EchoServer()
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def echo_mod():
    """One echo server for all the tests of a module (a module-scoped deployment's target)."""
    srv = EchoServer()
    try:
        yield srv
    finally:
        srv.close()

"""Fixtures shared by every test directory."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

from tests.e2e.framework import EchoServer, Env
from tests.support.redis import REDIS_SERVER, RedisSentinelSet, RedisServer


def pytest_configure(config: pytest.Config) -> None:
    _cache_child_bytecode()


def _cache_child_bytecode() -> None:
    """Let the ``kakehashi`` processes the tests start cache their bytecode.

    The suite starts thousands of them. Where the environment sets
    ``PYTHONDONTWRITEBYTECODE`` (to keep ``__pycache__`` out of the checkout), every one
    of them compiled every kakehashi module from source again: about half of its
    start-up. The children get a private ``PYTHONPYCACHEPREFIX`` for this session
    instead (outside the checkout, removed at the end), so each module is compiled
    once per run. This process keeps its own setting.
    """
    if not os.environ.get("PYTHONDONTWRITEBYTECODE") or os.environ.get("PYTHONPYCACHEPREFIX"):
        return
    prefix = tempfile.mkdtemp(prefix="kakehashi-test-pycache-")
    atexit.register(shutil.rmtree, prefix, ignore_errors=True)
    os.environ["PYTHONPYCACHEPREFIX"] = prefix
    del os.environ["PYTHONDONTWRITEBYTECODE"]


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


@pytest.fixture
def redis_server(tmp_path_factory):
    """A private ``redis-server`` on loopback (no persistence), stopped after the test;
    ``.url``, ``.port``, ``.restart()``, ``.stop(kill=True)`` (see tests/support/redis.py)."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def redis_url(redis_server):
    """``redis://127.0.0.1:PORT`` of a private, empty ``redis-server`` for this test."""
    return redis_server.url


@pytest.fixture
def redis_sentinel(tmp_path_factory):
    """A master, its replica and a sentinel on loopback (tests/support/redis.py):
    ``.url`` is ``redis+sentinel://127.0.0.1:PORT/kk``; ``.kill_master()``,
    ``.wait_failover()`` make a real failover."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    rs = RedisSentinelSet(tmp_path_factory.mktemp("sentinel"))
    try:
        yield rs
    finally:
        rs.close()

"""The shared API body guard: size and time limits on request bodies (core/web.py)."""

from __future__ import annotations

import asyncio

import pytest

from kakehashi.core.web import ApiError, _BodyLimit


async def _endpoint(scope, receive, send) -> None:
    """An app that reads the whole body, then waits for the disconnect (as a long poll)."""
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    assert (await receive())["type"] == "http.disconnect"
    await send({"type": "http.response.body", "body": b"done"})


def _scope() -> dict:
    return {"type": "http", "headers": [(b"content-length", b"10")]}


async def test_a_body_that_stops_arriving_gets_a_408():
    async def receive() -> dict:
        if receive.calls == 0:
            receive.calls += 1
            return {"type": "http.request", "body": b"hello", "more_body": True}
        await asyncio.Event().wait()  # the client never sends the rest
        raise AssertionError("unreachable")

    receive.calls = 0
    guard = _BodyLimit(_endpoint, limit=1024, timeout=0.2)
    with pytest.raises(ApiError) as err:
        await asyncio.wait_for(guard(_scope(), receive, _collect()), 5)
    assert err.value.status == 408


async def test_no_deadline_once_the_body_is_complete():
    sent: list[dict] = []
    disconnect = asyncio.Event()

    async def receive() -> dict:
        if receive.calls == 0:
            receive.calls += 1
            return {"type": "http.request", "body": b"0123456789", "more_body": False}
        await disconnect.wait()  # a long poll held well past the body timeout
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.start":
            asyncio.get_running_loop().call_later(0.5, disconnect.set)

    receive.calls = 0
    guard = _BodyLimit(_endpoint, limit=1024, timeout=0.1)
    await asyncio.wait_for(guard(_scope(), receive, send), 5)
    assert sent[-1] == {"type": "http.response.body", "body": b"done"}


async def test_a_body_over_the_limit_gets_a_413():
    async def receive() -> dict:
        return {"type": "http.request", "body": b"x" * 2048, "more_body": True}

    guard = _BodyLimit(_endpoint, limit=1024, timeout=1)
    with pytest.raises(ApiError) as err:
        await guard({"type": "http", "headers": []}, receive, _collect())
    assert err.value.status == 413


def _collect():
    async def send(message: dict) -> None:
        pass
    return send

"""SIGTERM drains within a bound: queued requests get 503 + Retry-After, running ones get the grace."""

from __future__ import annotations

import asyncio

from tests.scripted import Call, Reply
from tests.unit.conftest import ScriptedFactory

CHAT = {"model": "local", "messages": [{"role": "user", "content": "hi"}]}


def sleeping(seconds: float) -> object:
    async def handler(call: Call) -> Reply:
        await asyncio.sleep(seconds)
        return Reply.json("done")

    return handler


async def test_drain_answers_queued_requests_and_lets_running_ones_finish(scripted: ScriptedFactory) -> None:
    gw = await scripted(local=sleeping(0.3))  # type: ignore[arg-type]
    running = asyncio.create_task(gw.chat(CHAT))
    await asyncio.sleep(0.05)
    queued = asyncio.create_task(gw.chat(CHAT))
    await asyncio.sleep(0.05)
    await gw.runtime.drain(grace=5)
    done, waiting = await running, await queued
    assert done.status == 200 and (await done.json())["choices"][0]["message"]["content"] == "done"
    assert waiting.status == 503 and waiting.headers["Retry-After"] == "5"
    assert "shutting down" in (await waiting.json())["error"]["message"]
    late = await gw.chat(CHAT)
    assert late.status == 503


async def test_drain_cancels_what_outlasts_the_grace(scripted: ScriptedFactory) -> None:
    gw = await scripted(local=sleeping(30))  # type: ignore[arg-type]
    running = asyncio.create_task(gw.chat(CHAT))
    await asyncio.sleep(0.05)
    await asyncio.wait_for(gw.runtime.drain(grace=0.2), timeout=3)
    assert not gw.runtime.in_flight
    running.cancel()

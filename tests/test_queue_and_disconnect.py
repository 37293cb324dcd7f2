"""One local slot: priority queue, spill-over, and a client that leaves frees the slot at once."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

from gateway.embedded import LlamaServer
from gateway.slots import SlotQueue
from tests.conftest import GatewayFactory, chat_body

TITLE_SYSTEM = "You are a title generator. You output ONLY a thread title. Nothing else."


def slot_busy(llama: LlamaServer) -> bool:
    with urllib.request.urlopen(f"{llama.url}/slots", timeout=2) as r:
        return any(s.get("is_processing") for s in json.load(r))


async def test_interactive_turns_go_ahead_of_background_tasks() -> None:
    q = SlotQueue(1)
    order: list[str] = []
    assert await q.acquire(0, 1)

    async def wait(name: str, prio: int) -> None:
        async with q.slot(prio, 5) as (got, _):
            assert got
            order.append(name)
            await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(wait("title", 1)), asyncio.create_task(wait("tags", 1))]
    await asyncio.sleep(0.01)
    tasks.append(asyncio.create_task(wait("main", 0)))
    await asyncio.sleep(0.01)
    assert q.waiting == 3
    q.release()
    await asyncio.gather(*tasks)
    assert order == ["main", "title", "tags"]
    assert q.busy == 0


async def test_waiter_that_times_out_leaves_no_trace() -> None:
    q = SlotQueue(1)
    assert await q.acquire(0, 1)
    assert not await q.acquire(1, 0.05)
    assert q.waiting == 0
    q.release()
    assert q.busy == 0 and await q.acquire(0, 0.05)


async def test_title_while_local_busy_is_queued_then_spilled(llama: LlamaServer, make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(llama.url)
    # This is about the queue: with the default `hot_for` the title would not wait at all — the turn holds
    # the slot for its conversation from the moment it is sent, and the title goes to hosted at once.
    gw.runtime.backends["local"].cache.hot_for = 0  # type: ignore[attr-defined]
    long_turn = asyncio.create_task(gw.chat(chat_body("Write a long story about a ship.", max_tokens=400,
                                                      stream=True)))
    while gw.runtime.queues["local"].busy == 0:
        await asyncio.sleep(0.01)
    title = {"model": "auto", "max_tokens": 20, "messages": [
        {"role": "system", "content": TITLE_SYSTEM},
        {"role": "user", "content": "Generate a title for this conversation:\nhello"}]}
    resp = await gw.chat(title)
    assert resp.status == 200
    assert resp.headers["x-switchyard-role"] == "title"
    assert resp.headers["x-switchyard-backend"] == "hosted"
    assert "local queue wait > 1s: spilled" in resp.headers["x-switchyard-failover"]
    assert gw.last.queue_wait_ms >= 900  # it did wait its turn first
    main = await long_turn
    assert main.headers["x-switchyard-backend"] == "local"
    main.close()  # done with it: leaving frees the slot


async def test_client_disconnect_frees_the_local_slot(llama: LlamaServer, make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(llama.url)
    resp = await gw.chat(chat_body("Write a very long essay about rivers.", max_tokens=3000, stream=True))
    assert resp.status == 200
    await resp.content.readany()  # generation is under way
    assert slot_busy(llama)
    resp.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 5
    while slot_busy(llama) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not slot_busy(llama), "llama-server kept generating for a client that left"
    while gw.runtime.queues["local"].busy and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert gw.runtime.queues["local"].busy == 0
    ok = await gw.chat(chat_body("Say hi.", max_tokens=4))
    assert ok.status == 200 and ok.headers["x-switchyard-backend"] == "local"

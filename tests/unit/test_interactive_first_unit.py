"""The local slot serves the user first: look-ahead, pre-emption of background work, clamps."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.scripted import Call, Reply
from tests.unit.conftest import ScriptedFactory

TITLE = {"model": "auto", "max_tokens": 1000, "stream": False, "messages": [
    {"role": "user", "content": "### Task:\nGenerate a concise, 3-5 word title with an emoji summarizing the chat"}]}
TAGS = {"model": "auto", "stream": False, "messages": [
    {"role": "user", "content": "### Task:\nGenerate 1-3 broad tags categorizing the main themes"}]}


def turn(text: str = "hello") -> dict[str, Any]:
    return {"model": "auto", "stream": True, "messages": [{"role": "user", "content": text}]}


def slow_local(task_s: float, log: list[str], turn_s: float = 0.05) -> Any:
    """Background tasks take `task_s` on the slot, turns `turn_s`; the log says what ran when."""
    async def handler(call: Call) -> Reply:
        who = call.body["messages"][0]["content"][:12]
        log.append(f"start {who}")
        try:
            await asyncio.sleep(task_s if who.startswith("###") else turn_s)
        except asyncio.CancelledError:
            log.append(f"cancelled {who}")
            raise
        log.append(f"done {who}")
        return Reply.stream("ok") if call.stream else Reply.json("ok")

    return handler


async def test_the_turn_sent_just_after_the_title_gets_the_idle_slot_first(scripted: ScriptedFactory) -> None:
    log: list[str] = []
    gw = await scripted(local=slow_local(0.2, log, turn_s=0.2))
    title = asyncio.create_task(gw.chat(TITLE))
    await asyncio.sleep(0.05)  # opencode: 50 ms apart; Open WebUI: a moment apart
    started = time.monotonic()
    first = await gw.chat(turn())
    await first.read()
    assert first.headers["x-switchyard-backend"] == "local"
    assert log[0] == "start hello"  # the title never took the slot
    assert time.monotonic() - started < 1.0
    assert (await title).status == 200


async def test_a_running_title_gives_way_to_the_turn_and_is_answered_elsewhere(scripted: ScriptedFactory) -> None:
    log: list[str] = []
    gw = await scripted(local=slow_local(5.0, log))
    title = asyncio.create_task(gw.chat(TITLE))
    await asyncio.sleep(0.3)  # past the look-ahead: the title is running on local
    assert log == ["start ### Task:\nGe"]
    started = time.monotonic()
    resp = await gw.chat(turn())
    assert resp.headers["x-switchyard-backend"] == "local"
    assert time.monotonic() - started < 2.0  # not behind the whole title
    t = await title
    assert t.status == 200 and t.headers["x-switchyard-backend"] == "hosted"
    assert "local preempted" in t.headers["x-switchyard-failover"]
    assert "cancelled ### Task:\nGe" in log  # its upstream request was cancelled at once
    assert gw.runtime.queues["local"].preemptions == 1
    assert all(str(b.state) == "closed" for b in gw.runtime.breakers.values())


async def test_a_preempted_task_with_nowhere_else_to_go_runs_after_the_turn(scripted: ScriptedFactory) -> None:
    log: list[str] = []
    gw = await scripted(local=slow_local(0.25, log), policy={"rules": [{"route": ["local"]}]})
    title = asyncio.create_task(gw.chat(TITLE))
    await asyncio.sleep(0.2)
    await (await gw.chat(turn())).read()
    t = await title
    assert t.status == 200 and t.headers["x-switchyard-backend"] == "local"
    assert log.index("done hello") < log.index("done ### Task:\nGe")


async def test_interactive_work_is_never_preempted(scripted: ScriptedFactory) -> None:
    log: list[str] = []
    gw = await scripted(local=slow_local(0, log, turn_s=0.2))
    first = asyncio.create_task(gw.chat(turn("first")))
    await asyncio.sleep(0.1)
    second = await gw.chat(turn("second"))
    await second.read()
    assert not any(e.startswith("cancelled") for e in log)
    assert (await first).headers["x-switchyard-backend"] == "local"


async def test_a_rule_can_make_background_work_not_preemptible(scripted: ScriptedFactory) -> None:
    log: list[str] = []
    gw = await scripted(local=slow_local(0.25, log), policy={"rules": [
        {"match": {"role": "title"}, "route": ["local", "hosted"], "preemptible": False},
        {"route": ["local", "hosted"]}]})
    title = asyncio.create_task(gw.chat(TITLE))
    await asyncio.sleep(0.2)
    await (await gw.chat(turn())).read()
    assert (await title).headers["x-switchyard-backend"] == "local"
    assert not any(e.startswith("cancelled") for e in log)


async def test_the_clamp_applies_when_the_client_sends_no_max_tokens(scripted: ScriptedFactory) -> None:
    gw = await scripted(policy={"rules": [{"match": {"role": "tags"}, "route": ["local"], "max_tokens": 48},
                                          {"route": ["local"]}]})
    await gw.chat(TAGS)
    assert gw.runtime.backends["local"].calls[-1].body["max_tokens"] == 48  # type: ignore[attr-defined]

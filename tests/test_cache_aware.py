"""Issue 11 against the real llama-server: keep each conversation's prefix warm on local.

Measured by llama.cpp itself: `timings.cache_n` of each answer (recorded as `cached_tokens`).
The shapes are Open WebUI's: a chat's turns (streamed, no max_tokens) with its title task between
two turns (`X-OpenWebUI-Task: title_generation`, the same chat id).
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp

from gateway.embedded import Artifacts, LlamaServer
from tests.conftest import Gateway, GatewayFactory, config_for, wait_healthy
from tests.fake_hosted import FakeHosted
from tests.test_resilience import until

CHAT = "chat-cache-1"
SYSTEM = ("You are a helpful assistant for a small team of engineers. " * 12).strip()
QUESTION = "Tell me about the history of the river and its towns, the bridges and the mills. " * 6


def turn(history: list[dict[str, str]]) -> dict[str, Any]:
    return {"model": "auto", "stream": True, "messages": history}


TITLE = {"model": "auto", "stream": False, "max_tokens": 16, "messages": [
    {"role": "user", "content": "### Task:\nGenerate a concise, 3-5 word title with an emoji summarizing the chat "
                                "history.\n### Chat History:\n<chat_history>\nUSER: the river\n</chat_history>"}]}


def owui(task: str = "") -> dict[str, str]:
    return {"X-OpenWebUI-Chat-Id": CHAT, "X-OpenWebUI-Task": task}


async def conversation_with_a_title_between(gw: Gateway) -> list[Any]:
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    decisions = []
    for i in range(3):
        if i == 2:  # the title task lands between turn 2 and turn 3
            resp = await gw.chat(TITLE, owui("title_generation"))
            assert resp.status == 200
            await resp.read()
        body = turn(history) | {"max_tokens": 8}
        resp = await gw.chat(body, owui())
        assert resp.status == 200
        raw = await resp.read()
        decisions.append(gw.last)
        text = "".join(line for line in raw.decode().splitlines() if '"content"' in line)[:40] or "ok"
        history += [{"role": "assistant", "content": text}, {"role": "user", "content": f"And then? ({i})"}]
    return decisions


def server(artifacts: Artifacts, tmp_path: Path, *extra: str) -> LlamaServer:
    s = LlamaServer(artifacts, ctx=4096, extra_args=extra, log_path=tmp_path / "llama.log")
    s.spawn()
    wait_healthy(s)
    return s


async def test_a_title_between_turns_does_not_evict_the_conversation(llama_artifacts: Artifacts, tmp_path: Path,
                                                                     make_gateway: GatewayFactory) -> None:
    llama = server(llama_artifacts, tmp_path, "--cache-ram", "0")  # the seed's stable setting
    try:
        gw = await make_gateway(llama.url)
        decisions = await conversation_with_a_title_between(gw)
        assert all(d.backend == "local" for d in decisions)
        third = decisions[2]
        title = [d for d in gw.runtime.recorder.recent if d.role == "title"][-1]
        assert title.backend == "hosted" and "cached tokens warm" in title.reason
        assert third.cached_tokens is not None and third.prompt_tokens
        assert third.cached_tokens >= 0.9 * third.prompt_tokens, (third.cached_tokens, third.prompt_tokens)
        local = gw.runtime.backends["local"].report()
        assert local["cache_hit_ratio"] > 0.5
        metrics = await (await gw.client.get("/metrics")).text()
        assert "switchyard_cached_prompt_tokens_total" in metrics
        state = (await (await gw.client.get("/status.json")).json())["backends"]["local"]
        assert state["learned"]["prefill"] and state["learned"]["decode"] and state["cache_hit_ratio"] > 0.5
        assert third.predicted_ttft_ms is not None  # rates were learned from turns 1-2
    finally:
        llama.stop()


async def test_with_two_slots_the_title_gets_its_own_slot(llama_artifacts: Artifacts, tmp_path: Path,
                                                          make_gateway: GatewayFactory) -> None:
    llama = server(llama_artifacts, tmp_path, "--cache-ram", "0", "-np", "2")
    try:
        gw = await make_gateway(llama.url)
        local = gw.runtime.backends["local"]
        object.__setattr__(local.config, "context_limit", 2048)  # -np 2: each slot gets n_ctx/2
        await gw.runtime.refresh_all()  # reads total_slots from /props
        assert local.report()["slots"] == 2
        # No hosted for background work here: the title must run on local, on the other slot.
        gw.runtime.decider.live_unusable["hosted"] = "disabled for this test"
        decisions = await conversation_with_a_title_between(gw)
        title = [d for d in gw.runtime.recorder.recent if d.role == "title"][-1]
        assert title.backend == "local"
        third = decisions[2]
        assert third.cached_tokens is not None and third.cached_tokens >= 0.9 * third.prompt_tokens, (
            third.cached_tokens, third.prompt_tokens)
    finally:
        llama.stop()


async def test_two_chats_sharing_a_system_prompt_keep_a_slot_each(llama_artifacts: Artifacts, tmp_path: Path,
                                                                    make_gateway: GatewayFactory) -> None:
    """Two Open WebUI users, same system prompt, turns alternating on a two-slot server: each keeps its cache.
    (A prompt that shares only the system prompt with a hot chat must not be pinned to that chat's slot.)"""
    llama = server(llama_artifacts, tmp_path, "--cache-ram", "0", "-np", "2")
    try:
        gw = await make_gateway(llama.url)
        local = gw.runtime.backends["local"]
        object.__setattr__(local.config, "context_limit", 2048)  # -np 2: each slot gets n_ctx/2
        await gw.runtime.refresh_all()
        assert local.report()["slots"] == 2
        chats = {c: [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{c}: {QUESTION}"}]
                 for c in ("chat-a", "chat-b")}
        second: dict[str, Any] = {}
        for i in range(2):
            for chat, history in chats.items():
                resp = await gw.chat(turn(history) | {"max_tokens": 8}, {"X-OpenWebUI-Chat-Id": chat})
                assert resp.status == 200
                await resp.read()
                history += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": f"More ({i})"}]
                if i == 1:
                    second[chat] = gw.last
        for chat, d in second.items():
            assert d.cached_tokens is not None and d.cached_tokens >= 0.9 * d.prompt_tokens, (
                chat, d.cached_tokens, d.prompt_tokens)
    finally:
        llama.stop()


async def test_identical_prompts_sent_together_run_on_both_slots(llama_artifacts: Artifacts, tmp_path: Path,
                                                                  make_gateway: GatewayFactory,
                                                                  fake: FakeHosted) -> None:
    """The same prompt twice at once (a batch client, a retry): each runs on a slot of its own. Pinned
    by `id_slot` to the slot holding that prompt, the second had waited there for the first's answer
    while the other slot idled (llama-server's /slots says which are processing)."""
    llama = server(llama_artifacts, tmp_path, "--cache-ram", "0", "-np", "2")
    try:
        cfg, _ = config_for(llama.url, fake.url)
        cfg["backends"]["local"]["max_concurrency"] = 2  # the gateway lets both through to the server
        gw = await make_gateway(llama.url, backends=cfg["backends"])
        local = gw.runtime.backends["local"]
        object.__setattr__(local.config, "context_limit", 2048)  # -np 2: each slot gets n_ctx/2
        await gw.runtime.refresh_all()
        assert local.report()["slots"] == 2
        body = {"model": "local", "stream": True, "max_tokens": 128,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]}

        async def ask() -> None:
            resp = await gw.chat(body, {})
            assert resp.status == 200
            await resp.read()

        asks = [asyncio.create_task(ask()) for _ in range(2)]
        most = 0
        async with aiohttp.ClientSession() as s:
            while not all(t.done() for t in asks) and most < 2:
                async with s.get(f"{llama.url}/slots") as r:
                    most = max(most, sum(1 for slot in await r.json() if slot.get("is_processing")))
                await asyncio.sleep(0.01)
        await asyncio.gather(*asks)
        assert most == 2, "the two requests never ran at the same time"
    finally:
        llama.stop()


async def test_a_session_that_lived_through_a_crash_is_back_on_local_within_one_turn(
        own_llama: LlamaServer, make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(own_llama.url)
    history = [{"role": "user", "content": QUESTION}]
    headers = {"x-session-id": "ses_crash", "User-Agent": "opencode/1.18.33"}
    first = await gw.chat(turn(history) | {"max_tokens": 4}, headers)
    assert first.headers["x-switchyard-backend"] == "local"
    await first.read()
    own_llama.kill(signal.SIGSEGV)
    during = await gw.chat(turn(history) | {"max_tokens": 4}, headers)
    assert during.headers["x-switchyard-backend"] == "hosted"
    await during.read()
    own_llama.spawn()
    await asyncio.to_thread(wait_healthy, own_llama)
    await until(lambda: gw.runtime.breakers["local"].state != "open", timeout=5)
    after = await gw.chat(turn(history) | {"max_tokens": 4}, headers)
    assert after.headers["x-switchyard-backend"] == "local", after.headers.get("x-switchyard-route")

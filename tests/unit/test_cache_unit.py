"""The slot memory and the local prediction's parts, without a server (issue 11)."""

from __future__ import annotations

from typing import Any

from prometheus_client import generate_latest

from gateway.backends.base import FitQuery
from gateway.backends.llamacpp import LlamaCppBackend
from gateway.backends.prefix import SlotCache
from gateway.config import LlamaCppBackend as LlamaCppConfig
from gateway.metrics import Metrics
from gateway.record import Decision
from gateway.tokens import size_of


def body(*texts: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": t} for t in texts]}


def test_several_slots_pin_by_default_and_not_when_affinity_is_off() -> None:
    for pin, expected in ((True, True), (False, False)):
        cache = SlotCache(hot_for=300, pin=pin)
        cache.memory.slots = 2
        assert cache.plan(body("hello"), "s1").pin is expected
    one = SlotCache(hot_for=300)
    assert one.plan(body("hello"), "s1").pin is False  # one slot: nothing to choose


def test_config_slot_affinity_reaches_the_slot_cache() -> None:
    backend = LlamaCppBackend("local", LlamaCppConfig(kind="llamacpp", url="http://127.0.0.1:1", slot_affinity=False))
    assert backend.cache.pin is False


def test_a_router_model_that_must_load_first_adds_its_learned_load_time() -> None:
    backend = LlamaCppBackend("local/m", LlamaCppConfig(kind="llamacpp", url="http://127.0.0.1:1"))
    backend.speeds.observe_prefill(1000, 1.0)
    b = body("x" * 4000)
    q = FitQuery(b, size_of(b"x" * 4000, b), 0)
    loaded = backend.estimate(q, 0).seconds
    backend.model_state, backend.load_seconds = "unloaded", 6.0
    cold = backend.estimate(q, 0)
    assert loaded is not None and cold.seconds == loaded + 6.0 and cold.parts["load_s"] == 6.0


def test_prediction_error_is_measured_against_the_first_byte_including_the_queue() -> None:
    m = Metrics()
    # predicted 2 s of which 1.5 s queue; it waited 1.5 s and the first byte came at 2 s: a perfect prediction
    m.observe(Decision(id="r1", team="t", backend="local", outcome="ok", predicted_ttft_ms=2000,
                       queue_wait_ms=1500, first_byte_ms=2000))
    bucket = 'switchyard_ttft_prediction_error_ratio_bucket{backend="local",le="0.05"}'
    lines = generate_latest(m.registry).decode().splitlines()
    assert next(x for x in lines if x.startswith(bucket)).endswith(" 1.0")


def test_a_small_batch_on_a_cached_prefix_teaches_the_overhead_not_the_rate() -> None:
    from gateway.backends.speed import Speeds

    s = Speeds()
    s.observe_prefill(1000, 10.0)  # a cold prefill: 100 tok/s
    s.observe_prefill(60, 1.6)  # 60 new tokens after a long cached prefix: mostly fixed cost
    assert s.prefill_rate(1000) == 100.0
    assert s.overhead is not None and abs(s.overhead - 1.0) < 1e-9
    assert abs((s.prefill_seconds(60, 1200) or 0) - 1.6) < 1e-9  # the same turn, predicted
    assert Speeds.from_dict(s.as_dict()).overhead == s.overhead  # persisted


def test_the_prompt_tokens_come_from_this_servers_bytes_per_token() -> None:
    cache = SlotCache(hot_for=300)
    first = body("a" * 2000)
    assert cache.tokens_of(first) is None  # nothing learned: the caller falls back to its byte estimate
    cache.settled(cache.plan(first, "s"), {"prompt_tokens": 520}, {"cache_n": 0, "prompt_n": 520})
    fresh = body("c" * 4000)  # no held prompt continues into it: its bytes at the learned ratio
    assert abs((cache.tokens_of(fresh) or 0) - 1040) <= 15  # (JSON keys count as bytes too)
    turn2 = body("a" * 2000, "b" * 800)  # continues the held prompt: its known tokens + the new bytes
    predicted = cache.tokens_of(turn2)
    cache.settled(cache.plan(turn2, "s"), {"prompt_tokens": 760}, {"cache_n": 519, "prompt_n": 241})
    assert predicted is not None and abs(predicted - (520 + 800 * 520 / 2000)) <= 12
    assert cache.sizer.speeds.bytes_per_token is not None  # learned from the growth, persisted with the speeds


def test_tools_a_template_drops_add_no_tokens_and_ones_it_renders_do() -> None:
    tools = [{"type": "function", "function": {"name": "read", "description": "x" * 3000}}]
    for rendered, expected in ((0, 0), (900, 900)):
        cache = SlotCache(hot_for=300)
        plain = body("a" * 2000)
        cache.settled(cache.plan(plain, "s"), {"prompt_tokens": 500}, {"cache_n": 0, "prompt_n": 500})
        agent = {**body("d" * 2000), "tools": tools}
        cache.settled(cache.plan(agent, "t"), {"prompt_tokens": 500 + rendered}, {"cache_n": 0, "prompt_n": 500})
        other = {**body("e" * 2000), "tools": tools}
        assert abs((cache.tokens_of(other) or 0) - (500 + expected)) <= 15


async def test_what_is_ahead_of_a_turn_is_what_it_cannot_overtake() -> None:
    import asyncio

    from gateway.slots import BACKGROUND, INTERACTIVE, Lease, SlotQueue

    q = SlotQueue(1)
    assert q.ahead(INTERACTIVE) == (0, 0) and q.ahead(BACKGROUND) == (0, 0)  # idle
    task = Lease(BACKGROUND, preemptible=True)
    assert await q.acquire(task, 1)
    assert q.ahead(INTERACTIVE) == (0, 0)  # a preemptible task gives way at once
    assert q.ahead(BACKGROUND) == (1, 0)
    waiter = asyncio.create_task(q.acquire(Lease(BACKGROUND), 5))
    await asyncio.sleep(0)
    assert q.ahead(INTERACTIVE) == (0, 0) and q.ahead(BACKGROUND) == (2, 0)  # a turn overtakes waiting tasks
    q.release(task)
    await waiter
    assert q.ahead(INTERACTIVE) == (1, 0)  # a task that does not give way: one service time


def _answered(cache: SlotCache, b: dict[str, Any], session: str, tokens: int) -> int:
    plan = cache.plan(b, session)
    cache.settled(plan, {"prompt_tokens": tokens}, {"cache_n": plan.predicted_cached, "prompt_n": 1})
    return plan.slot


def test_two_chats_that_share_a_system_prompt_keep_a_slot_each() -> None:
    system = {"role": "system", "content": "You are a helpful assistant."}
    a = {"messages": [system, {"role": "user", "content": "a" * 4000}]}
    b = {"messages": [system, {"role": "user", "content": "b" * 4000}]}
    cache = SlotCache(hot_for=300)
    cache.memory.slots = 2
    slot_a = _answered(cache, a, "A", 1000)
    slot_b = _answered(cache, b, "B", 1000)  # shares only the system prompt with A: not A's slot
    assert slot_a != slot_b
    a2 = {"messages": [*a["messages"], {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]}
    plan = cache.plan(a2, "A")
    assert plan.slot == slot_a and plan.predicted_cached == 1000 and plan.lost == 0


def test_a_task_sharing_only_the_system_prompt_would_still_evict_a_hot_chat() -> None:
    system = {"role": "system", "content": "You are a helpful assistant."}
    cache = SlotCache(hot_for=300)
    _answered(cache, {"messages": [system, {"role": "user", "content": "a" * 4000}]}, "A", 1000)
    task = {"messages": [system, {"role": "user", "content": "Generate a title"}]}
    assert cache.evicts(task, "A") is not None
    assert SlotCache(hot_for=0).evicts(task, "A") is None  # nothing hot: nothing to keep


async def test_a_backend_at_its_own_rate_limit_is_predicted_later(tmp_path: Any) -> None:
    from aiolimiter import AsyncLimiter

    from gateway.router import Router
    from gateway.runtime import _pacing_view
    from tests.unit.conftest import scripted_backends, scripted_settings
    from tests.unit.test_decide_unit import chat, decide

    limiter = AsyncLimiter(1, 60)
    pacing = _pacing_view({"hosted": limiter})
    assert pacing("hosted") == 0.0 and pacing("local") == 0.0
    await limiter.acquire()  # the minute's one request is used
    assert pacing("hosted") == 60.0
    policy = {"rules": [{"route": ["local", "hosted"], "prefer": "fastest"}]}
    settings = scripted_settings(tmp_path, policy)
    backends = scripted_backends(settings)
    r = Router.build(settings, backends)
    backends["local"].predicted, backends["hosted"].predicted = 9.0, 1.5
    assert (await decide(r, chat())).steps[0].backend == "hosted"
    r.decider.pacing = pacing
    route = await decide(r, chat())
    assert route.steps[0].backend == "local" and route.estimates["hosted"].parts["pacing_s"] == 60.0


def test_requests_sent_before_either_answered_take_different_slots() -> None:
    cache = SlotCache(hot_for=300)
    cache.memory.slots = 2
    turn = body("a" * 4000)
    title = body("### Task: title " + "a" * 100)
    first = cache.plan(turn, "chat")
    cache.reserve(first)  # on its way, not answered yet
    second = cache.plan(title, "chat")
    assert second.slot != first.slot


async def test_on_a_server_with_free_slots_a_request_shares_its_compute() -> None:
    from gateway.slots import BACKGROUND, INTERACTIVE, Lease, SlotQueue

    q = SlotQueue(2)
    assert await q.acquire(Lease(INTERACTIVE), 1)
    assert q.ahead(BACKGROUND) == (0, 1)  # a free slot, but the running turn shares the server
    backend = LlamaCppBackend("local", LlamaCppConfig(kind="llamacpp", url="http://127.0.0.1:1"))
    backend.speeds.observe_prefill(1000, 1.0)
    b = body("x" * 4000)
    query = FitQuery(b, size_of(b"x" * 4000, b), 0)
    alone, beside = backend.estimate(query, 0).seconds, backend.estimate(query, 0, 1).seconds
    assert alone is not None and beside == 2 * alone


async def test_spill_early_moves_a_backend_predicted_to_queue_too_long_behind_the_others(tmp_path: Any) -> None:
    from gateway.backends.base import Estimate
    from gateway.router import Router
    from tests.unit.conftest import scripted_backends, scripted_settings
    from tests.unit.test_decide_unit import chat, decide

    policy = {"rules": [{"route": ["local", "hosted"], "spill_early": True, "max_queue_wait": 2}]}
    settings = scripted_settings(tmp_path, policy)
    backends = scripted_backends(settings)
    r = Router.build(settings, backends)
    for queue_s, first in ((1.0, "local"), (8.0, "hosted")):
        backends["local"].estimate = (  # type: ignore[method-assign]
            lambda q, queued, alongside=0, s=queue_s: Estimate(s + 1, {"queue_s": s}, s))
        route = await decide(r, chat())
        assert [s.backend for s in route.steps] == ([first, "local"] if first == "hosted" else ["local", "hosted"])
    assert "spilled early" in route.reason


def test_an_edited_last_turn_stays_on_its_conversations_slot() -> None:
    system = {"role": "system", "content": "You are a helpful assistant."}
    history = [system, {"role": "user", "content": "a" * 4000}, {"role": "assistant", "content": "b" * 400},
               {"role": "user", "content": "first wording"}]
    cache = SlotCache(hot_for=300)
    cache.memory.slots = 2
    slot = _answered(cache, {"messages": history}, "A", 1200)
    edited = cache.plan({"messages": [*history[:3], {"role": "user", "content": "second wording"}]}, "A")
    assert edited.slot == slot and edited.predicted_cached > 1000


def test_one_answer_slowed_by_a_burst_elsewhere_does_not_move_the_learned_figures() -> None:
    from gateway.backends.speed import Speeds

    s = Speeds()
    s.observe_prefill(1000, 4.0)  # 250 tok/s
    for _ in range(4):
        s.observe_prefill(65, 0.36)  # cached turns: ~0.1 s fixed part
    before = s.overhead
    s.observe_prefill(66, 1.84)  # one turn that shared the box with a test run
    assert before is not None and s.overhead == before
    for _ in range(4):  # but a box that stays slower is followed within a few answers
        s.observe_prefill(66, 1.84)
    assert s.overhead is not None and s.overhead > 1.0


def test_a_tasks_prompt_is_not_a_conversation_to_keep_warm() -> None:
    cache = SlotCache(hot_for=300)
    cache.memory.slots = 2
    chat_a = body("a" * 4000)
    plan = cache.plan(chat_a, "A")
    cache.settled(plan, {"prompt_tokens": 1000}, {"cache_n": 0, "prompt_n": 1000})
    title = body("### Task: title " + "t" * 4400)
    tplan = cache.plan(title, "A")
    assert tplan.slot != plan.slot
    cache.settled(tplan, {"prompt_tokens": 1100}, {"cache_n": 0, "prompt_n": 1100}, conversation=False)
    chat_b = cache.plan(body("b" * 4000), "B")  # every slot used recently, but only one holds a conversation
    assert chat_b.slot == tplan.slot and chat_b.lost == 0
    tags = body("### Task: tags")
    assert cache.plan(tags, "A").slot == tplan.slot and cache.evicts(tags, "A") is None  # chat A's slot is spared


def test_two_tasks_sent_together_share_the_task_slot_not_the_conversations() -> None:
    cache = SlotCache(hot_for=300)
    cache.memory.slots = 2
    chat = body("a" * 4000)
    cache.settled(cache.plan(chat, "A"), {"prompt_tokens": 1000}, {"cache_n": 0, "prompt_n": 1000})
    tags = cache.plan(body("### Task: tags " + "a" * 4400), "A")
    cache.occupy(tags, conversation=False)  # sent to the free slot, still answering
    follow_ups = cache.plan(body("### Task: follow-ups " + "a" * 4400), "A")
    # it waits for the tags (a busy slot) rather than throw away chat A's prefix
    assert follow_ups.slot == tags.slot and cache.evicts(body("### Task: follow-ups"), "A") is None


def test_identical_prompts_sent_together_take_an_idle_slot_not_the_busy_one() -> None:
    """With `id_slot`, llama.cpp queues a request behind the answer its slot is still giving: the same
    prompt sent twice at once (a batch client, a retry) went to one slot while another stayed idle."""
    cache = SlotCache(hot_for=300)
    cache.memory.slots = 3
    prompt = body("the same question " * 50)
    first = cache.plan(prompt, None)
    ended = cache.occupy(first)
    second = cache.plan(prompt, None)
    assert second.slot != first.slot
    ended()
    ended()  # idempotent: a stream's close after an error's clean-up
    assert cache.memory.busy == {}
    assert cache.plan(prompt, None).slot == first.slot  # idle again, and it holds the prompt


def test_a_crash_forgets_the_slots_in_use_and_a_late_end_never_counts_below_zero() -> None:
    cache = SlotCache(hot_for=300)
    cache.memory.slots = 2
    ended = cache.occupy(cache.plan(body("x" * 400), None))
    cache.memory.forget()
    ended()
    assert cache.memory.busy == {}
    cache.occupy(cache.plan(body("y" * 400), None))
    assert sum(cache.memory.busy.values()) == 1

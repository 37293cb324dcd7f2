"""dispatch + relay through scripted backends: failover, spill, trials, pass-through, stream ends."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from gateway import failures
from gateway.breaker import State
from tests.scripted import Call, Reply, failing, replying
from tests.unit.conftest import ScriptedFactory

K = failures.Kind


def chat(stream: bool = False, **kw: Any) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": stream, **kw}


async def sse_events(resp: Any) -> list[Any]:
    text = await resp.text()
    out: list[Any] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def test_crash_before_first_byte_fails_over_and_opens_the_breaker(scripted: ScriptedFactory) -> None:
    gw = await scripted(local=failing(K.CRASH))
    resp = await gw.chat(chat())
    assert resp.status == 200 and resp.headers["x-switchyard-backend"] == "hosted"
    assert resp.headers["x-switchyard-failover"] == "local crash -> hosted"
    assert gw.runtime.breakers["local"].state is State.OPEN
    assert gw.runtime.backends["local"].learned == [("crash", gw.last.tokens_in)]  # type: ignore[attr-defined]
    assert [e.kind for e in gw.last.failover] == ["crash"]
    assert gw.last.as_dict()["failover"] == ["local crash"]


async def test_client_error_passes_through_once_and_counts_against_nobody(scripted: ScriptedFactory) -> None:
    body = b'{"error":{"message":"bad field","type":"invalid_request_error","code":400}}'
    gw = await scripted(local=failing(K.CLIENT_ERROR, status=400, body=body))
    resp = await gw.chat(chat())
    assert resp.status == 400 and (await resp.json())["error"]["message"] == "bad field"
    assert gw.runtime.breakers["local"].state is State.CLOSED
    assert gw.runtime.backends["hosted"].calls == []  # type: ignore[attr-defined]


async def test_client_error_during_a_half_open_trial_releases_the_trial(scripted: ScriptedFactory) -> None:
    gw = await scripted(local=failing(K.CLIENT_ERROR, status=400))
    b = gw.runtime.breakers["local"]
    b.record_failure("crash", now=0)
    b.probe_result(True, "ready", now=100)
    await gw.chat(chat())
    assert b.state is State.HALF_OPEN and b.allows()


async def test_a_successful_trial_closes_the_circuit(scripted: ScriptedFactory) -> None:
    gw = await scripted()
    b = gw.runtime.breakers["local"]
    b.record_failure("crash", now=0)
    b.probe_result(True, "ready", now=100)
    resp = await gw.chat(chat())
    assert resp.headers["x-switchyard-backend"] == "local" and b.state is State.CLOSED


async def test_overflow_everywhere_is_context_length_exceeded_and_opens_nothing(scripted: ScriptedFactory) -> None:
    gw = await scripted(local=failing(K.CONTEXT_OVERFLOW), hosted=failing(K.CONTEXT_OVERFLOW, "hosted"))
    resp = await gw.chat(chat())
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "context_length_exceeded"
    assert all(b.state is State.CLOSED for b in gw.runtime.breakers.values())


async def test_every_backend_down_is_503_with_retry_after(scripted: ScriptedFactory) -> None:
    gw = await scripted(local=failing(K.CRASH), hosted=failing(K.UNAVAILABLE, "hosted"))
    resp = await gw.chat(chat())
    assert resp.status == 503 and resp.headers["Retry-After"]
    assert (await resp.json())["error"]["code"] == "no_backend_available"


async def test_rate_limited_everywhere_is_our_429_with_the_upstreams_wait(scripted: ScriptedFactory) -> None:
    gw = await scripted(local=failing(K.CRASH), hosted=failing(K.RATE_LIMITED, "hosted", retry_after=60.0))
    resp = await gw.chat(chat())
    assert resp.status == 429 and resp.headers["Retry-After"] == "60"


async def test_429_is_waited_out_on_the_same_backend(scripted: ScriptedFactory) -> None:
    limited = failures.UpstreamFailure(K.RATE_LIMITED, "hosted", "slow down", retry_after=0.01)
    gw = await scripted(hosted=replying(limited, Reply.stream("ok")))
    resp = await gw.chat(chat(model="hosted"))
    assert resp.status == 200 and gw.last.retries == 1
    assert len(gw.runtime.backends["hosted"].calls) == 2  # type: ignore[attr-defined]


async def test_busy_slot_spills_a_background_task_after_its_wait(scripted: ScriptedFactory) -> None:
    gate = asyncio.Event()

    async def slow(call: Call) -> Reply:
        await gate.wait()
        return Reply.stream("done")

    gw = await scripted(local=slow, policy={"rules": [
        {"name": "background", "match": {"role": "title"}, "route": ["local", "hosted"], "max_queue_wait": 0.1},
        {"route": ["local", "hosted"]}]})
    first = asyncio.create_task(gw.chat(chat(stream=True)))
    await asyncio.sleep(0.05)
    title = {"model": "auto", "messages": [{"role": "system", "content": "You are a title generator."},
                                           {"role": "user", "content": "Generate a title"}]}
    resp = await gw.chat(title)
    assert resp.headers["x-switchyard-backend"] == "hosted"
    assert "local queue wait > 0.1s: spilled" in resp.headers["x-switchyard-failover"]
    assert [e.metric_kind for e in gw.last.failover] == ["spillover"]
    gate.set()
    assert (await first).status == 200


async def test_open_circuit_met_on_the_way_is_recorded(scripted: ScriptedFactory) -> None:
    gw = await scripted()
    route_then_open = gw.runtime.decider.decide

    async def decide(*a: Any) -> Any:
        route = await route_then_open(*a)
        gw.runtime.breakers["local"].record_failure("crash")  # opens between decide and dispatch
        return route

    gw.runtime.router.decider.decide = decide  # type: ignore[method-assign]
    resp = await gw.chat(chat())
    assert resp.headers["x-switchyard-backend"] == "hosted"
    assert [e.metric_kind for e in gw.last.failover] == ["circuit_open"]


async def test_stream_relayed_chunk_by_chunk_with_a_usage_chunk_injected(scripted: ScriptedFactory) -> None:
    gw = await scripted(local=replying(Reply.stream("Hel", "lo")))
    resp = await gw.chat(chat(stream=True, stream_options={"include_usage": True}))
    events = await sse_events(resp)
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] == 2
    assert "".join(e["choices"][0]["delta"]["content"] for e in events[:2]) == "Hello"


async def test_upstream_usage_is_kept_and_recorded(scripted: ScriptedFactory) -> None:
    usage = {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}
    gw = await scripted(local=replying(Reply.stream("a", "b", usage=usage)))
    events = await sse_events(await gw.chat(chat(stream=True, stream_options={"include_usage": True})))
    assert sum(1 for e in events if isinstance(e, dict) and e.get("usage")) == 1
    assert gw.last.prompt_tokens == 11 and gw.last.tokens_out == 2


async def test_mid_stream_break_ends_with_an_error_event_and_done(scripted: ScriptedFactory) -> None:
    broken = Reply.stream("par", "tial", done=False,
                          fail_after=failures.UpstreamFailure(K.CRASH, "local", "connection reset"))
    gw = await scripted(local=replying(broken))
    events = await sse_events(await gw.chat(chat(stream=True)))
    assert events[-1] == "[DONE]" and "error" in events[-2]
    assert gw.last.outcome == "broken_stream" and gw.runtime.breakers["local"].state is State.OPEN


async def test_stream_without_done_is_a_broken_stream(scripted: ScriptedFactory) -> None:
    gw = await scripted(local=replying(Reply.stream("a", done=False)))
    events = await sse_events(await gw.chat(chat(stream=True)))
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "upstream_stream_broken"
    assert gw.last.outcome == "broken_stream"


async def test_json_answer_relayed_with_its_usage(scripted: ScriptedFactory) -> None:
    gw = await scripted(local=replying(Reply.json("hey", usage={"prompt_tokens": 3, "completion_tokens": 1})))
    resp = await gw.chat(chat())
    assert (await resp.json())["choices"][0]["message"]["content"] == "hey"
    assert gw.last.tokens_out == 1 and gw.last.outcome == "ok"


async def test_rule_clamps_max_tokens_upstream(scripted: ScriptedFactory) -> None:
    gw = await scripted(policy={"rules": [{"route": ["local"], "max_tokens": 4}]})
    await gw.chat(chat(max_tokens=100))
    call = gw.runtime.backends["local"].calls[-1]  # type: ignore[attr-defined]
    assert call.body["max_tokens"] == 4 and call.raw is None


async def test_unchanged_body_goes_up_as_the_clients_bytes(scripted: ScriptedFactory) -> None:
    gw = await scripted()
    body = chat()
    await gw.chat(body)
    call = gw.runtime.backends["local"].calls[-1]  # type: ignore[attr-defined]
    assert call.raw == json.dumps(body).encode()


async def test_session_header_is_forwarded(scripted: ScriptedFactory) -> None:
    gw = await scripted()
    await gw.chat(chat(model="hosted"), {"x-session-id": "ses_abc"})
    assert gw.runtime.backends["hosted"].calls[-1].headers == {"x-session-id": "ses_abc"}  # type: ignore[attr-defined]


async def test_billed_backend_records_cost_and_free_one_none(scripted: ScriptedFactory) -> None:
    usage = {"prompt_tokens": 1000, "completion_tokens": 100}
    gw = await scripted(local=replying(Reply.json(usage=usage)), hosted=replying(Reply.json(usage=usage)))
    await gw.chat(chat(model="local"))
    assert gw.last.cost == 0
    await gw.chat(chat(model="hosted"))
    assert gw.last.cost > 0


async def test_a_stream_without_include_usage_asks_upstream_and_hides_the_usage_chunk(
        scripted: ScriptedFactory) -> None:
    # Open WebUI never sends stream_options: its turns used to reach the ledger with 0 tokens.
    usage = {"prompt_tokens": 21, "completion_tokens": 2, "total_tokens": 23}
    gw = await scripted(local=replying(Reply.stream("a", "b", usage=usage)))
    events = await sse_events(await gw.chat(chat(stream=True)))
    assert gw.runtime.backends["local"].calls[-1].body["stream_options"] == {"include_usage": True}  # type: ignore[attr-defined]
    assert not any(isinstance(e, dict) and "usage" in e for e in events) and events[-1] == "[DONE]"
    assert gw.last.prompt_tokens == 21 and gw.last.tokens_out == 2


async def test_a_stream_whose_upstream_sends_no_usage_is_still_counted(scripted: ScriptedFactory) -> None:
    gw = await scripted(local=replying(Reply.stream("a", "b", "c")))
    events = await sse_events(await gw.chat(chat(stream=True)))
    assert not any(isinstance(e, dict) and "usage" in e for e in events)
    assert gw.last.tokens_out == 3


async def test_every_answer_names_its_ledger_row(scripted: ScriptedFactory) -> None:
    gw = await scripted()
    resp = await gw.chat(chat())
    assert resp.headers["x-switchyard-request-id"] == gw.last.id


async def test_background_work_reaches_its_backend_marked_as_a_task(scripted: ScriptedFactory) -> None:
    from gateway.backends.base import TASK

    gw = await scripted()
    title = {"model": "auto", "stream": False, "messages": [
        {"role": "user", "content": "### Task:\nGenerate a concise, 3-5 word title with an emoji summarizing"}]}
    await gw.chat(title)
    await gw.chat(chat())
    task_call, turn_call = gw.runtime.backends["local"].calls[-2:]  # type: ignore[attr-defined]
    assert task_call.headers.get(TASK) == "1" and TASK not in turn_call.headers

"""The hosted backend at relay cost: litellm builds the request, Switchyard sends it and relays.

Against the fake provider (tests/fake_hosted.py) in both wire modes: an OpenAI chat-completions
provider (`openai/gpt-5-nano`: bytes relayed unchanged) and a Responses-only model
(`openai/responses/gpt-5-nano`: each event translated). The request we send must be the one
litellm itself would send, and the translation must agree with litellm's own.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from gateway import failures
from gateway.backends.hosted import HostedBackend, classify_litellm, load_litellm
from gateway.backends.responses_sse import ResponsesToChat
from gateway.config import LiteLLMBackend
from tests.conftest import GatewayFactory
from tests.fake_hosted import FakeHosted, Reply

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ["TEST_HOSTED_KEY"] = "sk-test-hosted-key-never-logged"

CHAT = "openai/gpt-5-nano"
RESPONSES = "openai/responses/gpt-5-nano"
BOTH = pytest.mark.parametrize("model", [CHAT, RESPONSES])
TOOLS = [{"type": "function", "function": {"name": "read", "description": "Read a file",
                                           "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                                                          "required": ["path"]}}}]


def backend(fake: FakeHosted, model: str, **timeouts: float) -> HostedBackend:
    t = {"connect": 2, "first_byte": 5, "idle": 5, "total": 30, **timeouts}
    return HostedBackend("hosted", LiteLLMBackend(kind="litellm", model=model, api_base=fake.url,
                                                  api_key_env="TEST_HOSTED_KEY", session_header="x-opencode-session",
                                                  timeouts=t))


def body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Hello, what is the capital of France?"}],
            "max_tokens": 64, **extra}


async def drain(up: Any) -> bytes:
    out = up.first
    try:
        async for chunk in up.rest:
            out += chunk
    finally:
        await up.close()
    return out


def events(sse: bytes) -> list[Any]:
    out = []
    for block in sse.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def eventually(cond: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not cond():
        await asyncio.sleep(0.02)
    return cond()


# ---- both modes ---------------------------------------------------------------------------------

@BOTH
async def test_stream_text_usage_and_session_header(fake: FakeHosted, model: str) -> None:
    b = backend(fake, model)
    up = await b.open(body(model, stream_options={"include_usage": True}), {"x-session-id": "ses_42"}, True)
    evs = events(await drain(up))
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in evs[:-1] if e["choices"])
    assert text == "hosted says: Hello, what is the c"
    assert evs[-1] == "[DONE]"
    usage = [e["usage"] for e in evs[:-1] if e.get("usage")]
    assert usage and usage[0]["prompt_tokens"] > 0 and usage[0]["completion_tokens"] > 0
    assert [e["choices"][0]["finish_reason"] for e in evs[:-1] if e["choices"]][-1] == "stop"
    sent = fake.requests[-1]
    assert sent.path == ("/v1/responses" if model == RESPONSES else "/v1/chat/completions")
    assert sent.headers["x-opencode-session"] == "ses_42"
    assert sent.headers["authorization"] == "Bearer sk-test-hosted-key-never-logged"
    await b.close()


@BOTH
async def test_non_stream_is_a_chat_completion_with_usage(fake: FakeHosted, model: str) -> None:
    b = backend(fake, model)
    up = await b.open(body(model), {}, False)
    data = json.loads(up.first)
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"]["content"] == "hosted says: Hello, what is the c"
    assert data["usage"]["total_tokens"] > 0
    await b.close()


@BOTH
@pytest.mark.parametrize("stream", [True, False])
async def test_429_before_the_first_byte_carries_retry_after(fake: FakeHosted, model: str, stream: bool) -> None:
    b = backend(fake, model)
    fake.script(Reply.rate_limited(retry_after_ms=1500))
    with pytest.raises(failures.UpstreamFailure) as info:
        await b.open(body(model), {}, stream)
    assert info.value.kind is failures.Kind.RATE_LIMITED and info.value.retry_after == 1.5
    assert len(fake.requests) == 1  # no retry of our own: retry.py decides
    await b.close()


@BOTH
async def test_context_overflow_is_classified(fake: FakeHosted, model: str) -> None:
    b = backend(fake, model)
    fake.script(Reply.context_length_exceeded())
    with pytest.raises(failures.UpstreamFailure) as info:
        await b.open(body(model), {}, True)
    assert info.value.kind is failures.Kind.CONTEXT_OVERFLOW and info.value.status == 400
    await b.close()


@BOTH
async def test_broken_stream_raises_after_the_first_chunk(fake: FakeHosted, model: str) -> None:
    b = backend(fake, model)
    fake.script(Reply.broken_stream(after_chunks=2))
    up = await b.open(body(model), {}, True)
    with pytest.raises(failures.UpstreamFailure) as info:
        await drain(up)
    assert info.value.kind is failures.Kind.CRASH
    await b.close()


@BOTH
async def test_closing_the_stream_disconnects_the_provider(fake: FakeHosted, model: str) -> None:
    b = backend(fake, model)
    fake.script(Reply.ok(chunks=40, chunk_delay=0.1))
    up = await b.open(body(model), {}, True)
    await up.close()
    assert await eventually(lambda: fake.disconnects == 1)
    await b.close()


@BOTH
async def test_first_byte_timeout_disconnects(fake: FakeHosted, model: str) -> None:
    b = backend(fake, model, first_byte=0.5)
    fake.script(Reply.slow(first_byte_delay=5))
    with pytest.raises(failures.UpstreamFailure) as info:
        await b.open(body(model), {}, True)
    assert info.value.kind is failures.Kind.TIMEOUT
    assert await eventually(lambda: fake.disconnects == 1)
    await b.close()


@BOTH
async def test_idle_timeout_mid_stream(fake: FakeHosted, model: str) -> None:
    b = backend(fake, model, idle=0.4)
    fake.script(Reply.ok(chunks=4, chunk_delay=2.0))
    up = await b.open(body(model), {}, True)
    with pytest.raises(failures.UpstreamFailure) as info:
        await drain(up)
    assert info.value.kind is failures.Kind.TIMEOUT
    await b.close()


async def test_connection_refused_is_a_crash() -> None:
    cfg = LiteLLMBackend(kind="litellm", model=CHAT, api_base="http://127.0.0.1:9/v1", api_key_env="TEST_HOSTED_KEY")
    b = HostedBackend("hosted", cfg)
    with pytest.raises(failures.UpstreamFailure) as info:
        await b.open(body(CHAT), {}, True)
    assert info.value.kind is failures.Kind.CRASH and info.value.counts_against_backend
    await b.close()


# ---- chat mode: bytes, not objects --------------------------------------------------------------

async def test_chat_provider_bytes_are_relayed_unchanged(fake: FakeHosted) -> None:
    b = backend(fake, CHAT)
    up = await b.open(body(CHAT, stream_options={"include_usage": True}), {}, True)
    out = await drain(up)
    # litellm re-serialises with exclude_none; relayed bytes keep the provider's own nulls and key order.
    assert b'"system_fingerprint": null' in out and b'"logprobs": null' in out
    assert out.endswith(b"data: [DONE]\n\n")
    await b.close()


@BOTH
async def test_request_is_the_one_litellm_sends(fake: FakeHosted, model: str) -> None:
    """Same URL, auth and JSON body as `litellm.acompletion` produces for the same call."""
    litellm = load_litellm()
    extra = {"tools": TOOLS, "tool_choice": "auto", "reasoning_effort": "low", "temperature": 0.2, "user": "u1"}
    b = backend(fake, model)
    await drain(await b.open(body(model, stream_options={"include_usage": True}, **extra), {"x-session-id": "s"},
                             True))
    ours = fake.requests[-1]
    stream = await litellm.acompletion(model=model, api_base=fake.url, api_key=os.environ["TEST_HOSTED_KEY"],
                                       messages=body(model)["messages"], max_tokens=64, stream=True,
                                       stream_options={"include_usage": True}, drop_params=True, num_retries=0,
                                       max_retries=0, extra_headers={"x-opencode-session": "s"}, **extra)
    async for _ in stream:
        pass
    theirs = fake.requests[-1]
    assert (ours.path, ours.json) == (theirs.path, theirs.json)
    for h in ("authorization", "x-opencode-session", "content-type"):
        assert ours.headers[h] == theirs.headers[h]
    await b.close()


async def test_a_messages_request_to_anthropic_is_the_one_litellm_sends(fake: FakeHosted) -> None:
    """Messages to an `anthropic/*` model go out on our own session (litellm's streaming path for them
    needs its proxy's extras): same URL, auth, version header and JSON body as
    `litellm.anthropic_messages` sends for the same call (non-streamed, which litellm can do here)."""
    litellm = load_litellm()
    model = "anthropic/claude-haiku-4-5"
    b = HostedBackend("hosted", LiteLLMBackend(kind="litellm", model=model, api_base=fake.url.removesuffix("/v1"),
                                               api_key_env="TEST_HOSTED_KEY", session_header="x-opencode-session"))
    call = {"max_tokens": 64, "system": "Be brief.", "temperature": 0.2, "metadata": {"user_id": "u1"},
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Capital of France?"}]}],
            "tools": [{"name": "read", "description": "Read a file",
                       "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}]}
    await drain(await b.open({"model": "hosted", **call}, {"x-session-id": "s"}, False, protocol="messages"))
    ours = fake.requests[-1]
    await litellm.anthropic_messages(model=model, api_base=fake.url.removesuffix("/v1"),
                                     api_key=os.environ["TEST_HOSTED_KEY"], stream=False,
                                     extra_headers={"x-opencode-session": "s"}, **call)
    theirs = fake.requests[-1]
    assert ours.path == theirs.path == "/v1/messages"
    assert {k: v for k, v in ours.json.items() if k != "stream"} == {k: v for k, v in theirs.json.items()
                                                                     if k != "stream"}
    assert not ours.json["stream"] and not theirs.json.get("stream")
    for h in ("x-api-key", "anthropic-version", "x-opencode-session", "content-type"):
        assert ours.headers[h] == theirs.headers[h], h
    await b.close()


# ---- Responses mode: the translation ------------------------------------------------------------

def _responses_tool_events() -> list[dict[str, Any]]:
    resp = {"id": "resp_1", "object": "response", "created_at": 1700000000, "model": "gpt-5-nano",
            "status": "in_progress", "output": []}
    call = {"type": "function_call", "id": "fc_1", "call_id": "call_Xk2p9Qe", "name": "read", "arguments": "",
            "status": "in_progress"}
    done = {**resp, "status": "completed",
            "usage": {"input_tokens": 11, "output_tokens": 7, "total_tokens": 18,
                      "input_tokens_details": {"cached_tokens": 3}, "output_tokens_details": {"reasoning_tokens": 2}}}
    return [
        {"type": "response.created", "response": resp},
        {"type": "response.output_item.added", "output_index": 0,
         "item": {"type": "message", "id": "msg_1", "role": "assistant", "content": []}},
        {"type": "response.output_text.delta", "output_index": 0, "item_id": "msg_1", "delta": "Let me look."},
        {"type": "response.output_item.added", "output_index": 1, "item": call},
        {"type": "response.function_call_arguments.delta", "output_index": 1, "item_id": "fc_1",
         "delta": '{"path": '},
        {"type": "response.function_call_arguments.delta", "output_index": 1, "item_id": "fc_1", "delta": '"a.py"}'},
        {"type": "response.output_item.done", "output_index": 1, "item": {**call, "arguments": '{"path": "a.py"}'}},
        {"type": "response.completed", "response": done},
    ]


def _sse_of(evs: list[dict[str, Any]]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in evs)


def _fold(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    text, calls, finish = "", {}, None
    for c in chunks:
        for ch in c.get("choices") or []:
            d = ch.get("delta") or {}
            text += d.get("content") or ""
            for tc in d.get("tool_calls") or []:
                slot = calls.setdefault(tc["index"], {"id": None, "name": "", "arguments": ""})
                slot["id"] = tc.get("id") or slot["id"]
                fn = tc.get("function") or {}
                slot["name"] += fn.get("name") or ""
                slot["arguments"] += fn.get("arguments") or ""
            finish = ch.get("finish_reason") or finish
    return {"text": text, "calls": calls, "finish": finish}


def test_translation_agrees_with_litellms_own() -> None:
    load_litellm()
    from litellm.completion_extras.litellm_responses_transformation.transformation import (
        OpenAiResponsesToChatCompletionStreamIterator,
    )

    evs = _responses_tool_events()
    theirs_it = OpenAiResponsesToChatCompletionStreamIterator(iter([]), sync_stream=True)
    theirs = [json.loads(theirs_it.chunk_parser(e).model_dump_json()) for e in evs]
    tr = ResponsesToChat("gpt-5-nano", include_usage=True)
    raw = _sse_of(evs)
    # fed in awkward pieces: events split across reads
    ours_bytes = b"".join(tr.feed(raw[i:i + 37]) for i in range(0, len(raw), 37))
    ours = [e for e in events(ours_bytes) if e != "[DONE]"]
    folded = _fold(theirs)
    if folded["finish"] == "stop" and folded["calls"]:
        folded["finish"] = "tool_calls"  # what litellm's CustomStreamWrapper makes of it (streaming_handler.py)
    assert _fold(ours) == folded
    assert _fold(ours)["calls"][0] == {"id": "call_Xk2p9Qe", "name": "read", "arguments": '{"path": "a.py"}'}
    usage = next(c["usage"] for c in ours if c.get("usage"))
    assert usage == {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
                     "prompt_tokens_details": {"cached_tokens": 3},
                     "completion_tokens_details": {"reasoning_tokens": 2}}
    assert tr.usage == usage and ours_bytes.endswith(b"data: [DONE]\n\n")


def test_failed_response_becomes_an_error_event_without_done() -> None:
    tr = ResponsesToChat("gpt-5-nano", include_usage=True)
    evs = [{"type": "response.created", "response": {"id": "r", "created_at": 1, "model": "m"}},
           {"type": "response.failed", "response": {"status": "failed",
                                                    "error": {"code": "server_error", "message": "boom"}}}]
    out = events(tr.feed(_sse_of(evs)))
    assert out[-1]["error"]["message"] == "boom" and "[DONE]" not in out and tr.finished


def test_usage_chunk_only_when_asked_but_usage_always_kept() -> None:
    tr = ResponsesToChat("gpt-5-nano", include_usage=False)
    out = events(tr.feed(_sse_of(_responses_tool_events())))
    assert not [e for e in out if isinstance(e, dict) and e.get("usage")]
    assert tr.usage is not None and tr.usage["total_tokens"] == 18


# ---- issue 9: classification by class, tokens off the loop --------------------------------------

def test_litellm_exception_subclasses_are_classified() -> None:
    litellm = load_litellm()

    class ProviderOverflow(litellm.ContextWindowExceededError):
        pass

    class ProviderTimeout(litellm.Timeout):
        pass

    overflow = ProviderOverflow(message="too long", model="m", llm_provider="openai")
    assert classify_litellm("hosted", overflow).kind is failures.Kind.CONTEXT_OVERFLOW
    timeout = ProviderTimeout(message="slow", model="m", llm_provider="openai")
    assert classify_litellm("hosted", timeout).kind is failures.Kind.TIMEOUT


async def test_count_tokens_runs_off_the_event_loop(fake: FakeHosted, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway import tokens

    seen: list[threading.Thread] = []

    def counting(b: dict[str, Any]) -> int:
        seen.append(threading.current_thread())
        return 7

    monkeypatch.setattr(tokens, "count_tiktoken", counting)
    assert await backend(fake, CHAT).count_tokens(body(CHAT)) == 7
    assert seen and seen[0] is not threading.main_thread()


# ---- through the gateway ------------------------------------------------------------------------

async def test_gateway_relays_a_chat_provider_with_usage_and_cost(make_gateway: GatewayFactory,
                                                                  fake: FakeHosted) -> None:
    hosted = {"kind": "litellm", "model": CHAT, "api_base": fake.url, "api_key_env": "TEST_HOSTED_KEY",
              "session_header": "x-opencode-session", "timeouts": {"connect": 2, "first_byte": 10, "idle": 10,
                                                                   "total": 60}}
    local = {"kind": "llamacpp", "url": "http://127.0.0.1:9", "embedded": False, "context_limit": 4096}
    gw = await make_gateway("http://127.0.0.1:9", backends={"local": local, "hosted": hosted})
    r = await gw.chat(body("hosted", stream=True, stream_options={"include_usage": True}),
                      {"x-session-id": "ses_gw"})
    assert r.status == 200 and r.headers["x-switchyard-backend"] == "hosted"
    evs = events(await r.read())
    assert evs[-1] == "[DONE]" and any(isinstance(e, dict) and e.get("usage") for e in evs)
    assert fake.requests[-1].headers["x-opencode-session"] == "ses_gw"
    assert fake.requests[-1].json["model"] == "gpt-5-nano"
    assert gw.last.tokens_out > 0 and gw.last.cost > 0


# ---- which wire each provider gets --------------------------------------------------------------

@pytest.mark.parametrize(("model", "mode", "url"), [
    ("openai/gpt-5-nano", "chat", "https://api.openai.com/v1/chat/completions"),
    ("groq/llama-3.1-8b-instant", "chat", "https://api.groq.com/openai/v1/chat/completions"),
    ("openai/responses/gpt-5-nano", "responses", "https://api.openai.com/v1/responses"),
    ("anthropic/claude-sonnet-4-5", "litellm", ""),
])
def test_litellm_decides_the_wire_and_the_url(model: str, mode: str, url: str) -> None:
    from gateway.backends.litellm_wire import ProviderWire

    cfg = LiteLLMBackend(kind="litellm", model=model, api_key_env="TEST_HOSTED_KEY")
    req = ProviderWire(load_litellm(), cfg).build(body(model, stream=True), {"x-opencode-session": "s"}, True)
    assert (req.mode, req.url) == (mode, url)
    if mode != "litellm":
        assert req.headers["Authorization"] == "Bearer sk-test-hosted-key-never-logged"
        assert req.headers["x-opencode-session"] == "s"
        assert json.loads(req.body)["stream"] is True

"""Issue 2, end to end: real llama-server + fake hosted, real clients (openai SDK), through the gateway."""

from __future__ import annotations

import json
from typing import Any

import openai

from gateway.embedded import LlamaServer
from tests.conftest import Gateway, GatewayFactory, chat_body
from tests.fake_hosted import FakeHosted

COMPACTION_SYSTEM = "You are a context summarization agent. Summarize the conversation."


def sse_events(raw: bytes) -> list[Any]:
    events = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data: "):
            payload = line[6:].strip()
            events.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return events


async def test_small_chat_goes_local(llama: LlamaServer, make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(llama.url)
    client = openai.AsyncOpenAI(base_url=gw.base_url, api_key="unused")
    raw = await client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
    completion = raw.parse()
    assert raw.headers["x-switchyard-backend"] == "local"
    assert raw.headers["x-switchyard-role"] == "main"
    assert int(raw.headers["x-switchyard-tokens-in"]) > 0
    assert "local" in raw.headers["x-switchyard-route"]
    assert completion.model == "smollm2-135m"  # what actually answered
    assert completion.choices[0].message.content
    assert completion.usage and completion.usage.prompt_tokens > 0


async def test_compaction_goes_hosted_with_session_header(llama: LlamaServer, make_gateway: GatewayFactory,
                                                          fake: FakeHosted) -> None:
    gw = await make_gateway(llama.url)
    body = {"model": "auto", "stream": False, "max_tokens": 32000, "messages": [
        {"role": "system", "content": COMPACTION_SYSTEM},
        {"role": "user", "content": "Here is the conversation so far:\n\n<conversation>hi</conversation>"}]}
    resp = await gw.chat(body, {"x-session-id": "ses_abc123", "User-Agent": "opencode/1.18.33 ai-sdk/x"})
    assert resp.status == 200, await resp.text()
    assert resp.headers["x-switchyard-backend"] == "hosted"
    assert resp.headers["x-switchyard-role"] == "compaction"
    data = await resp.json()
    assert data["choices"][0]["message"]["content"].startswith("hosted says")
    sent = fake.requests[-1]
    assert sent.path.endswith("/responses")  # zen serves gpt-5 on the Responses API only
    assert sent.headers["x-opencode-session"] == "ses_abc123"
    assert gw.last.client == "opencode"


async def test_huge_agent_turn_goes_hosted_without_exact_count(llama: LlamaServer, make_gateway: GatewayFactory,
                                                                fake: FakeHosted) -> None:
    gw = await make_gateway(llama.url)
    tools = [{"type": "function", "function": {"name": f"tool{i}", "description": "d" * 400,
                                                "parameters": {"type": "object", "properties": {}}}}
             for i in range(10)]
    history = "x = compute(y)  # some code\n" * 12_500  # 350,000 characters
    body = {"model": "auto", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 32000,
            "tools": tools, "tool_choice": "auto", "messages": [
                {"role": "system", "content": "You are opencode, an interactive CLI tool that helps users."},
                {"role": "user", "content": history}]}
    assert len(history) == 350_000
    resp = await gw.chat(body)
    assert resp.status == 200, await resp.text()
    assert resp.headers["x-switchyard-backend"] == "hosted"
    events = sse_events(await resp.read())
    assert events[-1] == "[DONE]"
    assert gw.last.tokens_method == "bytes"  # decided from byte length alone, no exact count
    assert gw.last.route == ["hosted"]  # local was excluded on size
    assert "ceiling" in gw.last.reason

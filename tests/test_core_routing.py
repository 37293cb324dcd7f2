"""Issue 2, end to end: real llama-server + fake hosted, real clients (openai SDK), through the gateway."""

from __future__ import annotations

import json
from typing import Any

from gateway.embedded import LlamaServer
from tests.conftest import GatewayFactory, chat_body
from tests.fake_hosted import FakeHosted

COMPACTION_SYSTEM = "You are a context summarization agent. Summarize the conversation."
COMPACTION = {"model": "auto", "messages": [
    {"role": "system", "content": COMPACTION_SYSTEM},
    {"role": "user", "content": "Here is the conversation so far:\n\n<conversation>hi</conversation>"}]}


def sse_events(raw: bytes) -> list[Any]:
    events = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data: "):
            payload = line[6:].strip()
            events.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return events


async def test_small_chat_goes_local(llama: LlamaServer, make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(llama.url)
    client = gw.sdk()
    raw = await client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
    )
    completion = raw.parse()
    assert raw.headers["x-switchyard-backend"] == "local"
    assert raw.headers["x-switchyard-role"] == "main"
    assert int(raw.headers["x-switchyard-tokens-in"]) > 0
    assert "local" in raw.headers["x-switchyard-route"]
    assert completion.model == "smollm2-135m"  # what actually answered
    assert completion.choices[0].message.content
    assert completion.usage and completion.usage.prompt_tokens > 0


async def test_compaction_goes_hosted_with_session_header(
    llama: LlamaServer, make_gateway: GatewayFactory, fake: FakeHosted
) -> None:
    gw = await make_gateway(llama.url)
    body = {
        "model": "auto",
        "stream": False,
        "max_tokens": 32000,
        "messages": [
            {"role": "system", "content": COMPACTION_SYSTEM},
            {"role": "user", "content": "Here is the conversation so far:\n\n<conversation>hi</conversation>"},
        ],
    }
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


async def test_huge_agent_turn_goes_hosted_without_exact_count(
    llama: LlamaServer, make_gateway: GatewayFactory, fake: FakeHosted
) -> None:
    gw = await make_gateway(llama.url)
    tools = [
        {
            "type": "function",
            "function": {
                "name": f"tool{i}",
                "description": "d" * 400,
                "parameters": {"type": "object", "properties": {}},
            },
        }
        for i in range(10)
    ]
    history = "x = compute(y)  # some code\n" * 12_500  # 350,000 characters
    body = {
        "model": "auto",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 32000,
        "tools": tools,
        "tool_choice": "auto",
        "messages": [
            {"role": "system", "content": "You are opencode, an interactive CLI tool that helps users."},
            {"role": "user", "content": history},
        ],
    }
    assert len(history) == 350_000
    resp = await gw.chat(body)
    assert resp.status == 200, await resp.text()
    assert resp.headers["x-switchyard-backend"] == "hosted"
    events = sse_events(await resp.read())
    assert events[-1] == "[DONE]"
    assert gw.last.tokens_method == "bytes"  # decided from byte length alone, no exact count
    assert gw.last.route == ["hosted"]  # local was excluded on size
    assert "ceiling" in gw.last.reason


async def test_stream_is_relayed_chunk_by_chunk_with_usage(llama: LlamaServer, make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(llama.url)
    # ignore_eos: SmolLM2 sometimes ends after two tokens, which arrive in too few reads to tell
    # streaming from buffering; all 24 tokens always do.
    resp = await gw.chat(chat_body("Count from one to ten.", max_tokens=24, stream=True, ignore_eos=True,
                                   stream_options={"include_usage": True}))
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    reads = []
    async for piece in resp.content.iter_any():
        reads.append(piece)
    events = sse_events(b"".join(reads))
    assert len(reads) > 3  # arrived as the model generated, not in one buffered write
    assert events[-1] == "[DONE]"
    usage = events[-2]["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert "timings" in events[-2]  # llama.cpp's own fields pass through untouched


async def test_hosted_stream_carries_usage_chunk(llama: LlamaServer, make_gateway: GatewayFactory,
                                                 fake: FakeHosted) -> None:
    gw = await make_gateway(llama.url)
    resp = await gw.chat(chat_body("hi", model="hosted", stream=True, stream_options={"include_usage": True}))
    assert resp.status == 200
    events = sse_events(await resp.read())
    assert events[-1] == "[DONE]"
    with_usage = [e for e in events[:-1] if e.get("usage")]
    assert with_usage and with_usage[-1]["usage"]["completion_tokens"] > 0
    assert "".join(c["delta"].get("content") or "" for e in events[:-1] for c in e["choices"]).startswith(
        "hosted says")


async def test_openai_sdk_streams_through_gateway(llama: LlamaServer, make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(llama.url)
    client = gw.sdk()
    stream = await client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "Say hi."}], max_tokens=12, stream=True,
        stream_options={"include_usage": True})
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text
    assert usage is not None and usage.total_tokens > 0


async def test_pinned_backend_ids_and_model_list(llama: LlamaServer, make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(llama.url)
    client = gw.sdk()
    ids = [m.id async for m in client.models.list()]
    assert ids[:3] == ["auto", "local", "hosted"]
    resp = await gw.chat(chat_body(model="hosted"))
    assert resp.headers["x-switchyard-backend"] == "hosted"
    resp = await gw.chat(chat_body(model="local"))
    assert resp.headers["x-switchyard-backend"] == "local"


async def test_keep_alive_upstream_survives_llama_servers_connection_close(llama: LlamaServer,
                                                                          make_gateway: GatewayFactory) -> None:
    """With `keep_alive: true` a pooled socket that llama-server already closed is retried once on a
    fresh connection — never mistaken for a crash, never failed over."""
    gw = await make_gateway(llama.url)
    object.__setattr__(gw.runtime.backends["local"].config, "keep_alive", True)
    for i in range(6):
        resp = await gw.chat(chat_body("Say hi.", max_tokens=2, stream=bool(i % 2)))
        assert resp.status == 200
        assert resp.headers["x-switchyard-backend"] == "local"
        assert "x-switchyard-failover" not in resp.headers
        await resp.read()
    assert gw.runtime.breakers["local"].state == "closed"


async def test_usage_chunk_is_added_when_the_upstream_sends_none(make_gateway: GatewayFactory,
                                                                 aiohttp_server: Any) -> None:
    """opencode compacts only from the final usage chunk: if an upstream omits it, we add one."""
    from aiohttp import web

    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece in ("Hel", "lo"):
            chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": piece}}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server = await aiohttp_server(app)
    gw = await make_gateway(str(server.make_url("")).rstrip("/"))
    resp = await gw.chat(chat_body("hi", model="local", stream=True, stream_options={"include_usage": True}))
    events = sse_events(await resp.read())
    assert events[-1] == "[DONE]"
    usage = events[-2]["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] == 2


async def test_hosted_without_its_key_is_skipped_with_the_reason(llama: LlamaServer, make_gateway: GatewayFactory,
                                                                 monkeypatch: Any) -> None:
    monkeypatch.delenv("TEST_HOSTED_KEY")
    gw = await make_gateway(llama.url)
    resp = await gw.chat({**COMPACTION, "max_tokens": 8})
    assert resp.status == 200 and resp.headers["x-switchyard-backend"] == "local"
    assert "hosted: TEST_HOSTED_KEY is not set" in resp.headers["x-switchyard-route"]
    readyz = await (await gw.client.get("/readyz")).json()
    assert readyz["backends"]["hosted"]["ready"] is False
    pinned = await gw.chat(chat_body(model="hosted"))
    assert pinned.status == 503 and "TEST_HOSTED_KEY is not set" in (await pinned.json())["error"]["message"]

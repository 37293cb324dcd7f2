"""Anthropic Messages inbound (what Claude Code speaks), with the real `anthropic` SDK:
through the real llama-server (native /v1/messages, bytes through) and the fake hosted provider (as bytes
to an `anthropic/*` model, through litellm's adapter to an OpenAI-only one), streamed and not, usage
present, errors in Anthropic's shape."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import pytest

from gateway.embedded import LlamaServer
from tests.conftest import Gateway, GatewayFactory
from tests.fake_hosted import FakeHosted

HOSTED_ANTHROPIC = {"model": "anthropic/claude-haiku-4-5", "api_key_env": "TEST_HOSTED_KEY"}


@pytest.fixture
async def sdk_for() -> AsyncIterator[Any]:
    made: list[anthropic.AsyncAnthropic] = []

    def make(gw: Gateway) -> anthropic.AsyncAnthropic:
        client = anthropic.AsyncAnthropic(base_url=str(gw.client.make_url("")), api_key="unused", max_retries=0)
        made.append(client)
        return client

    yield make
    for c in made:
        await c.close()


def hosted_anthropic(fake: FakeHosted) -> dict[str, Any]:
    """A hosted backend that speaks Anthropic natively (the fake's /v1/messages)."""
    return {"kind": "litellm", **HOSTED_ANTHROPIC, "api_base": fake.url.removesuffix("/v1"),
            "timeouts": {"connect": 2, "first_byte": 10, "idle": 10, "total": 60}}


async def gateway_with_anthropic_hosted(make_gateway: GatewayFactory, local_url: str, fake: FakeHosted) -> Gateway:
    from tests.conftest import config_for

    gw, _ = config_for(local_url, fake.url)
    backends = gw["backends"]
    backends["hosted"] = hosted_anthropic(fake)
    return await make_gateway(local_url, backends=backends)


async def test_messages_non_streamed_through_local(llama: LlamaServer, make_gateway: GatewayFactory,
                                                   sdk_for: Any) -> None:
    gw = await make_gateway(llama.url)
    msg = await sdk_for(gw).messages.create(model="claude-sonnet-4-5", max_tokens=8,
                                             messages=[{"role": "user", "content": "Say hello."}])
    assert msg.type == "message" and msg.content and msg.content[0].type == "text"
    assert msg.usage.output_tokens > 0 and msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0) > 0
    d = gw.last
    assert d.backend == "local" and d.outcome == "ok" and d.tokens_out > 0 and d.prompt_tokens > 0


async def test_messages_streamed_through_local(llama: LlamaServer, make_gateway: GatewayFactory, sdk_for: Any) -> None:
    gw = await make_gateway(llama.url)
    async with sdk_for(gw).messages.stream(model="auto", max_tokens=8, system="You are terse.",
                                           messages=[{"role": "user", "content": "Say hello."}]) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text and final.usage.output_tokens > 0
    d = gw.last
    assert d.backend == "local" and d.outcome == "ok" and d.stream and d.tokens_out > 0 and d.prompt_tokens > 0


async def test_messages_through_hosted_anthropic_provider(llama: LlamaServer, make_gateway: GatewayFactory,
                                                          fake: FakeHosted, sdk_for: Any) -> None:
    gw = await gateway_with_anthropic_hosted(make_gateway, llama.url, fake)
    client = sdk_for(gw)
    msg = await client.messages.create(model="hosted", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].text.startswith("hosted says") and msg.usage.output_tokens > 0
    assert fake.requests[-1].path.endswith("/messages")
    d = gw.last
    assert d.backend == "hosted" and d.outcome == "ok" and d.tokens_out > 0 and d.cost > 0


async def test_messages_streamed_to_a_native_anthropic_provider_are_relayed(
        make_gateway: GatewayFactory, fake: FakeHosted, sdk_for: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """What Claude Code does against an `anthropic/*` hosted backend: a streamed Messages request. The
    provider speaks Messages: its events go through as bytes, with litellm's URL and auth headers
    (litellm's own streaming path here needs its proxy's extras, and failed)."""
    monkeypatch.setenv("TEST_HOSTED_KEY", "sk-ant-test")
    gw = await gateway_with_anthropic_hosted(make_gateway, "http://127.0.0.1:9", fake)
    client = sdk_for(gw)
    async with client.messages.stream(model="hosted", max_tokens=8, system="Be terse.",
                                      messages=[{"role": "user", "content": "hi"}]) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text.startswith("hosted says") and final.usage.output_tokens > 0
    sent = fake.requests[-1]
    assert sent.path == "/v1/messages" and sent.headers["x-api-key"] == "sk-ant-test"
    assert sent.headers.get("anthropic-version") and sent.json["model"] == "claude-haiku-4-5"
    assert sent.json["stream"] is True and sent.json["system"] == "Be terse."
    d = gw.last
    assert d.backend == "hosted" and d.outcome == "ok" and d.stream and d.tokens_out > 0 and d.cost > 0


async def test_a_native_anthropic_providers_400_reaches_the_caller_in_anthropics_shape(
        make_gateway: GatewayFactory, fake: FakeHosted) -> None:
    from tests.fake_hosted import Reply

    fake.script(Reply.error(400, "messages: roles must alternate", type="invalid_request_error"))
    gw = await gateway_with_anthropic_hosted(make_gateway, "http://127.0.0.1:9", fake)
    r = await gw.client.post("/v1/messages", json={"model": "hosted", "max_tokens": 8, "stream": True,
                                                   "messages": [{"role": "user", "content": "hi"}]})
    body = await r.json()
    assert r.status == 400 and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error" and "alternate" in body["error"]["message"]
    assert not gw.runtime.breakers["hosted"]._failures  # the caller's fault, not the provider's


async def test_messages_through_openai_hosted_keeps_anthropic_shape(llama: LlamaServer, make_gateway: GatewayFactory,
                                                                     fake: FakeHosted, sdk_for: Any) -> None:
    """An OpenAI-only provider behind a Messages caller: litellm's adapter translates both ways."""
    gw = await make_gateway(llama.url)
    client = sdk_for(gw)
    msg = await client.messages.create(model="hosted", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert msg.type == "message" and msg.content[0].text.startswith("hosted says")
    async with client.messages.stream(model="hosted", max_tokens=8,
                                      messages=[{"role": "user", "content": "hi"}]) as stream:
        text = "".join([t async for t in stream.text_stream])
    assert text.startswith("hosted says")
    assert gw.last.backend == "hosted" and gw.last.outcome == "ok"


async def test_messages_overflow_is_prompt_too_long(llama: LlamaServer, make_gateway: GatewayFactory,
                                                    sdk_for: Any) -> None:
    """Too long for every backend -> Anthropic's invalid_request_error 'prompt is too long' (Claude Code compacts)."""
    gw = await make_gateway(llama.url, policies={"default": {"team": "default", "rules": [{"name": "d",
                                                                                          "route": ["local"]}]}})
    with pytest.raises(anthropic.BadRequestError) as e:
        await sdk_for(gw).messages.create(model="auto", max_tokens=8,
                                          messages=[{"role": "user", "content": "hello " * 6000}])
    body = e.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith("prompt is too long")


@pytest.mark.parametrize("body", [
    b"", b"not json", b"[]", json.dumps({"max_tokens": 5}).encode(),
    json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}).encode(),  # no max_tokens
    json.dumps({"model": "auto", "max_tokens": 5, "messages": [{"role": "tool", "content": "x"}]}).encode(),
    json.dumps({"model": "auto", "max_tokens": 5, "stream": "yes",
                "messages": [{"role": "user", "content": "hi"}]}).encode(),
])
async def test_messages_bad_input_is_anthropic_400(make_gateway: GatewayFactory, body: bytes) -> None:
    gw = await make_gateway("http://127.0.0.1:9")
    r = await gw.client.post("/v1/messages", data=body, headers={"Content-Type": "application/json"})
    assert r.status == 400
    data = await r.json()
    assert data["type"] == "error" and data["error"]["type"] == "invalid_request_error" and data["error"]["message"]


async def test_count_tokens_uses_local_exact_count(llama: LlamaServer, make_gateway: GatewayFactory,
                                                   sdk_for: Any) -> None:
    gw = await make_gateway(llama.url)
    n = await sdk_for(gw).messages.count_tokens(model="auto", messages=[{"role": "user", "content": "hello there"}])
    assert 3 < n.input_tokens < 60
    r = await gw.client.post("/messages/count_tokens", json={"model": "auto", "messages": []})
    assert r.status == 400 and (await r.json())["type"] == "error"


async def test_messages_fail_over_keep_headers_and_reach_metrics_and_ledger(make_gateway: GatewayFactory,
                                                                            fake: FakeHosted) -> None:
    from gateway.ledger import usage_table

    gw = await make_gateway("http://127.0.0.1:9")  # local refuses: hosted answers, in Anthropic's shape
    body = {"model": "claude-sonnet-4-5", "max_tokens": 8, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}
    r = await gw.client.post("/v1/messages", json=body, headers={"x-claude-code-session-id": "s1"})
    text = await r.text()
    assert r.status == 200 and "event: message_stop" in text
    assert r.headers["x-switchyard-backend"] == "hosted" and "local" in r.headers["x-switchyard-failover"]
    d = gw.last
    assert d.outcome == "ok" and d.session == "s1" and d.tokens_out > 0 and d.cost > 0
    metrics = await (await gw.client.get("/metrics")).text()
    assert 'switchyard_tokens_total{backend="hosted",direction="out",team="default"}' in metrics
    assert await gw.runtime.ledger.flush()
    (row,) = usage_table(gw.runtime.ledger.path, 0)
    assert row["backend"] == "hosted" and row["tokens_out"] > 0


async def test_messages_broken_hosted_stream_ends_with_anthropic_error_event(make_gateway: GatewayFactory,
                                                                              fake: FakeHosted) -> None:
    from tests.fake_hosted import Reply

    fake.script(Reply.broken_stream(after_chunks=1))
    gw = await make_gateway("http://127.0.0.1:9", policies={"default": {"team": "default", "rules": [
        {"name": "d", "route": ["hosted"]}]}})
    r = await gw.client.post("/v1/messages", json={"model": "auto", "max_tokens": 8, "stream": True,
                                                   "messages": [{"role": "user", "content": "hi"}]})
    text = await r.text()
    last = text.strip().rsplit("\n\n", 1)[-1]
    assert r.status == 200 and last.startswith("event: error") and '"type": "error"' in last
    assert gw.last.outcome == "broken_stream"

"""OpenAI Responses inbound (what Codex CLI speaks), with the real `openai` SDK: through the real
llama-server (native /v1/responses, bytes through) and the fake hosted provider (litellm's
aresponses), streamed and not, usage present, errors in OpenAI's shape and `response.failed`."""

from __future__ import annotations

import json

import openai
import pytest

from gateway.embedded import LlamaServer
from tests.conftest import GatewayFactory
from tests.fake_hosted import FakeHosted, Reply

LOCAL_ONLY = {"team": "default", "rules": [{"name": "d", "route": ["local"]}]}


async def test_responses_non_streamed_through_local(llama: LlamaServer, make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(llama.url)
    r = await gw.sdk().responses.create(model="gpt-5-codex", input="Say hello.", max_output_tokens=8)
    assert r.status == "completed" and r.output_text
    assert r.usage is not None and r.usage.output_tokens > 0 and r.usage.input_tokens > 0
    d = gw.last
    assert d.backend == "local" and d.outcome == "ok" and d.tokens_out > 0 and d.prompt_tokens > 0


async def test_responses_streamed_through_local(llama: LlamaServer, make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(llama.url)
    stream = await gw.sdk().responses.create(model="auto", instructions="You are terse.", input="Say hello.",
                                             max_output_tokens=8, stream=True)
    kinds, text, usage = [], "", None
    async for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
        if event.type == "response.completed":
            usage = event.response.usage
    assert text and kinds[-1] == "response.completed" and usage is not None and usage.output_tokens > 0
    d = gw.last
    assert d.backend == "local" and d.outcome == "ok" and d.stream and d.tokens_out > 0 and d.prompt_tokens > 0


async def test_responses_through_hosted(llama: LlamaServer, make_gateway: GatewayFactory, fake: FakeHosted) -> None:
    gw = await make_gateway(llama.url)
    client = gw.sdk()
    r = await client.responses.create(model="hosted", input="hi", max_output_tokens=8)
    assert r.output_text.startswith("hosted says") and r.usage.output_tokens > 0
    assert fake.requests[-1].path.endswith("/responses")
    stream = await client.responses.create(model="hosted", input="hi", stream=True)
    text = "".join([e.delta async for e in stream if e.type == "response.output_text.delta"])
    assert text.startswith("hosted says")
    d = gw.last
    assert d.backend == "hosted" and d.outcome == "ok" and d.tokens_out > 0 and d.cost > 0


async def test_responses_local_failure_fails_over_to_hosted_in_responses_shape(make_gateway: GatewayFactory,
                                                                               fake: FakeHosted) -> None:
    gw = await make_gateway("http://127.0.0.1:9")  # local refuses: hosted answers, the client sees Responses
    stream = await gw.sdk().responses.create(model="auto", input="hi", stream=True)
    kinds = [e.type async for e in stream]
    assert kinds[-1] == "response.completed"
    assert gw.last.backend == "hosted" and gw.last.failover


async def test_responses_broken_hosted_stream_ends_with_response_failed(make_gateway: GatewayFactory,
                                                                        fake: FakeHosted) -> None:
    fake.script(Reply.broken_stream(after_chunks=1))
    gw = await make_gateway("http://127.0.0.1:9", policies={"default": {"team": "default", "rules": [
        {"name": "d", "route": ["hosted"]}]}})
    r = await gw.client.post("/v1/responses", json={"model": "auto", "input": "hi", "stream": True})
    body = await r.text()
    assert r.status == 200 and "response.failed" in body.rsplit("event:", 1)[-1]
    assert gw.last.outcome == "broken_stream"


async def test_responses_overflow_is_context_length_exceeded(llama: LlamaServer, make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(llama.url, policies={"default": LOCAL_ONLY})
    with pytest.raises(openai.BadRequestError) as e:
        await gw.sdk().responses.create(model="auto", input="hello " * 6000, max_output_tokens=8)
    assert e.value.code == "context_length_exceeded"


@pytest.mark.parametrize("body", [
    b"", b"not json", b"[]", json.dumps({"model": "auto"}).encode(), json.dumps({"input": []}).encode(),
    json.dumps({"input": "hi", "stream": "yes"}).encode(), json.dumps({"input": "hi", "max_output_tokens": 0}).encode(),
    json.dumps({"input": [1, 2]}).encode(),
])
async def test_responses_bad_input_is_openai_400(make_gateway: GatewayFactory, body: bytes) -> None:
    gw = await make_gateway("http://127.0.0.1:9")
    r = await gw.client.post("/responses", data=body, headers={"Content-Type": "application/json"})
    assert r.status == 400
    err = (await r.json())["error"]
    assert err["type"] == "invalid_request_error" and err["message"]

"""Whose fault is it? Real-part tests of the failure taxonomy (issue 12 findings 1 and 9).

A request the real llama-server cannot parse (it answers 500 "Failed to parse ...") is the
client's: 400, never retried, never counted. A provider that rejects the gateway's key is a
backend failure of kind `auth`: it fails over, counts against the breaker, and is never passed to
the client as *their* authentication error. The fast table tests are tests/unit/test_failures_unit.py.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from gateway import failures
from gateway.embedded import LlamaServer
from tests.conftest import GatewayFactory, chat_body
from tests.fake_hosted import FakeHosted, Reply

REJECTED = Reply.error(401, "Incorrect API key provided: sk-test-h***-key", type="invalid_request_error",
                       code="invalid_api_key")
HOSTED_ONLY = {"team": "default", "rules": [{"name": "hosted-only", "route": ["hosted"]}]}


async def test_a_rejected_gateway_key_is_a_backend_failure_named_for_the_backend(
        make_gateway: GatewayFactory, fake: FakeHosted) -> None:
    gw = await make_gateway("http://127.0.0.1:9", policies={"default": HOSTED_ONLY})
    fake.script(REJECTED, REJECTED, REJECTED)
    for _ in range(3):
        resp = await gw.chat(chat_body())
        err = (await resp.json())["error"]
        assert resp.status in (502, 503), (resp.status, err)
        assert err["type"] != "authentication_error" and err["code"] != "invalid_api_key"
        assert "hosted: auth (provider rejected the gateway's API key" in err["message"]
    assert len(fake.requests) == 3  # never retried on the same backend
    breaker = gw.runtime.breakers["hosted"]
    assert breaker.state == "open"  # threshold 3 in tests: a rejected key is a backend failure
    ready = await (await gw.client.get("/readyz")).json()
    assert "provider rejected the gateway's API key" in ready["backends"]["hosted"]["circuit_detail"]


async def test_a_rejected_gateway_key_fails_over_to_local(llama: LlamaServer, make_gateway: GatewayFactory,
                                                          fake: FakeHosted) -> None:
    gw = await make_gateway(llama.url)
    fake.script(REJECTED)
    from tests.conftest import compaction_body

    resp = await gw.chat(compaction_body())  # compaction routes hosted first, local second
    assert resp.status == 200, await resp.text()
    assert resp.headers["x-switchyard-backend"] == "local"
    assert resp.headers["x-switchyard-failover"] == "hosted auth -> local"


# Valid OpenAI request shapes that the real llama-server (a text-only model, no projector) cannot
# turn into a prompt: it answers HTTP 500 "image input is not supported ..." — a request to fix,
# not a sick server. (Malformed shapes, e.g. a text part without "text", are refused at receive.)
UNPARSEABLE: list[tuple[str, dict[str, Any]]] = [
    ("image_url part on a text-only model", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]}),
    ("input_audio part on a text-only model", {"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]}),
]


async def raw_llama(llama: LlamaServer, body: dict[str, Any]) -> tuple[int, str]:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.post(f"{llama.url}/v1/chat/completions",
                                                   json={"max_tokens": 4, **body}) as r:
        return r.status, await r.text()


@pytest.mark.parametrize(("label", "body"), UNPARSEABLE, ids=[u[0] for u in UNPARSEABLE])
async def test_a_request_llamacpp_cannot_parse_is_a_400_and_the_breaker_stays_closed(
        llama: LlamaServer, make_gateway: GatewayFactory, fake: FakeHosted, label: str, body: dict[str, Any]) -> None:
    status, text = await raw_llama(llama, body)
    assert status == 500, f"llama-server now answers {status} for {label}: {text[:300]}"  # the premise
    gw = await make_gateway(llama.url)
    before = len(fake.requests)
    for _ in range(2):
        resp = await gw.chat({"model": "auto", "max_tokens": 4, **body})
        err = (await resp.json())["error"]
        assert resp.status == 400, (resp.status, err)
        assert err["type"] == "invalid_request_error" and "local rejected the request" in err["message"]
    assert gw.runtime.breakers["local"].state == "closed"
    assert len(fake.requests) == before  # not failed over: the next backend would reject it too
    ok = await gw.chat(chat_body())  # and the next request is served locally as usual
    assert ok.status == 200 and ok.headers["x-switchyard-backend"] == "local"


async def test_an_exception_litellm_raises_before_sending_is_a_client_error(fake: FakeHosted) -> None:
    """What litellm really raises for a lone surrogate, a non-ASCII header value or a bad
    `response_format`: its own 500-status exception wrapping ours. Nothing reached the provider."""
    from gateway.backends.hosted import load_litellm

    litellm = load_litellm()
    base = {"model": "openai/responses/gpt-5-nano", "api_base": fake.url, "api_key": os.environ["TEST_HOSTED_KEY"],
            "messages": [{"role": "user", "content": "hi"}], "num_retries": 0, "max_retries": 0}
    cases: list[dict[str, Any]] = [
        {"messages": [{"role": "user", "content": "\ud800"}]},
        {"extra_headers": {"x-opencode-session": "caf\xe9"}},
        {"response_format": 1},
    ]
    for case in cases:
        with pytest.raises(Exception) as info:
            await litellm.acompletion(**{**base, **case})
        f = failures.from_exception("hosted", info.value)
        assert f.kind is failures.Kind.CLIENT_ERROR and f.status == 400, (case, f)
        assert not f.counts_against_backend
    assert fake.requests == []
    with pytest.raises(Exception) as info:  # and a refused connection is still the provider's
        await litellm.acompletion(**{**base, "api_base": "http://127.0.0.1:9/v1"})
    assert failures.from_exception("hosted", info.value).kind is failures.Kind.CRASH

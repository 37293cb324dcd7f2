"""Bad input gets a clear, OpenAI-shaped error with the right status; nothing hangs."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from gateway.embedded import LlamaServer
from tests.conftest import GatewayFactory, chat_body
from tests.fake_hosted import FakeHosted, Reply


async def error_of(resp: Any) -> dict[str, Any]:
    body = await resp.json()
    assert set(body["error"]) >= {"message", "type", "code"}, body
    return body["error"]


async def post_raw(client: TestClient, data: bytes) -> Any:
    return await client.post("/v1/chat/completions", data=data, headers={"Content-Type": "application/json"})


async def test_invalid_json_is_400(llama: LlamaServer, make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(llama.url)
    resp = await post_raw(gw.client, b"{not json")
    assert resp.status == 400
    err = await error_of(resp)
    assert err["type"] == "invalid_request_error" and "not valid JSON" in err["message"]


async def test_body_that_is_not_a_chat_request_is_400(llama: LlamaServer, make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(llama.url)
    for body, words in [(b"[1, 2]", "JSON object"), (b'{"model": "auto"}', "'messages' is required"),
                        (b'{"messages": [{"content": "x"}]}', "messages[0]"),
                        (b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "'stream'"),
                        (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -3}', "max_tokens")]:
        resp = await post_raw(gw.client, body)
        assert resp.status == 400, body
        assert words in (await error_of(resp))["message"]


async def test_body_past_the_limit_is_413(llama: LlamaServer, make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(llama.url, body_limit_bytes=2048)
    resp = await gw.chat(chat_body("x" * 5000))
    assert resp.status == 413
    assert (await error_of(resp))["code"] == "request_too_large"


async def test_unknown_model_is_404(llama: LlamaServer, make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(llama.url)
    resp = await gw.chat(chat_body(model="gpt-9000"))
    assert resp.status == 404
    err = await error_of(resp)
    assert err["code"] == "model_not_found" and "auto" in err["message"]


async def test_request_that_fits_no_backend_is_context_length_exceeded(llama: LlamaServer,
                                                                        make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(llama.url)
    resp = await gw.chat(chat_body("word " * 6000, model="local"))  # ~24 KB, pinned to a 4096-token local
    assert resp.status == 400
    err = await error_of(resp)
    assert err["code"] == "context_length_exceeded"
    assert "tokens" in err["message"] and "4,096" in err["message"]


async def test_no_backend_can_take_it_now_is_503_with_retry_after(make_gateway: GatewayFactory,
                                                                 fake: FakeHosted) -> None:
    gw = await make_gateway("http://127.0.0.1:9")  # nothing listens on the discard port
    fake.script(*[Reply.error(503)] * 3)
    resp = await gw.chat(chat_body())
    assert resp.status == 503
    assert int(resp.headers["Retry-After"]) >= 1
    err = await error_of(resp)
    assert err["code"] == "no_backend_available"
    assert "local" in err["message"] and "hosted" in err["message"]


async def test_client_mistake_from_upstream_is_passed_through_not_retried(llama: LlamaServer,
                                                                          make_gateway: GatewayFactory,
                                                                          fake: FakeHosted) -> None:
    gw = await make_gateway(llama.url)
    fake.script(Reply.error(400, "Invalid value for 'temperature'", "invalid_request_error", "invalid_value"))
    resp = await gw.chat(chat_body(model="hosted"))
    assert resp.status == 400
    assert (await error_of(resp))["code"] == "invalid_value"
    assert len(fake.requests) == 1  # never retried
    assert gw.runtime.breakers["hosted"].state == "closed"  # never counted against the backend


async def test_unknown_route_and_method_are_openai_shaped(llama: LlamaServer, make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(llama.url)
    resp = await gw.client.get("/v1/nope")
    assert resp.status == 404 and (await error_of(resp))["code"] == "not_found"
    resp = await gw.client.get("/v1/chat/completions")
    assert resp.status == 405 and (await error_of(resp))["code"] == "method_not_allowed"


async def test_health_and_readiness(llama: LlamaServer, make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(llama.url)
    assert (await gw.client.get("/healthz")).status == 200
    resp = await gw.client.get("/readyz")
    body = await resp.json()
    assert resp.status == 200 and body["status"] == "ready"
    local = body["backends"]["local"]
    assert local["ready"] is True and local["circuit"] == "closed" and local["context_window"] == 4096
    assert local["queue"] == {"busy": 0, "waiting": 0, "capacity": 1}

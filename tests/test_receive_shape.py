"""Issue 12, finding 1: a client's mistake is answered 400 on receive and never reaches a backend.

Before, `{"type": "text"}` without `text` made llama-server answer 500 (local breaker open after one
request), and a lone surrogate, `response_format: 1` or `x-session-id: café` made litellm raise on
our side (hosted breaker open). The real-part tests send each to a gateway in front of the real
llama-server and the fake hosted provider and check the answer and that every breaker stayed closed.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.embedded import LlamaServer
from gateway.errors import InvalidRequest
from gateway.receive import parse_chat
from gateway.teams import hash_key
from tests.conftest import Gateway, GatewayFactory
from tests.fake_hosted import FakeHosted

NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


def rejected(raw: bytes) -> str:
    with pytest.raises(InvalidRequest) as e:
        parse_chat(raw, NO_HEADERS)
    return e.value.message


def user(content: Any, **body: Any) -> bytes:
    return json.dumps({"model": "auto", "messages": [{"role": "user", "content": content}], **body}).encode()


@pytest.mark.parametrize(("raw", "message"), [
    (user([{"type": "text"}]), "messages[0].content[0].text: field required"),
    (user([{"type": "text", "text": 5}]), "messages[0].content[0].text: must be a string"),
    (user([{"type": "video", "video": "x"}]), "messages[0].content[0]: unknown content part type 'video'"),
    (user([{"text": "x"}]), "messages[0].content[0]: a content part needs a 'type'"),
    (user([{"type": "image_url", "image_url": 3}]), "messages[0].content[0].image_url: must be an object"),
    (user({"text": "x"}), "messages[0].content: must be a string, null or an array of content parts"),
    (b'{"messages": [{"role": "user"}]}', "messages[0].content: field required"),
    (b'{"messages": [{"role": "tool", "content": "x"}]}', "messages[0].tool_call_id: field required"),
    (json.dumps({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}]}).encode(),
     "messages[0].tool_calls[0].function.arguments: must be a string"),
    (user("x", tools=[{"type": "function", "function": {"description": "no name"}}]),
     "tools[0].function.name: field required"),
    (user("x", tools=[{"name": "f"}]), "tools[0].type: field required"),
    (user("x", tools="f"), "'tools' must be an array"),
    (user("x", response_format=1), "response_format: must be an object"),
    (user("x", response_format={"schema": {}}), "response_format.type: field required"),
    (user("x", stream_options=True), "stream_options: must be an object"),
    (user("x", temperature="hot"), "temperature: must be a number"),
    (user("x", top_p=True), "top_p: must be a number"),
    (user("x", n=1.5), "n: must be an integer"),
    (user("x", stop=[1]), "stop"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages[0].content: text is not valid Unicode (lone surrogate)"),
    (b'{"model": "\\ud800", "messages": [{"role": "user", "content": "x"}]}', "model: text is not valid Unicode"),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udfffb"}]}]}',
     "messages[0].content[0].text: text is not valid Unicode"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "NaN is not valid JSON"),
    (b'{"messages": [{"role": "user", "content": "x"}], "metadata": ' + b"[" * 1000 + b"]" * 1000 + b"}",
     "nested"),
    (b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', "not valid UTF-8"),
    ('{"messages": [{"role": "user", "content": "x"}]}'.encode("utf-16"), "not valid UTF-8"),
])
def test_shape_errors_name_the_field(raw: bytes, message: str) -> None:
    assert message in rejected(raw)


def test_valid_requests_pass_and_keep_their_bytes_and_unknown_fields() -> None:
    for raw in [
        user("hi", some_future_field={"nested": [1, 2]}, temperature=0, top_p=1, stop=["\n"], seed=1),
        user([{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}},
              {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]),
        user([{"type": "image_url", "image_url": "https://example.com/a.png"}]),
        user("é \ud83d\ude00 😀", response_format={"type": "json_object"}, stream_options={"include_usage": True}),
        json.dumps({"messages": [
            {"role": "system", "content": "s"}, {"role": "user", "content": "u"},
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                  "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "result"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "tool_choice": "auto"}).encode(),
    ]:
        req = parse_chat(raw, NO_HEADERS)
        assert req.raw is raw  # forwarded as the client sent it, never re-encoded


async def expect_400(resp: Any, words: str) -> None:
    assert resp.status == 400, await resp.text()
    assert "x-switchyard-backend" not in resp.headers
    err = (await resp.json())["error"]
    assert err["type"] == "invalid_request_error" and words in err["message"], err


def breakers_closed(gw: Gateway) -> None:
    states = {n: str(b.state) for n, b in gw.runtime.breakers.items()}
    assert set(states.values()) == {"closed"}, states


async def send_raw(gw: Gateway, body: bytes, *headers: bytes) -> tuple[int, dict[str, Any]]:
    """For headers no client library will send (non-ASCII bytes)."""
    reader, writer = await asyncio.open_connection(gw.client.host, gw.client.port)
    head = [b"POST /v1/chat/completions HTTP/1.1", b"Host: x", b"Content-Type: application/json",
            b"Content-Length: %d" % len(body), b"Connection: close", *headers]
    writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
    data = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.partition(b"\r\n\r\n")[2])


async def test_findings_are_400_from_us_and_no_breaker_moves(llama: LlamaServer, make_gateway: GatewayFactory,
                                                              fake: FakeHosted) -> None:
    gw = await make_gateway(llama.url)
    for model in ("local", "hosted"):
        await expect_400(await gw.client.post("/v1/chat/completions", data=user([{"type": "text"}], model=model)),
                         "messages[0].content[0].text: field required")
        await expect_400(await gw.client.post("/v1/chat/completions", data=user("\ud800", model=model)),
                         "messages[0].content: text is not valid Unicode")
        await expect_400(await gw.client.post("/v1/chat/completions", data=user("x", model=model, response_format=1)),
                         "response_format: must be an object")
    await expect_400(await gw.client.post("/v1/chat/completions", data=b'{"model": "\\ud800", "messages": '
                                          b'[{"role": "user", "content": "x"}]}'), "model: text is not valid Unicode")
    for value in ("café".encode(), b"\xff"):  # control bytes are refused by the HTTP parser (test_edge.py)
        status, body = await send_raw(gw, user("x", model="hosted", max_tokens=4), b"x-session-id: " + value)
        assert status == 400 and "header x-session-id" in body["error"]["message"], body
    status, body = await send_raw(gw, user("x", model="local", max_tokens=4), "x-openwebui-chat-id: ü".encode())
    assert status == 400 and "x-openwebui-chat-id" in body["error"]["message"]
    assert fake.requests == []  # nothing reached the provider
    breakers_closed(gw)
    assert [d.status for d in list(gw.runtime.recorder.recent)] == [400] * 10
    # and the gateway still serves both backends
    ok = await gw.client.post("/v1/chat/completions", data=user([{"type": "text", "text": "Say hi."}],
                                                                 model="local", max_tokens=2, future_field=1))
    assert ok.status == 200, await ok.text()
    ok = await gw.client.post("/v1/chat/completions", data=user("hi", model="hosted", max_tokens=2),
                              headers={"x-session-id": "ses_ascii-1"})
    assert ok.status == 200, await ok.text()
    breakers_closed(gw)


async def test_a_non_ascii_key_is_401_not_a_500(llama: LlamaServer, make_gateway: GatewayFactory) -> None:
    key = "sy-test-key"
    gw = await make_gateway(llama.url, auth="keys", policy={"keys": [hash_key(key)]})
    status, body = await send_raw(gw, user("x", max_tokens=2), "Authorization: Bearer clé".encode())
    assert status == 401 and body["error"]["type"] == "authentication_error"
    status, body = await send_raw(gw, user("x", max_tokens=2), b"Authorization: Bearer \xff\xfe")
    assert status == 401


@pytest.mark.parametrize("field", ["base_url", "api_base", "api_key", "mock_response", "input_cost_per_token",
                                   "litellm_logging_obj", "extra_headers", "custom_llm_provider"])
async def test_litellm_control_fields_are_refused_and_the_hosted_key_stays_home(
        make_gateway: GatewayFactory, fake: FakeHosted, aiohttp_server: Any, field: str) -> None:
    """Before, `"base_url": "http://attacker/v1"` in a body made litellm send our hosted key there."""
    from aiohttp import web

    seen: list[str | None] = []

    async def attacker(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"error": {"message": "x"}}, status=500)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", attacker)
    evil = str((await aiohttp_server(app)).make_url("/v1"))
    gw = await make_gateway("http://127.0.0.1:9")
    resp = await gw.client.post("/v1/chat/completions", data=user("hi", model="hosted", max_tokens=2, **{field: evil}))
    await expect_400(resp, f"{field}: not a chat completion parameter")
    assert seen == [] and fake.requests == []
    breakers_closed(gw)

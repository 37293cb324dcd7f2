"""Tests for tests/fake_hosted.py, and proofs of the litellm 1.110.2 facts in docs/litellm-notes.md."""

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import litellm
import litellm.exceptions
import pytest

from tests.fake_hosted import FakeHosted, Reply, split_text, start_fake_hosted

litellm.suppress_debug_info = True

CHAT_MODEL = "openai/gpt-5-nano"
RESPONSES_MODEL = "openai/responses/gpt-5-nano"
BOTH = pytest.mark.parametrize("model", [CHAT_MODEL, RESPONSES_MODEL])
MESSAGES = [{"role": "user", "content": "Hello, what is the capital of France?"}]
EXPECTED = "hosted says: Hello, what is the c"
NO_RETRY: dict[str, Any] = {"num_retries": 0, "max_retries": 0}


@pytest.fixture
async def fake(aiohttp_server: Any) -> FakeHosted:
    f = FakeHosted()
    return f.attach(await aiohttp_server(f.app))


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession() as session:
        yield session


async def sse_events(resp: aiohttp.ClientResponse) -> list[tuple[str | None, str]]:
    """(event name, data) pairs of an SSE body."""
    events: list[tuple[str | None, str]] = []
    for block in (await resp.text()).split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines.get("event"), lines["data"]))
    return events


async def eventually(cond: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.02)
    return cond()


def call(fake: FakeHosted, model: str, **kw: Any) -> Awaitable[Any]:
    return litellm.acompletion(model=model, api_base=fake.url, api_key="sk-test", messages=MESSAGES, **kw)


async def collect(stream: Any) -> tuple[str, list[Any]]:
    text, chunks = "", []
    async for chunk in stream:
        chunks.append(chunk)
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    return text, chunks


# -- the fake on its own -----------------------------------------------------------------------------


def test_split_text() -> None:
    assert split_text("abcdefghij", 4) == ["abc", "def", "gh", "ij"]
    assert split_text("ab", 5) == ["a", "b"]


async def test_models(fake: FakeHosted, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{fake.url}/models") as resp:
        data = await resp.json()
    assert resp.status == 200
    assert "gpt-5-nano" in [m["id"] for m in data["data"]]
    assert fake.requests[0].method == "GET"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat/completions"])
async def test_chat_non_stream_and_recording(fake: FakeHosted, http: aiohttp.ClientSession, path: str) -> None:
    url = fake.url.removesuffix("/v1") + path
    before = time.monotonic()
    body = {"model": "gpt-5-nano", "messages": MESSAGES}
    async with http.post(url, json=body, headers={"X-Opencode-Session": "ses_1"}) as resp:
        data = await resp.json()
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"]["content"] == EXPECTED
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"]
    (rec,) = fake.requests
    assert rec.path == path and rec.json == body and rec.headers["x-opencode-session"] == "ses_1"
    assert before <= rec.received_at <= time.monotonic()


async def test_chat_stream_with_usage(fake: FakeHosted, http: aiohttp.ClientSession) -> None:
    fake.chunks = 5
    body = {"model": "gpt-5-nano", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(f"{fake.url}/chat/completions", json=body) as resp:
        assert resp.content_type == "text/event-stream"
        events = await sse_events(resp)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    content = [c["choices"][0]["delta"]["content"] for c in chunks[1:6]]
    assert len(content) == 5 and "".join(content) == EXPECTED
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


async def test_chat_stream_without_usage(fake: FakeHosted, http: aiohttp.ClientSession) -> None:
    body = {"model": "gpt-5-nano", "messages": MESSAGES, "stream": True}
    async with http.post(f"{fake.url}/chat/completions", json=body) as resp:
        events = await sse_events(resp)
    last = json.loads(events[-2][1])
    assert last["choices"][0]["finish_reason"] == "stop" and "usage" not in last


async def test_chunk_delay(http: aiohttp.ClientSession) -> None:
    fake = await start_fake_hosted(chunks=3, chunk_delay=0.1)
    try:
        body = {"messages": MESSAGES, "stream": True}
        start = time.monotonic()
        async with http.post(f"{fake.url}/chat/completions", json=body) as resp:
            await resp.read()
        assert time.monotonic() - start >= 0.2  # two gaps between three chunks
    finally:
        await fake.close()


async def test_responses_non_stream(fake: FakeHosted, http: aiohttp.ClientSession) -> None:
    body = {"model": "gpt-5-nano", "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]}
    async with http.post(f"{fake.url}/responses", json=body) as resp:
        data = await resp.json()
    assert data["object"] == "response" and data["status"] == "completed"
    assert data["output"][0]["content"][0]["text"] == "hosted says: hi"
    assert data["usage"]["total_tokens"] == data["usage"]["input_tokens"] + data["usage"]["output_tokens"]


async def test_responses_stream_events(fake: FakeHosted, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{fake.url}/responses", json={"input": "a string input", "stream": True}) as resp:
        events = await sse_events(resp)
    names = [name for name, _ in events]
    assert names[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert names[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    payloads = [json.loads(data) for _, data in events]
    deltas = [p["delta"] for p in payloads if p["type"] == "response.output_text.delta"]
    assert "".join(deltas) == "hosted says: a string input"
    assert [p["sequence_number"] for p in payloads] == list(range(len(payloads)))
    assert payloads[-1]["response"]["usage"]["output_tokens"] > 0


async def test_script_queue_then_default_ok(fake: FakeHosted, http: aiohttp.ClientSession) -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    fake.script(
        Reply.rate_limited(retry_after="2"),
        Reply.rate_limited(retry_after_ms=500),
        Reply.rate_limited(retry_after=when),
        Reply.rate_limited(),
        Reply.error(503),
        Reply.context_length_exceeded(),
    )
    results = []
    for _ in range(7):
        async with http.post(f"{fake.url}/chat/completions", json={"messages": MESSAGES}) as resp:
            results.append((resp.status, dict(resp.headers), await resp.json()))
    assert [status for status, _, _ in results] == [429, 429, 429, 429, 503, 400, 200]
    assert results[0][1]["Retry-After"] == "2"
    assert results[1][1]["retry-after-ms"] == "500" and "Retry-After" not in results[1][1]
    assert parsedate_to_datetime(results[2][1]["Retry-After"]) == when.replace(microsecond=0)
    assert "Retry-After" not in results[3][1]
    error = results[0][2]["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "tokens"
    assert results[5][2]["error"]["code"] == "context_length_exceeded"
    assert fake.pending == 0 and len(fake.requests) == 7


async def test_behaviour_header(fake: FakeHosted, http: aiohttp.ClientSession) -> None:
    fake.script(Reply.error(500))  # the header wins and the queue is left alone
    headers = {"x-fake-behaviour": "rate_limited:3"}
    async with http.post(f"{fake.url}/chat/completions", json={}, headers=headers) as resp:
        assert resp.status == 429 and resp.headers["Retry-After"] == "3"
    assert fake.pending == 1


async def test_slow_first_byte(fake: FakeHosted, http: aiohttp.ClientSession) -> None:
    fake.script(Reply.slow(first_byte_delay=0.3))
    start = time.monotonic()
    async with http.post(f"{fake.url}/chat/completions", json={"messages": MESSAGES}) as resp:
        assert time.monotonic() - start >= 0.3
        assert (await resp.json())["choices"][0]["message"]["content"] == EXPECTED


@pytest.mark.parametrize("path", ["/chat/completions", "/responses"])
async def test_broken_stream(fake: FakeHosted, http: aiohttp.ClientSession, path: str) -> None:
    fake.script(Reply.broken_stream(after_chunks=2))
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(f"{fake.url}{path}", json={"messages": MESSAGES, "stream": True}) as resp:
            async for line in resp.content:
                received += line
    assert received.count(b"delta") >= 2 and b"[DONE]" not in received and b"completed" not in received


async def test_broken_non_stream(fake: FakeHosted, http: aiohttp.ClientSession) -> None:
    fake.script(Reply.broken_stream())
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(f"{fake.url}/chat/completions", json={"messages": MESSAGES}) as resp:
            await resp.read()


async def test_hang_counts_disconnect(fake: FakeHosted, http: aiohttp.ClientSession) -> None:
    fake.script(Reply.hang())
    with pytest.raises(asyncio.TimeoutError):
        timeout = aiohttp.ClientTimeout(total=0.3)
        await http.post(f"{fake.url}/chat/completions", json={"messages": MESSAGES}, timeout=timeout)
    assert await eventually(lambda: fake.disconnects == 1)
    assert fake.requests[0].disconnected


async def test_standalone_start_and_close_with_hanging_request(http: aiohttp.ClientSession) -> None:
    fake = await start_fake_hosted()
    assert fake.url.startswith("http://127.0.0.1:") and fake.url.endswith("/v1")
    fake.script(Reply.hang())
    pending = asyncio.create_task(http.post(f"{fake.url}/chat/completions", json={}))
    await eventually(lambda: len(fake.requests) == 1)
    start = time.monotonic()
    await fake.close()
    assert time.monotonic() - start < 1.5
    with pytest.raises(aiohttp.ClientError):
        await pending


# -- litellm facts (see docs/litellm-notes.md) ---------------------------------------------------------


@pytest.mark.parametrize(("model", "path"), [(CHAT_MODEL, "/v1/chat/completions"), (RESPONSES_MODEL, "/v1/responses")])
async def test_litellm_non_stream(fake: FakeHosted, model: str, path: str) -> None:
    resp = await call(fake, model, extra_headers={"x-opencode-session": "ses_1"}, **NO_RETRY)
    assert resp.choices[0].message.content == EXPECTED
    assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens > 0
    (rec,) = fake.requests
    assert rec.path == path and rec.headers["x-opencode-session"] == "ses_1"
    assert rec.json["model"] == "gpt-5-nano"


@pytest.mark.parametrize(("model", "path"), [(CHAT_MODEL, "/v1/chat/completions"), (RESPONSES_MODEL, "/v1/responses")])
async def test_litellm_stream_with_usage(fake: FakeHosted, model: str, path: str) -> None:
    stream = await call(
        fake,
        model,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-opencode-session": "ses_1"},
        **NO_RETRY,
    )
    text, chunks = await collect(stream)
    assert text == EXPECTED
    assert type(chunks[0]).__name__ == "ModelResponseStream"
    assert "stop" in [c.choices[0].finish_reason for c in chunks if c.choices]
    last = chunks[-1]
    assert last.choices == [] and last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    (rec,) = fake.requests
    assert rec.path == path and rec.headers["x-opencode-session"] == "ses_1" and rec.json["stream"] is True
    # chat path forwards stream_options; the Responses bridge does not send it upstream
    assert rec.json.get("stream_options") == ({"include_usage": True} if model == CHAT_MODEL else None)


@BOTH
async def test_litellm_stream_without_include_usage_has_no_usage_chunk(fake: FakeHosted, model: str) -> None:
    text, chunks = await collect(await call(fake, model, stream=True, **NO_RETRY))
    assert text == EXPECTED
    assert not any(getattr(c, "usage", None) for c in chunks)


def _retry_headers(exc: Exception) -> dict[str, str]:
    headers = getattr(exc, "litellm_response_headers", None) or {}
    return {k.lower(): v for k, v in headers.items()}


@BOTH
@pytest.mark.parametrize("stream", [False, True])
async def test_litellm_429_no_retry(fake: FakeHosted, model: str, stream: bool) -> None:
    fake.script(*[Reply.rate_limited(retry_after="2", retry_after_ms=1500)] * 3)
    with pytest.raises(litellm.RateLimitError) as info:
        await call(fake, model, stream=stream, num_retries=0)
    assert info.value.status_code == 429
    assert _retry_headers(info.value)["retry-after"] == "2"
    assert _retry_headers(info.value)["retry-after-ms"] == "1500"
    assert len(fake.requests) == 1


async def test_litellm_429_headers_on_response_only_for_chat_path(fake: FakeHosted) -> None:
    fake.script(Reply.rate_limited(retry_after="2"), Reply.rate_limited(retry_after="2"))
    with pytest.raises(litellm.RateLimitError) as chat:
        await call(fake, CHAT_MODEL, **NO_RETRY)
    with pytest.raises(litellm.RateLimitError) as bridged:
        await call(fake, RESPONSES_MODEL, **NO_RETRY)
    assert chat.value.response.headers["retry-after"] == "2"
    assert "retry-after" not in bridged.value.response.headers  # only litellm_response_headers has it


async def test_litellm_chat_path_retries_by_default_honouring_retry_after_ms(fake: FakeHosted) -> None:
    fake.script(*[Reply.rate_limited(retry_after_ms=300)] * 3)
    with pytest.raises(litellm.RateLimitError):
        await call(fake, CHAT_MODEL)
    times = [r.received_at for r in fake.requests]
    assert len(times) == 3  # openai SDK default max_retries=2
    assert times[1] - times[0] >= 0.3 and times[2] - times[1] >= 0.3


async def test_litellm_responses_path_does_not_retry_by_default(fake: FakeHosted) -> None:
    fake.script(*[Reply.error(503)] * 3)
    with pytest.raises(litellm.ServiceUnavailableError):
        await call(fake, RESPONSES_MODEL)
    assert len(fake.requests) == 1


@BOTH
@pytest.mark.parametrize(
    ("reply", "exc_type", "status"),
    [
        (Reply.error(500), litellm.InternalServerError, 500),
        (Reply.error(502), litellm.BadGatewayError, 502),
        (Reply.error(503), litellm.ServiceUnavailableError, 503),
        (Reply.context_length_exceeded(), litellm.ContextWindowExceededError, 400),
        (Reply.error(400, type="invalid_request_error"), litellm.BadRequestError, 400),
    ],
)
async def test_litellm_error_mapping(
    fake: FakeHosted, model: str, reply: Reply, exc_type: type[Exception], status: int
) -> None:
    fake.script(reply, reply)
    with pytest.raises(exc_type) as info:
        await call(fake, model, num_retries=0)
    assert info.value.status_code == status
    assert len(fake.requests) == 1


@BOTH
async def test_litellm_connection_refused(model: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(litellm.InternalServerError) as info:
        await litellm.acompletion(
            model=model, api_base=f"http://127.0.0.1:{port}/v1", api_key="k", messages=MESSAGES, **NO_RETRY
        )
    assert info.value.status_code == 500
    assert not isinstance(info.value, litellm.APIConnectionError)


@BOTH
async def test_litellm_broken_stream_is_midstream_error(fake: FakeHosted, model: str) -> None:
    fake.script(Reply.broken_stream(after_chunks=2))
    stream = await call(fake, model, stream=True, **NO_RETRY)
    with pytest.raises(litellm.exceptions.MidStreamFallbackError):
        await collect(stream)


@BOTH
async def test_litellm_timeout_on_hang_disconnects(fake: FakeHosted, model: str) -> None:
    fake.script(Reply.hang())
    with pytest.raises(litellm.Timeout):
        await call(fake, model, timeout=0.5, **NO_RETRY)
    assert await eventually(lambda: fake.disconnects == 1)
    assert len(fake.requests) == 1


@BOTH
async def test_litellm_stream_aclose_disconnects_upstream(fake: FakeHosted, model: str) -> None:
    fake.script(Reply.ok(chunks=30, chunk_delay=0.1))
    stream = await call(fake, model, stream=True, **NO_RETRY)
    async for _chunk in stream:
        break
    await stream.aclose()
    assert await eventually(lambda: fake.disconnects == 1, timeout=1.0)


@BOTH
async def test_litellm_task_cancel_disconnects_upstream(fake: FakeHosted, model: str) -> None:
    fake.script(Reply.ok(chunks=30, chunk_delay=0.1))

    async def consume() -> None:
        await collect(await call(fake, model, stream=True, **NO_RETRY))

    task = asyncio.create_task(consume())
    await eventually(lambda: len(fake.requests) == 1)
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await eventually(lambda: fake.disconnects == 1, timeout=1.0)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


async def test_litellm_params_chat_path(fake: FakeHosted) -> None:
    await call(
        fake,
        CHAT_MODEL,
        reasoning_effort="low",
        tools=TOOLS,
        tool_choice="auto",
        max_tokens=100,
        foo_bar=1,
        extra_body={"baz": 2},
        **NO_RETRY,
    )
    body = fake.requests[0].json
    assert body["reasoning_effort"] == "low" and body["tool_choice"] == "auto"
    assert body["tools"] == TOOLS
    assert body["max_completion_tokens"] == 100 and "max_tokens" not in body  # renamed for gpt-5
    assert body["foo_bar"] == 1 and body["baz"] == 2  # unknown kwargs and extra_body pass through


async def test_litellm_params_responses_path(fake: FakeHosted) -> None:
    await call(
        fake,
        RESPONSES_MODEL,
        reasoning_effort="low",
        tools=TOOLS,
        tool_choice="auto",
        max_tokens=100,
        foo_bar=1,
        extra_body={"baz": 2, "prompt_cache_key": "k"},
        **NO_RETRY,
    )
    body = fake.requests[0].json
    assert body["reasoning"] == {"effort": "low"} and body["tool_choice"] == "auto"
    assert body["tools"][0]["name"] == "get_weather" and body["tools"][0]["type"] == "function"
    assert body["max_output_tokens"] == 100
    assert body["prompt_cache_key"] == "k"
    assert "foo_bar" not in body and "baz" not in body  # unknown fields are silently dropped


@BOTH
async def test_litellm_unsupported_param_raises_unless_drop_params(fake: FakeHosted, model: str) -> None:
    with pytest.raises(litellm.UnsupportedParamsError):
        await call(fake, model, top_p=0.5, **NO_RETRY)
    assert fake.requests == []
    await call(fake, model, top_p=0.5, drop_params=True, **NO_RETRY)
    assert "top_p" not in fake.requests[0].json

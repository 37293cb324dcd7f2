"""A fake hosted LLM provider (OpenAI-shaped) for tests and manual runs.

Speaks ``POST /v1/chat/completions``, ``POST /v1/responses``, ``POST /v1/messages`` (Anthropic's
event format; stream and non-stream) and
``GET /v1/models``.  Behaviour is scripted per request::

    fake = await start_fake_hosted()
    fake.script(Reply.rate_limited(retry_after="2"), Reply.error(503), Reply.ok())
    ...  # point a client at fake.url
    assert len(fake.requests) == 3
    await fake.close()

With pytest-aiohttp: ``fake = FakeHosted(); fake.attach(await aiohttp_server(fake.app))``.
Scripted replies are consumed one per POST request; once the queue is empty every reply is
``Reply.ok()``.  A request header ``x-fake-behaviour`` (e.g. ``rate_limited:2``, ``error:503``,
``hang``, ``broken_stream:2``, ``slow:1.5``, ``context_length``) overrides the queue.

Run standalone with ``python -m tests.fake_hosted --port 8099``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import format_datetime
from typing import Any, Literal

from aiohttp import web
from aiohttp.test_utils import TestServer

ReplyKind = Literal["ok", "error", "slow", "broken_stream", "hang"]
JSON = dict[str, Any]
Event = tuple[str | None, Any]  # (SSE event name, data: dict or "[DONE]")

DEFAULT_MODELS: tuple[str, ...] = ("gpt-5-nano", "gpt-5-mini", "gpt-4o-mini")


@dataclass(frozen=True)
class Reply:
    """One scripted answer.  Build it with the class methods."""

    kind: ReplyKind = "ok"
    status: int = 200
    body: JSON | None = None
    headers: dict[str, str] = field(default_factory=dict)
    first_byte_delay: float = 0.0
    after_chunks: int = 0
    text: str | None = None
    chunks: int | None = None
    chunk_delay: float | None = None

    @classmethod
    def ok(cls, text: str | None = None, chunks: int | None = None, chunk_delay: float | None = None) -> Reply:
        return cls(text=text, chunks=chunks, chunk_delay=chunk_delay)

    @classmethod
    def error(
        cls,
        status: int = 500,
        message: str | None = None,
        type: str = "server_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        body = _error_body(message or f"fake upstream error {status}", type, code)
        return cls(kind="error", status=status, body=body, headers=dict(headers or {}))

    @classmethod
    def rate_limited(
        cls,
        retry_after: str | float | datetime | None = None,
        retry_after_ms: float | None = None,
        type: str = "tokens",
        message: str = "Rate limit reached for gpt-5-nano. Please try again later.",
    ) -> Reply:
        """A 429.  ``retry_after`` is seconds (number or str) or a datetime (sent as an HTTP date)."""
        headers: dict[str, str] = {}
        if isinstance(retry_after, datetime):
            headers["Retry-After"] = format_datetime(retry_after, usegmt=True)
        elif retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        if retry_after_ms is not None:
            headers["retry-after-ms"] = str(retry_after_ms)
        return cls.error(429, message, type, "rate_limit_exceeded", headers)

    @classmethod
    def context_length_exceeded(cls) -> Reply:
        message = (
            "This model's maximum context length is 400000 tokens. However, your messages resulted "
            "in 500000 tokens. Please reduce the length of the messages."
        )
        return cls.error(400, message, "invalid_request_error", "context_length_exceeded")

    @classmethod
    def slow(cls, first_byte_delay: float = 3.0, chunk_delay: float | None = None) -> Reply:
        """An ok answer whose response headers are sent only after ``first_byte_delay`` seconds."""
        return cls(kind="slow", first_byte_delay=first_byte_delay, chunk_delay=chunk_delay)

    @classmethod
    def broken_stream(cls, after_chunks: int = 2) -> Reply:
        """Send ``after_chunks`` content chunks, then close the TCP connection (no [DONE])."""
        return cls(kind="broken_stream", after_chunks=after_chunks)

    @classmethod
    def hang(cls) -> Reply:
        """Never answer; wait until the client goes away (counted in ``FakeHosted.disconnects``)."""
        return cls(kind="hang")


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    json: Any
    received_at: float  # time.monotonic()
    reply: Reply | None = None  # what the fake answered with (None for GET)
    disconnected: bool = False


def _error_body(message: str, type: str, code: str | None) -> JSON:
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


def _text_of(content: Any) -> str:
    """Text of a chat ``content`` or Responses ``input`` item content (str or list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def last_user_text(body: JSON) -> str:
    """Last user message of a chat-completions or Responses request body."""
    items = body.get("messages")
    if items is None:
        items = body.get("input")
        if isinstance(items, str):
            return items
    for item in reversed(items or []):
        if isinstance(item, dict) and item.get("role") == "user":
            return _text_of(item.get("content"))
    return ""


def answer_for(body: JSON) -> str:
    return f"hosted says: {last_user_text(body)[:20]}"


def split_text(text: str, n: int) -> list[str]:
    """Split ``text`` into ``n`` (or fewer, if it is short) non-empty pieces."""
    n = max(1, min(n, len(text)))
    size, extra = divmod(len(text), n)
    pieces, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        pieces.append(text[start:end])
        start = end
    return pieces


def count_tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4)


def _prompt_text(body: JSON) -> str:
    items = body.get("messages", body.get("input"))
    if isinstance(items, str):
        return items
    return "".join(_text_of(m.get("content")) for m in items or [] if isinstance(m, dict))


def parse_behaviour(value: str) -> Reply:
    """``x-fake-behaviour`` header value -> Reply (``kind[:arg]``)."""
    kind, _, arg = value.strip().partition(":")
    match kind:
        case "rate_limited":
            return Reply.rate_limited(retry_after=arg or None)
        case "error":
            return Reply.error(int(arg or 500))
        case "context_length":
            return Reply.context_length_exceeded()
        case "slow":
            return Reply.slow(float(arg or 3.0))
        case "broken_stream":
            return Reply.broken_stream(int(arg or 2))
        case "hang":
            return Reply.hang()
        case _:
            return Reply.ok()


class _ClientGone(Exception):
    """The client closed the connection (already counted) or the fake is shutting down."""


class FakeHosted:
    """The fake provider.  ``app`` is the aiohttp application; ``url`` ends in ``/v1``."""

    def __init__(
        self,
        chunks: int = 4,
        chunk_delay: float = 0.0,
        models: Sequence[str] = DEFAULT_MODELS,
    ) -> None:
        self.chunks = chunks
        self.chunk_delay = chunk_delay
        self.models = list(models)
        self.requests: list[RecordedRequest] = []
        self.default = Reply.ok()  # the answer once the script is used up (benchmarks: a provider's real latency)
        self.disconnects = 0
        self._queue: deque[Reply] = deque()
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._base: str | None = None
        self.app = web.Application()
        self.app.router.add_get("/v1/models", self._models)
        self.app.router.add_get("/models", self._models)
        for prefix in ("/v1", ""):
            self.app.router.add_post(f"{prefix}/chat/completions", self._chat)
            self.app.router.add_post(f"{prefix}/responses", self._responses)
            self.app.router.add_post(f"{prefix}/messages", self._messages)
        self.app.on_shutdown.append(self._on_shutdown)

    # -- public API ---------------------------------------------------------------------------------
    def script(self, *replies: Reply) -> FakeHosted:
        """Queue replies; each POST request consumes one, then the default is ``Reply.ok()``."""
        self._queue.extend(replies)
        return self

    def reset(self) -> None:
        self._queue.clear()
        self.requests.clear()
        self.disconnects = 0

    @property
    def pending(self) -> int:
        """Number of scripted replies not consumed yet."""
        return len(self._queue)

    @property
    def url(self) -> str:
        """Base URL including ``/v1``, for an OpenAI client's ``base_url`` / litellm's ``api_base``."""
        if self._base is None:
            raise RuntimeError("FakeHosted is not serving: use start_fake_hosted() or attach()")
        return f"{self._base}/v1"

    def attach(self, server: TestServer) -> FakeHosted:
        """Bind to a pytest-aiohttp ``aiohttp_server(fake.app)`` server."""
        self._base = str(server.make_url("")).rstrip("/")
        return self

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> FakeHosted:
        self._runner = web.AppRunner(self.app, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sockets = self._runner.addresses
        bound_port = sockets[0][1] if sockets else port
        self._base = f"http://{host}:{bound_port}"
        return self

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- internals ----------------------------------------------------------------------------------
    async def _on_shutdown(self, _app: web.Application) -> None:
        self._closing.set()

    async def _record(self, request: web.Request) -> RecordedRequest:
        body: Any = None
        if request.can_read_body:
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
        rec = RecordedRequest(
            method=request.method,
            path=request.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            json=body,
            received_at=time.monotonic(),
        )
        self.requests.append(rec)
        return rec

    def _next_reply(self, request: web.Request) -> Reply:
        header = request.headers.get("x-fake-behaviour")
        if header:
            return parse_behaviour(header)
        return self._queue.popleft() if self._queue else self.default

    def _gone(self, rec: RecordedRequest) -> None:
        if not rec.disconnected:
            rec.disconnected = True
            self.disconnects += 1

    async def _sleep(self, request: web.Request, rec: RecordedRequest, seconds: float | None) -> None:
        """Sleep (forever if ``seconds`` is None) but notice the client going away."""
        deadline = None if seconds is None else time.monotonic() + seconds
        while deadline is None or time.monotonic() < deadline:
            transport = request.transport
            if transport is None or transport.is_closing():
                self._gone(rec)
                raise _ClientGone
            if self._closing.is_set() and seconds is None:
                transport.close()  # the fake is shutting down: drop the hanging connection
                raise _ClientGone
            step = 0.02 if deadline is None else min(0.02, max(0.0, deadline - time.monotonic()))
            await asyncio.sleep(step)

    async def _models(self, request: web.Request) -> web.Response:
        await self._record(request)
        data = [{"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "fake"} for m in self.models]
        return web.json_response({"object": "list", "data": data})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, self._chat_events, self._chat_body)

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, self._responses_events, self._responses_body)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, self._messages_events, self._messages_body)

    async def _serve(
        self,
        request: web.Request,
        events: Callable[[JSON, str, list[str]], list[Event]],
        full_body: Callable[[JSON, str], JSON],
    ) -> web.StreamResponse:
        rec = await self._record(request)
        reply = rec.reply = self._next_reply(request)
        body: JSON = rec.json if isinstance(rec.json, dict) else {}
        try:
            if reply.kind == "hang":
                await self._sleep(request, rec, None)
            if reply.first_byte_delay:
                await self._sleep(request, rec, reply.first_byte_delay)
            if reply.kind == "error":
                err = reply.body
                if request.path.endswith("/messages") and isinstance(err, dict):  # Anthropic's error shape
                    err = {"type": "error", "error": {"type": (err.get("error") or {}).get("type", "api_error"),
                                                      "message": (err.get("error") or {}).get("message", "")}}
                return web.json_response(err, status=reply.status, headers=reply.headers)
            text = reply.text if reply.text is not None else answer_for(body)
            pieces = split_text(text, reply.chunks or self.chunks)
            delay = self.chunk_delay if reply.chunk_delay is None else reply.chunk_delay
            if not body.get("stream"):
                return await self._send_json(request, rec, reply, full_body(body, text))
            return await self._stream(request, rec, reply, events(body, text, pieces), len(pieces), delay)
        except _ClientGone:
            return web.Response(status=499)
        except ConnectionError:
            self._gone(rec)
            return web.Response(status=499)
        except asyncio.CancelledError:
            self._gone(rec)
            raise

    async def _send_json(
        self, request: web.Request, rec: RecordedRequest, reply: Reply, payload: JSON
    ) -> web.StreamResponse:
        data = json.dumps(payload).encode()
        if reply.kind != "broken_stream":
            return web.Response(body=data, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(data)
        await resp.prepare(request)
        await resp.write(data[: len(data) // 2])
        return self._cut(request, resp)

    async def _stream(
        self,
        request: web.Request,
        rec: RecordedRequest,
        reply: Reply,
        events: list[Event],
        n_content: int,
        delay: float,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        sent_content = 0
        for name, data in events:
            is_content = isinstance(data, dict) and data.get("_content")
            if is_content:
                data = {k: v for k, v in data.items() if k != "_content"}
                if reply.kind == "broken_stream" and sent_content >= reply.after_chunks:
                    return self._cut(request, resp)
                if sent_content and delay:
                    await self._sleep(request, rec, delay)
                sent_content += 1
            payload = data if isinstance(data, str) else json.dumps(data)
            prefix = f"event: {name}\n" if name else ""
            await resp.write(f"{prefix}data: {payload}\n\n".encode())
        await resp.write_eof()
        return resp

    @staticmethod
    def _cut(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
        """Close the TCP connection mid-body."""
        if request.transport is not None:
            request.transport.close()
        resp.force_close()
        return resp

    # -- chat completions ---------------------------------------------------------------------------
    @staticmethod
    def _usage(body: JSON, text: str) -> JSON:
        prompt, completion = count_tokens(_prompt_text(body)), count_tokens(text)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _chat_body(self, body: JSON, text: str) -> JSON:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "gpt-5-nano"),
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": self._usage(body, text),
        }

    def _chat_events(self, body: JSON, text: str, pieces: list[str]) -> list[Event]:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base: JSON = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model", "gpt-5-nano"),
            "system_fingerprint": None,
        }
        if include_usage:
            base["usage"] = None

        def chunk(delta: JSON, finish: str | None = None, **extra: Any) -> JSON:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**base, "choices": [choice], **extra}

        events: list[Event] = [(None, chunk({"role": "assistant", "content": ""}))]
        events += [(None, chunk({"content": p}, _content=True)) for p in pieces]
        events.append((None, chunk({}, "stop")))
        if include_usage:
            events.append((None, {**base, "choices": [], "usage": self._usage(body, text)}))
        events.append((None, "[DONE]"))
        return events

    # -- anthropic messages ---------------------------------------------------------------------------
    def _messages_usage(self, body: JSON, text: str) -> JSON:
        u = self._usage(body, text)
        return {"input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"],
                "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}

    def _messages_body(self, body: JSON, text: str) -> JSON:
        return {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
                "model": body.get("model", "claude-haiku-4-5"), "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn", "stop_sequence": None, "usage": self._messages_usage(body, text)}

    def _messages_events(self, body: JSON, text: str, pieces: list[str]) -> list[Event]:
        """Anthropic's stream: message_start (input usage), one text block, message_delta (output usage)."""
        usage = self._messages_usage(body, text)
        start = {**self._messages_body(body, ""), "content": [], "stop_reason": None,
                 "usage": {**usage, "output_tokens": 1}}
        raw: list[JSON] = [
            {"type": "message_start", "message": start},
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            {"type": "ping"},
        ]
        raw += [{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p},
                 "_content": True} for p in pieces]
        raw += [
            {"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
             "usage": {"output_tokens": usage["output_tokens"]}},
            {"type": "message_stop"},
        ]
        return [(ev["type"], ev) for ev in raw]

    # -- responses API ------------------------------------------------------------------------------
    def _response_obj(self, body: JSON, resp_id: str, status: str, output: list[JSON], usage: JSON | None) -> JSON:
        return {
            "id": resp_id,
            "object": "response",
            "created_at": int(time.time()),
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": body.get("model", "gpt-5-nano"),
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            "metadata": {},
        }

    def _responses_usage(self, body: JSON, text: str) -> JSON:
        u = self._usage(body, text)
        return {
            "input_tokens": u["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": u["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u["total_tokens"],
        }

    @staticmethod
    def _message_item(msg_id: str, text: str, status: str = "completed") -> JSON:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {"id": msg_id, "type": "message", "status": status, "role": "assistant", "content": [part]}

    def _responses_body(self, body: JSON, text: str) -> JSON:
        output = [self._message_item(f"msg_{uuid.uuid4().hex}", text)]
        return self._response_obj(
            body, f"resp_{uuid.uuid4().hex}", "completed", output, self._responses_usage(body, text)
        )

    def _responses_events(self, body: JSON, text: str, pieces: list[str]) -> list[Event]:
        resp_id, msg_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        started = self._response_obj(body, resp_id, "in_progress", [], None)
        item = self._message_item(msg_id, text)
        part = item["content"][0]
        loc = {"item_id": msg_id, "output_index": 0, "content_index": 0}
        raw: list[JSON] = [
            {"type": "response.created", "response": started},
            {"type": "response.in_progress", "response": started},
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {**item, "status": "in_progress", "content": []},
            },
            {"type": "response.content_part.added", **loc, "part": {**part, "text": ""}},
        ]
        raw += [
            {"type": "response.output_text.delta", **loc, "delta": p, "logprobs": [], "_content": True} for p in pieces
        ]
        completed = self._response_obj(body, resp_id, "completed", [item], self._responses_usage(body, text))
        raw += [
            {"type": "response.output_text.done", **loc, "text": text, "logprobs": []},
            {"type": "response.content_part.done", **loc, "part": part},
            {"type": "response.output_item.done", "output_index": 0, "item": item},
            {"type": "response.completed", "response": completed},
        ]
        return [(ev["type"], {**ev, "sequence_number": i}) for i, ev in enumerate(raw)]


async def start_fake_hosted(
    host: str = "127.0.0.1", port: int = 0, chunks: int = 4, chunk_delay: float = 0.0
) -> FakeHosted:
    """Start a FakeHosted on ``host:port`` (0 = any free port); stop it with ``await fake.close()``."""
    return await FakeHosted(chunks=chunks, chunk_delay=chunk_delay).start(host, port)


async def _main(host: str, port: int, chunks: int, chunk_delay: float) -> None:
    fake = await start_fake_hosted(host, port, chunks, chunk_delay)
    print(f"fake hosted provider on {fake.url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await fake.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="Fake hosted OpenAI-compatible provider")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args.host, args.port, args.chunks, args.chunk_delay))


if __name__ == "__main__":
    main()

"""An in-process backend whose answers a test scripts — httpx's `MockTransport(handler)` for Switchyard.

It implements the `Backend` protocol (gateway/backends/base.py) exactly as the real ones do: `open`
returns once the first chunk is in hand, raises `UpstreamFailure` for anything before it, and a
failure after it surfaces from the chunk iterator. For fast unit tests of decide/dispatch/relay
beside the real-part tests, never instead of them.

    async def handler(call: Call) -> Reply:
        return Reply.stream("Hel", "lo")
    backend = ScriptedBackend("local", config, handler)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway import failures
from gateway.backends.base import Estimate, Fit, FitQuery, ProbeResult, Upstream
from gateway.config import BackendBase


@dataclass(frozen=True)
class Call:
    body: dict[str, Any]
    headers: dict[str, str]
    stream: bool
    raw: bytes | None


@dataclass
class Reply:
    chunks: list[bytes]
    delay: float = 0.0  # before the first chunk
    chunk_delay: float = 0.0
    fail_after: failures.UpstreamFailure | None = None  # raised after the chunks (mid-stream)
    usage: dict[str, Any] | None = None

    @classmethod
    def stream(cls, *texts: str, usage: dict[str, Any] | None = None, done: bool = True, **kw: Any) -> Reply:
        chunks = [sse({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": t}}]})
                  for t in texts]
        if usage is not None:
            chunks.append(sse({"object": "chat.completion.chunk", "choices": [], "usage": usage}))
        if done:
            chunks.append(b"data: [DONE]\n\n")
        return cls(chunks, **kw)

    @classmethod
    def json(cls, text: str = "ok", usage: dict[str, Any] | None = None, **kw: Any) -> Reply:
        body = {"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant",
                                                                                  "content": text}}]}
        if usage is not None:
            body["usage"] = usage
        return cls([json.dumps(body).encode()], **kw)


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


Handler = Callable[[Call], Awaitable[Reply]]


def failing(kind: failures.Kind, backend: str = "local", message: str = "scripted", **kw: Any) -> Handler:
    async def handler(call: Call) -> Reply:
        raise failures.UpstreamFailure(kind, backend, message, **kw)

    return handler


def replying(*replies: Reply | failures.UpstreamFailure) -> Handler:
    """Answers in order; the last one repeats."""
    queue = list(replies)

    async def handler(call: Call) -> Reply:
        item = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(item, failures.UpstreamFailure):
            raise item
        return item

    return handler


@dataclass
class ScriptedBackend:
    name: str
    config: BackendBase
    handler: Handler
    free: bool = True
    window: int | None = None
    exact: int | None = None  # what count_tokens answers
    method: str = "bytes"  # how fit() says it knew the size when there is no exact count
    place: str = "local"
    unusable: str | None = None
    calls: list[Call] = field(default_factory=list)
    closed: int = 0  # upstreams closed (client gone, end, failover)
    learned: list[tuple[str, int]] = field(default_factory=list)
    predicted: float | None = None  # what estimate() answers (seconds to first byte)
    cached: int = 0  # cached tokens estimate() reports for any prompt
    evicting: str | None = None  # what evicts() answers

    @property
    def context_window(self) -> int | None:
        return self.window

    async def fit(self, q: FitQuery) -> Fit:
        if self.window is None:
            return Fit(True, q.size.estimate, "estimate", None)
        tokens = self.exact if self.exact is not None else q.size.estimate
        limit = min(n for n in (self.window, q.ceiling) if n) if self.free else self.window
        ok = tokens + (q.reserve if self.free else 0) <= limit
        return Fit(ok, tokens, "exact" if self.exact is not None else self.method, limit,
                   "" if ok else f"{tokens:,} tokens > {self.name} ceiling {limit:,}")

    def learn(self, failure: failures.UpstreamFailure, tokens_in: int) -> None:
        self.learned.append((str(failure.kind), tokens_in))

    def estimate(self, q: FitQuery, queued: int, alongside: int = 0) -> Estimate:
        return Estimate(self.predicted, {"queued": queued, "cached_tokens": self.cached})

    def evicts(self, q: FitQuery) -> str | None:
        return self.evicting

    def report(self) -> dict[str, Any]:
        return {}

    async def open(self, body: dict[str, Any], headers: dict[str, str], stream: bool,
                   raw: bytes | None = None) -> Upstream:
        call = Call(body, headers, stream, raw)
        self.calls.append(call)
        reply = await self.handler(call)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        chunks = list(reply.chunks)
        first = chunks.pop(0) if stream else b"".join(chunks)

        async def rest() -> AsyncIterator[bytes]:
            for c in (chunks if stream else []):
                if reply.chunk_delay:
                    await asyncio.sleep(reply.chunk_delay)
                yield c
            if reply.fail_after is not None:
                raise reply.fail_after

        async def close() -> None:
            self.closed += 1

        return Upstream(200, first, rest(), close, usage=reply.usage)

    async def count_tokens(self, body: dict[str, Any]) -> int | None:
        return self.exact

    async def start(self) -> None:
        return None

    async def tiny_request(self) -> ProbeResult | None:
        return None

    async def probe(self) -> ProbeResult:
        return ProbeResult(self.unusable is None, self.unusable or "scripted")

    async def close(self) -> None:
        return None

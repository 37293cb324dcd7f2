"""Step 5: relay. Upstream bytes go to the client as they arrive — never buffered.

Per chunk the relay only looks for a few byte patterns (`[DONE]`, a usage object, an error
event), so a stream costs almost nothing to pass through. It guarantees a well-formed end: a
stream that breaks gets an SSE error event and `[DONE]`; a client that asked for usage always
gets a usage chunk (opencode decides compaction from it); a client that did not (Open WebUI) gets
none, though dispatch asked the upstream for it so that every stream's tokens reach the ledger.
Closing the upstream is in `finally`, so a client that goes away cancels the generation and frees
the local slot at once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import failures
from .backends.base import Upstream
from .errors import error_payload

if TYPE_CHECKING:
    from .protocols import Protocol

_DONE = b"data: [DONE]"
_USAGE, _USAGE_SPACED = b'"usage":{', b'"usage": {'
_ERROR = b'{"error"'  # an SSE error event; inside a JSON string the quotes would be escaped
_CLOSING: set[asyncio.Future[None]] = set()  # background closes of finished streams (kept referenced)


@dataclass(slots=True)
class Outcome:
    """How a relayed answer ended: ok unless `failure` is set or the client went away."""

    usage: dict[str, Any] | None = None
    failure: failures.UpstreamFailure | None = None
    client_gone: bool = False
    first_byte_s: float = 0.0
    timings: dict[str, Any] | None = None  # llama.cpp's, when it sent them (cache_n, prompt_ms, ...)


def _stats_from_json(body: bytes) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(usage, timings) of an answer or of the stream event that carries them."""
    try:
        data = json.loads(body)
    except ValueError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    usage, timings = data.get("usage"), data.get("timings")
    return (usage if isinstance(usage, dict) else None), (timings if isinstance(timings, dict) else None)


def _stats_from_sse(chunk: bytes) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Parse only the `data:` line that carries the usage object (llama.cpp puts its timings there too)."""
    at = max(chunk.rfind(_USAGE), chunk.rfind(_USAGE_SPACED))
    if at < 0:
        return None, None
    start = chunk.rfind(b"data:", 0, at)
    end = chunk.find(b"\n", at)
    return _stats_from_json(chunk[start + 5:end if end >= 0 else len(chunk)].strip())


async def relay_json(request: web.Request, upstream: Upstream, headers: dict[str, str], started: float,
                     usage_of: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None,
                     ) -> tuple[web.StreamResponse, Outcome]:
    """`usage_of` reads a non-chat protocol's answer (Messages, Responses) into chat usage counts."""
    outcome = Outcome(first_byte_s=time.monotonic() - started)
    if upstream.usage is not None:  # the backend assembled or translated it: already read
        usage, outcome.timings = upstream.usage, upstream.timings
    elif usage_of is None:
        usage, outcome.timings = _stats_from_json(upstream.first)
    else:
        usage = _usage_by(usage_of, upstream.first)
    outcome.usage = upstream.usage or usage
    await upstream.close()
    resp = web.Response(status=upstream.status, body=upstream.first, content_type="application/json",
                        headers=headers)
    return resp, outcome


async def relay_stream(request: web.Request, upstream: Upstream, headers: dict[str, str], started: float,
                       *, include_usage: bool, prompt_tokens: int, backend: str) -> tuple[web.StreamResponse, Outcome]:
    outcome = Outcome(first_byte_s=time.monotonic() - started)
    resp = web.StreamResponse(status=200, headers={
        **headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    saw_done = saw_error = False
    usage_chunk: bytes | None = None
    deltas = 0

    async def forward(chunk: bytes) -> None:
        # A few substring scans per chunk (C speed); anything more is done once, at the end.
        nonlocal saw_done, saw_error, usage_chunk, deltas
        if usage_chunk is None:
            if _USAGE in chunk or _USAGE_SPACED in chunk:
                usage_chunk = chunk
                if not include_usage:  # we asked upstream for it on the client's behalf: not theirs to see
                    chunk = _without_usage_event(chunk)
            else:
                deltas += chunk.count(b'"delta"')
        if _ERROR in chunk:
            saw_error = True
            outcome.failure = failures.from_stream_error_event(backend, _error_line(chunk))
        if _DONE in chunk:
            saw_done = True
            if usage_chunk is None:  # the upstream sent none: count what we relayed
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": deltas,
                         "total_tokens": prompt_tokens + deltas}
                outcome.usage = usage
                if include_usage:  # opencode decides compaction from it: always give it one
                    head, _, rest = chunk.partition(_DONE)
                    chunk = head + _usage_event(usage) + _DONE + rest
        if chunk:
            await resp.write(chunk)

    try:
        await resp.prepare(request)
        await forward(upstream.first)
        async for chunk in upstream.rest:
            await forward(chunk)
    except failures.UpstreamFailure as f:
        outcome.failure = f
    except (ConnectionResetError, ConnectionError):
        outcome.client_gone = True
    finally:
        await upstream.close()
    if outcome.client_gone:
        return resp, outcome
    if not saw_done:
        if outcome.failure is None:
            outcome.failure = failures.UpstreamFailure(
                failures.Kind.BROKEN_STREAM, backend, "the stream ended without [DONE]")
        try:
            if not saw_error:
                err = error_payload(_in_words(backend, outcome.failure), "server_error", "upstream_stream_broken")
                await resp.write(b"data: " + json.dumps(err).encode() + b"\n\n")
            await resp.write(_DONE + b"\n\n")
        except (ConnectionResetError, ConnectionError):
            outcome.client_gone = True
            return resp, outcome
    if usage_chunk is not None:
        usage, outcome.timings = _stats_from_sse(usage_chunk)
        if outcome.usage is None:
            outcome.usage = upstream.usage or usage
    elif outcome.usage is None:
        outcome.usage = upstream.usage
    try:
        await resp.write_eof()
    except (ConnectionResetError, ConnectionError):
        outcome.client_gone = True
    return resp, outcome


async def relay_events(request: web.Request, upstream: Upstream, headers: dict[str, str], started: float,
                       *, protocol: Protocol, prompt_tokens: int, backend: str) -> tuple[web.StreamResponse, Outcome]:
    """A Messages or Responses event stream, bytes through. What ends it well, where its usage is
    and how a broken one must end all come from `protocol`; the guarantees are chat's: a stream
    that breaks ends with the protocol's error event, and every stream's tokens reach the ledger."""
    outcome = Outcome(first_byte_s=time.monotonic() - started)
    resp = web.StreamResponse(status=200, headers={
        **headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    saw_end = saw_error = client_left = False
    usage: dict[str, Any] = {}
    deltas = 0

    async def forward(chunk: bytes) -> None:
        nonlocal saw_end, saw_error, deltas
        deltas += chunk.count(protocol.delta_mark)
        if any(m in chunk for m in protocol.usage_marks):
            protocol.stream_usage(chunk, usage)
        if any(m in chunk for m in protocol.errors):
            saw_error = True
            outcome.failure = failures.from_stream_error_event(backend, _error_line(chunk))
        if any(m in chunk for m in protocol.ends):
            saw_end = True
        await resp.write(chunk)

    try:
        await resp.prepare(request)
        await forward(upstream.first)
        rest = upstream.rest
        while not saw_end:  # the end event is final: read no further (a client may hang up right after it)
            try:
                chunk = await anext(rest)
            except StopAsyncIteration:
                break
            await forward(chunk)
    except failures.UpstreamFailure as f:
        outcome.failure = f
    except asyncio.CancelledError:
        if not saw_end:
            raise
        _delivered()
        client_left = True
    except (ConnectionResetError, ConnectionError):
        # Codex hangs up as soon as it reads response.completed: after the end event that is a success.
        outcome.client_gone = not saw_end
        client_left = True
    finally:
        if saw_end:  # nothing more to cancel: close in the background, the answer is complete
            closing = asyncio.ensure_future(upstream.close())
            _CLOSING.add(closing)
            closing.add_done_callback(_CLOSING.discard)
        else:
            await upstream.close()
    if outcome.client_gone:
        return resp, outcome
    if saw_error and outcome.failure is None:
        outcome.failure = failures.UpstreamFailure(failures.Kind.BROKEN_STREAM, backend, "the stream ended in an error")
    if not saw_end and not saw_error:
        if outcome.failure is None:
            outcome.failure = failures.UpstreamFailure(
                failures.Kind.BROKEN_STREAM, backend, f"the stream ended without its {protocol.name} end event")
        try:
            await resp.write(protocol.stream_error(_in_words(backend, outcome.failure)))
        except (ConnectionResetError, ConnectionError):
            outcome.client_gone = True
            return resp, outcome
    outcome.usage = upstream.usage or (
        {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens") if k in usage} or None)
    if outcome.usage is None:  # the upstream sent none: count what we relayed
        outcome.usage = {"prompt_tokens": prompt_tokens, "completion_tokens": deltas,
                         "total_tokens": prompt_tokens + deltas}
    if client_left:
        return resp, outcome
    try:
        await resp.write_eof()
    except (ConnectionResetError, ConnectionError):
        outcome.client_gone = not saw_end
    except asyncio.CancelledError:
        if not saw_end:
            raise
        _delivered()
    return resp, outcome


def _delivered() -> None:
    """The client hung up after the end event (Codex does, the moment it reads response.completed)
    and aiohttp cancelled the handler: the answer was delivered whole, so it is recorded as such."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


def _usage_by(usage_of: Callable[[dict[str, Any]], dict[str, Any] | None], body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return usage_of(data) if isinstance(data, dict) else None


def _in_words(backend: str, f: failures.UpstreamFailure) -> str:
    """What a person reading the chat should see, not an exception class name."""
    if f.kind is failures.Kind.CRASH:
        return f"The {backend} model stopped responding mid-stream (its connection was lost); the answer is incomplete."
    if f.kind is failures.Kind.TIMEOUT:
        return f"The {backend} model went silent mid-stream ({f.message}); the answer is incomplete."
    return f"The {backend} model's answer ended early, mid-stream ({f.message}); the answer is incomplete."


def _without_usage_event(chunk: bytes) -> bytes:
    """Drop the usage-only SSE event (`"choices":[]`) from a chunk; an event that also carries
    content stays whole (an extra usage field harms no client)."""
    at = max(chunk.rfind(_USAGE), chunk.rfind(_USAGE_SPACED))
    start = chunk.rfind(b"data:", 0, at)
    end = chunk.find(b"\n\n", at)
    end = len(chunk) if end < 0 else end + 2
    event = chunk[start:end]
    if start < 0 or (b'"choices":[]' not in event and b'"choices": []' not in event):
        return chunk
    return chunk[:start] + chunk[end:]


def _error_line(chunk: bytes) -> bytes:
    for line in chunk.split(b"\n"):
        if line.startswith(b"data:") and (_ERROR in line or b'"error"' in line):
            return line[5:].strip()
    return chunk


def _usage_event(usage: dict[str, Any]) -> bytes:
    event = {"object": "chat.completion.chunk", "choices": [], "usage": usage}
    return b"data: " + json.dumps(event).encode() + b"\n\n"

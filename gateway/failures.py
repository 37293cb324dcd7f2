"""What an upstream failure *is*. Every other module asks this one.

The taxonomy decides two things per failure: its kind, and whether that kind counts against the
backend's circuit breaker (a crash, a timeout, a 5xx or a rejected gateway key does; a client
mistake, a 429 or a context overflow never does). Where the request goes next is the
dispatcher's choice: a client error is answered at once, anything else moves on to the route's
next backend.

A request's fault is decided here before it can count against a backend: an upstream 4xx, a
llama.cpp 500 whose message says it could not parse the request, and an exception raised on our
side before any byte left for the provider (litellm encoding a lone surrogate, a bad field type)
are all the client's, answered 400 and never counted.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import aiohttp


class Kind(StrEnum):
    CRASH = "crash"  # refused, reset, closed without response, router child died
    TIMEOUT = "timeout"  # no first byte / idle too long / total budget spent
    UNAVAILABLE = "unavailable"  # 503 (loading) and other 5xx
    AUTH = "auth"  # the provider rejected *our* key (401/403): the operator's problem, not the client's
    RATE_LIMITED = "rate_limited"  # 429
    CONTEXT_OVERFLOW = "context_overflow"  # the prompt does not fit this backend
    CLIENT_ERROR = "client_error"  # the caller's mistake: answered 400/4xx, never retried, never counted
    BROKEN_STREAM = "broken_stream"  # stream ended without [DONE] or carried an error event


# Failures that say the backend itself is unhealthy: they feed its circuit breaker.
_COUNTS_AGAINST_BACKEND = {Kind.CRASH, Kind.TIMEOUT, Kind.UNAVAILABLE, Kind.AUTH, Kind.BROKEN_STREAM}

_OVERFLOW_MARKERS = (
    "exceed_context_size_error",
    "context_length_exceeded",
    "exceeds the available context size",
    "maximum context length",
    "context window",
)
_CRASH_MARKERS = ("failed to read connection",)  # llama.cpp router mode: the child died
# llama.cpp answers some malformed requests with 500 instead of 400: its HTTP wrapper maps only
# std::invalid_argument to 400, and the chat parser rethrows those as std::runtime_error
# ("Failed to parse messages: Missing content part type ..."). These messages, from
# tools/server/server-common.cpp and common/chat.cpp, name a request the client must fix.
_LLAMACPP_CLIENT_MARKERS = (
    "failed to parse",  # messages, tools, tool call arguments as JSON
    "unsupported param",  # best_of, suffix
    "unsupported content part type",
    "missing content part type",
    "invalid 'content' type",
    "invalid tool_choice",
    "'messages' is required",
    "only no echo is supported",
    "invalid base64 value",
    "input is not supported",  # image/audio/video input on a model without a projector
    "does not support multimodal",
    "requires --jinja flag",  # tools / tool_choice on a server without --jinja
    "cannot use both json_schema and grammar",
    "failed to download image",
    "failed to load image or audio file",
    "[json.exception.",  # nlohmann type errors: a field of the wrong JSON type
)


@dataclass(eq=False)
class UpstreamFailure(Exception):
    kind: Kind
    backend: str
    message: str
    status: int | None = None
    retry_after: float | None = None  # seconds, as the upstream asked
    body: bytes | None = None  # the upstream's own error body, passed through for client errors
    headers: dict[str, str] | None = None

    def __post_init__(self) -> None:
        super().__init__(f"{self.backend}: {self.kind}: {self.message}")

    @property
    def counts_against_backend(self) -> bool:
        return self.kind in _COUNTS_AGAINST_BACKEND


def client_error(backend: str, message: str) -> UpstreamFailure:
    """The request itself is at fault: 400 with our own OpenAI-shaped body, never counted."""
    return UpstreamFailure(Kind.CLIENT_ERROR, backend, message, 400)


def parse_retry_after(headers: Any) -> float | None:
    """`retry-after-ms` first, then `retry-after` as seconds or an HTTP date (OpenAI's SDKs read
    them in this order); anything unparseable is no hint at all."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_fields(body: bytes) -> tuple[str, str]:
    """(message, "message type code") of an upstream error body (llama.cpp's key order varies:
    parse it, never string-compare)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        text = body[:300].decode("utf-8", "replace")
        return text, text
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            parts = [str(err.get(k, "")) for k in ("message", "type", "code")]
            return parts[0], " ".join(p for p in parts if p)
        return str(err), str(err)
    return str(data)[:300], str(data)[:300]


def from_status(backend: str, status: int, headers: Any, body: bytes) -> UpstreamFailure:
    message, text = _error_fields(body)
    lowered = text.lower()
    hdrs = {k.lower(): v for k, v in headers.items()} if headers is not None else {}
    if status == 429:
        return UpstreamFailure(Kind.RATE_LIMITED, backend, text or "rate limited", status,
                               parse_retry_after(hdrs), body, hdrs)
    if status in (401, 403):
        # The client's own key was already checked by us: this is the gateway's key (or account)
        # the provider refused. Never pass it through as the client's auth error; the provider's
        # text stays out of the message because it may echo part of the key.
        return UpstreamFailure(Kind.AUTH, backend, f"provider rejected the gateway's API key (HTTP {status})",
                               status, None, None, hdrs)
    if status in (400, 413) and any(m in lowered for m in _OVERFLOW_MARKERS):
        return UpstreamFailure(Kind.CONTEXT_OVERFLOW, backend, text, status, None, body, hdrs)
    if status == 500 and any(m in lowered for m in _LLAMACPP_CLIENT_MARKERS):
        return client_error(backend, f"{backend} rejected the request: {message[:500]}")
    if status >= 500:
        kind = Kind.CRASH if any(m in lowered for m in _CRASH_MARKERS) else Kind.UNAVAILABLE
        return UpstreamFailure(kind, backend, text or f"HTTP {status}", status,
                               parse_retry_after(hdrs), body, hdrs)
    return UpstreamFailure(Kind.CLIENT_ERROR, backend, text or f"HTTP {status}", status, None, body, hdrs)


def _network(exc: BaseException) -> bool:
    """Did this exception come from talking to the network (so the provider may be at fault)?"""
    root = type(exc).__module__.split(".", 1)[0]
    return root in ("aiohttp", "httpx", "httpcore") or isinstance(exc, (OSError, TimeoutError))


def _local_cause(exc: BaseException) -> BaseException | None:
    """The error raised on our side before any byte left for the provider, if that is what `exc`
    is or wraps: litellm re-raises a `UnicodeEncodeError` (a lone surrogate, a non-ASCII header)
    or a `TypeError` ("Unsupported response_format type") as its own 500-status exception with
    the original as the cause. A chain that passes through the network is the provider's."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None or _network(seen):
            return None
        if isinstance(seen, (json.JSONDecodeError, UnicodeDecodeError)):
            return None  # decoding what came back: the provider's answer was bad
        if isinstance(seen, (ValueError, TypeError)):  # incl. UnicodeEncodeError, pydantic's ValidationError
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def raised_locally(backend: str, exc: BaseException) -> UpstreamFailure | None:
    """A client error for an exception raised in an adapter before the request was sent, else None."""
    cause = _local_cause(exc)
    if cause is None:
        return None
    return client_error(backend, f"the request could not be sent to {backend}: {type(cause).__name__}: "
                                 f"{str(cause)[:300]}")


def from_exception(backend: str, exc: BaseException) -> UpstreamFailure:
    if isinstance(exc, UpstreamFailure):
        return exc
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, aiohttp.ServerTimeoutError)):
        return UpstreamFailure(Kind.TIMEOUT, backend, "timed out waiting for the backend")
    if isinstance(exc, (aiohttp.ClientConnectionError, ConnectionError, aiohttp.ClientPayloadError)):
        return UpstreamFailure(Kind.CRASH, backend, f"connection failed: {type(exc).__name__}")
    local = raised_locally(backend, exc)
    if local is not None:
        return local
    return UpstreamFailure(Kind.CRASH, backend, f"{type(exc).__name__}: {exc}")


def from_stream_error_event(backend: str, payload: bytes) -> UpstreamFailure:
    """llama.cpp reports an error after the stream started as `data: {"error": ...}`."""
    _, text = _error_fields(payload)
    if any(m in text.lower() for m in _OVERFLOW_MARKERS):
        return UpstreamFailure(Kind.CONTEXT_OVERFLOW, backend, text)
    return UpstreamFailure(Kind.BROKEN_STREAM, backend, text or "error event in stream")

"""What an upstream failure *is*. Every other module asks this one.

The taxonomy decides three things per failure: whether it counts against the backend's circuit
(a crash does, a client mistake or a context overflow never does), whether the request may go on
to the next backend in its route, and whether the same backend may be retried after a wait (429).
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
    RATE_LIMITED = "rate_limited"  # 429
    CONTEXT_OVERFLOW = "context_overflow"  # the prompt does not fit this backend
    CLIENT_ERROR = "client_error"  # 4xx the caller caused: pass through, never retry
    BROKEN_STREAM = "broken_stream"  # stream ended without [DONE] or carried an error event


# Failures that say the backend itself is unhealthy: they feed its circuit breaker.
_COUNTS_AGAINST_BACKEND = {Kind.CRASH, Kind.TIMEOUT, Kind.UNAVAILABLE, Kind.BROKEN_STREAM}
# Failures after which another backend may still serve the request.
_FAIL_OVER = {Kind.CRASH, Kind.TIMEOUT, Kind.UNAVAILABLE, Kind.RATE_LIMITED, Kind.CONTEXT_OVERFLOW,
              Kind.BROKEN_STREAM}

_OVERFLOW_MARKERS = (
    "exceed_context_size_error",
    "context_length_exceeded",
    "exceeds the available context size",
    "maximum context length",
    "context window",
)
_CRASH_MARKERS = ("failed to read connection",)  # llama.cpp router mode: the child died


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

    @property
    def may_fail_over(self) -> bool:
        return self.kind in _FAIL_OVER


def parse_retry_after(headers: Any) -> float | None:
    """`retry-after-ms` first, then `retry-after` as seconds or an HTTP date — the order opencode itself
    honours them in (1.18.33)."""
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


def _error_text(body: bytes) -> str:
    """The upstream's error message, parsed (llama.cpp's key order varies: never string-compare)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body[:300].decode("utf-8", "replace")
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            parts = [str(err.get(k, "")) for k in ("message", "type", "code")]
            return " ".join(p for p in parts if p)
        return str(err)
    return str(data)[:300]


def from_status(backend: str, status: int, headers: Any, body: bytes) -> UpstreamFailure:
    text = _error_text(body)
    lowered = text.lower()
    hdrs = {k.lower(): v for k, v in headers.items()} if headers is not None else {}
    if status == 429:
        return UpstreamFailure(Kind.RATE_LIMITED, backend, text or "rate limited", status,
                               parse_retry_after(hdrs), body, hdrs)
    if status in (400, 413) and any(m in lowered for m in _OVERFLOW_MARKERS):
        return UpstreamFailure(Kind.CONTEXT_OVERFLOW, backend, text, status, None, body, hdrs)
    if status >= 500:
        kind = Kind.CRASH if any(m in lowered for m in _CRASH_MARKERS) else Kind.UNAVAILABLE
        return UpstreamFailure(kind, backend, text or f"HTTP {status}", status,
                               parse_retry_after(hdrs), body, hdrs)
    return UpstreamFailure(Kind.CLIENT_ERROR, backend, text or f"HTTP {status}", status, None, body, hdrs)


def from_exception(backend: str, exc: BaseException) -> UpstreamFailure:
    if isinstance(exc, UpstreamFailure):
        return exc
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, aiohttp.ServerTimeoutError)):
        return UpstreamFailure(Kind.TIMEOUT, backend, "timed out waiting for the backend")
    if isinstance(exc, (aiohttp.ClientConnectionError, ConnectionError, aiohttp.ClientPayloadError)):
        return UpstreamFailure(Kind.CRASH, backend, f"connection failed: {type(exc).__name__}")
    return UpstreamFailure(Kind.CRASH, backend, f"{type(exc).__name__}: {exc}")


def from_stream_error_event(backend: str, payload: bytes) -> UpstreamFailure:
    """llama.cpp reports an error after the stream started as `data: {"error": ...}`."""
    text = _error_text(payload)
    if any(m in text.lower() for m in _OVERFLOW_MARKERS):
        return UpstreamFailure(Kind.CONTEXT_OVERFLOW, backend, text)
    return UpstreamFailure(Kind.BROKEN_STREAM, backend, text or "error event in stream")

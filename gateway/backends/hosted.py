"""A hosted provider through litellm: its clients, its Responses bridge, its error mapping.

litellm is imported lazily (the import takes seconds) and warmed in a thread at startup, so CLI
paths that never call a provider stay instant. Its own retries are switched off: 429 backoff is
the gateway's (retry.py), so that waits honour the request's budget and failover can take over.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from .. import catalog, failures
from ..config import LiteLLMBackend as LiteLLMConfig
from ..tokens import count_tiktoken
from .base import Fit, FitQuery, ProbeResult, Upstream, empty_rest
from .hosted_protocols import open_protocol

# Otherwise litellm downloads its price map at import and retries for seconds when offline.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

# A provider answers an overflow itself (relayed as context_length_exceeded, so opencode compacts):
# a wrong "fits" costs one round trip, so a likely bound is enough here.
LIKELY_BYTES_PER_TOKEN = 2.0

# Body fields that litellm takes as named arguments of its own; everything else is forwarded.
_OWN = {"model", "messages", "stream", "stream_options"}


def load_litellm() -> Any:
    litellm = importlib.import_module("litellm")
    litellm.suppress_debug_info = True
    # litellm logs whole request kwargs (prompts included) at DEBUG/INFO: keep its loggers at WARNING
    # whatever level the gateway runs at, so no prompt text ever reaches a log line.
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "litellm"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return litellm


class HostedBackend:
    place = "hosted"
    free = False  # billed per token: budgets apply

    def __init__(self, name: str, config: LiteLLMConfig) -> None:
        self.name = name
        self.config = config
        self.info = catalog.lookup(config.model)

    @property
    def context_window(self) -> int | None:
        if self.config.context_limit:
            return self.config.context_limit
        return self.info.max_input_tokens if self.info else None

    @property
    def unusable(self) -> str | None:
        cfg = self.config
        if cfg.api_key_env and not cfg.api_key:
            return f"{cfg.api_key_env} is not set"
        return None

    def _kwargs(self, body: dict[str, Any], headers: dict[str, str], stream: bool) -> dict[str, Any]:
        cfg = self.config
        extra_headers = dict(cfg.extra_headers)
        session = headers.get("x-session-id")
        if cfg.session_header and session:
            extra_headers[cfg.session_header] = session  # zen rejects calls without it
        kwargs: dict[str, Any] = {k: v for k, v in body.items() if k not in _OWN}
        kwargs.update(
            model=cfg.model,
            messages=body["messages"],
            stream=stream,
            api_base=cfg.api_base,
            api_key=cfg.api_key,
            extra_headers=extra_headers or None,
            num_retries=0,
            max_retries=0,
            drop_params=True,  # a field this provider lacks (e.g. temperature for gpt-5) is dropped, not an error
            timeout=cfg.timeouts.total,
        )
        if stream:
            kwargs["stream_options"] = body.get("stream_options") or {"include_usage": True}
        return kwargs

    async def open(self, body: dict[str, Any], headers: dict[str, str], stream: bool,
                   raw: bytes | None = None, protocol: str = "chat") -> Upstream:
        if protocol != "chat":  # Messages / Responses: litellm's adapters, in hosted_protocols.py
            return await open_protocol(self, body, headers, stream, protocol)
        litellm = load_litellm()
        try:
            async with asyncio.timeout(self.config.timeouts.first_byte):
                response = await litellm.acompletion(**self._kwargs(body, headers, stream))
                if not stream:
                    payload = response.model_dump_json(exclude_none=True).encode()
                    usage = getattr(response, "usage", None)
                    return Upstream(200, payload, empty_rest(), _noop,
                                    usage=usage.model_dump() if usage else None)
                chunks = aiter(response)
                first = await anext(chunks)
        except Exception as e:
            raise self._failure(e) from e
        upstream = Upstream(200, _sse(first), empty_rest(), _closer(response))
        upstream.rest = self._relay(chunks, upstream)
        return upstream

    async def _relay(self, chunks: AsyncIterator[Any], upstream: Upstream) -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                usage = getattr(chunk, "usage", None)
                if usage:
                    upstream.usage = usage.model_dump()
                yield _sse(chunk)
        except Exception as e:
            raise self._failure(e) from e
        yield b"data: [DONE]\n\n"

    def _failure(self, exc: BaseException) -> failures.UpstreamFailure:
        local = failures.raised_locally(self.name, exc)  # litellm wraps its own encoding errors as 500s
        if local is not None:
            return local
        if type(exc).__name__ == "Timeout" or isinstance(exc, TimeoutError):  # litellm's Timeout has status 408
            return failures.UpstreamFailure(failures.Kind.TIMEOUT, self.name, "provider timed out")
        status = getattr(exc, "status_code", None)
        if isinstance(status, int) and status >= 400:
            failure = failures.from_status(self.name, status, _headers_of(exc), _body_of(exc))
            if type(exc).__name__ == "ContextWindowExceededError":
                failure.kind = failures.Kind.CONTEXT_OVERFLOW
            if type(exc).__name__ in ("APIConnectionError",):
                failure.kind = failures.Kind.CRASH
            return failure
        return failures.from_exception(self.name, exc)

    async def fit(self, q: FitQuery) -> Fit:
        limit = self.context_window
        size = q.size
        if limit is None:
            return Fit(True, size.estimate, "estimate", None)
        if int(size.nbytes / LIKELY_BYTES_PER_TOKEN) <= limit:
            return Fit(True, size.estimate, "bytes", limit)
        if size.lower > limit:
            return Fit(False, size.estimate, "bytes", limit, f"{size.estimate:,} tokens > {self.name} window {limit:,}")
        n = await self.count_tokens(q.body)
        return Fit(n <= limit, n, "exact", limit, "" if n <= limit else f"{n:,} tokens > {self.name} window {limit:,}")

    def learn(self, failure: failures.UpstreamFailure, tokens_in: int) -> None:
        return None  # a provider reports its own limits

    async def count_tokens(self, body: dict[str, Any]) -> int:
        return await asyncio.to_thread(count_tiktoken, body)  # ~16 ms for 350 KB: off the event loop

    async def start(self) -> None:
        # Importing litellm takes seconds: do it now, in a thread, not on the first request's loop turn.
        await asyncio.to_thread(load_litellm)

    async def tiny_request(self) -> ProbeResult | None:
        return None  # costs money and quota: the next live request is the trial

    async def probe(self) -> ProbeResult:
        if self.unusable:
            return ProbeResult(False, self.unusable)
        # Probing a paid, rate-limited provider costs money and quota: the half-open trial request
        # is the probe. Report ready so the breaker lets one live request through.
        return ProbeResult(True, "hosted: trial request decides")

    async def close(self) -> None:
        return None


def _headers_of(exc: BaseException) -> dict[str, str]:
    for attr in ("litellm_response_headers", "headers"):
        h = getattr(exc, attr, None)
        if h:
            return {k.lower(): v for k, v in dict(h).items()}
    resp = getattr(exc, "response", None)
    h = getattr(resp, "headers", None)
    return {k.lower(): v for k, v in dict(h).items()} if h else {}


def _body_of(exc: BaseException) -> bytes:
    """The provider's own error body: from the HTTP response, else from litellm's message."""
    raw = getattr(getattr(exc, "response", None), "content", None)
    if isinstance(raw, bytes) and raw.strip():
        return raw
    message = str(getattr(exc, "message", None) or exc)
    start = message.find("{")  # "litellm.BadRequestError: OpenAIException - {...}"
    return (message[start:] if start >= 0 else message).encode()


def _sse(chunk: Any) -> bytes:
    return b"data: " + chunk.model_dump_json(exclude_none=True).encode() + b"\n\n"


async def _noop() -> None:
    return None


def _closer(response: Any) -> Any:
    async def close() -> None:
        aclose = getattr(response, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:  # closing a half-read provider stream must not mask the real outcome
                pass
        # litellm's wrapper keeps the httpx stream in completion_stream
        inner = getattr(response, "completion_stream", None)
        inner_close = getattr(inner, "aclose", None)
        if inner_close is not None:
            try:
                await inner_close()
            except Exception:
                pass

    return close

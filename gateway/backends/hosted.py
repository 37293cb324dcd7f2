"""A hosted provider: litellm says what to send (litellm_wire.py), we send it and relay the answer.

Where the provider speaks OpenAI chat completions the answer's bytes are relayed as they come, as
the local path does (relay.py parses only usage, errors and the end). Responses-only models get
each event translated directly (responses_sse.py). Any other provider goes through
`litellm.acompletion` as before, at litellm's per-chunk cost.

litellm is imported lazily (the import takes seconds) and warmed in a thread at startup, so CLI
paths that never call a provider stay instant. Its own retries are switched off: 429 backoff is
the gateway's (retry.py), so that waits honour the request's budget and failover can take over.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from .. import catalog, failures, tokens
from ..config import LiteLLMBackend as LiteLLMConfig
from .base import Estimate, Fit, FitQuery, ProbeResult, Upstream, empty_rest
from .hosted_protocols import open_protocol
from .litellm_wire import ProviderWire, WireRequest
from .responses_sse import ResponsesToChat, response_to_completion
from .speed import Speeds

# Otherwise litellm downloads its price map at import and retries for seconds when offline.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

# Body fields that litellm takes as named arguments of its own; everything else is forwarded.
_OWN = {"model", "messages", "stream", "stream_options"}
_frozen: list[bool] = []


def load_litellm() -> Any:
    litellm = importlib.import_module("litellm")
    litellm.suppress_debug_info = True
    # litellm logs whole request kwargs (prompts included) at DEBUG/INFO: keep its loggers at WARNING
    # whatever level the gateway runs at, so no prompt text ever reaches a log line.
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "litellm"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # litellm's import leaves ~1M long-lived objects that every full collection would walk again
    # (tens of ms each, on the event loop): move them out of the collector's view once.
    if not _frozen:
        _frozen.append(True)
        gc.freeze()
    return litellm


# A provider answers an overflow itself (relayed as context_length_exceeded, so opencode compacts):
# a wrong "fits" costs one round trip, so a likely bound is enough here.
LIKELY_BYTES_PER_TOKEN = 2.0


class HostedBackend:
    place = "hosted"
    free = False  # billed per token: budgets apply

    def __init__(self, name: str, config: LiteLLMConfig, speeds: Speeds | None = None) -> None:
        self.name = name
        self.config = config
        self.speeds = speeds or Speeds()
        self.info = catalog.lookup(config.model)
        self._wire: ProviderWire | None = None
        self._session: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None

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

    @property
    def wire(self) -> ProviderWire:
        if self._wire is None:
            self._wire = ProviderWire(load_litellm(), self.config)
        return self._wire

    def _new_session(self, force_close: bool) -> aiohttp.ClientSession:
        t = self.config.timeouts
        return aiohttp.ClientSession(
            # Providers keep connections alive (TLS setup is the expensive part): pool them.
            connector=aiohttp.TCPConnector(force_close=force_close, limit=0),
            timeout=aiohttp.ClientTimeout(total=t.total, sock_connect=t.connect, sock_read=t.idle),
            skip_auto_headers=("User-Agent",),
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = self._new_session(force_close=False)
        return self._session

    @property
    def fresh_session(self) -> aiohttp.ClientSession:
        if self._fresh is None or self._fresh.closed:
            self._fresh = self._new_session(force_close=True)
        return self._fresh

    def _extra_headers(self, headers: dict[str, str]) -> dict[str, str]:
        cfg = self.config
        extra = dict(cfg.extra_headers)
        session = headers.get("x-session-id")
        if cfg.session_header and session:
            extra[cfg.session_header] = session  # zen rejects calls without it
        return extra

    async def open(self, body: dict[str, Any], headers: dict[str, str], stream: bool,
                   raw: bytes | None = None, protocol: str = "chat") -> Upstream:
        extra = self._extra_headers(headers)
        try:
            if protocol == "chat":
                req = self.wire.build(body, extra, stream)
            else:  # Messages to a provider that speaks Messages: its bytes; else litellm's adapters
                native = self.wire.messages(body, extra, stream) if protocol == "messages" else None
                if native is None:
                    return await open_protocol(self, body, headers, stream, protocol)
                req = native
        except Exception as e:  # litellm refusing the request (unsupported param, bad shape)
            raise self._failure(e) from e
        if req.mode == "litellm":
            return await self._open_litellm(body, extra, stream)
        try:
            async with asyncio.timeout(self.config.timeouts.first_byte):
                resp = await self._post(req)
                try:
                    if resp.status != 200:
                        raise failures.from_status(self.name, resp.status, resp.headers, await resp.read())
                    if not stream:
                        return self._whole(req, resp, await resp.read())
                    chunks = resp.content.iter_any()
                    if req.mode in ("chat", "messages"):  # the caller's own protocol: bytes through
                        first = await anext(chunks, b"")
                        rest = _guarded(self.name, chunks)
                    else:
                        upstream = Upstream(200, b"", empty_rest(), _closer(resp))
                        translator = ResponsesToChat(req.model, req.include_usage)
                        first = await _first_translated(translator, chunks)
                        rest = _translated(self.name, translator, chunks, upstream)
                    if not first:
                        raise failures.UpstreamFailure(failures.Kind.CRASH, self.name, "stream closed before any data")
                except BaseException:
                    resp.close()
                    raise
        except failures.UpstreamFailure:
            raise
        except Exception as e:
            raise failures.from_exception(self.name, e) from e
        if req.mode in ("chat", "messages"):
            return Upstream(200, first, rest, _closer(resp))
        upstream.first, upstream.rest = first, rest
        return upstream

    async def _post(self, req: WireRequest) -> aiohttp.ClientResponse:
        try:
            return await self.session.post(req.url, data=req.body, headers=req.headers)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            # A pooled socket the provider had closed fails before any response byte: once more on a
            # fresh connection (a provider that is really down refuses that one too).
            return await self.fresh_session.post(req.url, data=req.body, headers=req.headers)

    def _whole(self, req: WireRequest, resp: aiohttp.ClientResponse, payload: bytes) -> Upstream:
        if req.mode in ("chat", "messages"):  # usage is read by the relay, in the caller's protocol
            return Upstream(200, payload, empty_rest(), _closer(resp))
        try:
            completion = response_to_completion(json.loads(payload), req.model)
        except (ValueError, AttributeError, TypeError) as e:
            raise failures.UpstreamFailure(failures.Kind.UNAVAILABLE, self.name,
                                           f"unreadable Responses answer: {type(e).__name__}") from e
        return Upstream(200, json.dumps(completion).encode(), empty_rest(), _closer(resp),
                        usage=completion.get("usage"))

    # ---- providers litellm speaks for us end to end ---------------------------------------------

    def _kwargs(self, body: dict[str, Any], extra_headers: dict[str, str], stream: bool) -> dict[str, Any]:
        cfg = self.config
        kwargs: dict[str, Any] = {k: v for k, v in body.items() if k not in _OWN}
        kwargs.update(
            model=cfg.model, messages=body["messages"], stream=stream, api_base=cfg.api_base, api_key=cfg.api_key,
            extra_headers=extra_headers or None, num_retries=0, max_retries=0,
            drop_params=True,  # a field this provider lacks (e.g. temperature for gpt-5) is dropped, not an error
            timeout=cfg.timeouts.total,
        )
        if stream:
            kwargs["stream_options"] = body.get("stream_options") or {"include_usage": True}
        return kwargs

    async def _open_litellm(self, body: dict[str, Any], extra_headers: dict[str, str], stream: bool) -> Upstream:
        litellm = load_litellm()
        try:
            async with asyncio.timeout(self.config.timeouts.first_byte):
                response = await litellm.acompletion(**self._kwargs(body, extra_headers, stream))
                if not stream:
                    payload = response.model_dump_json(exclude_none=True).encode()
                    usage = getattr(response, "usage", None)
                    return Upstream(200, payload, empty_rest(), _noop,
                                    usage=usage.model_dump() if usage else None)
                chunks = aiter(response)
                first = await anext(chunks)
        except Exception as e:
            raise self._failure(e) from e
        upstream = Upstream(200, _sse(first), empty_rest(), _litellm_closer(response))
        upstream.rest = self._relay_objects(chunks, upstream)
        return upstream

    async def _relay_objects(self, chunks: AsyncIterator[Any], upstream: Upstream) -> AsyncIterator[bytes]:
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
        return classify_litellm(self.name, exc)

    async def count_tokens(self, body: dict[str, Any]) -> int:
        # tiktoken on a 350 KB prompt takes ~16 ms: never on the event loop.
        return await asyncio.to_thread(tokens.count_tiktoken, body)

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

    def estimate(self, q: FitQuery, queued: int, alongside: int = 0) -> Estimate:
        """A provider's recent time to first byte (it prefills far faster than our box)."""
        return Estimate(self.speeds.first_byte, {"recent_first_byte_s": self.speeds.first_byte})

    def evicts(self, q: FitQuery) -> str | None:
        return None

    def report(self) -> dict[str, Any]:
        return {}

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
        for s in (self._session, self._fresh):
            if s is not None:
                await s.close()


def classify_litellm(backend: str, exc: BaseException) -> failures.UpstreamFailure:
    """A litellm exception as a failure kind, by class (subclasses included), then by status."""
    if isinstance(exc, failures.UpstreamFailure):
        return exc
    local = failures.raised_locally(backend, exc)  # litellm wraps its own encoding errors as 500s
    if local is not None:
        return local
    import litellm.exceptions as lx

    if isinstance(exc, (lx.Timeout, TimeoutError)):  # litellm's Timeout carries status 408
        return failures.UpstreamFailure(failures.Kind.TIMEOUT, backend, "provider timed out")
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and status >= 400:
        failure = failures.from_status(backend, status, _headers_of(exc), _body_of(exc))
        if isinstance(exc, lx.ContextWindowExceededError):
            failure.kind = failures.Kind.CONTEXT_OVERFLOW
        elif isinstance(exc, lx.APIConnectionError):
            failure.kind = failures.Kind.CRASH
        return failure
    return failures.from_exception(backend, exc)


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


async def _first_translated(translator: ResponsesToChat, chunks: AsyncIterator[bytes]) -> bytes:
    """Read until the first event that makes a chat chunk (`response.created`, normally the first)."""
    async for chunk in chunks:
        out = translator.feed(chunk)
        if out:
            return out
    return b""


async def _translated(name: str, translator: ResponsesToChat, chunks: AsyncIterator[bytes],
                      upstream: Upstream) -> AsyncIterator[bytes]:
    upstream.usage = translator.usage
    if translator.finished:  # the whole answer came in the first read
        return
    try:
        async for chunk in chunks:
            out = translator.feed(chunk)
            if translator.usage is not None:
                upstream.usage = translator.usage  # for the ledger even when the client asked for no usage
            if out:
                yield out
            if translator.finished:
                return
    except (aiohttp.ClientError, ConnectionError, TimeoutError) as e:
        raise failures.from_exception(name, e) from e


async def _guarded(name: str, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield chunk
    except (aiohttp.ClientError, ConnectionError, TimeoutError) as e:
        raise failures.from_exception(name, e) from e


def _closer(resp: aiohttp.ClientResponse) -> Any:
    async def close() -> None:
        # Closing (not releasing) drops the connection: the provider stops generating.
        resp.close()

    return close


def _sse(chunk: Any) -> bytes:
    return b"data: " + chunk.model_dump_json(exclude_none=True).encode() + b"\n\n"


async def _noop() -> None:
    return None


def _litellm_closer(response: Any) -> Any:
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

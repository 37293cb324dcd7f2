"""Step 4: dispatch. Walk the route: queue for a slot, wait out 429s, open, fail over, relay.

Everything that can go wrong before the first byte reaches the client is survivable here: the
request moves to its next backend and the client sees one clean response (with
`x-switchyard-failover` saying what happened). After the first byte, relay.py ends the stream
cleanly instead. Each backend is tried at most once per request, so a crashed backend is never
hit twice by the same request.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from aiolimiter import AsyncLimiter

from . import catalog, failures
from .backends.base import Backend, Upstream
from .breaker import CircuitBreaker, State
from .ceiling import CrashCeilings
from .classify import RequestProfile
from .decide import Route, Step
from .errors import ContextLengthExceeded, GatewayError, NoBackendAvailable, RateLimited, error_payload
from .receive import ChatRequest
from .record import Decision
from .relay import Outcome, relay_json, relay_stream
from .retry import rate_limit_retrying
from .slots import SlotQueue

_FORWARDED_HEADERS = ("x-session-id",)


class Dispatcher:
    def __init__(self, backends: Mapping[str, Backend], breakers: Mapping[str, CircuitBreaker],
                 queues: Mapping[str, SlotQueue], limiters: Mapping[str, AsyncLimiter],
                 ceilings: CrashCeilings | None = None) -> None:
        self.ceilings = ceilings
        self.backends = backends
        self.breakers = breakers
        self.queues = queues
        self.limiters = limiters

    async def dispatch(self, request: web.Request, req: ChatRequest, profile: RequestProfile, route: Route,
                       decision: Decision, started: float) -> web.StreamResponse:
        headers = {h: req.headers[h] for h in _FORWARDED_HEADERS if h in req.headers}
        tried: list[failures.UpstreamFailure] = []
        spilled: list[str] = []
        for i, step in enumerate(route.steps):
            last = i == len(route.steps) - 1
            backend = self.backends[step.backend]
            breaker = self.breakers.get(step.backend)
            if breaker is not None and not breaker.allows():
                spilled.append(breaker.describe())
                continue
            queue = self.queues.get(step.backend)
            wait = backend.config.timeouts.first_byte if last else step.max_queue_wait
            if queue is None:
                result = await self._attempt(request, req, route, step, backend, breaker, headers, decision,
                                             started, tried, spilled)
            else:
                async with queue.slot(0 if profile.interactive else 1, wait) as (got, waited):
                    decision.queue_wait_ms += waited * 1000
                    if not got:
                        spilled.append(f"{step.backend} queue wait > {wait:g}s: spilled")
                        continue
                    result = await self._attempt(request, req, route, step, backend, breaker, headers, decision,
                                                 started, tried, spilled)
            if result is not None:
                return result
        raise self._exhausted(tried, spilled)

    async def _attempt(self, request: web.Request, req: ChatRequest, route: Route, step: Step, backend: Backend,
                       breaker: CircuitBreaker | None, headers: dict[str, str], decision: Decision,
                       started: float, tried: list[failures.UpstreamFailure],
                       spilled: list[str]) -> web.StreamResponse | None:
        body = self._upstream_body(req.body, backend, route)
        if breaker is not None:
            breaker.begin()
        decision.overhead_ms = (time.monotonic() - started) * 1000 - decision.queue_wait_ms
        try:
            # Unchanged body: send the client's bytes as they came (no re-encoding of a 300 KB prompt).
            raw = req.raw if body is req.body else None
            upstream = await self._open(backend, body, headers, req.stream, decision, raw)
        except failures.UpstreamFailure as f:
            self._judge(breaker, f)
            self._learn(backend, f, route)
            if f.kind is failures.Kind.CLIENT_ERROR:
                return _pass_through(f, self._headers(decision, step, route, tried, spilled))
            tried.append(f)
            return None
        except BaseException:
            if breaker is not None and breaker.state is State.HALF_OPEN:
                breaker.release_trial()
            raise
        decision.backend = step.backend
        out_headers = self._headers(decision, step, route, tried, spilled)
        try:
            if req.stream:
                resp, outcome = await relay_stream(request, upstream, out_headers, started,
                                                   include_usage=req.include_usage, prompt_tokens=route.tokens_in,
                                                   backend=step.backend)
            else:
                resp, outcome = await relay_json(request, upstream, out_headers, started)
        except BaseException:
            if breaker is not None and breaker.state is State.HALF_OPEN:
                breaker.release_trial()
            raise
        self._settle(breaker, outcome, decision, backend, route)
        return resp

    async def _open(self, backend: Backend, body: dict[str, Any], headers: dict[str, str], stream: bool,
                    decision: Decision, raw: bytes | None) -> Upstream:
        limiter = self.limiters.get(backend.name)
        if limiter is not None:
            await self._pace(backend, limiter)
        try:
            # The common case costs one call; the retry machinery is built only after a 429.
            return await backend.open(body, headers, stream, raw)
        except failures.UpstreamFailure as f:
            if f.kind is not failures.Kind.RATE_LIMITED:
                raise
            pending: failures.UpstreamFailure | None = f
        async for attempt in rate_limit_retrying(backend.config.backoff):
            with attempt:
                if pending is not None:  # replay the 429 we already have as tenacity's first attempt
                    failure, pending = pending, None
                    raise failure
                decision.retries = attempt.retry_state.attempt_number - 1
                if limiter is not None:
                    await self._pace(backend, limiter)
                return await backend.open(body, headers, stream, raw)
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    async def _pace(backend: Backend, limiter: AsyncLimiter) -> None:
        """Stay under the provider's known rate: queue briefly; a longer wait counts as rate-limited
        (so the request moves on) instead of sitting on it or provoking a 429 storm."""
        cap = backend.config.backoff.max_wait
        try:
            async with asyncio.timeout(cap):
                await limiter.acquire()
        except TimeoutError:
            raise failures.UpstreamFailure(
                failures.Kind.RATE_LIMITED, backend.name,
                f"over its configured {limiter.max_rate:g}/min; no slot within {cap:g}s",
                retry_after=60.0 / limiter.max_rate) from None

    @staticmethod
    def _upstream_body(body: dict[str, Any], backend: Backend, route: Route) -> dict[str, Any]:
        model = backend.config.model
        clamp = route.max_tokens
        needs_clamp = clamp is not None and (body.get("max_tokens") or 0) > clamp
        if (model is None or body.get("model") == model) and not needs_clamp:
            return body
        out = dict(body)
        if model is not None:
            out["model"] = model  # the client's "auto" or backend id becomes the upstream's model id
        if needs_clamp:
            out["max_tokens"] = clamp
        return out

    @staticmethod
    def _judge(breaker: CircuitBreaker | None, f: failures.UpstreamFailure) -> None:
        if breaker is None:
            return
        if f.counts_against_backend:
            breaker.record_failure(f"{f.kind}: {f.message[:80]}")
        elif breaker.state is State.HALF_OPEN:
            breaker.release_trial()

    def _learn(self, backend: Backend, f: failures.UpstreamFailure, route: Route) -> None:
        """A local crash on a large request teaches a size ceiling (see ceiling.py)."""
        cfg = backend.config
        if (self.ceilings is not None and f.kind is failures.Kind.CRASH and backend.place == "local"
                and route.tokens_in >= getattr(cfg, "learn_min_tokens", 0)):
            self.ceilings.learn(backend.name, route.tokens_in)

    def _settle(self, breaker: CircuitBreaker | None, outcome: Outcome, decision: Decision, backend: Backend,
                route: Route) -> None:
        decision.first_byte_ms = outcome.first_byte_s * 1000
        usage = outcome.usage or {}
        decision.tokens_out = int(usage.get("completion_tokens") or 0)
        decision.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        if backend.place == "hosted" and backend.config.model:
            decision.cost = catalog.cost(backend.config.model, decision.prompt_tokens or decision.tokens_in,
                                         decision.tokens_out)
        if outcome.client_gone:
            decision.outcome = "client_gone"
            if breaker is not None and breaker.state is State.HALF_OPEN:
                breaker.release_trial()
        elif outcome.failure is not None:
            decision.outcome = "broken_stream"
            decision.error_code = str(outcome.failure.kind)
            self._judge(breaker, outcome.failure)
            self._learn(backend, outcome.failure, route)
        else:
            decision.outcome = "ok"
            if breaker is not None:
                breaker.record_success()
        decision.status = 200

    @staticmethod
    def _headers(decision: Decision, step: Step, route: Route, tried: list[failures.UpstreamFailure],
                 spilled: list[str]) -> dict[str, str]:
        h = {
            "x-switchyard-backend": step.backend,
            "x-switchyard-role": decision.role,
            "x-switchyard-tokens-in": str(route.tokens_in),
            "x-switchyard-route": _header_safe(route.reason),
        }
        events = [f"{f.backend} {f.kind}" for f in tried] + spilled
        if events:
            decision.failover = events
            h["x-switchyard-failover"] = _header_safe("; ".join(events) + f" -> {step.backend}")
        return h

    @staticmethod
    def _exhausted(tried: list[failures.UpstreamFailure], spilled: list[str]) -> GatewayError:
        what = "; ".join([f"{f.backend}: {f.kind} ({f.message[:120]})" for f in tried] + spilled)
        if tried and all(f.kind is failures.Kind.CONTEXT_OVERFLOW for f in tried):
            return ContextLengthExceeded(f"every backend reported the request too long for its context: {what}")
        limited = [f for f in tried if f.kind is failures.Kind.RATE_LIMITED]
        if limited:
            wait = max((f.retry_after or 0.0) for f in limited) or 5.0
            return RateLimited(f"rate limited upstream: {what}",
                               headers={"Retry-After": str(max(1, math.ceil(wait)))})
        return NoBackendAvailable(f"no backend could serve this request now: {what or 'none available'}",
                                  headers={"Retry-After": "5"})


def _header_safe(value: str) -> str:
    return value.encode("ascii", "replace").decode().replace("\n", " ")[:1000]


def _pass_through(f: failures.UpstreamFailure, headers: dict[str, str]) -> web.Response:
    """A client mistake comes back as the upstream said it, never retried, never counted."""
    body = f.body or b""
    try:
        parsed = json.loads(body)
        ok = isinstance(parsed, dict) and isinstance(parsed.get("error"), dict)
    except ValueError:
        ok = False
    if not ok:
        body = json.dumps(error_payload(f.message, "invalid_request_error", "upstream_rejected")).encode()
    return web.Response(status=f.status or 400, body=body, content_type="application/json", headers=headers)

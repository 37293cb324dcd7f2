"""Step 4: dispatch. Walk the route: queue for a slot, wait out 429s, open, fail over, relay.

Everything that can go wrong before the first byte reaches the client is survivable here: the
request moves to its next backend and the client sees one clean response (with
`x-switchyard-failover` saying what happened). After the first byte, relay.py ends the stream
cleanly instead. Each backend is tried at most once per request, so a crashed backend is never
hit twice by the same request. Which failures move on and which count against a backend is the
taxonomy's word (failures.py); dispatch only acts on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiolimiter import AsyncLimiter

from . import catalog, failures
from .backends.base import TASK, AnswerStats, Backend, Upstream
from .backends.speed import SpeedBook
from .breaker import CircuitBreaker
from .classify import RequestProfile
from .decide import Route, Step
from .errors import ContextLengthExceeded, GatewayError, NoBackendAvailable, RateLimited, error_payload
from .protocols import CHAT, MESSAGES, PROTOCOLS, Protocol
from .receive import ChatRequest
from .record import CIRCUIT_OPEN, PREEMPTED, SPILLED, Decision, FailoverEvent
from .relay import Outcome, relay_events, relay_json, relay_stream
from .retry import rate_limit_retrying
from .slots import BACKGROUND, INTERACTIVE, Lease, QueueClosed, SlotQueue

_FORWARDED_HEADERS = ("x-session-id",)


@dataclass
class Walk:
    """One request's way along its route: what it carries, what it tried, what happened."""

    request: web.Request
    req: ChatRequest
    profile: RequestProfile
    route: Route
    decision: Decision
    started: float
    tried: list[failures.UpstreamFailure] = field(default_factory=list)

    @property
    def forwarded(self) -> dict[str, str]:
        """What a backend may use of the request's headers; plus our own TASK mark on background work
        (llama.cpp's slot memory keeps a task's prompt apart from conversations). Backends read names
        they know and send none of these on as they are."""
        h = {h: self.req.headers[h] for h in _FORWARDED_HEADERS if h in self.req.headers}
        if not self.profile.interactive:
            h[TASK] = "1"
        return h

    def moved_on(self, event: FailoverEvent) -> None:
        self.decision.failover.append(event)

    def failed(self, f: failures.UpstreamFailure) -> None:
        self.tried.append(f)
        self.moved_on(FailoverEvent(f.backend, str(f.kind), f.message[:120]))

    def headers(self, step: Step) -> dict[str, str]:
        h = {
            "x-switchyard-request-id": self.decision.id,  # the ledger row's id: find this answer in it
            "x-switchyard-backend": step.backend,
            "x-switchyard-role": self.decision.role,
            "x-switchyard-tokens-in": str(self.route.tokens_in),
            "x-switchyard-route": _header_safe(self.route.reason),
        }
        if step.predicted is not None:
            self.decision.predicted_ttft_ms = step.predicted * 1000
            h["x-switchyard-predicted-ttft"] = f"{step.predicted:.3f}"
        if self.decision.failover:
            events = "; ".join(map(str, self.decision.failover))
            h["x-switchyard-failover"] = _header_safe(f"{events} -> {step.backend}")
        return h


class Dispatcher:
    def __init__(self, backends: Mapping[str, Backend], breakers: Mapping[str, CircuitBreaker],
                 queues: Mapping[str, SlotQueue], limiters: Mapping[str, AsyncLimiter],
                 speeds: SpeedBook | None = None) -> None:
        self.backends = backends
        self.breakers = breakers
        self.queues = queues
        self.limiters = limiters
        self.speeds = speeds or SpeedBook(None)

    async def dispatch(self, walk: Walk) -> web.StreamResponse:
        try:
            return await self._walk(walk)
        except QueueClosed:
            raise NoBackendAvailable("Switchyard is shutting down; retry in a moment",
                                     headers={"Retry-After": "5"}) from None

    async def _walk(self, walk: Walk) -> web.StreamResponse:
        steps = walk.route.steps
        trial_ok = not walk.route.preemptible  # a task that may be cancelled proves nothing as a trial
        i = 0
        while i < len(steps):
            step = steps[i]
            last = i == len(steps) - 1
            backend = self.backends[step.backend]
            breaker = self.breakers.get(step.backend)
            queue = self.queues.get(step.backend)
            # On the last backend there is nowhere to spill to: wait as long as a first byte may take.
            wait = backend.config.timeouts.first_byte if last else step.max_queue_wait
            result: web.StreamResponse | None = None
            preempted = False
            if breaker is None or breaker.allows(trial_ok):
                priority = INTERACTIVE if walk.profile.interactive else BACKGROUND
                slot = queue.slot(priority, wait, walk.route.preemptible) if queue else _no_queue()
                async with slot as lease:
                    walk.decision.queue_wait_ms += lease.waited * 1000
                    if not lease.got:
                        walk.moved_on(FailoverEvent(step.backend, SPILLED, f"queue wait > {wait:g}s"))
                    elif breaker is not None and not breaker.allows(trial_ok):  # opened while we waited
                        walk.moved_on(FailoverEvent(step.backend, CIRCUIT_OPEN, breaker.describe()))
                    else:
                        with breaker.trial() if breaker else contextlib.nullcontext():
                            try:
                                result = await self._attempt(walk, step, backend, breaker, lease)
                            except _Preempted:
                                walk.moved_on(FailoverEvent(step.backend, PREEMPTED, "gave way to an interactive turn"))
                                preempted = True
            else:
                walk.moved_on(FailoverEvent(step.backend, CIRCUIT_OPEN, breaker.describe()))
            if result is not None:
                return result
            if not (preempted and last):  # pre-empted with nowhere else to go: queue here again
                i += 1
        raise self._exhausted(walk)

    async def _attempt(self, walk: Walk, step: Step, backend: Backend, breaker: CircuitBreaker | None,
                       lease: Lease) -> web.StreamResponse | None:
        req, decision = walk.req, walk.decision
        body = self._upstream_body(req, backend, walk.route)
        decision.overhead_ms = (time.monotonic() - walk.started) * 1000 - decision.queue_wait_ms
        # Unchanged body: send the client's bytes as they came (no re-encoding of a 300 KB prompt).
        raw = req.raw if body is req.body else None
        try:
            if lease.preemptible:
                upstream = await _unless_preempted(lease, self._open_whole(backend, body, walk, raw))
            else:
                upstream = await self._open(backend, body, walk, raw)
        except asyncio.CancelledError:
            decision.backend = step.backend  # the client left while this backend was working on it
            raise
        except failures.UpstreamFailure as f:
            self._judge(breaker, backend, f, walk.route)
            if f.kind is failures.Kind.CLIENT_ERROR:
                return _pass_through(f, walk.headers(step), PROTOCOLS[req.protocol])
            walk.failed(f)
            return None
        decision.backend = step.backend
        # Known now, so a client that leaves mid-stream is still recorded with its real first byte.
        decision.first_byte_ms = (time.monotonic() - walk.started) * 1000
        out_headers = walk.headers(step)
        proto = PROTOCOLS[req.protocol]
        if req.stream and proto is not CHAT:  # Messages/Responses events: the protocol knows their end and usage
            resp, outcome = await relay_events(walk.request, upstream, out_headers, walk.started, protocol=proto,
                                               prompt_tokens=walk.route.tokens_in, backend=step.backend)
        elif req.stream:
            resp, outcome = await relay_stream(walk.request, upstream, out_headers, walk.started,
                                               include_usage=req.include_usage, prompt_tokens=walk.route.tokens_in,
                                               backend=step.backend)
        else:
            resp, outcome = await relay_json(walk.request, upstream, out_headers, walk.started,
                                             None if proto is CHAT else proto.usage_of)
        self._settle(breaker, outcome, decision, backend, walk.route)
        self._learn(step.backend, upstream, outcome, walk)
        return resp

    def _learn(self, name: str, upstream: Upstream, outcome: Outcome, walk: Walk) -> None:
        """Every answer teaches its backend how fast it is (and llama.cpp what its slot now holds)."""
        now = time.monotonic()
        first_byte = (walk.decision.first_byte_ms - walk.decision.queue_wait_ms) / 1000
        ok = outcome.failure is None and not outcome.client_gone
        stats = AnswerStats(first_byte, now - walk.started - first_byte, outcome.usage, outcome.timings, ok,
                            conversation=walk.profile.interactive)  # main, subagent: the next turn continues it
        if ok:
            speeds = self.speeds.of(name)
            speeds.observe_first_byte(max(0.0, first_byte))
            speeds.observe_service(max(0.0, now - walk.started - walk.decision.queue_wait_ms / 1000))
        if upstream.settle is not None:
            upstream.settle(stats)
        timings = outcome.timings or {}
        if isinstance(timings.get("cache_n"), int):
            walk.decision.cached_tokens = timings["cache_n"]

    async def _open_whole(self, backend: Backend, body: dict[str, Any], walk: Walk, raw: bytes | None) -> Upstream:
        """Open and read the whole answer before any byte goes to the client, so a pre-empted
        background task can still move elsewhere unnoticed (titles and tags are short)."""
        upstream = await self._open(backend, body, walk, raw)
        chunks = [upstream.first]
        try:
            async for chunk in upstream.rest:
                chunks.append(chunk)
        finally:
            await upstream.close()
        return Upstream(upstream.status, chunks[0], _replay(chunks[1:]), _closed, upstream.usage, upstream.settle)

    async def _open(self, backend: Backend, body: dict[str, Any], walk: Walk, raw: bytes | None) -> Upstream:
        limiter = self.limiters.get(backend.name)
        headers, stream = walk.forwarded, walk.req.stream
        # Only a non-chat request names its protocol, so chat-only backends keep their signature.
        kw = {} if walk.req.protocol == CHAT.name else {"protocol": walk.req.protocol}
        if limiter is not None:
            await self._pace(backend, limiter)
        try:
            # The common case costs one call; the retry machinery is built only after a 429.
            return await backend.open(body, headers, stream, raw, **kw)
        except failures.UpstreamFailure as f:
            if f.kind is not failures.Kind.RATE_LIMITED:
                raise
            pending: failures.UpstreamFailure | None = f
        async for attempt in rate_limit_retrying(backend.config.backoff):
            with attempt:
                if pending is not None:  # replay the 429 we already have as tenacity's first attempt
                    failure, pending = pending, None
                    raise failure
                walk.decision.retries = attempt.retry_state.attempt_number - 1
                if limiter is not None:
                    await self._pace(backend, limiter)
                return await backend.open(body, headers, stream, raw, **kw)
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
    def _upstream_body(req: ChatRequest, backend: Backend, route: Route) -> dict[str, Any]:
        """The body as the upstream gets it: its model id, the rule's clamp, and usage asked for on
        every stream (Open WebUI never asks, and a stream without usage is a hole in the ledger)."""
        body = req.body
        model = backend.config.model
        clamp = route.max_tokens
        proto = PROTOCOLS[req.protocol]  # Responses clamps max_output_tokens; only chat asks for usage
        # Open WebUI sends no max_tokens for tags and follow-ups: the clamp applies to those too.
        asked = body.get("max_completion_tokens", body.get(proto.max_tokens_key))
        needs_clamp = clamp is not None and (asked is None or asked > clamp)
        needs_usage = req.stream and not req.include_usage and proto.asks_usage
        if (model is None or body.get("model") == model) and not needs_clamp and not needs_usage:
            return body
        out = dict(body)
        if model is not None:
            out["model"] = model  # the client's "auto" or backend id becomes the upstream's model id
        if needs_clamp:
            out.pop("max_completion_tokens", None)
            out[proto.max_tokens_key] = clamp
        if needs_usage:
            options = body.get("stream_options")
            out["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return out

    @staticmethod
    def _judge(breaker: CircuitBreaker | None, backend: Backend, f: failures.UpstreamFailure, route: Route) -> None:
        """A failure the taxonomy calls the backend's moves its breaker and may teach it a ceiling.
        Slowness is counted apart from crashes: it opens the circuit only when it repeats."""
        backend.learn(f, route.tokens_in)
        if breaker is not None and f.counts_against_backend:
            breaker.record_failure(f"{f.kind}: {f.message[:80]}", slow=f.kind is failures.Kind.TIMEOUT)

    def _settle(self, breaker: CircuitBreaker | None, outcome: Outcome, decision: Decision, backend: Backend,
                route: Route) -> None:
        usage = outcome.usage or {}
        decision.tokens_out = int(usage.get("completion_tokens") or 0)
        decision.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        if not backend.free and backend.config.model:
            decision.cost = catalog.cost(backend.config.model, decision.prompt_tokens or decision.tokens_in,
                                         decision.tokens_out)
        decision.status = 200
        if outcome.client_gone:
            decision.outcome = "client_gone"  # no verdict: the trial (if any) is released by the caller
        elif outcome.failure is not None:
            decision.outcome = "broken_stream"
            decision.error_code = str(outcome.failure.kind)
            self._judge(breaker, backend, outcome.failure, route)
        else:
            decision.outcome = "ok"
            if breaker is not None:
                breaker.record_success()

    @staticmethod
    def _exhausted(walk: Walk) -> GatewayError:
        tried = walk.tried
        what = "; ".join([f"{f.backend}: {f.kind} ({f.message[:120]})" for f in tried]
                         + [str(e) for e in walk.decision.failover if e.kind in (SPILLED, CIRCUIT_OPEN)])
        if tried and all(f.kind is failures.Kind.CONTEXT_OVERFLOW for f in tried):
            return ContextLengthExceeded(f"every backend reported the request too long for its context: {what}")
        limited = [f for f in tried if f.kind is failures.Kind.RATE_LIMITED]
        if limited:
            wait = max((f.retry_after or 0.0) for f in limited) or 5.0
            return RateLimited(f"rate limited upstream: {what}",
                               headers={"Retry-After": str(max(1, math.ceil(wait)))})
        return NoBackendAvailable(f"no backend could serve this request now: {what or 'none available'}",
                                  headers={"Retry-After": "5"})


class _Preempted(Exception):
    """A preemptible attempt gave its slot to an interactive turn before any byte reached its client."""


async def _unless_preempted(lease: Lease, work: Any) -> Upstream:
    """Run `work` unless the lease is pre-empted first; then cancel it (closing the upstream request,
    which makes llama.cpp stop at once) and raise _Preempted."""
    task = asyncio.ensure_future(work)
    signal = asyncio.ensure_future(lease.preempted.wait())
    try:
        await asyncio.wait((task, signal), return_when=asyncio.FIRST_COMPLETED)
    finally:
        signal.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if task.cancelled():
        raise _Preempted
    return task.result()


async def _replay(chunks: list[bytes]) -> Any:
    for chunk in chunks:
        yield chunk


async def _closed() -> None:
    return None


@contextlib.asynccontextmanager
async def _no_queue() -> Any:
    yield Lease(INTERACTIVE, got=True)


def _header_safe(value: str) -> str:
    return value.encode("ascii", "replace").decode().replace("\n", " ")[:1000]


def _pass_through(f: failures.UpstreamFailure, headers: dict[str, str], proto: Protocol = CHAT) -> web.Response:
    """A client mistake comes back as the upstream said it, never retried, never counted; in the
    caller's protocol (llama.cpp answers OpenAI-shaped errors even on /v1/messages)."""
    body = f.body or b""
    try:
        parsed = json.loads(body)
        ok = isinstance(parsed, dict) and isinstance(parsed.get("error"), dict)
    except ValueError:
        ok = False
    if not ok:
        body = json.dumps(error_payload(f.message, "invalid_request_error", "upstream_rejected")).encode()
    elif proto is not CHAT and not (proto is MESSAGES and parsed.get("type") == "error"):
        err = parsed["error"]
        body = json.dumps(proto.upstream_error_body(f.status or 400, str(err.get("message") or f.message),
                                                    str(err.get("type") or "invalid_request_error"),
                                                    err.get("code"))).encode()
    return web.Response(status=f.status or 400, body=body, content_type="application/json", headers=headers)

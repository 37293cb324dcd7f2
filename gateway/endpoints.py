"""HTTP endpoints. The chat handler reads top to bottom as the request's path:
receive -> classify -> decide -> admit -> dispatch (-> relay) -> record."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from .dispatch import Walk
from .errors import GatewayError, NoBackendAvailable
from .firstrun import startup_state
from .protocols import CHAT, MESSAGES, RESPONSES, Protocol, litellm_views
from .receive import receive
from .record import Decision
from .runtime import Runtime

RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime", Runtime)
STATIC = Path(__file__).parent / "static"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await serve(request, CHAT)


async def messages(request: web.Request) -> web.StreamResponse:
    """Anthropic Messages (Claude Code): the same pipeline, the caller's protocol end to end."""
    await litellm_views.ready()  # the chat view is litellm's translation: import it off the loop once
    return await serve(request, MESSAGES)


async def responses(request: web.Request) -> web.StreamResponse:
    """OpenAI Responses (Codex CLI)."""
    await litellm_views.ready()
    return await serve(request, RESPONSES)


async def serve(request: web.Request, protocol: Protocol) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    started = time.monotonic()
    decision = Decision(id=uuid.uuid4().hex[:16], team="-")
    task = asyncio.current_task()
    if task is not None:
        rt.in_flight.add(task)
    try:
        if rt.draining:
            raise NoBackendAvailable("Switchyard is shutting down; retry in a moment", headers={"Retry-After": "5"})
        policy = rt.teams.authenticate(request.headers)
        decision.team = policy.team
        req = await receive(request, rt.settings.gateway.body_limit_bytes, protocol.parse)
        profile = rt.router.classify(req, policy)
        decision.role, decision.role_source = profile.role, profile.role_source
        decision.client, decision.session = profile.client, profile.session
        decision.model, decision.stream = req.model, req.stream
        decision.output_reserve = profile.output_reserve
        route = await rt.router.decide(req, profile, policy)
        async with rt.admission.admit(policy, profile, route) as route:
            decision.tokens_in, decision.tokens_method = route.tokens_in, route.tokens_method
            decision.route, decision.reason = [s.backend for s in route.steps], route.reason
            return await rt.dispatcher.dispatch(Walk(request, req, profile, route, decision, started))
    except GatewayError as e:
        decision.outcome, decision.status, decision.error_code = "error", e.status, e.code
        decision.reason = decision.reason or e.message[:200]
        extra = {"x-switchyard-role": decision.role} if decision.role else {}
        return e.response(extra, None if protocol is CHAT else protocol)
    except asyncio.CancelledError:
        decision.outcome = "client_gone"
        raise
    finally:
        rt.in_flight.discard(task)  # type: ignore[arg-type]
        decision.total_ms = (time.monotonic() - started) * 1000
        rt.recorder.record(decision)


async def models(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    try:
        policy = rt.teams.authenticate(request.headers)
    except GatewayError as e:
        return e.response()
    created = int(rt.settings.path.stat().st_mtime) if rt.settings.path.exists() else 0
    data = [{"id": "auto", "object": "model", "created": created, "owned_by": "switchyard",
             "description": "routed by policy"}]
    for name, backend in rt.backends.items():
        if policy.allowed_backends is None or name in policy.allowed_backends:
            data.append({"id": name, "object": "model", "created": created,
                         "owned_by": f"switchyard:{backend.place}", "context_window": backend.context_window})
    for task_model in policy.task_models:
        data.append({"id": task_model, "object": "model", "created": created, "owned_by": "switchyard",
                     "description": "background tasks (Open WebUI TASK_MODEL_EXTERNAL)"})
    if policy.allowed_models is not None:
        data = [m for m in data if m["id"] in policy.allowed_models]
    return web.json_response({"object": "list", "data": data})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    backends = rt.backend_states()
    ready = any(v["ready"] and v["circuit"] != "open" for v in backends.values())
    body = {"status": "ready" if ready else "degraded", "config": str(rt.settings.path),
            "policies": sorted(rt.teams.policies), "policy_errors": rt.teams.errors, "backends": backends}
    return web.json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    return web.Response(body=rt.metrics.render(rt), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def status_json(request: web.Request) -> web.Response:
    """Everything the status page draws, in one read."""
    rt = request.app[RUNTIME]
    decisions = [d.as_dict() for d in list(rt.recorder.recent)[-50:]][::-1]
    return web.json_response({
        "now": time.time(), "config": str(rt.settings.path), "teams": sorted(rt.teams.policies),
        "backends": rt.backend_states(), "decisions": decisions,
        "usage_today": rt.activity.usage_today(), "per_minute": rt.activity.per_minute(),
        "startup": startup_state(request.app),  # the embedded llama-server's first-run build, if any
    })


async def status_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "status.html", headers={"Cache-Control": "no-cache"})


async def count_tokens(request: web.Request) -> web.Response:
    """Anthropic's `/v1/messages/count_tokens`: a local server's own exact count when one can say,
    else the byte estimate the router uses (never an upstream call that costs)."""
    rt = request.app[RUNTIME]
    await litellm_views.ready()
    try:
        policy = rt.teams.authenticate(request.headers)
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        if isinstance(body, dict) and "max_tokens" not in body:
            body["max_tokens"] = 1  # count_tokens bodies carry none; Messages requires one
            raw = json.dumps(body).encode()
        req = MESSAGES.parse(raw, request.headers)
        profile = rt.router.classify(req, policy)
        for backend in rt.backends.values():
            if backend.place == "local" and not backend.unusable:
                n = await backend.count_tokens(req.chat)
                if n is not None:
                    return web.json_response({"input_tokens": n})
        return web.json_response({"input_tokens": profile.tokens_in})
    except GatewayError as e:
        return e.response(None, MESSAGES)

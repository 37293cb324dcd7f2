"""HTTP endpoints. The chat handler reads top to bottom as the request's path:
receive -> classify -> decide -> admit -> dispatch (-> relay) -> record."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from .dispatch import Walk
from .errors import GatewayError, NoBackendAvailable
from .firstrun import startup_state
from .receive import receive
from .record import Decision
from .runtime import Runtime

RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime", Runtime)
STATIC = Path(__file__).parent / "static"


async def chat_completions(request: web.Request) -> web.StreamResponse:
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
        req = await receive(request, rt.settings.gateway.body_limit_bytes)
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
        return e.response(extra)
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
    allowed, tier_of = policy.allowed_backends, rt.decider.tier_of
    for tier, members in rt.router.tiers.items():  # a tier: its members in turn, least loaded first
        if allowed is None or tier in allowed:
            windows = [w for m in members if (w := rt.backends[m].context_window)]
            data.append({"id": tier, "object": "model", "created": created, "owned_by": "switchyard:local",
                         "context_window": max(windows) if windows else None, "members": members})
    for name, backend in rt.backends.items():
        if allowed is None or name in allowed or tier_of.get(name) in allowed:
            data.append({"id": name, "object": "model", "created": created,
                         "owned_by": f"switchyard:{backend.place}", "context_window": backend.context_window,
                         **({"tier": tier_of[name]} if name in tier_of else {})})
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

"""HTTP endpoints. The chat handler reads top to bottom as the request's path:
receive -> classify -> decide -> admit -> dispatch (-> relay) -> record."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from functools import wraps
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from .config import GatewayConfig, Policy
from .dispatch import Walk
from .errors import GatewayError, NoBackendAvailable, Unauthorized
from .firstrun import startup_state
from .protocols import CHAT, MESSAGES, RESPONSES, Protocol, litellm_views
from .receive import CHECKED_HEADERS, receive
from .record import Decision
from .runtime import Runtime
from .schema import printable_ascii
from .teams import hash_key

RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime", Runtime)
ADMIN: web.AppKey[tuple[str, ...]] = web.AppKey("admin_digests", tuple)
STATIC = Path(__file__).parent / "static"


def _authenticate(rt: Runtime, headers: Mapping[str, str]) -> Policy:
    # A key that is not printable ASCII cannot be one of ours (and cannot be hashed as UTF-8).
    if rt.settings.gateway.auth == "keys" and not printable_ascii(headers.get("Authorization", "")):
        raise Unauthorized("invalid API key")
    return rt.teams.authenticate(headers)


# ---- ops endpoints follow `auth` ----------------------------------------------------------------

def admin_digests(gw: GatewayConfig) -> tuple[str, ...]:
    """Stored admin key digests, plus the digest of the key in `admin_key_env` (never kept raw)."""
    digests = list(gw.admin_keys)
    if gw.admin_key_env and (key := os.environ.get(gw.admin_key_env)):
        digests.append(hash_key(key))
    return tuple(digests)


def _presented_key(headers: Mapping[str, str]) -> str | None:
    """`Authorization: Bearer KEY` (scripts, Prometheus) or Basic with KEY as the password (browsers)."""
    scheme, _, value = headers.get("Authorization", "").partition(" ")
    value = value.strip()
    if not value or not printable_ascii(value):
        return None
    if scheme.lower() == "bearer":
        return value
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value, validate=True).decode("ascii").partition(":")[2] or None
        except (binascii.Error, UnicodeDecodeError):
            return None
    return None


def is_admin(request: web.Request) -> bool:
    if request.app[RUNTIME].settings.gateway.auth == "off":
        return True
    key = _presented_key(request.headers)
    if key is None:
        return False
    digest = hash_key(key)
    found = False
    for stored in request.app[ADMIN]:  # every digest, constant time in the key
        found |= hmac.compare_digest(stored, digest)
    return found


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def admin_only(challenge: str) -> Callable[[Handler], Handler]:
    """With `auth: keys`, the wrapped endpoint needs an admin key; `challenge` is the WWW-Authenticate
    scheme (Basic on the status page makes a browser ask for the key once and send it on every poll)."""
    def wrap(handler: Handler) -> Handler:
        @wraps(handler)
        async def guarded(request: web.Request) -> web.StreamResponse:
            if not is_admin(request):
                return Unauthorized("this endpoint needs an admin key (Authorization: Bearer <admin key>)",
                                    code="admin_key_required",
                                    headers={"WWW-Authenticate": f'{challenge} realm="switchyard admin"'}).response()
            return await handler(request)
        return guarded
    return wrap


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
        policy = _authenticate(rt, request.headers)
        decision.team = policy.team
        gw = rt.settings.gateway
        req = await receive(request, gw.body_limit_bytes, body_timeout=gw.server.body_timeout,
                            header_names=_checked_headers(rt), parse=protocol.parse)
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
    except Exception:  # answered as a JSON 500 by the app's middleware; recorded as what it was
        decision.outcome, decision.status, decision.error_code = "error", 500, "internal_error"
        raise
    finally:
        rt.in_flight.discard(task)  # type: ignore[arg-type]
        decision.total_ms = (time.monotonic() - started) * 1000
        rt.recorder.record(decision)


async def models(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    try:
        policy = _authenticate(rt, request.headers)
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


def _checked_headers(rt: Runtime) -> tuple[str, ...]:
    pack = rt.classifier.pack
    return tuple(dict.fromkeys((*CHECKED_HEADERS, *pack.session_headers, *pack.subagent_headers)))


async def readyz(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    backends = rt.backend_states()
    ready = any(v["ready"] and v["circuit"] != "open" for v in backends.values())
    status = 200 if ready else 503
    if not is_admin(request):  # load balancers need the verdict, not the names of teams and backends
        return web.json_response({"status": "ready" if ready else "degraded"}, status=status)
    body = {"status": "ready" if ready else "degraded", "config": str(rt.settings.path),
            "policies": sorted(rt.teams.policies), "policy_errors": rt.teams.errors, "backends": backends}
    return web.json_response(body, status=status)


@admin_only("Bearer")
async def metrics(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    return web.Response(body=rt.metrics.render(rt), headers={"Content-Type": CONTENT_TYPE_LATEST})


@admin_only("Bearer")
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


@admin_only("Basic")
async def status_page(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "status.html", headers={"Cache-Control": "no-cache"})


async def count_tokens(request: web.Request) -> web.Response:
    """Anthropic's `/v1/messages/count_tokens`: a local server's own exact count when one can say,
    else the byte estimate the router uses (never an upstream call that costs)."""
    rt = request.app[RUNTIME]
    await litellm_views.ready()
    try:
        policy = _authenticate(rt, request.headers)
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
            if backend.free and not backend.unusable:  # our own server counts exactly, at no cost
                n = await backend.count_tokens(req.chat)
                if n is not None:
                    return web.json_response({"input_tokens": n})
        return web.json_response({"input_tokens": profile.tokens_in})
    except GatewayError as e:
        return e.response(None, MESSAGES)

"""The aiohttp application: routes, startup and shutdown — nothing else."""

from __future__ import annotations

import asyncio
import json
import logging
import traceback

from aiohttp import web

from . import endpoints
from .config import Settings
from .errors import GatewayError, error_payload
from .runtime import Runtime
from .server import LIMITER

log = logging.getLogger("switchyard")


@web.middleware
async def openai_errors(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    """aiohttp's own HTTP errors (404, 405, 413 ...) in OpenAI's shape too."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status, "http_error")
        body = json.dumps(error_payload(f"{e.reason}: {request.method} {request.path}", "invalid_request_error", code))
        return web.Response(status=e.status, body=body, content_type="application/json")
    except GatewayError as e:
        return e.response()
    except (asyncio.CancelledError, ConnectionError):
        raise  # the client left: nobody to answer
    except Exception as e:
        # A bug of ours: the client still gets JSON, and the log gets the stack — rate-limited, and
        # without the exception's message, which can quote the request (prompt text).
        if (suppressed := LIMITER.allow("unhandled")) is not None:
            stack = "".join(traceback.format_tb(e.__traceback__))
            log.error("unhandled %s answering %s %s%s\n%s", type(e).__name__, request.method, request.path,
                      f" ({suppressed} more since the last line)" if suppressed else "", stack)
        if request.writer.output_size > 0:
            raise  # a response is already on the wire (a stream): aiohttp closes the connection
        body = json.dumps(error_payload("internal error in the gateway", "server_error", "internal_error"))
        return web.Response(status=500, body=body, content_type="application/json")


def create_app(settings: Settings, runtime: Runtime | None = None) -> web.Application:
    # The body limit is enforced by receive() with an OpenAI-shaped 413; aiohttp's own cap sits
    # just above it so oversized uploads are still cut off early.
    app = web.Application(middlewares=[openai_errors],
                          client_max_size=settings.gateway.body_limit_bytes + 1024)
    app[endpoints.RUNTIME] = runtime or Runtime.build(settings)
    app[endpoints.ADMIN] = endpoints.admin_digests(settings.gateway)
    app.router.add_post("/v1/chat/completions", endpoints.chat_completions)
    app.router.add_post("/chat/completions", endpoints.chat_completions)
    for prefix in ("/v1", ""):  # Claude Code and Codex are pointed at a base URL with or without /v1
        app.router.add_post(f"{prefix}/messages", endpoints.messages)
        app.router.add_post(f"{prefix}/messages/count_tokens", endpoints.count_tokens)
        app.router.add_post(f"{prefix}/responses", endpoints.responses)
    app.router.add_get("/v1/models", endpoints.models)
    app.router.add_get("/models", endpoints.models)
    app.router.add_get("/healthz", endpoints.healthz)
    app.router.add_get("/readyz", endpoints.readyz)
    app.router.add_get("/metrics", endpoints.metrics)
    app.router.add_get("/status.json", endpoints.status_json)
    app.router.add_get("/", endpoints.status_page)
    app.router.add_static("/static/", endpoints.STATIC)

    async def on_startup(app: web.Application) -> None:
        await app[endpoints.RUNTIME].start()

    async def on_shutdown(app: web.Application) -> None:  # after the listener closed, before cleanup
        await app[endpoints.RUNTIME].drain(settings.gateway.shutdown_grace)

    async def on_cleanup(app: web.Application) -> None:
        await app[endpoints.RUNTIME].stop()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app

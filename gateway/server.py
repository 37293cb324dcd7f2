"""The listening socket and the HTTP/1 connection: what bounds a slow, malformed or greedy client.

aiohttp parses HTTP for us; this module wraps its connection handler (`RequestHandler`) to add what
it lacks: a header read deadline (slowloris), a cap on open connections (503 and close past it),
OpenAI-shaped JSON for its own parser rejections (a 64 KB header line, NUL in a header, a bad
Content-Length), and logs that cannot storm (one line per kind per 10 s, with a count). The body
deadline lives in receive.py, where the body is read.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import logging
import resource
import sys
import time
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_request import BaseRequest

from .config import ServerLimits
from .errors import error_payload

log = logging.getLogger("switchyard")

FD_RESERVE = 128  # descriptors kept for upstream connections, the ledger and the listening socket
LINGER = 2.0  # seconds to drain an unread body after answering (so the client reads the answer, not a RST)
REFUSE_LINGER = 0.5  # the same for a refused connection: short, since each one holds a descriptor meanwhile


class LogLimiter:
    """At most one log line per kind per interval; the next line says how many were suppressed."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, kind: str, now: float | None = None) -> int | None:
        """The number suppressed since the last line if a line may be written now, else None."""
        now = time.monotonic() if now is None else now
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return None
        self._last[kind] = now
        return self._suppressed.pop(kind, 0)


LIMITER = LogLimiter()


def raw_json_response(status: int, message: str, type_: str, code: str) -> bytes:
    """A complete HTTP/1.1 response for paths where no aiohttp response object exists."""
    body = json.dumps(error_payload(message, type_, code)).encode()
    reason = HTTPStatus(status).phrase
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


def _json_error(status: int, message: str, code: str) -> web.Response:
    type_ = "server_error" if status >= 500 else "invalid_request_error"
    resp = web.Response(status=status, body=json.dumps(error_payload(message, type_, code)),
                        content_type="application/json")
    resp.force_close()
    return resp


class EdgeHandler(RequestHandler):
    """aiohttp's connection handler with a header deadline and JSON for everything it answers itself."""

    def __init__(self, manager: web.Server, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        # The first byte of a request head starts the clock; a complete head stops it. "Between requests"
        # is when the connection loop waits for the next head (not while aiohttp drains a body it left).
        waiting = (self._waiter is not None and not self._waiter.done()) or self._request_count == 0
        between = waiting and not self._request_in_progress and not self._messages and self._payload_parser is None
        if data and between and self._header_timer is None and not self._upgraded:
            self._header_timer = self._loop.call_later(self._header_timeout, self._header_deadline)
        super().data_received(data)
        if self._header_timer is not None and (self._messages or self._request_in_progress):
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self._request_in_progress or self._messages or self.transport is None:
            return
        self.transport.write(raw_json_response(
            408, f"request headers not received within {self._header_timeout:g} s", "invalid_request_error",
            "request_timeout"))
        log.debug("closed a connection whose request headers did not arrive in time")
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        if isinstance(kw.get("exc_info"), RequestPayloadError):
            # aiohttp draining a body the client broke (bad gzip, bad chunk) after we answered 400
            self.logger.debug("discarded the rest of a malformed request body")
            return
        if (suppressed := LIMITER.allow("aiohttp")) is not None:
            more = f" ({suppressed} similar suppressed)" if suppressed else ""
            self.logger.error("%s%s", args[0] % args[1:] if len(args) > 1 else args[0], more,
                              exc_info=kw.get("exc_info"))

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's own rejections (parser errors, an exception past every middleware) as OpenAI JSON."""
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        if status >= 500:
            self.log_exception("unhandled error answering %s %s: %s", request.method, request.path,
                               type(exc).__name__ if exc else status)
            text, code = "internal error in the gateway", "internal_error"
        else:
            if (suppressed := LIMITER.allow("bad-http")) is not None:
                log.info("rejected a malformed HTTP request (%s)%s", type(exc).__name__ if exc else status,
                         f"; {suppressed} more since the last line" if suppressed else "")
            reason = getattr(exc, "message", None) or message or HTTPStatus(status).phrase
            text, code = f"malformed HTTP request: {str(reason).splitlines()[0][:300]}", "bad_http_request"
        return _json_error(status, text, code)

    async def finish_response(self, request: BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        # An HTTPException raised before the middlewares run (e.g. `Expect: 999` -> 417) is plain text.
        if isinstance(resp, web.HTTPException) and resp.status >= 400 and resp.content_type != "application/json":
            resp = _json_error(resp.status, resp.text or resp.reason, "http_error")
        return await super().finish_response(request, resp, start_time)


class _Refuse(asyncio.Protocol):
    """Past `max_connections`: answer 503 at once and close, reading nothing."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport instances, but have the same methods
        self.transport: Any = transport
        transport.write(raw_json_response(503, "the gateway is at its connection limit; retry shortly",
                                          "server_error", "gateway_overloaded"))
        # Half-close, then drop after a moment: closing with unread input would send a RST that can
        # destroy the answer before the client reads it.
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(REFUSE_LINGER, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: BaseException | None) -> None:
        self._timer.cancel()


class EdgeSite(web.BaseSite):
    """A TCP site whose connections are EdgeHandlers, capped at `max_connections`."""

    __slots__ = ("_handler_kwargs", "_host", "_limits", "_port")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, limits: ServerLimits,
                 handler_kwargs: dict[str, Any]) -> None:
        super().__init__(runner, backlog=512)
        self._host, self._port = host, port
        self._limits = limits
        self._handler_kwargs = handler_kwargs

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        if self._server is not None and self._server.sockets:  # type: ignore[attr-defined]
            return int(self._server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        return self._port

    def _protocol(self) -> asyncio.Protocol:
        server = self._runner.server
        assert server is not None
        if len(server.connections) >= self._limits.max_connections:
            if (suppressed := LIMITER.allow("max-connections")) is not None:
                log.warning("connection limit %d reached: refusing new connections with 503%s",
                            self._limits.max_connections,
                            f" ({suppressed} refused since the last line)" if suppressed else "")
            return _Refuse()
        return EdgeHandler(server, loop=asyncio.get_running_loop(), header_timeout=self._limits.header_timeout,
                           **self._handler_kwargs)

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, self._host, self._port, backlog=self._backlog)


def _accept_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Out of descriptors, asyncio logs every failed accept with a traceback: one line per 10 s instead."""
    exc = context.get("exception")
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
        if (suppressed := LIMITER.allow("accept")) is not None:
            log.error("cannot accept connections: %s%s", exc.strerror,
                      f" ({suppressed} more since the last line)" if suppressed else "")
        return
    loop.default_exception_handler(context)


def effective_limits(limits: ServerLimits) -> ServerLimits:
    """Cap max_connections below the descriptor limit, so refusing with 503 never needs a descriptor we lack."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = soft - FD_RESERVE if soft != resource.RLIM_INFINITY else limits.max_connections
    if room < limits.max_connections:
        capped = max(16, room)
        log.warning("max_connections %d exceeds the descriptor limit (%d, %d kept in reserve): using %d; "
                    "raise LimitNOFILE / ulimit -n", limits.max_connections, soft, FD_RESERVE, capped)
        return limits.model_copy(update={"max_connections": capped})
    return limits


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from outside


def warn_if_exposed(host: str, auth: str) -> None:
    if auth == "off" and not is_loopback(host):
        print(f"switchyard: WARNING: listening on {host} with auth: off: anyone who can reach this address "
              "can use every backend and read /status.json and /metrics (set auth: keys)", file=sys.stderr)


async def start_site(app: web.Application, host: str, port: int, limits: ServerLimits,
                     *, auth: str = "off") -> web.AppRunner:
    """Serve `app` on host:port behind the edge limits; returns the runner (`await runner.cleanup()`)."""
    warn_if_exposed(host, auth)
    limits = effective_limits(limits)
    asyncio.get_running_loop().set_exception_handler(_accept_errors)
    handler_kwargs: dict[str, Any] = {
        "keepalive_timeout": limits.keepalive_timeout,
        "lingering_time": min(LINGER, limits.header_timeout / 2),
        "access_log": None,
    }
    runner = web.AppRunner(app, handler_cancellation=True, **handler_kwargs)
    await runner.setup()
    site = EdgeSite(runner, host, port, limits, handler_kwargs)
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    return int(runner.addresses[0][1])

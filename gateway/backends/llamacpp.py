"""A llama.cpp `llama-server`, relayed byte for byte.

Facts this is built on (checked live against llama.cpp's server, build b11434): every chat
response comes with `Connection: close` and a pooled socket reused afterwards fails at write, so
each request gets a fresh connection (`force_close`); the exact prompt size comes from
`POST /v1/chat/completions/input_tokens` (older builds: `/apply-template` + `/tokenize`); `/health`
is 503 while loading; the context per slot is in `GET /props`. Closing our side of the connection
cancels the generation and frees the slot within about a second.

Fit is strict here: a request past the server's real ceiling is a segfault, so only a hard byte
bound or the server's own exact count may say "fits", and a crash on a large request teaches a
ceiling (ceiling.py) that later requests stay below.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from .. import failures
from ..ceiling import CrashCeilings
from ..config import LlamaCppBackend as LlamaCppConfig
from ..loopwatch import watch as loopwatch
from ..protocols import PROTOCOLS
from .assemble import assemble, sse_objects
from .base import Fit, FitQuery, ProbeResult, Upstream, empty_rest

_JSON = {"Content-Type": "application/json"}
log = logging.getLogger("switchyard")


class LlamaCppBackend:
    place = "local"
    free = True  # our own hardware: no per-token cost

    def __init__(self, name: str, config: LlamaCppConfig, ceilings: CrashCeilings | None = None) -> None:
        self.name = name
        self.config = config
        self.ceilings = ceilings
        self.url = config.url
        self.live_n_ctx: int | None = None
        self._session: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None
        self._count_route: str | None = None  # which token-count API this server has

    def _new_session(self, force_close: bool) -> aiohttp.ClientSession:
        t = self.config.timeouts
        # aiohttp bounds only the connect. First byte, idle and total are enforced in open() and
        # _Watchdog, each apart and named: aiohttp's sock_read would also bound the wait for the
        # response headers, failing a slow non-streamed answer at `idle` as if the server were dead.
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=force_close, limit=0),
            timeout=aiohttp.ClientTimeout(total=None, connect=t.connect, sock_connect=t.connect),
            skip_auto_headers=("User-Agent",),
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = self._new_session(force_close=not self.config.keep_alive)
        return self._session

    @property
    def fresh_session(self) -> aiohttp.ClientSession:
        """One connection per request, for the retry after a stale pooled socket."""
        if self._fresh is None or self._fresh.closed:
            self._fresh = self._new_session(force_close=True)
        return self._fresh

    async def _post(self, data: bytes, path: str = "/v1/chat/completions") -> aiohttp.ClientResponse:
        began = asyncio.get_running_loop().time()
        try:
            return await self._send_to(data, path)
        except aiohttp.ConnectionTimeoutError:
            stalled = loopwatch.stalled_since(began)
            if stalled < self.config.timeouts.connect / 2:
                raise
            # Our own loop was stalled: the connect may have completed long ago unseen. Not the server's fault.
            log.warning("connect to %s timed out while the gateway's event loop was stalled %.1fs: retrying once",
                        self.name, stalled)
            return await self._send_to(data, path)

    async def _send_to(self, data: bytes, path: str) -> aiohttp.ClientResponse:
        # Chat keeps calling `_send(data)` as before (tests wrap it); other protocols name their path.
        return await (self._send(data) if path == "/v1/chat/completions" else self._send(data, path))

    async def _send(self, data: bytes, path: str = "/v1/chat/completions") -> aiohttp.ClientResponse:
        url = f"{self.url}{path}"
        if not self.config.keep_alive:
            return await self.session.post(url, data=data, headers=_JSON)
        try:
            return await self.session.post(url, data=data, headers=_JSON)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            # A pooled socket the server had already closed fails before any response byte. Retry
            # once on a fresh connection: if the server really died, that one is refused (a crash).
            return await self.fresh_session.post(url, data=data, headers=_JSON)

    @property
    def context_window(self) -> int | None:
        limits = [n for n in (self.config.context_limit, self.live_n_ctx) if n]
        return min(limits) if limits else None

    # Set by `serve` while it builds/starts the embedded llama-server (gateway/firstrun.py), or why
    # that failed: routing skips the backend with this text as the reason and probes report it,
    # so no failure is counted against the circuit meanwhile.
    starting: str | None = None

    @property
    def unusable(self) -> str | None:
        return self.starting

    def retarget(self, url: str) -> None:
        """Point at another server (the embedded one `serve` starts when nothing answered)."""
        self.url = url.rstrip("/")

    async def open(self, body: dict[str, Any], headers: dict[str, str], stream: bool,
                   raw: bytes | None = None, protocol: str = "chat") -> Upstream:
        # llama-server serves Messages and Responses natively: their bytes go through to their path.
        native = protocol != "chat"
        path = PROTOCOLS[protocol].path
        if stream or native:
            # A native non-streamed answer is relayed whole (no assembler for those event formats):
            # llama.cpp cannot cancel it on hang-up, a cost only non-streaming callers pay.
            data = raw if raw is not None else json.dumps(body).encode()
        else:
            # llama.cpp cannot cancel a non-streamed generation when we hang up (llama.cpp #9273): ask
            # for a stream and assemble the answer, so closing frees the slot at once (assemble.py).
            data = json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}).encode()
        t = self.config.timeouts
        try:
            async with asyncio.timeout(t.first_byte):
                resp = await self._post(data, path)
                try:
                    if resp.status != 200:
                        raw = await resp.read()
                        raise failures.from_status(self.name, resp.status, resp.headers, raw)
                    if not stream and native:
                        whole = await resp.read()
                        resp.close()
                        return Upstream(200, whole, empty_rest(), _noop)
                    if not stream:
                        return await self._assembled(resp)
                    chunks = resp.content.iter_any()
                    first = await _first_data(chunks)
                    if not first:
                        raise failures.UpstreamFailure(failures.Kind.CRASH, self.name, "stream closed before any data")
                except BaseException:
                    resp.close()
                    raise
        except failures.UpstreamFailure:
            raise
        except aiohttp.ConnectionTimeoutError as e:
            raise failures.UpstreamFailure(failures.Kind.TIMEOUT, self.name,
                                           f"could not connect within {t.connect:g}s") from e
        except TimeoutError as e:
            raise failures.UpstreamFailure(failures.Kind.TIMEOUT, self.name,
                                           f"no first byte within {t.first_byte:g}s") from e
        except Exception as e:
            raise failures.from_exception(self.name, e) from e
        return Upstream(200, first, _guarded(self.name, chunks, _Watchdog(resp, t.idle, t.total)), _closer(resp))

    async def _assembled(self, resp: aiohttp.ClientResponse) -> Upstream:
        events = sse_objects(await resp.read())
        resp.close()
        errors = [e for e in events if isinstance(e.get("error"), dict)]
        if errors:
            raise failures.from_stream_error_event(self.name, json.dumps(errors[0]).encode())
        if not events:
            raise failures.UpstreamFailure(failures.Kind.CRASH, self.name, "answer closed before any data")
        answer = assemble(events)
        return Upstream(200, json.dumps(answer).encode(), empty_rest(), _noop, usage=answer.get("usage"))

    async def fit(self, q: FitQuery) -> Fit:
        limits = [n for n in (self.context_window, q.ceiling) if n]
        limit = min(limits) if limits else None
        size, reserve = q.size, q.reserve
        counted: list[int | None] = []

        async def count() -> int | None:
            if not counted:
                counted.append(await self.count_tokens(q.body))
            return counted[0]

        fit = Fit(True, size.estimate, "estimate" if limit is None else "bytes", limit)
        if limit is not None and size.upper + reserve > limit:
            # Strict: only the hard bounds or the server's own count decide.
            if size.lower + reserve > limit:
                fit = Fit(False, size.estimate, "bytes", limit)
            else:
                n = await count()
                fit = (Fit(size.estimate + reserve <= limit, size.estimate, "estimate", limit) if n is None
                       else Fit(n + reserve <= limit, n, "exact", limit))
            if not fit.fits:
                fit.note = f"{fit.tokens:,}+{reserve:,} tokens > {self.name} ceiling {limit:,}"
        learned = self.ceilings.get(self.name) if self.ceilings else None
        if not fit.fits or learned is None:
            return fit
        bar = int(learned * self.config.learned_ceiling_fraction)
        tokens = fit.tokens
        if fit.method == "bytes" and size.upper >= bar:
            n = await count() if size.lower < bar else None
            tokens = n if n is not None else size.estimate
            fit.method = "exact" if n is not None else fit.method
        if tokens >= bar:
            return Fit(False, tokens, fit.method, bar,
                       f"{tokens:,} tokens >= {self.name} learned crash ceiling {learned:,} (skip from {bar:,})")
        return fit

    def learn(self, failure: failures.UpstreamFailure, tokens_in: int) -> None:
        """A crash on a large request teaches a size ceiling; a small one is a broken server."""
        if (self.ceilings is not None and failure.kind is failures.Kind.CRASH
                and tokens_in >= self.config.learn_min_tokens):
            self.ceilings.learn(self.name, tokens_in)

    async def count_tokens(self, body: dict[str, Any]) -> int | None:
        """The model's own count, template and tools included; None when the server can't say."""
        payload = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        try:
            async with asyncio.timeout(10):
                if self._count_route in (None, "input_tokens"):
                    async with self.session.post(f"{self.url}/v1/chat/completions/input_tokens",
                                                 json=payload) as r:
                        if r.status == 200:
                            self._count_route = "input_tokens"
                            return int((await r.json())["input_tokens"])
                        if r.status != 404:
                            return None
                        self._count_route = "apply-template"
                async with self.session.post(f"{self.url}/apply-template", json=payload) as r:
                    if r.status != 200:
                        return None
                    prompt = (await r.json())["prompt"]
                async with self.session.post(f"{self.url}/tokenize",
                                             json={"content": prompt, "add_special": True}) as r:
                    if r.status != 200:
                        return None
                    return len((await r.json())["tokens"])
        except (aiohttp.ClientError, TimeoutError, KeyError, ValueError):
            return None

    async def start(self) -> None:
        return None

    async def tiny_request(self) -> ProbeResult | None:
        """One token of a one-word prompt: the half-open trial when no interactive turn comes
        (cheap on our own hardware; /health alone cannot tell a router's dead child)."""
        body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "stream": False}
        if self.config.model:
            body["model"] = self.config.model
        try:
            upstream = await self.open(body, {}, False)
        except failures.UpstreamFailure as f:
            return ProbeResult(False, f"trial request: {f.kind}: {f.message[:80]}")
        await upstream.close()
        return ProbeResult(True, "trial request answered")

    async def probe(self) -> ProbeResult:
        if self.starting:
            return ProbeResult(False, self.starting)
        try:
            async with asyncio.timeout(5):
                async with self.session.get(f"{self.url}/health") as r:
                    if r.status == 503:
                        return ProbeResult(False, "loading model")
                    if r.status != 200:
                        return ProbeResult(False, f"/health answered {r.status}")
                # In router mode the parent answers /health even when the model's child died, so
                # also ask for the model state; a single-model server answers /props.
                async with self.session.get(f"{self.url}/props") as r:
                    if r.status == 200:
                        props = await r.json()
                        n_ctx = (props.get("default_generation_settings") or {}).get("n_ctx")
                        if n_ctx:
                            self.live_n_ctx = int(n_ctx)
                        return ProbeResult(True, "ready")
                async with self.session.get(f"{self.url}/models") as r:
                    if r.status == 200:
                        models = (await r.json()).get("data") or []
                        want = self.config.model
                        for m in models:
                            if want is None or m.get("id") == want:
                                status = m.get("status")
                                state = status.get("value") if isinstance(status, dict) else status
                                if state not in (None, "loaded"):
                                    return ProbeResult(False, f"model {m.get('id')} is {state}")
                return ProbeResult(True, "ready")
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            return ProbeResult(False, f"unreachable: {type(e).__name__}")

    async def close(self) -> None:
        for s in (self._session, self._fresh):
            if s is not None:
                await s.close()


async def _first_data(chunks: AsyncIterator[bytes]) -> bytes:
    """The first chunk that carries an event, with any SSE comments before it kept in front.
    llama-server (b11434) sends a `:` comment line as soon as it accepts a stream, before the
    prefill: that is not the answer's first byte, and a crash during the prefill must still be able
    to fail over unseen."""
    held = b""
    async for chunk in chunks:
        held += chunk
        if any(line and not line.startswith(b":") for line in held.split(b"\n")):
            return held
    return held if held.strip(b": \n") else b""


async def _noop() -> None:
    return None


def _closer(resp: aiohttp.ClientResponse) -> Any:
    async def close() -> None:
        # Closing (not releasing) drops the TCP connection: llama.cpp cancels the generation.
        resp.close()

    return close


class _Watchdog:
    """Idle and total limits of a stream, for the price of one timer per stream (not per chunk):
    each chunk only stamps the time; the timer closes the response when a limit passes."""

    def __init__(self, resp: aiohttp.ClientResponse, idle: float, total: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.resp, self.idle = resp, idle
        self.last = self.loop.time()
        self.deadline = self.last + total
        self.total = total
        self.fired: str | None = None
        self._handle = self.loop.call_at(min(self.last + idle, self.deadline), self._check)

    def _check(self) -> None:
        now = self.loop.time()
        if now >= self.deadline:
            self.fired = f"the answer took longer than its total limit of {self.total:g}s"
        elif now >= self.last + self.idle:
            self.fired = f"silent for {self.idle:g}s"
        else:
            self._handle = self.loop.call_at(min(self.last + self.idle, self.deadline), self._check)
            return
        self.resp.close()  # wakes the pending read with a connection error, which _guarded renames

    def cancel(self) -> None:
        self._handle.cancel()


async def _guarded(name: str, chunks: AsyncIterator[bytes], dog: _Watchdog) -> AsyncIterator[bytes]:
    loop = dog.loop
    try:
        async for chunk in chunks:
            dog.last = loop.time()
            yield chunk
        if dog.fired:  # closing may end the read quietly instead of raising
            raise failures.UpstreamFailure(failures.Kind.TIMEOUT, name, dog.fired)
    except (aiohttp.ClientError, ConnectionError, TimeoutError) as e:
        if dog.fired:
            raise failures.UpstreamFailure(failures.Kind.TIMEOUT, name, dog.fired) from e
        raise failures.from_exception(name, e) from e
    finally:
        dog.cancel()

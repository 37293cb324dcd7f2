"""A llama.cpp `llama-server`, relayed byte for byte.

Facts this is built on (checked live against llama.cpp's server, build b11434): every chat
response comes with `Connection: close` and a pooled socket reused afterwards fails at write, so
each request gets a fresh connection (the chat hop goes through http1.py, a client that costs little
more than the connect); the exact prompt size comes from
`POST /v1/chat/completions/input_tokens` (older builds: `/apply-template` + `/tokenize`); `/health`
is 503 while loading; the context per slot is in `GET /props`. Closing our side of the connection
cancels the generation and frees the slot within about a second.

Fit is strict here: a request past the server's real ceiling is a segfault, so only a hard byte
bound or the server's own exact count may say "fits", and a crash on a large request teaches a
ceiling (ceiling.py) that later requests stay below.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from .. import failures, wirejson
from ..ceiling import CrashCeilings
from ..config import LlamaCppBackend as LlamaCppConfig
from ..loopwatch import watch as loopwatch
from ..protocols import PROTOCOLS
from . import http1
from .assemble import assemble, sse_objects
from .base import TASK, AnswerStats, Estimate, Fit, FitQuery, ProbeResult, Upstream, empty_rest
from .llamastream import ROUTER_ERROR, Watchdog, closer, first_data, guarded, noop
from .prefix import Plan, SlotCache
from .speed import Speeds

CHAT_PATH = "/v1/chat/completions"
log = logging.getLogger("switchyard")


class LlamaCppBackend:
    place = "local"
    free = True  # our own hardware: no per-token cost

    def __init__(self, name: str, config: LlamaCppConfig, ceilings: CrashCeilings | None = None,
                 speeds: Speeds | None = None) -> None:
        self.name = name
        self.config = config
        self.ceilings = ceilings
        self.speeds = speeds or Speeds()
        self.cache = SlotCache(config.hot_for, pin=config.slot_affinity, speeds=self.speeds)
        self.url = config.url
        self.live_n_ctx: int | None = None
        self._session: aiohttp.ClientSession | None = None  # probes and token counts
        self._http = http1.Client()  # the chat/messages/responses hop, per request
        self._targets: dict[str, http1.Target] = {}  # url+path -> the request head, encoded once
        self._count_route: str | None = None  # which token-count API this server has

    def _new_session(self, force_close: bool) -> aiohttp.ClientSession:
        t = self.config.timeouts
        # aiohttp bounds only the connect. First byte, idle and total are enforced in open() and
        # llamastream.Watchdog, each apart and named: aiohttp's sock_read would also bound the wait for the
        # response headers, failing a slow non-streamed answer at `idle` as if the server were dead.
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=force_close, limit=0),
            timeout=aiohttp.ClientTimeout(total=None, connect=t.connect, sock_connect=t.connect),
            skip_auto_headers=("User-Agent",),
            cookie_jar=aiohttp.DummyCookieJar(),  # llama-server sets no cookies: skip the jar per request
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = self._new_session(force_close=not self.config.keep_alive)
        return self._session

    async def _post(self, data: bytes, path: str = "/v1/chat/completions") -> http1.Response:
        began = asyncio.get_running_loop().time()
        try:
            return await self._send_to(data, path)
        except http1.ConnectTimeout:
            stalled = loopwatch.stalled_since(began)
            if stalled < self.config.timeouts.connect / 2:
                raise
            # Our own loop was stalled: the connect may have completed long ago unseen. Not the server's fault.
            log.warning("connect to %s timed out while the gateway's event loop was stalled %.1fs: retrying once",
                        self.name, stalled)
            return await self._send_to(data, path)

    async def _send_to(self, data: bytes, path: str) -> http1.Response:
        # Chat keeps calling `_send(data)` as before (tests wrap it); other protocols name their path.
        return await (self._send(data) if path == CHAT_PATH else self._send(data, path))

    async def _send(self, data: bytes, path: str = "/v1/chat/completions") -> http1.Response:
        url = f"{self.url}{path}"
        target = self._targets.get(url)
        if target is None:  # parsed and encoded once per URL (retarget() may add one), not per request
            target = self._targets[url] = http1.Target.post(url)
        # With `keep_alive` a pooled socket the server already closed is retried once on a fresh
        # connection inside the client; a server that really died refuses that one (a crash).
        return await self._http.post(target, data, self.config.timeouts.connect, self.config.keep_alive)

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
        plan = None if native else self.cache.plan(body, headers.get("x-session-id"))
        if plan is None:
            return await self._exchange(body, stream, raw, protocol, None)
        # From here until its answer ends the request occupies its slot: others are planned around it.
        ended = self.cache.occupy(plan, conversation=TASK not in headers)
        try:
            upstream = await self._exchange(body, stream, raw, protocol, plan)
        except BaseException:
            ended()
            raise
        if not stream:  # read and assembled whole: the slot's work for it is done
            ended()
        else:
            upstream.close = _then(ended, upstream.close)
        return upstream

    async def _exchange(self, body: dict[str, Any], stream: bool, raw: bytes | None, protocol: str,
                        plan: Plan | None) -> Upstream:
        native = protocol != "chat"
        path = PROTOCOLS[protocol].path
        if plan is not None and plan.pin:  # several slots: the one holding this prefix, or one no hot one owns
            body, raw = {**body, "id_slot": plan.slot}, None
        if stream or native:
            # A native non-streamed answer is relayed whole (no assembler for those event formats):
            # llama.cpp cannot cancel it on hang-up, a cost only non-streaming callers pay.
            data = raw if raw is not None else wirejson.dumps(body)
        else:
            # llama.cpp cannot cancel a non-streamed generation when we hang up (llama.cpp #9273): ask
            # for a stream and assemble the answer, so closing frees the slot at once (assemble.py).
            data = wirejson.dumps({**body, "stream": True, "stream_options": {"include_usage": True}})
        t = self.config.timeouts
        cold = self.model_state == "unloaded"  # router mode: this request starts the model's child
        began = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(t.first_byte):
                resp = await self._post(data, path)
                try:
                    if resp.status != 200:
                        raw = await resp.read()
                        raise failures.from_status(self.name, resp.status, resp.headers, raw)
                    if cold:  # the router answers once the child is up: this wait was the load
                        self.model_state, self.load_seconds = "loaded", asyncio.get_running_loop().time() - began
                    if not stream and native:
                        whole = await resp.read()
                        resp.close()
                        return Upstream(200, whole, empty_rest(), noop)
                    if not stream:
                        upstream = await self._assembled(resp)
                        upstream.settle = functools.partial(self._settled, plan)
                        return upstream
                    chunks = resp.iter_any()
                    first = await first_data(chunks)
                    if not first:
                        raise failures.UpstreamFailure(failures.Kind.CRASH, self.name, "stream closed before any data")
                    if first.startswith(ROUTER_ERROR):
                        # Router mode: the parent has already answered 200 for the stream when the child dies,
                        # then writes this plain-text line instead of events. Still before the first byte.
                        raise failures.from_status(self.name, 502, resp.headers, first)
                except BaseException:
                    resp.close()
                    raise
        except failures.UpstreamFailure:
            raise
        except http1.ConnectTimeout as e:
            raise failures.UpstreamFailure(failures.Kind.TIMEOUT, self.name,
                                           f"could not connect within {t.connect:g}s") from e
        except TimeoutError as e:
            raise failures.UpstreamFailure(failures.Kind.TIMEOUT, self.name,
                                           f"no first byte within {t.first_byte:g}s") from e
        except Exception as e:
            raise failures.from_exception(self.name, e) from e
        return Upstream(200, first, guarded(self.name, chunks, Watchdog(resp, t.idle, t.total)), closer(resp),
                        settle=functools.partial(self._settled, plan))

    def _settled(self, plan: Plan | None, stats: AnswerStats) -> None:
        """Learn from an answer: what the slot now holds, how good the prediction was, the rates.
        (`plan` is None for a native Messages/Responses request: its prompt is not fingerprinted.)"""
        if not stats.ok:
            return
        if plan is not None:
            self.cache.settled(plan, stats.usage, stats.timings, stats.conversation)
        timings = stats.timings or {}
        prompt_n, prompt_ms = timings.get("prompt_n"), timings.get("prompt_ms")
        if isinstance(prompt_n, int) and isinstance(prompt_ms, (int, float)):
            self.speeds.observe_prefill(prompt_n, prompt_ms / 1000)
        if isinstance(timings.get("predicted_per_second"), (int, float)):
            self.speeds.observe_decode(float(timings["predicted_per_second"]))

    def estimate(self, q: FitQuery, queued: int, alongside: int = 0) -> Estimate:
        """Queue ahead (learned service time each) + uncached tokens at the learned prefill rate."""
        learned = self.cache.tokens_of(q.body)  # this server's bytes per token, once it has answered
        tokens = learned or q.size.estimate
        cached = min(tokens, self.cache.plan(q.body, q.session).predicted_cached)
        uncached = max(0, tokens - cached)
        speeds = self.speeds
        rate = speeds.prefill_rate(tokens)
        prefill = speeds.prefill_seconds(uncached, tokens)
        first_token = 1 / speeds.decode if speeds.decode else 0.0  # the first byte is the first token
        if prefill is not None and alongside:  # slots share the server's compute: each runs at its share
            prefill, first_token = prefill * (1 + alongside), first_token * (1 + alongside)
        queue_s = queued * (speeds.service or 0.0)
        parts: dict[str, Any] = {"queued": queued, "queue_s": round(queue_s, 3), "alongside": alongside,
                                 "tokens": tokens,
                                 "tokens_from": "learned bytes/token" if learned else "bytes",
                                 "cached_tokens": cached, "uncached_tokens": uncached,
                                 "prefill_tok_s": round(rate, 1) if rate else None,
                                 "overhead_s": round(speeds.overhead, 3) if speeds.overhead is not None else None}
        if self.model_state == "unloaded" and self.load_seconds:  # router mode: this request loads the model
            queue_s += self.load_seconds
            parts["load_s"] = round(self.load_seconds, 3)
        return Estimate(None if prefill is None else queue_s + prefill + first_token, parts, queue_s)

    def evicts(self, q: FitQuery) -> str | None:
        return self.cache.evicts(q.body, q.session)

    def report(self) -> dict[str, Any]:
        cache = self.cache
        if not cache.prompt_tokens:
            return {"slots": cache.memory.slots}
        return {"slots": cache.memory.slots, "cache_hit_ratio": round(cache.cached_tokens / cache.prompt_tokens, 3),
                "cache_prediction_error": cache.accuracy()}

    async def _assembled(self, resp: http1.Response) -> Upstream:
        events = sse_objects(await resp.read())
        resp.close()
        errors = [e for e in events if isinstance(e.get("error"), dict)]
        if errors:
            raise failures.from_stream_error_event(self.name, json.dumps(errors[0]).encode())
        if not events:
            raise failures.UpstreamFailure(failures.Kind.CRASH, self.name, "answer closed before any data")
        answer = assemble(events)
        return Upstream(200, wirejson.dumps(answer), empty_rest(), noop, usage=answer.get("usage"),
                        timings=answer.get("timings"))

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
        """A crash on a large request teaches a size ceiling; a small one is a broken server. Either
        way the server restarts empty: every slot's cached prefix is gone."""
        if failure.kind is failures.Kind.CRASH:
            self.cache.memory.forget()
        if (self.ceilings is not None and failure.kind is failures.Kind.CRASH
                and tokens_in >= self.config.learn_min_tokens):
            self.ceilings.learn(self.name, tokens_in)

    async def count_tokens(self, body: dict[str, Any]) -> int | None:
        """The model's own count, template and tools included; None when the server can't say."""
        payload = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        if self.config.model:  # a router counts with the model it is asked for (the client's may be "auto")
            payload["model"] = self.config.model
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
                # In router mode the parent answers /health (and a /props of its own, `role: router`)
                # even when the model's child died, so the model's state comes from its /models.
                async with self.session.get(f"{self.url}/props") as r:
                    if r.status == 200:
                        props = await r.json()
                        if props.get("role") != "router":
                            self._note_n_ctx(props)
                            if isinstance(props.get("total_slots"), int) and props["total_slots"] > 0:
                                self.cache.memory.slots = props["total_slots"]
                            return ProbeResult(True, "ready")
                return await self._router_model_state()
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            return ProbeResult(False, f"unreachable: {type(e).__name__}")

    # ---- router mode (llama-server --models-dir / --models-preset): one member per model ----

    model_state: str | None = None  # the model's status.value in the router's /models, as last probed
    load_seconds: float | None = None  # learned: first byte of the first request after `unloaded`

    def _note_n_ctx(self, props: dict[str, Any]) -> None:
        n_ctx = (props.get("default_generation_settings") or {}).get("n_ctx")
        if n_ctx:
            self.live_n_ctx = int(n_ctx)

    async def _router_model_state(self) -> ProbeResult:
        """`unloaded` is not down: the router starts the child on the first request (the load time is
        learned then). A child that crashed is `unloaded` + `failed`, and the router reloads it on the
        next request: ready, so an open circuit gets its trial. `--models-max` eviction is the same
        `unloaded`, without `failed`: never a crash. Loading states are not ready yet."""
        async with self.session.get(f"{self.url}/models") as r:
            if r.status != 200:
                return ProbeResult(True, "ready")
            models = (await r.json()).get("data") or []
        want = self.config.model
        entry = next((m for m in models if want is None or want == m.get("id") or want in (m.get("aliases") or [])),
                     None)
        if entry is None:
            return ProbeResult(False, f"the router serves no model {want!r}")
        status = entry.get("status")
        status = status if isinstance(status, dict) else {"value": status}
        state = self.model_state = status.get("value")
        name = entry.get("id")
        # The child's context comes from its arguments: `/props?model=` would load an unloaded model
        # (checked on b11434), evicting another under --models-max.
        args = [str(a) for a in status.get("args") or []]
        for flag in ("--ctx-size", "-c"):
            if flag in args[:-1] and args[args.index(flag) + 1].isdigit() and int(args[args.index(flag) + 1]):
                self.live_n_ctx = int(args[args.index(flag) + 1])
        if state in (None, "loaded"):
            return ProbeResult(True, "ready")
        if state == "unloaded":
            load = f"; last load {self.load_seconds:.1f}s" if self.load_seconds is not None else ""
            if status.get("failed"):
                return ProbeResult(True, f"model {name} child exited ({status.get('exit_code')}); "
                                   f"the router reloads it on the next request{load}")
            return ProbeResult(True, f"model {name} unloaded: loads on the first request{load}")
        return ProbeResult(False, f"model {name} is {state}")

    async def close(self) -> None:
        self._http.close()
        if self._session is not None:
            await self._session.close()


def _then(first: Callable[[], None], close: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    async def both() -> None:
        first()
        await close()

    return both


async def router_models(url: str, timeout: float = 5.0) -> list[str] | None:
    """The model ids a router-mode server lists (`models: discover`); None when it cannot say."""
    try:
        async with aiohttp.ClientSession() as s, asyncio.timeout(timeout), s.get(f"{url}/models") as r:
            if r.status != 200:
                return None
            data = (await r.json()).get("data") or []
        return [str(m["id"]) for m in data if isinstance(m, dict) and m.get("id")]
    except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError):
        return None

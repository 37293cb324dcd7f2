"""A llama.cpp `llama-server`, relayed byte for byte.

Facts this is built on (../shared/clients.md): every chat response comes with `Connection: close`
and a pooled socket reused afterwards fails at write, so each request gets a fresh connection
(`force_close`); the exact prompt size comes from `POST /v1/chat/completions/input_tokens` (older
builds: `/apply-template` + `/tokenize`); `/health` is 503 while loading; the context per slot is in
`GET /props`. Closing our side of the connection cancels the generation and frees the slot.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import yarl

from .. import failures
from ..config import LlamaCppBackend as LlamaCppConfig
from .base import ProbeResult, Upstream, empty_rest

_JSON = {"Content-Type": "application/json"}


class LlamaCppBackend:
    place = "local"

    def __init__(self, name: str, config: LlamaCppConfig) -> None:
        self.name = name
        self.config = config
        self.url = config.url
        self.live_n_ctx: int | None = None
        self._session: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None
        self._count_route: str | None = None  # which token-count API this server has
        self._chat_url: yarl.URL | None = None
        self._chat_base = ""

    def _new_session(self, force_close: bool) -> aiohttp.ClientSession:
        t = self.config.timeouts
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=force_close, limit=0),
            timeout=aiohttp.ClientTimeout(total=t.total, connect=t.connect, sock_read=t.idle),
            skip_auto_headers=("User-Agent",),
            cookie_jar=aiohttp.DummyCookieJar(),  # llama-server sets no cookies: skip the jar per request
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

    async def _post(self, data: bytes) -> aiohttp.ClientResponse:
        if self._chat_url is None or self._chat_base != self.url:  # parsed once, not per request
            self._chat_base = self.url
            self._chat_url = yarl.URL(f"{self.url}/v1/chat/completions")
        url = self._chat_url
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

    unusable: str | None = None

    def retarget(self, url: str) -> None:
        """Point at another server (the embedded one `serve` starts when nothing answered)."""
        self.url = url.rstrip("/")

    async def open(self, body: dict[str, Any], headers: dict[str, str], stream: bool,
                   raw: bytes | None = None) -> Upstream:
        data = raw if raw is not None else json.dumps(body).encode()
        try:
            async with asyncio.timeout(self.config.timeouts.first_byte):
                resp = await self._post(data)
                try:
                    if resp.status != 200:
                        raw = await resp.read()
                        raise failures.from_status(self.name, resp.status, resp.headers, raw)
                    if not stream:
                        return Upstream(200, resp.content_type, await resp.read(), empty_rest(), _closer(resp))
                    chunks = resp.content.iter_any()
                    first = await anext(chunks, b"")
                    if not first:
                        raise failures.UpstreamFailure(failures.Kind.CRASH, self.name, "stream closed before any data")
                except BaseException:
                    resp.close()
                    raise
        except failures.UpstreamFailure:
            raise
        except Exception as e:
            raise failures.from_exception(self.name, e) from e
        return Upstream(200, resp.content_type, first, _guarded(self.name, chunks), _closer(resp))

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

    async def probe(self) -> ProbeResult:
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
                        return ProbeResult(True, "ready", self.live_n_ctx)
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
                return ProbeResult(True, "ready", self.live_n_ctx)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            return ProbeResult(False, f"unreachable: {type(e).__name__}")

    async def close(self) -> None:
        for s in (self._session, self._fresh):
            if s is not None:
                await s.close()


def _closer(resp: aiohttp.ClientResponse) -> Any:
    async def close() -> None:
        # Closing (not releasing) drops the TCP connection: llama.cpp cancels the generation.
        resp.close()

    return close


async def _guarded(name: str, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield chunk
    except (aiohttp.ClientError, ConnectionError, TimeoutError) as e:
        raise failures.from_exception(name, e) from e

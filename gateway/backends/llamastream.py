"""A llama.cpp answer in flight: closing it, its idle and total limits, a router's error line.

Split from llamacpp.py (the backend) so each reads on its own: this is the per-stream machinery,
costing one timer per stream and a couple of byte scans per chunk.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Protocol

import aiohttp

from .. import failures

ROUTER_ERROR = b"proxy error:"  # a router-mode parent's text when its child fails (b11434)


class Closable(Protocol):
    def close(self) -> None: ...


async def noop() -> None:
    return None


def closer(resp: Closable) -> Any:
    async def close() -> None:
        # Closing (not releasing) drops the TCP connection: llama.cpp cancels the generation.
        resp.close()

    return close


def router_error_at(chunk: bytes) -> int | None:
    """Where a router-mode parent's `proxy error:` line starts in a stream chunk, if it does. Only at
    a line start: the model's own text is inside JSON strings, where a newline is always escaped."""
    if chunk.startswith(ROUTER_ERROR):
        return 0
    at = chunk.find(b"\n" + ROUTER_ERROR)
    return at + 1 if at >= 0 else None


class Watchdog:
    """Idle and total limits of a stream, for the price of one timer per stream (not per chunk):
    each chunk only stamps the time; the timer closes the response when a limit passes."""

    def __init__(self, resp: Closable, idle: float, total: float) -> None:
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


async def guarded(name: str, chunks: AsyncIterator[bytes], dog: Watchdog) -> AsyncIterator[bytes]:
    loop = dog.loop
    try:
        async for chunk in chunks:
            dog.last = loop.time()
            cut = router_error_at(chunk)
            if cut is not None:  # router mode: the child died mid-stream; the parent wrote its text
                if cut:
                    yield chunk[:cut]
                raise failures.from_status(name, 502, None, chunk[cut:].strip())
            yield chunk
        if dog.fired:  # closing may end the read quietly instead of raising
            raise failures.UpstreamFailure(failures.Kind.TIMEOUT, name, dog.fired)
    except (aiohttp.ClientError, ConnectionError, TimeoutError) as e:
        if dog.fired:
            raise failures.UpstreamFailure(failures.Kind.TIMEOUT, name, dog.fired) from e
        raise failures.from_exception(name, e) from e
    finally:
        dog.cancel()


async def first_data(chunks: AsyncIterator[bytes]) -> bytes:
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

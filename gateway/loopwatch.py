"""How late our own event loop runs: a stall here (a slow import, a blocking call) is ours.

A connect time-out that fires while the loop was stalled says nothing about the backend — the
backend may have answered in microseconds while we were not looking — so backends ask
`stalled_since` before blaming the server (llamacpp.py retries such a connect once).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

TICK = 0.05  # seconds between heartbeats: cheap, and fine enough to see a 0.5 s stall


class LoopWatch:
    def __init__(self) -> None:
        self._last = time.monotonic()
        self._stalls: deque[tuple[float, float]] = deque(maxlen=64)  # (ended at, seconds late)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._last = time.monotonic()
            self._task = asyncio.create_task(self._beat(), name="switchyard-loopwatch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            late = now - self._last - TICK
            if late > 0.1:
                self._stalls.append((now, late))
            self._last = now

    def stalled_since(self, since: float) -> float:
        """The longest stall (seconds) seen since `since` (monotonic), the one going on included."""
        ongoing = time.monotonic() - self._last - TICK if self._task is not None else 0.0
        past = max((late for at, late in self._stalls if at >= since), default=0.0)
        return max(past, ongoing, 0.0)


watch = LoopWatch()

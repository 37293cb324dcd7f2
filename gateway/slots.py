"""The queue in front of a backend with few slots (llama.cpp with `-np 1`): priority, then FIFO.

Interactive turns (priority 0) go ahead of background tasks (priority 1) such as Open WebUI's
title generation, which starts at the same moment as the first reply of a new chat. A waiter
that is not served within its limit gets `False` and the caller spills it to its next backend.
A slot freed by a finished request is handed straight to the next waiter, never left idle.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class SlotQueue:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.busy = 0
        self._heap: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self.waiting = 0

    async def acquire(self, priority: int, max_wait: float) -> bool:
        if self.busy < self.capacity and self.waiting == 0:
            self.busy += 1
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (priority, next(self._seq), fut))
        self.waiting += 1
        try:
            async with asyncio.timeout(max_wait):
                await asyncio.shield(fut)
            return True
        except TimeoutError:
            if fut.done() and not fut.cancelled():
                return True  # handed a slot at the very moment the wait ran out: take it
            fut.cancel()
            return False
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # we were handed a slot but our client left: pass it on
            else:
                fut.cancel()
            raise
        finally:
            self.waiting -= 1

    def release(self) -> None:
        while self._heap:
            _, _, fut = heapq.heappop(self._heap)
            if not fut.done():
                fut.set_result(None)  # the slot moves to this waiter; busy stays the same
                return
        self.busy -= 1

    @asynccontextmanager
    async def slot(self, priority: int, max_wait: float) -> AsyncIterator[tuple[bool, float]]:
        """Yields (got_slot, seconds_waited); releases on exit when the slot was taken."""
        start = time.monotonic()
        got = await self.acquire(priority, max_wait)
        try:
            yield got, time.monotonic() - start
        finally:
            if got:
                self.release()

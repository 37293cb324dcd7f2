"""The queue in front of a backend with few slots (llama.cpp with `-np 1`): priority, then FIFO.

Interactive turns (priority 0) go ahead of background tasks (priority 1) such as a new chat's
title, which both Open WebUI and opencode send at the same moment as the chat's first turn. Three
rules keep the user's reply first:

- **look-ahead**: a background task that finds the slot idle waits `lookahead` seconds before
  taking it, so the turn sent a few milliseconds after it wins the slot;
- **pre-emption**: a preemptible holder (a background task whose answer is held back until
  complete, so no byte has reached its client) is asked to give the slot up the moment an
  interactive request has to wait — its lease's `preempted` event is set, and the holder cancels
  its upstream request and goes elsewhere;
- **no idle slot while someone waits**: a freed slot is handed straight to the next eligible waiter.

A waiter not served within its limit gets `got=False` and the caller spills it to its next backend.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

INTERACTIVE, BACKGROUND = 0, 1


class QueueClosed(Exception):
    """The gateway is shutting down: no more slots are handed out."""


@dataclass(eq=False)
class Lease:
    """One request's hold on a slot (or its failed wait for one)."""

    priority: int
    preemptible: bool = False
    got: bool = False
    waited: float = 0.0
    preempted: asyncio.Event = field(default_factory=asyncio.Event)

    def __iter__(self) -> Iterator[bool | float]:  # `async with q.slot(...) as (got, waited)`
        return iter((self.got, self.waited))


class SlotQueue:
    def __init__(self, capacity: int, lookahead: float = 0.0) -> None:
        self.capacity = capacity
        self.lookahead = lookahead
        self.busy = 0
        self.waiting = 0
        self.preemptions = 0
        self.holders: set[Lease] = set()
        # (priority, seq, not_before, future): a background waiter is not granted before not_before
        self._heap: list[tuple[int, int, float, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False

    def close(self) -> None:
        """Shutting down: every waiter (and every later request) gets QueueClosed at once."""
        self.closed = True
        for _, _, _, fut in self._heap:
            if not fut.done():
                fut.set_exception(QueueClosed())
        self._heap.clear()

    def _grant(self) -> None:
        """Hand free slots to eligible waiters, highest priority first."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self.busy < self.capacity and self._heap:
            _, _, not_before, fut = self._heap[0]
            if fut.done():
                heapq.heappop(self._heap)
                continue
            if not_before > now:  # the head is a background task still looking ahead
                if self._timer is None or self._timer.when() > not_before:
                    if self._timer is not None:
                        self._timer.cancel()
                    self._timer = loop.call_at(not_before, self._wake)
                return
            heapq.heappop(self._heap)
            self.busy += 1
            fut.set_result(None)

    def _wake(self) -> None:
        self._timer = None
        self._grant()

    def _preempt_for(self, priority: int) -> None:
        """An interactive request must wait: ask one preemptible holder to give way."""
        if priority != INTERACTIVE or self.busy < self.capacity:
            return
        for lease in self.holders:
            if lease.preemptible and not lease.preempted.is_set():
                lease.preempted.set()
                self.preemptions += 1
                return

    async def acquire(self, lease: Lease | int, max_wait: float) -> bool:
        if isinstance(lease, int):
            lease = Lease(lease)
        if self.closed:
            raise QueueClosed
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        not_before = loop.time() + (self.lookahead if lease.priority != INTERACTIVE else 0.0)
        heapq.heappush(self._heap, (lease.priority, next(self._seq), not_before, fut))
        self._grant()
        if fut.done():
            return self._hold(lease)
        self.waiting += 1
        self._preempt_for(lease.priority)
        try:
            async with asyncio.timeout(max_wait):
                await asyncio.shield(fut)
            return self._hold(lease)
        except TimeoutError:
            if _granted(fut):
                return self._hold(lease)  # handed a slot at the very moment the wait ran out: take it
            fut.cancel()
            return False
        except asyncio.CancelledError:
            if _granted(fut):
                self.release()  # we were handed a slot but our client left: pass it on
            else:
                fut.cancel()
            raise
        finally:
            self.waiting -= 1

    def ahead(self, priority: int) -> tuple[int, int]:
        """(rounds, alongside) for a request of this priority now: how many service times it waits — the
        holders that will not give way to it and the waiters served before it, beyond the free slots, per
        slot — and how many requests then run beside it on the server's other slots (sharing its compute)."""
        give_way = priority == INTERACTIVE
        blocking = sum(1 for h in self.holders if not (give_way and h.preemptible))
        waiting = sum(1 for p, _, _, fut in self._heap if p <= priority and not fut.done())
        over = blocking + waiting - self.capacity + 1
        if over <= 0:
            return 0, blocking + waiting
        return -(-over // self.capacity), self.capacity - 1

    def _hold(self, lease: Lease) -> bool:
        self.holders.add(lease)
        return True

    def release(self, lease: Lease | None = None) -> None:
        if lease is not None:
            self.holders.discard(lease)
        self.busy -= 1
        self._grant()

    @asynccontextmanager
    async def slot(self, priority: int, max_wait: float, preemptible: bool = False) -> AsyncIterator[Lease]:
        """Yields the lease (`got`, `waited`, `preempted`); releases on exit when the slot was taken."""
        lease = Lease(priority, preemptible)
        start = time.monotonic()
        lease.got = await self.acquire(lease, max_wait)
        lease.waited = time.monotonic() - start
        try:
            yield lease
        finally:
            if lease.got:
                self.release(lease)


def _granted(fut: asyncio.Future[None]) -> bool:
    return fut.done() and not fut.cancelled() and fut.exception() is None

"""Step between decide and dispatch: admit the request under its team's limits.

Requests/min and tokens/min are leaky buckets (aiolimiter) checked without waiting; concurrency
is a counter; the monthly budget is the ledger's spend this month plus what this process
recorded since. Over a limit the request is refused with 429 + Retry-After (`rate_limit_exceeded`,
or `insufficient_quota` for the budget) — unless its rule says `on_limit: local`, in which case it
is narrowed to its free (local) backends and goes on. The budget only concerns billed backends.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

from aiolimiter import AsyncLimiter

from .classify import RequestProfile
from .config import Policy
from .decide import Route
from .errors import GatewayError, QuotaExceeded, RateLimited
from .record import Decision


def month_start(now: float | None = None) -> float:
    """Local midnight of the 1st of the month `now` falls in."""
    t = time.localtime(now)
    return time.mktime((t.tm_year, t.tm_mon, 1, 0, 0, 0, 0, 0, -1))


def next_month(now: float | None = None) -> float:
    """Local midnight of the 1st of the month after the one `now` falls in."""
    t = time.localtime(now)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return time.mktime((year, month, 1, 0, 0, 0, 0, 0, -1))


@dataclass
class _TeamState:
    rpm: AsyncLimiter | None = None
    tpm: AsyncLimiter | None = None
    in_flight: int = 0


class Admission:
    """`spent_this_month` is the ledger's spend per team since `month_start(now)` at start; `clock`
    is injectable so tests can cross a month boundary without waiting for one."""

    def __init__(self, spent_this_month: dict[str, float] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._teams: dict[str, _TeamState] = {}
        self._spent: dict[str, float] = dict(spent_this_month or {})  # this calendar month, dollars
        self._month_end = next_month(clock())

    def _roll(self) -> None:
        """A new calendar month: every team's budget starts over, seen or not."""
        now = self._clock()
        if now >= self._month_end:
            self._spent.clear()
            self._month_end = next_month(now)

    def _state(self, policy: Policy) -> _TeamState:
        st = self._teams.get(policy.team)
        if st is None:
            st = self._teams[policy.team] = _TeamState()
        lim = policy.limits
        # (re)build buckets when a reload changed the numbers
        if not lim.requests_per_minute:
            st.rpm = None
        elif st.rpm is None or st.rpm.max_rate != lim.requests_per_minute:
            st.rpm = AsyncLimiter(lim.requests_per_minute, 60)
        if not lim.tokens_per_minute:
            st.tpm = None
        elif st.tpm is None or st.tpm.max_rate != lim.tokens_per_minute:
            st.tpm = AsyncLimiter(lim.tokens_per_minute, 60)
        return st

    def observe(self, d: Decision) -> None:
        """Recorder sink: billed spend counts against the budget as soon as it is known."""
        if d.cost:
            self._roll()
            self._spent[d.team] = self._spent.get(d.team, 0.0) + d.cost

    def spent(self, team: str) -> float:
        self._roll()
        return self._spent.get(team, 0.0)

    @asynccontextmanager
    async def admit(self, policy: Policy, profile: RequestProfile, route: Route) -> AsyncIterator[Route]:
        st = self._state(policy)
        route, charge = self._check(policy, profile, route, st)
        if charge:
            # has_capacity() was checked just above, so these return at once: nothing waits here
            if st.rpm is not None:
                await st.rpm.acquire(1)
            if st.tpm is not None:
                await st.tpm.acquire(min(profile.tokens_in, st.tpm.max_rate))
        st.in_flight += 1
        try:
            yield route
        finally:
            st.in_flight -= 1

    def _check(self, policy: Policy, profile: RequestProfile, route: Route,
               st: _TeamState) -> tuple[Route, bool]:
        lim = policy.limits
        problem: GatewayError | None = None
        if lim.concurrent is not None and st.in_flight >= lim.concurrent:
            problem = RateLimited(f"team {policy.team!r} already has {st.in_flight} requests in flight "
                                  f"(limit {lim.concurrent})", headers={"Retry-After": "1"})
        elif st.rpm is not None and not st.rpm.has_capacity(1):
            wait = 60.0 / st.rpm.max_rate
            problem = RateLimited(f"team {policy.team!r} is over {lim.requests_per_minute:g} requests/min",
                                  headers={"Retry-After": str(max(1, math.ceil(wait)))})
        elif st.tpm is not None and not st.tpm.has_capacity(min(profile.tokens_in, st.tpm.max_rate)):
            wait = 60.0 * min(profile.tokens_in, st.tpm.max_rate) / st.tpm.max_rate
            problem = RateLimited(f"team {policy.team!r} is over {lim.tokens_per_minute:g} tokens/min",
                                  headers={"Retry-After": str(max(1, math.ceil(wait)))})
        if problem is None and lim.monthly_budget_usd is not None and any(not s.free for s in route.steps):
            spent = self.spent(policy.team)
            if spent >= lim.monthly_budget_usd:
                problem = QuotaExceeded(
                    f"team {policy.team!r} has spent ${spent:.4f} of its monthly hosted budget "
                    f"${lim.monthly_budget_usd:g}",
                    headers={"Retry-After": str(max(1, int(self._month_end - self._clock())))})
        if problem is not None:
            free = tuple(s for s in route.steps if s.free)
            if route.on_limit != "local" or not free:
                raise problem
            return replace(route, steps=free,
                           reason=f"{route.reason} [over limit, local only: {problem.message}]"), False
        return route, True

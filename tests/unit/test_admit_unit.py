"""admit: rpm / tpm / concurrency / budget, month rollover with an injected clock, `on_limit: local`."""

from __future__ import annotations

import time
from typing import Any

import pytest

from gateway.admit import Admission, month_start, next_month
from gateway.classify import RequestProfile
from gateway.config import Policy
from gateway.decide import Route, Step
from gateway.errors import QuotaExceeded, RateLimited
from gateway.record import Decision
from gateway.tokens import TokenSize

ROUTE = Route((Step("local", 30, True), Step("hosted", 30, False)), "r", "default", 10, "bytes")
HOSTED_ONLY = Route((Step("hosted", 30, False),), "r", "compaction", 10, "bytes")


def policy(on_limit: str = "refuse", **limits: Any) -> Policy:
    return Policy.model_validate({"team": "t", "limits": limits, "rules": [{"route": ["local"]}]})


def profile(tokens: int = 10) -> RequestProfile:
    return RequestProfile("main", "default", "other", None, "t", "auto", TokenSize(tokens * 3, 1, False), 0, None)


async def admit(a: Admission, p: Policy, route: Route = ROUTE, tokens: int = 10) -> Route:
    async with a.admit(p, profile(tokens), route) as admitted:
        return admitted


async def test_requests_per_minute_refuses_with_retry_after() -> None:
    a, p = Admission(), policy(requests_per_minute=2)
    await admit(a, p)
    await admit(a, p)
    with pytest.raises(RateLimited) as e:
        await admit(a, p)
    assert int(e.value.headers["Retry-After"]) >= 1


async def test_tokens_per_minute_counts_the_estimate() -> None:
    a, p = Admission(), policy(tokens_per_minute=100)
    await admit(a, p, tokens=80)
    with pytest.raises(RateLimited):
        await admit(a, p, tokens=80)


async def test_concurrency_counts_requests_in_flight() -> None:
    a, p = Admission(), policy(concurrent=1)
    async with a.admit(p, profile(), ROUTE):
        with pytest.raises(RateLimited):
            await admit(a, p)
    await admit(a, p)  # released


async def test_budget_refuses_billed_routes_only() -> None:
    a, p = Admission({"t": 5.0}), policy(monthly_budget_usd=5)
    with pytest.raises(QuotaExceeded):
        await admit(a, p, HOSTED_ONLY)
    local_only = Route((Step("local", 30, True),), "r", "x", 10, "bytes")
    assert await admit(a, p, local_only) == local_only


async def test_on_limit_local_narrows_to_free_backends() -> None:
    a = Admission({"t": 5.0})
    p = Policy.model_validate({"team": "t", "limits": {"monthly_budget_usd": 5},
                               "rules": [{"route": ["local", "hosted"], "on_limit": "local"}]})
    route = Route(ROUTE.steps, "r", "default", 10, "bytes", on_limit="local")
    narrowed = await admit(a, p, route)
    assert [s.backend for s in narrowed.steps] == ["local"] and "over limit" in narrowed.reason


async def test_spend_recorded_counts_at_once() -> None:
    a, p = Admission(), policy(monthly_budget_usd=1)
    a.observe(Decision(id="1", team="t", cost=1.5))
    with pytest.raises(QuotaExceeded):
        await admit(a, p, HOSTED_ONLY)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_a_new_month_starts_every_budget_over_even_for_teams_first_seen_after_it() -> None:
    # The regression: `_spent` was a startup snapshot never reset, so a team first seen after a month
    # rollover started with last month's spend.
    clock = Clock(time.mktime((2026, 11, 30, 12, 0, 0, 0, 0, -1)))
    a, p = Admission({"t": 5.0}, clock=clock), policy(monthly_budget_usd=5)
    clock.now = next_month(clock.now) + 3600  # December 1st, 01:00
    assert a.spent("t") == 0.0
    assert await admit(a, p, HOSTED_ONLY) == HOSTED_ONLY


async def test_a_team_seen_before_the_rollover_starts_over_too() -> None:
    clock = Clock(time.mktime((2026, 12, 31, 23, 0, 0, 0, 0, -1)))
    a, p = Admission(clock=clock), policy(monthly_budget_usd=1)
    a.observe(Decision(id="1", team="t", cost=2.0))
    with pytest.raises(QuotaExceeded) as e:
        await admit(a, p, HOSTED_ONLY)
    assert int(e.value.headers["Retry-After"]) <= 3600  # until January 1st
    clock.now += 7200
    assert await admit(a, p, HOSTED_ONLY) == HOSTED_ONLY


def test_month_boundaries() -> None:
    mid = time.mktime((2026, 12, 15, 12, 0, 0, 0, 0, -1))
    assert time.localtime(month_start(mid))[:3] == (2026, 12, 1)
    assert time.localtime(next_month(mid))[:3] == (2027, 1, 1)

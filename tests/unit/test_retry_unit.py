"""The 429 policy's parts, tested in tenacity's own style: a RetryCallState and an injected sleep."""

from __future__ import annotations

import pytest
from tenacity import AsyncRetrying, RetryCallState, wait_fixed

from gateway.config import Backoff
from gateway.failures import Kind, UpstreamFailure
from gateway.retry import rate_limit_retrying, stop_if_wait_over, wait_retry_after


def state(exc: BaseException | None, attempt: int = 1, upcoming: float = 0.0) -> RetryCallState:
    rs = RetryCallState(AsyncRetrying(), None, (), {})
    rs.attempt_number = attempt
    if exc is not None:
        rs.set_exception((type(exc), exc, None))
    rs.upcoming_sleep = upcoming
    return rs


def limited(after: float | None) -> UpstreamFailure:
    return UpstreamFailure(Kind.RATE_LIMITED, "hosted", "429", retry_after=after)


def test_wait_is_what_the_upstream_asked() -> None:
    assert wait_retry_after(wait_fixed(7))(state(limited(2.5))) == 2.5


def test_wait_falls_back_when_the_upstream_did_not_say() -> None:
    assert wait_retry_after(wait_fixed(7))(state(limited(None))) == 7


def test_stop_when_the_asked_wait_is_over_the_cap() -> None:
    assert stop_if_wait_over(10)(state(None, upcoming=11))
    assert not stop_if_wait_over(10)(state(None, upcoming=10))


async def run(backoff: Backoff, outcomes: list[BaseException | str]) -> tuple[str | None, list[float]]:
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    retrying = rate_limit_retrying(backoff)
    retrying.sleep = sleep  # type: ignore[method-assign]
    result = None
    async for attempt in retrying:
        with attempt:
            item = outcomes.pop(0)
            if isinstance(item, BaseException):
                raise item
            result = item
    return result, slept


async def test_retries_429s_then_succeeds() -> None:
    result, slept = await run(Backoff(), [limited(1), limited(2), "ok"])
    assert result == "ok" and slept == [1, 2]


async def test_gives_up_after_the_attempts() -> None:
    with pytest.raises(UpstreamFailure):
        await run(Backoff(attempts=2), [limited(0.1), limited(0.1), "never"])


async def test_gives_up_at_once_when_asked_to_wait_past_the_cap() -> None:
    with pytest.raises(UpstreamFailure):
        await run(Backoff(max_wait=5), [limited(30), "never"])


async def test_gives_up_when_the_budget_would_be_passed() -> None:
    # stop_before_delay: time spent so far (wall clock) + the coming wait may not pass the budget
    with pytest.raises(UpstreamFailure):
        await run(Backoff(max_wait=10, budget=1.5), [limited(2), "never"])


async def test_other_failures_are_not_retried() -> None:
    crash = UpstreamFailure(Kind.CRASH, "local", "reset")
    with pytest.raises(UpstreamFailure) as e:
        await run(Backoff(), [crash, "never"])
    assert e.value is crash

"""The 429 policy as composable tenacity parts (wait what the upstream asks, within a budget).

    wait  = retry_after(fallback = jittered exponential)
    stop  = attempts | budget would be passed | the upstream asks for more than we wait at once
    retry = only rate-limit failures (everything else is dispatch's business: fail over or answer)
"""

from __future__ import annotations

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from .config import Backoff
from .failures import Kind, UpstreamFailure


class wait_retry_after(wait_base):
    """The upstream's own `retry-after-ms` / `retry-after`, else the fallback."""

    def __init__(self, fallback: wait_base) -> None:
        self.fallback = fallback

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        asked = getattr(exc, "retry_after", None)
        return float(asked) if asked is not None else self.fallback(retry_state)


class stop_if_wait_over(stop_base):
    """Waiting out a long Retry-After here would stall the client: move on instead."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def __call__(self, retry_state: RetryCallState) -> bool:
        return retry_state.upcoming_sleep > self.cap


def _rate_limited(exc: BaseException) -> bool:
    return isinstance(exc, UpstreamFailure) and exc.kind is Kind.RATE_LIMITED


def rate_limit_retrying(backoff: Backoff) -> AsyncRetrying:
    return AsyncRetrying(
        retry=retry_if_exception(_rate_limited),
        wait=wait_retry_after(wait_exponential_jitter(initial=1.0, max=backoff.max_wait, jitter=1.0)),
        stop=stop_after_attempt(backoff.attempts) | stop_before_delay(backoff.budget)
        | stop_if_wait_over(backoff.max_wait),
        reraise=True,
    )

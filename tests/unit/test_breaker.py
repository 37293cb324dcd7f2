"""The circuit breaker, transition by transition (time is passed in: no sleeping)."""

from __future__ import annotations

import pytest

from gateway.breaker import CircuitBreaker, State
from gateway.config import Breaker


def breaker(threshold: int = 1, window: float = 60, cooldown: float = 5, max_cooldown: float = 40) -> CircuitBreaker:
    return CircuitBreaker("local", Breaker(failure_threshold=threshold, window=window, cooldown=cooldown,
                                           max_cooldown=max_cooldown))


def test_one_crash_opens_a_local_circuit() -> None:
    b = breaker()
    assert b.allows()
    b.record_failure("crash: reset", now=100)
    assert b.state is State.OPEN and not b.allows()
    assert b.describe().startswith("local circuit open since") and "crash: reset" in b.describe()


def test_threshold_within_a_sliding_window() -> None:
    b = breaker(threshold=3, window=10)
    b.record_failure("x", now=0)
    b.record_failure("x", now=5)
    b.record_failure("x", now=12)  # the first one slid out of the window: 2 within it
    assert b.state is State.CLOSED
    b.record_failure("x", now=13)
    assert b.state is State.OPEN


def test_success_resets_the_failure_count() -> None:
    b = breaker(threshold=2)
    b.record_failure("x", now=0)
    b.record_success()
    b.record_failure("x", now=1)
    assert b.state is State.CLOSED


def test_probe_waits_for_the_cooldown_then_half_opens() -> None:
    b = breaker(cooldown=5)
    b.record_failure("crash", now=100)
    assert not b.probe_due(now=104)
    assert b.probe_due(now=105)
    b.probe_result(True, "ready", now=105)
    assert b.state is State.HALF_OPEN


def test_half_open_lets_exactly_one_trial_through() -> None:
    b = breaker()
    b.record_failure("crash", now=0)
    b.probe_result(True, "ready", now=10)
    assert b.allows()
    b.begin()
    assert not b.allows()  # the trial is in flight
    b.record_success()
    assert b.state is State.CLOSED and b.allows()


def test_failed_trial_reopens_with_a_growing_cooldown() -> None:
    b = breaker(cooldown=5, max_cooldown=12)
    b.record_failure("crash", now=0)
    b.probe_result(True, "ready", now=5)
    b.begin()
    b.record_failure("crash again", now=6)
    assert b.state is State.OPEN and b.cooldown == 10
    assert not b.probe_due(now=15) and b.probe_due(now=16)
    b.probe_result(True, "ready", now=16)
    b.begin()
    b.record_failure("and again", now=17)
    assert b.state is State.OPEN and b.cooldown == 12  # capped


def test_a_loading_or_unreachable_server_does_not_grow_the_cooldown() -> None:
    # Probes while llama-server restarts used to double the cool-down (5 -> 10 -> 20 -> 40 s), so
    # local came back up to 39 s after it was ready.
    b = breaker(cooldown=5)
    b.record_failure("crash", now=0)
    for t in range(1, 30):
        b.probe_result(False, "loading model", now=t)
    assert b.state is State.OPEN and b.cooldown == 5


def test_a_server_seen_down_half_opens_as_soon_as_it_is_ready() -> None:
    b = breaker(cooldown=60)
    b.record_failure("crash", now=0)
    b.probe_result(False, "unreachable", now=1)
    b.probe_result(True, "ready", now=2)  # it restarted: no need to wait out the cool-down
    assert b.state is State.HALF_OPEN


def test_a_server_never_seen_down_waits_out_the_cooldown() -> None:
    b = breaker(cooldown=5)
    b.record_failure("crash", now=0)
    b.probe_result(True, "ready", now=1)  # healthy by /health, yet it just failed a request
    assert b.state is State.OPEN
    b.probe_result(True, "ready", now=5)
    assert b.state is State.HALF_OPEN


def test_slowness_opens_only_when_it_repeats() -> None:
    b = breaker()
    b.config = b.config.model_copy(update={"slow_threshold": 3})
    b.record_failure("timeout", now=0, slow=True)
    b.record_failure("timeout", now=1, slow=True)
    assert b.state is State.CLOSED
    b.record_failure("timeout", now=2, slow=True)
    assert b.state is State.OPEN


def test_half_open_trial_is_never_a_preemptible_task() -> None:
    b = breaker()
    b.record_failure("crash", now=0)
    b.probe_result(True, "ready", now=10)
    assert not b.allows(trial_ok=False) and b.allows(trial_ok=True)
    assert "waiting for an interactive trial" in b.describe()
    with b.trial():
        assert "trial in flight" in b.describe()
    assert b.allows() and "trial in flight" not in b.describe()  # an abandoned trial ends the trial


def test_open_since_keeps_the_first_opening_and_its_reason() -> None:
    b = breaker(cooldown=1)
    b.record_failure("crash: reset", now=0)
    first = b.opened_wall
    b.probe_result(False, "unreachable", now=1)
    assert b.opened_wall == first and "crash: reset" in b.describe()


def test_a_trial_whose_client_left_frees_the_trial_slot() -> None:
    b = breaker()
    b.record_failure("crash", now=0)
    b.probe_result(True, "ready", now=10)
    b.begin()
    b.release_trial()
    assert b.state is State.HALF_OPEN and b.allows()


def test_invalid_transitions_are_refused() -> None:
    b = breaker()
    with pytest.raises(RuntimeError):
        b._move(State.HALF_OPEN, "skipping open")

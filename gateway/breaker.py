"""A circuit breaker per backend: an explicit state machine with named states and moves.

    CLOSED --crash-class failures reach the threshold (slowness: its own, higher one)--> OPEN
    OPEN --the probe says ready, and the server was seen down since (it restarted) or the
         cool-down is over--> HALF_OPEN
    OPEN --probe says not ready--> OPEN (no growth: a server that is loading is not failing)
    HALF_OPEN --the one trial request succeeds--> CLOSED
    HALF_OPEN --the trial fails--> OPEN (cool-down grows)

Only failures that say the backend is unhealthy arrive here (failures.Kind decides); a 429, a
client mistake or a context overflow never opens a circuit. The trial is an interactive request or
a tiny request of the prober's own, never a preemptible background task (it could be cancelled
and prove nothing). Time is passed in so tests can drive every transition without sleeping.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum

from .config import Breaker as BreakerConfig


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_ALLOWED = {
    (State.CLOSED, State.OPEN),
    (State.OPEN, State.HALF_OPEN),
    (State.HALF_OPEN, State.CLOSED),
    (State.HALF_OPEN, State.OPEN),
}


@dataclass
class Transition:
    at: float  # wall-clock time, for "open since ..."
    old: State
    new: State
    why: str


class CircuitBreaker:
    def __init__(self, name: str, config: BreakerConfig) -> None:
        self.name = name
        self.config = config
        self.state = State.CLOSED
        self.cooldown = config.cooldown
        self.opened_at = 0.0  # monotonic
        self.opened_wall = 0.0
        self.last_reason = ""
        self.trial_in_flight = False
        self.seen_down = False  # a probe found the server down/loading since the circuit opened
        self.half_open_at = 0.0  # monotonic
        self._failures: deque[float] = deque()
        self._slow: deque[float] = deque()
        self.history: deque[Transition] = deque(maxlen=50)

    def _move(self, new: State, why: str) -> None:
        if (self.state, new) not in _ALLOWED:
            raise RuntimeError(f"breaker {self.name}: {self.state} -> {new} is not a valid transition")
        self.history.append(Transition(time.time(), self.state, new, why))
        self.state = new

    # -- what routing asks ---------------------------------------------------------------------
    def allows(self, trial_ok: bool = True) -> bool:
        """May a request go to this backend now? `trial_ok`: it could serve as the half-open trial."""
        if self.state is State.CLOSED:
            return True
        if self.state is State.HALF_OPEN:
            return trial_ok and not self.trial_in_flight
        return False

    @contextmanager
    def trial(self) -> Iterator[None]:
        """Around one request to this backend. In HALF_OPEN it is the one trial; a trial that ends
        without a verdict (client gone, cancelled, a client's own mistake) lets the next one try."""
        self.begin()
        try:
            yield
        finally:
            self.release_trial()  # a verdict already cleared it; otherwise the next request may try

    def begin(self) -> None:
        """A request is about to be sent; in HALF_OPEN it is the one trial."""
        if self.state is State.HALF_OPEN:
            self.trial_in_flight = True

    def remaining(self, now: float | None = None) -> float:
        """Seconds until an open circuit is probed again (0 when not open)."""
        if self.state is not State.OPEN:
            return 0.0
        now = time.monotonic() if now is None else now
        return max(0.0, self.cooldown - (now - self.opened_at))

    def describe(self) -> str:
        if self.state is State.OPEN:
            since = time.strftime("%H:%M:%S", time.localtime(self.opened_wall))
            return f"{self.name} circuit open since {since} ({self.last_reason})"
        if self.state is State.HALF_OPEN:
            waiting = "trial in flight" if self.trial_in_flight else "waiting for an interactive trial request"
            return f"{self.name} circuit half-open ({waiting})"
        return f"{self.name} circuit closed"

    # -- what dispatch reports -----------------------------------------------------------------
    def record_success(self) -> None:
        self._failures.clear()
        self._slow.clear()
        if self.state is State.HALF_OPEN:
            self.trial_in_flight = False
            self.cooldown = self.config.cooldown
            self._move(State.CLOSED, "trial request succeeded")

    def record_failure(self, reason: str, now: float | None = None, slow: bool = False) -> None:
        """`slow`: the backend answered too slowly (a timeout), which opens the circuit only when it
        repeats (`slow_threshold`); a crash opens it at `failure_threshold`."""
        now = time.monotonic() if now is None else now
        if self.state is State.HALF_OPEN:
            self.trial_in_flight = False
            self._open(now, reason, grow=True)
            return
        if self.state is State.OPEN:
            return
        seen, threshold = (self._slow, self.config.slow_threshold) if slow else (
            self._failures, self.config.failure_threshold)
        seen.append(now)
        while seen and now - seen[0] > self.config.window:
            seen.popleft()
        if len(seen) >= threshold:
            self._open(now, reason, grow=False)

    def release_trial(self) -> None:
        """The trial ended without a verdict (client went away): let the next request try."""
        self.trial_in_flight = False

    def adopt_open(self, reason: str) -> None:
        """Mirror a circuit that is open in the running gateway (for `explain --live`)."""
        if self.state is State.CLOSED:
            self._open(time.monotonic(), reason, grow=False)

    # -- what the prober drives ----------------------------------------------------------------
    def probe_due(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return self.state is State.OPEN and now - self.opened_at >= self.cooldown

    def probe_result(self, ready: bool, detail: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self.state is not State.OPEN:
            return
        if not ready:
            self.seen_down = True  # down or loading: waiting is all there is to do, and no reason to wait longer
            return
        if self.seen_down or self.probe_due(now):
            self.half_open_at = now
            self._move(State.HALF_OPEN, f"probe: {detail}")

    def _open(self, now: float, reason: str, grow: bool) -> None:
        if grow:
            self.cooldown = min(self.cooldown * 2, self.config.max_cooldown)
        self.opened_at = now
        self.seen_down = False
        if self.state is not State.OPEN:  # "open since" is when it first opened, not the last failed probe
            self.opened_wall = time.time()
            self.last_reason = reason
        self._failures.clear()
        self._slow.clear()
        self._move(State.OPEN, reason)

"""Step 3: decide. Profile + the team's policy + live backend state -> an ordered Route.

The policy's first matching rule gives the candidate order; each candidate is then kept only if
the request fits it (never send the local server a request past its safe ceiling) and its circuit
lets traffic through. The reason is one line a human can act on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import tokens as tk
from .backends.base import Backend
from .breaker import CircuitBreaker
from .ceiling import CrashCeilings
from .classify import RequestProfile
from .config import Match, Policy, Rule
from .errors import ContextLengthExceeded, Forbidden, ModelNotFound, NoBackendAvailable

# Hosted providers answer an overflow themselves (and we relay it as context_length_exceeded), so
# for them a likely bound is enough; for the local server a wrong guess is a segfault: strict bound.
HOSTED_LIKELY_BYTES_PER_TOKEN = 2.0


@dataclass(frozen=True, slots=True)
class Step:
    backend: str
    place: str
    max_queue_wait: float


@dataclass(frozen=True, slots=True)
class Route:
    steps: tuple[Step, ...]
    reason: str
    rule: str
    tokens_in: int
    tokens_method: str  # bytes | exact | estimate
    max_tokens: int | None = None  # clamp from the rule
    notes: tuple[str, ...] = field(default=())
    on_limit: str = "refuse"

    def describe(self) -> list[dict[str, str]]:
        return [{"backend": s.backend, "kind": s.place} for s in self.steps]


def rule_matches(match: Match, profile: RequestProfile, headers: Mapping[str, str]) -> bool:
    if match.role is not None and profile.role not in match.role:
        return False
    if match.client is not None and profile.client not in match.client:
        return False
    if match.model is not None and profile.model not in match.model:
        return False
    if match.session is not None and profile.session not in match.session:
        return False
    if match.tokens_in is not None and not match.tokens_in.contains(profile.tokens_in):
        return False
    if match.tokens_total is not None and not match.tokens_total.contains(
            profile.tokens_in + profile.output_reserve):
        return False
    if match.headers:
        for name, want in match.headers.items():
            got = headers.get(name)
            if got is None or (want != "*" and got != want):
                return False
    return True


def first_rule(policy: Policy, profile: RequestProfile, headers: Mapping[str, str]) -> tuple[int, Rule]:
    for i, rule in enumerate(policy.rules):
        if rule_matches(rule.match, profile, headers):
            return i, rule
    raise AssertionError("policy validation guarantees a default rule")  # pragma: no cover


@dataclass
class _Fit:
    fits: bool
    tokens: int
    method: str
    limit: int | None
    note: str = ""


class SessionPins:
    """session -> pinned backend, with expiry; bounded so a flood of sessions can't grow it forever."""

    MAX = 10_000

    def __init__(self) -> None:
        self._pins: dict[tuple[str, str], tuple[str, float]] = {}

    def get(self, key: tuple[str, str]) -> str | None:
        found = self._pins.get(key)
        if found is None:
            return None
        if found[1] < time.monotonic():
            del self._pins[key]
            return None
        return found[0]

    def set(self, key: tuple[str, str], backend: str, ttl: float) -> None:
        self._pins.pop(key, None)
        if len(self._pins) >= self.MAX:
            del self._pins[next(iter(self._pins))]  # oldest first (dicts keep insertion order)
        self._pins[key] = (backend, time.monotonic() + ttl)


class Decider:
    def __init__(self, backends: Mapping[str, Backend], breakers: Mapping[str, CircuitBreaker],
                 ceilings: CrashCeilings | None = None) -> None:
        self.backends = backends
        self.breakers = breakers
        self.ceilings = ceilings
        self.pins = SessionPins()

    def model_ids(self, policy: Policy) -> list[str]:
        return ["auto", *self.backends, *policy.task_models]

    async def decide(self, body: dict[str, Any], headers: Mapping[str, str], profile: RequestProfile,
                     policy: Policy) -> Route:
        if (profile.model in self.backends and policy.allowed_backends is not None
                and profile.model not in policy.allowed_backends):
            raise Forbidden(f"team {policy.team!r} may not use backend {profile.model!r}", code="backend_not_allowed")
        if policy.allowed_models is not None and profile.model not in policy.allowed_models:
            raise Forbidden(f"team {policy.team!r} may not use model {profile.model!r}; allowed: "
                            + ", ".join(policy.allowed_models))
        if profile.model in self.backends:
            idx, rule = -1, Rule(name=f"pinned to {profile.model}", route=[profile.model])
            rule_desc = f"model {profile.model!r} pins the backend"
        elif profile.model == "auto" or profile.model in policy.task_models:
            idx, rule = first_rule(policy, profile, headers)
            rule_desc = f"rule {rule.name or idx + 1!s} (role {profile.role})"
        else:
            raise ModelNotFound(
                f"model {profile.model!r} does not exist here; use one of: "
                + ", ".join(self.model_ids(policy)))
        allowed = policy.allowed_backends
        reserve = rule.output_reserve if rule.output_reserve is not None else profile.output_reserve
        if rule.max_tokens is not None and profile.max_tokens is not None:
            reserve = min(reserve, rule.max_tokens)
        queue_wait = rule.max_queue_wait if rule.max_queue_wait is not None else policy.max_queue_wait

        steps: list[Step] = []
        notes: list[str] = []
        too_big: list[str] = []
        outgrown = False  # the request is too big for a local backend it could have used
        open_circuits: list[str] = []
        best: _Fit | None = None
        exact: dict[str, int | None] = {}
        for name in rule.route:
            if allowed is not None and name not in allowed:
                continue
            backend = self.backends[name]
            fit = await self._fit(backend, body, profile, reserve, rule, policy, exact)
            if best is None or (fit.fits and not (best.fits)):
                best = fit
            if not fit.fits:
                too_big.append(fit.note)
                outgrown = outgrown or backend.place == "local"
                continue
            breaker = self.breakers.get(name)
            if breaker is not None and not breaker.allows():
                open_circuits.append(breaker.describe())
                continue
            missing = backend.unusable
            if missing:  # e.g. no API key: sending it would only earn a 401 the client can't fix
                open_circuits.append(f"{name}: {missing}")
                continue
            steps.append(Step(name, backend.place, queue_wait))
        tokens = best.tokens if best else profile.tokens_in
        method = best.method if best else "bytes"
        notes = too_big + open_circuits
        steps = self._stick(profile, policy, steps, outgrown, notes)
        if not steps:
            if too_big and not open_circuits:
                raise ContextLengthExceeded(
                    f"This request needs {tokens:,} input tokens plus {reserve:,} reserved for the answer, "
                    f"which exceeds every backend it may use: {'; '.join(too_big)}. "
                    "Compact the conversation or shorten the prompt.")
            raise NoBackendAvailable(
                "no backend can take this request now: " + "; ".join(notes or ["none allowed"]),
                headers={"Retry-After": str(self._retry_after(open_circuits))})
        order = " -> ".join(s.backend for s in steps)
        reason = f"{rule_desc}: {order}"
        if notes:
            reason += " (" + "; ".join(notes) + ")"
        return Route(tuple(steps), reason, rule.name or str(idx + 1), tokens, method,
                     rule.max_tokens, tuple(notes), rule.on_limit)

    def _stick(self, profile: RequestProfile, policy: Policy, steps: list[Step], outgrown: bool,
               notes: list[str]) -> list[Step]:
        """A session that outgrew local stays on hosted (hysteresis), keeping llama.cpp's cache sane."""
        sticky = policy.sticky_sessions
        if not (sticky.enabled and profile.session and steps):
            return steps
        key = (policy.team, profile.session)
        if outgrown and steps[0].place == "hosted":
            self.pins.set(key, steps[0].backend, sticky.ttl)
            return steps
        pinned = self.pins.get(key)
        if pinned is None or steps[0].place != "local" or pinned not in (s.backend for s in steps):
            return steps
        self.pins.set(key, pinned, sticky.ttl)
        notes.append(f"session sticky on {pinned} since it outgrew local")
        return [s for s in steps if s.backend == pinned] + [s for s in steps if s.backend != pinned
                                                                and s.place != "local"]

    def _retry_after(self, open_circuits: list[str]) -> int:
        waits = [b.cooldown for b in self.breakers.values() if not b.allows()]
        return max(1, int(min(waits))) if waits else 5

    async def _fit(self, backend: Backend, body: dict[str, Any], profile: RequestProfile, reserve: int,
                   rule: Rule, policy: Policy, exact: dict[str, int | None]) -> _Fit:
        size = profile.size
        name = backend.name

        async def count() -> int | None:
            if name not in exact:
                exact[name] = await backend.count_tokens(body)
            return exact[name]

        if backend.place == "local":
            limits = [n for n in (backend.context_window, rule.local_ceiling or policy.local_ceiling) if n]
            limit = min(limits) if limits else None
            fit = _Fit(True, size.estimate, "estimate" if limit is None else "bytes", limit)
            if limit is not None:
                # Strict: a wrong guess here is a segfault, so only bounds or an exact count decide.
                if size.upper + reserve > limit:
                    if size.lower + reserve > limit:
                        fit = _Fit(False, size.estimate, "bytes", limit)
                    else:
                        n = await count()
                        fit = (_Fit(size.estimate + reserve <= limit, size.estimate, "estimate", limit) if n is None
                               else _Fit(n + reserve <= limit, n, "exact", limit))
                if not fit.fits:
                    fit.note = f"{fit.tokens:,}+{reserve:,} tokens > {name} ceiling {limit:,}"
            learned = self.ceilings.get(name) if self.ceilings else None
            if fit.fits and learned is not None:
                bar = int(learned * getattr(backend.config, "learned_ceiling_fraction", 1.0))
                tokens = fit.tokens
                if fit.method == "bytes" and size.upper >= bar:
                    n = await count() if size.lower < bar else None
                    tokens = n if n is not None else size.estimate
                    fit.method = "exact" if n is not None else fit.method
                if tokens >= bar:
                    fit = _Fit(False, tokens, fit.method, bar,
                               f"{tokens:,} tokens >= {name} learned crash ceiling {learned:,} (skip from {bar:,})")
            return fit
        limit = backend.context_window
        if limit is None:
            return _Fit(True, size.estimate, "estimate", None)
        likely_upper = int(size.nbytes / HOSTED_LIKELY_BYTES_PER_TOKEN)
        if likely_upper <= limit:
            return _Fit(True, size.estimate, "bytes", limit)
        if size.lower > limit:
            return _Fit(False, size.estimate, "bytes", limit, f"{size.estimate:,} tokens > {name} window {limit:,}")
        n = await asyncio.to_thread(tk.count_tiktoken, body)  # ~16 ms for 350 KB: off the event loop
        return _Fit(n <= limit, n, "exact", limit, "" if n <= limit else f"{n:,} tokens > {name} window {limit:,}")

"""Step 3: decide. Profile + the team's policy + live backend state -> an ordered Route.

The policy's first matching rule gives the candidate order; each candidate is then kept only if
the request fits it (each backend judges that itself: never send the local server a request past
its safe ceiling) and its circuit lets traffic through. The reason is one line a human can act on.
Nothing here does I/O of its own: the only awaits are the backends' exact counts, asked for only
when the cheap byte bounds cannot decide.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .backends.base import Backend, Estimate, Fit, FitQuery
from .breaker import CircuitBreaker
from .classify import RequestProfile
from .config import PREEMPTIBLE_ROLES, Match, Policy, Rule
from .errors import ContextLengthExceeded, Forbidden, ModelNotFound, NoBackendAvailable


@dataclass(frozen=True, slots=True)
class Step:
    backend: str
    max_queue_wait: float
    free: bool  # costs nothing per token (budgets and `on_limit: local` keep only these)
    predicted: float | None = None  # seconds to first byte, the backend's own estimate


@dataclass(frozen=True, slots=True)
class Route:
    steps: tuple[Step, ...]
    reason: str
    rule: str
    tokens_in: int
    tokens_method: str  # bytes | exact | estimate
    max_tokens: int | None = None  # clamp from the rule
    on_limit: str = "refuse"
    preemptible: bool = False  # gives way to interactive turns on a busy slot (answer held until complete)
    estimates: dict[str, Estimate] = field(default_factory=dict)  # each candidate's, for `explain`


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


MEMBER_SWITCH_TOKENS = 512  # cached tokens a member must hold beyond the first's to lead its tier


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

    def drop(self, key: tuple[str, str]) -> None:
        self._pins.pop(key, None)

    def set(self, key: tuple[str, str], backend: str, ttl: float) -> None:
        self._pins.pop(key, None)
        if len(self._pins) >= self.MAX:
            del self._pins[next(iter(self._pins))]  # oldest first (dicts keep insertion order)
        self._pins[key] = (backend, time.monotonic() + ttl)


class Decider:
    def __init__(self, backends: Mapping[str, Backend], breakers: Mapping[str, CircuitBreaker],
                 tiers: Mapping[str, list[str]] | None = None) -> None:
        self.backends = backends
        self.breakers = breakers
        # Local tiers: a tier name in a route stands for its members (see _expand).
        self.tiers: dict[str, list[str]] = tiers if isinstance(tiers, dict) else dict(tiers or {})  # router's own
        self.tier_of = {m: t for t, ms in self.tiers.items() for m in ms}
        # The runtime's read-only queue view: (slots in use + waiting, slots) of a backend.
        self.load: Callable[[str], tuple[int, int]] = lambda _name: (0, 0)
        # ...and how many service times a request would wait there (an interactive turn overtakes waiting
        # background tasks and pre-empts a preemptible holder: those are not ahead of it).
        self.ahead: Callable[[str, bool], tuple[int, int]] = lambda _name, _interactive: (0, 0)
        # ...and how long a backend's own rate limit would hold a request now (its `rate_limit_per_minute`).
        self.pacing: Callable[[str], float] = lambda _name: 0.0
        self.pins = SessionPins()
        # `explain --live`: why each backend is unusable as the *running gateway* sees it (None: usable),
        # instead of judging from this process's own environment.
        self.live_unusable: dict[str, str | None] = {}

    def model_ids(self, policy: Policy) -> list[str]:
        return ["auto", *self.tiers, *self.backends, *policy.task_models]

    # ---- local tiers: kept apart so the rest of decide reads as before ----
    def _allowed(self, name: str, allowed: list[str] | None) -> bool:
        return allowed is None or name in allowed or self.tier_of.get(name) in allowed

    def _expand(self, route: list[str]) -> tuple[list[str], list[str]]:
        """A tier becomes its members: closed circuits first, then the least loaded (slots in use +
        waiting, per slot it has), then config order. A member named earlier in the route keeps its
        place. Returns the names and, per tier with a choice, why its first member leads (for explain)."""
        names: list[str] = []
        why: list[str] = []
        for name in route:
            members = self.tiers.get(name)
            if members is None:
                names.append(name)
                continue
            loads = {m: self.load(m) for m in members if m not in names}
            ranked = sorted(loads, key=lambda m: (self._health_rank(m), loads[m][0] / max(1, loads[m][1])))
            if len(ranked) > 1:
                why.append(f"{name}: {ranked[0]} first ("
                           + ", ".join(f"{m} {self._state(m)}" + (f" {loads[m][0]}/{loads[m][1]} busy" if loads[m][1]
                                                                  else "") for m in ranked) + ")")
            names.extend(ranked)
        return names, why

    def _warmest_member_first(self, steps: list[Step], estimates: Mapping[str, Estimate],
                              notes: list[str]) -> list[Step]:
        """Within a tier, the member whose slot holds most of this prompt leads — by a clear margin
        (MEMBER_SWITCH_TOKENS) and with no longer a queue. Cached tokens, not predicted seconds: members
        of a tier are usually the same model on the same kind of hardware, and rates learned from a
        few answers differ by noise, while a warm prefix is a real saving."""
        out = list(steps)

        def parts(step: Step) -> tuple[int, int]:
            p = estimates[step.backend].parts if step.backend in estimates else {}
            return int(p.get("cached_tokens") or 0), int(p.get("queued") or 0)

        for tier in {self.tier_of.get(s.backend) for s in steps} - {None}:
            idx = [i for i, s in enumerate(out) if self.tier_of.get(s.backend) == tier]
            group = [out[i] for i in idx]
            if len(group) < 2:
                continue
            best = max(group, key=lambda s: parts(s)[0])
            (cached, queued), (first_cached, first_queued) = parts(best), parts(group[0])
            if best is group[0] or cached - first_cached < MEMBER_SWITCH_TOKENS or queued > first_queued:
                continue
            notes.append(f"{tier}: {best.backend} holds {cached:,} cached tokens of this prompt")
            for i, s in zip(idx, [best, *(g for g in group if g is not best)], strict=True):
                out[i] = s
        return out

    def _health_rank(self, name: str) -> int:
        breaker = self.breakers.get(name)
        return 0 if breaker is None else {"closed": 0, "half_open": 1}.get(str(breaker.state), 2)

    def _state(self, name: str) -> str:
        breaker = self.breakers.get(name)
        return str(breaker.state) if breaker is not None else "closed"

    def _rule(self, profile: RequestProfile, policy: Policy, headers: Mapping[str, str]) -> tuple[Rule, str, str]:
        """The rule that applies, its short name and how it was chosen."""
        routable = profile.model in self.backends or profile.model in self.tiers
        if routable and not self._allowed(profile.model, policy.allowed_backends):
            raise Forbidden(f"team {policy.team!r} may not use backend {profile.model!r}", code="backend_not_allowed")
        if policy.allowed_models is not None and profile.model not in policy.allowed_models:
            raise Forbidden(f"team {policy.team!r} may not use model {profile.model!r}; allowed: "
                            + ", ".join(policy.allowed_models))
        if routable:
            rule = Rule(name=f"pinned to {profile.model}", route=[profile.model])
            return rule, rule.name or "", f"model {profile.model!r} pins the backend"
        if profile.model == "auto" or profile.model in policy.task_models:
            idx, rule = first_rule(policy, profile, headers)
            name = rule.name or str(idx + 1)
            return rule, name, f"rule {name} (role {profile.role})"
        raise ModelNotFound(f"model {profile.model!r} does not exist here; use one of: "
                            + ", ".join(self.model_ids(policy)))

    async def decide(self, body: dict[str, object], headers: Mapping[str, str], profile: RequestProfile,
                     policy: Policy) -> Route:
        rule, rule_name, rule_desc = self._rule(profile, policy, headers)
        allowed = policy.allowed_backends
        reserve = rule.output_reserve if rule.output_reserve is not None else profile.output_reserve
        if rule.max_tokens is not None:  # the clamp applies whether or not the client sent max_tokens
            reserve = min(reserve, rule.max_tokens)
        queue_wait = rule.max_queue_wait if rule.max_queue_wait is not None else policy.max_queue_wait
        preemptible = rule.preemptible if rule.preemptible is not None else profile.role in PREEMPTIBLE_ROLES
        query = FitQuery(body, profile.size, reserve, rule.local_ceiling or policy.local_ceiling, profile.session)

        steps: list[Step] = []
        too_big: list[str] = []
        outgrown = False  # the request is proven too big for a free backend it could have used
        closed: list[CircuitBreaker] = []  # the route's own open circuits
        unavailable: list[str] = []
        best: Fit | None = None
        estimates: dict[str, Estimate] = {}
        names, order = self._expand(rule.route)
        for name in names:
            if not self._allowed(name, allowed):
                continue
            backend = self.backends[name]
            # Health first: a backend that is down says so, rather than a size guess made without it.
            breaker = self.breakers.get(name)
            if breaker is not None and not breaker.allows(trial_ok=not preemptible):
                closed.append(breaker)
                unavailable.append(breaker.describe())
                continue
            missing = self.live_unusable[name] if name in self.live_unusable else backend.unusable
            if missing:  # e.g. no API key: sending it would only earn a 401 the client can't fix
                unavailable.append(f"{name}: {missing}")
                continue
            fit = await backend.fit(query)
            if best is None or (fit.fits and not best.fits):
                best = fit
            if not fit.fits:
                too_big.append(fit.note)
                # never pin a session on an estimate (made when the server could not count, e.g. down)
                outgrown = outgrown or (backend.free and fit.method != "estimate")
                continue
            estimate = backend.estimate(query, *self.ahead(name, profile.interactive))
            if (pace := self.pacing(name)) and estimate.seconds is not None:
                estimate = Estimate(estimate.seconds + pace, {**estimate.parts, "pacing_s": round(pace, 3)},
                                    estimate.wait + pace)
            estimates[name] = estimate
            steps.append(Step(name, queue_wait, backend.free, estimate.seconds))
        tokens = best.tokens if best else profile.tokens_in
        method = best.method if best else "bytes"
        notes = too_big + unavailable
        steps = self._warmest_member_first(steps, estimates, notes)
        if preemptible:
            steps = _spare_warm_caches(self.backends, steps, query, notes)
        if rule.prefer == "fastest":
            steps = _fastest_first(steps, rule.min_saving, notes)
        elif rule.spill_early:
            steps = _spill_early(steps, estimates, notes)
        steps = self._stick(profile, policy, steps, outgrown, notes)
        if not steps:
            if too_big and not unavailable:
                raise ContextLengthExceeded(
                    f"This request needs {tokens:,} input tokens plus {reserve:,} reserved for the answer, "
                    f"which exceeds every backend it may use: {'; '.join(too_big)}. "
                    "Compact the conversation or shorten the prompt.")
            raise NoBackendAvailable(
                "no backend can take this request now: " + "; ".join(notes or ["none allowed"]),
                headers={"Retry-After": str(retry_after(closed))})
        reason = f"{rule_desc}: {' -> '.join(s.backend for s in steps)}"
        if notes or order:
            reason += " (" + "; ".join(notes + order) + ")"
        return Route(tuple(steps), reason, rule_name, tokens, method, rule.max_tokens, rule.on_limit, preemptible,
                     estimates)

    def _stick(self, profile: RequestProfile, policy: Policy, steps: list[Step], outgrown: bool,
               notes: list[str]) -> list[Step]:
        """A session that outgrew local stays on hosted (hysteresis), keeping llama.cpp's cache sane."""
        sticky = policy.sticky_sessions
        if not (sticky.enabled and profile.session and steps):
            return steps
        key = (policy.team, profile.session)
        if profile.role == "compaction":  # it rewrites the history: no cache worth keeping anywhere
            self.pins.drop(key)
            return steps
        if outgrown and not steps[0].free:
            self.pins.set(key, steps[0].backend, sticky.ttl)
            return steps
        pinned = self.pins.get(key)
        if pinned is None or not steps[0].free or pinned not in (s.backend for s in steps):
            return steps
        self.pins.set(key, pinned, sticky.ttl)
        notes.append(f"session sticky on {pinned} since it outgrew local")
        return [s for s in steps if s.backend == pinned] + [s for s in steps if s.backend != pinned and not s.free]


def _spare_warm_caches(backends: Mapping[str, Backend], steps: list[Step], q: FitQuery,
                       notes: list[str]) -> list[Step]:
    """A background task does not evict a hot conversation's cached prefix while another backend can
    take it (a miss costs the conversation a full re-prefill: 7 s for 4k tokens on the seed's box)."""
    kept = []
    for i, step in enumerate(steps):
        why = backends[step.backend].evicts(q)
        if why and any(other is not step for other in steps[i + 1:] + kept):
            notes.append(f"{step.backend} {why}")
            continue
        kept.append(step)
    return kept


def _spill_early(steps: list[Step], estimates: Mapping[str, Estimate], notes: list[str]) -> list[Step]:
    """`spill_early`: a backend predicted to keep the request queued past its max_queue_wait goes last now
    (it would be spilled from after the whole wait anyway); it stays in the route as the last resort."""
    late = [s for s in steps[:-1] if estimates[s.backend].wait > s.max_queue_wait]
    if not late:
        return steps
    for s in late:
        notes.append(f"{s.backend} predicted queue {estimates[s.backend].wait:.1f}s "
                     f"> {s.max_queue_wait:g}s: spilled early")
    return [s for s in steps if s not in late] + late


def _fastest_first(steps: list[Step], min_saving: float, notes: list[str]) -> list[Step]:
    """`prefer: fastest`: the step predicted to answer first leads, but a billed one only when it saves
    at least `min_saving` seconds over the best free one. Unknown predictions keep the rule's order."""
    known = [s for s in steps if s.predicted is not None]
    if len(known) < 2 or len(known) != len(steps):
        return steps
    best = min(steps, key=lambda s: s.predicted or 0.0)
    free = [s for s in steps if s.free]
    if best is steps[0]:
        return steps
    if not best.free and free and (free[0].predicted or 0.0) - (best.predicted or 0.0) < min_saving:
        return steps
    notes.append(f"{best.backend} predicted first ({best.predicted:.1f}s vs {steps[0].predicted:.1f}s)")
    return [best, *(s for s in steps if s is not best)]


def retry_after(open_circuits: list[CircuitBreaker], now: float | None = None) -> int:
    """Seconds until the soonest of these circuits is probed again (what Retry-After should say)."""
    waits = [b.remaining(now) for b in open_circuits]
    return max(1, int(min(waits) + 0.999)) if waits else 5

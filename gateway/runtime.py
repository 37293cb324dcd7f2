"""What serves: the router (router.py) plus queues, limiters, the ledger, admission and probes.

Built only by `serve` (and the tests' gateways), once at start; request handling reads it and never
constructs anything per request. `explain` and the benchmark build only the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiolimiter import AsyncLimiter

from .activity import Activity
from .admit import Admission, month_start
from .backends.base import Backend, ProbeResult
from .breaker import CircuitBreaker, State
from .ceiling import CrashCeilings
from .classify import Classifier
from .config import Policy, Settings
from .decide import Decider
from .dispatch import Dispatcher
from .ledger import Ledger, ledger_path
from .loopwatch import watch as loopwatch
from .metrics import Metrics
from .record import Recorder
from .router import Router
from .slots import BACKGROUND, INTERACTIVE, SlotQueue
from .teams import Teams
from .tiers import discover_members
from .tiers import members as tier_members

log = logging.getLogger("switchyard")

PROBE_INTERVAL = 1.0  # seconds between breaker probes / live-state refreshes
REFRESH_EVERY = 15  # probe intervals between live n_ctx refreshes of healthy backends
SAVE_EVERY = 60  # probe intervals between writes of the learned speeds
TRIAL_AFTER = 2.0  # seconds a half-open circuit waits for an interactive trial before sending its own


def _load_view(queues: Mapping[str, SlotQueue]) -> Callable[[str], tuple[int, int]]:
    """Read-only: (slots in use + waiting, slots) of a backend's queue, for ordering a tier's members."""
    def load(name: str) -> tuple[int, int]:
        q = queues.get(name)
        return (q.busy + q.waiting, q.capacity) if q is not None else (0, 0)

    return load


def _pacing_view(limiters: Mapping[str, AsyncLimiter]) -> Callable[[str], float]:
    """Read-only: seconds a request would wait for a backend's own rate limit now (one drip when full)."""
    def pacing(name: str) -> float:
        lim = limiters.get(name)
        return 0.0 if lim is None or lim.has_capacity() else lim.time_period / lim.max_rate

    return pacing


def _ahead_view(queues: Mapping[str, SlotQueue]) -> Callable[[str, bool], tuple[int, int]]:
    """Read-only: (service times it would wait, requests running beside it) for a request at a backend now."""
    def ahead(name: str, interactive: bool) -> tuple[int, int]:
        q = queues.get(name)
        return q.ahead(INTERACTIVE if interactive else BACKGROUND) if q is not None else (0, 0)

    return ahead


@dataclass
class Runtime:
    """What serves: the router plus queues, limiters, the ledger, admission, probes and reload."""

    settings: Settings
    router: Router
    queues: dict[str, SlotQueue]
    limiters: dict[str, AsyncLimiter]
    dispatcher: Dispatcher
    recorder: Recorder
    ledger: Ledger
    admission: Admission
    metrics: Metrics = field(default_factory=Metrics)
    activity: Activity = field(default_factory=Activity)
    last_probe: dict[str, ProbeResult] = field(default_factory=dict)
    in_flight: set[asyncio.Task[Any]] = field(default_factory=set)  # chat handlers running now
    draining: bool = False
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    @classmethod
    def build(cls, settings: Settings, backends: Mapping[str, Backend] | None = None) -> Runtime:
        router = Router.build(settings, backends)
        gw = settings.gateway
        members = tier_members(gw)  # a tier's members each get their own queue (their own slots)
        queues = {n: SlotQueue(c.max_concurrency, c.lookahead) for n, c in members.items()
                  if c.max_concurrency and n in router.backends}
        limiters = {n: AsyncLimiter(c.rate_limit_per_minute, 60.0)
                    for n, c in members.items() if c.rate_limit_per_minute and n in router.backends}
        router.decider.load = _load_view(queues)
        ledger = Ledger(ledger_path(gw.data_dir, gw.ledger_path))
        admission = Admission(ledger.spent_this_month(month_start()))
        router.decider.ahead = _ahead_view(queues)
        router.decider.pacing = _pacing_view(limiters)
        dispatcher = Dispatcher(router.backends, router.breakers, queues, limiters, router.speeds)
        return cls(settings, router, queues, limiters, dispatcher, Recorder(), ledger, admission)

    def __post_init__(self) -> None:
        self.recorder.sinks += [self.metrics.observe, self.activity.observe, self.ledger.observe,
                                self.admission.observe]

    # The router's parts, by the names the endpoints, the CLI and the tests use.
    @property
    def backends(self) -> dict[str, Backend]:
        return self.router.backends

    @property
    def breakers(self) -> dict[str, CircuitBreaker]:
        return self.router.breakers

    @property
    def teams(self) -> Teams:
        return self.router.teams

    @property
    def ceilings(self) -> CrashCeilings:
        return self.router.ceilings

    @property
    def classifier(self) -> Classifier:
        return self.router.classifier

    @property
    def decider(self) -> Decider:
        return self.router.decider

    def backend_states(self) -> dict[str, dict[str, Any]]:
        """Each backend as /readyz, /status.json and `explain --live` report it."""
        out = {}
        for name, b in self.backends.items():
            probe = self.last_probe.get(name)
            breaker = self.breakers.get(name)
            queue = self.queues.get(name)
            out[name] = {
                "kind": b.place,
                "tier": self.router.decider.tier_of.get(name),
                "load_seconds": getattr(b, "load_seconds", None),  # a router-mode model's learned load time
                "ready": probe.ready if probe else None,
                "detail": probe.detail if probe else "not probed yet",
                "context_window": b.context_window,
                "learned_ceiling": self.ceilings.get(name),
                "circuit": str(breaker.state) if breaker else None,
                "circuit_detail": breaker.describe() if breaker else None,
                "circuit_since": breaker.opened_wall if breaker and breaker.state != "closed" else None,
                "queue": {"busy": queue.busy, "waiting": queue.waiting, "capacity": queue.capacity}
                if queue else None,
                "learned": self.router.speeds.of(name).as_dict(),
                **b.report(),
            }
        return out

    @property
    def policy(self) -> Policy:
        return self.router.policy

    async def start(self) -> None:
        loopwatch.start()
        await self.refresh_all()
        self.ledger.start()
        self._tasks.append(asyncio.create_task(self._probe_loop(), name="switchyard-prober"))
        self._tasks.append(asyncio.create_task(self._reload_loop(), name="switchyard-reload"))
        for name, b in self.backends.items():  # slow imports (litellm) in threads, off the event loop
            self._tasks.append(asyncio.create_task(b.start(), name=f"start-{name}"))

    async def drain(self, grace: float) -> None:
        """SIGTERM: stop taking work, answer queued requests 503 + Retry-After at once, give the
        running ones `grace` seconds, then cancel what is left (closing their upstreams)."""
        self.draining = True
        for q in self.queues.values():
            q.close()
        running = {t for t in self.in_flight if t is not asyncio.current_task()}
        if running:
            log.info("draining: %d request(s) in flight, waiting up to %gs", len(running), grace)
            _, late = await asyncio.wait(running, timeout=grace)
            for t in late:
                t.cancel()
            if late:
                log.warning("drain: %d request(s) still running after %gs were cancelled", len(late), grace)
                await asyncio.wait(late, timeout=5)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.ledger.stop()
        await asyncio.to_thread(self.router.speeds.save)
        await self.router.close()
        await loopwatch.stop()

    async def refresh_all(self) -> None:
        await self.discover()
        backends = list(self.backends.items())  # a discovery may add members while the probes run
        results = await asyncio.gather(*(b.probe() for _, b in backends))
        self.last_probe.update(zip((n for n, _ in backends), results, strict=True))

    async def discover(self) -> None:
        """`models: discover`: a router's models become members, each with its own queue."""
        for tier, name, cfg in await discover_members(self.settings.gateway, self.backends):
            self.router.add_member(tier, name, cfg)
            if cfg.max_concurrency:
                self.queues[name] = SlotQueue(cfg.max_concurrency, cfg.lookahead)
            log.info("tier %s: discovered member %s", tier, name)

    async def _reload_loop(self) -> None:
        """Hot reload: changed policy files take effect for the next request, never mid-request."""
        while True:
            await asyncio.sleep(self.settings.gateway.reload_interval)
            if self.teams.changed():
                errors = self.teams.reload()
                log.info("policies reloaded: teams %s%s", sorted(self.teams.policies),
                         f"; {len(errors)} problem(s)" if errors else "")

    async def _probe_loop(self) -> None:
        tick = 0
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            tick += 1
            await asyncio.gather(*(self._watch(name, breaker) for name, breaker in self.breakers.items()))
            if tick % REFRESH_EVERY == 0:
                await self.refresh_all()
            if tick % SAVE_EVERY == 0:
                await asyncio.to_thread(self.router.speeds.save)

    async def _watch(self, name: str, breaker: CircuitBreaker) -> None:
        """An open circuit is probed every interval (cheap: /health on our own box) so a restarted
        server takes interactive turns again within a second of being ready (the first one is the
        trial); when none comes within TRIAL_AFTER, a tiny trial request of our own (where the backend
        offers one) closes it, so background work is not kept off a healthy server."""
        backend = self.backends[name]
        if breaker.state is State.OPEN:
            result = await backend.probe()
            self.last_probe[name] = result
            breaker.probe_result(result.ready, result.detail)
            if breaker.state is not State.OPEN:
                log.info("probe %s: %s -> circuit %s", name, result.detail, breaker.state)
        if (breaker.state is not State.HALF_OPEN or breaker.trial_in_flight
                or time.monotonic() - breaker.half_open_at < TRIAL_AFTER):
            return
        queue = self.queues.get(name)
        if queue is not None and (queue.busy or queue.waiting):
            return  # a live request is on it (or about to be): its outcome decides
        with breaker.trial():
            result = await backend.tiny_request()
            if result is None:
                return
            if result.ready:
                breaker.record_success()
            else:
                breaker.record_failure(result.detail)
        log.info("trial %s: %s -> circuit %s", name, result.detail, breaker.state)

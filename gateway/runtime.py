"""The running gateway's parts, built from validated settings: backends, breakers, queues, steps.

Built once at start and rebuilt only when config changes; request handling reads it and never
constructs anything per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from aiolimiter import AsyncLimiter

from .activity import Activity
from .admit import Admission, month_start
from .backends.base import Backend, ProbeResult
from .backends.hosted import HostedBackend, load_litellm
from .backends.llamacpp import LlamaCppBackend
from .breaker import CircuitBreaker
from .ceiling import CrashCeilings, state_path
from .classify import Classifier
from .config import LiteLLMBackend, Policy, Settings, policies_dir_of
from .config import LlamaCppBackend as LlamaCppConfig
from .decide import Decider
from .dispatch import Dispatcher
from .ledger import Ledger, ledger_path
from .metrics import Metrics
from .record import Recorder
from .slots import SlotQueue
from .teams import Teams

log = logging.getLogger("switchyard")

PROBE_INTERVAL = 1.0  # seconds between breaker probes / live-state refreshes
REFRESH_EVERY = 15  # probe intervals between live n_ctx refreshes of healthy backends


def build_backend(name: str, cfg: Any) -> Backend:
    if isinstance(cfg, LlamaCppConfig):
        return LlamaCppBackend(name, cfg)
    if isinstance(cfg, LiteLLMBackend):
        return HostedBackend(name, cfg)
    raise TypeError(f"unknown backend config {type(cfg).__name__}")  # pragma: no cover


@dataclass
class Runtime:
    settings: Settings
    backends: dict[str, Backend]
    breakers: dict[str, CircuitBreaker]
    queues: dict[str, SlotQueue]
    limiters: dict[str, AsyncLimiter]
    classifier: Classifier
    decider: Decider
    dispatcher: Dispatcher
    recorder: Recorder
    ceilings: CrashCeilings
    teams: Teams
    ledger: Ledger
    admission: Admission
    metrics: Metrics = field(default_factory=Metrics)
    activity: Activity = field(default_factory=Activity)
    last_probe: dict[str, ProbeResult] = field(default_factory=dict)
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        backends = {n: build_backend(n, c) for n, c in settings.gateway.backends.items()}
        breakers = {n: CircuitBreaker(n, c.breaker) for n, c in settings.gateway.backends.items() if c.breaker}
        queues = {n: SlotQueue(c.max_concurrency) for n, c in settings.gateway.backends.items()
                  if c.max_concurrency}
        limiters = {n: AsyncLimiter(c.rate_limit_per_minute, 60.0)
                    for n, c in settings.gateway.backends.items() if c.rate_limit_per_minute}
        gw = settings.gateway
        ceilings = CrashCeilings(state_path(gw.data_dir))
        teams = Teams(gw, policies_dir_of(settings.path, gw), dict(settings.policies), dict(settings.policy_files))
        ledger = Ledger(ledger_path(gw.data_dir, gw.ledger_path))
        admission = Admission(ledger.spent_this_month(month_start()))
        return cls(settings, backends, breakers, queues, limiters, Classifier(),
                   Decider(backends, breakers, ceilings), Dispatcher(backends, breakers, queues, limiters, ceilings),
                   Recorder(), ceilings, teams, ledger, admission)

    def __post_init__(self) -> None:
        self.recorder.sinks += [self.metrics.observe, self.activity.observe, self.ledger.observe,
                                self.admission.observe]

    def backend_states(self) -> dict[str, dict[str, Any]]:
        """Each backend as /readyz, /status.json and `explain --live` report it."""
        out = {}
        for name, b in self.backends.items():
            probe = self.last_probe.get(name)
            breaker = self.breakers.get(name)
            queue = self.queues.get(name)
            out[name] = {
                "kind": b.place,
                "ready": probe.ready if probe else None,
                "detail": probe.detail if probe else "not probed yet",
                "context_window": b.context_window,
                "learned_ceiling": self.ceilings.get(name),
                "circuit": str(breaker.state) if breaker else None,
                "circuit_detail": breaker.describe() if breaker else None,
                "circuit_since": breaker.opened_wall if breaker and breaker.state != "closed" else None,
                "queue": {"busy": queue.busy, "waiting": queue.waiting, "capacity": queue.capacity}
                if queue else None,
            }
        return out

    @property
    def policy(self) -> Policy:
        return self.teams.default

    async def start(self) -> None:
        await self.refresh_all()
        self.ledger.start()
        self._tasks.append(asyncio.create_task(self._probe_loop(), name="switchyard-prober"))
        self._tasks.append(asyncio.create_task(self._reload_loop(), name="switchyard-reload"))
        if any(b.place == "hosted" for b in self.backends.values()):
            # Importing litellm takes seconds: do it now, off the loop, not on the first request.
            self._tasks.append(asyncio.create_task(asyncio.to_thread(load_litellm), name="warm-litellm"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.ledger.stop()
        for b in self.backends.values():
            await b.close()

    async def refresh_all(self) -> None:
        results = await asyncio.gather(*(b.probe() for b in self.backends.values()))
        self.last_probe = dict(zip(self.backends, results, strict=True))

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
            for name, breaker in self.breakers.items():
                if breaker.probe_due():
                    result = await self.backends[name].probe()
                    self.last_probe[name] = result
                    breaker.probe_result(result.ready, result.detail)
                    log.info("probe %s: %s -> circuit %s", name, result.detail, breaker.state)
            if tick % REFRESH_EVERY == 0:
                await self.refresh_all()

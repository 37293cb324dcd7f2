"""The pure decision at Switchyard's centre: who is calling, what the request is, where it goes.

Built from validated settings with no I/O of its own — no ledger, no data dir created, no
network: constructing backends opens no connection (they connect lazily). `switchyard explain`,
the benchmark and the serving runtime all decide through this one object; only the runtime
(runtime.py) adds what serves: queues, limiters, the ledger, admission and probes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .backends.base import Backend
from .backends.hosted import HostedBackend
from .backends.llamacpp import LlamaCppBackend
from .backends.speed import SpeedBook, Speeds, speeds_path
from .breaker import CircuitBreaker
from .ceiling import CrashCeilings, state_path
from .classify import Classifier, RequestProfile
from .config import LiteLLMBackend, Policy, Settings, policies_dir_of
from .config import LlamaCppBackend as LlamaCppConfig
from .decide import Decider, Route
from .receive import ChatRequest
from .teams import Teams
from .tiers import members as tier_members
from .tiers import tiers as tier_map


def build_backend(name: str, cfg: Any, ceilings: CrashCeilings | None = None,
                  speeds: Speeds | None = None) -> Backend:
    """The only place that maps a backend's config kind to its implementation."""
    if isinstance(cfg, LlamaCppConfig):
        return LlamaCppBackend(name, cfg, ceilings, speeds)
    if isinstance(cfg, LiteLLMBackend):
        return HostedBackend(name, cfg, speeds)
    raise TypeError(f"unknown backend config {type(cfg).__name__}")  # pragma: no cover


@dataclass
class Router:
    settings: Settings
    backends: dict[str, Backend]
    breakers: dict[str, CircuitBreaker]
    ceilings: CrashCeilings
    speeds: SpeedBook
    teams: Teams
    classifier: Classifier
    decider: Decider
    tiers: dict[str, list[str]] = field(default_factory=dict)  # tier -> its members, in config order

    @classmethod
    def build(cls, settings: Settings, backends: Mapping[str, Backend] | None = None) -> Router:
        """`backends` replaces the configured ones (tests script them in-process)."""
        gw = settings.gateway
        ceilings = CrashCeilings(state_path(gw.data_dir))  # reads the file if there is one; never writes
        # A tier's members (servers, router-mode models) are backends of their own: own breaker,
        # queue, probe and learned ceiling; the tier name lives on only in routes (decide.py).
        members = tier_members(gw)
        speeds = SpeedBook(speeds_path(gw.data_dir))  # the same: read here, written by the runtime
        made = dict(backends) if backends is not None else {
            n: build_backend(n, c, ceilings, speeds.of(n)) for n, c in members.items()}
        breakers = {n: CircuitBreaker(n, c.breaker) for n, c in members.items() if c.breaker and n in made}
        tiers = {t: [m for m in ms if m in made] for t, ms in tier_map(gw).items()}
        teams = Teams(gw, policies_dir_of(settings.path, gw), dict(settings.policies), dict(settings.policy_files))
        return cls(settings, made, breakers, ceilings, speeds, teams, Classifier(), Decider(made, breakers, tiers),
                   tiers)

    @property
    def policy(self) -> Policy:
        """The default team's policy (everyone's while auth is off)."""
        return self.teams.default

    def classify(self, req: ChatRequest, policy: Policy) -> RequestProfile:
        return self.classifier.classify(req, policy)

    async def decide(self, req: ChatRequest, profile: RequestProfile, policy: Policy) -> Route:
        return await self.decider.decide(req.chat, req.headers, profile, policy)

    def add_member(self, tier: str, name: str, cfg: Any) -> Backend:
        """A member found after start (`models: discover`): a backend like the configured ones."""
        backend = self.backends[name] = build_backend(name, cfg, self.ceilings, self.speeds.of(name))
        if cfg.breaker:
            self.breakers[name] = CircuitBreaker(name, cfg.breaker)
        self.tiers.setdefault(tier, []).append(name)  # the decider's own map: it routes there from now on
        self.decider.tier_of[name] = tier
        return backend

    async def close(self) -> None:
        for b in self.backends.values():
            await b.close()

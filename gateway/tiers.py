"""Local tiers: a `llamacpp` entry with `urls`, `members` or `models` (config.py) stands for several
backends, its members. Here: expanding a tier into one backend config per member (router.py builds
one backend from each, decide.py orders them per request), discovering a router's models, and the
checks a schema cannot make — the same server or model listed twice, a member named like another
backend, YAML keys given twice (YAML keeps only the last, so a second `gpu0:` would silently
replace the first) — each with its file and line.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from .config import BackendBase, ConfigIssue, GatewayConfig, LlamaCppBackend, line_of


def expand(name: str, cfg: LlamaCppBackend, discovered: list[str] | None = None) -> dict[str, LlamaCppBackend]:
    """Each member as a backend config of its own (`tier@server`, `tier/model`, `tier@server/model`);
    a plain entry is itself, unchanged. With `models: discover` the models are what the router
    listed (none before it is asked)."""
    if not cfg.is_tier:
        return {name: cfg}
    servers: list[tuple[str, dict[str, Any]]]
    if cfg.members:
        servers = [(f"{name}@{k}", {f: v for f, v in m.model_dump().items() if v is not None})
                   for k, m in cfg.members.items()]
    elif cfg.urls:
        servers = [(f"{name}@{i}", {"url": u}) for i, u in enumerate(cfg.urls)]
    else:
        servers = [(name, {})]
    flat = {"urls": None, "members": None, "models": None}
    models = (discovered or []) if cfg.models == "discover" else (cfg.models or [None])
    out: dict[str, LlamaCppBackend] = {}
    for server, over in servers:
        for model in models:
            member = f"{server}/{model}" if model else server
            out[member] = cfg.model_copy(update={**flat, **over, **({"model": model} if model else {})})
    return out


def members(gateway: GatewayConfig) -> dict[str, BackendBase]:
    """Every backend that serves, a tier's members in place of the tier (what routing walks)."""
    out: dict[str, BackendBase] = {}
    for name, cfg in gateway.backends.items():
        out.update(expand(name, cfg) if isinstance(cfg, LlamaCppBackend) else {name: cfg})
    return out


def tiers(gateway: GatewayConfig) -> dict[str, list[str]]:
    """tier name -> its members, in config order (only entries that list servers or models)."""
    return {n: list(expand(n, c)) for n, c in gateway.backends.items() if isinstance(c, LlamaCppBackend) and c.is_tier}


def tier_issues(path: Path, gateway: GatewayConfig) -> list[ConfigIssue]:
    """A server or model listed twice in a tier, or a member named like another backend."""
    issues: list[ConfigIssue] = []
    taken = set(gateway.backends)
    for name, cfg in gateway.backends.items():
        if not isinstance(cfg, LlamaCppBackend) or not cfg.is_tier:
            continue
        where = ("backends", name)
        servers: dict[tuple[str, str | None], str] = {}
        if cfg.members:
            for key, m in cfg.members.items():
                ident = (m.url, m.model or cfg.model)
                if ident in servers:
                    what = f"{m.url}{f' model {ident[1]}' if ident[1] else ''}"
                    issues.append(ConfigIssue(str(path), line_of(path, *where, "members", key),
                                              f"backends.{name}.members.{key}",
                                              f"duplicate member: {servers[ident]!r} already serves {what}"))
                servers.setdefault(ident, key)
        for j, url in enumerate(cfg.urls or []):
            if (url, None) in servers:
                issues.append(ConfigIssue(str(path), line_of(path, *where, "urls", j), f"backends.{name}.urls.{j}",
                                          f"duplicate member: {url} is listed twice"))
            servers.setdefault((url, None), str(j))
        seen: set[str] = set()
        for j, model in enumerate(cfg.models if isinstance(cfg.models, list) else []):
            if model in seen:
                issues.append(ConfigIssue(str(path), line_of(path, *where, "models", j),
                                          f"backends.{name}.models.{j}", f"duplicate member: model {model!r} is "
                                          "listed twice"))
            seen.add(model)
        for member in expand(name, cfg):
            if member != name and member in taken:
                issues.append(ConfigIssue(str(path), line_of(path, *where), f"backends.{name}",
                                          f"member {member!r} has the name of another backend"))
            taken.add(member)
    return issues


async def discover_members(gateway: GatewayConfig, known: Collection[str]) -> list[tuple[str, str, LlamaCppBackend]]:
    """(tier, member, config) for each model a `models: discover` router lists that is not a backend
    yet. Asked at start and at each live refresh: a model added to the router's directory joins; one
    removed stays a member (its probe says the router no longer serves it)."""
    from .backends.llamacpp import router_models  # the only I/O here, kept in the backend's module

    out: list[tuple[str, str, LlamaCppBackend]] = []
    for tier, cfg in gateway.backends.items():
        if isinstance(cfg, LlamaCppBackend) and cfg.models == "discover":
            ids = await router_models(cfg.url, cfg.timeouts.connect)
            out += [(tier, name, member) for name, member in expand(tier, cfg, ids or []).items() if name not in known]
    return out

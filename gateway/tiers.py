"""Checks on local tiers that a schema cannot make: the same server or model listed twice, a
member name that another backend already has, and YAML keys given twice (YAML keeps only the
last, so a second `gpu0:` would silently replace the first). Each names the file and the line.

A tier itself is data (config.py: `urls`, `members`, `models`); router.py expands it into one
backend per member, and decide.py orders a tier's members per request.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import yaml

from .config import ConfigIssue, GatewayConfig, LlamaCppBackend, line_of


def duplicate_keys(path: Path, node: yaml.Node | None) -> list[ConfigIssue]:
    """Every mapping key that appears twice in the file, at the line of its second appearance."""
    out: list[ConfigIssue] = []
    stack = [node] if node is not None else []
    while stack:
        n = stack.pop()
        if isinstance(n, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in n.value:
                key = str(k.value)
                if key in seen:
                    out.append(ConfigIssue(str(path), k.start_mark.line + 1, key,
                                           f"duplicate key {key!r} (first at line {seen[key]}); YAML would keep "
                                           "only the last one"))
                else:
                    seen[key] = k.start_mark.line + 1
                stack.append(v)
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
    return sorted(out, key=lambda i: i.line or 0)


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
        for member in cfg.expand(name):
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
            out += [(tier, name, member) for name, member in cfg.expand(tier, ids or []).items() if name not in known]
    return out

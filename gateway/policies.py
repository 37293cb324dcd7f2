"""The policy set: one loader for every `policies/*.yaml`, at start and on each hot reload.

Each file is validated alone (schema, backend references), then the set as a whole (one file per
team, no key hash shared by two teams, the default team present). At start any problem is fatal.
On reload the running set is the fallback: a file that does not validate, or whose change would
break the set, is rejected (file, line, reason) and its team keeps its last good policy while the
other files' edits apply — so a reload can never leave the gateway without its default team.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, ConfigIssue, GatewayConfig, Policy, line_of, validate_file
from .tiers import tiers as tier_map


@dataclass(frozen=True)
class PolicySet:
    policies: dict[str, Policy] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # team -> the file that defines it

    def team_of(self, path: Path) -> str | None:
        return next((t for t, f in self.files.items() if f == path), None)


def policy_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml"))


def check_references(path: Path, policy: Policy, gateway: GatewayConfig) -> list[ConfigIssue]:
    """Every backend a policy names must exist in switchyard.yaml: a backend, a tier or a tier's member."""
    issues = []
    tiers = tier_map(gateway)
    known = set(gateway.backends) | {m for ms in tiers.values() for m in ms}
    for i, rule in enumerate(policy.rules):
        for j, name in enumerate(rule.route):
            if name not in known:
                issues.append(ConfigIssue(str(path), line_of(path, "rules", i, "route", j), f"rules.{i}.route.{j}",
                                          _unknown(name, known, tiers)))
    for j, name in enumerate(policy.allowed_backends or []):
        if name not in known:
            issues.append(ConfigIssue(str(path), line_of(path, "allowed_backends", j),
                                      f"allowed_backends.{j}", _unknown(name, known, tiers)))
    return issues


def _unknown(name: str, known: set[str], tiers: dict[str, list[str]]) -> str:
    tier = next((t for t in tiers if name.startswith((f"{t}@", f"{t}/"))), None)
    if tier is not None:
        return f"unknown member {name!r} of tier {tier!r} (members: {', '.join(tiers[tier])})"
    return f"unknown backend {name!r} (known: {', '.join(sorted(known))})"


def load_file(path: Path, gateway: GatewayConfig) -> Policy:
    """One policy file on its own: schema and backend references."""
    policy = validate_file(Policy, path)
    issues = check_references(path, policy, gateway)
    if issues:
        raise ConfigError(issues)
    return policy


class _Assembly:
    """The set being built, refusing what would break it (a second file for a team, a shared key)."""

    def __init__(self) -> None:
        self.policies: dict[str, Policy] = {}
        self.files: dict[str, Path] = {}
        self.key_owner: dict[str, str] = {}

    def conflicts(self, path: Path, policy: Policy) -> list[ConfigIssue]:
        if policy.team in self.files and self.files[policy.team] != path:
            return [ConfigIssue(str(path), line_of(path, "team"), "team",
                                f"team {policy.team!r} is already defined in {self.files[policy.team]}")]
        return [ConfigIssue(str(path), line_of(path, "keys", i), f"keys.{i}",
                            f"this key hash is also a key of team {self.key_owner[h]!r}")
                for i, h in enumerate(policy.keys) if self.key_owner.get(h, policy.team) != policy.team]

    def add(self, path: Path, policy: Policy) -> None:
        self.policies[policy.team] = policy
        self.files[policy.team] = path
        for h in policy.keys:
            self.key_owner.setdefault(h, policy.team)

    def remove(self, team: str) -> None:
        self.policies.pop(team, None)
        self.files.pop(team, None)
        self.key_owner = {h: t for h, t in self.key_owner.items() if t != team}


def load(directory: Path, gateway: GatewayConfig, last_good: PolicySet | None = None
         ) -> tuple[PolicySet, list[ConfigIssue]]:
    """The policy set in `directory` and every problem found, each with file and line.

    Without `last_good` (start) the set is what validated; the caller refuses to start on any
    issue. With it (reload), a rejected file keeps its team's last good policy, and files that
    did not change keep their teams ahead of files that changed (a new file cannot take an
    existing team's name or key away from it).
    """
    issues: list[ConfigIssue] = []
    paths = policy_paths(directory)
    if not paths and last_good is None:
        issues.append(ConfigIssue(str(directory), None, "", "no policy files (*.yaml) found"))
    valid: dict[Path, Policy] = {}
    rejected: list[Path] = []
    for path in paths:
        try:
            valid[path] = load_file(path, gateway)
        except ConfigError as e:
            issues.extend(e.issues)
            rejected.append(path)
    previous = last_good or PolicySet()

    def kept(path: Path) -> Policy | None:
        team = previous.team_of(path)
        return previous.policies[team] if team is not None else None

    unchanged = [p for p, pol in valid.items() if kept(p) == pol]
    changed = [p for p in valid if p not in unchanged]
    out = _Assembly()
    # Unchanged files and rejected files' last good policies come from the last good set, which was
    # consistent: they go in first, so a conflict is always blamed on the file that changed.
    for path in unchanged:  # the same object as before: caches keyed on a policy's identity stay warm
        out.add(path, kept(path) or valid[path])
    for path in rejected:
        policy = kept(path)
        if policy is not None:
            out.add(path, policy)
    for path in changed:
        problems = out.conflicts(path, valid[path])
        if problems:
            issues.extend(problems)
            policy = kept(path)
            if policy is not None and not out.conflicts(path, policy):
                out.add(path, policy)
            continue
        out.add(path, valid[path])
    default = gateway.default_team
    if default not in out.policies:
        issues.extend(_keep_default(out, previous, directory, default, rejected))
    return PolicySet(out.policies, out.files), issues


def _keep_default(out: _Assembly, previous: PolicySet, directory: Path, default: str,
                  rejected: list[Path]) -> list[ConfigIssue]:
    """The default team must survive any reload: a rename or deletion of its file is rejected.
    (At start, a missing default is reported only when no broken file could be the one defining it.)"""
    if default not in previous.policies:  # at start: nothing to fall back to
        return [ConfigIssue(str(directory), None, "default_team",
                            f"no policy file defines the default team {default!r}")] if not rejected else []
    path = previous.files[default]
    if path.exists():
        renamed_to = next((t for t, f in out.files.items() if f == path), None)
        if renamed_to is not None:
            out.remove(renamed_to)
        out.add(path, previous.policies[default])
        return [ConfigIssue(str(path), line_of(path, "team"), "team",
                            f"this file defines the default team {default!r} (default_team in switchyard.yaml); "
                            f"renaming it{f' to {renamed_to!r}' if renamed_to else ''} would leave requests "
                            f"without a policy")]
    out.add(path, previous.policies[default])  # a deleted file removes its team, never the default
    return [ConfigIssue(str(path), None, "",
                        f"the file of the default team {default!r} was deleted; its last good policy stays in use")]


def load_policies(directory: Path, gateway: GatewayConfig) -> tuple[dict[str, Policy], dict[str, Path]]:
    """At start: the whole set or ConfigError listing every problem at once."""
    result, issues = load(directory, gateway)
    if issues:
        raise ConfigError(issues)
    return result.policies, result.files

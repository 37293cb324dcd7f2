"""Teams: who is calling (API key -> team policy), and hot reload of the policy files.

Keys are stored as SHA-256 hex digests only; a presented key is hashed and compared against every
stored digest with `hmac.compare_digest`, so neither the key nor timing reveals anything. Reload is
per file: a file that does not validate is reported (file, line, reason) and its team keeps its
last good policy; the other teams' edits still apply. In-flight requests keep the policy object
they started with.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, ConfigIssue, GatewayConfig, Policy, _check_references, _line_of, _validate
from .errors import Unauthorized

log = logging.getLogger("switchyard")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "sy-" + secrets.token_urlsafe(32)


@dataclass
class Teams:
    gateway: GatewayConfig
    directory: Path
    policies: dict[str, Policy]
    files: dict[str, Path]  # team -> file
    errors: list[str] = field(default_factory=list)
    _mtimes: dict[Path, float] = field(default_factory=dict)
    _file_errors: dict[Path, list[str]] = field(default_factory=dict)
    _keys: list[tuple[str, str]] = field(default_factory=list)  # (digest, team)

    def __post_init__(self) -> None:
        self._index()
        self._mtimes = self._scan()

    @property
    def default(self) -> Policy:
        return self.policies[self.gateway.default_team]

    def _index(self) -> None:
        self._keys = [(h, team) for team, p in self.policies.items() for h in p.keys]

    def team_for_key(self, key: str) -> Policy | None:
        digest = hash_key(key)
        found: str | None = None
        for stored, team in self._keys:  # compare with every digest: constant time in the key
            if hmac.compare_digest(stored, digest):
                found = team
        return self.policies.get(found) if found else None

    def authenticate(self, headers: Any) -> Policy:
        if self.gateway.auth == "off":
            return self.default
        auth = headers.get("Authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("missing API key: send 'Authorization: Bearer <team key>'", code="missing_api_key")
        policy = self.team_for_key(key.strip())
        if policy is None:
            raise Unauthorized("invalid API key")
        return policy

    # ---- hot reload ------------------------------------------------------------------------------
    def _scan(self) -> dict[Path, float]:
        out = {}
        for p in sorted(self.directory.glob("*.yaml")) + sorted(self.directory.glob("*.yml")):
            try:
                out[p] = p.stat().st_mtime_ns
            except OSError:
                continue
        return out

    def changed(self) -> bool:
        return self._scan() != self._mtimes

    def reload(self) -> list[str]:
        """Re-read changed policy files; returns the problems (also kept in `errors`)."""
        now = self._scan()
        issues: list[ConfigIssue] = []
        policies = dict(self.policies)
        files = dict(self.files)
        for path, mtime in now.items():
            if self._mtimes.get(path) == mtime:
                continue
            self._file_errors.pop(path, None)
            try:
                policy = _validate(Policy, path)
            except ConfigError as e:
                issues.extend(e.issues)
                continue
            refs = _check_references(path, policy, self.gateway)
            if refs:
                issues.extend(refs)
                continue
            owner = next((t for t, f in files.items() if f == path), None)
            if policy.team in files and files[policy.team] != path:
                issues.append(ConfigIssue(str(path), _line_of(path, "team"), "team",
                                          f"team {policy.team!r} is already defined in {files[policy.team]}"))
                continue
            if owner is not None and owner != policy.team:
                policies.pop(owner, None)
                files.pop(owner, None)
            policies[policy.team] = policy
            files[policy.team] = path
        for team, path in list(files.items()):  # a deleted file removes its team (never the default)
            if path not in now and team != self.gateway.default_team:
                policies.pop(team)
                files.pop(team)
        seen: dict[str, str] = {}
        for team, p in policies.items():
            for i, h in enumerate(p.keys):
                if h in seen and seen[h] != team:
                    path = files[team]
                    issues.append(ConfigIssue(str(path), _line_of(path, "keys", i), f"keys.{i}",
                                              f"this key hash is also a key of team {seen[h]!r}"))
                    policies[team] = self.policies.get(team, p)  # keep the last good one
                seen.setdefault(h, team)
        self.policies, self.files = policies, files
        self._mtimes = now
        self._index()
        for issue in issues:
            self._file_errors.setdefault(Path(issue.file), []).append(str(issue))
            log.error("policy reload rejected: %s (the team keeps its last good policy)", issue)
        for path in list(self._file_errors):
            if path not in now:
                del self._file_errors[path]
        self.errors = [e for errs in self._file_errors.values() for e in errs]
        return self.errors

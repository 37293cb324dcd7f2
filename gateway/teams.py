"""Teams: who is calling (API key -> team policy), and hot reload of the policy files.

Keys are stored as SHA-256 hex digests only; a presented key is hashed and compared against every
stored digest with `hmac.compare_digest`, so neither the key nor timing reveals anything. Reload is
per file (policies.py decides what a reload may change): a file that does not validate is reported
(file, line, reason) and its team keeps its last good policy; the other teams' edits still apply;
the default team is always there. In-flight requests keep the policy object they started with.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, ConfigIssue, GatewayConfig, Policy
from .errors import Unauthorized
from .policies import PolicySet, load, policy_paths

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
    _keys: list[tuple[str, str]] = field(default_factory=list)  # (digest, team)

    def __post_init__(self) -> None:
        if self.gateway.default_team not in self.policies:  # the invariant `default` relies on
            raise ConfigError([ConfigIssue(str(self.directory), None, "default_team",
                                           f"no policy defines the default team {self.gateway.default_team!r}")])
        self._index()
        self._mtimes = self._scan()

    @property
    def default(self) -> Policy:
        # Never a KeyError: construction requires the default team and policies.load keeps it on reload.
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
        for p in policy_paths(self.directory):
            try:
                out[p] = p.stat().st_mtime_ns
            except OSError:
                continue
        return out

    def changed(self) -> bool:
        return self._scan() != self._mtimes

    def reload(self) -> list[str]:
        """Re-read the policy files; returns the problems (also kept in `errors`, shown by /readyz)."""
        now = self._scan()
        result, issues = load(self.directory, self.gateway, PolicySet(self.policies, self.files))
        self.policies, self.files = result.policies, result.files
        self._mtimes = now
        self._index()
        errors = [str(i) for i in issues]
        for e in errors:
            if e not in self.errors:  # a file that stays broken is logged once, not on every reload
                log.error("policy reload rejected: %s (the team keeps its last good policy)", e)
        self.errors = errors
        return self.errors

"""Switchyard's configuration: `switchyard.yaml` (listen address, backends) and `policies/*.yaml`.

This module holds the pydantic models; yamlfile.py reads a file against one of them so that every
error names the file, the line, the field and the reason, because a gateway that refuses to start
must say exactly why. The policy *set* (references, one file per team, shared keys, the default team, hot
reload keeping each team's last good policy) is validated in policies.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .yamlfile import ConfigError as ConfigError  # re-exported: callers load config through this module
from .yamlfile import ConfigIssue as ConfigIssue
from .yamlfile import line_of as line_of
from .yamlfile import validate_file as validate_file

ROLES = (
    "main", "subagent", "compaction", "title", "summary", "tags", "follow_up", "query",
    "autocomplete", "emoji", "image_prompt", "function_calling", "moa", "memory",
)
Role = Literal[
    "main", "subagent", "compaction", "title", "summary", "tags", "follow_up", "query",
    "autocomplete", "emoji", "image_prompt", "function_calling", "moa", "memory",
]
INTERACTIVE_ROLES = frozenset({"main", "subagent"})
# Background work whose client waits for no one: it may be pre-empted on a busy local slot by default.
# Compaction is not among them: opencode's session waits for it.
PREEMPTIBLE_ROLES = frozenset(ROLES) - INTERACTIVE_ROLES - {"compaction"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(Strict):
    connect: float = Field(5.0, gt=0, description="seconds to open the TCP connection")
    first_byte: float = Field(300.0, gt=0, description="seconds until the first response byte")
    idle: float = Field(120.0, gt=0, description="seconds of silence allowed between chunks")
    total: float = Field(3600.0, gt=0, description="seconds for the whole response")


class Backoff(Strict):
    """How long a 429 may be waited out on the same backend before moving on."""

    max_wait: float = Field(10.0, ge=0, description="cap on a single wait, seconds")
    budget: float = Field(20.0, ge=0, description="total waiting allowed per request, seconds")
    attempts: int = Field(4, ge=1, description="tries on this backend, the first included")


class Breaker(Strict):
    failure_threshold: int = Field(1, ge=1, description="crash-class failures within window that open it")
    slow_threshold: int = Field(3, ge=1, description="timeouts within window that open it (slowness alone is "
                                "not a crash: it opens the circuit only when it repeats)")
    window: float = Field(60.0, gt=0)
    cooldown: float = Field(5.0, gt=0, description="first open period; doubles on each failed probe")
    max_cooldown: float = Field(120.0, gt=0)


class BackendBase(Strict):
    model: str | None = Field(None, description="the model id sent upstream (llama.cpp router picks by it)")
    context_limit: int | None = Field(None, gt=0, description="tokens; the safe ceiling for this backend")
    max_concurrency: int | None = Field(None, ge=1)
    timeouts: Timeouts = Timeouts()
    backoff: Backoff = Backoff()
    breaker: Breaker | None = None
    rate_limit_per_minute: float | None = Field(None, gt=0)
    lookahead: float = Field(0.0, ge=0, le=5, description="seconds a background task waits before taking an "
                             "idle slot, so an interactive turn sent just after it goes first")


def _http(v: str) -> str:
    if not v.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return v.rstrip("/")


class Member(Strict):
    """One server of a local tier (a GPU, a box); a field left out takes the tier's value."""

    url: str = Field(..., description="this server's address")
    model: str | None = Field(None, description="model id sent upstream (a router-mode server picks by it)")
    max_concurrency: int | None = Field(None, ge=1, description="this server's slots (its -np)")
    context_limit: int | None = Field(None, gt=0, description="tokens; this server's safe ceiling")

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        return _http(v)


class LlamaCppBackend(BackendBase):
    kind: Literal["llamacpp"]
    url: str = "http://127.0.0.1:8080"
    # A tier: several servers and/or a router-mode server's models, each its own member (named
    # `tier@server`, `tier/model`, `tier@server/model`) with its own queue, breaker, probe and ceiling.
    urls: list[str] | None = Field(None, min_length=1, description="several llama-servers as one tier: "
                                   "members tier@0, tier@1, ... (each with this entry's settings)")
    members: dict[str, Member] | None = Field(None, min_length=1, description="named servers as one tier: "
                                              "members tier@NAME, each with its own url, slots and ceiling")
    models: list[str] | Literal["discover"] | None = Field(
        None, min_length=1, description="a router-mode server's models (llama-server --models-dir/--models-preset) "
        "as members tier/MODEL, each with its own breaker: one child's crash leaves the other models serving; "
        "`discover`: every model the router's GET /models lists at start (policies then name only the tier)")
    context_limit: int | None = Field(32768, gt=0)
    max_concurrency: int | None = Field(1, ge=1)
    embedded: bool = Field(
        True, description="when nothing answers at url, `switchyard serve` starts the bundled llama-server"
    )
    breaker: Breaker | None = Breaker(failure_threshold=1)
    lookahead: float = Field(0.15, ge=0, le=5, description="seconds a background task waits before taking an "
                             "idle slot (both Open WebUI and opencode send a new chat's title just before its turn)")
    hot_for: float = Field(
        300.0, ge=0, description="seconds a conversation counts as hot on its slot: a background task will not "
        "evict its cached prefix while another backend can take the task")
    slot_affinity: bool = Field(
        True, description="with several slots (-np N), send each request to the slot holding its prefix "
        "(llama.cpp's id_slot) and background tasks to one no hot conversation owns; false leaves the choice "
        "to llama.cpp (its own prompt-similarity pick)")
    keep_alive: bool = Field(
        False, description="reuse upstream connections (a proxy in front of llama.cpp); llama-server itself "
        "answers `Connection: close`, so the default opens a fresh connection per request")
    learned_ceiling_fraction: float = Field(
        0.9, gt=0, le=1, description="after a crash on N tokens, requests >= fraction*N skip this backend")
    learn_min_tokens: int = Field(4096, ge=0, description="crashes on smaller requests teach no ceiling")

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        return _http(v)

    @field_validator("urls")
    @classmethod
    def _http_urls(cls, v: list[str] | None) -> list[str] | None:
        return [_http(u) for u in v] if v else v

    @field_validator("members")
    @classmethod
    def _member_names(cls, v: dict[str, Member] | None) -> dict[str, Member] | None:
        for name in v or {}:
            if not name or any(c in name for c in "@/ "):
                raise ValueError(f"member name {name!r} must be non-empty, without '@', '/' or spaces")
        return v

    @model_validator(mode="after")
    def _one_server_list(self) -> LlamaCppBackend:
        if self.urls and self.members:
            raise ValueError("give either `urls` or `members`, not both")
        if self.models == "discover" and (self.urls or self.members):
            raise ValueError("`models: discover` asks one router (`url`), not `urls` or `members`")
        return self

    @property
    def is_tier(self) -> bool:
        return bool(self.urls or self.members or self.models)


class LiteLLMBackend(BackendBase):
    kind: Literal["litellm"]
    model: str = Field(..., description="a litellm model id, e.g. openai/responses/gpt-5-nano")
    api_base: str | None = None
    api_key_env: str | None = Field(None, description="name of the env var that holds the key")
    session_header: str | None = Field(
        None, description="upstream header that receives the client's session id (zen: x-opencode-session)"
    )
    extra_headers: dict[str, str] = {}
    breaker: Breaker | None = Breaker(failure_threshold=3, window=60.0, cooldown=10.0)

    @property
    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


BackendConfig = Annotated[LlamaCppBackend | LiteLLMBackend, Field(discriminator="kind")]


class Listen(Strict):
    host: str = "127.0.0.1"
    port: int = Field(4000, ge=0, le=65535)


class ServerLimits(Strict):
    """What bounds a slow, malformed or greedy client (gateway/server.py)."""

    header_timeout: float = Field(20.0, gt=0, description="seconds from a request's first byte to its last header")
    body_timeout: float = Field(120.0, gt=0, description="seconds to receive a whole request body")
    keepalive_timeout: float = Field(75.0, gt=0, description="seconds an idle connection stays open")
    max_connections: int = Field(
        512, ge=1, description="open client connections; past it a new one gets 503 and is closed "
        "(capped below the process's descriptor limit)")


class GatewayConfig(Strict):
    listen: Listen = Listen()
    body_limit_bytes: int = Field(16 * 1024 * 1024, gt=0)
    policies_dir: str = "policies"
    data_dir: str = "~/.local/share/switchyard"
    default_team: str = "default"
    auth: Literal["off", "keys"] = Field(
        "off", description="off: every request is the default team; keys: a team key is required")
    ledger_path: str | None = Field(None, description="SQLite usage ledger; default <data_dir>/ledger.sqlite")
    reload_interval: float = Field(1.0, gt=0, description="seconds between policy file change checks")
    shutdown_grace: float = Field(
        20.0, ge=0, description="seconds SIGTERM waits for in-flight requests (queued ones get 503 + Retry-After "
        "at once); keep below the service manager's stop timeout (systemd TimeoutStopSec)")
    server: ServerLimits = ServerLimits()
    admin_keys: list[str] = Field(
        [], description="sha256 hex digests of admin keys: with auth: keys, /status.json, /metrics, / and "
        "/readyz details need one")
    admin_key_env: str | None = Field(None, description="env var holding an admin key (hashed at start)")
    backends: dict[str, BackendConfig]

    @field_validator("admin_keys")
    @classmethod
    def _admin_hashes(cls, v: list[str]) -> list[str]:
        return Policy._hashes(v)  # the same rule as team keys: digests only, never raw keys

    @field_validator("backends")
    @classmethod
    def _names(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not v:
            raise ValueError("at least one backend is required")
        for name in v:
            if name in ("auto",):
                raise ValueError(f"backend name {name!r} is reserved")
        return v


# ---- policies --------------------------------------------------------------------------------

class Range(Strict):
    min: int | None = Field(None, ge=0)
    max: int | None = Field(None, ge=0)

    def contains(self, n: int) -> bool:
        return (self.min is None or n >= self.min) and (self.max is None or n <= self.max)


def _as_list(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


class Match(Strict):
    """All given fields must hold (AND); a list means any of its values (OR)."""

    role: list[Role] | None = None
    client: list[str] | None = None
    model: list[str] | None = None
    session: list[str] | None = None
    tokens_in: Range | None = None
    tokens_total: Range | None = None
    headers: dict[str, str] | None = Field(None, description="header name -> exact value ('*' = present)")

    _lists = field_validator("role", "client", "model", "session", mode="before")(_as_list)


class Rule(Strict):
    name: str | None = None
    match: Match = Match()
    route: list[str] = Field(..., min_length=1)
    local_ceiling: int | None = Field(None, gt=0)
    output_reserve: int | None = Field(None, ge=0)
    max_queue_wait: float | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, gt=0, description="clamp the request's max_tokens")
    on_limit: Literal["refuse", "local"] = Field(
        "refuse", description="over a team limit or budget: answer 429, or serve from local backends only")
    preemptible: bool | None = Field(
        None, description="on a busy slot, give way to an interactive turn (its answer is held until complete, "
        "then sent); default: true for background roles, false for main, subagent and compaction")
    prefer: Literal["order", "fastest"] = Field(
        "order", description="order: the route's order; fastest: the backend predicted to answer first "
        "(learned rates, cached tokens, queue) goes first, within the cost guard `min_saving`")
    min_saving: float = Field(
        0.0, ge=0, description="prefer: fastest moves a billed backend ahead of a free one only when it is "
        "predicted to answer at least this many seconds sooner")
    spill_early: bool = Field(
        False, description="keep the route's order, but move a backend whose predicted queue wait (the service "
        "times ahead, learned) exceeds max_queue_wait behind the others at once, instead of waiting it out")


class Signature(Strict):
    """A prompt signature: the role a request has when its prompt looks like this."""

    role: Role
    system_prefix: list[str] | None = None
    last_user_prefix: list[str] | None = None

    _lists = field_validator("system_prefix", "last_user_prefix", mode="before")(_as_list)

    @model_validator(mode="after")
    def _something(self) -> Signature:
        if not (self.system_prefix or self.last_user_prefix):
            raise ValueError("a signature needs system_prefix or last_user_prefix")
        return self


class Limits(Strict):
    """Per-team limits. Over one: 429 with Retry-After, or local only where the rule says `on_limit: local`."""

    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0, description="prompt tokens (estimate) per minute")
    concurrent: int | None = Field(None, ge=1, description="requests in flight at once")
    monthly_budget_usd: float | None = Field(None, ge=0, description="hosted spend per calendar month")


class Stickiness(Strict):
    """A conversation that outgrew local stays where its prefix is warm (hosted) instead of bouncing back
    to a cold local prefill. Pinned only on a size proven by bytes or an exact count (never on an
    estimate made while local could not count), released by a compaction (which rewrites the history),
    and expiring when the provider's prompt cache would be gone."""

    enabled: bool = True
    ttl: float = Field(1800, gt=0, description="seconds a session stays pinned after its last request "
                       "(about a hosted prompt cache's lifetime)")


class Policy(Strict):
    team: str
    keys: list[str] = Field([], description="sha256 hex digests of the team's API keys")
    allowed_models: list[str] | None = Field(None, description="virtual models the team may ask for")
    allowed_backends: list[str] | None = None
    output_reserve: int = Field(4096, ge=0, description="tokens kept free for the answer")
    local_ceiling: int | None = Field(None, gt=0, description="tokens; default: the backend's context_limit")
    max_queue_wait: float = Field(30.0, ge=0, description="seconds a request may wait for a local slot")
    task_models: list[str] = Field(["switchyard-task"], description="model ids that mean 'background task'")
    signatures: list[Signature] = Field([], description="extra prompt signatures, tried before the pack")
    limits: Limits = Limits()
    sticky_sessions: Stickiness = Stickiness()
    rules: list[Rule] = Field(..., min_length=1)

    @field_validator("keys", mode="before")
    @classmethod
    def _empty_keys(cls, v: Any) -> Any:
        return [] if v is None else v  # `keys:` with every key revoked

    @field_validator("keys")
    @classmethod
    def _hashes(cls, v: list[str]) -> list[str]:
        for h in v:
            if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
                raise ValueError("keys must be sha256 hex digests (64 lowercase hex chars), never raw keys")
        return v

    @field_validator("rules")
    @classmethod
    def _default_rule_last(cls, rules: list[Rule]) -> list[Rule]:
        last = rules[-1].match
        if any(getattr(last, f) is not None for f in Match.model_fields):
            raise ValueError("the last rule must be a default rule with no `match` (it catches everything)")
        return rules


@dataclass(frozen=True)
class Settings:
    """Everything loaded: the gateway config and one policy per team."""

    path: Path
    gateway: GatewayConfig
    policies: dict[str, Policy]
    policy_files: dict[str, Path]


def policies_dir_of(config_path: Path, gateway: GatewayConfig) -> Path:
    d = Path(os.path.expanduser(gateway.policies_dir))
    return d if d.is_absolute() else (config_path.parent / d)


def load_gateway(path: Path) -> GatewayConfig:
    from .tiers import tier_issues  # the tier checks build on this module's models

    gateway = validate_file(GatewayConfig, path)
    issues = tier_issues(path, gateway)
    if issues:
        raise ConfigError(issues)
    return gateway


def load_policies(directory: Path, gateway: GatewayConfig) -> tuple[dict[str, Policy], dict[str, Path]]:
    """Every policy file in `directory`, validated as a set (see policies.py); ConfigError otherwise."""
    from .policies import load_policies as load  # policies.py builds on this module's models

    return load(directory, gateway)


def load_settings(config_path: str | os.PathLike[str]) -> Settings:
    path = Path(config_path)
    gateway = load_gateway(path)
    pdir = policies_dir_of(path, gateway)
    policies, files = load_policies(pdir, gateway)
    return Settings(path=path, gateway=gateway, policies=policies, policy_files=files)

"""Step 2: classify. Request -> RequestProfile: who sent it, what it is for, how big it is.

Explicit signals decide first (an agent/task header, a task model id, a parent-session header);
prompt signatures from the pack (`signatures.yaml`, extended by the team's policy) decide next;
anything else is an interactive turn (`main`). All of it is data: adding a client touches YAML.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from .config import INTERACTIVE_ROLES, Policy, Signature
from .receive import ChatRequest
from .tokens import TokenSize, size_of


@dataclass(frozen=True, slots=True)
class RequestProfile:
    role: str
    role_source: str  # which signal decided the role, for `explain` and the decision log
    client: str
    session: str | None
    team: str
    model: str  # what the client asked for
    size: TokenSize
    output_reserve: int
    max_tokens: int | None

    @property
    def interactive(self) -> bool:
        return self.role in INTERACTIVE_ROLES

    @property
    def tokens_in(self) -> int:
        return self.size.estimate


@dataclass(frozen=True)
class ClientRule:
    name: str
    user_agent_contains: tuple[str, ...] = ()
    header_present: tuple[str, ...] = ()


@dataclass(frozen=True)
class SignaturePack:
    clients: tuple[ClientRule, ...]
    session_headers: tuple[str, ...]
    role_headers: dict[str, dict[str, str]]
    subagent_headers: tuple[str, ...]
    prompts: tuple[Signature, ...]
    # Vendor model ids an agent asks for by default (Claude Code's claude-*, Codex's gpt-*): routed as
    # `auto` on the Messages/Responses endpoints unless the team names them as task models.
    vendor_models: tuple[str, ...] = ()
    json_role_headers: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)
    # team -> (the policy object it was built from, its signatures + the pack)
    _extended: dict[str, tuple[Policy, tuple[Signature, ...]]] = field(default_factory=dict, compare=False,
                                                                        repr=False)

    @classmethod
    def load(cls, text: str | None = None) -> SignaturePack:
        data = _shipped_pack() if text is None else yaml.safe_load(text)
        return cls(
            clients=tuple(ClientRule(c["name"], tuple(c.get("user_agent_contains", ())),
                                     tuple(h.lower() for h in c.get("header_present", ())))
                          for c in data.get("clients", [])),
            session_headers=tuple(data.get("session_headers", ())),
            role_headers={h.lower(): {str(k).lower(): v for k, v in (m or {}).items()}
                          for h, m in (data.get("role_headers") or {}).items()},
            subagent_headers=tuple(data.get("subagent_headers", ())),
            prompts=tuple(Signature.model_validate(p) for p in data.get("prompts", [])),
            vendor_models=tuple(data.get("vendor_models", ())),
            json_role_headers={h.lower(): (str(m["field"]), {str(k).lower(): v for k, v in m["values"].items()})
                               for h, m in (data.get("json_role_headers") or {}).items()},
        )

    def prompts_for(self, policy: Policy) -> tuple[Signature, ...]:
        if not policy.signatures:
            return self.prompts
        cached = self._extended.get(policy.team)
        if cached is None or cached[0] is not policy:  # a reload makes a new policy object: rebuild
            cached = self._extended[policy.team] = (policy, tuple(policy.signatures) + self.prompts)
        return cached[1]


@functools.cache
def _shipped_pack() -> Any:
    """The shipped pack, parsed once per process (pure-Python YAML takes ~30 ms)."""
    return yaml.safe_load(resources.files("gateway").joinpath("signatures.yaml").read_text())


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: the first text part is where prefixes live
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                return part["text"]
    return ""


def _texts(content: Any) -> tuple[str, ...]:
    if isinstance(content, list):
        return tuple(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return (content,) if isinstance(content, str) else ()


def _json_field(value: str | None, key: str) -> str | None:
    if not value or not value.lstrip().startswith("{"):
        return None
    try:
        data = json.loads(value)
    except ValueError:
        return None
    field_value = data.get(key) if isinstance(data, dict) else None
    return field_value if isinstance(field_value, str) else None


class Classifier:
    def __init__(self, pack: SignaturePack | None = None) -> None:
        self.pack = pack or SignaturePack.load()

    def client_of(self, headers: Any) -> str:
        ua = headers.get("user-agent", "")
        for rule in self.pack.clients:
            if any(s in ua for s in rule.user_agent_contains) or any(h in headers for h in rule.header_present):
                return rule.name
        return "other"

    def session_of(self, headers: Any) -> str | None:
        for h in self.pack.session_headers:
            v = headers.get(h)
            if v:
                return v
        return None

    def role_of(self, req: ChatRequest, policy: Policy) -> tuple[str, str]:
        headers = req.headers
        for header, mapping in self.pack.role_headers.items():
            value = headers.get(header)
            if value is not None:
                role = mapping.get(value.strip().lower())
                if role:
                    return role, f"header {header}"
        for header, (key, mapping) in self.pack.json_role_headers.items():
            value = _json_field(headers.get(header), key)  # Codex: x-codex-turn-metadata {"request_kind": ...}
            role = mapping.get(value.strip().lower()) if value else None
            if role:
                return role, f"header {header} {key}={value}"
        for h in self.pack.subagent_headers:
            if h in headers:
                return "subagent", f"header {h}"
        role = self._by_prompt(req.chat["messages"], policy)
        if role:
            return role
        if req.model in policy.task_models:
            # A dedicated task model (Open WebUI's TASK_MODEL_EXTERNAL) whose prompt we don't know.
            return "title", f"task model {req.model}"
        return "main", "default"

    def _by_prompt(self, messages: list[dict[str, Any]], policy: Policy) -> tuple[str, str] | None:
        first = messages[0]
        system = _text(first.get("content")) if first.get("role") in ("system", "developer") else ""
        # Claude Code's system prompt opens with a billing-header block: its later blocks count too.
        systems = _texts(first.get("content")) if system else ()
        last_user = ""
        for m in reversed(messages):
            if m.get("role") == "user":
                last_user = _text(m.get("content"))
                break
        for i, sig in enumerate(self.pack.prompts_for(policy)):
            if sig.system_prefix and any(t.startswith(tuple(sig.system_prefix)) for t in systems):
                return sig.role, f"signature {i} (system prompt)"
            if sig.last_user_prefix and last_user and last_user.startswith(tuple(sig.last_user_prefix)):
                return sig.role, f"signature {i} (user prompt)"
        return None

    def model_of(self, req: ChatRequest, policy: Policy) -> str:
        if (req.protocol != "chat" and req.model not in policy.task_models
                and req.model.startswith(self.pack.vendor_models)):
            return "auto"
        return req.model

    def classify(self, req: ChatRequest, policy: Policy) -> RequestProfile:
        role, source = self.role_of(req, policy)
        reserve = policy.output_reserve
        if req.max_tokens is not None:
            reserve = min(req.max_tokens, reserve)
        return RequestProfile(
            role=role,
            role_source=source,
            client=self.client_of(req.headers),
            session=self.session_of(req.headers),
            team=policy.team,
            model=self.model_of(req, policy),
            size=size_of(req.raw, req.chat),
            output_reserve=reserve,
            max_tokens=req.max_tokens,
        )

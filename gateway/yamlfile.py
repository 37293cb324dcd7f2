"""YAML files read with their line numbers, so every error says file:line: field: reason.

A gateway that refuses to start (or a reload that is rejected) must say exactly where: pydantic's
error locations are mapped back to the YAML nodes they came from; duplicate keys (which YAML would
silently resolve to the last one) are errors too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

_M = TypeVar("_M", bound=BaseModel)

@dataclass(frozen=True)
class ConfigIssue:
    file: str
    line: int | None
    field: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.reason}" if self.field else f"{where}: {self.reason}"


class ConfigError(Exception):
    def __init__(self, issues: Iterable[ConfigIssue]) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


def _node_at(node: yaml.Node | None, loc: tuple[Any, ...]) -> yaml.Node | None:
    """The deepest YAML node along a pydantic error location (for its line number)."""
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if k.value == str(part)), None)
            if nxt is None:
                return node
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return node
    return node


def _read_yaml(path: Path) -> tuple[Any, yaml.Node | None]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError([ConfigIssue(str(path), None, "", f"cannot read: {e.strerror}")]) from e
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else None
        reason = getattr(e, "problem", None) or str(e)
        raise ConfigError([ConfigIssue(str(path), line, "", f"invalid YAML: {reason}")]) from e
    return data, node


def _issues(path: Path, node: yaml.Node | None, err: ValidationError) -> list[ConfigIssue]:
    out = []
    for e in err.errors():
        # Drop pydantic's discriminator tags ("llamacpp") so the field path reads as in the file.
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p in ("llamacpp", "litellm")))
        target = _node_at(node, loc)
        line = target.start_mark.line + 1 if target is not None else None
        field = ".".join(str(p) for p in loc)
        reason = e["msg"].removeprefix("Value error, ")
        out.append(ConfigIssue(str(path), line, field, reason))
    return out


def validate_file(model: type[_M], path: Path) -> _M:
    """One YAML file as `model`, or ConfigError with file:line: field: reason for every problem."""
    data, node = _read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue(str(path), 1, "", "expected a mapping at the top level")])
    if duplicates := duplicate_keys(path, node):
        raise ConfigError(duplicates)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_issues(path, node, e)) from e


def line_of(path: Path, *keys: str | int) -> int | None:
    """The line of the YAML node at `keys` (e.g. "rules", 0, "route"), for an error that pydantic did not raise."""
    try:
        _, node = _read_yaml(path)
    except ConfigError:
        return None
    target = _node_at(node, keys)
    return target.start_mark.line + 1 if target is not None else None


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

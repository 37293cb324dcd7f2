"""Hosted models' context windows and prices, read from litellm's bundled JSON.

Read as a file instead of importing litellm: the import costs seconds, and `switchyard explain`
or `check` must stay instant. The JSON ships inside the litellm wheel, so no network is needed.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class ModelInfo:
    max_input_tokens: int | None
    max_output_tokens: int | None
    input_cost_per_token: float
    output_cost_per_token: float


@functools.cache
def _table() -> dict[str, Any]:
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / "model_prices_and_context_window_backup.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _candidates(model: str) -> list[str]:
    # "openai/responses/gpt-5-nano" -> itself, "responses/gpt-5-nano", "gpt-5-nano"
    parts = model.split("/")
    return ["/".join(parts[i:]) for i in range(len(parts))]


@functools.cache
def lookup(model: str) -> ModelInfo | None:
    table = _table()
    for key in _candidates(model):
        entry = table.get(key)
        if isinstance(entry, dict) and entry.get("mode", "chat") in ("chat", "responses"):
            return ModelInfo(
                max_input_tokens=entry.get("max_input_tokens") or entry.get("max_tokens"),
                max_output_tokens=entry.get("max_output_tokens"),
                input_cost_per_token=float(entry.get("input_cost_per_token") or 0.0),
                output_cost_per_token=float(entry.get("output_cost_per_token") or 0.0),
            )
    return None


def cost(model: str, tokens_in: int, tokens_out: int) -> float:
    info = lookup(model)
    if info is None:
        return 0.0
    return tokens_in * info.input_cost_per_token + tokens_out * info.output_cost_per_token

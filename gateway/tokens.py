"""How many tokens a request is, as cheaply as the decision allows.

Three levels, cheapest first:
- bounds from the body's byte length alone: a byte-level BPE never makes more tokens than bytes,
  and real tokenizers average well over `LOWER_BYTES_PER_TOKEN` bytes a token, so most requests are
  decided without tokenizing (a 350,000-character compaction request is clearly too big for a
  32k local model; a 2 KB title request clearly fits);
- an exact count from the backend that would serve it, only when the bounds straddle its ceiling
  (llama.cpp's own tokenizer and chat template for local; tiktoken for hosted models);
- a calibrated estimate when no exact count is possible, reported as such.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Bytes per token, calibrated on opencode/Open WebUI traffic (English + code + JSON schemas):
# typical 3.3-4.2; the estimate uses a value on the safe (high-token) side.
ESTIMATE_BYTES_PER_TOKEN = 3.2
# No realistic prompt averages more bytes per token than this (whitespace runs aside).
LOWER_BYTES_PER_TOKEN = 8.0
# Chat-template tokens per message, and the tool-calling preamble some templates add.
TEMPLATE_TOKENS_PER_MESSAGE = 8
TOOLS_PREAMBLE_TOKENS = 512

@dataclass(frozen=True, slots=True)
class TokenSize:
    """What the body's bytes say about its token count."""

    nbytes: int
    messages: int
    has_tools: bool

    @property
    def upper(self) -> int:
        return self.nbytes + TEMPLATE_TOKENS_PER_MESSAGE * self.messages + (
            TOOLS_PREAMBLE_TOKENS if self.has_tools else 0)

    @property
    def lower(self) -> int:
        return int(self.nbytes / LOWER_BYTES_PER_TOKEN)

    @property
    def estimate(self) -> int:
        return int(self.nbytes / ESTIMATE_BYTES_PER_TOKEN) + TEMPLATE_TOKENS_PER_MESSAGE * self.messages


def size_of(raw: bytes, body: dict[str, Any]) -> TokenSize:
    return TokenSize(len(raw), len(body.get("messages") or ()), bool(body.get("tools")))


def use_bundled_tiktoken() -> str | None:
    """tiktoken downloads its encodings on first use; the litellm wheel ships them (cache files
    named by the sha1 of their URL), so point tiktoken there — no network needed. Returns the
    cache dir in use (a caller's own TIKTOKEN_CACHE_DIR wins)."""
    if os.environ.get("TIKTOKEN_CACHE_DIR"):
        return os.environ["TIKTOKEN_CACHE_DIR"]
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations))) / "litellm_core_utils" / "tokenizers"
    if not d.is_dir():
        return None
    os.environ["TIKTOKEN_CACHE_DIR"] = str(d)
    return str(d)


@functools.cache
def _encoding(name: str) -> Any:
    use_bundled_tiktoken()
    import tiktoken  # imported lazily: loading an encoding costs ~100 ms

    return tiktoken.get_encoding(name)


def _prompt_text(body: dict[str, Any]) -> tuple[str, int]:
    parts: list[str] = []
    for m in body.get("messages") or ():
        content = m.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p.get("text", "") for p in content if isinstance(p, dict))
        for call in m.get("tool_calls") or ():
            parts.append(json.dumps(call))
    if body.get("tools"):
        parts.append(json.dumps(body["tools"]))
    return "\n".join(parts), len(body.get("messages") or ())


def count_tiktoken(body: dict[str, Any], encoding: str = "o200k_base") -> int:
    """Exact-enough count for OpenAI-family hosted models (o200k for gpt-4o/gpt-5)."""
    text, n = _prompt_text(body)
    return len(_encoding(encoding).encode(text, disallowed_special=())) + 4 * n + 3

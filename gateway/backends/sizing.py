"""A prompt's tokens as one llama.cpp server will count them, learned from its own answers.

The generic byte estimate (tokens.py) is a bound, made to be safe for fit, and far from what a given
model counts: SmolLM2's template drops tool schemas, a 31 KB opencode turn counts 2,218 tokens there,
while Qwen's renders them. A prediction of prefill time needs the server's own figure, so we learn two:

- bytes per token of message content, from the growth between two turns of one conversation (the
  bytes added vs the tokens added: template, system and tools cancel out), or from a whole tool-less
  prompt;
- the tokens the tool schemas add (zero where the template drops them), from tool-bearing prompts.

A request that continues a prompt a slot holds is sized as that prompt's known tokens plus its new bytes;
anything else as its message bytes plus the tools' tokens. Both figures persist with the speeds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .speed import Speeds

if TYPE_CHECKING:  # prefix.py builds a PromptSizer: import its types for annotations only
    from .prefix import Held, Prefix

ALPHA = 0.3
MIN_GROWTH_TOKENS = 16  # smaller growths are mostly template noise


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + ALPHA * (new - old)


def _message_bytes(prefix: Prefix) -> int:
    return prefix.sizes[-1] if prefix.sizes else 0


class PromptSizer:
    def __init__(self, speeds: Speeds) -> None:
        self.speeds = speeds

    def tokens(self, prefix: Prefix, base: Held | None) -> int | None:
        """Predicted prompt tokens, or None before the server has answered anything."""
        ratio = self.speeds.bytes_per_token
        if not ratio:
            return None
        if base is not None:
            return base.tokens + max(0, int((_message_bytes(prefix) - _message_bytes(base.prefix)) / ratio))
        tools = (self.speeds.tool_tokens or 0.0) if prefix.tool_bytes else 0.0
        return int(_message_bytes(prefix) / ratio + tools)

    def learn(self, prefix: Prefix, base: Held | None, tokens: int) -> None:
        s = self.speeds
        msg = _message_bytes(prefix)
        if base is not None and tokens - base.tokens >= MIN_GROWTH_TOKENS:
            s.bytes_per_token = _ewma(s.bytes_per_token, (msg - _message_bytes(base.prefix)) / (tokens - base.tokens))
        elif base is None and (not prefix.tool_bytes or s.bytes_per_token is None) and msg:
            # tool-less: all of it is messages (with tools and nothing learned yet: assume the template drops them)
            s.bytes_per_token = _ewma(s.bytes_per_token, msg / tokens)
        if base is None and prefix.tool_bytes and s.bytes_per_token:
            s.tool_tokens = _ewma(s.tool_tokens, max(0.0, tokens - msg / s.bytes_per_token))

"""The chat-completions view of a Messages or Responses body, by litellm's own translations.

The view is what classification and sizing read (system prompt, last user turn, tools, message
count) and what a local server's exact token count is asked about; the body sent upstream stays
the client's own. litellm's import takes seconds, so `ready()` does it once in a thread before the
first such request is parsed on the event loop.
"""

from __future__ import annotations

import asyncio
import importlib
from typing import Any

_loaded: dict[str, Any] = {}


def _load() -> None:
    if _loaded:
        return
    from ..backends.hosted import load_litellm  # sets litellm's offline cost map and quiet loggers

    load_litellm()
    adapters = importlib.import_module("litellm.llms.anthropic.messages.adapters.transformation")
    responses = importlib.import_module("litellm.responses.litellm_completion_transformation.transformation")
    _loaded["messages"] = adapters.LiteLLMAnthropicMessagesAdapter()
    _loaded["responses"] = responses.LiteLLMCompletionResponsesConfig


async def ready() -> None:
    if not _loaded:
        await asyncio.to_thread(_load)


def messages_to_chat(body: dict[str, Any]) -> dict[str, Any]:
    _load()
    out, _names = _loaded["messages"].translate_anthropic_to_openai(body)
    return dict(out)


def responses_to_chat(body: dict[str, Any]) -> dict[str, Any]:
    _load()
    params = {k: v for k, v in body.items() if k not in ("model", "input", "stream")}
    return dict(_loaded["responses"].transform_responses_api_request_to_chat_completion_request(
        model=body.get("model") or "auto", input=body["input"], responses_api_request=params))

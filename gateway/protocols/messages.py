"""Anthropic Messages (`POST /v1/messages`), what Claude Code speaks.

Streams end with `event: message_stop`; usage arrives in `message_start` (input, cache reads) and
`message_delta` (output); errors are `{"type":"error","error":{"type","message"}}`, and an
overflow must read "prompt is too long" — that is what makes Claude Code compact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ContextLengthExceeded, GatewayError, InvalidRequest
from . import litellm_views
from .base import Protocol, load_json_object, normalised, sse

if TYPE_CHECKING:
    from multidict import CIMultiDictProxy

    from ..receive import ChatRequest

# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors).
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
          503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    kind = _TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


class MessagesProtocol(Protocol):
    name = "messages"
    path = "/v1/messages"
    max_tokens_key = "max_tokens"
    asks_usage = False
    ends = (b'"type":"message_stop"', b'"type": "message_stop"')
    errors = (b'{"error"', b'{"type":"error"', b'{"type": "error"')
    delta_mark = b'"content_block_delta"'

    def parse(self, raw: bytes, headers: CIMultiDictProxy[str]) -> ChatRequest:
        from ..receive import ChatRequest, scalar_fields

        body = load_json_object(raw, "Anthropic Messages", InvalidRequest)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("messages: field required and must be a non-empty array", code="invalid_messages")
        for i, m in enumerate(messages):
            # Claude Code 2.1.328 also sends mid-conversation `system` messages (its reminders).
            if not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system"):
                role = m.get("role") if isinstance(m, dict) else None
                raise InvalidRequest(f"messages.{i}.role: must be 'user' or 'assistant', not {role!r}"[:200],
                                     code="invalid_messages")
            if not isinstance(m.get("content"), (str, list)):
                raise InvalidRequest(f"messages.{i}.content: must be a string or an array", code="invalid_messages")
        model, stream, max_tokens = scalar_fields(body, "max_tokens", body.get("max_tokens"), max_required=True)
        if body.get("system") is not None and not isinstance(body["system"], (str, list)):
            raise InvalidRequest("system: must be a string or an array of text blocks")
        if body.get("tools") is not None and not isinstance(body["tools"], list):
            raise InvalidRequest("tools: must be an array")
        try:
            view = litellm_views.messages_to_chat(body)
        except Exception as e:  # litellm's translation rejects what Anthropic would reject
            raise InvalidRequest(f"invalid Messages request: {type(e).__name__}: {str(e)[:200]}") from e
        return ChatRequest(raw, body, headers, model, stream, False, max_tokens, self.name, view)

    def error_body(self, e: GatewayError) -> dict[str, Any]:
        if isinstance(e, ContextLengthExceeded):
            return anthropic_error(400, f"prompt is too long: {e.message}")
        return anthropic_error(e.status, e.message)

    def upstream_error_body(self, status: int, message: str, type_: str, code: Any) -> dict[str, Any]:
        return anthropic_error(status, message)

    def stream_error(self, message: str) -> bytes:
        return sse("error", anthropic_error(500, message))

    def usage_of(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        usage = obj.get("usage")
        if not isinstance(usage, dict):
            return None
        acc: dict[str, Any] = {}
        _fold(usage, acc)
        return _normalise(acc)

    def fold_event_usage(self, event: dict[str, Any], acc: dict[str, Any]) -> None:
        message = event.get("message")
        usage = message.get("usage") if isinstance(message, dict) else event.get("usage")
        if isinstance(usage, dict):
            _fold(usage, acc)
            acc.update(_normalise(acc))


def _fold(usage: dict[str, Any], acc: dict[str, Any]) -> None:
    # message_delta repeats or updates counts: the latest value of each wins.
    for key in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens", "output_tokens"):
        if isinstance(usage.get(key), int):
            acc[key] = usage[key]


def _normalise(acc: dict[str, Any]) -> dict[str, Any]:
    # Anthropic's input_tokens excludes cached reads and cache writes: the prompt is all three.
    prompt = sum(int(acc.get(k) or 0) for k in ("input_tokens", "cache_read_input_tokens",
                                                 "cache_creation_input_tokens"))
    return normalised(prompt, int(acc.get("output_tokens") or 0))

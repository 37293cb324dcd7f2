"""OpenAI Responses (`POST /v1/responses`), the only wire Codex CLI speaks now.

Streams end with `response.completed` (or `response.failed` / `response.incomplete`), whose
`response.usage` carries the counts; errors keep OpenAI's `{"error": {...}}` shape, and a stream
that breaks ends with a `response.failed` event (what Codex reads to retry or report).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from ..errors import InvalidRequest
from . import litellm_views
from .base import Protocol, load_json_object, normalised, sse

if TYPE_CHECKING:
    from multidict import CIMultiDictProxy

    from ..receive import ChatRequest


class ResponsesProtocol(Protocol):
    name = "responses"
    path = "/v1/responses"
    max_tokens_key = "max_output_tokens"
    asks_usage = False
    ends = (b'"type":"response.completed"', b'"type":"response.failed"', b'"type":"response.incomplete"',
            b'"type": "response.completed"', b'"type": "response.failed"', b'"type": "response.incomplete"')
    errors = (b'{"error"', b'"type":"response.failed"', b'"type": "response.failed"')
    delta_mark = b'"response.output_text.delta"'

    def parse(self, raw: bytes, headers: CIMultiDictProxy[str]) -> ChatRequest:
        from ..receive import ChatRequest, scalar_fields

        body = load_json_object(raw, "Responses", InvalidRequest)
        items = body.get("input")
        if not isinstance(items, (str, list)) or not items:
            raise InvalidRequest("'input' is required: a string or a non-empty array of items", code="invalid_input")
        if isinstance(items, list) and not all(isinstance(i, dict) for i in items):
            raise InvalidRequest("every item of 'input' must be an object", code="invalid_input")
        model, stream, max_tokens = scalar_fields(body, "max_output_tokens", body.get("max_output_tokens"))
        if body.get("instructions") is not None and not isinstance(body["instructions"], str):
            raise InvalidRequest("'instructions' must be a string")
        if body.get("tools") is not None and not isinstance(body["tools"], list):
            raise InvalidRequest("'tools' must be an array")
        try:
            view = litellm_views.responses_to_chat(body)
        except Exception as e:  # litellm's translation rejects what the Responses API would reject
            raise InvalidRequest(f"invalid Responses request: {type(e).__name__}: {str(e)[:200]}") from e
        if not view.get("messages"):
            raise InvalidRequest("'input' holds no message", code="invalid_input")
        return ChatRequest(raw, body, headers, model, stream, False, max_tokens, self.name, view)

    def stream_error(self, message: str) -> bytes:
        failed = {"id": f"resp_{uuid.uuid4().hex}", "object": "response", "status": "failed", "output": [],
                  "error": {"code": "server_error", "message": message}}
        return sse("response.failed", {"type": "response.failed", "response": failed})

    def usage_of(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        usage = obj.get("usage")
        if not isinstance(usage, dict):
            return None
        return normalised(int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0))

    def fold_event_usage(self, event: dict[str, Any], acc: dict[str, Any]) -> None:
        response = event.get("response")
        if isinstance(response, dict):
            usage = self.usage_of(response)
            if usage:
                acc.update(usage)

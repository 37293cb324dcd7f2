"""What an inbound protocol is, as data and a few small functions: one request model inside.

Each protocol (OpenAI chat completions, Anthropic Messages, OpenAI Responses) says how its body
becomes the one internal request (`ChatRequest`, with a chat-completions *view* used to classify
and size it), where llama.cpp serves it natively, how its streams end, where its usage is, and
how its errors look. The pipeline (classify, decide, admit, dispatch, relay, record) never asks
which protocol it carries; it asks the protocol object.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multidict import CIMultiDictProxy

    from ..errors import GatewayError
    from ..receive import ChatRequest


class Protocol:
    name: str = "chat"
    path: str = "/v1/chat/completions"  # where llama-server serves it natively
    max_tokens_key: str = "max_tokens"  # the field a policy clamp writes
    asks_usage: bool = True  # dispatch adds stream_options.include_usage (chat only)
    # Byte markers the relay scans each chunk for (C-speed substring checks, as for chat):
    ends: tuple[bytes, ...] = (b"data: [DONE]",)  # the stream ended well
    errors: tuple[bytes, ...] = (b'{"error"',)  # an error event (escaped quotes inside JSON strings never match)
    usage_marks: tuple[bytes, ...] = (b'"usage":{', b'"usage": {')
    delta_mark: bytes = b'"delta"'  # one per content event: the completion count when usage is missing

    def parse(self, raw: bytes, headers: CIMultiDictProxy[str]) -> ChatRequest:
        raise NotImplementedError

    # ---- errors, in this protocol's own shape ----
    def error_body(self, e: GatewayError) -> dict[str, Any]:
        return e.payload()

    def upstream_error_body(self, status: int, message: str, type_: str, code: Any) -> dict[str, Any]:
        """An upstream's OpenAI-shaped client error, re-dressed for this protocol."""
        return {"error": {"message": message, "type": type_, "code": code}}

    def stream_error(self, message: str) -> bytes:
        """What ends a stream that broke: an error event and whatever the protocol closes with."""
        raise NotImplementedError

    # ---- usage, normalised to prompt_tokens / completion_tokens / total_tokens ----
    def usage_of(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        raise NotImplementedError

    def stream_usage(self, chunk: bytes, acc: dict[str, Any]) -> None:
        """Fold the usage of the events in `chunk` (one that holds a usage mark) into `acc`."""
        for line in chunk.split(b"\n"):
            if not line.startswith(b"data:") or not any(m in line for m in self.usage_marks):
                continue
            try:
                event = json.loads(line[5:])
            except ValueError:
                continue
            if isinstance(event, dict):
                self.fold_event_usage(event, acc)

    def fold_event_usage(self, event: dict[str, Any], acc: dict[str, Any]) -> None:
        raise NotImplementedError


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: ".encode() + json.dumps(data).encode() + b"\n\n"


def normalised(prompt: int, completion: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def load_json_object(raw: bytes, what: str, invalid: type[Exception]) -> dict[str, Any]:
    if not raw:
        raise invalid(f"request body is empty; expected a JSON {what} request")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise invalid(f"request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise invalid("request body must be a JSON object")
    return body

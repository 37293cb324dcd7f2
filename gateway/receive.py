"""Step 1: receive. Read the body within its limit and check it is a chat request.

Only shape is checked here (what every backend would reject anyway); the upstream stays the
judge of everything model-specific, and its 4xx is passed through untouched.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDictProxy

from .errors import InvalidRequest, PayloadTooLarge


@dataclass(slots=True)
class ChatRequest:
    raw: bytes
    body: dict[str, Any]
    headers: CIMultiDictProxy[str]
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int | None
    # The inbound protocol (gateway/protocols) and, for Messages/Responses, the chat-completions
    # view of the body that classification and sizing read; the body itself goes upstream as is.
    protocol: str = "chat"
    view: dict[str, Any] | None = None

    @property
    def chat(self) -> dict[str, Any]:
        return self.body if self.view is None else self.view


async def receive(request: web.Request, body_limit: int,
                  parse: Callable[[bytes, CIMultiDictProxy[str]], ChatRequest] | None = None) -> ChatRequest:
    length = request.content_length
    if length is not None and length > body_limit:
        raise PayloadTooLarge(f"request body is {length} bytes; the limit is {body_limit} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as e:
        raise PayloadTooLarge(f"request body exceeds the limit of {body_limit} bytes") from e
    if len(raw) > body_limit:
        raise PayloadTooLarge(f"request body is {len(raw)} bytes; the limit is {body_limit} bytes")
    return (parse or parse_chat)(raw, request.headers)


def parse_chat(raw: bytes, headers: CIMultiDictProxy[str]) -> ChatRequest:
    if not raw:
        raise InvalidRequest("request body is empty; expected a JSON chat completion request")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' is required and must be a non-empty array", code="invalid_messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequest(f"messages[{i}] must be an object with a string 'role'", code="invalid_messages")
    model = body.get("model", "auto")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' must be a non-empty string", code="invalid_model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                   or max_tokens < 1):
        raise InvalidRequest("'max_tokens' must be a positive integer")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise InvalidRequest("'tools' must be an array")
    so = body.get("stream_options")
    include_usage = bool(stream and isinstance(so, dict) and so.get("include_usage"))
    return ChatRequest(raw, body, headers, model, stream, include_usage, max_tokens)

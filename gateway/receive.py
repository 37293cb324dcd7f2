"""Step 1: receive. Read the body within its limit and time, and check it is a chat request.

Shape is checked here (gateway/schema.py: what every backend would reject anyway, or worse, answer
with a 500 that counts against it); the upstream stays the judge of everything model-specific,
and its 4xx is passed through untouched. A request that fails here never reaches a backend, so its
fault can never move a breaker.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDictProxy

from .errors import InvalidRequest, PayloadTooLarge, RequestTimeout
from .schema import check_control_fields, check_headers, check_tree, validate_body

# Headers that are forwarded upstream or recorded (session ids); the signature pack adds its own.
DECODED = frozenset({"identity", "", "gzip", "x-gzip", "deflate", "br", "zstd"})  # br/zstd: aiohttp says if it can
CLOSE = {"Connection": "close"}  # after a body we could not read to its end, the connection is done
CHECKED_HEADERS = ("x-session-id", "x-openwebui-chat-id", "x-session-affinity", "x-parent-session-id")


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


async def receive(request: web.Request, body_limit: int, *, body_timeout: float | None = None,
                  header_names: Iterable[str] = CHECKED_HEADERS,
                  parse: Callable[[bytes, CIMultiDictProxy[str]], ChatRequest] | None = None) -> ChatRequest:
    length = request.content_length
    if length is not None and length > body_limit:
        raise PayloadTooLarge(f"request body is {length} bytes; the limit is {body_limit} bytes")
    check_headers(request.headers, header_names)
    coding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if coding not in DECODED:  # aiohttp would pass an unknown coding on as if it were plain JSON
        raise InvalidRequest(f"Content-Encoding {coding[:40]!r} is not supported (use gzip, deflate or none)",
                             code="unsupported_content_encoding", status=415)
    try:
        async with asyncio.timeout(body_timeout):
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge as e:
        raise PayloadTooLarge(f"request body exceeds the limit of {body_limit} bytes") from e
    except TimeoutError as e:
        # A slow or short body (Content-Length larger than what is sent, an unterminated chunked body)
        # must not hold a connection and a task forever.
        raise RequestTimeout(f"request body not received within {body_timeout:g} s", headers=CLOSE) from e
    except (HttpProcessingError, RequestPayloadError, ValueError, OSError) as e:
        # aiohttp's payload errors (bad chunk, a gzip body that does not decompress) arrive on read.
        if isinstance(e, ConnectionResetError):
            raise
        raise InvalidRequest(f"request body could not be read: {_describe(e)}", code="invalid_body",
                             headers=CLOSE) from e
    if len(raw) > body_limit:
        raise PayloadTooLarge(f"request body is {len(raw)} bytes; the limit is {body_limit} bytes")
    return (parse or parse_chat)(raw, request.headers)


def scalar_fields(body: dict[str, Any], max_name: str, max_tokens: Any,
                  max_required: bool = False) -> tuple[str, bool, int | None]:
    """`model`, `stream` and the answer's token cap, checked alike in every inbound protocol."""
    model = body.get("model", "auto")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' must be a non-empty string", code="invalid_model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean")
    if (max_tokens is None and max_required) or (max_tokens is not None and (
            not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1)):
        raise InvalidRequest(f"'{max_name}' must be a positive integer"
                             + (" (it is required)" if max_required else ""))
    return model, stream, max_tokens


def _describe(e: BaseException) -> str:
    text = getattr(e, "message", None) or str(e) or type(e).__name__
    return str(text).splitlines()[0][:200]


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")  # json.loads takes NaN/Infinity; no upstream does


def parse_chat(raw: bytes, headers: CIMultiDictProxy[str]) -> ChatRequest:
    if not raw:
        raise InvalidRequest("request body is empty; expected a JSON chat completion request")
    try:
        text = raw.decode("utf-8")  # strictly: json.loads(bytes) would also take UTF-16 and raw surrogates
        body = json.loads(text, parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"request body is not valid UTF-8 at byte {e.start}") from e
    except ValueError as e:
        raise InvalidRequest(f"request body is not valid JSON: {e}") from e
    except RecursionError as e:
        raise InvalidRequest("request body is not valid JSON: nested too deeply") from e
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' is required and must be a non-empty array", code="invalid_messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequest(f"messages[{i}] must be an object with a string 'role'", code="invalid_messages")
    model, stream, max_tokens = scalar_fields(body, "max_tokens", body.get("max_completion_tokens",
                                                                         body.get("max_tokens")))
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise InvalidRequest("'tools' must be an array")
    check_tree(body, text)
    check_control_fields(body)
    validate_body(body)
    so = body.get("stream_options")
    include_usage = bool(stream and isinstance(so, dict) and so.get("include_usage"))
    return ChatRequest(raw, body, headers, model, stream, include_usage, max_tokens)

"""The shape of a chat completion request, checked on receive so a client's mistake is ours to answer.

Every field the gateway or a backend reads is typed here; anything a backend would choke on (a
`text` part without text, `response_format: 1`, a lone surrogate) is a 400 naming the field
(`messages[0].content[0].text: field required`) instead of an upstream 500 that would count against
the backend and open its breaker. Unknown fields pass untouched (`extra="allow"`): OpenAI adds
fields constantly, and the client's raw bytes are what goes upstream, never a re-encoding.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from .errors import InvalidRequest

MAX_DEPTH = 64  # JSON nesting; real tool schemas stay far below, and deeper input breaks recursive code upstream

Str = Annotated[str, Field(strict=True)]
Int = Annotated[int, Field(strict=True)]
Number = Annotated[float, Field(strict=True)]  # strict float: ints pass, booleans and strings do not
Bool = Annotated[bool, Field(strict=True)]


class Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---- content parts --------------------------------------------------------------------------------
# Tags carry a "~" so that error locations can drop them: `messages[0].content[0].text`, not
# `messages.0.content.~array.0.~text.text`.

class TextPart(Lenient):
    type: Literal["text"]
    text: Str


class ImageURL(Lenient):
    url: Str
    detail: Str | None = None


class ImagePart(Lenient):
    type: Literal["image_url"]
    image_url: ImageURL

    @model_validator(mode="before")
    @classmethod
    def _bare_url(cls, v: Any) -> Any:
        # Some clients send `"image_url": "https://..."`; llama.cpp and litellm accept both.
        if isinstance(v, dict) and isinstance(v.get("image_url"), str):
            return {**v, "image_url": {"url": v["image_url"]}}
        return v


class InputAudio(Lenient):
    data: Str
    format: Str


class AudioPart(Lenient):
    type: Literal["input_audio"]
    input_audio: InputAudio


class FilePart(Lenient):
    type: Literal["file"]
    file: dict[str, Any]


class RefusalPart(Lenient):
    type: Literal["refusal"]
    refusal: Str


PART_TYPES = ("text", "image_url", "input_audio", "file", "refusal")


def _part_tag(v: Any) -> str | None:
    if isinstance(v, dict) and v.get("type") in PART_TYPES:
        return "~" + v["type"]
    return None


Part = Annotated[
    Annotated[TextPart, Tag("~text")] | Annotated[ImagePart, Tag("~image_url")]
    | Annotated[AudioPart, Tag("~input_audio")] | Annotated[FilePart, Tag("~file")]
    | Annotated[RefusalPart, Tag("~refusal")],
    Discriminator(_part_tag, custom_error_type="part_type", custom_error_message="unknown content part type"),
]


def _content_tag(v: Any) -> str | None:
    if v is None:
        return "~null"
    if isinstance(v, str):
        return "~string"
    if isinstance(v, list):
        return "~array"
    return None


Content = Annotated[
    Annotated[None, Tag("~null")] | Annotated[Str, Tag("~string")] | Annotated[list[Part], Tag("~array")],
    Discriminator(_content_tag, custom_error_type="content_type",
                  custom_error_message="must be a string, null or an array of content parts"),
]


# ---- messages, tools ----------------------------------------------------------------------------

class FunctionCall(Lenient):
    name: Str
    arguments: Str  # a JSON-encoded string, as OpenAI defines it


class ToolCall(Lenient):
    id: Str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Lenient):
    role: Annotated[str, Field(strict=True, min_length=1)]
    content: Content = None
    name: Str | None = None
    tool_call_id: Str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _required(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        # llama.cpp answers 500 ("Expected 'content'") for a message without content: ours to refuse.
        calls = v.get("role") == "assistant" and (v.get("tool_calls") or v.get("function_call"))
        if "content" not in v and not calls:
            raise ValueError("content: field required")
        if v.get("role") == "tool" and "tool_call_id" not in v:
            raise ValueError("tool_call_id: field required for a message with role 'tool'")
        return v


class FunctionDef(Lenient):
    name: Annotated[str, Field(strict=True, min_length=1)]
    description: Str | None = None
    parameters: dict[str, Any] | None = None
    strict: Bool | None = None


class Tool(Lenient):
    type: Literal["function"]
    function: FunctionDef


class ResponseFormat(Lenient):
    type: Str


class StreamOptions(Lenient):
    include_usage: Bool | None = None


class ChatBody(Lenient):
    """The fields anything on the path reads; every other field passes through unchecked."""

    model: Str | None = None
    messages: Annotated[list[Message], Field(min_length=1)]
    stream: Bool | None = None
    stream_options: StreamOptions | None = None
    tools: list[Tool] | None = None
    tool_choice: Str | dict[str, Any] | None = None
    parallel_tool_calls: Bool | None = None
    response_format: ResponseFormat | None = None
    max_tokens: Int | None = None
    max_completion_tokens: Int | None = None
    n: Int | None = None
    seed: Int | None = None
    top_logprobs: Int | None = None
    logprobs: Bool | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None
    stop: Str | list[Str] | None = None
    user: Str | None = None
    metadata: dict[str, Any] | None = None
    # llama.cpp's own sampling fields: a wrong type there is a 500 upstream, not a 400
    top_k: Int | None = None
    min_p: Number | None = None
    repeat_penalty: Number | None = None


# ---- litellm's own parameters --------------------------------------------------------------------
# The hosted backend calls `litellm.acompletion(**body)`, and litellm reads many keyword arguments that
# are not OpenAI fields: `base_url` in a client's body sent *our* hosted key to the client's server,
# `mock_response` answered without calling the provider, `input_cost_per_token` rewrote the spend.
# No OpenAI client sends these (the SDKs' `timeout`/`extra_headers` are client-side options), so a
# body that carries one is refused; every other unknown field still passes.
LITELLM_CONTROL = frozenset({
    "base_url", "api_base", "api_key", "api_version", "api_type", "organization", "custom_llm_provider",
    "deployment_id", "model_list", "extra_headers", "headers", "extra_body", "provider_specific_header",
    "timeout", "stream_timeout", "force_timeout", "max_retries", "num_retries", "fallbacks",
    "context_window_fallback_dict", "cooldown_time", "cost_per_second", "base_model", "model_info", "hf_model_name",
    "logger_fn", "client", "shared_session", "cache", "caching", "preset_cache_key", "proxy_server_request",
    "ssl_verify", "drop_params", "additional_drop_params", "allowed_openai_params", "use_litellm_proxy",
    "secret_fields", "chatgpt_auth_file", "use_xai_oauth", "azure", "client_id", "client_secret", "tenant_id",
    "tpm", "rpm", "acompletion", "aembedding", "atext_completion", "text_completion", "model_file_id_mapping",
    "initial_prompt_value", "final_prompt_value", "roles", "bos_token", "eos_token", "prompt_id",
    "prompt_variables", "prompt_version", "prompt_label", "enable_json_schema_validation", "verbose",
    "callbacks", "success_callback", "failure_callback", "input_callback", "service_callback",
})
LITELLM_PREFIXES = ("litellm_", "mock_", "input_cost_", "output_cost_", "aws_", "vertex_", "azure_", "watsonx_",
                    "gigachat_")


def check_control_fields(body: Mapping[str, Any]) -> None:
    for name in body:
        if name in LITELLM_CONTROL or name.startswith(LITELLM_PREFIXES):
            raise InvalidRequest(f"{name}: not a chat completion parameter (a gateway-internal setting; refused)",
                                 code="invalid_parameter")


# ---- checks -------------------------------------------------------------------------------------

_UNION_LABELS = frozenset({"str", "int", "float", "bool", "list[str]", "dict[str,any]"})


def path_of(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith("~") or part in _UNION_LABELS:
            continue  # a union arm's label, not a field
        else:
            out += f".{part}" if out else str(part)
    return out


_TYPE_WORDS = {
    "dict_type": "an object", "model_type": "an object", "model_attributes_type": "an object",
    "string_type": "a string", "float_type": "a number", "int_type": "an integer", "bool_type": "a boolean",
    "list_type": "an array",
}


def _reason(err: Mapping[str, Any]) -> str:
    kind = err["type"]
    if kind == "missing":
        return "field required"
    if kind == "part_type":
        got = err["input"].get("type") if isinstance(err["input"], dict) else None
        what = f"unknown content part type {got!r}" if got is not None else "a content part needs a 'type'"
        return f"{what} (expected one of: {', '.join(PART_TYPES)})"
    if kind in _TYPE_WORDS:
        return f"must be {_TYPE_WORDS[kind]}"
    if kind == "literal_error":
        return f"must be {err['ctx']['expected']}"
    msg: str = err["msg"].removeprefix("Value error, ")
    return msg[:1].lower() + msg[1:]


def validate_body(body: dict[str, Any]) -> None:
    """Raise InvalidRequest naming the first field at fault (pydantic reports them all; one is enough)."""
    try:
        ChatBody.model_validate(body)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        # A union of str | list[str] reports each arm; the first error is as good as any.
        err = errors[0]
        where = path_of(err["loc"])
        reason = _reason(err)
        if ":" in reason and err["type"] == "value_error":  # "content: field required" from a model check
            field, _, reason = reason.partition(": ")
            where = f"{where}.{field}" if where else field
        raise InvalidRequest(f"{where}: {reason}" if where else reason, code="invalid_request") from None


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def check_tree(body: Any, text: str) -> None:
    """Nesting depth everywhere, and text that is valid Unicode (no lone surrogates), with the path.

    `json.loads` accepts "\\ud800", which no UTF-8 encoder (SQLite, litellm, httpx) can write; a
    surrogate can only arrive as an escape, so the walk checks strings only when the text has one.
    """
    strings = bool(_SURROGATE_ESCAPE.search(text))
    stack: list[tuple[Any, tuple[Any, ...]]] = [(body, ())]
    while stack:
        node, path = stack.pop()
        if len(path) > MAX_DEPTH:
            where = path_of(path[:3]) + "..." if path else "body"
            raise InvalidRequest(f"{where}: JSON nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            for k, v in node.items():
                if strings and not _utf8(k):
                    raise InvalidRequest(f"{path_of(path) or 'body'}: a key is not valid Unicode (lone surrogate)")
                if isinstance(v, dict | list):
                    stack.append((v, (*path, k)))
                elif strings and isinstance(v, str) and not _utf8(v):
                    raise InvalidRequest(f"{path_of((*path, k))}: text is not valid Unicode (lone surrogate)")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                if isinstance(v, dict | list):
                    stack.append((v, (*path, i)))
                elif strings and isinstance(v, str) and not _utf8(v):
                    raise InvalidRequest(f"{path_of((*path, i))}: text is not valid Unicode (lone surrogate)")


def _utf8(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable_ascii(value: str) -> bool:
    return all(" " <= c <= "~" for c in value)


def check_headers(headers: Mapping[str, str], names: Iterable[str]) -> None:
    """Headers we forward upstream or record must be printable ASCII (litellm, SQLite, HTTP/1 rules)."""
    for name in names:
        for value in headers.getall(name, ()) if hasattr(headers, "getall") else [headers.get(name)]:
            if value is not None and not printable_ascii(value):
                raise InvalidRequest(f"header {name}: value must be printable ASCII", code="invalid_header")

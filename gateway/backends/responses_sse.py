"""OpenAI Responses API answers as chat completions: each SSE event mapped directly, no objects.

litellm's bridge builds a pydantic `ModelResponseStream` (and runs its stream wrapper) per event;
here one event costs one `json.loads` and one small `json.dumps`. Only what a chat client can see
is mapped: text, reasoning summaries, refusals, function calls, the finish reason and usage.
Everything else (`response.in_progress`, `*.done` echoes, content-part bookkeeping) is dropped.
The mapping follows litellm's own (`OpenAiResponsesToChatCompletionStreamIterator`);
tests/test_hosted_relay.py checks the two agree on the same events.
"""

from __future__ import annotations

import json
import re
from typing import Any

_DONE = b"data: [DONE]\n\n"
_INCOMPLETE = {"max_output_tokens": "length", "content_filter": "content_filter"}
# delta events whose `delta` is text for one chat delta field
_TEXT_DELTAS = {
    "response.output_text.delta": "content",
    "response.reasoning_summary_text.delta": "reasoning_content",
    "response.reasoning_text.delta": "reasoning_content",
    "response.refusal.delta": "refusal",
}


def _call_id(item: dict[str, Any]) -> Any:
    """litellm's rule (`tool_call_id_from_responses_item`): `call_id` is the correlation key, unless it
    is a per-response index such as `call_0` (Bedrock Mantle), which would collide across turns."""
    call_id = item.get("call_id")
    if call_id and re.fullmatch(r"call_\d+", str(call_id)) is None:
        return call_id
    return item.get("id") or call_id or ""


def chat_usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Responses `usage` (input/output tokens) in chat-completions shape."""
    if not isinstance(usage, dict):
        return None
    prompt = int(usage.get("input_tokens") or 0)
    completion = int(usage.get("output_tokens") or 0)
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": int(usage.get("total_tokens") or prompt + completion)}
    cached = (usage.get("input_tokens_details") or {}).get("cached_tokens")
    if cached is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    reasoning = (usage.get("output_tokens_details") or {}).get("reasoning_tokens")
    if reasoning is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return out


def _finish(response: dict[str, Any], tools_called: bool) -> str:
    if response.get("status") == "incomplete":
        reason = (response.get("incomplete_details") or {}).get("reason")
        return _INCOMPLETE.get(reason, "length")
    return "tool_calls" if tools_called else "stop"


def _error_event(message: str, code: Any = None, type_: str = "server_error") -> bytes:
    err = {"error": {"message": message, "type": type_, "code": code}}
    return b"data: " + json.dumps(err).encode() + b"\n\n"


class ResponsesToChat:
    """Feed raw upstream bytes; get chat-completions SSE bytes (possibly empty) back.

    `usage` (chat shape) is set once the response completed; `finished` once `[DONE]` or an
    error event was produced, after which further input is ignored.
    """

    __slots__ = ("_buf", "_head", "_tail", "_tools", "finished", "include_usage", "model", "usage")

    def __init__(self, model: str, include_usage: bool) -> None:
        self.model = model
        self.include_usage = include_usage
        self.usage: dict[str, Any] | None = None
        self.finished = False
        self._buf = b""
        self._tools: dict[int, list[Any]] = {}  # output_index -> [tool index, arguments sent?]
        self._set_ids("chatcmpl-responses", 0, model)

    def _set_ids(self, rid: str, created: int, model: str) -> None:
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
        # Every chunk is head + choices; the two byte halves are built once per stream.
        self._head = b"data: " + json.dumps(head).encode()[:-1] + b', "choices": [{"index": 0, "delta": '
        self._tail = b', "finish_reason": null}]}\n\n'

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return self._head + json.dumps(delta).encode() + self._tail

    def feed(self, data: bytes) -> bytes:
        if self.finished:
            return b""
        buf = self._buf + data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        out: list[bytes] = []
        start = 0
        while not self.finished:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            out.append(self._event(buf[start:end]))
            start = end + 2
        self._buf = buf[start:] if not self.finished else b""
        return b"".join(out)

    def _event(self, block: bytes) -> bytes:
        payload = b""
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                payload += line[5:].strip()
        if not payload or payload == b"[DONE]":
            return b""
        try:
            ev = json.loads(payload)
        except ValueError:
            return b""
        kind = ev.get("type")
        field = _TEXT_DELTAS.get(kind)
        if field is not None:
            return self._delta({field: ev.get("delta") or ""})
        if kind == "response.function_call_arguments.delta":
            tool = self._tools.get(ev.get("output_index", -1))
            if tool is None:
                return b""
            tool[1] = True
            return self._delta({"tool_calls": [{"index": tool[0], "function": {"arguments": ev.get("delta") or ""}}]})
        if kind in ("response.output_item.added", "response.output_item.done"):
            return self._item(ev, kind.endswith("added"))
        if kind == "response.created":
            r = ev.get("response") or {}
            self._set_ids(str(r.get("id") or "chatcmpl-responses"), int(r.get("created_at") or 0),
                          str(r.get("model") or self.model))
            return self._delta({"role": "assistant", "content": ""})
        if kind in ("response.completed", "response.incomplete"):
            return self._end(ev.get("response") or {})
        if kind == "response.failed":
            err = (ev.get("response") or {}).get("error") or {}
            self.finished = True
            return _error_event(str(err.get("message") or "the provider failed the response"), err.get("code"))
        if kind == "error":
            self.finished = True
            err = ev.get("error") if isinstance(ev.get("error"), dict) else ev
            return _error_event(str(err.get("message") or "provider error event"), err.get("code"),
                                str(err.get("type") or "server_error"))
        return b""

    def _item(self, ev: dict[str, Any], added: bool) -> bytes:
        item = ev.get("item") or {}
        if item.get("type") != "function_call":
            return b""
        at = ev.get("output_index", len(self._tools))
        if added:
            self._tools[at] = tool = [len(self._tools), False]
            call = {"index": tool[0], "id": _call_id(item), "type": "function",
                    "function": {"name": item.get("name") or "", "arguments": item.get("arguments") or ""}}
            tool[1] = bool(item.get("arguments"))
            return self._delta({"tool_calls": [call]})
        tool = self._tools.get(at)
        if tool is None or tool[1] or not item.get("arguments"):
            return b""
        tool[1] = True  # a provider that sent no argument deltas: the whole arguments at once
        return self._delta({"tool_calls": [{"index": tool[0], "function": {"arguments": item["arguments"]}}]})

    def _end(self, response: dict[str, Any]) -> bytes:
        self.finished = True
        self.usage = chat_usage(response.get("usage"))
        finish = _finish(response, bool(self._tools))
        out = self._head + b"{}" + b', "finish_reason": "' + finish.encode() + b'"}]}\n\n'
        if self.include_usage and self.usage is not None:
            # The chat-completions usage chunk: no choices, the usage object (what opencode compacts from).
            out += self._head.split(b', "choices"')[0] + b', "choices": [], "usage": ' + json.dumps(
                self.usage).encode() + b"}\n\n"
        return out + _DONE


def response_to_completion(obj: dict[str, Any], model: str) -> dict[str, Any]:
    """A non-streamed Responses answer as a `chat.completion` (one choice)."""
    text: list[str] = []
    reasoning: list[str] = []
    refusal: list[str] = []
    calls: list[dict[str, Any]] = []
    for item in obj.get("output") or []:
        kind = item.get("type")
        if kind == "message":
            for part in item.get("content") or []:
                if part.get("type") == "output_text":
                    text.append(part.get("text") or "")
                elif part.get("type") == "refusal":
                    refusal.append(part.get("refusal") or "")
        elif kind == "reasoning":
            reasoning += [s.get("text") or "" for s in item.get("summary") or []]
        elif kind == "function_call":
            calls.append({"id": _call_id(item), "type": "function",
                          "function": {"name": item.get("name") or "", "arguments": item.get("arguments") or ""}})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text or not calls else None}
    if reasoning:
        message["reasoning_content"] = "\n".join(reasoning)
    if refusal:
        message["refusal"] = "".join(refusal)
    if calls:
        message["tool_calls"] = calls
    out: dict[str, Any] = {
        "id": obj.get("id") or "chatcmpl-responses", "object": "chat.completion",
        "created": int(obj.get("created_at") or 0), "model": obj.get("model") or model,
        "choices": [{"index": 0, "message": message, "finish_reason": _finish(obj, bool(calls))}],
    }
    usage = chat_usage(obj.get("usage"))
    if usage is not None:
        out["usage"] = usage
    return out

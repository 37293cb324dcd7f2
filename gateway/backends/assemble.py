"""An OpenAI chat-completions stream, assembled into the one `chat.completion` object it stands for.

Used where we must read a stream although the client asked for one JSON answer: llama.cpp cannot
cancel a non-streamed generation when its client leaves (its HTTP layer blocks until the answer is
done, llama.cpp #9273), so llamacpp.py asks for a stream and assembles it here — then closing the
connection frees the slot at once, for a client that left and for a pre-empted background task.
"""

from __future__ import annotations

import json
from typing import Any


def sse_objects(raw: bytes) -> list[dict[str, Any]]:
    """The JSON `data:` events of an SSE body, without `[DONE]` and keep-alive comments."""
    out = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data:"):
            payload = line[5:].strip()
            if payload and payload != b"[DONE]":
                obj = json.loads(payload)
                if isinstance(obj, dict):
                    out.append(obj)
    return out


def assemble(events: list[dict[str, Any]]) -> dict[str, Any]:
    head = events[0] if events else {}
    choices: dict[int, dict[str, Any]] = {}
    out: dict[str, Any] = {"id": head.get("id"), "object": "chat.completion", "created": head.get("created"),
                           "model": head.get("model")}
    for event in events:
        for key in ("system_fingerprint", "usage", "timings"):
            if event.get(key) is not None:
                out[key] = event[key]
        for c in event.get("choices") or ():
            choice = choices.setdefault(int(c.get("index", 0)), {"message": {"role": "assistant"},
                                                                 "finish_reason": None, "text": {}, "tools": {}})
            delta = c.get("delta") or {}
            for field in ("content", "reasoning_content"):
                if isinstance(delta.get(field), str):
                    choice["text"][field] = choice["text"].get(field, "") + delta[field]
            for call in delta.get("tool_calls") or ():
                slot = choice["tools"].setdefault(int(call.get("index", 0)), {
                    "id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                if call.get("id"):
                    slot["id"] = call["id"]
                fn = call.get("function") or {}
                slot["function"]["name"] += fn.get("name") or ""
                slot["function"]["arguments"] += fn.get("arguments") or ""
            if c.get("finish_reason") is not None:
                choice["finish_reason"] = c["finish_reason"]
    out["choices"] = []
    for index in sorted(choices):
        c = choices[index]
        message = c["message"]
        message["content"] = c["text"].get("content") or None
        if "reasoning_content" in c["text"]:
            message["reasoning_content"] = c["text"]["reasoning_content"]
        if c["tools"]:
            message["tool_calls"] = [c["tools"][i] for i in sorted(c["tools"])]
        out["choices"].append({"index": index, "message": message, "finish_reason": c["finish_reason"]})
    return {k: v for k, v in out.items() if v is not None or k in ("id", "model")}

"""An OpenAI chat-completions stream, assembled into the one `chat.completion` object it stands for.

Used where we must read a stream although the client asked for one JSON answer: llama.cpp cannot
cancel a non-streamed generation when its client leaves (its HTTP layer blocks until the answer is
done, llama.cpp #9273), so llamacpp.py asks for a stream and assembles it here — then closing the
connection frees the slot at once, for a client that left and for a pre-empted background task.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

_DATA = re.compile(rb"^data:[ \t]*(\{.*)$", re.M)  # a `data:` line holding an object (not `[DONE]`)


def sse_objects(raw: bytes) -> list[dict[str, Any]]:
    """The JSON `data:` events of an SSE body, without `[DONE]` and keep-alive comments.

    One parse (orjson) over all events joined as an array: a few hundred calls cost twice as much as
    the parse itself. A line that is not one object on its own (the count differs) is parsed alone,
    so it fails as it would have."""
    parts = _DATA.findall(raw)
    if not parts:
        return []
    try:
        out = orjson.loads(b"[" + b",".join(parts) + b"]")
        if len(out) == len(parts) and all(type(o) is dict for o in out):
            return out
    except ValueError:
        pass
    return [o for o in (json.loads(p) for p in parts) if isinstance(o, dict)]


def assemble(events: list[dict[str, Any]]) -> dict[str, Any]:
    head = events[0] if events else {}
    choices: dict[int, dict[str, Any]] = {}
    out: dict[str, Any] = {"id": head.get("id"), "object": "chat.completion", "created": head.get("created"),
                           "model": head.get("model")}
    for event in events:
        for key in ("system_fingerprint", "usage", "timings"):
            if key in event and event[key] is not None:
                out[key] = event[key]
        for c in event.get("choices") or ():
            index = int(c.get("index", 0))
            choice = choices.get(index)
            if choice is None:  # text pieces are joined once at the end (`+=` on dict values is quadratic)
                choice = choices[index] = {"finish_reason": None, "content": [], "reasoning_content": None,
                                           "tools": {}}
            delta = c.get("delta") or {}
            text = delta.get("content")
            if isinstance(text, str):
                choice["content"].append(text)
            thought = delta.get("reasoning_content")
            if isinstance(thought, str):
                if choice["reasoning_content"] is None:
                    choice["reasoning_content"] = []
                choice["reasoning_content"].append(thought)
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
        message: dict[str, Any] = {"role": "assistant", "content": "".join(c["content"]) or None}
        if c["reasoning_content"] is not None:
            message["reasoning_content"] = "".join(c["reasoning_content"])
        if c["tools"]:
            message["tool_calls"] = [c["tools"][i] for i in sorted(c["tools"])]
        out["choices"].append({"index": index, "message": message, "finish_reason": c["finish_reason"]})
    return {k: v for k, v in out.items() if v is not None or k in ("id", "model")}

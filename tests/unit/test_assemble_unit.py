"""A chat-completions stream assembled into one chat.completion (llama.cpp non-streamed answers)."""

from __future__ import annotations

import json

from gateway.backends.assemble import assemble, sse_objects


def sse(*events: object) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b": keep-alive\n\ndata: [DONE]\n\n"


def test_text_usage_and_timings_are_kept() -> None:
    raw = sse({"id": "c1", "created": 1, "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                                        "content": "Hel"}}]},
              {"id": "c1", "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}],
               "timings": {"cache_n": 3}},
              {"id": "c1", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}})
    out = assemble(sse_objects(raw))
    assert out["object"] == "chat.completion" and out["model"] == "m"
    assert out["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello"},
                               "finish_reason": "stop"}]
    assert out["usage"]["completion_tokens"] == 2 and out["timings"] == {"cache_n": 3}


def test_tool_calls_and_reasoning_are_merged_by_index() -> None:
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "read", "arguments": "{\"p"}}
    raw = sse({"choices": [{"index": 0, "delta": {"reasoning_content": "think"}}]},
              {"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]},
              {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "\":1}"}}]},
                            "finish_reason": "tool_calls"}]})
    message = assemble(sse_objects(raw))["choices"][0]["message"]
    assert message["content"] is None and message["reasoning_content"] == "think"
    assert message["tool_calls"] == [{"id": "call_1", "type": "function",
                                      "function": {"name": "read", "arguments": "{\"p\":1}"}}]

"""Classification is data-driven: explicit signals first, then prompt signatures, else `main`."""

from __future__ import annotations

from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.classify import Classifier
from gateway.config import Policy
from gateway.receive import parse_chat

POLICY = Policy(team="default", rules=[{"route": ["local"]}])
C = Classifier()


def classify(messages: list[dict[str, Any]], headers: dict[str, str] | None = None, model: str = "auto",
             policy: Policy = POLICY, **body: Any) -> Any:
    import json

    raw = json.dumps({"model": model, "messages": messages, **body}).encode()
    return C.classify(parse_chat(raw, CIMultiDictProxy(CIMultiDict(headers or {}))), policy)


def sys_user(system: str, user: str = "hi") -> list[dict[str, Any]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize(("messages", "headers", "role"), [
    # opencode, by prompt signature
    (sys_user("You are a context summarization agent."), {}, "compaction"),
    (sys_user("You are an anchored context summarization assistant for coding sessions."), {}, "compaction"),
    (sys_user("You are a helpful AI assistant tasked with summarizing conversations."), {}, "compaction"),
    (user("Here is the conversation so far:\n\n<conversation>...</conversation>"), {}, "compaction"),
    ([*user("do x"), {"role": "assistant", "content": "ok"},
      *user("Provide a detailed prompt for continuing our conversation above.")], {}, "compaction"),
    (sys_user("You are a title generator. You output ONLY a thread title. Nothing else.",
              "Generate a title for this conversation:\n"), {}, "title"),
    (sys_user("Summarize what was done in this conversation. Write like a pull request description."), {}, "summary"),
    (sys_user("You are a file search specialist. You excel at ..."), {}, "subagent"),
    (sys_user("You are opencode, an interactive CLI tool that helps users with software engineering tasks."), {},
     "main"),
    # opencode, by explicit header
    (sys_user("You are opencode, an interactive CLI tool"), {"x-opencode-agent": "compaction"}, "compaction"),
    (sys_user("You are opencode, an interactive CLI tool"), {"x-opencode-agent": "explore"}, "subagent"),
    (sys_user("You are opencode, an interactive CLI tool"), {"x-parent-session-id": "ses_parent"}, "subagent"),
    (sys_user("You are opencode, an interactive CLI tool"), {"x-opencode-agent": "build"}, "main"),
    # Open WebUI, by the {{TASK}} header
    (user("### Task:\nGenerate a concise title"), {"X-OpenWebUI-Task": "title_generation"}, "title"),
    (user("whatever"), {"X-OpenWebUI-Task": "context_compaction"}, "compaction"),
    (user("whatever"), {"X-OpenWebUI-Task": "tags_generation"}, "tags"),
    (user("whatever"), {"X-OpenWebUI-Task": "memory_review"}, "memory"),
    (user("whatever"), {"X-OpenWebUI-Task": "moa_response_generation"}, "moa"),
    (user("### Task:\nGenerate a concise title"), {"X-OpenWebUI-Task": ""}, "main"),  # empty = chat turn
    # Open WebUI, by prompt signature
    (user("### Task:\nGenerate a concise, 3-5 word title with an emoji"), {}, "title"),
    (user("### Task:\nGenerate 1-3 broad tags categorizing the main themes"), {}, "tags"),
    (user("### Task:\nSuggest 3-5 relevant follow-up questions"), {}, "follow_up"),
    (user("### Task:\nPredict 3-5 useful messages"), {}, "follow_up"),
    (user("### Task:\nAnalyze the chat history to determine the necessity of generating search queries"), {},
     "query"),
    (user("### Task:\nYou are an autocompletion system. Continue the text"), {}, "autocomplete"),
    (user("### Task:\nGenerate a detailed prompt for am image generation task"), {}, "image_prompt"),
    (user("### Task:\nSummarize the conversation history that will be compacted"), {}, "compaction"),
    (user("Your task is to reflect the speaker's likely facial expression"), {}, "emoji"),
    (sys_user("Available Tools: [...]"), {}, "function_calling"),
    # the RAG trap: a chat turn with files/web search is a normal turn
    (user("### Task:\nRespond to the user query using the provided context, incorporating inline citations"), {},
     "main"),
    (user("What is the capital of France?"), {}, "main"),
])
def test_role(messages: list[dict[str, Any]], headers: dict[str, str], role: str) -> None:
    assert classify(messages, headers).role == role


def test_content_parts_are_read() -> None:
    msgs = [{"role": "system", "content": [{"type": "text", "text": "You are a title generator."}]},
            {"role": "user", "content": [{"type": "text", "text": "Generate a title"}]}]
    assert classify(msgs).role == "title"


def test_task_model_id_marks_a_background_task() -> None:
    assert classify(user("anything"), model="switchyard-task").role == "title"


def test_policy_signatures_extend_the_pack_and_come_first() -> None:
    policy = Policy(team="t", rules=[{"route": ["local"]}],
                    signatures=[{"role": "summary", "system_prefix": "You are a title generator."}])
    assert classify(sys_user("You are a title generator."), policy=policy).role == "summary"
    assert classify(sys_user("You are a title generator.")).role == "title"


@pytest.mark.parametrize(("headers", "client", "session"), [
    ({"User-Agent": "opencode/1.18.33 ai-sdk/provider-utils/3 runtime/bun/1.2", "x-session-id": "ses_1"},
     "opencode", "ses_1"),
    ({"X-OpenWebUI-Chat-Id": "chat-9", "X-OpenWebUI-User-Id": "u1"}, "open-webui", "chat-9"),
    ({"User-Agent": "OpenAI/Python 1.0"}, "other", None),
])
def test_client_and_session(headers: dict[str, str], client: str, session: str | None) -> None:
    p = classify(user("hi"), headers)
    assert (p.client, p.session) == (client, session)


def test_output_reserve_is_min_of_max_tokens_and_policy() -> None:
    assert classify(user("hi"), max_tokens=32000).output_reserve == 4096  # opencode's raw field is not the reserve
    assert classify(user("hi"), max_tokens=100).output_reserve == 100
    assert classify(user("hi"), max_completion_tokens=50).output_reserve == 50
    assert classify(user("hi")).output_reserve == 4096


def test_size_bounds_bracket_the_estimate() -> None:
    p = classify(user("hello world " * 1000), tools=[{"type": "function", "function": {"name": "f"}}])
    assert p.size.lower < p.size.estimate < p.size.upper
    assert p.size.has_tools


def test_exact_hosted_count_works_offline() -> None:
    """tiktoken's encodings come from the litellm wheel, not the network."""
    from gateway.tokens import count_tiktoken

    body = {"messages": [{"role": "user", "content": "hello world " * 100}]}
    assert 200 <= count_tiktoken(body) <= 260

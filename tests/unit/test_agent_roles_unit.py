"""Claude Code and Codex requests, shaped as the real clients send them (captured through
Switchyard with Claude Code 2.1.328 and Codex CLI 0.169.0, see docs/agents.md; prompts shortened),
classify to the right role and route exactly like their opencode equivalents."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import load_settings
from gateway.explain import explain as explain_request
from tests.conftest import config_for, write_config

BILLING = {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.328.593; cc_entrypoint=sdk-cli;"}
CC_HEADERS = {"User-Agent": "claude-cli/2.1.328 (external, sdk-cli)", "x-app": "cli", "anthropic-version": "2023-06-01",
              "X-Claude-Code-Session-Id": "46d640e1-b8e7-4d5a-98a2-a2046e8ceb3c",
              "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14"}
CC_TOOL = {"name": "Bash", "description": "Run a command", "input_schema": {"type": "object", "properties": {}}}


def claude_code(system: list[str], user: str, model: str = "claude-sonnet-4-5", **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 32000, "stream": True, "tools": [CC_TOOL],
            "system": [BILLING, *({"type": "text", "text": t} for t in system)],
            "messages": [{"role": "user", "content": [{"type": "text", "text": user}]}], **extra}


def codex_headers(kind: str, **extra: str) -> dict[str, str]:
    meta = {"session_id": "01a215dd", "thread_id": "01a215dd", "turn_id": "01a215dd-5f40", "request_kind": kind,
            "turn_trigger": "exec", "model": "gpt-5-codex"}
    return {"User-Agent": "codex_exec/0.169.0 (Debian 12.0.0; x86_64) xterm (codex_exec; 0.169.0)",
            "originator": "codex_exec", "session-id": "01a215dd", "x-codex-turn-metadata": json.dumps(meta), **extra}


def codex(user: str, developer: str = "You are a coding agent running in the Codex CLI.") -> dict[str, Any]:
    return {"model": "gpt-5-codex", "stream": True, "store": False, "tool_choice": "auto",
            "tools": [{"type": "function", "name": "exec_command", "parameters": {"type": "object"}}],
            "input": [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": developer}]},
                      {"type": "message", "role": "user", "content": [{"type": "input_text", "text": user}]}]}


def opencode(system: str, user: str = "hi", **headers: str) -> tuple[dict[str, Any], dict[str, str]]:
    body = {"model": "auto", "max_tokens": 32000, "stream": True,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
    return body, {"User-Agent": "opencode/1.18.33", **headers}


OPENCODE = {
    "main": opencode("You are opencode, an interactive CLI tool."),
    "title": opencode("You are a title generator. You output ONLY a thread title."),
    "subagent": opencode("You are opencode.", **{"x-parent-session-id": "ses_parent"}),
    "compaction": opencode("You are a context summarization agent."),
}

CASES: list[tuple[str, str, dict[str, Any], dict[str, str], str]] = [
    ("claude-code main", "main",
     claude_code(["You are a Claude agent, built on Anthropic's Claude Agent SDK.", "You are an agent working with"],
                 "<system-reminder>\n# Environment\n</system-reminder>Say hi"), CC_HEADERS, "claude-code"),
    ("claude-code main (interactive)", "main",
     claude_code(["You are Claude Code, Anthropic's official CLI for Claude."], "fix the test"), CC_HEADERS,
     "claude-code"),
    ("claude-code topic title", "title",
     claude_code(["Analyze if this message indicates a new conversation topic. If it does, extract a 2-3 word title"],
                 "fix the failing test", model="claude-haiku-4-5"), CC_HEADERS, "claude-code"),
    ("claude-code session title", "title",
     claude_code(["You are coming up with a succinct title and git branch name for a coding session"],
                 "fix the failing test", model="claude-haiku-4-5"), CC_HEADERS, "claude-code"),
    ("claude-code subagent (Task tool)", "subagent",
     claude_code(["You are Claude Code, Anthropic's official CLI for Claude.",
                  "You are an agent for Claude Code, Anthropic's official CLI for Claude. Given the user's message"],
                 "Find where the config is loaded"), CC_HEADERS, "claude-code"),
    ("claude-code compaction", "compaction",
     claude_code(["You are a helpful AI assistant tasked with summarizing conversations."],
                 "Your task is to create a detailed summary of the conversation so far, paying close attention"),
     CC_HEADERS, "claude-code"),
    ("claude-code compaction (main system prompt)", "compaction",
     claude_code(["You are Claude Code, Anthropic's official CLI for Claude."],
                 "Your task is to create a detailed summary of the conversation so far, paying close attention"),
     CC_HEADERS, "claude-code"),
    ("codex turn", "main", codex("Say hi"), codex_headers("turn"), "codex"),
    ("codex remote compaction", "compaction", codex("compact"), codex_headers("compact"), "codex"),
    ("codex local compaction", "compaction",
     codex("You are performing a CONTEXT CHECKPOINT COMPACTION. Create a handoff summary"), codex_headers("turn"),
     "codex"),
    ("codex review", "subagent", codex("Review the current changes"),
     codex_headers("turn", **{"x-openai-subagent": "review"}), "codex"),
]


@pytest.fixture
def settings(tmp_path: Path) -> Any:
    gw, policy = config_for("http://127.0.0.1:9", "http://127.0.0.1:9", data_dir=str(tmp_path / "data"))
    return load_settings(write_config(tmp_path, gw, {"default": policy}))


async def explain(settings: Any, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    return await explain_request(settings, json.dumps(body).encode(), CIMultiDictProxy(CIMultiDict(headers)),
                                 live=False)


@pytest.mark.parametrize(("name", "role", "body", "headers", "client"), CASES, ids=[c[0] for c in CASES])
async def test_agent_request_role_and_route_match_opencode(settings: Any, name: str, role: str, body: dict[str, Any],
                                                          headers: dict[str, str], client: str) -> None:
    out = await explain(settings, body, headers)
    assert out["protocol"] == ("messages" if "system" in body else "responses")
    assert (out["role"], out["client"]) == (role, client), out["role_source"]
    assert out["session"] and out["model"] == "auto"  # claude-*/gpt-* ids route as auto
    twin = await explain(settings, *OPENCODE[role])
    assert twin["role"] == role
    route, twin_route = [s["backend"] for s in out["route"]], [s["backend"] for s in twin["route"]]
    assert route == twin_route, (out["reason"], twin["reason"])


async def test_a_task_model_named_by_the_team_stays_a_task_model(tmp_path: Path) -> None:
    gw, policy = config_for("http://127.0.0.1:9", "http://127.0.0.1:9", data_dir=str(tmp_path / "data"))
    policy["task_models"] = ["claude-haiku-4-5"]  # ANTHROPIC_SMALL_FAST_MODEL: its prompts are background tasks
    settings = load_settings(write_config(tmp_path, gw, {"default": policy}))
    out = await explain(settings, claude_code(["Some new background prompt"], "x", model="claude-haiku-4-5"),
                        CC_HEADERS)
    assert (out["role"], out["model"]) == ("title", "claude-haiku-4-5")


async def test_chat_completions_keep_their_strict_model_ids(settings: Any) -> None:
    out = await explain(settings, {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, {})
    assert "does not exist" in json.dumps(out)

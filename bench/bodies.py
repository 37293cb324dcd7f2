"""Request bodies: the small chat turn of the load runs and realistic opencode turns of any size.

The big one follows what opencode 1.18.33 sends for a build-agent turn (captured against a loopback endpoint): its
system prompt, 10 tool schemas, `stream` with `include_usage`, and a history of user turns,
assistant tool calls and tool results (file reads, command output) filling it to the size asked.
Deterministic: the same size always gives the same bytes.
"""

from __future__ import annotations

import json
import random
from typing import Any

SYSTEM = (
    "You are opencode, an interactive CLI tool that helps users with software engineering tasks. "
    "Use the instructions below and the tools available to you to assist the user.\n\n"
    "IMPORTANT: Refuse to write code or explain code that may be used maliciously. "
    "When the user asks about opencode, use the webfetch tool to gather information.\n\n"
    "# Tone and style\nYou should be concise, direct, and to the point. When you run a non-trivial bash "
    "command, you should explain what the command does and why you are running it. Your output will be "
    "displayed on a command line interface. Your responses can use GitHub-flavored markdown.\n\n"
    "# Following conventions\nWhen making changes to files, first understand the file's code conventions. "
    "Mimic code style, use existing libraries and utilities, and follow existing patterns. NEVER assume "
    "that a given library is available. Always follow security best practices.\n\n"
    "# Doing tasks\nUse the available search tools to understand the codebase and the user's query. "
    "Implement the solution using all tools available to you. Verify the solution if possible with tests. "
    "VERY IMPORTANT: When you have completed a task, you MUST run the lint and typecheck commands.\n\n"
    "<env>\n  Working directory: /home/dev/projects/switchyard\n  Is directory a git repo: yes\n"
    "  Platform: linux\n  Today's date: Tue Nov 25 2025\n</env>\n"
)

_TOOL_SPECS = {
    "bash": ("Executes a given bash command in a persistent shell session with optional timeout, ensuring "
             "proper handling and security measures.", {"command": "The command to execute",
                                                        "timeout": "Optional timeout in milliseconds",
                                                        "description": "5-10 word description of the command"}),
    "edit": ("Performs exact string replacements in files. You must use your read tool at least once before "
             "editing.", {"filePath": "The absolute path to the file to modify", "oldString": "The text to replace",
                          "newString": "The text to replace it with", "replaceAll": "Replace all occurrences"}),
    "webfetch": ("Fetches content from a specified URL and converts it to the requested format.",
                 {"url": "The URL to fetch content from", "format": "text, markdown or html",
                  "timeout": "Optional timeout in seconds"}),
    "glob": ("Fast file pattern matching tool that works with any codebase size.",
             {"pattern": "The glob pattern to match files against", "path": "The directory to search in"}),
    "grep": ("Fast content search tool that works with any codebase size. Searches file contents using "
             "regular expressions.", {"pattern": "The regex pattern to search for",
                                      "path": "The directory to search in", "include": "File pattern to include"}),
    "list": ("Lists files and directories in a given path.", {"path": "The absolute path to list",
                                                             "ignore": "List of glob patterns to ignore"}),
    "read": ("Reads a file from the local filesystem. By default, it reads up to 2000 lines starting from the "
             "beginning of the file.", {"filePath": "The path to the file to read",
                                        "offset": "The line number to start reading from",
                                        "limit": "The number of lines to read"}),
    "write": ("Writes a file to the local filesystem. This tool will overwrite the existing file if there is "
              "one at the provided path.", {"filePath": "The absolute path to the file to write",
                                             "content": "The content to write to the file"}),
    "todowrite": ("Use this tool to create and manage a structured task list for your current coding session.",
                  {"todos": "The updated todo list"}),
    "task": ("Launch a new agent to handle complex, multi-step tasks autonomously.",
             {"description": "A short (3-5 words) description of the task", "prompt": "The task for the agent",
              "subagent_type": "The type of specialized agent to use for this task"}),
}


def tools() -> list[dict[str, Any]]:
    out = []
    for name, (desc, params) in _TOOL_SPECS.items():
        # opencode's tool descriptions are long usage guides: pad each to a realistic ~1.5 KB.
        long_desc = desc + "\n\nUsage notes:\n" + "\n".join(
            f"  - {p}: {d}. Prefer this over shell equivalents; results are truncated past 2000 lines."
            for p, d in params.items()) * 3
        out.append({"type": "function", "function": {
            "name": name, "description": long_desc,
            "parameters": {"type": "object", "additionalProperties": False, "$schema": "http://json-schema.org/draft-07/schema#",
                           "required": list(params)[:1],
                           "properties": {p: {"type": "string", "description": d} for p, d in params.items()}}}})
    return out


def _code(rng: random.Random, lines: int) -> str:
    names = ["request", "backend", "policy", "route", "profile", "queue", "breaker", "tokens", "settings", "stream"]
    out = []
    for i in range(1, lines + 1):
        a, b = rng.choice(names), rng.choice(names)
        kind = rng.random()
        if kind < 0.2:
            text = f"def {a}_{b}(self, {b}: {b.title()}) -> {a.title()} | None:"
        elif kind < 0.5:
            text = f"    {a} = self.{b}.get({b}_id, default={rng.randint(0, 4096)})"
        elif kind < 0.7:
            text = f"    if {a} is None or {a}.{b} > limit:  # {b} past its ceiling"
        elif kind < 0.85:
            text = f"        return await self._{a}({b}, timeout={rng.random() * 30:.1f})"
        else:
            text = ""
        out.append(f"{i:05d}| {text}")
    return "\n".join(out)


def opencode_turn(chars: int, *, model: str = "auto", stream: bool = True, seed: int = 7) -> dict[str, Any]:
    """A build-agent turn whose JSON body is `chars` characters long (within a few)."""
    rng = random.Random(seed)
    body: dict[str, Any] = {
        "model": model, "max_tokens": 32000, "stream": stream, "tool_choice": "auto",
        "messages": [{"role": "system", "content": SYSTEM}], "tools": tools(),
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    messages = body["messages"]
    size = len(json.dumps(body))
    turn = 0
    while size < chars:
        turn += 1
        call_id = f"call_{turn:04d}{rng.randrange(16**8):08x}"
        path = f"/home/dev/projects/switchyard/gateway/{rng.choice(['relay', 'decide', 'dispatch', 'tokens'])}.py"
        new = [
            {"role": "user", "content": f"Look at {path} and fix the failing test number {turn}; keep the style."},
            {"role": "assistant", "content": "", "tool_calls": [{"id": call_id, "type": "function", "function": {
                "name": "read", "arguments": json.dumps({"filePath": path})}}]},
            {"role": "tool", "tool_call_id": call_id, "content": "<file>\n" + _code(rng, 120) + "\n</file>"},
            {"role": "assistant", "content": f"The guard in `{path.rsplit('/', 1)[1]}` runs after the loop; moving "
                                             "it first fixes the empty case. Running the tests now."},
        ]
        messages.extend(new)
        size += sum(len(json.dumps(m)) + 2 for m in new)
    messages.append({"role": "user", "content": "Now run the whole suite and summarise what changed."})
    over = len(json.dumps(body)) - chars
    if over > 0:  # trim the last tool result to land on the size asked
        for m in reversed(messages):
            if m["role"] == "tool" and len(m["content"]) > over + 100:
                m["content"] = m["content"][: len(m["content"]) - over]
                break
    short = chars - len(json.dumps(body))
    if short > 0:  # spaces need no escaping: pad the last user message to the exact size
        messages[-1]["content"] += " " * short
    return body


def small_turn(model: str, stream: bool) -> dict[str, Any]:
    """The load runs' request: a short opencode-style turn (~1.3 KB), the proxies' fixed cost dominates."""
    body: dict[str, Any] = {
        # Non-streamed: the canned answer's 38 tokens, so a gateway that asks a token server for them as a
        # stream (Switchyard's local path, decisions #40) gets 38 events, as from llama-server; streamed: 200.
        "model": model, "max_tokens": 1024 if stream else 38, "stream": stream,
        "messages": [
            {"role": "system", "content": SYSTEM[:900]},
            {"role": "user", "content": "In gateway/relay.py, why does a stream that ends without [DONE] still "
                                        "get a usage chunk? Answer in two sentences."},
        ],
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body

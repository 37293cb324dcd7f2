"""The replay's session shapes: what Open WebUI and opencode send, in the order and overlap they send it.

Each scenario is a coroutine that drives a `Client` (one request at a time or overlapping, as the real
client does) and feeds every answer back into the history, so each turn's prompt is the previous
prompt plus the answer plus the new user message — what a slot's cache can reuse. Shapes follow
../shared/clients.md (Open WebUI 0.12.4, opencode 1.18.33):

- **Open WebUI chat**: turns streamed, no `max_tokens`, no `stream_options`; the title task (not
  streamed) leaves a moment before the first turn; tags after the first turn and follow-ups after every
  turn, fired when the turn ends, not awaited by the user; the task prompts embed the chat history.
  The first user message pastes a document (a report to discuss), so later turns have a prefix to keep.
- **opencode session**: build-agent turns with 10 tool schemas, `stream_options.include_usage`,
  `x-session-id`; the title (streamed) sent together with the first turn; tool calls and results grow
  the history; an `explore` subagent (its own session, `x-parent-session-id`) after the second turn;
  then a compaction, and the session continues on the summary.
- **two chats**: two Open WebUI users whose turns alternate on the same server.

Text is deterministic (seeded), so every variant of the replay sends the same bytes.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bench import bodies

WORDS = ("river town bridge mill harbour market winter summer grain timber stone road canal lock bank "
         "ledger council charter guild weaver smith carter ferry toll storm flood harvest fair abbey "
         "merchant wool salt barge quay warehouse tower gate wall square church school bell clock").split()


def prose(rng: random.Random, words: int) -> str:
    out = []
    for i in range(words):
        w = rng.choice(WORDS)
        out.append(w.capitalize() if i % 14 == 0 else w)
        if i % 14 == 13:
            out[-1] += "."
    return " ".join(out) + "."


@dataclass
class Answer:
    text: str
    backend: str
    ttft: float | None  # seconds to the first content byte (streams)
    total: float
    request_id: str | None
    predicted: float | None


@dataclass
class Sent:
    """One request of the replay and what came of it."""

    scenario: str
    label: str
    kind: str  # turn | task | subagent | compaction
    stream: bool
    answer: Answer | None = None


Send = Callable[[str, str, dict[str, Any], dict[str, str]], Awaitable[Answer]]


@dataclass
class Client:
    """The replay's client: sends, records every request, lets tasks run in the background like Open WebUI."""

    send: Send
    think: float  # seconds a user takes between an answer and the next turn
    sent: list[Sent] = field(default_factory=list)
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    async def request(self, scenario: str, label: str, kind: str, body: dict[str, Any],
                      headers: dict[str, str]) -> Answer:
        rec = Sent(scenario, label, kind, bool(body.get("stream")))
        self.sent.append(rec)
        rec.answer = await self.send(label, kind, body, headers)
        return rec.answer

    def fire(self, scenario: str, label: str, kind: str, body: dict[str, Any], headers: dict[str, str]) -> None:
        task = asyncio.create_task(self.request(scenario, label, kind, body, headers))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def settle(self) -> None:
        while self.background:
            await asyncio.gather(*list(self.background), return_exceptions=True)


# -- Open WebUI ----------------------------------------------------------------------------------

OWUI_SYSTEM = "You are a helpful assistant. Answer clearly and cite the report where you can."


def _history_text(history: list[dict[str, Any]]) -> str:
    return "\n".join(f"{m['role'].upper()}: {m['content']}" for m in history if m["role"] != "system")


def owui_task(kind: str, history: list[dict[str, Any]]) -> dict[str, Any]:
    """Open WebUI's task prompt (`### Task:` + the chat history), not streamed, as its task model sends it."""
    task = {
        "title": "Generate a concise, 3-5 word title with an emoji summarizing the chat history.",
        "tags": "Generate 1-3 broad tags categorizing the main themes of the chat history, along with 1-3 "
                "more specific subtopic tags.",
        "follow_up": "Suggest 3-5 relevant follow-up questions or prompts that the user might naturally ask "
                     "next in this conversation as a **user**, based on the chat history.",
    }[kind]
    text = (f"### Task:\n{task}\n### Guidelines:\n- Be concise.\n- Use the chat's primary language.\n"
            f"### Output:\nJSON format.\n### Chat History:\n<chat_history>\n{_history_text(history[-6:])}\n"
            "</chat_history>")
    body: dict[str, Any] = {"model": "auto", "stream": False, "messages": [{"role": "user", "content": text}]}
    if kind == "title":
        body["max_tokens"] = 1000  # Open WebUI's title asks 1000; tags and follow-ups send none
    return body


OWUI_TASK_HEADER = {"title": "title_generation", "tags": "tags_generation", "follow_up": "follow_up_generation"}


async def owui_chat(client: Client, scenario: str, chat: str, seed: int, turns: int,
                    gate: Callable[[int], Awaitable[None]] | None = None) -> None:
    """One Open WebUI conversation; `gate(i)` lets two chats take turns."""
    rng = random.Random(seed)
    report = prose(rng, 900)
    history: list[dict[str, Any]] = [
        {"role": "system", "content": OWUI_SYSTEM},
        {"role": "user", "content": f"Here is our town report:\n\n{report}\n\nWhat are its three main points?"}]

    def headers(task: str = "") -> dict[str, str]:
        return {"X-OpenWebUI-Chat-Id": chat, "X-OpenWebUI-Task": OWUI_TASK_HEADER.get(task, ""),
                "X-OpenWebUI-User-Id": f"user-{chat}"}

    for i in range(turns):
        if gate is not None:
            await gate(i)
        if i == 0:  # a new chat: its title leaves just before the first turn
            client.fire(scenario, f"{chat} title", "task", owui_task("title", history), headers("title"))
            await asyncio.sleep(0.02)
        body = {"model": "auto", "stream": True, "messages": list(history)}
        answer = await client.request(scenario, f"{chat} turn {i + 1}", "turn", body, headers())
        history.append({"role": "assistant", "content": answer.text or "(no answer)"})
        if i == 0:
            client.fire(scenario, f"{chat} tags", "task", owui_task("tags", history), headers("tags"))
        client.fire(scenario, f"{chat} follow-ups {i + 1}", "task", owui_task("follow_up", history),
                    headers("follow_up"))
        history.append({"role": "user", "content": f"And what about point {i + 2}? {prose(rng, 40)}"})
        await asyncio.sleep(client.think)
    await client.settle()


async def two_chats(client: Client, scenario: str, turns: int) -> None:
    """Two users on the same server; their turns alternate (A1, B1, A2, B2, ...)."""
    order = asyncio.Condition()
    turn = {"n": 0}

    def gate_for(k: int) -> Callable[[int], Awaitable[None]]:
        async def gate(i: int) -> None:  # chat k's turn i waits until 2i+k turns have been answered
            async with order:
                await order.wait_for(lambda: turn["n"] >= 2 * i + k)
        return gate

    async def counting_send(label: str, kind: str, body: dict[str, Any], headers: dict[str, str]) -> Answer:
        answer = await base_send(label, kind, body, headers)
        if kind == "turn":
            async with order:
                turn["n"] += 1
                order.notify_all()
        return answer

    async def run(chat: str, seed: int, k: int) -> None:
        sub = Client(counting_send, client.think, client.sent, client.background)
        await owui_chat(sub, scenario, chat, seed, turns, gate_for(k))

    base_send = client.send
    await asyncio.gather(run("chat-a", 11, 0), run("chat-b", 12, 1))


# -- opencode ------------------------------------------------------------------------------------

OPENCODE_UA = "opencode/1.18.33 ai-sdk/provider-utils/3.0.9 runtime/bun/1.2.21"
OUTPUT_LIMIT = 40  # opencode sends the model's `limit.output` from its config as max_tokens


def _oc_headers(session: str, parent: str | None = None) -> dict[str, str]:
    h = {"x-session-id": session, "x-session-affinity": session, "User-Agent": OPENCODE_UA}
    if parent:
        h["x-parent-session-id"] = parent
    return h


def _oc_body(messages: list[dict[str, Any]], tools: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "auto", "max_tokens": OUTPUT_LIMIT, "stream": True,
                            "stream_options": {"include_usage": True}, "messages": list(messages)}
    if tools:
        body |= {"tools": bodies.tools(), "tool_choice": "auto"}
    return body


async def opencode_session(client: Client, scenario: str, session: str, seed: int, turns: int) -> None:
    rng = random.Random(seed)
    system = bodies.SYSTEM + "\n# Project notes\n" + prose(rng, 500)
    history: list[dict[str, Any]] = [{"role": "system", "content": system}]
    headers = _oc_headers(session)
    for i in range(turns):
        if i == turns - 2:  # the session has grown: opencode compacts it, then goes on from the summary
            convo = json.dumps(history[1:])
            compaction = {"model": "auto", "max_tokens": OUTPUT_LIMIT, "stream": True,
                          "stream_options": {"include_usage": True}, "messages": [
                              {"role": "system", "content": "You are a context summarization agent. Summarize."},
                              {"role": "user", "content": f"Here is the conversation so far:\n\n<conversation>"
                                                          f"{convo}</conversation>"}]}
            summary = await client.request(scenario, f"{session} compaction", "compaction", compaction, headers)
            history = [{"role": "system", "content": system},
                       {"role": "user", "content": "What did we do so far?"},
                       {"role": "assistant", "content": summary.text or "(summary)"}]
        path = f"gateway/{rng.choice(['relay', 'decide', 'dispatch', 'tokens'])}.py"
        history.append({"role": "user", "content": f"Fix the failing test in {path}; keep the style."})
        if i == 0:  # the title and the first turn leave together
            title = {"model": "auto", "max_tokens": 1000, "stream": True, "stream_options": {"include_usage": True},
                     "messages": [{"role": "system", "content": "You are a title generator. You output ONLY a "
                                                                "thread title. Nothing else."},
                                  {"role": "user", "content": "Generate a title for this conversation:\n"
                                                              + history[-1]["content"]}]}
            client.fire(scenario, f"{session} title", "task", title, headers)
        answer = await client.request(scenario, f"{session} turn {i + 1}", "turn", _oc_body(history), headers)
        call = f"call_{i:04d}"
        history += [
            {"role": "assistant", "content": answer.text or "", "tool_calls": [{"id": call, "type": "function",
                                                                               "function": {"name": "read",
                                                                                            "arguments": json.dumps(
                                                                                                {"filePath": path})}}]},
            {"role": "tool", "tool_call_id": call, "content": "<file>\n" + bodies._code(rng, 18) + "\n</file>"}]
        if i == 1:  # the build agent delegates a search to an explore subagent (its own session)
            sub = f"{session}-explore"
            explore = _oc_body([{"role": "system", "content": "You are a file search specialist. " + prose(rng, 120)},
                                {"role": "user", "content": f"Find where {path} handles an empty stream."}])
            await client.request(scenario, f"{sub} turn 1", "subagent", explore, _oc_headers(sub, session))
        await asyncio.sleep(client.think)
    await client.settle()

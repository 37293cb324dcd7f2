"""Inbound protocols: chat completions, Anthropic Messages, OpenAI Responses (see base.py)."""

from __future__ import annotations

from .base import Protocol
from .chat import ChatProtocol
from .messages import MessagesProtocol
from .responses import ResponsesProtocol

CHAT = ChatProtocol()
MESSAGES = MessagesProtocol()
RESPONSES = ResponsesProtocol()
PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (CHAT, MESSAGES, RESPONSES)}


def protocol(name: str) -> Protocol:
    return PROTOCOLS[name]


def detect(body: dict[str, object], headers: object = None) -> Protocol:
    """Which protocol a body is in, by shape (for `explain`): `input` is Responses; `messages` with
    `max_tokens` and a top-level `system` or an anthropic-version header is Messages."""
    if "input" in body and "messages" not in body:
        return RESPONSES
    anthropic_header = bool(headers is not None and getattr(headers, "get", lambda _k: None)("anthropic-version"))
    if "messages" in body and "max_tokens" in body and ("system" in body or anthropic_header):
        return MESSAGES
    return CHAT


__all__ = ["CHAT", "MESSAGES", "PROTOCOLS", "RESPONSES", "Protocol", "detect", "protocol"]

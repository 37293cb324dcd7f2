"""OpenAI chat completions: the protocol Switchyard began with (its relay lives in relay.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Protocol

if TYPE_CHECKING:
    from multidict import CIMultiDictProxy

    from ..receive import ChatRequest


class ChatProtocol(Protocol):
    def parse(self, raw: bytes, headers: CIMultiDictProxy[str]) -> ChatRequest:
        from ..receive import parse_chat

        return parse_chat(raw, headers)

    def usage_of(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        usage = obj.get("usage")
        return usage if isinstance(usage, dict) else None

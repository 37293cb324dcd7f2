"""The one seam between "what" and "how": a backend opens a chat request and hands back bytes.

Everything above this (queueing, failover, breaker, relay, ledger) treats every backend alike;
everything below it never sees a profile or a policy. `open` returns only once the first body
chunk is in hand, so any exception it raises happened *before the first byte* — the point up to
which a request can still move to another backend without the client noticing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ..config import BackendBase

Place = Literal["local", "hosted"]


@dataclass(slots=True)
class Upstream:
    status: int
    content_type: str
    first: bytes  # the first chunk (the whole body when not streaming)
    rest: AsyncIterator[bytes]
    close: Callable[[], Awaitable[None]]
    usage: dict[str, Any] | None = None  # set by backends that see usage as objects (hosted)
    extra_headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ready: bool
    detail: str
    n_ctx: int | None = None


class Backend(Protocol):
    name: str
    place: Place
    config: BackendBase

    @property
    def context_window(self) -> int | None:
        """The largest prompt+answer this backend takes, as configured and as live-reported."""

    @property
    def unusable(self) -> str | None:
        """Why this backend cannot take requests at all right now (config, not health), or None."""

    async def open(self, body: dict[str, Any], headers: dict[str, str], stream: bool,
                   raw: bytes | None = None) -> Upstream:
        """`raw`, when given, is `body` already encoded (the client's own bytes): send it as is."""

    async def count_tokens(self, body: dict[str, Any]) -> int | None: ...

    async def probe(self) -> ProbeResult: ...

    async def close(self) -> None: ...


async def _empty() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover - makes this an async generator


def empty_rest() -> AsyncIterator[bytes]:
    return _empty()

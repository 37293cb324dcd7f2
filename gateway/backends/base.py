"""The one seam between "what" and "how": a backend opens a chat request and hands back bytes.

Everything above this (deciding, queueing, failover, breaker, relay, ledger) treats every backend
alike and never asks which kind it is; everything below it never sees a profile or a policy.
Three questions cross the seam:

- `fit`: does this request fit you, and how do you know? (each kind knows its own limits and how
  sure it must be: a wrong "fits" is a segfault for llama.cpp, one round trip for a provider);
- `open`: returns only once the first body chunk is in hand, so any exception it raises happened
  *before the first byte* — the point up to which a request can still move to another backend
  without the client noticing; closing the upstream always reaches the connection;
- `learn`: a failure happened on a request of this size (a crash can teach a ceiling).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from ..config import BackendBase
from ..failures import UpstreamFailure
from ..tokens import TokenSize

Place = Literal["local", "hosted"]


@dataclass(slots=True)
class Upstream:
    status: int
    first: bytes  # the first chunk (the whole body when not streaming)
    rest: AsyncIterator[bytes]
    close: Callable[[], Awaitable[None]]
    usage: dict[str, Any] | None = None  # set by backends that see usage as objects (hosted)
    settle: Callable[[AnswerStats], None] | None = None  # the backend's own bookkeeping for this answer
    timings: dict[str, Any] | None = None  # llama.cpp's, when the backend already read them (no re-parse)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ready: bool
    detail: str


@dataclass(frozen=True, slots=True)
class FitQuery:
    """What a backend needs to judge whether a request fits it, and how soon it would answer."""

    body: dict[str, Any]
    size: TokenSize
    reserve: int  # tokens kept free for the answer
    ceiling: int | None = None  # the policy's safe ceiling for servers we run ourselves
    session: str | None = None


@dataclass(frozen=True, slots=True)
class Estimate:
    """A backend's own guess of its time to first byte, with its parts for `explain`."""

    seconds: float | None  # None: nothing learned yet
    parts: dict[str, Any]
    wait: float = 0.0  # of `seconds`, the part spent waiting before the backend starts on it (queue, load)


# Set by dispatch in the headers a backend is opened with when the request is background work (a title,
# tags, a compaction): its prompt is answered once and never continued. Never sent upstream.
TASK = "x-switchyard-task"


@dataclass(frozen=True, slots=True)
class AnswerStats:
    """What an answer showed, handed back to the backend that gave it (it learns from it)."""

    first_byte_s: float
    total_s: float
    usage: dict[str, Any] | None
    timings: dict[str, Any] | None
    ok: bool
    conversation: bool = True  # a turn whose prompt the next turn continues (not a task's one-off prompt)


@dataclass(slots=True)
class Fit:
    fits: bool
    tokens: int
    method: str  # bytes | exact | estimate: how the token count was known
    limit: int | None
    note: str = ""  # why it does not fit, for the route reason


class Backend(Protocol):
    name: str
    place: Place  # for display only (/v1/models, status): nothing routes on it
    config: BackendBase

    @property
    def context_window(self) -> int | None:
        """The largest prompt+answer this backend takes, as configured and as live-reported."""

    @property
    def unusable(self) -> str | None:
        """Why this backend cannot take requests at all right now (config, not health), or None."""

    @property
    def free(self) -> bool:
        """True when a request costs nothing per token (budgets and `on_limit: local` ask this)."""

    async def fit(self, q: FitQuery) -> Fit: ...

    def learn(self, failure: UpstreamFailure, tokens_in: int) -> None: ...

    def estimate(self, q: FitQuery, queued: int, alongside: int = 0) -> Estimate:
        """Time to first byte if sent now: `queued` service times after the requests ahead of it (per slot),
        then running beside `alongside` others on the same server."""

    def evicts(self, q: FitQuery) -> str | None:
        """Why serving this now would throw away a warm conversation's cache (None: it would not)."""

    async def open(self, body: dict[str, Any], headers: dict[str, str], stream: bool,
                   raw: bytes | None = None) -> Upstream:
        """`raw`, when given, is `body` already encoded (the client's own bytes): send it as is."""

    async def count_tokens(self, body: dict[str, Any]) -> int | None: ...

    def report(self) -> dict[str, Any]:
        """What the backend knows about itself for /readyz and the status page (e.g. cache hit ratio)."""

    async def start(self) -> None:
        """Get ready to serve without blocking the event loop (slow imports go to a thread)."""

    async def probe(self) -> ProbeResult: ...

    async def tiny_request(self) -> ProbeResult | None:
        """A tiny real request to close a half-open circuit; None when one would cost (a provider)."""

    async def close(self) -> None: ...


async def _empty() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover - makes this an async generator


def empty_rest() -> AsyncIterator[bytes]:
    return _empty()

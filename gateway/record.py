"""Step 6: record. One structured decision line per request, and the recent ones kept in memory.

The line carries ids, team, role, client, token counts, route, reason, outcome and timings —
never prompt text and never a key (a test greps the log for both). Sinks (metrics, the SQLite
ledger) subscribe here so the hot path calls one thing.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger("switchyard.decision")


SPILLED = "spilled"  # waited its limit for a slot, moved on
CIRCUIT_OPEN = "circuit_open"  # the backend's circuit opened while the request was on its way
PREEMPTED = "preempted"  # a background task gave its slot to an interactive turn


@dataclass(frozen=True, slots=True)
class FailoverEvent:
    """Why a request moved past a backend: a failure kind (failures.Kind), SPILLED or CIRCUIT_OPEN.
    Rendered once, here, for the response header, the decision log, the ledger and metrics."""

    backend: str
    kind: str
    detail: str = ""

    def __str__(self) -> str:
        if self.kind == SPILLED:
            return f"{self.backend} {self.detail}: spilled"
        if self.kind == CIRCUIT_OPEN:
            return self.detail or f"{self.backend} circuit open"
        if self.kind == PREEMPTED:
            return f"{self.backend} preempted"
        return f"{self.backend} {self.kind}"

    @property
    def metric_kind(self) -> str:
        return {SPILLED: "spillover", CIRCUIT_OPEN: "circuit_open", PREEMPTED: "preempted"}.get(self.kind, "failover")


@dataclass(slots=True)
class Decision:
    id: str
    team: str
    role: str = ""
    role_source: str = ""  # which signal decided the role (header, signature, task model, default)
    client: str = ""
    session: str | None = None
    model: str = ""
    stream: bool = False
    tokens_in: int = 0
    tokens_method: str = ""
    prompt_tokens: int = 0  # as the backend's usage reported it
    tokens_out: int = 0
    output_reserve: int = 0
    route: list[str] = field(default_factory=list)
    reason: str = ""
    backend: str | None = None
    outcome: str = ""  # ok | error | client_gone | broken_stream
    status: int = 0
    error_code: str | None = None
    failover: list[FailoverEvent] = field(default_factory=list)
    retries: int = 0
    queue_wait_ms: float = 0.0
    overhead_ms: float = 0.0
    first_byte_ms: float = 0.0
    predicted_ttft_ms: float | None = None  # what the chosen backend was expected to take
    cached_tokens: int | None = None  # prompt tokens the backend served from its cache (llama.cpp)
    total_ms: float = 0.0
    cost: float = 0.0
    at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["failover"] = [str(e) for e in self.failover]
        return out


Sink = Callable[[Decision], None]


class Recorder:
    def __init__(self, keep: int = 200) -> None:
        self.recent: deque[Decision] = deque(maxlen=keep)
        self.sinks: list[Sink] = []

    def record(self, d: Decision) -> None:
        self.recent.append(d)
        if log.isEnabledFor(logging.INFO):
            log.info(json.dumps(d.as_dict(), separators=(",", ":")))
        for sink in self.sinks:
            try:
                sink(d)
            except Exception:  # a broken sink must never fail or slow a request
                logging.getLogger("switchyard").exception("decision sink failed")

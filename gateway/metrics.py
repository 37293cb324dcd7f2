"""Prometheus metrics, fed by the decision recorder (one call per request) and read from live state.

Per-request work is a handful of counter/histogram updates; gauges (queue depth, circuit state)
are read from the runtime only when /metrics is scraped.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .record import Decision

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
_CIRCUIT = {"closed": 0, "half_open": 1, "open": 2}


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("switchyard_requests", "Requests by team, role, backend and outcome",
                                ["team", "role", "backend", "outcome"], registry=r)
        self.first_byte = Histogram("switchyard_first_byte_seconds", "Time to first byte", ["backend"],
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.total = Histogram("switchyard_request_seconds", "Total request time", ["backend"],
                               buckets=_LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram("switchyard_overhead_seconds",
                                  "Switchyard's own time before the upstream is called (queue wait excluded)",
                                  buckets=_OVERHEAD_BUCKETS, registry=r)
        self.queue_wait = Histogram("switchyard_queue_wait_seconds", "Time waiting for a backend slot",
                                    ["backend"], buckets=_LATENCY_BUCKETS, registry=r)
        self.retries = Counter("switchyard_retries", "Same-backend retries after a 429", ["backend"], registry=r)
        self.failovers = Counter("switchyard_failovers", "Requests that moved past a backend",
                                 ["team", "kind"], registry=r)
        self.tokens = Counter("switchyard_tokens", "Tokens by team, backend and direction",
                              ["team", "backend", "direction"], registry=r)
        self.cost = Counter("switchyard_cost_dollars", "Hosted cost by team and backend", ["team", "backend"],
                            registry=r)
        self.cached = Counter("switchyard_cached_prompt_tokens", "Prompt tokens a backend served from its cache "
                              "(llama.cpp timings.cache_n); hit ratio = this / switchyard_tokens{direction=in}",
                              ["backend", "role"], registry=r)
        self.prompt = Counter("switchyard_prompt_tokens", "Prompt tokens of answers whose cache use is known",
                              ["backend", "role"], registry=r)
        self.ttft_error = Histogram("switchyard_ttft_prediction_error_ratio",
                                    "|predicted - actual| / actual time to first byte, per answer", ["backend"],
                                    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5), registry=r)
        self.queue_depth = Gauge("switchyard_queue_depth", "Requests waiting for a slot", ["backend"], registry=r)
        self.queue_busy = Gauge("switchyard_queue_busy", "Slots in use", ["backend"], registry=r)
        self._series: dict[tuple[str, ...], tuple[Any, ...]] = {}
        self.circuit = Gauge("switchyard_circuit_state", "0 closed, 1 half-open, 2 open", ["backend"], registry=r)

    def observe(self, d: Decision) -> None:
        backend = d.backend or "none"
        key = (d.team, d.role or "unknown", backend, d.outcome or "unknown")
        series = self._series.get(key)
        if series is None:  # resolve label children once per combination, not per request
            series = self._series[key] = (
                self.requests.labels(*key), self.first_byte.labels(backend), self.total.labels(backend),
                self.queue_wait.labels(backend), self.tokens.labels(d.team, backend, "in"),
                self.tokens.labels(d.team, backend, "out"))
        requests, first_byte, total, queue_wait, tokens_in, tokens_out = series
        requests.inc()
        if d.backend:
            first_byte.observe(d.first_byte_ms / 1000)
            total.observe(d.total_ms / 1000)
            self.overhead.observe(max(0.0, d.overhead_ms) / 1000)
            if d.queue_wait_ms:
                queue_wait.observe(d.queue_wait_ms / 1000)
            if d.retries:
                self.retries.labels(backend).inc(d.retries)
            tokens_in.inc(d.prompt_tokens or d.tokens_in)
            tokens_out.inc(d.tokens_out)
            if d.cost:
                self.cost.labels(d.team, backend).inc(d.cost)
            if d.cached_tokens is not None:
                self.cached.labels(backend, d.role or "unknown").inc(d.cached_tokens)
                self.prompt.labels(backend, d.role or "unknown").inc(d.prompt_tokens or d.tokens_in)
            if d.predicted_ttft_ms and d.first_byte_ms > 0 and d.outcome == "ok" and not d.failover:
                # The prediction includes the queue ahead, so the wait is part of what it is checked against.
                actual = d.first_byte_ms
                self.ttft_error.labels(backend).observe(abs(d.predicted_ttft_ms - actual) / actual)
        for event in d.failover:
            self.failovers.labels(d.team, event.metric_kind).inc()

    def render(self, runtime: Any) -> bytes:
        for name, q in runtime.queues.items():
            self.queue_depth.labels(name).set(q.waiting)
            self.queue_busy.labels(name).set(q.busy)
        for name, b in runtime.breakers.items():
            self.circuit.labels(name).set(_CIRCUIT[str(b.state)])
        return generate_latest(self.registry)

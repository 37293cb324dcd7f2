"""Classification cost: Switchyard's receive -> classify -> decide on one big opencode turn, in-process.

Wired as `switchyard explain` wires it (gateway/cli.py `_explain`), without the network: the
backends' live state is not probed, so the local context comes from the config (32,768).
"with exact count" adds `gateway.tokens.count_tiktoken(body)`, what the decider runs when a
request's byte bounds straddle a hosted backend's ceiling.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.tokens import use_bundled_tiktoken

from .bodies import opencode_turn

HEADERS = {"User-Agent": "opencode/1.18.33 ai-sdk/provider-utils/3.0.9 runtime/bun/1.3.0",
           "x-session-id": "ses_bench0000000000000000000000", "x-session-affinity": "ses_bench0000000000000000000000",
           "Content-Type": "application/json"}


def _stats(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"p50_ms": statistics.median(s) * 1000, "p99_ms": s[min(len(s) - 1, int(len(s) * 0.99))] * 1000,
            "min_ms": s[0] * 1000, "max_ms": s[-1] * 1000, "n": len(s)}


async def _measure(config_path: Path, chars: int, iterations: int, exact_iterations: int) -> dict[str, Any]:
    from gateway.config import load_settings
    from gateway.receive import parse_chat
    from gateway.router import Router
    from gateway.tokens import count_tiktoken

    settings = load_settings(config_path)
    rt = Router.build(settings)
    body = opencode_turn(chars)
    raw = json.dumps(body).encode()
    headers = CIMultiDictProxy(CIMultiDict(HEADERS))
    policy = rt.policy
    steps: dict[str, list[float]] = {"parse": [], "classify": [], "decide": [], "total": []}
    route = profile = None
    try:
        for _ in range(iterations + 3):  # 3 warm-up passes (imports, caches)
            t0 = time.perf_counter()
            req = parse_chat(raw, headers)
            t1 = time.perf_counter()
            profile = rt.classify(req, policy)
            t2 = time.perf_counter()
            route = await rt.decide(req, profile, policy)
            t3 = time.perf_counter()
            for k, v in (("parse", t1 - t0), ("classify", t2 - t1), ("decide", t3 - t2), ("total", t3 - t0)):
                steps[k].append(v)
        for k in steps:
            del steps[k][:3]
        t0 = time.perf_counter()
        tokens = count_tiktoken(body)
        cold_count = time.perf_counter() - t0  # loads the o200k_base encoding
        exact: list[float] = []
        count_only: list[float] = []
        for _ in range(exact_iterations):
            t0 = time.perf_counter()
            req = parse_chat(raw, headers)
            p = rt.classify(req, policy)
            await rt.decide(req, p, policy)
            t1 = time.perf_counter()
            count_tiktoken(req.body)
            t2 = time.perf_counter()
            exact.append(t2 - t0)
            count_only.append(t2 - t1)
    finally:
        await rt.close()
    assert route is not None and profile is not None
    return {
        "request": {"chars": len(raw), "messages": len(body["messages"]), "tools": len(body["tools"]),
                    "user_agent": HEADERS["User-Agent"]},
        "role": profile.role, "role_source": profile.role_source, "client": profile.client,
        "route": [s.backend for s in route.steps], "reason": route.reason, "tokens_method": route.tokens_method,
        "tokens_estimate": route.tokens_in, "tiktoken_o200k": tokens,
        "without_exact": {k: _stats(v) for k, v in steps.items()},
        "with_exact": {"total": _stats(exact), "count_tiktoken": _stats(count_only),
                       "first_count_ms": cold_count * 1000},
    }


async def measure(config_path: Path, chars: int = 350_000, iterations: int = 200,
                  exact_iterations: int = 20) -> dict[str, Any]:
    use_bundled_tiktoken()
    from bench.configs import UPSTREAM_KEY_ENV

    # The in-process decision must see the hosted key that `serve` gets, or hosted is skipped as keyless.
    os.environ.setdefault(UPSTREAM_KEY_ENV, "sk-bench-upstream")
    return await _measure(config_path, chars, iterations, exact_iterations)

"""Chaos: 200 mixed requests while the real llama-server is killed and restarted three times.

Every request must end in a complete response or a clean, OpenAI-shaped error; none may hang,
and none may be served twice."""

from __future__ import annotations

import asyncio
import json
import random
import signal
from collections import Counter
from typing import Any

from gateway.embedded import LlamaServer
from tests.conftest import GatewayFactory, wait_healthy
from tests.fake_hosted import FakeHosted
from tests.test_core_routing import sse_events

N = 200


def request_body(i: int, rng: random.Random) -> dict[str, Any]:
    large = rng.random() < 0.2  # too big for the 4096-token local model: hosted on size
    text = f"req-{i:04d} " + ("lorem ipsum dolor " * 1500 if large else "Say hi.")
    body: dict[str, Any] = {"model": "auto", "max_tokens": 8, "messages": [{"role": "user", "content": text}]}
    if rng.random() < 0.5:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


async def one(gw: Any, body: dict[str, Any]) -> str:
    resp = await gw.chat(body)
    raw = await resp.read()
    if resp.status != 200:
        err = json.loads(raw)["error"]
        assert err["message"] and err["type"], err
        return f"error {resp.status}"
    if not body.get("stream"):
        assert json.loads(raw)["choices"][0]["message"] is not None
        return "ok " + resp.headers["x-switchyard-backend"]
    events = sse_events(raw)
    assert events[-1] == "[DONE]", raw[-300:]
    if any("error" in e for e in events[:-1]):
        return "stream error"
    assert any(e.get("usage") for e in events[:-1]), "usage chunk missing"
    return "ok " + resp.headers["x-switchyard-backend"]


async def test_chaos_kill_and_restart_three_times(own_llama: LlamaServer, make_gateway: GatewayFactory,
                                                  fake: FakeHosted) -> None:
    gw = await make_gateway(own_llama.url)
    rng = random.Random(7)
    bodies = [request_body(i, rng) for i in range(N)]
    sem = asyncio.Semaphore(6)
    done = 0

    async def run(body: dict[str, Any]) -> str:
        nonlocal done
        async with sem:
            try:
                return await asyncio.wait_for(one(gw, body), 90)
            finally:
                done += 1

    async def chaos() -> None:
        for at in (30, 90, 150):
            while done < at:
                await asyncio.sleep(0.05)
            own_llama.kill(signal.SIGSEGV)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(lambda: (own_llama.spawn(), wait_healthy(own_llama)))

    killer = asyncio.create_task(chaos())
    results = await asyncio.gather(*(run(b) for b in bodies))
    await killer
    counts = Counter(results)
    print("chaos outcomes:", dict(counts))
    assert sum(counts.values()) == N  # none hung (wait_for would have raised), none lost
    assert counts["ok local"] > 0 and counts["ok hosted"] > 0
    # failover covers crashes before the first byte; only mid-stream breaks may surface, cleanly
    assert counts["ok local"] + counts["ok hosted"] >= N - 10
    assert set(counts) <= {"ok local", "ok hosted", "stream error", "error 503"}
    # none served twice: every request reached the hosted fake at most once
    markers = Counter()
    for r in fake.requests:
        body = r.json or {}
        text = json.dumps(body.get("input") or body.get("messages") or "")
        for tok in set(t for t in text.split() if t.startswith("req-")):
            markers[tok[:8]] += 1
    assert not [m for m, c in markers.items() if c > 1], markers.most_common(3)
    assert len(gw.runtime.recorder.recent) >= min(N, gw.runtime.recorder.recent.maxlen or N)
    # and local is back in service at the end: the probe half-opens, one trial closes it
    breaker = gw.runtime.breakers["local"]
    for _ in range(300):
        if breaker.state != "open":
            break
        await asyncio.sleep(0.05)
    resp = await gw.chat({"model": "auto", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert resp.headers["x-switchyard-backend"] == "local"
    assert breaker.state == "closed"

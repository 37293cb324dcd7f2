"""Replay real session shapes against the real llama-server: cache-blind vs cache-aware scheduling (issue 11).

    .venv/bin/python -m bench.replay [--rounds 1] [--setups np1 np2] [--json out.json]

For each server setup (`-np 1 --cache-ram 0`, 4,096-token context, the user's stable setting; and
`-np 2 --cache-ram 0`, 8,192 shared as 4,096 per slot) and each scenario of bench/sessions.py (an Open
WebUI chat with its title/tags/follow-up tasks, an opencode session through a subagent to a compaction,
two Open WebUI chats interleaving), every scheduling variant replays the same requests on a fresh
llama-server (SmolLM2-135M, empty cache) behind its own in-process Switchyard:

- **static**: today's rules without cache awareness (`hot_for: 0`, `slot_affinity: false`): background
  tasks run on local whenever it is free, llama.cpp picks the slot;
- **cache_aware**: the shipped defaults (`hot_for: 300`, `slot_affinity: true`);
- **all_local**: every request on local (no hosted at all), cache-aware;
- **fastest**: cache-aware with `prefer: fastest` on every rule (the backend predicted to answer first).

Hosted is the fake provider (tests/fake_hosted.py) answering after `--hosted-ttft` seconds (default
1.0 s, a hosted model's typical time to first token). Learned speeds come from a calibration run first;
each run then starts from the speeds the run before it left in its data dir (what a long-running gateway
knows), and the variants' order rotates between rounds. Output: per setup, scenario and variant, the
share of prompt tokens served from llama.cpp's cache on interactive turns (`timings.cache_n`, the turns
that continue a conversation — a first turn has nothing to reuse), the p50/p95 time to first token of
interactive turns, prompt tokens sent to hosted (cost), and the median |predicted - actual| / actual
time to first token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from bench.sessions import Answer, Client, Sent, opencode_session, owui_chat, prose, two_chats
from gateway.app import create_app
from gateway.config import load_settings
from gateway.embedded import Artifacts, LlamaServer, free_port, locate
from gateway.record import Decision
from tests.fake_hosted import FakeHosted, Reply, start_fake_hosted

SETUPS = {"np1": (1, 4096), "np2": (2, 8192)}  # -np, -c (llama.cpp splits -c among the slots)
VARIANTS = ("static", "cache_aware", "all_local", "fastest")
TURN_TOKENS = 48  # the policy's clamp on interactive answers (Open WebUI sends no max_tokens)
Scenario = Callable[[Client], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {
    "owui_chat": lambda c: owui_chat(c, "owui_chat", "chat-1", seed=1, turns=5),
    "opencode": lambda c: opencode_session(c, "opencode", "ses_replay", seed=2, turns=6),
    "two_chats": lambda c: two_chats(c, "two_chats", turns=4),
}


def _config(root: Path, variant: str, local_url: str, hosted_url: str, slots: int = 1) -> Path:
    local: dict[str, Any] = {"kind": "llamacpp", "url": local_url, "max_concurrency": slots, "context_limit": 4096,
                             "embedded": False, "timeouts": {"connect": 5, "first_byte": 300, "idle": 120,
                                                             "total": 600}}
    if variant == "static":
        local |= {"hot_for": 0, "slot_affinity": False}
    gateway = {"listen": {"host": "127.0.0.1", "port": 0}, "data_dir": str(root / "data"), "backends": {
        "local": local,
        "hosted": {"kind": "litellm", "model": "openai/gpt-5-nano", "api_base": hosted_url,
                   "api_key_env": "REPLAY_HOSTED_KEY"}}}
    route = ["local"] if variant == "all_local" else ["local", "hosted"]
    rules: list[dict[str, Any]] = [
        {"name": "compaction", "match": {"role": "compaction"}, "route": ["local"] if variant == "all_local"
         else ["hosted", "local"]},
        {"name": "short-tasks", "match": {"role": ["title", "tags", "emoji", "autocomplete"]}, "route": route,
         "max_queue_wait": 2, "max_tokens": 24},
        {"name": "background", "match": {"role": ["follow_up", "summary", "query"]}, "route": route,
         "max_queue_wait": 2, "max_tokens": 48},
        {"name": "default", "route": route, "max_tokens": TURN_TOKENS},
    ]
    if variant == "fastest":
        for rule in rules:
            rule["prefer"] = "fastest"
    policy = {"team": "default", "output_reserve": 256, "max_queue_wait": 60, "rules": rules}
    (root / "policies").mkdir(parents=True, exist_ok=True)
    (root / "policies" / "default.yaml").write_text(yaml.safe_dump(policy))
    (root / "switchyard.yaml").write_text(yaml.safe_dump(gateway))
    return root / "switchyard.yaml"


@dataclass
class Gateway:
    runner: web.AppRunner
    url: str
    decisions: dict[str, Decision] = field(default_factory=dict)

    async def close(self) -> None:
        await self.runner.cleanup()


async def _serve(config: Path) -> Gateway:
    app = create_app(load_settings(config))
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    gw = Gateway(runner, f"http://127.0.0.1:{port}")
    from gateway.endpoints import RUNTIME

    app[RUNTIME].recorder.sinks.append(lambda d: gw.decisions.__setitem__(d.id, d))
    return gw


def _sender(session: aiohttp.ClientSession, url: str) -> Callable[..., Awaitable[Answer]]:
    async def send(label: str, kind: str, body: dict[str, Any], headers: dict[str, str]) -> Answer:
        started = time.monotonic()
        ttft = None
        text: list[str] = []
        async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
            rid, backend = r.headers.get("x-switchyard-request-id"), r.headers.get("x-switchyard-backend", "?")
            predicted = r.headers.get("x-switchyard-predicted-ttft")
            if r.status != 200:
                raise RuntimeError(f"{label}: HTTP {r.status} {(await r.text())[:200]}")
            if body.get("stream"):
                async for line in r.content:
                    if not line.startswith(b"data: {"):
                        continue
                    event = json.loads(line[6:])
                    for choice in event.get("choices") or ():
                        delta = choice.get("delta") or {}
                        piece = delta.get("content") or delta.get("reasoning_content")
                        if piece:
                            ttft = ttft if ttft is not None else time.monotonic() - started
                            text.append(piece)
            else:
                answer = await r.json()
                text.append(((answer.get("choices") or [{}])[0].get("message") or {}).get("content") or "")
        return Answer("".join(text), backend, ttft, time.monotonic() - started, rid,
                      float(predicted) if predicted else None)
    return send


async def _calibrate(artifacts: Artifacts, fake: FakeHosted, work: Path) -> Path:
    """Teach a gateway the server's rates (prompts of several lengths) and hosted's first byte."""
    llama = LlamaServer(artifacts, ctx=4096, extra_args=("--cache-ram", "0"))
    await llama.start()
    gw = await _serve(_config(work / "calibrate", "cache_aware", llama.url, fake.url))
    try:
        async with aiohttp.ClientSession() as s:
            send = _sender(s, gw.url)
            rng = random.Random(99)
            for words in (300, 700, 1200, 1800, 2400):  # a cold prefill, then a turn continuing it
                messages = [{"role": "user", "content": prose(rng, words)}]
                body = {"model": "auto", "stream": True, "messages": messages}
                answer = await send("calibrate", "turn", body, {})
                messages += [{"role": "assistant", "content": answer.text}, {"role": "user", "content": "Go on."}]
                await send("calibrate", "turn", body, {})
            for _ in range(3):
                await send("calibrate", "compaction", {"model": "auto", "stream": True, "messages": [
                    {"role": "system", "content": "You are a context summarization agent."},
                    {"role": "user", "content": "Here is the conversation so far:\n\n<conversation>x</conversation>"}]},
                    {})
    finally:
        await gw.close()  # the runtime persists speeds.json on stop
        llama.stop()
    return work / "calibrate" / "data" / "speeds.json"


async def _run_one(artifacts: Artifacts, fake: FakeHosted, work: Path, setup: str, variant: str,
                   scenario: str, speeds: Path, think: float) -> list[dict[str, Any]]:
    slots, ctx = SETUPS[setup]
    root = work / f"{setup}-{scenario}-{variant}"
    llama = LlamaServer(artifacts, ctx=ctx, extra_args=("-np", str(slots), "--cache-ram", "0"),
                        log_path=root / "llama.log")
    root.mkdir(parents=True, exist_ok=True)
    await llama.start()
    config = _config(root, variant, llama.url, fake.url, slots)
    (root / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(speeds, root / "data" / "speeds.json")
    gw = await _serve(config)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
            client = Client(_sender(s, gw.url), think)
            await SCENARIOS[scenario](client)
        await asyncio.sleep(0.3)  # the last rows reach the recorder
        return [_row(sent, gw.decisions.get(sent.answer.request_id or "") if sent.answer else None)
                for sent in client.sent]
    finally:
        await gw.close()
        llama.stop()


def _row(sent: Sent, d: Decision | None) -> dict[str, Any]:
    a = sent.answer
    row: dict[str, Any] = {"label": sent.label, "kind": sent.kind, "stream": sent.stream}
    if a is not None:
        row |= {"backend": a.backend, "ttft": a.ttft, "total": a.total, "predicted": a.predicted}
    if d is not None:
        row |= {"role": d.role, "prompt_tokens": d.prompt_tokens or d.tokens_in, "cached": d.cached_tokens,
                "tokens_out": d.tokens_out, "queue_wait": d.queue_wait_ms / 1000, "reason": d.reason,
                "failover": [str(e) for e in d.failover]}
    return row


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures the issue asks for, over one variant's rows (any number of scenarios and rounds)."""
    turns = [r for r in rows if r["kind"] == "turn"]
    local_turns = [r for r in turns if r.get("cached") is not None]
    # A turn continues a conversation unless it is the first one (or the first after a compaction):
    # only those have a prefix the scheduler can keep warm.
    cont = [r for r in local_turns if not r["label"].endswith(" turn 1") and not r.get("after_compaction")]
    cached = sum(r["cached"] for r in cont)
    prompt = sum(r["prompt_tokens"] for r in cont)
    # What a perfect scheduler could have reused: the previous turn's prompt and answer (the new user
    # message and tool results must be prefilled whatever the scheduling).
    previous: dict[str, dict[str, Any]] = {}
    reusable = 0
    for r in turns:
        convo = r["label"].rsplit(" turn ", 1)[0]
        before = previous.get(convo)
        if r in cont and before is not None and before.get("prompt_tokens"):
            reusable += min(r["prompt_tokens"], before["prompt_tokens"] + (before.get("tokens_out") or 0))
        previous[convo] = r
    ttfts = [r["ttft"] for r in turns if r.get("ttft") is not None]
    errors = [abs(r["predicted"] - r["ttft"]) / r["ttft"] for r in rows
              if r.get("predicted") is not None and r.get("ttft") and r["stream"] and not r.get("failover")]
    hosted = [r for r in rows if r.get("backend") == "hosted"]
    return {
        "interactive_turns": len(turns),
        "continuing_turns_on_local": len(cont),
        "cache_share_continuing_turns": round(cached / prompt, 3) if prompt else None,
        "cache_share_of_reusable": round(cached / reusable, 3) if reusable else None,
        "turns_on_hosted": sum(1 for r in turns if r.get("backend") == "hosted"),
        "ttft_p50_s": _pct(ttfts, 0.5),
        "ttft_p95_s": _pct(ttfts, 0.95),
        "hosted_requests": len(hosted),
        "hosted_prompt_tokens": sum(r.get("prompt_tokens") or 0 for r in hosted),
        "local_requests": sum(1 for r in rows if r.get("backend") == "local"),
        "prediction_error_median": _pct(errors, 0.5),
        "prediction_error_p90": _pct(errors, 0.9),
        "predictions": len(errors),
    }


def _mark_compactions(rows: list[dict[str, Any]]) -> None:
    after = False
    for r in rows:
        if r["kind"] == "compaction":
            after = True
        elif after and r["kind"] == "turn" and r["label"].startswith("ses_"):
            r["after_compaction"] = True
            after = False


async def run(setups: list[str], scenarios: list[str], variants: list[str], rounds: int, hosted_ttft: float,
              think: float, keep: Path | None, json_path: Path | None = None) -> dict[str, Any]:
    os.environ.setdefault("REPLAY_HOSTED_KEY", "sk-replay")
    artifacts = locate(build=True)
    fake = await start_fake_hosted(chunks=8, chunk_delay=0.02)
    fake.default = Reply.slow(hosted_ttft, chunk_delay=0.02)
    work = keep or Path(tempfile.mkdtemp(prefix="switchyard-replay-"))
    out: dict[str, Any] = {"hosted_ttft_s": hosted_ttft, "think_s": think, "rounds": rounds, "runs": {}}
    began = time.monotonic()
    try:
        speeds = await _calibrate(artifacts, fake, work)
        out["calibrated_speeds"] = json.loads(speeds.read_text())
        for r in range(rounds):
            for setup in setups:
                for scenario in scenarios:
                    order = variants[r % len(variants):] + variants[:r % len(variants)]  # rotate: drift hits all
                    for variant in order:
                        rows = await _run_one(artifacts, fake, work, setup, variant, scenario, speeds, think)
                        # the next run starts from what this one learned, as a long-running gateway would
                        learned = work / f"{setup}-{scenario}-{variant}" / "data" / "speeds.json"
                        if learned.exists():
                            speeds = work / "speeds.json"
                            shutil.copy(learned, speeds)
                        _mark_compactions(rows)
                        out["runs"].setdefault(setup, {}).setdefault(scenario, {}).setdefault(variant, []).extend(rows)
                        if json_path is not None:  # partial results survive an interrupted run
                            json_path.write_text(json.dumps(out, indent=1))
                        s = summarize(rows)
                        print(f"[{time.monotonic() - began:6.0f}s] {setup} {scenario:<10} {variant:<12} "
                              f"cache {s['cache_share_continuing_turns']}  ttft p50 {s['ttft_p50_s']}  "
                              f"p95 {s['ttft_p95_s']}  hosted {s['hosted_requests']}  "
                              f"err {s['prediction_error_median']}", flush=True)
    finally:
        await fake.close()
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    out["summary"] = {setup: {scenario: {v: summarize(rows) for v, rows in by_v.items()}
                              for scenario, by_v in by_s.items()} for setup, by_s in out["runs"].items()}
    out["overall"] = {v: summarize([r for by_s in out["runs"].values() for by_v in by_s.values()
                                    for r in by_v.get(v, [])]) for v in variants}
    out["seconds"] = round(time.monotonic() - began, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setups", nargs="*", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument("--scenarios", nargs="*", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--hosted-ttft", type=float, default=1.0)
    p.add_argument("--think", type=float, default=1.0, help="seconds between an answer and the user's next turn")
    p.add_argument("--json", type=Path)
    p.add_argument("--keep", type=Path, help="keep the work dir (llama logs, ledgers) here")
    args = p.parse_args(argv)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
    out = asyncio.run(run(args.setups, args.scenarios, args.variants, args.rounds, args.hosted_ttft, args.think,
                          args.keep, args.json))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    print(json.dumps({"overall": out["overall"], "summary": out["summary"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

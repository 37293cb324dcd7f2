"""The "new chat" scenario: a title task and the chat's first turn, sent together to one local slot.

Both Open WebUI and opencode send a new chat's title a moment before its first turn; whichever takes
the idle slot first holds it for its whole generation. This measures, on the real llama-server
(SmolLM2-135M, `-np 1`), the turn's time to first byte:

- alone (the floor),
- beside its title with Switchyard's interactive-first scheduling (look-ahead + pre-emption), and
- beside its title with the previous scheduling (no look-ahead, no pre-emption) — the baseline,

interleaved trial by trial so machine drift hits all three alike. The title is Open WebUI's shape
(`X-OpenWebUI-Task: title_generation`, not streamed); to make "holding the slot"
visible on a 135M model, it asks llama.cpp to write 300 tokens (`ignore_eos`), a long title. Hosted is the
fake provider (tests/fake_hosted.py), where a pre-empted title goes.

    .venv/bin/python -m bench.newchat [--trials 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from gateway.app import create_app
from gateway.config import load_settings
from gateway.embedded import LlamaServer, free_port, locate
from tests.fake_hosted import start_fake_hosted

TITLE = {"model": "auto", "stream": False, "max_tokens": 300, "ignore_eos": True, "messages": [
    {"role": "user", "content": "### Task:\nGenerate a concise, 3-5 word title with an emoji summarizing the chat "
                                "history.\n### Chat History:\n<chat_history>\nUSER: how do tides work?\n"
                                "</chat_history>"}]}
TURN = {"model": "auto", "stream": True, "messages": [{"role": "user", "content": "How do tides work? One line."}]}
OWUI = {"X-OpenWebUI-Chat-Id": "bench-chat"}


def _config(root: Path, local_url: str, hosted_url: str, interactive_first: bool) -> Path:
    local: dict[str, Any] = {"kind": "llamacpp", "url": local_url, "max_concurrency": 1, "context_limit": 4096,
                             "embedded": False, "timeouts": {"connect": 2, "first_byte": 120, "idle": 60,
                                                             "total": 300}}
    if not interactive_first:
        local["lookahead"] = 0
    gateway = {"listen": {"host": "127.0.0.1", "port": 0}, "data_dir": str(root / "data"), "backends": {
        "local": local,
        "hosted": {"kind": "litellm", "model": "openai/gpt-5-nano", "api_base": hosted_url,
                   "api_key_env": "BENCH_HOSTED_KEY"}}}
    background = {"match": {"role": ["title", "tags", "follow_up"]}, "route": ["local", "hosted"],
                  "max_queue_wait": 60}
    if not interactive_first:
        background["preemptible"] = False
    policy = {"team": "default", "output_reserve": 512, "rules": [background, {"route": ["local", "hosted"]}]}
    (root / "policies").mkdir(parents=True)
    (root / "policies" / "default.yaml").write_text(yaml.safe_dump(policy))
    (root / "switchyard.yaml").write_text(yaml.safe_dump(gateway))
    return root / "switchyard.yaml"


async def _serve(config: Path) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(create_app(load_settings(config)), handler_cancellation=True)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def _ttfb(s: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str]) -> float:
    started = time.monotonic()
    async with s.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
        await r.content.readany()
        took = time.monotonic() - started
        await r.read()
    return took


async def _pair(s: aiohttp.ClientSession, url: str) -> tuple[float, str]:
    title = asyncio.create_task(s.post(f"{url}/v1/chat/completions", json=TITLE,
                                       headers={**OWUI, "X-OpenWebUI-Task": "title_generation"}))
    await asyncio.sleep(0.02)  # the title leaves just before the turn, as Open WebUI sends them
    took = await _ttfb(s, url, TURN, {**OWUI, "X-OpenWebUI-Task": ""})
    resp = await title
    backend = resp.headers.get("x-switchyard-backend", "?")
    await resp.read()
    resp.release()
    return took, backend


async def run(trials: int) -> dict[str, Any]:
    import os

    os.environ.setdefault("BENCH_HOSTED_KEY", "sk-bench")
    llama = LlamaServer(locate(build=True), ctx=4096)
    await llama.start()
    fake = await start_fake_hosted()
    runners: list[web.AppRunner] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            urls = {}
            for name, flag in (("interactive_first", True), ("baseline", False)):
                runner, urls[name] = await _serve(_config(Path(tmp) / name, llama.url, fake.url, flag))
                runners.append(runner)
            results: dict[str, list[float]] = {"alone": [], "interactive_first": [], "baseline": []}
            titles: dict[str, list[str]] = {"interactive_first": [], "baseline": []}
            async with aiohttp.ClientSession() as s:
                await _ttfb(s, urls["baseline"], TURN, OWUI)  # warm-up
                for _ in range(trials):
                    results["alone"].append(await _ttfb(s, urls["interactive_first"], TURN, OWUI))
                    for name in ("interactive_first", "baseline"):
                        took, backend = await _pair(s, urls[name])
                        results[name].append(took)
                        titles[name].append(backend)
                        await asyncio.sleep(0.5)
    finally:
        for runner in runners:
            await runner.cleanup()
        await fake.close()
        llama.stop()
    med = {k: statistics.median(v) for k, v in results.items()}
    return {"trials": trials, "turn_ttfb_s": results, "median_s": med, "title_served_by": titles,
            "ratio_baseline_over_interactive_first": med["baseline"] / med["interactive_first"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    out = asyncio.run(run(args.trials))
    text = json.dumps(out, indent=2)
    if args.json:
        args.json.write_text(text)
    print(text)
    m = out["median_s"]
    print(f"new chat, turn time to first byte (median of {args.trials}): alone {m['alone']:.2f} s, "
          f"beside its title {m['interactive_first']:.2f} s with interactive-first, "
          f"{m['baseline']:.2f} s without ({out['ratio_baseline_over_interactive_first']:.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

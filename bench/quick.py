"""A quick A/B of Switchyard's own paths while working on them (no nginx, no LiteLLM proxy, no docs).

    .venv/bin/python -m bench.quick [--n 2000] [--src DIR] [--loop asyncio|uvloop]

Starts the stand-in and one `switchyard serve` on the bench's config, then measures per scenario
p50, rate and the gateway's CPU per request. `--src DIR` runs the gateway from another checkout of
`gateway/` (e.g. `git archive COMMIT gateway | tar -x -C DIR`) for a before/after on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from pathlib import Path

from bench import bodies, load
from bench.configs import bench_env, switchyard_argv, switchyard_config
from bench.procs import HOST, ROOT, Stack, free_port, python, wait_http

SCENARIOS = (  # name, model, stream, concurrency, share of --n
    ("local json C=1", "local", False, 1, 1.0),
    ("local json C=32", "local", False, 32, 2.0),
    ("local stream C=32", "local", True, 32, 0.4),
    ("hosted json C=1", "hosted", False, 1, 0.5),
    ("hosted stream C=32", "hosted", True, 32, 0.2),
    ("responses stream C=32", "hosted_responses", True, 32, 0.1),
)


async def main_async(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="switchyard-quick-"))
    stack = Stack(workdir)
    env = bench_env()
    if args.src:
        env["PYTHONPATH"] = str(Path(args.src).resolve())
    try:
        sport = free_port()
        standin = stack.spawn("standin", [python(), "-m", "bench.standin", "--port", str(sport)], sport, cwd=ROOT)
        await wait_http(standin, "/health", 20)
        cfg = switchyard_config(workdir / "sy", sport)
        port = free_port()
        argv = switchyard_argv(cfg, port)
        if args.loop == "asyncio":  # `serve` picks uvloop when it imports: hide it (and let --src's
            # PYTHONPATH, not the working directory, say which gateway/ runs)
            argv = [python(), "-c", "import sys; sys.path.remove(''); sys.modules['uvloop'] = None; "
                    "import gateway.cli as c; sys.exit(c.main())", *argv[argv.index("serve"):]]
        gw = stack.spawn("switchyard", argv, port, env=env, cwd=ROOT)
        await wait_http(gw, "/readyz", 60)
        for model in ("hosted", "hosted_responses"):
            await wait_http(gw, "/v1/chat/completions", 120, method="POST",
                            body=json.dumps(bodies.small_turn(model, False)).encode())
        for name, model, stream, c, share in SCENARIOS:
            if args.only and not any(o in name for o in args.only):
                continue
            req = load.build_request(HOST, port, "/v1/chat/completions",
                                     json.dumps(bodies.small_turn(model, stream)).encode(), {"x-session-id": "ses_q"})
            await load.run(HOST, port, req, 50, min(c, 8), stream=stream)
            n = max(20, int(args.n * share))
            pids = gw.pids()
            cpu0 = load.proc_cpu(pids)
            r = await load.run(HOST, port, req, n, c, stream=stream)
            cpu = load.proc_cpu(pids) - cpu0
            lat = sorted(r.latencies)
            p50 = lat[len(lat) // 2] * 1000 if lat else float("nan")
            print(f"{name:<24} n={len(lat):>5}  p50 {p50:8.3f} ms  {r.rate:8.0f}/s  "
                  f"CPU {cpu / max(1, len(lat)) * 1000:7.3f} ms/req  errors {len(r.errors)}", flush=True)
            if r.errors:
                print("   first error:", r.errors[0])
    finally:
        stack.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--src", help="a directory holding another gateway/ package to measure")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument("--only", nargs="*", help="substrings of scenario names to run")
    args = p.parse_args()
    os.environ.update({k: v for k, v in bench_env().items() if k == "TIKTOKEN_CACHE_DIR"})
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()

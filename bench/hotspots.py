"""Where Switchyard spends its CPU under the bench's load: py-spy on the gateway, summed by function.

    .venv/bin/python -m bench.hotspots [--seconds 8] [--scenario local_json ...]

Starts a stand-in and `switchyard serve` like bench.run, drives one scenario at a time while
`py-spy record` samples the gateway, and prints per scenario the functions with the most
inclusive and self time (file:function, % of the gateway's busy samples). Needs py-spy
(`.venv/bin/pip install py-spy`; installed on first use) and root or ptrace rights.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import bodies, load
from bench.configs import bench_env, switchyard_argv, switchyard_config
from bench.procs import HOST, ROOT, Stack, free_port, python, wait_http

SCENARIOS = {  # name: (model, stream, concurrency)
    "local_json": ("local", False, 32),
    "local_stream": ("local", True, 32),
    "hosted_json": ("hosted", False, 32),
    "hosted_stream": ("hosted", True, 32),
    "responses_stream": ("hosted_responses", True, 32),
}
# Leaves that are a thread waiting, which py-spy's idle detection lets through (a pool worker blocked
# in the C SimpleQueue.get, a Condition wait): dropped, so percentages are of real work.
_IDLE_LEAVES = {("concurrent/futures/thread.py", "_worker"), ("threading.py", "Condition.wait"),
                ("threading.py", "Event.wait"), ("queue.py", "Queue.get"), ("selectors.py", "EpollSelector.select"),
                # the ledger writer's own lines are its batch window's `time.sleep` (its work is in _flush)
                ("gateway/ledger.py", "Ledger._run")}
_PLUMBING = ("asyncio/", "threading.py", "concurrent/futures/", "selectors.py", "gateway/cli.py", "<frozen",
             "switchyard:", "runpy.py", "aiohttp/web_protocol.py", "aiohttp/web_app.py", "aiohttp/web_middlewares.py",
             "anyio/_backends/")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+):(?P<line>\d+)\)$")


def py_spy() -> str:
    exe = Path(sys.executable).parent / "py-spy"
    if exe.exists():
        return str(exe)
    found = shutil.which("py-spy")
    if found:
        return found
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "py-spy"], check=True)
    return str(exe)


def _short(path: str) -> str:
    for marker in ("/site-packages/", "/lib/python3."):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return tail.split("/", 1)[1] if marker == "/lib/python3." else tail
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


def summarize(collapsed: Path, top: int = 25) -> dict[str, Any]:
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    by_file: collections.Counter[str] = collections.Counter()
    by_line: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = []
        leaf_line = ""
        leaf: tuple[str, str] = ("", "")
        for raw in stack.split(";"):
            m = _FRAME.match(raw.strip())
            if m:
                leaf = (_short(m["file"]), m["func"])
                frames.append(f"{leaf[0]}:{leaf[1]}")
                leaf_line = f"{leaf[0]}:{m['line']} ({m['func']})"
        if not frames:
            continue
        if leaf in _IDLE_LEAVES:
            idle += n
            continue
        by_line[leaf_line] += n
        total += n
        self_t[frames[-1]] += n
        by_file[frames[-1].rsplit(":", 1)[0]] += n
        for f in set(frames):
            incl[f] += n

    def pct(c: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(k, 100.0 * v / total) for k, v in c.most_common(top)] if total else []

    own = collections.Counter({k: v for k, v in incl.items()
                               if k.startswith("gateway/") and not k.startswith("gateway/cli.py")})
    # Any library's frames, minus the event loop, thread plumbing and the wrappers every request passes
    # through (those sit at 60-100 % and say nothing): where the time actually goes.
    notable = collections.Counter({k: v for k, v in incl.items()
                                   if not k.startswith(_PLUMBING) and total and v / total < 0.6})
    return {"samples": total, "idle_samples_dropped": idle, "self": pct(self_t), "inclusive": pct(incl),
            "self_by_file": pct(by_file), "gateway_inclusive": pct(own), "self_by_line": pct(by_line),
            "notable_inclusive": pct(notable)}


async def drive(port: int, model: str, stream: bool, concurrency: int, seconds: float) -> int:
    req = load.build_request(HOST, port, "/v1/chat/completions",
                             json.dumps(bodies.small_turn(model, stream)).encode())
    done = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        r = await load.run(HOST, port, req, concurrency * 8, concurrency, stream=stream)
        if r.errors:
            raise RuntimeError(f"{model} stream={stream}: {r.errors[0]}")
        done += len(r.latencies)
    return done


async def profile(stack: Stack, workdir: Path, scenarios: list[str], seconds: int = 8, rate: int = 250,
                  printer: Any = None) -> dict[str, Any]:
    """Start a stand-in and a gateway of its own, then profile each scenario; stops both after."""
    env = bench_env()
    sport = free_port()
    standin = stack.spawn("standin-prof", [python(), "-m", "bench.standin", "--port", str(sport)], sport, cwd=ROOT)
    await wait_http(standin, "/health", 20)
    port = free_port()
    gw = stack.spawn("switchyard-prof", switchyard_argv(switchyard_config(workdir / "sy-prof", sport), port), port,
                     env=env, cwd=ROOT)
    await wait_http(gw, "/readyz", 60)
    # litellm is imported in a background thread at startup, holding the GIL for seconds: profile after it.
    await wait_http(gw, "/v1/chat/completions", 120, method="POST",
                    body=json.dumps(bodies.small_turn("hosted", False)).encode())
    spy = py_spy()
    out: dict[str, Any] = {"seconds": seconds, "rate": rate, "tool": "py-spy record (all threads, idle excluded)"}
    for name in scenarios:
        model, stream, c = SCENARIOS[name]
        await drive(port, model, stream, c, 1.5)  # warm-up (litellm's first call imports a lot)
        raw = workdir / f"{name}.txt"
        rec = await asyncio.create_subprocess_exec(
            spy, "record", "-p", str(gw.pid), "-r", str(rate), "-d", str(seconds), "-f", "raw",
            "-o", str(raw), "--full-filenames", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        await asyncio.sleep(0.5)
        cpu0 = load.proc_cpu([gw.pid])
        t0 = time.perf_counter()
        n = await drive(port, model, stream, c, seconds - 1.0)
        wall = time.perf_counter() - t0
        cpu = load.proc_cpu([gw.pid]) - cpu0
        _, err = await rec.communicate()
        if rec.returncode != 0 or not raw.exists():
            raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')[-800:]}")
        s = summarize(raw)
        s.update(requests=n, rps=n / wall, cpu_ms_per_request=cpu / n * 1000 if n else None,
                 model=model, stream=stream, concurrency=c)
        out[name] = s
        if printer is not None:
            printer(render(name, s, 20))
    stack.stop(gw)
    stack.stop(standin)
    return out


def render(name: str, s: dict[str, Any], top: int) -> str:
    lines = [f"== {name}: {s['requests']} requests at C={s['concurrency']}, {s['rps']:.0f}/s, "
             f"{s['cpu_ms_per_request']:.3f} ms CPU/request, {s['samples']} busy samples",
             "  inclusive, Switchyard's own functions (% of busy samples):"]
    lines += [f"    {p:5.1f}%  {f}" for f, p in s["gateway_inclusive"][:top]]
    lines.append("  self:")
    lines += [f"    {p:5.1f}%  {f}" for f, p in s["self"][:top]]
    lines.append("  self by line:")
    lines += [f"    {p:5.1f}%  {f}" for f, p in s.get("self_by_line", [])[:top]]
    lines.append("  self by file:")
    lines += [f"    {p:5.1f}%  {f}" for f, p in s["self_by_file"][:12]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.hotspots", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--scenario", action="append", choices=list(SCENARIOS))
    p.add_argument("--json", type=Path, help="also write the summaries here")
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="switchyard-hotspots-"))
    stack = Stack(workdir)
    try:
        result = asyncio.run(profile(stack, workdir, args.scenario or list(SCENARIOS), args.seconds, args.rate,
                                     printer=lambda text: print(text, flush=True)))
    finally:
        stack.close()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

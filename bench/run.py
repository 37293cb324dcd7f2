"""`make bench`: Switchyard's overhead against a direct upstream, nginx and LiteLLM's proxy.

    .venv/bin/python -m bench.run            full run (~4 min warm; installs nginx / the LiteLLM proxy venv
                                             on first use), writes bench/results/<date>.json,
                                             docs/performance.md and docs/performance.png
    .venv/bin/python -m bench.run --smoke    every target with a few requests (< 60 s); targets whose
                                             programs are absent are skipped, nothing is installed
                                             and no docs are written; exits non-zero on any failure

Everything runs on loopback: one upstream stand-in (bench/standin.py), and in front of it nginx,
LiteLLM's proxy and Switchyard's two paths (local = llama.cpp byte relay, hosted = litellm). The
targets are measured in interleaved rounds so machine drift hits them all alike.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/run.py`: import the package, not the folder's modules
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import bodies, decision, hotspots, load, report, tools
from bench import floor as floor_mod
from bench.configs import bench_env, litellm_config, nginx_config, switchyard_argv, switchyard_config
from bench.procs import HOST, ROOT, Proc, Stack, free_port, python, wait_http


@dataclass(frozen=True)
class Sizes:
    json_c1: int
    json_c32: int
    stream_c1: int
    stream_c32: int


@dataclass(frozen=True)
class Plan:
    mode: str
    rounds: int
    fast: Sizes  # direct, nginx, Switchyard local
    slow: Sizes  # LiteLLM proxy (~25 ms a request)
    mid: Sizes  # Switchyard's hosted paths (litellm builds the request, the answer is relayed)
    warmup: int
    flat_total: int
    flat_step: int
    big_concurrent: int
    big_chars: int
    big_delay_ms: int
    decide_iterations: int
    exact_iterations: int


FULL = Plan("full", 3, Sizes(2000, 5000, 400, 800), Sizes(200, 300, 30, 60), Sizes(1000, 2000, 200, 400), 60,
            10_000, 1_000, 64, 1_400_000, 3000, 300, 20)
SMOKE = Plan("smoke", 1, Sizes(40, 96, 8, 32), Sizes(8, 32, 2, 4), Sizes(20, 64, 4, 16), 4,
             300, 100, 8, 1_400_000, 600, 10, 2)

KINDS = ("json_c1", "json_c32", "stream_c1", "stream_c32")
TARGET_ORDER = ("direct", "nginx", "relay_floor", "litellm_proxy", "switchyard_local", "switchyard_hosted",
                "switchyard_responses")
LABELS = {"direct": "direct (no proxy)", "nginx": "nginx proxy_pass",
          "relay_floor": "plain aiohttp relay (local exchange only)", "litellm_proxy": "LiteLLM proxy",
          "switchyard_local": "Switchyard local", "switchyard_hosted": "Switchyard hosted (chat relay)",
          "switchyard_responses": "Switchyard hosted (Responses)"}
# Mixed traffic of the memory-growth run, per 1,000 requests.
FLAT_MIX = (("local", False, 0.70), ("local", True, 0.20), ("hosted", False, 0.09), ("hosted", True, 0.01))
FLAT_TOLERANCE = 0.05  # RSS growth from request 1,000 to the end within 5 % (and 4 MiB) counts as flat


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Target:
    name: str
    port: int
    model: str
    proc: Proc | None  # the proxy process whose CPU is measured (None: direct)
    speed: str  # "fast", "mid" or "slow": which request counts of the plan it gets

    def requests(self) -> dict[bool, bytes]:
        return {s: load.build_request(HOST, self.port, "/v1/chat/completions",
                                      json.dumps(bodies.small_turn(self.model, s)).encode(),
                                      {"x-session-id": "ses_bench_load"})
                for s in (False, True)}


# ---- statistics -------------------------------------------------------------------------------

def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def ms(x: float | None) -> float | None:
    return None if x is None else x * 1000.0


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    lat = [x for r in runs for x in r["latencies"]]
    first = [x for r in runs for x in r["firsts"]]
    n = sum(len(r["latencies"]) for r in runs)
    wall = sum(r["wall"] for r in runs)
    cpu = [r["target_cpu"] for r in runs if r["target_cpu"] is not None]
    long_runs = [r for r in runs if r["wall"] >= 0.5]
    return {
        "requests": n, "errors": sum(len(r["errors"]) for r in runs),
        "p50_ms": ms(pct(lat, 0.5)), "p99_ms": ms(pct(lat, 0.99)),
        "mean_ms": ms(statistics.fmean(lat)) if lat else None,
        "ttfb_p50_ms": ms(pct(first, 0.5)), "ttfb_p99_ms": ms(pct(first, 0.99)),
        "rate": n / wall if wall else None,
        "rate_by_round": [len(r["latencies"]) / r["wall"] if r["wall"] else None for r in runs],
        "cpu_ms_per_request": (sum(cpu) / n * 1000.0) if cpu and n else None,
        "standin_cpu_ms_per_request": sum(r["standin_cpu"] for r in runs) / n * 1000.0 if n else None,
        # CPU shares from /proc tick counts (10 ms) mean little over a short run: only runs of >= 0.5 s
        "client_busy_max": max((r["client_busy"] for r in long_runs), default=None),
        "cores_busy_max": max((r["cores_busy"] for r in long_runs), default=None),
        "foreign_cores_mean": (sum(r["foreign_cores"] * r["wall"] for r in long_runs)
                               / sum(r["wall"] for r in long_runs)) if long_runs else None,
    }


# ---- phase 1: the comparison rounds -----------------------------------------------------------

async def one_run(target: Target, standin: Proc, request: bytes, n: int, c: int, stream: bool) -> dict[str, Any]:
    pids = target.proc.pids() if target.proc else []
    spids = standin.pids()
    gc.collect()
    gc.disable()
    try:
        cpu0, s0, m0 = load.proc_cpu(pids), load.proc_cpu(spids), load.machine_busy()
        stats = await load.run(HOST, target.port, request, n, c, stream=stream)
        cpu1, s1, m1 = load.proc_cpu(pids), load.proc_cpu(spids), load.machine_busy()
    finally:
        gc.enable()
    tcpu = (cpu1 - cpu0) if target.proc else None
    ours = stats.client_cpu + (tcpu or 0.0) + (s1 - s0)
    return {"latencies": stats.latencies, "firsts": stats.firsts, "errors": stats.errors, "wall": stats.wall,
            "target_cpu": tcpu, "standin_cpu": s1 - s0, "client_busy": stats.client_busy,
            "cores_busy": ours / stats.wall if stats.wall else 0.0,
            "foreign_cores": max(0.0, (m1 - m0) - ours) / stats.wall if stats.wall else 0.0}


async def compare(plan: Plan, targets: list[Target], standin: Proc, failures: list[str]) -> dict[str, Any]:
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {t.name: {k: [] for k in KINDS} for t in targets}
    reqs = {t.name: t.requests() for t in targets}
    for rnd in range(plan.rounds):
        order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]  # rotate who goes first
        for t in order:
            sizes = getattr(plan, t.speed)
            warm = max(2, plan.warmup // (4 if t.speed == "slow" else 1))
            for stream in (False, True):
                w = await load.run(HOST, t.port, reqs[t.name][stream], warm, min(8, warm), stream=stream)
                if w.errors:
                    failures.append(f"{t.name} warm-up ({'stream' if stream else 'json'}): {w.errors[0]}")
            for kind in KINDS:
                stream = kind.startswith("stream")
                c = 1 if kind.endswith("c1") else 32
                r = await one_run(t, standin, reqs[t.name][stream], getattr(sizes, kind), c, stream)
                raw[t.name][kind].append(r)
                lat = sorted(r["latencies"])
                p50 = f"{lat[len(lat) // 2] * 1000:8.3f} ms" if lat else "      --"
                log(f"  round {rnd + 1}/{plan.rounds}  {t.name:<18} {kind:<10} n={len(lat):>5}  p50 {p50}  "
                    f"{len(lat) / r['wall']:8.0f}/s  client {r['client_busy']:.2f}  errors {len(r['errors'])}")
                if r["errors"]:
                    failures.append(f"{t.name} {kind} round {rnd + 1}: {len(r['errors'])} errors, "
                                    f"first: {r['errors'][0]}")
                if t.proc is not None:
                    t.proc.check_alive()
    return {name: {k: summarize(v) | {"rounds": len(v)} for k, v in kinds.items()} for name, kinds in raw.items()}


def derive(summary: dict[str, Any]) -> dict[str, Any]:
    """Per target: the headline metrics, the added latency over direct, and ratios to each baseline."""
    out: dict[str, Any] = {}
    direct = summary.get("direct")
    for name, s in summary.items():
        m = {
            "p50_ms": s["json_c1"]["p50_ms"], "p99_ms": s["json_c1"]["p99_ms"],
            "p50_c32_ms": s["json_c32"]["p50_ms"], "p99_c32_ms": s["json_c32"]["p99_ms"],
            "rps_c32": s["json_c32"]["rate"],
            "ttft_p50_ms": s["stream_c1"]["ttfb_p50_ms"], "ttft_p99_ms": s["stream_c1"]["ttfb_p99_ms"],
            "stream_p50_ms": s["stream_c1"]["p50_ms"],
            "streams_per_s_c1": s["stream_c1"]["rate"], "streams_per_s_c32": s["stream_c32"]["rate"],
            "cpu_ms_per_request": s["json_c32"]["cpu_ms_per_request"],
            "cpu_ms_per_stream": s["stream_c32"]["cpu_ms_per_request"],
        }
        if direct:
            d = direct
            m["added_p50_ms"] = m["p50_ms"] - d["json_c1"]["p50_ms"]
            m["added_p99_ms"] = m["p99_ms"] - d["json_c1"]["p99_ms"]
            m["added_p50_c32_ms"] = m["p50_c32_ms"] - d["json_c32"]["p50_ms"]
            m["added_ttft_p50_ms"] = m["ttft_p50_ms"] - d["stream_c1"]["ttfb_p50_ms"]
        out[name] = m
    for m in out.values():
        ratios: dict[str, dict[str, float | None]] = {}
        for metric, v in m.items():
            ratios[metric] = {}
            for base in ("direct", "nginx", "litellm_proxy"):
                b = out.get(base, {}).get(metric)
                ratios[metric][f"vs_{base}"] = (v / b) if (v is not None and b not in (None, 0)) and b > 0 else None
        m["ratios"] = ratios
    return out


# ---- phase 2: launch, memory growth, peak memory ----------------------------------------------

class RssSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.peak_kb = pid, every, 0
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            try:
                self.peak_kb = max(self.peak_kb, load.rss_kb(self.pid))
            except OSError:
                return
            self._stop_evt.wait(self.every)

    def stop(self) -> int:
        self._stop_evt.set()
        self.join()
        return self.peak_kb


async def memory_and_launch(plan: Plan, stack: Stack, workdir: Path, env: dict[str, str],
                            failures: list[str]) -> dict[str, Any]:
    # Its own stand-in and gateway: a 2M-token local context so 1.4 MB requests fit the local
    # backend (on the 32k one they would be refused before reaching the upstream).
    big_ctx = 2_097_152
    sport = free_port()
    standin = stack.spawn("standin-mem", [python(), "-m", "bench.standin", "--port", str(sport),
                                          "--n-ctx", str(big_ctx)], sport, cwd=ROOT)
    await wait_http(standin, "/health", 20)
    cfg = switchyard_config(workdir / "switchyard-mem", sport, n_ctx=big_ctx, concurrency=plan.big_concurrent)
    port = free_port()
    small = json.dumps(bodies.small_turn("local", False)).encode()
    gw = stack.spawn("switchyard-mem", switchyard_argv(cfg, port), port, env=env, cwd=ROOT)
    launch = await wait_http(gw, "/v1/chat/completions", 60, method="POST", body=small)
    hosted_small = json.dumps(bodies.small_turn("hosted", False)).encode()
    launch_hosted = await wait_http(gw, "/v1/chat/completions", 60, method="POST", body=hosted_small)
    log(f"  launch to first answer: {launch * 1000:.0f} ms (local), {launch_hosted * 1000:.0f} ms (hosted)")
    await asyncio.sleep(0.5)
    out: dict[str, Any] = {"launch": {"first_answer_s": launch, "first_hosted_answer_s": launch_hosted,
                                      "command": " ".join(switchyard_argv(Path("switchyard.yaml"), port))},
                           "rss_idle_kb": load.rss_kb(gw.pid)}

    # Growth: mixed traffic, RSS after every step.
    reqs = {(m, s): load.build_request(HOST, port, "/v1/chat/completions",
                                       json.dumps(bodies.small_turn(m, s)).encode()) for m, s, _ in FLAT_MIX}
    series: list[tuple[int, int]] = []
    done = 0
    t0 = time.perf_counter()
    while done < plan.flat_total:
        for model, stream, share in FLAT_MIX:
            n = max(1, round(plan.flat_step * share))
            r = await load.run(HOST, port, reqs[(model, stream)], n, 32 if not stream or model == "local" else 4,
                               stream=stream)
            done += len(r.latencies)
            if r.errors:
                failures.append(f"memory run {model} stream={stream}: {len(r.errors)} errors, first: {r.errors[0]}")
                done += len(r.errors)
        gw.check_alive()
        await asyncio.sleep(0.2)
        series.append((done, load.rss_kb(gw.pid)))
    growth_s = time.perf_counter() - t0
    first, last = series[0][1], series[-1][1]
    growth_kb = last - first
    flat = growth_kb <= max(4096, FLAT_TOLERANCE * first)
    xs = [n for n, _ in series]
    ys = [kb for _, kb in series]
    slope = statistics.linear_regression(xs, ys).slope * 1000 if len(series) >= 3 else None  # KiB / 1,000 req
    log(f"  RSS after {series[0][0]:,} requests {first / 1024:.1f} MiB, after {series[-1][0]:,} "
        f"{last / 1024:.1f} MiB ({growth_kb / 1024:+.1f} MiB): {'flat' if flat else 'GROWING'}")
    out["growth"] = {"series": [{"requests": n, "rss_kb": kb} for n, kb in series], "first_kb": first,
                     "last_kb": last, "growth_kb": growth_kb, "flat": flat, "seconds": growth_s,
                     "slope_kib_per_1000": slope,
                     "mix": [{"model": m, "stream": s, "share": sh} for m, s, sh in FLAT_MIX],
                     "tolerance": f"growth <= max(4 MiB, {FLAT_TOLERANCE:.0%} of RSS after the first step)"}

    # Peak: N concurrent 1.4 MB requests held at the upstream for big_delay_ms.
    big = json.dumps(bodies.opencode_turn(plan.big_chars, model="local", stream=False)).encode()
    big_req = load.build_request(HOST, port, "/v1/chat/completions", big)
    await load.one(HOST, sport, load.build_request(HOST, sport, "/_bench/delay", str(plan.big_delay_ms).encode()))
    before = load.rss_kb(gw.pid)
    sampler = RssSampler(gw.pid)
    sampler.start()
    t0 = time.perf_counter()
    r = await load.run(HOST, port, big_req, plan.big_concurrent, plan.big_concurrent, stream=False, timeout=180)
    wall = time.perf_counter() - t0
    peak = sampler.stop()
    hwm = load.rss_kb(gw.pid, "VmHWM")
    stats = await load.one(HOST, sport, f"GET /_bench/stats HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    overlap = json.loads(bytes(stats.head).decode()).get("max_inflight")
    await load.one(HOST, sport, load.build_request(HOST, sport, "/_bench/delay", b"0"))
    await asyncio.sleep(1.0)
    after = load.rss_kb(gw.pid)
    if r.errors:
        failures.append(f"peak-memory run: {len(r.errors)} errors, first: {r.errors[0]}")
    log(f"  {plan.big_concurrent} concurrent {len(big) / 1e6:.1f} MB requests ({overlap} in flight at once at the "
        f"upstream): peak RSS {max(peak, 0) / 1024:.0f} MiB (VmHWM {hwm / 1024:.0f} MiB), before "
        f"{before / 1024:.0f} MiB, 1 s after {after / 1024:.0f} MiB")
    out["peak"] = {"concurrent": plan.big_concurrent, "request_bytes": len(big), "delay_ms": plan.big_delay_ms,
                   "max_in_flight_at_upstream": overlap, "rss_before_kb": before, "peak_rss_kb": peak,
                   "vmhwm_kb": hwm, "rss_after_kb": after, "wall_s": wall, "ok": len(r.latencies),
                   "errors": len(r.errors),
                   "per_request_kb": (max(peak, hwm) - before) / plan.big_concurrent}
    stack.stop(gw)
    stack.stop(standin)
    return out


# ---- goals ------------------------------------------------------------------------------------

def goals(derived: dict[str, Any], cls: dict[str, Any] | None, mem: dict[str, Any] | None) -> list[dict[str, Any]]:
    loc = derived.get("switchyard_local", {})
    hos = derived.get("switchyard_hosted", {})
    ngx = derived.get("nginx")
    lit = derived.get("litellm_proxy")
    d = derived.get("direct")
    out: list[dict[str, Any]] = []

    def goal(name: str, want: str, value: float | None, limit: float | None, unit: str, ok_if_le: bool = True,
             shown: str | None = None) -> None:
        if value is None or limit is None:
            out.append({"goal": name, "target": want, "value": None, "limit": None, "status": "n/a"})
            return
        met = value <= limit if ok_if_le else value >= limit
        out.append({"goal": name, "target": want, "value": value, "limit": limit, "unit": unit,
                    "shown": shown or f"{value:.3g} {unit} (limit {limit:.3g} {unit})",
                    "status": "met" if met else "missed"})

    a = loc.get("added_p50_ms")
    goal("local path: added p50 at C=1", "≤ 0.6 ms", a, 0.6, "ms")
    goal("local path: added p50 vs nginx's added", "≤ 5x nginx", a,
         5 * ngx["added_p50_ms"] if ngx else None, "ms",
         shown=f"{a:.3f} ms = {a / ngx['added_p50_ms']:.1f}x nginx's {ngx['added_p50_ms']:.3f} ms"
         if ngx and a is not None and ngx["added_p50_ms"] > 0 else None)
    goal("local path: added p50 vs LiteLLM proxy's added", "≤ 1/40 of LiteLLM proxy", a,
         lit["added_p50_ms"] / 40 if lit else None, "ms",
         shown=f"{a:.3f} ms = 1/{lit['added_p50_ms'] / a:.1f} of LiteLLM proxy's {lit['added_p50_ms']:.2f} ms"
         if lit and a else None)
    rps = loc.get("rps_c32")
    goal("local path: requests/s at C=32 vs LiteLLM proxy", "≥ 25x LiteLLM proxy", rps,
         25 * lit["rps_c32"] if lit else None, "req/s", ok_if_le=False,
         shown=f"{rps:.0f}/s = {rps / lit['rps_c32']:.1f}x LiteLLM proxy's {lit['rps_c32']:.0f}/s"
         if lit and rps else None)
    goal("local path: requests/s at C=32 vs nginx", "≥ 40 % of nginx", rps,
         0.4 * ngx["rps_c32"] if ngx else None, "req/s", ok_if_le=False,
         shown=f"{rps:.0f}/s = {rps / ngx['rps_c32']:.0%} of nginx's {ngx['rps_c32']:.0f}/s" if ngx and rps else None)
    gap = loc.get("added_ttft_p50_ms")
    goal("local path: streamed time to first chunk vs direct", "within 1 ms of direct", gap, 1.0 if d else None,
         "ms", shown=f"+{gap:.3f} ms (direct {d['ttft_p50_ms']:.3f} ms)" if d and gap is not None else None)
    h = hos.get("added_p50_ms")
    goal("hosted path: added p50 vs LiteLLM proxy's added", "≤ 1/3 of LiteLLM proxy", h,
         lit["added_p50_ms"] / 3 if lit else None, "ms",
         shown=f"{h:.2f} ms = {h / lit['added_p50_ms']:.2f}x LiteLLM proxy's {lit['added_p50_ms']:.2f} ms"
         if lit and h else None)
    # issue 15: the hosted path at relay cost, the local path with a fresh upstream connection per request
    c = hos.get("cpu_ms_per_stream")
    goal("hosted path: CPU per stream vs LiteLLM proxy's", "≤ 1/5 of LiteLLM proxy", c,
         lit["cpu_ms_per_stream"] / 5 if lit and lit.get("cpu_ms_per_stream") else None, "ms",
         shown=f"{c:.2f} ms = 1/{lit['cpu_ms_per_stream'] / c:.0f} of LiteLLM proxy's {lit['cpu_ms_per_stream']:.1f} ms"
         if lit and lit.get("cpu_ms_per_stream") and c else None)
    sps = hos.get("streams_per_s_c32")
    goal("hosted path: streams/s at C=32 vs LiteLLM proxy", "≥ 5x LiteLLM proxy", sps,
         5 * lit["streams_per_s_c32"] if lit and lit.get("streams_per_s_c32") else None, "streams/s", ok_if_le=False,
         shown=f"{sps:.0f}/s = {sps / lit['streams_per_s_c32']:.0f}x LiteLLM proxy's {lit['streams_per_s_c32']:.1f}/s"
         if lit and lit.get("streams_per_s_c32") and sps else None)
    # The plain relay doing only the same upstream exchange says how much of each is the exchange itself.
    fl = derived.get("relay_floor", {})
    fa, fc, fx = fl.get("added_p50_ms"), fl.get("cpu_ms_per_request"), fl.get("exchange_alone_added_p50_ms")
    goal("local path: added p50 at C=1 (fresh upstream connection)", "≤ 0.4 ms", a, 0.4, "ms",
         shown=f"{a:.2f} ms (limit 0.4 ms; a plain aiohttp relay of the same exchange: {fa:.2f} ms; the "
               f"exchange alone, no proxy: {fx:.2f} ms)" if a is not None and fa is not None and fx is not None
         else None)
    lc = loc.get("cpu_ms_per_request")
    goal("local path: CPU per request (fresh upstream connection)", "≤ 0.25 ms", lc, 0.25, "ms",
         shown=f"{lc:.3f} ms (limit 0.25 ms; a plain aiohttp relay of the same exchange: {fc:.3f} ms)"
         if lc is not None and fc is not None else None)
    if cls:
        v = cls["without_exact"]["total"]["p50_ms"]
        goal("deciding a 350,000-char request (p50)", "< 5 ms", v, 5.0, "ms",
             shown=f"{v:.2f} ms by byte bounds; {cls['with_exact']['total']['p50_ms']:.1f} ms with an exact "
                   f"tiktoken count")
    if mem:
        v = mem["launch"]["first_answer_s"]
        goal("launch to first answer", "< 3 s", v, 3.0, "s", shown=f"{v:.2f} s")
        g = mem["growth"]
        out.append({"goal": f"RSS flat across {g['series'][-1]['requests']:,} requests", "target": "flat",
                    "value": g["growth_kb"] / 1024, "unit": "MiB",
                    "shown": f"{g['first_kb'] / 1024:.1f} → {g['last_kb'] / 1024:.1f} MiB "
                             f"({g['growth_kb'] / 1024:+.1f} MiB)", "status": "met" if g["flat"] else "missed"})
    return out


# ---- main -------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    import importlib.metadata as md

    def ver(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    return {"cpus": os.cpu_count(), "cpu": cpu, "mem_gib": round(mem_kb / 1024 / 1024, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "aiohttp": ver("aiohttp"), "litellm": ver("litellm"), "switchyard": ver("switchyard")}


async def main_async(args: argparse.Namespace, plan: Plan, workdir: Path, stack: Stack,
                     failures: list[str], notes: list[str]) -> dict[str, Any]:
    env = bench_env()
    os.environ.update({k: v for k, v in env.items() if k == "TIKTOKEN_CACHE_DIR"})
    smoke = plan.mode == "smoke"

    # Programs of the comparison targets.
    nginx_exe = litellm_exe = None
    try:
        nginx_exe = tools.nginx_bin(install=not smoke, log=log)
    except Exception as e:
        failures.append(f"nginx: {e}")
    if nginx_exe is None and smoke:
        notes.append("smoke: nginx is not installed here, so the nginx target was skipped")
    if not args.no_litellm_proxy:
        try:
            litellm_exe = tools.litellm_proxy_bin(install=not smoke, log=log)
        except Exception as e:
            failures.append(f"LiteLLM proxy venv: {e}")
        if litellm_exe is None and smoke:
            notes.append(f"smoke: the LiteLLM proxy venv ({tools.VENV}) is absent, so that target was skipped")
    else:
        notes.append("--no-litellm-proxy: the LiteLLM proxy target was skipped")

    # Start everything, then wait for each.
    sport = free_port()
    standin = stack.spawn("standin", [python(), "-m", "bench.standin", "--port", str(sport)], sport, cwd=ROOT)
    await wait_http(standin, "/health", 20)
    targets = [Target("direct", sport, "gpt-5-nano", None, "fast")]
    nginx = litellm = None
    if nginx_exe:
        port = free_port()
        conf = nginx_config(workdir / "nginx", port, sport)
        nginx = stack.spawn("nginx", [str(nginx_exe), "-p", str(workdir / "nginx"), "-e",
                                      str(workdir / "nginx" / "error.log"), "-c", str(conf), "-g", "daemon off;"],
                            port)
    if litellm_exe:
        port = free_port()
        litellm = stack.spawn("litellm-proxy", [str(litellm_exe), "--config", str(litellm_config(workdir, sport)),
                                                "--host", HOST, "--port", str(port), "--num_workers", "1"],
                              port, env={**env, "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
                                         "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    fport = free_port()  # the local path's upstream exchange alone, in a plain aiohttp relay
    floor = stack.spawn("relay-floor", [python(), "-m", "bench.floor", "--port", str(fport),
                                        "--upstream", f"http://{HOST}:{sport}/llama"], fport, cwd=ROOT)
    gport = free_port()
    cfg = switchyard_config(workdir / "switchyard", sport)
    gw_env = {**env, "PYTHONPATH": str(args.src.resolve())} if args.src else env
    gw = stack.spawn("switchyard", switchyard_argv(cfg, gport), gport, env=gw_env, cwd=ROOT)
    if nginx:
        await wait_http(nginx, "/health", 20)
        targets.append(Target("nginx", nginx.port, "gpt-5-nano", nginx, "fast"))
    await wait_http(floor, "/v1/chat/completions", 20, method="POST",
                    body=json.dumps(bodies.small_turn("local", False)).encode())
    targets.append(Target("relay_floor", fport, "local", floor, "fast"))
    if litellm:
        t = await wait_http(litellm, "/health/liveliness", 180)
        log(f"  LiteLLM proxy up after {t:.1f} s")
        targets.append(Target("litellm_proxy", litellm.port, "bench", litellm, "slow"))
    await wait_http(gw, "/readyz", 60)
    # Its background litellm import holds the GIL for seconds after launch: measure after it finished.
    await wait_http(gw, "/v1/chat/completions", 120, method="POST",
                    body=json.dumps(bodies.small_turn("hosted", False)).encode())
    targets.append(Target("switchyard_local", gport, "local", gw, "fast"))
    hosted_speed = "slow" if args.src else "mid"  # older gateways ran every hosted chunk through litellm
    targets.append(Target("switchyard_hosted", gport, "hosted", gw, hosted_speed))
    targets.append(Target("switchyard_responses", gport, "hosted_responses", gw, hosted_speed))
    log(f"bench: {plan.mode} run, {plan.rounds} round(s) over {', '.join(t.name for t in targets)}")

    summary = await compare(plan, targets, standin, failures)
    derived = derive(summary)
    # The local exchange with no proxy at all (fresh connection, streamed answer): the floor under every
    # local "added" figure, as the direct row's keep-alive JSON is not.
    alone = sorted(await floor_mod.exchange_alone(f"http://{HOST}:{sport}/llama", bodies.small_turn("local", False),
                                                  plan.fast.json_c1 // 2))
    if "relay_floor" in derived and "direct" in summary:
        derived["relay_floor"]["exchange_alone_added_p50_ms"] = (
            alone[len(alone) // 2] * 1000 - summary["direct"]["json_c1"]["p50_ms"])
    for t in (nginx, floor, litellm, gw, standin):
        if t is not None:
            stack.stop(t)

    log("bench: classification cost (in-process)")
    cls = await decision.measure(cfg, 350_000, plan.decide_iterations, plan.exact_iterations)
    log(f"  350,000 chars: {cls['without_exact']['total']['p50_ms']:.3f} ms p50 by byte bounds "
        f"({cls['route']}, {cls['tokens_method']}); {cls['with_exact']['total']['p50_ms']:.1f} ms with exact count")

    log("bench: launch and memory")
    mem = await memory_and_launch(plan, stack, workdir, gw_env, failures)

    saturated = sorted({f"{n} {k}" for n, kinds in summary.items() for k, s in kinds.items()
                        if (s["client_busy_max"] or 0) >= 0.9})
    if saturated:
        notes.append("the load generator used ≥ 90 % of a core in: " + ", ".join(saturated)
                     + " (those rates are a lower bound)")
    foreign = [s["foreign_cores_mean"] for kinds in summary.values() for s in kinds.values()
               if s["foreign_cores_mean"] is not None]
    if foreign and max(foreign) >= 0.25:
        notes.append(f"other processes on the machine used up to {max(foreign):.2f} cores during some runs "
                     f"(mean {statistics.fmean(foreign):.2f}): those numbers are noisier")
    busy = sorted({f"{n} {k}" for n, kinds in summary.items() for k, s in kinds.items()
                   if (s["cores_busy_max"] or 0) >= 1.8})
    if busy:
        notes.append("both cores were busy (load generator + stand-in + proxy ≥ 1.8 cores) in: " + ", ".join(busy)
                     + "; at C=32 the proxies compete with the client and stand-in for the 2 cores")
    goal_list = goals(derived, cls, mem)
    prof = None
    missed = [g["goal"] for g in goal_list if g["status"] == "missed" and g["goal"].startswith(("local", "hosted"))]
    if args.profile or (missed and plan.mode == "full" and not args.no_profile):
        log("bench: profiling the gateway under load (py-spy)" + (f" because missed: {'; '.join(missed)}"
                                                                    if missed else ""))
        try:
            prof = await hotspots.profile(stack, workdir, list(hotspots.SCENARIOS),
                                          seconds=4 if smoke else 10, printer=log)
        except Exception as e:
            notes.append(f"profiling failed: {e}")
    return {"summary": summary, "derived": derived, "classification": cls, "memory": mem, "profile": prof,
            "goals": goal_list, "targets": [t.name for t in targets],
            "versions": {"nginx": _nginx_version(nginx_exe), "git": _git(),
                         "gateway_src": str(args.src) if args.src else None,
                         "litellm_proxy_venv": str(tools.VENV) if litellm_exe else None}}


def _git() -> dict[str, Any]:
    """Which gateway code was measured: HEAD and whether gateway/ had uncommitted changes."""
    def run(*argv: str) -> str:
        r = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    return {"commit": run("rev-parse", "--short", "HEAD") or None,
            "gateway_dirty": bool(run("status", "--porcelain", "--", "gateway"))}


def _nginx_version(exe: Path | None) -> str | None:
    if exe is None:
        return None
    r = subprocess.run([str(exe), "-v"], capture_output=True, text=True)
    return (r.stderr or r.stdout).strip().split("/")[-1] or None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="a few requests per target, < 60 s, nothing installed")
    p.add_argument("--rounds", type=int, help="interleaved rounds (full: 3)")
    p.add_argument("--out", type=Path, help="where the results JSON goes (full: bench/results/, smoke: a temp dir)")
    p.add_argument("--docs", action="store_true", help="also write docs/performance.{md,png} in smoke mode")
    p.add_argument("--no-docs", action="store_true", help="do not write docs/performance.{md,png}")
    p.add_argument("--no-litellm-proxy", action="store_true", help="skip the LiteLLM proxy target")
    p.add_argument("--keep", action="store_true", help="keep the work dir (configs, logs)")
    p.add_argument("--profile", action="store_true", help="profile the gateway with py-spy (full: automatic "
                   "when a Switchyard goal is missed)")
    p.add_argument("--no-profile", action="store_true", help="never profile")
    p.add_argument("--src", type=Path, help="measure the gateway/ package in this directory instead (a before/after "
                   "on the same machine: `git archive COMMIT gateway | tar -x -C DIR`)")
    args = p.parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    if args.rounds:
        plan = Plan(**{**plan.__dict__, "rounds": args.rounds})
    started = time.time()
    t0 = time.perf_counter()
    loadavg_start = Path("/proc/loadavg").read_text().split()[:3]
    workdir = Path(tempfile.mkdtemp(prefix="switchyard-bench-"))
    stack = Stack(workdir)
    failures: list[str] = []
    notes: list[str] = []
    result: dict[str, Any] | None = None
    try:
        result = asyncio.run(main_async(args, plan, workdir, stack, failures, notes))
    except Exception as e:
        failures.append(f"{type(e).__name__}: {e}")
        traceback.print_exc()
    finally:
        stack.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"bench: work dir kept: {workdir}")
    duration = time.perf_counter() - t0
    if result is not None:
        date = dt.date.fromtimestamp(started).isoformat()
        doc = {"date": date, "started_at": dt.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
               "duration_s": round(duration, 1), "mode": plan.mode, "ok": not failures,
               "failures": failures, "notes": notes,
               "machine": {**machine(), "loadavg_start": loadavg_start,
                           "loadavg_end": Path("/proc/loadavg").read_text().split()[:3]},
               "plan": {**plan.__dict__, "fast": plan.fast.__dict__, "slow": plan.slow.__dict__,
                        "mid": plan.mid.__dict__},
               "load": {"request_bytes": {m: len(json.dumps(bodies.small_turn(m, False))) for m in ("local",)},
                        "stream_chunks": 200, "labels": LABELS}, **result}
        out_dir = args.out or (ROOT / "bench" / "results" if plan.mode == "full" else Path(tempfile.gettempdir()))
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / (f"{date}.json" if plan.mode == "full" else f"smoke-{date}.json")
        path.write_text(json.dumps(doc, indent=1, default=float) + "\n")
        log(f"bench: results in {path}")
        if (plan.mode == "full" or args.docs) and not args.no_docs:
            md_path, png_path = ROOT / "docs" / "performance.md", ROOT / "docs" / "performance.png"
            report.write(doc, md_path, png_path, results_path=path)
            log(f"bench: wrote {md_path} and {png_path}")
        print(report.console(doc))
    for note in notes:
        log(f"bench: note: {note}")
    for f in failures:
        log(f"bench: FAILED: {f}")
    log(f"bench: {'ok' if not failures else 'FAILED'} in {duration:.0f} s")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())

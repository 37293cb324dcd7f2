"""Turn a results JSON into docs/performance.md, docs/performance.png and a console summary.

    .venv/bin/python -m bench.report bench/results/<date>.json   # rewrite the docs from saved results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ORDER = ("direct", "nginx", "relay_floor", "litellm_proxy", "switchyard_local", "switchyard_hosted",
         "switchyard_responses")
LABELS = {"direct": "direct (no proxy)", "nginx": "nginx `proxy_pass`",
          "relay_floor": "plain aiohttp relay (local exchange only)", "litellm_proxy": "LiteLLM proxy",
          "switchyard_local": "**Switchyard local**", "switchyard_hosted": "**Switchyard hosted (chat relay)**",
          "switchyard_responses": "**Switchyard hosted (Responses)**"}
# docs/performance.md keeps everything below this line across bench runs (before/after, designs).
KEEP_MARKER = "<!-- written by hand below: bench.report keeps it -->"
PLAIN = {k: v.replace("*", "").replace("`", "") for k, v in LABELS.items()}


def f_ms(x: float | None) -> str:
    if x is None:
        return "-"
    a = abs(x)
    if a < 1:
        return f"{x:.3f} ms"
    if a < 10:
        return f"{x:.2f} ms"
    return f"{x:.1f} ms"


def f_num(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def f_ratio(x: float | None) -> str:
    if x is None:
        return "-"
    if 0 < x < 0.1:
        return f"1/{1 / x:.0f}"
    return f"{x:.2f}x" if x < 10 else f"{x:.0f}x"


def _targets(doc: dict[str, Any]) -> list[str]:
    return [t for t in ORDER if t in doc["derived"]]


def tables(doc: dict[str, Any]) -> str:
    d = doc["derived"]
    s = doc["summary"]
    ts = _targets(doc)
    out = []
    out.append("### Non-streamed requests\n")
    out.append("| target | p50 C=1 | p99 C=1 | added p50 | added p99 | req/s C=32 | p50 C=32 | CPU / request |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for t in ts:
        m = d[t]
        cpu = f_ms(m["cpu_ms_per_request"]) if t != "direct" else "-"
        out.append(f"| {LABELS[t]} | {f_ms(m['p50_ms'])} | {f_ms(m['p99_ms'])} | {f_ms(m.get('added_p50_ms'))} | "
                   f"{f_ms(m.get('added_p99_ms'))} | {f_num(m['rps_c32'])} | {f_ms(m['p50_c32_ms'])} | {cpu} |")
    out.append("")
    out.append("### Streamed requests (200 chunks, a usage chunk, `data: [DONE]`)\n")
    out.append("| target | first chunk p50 C=1 | added | whole stream p50 C=1 | streams/s C=1 | streams/s C=32 "
               "| CPU / stream |")
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    for t in ts:
        m = d[t]
        cpu = f_ms(m["cpu_ms_per_stream"]) if t != "direct" else "-"
        out.append(f"| {LABELS[t]} | {f_ms(m['ttft_p50_ms'])} | {f_ms(m.get('added_ttft_p50_ms'))} | "
                   f"{f_ms(m['stream_p50_ms'])} | {f_num(m['streams_per_s_c1'])} | {f_num(m['streams_per_s_c32'])} "
                   f"| {cpu} |")
    out.append("")
    out.append("### Ratios to the baselines measured in the same run\n")
    out.append("| target | p50 vs direct | added p50 vs nginx | added p50 vs LiteLLM proxy | req/s vs nginx "
               "| req/s vs LiteLLM proxy | CPU/req vs nginx | CPU/req vs LiteLLM proxy "
               "| streams/s C=1 vs LiteLLM proxy | streams/s C=32 vs LiteLLM proxy | CPU/stream vs LiteLLM proxy |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in ts:
        if t == "direct":
            continue
        r = d[t]["ratios"]
        out.append(f"| {LABELS[t]} | {f_ratio(r['p50_ms']['vs_direct'])} | "
                   f"{f_ratio(r.get('added_p50_ms', {}).get('vs_nginx'))} | "
                   f"{f_ratio(r.get('added_p50_ms', {}).get('vs_litellm_proxy'))} | "
                   f"{f_ratio(r['rps_c32']['vs_nginx'])} | {f_ratio(r['rps_c32']['vs_litellm_proxy'])} | "
                   f"{f_ratio(r['cpu_ms_per_request']['vs_nginx'])} | "
                   f"{f_ratio(r['cpu_ms_per_request']['vs_litellm_proxy'])} | "
                   f"{f_ratio(r['streams_per_s_c1']['vs_litellm_proxy'])} | "
                   f"{f_ratio(r['streams_per_s_c32']['vs_litellm_proxy'])} | "
                   f"{f_ratio(r['cpu_ms_per_stream']['vs_litellm_proxy'])} |")
    out.append("")
    rounds = {t: s[t]["json_c32"]["rate_by_round"] for t in ts}
    out.append("Requests/s at C=32 by round (drift check): " + "; ".join(
        f"{PLAIN[t]} " + " / ".join(f_num(x) for x in v) for t, v in rounds.items()) + ".\n")
    return "\n".join(out)


def classification(doc: dict[str, Any]) -> str:
    c = doc.get("classification")
    if not c:
        return ""
    w, e = c["without_exact"], c["with_exact"]
    rq = c["request"]
    lines = [
        f"A build-agent opencode turn of {rq['chars']:,} characters ({rq['messages']} messages, {rq['tools']} tool "
        f"schemas, opencode's User-Agent), timed in-process: `parse_chat` → `Classifier.classify` → "
        f"`Decider.decide`. It classified as role `{c['role']}` from client `{c['client']}` and routed "
        f"`{' -> '.join(c['route'])}` by **{c['tokens_method']}** bounds: {c['reason']}.\n",
        "| step | p50 | p99 |", "|---|---:|---:|",
    ]
    for k, label in (("parse", "parse_chat (json.loads + shape checks)"), ("classify", "classify"),
                     ("decide", "decide"), ("total", "**total, byte bounds**")):
        lines.append(f"| {label} | {f_ms(w[k]['p50_ms'])} | {f_ms(w[k]['p99_ms'])} |")
    lines.append(f"| `count_tiktoken(body)` (o200k, {c['tiktoken_o200k']:,} tokens) | "
                 f"{f_ms(e['count_tiktoken']['p50_ms'])} | {f_ms(e['count_tiktoken']['p99_ms'])} |")
    lines.append(f"| **total, with an exact count** | {f_ms(e['total']['p50_ms'])} | {f_ms(e['total']['p99_ms'])} |")
    lines.append(f"\nThe first exact count in a process also loads the o200k encoding: "
                 f"{f_ms(e['first_count_ms'])}.\n")
    return "\n".join(lines)


def memory(doc: dict[str, Any]) -> str:
    m = doc.get("memory")
    if not m:
        return ""
    g, p, la = m["growth"], m["peak"], m["launch"]
    mix = ", ".join(f"{x['share']:.0%} {x['model']} {'streamed' if x['stream'] else 'non-streamed'}"
                    for x in g["mix"])
    series = " → ".join(f"{x['rss_kb'] / 1024:.1f}" for x in g["series"])
    return "\n".join([
        "| measure | value |", "|---|---:|",
        f"| launch: spawn `switchyard serve` → first 200 from `/v1/chat/completions` (local) | "
        f"{la['first_answer_s']:.2f} s |",
        f"| launch → first 200 on the hosted path (litellm imported) | {la['first_hosted_answer_s']:.2f} s |",
        f"| RSS idle after launch | {m['rss_idle_kb'] / 1024:.1f} MiB |",
        f"| RSS after the first {g['series'][0]['requests']:,} requests | {g['first_kb'] / 1024:.1f} MiB |",
        f"| RSS after {g['series'][-1]['requests']:,} requests | {g['last_kb'] / 1024:.1f} MiB "
        f"({g['growth_kb'] / 1024:+.1f} MiB, {'flat' if g['flat'] else 'growing'}) |",
        f"| peak RSS, {p['concurrent']} concurrent {p['request_bytes'] / 1e6:.1f} MB requests in flight "
        f"({p['max_in_flight_at_upstream']} held at the upstream at once) | "
        f"{max(p['peak_rss_kb'], p['vmhwm_kb']) / 1024:.0f} MiB |",
        f"| … per request in flight, over the {p['rss_before_kb'] / 1024:.0f} MiB before | "
        f"{p['per_request_kb'] / 1024:.1f} MiB |",
        f"| RSS 1 s after those answered | {p['rss_after_kb'] / 1024:.0f} MiB |",
        "",
        f"Growth run: {g['series'][-1]['requests']:,} requests of mixed traffic ({mix}); RSS in MiB every "
        f"{g['series'][0]['requests']:,}: {series}"
        + (f" (least-squares slope {g['slope_kib_per_1000']:+.0f} KiB per 1,000 requests)"
           if g.get("slope_kib_per_1000") is not None else "")
        + f". Flat means {g['tolerance']}.",
    ])


def profile(doc: dict[str, Any]) -> str:
    prof = doc.get("profile")
    if not prof:
        return ""
    out = [f"`{prof['tool']}` on a gateway of its own, {prof['seconds']} s per scenario at {prof['rate']} "
           "samples/s (`python -m bench.hotspots` reruns it). Percentages are of the gateway's busy samples; "
           "\"inclusive\" counts a function with everything it calls (the event loop and the handler wrappers "
           "every request passes through are left out), \"self\" the line itself (time in C code and system "
           "calls lands on the Python line that called it).\n"]
    for name, s in prof.items():
        if not isinstance(s, dict):
            continue
        out.append(f"**{name}** ({s['model']}, {'streamed' if s['stream'] else 'non-streamed'}, C={s['concurrency']}):"
                   f" {s['rps']:,.0f} requests/s, {s['cpu_ms_per_request']:.2f} ms CPU per request.\n")
        out.append("| inclusive | function | self | line |")
        out.append("|---:|---|---:|---|")
        inc = (s.get("notable_inclusive") or s["gateway_inclusive"])[:16]
        slf = s["self_by_line"][:16]
        for i in range(max(len(inc), len(slf))):
            a = inc[i] if i < len(inc) else ("", None)
            b = slf[i] if i < len(slf) else ("", None)
            out.append(f"| {'' if a[1] is None else f'{a[1]:.1f}%'} | {'`' + a[0] + '`' if a[0] else ''} | "
                       f"{'' if b[1] is None else f'{b[1]:.1f}%'} | {'`' + b[0] + '`' if b[0] else ''} |")
        out.append("")
    return "\n".join(out)


def goals(doc: dict[str, Any]) -> str:
    lines = ["| goal | target | this run | |", "|---|---|---|---|"]
    for g in doc["goals"]:
        mark = {"met": "✅ met", "missed": "❌ **missed**", "n/a": "- n/a"}[g["status"]]
        lines.append(f"| {g['goal']} | {g['target']} | {g.get('shown') or '-'} | {mark} |")
    return "\n".join(lines)


def _commit(doc: dict[str, Any]) -> str:
    g = doc.get("versions", {}).get("git") or {}
    c = g.get("commit") or "unknown"
    return f"`{c}`" + (" with uncommitted changes in gateway/" if g.get("gateway_dirty") else "")


def markdown(doc: dict[str, Any], results_rel: str, png_rel: str) -> str:
    mc = doc["machine"]
    pl = doc["plan"]
    fast, slow = pl["fast"], pl["slow"]
    mid = pl.get("mid") or slow
    ts = [PLAIN[t] for t in _targets(doc)]
    notes = "".join(f"- {n}\n" for n in doc.get("notes", []))
    fails = "".join(f"- {f}\n" for f in doc.get("failures", []))
    return f"""# Performance

How much Switchyard adds to a request, measured against the same upstream reached directly, through
nginx and through LiteLLM's proxy. Numbers below are from the run of {doc['date']}
(`{results_rel}`, {doc['duration_s']:.0f} s); rerun with **`make bench`** (about 4 minutes once nginx and
the LiteLLM proxy venv are installed; `python -m bench.run --smoke` checks every target in under a minute).

**Setup.** One machine, {mc['cpus']} cores ({mc['cpu'] or 'unknown CPU'}), {mc['mem_gib']} GiB, Linux
{mc['kernel']}, Python {mc['python']}, aiohttp {mc['aiohttp']}, litellm {mc['litellm']}, nginx
{doc['versions'].get('nginx') or '-'}; Switchyard at commit {_commit(doc)}. Everything on loopback:

- **upstream stand-in** (`bench/standin.py`): a raw-asyncio HTTP/1.1 server in OpenAI's wire format — a
  canned chat completion, or a 200-chunk SSE stream with a usage chunk and `data: [DONE]`, one write per
  chunk; the same answer in the Responses API's shape at `/v1/responses` (200 events); it answers `/health`
  and `/props` like llama-server, and under `/llama/` closes every chat connection as llama-server does.
- **direct**: the load generator talks to the stand-in itself — the floor every "added" number is taken from.
- **nginx**: `proxy_pass` with one worker, upstream keep-alive, `proxy_buffering off`.
- **plain aiohttp relay** (`bench/floor.py`): what any aiohttp proxy in front of llama-server pays before
  doing a proxy's work — the local path's upstream exchange and nothing else (a fresh connection per
  request to the `/llama` routes, the answer asked for as a stream and, for a non-streamed request,
  joined into one JSON; orjson, raw asyncio streams, uvloop; no classification, queue, breaker, ledger
  or metrics). Switchyard local minus this row is Switchyard's own work.
- **LiteLLM proxy** 1.110.2: one worker, no database, no master key, quiet logging (its own venv:
  `bench/tools.py` says why not `litellm[proxy]`).
- **Switchyard local**: `switchyard serve`, model `local` = the llama.cpp byte relay (`embedded: false`,
  64 slots so the queue never waits) at the stand-in's `/llama` routes, which answer like llama-server
  (`Connection: close` on every chat answer), so every request opens a fresh upstream connection.
  **Switchyard hosted (chat relay)**: model `hosted` = `openai/gpt-5-nano` at the stand-in, an OpenAI
  chat-completions provider (litellm builds the request, the answer's bytes are relayed).
  **Switchyard hosted (Responses)**: model `hosted_responses` = `openai/responses/gpt-5-nano` (what
  `switchyard.yaml` ships for zen): the stand-in answers the Responses API (200 events) and each event is
  translated to a chat chunk. One process, `SWITCHYARD_LOG_LEVEL=WARNING`.
- **load**: `bench/load.py`, a raw-asyncio client with one keep-alive connection per concurrent worker,
  sending a {doc['load']['request_bytes']['local']:,}-byte opencode-style turn. Per target: non-streamed at
  C=1 ({fast['json_c1']:,} requests; {mid['json_c1']:,} for Switchyard's hosted targets, {slow['json_c1']:,}
  for LiteLLM's proxy) and C=32 ({fast['json_c32']:,}; {mid['json_c32']:,}; {slow['json_c32']:,}), streamed at
  C=1 ({fast['stream_c1']:,}; {mid['stream_c1']:,}; {slow['stream_c1']:,}) and C=32 ({fast['stream_c32']:,};
  {mid['stream_c32']:,}; {slow['stream_c32']:,}), in {pl['rounds']} interleaved rounds (every target
  in each round, the order rotated) after a warm-up; latencies pooled over the rounds.
- **CPU per request**: the proxy's processes' `utime+stime` from `/proc/PID/stat` around the C=32 runs,
  divided by the requests served.

Targets in this run: {', '.join(ts)}.

## Goals (issues 6 and 15)

{goals(doc)}

![Added latency, throughput, time to first chunk and CPU per request]({png_rel})

## Latency, throughput, CPU

{tables(doc)}
"Added" = the target's percentile minus direct's. Time to first chunk is measured to the first body byte.

## Deciding a 350,000-character request

{classification(doc)}
## Launch and memory

A second gateway started just for this (its own stand-in, whose `/props` reports a 2M-token context so
1.4 MB requests go to the local backend instead of being refused by the ceiling check):

{memory(doc)}

{('## Where the gateway spends its time' + chr(10) + chr(10) + profile(doc)) if doc.get('profile') else ''}
## Reading these numbers

- Two cores run everything: at C=32 the load generator, the stand-in and the proxy under test compete
  for them, so requests/s are for this machine as a whole, not for the proxy alone (the CPU-per-request
  column is the proxy's own cost). The stand-in answers {f_num(doc['derived'].get('direct', {}).get('rps_c32'))}
  requests/s directly at C=32, far above any proxy.
- The stand-in keeps connections alive, and nginx is configured to use that. Switchyard's llama.cpp backend
  talks to the stand-in's llama-server routes, which close every chat connection as llama-server does, so
  its numbers include a TCP connect and close per request; in front of a real llama-server nginx would pay
  that too. Switchyard's hosted backends keep their provider connections alive, as providers allow.
- Time to first chunk is taken at the first body byte: for the local path and the chat relay it is the
  relay's first write; for LiteLLM's proxy it comes after litellm has parsed and re-serialised the first chunk.
- Each number pools {pl['rounds']} round(s); the per-round rates above show how much the machine drifted
  (another engineer's test suite may share it: the notes say when other processes took CPU).

## Notes

{notes or '- none'}
{('**Failures in this run:**' + chr(10) + fails) if fails else ''}"""


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:  # the bench's only extra dependency: install it into this venv on first use
        import subprocess

        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"], check=True)
        import matplotlib
    return matplotlib


def plot(doc: dict[str, Any], path: Path) -> None:
    matplotlib = _matplotlib()

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = doc["derived"]
    ts = [t for t in _targets(doc)]
    names = [PLAIN[t].replace(" (no proxy)", "").replace(" proxy_pass", "").replace("Switchyard ", "Switchyard\n")
             .replace("LiteLLM proxy", "LiteLLM\nproxy").replace(" (local exchange only)", "\n(exchange only)")
             for t in ts]
    colors = ["#9e9e9e" if t == "direct" else "#1f77b4" if t.startswith("switchyard") else "#ff7f0e" for t in ts]
    panels = [
        ("Added p50 latency at C=1 (ms, log)", [max(d[t].get("added_p50_ms") or 0, 1e-3) for t in ts], True),
        ("Requests/s at C=32, non-streamed (log)", [d[t]["rps_c32"] or 0 for t in ts], True),
        ("Time to first chunk, p50 at C=1 (ms, log)", [d[t]["ttft_p50_ms"] or 0 for t in ts], True),
        ("Proxy CPU per request at C=32 (ms, log)", [d[t]["cpu_ms_per_request"] or 0 for t in ts], True),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (title, values, logy) in zip(axes.flat, panels, strict=True):
        idx = [i for i, v in enumerate(values) if v > 0 and not (title.startswith(("Added", "Proxy")) and
                                                                  ts[i] == "direct")]
        bars = ax.bar([names[i] for i in idx], [values[i] for i in idx], color=[colors[i] for i in idx])
        ax.set_title(title, fontsize=10)
        if logy:
            ax.set_yscale("log")
        for b, i in zip(bars, idx, strict=True):
            v = values[i]
            label = f"{v:,.0f}" if v >= 100 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"
            ax.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Switchyard bench {doc['date']} — {doc['machine']['cpus']} cores, loopback, "
                 f"{doc['plan']['rounds']} rounds", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(doc: dict[str, Any], md_path: Path, png_path: Path, results_path: Path) -> None:
    root = md_path.parent.parent
    try:
        rel = str(results_path.resolve().relative_to(root.resolve()))
    except ValueError:
        rel = str(results_path)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    plot(doc, png_path)
    kept = ""
    if md_path.exists():
        old = md_path.read_text()
        at = old.find(KEEP_MARKER)
        kept = old[at:] if at >= 0 else ""
    body = markdown(doc, "../" + rel if not rel.startswith("/") else rel, png_path.name)
    md_path.write_text(body.rstrip("\n") + "\n\n" + (kept or KEEP_MARKER + "\n"))


def console(doc: dict[str, Any]) -> str:
    d = doc["derived"]
    w = max(len(PLAIN[t]) for t in _targets(doc)) + 2
    lines = [f"{'target':<{w}}{'p50 C=1':>11}{'added p50':>11}{'p99 C=1':>11}{'req/s C=32':>12}"
             f"{'TTFT p50':>11}{'streams/s':>11}{'CPU/req':>11}"]
    for t in _targets(doc):
        m = d[t]
        lines.append(f"{PLAIN[t]:<{w}}{f_ms(m['p50_ms']):>11}{f_ms(m.get('added_p50_ms')):>11}{f_ms(m['p99_ms']):>11}"
                     f"{f_num(m['rps_c32']):>12}{f_ms(m['ttft_p50_ms']):>11}{f_num(m['streams_per_s_c1']):>11}"
                     f"{(f_ms(m['cpu_ms_per_request']) if t != 'direct' else '-'):>11}")
    lines.append("")
    for g in doc["goals"]:
        lines.append(f"  [{g['status']:^6}] {g['goal']}: {g['target']}; {g.get('shown') or '-'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m bench.report bench/results/<date>.json", file=sys.stderr)
        return 2
    path = Path(args[0])
    doc = json.loads(path.read_text())
    root = Path(__file__).resolve().parent.parent
    write(doc, root / "docs" / "performance.md", root / "docs" / "performance.png", path)
    print(console(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())

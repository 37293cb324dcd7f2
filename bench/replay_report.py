"""The replay's results as the tables in docs/performance.md.

    .venv/bin/python -m bench.replay_report bench/results/replay-DATE.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.replay import summarize

SCENARIO_NAMES = {"owui_chat": "Open WebUI chat", "opencode": "opencode session", "two_chats": "two chats interleaving"}
SETUP_NAMES = {"np1": "`-np 1 --cache-ram 0`", "np2": "`-np 2 --cache-ram 0`"}


def _f(v: Any, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def table(summaries: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| variant | from cache, continuing turns | of what was reusable | TTFT p50 | TTFT p95 | turns on hosted "
             "| hosted requests (prompt tokens) | median TTFT prediction error |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for variant, s in summaries.items():
        lines.append(
            f"| {variant} | {_f(s['cache_share_continuing_turns'], '{:.0%}')} ({s['continuing_turns_on_local']} turns) "
            f"| {_f(s.get('cache_share_of_reusable'), '{:.0%}')} "
            f"| {_f(s['ttft_p50_s'])} s | {_f(s['ttft_p95_s'])} s | {s['turns_on_hosted']}/{s['interactive_turns']} "
            f"| {s['hosted_requests']} ({s['hosted_prompt_tokens']:,}) "
            f"| {_f(s['prediction_error_median'], '{:.0%}')} (n={s['predictions']}) |")
    return lines


def report(out: dict[str, Any]) -> str:
    lines: list[str] = []
    for setup, by_s in out["runs"].items():
        for scenario, by_v in by_s.items():
            lines += [f"**{SCENARIO_NAMES.get(scenario, scenario)}, {SETUP_NAMES.get(setup, setup)}**", ""]
            lines += table({v: summarize(rows) for v, rows in by_v.items()})
            lines.append("")
    variants = {v for by_s in out["runs"].values() for by_v in by_s.values() for v in by_v}
    overall = {v: summarize([r for by_s in out["runs"].values() for by_v in by_s.values() for r in by_v.get(v, [])])
               for v in ("static", "cache_aware", "all_local", "fastest") if v in variants}
    lines += ["**All scenarios and setups together**", "", *table(overall), ""]
    return "\n".join(lines)


def main() -> int:
    print(report(json.loads(Path(sys.argv[1]).read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`switchyard` command line: serve, explain, check, key, usage, ceiling."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from .config import ConfigError, LiteLLMBackend, LlamaCppBackend, Settings, load_settings
from .explain import explain

DEFAULT_CONFIG = os.environ.get("SWITCHYARD_CONFIG", "switchyard.yaml")


def _load(path: str) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as e:
        print(f"switchyard: invalid configuration:\n{e}", file=sys.stderr)
        raise SystemExit(2) from e


# ---- serve -------------------------------------------------------------------------------------

async def _answers(url: str) -> bool:
    import aiohttp

    try:
        async with aiohttp.ClientSession() as s, s.get(f"{url}/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
            return r.status in (200, 503)
    except (aiohttp.ClientError, TimeoutError):
        return False


async def _serve(settings: Settings, host: str, port: int) -> None:
    from .app import create_app
    from .backends.llamacpp import LlamaCppBackend as Local
    from .embedded import LlamaServer
    from .endpoints import RUNTIME
    from .firstrun import STARTUP, BuildProgress, TerminalReport, bring_up
    from .server import start_site

    app = create_app(settings)
    rt = app[RUNTIME]
    embedded: list[LlamaServer] = []
    notes: list[str] = []
    # The embedded llama-server is built and started *after* we listen (a first build takes minutes):
    # meanwhile the backend is `starting`, routing skips it with the progress as the reason.
    startup: dict[str, BuildProgress] = {}
    app[STARTUP] = startup
    for name, cfg in settings.gateway.backends.items():
        if (isinstance(cfg, LlamaCppBackend) and cfg.embedded and name in rt.backends  # not a tier
                and not await _answers(cfg.url)):
            backend = rt.backends[name]
            assert isinstance(backend, Local)
            startup[name] = progress = BuildProgress(name)
            backend.starting = progress.reason()
            notes.append(f"{name}: nothing answered at {cfg.url}, so the embedded llama-server (SmolLM2-135M) is "
                         f"starting in the background (the first run builds it: ~6-15 min on 2 cores); set "
                         f"backends.{name}.url in {settings.path} to your llama-server")
    runner = await start_site(app, host, port, settings.gateway.server, auth=settings.gateway.auth)
    _banner(settings, rt, host, port, notes)
    report = TerminalReport()
    tasks: list[asyncio.Task[None]] = []
    for name, progress in startup.items():
        backend, cfg = rt.backends[name], settings.gateway.backends[name]
        assert isinstance(backend, Local) and isinstance(cfg, LlamaCppBackend)
        tasks.append(asyncio.create_task(bring_up(progress, report, backend, min(cfg.context_limit or 8192, 8192),
                                                  embedded, _publisher(rt, name), rt.refresh_all),
                                         name=f"embedded-{name}"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for task in tasks:  # a build still running is killed (its process group); the next run resumes it
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await runner.cleanup()
        for server in embedded:
            server.stop()


def _publisher(rt: Any, name: str) -> Callable[[str], None]:
    """Sets the backend's last probe result to the embedded bring-up's reason (for /readyz, /status.json)."""
    from .backends.base import ProbeResult

    def publish(reason: str) -> None:
        rt.last_probe[name] = ProbeResult(False, reason)

    return publish


def _banner(settings: Settings, rt: Any, host: str, port: int, notes: list[str]) -> None:
    lines = [f"switchyard listening on http://{host}:{port}/v1  (config {settings.path}, "
             f"teams: {', '.join(sorted(settings.policies))})",
             f"  status page: http://{host}:{port}/"]
    from .tiers import members as tier_members

    members = tier_members(settings.gateway)  # a tier's members, one line each
    for name, backend in rt.backends.items():
        probe = rt.last_probe.get(name)
        cfg = members[name]
        if isinstance(cfg, LiteLLMBackend):
            if cfg.api_key_env and not cfg.api_key:
                state = f"NOT LIVE: set {cfg.api_key_env} to use it"
            else:
                state = "live (key set)" if cfg.api_key_env else "live"
            where = f"{cfg.model} at {cfg.api_base or 'provider default'}"
        elif getattr(backend, "starting", None):
            state = "STARTING: embedded llama-server"
            where = "SmolLM2-135M, progress below and on the status page"
        else:
            state = "live" if probe and probe.ready else f"NOT LIVE: {probe.detail if probe else '?'}"
            where = f"llama.cpp at {backend.url} (context {backend.context_window})"
        lines.append(f"  {name:<10} {state:<40} {where}")
    lines += [f"  note: {n}" for n in notes]
    print("\n".join(lines), file=sys.stderr, flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    host = args.host or settings.gateway.listen.host
    port = args.port if args.port is not None else settings.gateway.listen.port
    run_loop: Any = asyncio.run
    if os.environ.get("SWITCHYARD_LOOP", "uvloop") == "uvloop":  # SWITCHYARD_LOOP=asyncio opts out
        # uvloop: ~10 % less CPU per request (decision 97). It was opt-in while the ledger's writer was
        # woken through the loop and stalled on it under load; the writer is its own thread now.
        with contextlib.suppress(ImportError):  # not built for this platform: asyncio's loop
            from uvloop import run as run_loop
    # A request allocates a few hundred short-lived containers: with the default threshold (700) the
    # young generation was collected every request or two, ~7 % of the local path's CPU. Cycles are
    # still collected, just in larger, rarer batches (RSS stays flat in `make bench`).
    gc.set_threshold(10_000, 50, 100)
    # The ledger's writer thread (and litellm's import thread at start) waits at most this long for the
    # GIL while the loop is busy; 5 ms left commits 200-500 ms apart under load (decision 97).
    sys.setswitchinterval(0.001)
    with contextlib.suppress(KeyboardInterrupt):
        run_loop(_serve(settings, host, port))
    return 0


# ---- explain -----------------------------------------------------------------------------------

def cmd_explain(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    raw = sys.stdin.buffer.read() if args.request == "-" else Path(args.request).read_bytes()
    headers: CIMultiDict[str] = CIMultiDict()
    for h in args.header or []:
        name, sep, value = h.partition(":")
        if not sep:
            print(f"switchyard explain: --header must look like 'Name: value', got {h!r}", file=sys.stderr)
            return 2
        headers.add(name.strip(), value.strip())
    from .errors import GatewayError

    try:
        out = asyncio.run(explain(settings, raw, CIMultiDictProxy(headers), args.live, args.gateway,
                                   args.team, args.key))
    except GatewayError as e:
        print(json.dumps(e.payload()), file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2))
    return 0


# ---- check -------------------------------------------------------------------------------------

def cmd_check(args: argparse.Namespace) -> int:
    """Validate switchyard.yaml and every policy file (or the policy files in DIR)."""
    from .config import load_gateway, load_policies, policies_dir_of

    if args.dir and Path(args.dir).is_file():
        print(f"switchyard check: {args.dir} is a file; `check` takes a policies folder. To check a config "
              f"file, run: switchyard check --config {args.dir}", file=sys.stderr)
        return 2
    try:
        gateway = load_gateway(Path(args.config))
        directory = Path(args.dir) if args.dir else policies_dir_of(Path(args.config), gateway)
        policies, files = load_policies(directory, gateway)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 1
    print(f"ok: {args.config} and {len(policies)} policy file(s): " + ", ".join(str(p) for p in files.values()))
    return 0


# ---- keys --------------------------------------------------------------------------------------

def _policy_file(settings: Settings, team: str) -> Path:
    path = settings.policy_files.get(team)
    if path is None:
        raise SystemExit(f"switchyard: no policy file defines team {team!r} "
                         f"(teams: {', '.join(sorted(settings.policy_files))})")
    return path


def cmd_key(args: argparse.Namespace) -> int:
    from .keyfile import add_key, revoke_keys
    from .teams import hash_key, new_key

    settings = _load(args.config)
    path = _policy_file(settings, args.team)
    try:
        if args.action == "add":
            key = new_key()
            add_key(path, hash_key(key), settings.gateway)
            _load(args.config)  # the whole set still valid?
            print(key)
            print(f"(stored only as its sha256 in {path}; this is the only time the key is shown)", file=sys.stderr)
            return 0
        target = args.key or ""
        digest = hash_key(target) if target.startswith("sy-") else target.lower()
        if len(digest) < 8:
            print("switchyard key revoke: give the key itself or at least 8 hex digits of its hash", file=sys.stderr)
            return 2
        removed = revoke_keys(path, digest, settings.gateway)
    except ConfigError as e:
        print(f"switchyard key: {path} left unchanged:\n{e}", file=sys.stderr)
        return 1
    if not removed:
        print(f"switchyard key revoke: no key of team {args.team!r} matches", file=sys.stderr)
        return 1
    print(f"revoked {removed} key(s) of team {args.team!r}")
    return 0


# ---- usage -------------------------------------------------------------------------------------

def cmd_usage(args: argparse.Namespace) -> int:
    from .ledger import ledger_path, parse_since, usage_table

    settings = _load(args.config)
    try:
        since = parse_since(args.since)
    except ValueError as e:
        print(f"switchyard usage: {e}", file=sys.stderr)
        return 2
    path = ledger_path(settings.gateway.data_dir, settings.gateway.ledger_path)
    rows = usage_table(path, since, args.team)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("team", "backend", "requests", "ok", "tokens_in", "tokens_out", "cost", "avg_latency_ms", "failovers")
    table = [header] + [(r["team"], r["backend"], r["requests"], r["ok"], r["tokens_in"] or 0, r["tokens_out"] or 0,
                         f"${(r['cost'] or 0):.4f}", f"{(r['avg_latency_ms'] or 0):.0f}", r["failovers"] or 0)
                        for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)))
    if not rows:
        print(f"(no requests since {args.since} in {path})")
    return 0


# ---- ceiling -----------------------------------------------------------------------------------

def cmd_ceiling(args: argparse.Namespace) -> int:
    from .ceiling import CrashCeilings, state_path

    settings = _load(args.config)
    ceilings = CrashCeilings(state_path(settings.gateway.data_dir))
    if args.action == "reset":
        ceilings.reset(args.backend)
        print(f"reset learned crash ceiling for {args.backend or 'all backends'}")
        return 0
    print(json.dumps({"file": str(ceilings.path), "ceilings": ceilings.entries}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("SWITCHYARD_LOG_LEVEL", "INFO"), format="%(message)s",
                        stream=sys.stderr)
    for noisy in ("LiteLLM", "litellm", "httpx", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(prog="switchyard", description="OpenAI-compatible LLM routing gateway")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="path to switchyard.yaml")
    p.add_argument("--host", help="listen address (default: from config)")
    p.add_argument("--port", type=int, help="listen port (default: from config)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("explain", help="show how a request would be classified and routed, without sending it")
    p.add_argument("request", help="a chat completion request body (JSON file, or - for stdin)")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--header", action="append", metavar="'Name: value'", help="a request header (repeatable)")
    p.add_argument("--live", action="store_true",
                   help="ask the backends and the running gateway (circuits) for their live state first")
    p.add_argument("--gateway", help="URL of the running gateway for --live (default: the config's listen address)")
    p.add_argument("--team", help="decide as this team")
    p.add_argument("--key", help="decide as the team this API key belongs to")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("check", help="validate the config and every policy file")
    p.add_argument("dir", nargs="?", help="a policies directory (default: the config's policies_dir)")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("key", help="add or revoke a team API key (stored as a sha256 hash)")
    p.add_argument("action", choices=["add", "revoke"])
    p.add_argument("team")
    p.add_argument("key", nargs="?", help="revoke: the key, or its hash (at least 8 hex digits)")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.set_defaults(func=cmd_key)

    p = sub.add_parser("usage", help="requests, tokens and cost per team and backend, from the ledger")
    p.add_argument("--team")
    p.add_argument("--since", default="7d", help="e.g. 7d, 24h, 30m (default 7d)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser("ceiling", help="show or reset the learned crash ceilings")
    p.add_argument("action", choices=["show", "reset"])
    p.add_argument("backend", nargs="?", help="only this backend (reset)")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.set_defaults(func=cmd_ceiling)

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())

"""First run of the embedded backend: build llama-server in the background and show how far it is.

`serve` listens at once; this module brings the embedded llama-server up behind it. The build
script (scripts/ensure-llama-server.sh) reports on stderr, read here live, line by line:

    ensure-llama-server: [step compile] compiling llama-server with 2 jobs (first run only, ~6-15 min on 2 cores)
    [ 42%] Building CXX object src/CMakeFiles/llama.dir/llama-model.cpp.o
    ensure-llama-server: FAILED: no cmake (apt-get install cmake)

`BuildProgress` is the one state object (step, percent, elapsed, last lines) that the terminal
line, `/status.json`'s `startup` and the route reason (`local: embedded llama-server building,
42 %`) are all drawn from, so they never disagree.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TextIO

from aiohttp import web

from .backends.llamacpp import LlamaCppBackend
from .embedded import Artifacts, LlamaServer, cache_dir, ensure_script, parse_artifacts, preset_artifacts

# What each step is called on screen, in the order the script runs them.
STEPS: dict[str, str] = {
    "check": "checking the cache",
    "download": "downloading the llama.cpp source",
    "cmake": "installing cmake",
    "configure": "configuring the build",
    "compile": "compiling llama-server",
    "model": "fetching the SmolLM2-135M model",
    "load": "starting llama-server",
    "done": "ready",
}
STEP_RE = re.compile(r"^ensure-llama-server: \[step (\w+)\] ?(.*)$")
FAILED_RE = re.compile(r"^ensure-llama-server: FAILED: (.*)$")
PERCENT_RE = re.compile(r"^\[\s*(\d{1,3})%\]")  # cmake's Makefile generator: "[ 42%] Building CXX object ..."
ERROR_RE = re.compile(r"(?i:\berror:)|CMake Error")  # gcc, pip ("ERROR: ..."), cmake
TAIL = 30  # lines kept for the status page and the failure report
LINE_MAX = 400


class BuildFailed(RuntimeError):
    pass


class Phase(StrEnum):
    """building -> loading -> ready; building or loading -> failed (final until `serve` restarts)."""

    BUILDING = "building"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass
class BuildProgress:
    """Where the embedded backend's bring-up is: building -> loading -> ready, or failed."""

    backend: str
    clock: Callable[[], float] = time.monotonic
    state: Phase = Phase.BUILDING
    step: str = "check"
    detail: str = "checking the cache"
    percent: int | None = None
    error: str | None = None
    hint: str | None = None
    url: str | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL))
    steps_done: list[dict[str, Any]] = field(default_factory=list)
    started: float = 0.0
    step_started: float = 0.0
    ended: float | None = None

    def __post_init__(self) -> None:
        self.started = self.step_started = self.clock()

    # ---- moves -------------------------------------------------------------------------------

    def feed(self, line: str) -> bool:
        """One line of the build's stderr. True when the step or percentage changed."""
        line = line.rstrip()[:LINE_MAX]
        if not line.strip():
            return False
        self.tail.append(line)
        if m := STEP_RE.match(line):
            self.begin(m.group(1), m.group(2))
            return True
        if m := FAILED_RE.match(line):
            self.error = m.group(1)
            return False
        if m := PERCENT_RE.match(line):
            pct = min(int(m.group(1)), 100)
            if self.step != "compile":  # a script without step markers: cmake's lines say enough
                self.begin("compile")
            if self.percent is None or pct > self.percent:  # -j2 prints slightly out of order
                self.percent = pct
                return True
        return False

    def begin(self, step: str, detail: str = "") -> None:
        now = self.clock()
        self.steps_done.append({"step": self.step, "seconds": round(now - self.step_started, 1)})
        self.step, self.step_started = step, now
        self.detail = detail or STEPS.get(step, step)
        self.percent = None
        if step == "load":
            self.state = Phase.LOADING

    def ready(self, url: str) -> None:
        self.begin("done", f"serving at {url}")
        self.state, self.url, self.ended = Phase.READY, url, self.clock()

    def fail(self, message: str) -> None:
        self.state, self.ended = Phase.FAILED, self.clock()
        if not self.error and message.strip():
            self.error = message.strip().splitlines()[-1]
        self.hint = hint_for([*self.tail, message])

    # ---- views -------------------------------------------------------------------------------

    @property
    def elapsed(self) -> float:
        return (self.ended or self.clock()) - self.started

    @property
    def step_elapsed(self) -> float:
        return self.clock() - self.step_started

    @property
    def label(self) -> str:
        return STEPS.get(self.step, self.step)

    def reason(self) -> str | None:
        """Why the backend cannot take requests now (the route reason and probe detail), or None."""
        took = clock_text(self.elapsed)
        if self.state == Phase.READY:
            return None
        if self.state == Phase.FAILED:
            return f"embedded llama-server failed to start ({self.error or 'see the status page'})"
        if self.state == Phase.LOADING:
            return f"embedded llama-server starting (loading the model, {took})"
        if self.percent is not None:
            return f"embedded llama-server building, {self.percent} % ({self.label}, {took})"
        return f"embedded llama-server building ({self.label}, {took})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend, "state": self.state, "step": self.step, "label": self.label,
            "detail": self.detail, "percent": self.percent, "elapsed_s": round(self.elapsed, 1),
            "step_elapsed_s": round(self.step_elapsed, 1), "steps_done": list(self.steps_done),
            "reason": self.reason(), "error": self.error, "hint": self.hint, "url": self.url,
            "tail": list(self.tail),
        }


# What to install, by what the build said. First match wins; the default covers the rest.
HINTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\bno cmake\b|cmake: (command )?not found", re.I), "install cmake (apt-get install cmake)"),
    (re.compile(r"CMAKE_CXX?_COMPILER|c\+\+: (command )?not found|No CMAKE_C", re.I),
     "install a C/C++ compiler (apt-get install build-essential)"),
    (re.compile(r"No module named pip", re.I), "install pip for the Python that runs switchyard "
                                               "(apt-get install python3-pip, or use the .venv `make run` makes)"),
    (re.compile(r"Could not find a version|No matching distribution|Name or service not known|"
                r"Temporary failure in name resolution|ConnectionError|HTTPSConnection", re.I),
     "the build downloads from PyPI: check network access (or a PIP_INDEX_URL mirror)"),
    (re.compile(r"No space left on device", re.I), "free disk space (the build needs ~1 GB in ~/.cache/switchyard)"),
)
DEFAULT_HINT = ("the build needs cmake, a C/C++ compiler (apt-get install cmake build-essential) and access to "
                "PyPI; run `bash scripts/ensure-llama-server.sh` to see its whole output, or point "
                "backends.local.url at your own llama-server")


def hint_for(lines: list[str]) -> str:
    text = "\n".join(lines)
    for pattern, hint in HINTS:
        if pattern.search(text):
            return hint
    return DEFAULT_HINT


def first_error(lines: deque[str] | list[str]) -> str:
    """The line that says what went wrong: a compiler's `error:`, else the last line."""
    errors = [ln.strip() for ln in lines if ERROR_RE.search(ln)]
    return errors[0] if errors else next((ln.strip() for ln in reversed(lines) if ln.strip()), "no output")


def clock_text(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# ---- the terminal ---------------------------------------------------------------------------------

class TerminalReport:
    """One updating line per step on a TTY (`\\r`); on a pipe or file, a plain line per step and per 10 %."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._step: str | None = None
        self._decile = -1
        self._open_line = False

    def _write(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.stream.write(text)
            self.stream.flush()

    def _line(self, p: BuildProgress) -> str:
        pct = "" if p.percent is None else f" {p.percent:3d} % {bar(p.percent)}"
        return (f"switchyard: {p.backend}: {p.label}{pct}  {clock_text(p.step_elapsed)} "
                f"(total {clock_text(p.elapsed)})")

    def update(self, p: BuildProgress) -> None:
        if p.state in (Phase.READY, Phase.FAILED):
            self._end(p)
            return
        new_step = p.step != self._step
        if self.tty:
            if new_step and self._open_line:
                self._close_step(p)
            self._write("\r\033[K" + self._line(p))
            self._open_line = True
        elif new_step:
            self._write(f"switchyard: {p.backend}: {p.detail or p.label}; {clock_text(p.elapsed)} so far\n")
        elif p.percent is not None and p.percent // 10 > self._decile:
            self._write(self._line(p) + "\n")
        if new_step:
            self._step, self._decile = p.step, -1
        if p.percent is not None:
            self._decile = max(self._decile, p.percent // 10)

    def tick(self, p: BuildProgress) -> None:
        """Redraw the elapsed time on a TTY even when the build prints nothing for a while."""
        if self.tty and p.state in (Phase.BUILDING, Phase.LOADING):
            self._write("\r\033[K" + self._line(p))
            self._open_line = True

    def _close_step(self, p: BuildProgress) -> None:
        """Leave the finished step's line on screen as `... done in 41s`, then start a new line."""
        if p.steps_done and p.steps_done[-1]["step"] == self._step:
            done = p.steps_done[-1]
            self._write(f"\r\033[Kswitchyard: {p.backend}: {STEPS.get(done['step'], done['step'])} "
                        f"done in {clock_text(done['seconds'])}")
        self._write("\n")
        self._open_line = False

    def _end(self, p: BuildProgress) -> None:
        if self._open_line:
            self._close_step(p)
        if p.state == Phase.READY:
            self._write(f"switchyard: {p.backend}: embedded llama-server (SmolLM2-135M) ready at {p.url} "
                        f"after {clock_text(p.elapsed)}; it now takes requests\n")
            return
        lines = "\n".join(f"    {ln}" for ln in list(p.tail)[-15:])
        self._write(f"switchyard: {p.backend}: embedded llama-server FAILED after {clock_text(p.elapsed)}: "
                    f"{p.error}\n  last lines of its output:\n{lines}\n  what to do: {p.hint}\n"
                    f"  the gateway keeps serving the other backends\n")


def bar(percent: int, width: int = 20) -> str:
    filled = width * percent // 100
    return "[" + "#" * filled + "." * (width - filled) + "]"


# ---- the build and the start -------------------------------------------------------------------

async def _lines(stream: asyncio.StreamReader) -> AsyncIterator[str]:
    """Lines split on \\n or \\r (pip and cmake redraw with \\r), as they arrive."""
    buf = b""
    while chunk := await stream.read(4096):
        buf += chunk
        *done, buf = re.split(rb"[\r\n]", buf)
        for raw in done:
            yield raw.decode(errors="replace")
    if buf:
        yield buf.decode(errors="replace")


async def run_ensure(progress: BuildProgress, changed: Callable[[], None]) -> Artifacts:
    """Run the ensure script, feeding its stderr to `progress` live; the binary and model it printed."""
    preset = preset_artifacts()
    if preset is not None:
        return preset
    script = ensure_script()
    if not script.exists():
        raise BuildFailed(f"no build script at {script}: set SWITCHYARD_LLAMA_SERVER and SWITCHYARD_LLAMA_MODEL")
    # The venv's Python has pip (Debian's system python3 often does not).
    env = {"PYTHON": sys.executable, **os.environ, "ENSURE_CHECK_ONLY": ""}
    proc = await asyncio.create_subprocess_exec(
        "bash", str(script), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True)  # own group: killed as one on stop
    assert proc.stdout is not None and proc.stderr is not None
    try:
        out = asyncio.create_task(proc.stdout.read())
        async for line in _lines(proc.stderr):
            if progress.feed(line):
                changed()
        stdout = (await out).decode(errors="replace")
        code = await proc.wait()
    except BaseException:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(proc.wait(), 10)
        raise
    if code != 0:
        raise BuildFailed(progress.error or f"{script.name} exited with {code}: {first_error(progress.tail)}")
    try:
        return parse_artifacts(stdout)
    except ValueError as e:
        raise BuildFailed(str(e)) from e


async def bring_up(progress: BuildProgress, report: TerminalReport, backend: LlamaCppBackend, ctx: int,
                   servers: list[LlamaServer], publish: Callable[[str], None],
                   refresh: Callable[[], Awaitable[None]]) -> None:
    """Build (once) and start the embedded llama-server, then point `backend` at it.

    Until then `backend.starting` holds the reason routing and probes report (never a failure
    counted against the circuit), and `publish` hands it to /readyz at once instead of at the next
    periodic probe; on failure it keeps saying why, and the other backends serve.
    """

    def set_reason() -> None:
        reason = progress.reason()
        if reason is not None:
            backend.starting = reason
            publish(reason)

    def changed() -> None:
        set_reason()
        report.update(progress)

    async def ticker() -> None:
        while True:
            await asyncio.sleep(1.0)
            set_reason()  # the elapsed time in the reason moves on even while the build is quiet
            report.tick(progress)

    tick = asyncio.create_task(ticker())
    changed()
    try:
        artifacts = await run_ensure(progress, changed)
        progress.begin("load", f"starting llama-server ({artifacts.model.name})")
        changed()
        log_path = cache_dir() / "embedded-llama-server.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        server = LlamaServer(artifacts, ctx=ctx, log_path=log_path)
        servers.append(server)  # before start(): stopped with the gateway even if it never got ready
        try:
            await server.start()
        except RuntimeError as e:
            progress.tail.extend(_last_lines(log_path, 15))
            raise BuildFailed(str(e)) from e
        backend.retarget(server.url)
        progress.ready(server.url)
        backend.starting = None
        await refresh()  # /readyz and the banner's "live" from a real probe, not in 15 s
    except BuildFailed as e:
        progress.fail(str(e))
    except Exception as e:  # anything else must not leave the backend "starting" forever
        progress.fail(f"{type(e).__name__}: {e}")
    finally:
        tick.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tick
    changed()


def _last_lines(path: Path, n: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


# `/status.json` reads the bring-ups from here: backend name -> its progress.
STARTUP: web.AppKey[dict[str, BuildProgress]] = web.AppKey("startup", dict)


def startup_state(app: web.Application) -> dict[str, dict[str, Any]]:
    return {name: p.as_dict() for name, p in app.get(STARTUP, {}).items()}

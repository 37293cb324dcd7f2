"""Starting, waiting for and stopping the processes under test, all on loopback.

Every process is started in its own session and stopped by its own process group id at exit, so
a failed run leaves nothing behind (and touches nothing it did not start).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import load

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int
    started: float = field(default_factory=time.perf_counter)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def pids(self) -> list[int]:
        return load.proc_tree(self.pid)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with code {self.popen.returncode}; its log:\n{self.tail()}")


class Stack:
    """The set of processes a run started; `close()` stops them all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []

    def spawn(self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> Proc:
        log = self.workdir / f"{name}.log"
        f = open(log, "wb")
        popen = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env={**os.environ, **(env or {})}, cwd=cwd or self.workdir,
                                 start_new_session=True)
        f.close()
        proc = Proc(name, popen, log, port)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 8.0) -> None:
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.popen.wait(5)
        # children that outlived their parent (nginx workers, uvicorn) are still in its group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


async def wait_http(proc: Proc, path: str, timeout: float, *, method: str = "GET", body: bytes = b"",
                    want: int = 200) -> float:
    """Poll until `path` answers `want`; returns seconds since the process was spawned."""
    deadline = time.perf_counter() + timeout
    if method == "GET":
        req = f"GET {path} HTTP/1.1\r\nHost: {HOST}:{proc.port}\r\nConnection: close\r\n\r\n".encode()
    else:
        req = load.build_request(HOST, proc.port, path, body, {"Connection": "close"})
    last = "no answer"
    while time.perf_counter() < deadline:
        proc.check_alive()
        try:
            r = await load.one(HOST, proc.port, req, timeout=max(0.5, deadline - time.perf_counter()))
            if r.status == want:
                return time.perf_counter() - proc.started
            last = f"status {r.status}: {r.head[:200]!r}"
        except (OSError, TimeoutError, ConnectionError) as e:
            last = f"{type(e).__name__}: {e}"
        await asyncio.sleep(0.005)
    raise RuntimeError(f"{proc.name} did not answer {method} {path} with {want} within {timeout:.0f}s "
                       f"({last}); its log:\n{proc.tail()}")


def python() -> str:
    return sys.executable

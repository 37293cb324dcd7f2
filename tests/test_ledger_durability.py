"""SIGKILL under load loses at most the ledger's stated durability bound (issue 12, finding 8).

A real `switchyard serve` process (hosted backend: the fake provider) takes concurrent requests,
each with its own session id; it is SIGKILLed mid-load. Every response that completed more than
`DURABILITY_BOUND` before the kill must have its row in the SQLite file.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import sys
import time
from pathlib import Path

import aiohttp

from gateway.ledger import DURABILITY_BOUND
from tests.conftest import config_for, write_config
from tests.fake_hosted import FakeHosted

REPO = Path(__file__).resolve().parent.parent
WORKERS = 8
LOAD_SECONDS = 4.0
SCHEDULING_SLACK = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


BODY = {"model": "auto", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


async def wait_ready(url: str, proc: asyncio.subprocess.Process, timeout: float = 90.0) -> None:
    """Until a chat request is answered (the first hosted call waits for litellm's import)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            assert proc.returncode is None, "switchyard serve exited during startup"
            try:
                async with s.post(f"{url}/v1/chat/completions", json=BODY,
                                  timeout=aiohttp.ClientTimeout(total=30)) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("switchyard serve did not answer a chat request")


async def test_sigkill_under_load_loses_no_row_older_than_the_durability_bound(fake: FakeHosted,
                                                                                 tmp_path: Path) -> None:
    port = free_port()
    gw, _ = config_for("http://127.0.0.1:9", fake.url, data_dir=str(tmp_path / "data"))
    gw["listen"]["port"] = port
    policy = {"team": "default", "rules": [{"name": "hosted", "route": ["hosted"]}]}
    config = write_config(tmp_path / "cfg", gw, {"default": policy})
    log = (tmp_path / "serve.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), cwd=REPO,
        stdout=log, stderr=log, env={**os.environ, "SWITCHYARD_LOG_LEVEL": "WARNING"})
    url = f"http://127.0.0.1:{port}"
    completed: dict[str, float] = {}  # session id -> when its response was fully read
    try:
        await wait_ready(url, proc)
        stop = time.monotonic() + LOAD_SECONDS

        async def worker(w: int, session: aiohttp.ClientSession) -> None:
            n = 0
            while time.monotonic() < stop:
                sid = f"ses-{w}-{n}"
                n += 1
                try:
                    async with session.post(f"{url}/v1/chat/completions", json=BODY,
                                            headers={"x-session-id": sid}) as r:
                        await r.read()
                        if r.status == 200:
                            completed[sid] = time.time()
                except aiohttp.ClientError:
                    return  # the gateway is gone

        async with aiohttp.ClientSession() as session:
            workers = [asyncio.create_task(worker(w, session)) for w in range(WORKERS)]
            await asyncio.sleep(LOAD_SECONDS * 0.75)  # mid-load, requests in flight
            killed_at = time.time()
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            await asyncio.gather(*workers)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()

    db = sqlite3.connect(tmp_path / "data" / "ledger.sqlite")
    stored = {row[0] for row in db.execute("SELECT session FROM requests WHERE session LIKE 'ses-%'")}
    db.close()
    # The bound is the writer's promise on a disk that commits in milliseconds; on a loaded CI box a
    # commit (or a WAL checkpoint's fsync) can take longer, so allow a second of scheduling slack.
    due = {sid for sid, at in completed.items() if at < killed_at - DURABILITY_BOUND - SCHEDULING_SLACK}
    assert len(due) >= 50, f"too little load to say anything: {len(due)} responses"
    missing = sorted(due - stored)
    assert not missing, f"{len(missing)} of {len(due)} completed responses have no ledger row: {missing[:10]}"

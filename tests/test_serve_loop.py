"""`switchyard serve` runs on uvloop by default and on asyncio's loop when asked (SWITCHYARD_LOOP=asyncio,
decision 97); it tunes the collector and the GIL switch interval (decisions 97, 98); litellm's import is
frozen out of the GC."""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import cli
from gateway.backends.hosted import load_litellm
from tests.conftest import config_for, write_config


@pytest.fixture
def process_tuning() -> Iterator[None]:
    """cmd_serve tunes the whole process: give the test process its own settings back."""
    threshold, interval = gc.get_threshold(), sys.getswitchinterval()
    yield
    gc.set_threshold(*threshold)
    sys.setswitchinterval(interval)


@pytest.mark.parametrize(("asked", "module"), [(None, "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")])
def test_serve_runs_on_the_loop_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, asked: str | None,
                                          module: str, process_tuning: None) -> None:
    if asked:
        monkeypatch.setenv("SWITCHYARD_LOOP", asked)
    else:
        monkeypatch.delenv("SWITCHYARD_LOOP", raising=False)
    seen: list[Any] = []

    async def fake_serve(settings: Any, host: str, port: int) -> None:
        seen.append(asyncio.get_running_loop())

    monkeypatch.setattr(cli, "_serve", fake_serve)
    gateway, policy = config_for("http://127.0.0.1:9", "http://127.0.0.1:9/v1", data_dir=str(tmp_path / "data"))
    path = write_config(tmp_path, gateway, {"default": policy})
    assert cli.cmd_serve(argparse.Namespace(config=str(path), host=None, port=None)) == 0
    assert seen and type(seen[0]).__module__.startswith(module)
    # young collections every ~10,000 allocations, not every request or two; the ledger's writer thread
    # waits at most 1 ms for the GIL while the loop is busy
    assert gc.get_threshold()[0] == 10_000 and sys.getswitchinterval() == pytest.approx(0.001)


def test_litellms_import_is_frozen_out_of_the_collector() -> None:
    # A full collection would otherwise walk litellm's ~400,000 objects (~0.2 s here) on the event loop.
    load_litellm()
    assert gc.get_freeze_count() > 100_000

"""`switchyard serve` runs on asyncio's loop by default and on uvloop when asked (SWITCHYARD_LOOP=uvloop);
litellm's import is frozen out of the GC."""

from __future__ import annotations

import argparse
import asyncio
import gc
from pathlib import Path
from typing import Any

import pytest

from gateway import cli
from gateway.backends.hosted import load_litellm
from tests.conftest import config_for, write_config


@pytest.mark.parametrize(("asked", "module"), [(None, "asyncio"), ("uvloop", "uvloop")])
def test_serve_runs_on_the_loop_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, asked: str | None,
                                          module: str) -> None:
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


def test_litellms_import_is_frozen_out_of_the_collector() -> None:
    # A full collection would otherwise walk litellm's ~400,000 objects (~0.2 s here) on the event loop.
    load_litellm()
    assert gc.get_freeze_count() > 100_000

"""Fast unit tests: the gateway with in-process scripted backends (tests/scripted.py), no llama-server."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.app import create_app
from gateway.config import load_settings
from gateway.runtime import Runtime
from tests.conftest import Gateway, config_for, write_config
from tests.scripted import Handler, Reply, ScriptedBackend, replying

ScriptedFactory = Callable[..., Awaitable[Gateway]]


def scripted_settings(tmp: Path, policy: dict[str, Any] | None = None, **over: Any) -> Any:
    over.setdefault("data_dir", str(tmp / "data"))
    gw, pol = config_for("http://127.0.0.1:9", "http://127.0.0.1:9", **over)
    pol.update(policy or {})
    return load_settings(write_config(tmp, gw, {"default": pol}))


def scripted_backends(settings: Any, local: Handler | None = None, hosted: Handler | None = None,
                      local_window: int | None = 4096, hosted_window: int | None = 400_000,
                      ) -> dict[str, ScriptedBackend]:
    cfg = settings.gateway.backends
    return {
        "local": ScriptedBackend("local", cfg["local"], local or replying(Reply.stream("local")), free=True,
                                 window=local_window),
        "hosted": ScriptedBackend("hosted", cfg["hosted"], hosted or replying(Reply.stream("hosted")), free=False,
                                  window=hosted_window, place="hosted"),
    }


@pytest.fixture
async def scripted(aiohttp_client: Any, tmp_path: Path) -> ScriptedFactory:
    counter = itertools.count()

    async def make(local: Handler | None = None, hosted: Handler | None = None, *,
                   policy: dict[str, Any] | None = None, local_window: int | None = 4096,
                   hosted_window: int | None = 400_000, **over: Any) -> Gateway:
        settings = scripted_settings(tmp_path / f"s{next(counter)}", policy, **over)
        backends = scripted_backends(settings, local, hosted, local_window, hosted_window)
        rt = Runtime.build(settings, backends)
        client = await aiohttp_client(create_app(settings, rt))
        return Gateway(client, rt)

    return make

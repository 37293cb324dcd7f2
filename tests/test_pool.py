"""Issue 13: two real llama-servers as one local tier (two GPUs), failing over between each other
before hosted, each with its own slot, breaker and probe."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.breaker import State
from gateway.embedded import Artifacts, LlamaServer
from tests.conftest import GatewayFactory, chat_body, config_for, start_llama
from tests.fake_hosted import FakeHosted
from tests.test_resilience import restart, until


@pytest.fixture
def two_llamas(llama_artifacts: Artifacts, tmp_path: Path) -> Iterator[tuple[LlamaServer, LlamaServer]]:
    for d in ("gpu0", "gpu1"):
        (tmp_path / d).mkdir()
    a = start_llama(llama_artifacts, tmp_path / "gpu0")
    b = start_llama(llama_artifacts, tmp_path / "gpu1")
    yield a, b
    a.stop()
    b.stop()


def tier_backends(a: LlamaServer, b: LlamaServer, fake: FakeHosted) -> dict[str, Any]:
    backends = config_for(a.url, fake.url)[0]["backends"]
    backends["local"]["members"] = {"gpu0": {"url": a.url}, "gpu1": {"url": b.url}}
    return dict(backends)


async def test_two_servers_share_the_work_and_fail_over_to_each_other_before_hosted(
        two_llamas: tuple[LlamaServer, LlamaServer], make_gateway: GatewayFactory, fake: FakeHosted) -> None:
    a, b = two_llamas
    gw = await make_gateway(a.url, backends=tier_backends(a, b, fake))
    assert set(gw.runtime.backends) == {"local@gpu0", "local@gpu1", "hosted"}

    # A turn streaming on gpu0 holds its only slot: the next turn goes to the idle gpu1 at once.
    first = await gw.chat(chat_body("Count from one to twenty.", max_tokens=48, stream=True))
    assert first.headers["x-switchyard-backend"] == "local@gpu0"
    await first.content.readany()
    second = await gw.chat(chat_body("hi", max_tokens=4))
    assert second.status == 200 and second.headers["x-switchyard-backend"] == "local@gpu1"
    assert "local@gpu1 first" in second.headers["x-switchyard-route"]
    await first.read()

    # gpu0 dies: its request fails over to gpu1, not to hosted; gpu0's breaker alone opens.
    a.kill(signal.SIGKILL)
    resp = await gw.chat(chat_body("hi", max_tokens=4))
    assert resp.status == 200 and resp.headers["x-switchyard-backend"] == "local@gpu1"
    assert resp.headers["x-switchyard-failover"].startswith("local@gpu0 crash -> local@gpu1")
    assert gw.runtime.breakers["local@gpu0"].state is State.OPEN
    assert gw.runtime.breakers["local@gpu1"].state is State.CLOSED
    for _ in range(2):  # while it is open, the tier is gpu1
        resp = await gw.chat(chat_body("hi", max_tokens=4))
        assert resp.headers["x-switchyard-backend"] == "local@gpu1" and "x-switchyard-failover" not in resp.headers
    assert fake.requests == []
    ready = await (await gw.client.get("/readyz")).json()
    assert ready["backends"]["local@gpu0"]["circuit"] == "open"
    assert ready["backends"]["local@gpu1"]["circuit"] == "closed"

    # Both down: hosted answers.
    b.kill(signal.SIGKILL)
    resp = await gw.chat(chat_body("hi", max_tokens=4))
    assert resp.status == 200 and resp.headers["x-switchyard-backend"] == "hosted"
    assert len(fake.requests) == 1

    # gpu0 back: its probe half-opens the circuit and the next turn closes it; hosted is not asked.
    await asyncio.to_thread(restart, a)
    await until(lambda: gw.runtime.breakers["local@gpu0"].state is not State.OPEN, timeout=20)
    resp = await gw.chat(chat_body("hi", max_tokens=4))
    assert resp.status == 200 and resp.headers["x-switchyard-backend"] == "local@gpu0"
    assert gw.runtime.breakers["local@gpu0"].state is State.CLOSED
    assert len(fake.requests) == 1

"""Issue 13: a real llama-server in router mode (`--models-dir`), one child process per model, as
one local tier whose members are its models: per-model breakers, probes that read the model's
state from the parent's /models (the parent's /health stays 200 when a child dies), `unloaded`
is ready, and `--models-max` eviction is not a crash."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.breaker import State
from gateway.embedded import Artifacts, free_port
from tests.conftest import LLAMA_CTX, GatewayFactory, chat_body, config_for
from tests.fake_hosted import FakeHosted
from tests.test_core_routing import sse_events
from tests.test_resilience import LONG_PROMPT, until

MODELS = ("smol-a", "smol-b")


class RouterServer:
    """`llama-server --models-dir DIR`: each model a symlink to the SmolLM2 file; args go to the children."""

    def __init__(self, artifacts: Artifacts, directory: Path, models_max: int) -> None:
        self.dir = directory / "models"
        self.dir.mkdir()
        for name in MODELS:
            (self.dir / f"{name}.gguf").symlink_to(artifacts.model)
        self.port = free_port()
        log = open(directory / "router.log", "ab")
        args = [str(artifacts.binary), "--models-dir", str(self.dir), "--models-max", str(models_max),
                "--host", "127.0.0.1", "--port", str(self.port), "-np", "1", "-c", str(LLAMA_CTX), "-t", "1"]
        # GGML_NO_BACKTRACE: a crashing child must exit at once, not wait on a debugger.
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=dict(os.environ, GGML_NO_BACKTRACE="1"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=2) as r:
            return json.load(r)

    def state(self, model: str) -> str:
        return next(m["status"]["value"] for m in self.get("/models")["data"] if m["id"] == model)

    def child(self, model: str) -> tuple[int, int]:
        """The pid and port of the child serving `model` (its command line says both)."""
        for entry in Path("/proc").iterdir():
            try:
                stat = (entry / "stat").read_text()
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid and b"--alias" in argv:
                if argv[argv.index(b"--alias") + 1].decode() == model:
                    return int(entry.name), int(argv[argv.index(b"--port") + 1])
        raise LookupError(f"no child for {model}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the children go with it
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def ready(server: RouterServer) -> bool:
    try:
        return bool(server.get("/health"))
    except OSError:
        return False


@pytest.fixture
def router_server(llama_artifacts: Artifacts, tmp_path: Path) -> Iterator[Callable[[int], RouterServer]]:
    made: list[RouterServer] = []

    def make(models_max: int = 2) -> RouterServer:
        server = RouterServer(llama_artifacts, tmp_path, models_max)
        made.append(server)
        return server

    yield make
    for s in made:
        s.stop()


async def router_gateway(make_gateway: GatewayFactory, server: RouterServer, fake: FakeHosted,
                         models: Any = MODELS) -> Any:
    await until(lambda: ready(server), timeout=30)
    backends = config_for(server.url, fake.url)[0]["backends"]
    backends["local"]["models"] = list(models) if isinstance(models, tuple) else models
    backends["local"]["timeouts"]["first_byte"] = 60  # a cold child loads first
    backends["local"]["context_limit"] = 100_000  # so the window shown is the children's own -c
    return await make_gateway(server.url, backends=backends)


def slot_busy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/slots", timeout=1) as r:
            return any(s.get("is_processing") for s in json.load(r))
    except OSError:
        return False


async def test_a_child_crash_opens_only_its_models_breaker_and_the_router_brings_it_back(
        router_server: Callable[[int], RouterServer], make_gateway: GatewayFactory, fake: FakeHosted) -> None:
    server = router_server(2)
    gw = await router_gateway(make_gateway, server, fake)
    # Unloaded is not down: both models are ready before any child runs.
    states = (await (await gw.client.get("/readyz")).json())["backends"]
    cold = states["local/smol-a"]
    assert cold["ready"] and "unloaded: loads on the first request" in cold["detail"]
    assert cold["context_window"] == LLAMA_CTX  # from the child's arguments in /models...
    assert server.state("smol-a") == server.state("smol-b") == "unloaded"  # ...so probing loaded nothing

    # Each model routes to its own member (and its own child).
    for model in MODELS:
        resp = await gw.chat(chat_body("hi", max_tokens=4, model=f"local/{model}"))
        assert resp.status == 200 and resp.headers["x-switchyard-backend"] == f"local/{model}"
        assert server.state(model) == "loaded"
    assert gw.runtime.backend_states()["local/smol-a"]["load_seconds"] > 0  # learned from the cold first byte

    # smol-a's child segfaults during prefill: before the first byte, so the request moves to smol-b.
    pid, port = server.child("smol-a")
    req = asyncio.create_task(gw.chat(chat_body(LONG_PROMPT, max_tokens=32, stream=True)))
    await until(lambda: slot_busy(port), timeout=30)
    os.kill(pid, signal.SIGSEGV)
    resp = await req
    assert resp.status == 200 and resp.headers["x-switchyard-backend"] == "local/smol-b"
    assert resp.headers["x-switchyard-failover"].startswith("local/smol-a crash -> local/smol-b")
    await resp.read()
    # smol-a's circuit opened (it may already be closing again: the router reloads the child at once)
    opened = [t for t in gw.runtime.breakers["local/smol-a"].history if t.new is State.OPEN]
    assert opened and "crash" in opened[0].why
    assert not gw.runtime.breakers["local/smol-b"].history  # one child's crash is its own
    assert ready(server)  # the parent's /health never noticed

    # The other model keeps serving meanwhile.
    resp = await gw.chat(chat_body("hi", max_tokens=4, model="local/smol-b"))
    assert resp.status == 200 and resp.headers["x-switchyard-backend"] == "local/smol-b"

    # The probe reads smol-a's state from the router; the trial reloads its child and closes the circuit.
    await until(lambda: gw.runtime.breakers["local/smol-a"].state is State.CLOSED, timeout=30)
    assert [t.new for t in gw.runtime.breakers["local/smol-a"].history][-2:] == [State.HALF_OPEN, State.CLOSED]
    resp = await gw.chat(chat_body("hi", max_tokens=4))
    assert resp.status == 200 and resp.headers["x-switchyard-backend"] == "local/smol-a"
    assert fake.requests == []


async def test_discovered_models_and_models_max_eviction_is_not_a_crash(router_server: Callable[[int], RouterServer],
                                                  make_gateway: GatewayFactory, fake: FakeHosted) -> None:
    server = router_server(1)  # one child at a time: loading one model unloads the other
    gw = await router_gateway(make_gateway, server, fake, models="discover")
    assert gw.runtime.router.tiers == {"local": ["local/smol-a", "local/smol-b"]}  # what the router listed
    for model in (*MODELS, MODELS[0]):
        resp = await gw.chat(chat_body("hi", max_tokens=4, model=f"local/{model}"))
        assert resp.status == 200 and resp.headers["x-switchyard-backend"] == f"local/{model}"
        assert "x-switchyard-failover" not in resp.headers
    assert server.state(MODELS[1]) == "unloaded"
    await gw.runtime.refresh_all()
    states = gw.runtime.backend_states()
    assert states["local/smol-b"]["ready"] and "unloaded" in states["local/smol-b"]["detail"]
    assert all(b.state is State.CLOSED for b in gw.runtime.breakers.values())
    assert fake.requests == []


async def test_a_child_crash_mid_stream_ends_the_stream_cleanly_and_counts_as_a_crash(
        router_server: Callable[[int], RouterServer], make_gateway: GatewayFactory, fake: FakeHosted) -> None:
    server = router_server(2)
    gw = await router_gateway(make_gateway, server, fake)
    resp = await gw.chat(chat_body("Write a very long story about a lighthouse.", max_tokens=2000, stream=True,
                                   model="local/smol-a"))
    assert resp.status == 200 and resp.headers["x-switchyard-backend"] == "local/smol-a"
    first = await resp.content.readany()
    assert first.startswith(b"data: ")
    os.kill(server.child("smol-a")[0], signal.SIGSEGV)
    rest = await asyncio.wait_for(resp.read(), 20)
    # The parent writes `proxy error: Failed to read connection` into the stream: never to the client.
    assert b"proxy error" not in first + rest
    events = sse_events(first + rest)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "upstream_stream_broken"
    assert gw.last.outcome == "broken_stream" and gw.last.error_code == "crash"
    opened = [t for t in gw.runtime.breakers["local/smol-a"].history if t.new is State.OPEN]
    assert opened and "crash" in opened[0].why
    assert not gw.runtime.breakers["local/smol-b"].history

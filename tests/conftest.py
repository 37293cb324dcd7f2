"""Shared fixtures: a real llama-server (SmolLM2-135M), the fake hosted provider, gateways.

The llama-server is real and is never skipped: if it cannot be built or started, the session
fails with the reason. Only hosted providers are faked (they cannot be reached from here).
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.config import load_settings
from gateway.embedded import Artifacts, LlamaServer, locate
from gateway.endpoints import RUNTIME
from gateway.runtime import Runtime
from tests.fake_hosted import FakeHosted

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ["TEST_HOSTED_KEY"] = "sk-test-hosted-key-never-logged"

LLAMA_CTX = 4096


def wait_healthy(server: LlamaServer, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc is not None and server.proc.poll() is not None:
            log = server.log_path.read_text()[-2000:] if server.log_path and server.log_path.exists() else ""
            raise RuntimeError(f"llama-server exited with {server.proc.returncode}:\n{log}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"llama-server not healthy after {timeout}s")


@pytest.fixture(scope="session")
def llama_artifacts() -> Artifacts:
    try:
        return locate(build=True)
    except RuntimeError as e:  # never skip: the real backend is part of the spec
        pytest.fail(f"the real llama-server could not be built or found: {e}", pytrace=False)


def start_llama(artifacts: Artifacts, log_dir: Path, port: int | None = None) -> LlamaServer:
    server = LlamaServer(artifacts, port=port, ctx=LLAMA_CTX, log_path=log_dir / "llama-server.log")
    server.spawn()
    wait_healthy(server)
    return server


@pytest.fixture(scope="session")
def llama(llama_artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """One shared llama-server for tests that don't kill it."""
    server = start_llama(llama_artifacts, tmp_path_factory.mktemp("llama"))
    yield server
    server.stop()


@pytest.fixture
def own_llama(llama_artifacts: Artifacts, tmp_path: Path) -> Iterator[LlamaServer]:
    """A llama-server of this test's own, free to be killed and restarted."""
    server = start_llama(llama_artifacts, tmp_path)
    yield server
    server.stop()


@pytest.fixture
async def fake(aiohttp_server: Any) -> FakeHosted:
    fake = FakeHosted(chunks=4)
    fake.attach(await aiohttp_server(fake.app))
    return fake


def config_for(local_url: str, hosted_url: str, **over: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    gateway: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "backends": {
            "local": {
                "kind": "llamacpp",
                "url": local_url,
                "max_concurrency": 1,
                "context_limit": LLAMA_CTX,
                "embedded": False,
                "timeouts": {"connect": 2, "first_byte": 30, "idle": 30, "total": 120},
                "breaker": {"failure_threshold": 1, "cooldown": 0.5, "max_cooldown": 2},
            },
            "hosted": {
                "kind": "litellm",
                "model": "openai/responses/gpt-5-nano",
                "api_base": hosted_url,
                "api_key_env": "TEST_HOSTED_KEY",
                "session_header": "x-opencode-session",
                "timeouts": {"connect": 2, "first_byte": 10, "idle": 10, "total": 60},
                "backoff": {"max_wait": 3, "budget": 6, "attempts": 4},
                "breaker": {"failure_threshold": 3, "window": 60, "cooldown": 1, "max_cooldown": 4},
            },
        },
    }
    policy: dict[str, Any] = {
        "team": "default",
        "output_reserve": 512,
        "max_queue_wait": 20,
        "rules": [
            {"name": "compaction", "match": {"role": "compaction"}, "route": ["hosted", "local"]},
            {
                "name": "background",
                "match": {"role": ["title", "tags", "follow_up", "query", "summary"]},
                "route": ["local", "hosted"],
                "max_queue_wait": 1,
            },
            {"name": "default", "route": ["local", "hosted"]},
        ],
    }
    for key, value in over.items():
        target = policy if key in ("policy",) else gateway
        if key == "policy":
            policy.update(value)
        else:
            target[key] = value
    return gateway, policy


def write_config(directory: Path, gateway: dict[str, Any], policies: dict[str, dict[str, Any]]) -> Path:
    (directory / "policies").mkdir(parents=True, exist_ok=True)
    for name, policy in policies.items():
        (directory / "policies" / f"{name}.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    path = directory / "switchyard.yaml"
    path.write_text(yaml.safe_dump(gateway, sort_keys=False))
    return path


@dataclass
class Gateway:
    client: TestClient
    runtime: Runtime
    sdks: list[Any] = field(default_factory=list)

    def sdk(self, api_key: str = "unused") -> Any:
        """A real `openai.AsyncOpenAI` client pointed at this gateway (closed at teardown)."""
        import openai

        client = openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key, max_retries=0)
        self.sdks.append(client)
        return client

    async def aclose(self) -> None:
        for c in self.sdks:
            await c.close()

    @property
    def base_url(self) -> str:
        return str(self.client.make_url("/v1"))

    @property
    def last(self) -> Any:
        return self.runtime.recorder.recent[-1]

    async def chat(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
        return await self.client.post(
            "/v1/chat/completions",
            data=json.dumps(body),
            headers={"Content-Type": "application/json", **(headers or {})},
        )


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway(aiohttp_client: Any, tmp_path: Path, fake: FakeHosted) -> AsyncIterator[GatewayFactory]:
    counter = iter(range(1000))
    made: list[Gateway] = []

    async def make(
        local_url: str, hosted_url: str | None = None, policies: dict[str, Any] | None = None, **over: Any
    ) -> Gateway:
        over.setdefault("data_dir", str(tmp_path / "data"))
        gw, policy = config_for(local_url, hosted_url or fake.url, **over)
        path = write_config(tmp_path / f"cfg{next(counter)}", gw, policies or {"default": policy})
        app = create_app(load_settings(path))
        client = await aiohttp_client(app)
        gw = Gateway(client, app[RUNTIME])
        made.append(gw)
        return gw

    yield make
    for gw in made:
        await gw.aclose()


def compaction_body(**extra: Any) -> dict[str, Any]:
    """opencode's compaction request, as opencode 1.18.33 sends it (system prompt + conversation)."""
    return {"model": "auto", "max_tokens": 8, "messages": [
        {"role": "system", "content": "You are a context summarization agent."},
        {"role": "user", "content": "Here is the conversation so far:\n\n<conversation>hi</conversation>"}], **extra}


def chat_body(text: str = "Say hello.", **extra: Any) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": text}], "max_tokens": 16, **extra}

"""The real coding agents through Switchyard: Claude Code (`claude -p`, Anthropic Messages) and
Codex CLI (`codex exec`, OpenAI Responses), pinned in tests/agents/package.json (`make agent-deps`),
each in an isolated HOME, completing a turn on local (the real llama-server) and on hosted (the
fake provider), with their client, session and role recognised; and a local llama-server that
segfaults during the prefill, before the first byte, fails over to hosted without the agent
seeing it. Never skipped: a binary that cannot run fails the test with the reason.

Claude Code's first request is ~9,000 tokens on SmolLM2 (12 tools, an 87 KB body): the local
server gets a 16k context (SmolLM2 was trained on 8k: the metadata is overridden so llama-server
does not cap the slot) and first-byte timeouts for a prefill of minutes on a loaded 2-core box.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.embedded import Artifacts, LlamaServer
from tests.conftest import Gateway, GatewayFactory, config_for, wait_healthy
from tests.fake_hosted import FakeHosted

AGENTS = Path(__file__).parent / "agents" / "node_modules" / ".bin"
CTX = 16384
SLOW = {"connect": 5, "first_byte": 900, "idle": 300, "total": 1200}
CLAMPED = {"team": "default", "output_reserve": 256, "max_queue_wait": 900, "rules": [
    {"name": "compaction", "match": {"role": "compaction"}, "route": ["hosted", "local"], "max_tokens": 24},
    {"name": "default", "route": ["local", "hosted"], "max_tokens": 24}]}  # agents ask for 32,000 tokens

pytestmark = pytest.mark.timeout(1500)


def big_llama(artifacts: Artifacts, log_dir: Path) -> LlamaServer:
    server = LlamaServer(artifacts, ctx=CTX, log_path=log_dir / "llama-server.log",
                         extra_args=("--override-kv", f"llama.context_length=int:{CTX}"))
    server.spawn()
    wait_healthy(server)
    return server


@pytest.fixture
def llama16k(llama_artifacts: Artifacts, tmp_path: Path) -> Iterator[LlamaServer]:
    server = big_llama(llama_artifacts, tmp_path)
    yield server
    server.stop()


async def agent_gateway(make_gateway: GatewayFactory, local_url: str, fake: FakeHosted,
                        max_tokens: int = 24, hosted: dict[str, Any] | None = None) -> Gateway:
    gw, _ = config_for(local_url, fake.url)
    backends = gw["backends"]
    if hosted is not None:
        backends["hosted"] = hosted
    backends["local"].update(context_limit=CTX, timeouts=SLOW)
    backends["local"]["breaker"] = {"failure_threshold": 3, "cooldown": 30, "max_cooldown": 60}
    policy = {**CLAMPED, "rules": [{**r, "max_tokens": max_tokens} for r in CLAMPED["rules"]]}
    return await make_gateway(local_url, policies={"default": policy}, backends=backends)


def binary(name: str) -> Path:
    path = AGENTS / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make agent-deps` (npm install in tests/agents)", pytrace=False)
    return path


async def run_agent(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 1200) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*args, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"{args[0]} did not finish within {timeout:g}s", pytrace=False)
    return proc.returncode or 0, out.decode(errors="replace")


def base_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    keep = {k: os.environ[k] for k in ("PATH", "LANG", "TERM") if k in os.environ}
    return {**keep, "HOME": str(home), "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


async def claude(gw: Gateway, tmp: Path, model: str, prompt: str = "Say hi") -> tuple[int, str]:
    env = {**base_env(tmp / "claude-home"), "ANTHROPIC_BASE_URL": str(gw.client.make_url("")).rstrip("/"),
           "ANTHROPIC_API_KEY": "sk-ant-test", "DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_ERROR_REPORTING": "1"}
    project = tmp / "claude-project"
    project.mkdir(exist_ok=True)
    return await run_agent([str(binary("claude")), "-p", prompt, "--model", model], env, project)


async def codex(gw: Gateway, tmp: Path, model: str, prompt: str = "Say hi") -> tuple[int, str]:
    home = tmp / "codex-home"
    env = {**base_env(home), "CODEX_HOME": str(home), "SWITCHYARD_API_KEY": "sk-test"}
    (home / "config.toml").write_text(
        f'model = "{model}"\nmodel_provider = "switchyard"\n\n[model_providers.switchyard]\nname = "Switchyard"\n'
        f'base_url = "{gw.client.make_url("/v1")!s}"\nwire_api = "responses"\nenv_key = "SWITCHYARD_API_KEY"\n')
    project = tmp / "codex-project"
    project.mkdir(exist_ok=True)
    return await run_agent([str(binary("codex")), "exec", "--skip-git-repo-check", prompt], env, project)


def agent_decisions(gw: Gateway, client: str) -> list[Any]:
    return [d for d in gw.runtime.recorder.recent if d.client == client]


async def test_claude_code_turn_on_local(llama16k: LlamaServer, make_gateway: GatewayFactory, fake: FakeHosted,
                                         tmp_path: Path) -> None:
    gw = await agent_gateway(make_gateway, llama16k.url, fake, max_tokens=512)
    rc, out = await claude(gw, tmp_path, "claude-sonnet-4-5", "Reply with one word: hi")
    if rc != 0:
        # SmolLM2 sometimes talks on until the clamp (even 2,048 tokens, 8 minutes here), and Claude Code
        # calls stop_reason "max_tokens" a failed turn ("exceeded the 32000 output token maximum"). That
        # is the model's sampling, not the gateway: Claude Code still read the whole answer in Anthropic's
        # shape, up to its stop reason. Anything else is a failure.
        assert "output token maximum" in out, out[-2000:]
    decisions = agent_decisions(gw, "claude-code")
    # its main turn (it may also send a background call of its own, e.g. when it has to continue)
    d = next(d for d in decisions if d.role == "main")
    assert (d.backend, d.outcome, d.role, d.model) == ("local", "ok", "main", "claude-sonnet-4-5"), [
        x.as_dict() for x in decisions]
    assert d.session and d.prompt_tokens > 3000 and d.tokens_out > 0 and d.tokens_method == "exact"
    assert not fake.requests


async def test_claude_code_turn_on_hosted(make_gateway: GatewayFactory, fake: FakeHosted, tmp_path: Path) -> None:
    gw = await agent_gateway(make_gateway, "http://127.0.0.1:9", fake)
    rc, out = await claude(gw, tmp_path, "hosted")
    assert rc == 0 and "hosted says" in out, out[-2000:]
    (d,) = agent_decisions(gw, "claude-code")
    assert (d.backend, d.outcome, d.role) == ("hosted", "ok", "main") and d.session and d.tokens_out > 0


async def test_claude_code_turn_on_a_native_anthropic_provider(make_gateway: GatewayFactory, fake: FakeHosted,
                                                                tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Claude Code streams every turn: against an `anthropic/*` hosted backend its Messages events are
    relayed as the provider sent them (litellm's own streaming path for this needed its proxy's extras)."""
    from tests.test_messages import hosted_anthropic

    monkeypatch.setenv("TEST_HOSTED_KEY", "sk-ant-provider")
    gw = await agent_gateway(make_gateway, "http://127.0.0.1:9", fake, hosted=hosted_anthropic(fake))
    rc, out = await claude(gw, tmp_path, "hosted")
    assert rc == 0 and "hosted says" in out, out[-2000:]
    (d,) = agent_decisions(gw, "claude-code")
    assert (d.backend, d.outcome, d.role) == ("hosted", "ok", "main") and d.stream and d.tokens_out > 0
    sent = fake.requests[-1]
    assert sent.path == "/v1/messages" and sent.json["stream"] is True and sent.json["model"] == "claude-haiku-4-5"
    assert sent.headers["x-api-key"] == "sk-ant-provider"  # the gateway's provider key, not Claude Code's


async def test_codex_turn_on_local(llama16k: LlamaServer, make_gateway: GatewayFactory, fake: FakeHosted,
                                   tmp_path: Path) -> None:
    gw = await agent_gateway(make_gateway, llama16k.url, fake)
    rc, out = await codex(gw, tmp_path, "gpt-5-codex")
    assert rc == 0, out[-2000:]
    (d,) = agent_decisions(gw, "codex")
    assert (d.backend, d.outcome, d.role, d.model) == ("local", "ok", "main", "gpt-5-codex"), d.as_dict()
    assert d.session and d.prompt_tokens > 1000 and d.tokens_out > 0
    assert not fake.requests


async def test_codex_turn_on_hosted(make_gateway: GatewayFactory, fake: FakeHosted, tmp_path: Path) -> None:
    gw = await agent_gateway(make_gateway, "http://127.0.0.1:9", fake)
    rc, out = await codex(gw, tmp_path, "hosted")
    assert rc == 0 and "hosted says" in out, out[-2000:]
    (d,) = agent_decisions(gw, "codex")
    assert (d.backend, d.outcome, d.role) == ("hosted", "ok", "main") and d.session and d.tokens_out > 0


async def segfault_once_prefilling(server: LlamaServer, timeout: float = 600) -> None:
    """SIGSEGV the llama-server as soon as it starts on a request (long before its first token)."""
    assert server.log_path is not None and server.proc is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.log_path.exists() and "processing task" in server.log_path.read_text(errors="replace"):
            await asyncio.sleep(1.0)
            server.proc.send_signal(signal.SIGSEGV)
            return
        await asyncio.sleep(0.2)
    raise AssertionError("llama-server never started on the request")


@pytest.mark.parametrize("agent", ["claude", "codex"])
async def test_local_segfault_before_first_byte_fails_over_unseen(agent: str, llama16k: LlamaServer,
                                                                  make_gateway: GatewayFactory, fake: FakeHosted,
                                                                  tmp_path: Path) -> None:
    gw = await agent_gateway(make_gateway, llama16k.url, fake)
    killer = asyncio.create_task(segfault_once_prefilling(llama16k))
    run = claude if agent == "claude" else codex
    rc, out = await run(gw, tmp_path, "claude-sonnet-4-5" if agent == "claude" else "gpt-5-codex")
    await killer
    assert rc == 0 and "hosted says" in out, out[-2000:]
    d = agent_decisions(gw, "claude-code" if agent == "claude" else "codex")[-1]
    assert (d.backend, d.outcome) == ("hosted", "ok"), d.as_dict()
    assert [e.backend for e in d.failover] == ["local"] and d.failover[0].kind == "crash"

"""The client opencode uses (`ai` + `@ai-sdk/openai-compatible`, real Node) against the gateway."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from gateway.embedded import LlamaServer
from tests.conftest import GatewayFactory
from tests.fake_hosted import FakeHosted, Reply

NODE_DIR = Path(__file__).parent / "node"


async def run_node(base_url: str, model: str, prompt: str, headers: dict[str, str] | None = None) -> dict:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "@ai-sdk" / "openai-compatible").exists():
        pytest.fail("node and tests/node/node_modules are required: run `make test`", pytrace=False)
    args = [node, str(NODE_DIR / "stream.mjs"), base_url, model, prompt]
    if headers:
        args.append(json.dumps(headers))
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return json.loads(out.decode().strip().splitlines()[-1])


async def test_ai_sdk_stream_from_local_keeps_text_and_usage(llama: LlamaServer, make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(llama.url)
    out = await run_node(gw.base_url, "auto", "Say hello in five words.",
                         {"x-session-id": "ses_node1"})
    assert out["error"] is None, out
    assert out["text"] and out["parts"] > 1
    assert out["usage"]["inputTokens"] > 0 and out["usage"]["outputTokens"] > 0
    assert gw.last.backend == "local" and gw.last.session == "ses_node1"


async def test_ai_sdk_stream_from_hosted_keeps_text_and_usage(llama: LlamaServer, make_gateway: GatewayFactory,
                                                              fake: FakeHosted) -> None:
    gw = await make_gateway(llama.url)
    out = await run_node(gw.base_url, "hosted", "hello there")
    assert out["error"] is None, out
    assert out["text"].startswith("hosted says")
    assert out["usage"]["outputTokens"] > 0


async def test_ai_sdk_sees_broken_hosted_stream_as_clean_end(llama: LlamaServer, make_gateway: GatewayFactory,
                                                             fake: FakeHosted) -> None:
    """After bytes reached the client, a broken upstream ends with an SSE error event and [DONE]:
    the AI SDK surfaces an `error` part (opencode keeps the partial text) instead of hanging."""
    gw = await make_gateway(llama.url)
    fake.script(Reply.broken_stream(after_chunks=2))
    out = await run_node(gw.base_url, "hosted", "hello there")
    assert out["text"]  # the partial text arrived
    assert out["error"] and "mid-stream" in out["error"]
    assert gw.last.outcome == "broken_stream"

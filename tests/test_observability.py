"""Issue 5 (part): Prometheus metrics and the decision log — which never holds prompts or keys."""

from __future__ import annotations

import logging
import signal

import pytest

from gateway.embedded import LlamaServer
from tests.conftest import GatewayFactory, chat_body
from tests.fake_hosted import FakeHosted

SECRET_PROMPT = "the launch code is PURPLE-ELEPHANT-42"


async def test_decision_log_has_one_line_per_request_and_never_prompts_or_keys(
        llama: LlamaServer, make_gateway: GatewayFactory, fake: FakeHosted, caplog: pytest.LogCaptureFixture) -> None:
    import json

    gw = await make_gateway(llama.url)
    caplog.set_level(logging.DEBUG)
    key = "sk-client-secret-key-123"
    await (await gw.chat(chat_body(SECRET_PROMPT), {"Authorization": f"Bearer {key}"})).read()
    await (await gw.chat(chat_body(SECRET_PROMPT, model="hosted", stream=True))).read()
    await (await gw.chat(chat_body(SECRET_PROMPT, model="nope"))).read()
    lines = [r.getMessage() for r in caplog.records if r.name == "switchyard.decision"]
    assert len(lines) == 3
    entries = [json.loads(line) for line in lines]
    assert [e["backend"] for e in entries] == ["local", "hosted", None]
    assert {"id", "team", "role", "client", "tokens_in", "route", "reason", "backend", "outcome",
            "total_ms", "first_byte_ms", "queue_wait_ms"} <= set(entries[0])
    everything = "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    assert "PURPLE-ELEPHANT" not in everything
    assert key not in everything
    assert "sk-test-hosted-key-never-logged" not in everything  # the provider key from the env


async def test_metrics_count_requests_failovers_and_circuit_state(own_llama: LlamaServer,
                                                                  make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(own_llama.url)
    await (await gw.chat(chat_body("hi"))).read()
    own_llama.kill(signal.SIGSEGV)
    await (await gw.chat(chat_body("hi"))).read()
    text = await (await gw.client.get("/metrics")).text()
    assert 'switchyard_requests_total{backend="local",outcome="ok",role="main",team="default"} 1.0' in text
    assert 'switchyard_requests_total{backend="hosted",outcome="ok",role="main",team="default"} 1.0' in text
    assert 'switchyard_failovers_total{kind="failover",team="default"} 1.0' in text
    assert 'switchyard_circuit_state{backend="local"} 2.0' in text
    assert 'switchyard_queue_depth{backend="local"} 0.0' in text
    assert "switchyard_first_byte_seconds_bucket" in text and "switchyard_overhead_seconds_count 2.0" in text
    assert 'switchyard_tokens_total{backend="local",direction="in",team="default"}' in text

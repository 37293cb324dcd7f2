"""Issue 3: survive the backends. Real llama-server killed with SIGSEGV; fake hosted answering 429s."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request
from typing import Any

from gateway.embedded import LlamaServer
from tests.conftest import Gateway, GatewayFactory, chat_body, compaction_body, wait_healthy
from tests.fake_hosted import FakeHosted, Reply
from tests.test_core_routing import sse_events

LONG_PROMPT = "Tell me about the history of the river and its towns. " * 250  # ~2,800 tokens of prefill


def processing(llama: LlamaServer) -> bool:
    try:
        with urllib.request.urlopen(f"{llama.url}/slots", timeout=1) as r:
            return any(s.get("is_processing") for s in json.load(r))
    except OSError:
        return False


async def until(pred: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def restart(llama: LlamaServer) -> None:
    llama.spawn()
    wait_healthy(llama)


async def test_sigsegv_before_first_byte_fails_over_to_hosted(own_llama: LlamaServer, make_gateway: GatewayFactory,
                                                              fake: FakeHosted) -> None:
    gw = await make_gateway(own_llama.url)
    req = asyncio.create_task(gw.chat(chat_body(LONG_PROMPT, max_tokens=64, stream=True,
                                                stream_options={"include_usage": True})))
    await until(lambda: processing(own_llama))
    own_llama.kill(signal.SIGSEGV)  # crash during prefill: nothing has reached the client yet
    resp = await req
    assert resp.status == 200
    assert resp.headers["x-switchyard-backend"] == "hosted"
    assert "local crash" in resp.headers["x-switchyard-failover"]
    events = sse_events(await resp.read())
    assert events[-1] == "[DONE]" and any(e.get("usage") for e in events[:-1])
    text = "".join(c["delta"].get("content") or "" for e in events[:-1] for c in e["choices"])
    assert text.startswith("hosted says")  # one clean, complete answer
    assert gw.runtime.breakers["local"].state == "open"
    # while open, routing skips local and says why
    resp = await gw.chat(chat_body("hi"))
    assert resp.headers["x-switchyard-backend"] == "hosted"
    assert "local circuit open since" in resp.headers["x-switchyard-route"]


async def test_sigsegv_mid_stream_ends_stream_cleanly_then_probe_brings_local_back(
        own_llama: LlamaServer, make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(own_llama.url)
    resp = await gw.chat(chat_body("Write a very long story about a lighthouse.", max_tokens=2000, stream=True))
    assert resp.status == 200 and resp.headers["x-switchyard-backend"] == "local"
    first = await resp.content.readany()
    assert first.startswith(b"data: ")
    own_llama.kill(signal.SIGSEGV)
    rest = await asyncio.wait_for(resp.read(), 10)
    events = sse_events(first + rest)
    assert events[-1] == "[DONE]"  # a well-formed end, never a hang
    assert events[-2]["error"]["code"] == "upstream_stream_broken"
    assert gw.last.outcome == "broken_stream"
    breaker = gw.runtime.breakers["local"]
    assert breaker.state == "open"

    restart(own_llama)
    await until(lambda: breaker.state == "half_open", timeout=15)  # the background probe saw /health 200
    resp = await gw.chat(chat_body("Say hi.", max_tokens=4))  # the one trial request
    assert resp.status == 200 and resp.headers["x-switchyard-backend"] == "local"
    assert breaker.state == "closed"
    readyz = await (await gw.client.get("/readyz")).json()
    assert readyz["backends"]["local"]["circuit"] == "closed"


async def test_local_overflow_reroutes_to_hosted_and_does_not_open_the_breaker(
        llama: LlamaServer, make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(llama.url)
    local = gw.runtime.backends["local"]
    # A server whose n_ctx we could not read, configured larger than it really is.
    local.live_n_ctx = None
    object.__setattr__(local.config, "context_limit", 100_000)
    resp = await gw.chat(chat_body("word " * 5000, max_tokens=16))
    assert resp.status == 200
    assert resp.headers["x-switchyard-backend"] == "hosted"
    assert "local context_overflow" in resp.headers["x-switchyard-failover"]
    assert gw.runtime.breakers["local"].state == "closed"


async def hosted_call(gw: Gateway) -> Any:
    return await gw.chat(chat_body("hi", model="hosted"))


async def test_429_retry_after_seconds_is_honoured(llama: LlamaServer, make_gateway: GatewayFactory,
                                                   fake: FakeHosted) -> None:
    gw = await make_gateway(llama.url)
    fake.script(Reply.rate_limited(retry_after="2"))
    resp = await hosted_call(gw)
    assert resp.status == 200
    first, second = fake.requests[-2:]
    assert second.received_at - first.received_at >= 2.0
    assert gw.last.retries == 1


async def test_429_retry_after_ms_is_honoured(llama: LlamaServer, make_gateway: GatewayFactory,
                                              fake: FakeHosted) -> None:
    gw = await make_gateway(llama.url)
    fake.script(Reply.rate_limited(retry_after_ms=700))
    resp = await hosted_call(gw)
    assert resp.status == 200
    first, second = fake.requests[-2:]
    assert second.received_at - first.received_at >= 0.7


async def test_429_without_header_backs_off_with_jitter(llama: LlamaServer, make_gateway: GatewayFactory,
                                                        fake: FakeHosted) -> None:
    gw = await make_gateway(llama.url)
    fake.script(Reply.rate_limited(), Reply.rate_limited())
    resp = await hosted_call(gw)
    assert resp.status == 200
    times = [r.received_at for r in fake.requests[-3:]]
    assert times[1] - times[0] >= 1.0 and times[2] - times[1] >= 1.0
    assert gw.last.retries == 2


async def test_429_past_the_budget_goes_to_the_next_backend(llama: LlamaServer, make_gateway: GatewayFactory,
                                                            fake: FakeHosted) -> None:
    gw = await make_gateway(llama.url)
    fake.script(Reply.rate_limited(retry_after="30"))  # more than max_wait: don't sit on it
    resp = await gw.chat(compaction_body())
    assert resp.status == 200
    assert resp.headers["x-switchyard-backend"] == "local"
    assert "hosted rate_limited" in resp.headers["x-switchyard-failover"]
    assert len(fake.requests) == 1 and gw.last.retries == 0  # did not sit out the 30 s
    assert gw.runtime.breakers["hosted"].state == "closed"  # a 429 is not a crash


async def test_429_with_nowhere_else_is_our_429_with_retry_after(llama: LlamaServer, make_gateway: GatewayFactory,
                                                                 fake: FakeHosted) -> None:
    gw = await make_gateway(llama.url)
    fake.script(Reply.rate_limited(retry_after="30"))
    resp = await hosted_call(gw)
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "30"
    body = await resp.json()
    assert body["error"]["code"] == "rate_limit_exceeded"


async def test_learned_crash_ceiling(own_llama: LlamaServer, make_gateway: GatewayFactory, fake: FakeHosted,
                                     tmp_path: Any) -> None:
    gw = await make_gateway(own_llama.url)
    object.__setattr__(gw.runtime.backends["local"].config, "learn_min_tokens", 1000)
    req = asyncio.create_task(gw.chat(chat_body(LONG_PROMPT, max_tokens=64)))
    await until(lambda: processing(own_llama))
    own_llama.kill(signal.SIGSEGV)
    resp = await req
    assert resp.headers["x-switchyard-backend"] == "hosted"
    learned = gw.runtime.ceilings.get("local")
    assert learned is not None and learned > 1000
    restart(own_llama)
    breaker = gw.runtime.breakers["local"]
    await until(lambda: breaker.state == "half_open", timeout=15)
    assert (await gw.chat(chat_body("Say hi.", max_tokens=4))).headers["x-switchyard-backend"] == "local"
    # the same large request now goes hosted on size, without touching local
    resp = await gw.chat(chat_body(LONG_PROMPT, max_tokens=64))
    assert resp.headers["x-switchyard-backend"] == "hosted"
    assert "learned crash ceiling" in resp.headers["x-switchyard-route"]
    # and it survives a restart of the gateway (persisted in the data dir)
    from gateway.ceiling import CrashCeilings

    assert CrashCeilings(gw.runtime.ceilings.path).get("local") == learned


async def test_explain_live_shows_the_running_gateways_open_circuit(own_llama: LlamaServer,
                                                                    make_gateway: GatewayFactory,
                                                                    tmp_path: Any) -> None:
    import subprocess
    import sys

    gw = await make_gateway(own_llama.url)
    own_llama.kill(signal.SIGSEGV)
    resp = await gw.chat(chat_body("hi"))
    assert resp.headers["x-switchyard-backend"] == "hosted"
    assert gw.runtime.breakers["local"].state == "open"
    req = tmp_path / "req.json"
    req.write_text(json.dumps(chat_body("hi")))
    cfg = gw.runtime.settings.path
    proc = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "gateway.cli", "explain", "--config", str(cfg), "--live",
        "--gateway", str(gw.client.make_url("")), str(req)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["route"] == [{"backend": "hosted", "kind": "hosted"}]
    assert "local circuit open since" in out["reason"]


async def test_client_leaving_during_a_backoff_wait_sends_no_retry(llama: LlamaServer, make_gateway: GatewayFactory,
                                                                  fake: FakeHosted) -> None:
    gw = await make_gateway(llama.url)
    fake.script(Reply.rate_limited(retry_after="2"))
    task = asyncio.create_task(hosted_call(gw))
    await until(lambda: len(fake.requests) == 1)
    await asyncio.sleep(0.3)
    task.cancel()  # the client goes away while we wait out the Retry-After
    await asyncio.sleep(2.5)
    assert len(fake.requests) == 1
    assert gw.last.outcome == "client_gone"


async def test_own_rate_limit_queues_briefly_then_moves_on(llama: LlamaServer, make_gateway: GatewayFactory,
                                                           fake: FakeHosted) -> None:
    gw = await make_gateway(llama.url)
    hosted = gw.runtime.backends["hosted"]
    from aiolimiter import AsyncLimiter

    gw.runtime.limiters["hosted"] = gw.runtime.dispatcher.limiters["hosted"] = AsyncLimiter(2, 60)
    object.__setattr__(hosted.config.backoff, "max_wait", 0.5)
    for _ in range(2):
        assert (await hosted_call(gw)).status == 200
    third = await hosted_call(gw)  # pinned: nowhere else to go -> our own 429, provider never hit
    assert third.status == 429 and int(third.headers["Retry-After"]) >= 1
    assert len(fake.requests) == 2
    routed = await gw.chat(compaction_body())
    assert routed.headers["x-switchyard-backend"] == "local"  # compaction: hosted first, paced -> local
    assert "hosted rate_limited" in routed.headers["x-switchyard-failover"]


async def test_first_byte_timeout_fails_over(llama: LlamaServer, make_gateway: GatewayFactory,
                                             fake: FakeHosted) -> None:
    gw = await make_gateway(llama.url)
    object.__setattr__(gw.runtime.backends["hosted"].config.timeouts, "first_byte", 1.0)
    fake.script(Reply.slow(first_byte_delay=5))
    resp = await gw.chat(compaction_body())
    assert resp.status == 200 and resp.headers["x-switchyard-backend"] == "local"
    assert "hosted timeout" in resp.headers["x-switchyard-failover"]


def test_ceiling_cli_shows_and_resets(tmp_path: Any) -> None:
    import subprocess
    import sys

    from gateway.ceiling import CrashCeilings, state_path
    from tests.conftest import config_for, write_config

    gw_cfg, policy = config_for("http://127.0.0.1:9", "http://127.0.0.1:9/v1", data_dir=str(tmp_path / "data"))
    cfg = write_config(tmp_path, gw_cfg, {"default": policy})
    CrashCeilings(state_path(str(tmp_path / "data"))).learn("local", 12345)
    show = subprocess.run([sys.executable, "-m", "gateway.cli", "ceiling", "show", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert json.loads(show.stdout)["ceilings"]["local"]["tokens"] == 12345
    subprocess.run([sys.executable, "-m", "gateway.cli", "ceiling", "reset", "local", "--config", str(cfg)],
                   check=True, capture_output=True, timeout=60)
    assert CrashCeilings(state_path(str(tmp_path / "data"))).get("local") is None

"""decide: every rule / fit / circuit / ceiling / pin combination, in-process, no I/O."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import failures
from gateway.backends.base import FitQuery
from gateway.backends.llamacpp import LlamaCppBackend
from gateway.ceiling import CrashCeilings
from gateway.config import LlamaCppBackend as LlamaCppConfig
from gateway.decide import retry_after
from gateway.errors import ContextLengthExceeded, Forbidden, ModelNotFound, NoBackendAvailable
from gateway.receive import parse_chat
from gateway.router import Router
from gateway.tokens import TokenSize
from tests.unit.conftest import scripted_backends, scripted_settings


def router(tmp: Path, policy: dict[str, Any] | None = None, **kw: Any) -> Router:
    settings = scripted_settings(tmp, policy)
    return Router.build(settings, scripted_backends(settings, **kw))


async def decide(r: Router, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    req = parse_chat(json.dumps(body).encode(), CIMultiDictProxy(CIMultiDict(headers or {})))
    profile = r.classify(req, r.policy)
    return await r.decide(req, profile, r.policy)


def chat(text: str = "hi", **kw: Any) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": text}], "max_tokens": 16, **kw}


TITLE = {"model": "auto", "messages": [{"role": "system", "content": "You are a title generator. You output ONLY"},
                                       {"role": "user", "content": "Generate a title for this conversation:\n"}]}
COMPACTION = {"model": "auto", "messages": [{"role": "system", "content": "You are a context summarization agent."},
                                            {"role": "user", "content": "Here is the conversation so far:"}]}


async def test_roles_pick_their_rule_and_order(tmp_path: Path) -> None:
    r = router(tmp_path)
    assert [s.backend for s in (await decide(r, chat())).steps] == ["local", "hosted"]
    compaction = await decide(r, COMPACTION)
    assert [s.backend for s in compaction.steps] == ["hosted", "local"] and compaction.rule == "compaction"
    title = await decide(r, TITLE)
    assert title.rule == "background" and title.steps[0].max_queue_wait == 1


async def test_a_backend_id_as_model_pins_it_and_unknown_models_are_404(tmp_path: Path) -> None:
    r = router(tmp_path)
    assert [s.backend for s in (await decide(r, chat(model="hosted"))).steps] == ["hosted"]
    with pytest.raises(ModelNotFound):
        await decide(r, chat(model="gpt-nope"))


async def test_allowed_backends_and_models_are_enforced(tmp_path: Path) -> None:
    r = router(tmp_path, {"allowed_backends": ["local"]})
    assert [s.backend for s in (await decide(r, chat())).steps] == ["local"]
    with pytest.raises(Forbidden):
        await decide(r, chat(model="hosted"))
    r = router(tmp_path / "b", {"allowed_models": ["auto"]})
    with pytest.raises(Forbidden):
        await decide(r, chat(model="local"))


async def test_too_big_for_local_goes_hosted_with_the_reason(tmp_path: Path) -> None:
    r = router(tmp_path, local_window=1000)
    route = await decide(r, chat("x" * 20_000))
    assert [s.backend for s in route.steps] == ["hosted"]
    assert "local ceiling" in route.reason


async def test_too_big_everywhere_is_context_length_exceeded(tmp_path: Path) -> None:
    r = router(tmp_path, local_window=1000, hosted_window=1000)
    with pytest.raises(ContextLengthExceeded):
        await decide(r, chat("x" * 20_000))


async def test_open_circuit_is_skipped_and_retry_after_is_the_routes_own_remaining_time(tmp_path: Path) -> None:
    r = router(tmp_path, {"rules": [{"name": "only-local", "route": ["local"]}]})
    local, hosted = r.breakers["local"], r.breakers["hosted"]
    hosted.record_failure("x")
    hosted.record_failure("x")
    hosted.record_failure("x")  # hosted open with its own (unrelated) cool-down
    local.record_failure("crash")
    local.cooldown = 40.0
    local.opened_at -= 30.0  # opened 30 s ago: 10 s left
    with pytest.raises(NoBackendAvailable) as e:
        await decide(r, chat())
    assert e.value.headers["Retry-After"] == "10"  # not hosted's cool-down, not local's full 40 s


def test_retry_after_is_at_least_a_second_and_defaults_without_open_circuits(tmp_path: Path) -> None:
    r = router(tmp_path)
    b = r.breakers["local"]
    b.record_failure("crash", now=100.0)
    assert retry_after([b], now=100.0 + b.cooldown) == 1
    assert retry_after([]) == 5


async def test_unusable_backend_is_skipped_with_why(tmp_path: Path) -> None:
    settings = scripted_settings(tmp_path)
    backends = scripted_backends(settings)
    backends["hosted"].unusable = "TEST_KEY is not set"
    r = Router.build(settings, backends)
    route = await decide(r, COMPACTION)
    assert [s.backend for s in route.steps] == ["local"] and "TEST_KEY is not set" in route.reason


async def test_session_that_outgrew_local_stays_hosted(tmp_path: Path) -> None:
    r = router(tmp_path, local_window=2000)
    sid = {"x-session-id": "ses_1"}
    big = await decide(r, chat("x" * 20_000), sid)
    assert big.steps[0].backend == "hosted"
    small = await decide(r, chat(), sid)
    assert small.steps[0].backend == "hosted" and "sticky" in small.reason
    other = await decide(r, chat(), {"x-session-id": "ses_2"})
    assert other.steps[0].backend == "local"


async def test_a_size_only_estimated_never_pins_a_session(tmp_path: Path) -> None:
    # Seen with opencode: local down, the exact count failed, the estimate said "too big", and the
    # session was pinned to hosted for hours — it never came back to local after the crash.
    settings = scripted_settings(tmp_path)
    backends = scripted_backends(settings, local_window=2000)
    backends["local"].method = "estimate"
    r = Router.build(settings, backends)
    sid = {"x-session-id": "ses_1"}
    assert (await decide(r, chat("x" * 20_000), sid)).steps[0].backend == "hosted"
    assert (await decide(r, chat(), sid)).steps[0].backend == "local"


async def test_a_compaction_releases_the_pin(tmp_path: Path) -> None:
    r = router(tmp_path, local_window=2000)
    sid = {"x-session-id": "ses_1"}
    await decide(r, chat("x" * 20_000), sid)
    await decide(r, COMPACTION, sid)
    assert (await decide(r, chat(), sid)).steps[0].backend == "local"


async def test_background_work_spares_a_hot_conversations_cache_when_it_can(tmp_path: Path) -> None:
    settings = scripted_settings(tmp_path)
    backends = scripted_backends(settings)
    backends["local"].evicting = "keeps ses_a's 2,300 cached tokens warm"
    r = Router.build(settings, backends)
    title = await decide(r, TITLE)
    assert [s.backend for s in title.steps] == ["hosted"] and "keeps ses_a" in title.reason
    assert [s.backend for s in (await decide(r, chat())).steps] == ["local", "hosted"]  # a turn is not moved
    backends["hosted"].unusable = "no key"
    assert [s.backend for s in (await decide(r, TITLE)).steps] == ["local"]  # nowhere else: it runs


async def test_prefer_fastest_within_the_cost_guard(tmp_path: Path) -> None:
    policy = {"rules": [{"route": ["local", "hosted"], "prefer": "fastest", "min_saving": 2.0}]}
    settings = scripted_settings(tmp_path, policy)
    backends = scripted_backends(settings)
    r = Router.build(settings, backends)
    backends["local"].predicted, backends["hosted"].predicted = 3.0, 1.5
    assert (await decide(r, chat())).steps[0].backend == "local"  # saves 1.5 s < 2 s: stay free
    backends["local"].predicted = 9.0
    route = await decide(r, chat())
    assert route.steps[0].backend == "hosted" and "predicted first" in route.reason
    assert route.steps[0].predicted == 1.5


# ---- llama.cpp's own fit: strict bounds, exact count near the ceiling, learned crash ceiling ----

class Counted(LlamaCppBackend):
    def __init__(self, tmp: Path, exact: int | None, learned: int | None = None) -> None:
        ceilings = CrashCeilings(tmp / "ceil.json")
        if learned:
            ceilings.learn("local", learned)
        super().__init__("local", LlamaCppConfig(kind="llamacpp", context_limit=8192), ceilings)
        self.exact, self.counts = exact, 0

    async def count_tokens(self, body: dict[str, Any]) -> int | None:
        self.counts += 1
        return self.exact


def query(nbytes: int, reserve: int = 512) -> FitQuery:
    return FitQuery({"messages": []}, TokenSize(nbytes, 1, False), reserve)


async def test_llamacpp_fit_decides_by_bytes_when_bounds_are_clear(tmp_path: Path) -> None:
    b = Counted(tmp_path, exact=None)
    small, huge = await b.fit(query(2_000)), await b.fit(query(400_000))
    assert small.fits and small.method == "bytes"
    assert not huge.fits and huge.method == "bytes" and "ceiling 8,192" in huge.note
    assert b.counts == 0


async def test_llamacpp_fit_counts_exactly_between_the_bounds(tmp_path: Path) -> None:
    b = Counted(tmp_path, exact=7000)
    fit = await b.fit(query(30_000))
    assert b.counts == 1 and fit.method == "exact" and fit.fits and fit.tokens == 7000
    b.exact = 7900
    assert not (await b.fit(query(30_000))).fits


async def test_llamacpp_fit_without_an_exact_count_uses_the_estimate(tmp_path: Path) -> None:
    fit = await Counted(tmp_path, exact=None).fit(query(30_000))
    assert fit.method == "estimate"


async def test_learned_crash_ceiling_skips_requests_near_it(tmp_path: Path) -> None:
    b = Counted(tmp_path, exact=5000, learned=5000)
    fit = await b.fit(query(30_000))
    assert not fit.fits and "learned crash ceiling 5,000" in fit.note
    b.exact = 3000
    assert (await b.fit(query(30_000))).fits


def test_only_a_crash_on_a_large_request_teaches_a_ceiling(tmp_path: Path) -> None:
    b = Counted(tmp_path, exact=None)
    b.learn(failures.UpstreamFailure(failures.Kind.CRASH, "local", "x"), 100)
    b.learn(failures.UpstreamFailure(failures.Kind.TIMEOUT, "local", "x"), 9000)
    assert b.ceilings is not None and b.ceilings.get("local") is None
    b.learn(failures.UpstreamFailure(failures.Kind.CRASH, "local", "x"), 9000)
    assert b.ceilings.get("local") == 9000


def test_router_builds_without_touching_the_data_dir(tmp_path: Path) -> None:
    settings = scripted_settings(tmp_path)
    Router.build(settings)
    assert not (tmp_path / "data").exists()

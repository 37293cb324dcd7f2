"""Local tiers: config expansion, config errors with file:line, member ordering, failover between
members — in-process with scripted members (tests/scripted.py); the real servers are in
tests/test_pool.py and tests/test_router_mode.py."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import failures
from gateway.app import create_app
from gateway.breaker import State
from gateway.config import ConfigError, load_settings
from gateway.receive import parse_chat
from gateway.runtime import Runtime
from gateway.tiers import expand, members, tiers
from tests.conftest import Gateway, config_for, write_config
from tests.scripted import Handler, Reply, ScriptedBackend, failing, replying

K = failures.Kind
TWO_GPUS = {"members": {"gpu0": {"url": "http://127.0.0.1:9001"},
                        "gpu1": {"url": "http://127.0.0.1:9002", "max_concurrency": 2, "context_limit": 8192}}}


def tier_settings(tmp: Path, local: dict[str, Any], policy: dict[str, Any] | None = None) -> Any:
    gw, pol = config_for("http://127.0.0.1:9", "http://127.0.0.1:9", data_dir=str(tmp / "data"))
    gw["backends"]["local"].update(local)
    pol.update(policy or {})
    return load_settings(write_config(tmp, gw, {"default": pol}))


def write_raw(tmp: Path, gateway_yaml: str, policy_yaml: str) -> Path:
    (tmp / "policies").mkdir(parents=True, exist_ok=True)
    (tmp / "policies" / "default.yaml").write_text(policy_yaml)
    path = tmp / "switchyard.yaml"
    path.write_text(gateway_yaml)
    return path


# ---- config: expansion ----

def test_members_urls_and_models_expand_into_named_members(tmp_path: Path) -> None:
    s = tier_settings(tmp_path / "a", TWO_GPUS)
    flat = members(s.gateway)
    assert list(flat) == ["local@gpu0", "local@gpu1", "hosted"]
    assert tiers(s.gateway) == {"local": ["local@gpu0", "local@gpu1"]}
    gpu0, gpu1 = flat["local@gpu0"], flat["local@gpu1"]
    assert (gpu0.url, gpu0.max_concurrency, gpu0.context_limit) == ("http://127.0.0.1:9001", 1, 4096)  # the tier's
    assert (gpu1.url, gpu1.max_concurrency, gpu1.context_limit) == ("http://127.0.0.1:9002", 2, 8192)  # its own

    s = tier_settings(tmp_path / "b", {"urls": ["http://127.0.0.1:9001", "http://127.0.0.1:9002/"]})
    assert {n: c.url for n, c in members(s.gateway).items() if n != "hosted"} == {
        "local@0": "http://127.0.0.1:9001", "local@1": "http://127.0.0.1:9002"}

    s = tier_settings(tmp_path / "c", {"models": ["qwen-27b", "qwen-9b"]})
    assert {n: c.model for n, c in members(s.gateway).items() if n != "hosted"} == {
        "local/qwen-27b": "qwen-27b", "local/qwen-9b": "qwen-9b"}

    s = tier_settings(tmp_path / "d", {**TWO_GPUS, "models": ["a"]})
    assert tiers(s.gateway) == {"local": ["local@gpu0/a", "local@gpu1/a"]}


def test_models_discover_has_no_member_until_the_router_is_asked(tmp_path: Path) -> None:
    s = tier_settings(tmp_path, {"models": "discover"})
    assert tiers(s.gateway) == {"local": []} and list(members(s.gateway)) == ["hosted"]
    local = s.gateway.backends["local"]
    assert {n: c.model for n, c in expand("local", local, ["a", "b"]).items()} == {"local/a": "a", "local/b": "b"}


def test_a_plain_entry_is_not_a_tier(tmp_path: Path) -> None:
    s = tier_settings(tmp_path, {})
    assert list(members(s.gateway)) == ["local", "hosted"] and tiers(s.gateway) == {}
    assert members(s.gateway)["local"] is s.gateway.backends["local"]


# ---- config: errors with file:line ----

GW_HEAD = "backends:\n  local:\n    kind: llamacpp\n"
POLICY_OK = "team: default\nrules:\n  - route: [local]\n"


@pytest.mark.parametrize(("tier_yaml", "line", "reason"), [
    ("    urls:\n      - http://127.0.0.1:9001\n      - http://127.0.0.1:9001\n", 6,
     "duplicate member: http://127.0.0.1:9001 is listed twice"),
    ("    models: [a, b, a]\n", 4, "duplicate member: model 'a' is listed twice"),
    ("    members:\n      gpu0: {url: 'http://127.0.0.1:9001'}\n      gpu0: {url: 'http://127.0.0.1:9002'}\n", 6,
     "duplicate key 'gpu0' (first at line 5)"),
    ("    members:\n      gpu0: {url: 'http://127.0.0.1:9001'}\n      gpu1: {url: 'http://127.0.0.1:9001'}\n", 6,
     "duplicate member: 'gpu0' already serves http://127.0.0.1:9001"),
    ("    members:\n      gpu@0: {url: 'http://127.0.0.1:9001'}\n", 5, "without '@', '/' or spaces"),
    ("    urls: ['http://127.0.0.1:9001']\n    members:\n      gpu0: {url: 'http://127.0.0.1:9002'}\n", 3,
     "either `urls` or `members`"),
    ("    urls: ['http://127.0.0.1:9001']\n    models: discover\n", 3, "`models: discover` asks one router"),
    ("    models: []\n", 4, "models"),
])
def test_tier_config_errors_name_file_and_line(tmp_path: Path, tier_yaml: str, line: int, reason: str) -> None:
    path = write_raw(tmp_path, GW_HEAD + tier_yaml, POLICY_OK)
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    assert f"{path}:{line}:" in str(e.value) and reason in str(e.value), str(e.value)


def test_policy_may_name_the_tier_or_a_member_but_not_an_unknown_member(tmp_path: Path) -> None:
    tier = "    members:\n      gpu0: {url: 'http://127.0.0.1:9001'}\n      gpu1: {url: 'http://127.0.0.1:9002'}\n"
    ok = "team: default\nallowed_backends: [local]\nrules:\n  - route: [local@gpu1, local]\n"
    load_settings(write_raw(tmp_path / "ok", GW_HEAD + tier, ok))
    bad = "team: default\nrules:\n  - route:\n      - local@gpu1\n      - local@gpu9\n"
    with pytest.raises(ConfigError) as e:
        load_settings(write_raw(tmp_path / "bad", GW_HEAD + tier, bad))
    assert ("default.yaml:5: rules.0.route.1: unknown member 'local@gpu9' of tier 'local' "
            "(members: local@gpu0, local@gpu1)") in str(e.value)


# ---- decide: a tier becomes its members ----

def scripted_members(settings: Any, handlers: dict[str, Handler]) -> dict[str, ScriptedBackend]:
    out = {}
    for name, cfg in members(settings.gateway).items():
        hosted = name == "hosted"
        out[name] = ScriptedBackend(name, cfg, handlers.get(name) or replying(Reply.stream(name)), free=not hosted,
                                    window=400_000 if hosted else 4096, place="hosted" if hosted else "local")
    return out


@pytest.fixture
async def tiered(aiohttp_client: Any, tmp_path: Path) -> Any:
    counter = itertools.count()

    async def make(handlers: dict[str, Handler] | None = None, local: dict[str, Any] | None = None,
                   policy: dict[str, Any] | None = None) -> Gateway:
        settings = tier_settings(tmp_path / f"t{next(counter)}", local or TWO_GPUS, policy)
        rt = Runtime.build(settings, scripted_members(settings, handlers or {}))
        return Gateway(await aiohttp_client(create_app(settings, rt)), rt)

    return make


async def route_of(gw: Gateway, model: str = "auto") -> Any:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    req = parse_chat(json.dumps(body).encode(), CIMultiDictProxy(CIMultiDict()))
    r = gw.runtime.router
    return await r.decide(req, r.classify(req, r.policy), r.policy)


async def test_a_tier_in_a_route_expands_to_its_members_least_loaded_first(tiered: Any) -> None:
    gw = await tiered()
    route = await route_of(gw)
    assert [s.backend for s in route.steps] == ["local@gpu0", "local@gpu1", "hosted"]
    async with gw.runtime.queues["local@gpu0"].slot(0, 1.0, False):  # gpu0 busy: gpu1 leads
        route = await route_of(gw)
    assert [s.backend for s in route.steps] == ["local@gpu1", "local@gpu0", "hosted"]
    assert "local: local@gpu1 first (local@gpu1 closed 0/2 busy, local@gpu0 closed 1/1 busy)" in route.reason


async def test_load_is_per_slot_a_member_with_a_free_slot_leads(tiered: Any) -> None:
    gw = await tiered()  # gpu0 has one slot, gpu1 two
    async with gw.runtime.queues["local@gpu1"].slot(0, 1.0, False):  # gpu1 half busy, gpu0 idle: gpu0
        assert (await route_of(gw)).steps[0].backend == "local@gpu0"
        async with gw.runtime.queues["local@gpu0"].slot(0, 1.0, False):  # gpu0 full, gpu1 has a free slot
            route = await route_of(gw)
    assert [s.backend for s in route.steps] == ["local@gpu1", "local@gpu0", "hosted"]


async def test_an_open_member_drops_out_and_the_other_keeps_the_tier(tiered: Any) -> None:
    gw = await tiered()
    gw.runtime.breakers["local@gpu0"].record_failure("crash")
    route = await route_of(gw)
    assert [s.backend for s in route.steps] == ["local@gpu1", "hosted"]
    assert "local@gpu0" in route.reason  # why it was skipped
    assert gw.runtime.breakers["local@gpu1"].state is State.CLOSED  # one member's crash is its own


async def test_a_member_or_the_tier_can_be_pinned_as_the_model(tiered: Any) -> None:
    gw = await tiered()
    assert [s.backend for s in (await route_of(gw, "local@gpu1")).steps] == ["local@gpu1"]
    assert [s.backend for s in (await route_of(gw, "local")).steps] == ["local@gpu0", "local@gpu1"]


async def test_a_member_named_first_keeps_its_place(tiered: Any) -> None:
    gw = await tiered(policy={"rules": [{"route": ["local@gpu1", "local", "hosted"]}]})
    assert [s.backend for s in (await route_of(gw)).steps] == ["local@gpu1", "local@gpu0", "hosted"]


# ---- dispatch: failover between members before the next tier ----

async def test_a_member_crash_fails_over_to_the_next_member_not_hosted(tiered: Any) -> None:
    gw = await tiered({"local@gpu0": failing(K.CRASH, "local@gpu0")})
    resp = await gw.chat({"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
    assert resp.status == 200 and resp.headers["x-switchyard-backend"] == "local@gpu1"
    assert resp.headers["x-switchyard-failover"] == "local@gpu0 crash -> local@gpu1"
    assert gw.runtime.breakers["local@gpu0"].state is State.OPEN
    assert gw.runtime.breakers["local@gpu1"].state is State.CLOSED
    assert gw.runtime.backends["hosted"].calls == []  # type: ignore[attr-defined]


async def test_every_member_down_goes_hosted(tiered: Any) -> None:
    gw = await tiered({"local@gpu0": failing(K.CRASH, "local@gpu0"), "local@gpu1": failing(K.CRASH, "local@gpu1")})
    resp = await gw.chat({"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
    assert resp.status == 200 and resp.headers["x-switchyard-backend"] == "hosted"
    assert resp.headers["x-switchyard-failover"] == "local@gpu0 crash; local@gpu1 crash -> hosted"


# ---- what the gateway shows ----

async def test_models_readyz_and_metrics_show_one_row_per_member(tiered: Any) -> None:
    gw = await tiered()
    data = (await (await gw.client.get("/v1/models")).json())["data"]
    by_id = {m["id"]: m for m in data}
    assert by_id["local"]["members"] == ["local@gpu0", "local@gpu1"] and by_id["local"]["context_window"] == 4096
    assert by_id["local@gpu0"]["tier"] == "local" and by_id["local@gpu1"]["context_window"] == 4096
    ready = await (await gw.client.get("/readyz")).json()
    assert {n: b["tier"] for n, b in ready["backends"].items()} == {
        "local@gpu0": "local", "local@gpu1": "local", "hosted": None}
    assert ready["backends"]["local@gpu1"]["queue"]["capacity"] == 2  # its own slots
    await gw.chat({"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
    text = await (await gw.client.get("/metrics")).text()
    assert 'switchyard_circuit_state{backend="local@gpu1"}' in text
    assert 'switchyard_queue_busy{backend="local@gpu0"}' in text


def test_explain_names_the_member_that_would_take_the_request_and_why(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway import cli

    settings = tier_settings(tmp_path, TWO_GPUS)
    request = tmp_path / "req.json"
    request.write_text(json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}))
    assert cli.main(["explain", str(request), "--config", str(settings.path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["route"][:2] == [{"backend": "local@gpu0", "kind": "local", "tier": "local"},
                                {"backend": "local@gpu1", "kind": "local", "tier": "local"}]
    assert "local: local@gpu0 first (local@gpu0 closed, local@gpu1 closed)" in out["reason"]


async def test_the_member_holding_the_prompts_prefix_leads(tiered: Any) -> None:
    gw = await tiered()
    gpu0, gpu1 = gw.runtime.backends["local@gpu0"], gw.runtime.backends["local@gpu1"]
    gpu0.predicted, gpu1.predicted = 9.0, 0.5  # type: ignore[attr-defined]  # noisy rates alone move nothing
    assert [s.backend for s in (await route_of(gw)).steps][:2] == ["local@gpu0", "local@gpu1"]
    gpu1.cached = 300  # type: ignore[attr-defined]  # too little to matter
    assert [s.backend for s in (await route_of(gw)).steps][:2] == ["local@gpu0", "local@gpu1"]
    gpu1.cached = 2300  # type: ignore[attr-defined]  # its slot holds the session's prefix
    route = await route_of(gw)
    assert [s.backend for s in route.steps][:2] == ["local@gpu1", "local@gpu0"]
    assert "local: local@gpu1 holds 2,300 cached tokens of this prompt" in route.reason

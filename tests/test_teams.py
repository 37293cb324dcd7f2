"""Issue 4: per-team policy files behind one gateway — keys, rules, limits, budgets, hot reload, ledger."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from gateway.app import create_app
from gateway.config import load_settings
from gateway.embedded import LlamaServer
from gateway.endpoints import RUNTIME
from gateway.teams import hash_key
from tests.conftest import Gateway, config_for, write_config
from tests.fake_hosted import FakeHosted

KEY_A, KEY_B, KEY_C = "sy-alpha-key-0001", "sy-beta-key-0002", "sy-gamma-key-0003"
ADMIN_KEY = "sy-admin-key-0004"  # /readyz details need it with auth: keys (issue 12)
REPO = Path(__file__).resolve().parent.parent


def team_policies() -> dict[str, dict[str, Any]]:
    return {
        "default": {"team": "default", "rules": [{"route": ["local", "hosted"]}]},
        "alpha": {"team": "alpha", "keys": [hash_key(KEY_A)], "output_reserve": 512,
                  "limits": {"requests_per_minute": 4},
                  "rules": [{"name": "compaction", "match": {"role": "compaction"}, "route": ["hosted", "local"]},
                            {"name": "alpha-default", "route": ["local", "hosted"]}]},
        "beta": {"team": "beta", "keys": [hash_key(KEY_B)], "allowed_backends": ["hosted"],
                 "allowed_models": ["auto", "hosted"], "limits": {"monthly_budget_usd": 1e-9},
                 "rules": [{"name": "beta-hosted", "route": ["hosted"]}]},
        "gamma": {"team": "gamma", "keys": [hash_key(KEY_C)], "limits": {"monthly_budget_usd": 1e-9},
                  "output_reserve": 512,
                  "rules": [{"name": "gamma-default", "route": ["hosted", "local"], "on_limit": "local"}]},
    }


@pytest.fixture
async def teams_gw(llama: LlamaServer, fake: FakeHosted, aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[Gateway]:
    gw_cfg, _ = config_for(llama.url, fake.url, data_dir=str(tmp_path / "data"), auth="keys", reload_interval=0.2,
                           admin_keys=[hash_key(ADMIN_KEY)])
    path = write_config(tmp_path / "cfg", gw_cfg, team_policies())
    app = create_app(load_settings(path))
    gw = Gateway(await aiohttp_client(app), app[RUNTIME])
    yield gw
    await gw.aclose()


def body(text: str = "Say hi.", **extra: Any) -> dict[str, Any]:
    return {"model": "auto", "max_tokens": 8, "messages": [{"role": "user", "content": text}], **extra}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def error_code(resp: Any) -> str:
    return (await resp.json())["error"]["code"]


async def test_each_team_is_routed_by_its_own_rules(teams_gw: Gateway) -> None:
    a = await teams_gw.chat(body(), auth(KEY_A))
    assert a.status == 200 and a.headers["x-switchyard-backend"] == "local"
    assert "alpha-default" in a.headers["x-switchyard-route"]
    b = await teams_gw.chat(body(), auth(KEY_B))
    assert b.status == 200 and b.headers["x-switchyard-backend"] == "hosted"
    assert "beta-hosted" in b.headers["x-switchyard-route"]
    assert [d.team for d in teams_gw.runtime.recorder.recent][-2:] == ["alpha", "beta"]


async def test_keys_select_the_team_and_unknown_keys_are_401(teams_gw: Gateway) -> None:
    resp = await teams_gw.chat(body())
    assert resp.status == 401 and await error_code(resp) == "missing_api_key"
    resp = await teams_gw.chat(body(), auth("sy-not-a-key"))
    assert resp.status == 401 and await error_code(resp) == "invalid_api_key"
    client = teams_gw.sdk(KEY_B)
    ids = [m.id async for m in client.models.list()]
    assert ids == ["auto", "hosted"]  # beta only sees what it may use
    with pytest.raises(openai.AuthenticationError):
        await teams_gw.sdk("wrong").models.list()


async def test_a_team_cannot_reach_another_teams_backends(teams_gw: Gateway) -> None:
    resp = await teams_gw.chat(body(model="local"), auth(KEY_B))
    assert resp.status == 403 and await error_code(resp) == "backend_not_allowed"
    resp = await teams_gw.chat(body(model="switchyard-task"), auth(KEY_B))
    assert resp.status == 403 and await error_code(resp) == "model_not_allowed"
    resp = await teams_gw.chat(body(model="local"), auth(KEY_A))
    assert resp.status == 200


async def test_requests_per_minute_limit_is_a_429_with_retry_after(teams_gw: Gateway) -> None:
    statuses = []
    for _ in range(5):
        resp = await teams_gw.chat(body(model="hosted"), auth(KEY_A))
        statuses.append(resp.status)
        last = resp
    assert statuses == [200, 200, 200, 200, 429]
    assert await error_code(last) == "rate_limit_exceeded"
    assert int(last.headers["Retry-After"]) >= 1
    assert (await teams_gw.chat(body(model="hosted"), auth(KEY_B))).status == 200  # other teams unaffected


async def test_monthly_budget_refuses_hosted_with_insufficient_quota(teams_gw: Gateway) -> None:
    first = await teams_gw.chat(body(), auth(KEY_B))
    assert first.status == 200 and teams_gw.last.cost > 0  # priced from litellm's model map
    second = await teams_gw.chat(body(), auth(KEY_B))
    assert second.status == 429
    err = (await second.json())["error"]
    assert err["code"] == "insufficient_quota" and "budget" in err["message"]
    assert "Retry-After" in second.headers


async def test_over_budget_rule_can_route_to_local_instead(teams_gw: Gateway) -> None:
    first = await teams_gw.chat(body(), auth(KEY_C))
    assert first.headers["x-switchyard-backend"] == "hosted"
    second = await teams_gw.chat(body(), auth(KEY_C))
    assert second.status == 200 and second.headers["x-switchyard-backend"] == "local"
    assert "over limit, local only" in second.headers["x-switchyard-route"]


async def test_session_that_outgrew_local_stays_hosted(teams_gw: Gateway) -> None:
    session = {"x-session-id": "ses_grow", **auth(KEY_A)}
    big = await teams_gw.chat(body("lorem ipsum " * 2000), session)  # too big for the 4096-token local
    assert big.headers["x-switchyard-backend"] == "hosted"
    small = await teams_gw.chat(body("and now?"), session)
    assert small.headers["x-switchyard-backend"] == "hosted"
    assert "sticky" in small.headers["x-switchyard-route"]
    other = await teams_gw.chat(body("hi"), {"x-session-id": "ses_other", **auth(KEY_A)})
    assert other.headers["x-switchyard-backend"] == "local"


async def wait_for(pred: Any, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


async def test_hot_reload_valid_and_broken_files_during_traffic(teams_gw: Gateway) -> None:
    rt = teams_gw.runtime
    alpha_file = rt.teams.files["alpha"]
    unlimited = team_policies()["alpha"]
    unlimited["limits"] = {}
    alpha_file.write_text(yaml.safe_dump(unlimited))
    await wait_for(lambda: rt.teams.policies["alpha"].limits.requests_per_minute is None)

    statuses: list[int] = []
    backends: list[str] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        while not stop.is_set():
            resp = await teams_gw.chat(body(max_tokens=2), auth(KEY_A))
            statuses.append(resp.status)
            backends.append(resp.headers.get("x-switchyard-backend", "-"))
            await resp.read()

    task = asyncio.create_task(traffic())
    await wait_for(lambda: len(statuses) >= 2, timeout=30)
    edited = dict(unlimited, rules=[{"name": "all-hosted", "route": ["hosted"]}])
    alpha_file.write_text(yaml.safe_dump(edited))  # a valid edit, mid-traffic
    await wait_for(lambda: backends.count("hosted") >= 2, timeout=30)
    alpha_file.write_text("team: alpha\nrules:\n  - route: [hosted\n")  # a broken one
    await wait_for(lambda: bool(rt.teams.errors))
    served = len(statuses)
    await wait_for(lambda: len(statuses) >= served + 2, timeout=30)
    stop.set()
    await task
    assert set(statuses) == {200}, statuses  # no request failed across both reloads
    assert "local" in backends and backends[-1] == "hosted"  # the valid edit took effect, the broken one didn't
    readyz = await (await teams_gw.client.get("/readyz", headers=auth(ADMIN_KEY))).json()
    assert any(f"{alpha_file}:4: invalid YAML" in e for e in readyz["policy_errors"]), readyz["policy_errors"]
    assert rt.teams.policies["alpha"].rules[-1].route == ["hosted"]  # the last good policy is kept


async def test_ledger_rows_match_the_requests(teams_gw: Gateway, tmp_path: Path) -> None:
    for key in (KEY_A, KEY_A, KEY_B):
        await (await teams_gw.chat(body(), auth(key))).read()
    await teams_gw.chat(body(), auth("sy-bad"))
    await teams_gw.runtime.ledger.flush()
    db = sqlite3.connect(teams_gw.runtime.ledger.path)
    rows = db.execute("SELECT team, backend, outcome, tokens_in, latency_ms FROM requests ORDER BY at").fetchall()
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("alpha", "local", "ok"), ("alpha", "local", "ok"), ("beta", "hosted", "ok"), ("-", None, "error")]
    assert all(r[3] > 0 and r[4] > 0 for r in rows[:3])
    cfg = teams_gw.runtime.settings.path
    proc = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gateway.cli", "usage", "--config",
                                                    str(cfg), "--since", "1h", "--json"],
                                   capture_output=True, text=True, timeout=60)
    usage = {(r["team"], r["backend"]): r for r in json.loads(proc.stdout)}
    assert usage[("alpha", "local")]["requests"] == 2 and usage[("beta", "hosted")]["requests"] == 1
    table = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gateway.cli", "usage", "--config",
                                                     str(cfg), "--team", "alpha"],
                                    capture_output=True, text=True, timeout=60)
    assert "alpha" in table.stdout and "beta" not in table.stdout


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def test_check_reports_every_broken_file_with_its_line(tmp_path: Path) -> None:
    gw_cfg, _ = config_for("http://127.0.0.1:9", "http://127.0.0.1:9/v1")
    path = write_config(tmp_path, gw_cfg, {"default": {"team": "default", "keys": [hash_key("k1")],
                                                       "rules": [{"route": ["local"]}]}})
    pdir = tmp_path / "policies"
    (pdir / "bad-yaml.yaml").write_text("team: x\nrules:\n  - route: [local\n")
    (pdir / "unknown-backend.yaml").write_text("team: u\nrules:\n  - route:\n      - local\n      - gpu9\n")
    (pdir / "no-default.yaml").write_text("team: n\nrules:\n  - match: {role: title}\n    route: [local]\n")
    (pdir / "same-key.yaml").write_text(f"team: s\nkeys:\n  - {hash_key('k1')}\nrules:\n  - route: [local]\n")
    proc = run_cli("check", "--config", str(path))
    assert proc.returncode == 1
    err = proc.stderr
    assert f"{pdir / 'bad-yaml.yaml'}:4: invalid YAML" in err
    assert f"{pdir / 'unknown-backend.yaml'}:5: rules.0.route.1: unknown backend 'gpu9'" in err
    assert f"{pdir / 'no-default.yaml'}:3: rules: the last rule must be a default rule" in err
    assert f"{pdir / 'same-key.yaml'}:3: keys.0: this key hash is also a key of team 'default'" in err
    ok = run_cli("check", "--config", str(REPO / "switchyard.yaml"), str(REPO / "policies"))
    assert ok.returncode == 0, ok.stderr


def test_key_add_and_revoke(tmp_path: Path) -> None:
    gw_cfg, policy = config_for("http://127.0.0.1:9", "http://127.0.0.1:9/v1")
    path = write_config(tmp_path, gw_cfg, {"default": policy, "ops": {"team": "ops", "rules": [{"route": ["hosted"]}]}})
    added = run_cli("key", "add", "ops", "--config", str(path))
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    text = (tmp_path / "policies" / "ops.yaml").read_text()
    assert key not in text and hash_key(key) in text  # only the hash is stored
    from gateway.teams import Teams

    settings = load_settings(path)
    teams = Teams(settings.gateway, tmp_path / "policies", dict(settings.policies), dict(settings.policy_files))
    assert teams.team_for_key(key).team == "ops"
    explain_req = tmp_path / "r.json"
    explain_req.write_text(json.dumps(body()))
    out = json.loads(run_cli("explain", "--config", str(path), "--key", key, str(explain_req)).stdout)
    assert out["team"] == "ops" and out["route"] == [{"backend": "hosted", "kind": "hosted"}]
    out = json.loads(run_cli("explain", "--config", str(path), "--team", "default", str(explain_req)).stdout)
    assert out["team"] == "default" and out["route"][0]["backend"] == "local"
    revoked = run_cli("key", "revoke", "ops", key, "--config", str(path))
    assert revoked.returncode == 0, revoked.stderr
    assert hash_key(key) not in (tmp_path / "policies" / "ops.yaml").read_text()
    assert run_cli("check", "--config", str(path)).returncode == 0


async def test_a_ledger_that_cannot_write_never_fails_a_request(llama: LlamaServer, fake: FakeHosted,
                                                                aiohttp_client: Any, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the ledger's directory should be")
    gw_cfg, policy = config_for(llama.url, fake.url, data_dir=str(tmp_path / "data"),
                                ledger_path=str(blocker / "ledger.sqlite"))
    app = create_app(load_settings(write_config(tmp_path / "cfg", gw_cfg, {"default": policy})))
    gw = Gateway(await aiohttp_client(app), app[RUNTIME])
    for _ in range(3):
        assert (await gw.chat(body(model="hosted"))).status == 200
    await gw.runtime.ledger.flush()
    assert "usage ledger write failed" in caplog.text

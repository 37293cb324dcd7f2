"""Issue 12, finding 7: with `auth: keys`, the ops endpoints need an admin key; `/healthz` stays open.

Before, `/status.json`, `/metrics`, `/` and `/readyz` showed every team, their usage and cost and the
last decisions with session ids to anyone. Team keys do not open them (one team must not read
another's usage); admin keys are stored as SHA-256 digests like team keys.
"""

from __future__ import annotations

import base64

import pytest

from gateway.teams import hash_key
from tests.conftest import Gateway, GatewayFactory, chat_body

TEAM_KEY = "sy-team-key-for-tests"
ADMIN_KEY = "sy-admin-key-for-tests"
ENV_ADMIN_KEY = "sy-admin-key-from-env"
OPS = ["/status.json", "/metrics", "/"]


async def keyed(make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch) -> Gateway:
    monkeypatch.setenv("SWITCHYARD_TEST_ADMIN_KEY", ENV_ADMIN_KEY)
    return await make_gateway("http://127.0.0.1:9", auth="keys", admin_keys=[hash_key(ADMIN_KEY)],
                              admin_key_env="SWITCHYARD_TEST_ADMIN_KEY", policy={"keys": [hash_key(TEAM_KEY)]})


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_ops_endpoints_need_an_admin_key(make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    gw = await keyed(make_gateway, monkeypatch)
    await gw.chat(chat_body(model="hosted"), headers=bearer(TEAM_KEY))  # something to show
    for path in OPS:
        for headers in ({}, bearer(TEAM_KEY), bearer("wrong"), bearer(ADMIN_KEY + "x"), {"Authorization": "Basic !!"}):
            resp = await gw.client.get(path, headers=headers)
            assert resp.status == 401, (path, headers)
            err = (await resp.json())["error"]
            assert err["code"] == "admin_key_required"
            body = await resp.text()
            assert "default" not in body and "hosted" not in body  # nothing about teams or backends
        assert "WWW-Authenticate" in resp.headers
        for key in (ADMIN_KEY, ENV_ADMIN_KEY):
            resp = await gw.client.get(path, headers=bearer(key))
            assert resp.status == 200, (path, await resp.text())
    status = await (await gw.client.get("/status.json", headers=bearer(ADMIN_KEY))).json()
    assert status["teams"] == ["default"] and status["decisions"]


async def test_the_status_page_asks_a_browser_for_the_key(make_gateway: GatewayFactory,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    gw = await keyed(make_gateway, monkeypatch)
    resp = await gw.client.get("/")
    assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Basic ")
    # the browser then sends Basic credentials (any user name, the key as password) on the page and its polls
    basic = {"Authorization": "Basic " + base64.b64encode(f"admin:{ADMIN_KEY}".encode()).decode()}
    for path in ("/", "/status.json"):
        resp = await gw.client.get(path, headers=basic)
        assert resp.status == 200, path


async def test_readyz_without_the_key_says_only_the_status(make_gateway: GatewayFactory,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    gw = await keyed(make_gateway, monkeypatch)
    resp = await gw.client.get("/readyz")
    assert set(await resp.json()) == {"status"}
    full = await gw.client.get("/readyz", headers=bearer(ADMIN_KEY))
    assert full.status == resp.status
    assert {"status", "backends", "policies", "policy_errors"} <= set(await full.json())
    resp = await gw.client.get("/healthz")
    assert resp.status == 200 and await resp.json() == {"status": "ok"}


async def test_with_auth_off_everything_stays_open(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway("http://127.0.0.1:9")
    for path in [*OPS, "/readyz"]:
        resp = await gw.client.get(path)
        assert resp.status in (200, 503), path
    assert "backends" in await (await gw.client.get("/readyz")).json()


def test_admin_keys_must_be_digests() -> None:
    from pydantic import ValidationError

    from gateway.config import GatewayConfig

    with pytest.raises(ValidationError, match="sha256"):
        GatewayConfig.model_validate({"backends": {"l": {"kind": "llamacpp"}}, "admin_keys": ["raw-key"]})

"""Issue 12 finding 3, end to end: renaming `team:` in the default policy (auth off) used to make
every request a plain-text 500 (`KeyError: 'default'`) while /readyz said ready with no errors."""

from __future__ import annotations

import asyncio

import yaml

from tests.conftest import GatewayFactory, chat_body


async def test_renaming_the_default_team_is_rejected_and_requests_keep_answering(make_gateway: GatewayFactory) -> None:
    policy = {"team": "default", "rules": [{"name": "all-hosted", "route": ["hosted"]}]}
    gw = await make_gateway("http://127.0.0.1:9", policies={"default": policy}, reload_interval=0.05)
    teams = gw.runtime.teams
    path = teams.files["default"]
    assert (await gw.chat(chat_body())).status == 200
    path.write_text(yaml.safe_dump({**policy, "team": "renamed"}, sort_keys=False))
    for _ in range(200):
        if teams.errors:
            break
        await asyncio.sleep(0.05)
    statuses = []
    for _ in range(3):
        resp = await gw.chat(chat_body())
        statuses.append(resp.status)
        await resp.read()
    assert statuses == [200, 200, 200]
    ready = await (await gw.client.get("/readyz")).json()
    assert ready["policies"] == ["default"]
    assert len(ready["policy_errors"]) == 1, ready["policy_errors"]
    assert ready["policy_errors"][0].startswith(f"{path}:1: team: this file defines the default team 'default'")

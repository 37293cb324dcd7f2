"""`switchyard explain` decides through the router only: nothing is created, nothing is sent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway import cli
from gateway.explain import explain
from tests.conftest import config_for, write_config


def test_explain_on_a_fresh_home_creates_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    gw, policy = config_for("http://127.0.0.1:9", "http://127.0.0.1:9")  # data_dir: the default, under ~
    config = write_config(tmp_path / "cfg", gw, {"default": policy})
    request = tmp_path / "req.json"
    request.write_text(json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}))
    assert cli.main(["explain", str(request), "--config", str(config)]) == 0
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert out["route"][0]["backend"] == "local"
    assert list(home.rglob("*")) == []


async def test_explain_live_takes_hosted_readiness_from_the_running_gateway(
        scripted: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from multidict import CIMultiDict, CIMultiDictProxy

    gw = await scripted()  # the running gateway has its hosted key
    monkeypatch.delenv("TEST_HOSTED_KEY")  # ...this shell does not
    compaction = {"model": "auto", "messages": [
        {"role": "system", "content": "You are a context summarization agent."},
        {"role": "user", "content": "Here is the conversation so far:\n\n<conversation>hi</conversation>"}]}
    out = await explain(gw.runtime.settings, json.dumps(compaction).encode(), CIMultiDictProxy(CIMultiDict()),
                             live=True, gateway_url=str(gw.client.make_url("")))
    assert [s["backend"] for s in out["route"]] == ["hosted", "local"], out["reason"]
    offline = await explain(gw.runtime.settings, json.dumps(compaction).encode(),
                                 CIMultiDictProxy(CIMultiDict()), live=False)
    assert [s["backend"] for s in offline["route"]] == ["local"]  # judged from this shell alone


def test_check_given_a_config_file_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gw, policy = config_for("http://127.0.0.1:9", "http://127.0.0.1:9")
    config = write_config(tmp_path, gw, {"default": policy})
    assert cli.main(["check", str(config), "--config", str(config)]) == 2
    assert f"--config {config}" in capsys.readouterr().err

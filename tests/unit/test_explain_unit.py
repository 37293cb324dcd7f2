"""`switchyard explain` decides through the router only: nothing is created, nothing is sent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway import cli
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

"""Config and policy files are validated at start; errors name file, line, field and reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_settings

REPO = Path(__file__).resolve().parent.parent
SWITCHYARD = [sys.executable, "-m", "gateway.cli"]

WITH_KEY = {**os.environ, "OPENCODE_API_KEY": "sk-explain-test"}  # the shipped hosted backend's key
GOOD_POLICY = "team: default\nrules:\n  - route: [local]\n"


def write(tmp: Path, config: str, policies: dict[str, str] | None = None) -> Path:
    (tmp / "policies").mkdir(exist_ok=True)
    for name, text in (policies if policies is not None else {"default": GOOD_POLICY}).items():
        (tmp / "policies" / f"{name}.yaml").write_text(text)
    path = tmp / "switchyard.yaml"
    path.write_text(config)
    return path


LOCAL = "backends:\n  local:\n    kind: llamacpp\n    url: http://127.0.0.1:8080\n"


def test_shipped_default_config_is_valid() -> None:
    settings = load_settings(REPO / "switchyard.yaml")
    local, hosted = settings.gateway.backends["local"], settings.gateway.backends["hosted"]
    assert (local.kind, local.url, local.max_concurrency, local.context_limit) == (
        "llamacpp", "http://127.0.0.1:8080", 1, 32768)
    assert (hosted.kind, hosted.model, hosted.api_base) == (
        "litellm", "openai/responses/gpt-5-nano", "https://opencode.ai/zen/v1")
    assert hosted.api_key_env and hosted.session_header == "x-opencode-session"


@pytest.mark.parametrize(("config", "line", "field", "reason"), [
    (LOCAL + "    max_concurrency: zero\n", 5, "backends.local.max_concurrency", "valid integer"),
    (LOCAL + "    colour: blue\n", 5, "backends.local.colour", "Extra inputs are not permitted"),
    ("listen:\n  port: 99999\n" + LOCAL, 2, "listen.port", "less than or equal to 65535"),
    ("backends:\n  local:\n    kind: vllm\n", 3, "backends.local", "does not match any of the expected tags"),
    ("backends:\n  local:\n    kind: llamacpp\n    url: localhost:8080\n", 4, "backends.local.url", "http://"),
    ("backends: [\n", 2, "", "invalid YAML"),
])
def test_invalid_config_names_file_line_field_reason(tmp_path: Path, config: str, line: int, field: str,
                                                      reason: str) -> None:
    path = write(tmp_path, config)
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    issue = e.value.issues[0]
    assert issue.file == str(path)
    assert issue.line == line, str(e.value)
    assert issue.field == field
    assert reason in issue.reason
    assert f"{path}:{line}" in str(e.value)


def test_policy_with_unknown_backend_and_no_default_rule(tmp_path: Path) -> None:
    bad = "team: default\nrules:\n  - match: {role: title}\n    route: [local, nowhere]\n"
    path = write(tmp_path, LOCAL, {"default": bad})
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    text = str(e.value)
    assert "default.yaml:3: rules: the last rule must be a default rule" in text


def test_policy_routing_to_an_unknown_backend(tmp_path: Path) -> None:
    bad = "team: default\nrules:\n  - route:\n      - local\n      - nowhere\n"
    path = write(tmp_path, LOCAL, {"default": bad})
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    assert "default.yaml:5: rules.0.route.1: unknown backend 'nowhere' (known: local)" in str(e.value)


def test_serve_with_a_bad_config_exits_non_zero_with_the_reason(tmp_path: Path) -> None:
    path = write(tmp_path, LOCAL + "    context_limit: -5\n")
    proc = subprocess.run([*SWITCHYARD, "serve", "--config", str(path)], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.returncode == 2
    assert f"{path}:5: backends.local.context_limit: Input should be greater than 0" in proc.stderr


def test_check_command(tmp_path: Path) -> None:
    good = subprocess.run([*SWITCHYARD, "check", "--config", str(REPO / "switchyard.yaml")],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert good.returncode == 0, good.stderr
    path = write(tmp_path, LOCAL, {"default": "team: default\nrules: []\n"})
    bad = subprocess.run([*SWITCHYARD, "check", "--config", str(path)], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert bad.returncode == 1
    assert "default.yaml:2: rules:" in bad.stderr


def test_explain_prints_the_decision_without_sending(tmp_path: Path) -> None:
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"model": "auto", "max_tokens": 32000, "messages": [
        {"role": "system", "content": "You are a context summarization agent."},
        {"role": "user", "content": "Here is the conversation so far:\n\n<conversation>"}]}))
    proc = subprocess.run([*SWITCHYARD, "explain", "--config", str(REPO / "switchyard.yaml"), str(req),
                           "--header", "x-session-id: ses_1", "--header", "User-Agent: opencode/1.18.33"],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=WITH_KEY)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["role"] == "compaction" and out["client"] == "opencode" and out["session"] == "ses_1"
    assert out["output_reserve"] == 4096
    assert out["route"] == [{"backend": "hosted", "kind": "hosted"}, {"backend": "local", "kind": "local"}]
    assert "compaction" in out["reason"] and out["tokens_in"] > 0


def test_explain_huge_request_skips_local_on_size(tmp_path: Path) -> None:
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"model": "auto", "messages": [{"role": "user", "content": "y" * 350_000}]}))
    proc = subprocess.run([*SWITCHYARD, "explain", "--config", str(REPO / "switchyard.yaml"), str(req)],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=WITH_KEY)
    out = json.loads(proc.stdout)
    assert out["route"] == [{"backend": "hosted", "kind": "hosted"}]
    assert out["tokens_method"] == "bytes"
    assert "> local ceiling 32,768" in out["reason"]


def test_two_team_example_is_valid() -> None:
    settings = load_settings(REPO / "examples" / "two-teams" / "switchyard.yaml")
    assert settings.gateway.auth == "keys"
    assert sorted(settings.policies) == ["default", "platform", "research"]


def test_explain_says_when_the_hosted_key_is_missing(tmp_path: Path) -> None:
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"model": "auto", "messages": [{"role": "user", "content": "y" * 350_000}]}))
    env = {k: v for k, v in os.environ.items() if k != "OPENCODE_API_KEY"}
    proc = subprocess.run([*SWITCHYARD, "explain", "--config", str(REPO / "switchyard.yaml"), str(req)],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    out = json.loads(proc.stdout)
    assert out["route"] == [] and "OPENCODE_API_KEY is not set" in out["reason"]

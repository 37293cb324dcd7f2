"""The one policy loader (gateway/policies.py), at start and on reload: fast, files in tmp_path."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from gateway.config import ConfigError, GatewayConfig, load_policies
from gateway.policies import PolicySet, load
from gateway.teams import Teams, hash_key

GW = GatewayConfig.model_validate({"backends": {"local": {"kind": "llamacpp"},
                                                "hosted": {"kind": "litellm", "model": "openai/gpt-4o-mini"}}})
K1, K2 = hash_key("sy-one"), hash_key("sy-two")


def write(directory: Path, name: str, policy: dict[str, object] | str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.yaml"
    path.write_text(policy if isinstance(policy, str) else yaml.safe_dump(policy, sort_keys=False))
    return path


def team(name: str, *keys: str, route: list[str] | None = None) -> dict[str, object]:
    return {"team": name, "keys": list(keys), "rules": [{"route": route or ["local", "hosted"]}]}


@pytest.fixture
def pdir(tmp_path: Path) -> Path:
    d = tmp_path / "policies"
    write(d, "default", team("default"))
    write(d, "ops", team("ops", K1))
    return d


def test_start_loads_the_set(pdir: Path) -> None:
    policies, files = load_policies(pdir, GW)
    assert set(policies) == {"default", "ops"} and files["ops"] == pdir / "ops.yaml"


def test_start_reports_every_problem_at_once_with_file_and_line(tmp_path: Path) -> None:
    d = tmp_path / "p"
    write(d, "a-default", team("default", K1))
    write(d, "b-dup-team", "team: default\nrules:\n  - route: [local]\n")
    write(d, "c-dup-key", f"team: c\nkeys:\n  - {K1}\nrules:\n  - route: [local]\n")
    write(d, "d-unknown", "team: d\nrules:\n  - route:\n      - gpu9\n")
    write(d, "e-yaml", "team: e\nrules:\n  - route: [local\n")
    with pytest.raises(ConfigError) as e:
        load_policies(d, GW)
    text = str(e.value)
    assert f"{d / 'b-dup-team.yaml'}:1: team: team 'default' is already defined in {d / 'a-default.yaml'}" in text
    assert f"{d / 'c-dup-key.yaml'}:3: keys.0: this key hash is also a key of team 'default'" in text
    assert f"{d / 'd-unknown.yaml'}:4: rules.0.route.0: unknown backend 'gpu9'" in text
    assert f"{d / 'e-yaml.yaml'}:4: invalid YAML" in text


def test_start_without_the_default_team_or_any_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no policy files"):
        load_policies(tmp_path, GW)
    write(tmp_path, "ops", team("ops"))
    with pytest.raises(ConfigError, match="no policy file defines the default team 'default'"):
        load_policies(tmp_path, GW)


def test_a_signature_field_nothing_reads_is_rejected_with_its_line(pdir: Path) -> None:
    """Issue 9 bug 4: `only_user_message` was accepted and silently ignored."""
    path = write(pdir, "ops", "team: ops\nsignatures:\n  - role: title\n    last_user_prefix: 'Title:'\n"
                              "    only_user_message: true\nrules:\n  - route: [local]\n")
    with pytest.raises(ConfigError) as e:
        load_policies(pdir, GW)
    assert f"{path}:5: signatures.0.only_user_message: Extra inputs are not permitted" in str(e.value)


def reload(pdir: Path, last: PolicySet) -> tuple[PolicySet, list[str]]:
    result, issues = load(pdir, GW, last)
    return result, [str(i) for i in issues]


def start(pdir: Path) -> PolicySet:
    return PolicySet(*load_policies(pdir, GW))


def test_reload_keeps_a_broken_files_last_good_policy_and_applies_the_others(pdir: Path) -> None:
    last = start(pdir)
    write(pdir, "ops", "team: ops\nrules:\n  - route: [local\n")
    write(pdir, "default", team("default", route=["hosted"]))
    now, errors = reload(pdir, last)
    assert now.policies["ops"] is last.policies["ops"]
    assert now.policies["default"].rules[0].route == ["hosted"]
    assert errors == [f"{pdir / 'ops.yaml'}:4: invalid YAML: expected ',' or ']', but got '<stream end>'"] or \
        (len(errors) == 1 and errors[0].startswith(f"{pdir / 'ops.yaml'}:4: invalid YAML"))


def test_renaming_the_default_team_is_rejected_and_it_keeps_its_policy(pdir: Path) -> None:
    """Issue 12 finding 3: the rename left no default team and every request failed with a KeyError."""
    last = start(pdir)
    write(pdir, "default", team("renamed", route=["hosted"]))
    now, errors = reload(pdir, last)
    assert now.policies["default"] is last.policies["default"] and "renamed" not in now.policies
    assert now.files["default"] == pdir / "default.yaml"
    assert len(errors) == 1
    assert errors[0].startswith(f"{pdir / 'default.yaml'}:1: team: this file defines the default team 'default'")
    assert "'renamed'" in errors[0]


def test_deleting_the_default_file_keeps_the_default_team_and_says_so(pdir: Path) -> None:
    last = start(pdir)
    (pdir / "default.yaml").unlink()
    (pdir / "ops.yaml").unlink()
    now, errors = reload(pdir, last)
    assert set(now.policies) == {"default"}  # a deleted file removes its team, never the default
    assert errors == [f"{pdir / 'default.yaml'}: the file of the default team 'default' was deleted; "
                      "its last good policy stays in use"]


def test_a_new_file_cannot_take_an_existing_teams_name_or_key(pdir: Path) -> None:
    last = start(pdir)
    write(pdir, "a-thief", team("ops", route=["hosted"]))  # sorts before ops.yaml
    write(pdir, "b-thief", team("b", K1))
    now, errors = reload(pdir, last)
    assert now.policies["ops"] is last.policies["ops"] and now.files["ops"] == pdir / "ops.yaml"
    assert "b" not in now.policies
    assert sorted(errors) == [
        f"{pdir / 'a-thief.yaml'}:1: team: team 'ops' is already defined in {pdir / 'ops.yaml'}",
        f"{pdir / 'b-thief.yaml'}:3: keys.0: this key hash is also a key of team 'ops'"]


def test_renaming_a_team_and_moving_a_key(pdir: Path) -> None:
    last = start(pdir)
    write(pdir, "ops", team("platform", K2))  # a non-default team may be renamed
    write(pdir, "new", team("new", K1))  # and its old key given to another team in the same reload
    now, errors = reload(pdir, last)
    assert errors == []
    assert set(now.policies) == {"default", "platform", "new"}
    assert now.policies["new"].keys == [K1]


def test_teams_reload_logs_a_persistent_error_once_and_default_never_fails(
        pdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    policies, files = load_policies(pdir, GW)
    teams = Teams(GW, pdir, dict(policies), dict(files))
    write(pdir, "default", team("renamed"))
    with caplog.at_level(logging.ERROR, logger="switchyard"):
        assert len(teams.reload()) == 1
        write(pdir, "ops", team("ops", K2))  # another change: the broken file is re-read, not re-logged
        assert len(teams.reload()) == 1
    assert len([r for r in caplog.records if "policy reload rejected" in r.getMessage()]) == 1
    assert teams.default.team == "default" and teams.team_for_key("sy-two").team == "ops"
    write(pdir, "default", team("default", route=["hosted"]))  # fixed: the error goes away
    assert teams.reload() == [] and teams.default.rules[0].route == ["hosted"]


def test_teams_cannot_be_built_without_the_default_team(pdir: Path) -> None:
    with pytest.raises(ConfigError, match="default team"):
        Teams(GW, pdir, {}, {})

"""`switchyard key add/revoke` edit the `keys:` list structurally (issue 12 finding 5).

On a copy of the shipped examples/two-teams files: `platform.yaml`'s `keys:` line carries a
comment, which made the old line editor append a second `keys:` block (YAML keeps the last one:
every existing key silently revoked, `switchyard check` still ok).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.app import create_app
from gateway.config import ConfigError, GatewayConfig, load_settings
from gateway.keyfile import add_key, revoke_keys
from gateway.teams import hash_key

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "two-teams"
SHIPPED_HASH = "3f1e0c5a0d0c4c1e8b9a6f2d7e4b1a9c0d8e7f6a5b4c3d2e1f0a9b8c7d6e5f40"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)


@pytest.fixture
def example(tmp_path: Path) -> Path:
    root = tmp_path / "two-teams"
    shutil.copytree(EXAMPLE, root)
    config = root / "switchyard.yaml"
    text = config.read_text().replace("data_dir: ~/.local/share/switchyard", f"data_dir: {tmp_path / 'data'}")
    config.write_text(text)
    return config


async def authenticates(aiohttp_client: Any, config: Path, key: str) -> bool:
    """GET /v1/models through a real gateway built from the files: 200 for a team key, 401 otherwise."""
    app = create_app(load_settings(config))
    client = await aiohttp_client(app)
    resp = await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert resp.status in (200, 401), resp.status
    return resp.status == 200


async def test_key_add_keeps_the_old_keys_and_comments_and_revoke_removes_one(example: Path,
                                                                               aiohttp_client: Any) -> None:
    platform = example.parent / "policies" / "platform.yaml"
    before = platform.read_text()
    first = run_cli("key", "add", "platform", "--config", str(example))
    assert first.returncode == 0, first.stderr
    second = run_cli("key", "add", "platform", "--config", str(example))
    assert second.returncode == 0, second.stderr
    key1, key2 = first.stdout.strip(), second.stdout.strip()
    text = platform.read_text()
    assert text.count("keys:") == 1
    assert yaml.safe_load(text)["keys"] == [SHIPPED_HASH, hash_key(key1), hash_key(key2)]
    # every comment of the shipped file is still there, and nothing else changed but the two new lines
    assert [ln for ln in text.splitlines() if ln not in before.splitlines()] == [
        f"  - {hash_key(key1)}", f"  - {hash_key(key2)}"]
    assert key1 not in text and key2 not in text  # only hashes are stored
    assert run_cli("check", "--config", str(example)).returncode == 0
    assert await authenticates(aiohttp_client, example, key1)
    assert await authenticates(aiohttp_client, example, key2)

    revoked = run_cli("key", "revoke", "platform", key1, "--config", str(example))
    assert revoked.returncode == 0 and "revoked 1 key(s)" in revoked.stdout, revoked.stderr
    assert yaml.safe_load(platform.read_text())["keys"] == [SHIPPED_HASH, hash_key(key2)]
    assert "# sha256 of each key; add with `switchyard key add platform`" in platform.read_text()
    assert run_cli("check", "--config", str(example)).returncode == 0
    assert not await authenticates(aiohttp_client, example, key1)
    assert await authenticates(aiohttp_client, example, key2)
    missing = run_cli("key", "revoke", "platform", key1, "--config", str(example))
    assert missing.returncode == 1 and "no key of team 'platform' matches" in missing.stderr


GW = GatewayConfig.model_validate({"backends": {"local": {"kind": "llamacpp"}}})


@pytest.mark.parametrize(("text", "expected_line"), [
    ("team: t\nkeys: []\nrules:\n  - route: [local]\n", "  - {h}"),
    ("team: t\nkeys: [aaaaaaaa{pad}]\nrules:\n  - route: [local]\n", "keys: [aaaaaaaa{pad}, {h}]"),  # stays flow
    ("team: t\nkeys:\nrules:\n  - route: [local]\n", "  - {h}"),  # every key revoked before
    ("team: t\nrules:\n  - route: [local]\n", "  - {h}"),  # no keys: at all
    ("team: t  # ops\nkeys:  # hashes\n  - 'aaaaaaaa{pad}'  # laptop\nrules: [{{route: [local]}}]\n", "  - {h}"),
])
def test_add_key_to_every_shape_of_keys(tmp_path: Path, text: str, expected_line: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(text.format(pad="a" * 56))
    digest = hash_key("sy-new")
    add_key(path, digest, GW)
    out = path.read_text()
    assert expected_line.format(h=digest, pad="a" * 56) in out.splitlines(), out
    assert yaml.safe_load(out)["keys"][-1] == digest
    assert "# laptop" in out or "laptop" not in text


def test_revoke_removes_exactly_the_matching_hashes(tmp_path: Path) -> None:
    a, b = hash_key("sy-a"), hash_key("sy-b")
    path = tmp_path / "t.yaml"
    path.write_text(f"team: t\nkeys:\n  - {a}  # alice\n  - {b}  # bob\nrules:\n  - route: [local]\n")
    assert revoke_keys(path, a[:8], GW) == 1
    assert yaml.safe_load(path.read_text())["keys"] == [b]
    assert "# bob" in path.read_text()
    assert revoke_keys(path, "ffffffff", GW) == 0


def test_an_invalid_file_is_reported_not_edited(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("team: t\nrules:\n  - route: [gpu9]\n")
    with pytest.raises(ConfigError, match="unknown backend 'gpu9'"):
        add_key(path, hash_key("sy-x"), GW)
    assert path.read_text() == "team: t\nrules:\n  - route: [gpu9]\n"
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind

"""opencode itself (npm `opencode-ai`, pinned in tests/opencode) as a real client of Switchyard.

`opencode run` is driven with deploy/opencode.json exactly as shipped (provider, models, the agent
plugin from deploy/opencode-plugin registered by its relative path); only the gateway's URL and a
small `limit.output` come from OPENCODE_CONFIG_CONTENT. The gateway is the real one in front of the
real llama-server (SmolLM2-135M); hosted is the fake. opencode runs isolated and offline: a
temporary HOME/XDG tree, autoupdate/models.dev/share/LSP downloads off, a dead proxy for anything
that is not loopback, and a pre-seeded config dir so it skips its background
`npm install @opencode-ai/plugin` (see `isolated_home`).

Never skipped: a missing install fails with the command that fixes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gateway.embedded import LlamaServer
from tests.conftest import GatewayFactory, config_for
from tests.fake_hosted import FakeHosted

OPENCODE_VERSION = "1.18.33"
OPENCODE_DIR = Path(__file__).parent / "opencode"
DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
OPENCODE_JSON = DEPLOY / "opencode.json"
RUN_TIMEOUT = 100.0  # seconds for the whole `opencode run`: ~15 s on an idle box, 25-55 s under load
# Keeps SmolLM2's answers short so the run is bounded; everything else is deploy/opencode.json.
OUTPUT_LIMIT = 96
PROMPT = "Reply with one short sentence: hello."

# Offline switches found in opencode 1.18.33's code (flags are read as "1"/"true").
OFFLINE_ENV = {
    "OPENCODE_DISABLE_AUTOUPDATE": "1",  # no version check against the registry
    "OPENCODE_DISABLE_MODELS_FETCH": "1",  # no models.dev fetch: the bundled snapshot is used
    "OPENCODE_DISABLE_SHARE": "1",  # no session sharing
    "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",  # no language-server downloads
    "OPENCODE_DISABLE_CLAUDE_CODE": "1",  # don't read ~/.claude prompts/skills
    "OPENCODE_DISABLE_EXTERNAL_SKILLS": "1",
}


def _version_of(binary: Path, home: Path) -> str | None:
    # Even --version creates opencode's dirs under HOME: give it a scratch one.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_DATA_HOME": str(home / ".local/share"), "XDG_CACHE_HOME": str(home / ".cache"),
           "XDG_STATE_HOME": str(home / ".local/state")}
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30,
                             env=env, check=False)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def opencode_binary(home: Path) -> Path:
    """The pinned opencode CLI from tests/opencode/node_modules.

    `opencode-ai`'s bin is a stub that its postinstall replaces with the platform binary; when npm
    did not run the postinstall (--ignore-scripts, a script policy), use the platform package's
    binary directly.
    """
    modules = OPENCODE_DIR / "node_modules"
    candidates = [modules / "opencode-ai" / "bin" / "opencode.exe",
                  *sorted(modules.glob("opencode-linux-*/bin/opencode"))]
    found = {}
    for c in candidates:
        if c.is_file():
            version = _version_of(c, home)
            found[str(c)] = version
            if version == OPENCODE_VERSION:
                return c
    pytest.fail(f"opencode {OPENCODE_VERSION} is not installed in {modules} (found: {found or 'nothing'}): "
                "run `make test`, or `cd tests/opencode && npm install`", pytrace=False)


def isolated_home(root: Path) -> dict[str, str]:
    """A HOME/XDG tree of the test's own: the real user's config, data and caches are never read or written.

    opencode runs `npm install @opencode-ai/plugin` (a registry download) in every config dir it
    uses, and waits for it before loading plugins. Npm.install skips a dir whose node_modules exists
    and whose package.json/package-lock.json already list the package, so seed those (our plugin
    imports nothing from it).
    """
    home = root / "home"
    config_dir = home / ".config" / "opencode"
    (config_dir / "node_modules").mkdir(parents=True)
    deps = {"@opencode-ai/plugin": OPENCODE_VERSION}
    (config_dir / "package.json").write_text(json.dumps({"dependencies": deps}))
    (config_dir / "package-lock.json").write_text(json.dumps({"lockfileVersion": 3,
                                                              "packages": {"": {"dependencies": deps}}}))
    for d in (".local/share", ".cache", ".local/state"):
        (home / d).mkdir(parents=True, exist_ok=True)
    return {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_STATE_HOME": str(home / ".local" / "state"),
    }


def opencode_env(root: Path, base_url: str) -> dict[str, str]:
    overrides = {
        "provider": {"switchyard": {
            "options": {"baseURL": base_url},
            "models": {"auto": {"limit": {"context": 400000, "input": 272000, "output": OUTPUT_LIMIT}}},
        }},
        "autoupdate": False,
        "share": "disabled",
    }
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "TMPDIR": str(root),
        **isolated_home(root),
        **OFFLINE_ENV,
        "OPENCODE_CONFIG": str(OPENCODE_JSON),  # the shipped file, plugin path relative to it
        "OPENCODE_CONFIG_CONTENT": json.dumps(overrides),  # merged last
        # Anything that is not loopback goes to a dead proxy and fails at once: the run is offline.
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "127.0.0.1,localhost",
    }


@pytest.fixture(scope="module")
def opencode_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return opencode_binary(tmp_path_factory.mktemp("opencode-version"))


async def run_opencode(binary: Path, root: Path, base_url: str, prompt: str) -> tuple[int, list[dict[str, Any]], str]:
    """`opencode run --format json PROMPT` in an empty project dir; returns (exit code, events, stderr)."""
    project = root / "project"
    project.mkdir()
    args = [str(binary), "run", "--format", "json", "--print-logs", "--log-level", "INFO", prompt]
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=project, env=opencode_env(root, base_url), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: opencode and anything it spawned
        out, err = await proc.communicate()
        pytest.fail(f"`opencode run` did not finish within {RUN_TIMEOUT:.0f}s; stderr tail:\n"
                    f"{err.decode(errors='replace')[-3000:]}", pytrace=False)
    events = []
    for line in out.decode(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return proc.returncode or 0, events, err.decode(errors="replace")


async def settled_decisions(gw: Any, roles: tuple[str, ...] = ("title", "main"), wait: float = 10.0) -> list[Any]:
    """The recorded decisions once each role has one: a request opencode cut short when it exited
    (the title may still be running beside the finished turn) is recorded when the gateway sees
    the disconnect, a moment after the process is gone."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while loop.time() < deadline:
        decisions = list(gw.runtime.recorder.recent)
        if all(any(d.role == r for d in decisions) for r in roles):
            return decisions
        await asyncio.sleep(0.1)
    return list(gw.runtime.recorder.recent)


def describe(decisions: list[Any]) -> str:
    return "\n".join(f"  role={d.role} client={d.client} backend={d.backend} outcome={d.outcome} "
                     f"status={d.status} reason={d.reason!r} failover={d.failover}" for d in decisions) or "  (none)"


async def test_opencode_run_through_switchyard(opencode_bin: Path, llama: LlamaServer, make_gateway: GatewayFactory,
                                               fake: FakeHosted, tmp_path: Path) -> None:
    # The default policy of tests/conftest.py, plus two decoy prompt signatures that would give
    # opencode's title and build prompts other roles (routed exactly the same way). Explicit
    # signals beat prompt signatures, so `title`/`main` below prove the plugin's x-opencode-agent
    # header arrived and decided the role.
    _, policy = config_for(llama.url, fake.url)
    policy["signatures"] = [
        {"role": "tags", "system_prefix": ["You are a title generator."]},
        {"role": "subagent", "system_prefix": ["You are opencode, an interactive CLI tool"]},
    ]
    gw = await make_gateway(llama.url, policies={"default": policy})

    code, events, stderr = await run_opencode(opencode_bin, tmp_path, gw.base_url, PROMPT)
    decisions = await settled_decisions(gw)
    context = f"\ndecisions:\n{describe(decisions)}\nopencode stderr tail:\n{stderr[-3000:]}"
    assert code == 0, f"`opencode run` exited {code}{context}"

    # opencode got an answer through the gateway and saw its usage (it compacts from it).
    errors = [e for e in events if e.get("type") == "error"]
    assert not errors, f"opencode reported errors: {errors}{context}"
    text = "".join(e["part"].get("text", "") for e in events if e.get("type") == "text")
    assert text.strip(), f"opencode printed no answer; events: {[e.get('type') for e in events]}{context}"
    finishes = [e["part"] for e in events if e.get("type") == "step_finish"]
    assert finishes and finishes[-1]["tokens"]["output"] > 0, f"no usage reached opencode: {finishes}{context}"

    assert decisions, f"opencode sent nothing to the gateway{context}"
    assert {d.client for d in decisions} == {"opencode"}, f"client not recognised as opencode{context}"
    decoys = [d for d in decisions if d.role in ("tags", "subagent")]
    assert not decoys, ("the x-opencode-agent header (deploy/opencode-plugin) did not decide the role: "
                        f"the prompt signatures did{context}")
    sessions = {d.session for d in decisions}
    assert len(sessions) == 1 and str(next(iter(sessions))).startswith("ses_"), f"session ids: {sessions}{context}"

    for role, rule in (("title", "background"), ("main", "default")):
        # The title runs beside the main turn; opencode may exit once the turn is done and cut a
        # slow title short (outcome client_gone): it was still classified and routed.
        routed = [d for d in decisions if d.role == role and d.backend is not None
                  and (d.outcome == "ok" or (role == "title" and d.outcome == "client_gone"))]
        assert routed, f"no {role} request was routed and served{context}"
        d = routed[-1]
        # The default policy: background tasks and main turns go local first, hosted as fallback
        # (a main turn that waits past max_queue_wait behind the title spills to hosted).
        assert d.reason.startswith(f"rule {rule} (role {role})"), context
        assert d.route == ["local", "hosted"] and d.backend in d.route, context
        if getattr(d, "role_source", None) is not None:  # once Decision records it
            assert d.role_source == "header x-opencode-agent", context

    # The text opencode printed is the answer of the backend the gateway recorded for the main turn.
    main = [d for d in decisions if d.role == "main" and d.outcome == "ok"][-1]
    from_fake = "hosted says" in text
    assert from_fake == (main.backend == "hosted"), f"printed {text[:200]!r} but main went {main.backend}{context}"

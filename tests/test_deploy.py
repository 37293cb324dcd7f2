"""deploy/: what can be checked without a Docker engine or systemd as PID 1.

The compose file's wiring (and the Switchyard config it mounts, loaded as the container would see
it), the Dockerfile's build context, user, healthcheck and command, the systemd unit
(`systemd-analyze verify` and its offline security score), opencode.json, and the opencode plugin's
hook run under Node. That the plugin loads in opencode itself is tests/test_opencode_e2e.py.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import LiteLLMBackend, LlamaCppBackend, load_settings

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
UNIT = DEPLOY / "switchyard.service"
OPENCODE_JSON = DEPLOY / "opencode.json"
PLUGIN = DEPLOY / "opencode-plugin" / "switchyard-agent.js"
CONFIG_IN_CONTAINER = "/etc/switchyard/switchyard.yaml"


# ---- docker-compose.yml ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), "no services in docker-compose.yml"
    return data


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the "KEY=value" list form
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def mounts_of(service: dict[str, Any]) -> dict[str, str]:
    """container path -> source (a host path relative to deploy/, or a named volume)."""
    out = {}
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            out[v["target"]] = str(v.get("source", ""))
        else:
            parts = str(v).split(":")
            out[parts[1]] = parts[0]
    return out


def container_root(tmp_path: Path, mounts: dict[str, str]) -> Path:
    """A directory standing for the container's filesystem, with the bind mounts copied in."""
    root = tmp_path / "container"
    for target, source in mounts.items():
        if not source.startswith((".", "/")):
            continue  # a named volume
        src = (DEPLOY / source).resolve()
        dest = root / target.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest)
        else:
            shutil.copy(src, dest)
    return root


def test_compose_has_the_three_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) >= {"llama", "switchyard", "open-webui"}, compose["services"].keys()
    # Compose interpolates "$": every "$" must be ${VAR...} or an escaped "$$".
    assert not re.search(r"\$(?!\{)", COMPOSE.read_text().replace("$$", "")), "unescaped $ in docker-compose.yml"
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for source in mounts_of(service).values():
            if not source.startswith((".", "/")):
                assert source in declared, f"{name}: named volume {source!r} is not declared at top level"
            else:
                assert (DEPLOY / source).exists(), f"{name}: mounts {source!r}, which is not in the repository"


def test_compose_llama_service(compose: dict[str, Any]) -> None:
    llama = compose["services"]["llama"]
    assert llama["image"] == "ghcr.io/ggml-org/llama.cpp:server"
    cmd = [str(a) for a in llama["command"]]
    assert cmd[cmd.index("-np") + 1] == "1", "llama-server must run one slot (-np 1)"
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    model = cmd[cmd.index("-m") + 1]
    model_dir = next((t for t in mounts_of(llama) if model.startswith(t.rstrip("/") + "/")), None)
    assert model_dir, f"the model {model} is not on a mounted volume: {mounts_of(llama)}"
    assert "gpu" in COMPOSE.read_text().lower(), "GPU notes are missing"


def test_compose_switchyard_service_and_its_config(compose: dict[str, Any], tmp_path: Path) -> None:
    sy = compose["services"]["switchyard"]
    build = sy["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    mounts = mounts_of(sy)
    assert CONFIG_IN_CONTAINER in mounts, f"the config is not mounted at {CONFIG_IN_CONTAINER}: {mounts}"
    assert (DEPLOY / mounts[CONFIG_IN_CONTAINER]).resolve() == DEPLOY / "switchyard.compose.yaml"

    # Load the config exactly as the container sees it: its policies_dir resolves inside the mounts.
    settings = load_settings(container_root(tmp_path, mounts) / CONFIG_IN_CONTAINER.lstrip("/"))
    gw = settings.gateway
    assert gw.listen.host == "0.0.0.0"
    published = [str(p) for p in sy.get("ports") or []]
    assert any(p.endswith(f":{gw.listen.port}") for p in published), f"port {gw.listen.port} not published"
    assert gw.data_dir in mounts, f"data_dir {gw.data_dir} is not on a volume: {mounts}"

    local = gw.backends["local"]
    assert isinstance(local, LlamaCppBackend) and not local.embedded
    assert local.url == "http://llama:8080"
    llama_cmd = [str(a) for a in compose["services"]["llama"]["command"]]
    assert llama_cmd[llama_cmd.index("--port") + 1] == "8080"

    # hosted: as in the shipped switchyard.yaml; its key comes from the environment.
    shipped = yaml.safe_load((REPO / "switchyard.yaml").read_text())
    mounted = yaml.safe_load((DEPLOY / "switchyard.compose.yaml").read_text())
    assert mounted["backends"]["hosted"] == shipped["backends"]["hosted"]
    hosted = gw.backends["hosted"]
    assert isinstance(hosted, LiteLLMBackend) and hosted.api_key_env
    assert hosted.api_key_env in env_of(sy), f"{hosted.api_key_env} is not passed to the container"


def test_compose_open_webui_is_wired_to_switchyard(compose: dict[str, Any]) -> None:
    webui = compose["services"]["open-webui"]
    assert webui["image"] == "ghcr.io/open-webui/open-webui:main"
    env = env_of(webui)
    port = yaml.safe_load((DEPLOY / "switchyard.compose.yaml").read_text())["listen"]["port"]
    assert env["OPENAI_API_BASE_URLS"] == f"http://switchyard:{port}/v1"
    configs = json.loads(env["OPENAI_API_CONFIGS"])
    assert configs == {"0": {"headers": {"X-OpenWebUI-Task": "{{TASK}}"}}}
    # ... and that header is one Switchyard reads as an explicit role signal.
    signatures = yaml.safe_load((REPO / "gateway" / "signatures.yaml").read_text())
    assert "x-openwebui-task" in {h.lower() for h in signatures["role_headers"]}
    assert env["ENABLE_FORWARD_USER_INFO_HEADERS"].lower() == "true"


# ---- Dockerfile --------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not exec form: {args}"
    return value


def dockerignored(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern excludes a directory's contents too."""
    ignore = DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore")
    patterns = [p.strip() for p in ignore.read_text().splitlines() if p.strip() and not p.startswith("#")]
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatch(p, pat) or (pat.startswith("**/") and fnmatch.fnmatch(p.split("/")[-1], pat[3:]))
               for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerfile_builds_a_non_root_switchyard_image() -> None:
    ins = dockerfile_instructions()
    assert ins[0] == ("FROM", "python:3.11-slim")
    runs = " && ".join(a for i, a in ins if i == "RUN")
    assert re.search(r"pip install \.(\s|$)", runs), "the image must `pip install .`"

    # Everything COPY'd is in the repo and inside the build context (repo root minus the dockerignore),
    # and that is everything `pip install .` needs.
    copied = []
    for i, args in ins:
        if i == "COPY":
            *sources, _ = [a for a in args.split() if not a.startswith("--")]
            copied += sources
    for src in copied:
        assert (REPO / src).exists(), f"COPY {src}: not in the repository"
        assert not dockerignored(src), f"COPY {src}: excluded from the build context by Dockerfile.dockerignore"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"]}
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        needed |= {p.name for p in REPO.iterdir() if p.is_dir() and fnmatch.fnmatch(p.name, pattern)}
    assert needed <= {c.rstrip("/") for c in copied}, f"pip install . needs {needed}, COPY has {copied}"

    users = [a for i, a in ins if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"the image runs as root: {users}"
    assert [a for i, a in ins if i == "EXPOSE"] == ["4000"]

    healthcheck = next(a for i, a in ins if i == "HEALTHCHECK")
    assert "CMD" in healthcheck and "http://127.0.0.1:4000/healthz" in healthcheck
    entrypoint = exec_form(next(a for i, a in reversed(ins) if i == "ENTRYPOINT"))
    cmd = exec_form(next(a for i, a in reversed(ins) if i == "CMD"))
    assert entrypoint + cmd == ["switchyard", "serve", "--config", CONFIG_IN_CONTAINER]
    assert "/etc/switchyard/switchyard.yaml" in next(a for i, a in ins if i == "COPY" and "compose" in a)


def test_image_default_config_loads(tmp_path: Path) -> None:
    """The config and policies baked into the image (used when nothing is mounted) validate."""
    root = tmp_path / "image"
    for i, args in dockerfile_instructions():
        if i == "COPY" and args.split()[-1].startswith("/etc/switchyard"):
            src, dest = args.split()[-2:]
            target = root / dest.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if (REPO / src).is_dir():
                shutil.copytree(REPO / src, target)
            else:
                shutil.copy(REPO / src, target)
    settings = load_settings(root / CONFIG_IN_CONTAINER.lstrip("/"))
    assert settings.policies[settings.gateway.default_team].rules


# ---- switchyard.service ------------------------------------------------------------------------

def unit_entries() -> dict[str, list[tuple[str, str]]]:
    """[Section] -> [(Key, value)], keeping repeated keys (systemd allows them; configparser doesn't)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None and "=" in line, f"switchyard.service: not a key=value line: {raw!r}"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def test_systemd_unit_has_the_required_settings() -> None:
    sections = unit_entries()
    assert {"Unit", "Service", "Install"} <= set(sections)
    service = dict(sections["Service"])  # the last value of a repeated key
    assert service["ExecStart"].split()[1:] == ["serve", "--config", "/etc/switchyard/switchyard.yaml"]
    assert service["ExecStart"].split()[0].endswith("/switchyard")
    assert service.get("DynamicUser") == "yes" or service.get("User") not in (None, "root")
    assert service["ProtectSystem"] == "strict"
    assert service["StateDirectory"] == "switchyard"
    assert service["EnvironmentFile"].lstrip("-").startswith("/etc/switchyard/")
    assert service["Restart"] == "on-failure"
    assert service["NoNewPrivileges"] == "yes"
    assert dict(sections["Install"])["WantedBy"] == "multi-user.target"


def test_systemd_unit_has_room_for_sockets_and_for_the_drain() -> None:
    """Issue 12: the default 1024-fd soft limit runs out under load (EMFILE), and a stop timeout
    shorter than the gateway's shutdown grace gets it SIGKILLed mid-drain, losing ledger rows."""
    from gateway.config import GatewayConfig

    service = dict(unit_entries()["Service"])
    assert int(service["LimitNOFILE"].split(":")[0]) >= 65536
    grace = GatewayConfig.model_fields["shutdown_grace"].default
    stop = service["TimeoutStopSec"]
    assert stop.isdigit(), f"TimeoutStopSec should be plain seconds, got {stop!r}"
    assert int(stop) >= grace + 5, f"TimeoutStopSec={stop} leaves no room after shutdown_grace={grace}s"


@pytest.fixture
def unit_root(tmp_path: Path) -> Path:
    """A root for `systemd-analyze --root`: the system's units, the unit, and a stand-in ExecStart binary."""
    sa = shutil.which("systemd-analyze")
    if sa is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd); the unit's keys are checked above")
    root = tmp_path / "root"
    units = next((d for d in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if d.is_dir()), None)
    assert units is not None, "systemd-analyze is installed but the system's unit directory is not"
    shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system/switchyard.service")
    binary = root / dict(unit_entries()["Service"])["ExecStart"].split()[0].lstrip("/")
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    return root


def test_systemd_unit_verifies(unit_root: Path) -> None:
    proc = subprocess.run(["systemd-analyze", "verify", f"--root={unit_root}",
                           "/etc/systemd/system/switchyard.service"],
                          capture_output=True, text=True, timeout=60, check=False)
    # verify exits 0 on unknown keys or bad values (it only warns): any output is a failure.
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr


def test_systemd_unit_is_hardened(unit_root: Path) -> None:
    """`systemd-analyze security` offline: exposure at most 2.0 ("OK"; 10 is wide open)."""
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", f"--root={unit_root}",
                           "--threshold=20", "switchyard.service"],
                          capture_output=True, text=True, timeout=60, check=False)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    assert proc.returncode == 0, f"{summary}\n{proc.stdout}{proc.stderr}"


# ---- opencode.json and the plugin --------------------------------------------------------------

def test_opencode_json_provider() -> None:
    cfg = json.loads(OPENCODE_JSON.read_text())
    provider = cfg["provider"]["switchyard"]
    assert provider["npm"] == "@ai-sdk/openai-compatible"
    assert provider["options"]["baseURL"] == "http://127.0.0.1:4000/v1"
    models = provider["models"]
    assert set(models) == {"auto", "local", "hosted"}
    for name, model in models.items():
        limit = model["limit"]
        assert limit["input"] < limit["context"] and 0 < limit["output"] <= 32000, (name, limit)
    assert models["auto"]["limit"] == models["hosted"]["limit"], "auto's limits are the hosted model's"
    shipped = yaml.safe_load((REPO / "switchyard.yaml").read_text())
    assert models["local"]["limit"]["context"] == shipped["backends"]["local"]["context_limit"]
    assert cfg["model"] == "switchyard/auto"
    plugins = [p[0] if isinstance(p, list) else p for p in cfg["plugin"]]
    assert [(OPENCODE_JSON.parent / p).resolve() for p in plugins] == [PLUGIN], plugins


HOOK_CASES = r"""
const { SwitchyardAgent } = await import(process.argv[1]);
const hook = async (options, agent, providerID) => {
  const hooks = await SwitchyardAgent({}, options);
  const output = { headers: { existing: "kept" } };
  await hooks["chat.headers"]({ sessionID: "ses_1", agent, model: { providerID }, provider: {}, message: {} }, output);
  return output.headers;
};
console.log(JSON.stringify([
  await hook(undefined, "build", "switchyard"),
  await hook(undefined, "title", "anthropic"),
  await hook({ providers: ["gw"] }, "compaction", "gw"),
  await hook({ providers: "*" }, "explore", "anything"),
  await hook({ header: "x-agent" }, "plan", "switchyard"),
]));
"""


def test_plugin_chat_headers_hook(tmp_path: Path) -> None:
    """The hook itself, under Node (opencode runs it under Bun: tests/test_opencode_e2e.py)."""
    node = shutil.which("node")
    assert node, "node is required: apt-get install nodejs"
    module = tmp_path / "switchyard-agent.mjs"  # no package.json "type": Node needs .mjs for ESM
    shutil.copy(PLUGIN, module)
    proc = subprocess.run([node, "--input-type=module", "-e", HOOK_CASES, module.as_uri()],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [
        {"existing": "kept", "x-opencode-agent": "build"},
        {"existing": "kept"},  # other providers are left alone by default
        {"existing": "kept", "x-opencode-agent": "compaction"},
        {"existing": "kept", "x-opencode-agent": "explore"},
        {"existing": "kept", "x-agent": "plan"},
    ]

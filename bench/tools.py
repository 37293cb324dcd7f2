"""The comparison targets' programs: nginx (Debian package) and LiteLLM's proxy (its own cached venv).

`pip install 'litellm[proxy]==1.110.2'` cannot work from here: three of the extra's pins
(`litellm-proxy`, `litellm-proxy-extras`, `litellm-enterprise`) are not on the registry. The proxy's
code ships inside the `litellm` wheel itself, so the venv gets `litellm` plus every other
`extra == "proxy"` requirement read from the installed wheel's metadata. The venv lives in
~/.cache/switchyard/bench-venv and is reused while its requirement list is unchanged.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import venv
from pathlib import Path

from packaging.requirements import Requirement

LITELLM_VERSION = "1.110.2"
MISSING_FROM_REGISTRY = {"litellm-proxy", "litellm-proxy-extras", "litellm-enterprise"}
CACHE = Path(os.environ.get("SWITCHYARD_BENCH_CACHE", Path.home() / ".cache" / "switchyard"))
VENV = CACHE / "bench-venv"


def proxy_requirements() -> list[str]:
    """litellm's `extra == "proxy"` requirements for this interpreter, minus the unpublished ones."""
    dist = importlib.metadata.distribution("litellm")
    out = [f"litellm=={dist.version}"]
    for spec in dist.requires or []:
        req = Requirement(spec)
        if req.marker is None or not req.marker.evaluate({"extra": "proxy"}):
            continue
        if req.marker.evaluate({"extra": ""}):
            continue  # a base requirement: comes with litellm anyway
        if req.name.lower() in MISSING_FROM_REGISTRY:
            continue
        req.marker = None
        out.append(str(req))
    return out


def litellm_proxy_bin(install: bool = True, log=print) -> Path | None:
    """The `litellm` CLI of the bench venv; builds the venv when missing (unless install=False)."""
    reqs = proxy_requirements()
    digest = hashlib.sha256("\n".join(reqs).encode()).hexdigest()[:16]
    stamp = VENV / ".bench-stamp"
    exe = VENV / "bin" / "litellm"
    if exe.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return exe
    if not install:
        return None
    log(f"bench: building the LiteLLM proxy venv in {VENV} ({len(reqs)} requirements; cached afterwards)...")
    if VENV.exists():
        shutil.rmtree(VENV)
    VENV.parent.mkdir(parents=True, exist_ok=True)
    venv.create(VENV, with_pip=True, symlinks=True)
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    result = subprocess.run([*pip, *reqs], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pip could not build the LiteLLM proxy venv:\n{result.stderr[-3000:]}")
    stamp.write_text(digest + "\n")
    return exe


def nginx_bin(install: bool = True, log=print) -> Path | None:
    """Debian's nginx; `apt-get install nginx-light` (after one `apt-get update`) when missing."""
    for cand in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if cand and Path(cand).exists():
            return Path(cand)
    if not install:
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError("nginx is missing and cannot be installed here (needs root and apt-get)")
    log("bench: installing nginx with apt-get...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
    for pkg in ("nginx-light", "nginx"):
        r = subprocess.run(["apt-get", "install", "-y", "-qq", pkg], env=env, capture_output=True, text=True)
        if r.returncode == 0 and Path("/usr/sbin/nginx").exists():
            return Path("/usr/sbin/nginx")
    raise RuntimeError("apt-get could not install nginx")

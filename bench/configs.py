"""The configs of the processes under test: Switchyard, nginx and LiteLLM's proxy, all on loopback."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from bench.procs import HOST, python
from gateway.tokens import use_bundled_tiktoken

UPSTREAM_KEY_ENV = "SWITCHYARD_BENCH_UPSTREAM_KEY"


def switchyard_config(directory: Path, upstream_port: int, *, n_ctx: int = 32768, concurrency: int = 64) -> Path:
    url = f"http://{HOST}:{upstream_port}"
    timeouts = {"connect": 2, "first_byte": 60, "idle": 60, "total": 300}
    gateway = {
        "listen": {"host": HOST, "port": 0},
        "body_limit_bytes": 16 * 1024 * 1024,
        "policies_dir": "policies",
        "data_dir": str(directory / "data"),
        "backends": {
            # A llama-server with enough slots for the load (-np 64): the queue is there but never waits.
            # Like the real one, the stand-in's /llama routes close every chat connection, so the gateway
            # opens a fresh upstream connection per request (the default, keep_alive: false).
            "local": {"kind": "llamacpp", "url": f"{url}/llama", "embedded": False, "max_concurrency": concurrency,
                      "context_limit": n_ctx, "timeouts": timeouts},
            # An OpenAI chat-completions provider: litellm builds the request, the answer's bytes are relayed.
            "hosted": {"kind": "litellm", "model": "openai/gpt-5-nano", "api_base": f"{url}/v1",
                       "api_key_env": UPSTREAM_KEY_ENV, "timeouts": timeouts},
            # A Responses-only model (what switchyard.yaml ships for zen): each event translated.
            "hosted_responses": {"kind": "litellm", "model": "openai/responses/gpt-5-nano", "api_base": f"{url}/v1",
                                 "api_key_env": UPSTREAM_KEY_ENV, "timeouts": timeouts},
        },
    }
    policy = {"team": "default", "output_reserve": 4096, "max_queue_wait": 60,
              "rules": [{"name": "default", "route": ["local", "hosted"]}]}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policies").mkdir(exist_ok=True)
    (directory / "policies" / "default.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    path = directory / "switchyard.yaml"
    path.write_text(yaml.safe_dump(gateway, sort_keys=False))
    return path


def nginx_config(directory: Path, port: int, upstream_port: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (directory / sub).mkdir(exist_ok=True)
    d = directory
    conf = f"""# nginx as a plain reverse proxy for SSE: one worker (Switchyard and the LiteLLM proxy get one
# process too), upstream keep-alive, no response buffering, no access log.
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    client_max_body_size 20m;
    upstream standin {{
        server {HOST}:{upstream_port};
        keepalive 64;
    }}
    server {{
        listen {HOST}:{port} backlog=1024;
        location / {{
            proxy_pass http://standin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_cache off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""
    path = d / "nginx.conf"
    path.write_text(conf)
    return path


def litellm_config(directory: Path, upstream_port: int) -> Path:
    cfg = {
        "model_list": [{"model_name": "bench", "litellm_params": {
            "model": "openai/gpt-5-nano", "api_base": f"http://{HOST}:{upstream_port}/v1",
            "api_key": "sk-bench-upstream"}}],
        "litellm_settings": {"drop_params": True, "set_verbose": False, "num_retries": 0,
                             "request_timeout": 300},
        "general_settings": {},
    }
    path = directory / "litellm.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def bench_env() -> dict[str, str]:
    env = {"SWITCHYARD_LOG_LEVEL": "WARNING", UPSTREAM_KEY_ENV: "sk-bench-upstream",
           "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "PYTHONUNBUFFERED": "1"}
    cache = use_bundled_tiktoken()
    if cache:
        env["TIKTOKEN_CACHE_DIR"] = cache
    return env


def switchyard_argv(config: Path, port: int) -> list[str]:
    exe = Path(sys.executable).parent / "switchyard"
    head = [str(exe)] if exe.exists() else [python(), "-m", "gateway.cli"]
    return [*head, "serve", "--config", str(config), "--port", str(port)]

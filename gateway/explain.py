"""`switchyard explain`: how a request would be classified and routed, without sending it.

It decides through the router alone (router.py: no ledger, no data dir, no network); with `--live`
it first asks the backends and the running gateway (circuits, readiness) for their state.
"""

from __future__ import annotations

import asyncio
from typing import Any

from multidict import CIMultiDictProxy

from .config import Settings


def _listen_url(settings: Settings) -> str:
    listen = settings.gateway.listen
    return f"http://{listen.host}:{listen.port}"


async def _gateway_state(url: str) -> dict[str, Any]:
    """The running gateway's view (circuits, queues) from its /readyz; {} when it is not running."""
    import aiohttp

    try:
        async with aiohttp.ClientSession() as s, s.get(f"{url.rstrip('/')}/readyz",
                                                      timeout=aiohttp.ClientTimeout(total=3)) as r:
            return dict((await r.json()).get("backends") or {})
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return {}


def _parse_any(raw: bytes, headers: CIMultiDictProxy[str]) -> Any:
    """A chat completion, an Anthropic Messages or a Responses body, told apart by shape."""
    import json

    from .protocols import detect
    from .receive import parse_chat

    try:
        body = json.loads(raw)
    except ValueError:
        return parse_chat(raw, headers)  # its error names the problem
    return detect(body if isinstance(body, dict) else {}, headers).parse(raw, headers)


async def explain(settings: Settings, raw: bytes, headers: CIMultiDictProxy[str], live: bool,
                   gateway_url: str | None = None, team: str | None = None,
                   team_key: str | None = None) -> dict[str, Any]:
    from .errors import GatewayError
    from .router import Router

    rt = Router.build(settings)  # decides only: no ledger, no data dir, no network unless --live
    probes: dict[str, Any] = {}
    try:
        if live:
            probes = dict(zip(rt.backends, await asyncio.gather(*(b.probe() for b in rt.backends.values())),
                              strict=True))
            gateway_state = await _gateway_state(gateway_url or _listen_url(settings))
            for name, state in gateway_state.items():
                breaker = rt.breakers.get(name)
                if breaker is not None and state.get("circuit") == "open":
                    breaker.adopt_open(state.get("circuit_detail") or "open in the running gateway")
                if name in rt.backends and state.get("ready") is not None:
                    # Whether a backend is usable (e.g. has its API key) is the running gateway's word,
                    # not this process's environment.
                    rt.decider.live_unusable[name] = None if state["ready"] else (
                        f"not ready in the running gateway: {state.get('detail') or 'unknown'}")
        req = _parse_any(raw, headers)
        policy = rt.policy
        if team_key:
            found = rt.teams.team_for_key(team_key)
            if found is None:
                raise GatewayError("that key belongs to no team")
            policy = found
        elif team:
            if team not in rt.teams.policies:
                raise GatewayError(f"no team {team!r} (teams: {', '.join(sorted(rt.teams.policies))})")
            policy = rt.teams.policies[team]
        profile = rt.classify(req, policy)
        out: dict[str, Any] = {
            "protocol": req.protocol,
            "team": profile.team, "role": profile.role, "role_source": profile.role_source,
            "client": profile.client, "session": profile.session, "model": profile.model,
            "bytes": profile.size.nbytes, "tokens_in": profile.tokens_in, "output_reserve": profile.output_reserve,
        }
        try:
            route = await rt.decide(req, profile, policy)
        except GatewayError as e:
            out.update(route=[], reason=e.message, error={"status": e.status, "code": e.code})
            return out
        tier_of = rt.decider.tier_of  # a tier's member says which tier it stands in for
        steps = [{"backend": s.backend, "kind": rt.backends[s.backend].place,
                  **({"tier": tier_of[s.backend]} if s.backend in tier_of else {})} for s in route.steps]
        out["predicted_ttft"] = {  # each candidate's own estimate, with its parts (queue, cached tokens, rates)
            name: {"seconds": None if e.seconds is None else round(e.seconds, 3), **e.parts}
            for name, e in route.estimates.items()}
        out.update(tokens_in=route.tokens_in, tokens_method=route.tokens_method, route=steps,
                   reason=route.reason, rule=route.rule)
        out["team"] = policy.team
        if live:
            out["backends"] = {n: {"ready": p.ready, "detail": p.detail} for n, p in probes.items()}
            out["circuits"] = {n: b.describe() for n, b in rt.breakers.items()}
        return out
    finally:
        await rt.close()

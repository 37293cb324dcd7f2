"""A hosted provider spoken to in the caller's own protocol, through litellm's adapters.

Anthropic Messages go through `litellm.anthropic_messages` (translated by litellm's adapter for a
provider that does not speak Messages; Anthropic itself is relayed as bytes, hosted.py and
litellm_wire.py `messages`, decision 101); Responses through `litellm.aresponses`
(native to OpenAI, bridged by litellm for others). Nothing here translates by hand: this module
only turns what litellm hands back into the bytes the relay passes on — one JSON body, or SSE
events in the protocol's own format — so a local->hosted failover keeps the client's protocol.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ..protocols import PROTOCOLS
from .base import Upstream, empty_rest

if TYPE_CHECKING:
    from .hosted import HostedBackend



def _as_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    dump = getattr(obj, "model_dump", None)
    if dump is not None:
        return dump(exclude_none=True, mode="json")
    return dict(obj)


def _event_bytes(item: Any) -> bytes:
    """One streamed item as SSE bytes: litellm yields raw bytes (native pass-through), dicts or
    pydantic events depending on the route it took."""
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, str):
        return item.encode()
    data = _as_dict(item)
    kind = data.get("type") or "message"
    return f"event: {kind}\ndata: ".encode() + json.dumps(data).encode() + b"\n\n"


async def open_protocol(backend: HostedBackend, body: dict[str, Any], headers: dict[str, str], stream: bool,
                        protocol: str) -> Upstream:
    from .hosted import _litellm_closer, _noop, load_litellm

    litellm = load_litellm()
    cfg = backend.config
    common = dict(model=cfg.model, stream=stream, api_base=cfg.api_base, api_key=cfg.api_key,
                  extra_headers=backend._extra_headers(headers) or None,
                  timeout=cfg.timeouts.total, num_retries=0, max_retries=0, drop_params=True)
    rest = {k: v for k, v in body.items() if k not in ("model", "stream")}
    call = litellm.anthropic_messages if protocol == "messages" else litellm.aresponses
    proto = PROTOCOLS[protocol]
    try:
        async with asyncio.timeout(cfg.timeouts.first_byte):
            response = await call(**rest, **common)
            if not stream:
                payload = _as_dict(response)
                return Upstream(200, json.dumps(payload).encode(), empty_rest(), _noop, usage=proto.usage_of(payload))
            chunks = aiter(response)
            first = await anext(chunks)
    except Exception as e:
        raise backend._failure(e) from e

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for item in chunks:
                yield _event_bytes(item)
        except Exception as e:
            raise backend._failure(e) from e

    return Upstream(200, _event_bytes(first), relay(), _litellm_closer(response))

"""The floor under the local path: a bare aiohttp relay making the same upstream exchange, and nothing else.

    python -m bench.floor --port N --upstream URL

What any aiohttp proxy in front of llama-server pays before it does a proxy's work: it reads the
client's request, opens a fresh connection per request (llama-server closes every chat connection),
asks for the answer as a stream (llama.cpp cannot cancel a non-streamed generation, decision 40) and,
for a non-streamed request, joins the events into one `chat.completion`. No classification, decision,
queue, breaker, ledger or metrics; orjson and raw asyncio streams, on uvloop. `bench.run` measures
it beside Switchyard's local target, so the report says how much of the local path's added latency
and CPU is the exchange itself and how much is Switchyard's own work.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import web


async def _exchange(host: str, port: int, path: str, body: bytes,
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)  # the writer must outlive the read (its
    # __del__ closes the socket)
    writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (path.encode(), host.encode(), len(body), body))
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        writer.close()
        raise web.HTTPBadGateway(text=head.split(b"\r\n", 1)[0].decode("latin-1"))
    return reader, writer


async def _chunks(reader: asyncio.StreamReader):  # type: ignore[no-untyped-def]
    """The chunked body's data, chunk by chunk (the stand-in, as llama-server, writes one per event)."""
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
        if size == 0:
            return
        data = await reader.readexactly(size + 2)
        yield data[:-2]


def _dechunk(body: bytes) -> bytes:
    parts, pos = [], 0
    while True:
        eol = body.index(b"\r\n", pos)
        size = int(body[pos:eol].split(b";")[0], 16)
        if size == 0:
            return b"".join(parts)
        parts.append(body[eol + 2:eol + 2 + size])
        pos = eol + 4 + size


async def exchange_alone(upstream: str, body: dict[str, Any], n: int) -> list[float]:
    """Seconds per exchange with no proxy at all: a fresh connection, the streamed answer read to its end
    (what every local request costs before any proxy adds to it; `bench.run` reports its p50)."""
    u = urlsplit(upstream)
    host, port, path = u.hostname or "127.0.0.1", u.port or 80, u.path.rstrip("/") + "/v1/chat/completions"
    data = orjson.dumps({**body, "stream": True, "stream_options": {"include_usage": True}})
    loop = asyncio.get_running_loop()
    times = []
    for _ in range(n):
        t0 = loop.time()
        reader, writer = await _exchange(host, port, path, data)
        await reader.read()
        writer.close()
        times.append(loop.time() - t0)
    return times


def app(upstream: str) -> web.Application:
    u = urlsplit(upstream)
    host, port, path = u.hostname or "127.0.0.1", u.port or 80, u.path.rstrip("/") + "/v1/chat/completions"

    async def chat(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        stream = bool(body.get("stream"))
        body["stream"], body["stream_options"] = True, {"include_usage": True}
        reader, writer = await _exchange(host, port, path, orjson.dumps(body))
        try:
            if stream:
                resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
                await resp.prepare(request)
                async for data in _chunks(reader):
                    await resp.write(data)
                await resp.write_eof()
                return resp
            raw = _dechunk(await reader.read())  # llama-server closes the connection after the answer
        finally:
            writer.close()
        events = orjson.loads(b"[" + b",".join(line[6:] for line in raw.split(b"\n")
                                                if line.startswith(b"data: {")) + b"]")
        text = "".join(c["delta"].get("content") or "" for e in events for c in e.get("choices") or ())
        last = events[-1]
        answer = {"id": last.get("id"), "object": "chat.completion", "model": last.get("model"),
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                               "finish_reason": "stop"}], "usage": last.get("usage")}
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    a = web.Application()
    a.router.add_post("/v1/chat/completions", chat)
    return a


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="the llama-server-like base URL, e.g. http://127.0.0.1:N/llama")
    args = p.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    web.run_app(app(args.upstream), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()

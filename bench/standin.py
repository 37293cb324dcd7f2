"""The upstream stand-in: a tiny raw-asyncio HTTP/1.1 server that answers in OpenAI's wire format.

It must never be the bottleneck, so it does no JSON parsing on the hot path: the answers are
prebuilt bytes and `"stream": true` is found with one regex over the body. It speaks just enough
HTTP/1.1 for the clients in the bench (keep-alive, Content-Length or chunked request bodies,
HTTP/1.0 close-delimited answers for old-style proxies).

  POST /v1/chat/completions, /chat/completions   canned answer; with "stream": true a 200-chunk SSE
                                                  stream, a usage chunk, then `data: [DONE]`
  POST /v1/responses, /responses                  the same answer in the Responses API's shape (a 200-event
                                                  stream with response.created ... response.completed)
  /llama/...                                      any route above, answered like llama-server: every chat
                                                  answer says `Connection: close` and closes the socket
  POST /v1/chat/completions/input_tokens          {"input_tokens": bytes // 4}
  GET  /health, /props, /v1/models, /models       llama-server's readiness answers
  POST /_bench/delay                              body = milliseconds to wait before each chat answer
  GET  /_bench/stats                              {"requests": N, "max_inflight": N} (since the last delay set)

Run: python -m bench.standin --port N [--n-ctx 32768]  (prints "ready <port>" when listening)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import sys

from bench.http1 import head_fields

STREAM_CHUNKS = 200
MODEL = "gpt-5-nano"
_STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
# A chat stream has as many token events as the request's max_tokens allows (at most STREAM_CHUNKS), as a
# token server's would: a non-streamed local request that the gateway turns into a stream (decisions #40)
# asks for the canned answer's 38 tokens, and gets them as 38 events, not 200.
_MAX_TOKENS_RE = re.compile(rb'"max_tokens"\s*:\s*(\d+)')


def _completion() -> bytes:
    return json.dumps({
        "id": "chatcmpl-bench0000000000000000000000", "object": "chat.completion", "created": 1764000000,
        "model": MODEL, "system_fingerprint": "b11434",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant",
            "content": "The function returns early when the list is empty, so the caller never sees the "
                       "sentinel value. Move the guard below the loop and add a test for the empty case."}}],
        "usage": {"prompt_tokens": 412, "completion_tokens": 38, "total_tokens": 450},
    }, separators=(",", ":")).encode()


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _stream_events(chunks: int = STREAM_CHUNKS) -> list[bytes]:
    base = {"id": "chatcmpl-bench0000000000000000000000", "object": "chat.completion.chunk",
            "created": 1764000000, "model": MODEL, "system_fingerprint": "b11434"}
    words = "the quick brown fox jumps over a lazy dog while code compiles and tests pass".split()
    events = [_sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None}]})]
    for i in range(chunks - 2):
        events.append(_sse({**base, "choices": [{"index": 0, "delta": {"content": words[i % len(words)] + " "},
                                                  "finish_reason": None}]}))
    events.append(_sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    events.append(_sse({**base, "choices": [], "usage": {"prompt_tokens": 412, "completion_tokens": chunks - 1,
                                                         "total_tokens": 412 + chunks - 1}}))
    events.append(b"data: [DONE]\n\n")
    return events


def _responses() -> tuple[bytes, list[bytes]]:
    """The Responses API's answer (non-streamed) and its SSE events, as OpenAI sends them."""
    words = "the quick brown fox jumps over a lazy dog while code compiles and tests pass".split()
    pieces = [words[i % len(words)] + " " for i in range(STREAM_CHUNKS - 2)]
    text = "".join(pieces)
    rid, mid = "resp_bench000000000000000000000000", "msg_bench000000000000000000000000"
    usage = {"input_tokens": 412, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": len(pieces),
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 412 + len(pieces)}
    base = {"id": rid, "object": "response", "created_at": 1764000000, "model": MODEL, "error": None,
            "incomplete_details": None, "instructions": None, "max_output_tokens": None, "parallel_tool_calls": True,
            "previous_response_id": None, "reasoning": {"effort": "minimal", "summary": None}, "store": False,
            "temperature": 1.0, "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
            "top_p": 1.0, "truncation": "disabled", "user": None, "metadata": {}}
    part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
    item = {"id": mid, "type": "message", "status": "completed", "role": "assistant", "content": [part]}
    started = {**base, "status": "in_progress", "output": [], "usage": None}
    done = {**base, "status": "completed", "output": [item], "usage": usage}
    loc = {"item_id": mid, "output_index": 0, "content_index": 0}
    raw = [{"type": "response.created", "response": started}, {"type": "response.in_progress", "response": started},
           {"type": "response.output_item.added", "output_index": 0,
            "item": {**item, "status": "in_progress", "content": []}},
           {"type": "response.content_part.added", **loc, "part": {**part, "text": ""}}]
    raw += [{"type": "response.output_text.delta", **loc, "delta": p, "logprobs": [], "obfuscation": "x4Rt"}
            for p in pieces]
    raw += [{"type": "response.output_text.done", **loc, "text": text, "logprobs": []},
            {"type": "response.content_part.done", **loc, "part": part},
            {"type": "response.output_item.done", "output_index": 0, "item": item},
            {"type": "response.completed", "response": done}]
    events = [b"event: " + e["type"].encode() + b"\n" + _sse({**e, "sequence_number": i})
              for i, e in enumerate(raw)]
    return json.dumps(done, separators=(",", ":")).encode(), events


def _chunked(events: list[bytes]) -> list[bytes]:
    return [b"%x\r\n%s\r\n" % (len(e), e) for e in events]


COMPLETION = _completion()
EVENTS = _stream_events()
EVENTS_CHUNKED = _chunked(EVENTS)
_SHORT: dict[int, tuple[list[bytes], list[bytes]]] = {}


def _chat_events(body: bytes) -> tuple[list[bytes], list[bytes]]:
    """(events, events chunk-framed) for this request: max_tokens of them, at most STREAM_CHUNKS."""
    m = _MAX_TOKENS_RE.search(body)
    n = max(3, min(STREAM_CHUNKS, int(m.group(1)))) if m else STREAM_CHUNKS
    if n == STREAM_CHUNKS:
        return EVENTS, EVENTS_CHUNKED
    if n not in _SHORT:
        events = _stream_events(n)
        _SHORT[n] = (events, _chunked(events))
    return _SHORT[n]
RESPONSE, RESPONSE_EVENTS = _responses()
RESPONSE_EVENTS_CHUNKED = _chunked(RESPONSE_EVENTS)
_CHAT = (b"/v1/chat/completions", b"/chat/completions")
_RESPONSES = (b"/v1/responses", b"/responses")


def _response(status: str, body: bytes, ctype: bytes = b"application/json", close: bool = False) -> bytes:
    return (b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
            + str(len(body)).encode() + (b"\r\nConnection: close" if close else b"") + b"\r\n\r\n" + body)


class Server:
    def __init__(self, n_ctx: int) -> None:
        self.delay = 0.0
        self.requests = 0
        self.inflight = 0  # delayed or streaming answers being worked on now
        self.max_inflight = 0
        self.n_ctx = n_ctx
        self.props = json.dumps({"default_generation_settings": {"n_ctx": n_ctx}, "total_slots": 64}).encode()
        self.models = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "bench",
                                                              "meta": {"n_ctx": n_ctx}}]}).encode()


class Conn(asyncio.Protocol):
    __slots__ = ("buf", "busy", "closing", "server", "transport")

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False  # an answer is being written (delayed or streamed): parse no further yet
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._parse()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True

    def _parse(self) -> None:
        while not self.busy and not self.closing:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).split(b"\r\n")
            method, path, version = head[0].split(b" ", 2)
            length, chunked, keep = head_fields(head[1:], version)
            clen, close = length or 0, not keep
            start = end + 4
            if chunked:
                body, used = _dechunk(self.buf, start)
                if body is None:
                    return
                del self.buf[:used]
            else:
                if len(self.buf) - start < clen:
                    return
                body = bytes(self.buf[start:start + clen])
                del self.buf[:start + clen]
            path = path.split(b"?", 1)[0]
            llama = path.startswith(b"/llama/")
            if llama:  # llama-server: every chat answer closes its connection
                path = path[6:]
            self._answer(method, path, version, body, close or (llama and path in _CHAT))

    def _answer(self, method: bytes, path: bytes, version: bytes, body: bytes, close: bool) -> None:
        t = self.transport
        srv = self.server
        if (path in _CHAT or path in _RESPONSES) and method == b"POST":
            srv.requests += 1
            stream = _STREAM_RE.search(body) is not None
            responses = path in _RESPONSES
            if srv.delay or stream:
                self.busy = True
                events = _chat_events(body) if stream and not responses else None
                asyncio.get_running_loop().create_task(self._slow(stream, version, close, responses, events))
                return
            t.write(_response("200 OK", RESPONSE if responses else COMPLETION, close=close))
        elif path == b"/v1/chat/completions/input_tokens":
            t.write(_response("200 OK", b'{"input_tokens":%d}' % (len(body) // 4), close=close))
        elif path == b"/health":
            t.write(_response("200 OK", b'{"status":"ok"}', close=close))
        elif path == b"/props":
            t.write(_response("200 OK", srv.props, close=close))
        elif path in (b"/v1/models", b"/models"):
            t.write(_response("200 OK", srv.models, close=close))
        elif path == b"/_bench/delay" and method == b"POST":
            srv.delay = float(body or b"0") / 1000.0
            srv.max_inflight = 0
            t.write(_response("200 OK", b'{"ok":true}', close=close))
        elif path == b"/_bench/stats":
            stats = b'{"requests":%d,"max_inflight":%d}' % (srv.requests, srv.max_inflight)
            t.write(_response("200 OK", stats, close=close))
        else:
            t.write(_response("404 Not Found", b'{"error":{"message":"not found","code":404}}', close=close))
        if close:
            self.closing = True
            t.close()

    async def _slow(self, stream: bool, version: bytes, close: bool, responses: bool = False,
                    events: tuple[list[bytes], list[bytes]] | None = None) -> None:
        srv = self.server
        srv.inflight += 1
        srv.max_inflight = max(srv.max_inflight, srv.inflight)
        try:
            await self._slow_answer(stream, version, close, responses, events or (EVENTS, EVENTS_CHUNKED))
        finally:
            srv.inflight -= 1

    async def _slow_answer(self, stream: bool, version: bytes, close: bool, responses: bool,
                           events: tuple[list[bytes], list[bytes]]) -> None:
        t = self.transport
        if self.server.delay:
            await asyncio.sleep(self.server.delay)
        if self.closing or t is None or t.is_closing():
            return
        if not stream:
            t.write(_response("200 OK", RESPONSE if responses else COMPLETION, close=close))
        elif version == b"HTTP/1.0":  # no chunked encoding in 1.0: the body ends with the connection
            t.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\r\n")
            for e in RESPONSE_EVENTS if responses else events[0]:
                t.write(e)
            close = True
        else:
            t.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                    b"Transfer-Encoding: chunked" + (b"\r\nConnection: close" if close else b"") + b"\r\n\r\n")
            # one write (one send) per event, as a token server emits them
            for e in RESPONSE_EVENTS_CHUNKED if responses else events[1]:
                t.write(e)
            t.write(b"0\r\n\r\n")
        if close:
            self.closing = True
            t.close()
            return
        self.busy = False
        if self.buf:
            self._parse()


def _dechunk(buf: bytearray, pos: int) -> tuple[bytes | None, int]:
    out = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None, 0
        size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n", pos)  # no trailers expected
            return (bytes(out), end + 2) if end >= 0 else (None, 0)
        if len(buf) < pos + size + 2:
            return None, 0
        out += buf[pos:pos + size]
        pos += size + 2


async def serve(host: str, port: int, n_ctx: int) -> None:
    server = Server(n_ctx)
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(lambda: Conn(server), host, port, backlog=1024, reuse_address=True)
    actual = srv.sockets[0].getsockname()[1]
    print(f"ready {actual}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    srv.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--n-ctx", type=int, default=32768)
    args = p.parse_args(argv)
    if os.environ.get("BENCH_STANDIN_UVLOOP") == "1":  # pragma: no cover - optional
        import uvloop

        uvloop.install()
    asyncio.run(serve(args.host, args.port, args.n_ctx))
    return 0


if __name__ == "__main__":
    sys.exit(main())

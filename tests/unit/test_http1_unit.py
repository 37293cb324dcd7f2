"""The llama.cpp hop's HTTP/1.1 client against scripted raw servers (real sockets, in process).

The real-part tests (test_core_routing, test_queue_and_disconnect, test_survive*, ...) run it against
llama-server; these pin the framing and failure cases a real server rarely shows on demand.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway import failures
from gateway.backends import http1, http1conn

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    return head + await reader.readexactly(length)


async def serve(script: Script) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(script, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v1/chat/completions"


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Script], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(script: Script) -> str:
        server, url = await serve(script)
        servers.append(server)
        return url

    yield start
    for s in servers:
        s.close()


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


async def test_the_request_is_one_prebuilt_post_and_a_sized_answer_is_read_whole(scripted: Callable) -> None:
    seen: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        writer.close()

    url = await scripted(script)
    resp = await http1.Client().post(http1.Target.post(url), b'{"a":1}', 5.0)
    assert resp.status == 200 and await resp.read() == b"hello"
    resp.close()
    assert seen[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"Content-Type: application/json\r\n" in seen[0] and seen[0].endswith(b"Content-Length: 7\r\n\r\n{\"a\":1}")


@pytest.mark.parametrize("step", [1, 3, 1000])
async def test_a_chunked_stream_split_anywhere_is_reassembled(scripted: Callable, step: int) -> None:
    body = chunked(b"data: one\n\n", b"data: two;x\n\n", b": comment\n\n", b"data: [DONE]\n\n")
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + body

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        for i in range(0, len(raw), step):  # the head and the framing cut at every position
            writer.write(raw[i:i + step])
            await writer.drain()
            await asyncio.sleep(0)
        writer.close()

    url = await scripted(script)
    client = http1.Client()
    resp = await client.post(http1.Target.post(url), b"{}", 5.0)
    assert await resp.read() == b"data: one\n\ndata: two;x\n\n: comment\n\ndata: [DONE]\n\n"
    resp = await client.post(http1.Target.post(url), b"{}", 5.0)
    pieces = [p async for p in resp.iter_any()]
    assert all(pieces) and b"".join(pieces) == b"data: one\n\ndata: two;x\n\n: comment\n\ndata: [DONE]\n\n"


async def test_a_body_without_length_ends_with_the_connection(scripted: Callable) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: x\n\n")
        writer.close()

    resp = await http1.Client().post(http1.Target.post(await scripted(script)), b"{}", 5.0)
    assert resp.headers["content-type"] == "text/event-stream" and await resp.read() == b"data: x\n\n"


async def test_a_refused_connect_is_a_crash() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionRefusedError) as caught:
        await http1.Client().post(http1.Target.post(f"http://127.0.0.1:{port}/x"), b"{}", 5.0)
    assert failures.from_exception("local", caught.value).kind is failures.Kind.CRASH


async def test_a_connection_cut_mid_answer_is_a_crash_after_the_first_byte(scripted: Callable) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"5\r\nhello\r\n")
        await writer.drain()
        writer.transport.abort()

    resp = await http1.Client().post(http1.Target.post(await scripted(script)), b"{}", 5.0)
    chunks = resp.iter_any()
    assert await anext(chunks) == b"hello"
    with pytest.raises(http1.ServerDisconnected) as caught:
        await anext(chunks)
    assert not caught.value.before_response
    assert failures.from_exception("local", caught.value).kind is failures.Kind.CRASH


async def test_a_close_before_any_answer_byte_says_so(scripted: Callable) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.close()

    with pytest.raises(http1.ServerDisconnected) as caught:
        await http1.Client().post(http1.Target.post(await scripted(script)), b"{}", 5.0)
    assert caught.value.before_response


async def test_malformed_framing_is_a_connection_error(scripted: Callable) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n")
        await writer.drain()

    resp = await http1.Client().post(http1.Target.post(await scripted(script)), b"{}", 5.0)
    with pytest.raises(http1.BadResponse):
        await resp.read()


async def test_closing_the_response_drops_the_connection_at_once(scripted: Callable) -> None:
    """llama.cpp cancels a generation only when it sees the connection go: closing must not wait."""
    gone = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"5\r\nhello\r\n")
        await writer.drain()
        assert await reader.read() == b""  # EOF: our side closed
        gone.set()

    resp = await http1.Client().post(http1.Target.post(await scripted(script)), b"{}", 5.0)
    assert await anext(resp.iter_any()) == b"hello"
    resp.close()
    await asyncio.wait_for(gone.wait(), 2.0)


async def test_keep_alive_reuses_a_connection_and_retries_one_the_server_closed(scripted: Callable) -> None:
    connections: list[int] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        first = len(connections) == 1
        served = 0
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            if first and served == 2:  # its idle time-out raced our write: closed without a byte
                writer.close()
                return
            served += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    url = http1.Target.post(await scripted(script))
    client = http1.Client()
    for _ in range(5):
        resp = await client.post(url, b"{}", 5.0, keep_alive=True)
        assert await resp.read() == b"ok"
        resp.close()
    assert len(connections) == 2  # reused, and the stale socket was retried on a fresh one unseen
    client.close()


def test_the_head_is_built_once_from_the_url() -> None:
    head = http1.Target.post("http://u%40x:p@llama.lan:8080/base/v1/chat/completions?k=1").head
    assert head.startswith(b"POST /base/v1/chat/completions?k=1 HTTP/1.1\r\nHost: llama.lan:8080\r\n")
    assert b"Authorization: Basic dUB4OnA=\r\n" in head  # base64 of "u@x:p"
    assert b"Host: [::1]\r\n" in http1.Target.post("http://[::1]:80/v1/chat/completions").head


async def test_a_whole_answer_the_server_ends_by_closing_is_read_in_few_wake_ups(
        scripted: Callable, monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-streamed local answer arrives as a stream of events, one TCP write each: reading it whole
    must not cost one event-loop wake-up per event (the kernel is asked to wait for the close)."""
    events = [b"data: {\"n\":%d}\n\n" % i for i in range(100)]

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)  # the reader is waiting for the body by now
        for e in events:
            writer.write(b"%x\r\n%s\r\n" % (len(e), e))
            await writer.drain()
            await asyncio.sleep(0.001)
        writer.write(b"0\r\n\r\n")
        writer.close()

    calls: list[int] = []
    real = http1conn.Conn.data_received
    monkeypatch.setattr(http1conn.Conn, "data_received", lambda self, data: (calls.append(len(data)), real(self, data)))
    resp = await http1.Client().post(http1.Target.post(await scripted(script)), b"{}", 5.0)
    before = len(calls)
    assert await resp.read() == b"".join(events)
    assert len(calls) - before < 10, calls

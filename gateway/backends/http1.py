"""A small HTTP/1.1 client for the one hop that runs per request to llama.cpp: the chat POST.

llama-server closes every chat connection, so each request pays for a connect; aiohttp's client adds
per request a ClientRequest/ClientResponse pair, a connector round, a StreamReader fed per TCP read,
and a task wake-up per read even when the caller wants the whole body. This client writes one
prebuilt request (request line and fixed headers encoded once per URL) and frames the answer itself
(Content-Length, chunked, or ended by the close); a caller reading the whole body is woken once.
Probes and token counts stay on aiohttp: they are not on the request path.

Closing a response drops the connection at once (llama.cpp cancels the generation and frees the slot).
Errors are `ConnectionError`s (refused, reset, malformed framing) or `ConnectTimeout`, which
failures.py already classifies; `before_response` tells a stale pooled socket from a server that died.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import re
import socket
import ssl as ssl_module
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

MAX_HEAD = 65536  # bytes of status line + headers before the answer is called malformed
HIGH_WATER = 262144  # bytes buffered for a streaming reader before we stop reading the socket
WHOLE_READ = 262144  # bytes the kernel gathers before waking a whole-body reader (the close wakes it too)
_RCVLOWAT: int | None = getattr(socket, "SO_RCVLOWAT", None)
DNS_TTL = 10.0  # seconds a resolved name is reused (aiohttp's default too)

_CHUNK = re.compile(rb"([0-9a-fA-F]{1,15})\r\n")  # a chunk-size line without extensions
_HEX = re.compile(rb"[0-9a-fA-F]{1,15}")
_IN_DATA, _SIZE, _CRLF, _TRAILER = 1, 2, 3, 4  # chunked-body states (`_IN_DATA` while bytes remain)


class ConnectTimeout(TimeoutError):
    """The TCP (or TLS) connect did not complete in time: named apart from a slow answer."""


class ServerDisconnected(ConnectionResetError):
    """The server closed the connection before the answer was complete."""

    def __init__(self, message: str, before_response: bool) -> None:
        super().__init__(message)
        self.before_response = before_response  # not one byte of the answer arrived


class BadResponse(ConnectionError):
    """The answer's HTTP framing was malformed (status line, headers or chunk sizes)."""


@dataclass(frozen=True, slots=True)
class Target:
    """One URL, with what is fixed per request already encoded."""

    host: str
    port: int
    ssl: bool
    head: bytes  # request line and fixed headers, up to (not including) Content-Length

    @classmethod
    def post(cls, url: str, content_type: str = "application/json") -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        default = (tls and port == 443) or (not tls and port == 80)
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        host_header = host if default else f"{host}:{port}"
        auth = ""
        if parts.username is not None:  # credentials in the URL (a proxy in front of llama.cpp): Basic auth
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            auth = f"Authorization: Basic {base64.b64encode(pair).decode()}\r\n"
        head = (f"POST {path} HTTP/1.1\r\nHost: {host_header}\r\nAccept: */*\r\n"
                f"Accept-Encoding: identity\r\nContent-Type: {content_type}\r\n{auth}").encode("latin-1")
        return cls(parts.hostname, port, tls, head)


class Response:
    """Status, headers (lower-cased names) and the body, read whole or as it arrives."""

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers

    async def read(self) -> bytes:
        conn = self._conn
        if not conn.done and not conn.keep:
            conn.wake_at_end()
        while not conn.done:
            await conn.wait()
        if conn.exc is not None:
            raise conn.exc
        return conn.take()

    async def iter_any(self) -> AsyncIterator[bytes]:
        """Whatever has arrived, as it arrives (one TCP read or more per item; never empty)."""
        conn = self._conn
        conn.eager = True
        while True:
            if conn.size:
                yield conn.take()
            elif conn.done:
                if conn.exc is not None:
                    raise conn.exc
                return
            else:
                await conn.wait()

    def close(self) -> None:
        """Drop the connection unless the answer was read to its end on a reusable one."""
        self._conn.finish_use()


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()  # unparsed bytes: the head, or chunked framing
        self.status = 0
        self.headers: dict[str, str] = {}
        self.head: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.parts: list[bytes] = []
        self.size = 0  # bytes in `parts`
        self.eager = False  # a streaming reader wants each piece; otherwise wake only at the end
        self.done = False  # the body is complete (or failed: then `exc` is set)
        self.exc: BaseException | None = None
        self.keep = False  # the server lets this connection carry another request
        self.got_bytes = False
        self._waiter: asyncio.Future[None] | None = None
        self._mode = ""  # length | chunked | close
        self._left = 0  # body bytes left (length) or in the current chunk
        self._state = _SIZE
        self._paused = False
        self.pool: list[_Conn] | None = None  # where to go back to when done and reusable
        self.idle_since = 0.0

    # ---- asyncio.Protocol ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        if self.done:
            self.keep = False  # bytes past the answer's end: do not reuse this connection
            return
        if not self.status:
            self.buf += data
            self._parse_head()
            return
        self._body(data)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost settles the answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.keep = False
        if self.done:
            return
        if self.status and self._mode == "close" and exc is None:
            self._finish()  # a close-delimited body ends with the connection
            return
        before = not self.got_bytes
        what = "before the answer's head" if not self.status else "in the middle of the answer"
        err = ServerDisconnected(f"server closed the connection {what}"
                                 + (f" ({type(exc).__name__})" if exc else ""), before)
        self._fail(err)

    # ---- parsing ----

    def _parse_head(self) -> None:
        while not self.status:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self._fail(BadResponse(f"response head longer than {MAX_HEAD} bytes"))
                return
            lines = bytes(self.buf[:end]).split(b"\r\n")
            del self.buf[:end + 4]
            try:
                version, code = lines[0].split(b" ", 2)[:2]
                status = int(code)
                if not version.startswith(b"HTTP/1."):
                    raise ValueError(version)
            except ValueError:
                self._fail(BadResponse(f"bad status line {lines[0][:80]!r}"))
                return
            if 100 <= status < 200:
                continue  # an interim answer (100 Continue): the real head follows
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(b":")
                if not sep:
                    self._fail(BadResponse(f"bad header line {line[:80]!r}"))
                    return
                key = name.strip().lower().decode("latin-1")
                val = value.strip().decode("latin-1")
                headers[key] = f"{headers[key]}, {val}" if key in headers else val
            self.status, self.headers = status, headers
            connection = headers.get("connection", "").lower()
            self.keep = ("close" not in connection if version == b"HTTP/1.1" else "keep-alive" in connection)
            if status in (204, 304):
                self._mode = "length"
            elif "chunked" in headers.get("transfer-encoding", "").lower():
                self._mode = "chunked"
            elif "content-length" in headers:
                try:
                    self._left = int(headers["content-length"])
                except ValueError:
                    self._fail(BadResponse("bad Content-Length"))
                    return
                self._mode = "length"
            else:
                self._mode, self.keep = "close", False
            if not self.head.done():
                self.head.set_result(None)
            rest = bytes(self.buf)
            self.buf.clear()
            if self._mode == "length" and self._left == 0:
                self._finish()
            elif rest:
                self._body(rest)

    def _body(self, data: bytes) -> None:
        if self._mode == "chunked":
            self.buf += data
            self._dechunk()
        elif self._mode == "length":
            if len(data) >= self._left:
                if len(data) > self._left:
                    self.keep = False  # more than announced: do not trust this connection again
                self._add(data[:self._left])
                self._left = 0
                self._finish()
            else:
                self._left -= len(data)
                self._add(data)
        else:
            self._add(data)
        if self.eager and not self.done:
            if self.size > HIGH_WATER and not self._paused and self.transport is not None:
                self._paused = True  # a slow reader (its client is slow): let TCP push back on the server
                self.transport.pause_reading()
            self._wake()

    def _dechunk(self) -> None:
        buf, pos = self.buf, 0
        n = len(buf)
        parts = self.parts
        while pos < n:
            if self._state == _SIZE:  # fast path: a whole chunk in hand, as a server writes one per event
                m = _CHUNK.match(buf, pos)
                if m is not None:
                    start = m.end()
                    end = start + int(m.group(1), 16)
                    if end > start and buf.startswith(b"\r\n", end):
                        parts.append(bytes(buf[start:end]))
                        self.size += end - start
                        pos = end + 2
                        continue
            if self._state == _IN_DATA:
                take = min(self._left, n - pos)
                self._add(bytes(buf[pos:pos + take]))
                pos += take
                self._left -= take
                if not self._left:
                    self._state = _CRLF
            elif self._state == _CRLF:
                if n - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    self._fail(BadResponse("chunk not followed by CRLF"))
                    return
                pos += 2
                self._state = _SIZE
            else:  # _SIZE or _TRAILER: one line
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > 8192:
                        self._fail(BadResponse("chunk size line too long"))
                        return
                    break
                line = bytes(buf[pos:eol])
                pos = eol + 2
                if self._state == _TRAILER:
                    if not line:
                        del buf[:pos]
                        if buf:
                            self.keep = False
                        self._finish()
                        return
                    continue
                digits = line.split(b";", 1)[0].strip()
                if _HEX.fullmatch(digits) is None:
                    self._fail(BadResponse(f"bad chunk size {line[:40]!r}"))
                    return
                size = int(digits, 16)
                self._state, self._left = (_IN_DATA, size) if size else (_TRAILER, 0)
        del buf[:pos]

    def _add(self, data: bytes) -> None:
        if data:
            self.parts.append(data)
            self.size += len(data)

    def _finish(self) -> None:
        self.done = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        self.keep = False
        self.done = True
        self.exc = exc
        if not self.head.done():
            self.head.set_exception(exc)
            self.head.exception()  # retrieved: nobody may be waiting any more
        self._wake()
        if self.transport is not None:
            self.transport.abort()

    # ---- for Response ----

    def wake_at_end(self) -> None:
        """The caller wants the whole body of an answer the server ends by closing (llama-server: every
        chat answer): ask the kernel to report the socket readable only past WHOLE_READ bytes or at
        the close, instead of once per event (a 200-token answer was 200 loop wake-ups).
        Never for a connection kept open: its end comes without a close. Linux also clamps the
        receive window to this many bytes, so it is set well above a typical answer: lower (16 KB) made
        the server wait for our reads and added ~0.4 ms per 46 KB answer on loopback.
        The cost: what arrived is framed after the close, not while the server writes (~0.2 ms more
        for a 200-event answer that a server writes in one burst; nothing a generating model notices)."""
        t = self.transport
        sock = t.get_extra_info("socket") if t is not None else None
        if sock is not None and _RCVLOWAT is not None and t is not None and not t.get_extra_info("sslcontext"):
            try:
                sock.setsockopt(socket.SOL_SOCKET, _RCVLOWAT, WHOLE_READ)
            except OSError:
                pass  # only the wake-ups are saved: reading works the same without it

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def take(self) -> bytes:
        if self.size:
            out = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
            self.parts.clear()
            self.size = 0
            if self._paused and self.transport is not None:
                self._paused = False
                self.transport.resume_reading()
            return out
        if self.exc is not None:
            raise self.exc
        return b""

    def finish_use(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if self.done and self.exc is None and self.keep and not self.size and self.pool is not None:
            self.idle_since = time.monotonic()
            self.pool.append(self)  # read to the end on a connection the server keeps: reuse it
            return
        self.keep = False
        t.abort()  # drop at once: llama.cpp sees the close and cancels the generation

    def prepare(self) -> None:
        """Reset the answer state before this pooled connection carries another request."""
        self.buf.clear()
        self.status, self.headers = 0, {}
        self.head = asyncio.get_running_loop().create_future()
        self.parts, self.size, self.eager = [], 0, False
        self.done, self.exc, self.keep, self.got_bytes = False, None, False, False
        self._mode, self._left, self._state = "", 0, _SIZE


class Client:
    """Connections to one server: fresh per request, or pooled when `keep_alive`."""

    def __init__(self) -> None:
        self._idle: list[_Conn] = []
        self._resolved: dict[tuple[str, int], tuple[float, list[tuple[str, int]]]] = {}
        self._ssl: ssl_module.SSLContext | None = None

    async def post(self, target: Target, body: bytes, connect_timeout: float, keep_alive: bool = False) -> Response:
        if keep_alive:
            conn = self._pooled()
            if conn is not None:
                try:
                    return await self._exchange(conn, target, body)
                except ServerDisconnected as e:
                    if not e.before_response:
                        raise
                    # A pooled socket the server had already closed fails before any answer byte. Retry
                    # once on a fresh connection: if the server really died, that one is refused (a crash).
        conn = await self._connect(target, connect_timeout)
        conn.pool = self._idle if keep_alive else None
        return await self._exchange(conn, target, body)

    def _pooled(self) -> _Conn | None:
        while self._idle:
            conn = self._idle.pop()
            t = conn.transport
            if conn.keep and t is not None and not t.is_closing() and time.monotonic() - conn.idle_since < 15.0:
                conn.prepare()
                return conn
            if t is not None:
                t.abort()
        return None

    async def _exchange(self, conn: _Conn, target: Target, body: bytes) -> Response:
        t = conn.transport
        assert t is not None
        try:
            t.write(b"%sContent-Length: %d\r\n\r\n%s" % (target.head, len(body), body))
            await conn.head
        except BaseException:
            t.abort()  # time-out, cancellation or a failed head: the connection is done either way
            raise
        return Response(conn)

    async def _connect(self, target: Target, timeout: float) -> _Conn:
        loop = asyncio.get_running_loop()
        ssl: ssl_module.SSLContext | None = None
        if target.ssl:
            if self._ssl is None:
                self._ssl = ssl_module.create_default_context()
            ssl = self._ssl
        try:
            async with asyncio.timeout(timeout):
                last: OSError | None = None
                for host, port in await self._addresses(target.host, target.port):
                    try:
                        _, conn = await loop.create_connection(
                            _Conn, host, port, ssl=ssl, server_hostname=target.host if ssl else None)
                        break
                    except OSError as e:
                        last = e
                else:
                    raise last or ConnectionRefusedError(f"no address for {target.host}")
        except TimeoutError as e:
            raise ConnectTimeout(f"could not connect to {target.host}:{target.port} within {timeout:g}s") from e
        except ConnectionError:
            raise
        except OSError as e:  # unreachable, name not found: the server cannot be reached, as a refusal is
            raise ConnectionRefusedError(f"cannot connect to {target.host}:{target.port}: {e}") from e
        return conn

    async def _addresses(self, host: str, port: int) -> list[tuple[str, int]]:
        try:
            ipaddress.ip_address(host)
            return [(host, port)]
        except ValueError:
            pass
        now = time.monotonic()
        hit = self._resolved.get((host, port))
        if hit is not None and now - hit[0] < DNS_TTL:
            return hit[1]
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys((str(info[4][0]), port) for info in infos))
        self._resolved[(host, port)] = (now, addresses)
        return addresses

    def close(self) -> None:
        for conn in self._idle:
            if conn.transport is not None:
                conn.transport.abort()
        self._idle.clear()

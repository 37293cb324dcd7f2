"""One HTTP/1.1 answer on one connection, framed as its bytes arrive (the protocol under http1.py).

Split from http1.py (connecting, pooling, the request) so each reads on its own: this is the per-byte
part, where the cost of a local request's answer is paid.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time

MAX_HEAD = 65536  # bytes of status line + headers before the answer is called malformed
HIGH_WATER = 262144  # bytes buffered for a streaming reader before we stop reading the socket
WHOLE_READ = 262144  # bytes the kernel gathers before waking a whole-body reader (the close wakes it too)
_RCVLOWAT: int | None = getattr(socket, "SO_RCVLOWAT", None)

_CHUNK = re.compile(rb"([0-9a-fA-F]{1,15})\r\n")  # a chunk-size line without extensions
_HEX = re.compile(rb"[0-9a-fA-F]{1,15}")
_IN_DATA, _SIZE, _CRLF, _TRAILER = 1, 2, 3, 4  # chunked-body states (`_IN_DATA` while bytes remain)


class ServerDisconnected(ConnectionResetError):
    """The server closed the connection before the answer was complete."""

    def __init__(self, message: str, before_response: bool) -> None:
        super().__init__(message)
        self.before_response = before_response  # not one byte of the answer arrived


class BadResponse(ConnectionError):
    """The answer's HTTP framing was malformed (status line, headers or chunk sizes)."""


class Conn(asyncio.Protocol):
    """One connection's answer: the head, then the body framed as it arrives."""

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
        self.pool: list[Conn] | None = None  # where to go back to when done and reusable
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

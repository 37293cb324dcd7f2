"""The load generator: a raw-asyncio HTTP/1.1 client with one keep-alive connection per worker.

aiohttp's client spends ~100 µs of Python per request; this one sends prebuilt request bytes and
parses just the status line, the framing headers and the body framing (Content-Length, chunked,
or close-delimited), so on loopback it stays well ahead of every proxy under test. Its own CPU
use is measured per run: `client_busy` near 1.0 means the generator, not the target, was the
limit, and the report says so.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass, field

from bench.http1 import head_fields

_CLK = os.sysconf("SC_CLK_TCK")


@dataclass(slots=True)
class Result:
    status: int
    total: float  # seconds from sending to the last body byte
    first: float  # seconds from sending to the first body byte
    nbytes: int
    tail: bytes  # the body's last bytes (is `[DONE]` there?)
    head: bytes  # the body's first bytes (for error messages)


class _Conn(asyncio.Protocol):
    """One connection; `request()` sends and resolves when the response body is complete."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.fut: asyncio.Future[Result] | None = None
        self.lost = False
        self._reset()

    def _reset(self) -> None:
        self.buf = bytearray()
        self.state = 0  # 0 headers, 1 content-length body, 2 chunked body, 3 until close
        self.status = 0
        self.remaining = 0
        self.nbytes = 0
        self.t0 = 0.0
        self.t_first = 0.0
        self.tail = b""
        self.head = b""
        self.keep = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.fut is not None and not self.fut.done():
            if self.state == 3:
                self._done()
            else:
                self.fut.set_exception(ConnectionError(f"connection lost mid-response: {exc or 'closed'}"))

    def request(self, data: bytes) -> asyncio.Future[Result]:
        self._reset()
        self.fut = asyncio.get_running_loop().create_future()
        self.t0 = time.perf_counter()
        assert self.transport is not None
        self.transport.write(data)
        return self.fut

    def _body(self, chunk: bytes | bytearray) -> None:
        if not chunk:
            return
        if not self.nbytes:
            self.t_first = time.perf_counter()
            self.head = bytes(chunk[:300])
        self.nbytes += len(chunk)
        self.tail = (self.tail + bytes(chunk[-64:]))[-64:]

    def _done(self) -> None:
        t = time.perf_counter()
        fut, self.fut = self.fut, None
        if fut is not None and not fut.done():
            first = (self.t_first or t) - self.t0
            fut.set_result(Result(self.status, t - self.t0, first, self.nbytes, self.tail, self.head))

    def data_received(self, data: bytes) -> None:
        if self.fut is None:
            return
        if self.state == 0:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buf[:end]).split(b"\r\n")
            version, status = lines[0].split(b" ", 2)[:2]
            self.status = int(status)
            clen, chunked, self.keep = head_fields(lines[1:], version)
            rest = bytes(self.buf[end + 4:])
            self.buf = bytearray()
            if chunked:
                self.state = 2
            elif clen is not None:
                self.state, self.remaining = 1, clen
            else:
                self.state, self.keep = 3, False
            if clen == 0:
                self._done()
                return
            data = rest
            if not data:
                return
        if self.state == 1:
            take = data[:self.remaining]
            self._body(take)
            self.remaining -= len(take)
            if self.remaining <= 0:
                self._done()
        elif self.state == 3:
            self._body(data)
        else:
            self._chunked(data)

    def _chunked(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.state == 4:  # waiting for the empty line after the last chunk
            if buf.find(b"\r\n") >= 0:
                self._done()
            return
        pos = 0
        while True:
            if self.remaining > 0:  # inside a chunk's data
                take = min(self.remaining, len(buf) - pos)
                if take <= 0:
                    break
                self._body(buf[pos:pos + take])
                pos += take
                self.remaining -= take
                if self.remaining:
                    break
                self.remaining = -2  # the CRLF after the data is still to come
                continue
            if self.remaining == -2:
                if len(buf) - pos < 2:
                    break
                pos += 2
                self.remaining = 0
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            pos = eol + 2
            if size == 0:
                # last chunk: an empty line (no trailers expected) ends the message
                del buf[:pos]
                self.buf = buf
                if buf.find(b"\r\n") >= 0:
                    self._done()
                else:
                    self.state = 4
                return
            self.remaining = size
        del buf[:pos]
        self.buf = buf


async def _open(host: str, port: int) -> _Conn:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(_Conn, host, port)
    return conn


def build_request(host: str, port: int, path: str, body: bytes, extra: dict[str, str] | None = None) -> bytes:
    headers = {"Host": f"{host}:{port}", "Content-Type": "application/json", "Content-Length": str(len(body)),
               "User-Agent": "opencode/1.18.33 ai-sdk/provider-utils/3.0.9 runtime/bun/1.3.0",
               "Authorization": "Bearer sk-bench-client", **(extra or {})}
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode() + body


@dataclass
class RunStats:
    n: int
    concurrency: int
    wall: float
    latencies: list[float]
    firsts: list[float]
    errors: list[str] = field(default_factory=list)
    client_cpu: float = 0.0  # seconds of this process's CPU during the run
    nbytes: int = 0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall if self.wall else 0.0

    @property
    def client_busy(self) -> float:
        return self.client_cpu / self.wall if self.wall else 0.0


def _cpu_self() -> float:
    t = os.times()
    return t.user + t.system


async def run(host: str, port: int, request: bytes, n: int, concurrency: int, *, stream: bool,
              timeout: float = 120.0, max_errors: int = 20) -> RunStats:
    """Send `request` n times over `concurrency` keep-alive connections; every answer is checked."""
    latencies: list[float] = []
    firsts: list[float] = []
    errors: list[str] = []
    counter = iter(range(n))
    nbytes = 0

    async def worker() -> None:
        nonlocal nbytes
        conn: _Conn | None = None
        for _ in counter:
            try:
                if conn is None or conn.lost or not conn.keep or conn.transport is None \
                        or conn.transport.is_closing():
                    if conn is not None and conn.transport is not None:
                        conn.transport.close()
                    conn = await _open(host, port)
                r = await asyncio.wait_for(conn.request(request), timeout)
            except (OSError, TimeoutError, ValueError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                if conn is not None and conn.transport is not None:
                    conn.transport.close()
                conn = None
                if len(errors) >= max_errors:
                    return
                continue
            bad = r.status != 200 or not r.nbytes or (stream and b"[DONE]" not in r.tail)
            if bad:
                errors.append(f"status {r.status}, {r.nbytes} bytes: {r.head[:200]!r}")
                if len(errors) >= max_errors:
                    return
                continue
            latencies.append(r.total)
            firsts.append(r.first)
            nbytes += r.nbytes
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    cpu0 = _cpu_self()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return RunStats(n, concurrency, wall, latencies, firsts, errors, _cpu_self() - cpu0, nbytes)


async def one(host: str, port: int, request: bytes, timeout: float = 30.0) -> Result:
    conn = await _open(host, port)
    try:
        return await asyncio.wait_for(conn.request(request), timeout)
    finally:
        if conn.transport is not None:
            conn.transport.close()


def proc_cpu(pids: list[int]) -> float:
    """utime+stime of these processes, seconds (/proc/PID/stat fields 14 and 15)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return total / _CLK


def proc_tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def machine_busy() -> float:
    """Seconds of CPU the whole machine has spent busy (all cores; /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / _CLK  # user..steal, minus idle and iowait


def rss_kb(pid: int, field_name: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0

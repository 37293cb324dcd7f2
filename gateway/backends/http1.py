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
import socket
import ssl as ssl_module
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from .http1conn import BadResponse, Conn, ServerDisconnected

__all__ = ["BadResponse", "Client", "ConnectTimeout", "Response", "ServerDisconnected", "Target"]

DNS_TTL = 10.0  # seconds a resolved name is reused (aiohttp's default too)


class ConnectTimeout(TimeoutError):
    """The TCP (or TLS) connect did not complete in time: named apart from a slow answer."""


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

    def __init__(self, conn: Conn) -> None:
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


class Client:
    """Connections to one server: fresh per request, or pooled when `keep_alive`."""

    def __init__(self) -> None:
        self._idle: list[Conn] = []
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

    def _pooled(self) -> Conn | None:
        while self._idle:
            conn = self._idle.pop()
            t = conn.transport
            if conn.keep and t is not None and not t.is_closing() and time.monotonic() - conn.idle_since < 15.0:
                conn.prepare()
                return conn
            if t is not None:
                t.abort()
        return None

    async def _exchange(self, conn: Conn, target: Target, body: bytes) -> Response:
        t = conn.transport
        assert t is not None
        try:
            t.write(b"%sContent-Length: %d\r\n\r\n%s" % (target.head, len(body), body))
            await conn.head
        except BaseException:
            t.abort()  # time-out, cancellation or a failed head: the connection is done either way
            raise
        return Response(conn)

    async def _connect(self, target: Target, timeout: float) -> Conn:
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
                            Conn, host, port, ssl=ssl, server_hostname=target.host if ssl else None)
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

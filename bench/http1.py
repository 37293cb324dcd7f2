"""The few HTTP/1.x header facts the bench's raw client and stand-in server both need."""

from __future__ import annotations


def head_fields(lines: list[bytes], version: bytes) -> tuple[int | None, bool, bool]:
    """(content-length, chunked, keep-alive) from header lines (the start line excluded)."""
    clen: int | None = None
    chunked = False
    keep = version == b"HTTP/1.1"
    for line in lines:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            clen = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif name == b"connection":
            v = value.strip().lower()
            keep = v != b"close" and (version == b"HTTP/1.1" or v == b"keep-alive")
    return clen, chunked, keep

"""Fast unit tests of the failure taxonomy (gateway/failures.py): no llama-server, no network.

The real-part counterparts (a real llama-server answering a malformed body, the fake hosted provider
rejecting the gateway's key) are in tests/test_failure_kinds.py.
"""

from __future__ import annotations

import email.utils
import json
import time

import aiohttp
import pytest
from pydantic import BaseModel, ValidationError

from gateway import failures
from gateway.failures import Kind, from_exception, from_status, from_stream_error_event, parse_retry_after


def llama_error(message: str, code: int = 500, type_: str = "server_error") -> bytes:
    # llama.cpp's own shape (format_error_response); the key order varies between builds
    return json.dumps({"error": {"code": code, "message": message, "type": type_}}).encode()


# ---- from_status -------------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "body", "kind", "counts"), [
    (429, b'{"error":{"message":"slow down"}}', Kind.RATE_LIMITED, False),
    (400, llama_error("request (5000 tokens) exceeds the available context size (4096 tokens)", 400,
                      "exceed_context_size_error"), Kind.CONTEXT_OVERFLOW, False),
    (400, b'{"error":{"message":"bad","code":"context_length_exceeded"}}', Kind.CONTEXT_OVERFLOW, False),
    (400, b'{"error":{"message":"temperature must be <= 2"}}', Kind.CLIENT_ERROR, False),
    (404, b'{"error":{"message":"no such model"}}', Kind.CLIENT_ERROR, False),
    (500, llama_error("Failed to read connection"), Kind.CRASH, True),
    (500, llama_error("got exception: out of memory"), Kind.UNAVAILABLE, True),
    (502, b"<html>bad gateway</html>", Kind.UNAVAILABLE, True),
    (503, llama_error("Loading model", 503, "unavailable_error"), Kind.UNAVAILABLE, True),
    (401, b'{"error":{"message":"Incorrect API key provided: sk-te***key","code":"invalid_api_key"}}',
     Kind.AUTH, True),
    (403, b'{"error":{"message":"forbidden"}}', Kind.AUTH, True),
])
def test_from_status_kinds(status: int, body: bytes, kind: Kind, counts: bool) -> None:
    f = from_status("b", status, {}, body)
    assert f.kind is kind and f.counts_against_backend is counts


@pytest.mark.parametrize("message", [
    # the exact messages of llama.cpp's chat parser and parameter checks (common/chat.cpp,
    # tools/server/server-common.cpp) that it answers with 500
    "Failed to parse messages: Missing content part type: {\"type\":\"text\"}",
    "Failed to parse messages: [json.exception.out_of_range.403] key 'text' not found",
    "Failed to parse messages: Unsupported content part type: \"video\"",
    "Failed to parse tools: Missing tool function: {\"type\":\"function\"}; tools = []",
    "Failed to parse tool call arguments as JSON: [json.exception.parse_error.101] syntax error",
    "Unsupported param: best_of",
    "image input is not supported - hint: if this is unexpected, you may need to provide the mmproj",
    "tools param requires --jinja flag",
    "Cannot use both json_schema and grammar",
    "[json.exception.type_error.302] type must be string, but is number",
])
def test_a_llamacpp_500_that_could_not_parse_the_request_is_the_clients_fault(message: str) -> None:
    f = from_status("local", 500, {}, llama_error(message))
    assert f.kind is Kind.CLIENT_ERROR and not f.counts_against_backend
    assert f.status == 400 and f.body is None  # answered with our own 400 body, not llama's "code":500
    assert f.message.startswith("local rejected the request: ") and message[:40] in f.message


def test_a_provider_401_names_the_backend_and_never_echoes_the_key() -> None:
    f = from_status("hosted", 401, {"WWW-Authenticate": "Bearer"},
                    b'{"error":{"message":"Incorrect API key provided: sk-test-hosted-key",'
                    b'"type":"invalid_request_error","code":"invalid_api_key"}}')
    assert f.kind is Kind.AUTH and "rejected the gateway's API key" in f.message
    assert "sk-test" not in str(f) and f.body is None


def test_from_status_keeps_retry_after_and_the_body_for_pass_through() -> None:
    f = from_status("hosted", 429, {"Retry-After": "7"}, b'{"error":{"message":"slow"}}')
    assert f.retry_after == 7.0 and f.headers == {"retry-after": "7"}
    f = from_status("hosted", 400, {}, b'{"error":{"message":"bad field"}}')
    assert f.body == b'{"error":{"message":"bad field"}}' and f.status == 400


# ---- from_exception ----------------------------------------------------------------------------

class _Body(BaseModel):
    n: int


def _validation_error() -> ValidationError:
    try:
        _Body.model_validate({"n": "x"})
    except ValidationError as e:
        return e
    raise AssertionError("unreachable")


def _wrapped(cause: BaseException) -> Exception:
    """litellm's habit: its own exception class (status 500), the original as the cause."""
    class InternalServerError(Exception):
        status_code = 500

    try:
        try:
            raise cause
        except BaseException as e:
            raise InternalServerError("OpenAIException - " + str(e)) from e
    except InternalServerError as outer:
        return outer


@pytest.mark.parametrize(("exc", "kind"), [
    (TimeoutError(), Kind.TIMEOUT),
    (aiohttp.ServerTimeoutError(), Kind.TIMEOUT),
    (ConnectionResetError(), Kind.CRASH),
    (aiohttp.ServerDisconnectedError(), Kind.CRASH),
    (aiohttp.ClientPayloadError("truncated"), Kind.CRASH),
    (RuntimeError("something odd"), Kind.CRASH),
    # raised on our side before anything was sent: the request's fault, never the backend's
    (UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"), Kind.CLIENT_ERROR),
    (TypeError("Unsupported response_format type - 1"), Kind.CLIENT_ERROR),
    (ValueError("bad value"), Kind.CLIENT_ERROR),
    (_validation_error(), Kind.CLIENT_ERROR),
    (_wrapped(UnicodeEncodeError("ascii", "caf\xe9", 3, 4, "ordinal not in range(128)")), Kind.CLIENT_ERROR),
    (_wrapped(TypeError("Unsupported response_format type - 1")), Kind.CLIENT_ERROR),
    # ... but a chain through the network, or a bad answer being decoded, is the provider's
    (_wrapped(aiohttp.ServerDisconnectedError()), Kind.CRASH),
    (_wrapped(ConnectionRefusedError()), Kind.CRASH),
    (_wrapped(json.JSONDecodeError("Expecting value", "<html>", 0)), Kind.CRASH),
    (_wrapped(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")), Kind.CRASH),
])
def test_from_exception_kinds(exc: BaseException, kind: Kind) -> None:
    f = from_exception("hosted", exc)
    assert f.kind is kind, f
    if kind is Kind.CLIENT_ERROR:
        assert f.status == 400 and not f.counts_against_backend and "hosted" in f.message


def test_from_exception_returns_an_upstream_failure_unchanged() -> None:
    original = failures.UpstreamFailure(Kind.RATE_LIMITED, "hosted", "slow down", 429, 3.0)
    assert from_exception("other", original) is original


# ---- from_stream_error_event -------------------------------------------------------------------

def test_stream_error_events() -> None:
    overflow = from_stream_error_event("local", llama_error("the request exceeds the available context size", 400,
                                                            "exceed_context_size_error"))
    assert overflow.kind is Kind.CONTEXT_OVERFLOW and not overflow.counts_against_backend
    broken = from_stream_error_event("local", llama_error("got exception: decode failed"))
    assert broken.kind is Kind.BROKEN_STREAM and broken.counts_against_backend
    assert "decode failed" in broken.message
    assert from_stream_error_event("local", b"not json").kind is Kind.BROKEN_STREAM
    assert from_stream_error_event("local", b"").message == "error event in stream"


# ---- parse_retry_after -------------------------------------------------------------------------

@pytest.mark.parametrize(("headers", "expected"), [
    ({"retry-after": "7"}, 7.0),
    ({"retry-after": "1.5"}, 1.5),
    ({"retry-after-ms": "250"}, 0.25),
    ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # the precise one wins
    ({"retry-after-ms": "soon", "retry-after": "9"}, 9.0),  # a garbage ms falls back to seconds
    ({"retry-after": "-3"}, 0.0),
    ({"retry-after": "soon"}, None),
    ({"retry-after": ""}, None),
    ({}, None),
    (None, None),
])
def test_parse_retry_after(headers: dict[str, str] | None, expected: float | None) -> None:
    assert parse_retry_after(headers) == expected


def test_parse_retry_after_http_date() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    wait = parse_retry_after({"retry-after": when})
    assert wait is not None and 25 <= wait <= 31
    past = email.utils.formatdate(time.time() - 30, usegmt=True)
    assert parse_retry_after({"retry-after": past}) == 0.0

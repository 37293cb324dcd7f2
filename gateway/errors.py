"""Every error Switchyard itself answers with, in OpenAI's shape.

One class per kind so that status, `type` and `code` are decided here and nowhere else. Handlers
raise these; the app turns them into `{"error": {"message", "type", "code"}}` responses.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


class GatewayError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}

    def payload(self) -> dict[str, Any]:
        return error_payload(self.message, self.type, self.code)

    def body(self) -> bytes:
        return json.dumps(self.payload()).encode()

    def response(self, extra_headers: dict[str, str] | None = None, protocol: Any = None) -> web.Response:
        """`protocol` (gateway/protocols) renders the error in the caller's own shape; none is OpenAI's."""
        headers = {**self.headers, **(extra_headers or {})}
        body = self.body() if protocol is None else json.dumps(protocol.error_body(self)).encode()
        resp = web.Response(status=self.status, body=body, content_type="application/json", headers=headers)
        if headers.get("Connection", "").lower() == "close":
            resp.force_close()  # the connection is unusable (e.g. a body we could not read to its end)
        return resp


def error_payload(message: str, type_: str, code: str | int | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code}}


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class ContextLengthExceeded(GatewayError):
    # 400 + this code is what makes opencode compact and retry instead of failing
    # (opencode 1.18.33: 413, or 400 with this code, triggers its compaction; a 5xx does not).
    status = 400
    type = "invalid_request_error"
    code = "context_length_exceeded"


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class QuotaExceeded(GatewayError):
    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class NoBackendAvailable(GatewayError):
    status = 503
    type = "server_error"
    code = "no_backend_available"

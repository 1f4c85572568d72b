"""Errors on the OpenAI-compatible routes, in OpenAI's shape (B184).

OpenAI clients read `{"error": {"message", "type", "code", "param"}}` and pick their
exception from the HTTP status (the official SDK: 400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 429 RateLimitError, 5xx InternalServerError, which
it retries, honouring Retry-After). So these routes keep rbee's statuses, which already
follow that split, and put rbee's hint into the message, the one field every client shows.

Used by the agent and by the gateway; imports nothing but the protocol.
"""

from __future__ import annotations

import json
from typing import Any

from rbee_agent.protocol import ErrorBody, ErrorCode, RbeeError

# OpenAI's own codes where one exists for the same failure.
_CODES: dict[str, str] = {
    ErrorCode.MISSING_API_KEY: "invalid_api_key",
    ErrorCode.INVALID_API_KEY: "invalid_api_key",
    ErrorCode.MODEL_NOT_FOUND: "model_not_found",
    ErrorCode.INVALID_MODEL_REF: "model_not_found",
    ErrorCode.PROMPT_TOO_LONG: "context_length_exceeded",
}
_RETRY_AFTER_S = 1


def error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def openai_status(err: RbeeError) -> int:
    """rbee's status, except that an unknown or malformed model name is 404 as OpenAI has
    it (an SDK user asking for "gpt-4o" expects NotFoundError)."""
    if err.code == ErrorCode.INVALID_MODEL_REF:
        return 404
    return err.http_status


def openai_error(err: RbeeError, param: str | None = None) -> dict[str, Any]:
    status = openai_status(err)
    message = err.message if not err.hint else f"{err.message}. {err.hint}"
    return {"error": {
        "message": message,
        "type": error_type(status),
        "code": _CODES.get(err.code, err.code.lower()),
        "param": param if param is not None else err.details.get("param"),
    }}


def error_headers(err: RbeeError) -> dict[str, str]:
    """Retry-After on the answers a client should retry (queue full, draining, loading)."""
    if openai_status(err) not in (429, 503):
        return {}
    retry = err.details.get("retry_after_s", _RETRY_AFTER_S)
    return {"Retry-After": str(max(1, round(float(retry))))}


def openai_error_bytes(err: RbeeError, param: str | None = None) -> bytes:
    return json.dumps(openai_error(err, param)).encode()


def from_rbee_body(content: bytes, status: int) -> RbeeError:
    """An rbee error body (a worker's answer) back into RbeeError; anything else unreadable
    is reported as such, with the status it came with."""
    try:
        return RbeeError.from_body(ErrorBody.model_validate_json(content))
    except ValueError:
        return RbeeError(ErrorCode.MALFORMED_REPLY,
                         f"The worker answered HTTP {status} with a body rbee cannot read: "
                         f"{content[:120]!r}")

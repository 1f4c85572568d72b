"""Bearer-key checks shared by the agent and its workers (B22).

Keys are compared in constant time and never logged or echoed in an error.
"""

from __future__ import annotations

import hmac
import secrets
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the operator side imports new_api_key without fastapi installed
    from fastapi import Request

from rbee_agent.protocol import ErrorCode, RbeeError


def new_api_key() -> str:
    return secrets.token_urlsafe(32)


def bearer_token(request: Request) -> str:
    """The bearer token sent, or MISSING_API_KEY."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise RbeeError(
            ErrorCode.MISSING_API_KEY,
            f"{request.url.path} needs an API key",
            hint="Send 'Authorization: Bearer <key>'.",
        )
    return token.strip()


def check_bearer(request: Request, expected: str) -> None:
    token = bearer_token(request)
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise RbeeError(
            ErrorCode.INVALID_API_KEY,
            f"The API key sent to {request.url.path} is not valid",
            hint="Use the key from this node's agent config.",
        )

"""Make every error a FastAPI app returns take the one B39 shape.

FastAPI answers validation errors with its own 422 body and unknown routes with
`{"detail": ...}`; both are replaced here so clients parse exactly one error format.

An unexpected exception is logged once, with its traceback, under the `rbee` logger (so it
lands in the process's log file that the error body points to, B133), and answered with
INTERNAL_ERROR by `CatchAll`, which, unlike Starlette's last-resort handler, does not raise
it again for the server to print a second time. A client that hangs up while its body is
being read is no error at all: it is answered (to no one) without a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rbee_agent.protocol import ErrorCode, RbeeError

log = logging.getLogger("rbee.http")
M = TypeVar("M", bound=BaseModel)


def error_response(err: RbeeError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.to_body().model_dump(), status_code=err.http_status, headers=headers)


def _describe_validation(
    errors: Sequence[Any],
) -> tuple[str, list[dict[str, object]]]:
    problems: list[dict[str, object]] = []
    for item in errors:
        loc = [str(p) for p in item.get("loc", ()) if p != "body"]
        problems.append({"field": ".".join(loc) or "body", "problem": str(item.get("msg", ""))})
    first = problems[0] if problems else {"field": "body", "problem": "invalid"}
    return f"Invalid request: {first['field']}: {first['problem']}", problems


def _invalid(errors: Sequence[Any]) -> RbeeError:
    message, problems = _describe_validation(errors)
    return RbeeError(
        ErrorCode.INVALID_REQUEST,
        message,
        hint="Check the field names and ranges in rbee_agent/protocol.py.",
        details={"problems": problems},
    )


async def parse_body(request: Request, model: type[M]) -> M:
    """Parse a JSON body whatever its content type says (curl -d sends a form type)."""
    raw = await request.body()
    if not raw.strip():
        raise RbeeError(ErrorCode.INVALID_REQUEST, "The request body is empty; send a JSON object")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            raise RbeeError(
                ErrorCode.INVALID_REQUEST,
                f"The request body is not valid JSON: {exc.errors()[0].get('msg', '')}",
                hint="Send a JSON object, e.g. {\"prompt\": \"Hello\"}.",
            ) from None
        raise _invalid(exc.errors()) from None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RbeeError)
    async def _rbee_error(_: Request, exc: RbeeError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_invalid(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err = RbeeError(
                ErrorCode.NOT_FOUND,
                f"No route {request.method} {request.url.path}",
                details={"path": request.url.path},
            )
        elif exc.status_code == 405:
            err = RbeeError(
                ErrorCode.METHOD_NOT_ALLOWED,
                f"{request.method} is not allowed on {request.url.path}",
                details={"path": request.url.path},
            )
        else:
            err = RbeeError(ErrorCode.INVALID_REQUEST, str(exc.detail))
        return error_response(err, headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, _: ClientDisconnect) -> JSONResponse:
        log.debug("client left during %s %s", request.method, request.url.path)
        return error_response(RbeeError(ErrorCode.CANCELLED, "The client went away"))

    app.add_middleware(CatchAll)


class CatchAll:
    """The last resort: an exception no handler took becomes one logged INTERNAL_ERROR."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            method, path = scope.get("method", "?"), scope.get("path", "?")
            log.exception("unhandled error on %s %s", method, path)
            if started:
                return  # the reply is under way; the connection ends here
            err = RbeeError(
                ErrorCode.INTERNAL_ERROR,
                f"Internal error on {method} {path}: {type(exc).__name__}",
                hint="See the process log for the traceback (rbee logs --node NAME).",
            )
            await error_response(err)(scope, receive, send)

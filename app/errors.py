"""Error responses that can always be rendered: validation errors, bodies nested too deeply,
text that is not valid Unicode, and OpenAI's error shape for everything under /v1.

FastAPI's own 422 handler echoes each failing value back (`input`); a value JSON cannot encode
(NaN, a lone surrogate such as "\\ud800") then makes the error handler itself fail with a 500.
Here an error keeps its type, location and message, never the input, and every string is made
encodable first. `json.loads` raises RecursionError on nesting ~1000 deep; that is the
client's fault, so it is a 400 too.

Under /v1 every 4xx keeps OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`
(plus the app's `detail`), so the `openai` client raises the right exception with the message.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

OPENAI_PREFIX = "/v1"
# OpenAI's error types by status (what its API answers, so clients map them the same way).
OPENAI_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
                403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
                409: "conflict_error", 413: "invalid_request_error", 422: "invalid_request_error",
                429: "rate_limit_error"}
OPENAI_CODES = {401: "invalid_api_key", 404: "not_found", 413: "request_too_large",
                429: "rate_limit_exceeded"}
MAX_ERRORS = 20
TOO_DEEP = "the JSON body is nested too deeply"


def renderable(value: str) -> str:
    """`value` with lone surrogates replaced by their escape (so it encodes as UTF-8)."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")


def unencodable(value: Any) -> str | None:
    """The location ("messages.0.content") of the first string, key or number in a parsed
    JSON value that cannot be stored or sent on (a lone surrogate, NaN, an infinity), or None.
    Iterative, so any nesting json.loads returned is walked without recursion."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            if renderable(item) != item:
                return where or "body"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return where or "body"
        elif isinstance(item, dict):
            for key, child in item.items():
                if renderable(str(key)) != key:
                    return where or "body"
                stack.append((f"{where}.{key}" if where else str(key), child))
        elif isinstance(item, list):
            stack.extend((f"{where}.{i}" if where else str(i), child)
                         for i, child in enumerate(item))
    return None


def safe_errors(errors: Any) -> list[dict[str, Any]]:
    """Validation errors as JSON-safe dicts: type, loc and msg, without the failing input."""
    out = []
    for error in list(errors)[:MAX_ERRORS]:
        loc = [part if isinstance(part, int) else renderable(str(part))
               for part in error.get("loc", ())]
        out.append({"type": renderable(str(error.get("type", "value_error"))), "loc": loc,
                    "msg": renderable(str(error.get("msg", "invalid value")))})
    return out


def openai_error(status: int, message: str, error_type: str | None = None,
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error body (and the app's `detail`, which carries the same message)."""
    message = renderable(message)
    return JSONResponse({"error": {"message": message,
                                   "type": error_type or OPENAI_TYPES.get(status,
                                                                          "api_error"),
                                   "param": None if param is None else renderable(param),
                                   "code": code or OPENAI_CODES.get(status)},
                         "detail": message}, status_code=status, headers=headers)


def is_openai_path(path: str) -> bool:
    return path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/")


def error_body(path: str, status: int, detail: str) -> bytes:
    """The JSON body of an error sent below FastAPI (middleware): OpenAI's shape under /v1."""
    if is_openai_path(path):
        return bytes(openai_error(status, detail).body)
    return json.dumps({"detail": renderable(detail)}).encode()


def install_error_handlers(app: FastAPI) -> None:
    """422 without echoed input, 400 for too-deep JSON, OpenAI's shape under /v1."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = safe_errors(exc.errors())
        if is_openai_path(request.url.path):
            first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
            where = ".".join(str(p) for p in first["loc"] if p not in ("body", "path",
                                                                       "query"))
            return openai_error(400, f"invalid request: {where or 'body'}: {first['msg']}",
                                param=where or None)
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(RecursionError)
    async def too_deep(request: Request, _exc: RecursionError) -> JSONResponse:
        if is_openai_path(request.url.path):
            return openai_error(400, TOO_DEEP)
        return JSONResponse({"detail": TOO_DEEP}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Any:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if is_openai_path(request.url.path) and 400 <= exc.status_code < 500:
            return openai_error(exc.status_code, detail,
                                headers=dict(exc.headers) if exc.headers else None)
        from fastapi.exception_handlers import http_exception_handler

        return await http_exception_handler(request, exc)

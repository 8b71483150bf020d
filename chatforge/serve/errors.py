"""How `chatforge serve` answers a failure: OpenAI's error body, one status per cause, nothing leaked.

Use it like this in a route::

    raise ApiError(400, "max_tokens is over serve.max_tokens_limit=4096", "invalid_value", param="max_tokens")

`install_error_handlers(app)` turns ApiError, the backends' failures, FastAPI's validation errors and Starlette's
404/405 into {"error": {"message", "type", "param", "code"}}; 429 and 503 carry Retry-After. An unexpected
exception is a 500 naming only the request id (the traceback goes to the server log). An upstream's own error
text is never trusted: a 5xx (or an error mid-stream) becomes a 502 with a generic message and the request id
(its text goes to the server log, credentials masked); a 4xx keeps one short printable line of its message.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatforge.serve.backends import BackendRejected
from chatforge.serve.engine import EngineFailure, ServeUnavailable
from chatforge.serve.schemas import error_body
from chatforge.serve.state import request_info

error_log = logging.getLogger("chatforge.serve.errors")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
               409: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               499: "client_closed_request", 500: "server_error", 502: "upstream_error", 503: "service_unavailable"}
UPSTREAM_MESSAGE_CHARS = 200
# user:password@ in URLs, and key=value / key: value pairs whose key names a secret (linear: no nested repeats)
_CREDENTIALS = re.compile(r"(?i)(//[^/\s:@]{1,256}:)[^@\s]{1,256}@|((?:password|passwd|pwd|secret|token|api[_-]?key|"
                          r"authorization)[\"']?\s{0,4}[:=]\s{0,4}[\"']?)[^\s\"',;&]{1,512}")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e\u00a0-\ud7ff\ue000-\ufffd]")


class ApiError(Exception):
    """Raise in a route to answer with OpenAI's error body; 429 and 503 carry Retry-After."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 retry_after_s: float | None = None, error_type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.retry_after_s = retry_after_s
        self.error_type = error_type or ERROR_TYPES.get(status, "server_error")


def error_response(request: Request, error: ApiError) -> JSONResponse:
    request_info(request).error_type = error.error_type
    headers = {"Retry-After": str(max(1, round(error.retry_after_s)))} if error.retry_after_s is not None else None
    return JSONResponse(error_body(error.message, error.error_type, error.param, error.code), error.status,
                        headers=headers)


def api_error_of(exc: Exception, request_id: str) -> ApiError:
    """What a failure answers: itself (ApiError), 503 (ServeUnavailable), a sanitised upstream error
    (BackendRejected), else a 500 that names only the request id while the exception goes to the server log."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ServeUnavailable):
        return ApiError(503, str(exc), exc.code, retry_after_s=exc.retry_after_s)
    if isinstance(exc, BackendRejected):
        return upstream_error(exc, request_id)
    error_log.error("request %s failed", request_id, exc_info=exc)
    return ApiError(500, f"internal error; the server log has the details under request id {request_id}",
                    "internal_error")


def upstream_error(exc: BackendRejected, request_id: str) -> ApiError:
    """An upstream's refusal as the client sees it: 5xx -> 502 with nothing of the upstream's text, 4xx -> its
    status with one short, printable, credential-free line (or a generic message when there is none)."""
    if exc.status >= 500:
        error_log.warning("request %s: the upstream failed: %s", request_id, mask_credentials(exc.message)[:2000])
        return ApiError(502, f"the upstream model server failed; the server log has the details under request id "
                             f"{request_id}", "upstream_error")
    line = mask_credentials(exc.message.removeprefix("upstream: ").strip().split("\n", 1)[0])
    line = _UNPRINTABLE.sub("", line).strip()
    if not line or len(line) > UPSTREAM_MESSAGE_CHARS or "Traceback" in line:
        line = f"the upstream model server refused the request (HTTP {exc.status})"
    code = exc.code if isinstance(exc.code, str) and re.fullmatch(r"[a-z0-9_]{1,64}", exc.code) else None
    return ApiError(exc.status, f"upstream: {line}", code)


def mask_credentials(text: str) -> str:
    """`text` with URL passwords and secret=value pairs replaced by ***, for logs and messages."""
    return _CREDENTIALS.sub(lambda m: (m.group(1) + "***@") if m.group(1) else (m.group(2) + "***"), text)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every failure of `app` with OpenAI's error body (see the module docstring)."""
    for failure in (ApiError, ServeUnavailable, BackendRejected, EngineFailure):
        app.add_exception_handler(failure, _failure_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)


async def _failure_handler(request: Request, exc: Exception) -> JSONResponse:
    return error_response(request, api_error_of(exc, request_info(request).request_id))


async def _validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return error_response(request, ApiError(400, f"the request body is not valid JSON: {detail}".rstrip(": "),
                                                "invalid_json"))
    params = [_field_path(e.get("loc", ())) for e in errors]
    messages = [f"{param or 'body'}: {_plain_message(e)}" for param, e in zip(params, errors)]
    extra = f" (and {len(messages) - 3} more)" if len(messages) > 3 else ""
    return error_response(request, ApiError(400, "; ".join(messages[:3]) + extra, "invalid_value",
                                            param=params[0] if params else None))


def _field_path(loc: Any) -> str:
    """('body', 'messages', 1, 'role') -> 'messages[1].role'."""
    path = ""
    for part in list(loc)[1:] if loc and loc[0] == "body" else list(loc):
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _plain_message(error: dict[str, Any]) -> str:
    message = str(error.get("msg", "invalid"))
    if error.get("type") == "extra_forbidden":
        return "unknown field; remove it"
    return message.removeprefix("Value error, ")


async def _http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"no such route: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(request, ApiError(exc.status_code, message))

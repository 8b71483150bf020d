"""The FastAPI app of `chatforge serve`: factory, auth, errors, request ids, access logs, metrics and records.

Use it like this::

    app = create_app(ServeConfig(run="runs/r1", db="sqlite:///chatforge.db"))     # nothing loads until startup
    uvicorn.run(app, host="127.0.0.1", port=8000, access_log=False)                 # our JSON access log replaces it
    # tests: create_app(cfg, store=Store(url), backend=TorchBackend(cfg, loaded=loaded))

Routes (routes.py): POST /v1/chat/completions, /v1/completions, /v1/feedback; GET /v1/models, /health, /ready,
/metrics, / (the chat page). Auth is `Authorization: Bearer <key>` checked by `Store.authenticate`: 401 when it is
missing, malformed, unknown or revoked, 403 when the key lacks the route's scope (chat: completions and models;
feedback: /v1/feedback; admin: /metrics). /health, /ready and / need no key (the page asks for one).

Every response carries X-Request-ID (the client's, when it sends a sane one, else a new one). Every error is
OpenAI's body {"error": {"message", "type", "param", "code"}}: 400 for bad JSON and invalid fields (FastAPI's 422
included), 404, 405, 413 (body over serve.max_body_bytes, checked before parsing, chunked bodies too), 429 and 503
with Retry-After; an unexpected exception is a 500 naming only the request id (the traceback goes to the server log).

After each response, one JSON line goes to the `chatforge.serve.access` logger (request id, key id, route, status,
latency, time to first token, tokens; never message content nor a key), the metrics move, and /v1/ requests are
written to the store's requests table.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatforge.config import ServeConfig
from chatforge.serve.backends import Backend, BackendRejected, make_backend
from chatforge.serve.engine import EngineFailure, ServeUnavailable
from chatforge.serve.limits import RateLimiter
from chatforge.serve.metrics import ServeMetrics
from chatforge.serve.safeguards import Safeguards
from chatforge.serve.schemas import error_body
from chatforge.serve.store import ApiKey, RequestRecord, Store

access_log = logging.getLogger("chatforge.serve.access")
error_log = logging.getLogger("chatforge.serve.errors")

REQUEST_ID_HEADER = "x-request-id"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 499: "client_closed_request", 500: "server_error", 502: "upstream_error",
               503: "service_unavailable"}
bearer = HTTPBearer(auto_error=False, description="an API key from `chatforge keys create`")


@dataclass
class ServeState:
    """What the routes share (app.state.serve)."""

    cfg: ServeConfig
    store: Store
    backend: Backend
    limiter: RateLimiter
    metrics: ServeMetrics
    safeguards: Safeguards


@dataclass
class RequestInfo:
    """What one request did, filled in by the routes and read by the access log (request.state.info)."""

    request_id: str
    started: float
    key_id: str | None = None
    model: str | None = None
    ttft_s: float | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    error_type: str | None = None


class ApiError(Exception):
    """Raise in a route to answer with OpenAI's error body; 429 and 503 carry Retry-After."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 retry_after_s: float | None = None, error_type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.retry_after_s = retry_after_s
        self.error_type = error_type or ERROR_TYPES.get(status, "server_error")


def create_app(cfg: ServeConfig, store: Store | None = None, backend: Backend | None = None) -> FastAPI:
    """The app serving `cfg` (see the module docstring); its lifespan starts and closes `backend`."""
    from chatforge.serve.routes import router

    store = store if store is not None else Store(cfg.db, pii=cfg.pii, auth_cache_s=cfg.key_cache_s)
    backend = backend if backend is not None else make_backend(cfg)
    metrics = ServeMetrics(queue_depth=backend.queue_depth)
    if hasattr(backend, "on_batch"):
        backend.on_batch = metrics.batch_size.observe
    if hasattr(backend, "on_outcome"):  # the upstream backend: retries and failures per upstream
        backend.on_outcome = lambda upstream, outcome: metrics.upstream_requests.labels(upstream, outcome).inc()
    state = ServeState(cfg, store, backend, RateLimiter(store), metrics, Safeguards(cfg, metrics))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        try:
            yield
        finally:
            await backend.close()

    app = FastAPI(title="chatforge", summary="OpenAI-compatible API of a chatforge run", lifespan=lifespan)
    app.state.serve = state
    app.include_router(router)
    for failure in (ApiError, ServeUnavailable, BackendRejected, EngineFailure):
        app.add_exception_handler(failure, _failure_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_middleware(GatewayMiddleware, state=state)
    return app


def serve_state(request: Request) -> ServeState:
    return request.app.state.serve


def request_info(request: Request) -> RequestInfo:
    return request.state.info


# --- auth ---------------------------------------------------------------------------------------------------------
def require_scope(scope: str) -> Callable[..., Awaitable[ApiKey]]:
    """A dependency that yields the request's ApiKey, or answers 401 (no valid key) / 403 (key lacks `scope`)."""

    async def authenticated_key(request: Request,
                                _credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> ApiKey:
        header = request.headers.get("authorization", "")
        if not header:
            raise ApiError(401, "no API key: send the header 'Authorization: Bearer <key>'", "missing_api_key")
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise ApiError(401, "the Authorization header must be 'Bearer <key>'", "invalid_authorization_header")
        key = await run_in_threadpool(serve_state(request).store.authenticate, secret.strip())
        if key is None:
            raise ApiError(401, "invalid or revoked API key", "invalid_api_key")
        request_info(request).key_id = key.id
        if scope not in key.scopes:
            raise ApiError(403, f"key {key.id} lacks the '{scope}' scope (it has: {', '.join(sorted(key.scopes))})",
                           "insufficient_scope")
        return key

    return authenticated_key


# --- errors -------------------------------------------------------------------------------------------------------
def error_response(request: Request, error: ApiError) -> JSONResponse:
    request_info(request).error_type = error.error_type
    headers = {"Retry-After": str(max(1, round(error.retry_after_s)))} if error.retry_after_s is not None else None
    return JSONResponse(error_body(error.message, error.error_type, error.param, error.code), error.status,
                        headers=headers)


def api_error_of(exc: Exception, request_id: str) -> ApiError:
    """What a failure answers: itself (ApiError), 503 (ServeUnavailable), the upstream's status (BackendRejected),
    else a 500 that names only the request id while the exception goes to the server log."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ServeUnavailable):
        return ApiError(503, str(exc), exc.code, retry_after_s=exc.retry_after_s)
    if isinstance(exc, BackendRejected):
        return ApiError(exc.status, exc.message, exc.code)
    error_log.error("request %s failed", request_id, exc_info=exc)
    return ApiError(500, f"internal error; the server log has the details under request id {request_id}",
                    "internal_error")


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


# --- the middleware: request ids, body limit, 500s, access log, metrics, records ------------------------------------
class GatewayMiddleware:
    """Pure ASGI (streams pass through untouched); see the module docstring for what it adds to every request."""

    def __init__(self, app: ASGIApp, state: ServeState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = incoming if _SANE_REQUEST_ID.fullmatch(incoming) else f"req_{uuid.uuid4().hex[:20]}"
        info = RequestInfo(request_id, time.monotonic())
        scope.setdefault("state", {})["info"] = info
        response_status = 0

        async def send_with_request_id(message: Message) -> None:
            nonlocal response_status
            if message["type"] == "http.response.start":
                response_status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            body, too_large = await self._read_body(scope, receive)
            if too_large:
                await self._answer(scope, send_with_request_id, ApiError(
                    413, f"the request body is over serve.max_body_bytes={self.state.cfg.max_body_bytes} bytes",
                    "request_too_large"))
            else:
                await self.app(scope, _replay(body, receive), send_with_request_id)
        except ClientDisconnect:
            pass
        except Exception as exc:
            error = api_error_of(exc, request_id)
            if response_status == 0:
                await self._answer(scope, send_with_request_id, error)
        finally:
            await self._account(scope, info, response_status or 499)

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[bytes, bool]:
        """The whole body, or (what was read, True) as soon as it passes max_body_bytes (chunked bodies too)."""
        limit = self.state.cfg.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return b"", True
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away before sending it all
                return b"".join(chunks), False
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return b"", True
            if not message.get("more_body", False):
                return b"".join(chunks), False

    async def _answer(self, scope: Scope, send: Send, error: ApiError) -> None:
        scope["state"]["info"].error_type = error.error_type
        response = JSONResponse(error_body(error.message, error.error_type, error.param, error.code), error.status)
        await response(scope, _no_more_body, send)

    async def _account(self, scope: Scope, info: RequestInfo, status: int) -> None:
        latency_s = time.monotonic() - info.started
        route = getattr(scope.get("route"), "path", "unmatched")
        metrics = self.state.metrics
        metrics.observe_request(route, status, latency_s, info.ttft_s, info.tokens_in, info.tokens_out)
        if status >= 400:
            metrics.observe_error(info.error_type or ERROR_TYPES.get(status, "server_error"))
        access_log.info(json.dumps({
            "request_id": info.request_id, "key_id": info.key_id, "method": scope.get("method"), "route": route,
            "status": status, "latency_s": round(latency_s, 4),
            "ttft_s": None if info.ttft_s is None else round(info.ttft_s, 4),
            "tokens_in": info.tokens_in, "tokens_out": info.tokens_out, "error": info.error_type,
        }))
        if not scope.get("path", "").startswith("/v1/"):
            return
        record = RequestRecord(request_id=info.request_id, key_id=info.key_id, model=info.model or "", route=route,
                               status=status, latency_s=latency_s, ttft_s=info.ttft_s, tokens_in=info.tokens_in,
                               tokens_out=info.tokens_out)
        try:
            await run_in_threadpool(self.state.store.record_request, record)
        except Exception:  # the answer went out; a store outage must not turn it into an error
            error_log.exception("recording request %s in the store failed", info.request_id)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body already read, then passes on (so disconnects still arrive)."""
    replayed = False

    async def replay_receive() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay_receive


async def _no_more_body() -> Message:
    return {"type": "http.disconnect"}

"""The serve app's ASGI middleware: request ids, body size and read deadline, 500s, access log, metrics, records.

`create_app` installs it; what it adds to every request:

- X-Request-ID on the response (the client's, when it sends a sane one, else a new one);
- the body read in full before the app sees it: over serve.max_body_bytes (declared or counted, chunked bodies
  too) is a 413, and a body not complete within serve.body_timeout_s of the request's start is a 408 that closes
  the connection (a client that trickles a byte now and then cannot hold a connection forever);
- an exception escaping the app is answered like errors.api_error_of says (a 500 naming only the request id);
- after the response, one JSON line on the `chatforge.serve.access` logger (request id, key id, route, status,
  latency, time to first token, tokens; never message content nor a key), the metrics, and for /v1/ routes a row
  in the store's requests table.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid

from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatforge.serve.errors import ERROR_TYPES, ApiError, api_error_of
from chatforge.serve.schemas import error_body
from chatforge.serve.state import RequestInfo, ServeState
from chatforge.serve.store import RequestRecord

access_log = logging.getLogger("chatforge.serve.access")
error_log = logging.getLogger("chatforge.serve.errors")

REQUEST_ID_HEADER = "x-request-id"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


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
            body, refusal = await self._read_body(scope, receive, info.started)
            if refusal is not None:
                await self._answer(scope, send_with_request_id, refusal)
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

    async def _read_body(self, scope: Scope, receive: Receive, started: float) -> tuple[bytes, ApiError | None]:
        """The whole body, or an ApiError (413 as soon as it passes max_body_bytes, 408 past body_timeout_s)."""
        cfg = self.state.cfg
        too_large = ApiError(413, f"the request body is over serve.max_body_bytes={cfg.max_body_bytes} bytes",
                             "request_too_large")
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > cfg.max_body_bytes:
            return b"", too_large
        deadline = started + cfg.body_timeout_s
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return b"", ApiError(408, f"the request body did not arrive within serve.body_timeout_s="
                                          f"{cfg.body_timeout_s:g} s", "request_timeout")
            if message["type"] != "http.request":  # the client went away before sending it all
                return b"".join(chunks), None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > cfg.max_body_bytes:
                return b"", too_large
            if not message.get("more_body", False):
                return b"".join(chunks), None

    async def _answer(self, scope: Scope, send: Send, error: ApiError) -> None:
        """Answer `error` and close the connection (the rest of an unread body must not be read as a request)."""
        scope["state"]["info"].error_type = error.error_type
        headers = {"Connection": "close"}
        if error.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, round(error.retry_after_s)))
        response = JSONResponse(error_body(error.message, error.error_type, error.param, error.code), error.status,
                                headers=headers)
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

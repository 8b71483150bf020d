"""The routes of `chatforge serve` (mounted by `create_app`; auth.py, errors.py, middleware.py do the rest).

Call them like OpenAI's API::

    curl -s localhost:8000/v1/chat/completions -H "Authorization: Bearer $KEY" \\
         -d '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 32}'
    client = OpenAI(base_url="http://localhost:8000/v1", api_key=KEY)
    client.chat.completions.create(model=..., messages=..., stream=True)
    curl -s localhost:8000/v1/feedback -H "Authorization: Bearer $KEY" \
         -d '{"completion_id": "chatcmpl-...", "rating": 1}'

A completion goes: model check (the id GET /v1/models lists, or "chatforge"), max_tokens over
serve.max_tokens_limit (400), the key's rate limit as it stands (429 + Retry-After, before any tokenizing), prompt
tokens (the chat template applied), the context check (an explicit max_tokens that does not fit is a 400
`context_length_exceeded`; the default one shrinks to fit), the key's token budget (429; tokens reserved as
prompt + max_tokens and settled to what was used), then the backend.
Streams are server-sent events in OpenAI's chunk format ending with `data: [DONE]`; the first token is awaited
before the headers go out, so a full queue or a timeout is still a proper 503. A client that goes away cancels
its generation. Chat answers are stored for feedback (PII-redacted by the store) before the response ends, unless
the request says `store: false` or serve.store_conversations is off; text completions are not stored.

Feedback: only the key a completion was answered to may rate it, and it holds one rating per completion (rating
again replaces the earlier one, same feedback id); an unknown id and another key's completion are the same 404.
The target is checked first, then the size of the correction and comment (serve.max_feedback_chars, 400), and
only then are they redacted, in at most serve.feedback_threads worker threads at once, so a flood of feedback
can neither take the whole thread pool nor starve the event loop.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from importlib import resources
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from jinja2 import TemplateError
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from chatforge.httpsec import page_csp
from chatforge.models.generate import SamplingSettings
from chatforge.serve.auth import require_scope
from chatforge.serve.backends import GenerationInput, collect
from chatforge.serve.engine import Delta
from chatforge.serve.errors import ApiError, api_error_of
from chatforge.serve.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorBody,
    FeedbackRequest,
    FeedbackResponse,
    ModelList,
    SamplingFields,
    TextCompletion,
    error_body,
    usage_dict,
)
from chatforge.serve.state import RequestInfo, ServeState, request_info, serve_state
from chatforge.serve.store import ApiKey, StoreError

router = APIRouter()
MODEL_ALIAS = "chatforge"  # accepted as `model` whatever is served, for clients that need a fixed name
ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorBody} for status in (400, 401, 403, 404, 408, 413,
                                                                                        429, 503)}
CHAT_PAGE = resources.files("chatforge.serve").joinpath("static", "chat.html").read_text(encoding="utf-8")
T = TypeVar("T")


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


@router.get("/health", tags=["ops"])
async def health() -> dict[str, str]:
    """Liveness: the process answers (no key needed)."""
    return {"status": "ok"}


@router.get("/ready", tags=["ops"], responses={503: {"model": ErrorBody}})
async def ready(request: Request) -> dict[str, str]:
    """Readiness: the model is loaded (or the upstream answered) and the database answers; else 503 (no key)."""
    state = serve_state(request)
    if not state.backend.ready():
        raise ApiError(503, "the model is not ready", "not_ready", retry_after_s=5)
    try:
        await run_in_threadpool(state.store.ping)
    except StoreError as exc:
        raise ApiError(503, str(exc), "database_unavailable", retry_after_s=5) from None
    return {"status": "ready", "model": state.backend.model_id}


@router.get("/metrics", tags=["ops"], response_class=Response, responses={401: {"model": ErrorBody}})
async def metrics(request: Request, _key: ApiKey = Depends(require_scope("admin"))) -> Response:
    """Prometheus text format; needs a key with the admin scope (Prometheus: `authorization: {credentials: KEY}`)."""
    body, content_type = serve_state(request).metrics.render()
    return Response(body, media_type=content_type)


@router.get("/", include_in_schema=False)
async def chat_page() -> HTMLResponse:
    return HTMLResponse(CHAT_PAGE, headers={"Cache-Control": "no-cache",
                                            "Content-Security-Policy": page_csp(CHAT_PAGE)})


@router.get("/v1/models", response_model=ModelList, responses=ERRORS)
async def models(request: Request, _key: ApiKey = Depends(require_scope("chat"))) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": serve_state(request).backend.model_id, "object": "model",
                                        "created": int(time.time()), "owned_by": "chatforge"}]}


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           key: ApiKey = Depends(require_scope("chat"))) -> Response:
    job = GenerationInput(SamplingSettings(), messages=body.plain_messages())
    return await answer(request, key, body, job, "chat")


@router.post("/v1/completions", response_model=TextCompletion, responses=ERRORS)
async def completions(body: CompletionRequest, request: Request,
                      key: ApiKey = Depends(require_scope("chat"))) -> Response:
    job = GenerationInput(SamplingSettings(), prompt=body.prompt_text())
    return await answer(request, key, body, job, "text")


@router.post("/v1/feedback", response_model=FeedbackResponse, responses=ERRORS)
async def feedback(body: FeedbackRequest, request: Request,
                   key: ApiKey = Depends(require_scope("feedback"))) -> dict[str, Any]:
    """Rate a completion this key received (+1 / -1; rating again replaces it), maybe with the better answer."""
    state = serve_state(request)
    try:
        await run_in_threadpool(state.store.check_feedback_target, body.completion_id, key.id)
        for field, text in (("correction", body.correction), ("comment", body.comment)):
            if text is not None and len(text) > state.cfg.max_feedback_chars:
                raise ApiError(400, f"{field} has {len(text)} characters; at most serve.max_feedback_chars="
                                    f"{state.cfg.max_feedback_chars} are taken", "feedback_too_long", field)
        row_id = await anyio.to_thread.run_sync(
            state.store.add_feedback, body.completion_id, key.id, body.rating, body.correction, body.comment,
            limiter=state.feedback_work)
    except KeyError:
        raise ApiError(404, f"completion {body.completion_id} was not stored for this key (unknown id, another "
                            "key's, or it was sent with store: false); there is nothing to rate",
                       "completion_not_found", "completion_id") from None
    except ValueError as exc:
        raise ApiError(400, str(exc), "invalid_value") from None
    return {"id": row_id, "object": "feedback", "completion_id": body.completion_id, "rating": body.rating}


async def answer(request: Request, key: ApiKey, body: SamplingFields, job: GenerationInput, kind: str) -> Response:
    """Check, rate-limit and run one completion (`kind` "chat" or "text"); see the module docstring."""
    state, info = serve_state(request), request_info(request)
    backend = state.backend
    info.model = backend.model_id
    if body.model and body.model not in (backend.model_id, MODEL_ALIAS):
        raise ApiError(404, f"model '{body.model}' is not served here; GET /v1/models lists '{backend.model_id}'",
                       "model_not_found", "model")
    if not backend.ready():
        raise ApiError(503, "the model is not ready yet", "not_ready", retry_after_s=5)
    requested = body.requested_max_tokens()
    if requested is not None and requested > state.cfg.max_tokens_limit:
        raise ApiError(400, f"max_tokens={requested} is over this server's limit of {state.cfg.max_tokens_limit} "
                            "(serve.max_tokens_limit)", "invalid_value", "max_tokens")
    wait_s = await run_in_threadpool(state.limiter.peek, key)  # the store: off the event loop
    if wait_s is not None:
        raise _over_limit(key, wait_s)
    job.whole = not body.stream
    try:
        prompt_tokens = await run_in_threadpool(backend.count_tokens, job)
    except (ValueError, TemplateError) as exc:  # e.g. a model's own template that refuses this order of roles
        raise ApiError(400, f"the {'conversation' if kind == 'chat' else 'prompt'} cannot be encoded: {exc}",
                       "invalid_prompt", "messages" if kind == "chat" else "prompt") from None
    max_tokens = fit_max_tokens(body.requested_max_tokens(), prompt_tokens, backend.context_length,
                                state.cfg.default_max_tokens, "messages" if kind == "chat" else "prompt")
    job.sampling = SamplingSettings(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                    seed=body.seed, stop=body.stop_strings(), **body.penalties())
    info.tokens_in = prompt_tokens
    wait_s = await run_in_threadpool(state.limiter.check_request, key, prompt_tokens, max_tokens)
    if wait_s is not None:
        raise _over_limit(key, wait_s)
    await state.safeguards.check_input(job, info.request_id)  # after the limit: a refused key costs no moderation
    reply = Reply(state, info, key, kind, body, job, prompt_tokens, max_tokens)
    try:
        if body.stream:
            return await reply.start_stream(request)
        return await reply.whole(request)
    except ClientGone:
        return Response(status_code=499)


def _over_limit(key: ApiKey, wait_s: float) -> ApiError:
    return ApiError(429, f"key {key.id} is over its rate limit ({key.rpm or 'unlimited'} requests/min, "
                         f"{key.tpm or 'unlimited'} tokens/min); retry in {math.ceil(wait_s)} s",
                    "rate_limit_exceeded", retry_after_s=wait_s)


def fit_max_tokens(requested: int | None, prompt_tokens: int, context: int | None, default: int,
                   prompt_param: str) -> int:
    """max_tokens for this prompt: the requested one if it fits the context (else 400), else the default, shrunk."""
    if context is None:
        return requested or default
    room = context - prompt_tokens
    if requested is None and room >= 1:
        return min(default, room)
    if requested is None or requested > room:
        asked = 1 if requested is None else requested
        raise ApiError(400, f"the prompt has {prompt_tokens} tokens and max_tokens asks for {asked}: "
                            f"{prompt_tokens + asked} is over the model's context of {context} tokens; shorten the "
                            "conversation or lower max_tokens", "context_length_exceeded",
                       "max_tokens" if requested is not None and prompt_tokens < context else prompt_param)
    return requested


class Reply:
    """One admitted completion, answered whole or as a stream; settles its token reservation when done."""

    def __init__(self, state: ServeState, info: RequestInfo, key: ApiKey, kind: str, body: SamplingFields,
                 job: GenerationInput, prompt_tokens: int, max_tokens: int) -> None:
        self.state, self.info, self.key, self.kind, self.body, self.job = state, info, key, kind, body, job
        self.prompt_tokens, self.max_tokens = prompt_tokens, max_tokens
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = state.backend.model_id

    async def timed_deltas(self) -> AsyncIterator[Delta]:
        """The backend's deltas, noting when the first came as the request's time to first token."""
        async for delta in self.state.safeguards.guard_output(self.state.backend.stream(self.job), self.job,
                                                              self.info.request_id):
            if self.info.ttft_s is None:
                self.info.ttft_s = time.monotonic() - self.info.started
            yield delta

    def settle(self, completion_tokens: int) -> None:
        self.info.tokens_out = completion_tokens
        self.state.limiter.settle_tokens(self.key, self.prompt_tokens + self.max_tokens,
                                         self.prompt_tokens + completion_tokens)

    async def whole(self, request: Request) -> Response:
        completion_tokens = 0
        try:
            result = await until_disconnected(request, collect(self.timed_deltas()))
            completion_tokens = result.completion_tokens
        finally:
            self.settle(completion_tokens)
        await self.store(result.text)
        if self.kind == "chat":
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": result.text}}
        else:
            choice = {"index": 0, "text": result.text}
        choice.update(logprobs=None, finish_reason=result.finish_reason)
        return JSONResponse({"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                             "created": self.created, "model": self.model, "choices": [choice],
                             "usage": usage_dict(result.prompt_tokens, result.completion_tokens)})

    async def start_stream(self, request: Request) -> Response:
        deltas = self.timed_deltas()
        try:
            first = await until_disconnected(request, anext(deltas))
        except BaseException:
            self.settle(0)
            await deltas.aclose()
            raise
        return EventStreamResponse(self.events(first, deltas), media_type="text/event-stream",
                                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def events(self, first: Delta, deltas: AsyncIterator[Delta]) -> AsyncIterator[str]:
        pieces: list[str] = []
        completion_tokens = 0
        try:
            if self.kind == "chat":
                yield self._chunk({"role": "assistant", "content": ""}, None)
            delta: Delta | None = first
            while delta is not None:
                if delta.text:
                    pieces.append(delta.text)
                    yield self._chunk({"content": delta.text} if self.kind == "chat" else delta.text, None)
                if delta.finish_reason is not None:
                    completion_tokens = delta.completion_tokens
                    yield self._chunk({} if self.kind == "chat" else "", delta.finish_reason)
                    if self.body.wants_usage_chunk():
                        yield self._sse({**self._envelope(), "choices": [],
                                         "usage": usage_dict(delta.prompt_tokens, delta.completion_tokens)})
                    break
                delta = await anext(deltas, None)
            await self.store("".join(pieces))
            yield "data: [DONE]\n\n"
        except Exception as exc:  # the headers are out: the stream ends with OpenAI's error event
            error = api_error_of(exc, self.info.request_id)
            self.info.error_type = error.error_type
            yield self._sse(error_body(error.message, error.error_type, error.param, error.code))
        finally:
            self.settle(completion_tokens or len(pieces))
            await deltas.aclose()

    def _envelope(self) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model}

    def _chunk(self, delta: dict[str, str] | str, finish_reason: str | None) -> str:
        if self.kind == "chat":
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason}
        chunk = {**self._envelope(), "choices": [choice]}
        if self.body.wants_usage_chunk():
            chunk["usage"] = None
        return self._sse(chunk)

    @staticmethod
    def _sse(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"

    async def store(self, answer_text: str) -> None:
        """Keep a chat answer for feedback unless the request or the config opts out (the store redacts PII)."""
        if self.kind != "chat" or not self.state.cfg.store_conversations:
            return
        if isinstance(self.body, ChatCompletionRequest) and self.body.store is False:
            return
        assert self.job.messages is not None
        await run_in_threadpool(self.state.store.store_conversation, self.id, self.key.id, self.model,
                                self.job.messages, answer_text)


class EventStreamResponse(StreamingResponse):
    """A StreamingResponse that always closes its generator (which cancels the generation) when it ends."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientGone (with `work` cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if task.cancelled():
        raise ClientGone(f"request {request_info(request).request_id}: the client went away")
    return task.result()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass

"""The `upstream` backend: forward to one or more OpenAI-compatible servers (vLLM, llama-server, another chatforge).

Configure it in chatforge.yaml (or `chatforge serve --backend upstream --upstream URL --upstream URL`)::

    serve:
      backend: upstream
      upstreams: [http://gpu-1:8000/v1, http://gpu-2:8000/v1]   # serve.upstream_url still works for one

or build it yourself::

    backend = UpstreamBackend(cfg, ["http://gpu-1:8000/v1", "http://gpu-2:8000/v1"], api_key=None)
    await backend.start()              # reaches every upstream once; needs one to answer GET /models
    async for delta in backend.stream(job): ...
    backend.outcomes                   # Counter: ok, retried, failed, failed_after_streaming (also in /metrics)

Each request goes to the healthy upstream with the fewest requests in flight (ties take turns). A background task
asks every upstream for GET /models each `serve.upstream_health_s` seconds: an upstream that fails it, or drops a
connection, is skipped until it answers again. A request that fails before any of its answer went to the client
(connection refused or reset, the upstream's 5xx, 429 or 503) is sent to the next upstream; one that has already
streamed part of its answer ends with an error event instead (its text cannot be taken back). A non-streamed
answer (`job.whole`) is buffered here, so it is retried elsewhere even when the upstream dies mid-answer. The
upstream's 4xx (a prompt over its context, say) and timeouts are not retried.

The upstreams' key, if they need one, comes from $CHATFORGE_UPSTREAM_API_KEY (a secret stays out of config files).
Prompt tokens are estimated (characters / 4) for rate limits. At most max_batch requests per upstream are in
flight and max_queue wait; beyond that, 503.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import httpx

from chatforge.config import ServeConfig
from chatforge.serve.backends import (
    UPSTREAM_KEY_ENV,
    BackendRejected,
    GenerationInput,
    InflightLimit,
    _raise_for_upstream,
    estimate_tokens,
)
from chatforge.serve.engine import Delta, ServeUnavailable

log = logging.getLogger("chatforge.serve.upstream")
RETRIED_CODES = frozenset({"upstream_unreachable", "upstream_busy"})


def upstream_backend(cfg: ServeConfig) -> UpstreamBackend:
    """The backend for `serve.upstreams` plus `serve.upstream_url`; ValueError when neither is set."""
    urls = list(dict.fromkeys([*cfg.upstreams, *([cfg.upstream_url] if cfg.upstream_url else [])]))
    if not urls:
        raise ValueError("serve.backend is upstream but neither serve.upstreams nor serve.upstream_url is set "
                         "(e.g. upstreams: [http://host:8000/v1])")
    return UpstreamBackend(cfg, urls, api_key=os.environ.get(UPSTREAM_KEY_ENV))


@dataclass(eq=False)
class Upstream:
    """One upstream server: its base URL (with /v1), HTTP client, requests in flight and last known health."""

    base_url: str
    client: Any = None
    inflight: int = 0
    healthy: bool = False
    last_error: str = "not checked yet"


class UpstreamBackend:
    """Forward to the least busy healthy upstream, with health checks and failover; see the module docstring."""

    def __init__(self, cfg: ServeConfig, base_urls: str | list[str], api_key: str | None = None,
                 model: str | None = None) -> None:
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise ValueError("UpstreamBackend needs at least one upstream URL")
        self.cfg = cfg
        self.upstreams = [Upstream(url.rstrip("/")) for url in urls]
        self.api_key = api_key
        self.model_id = model or ""
        self.context_length: int | None = None
        self.limit = InflightLimit(cfg.max_batch * len(self.upstreams), cfg.max_queue)
        self.outcomes: Counter[str] = Counter()
        self.on_outcome: Callable[[str, str], None] | None = None  # set by the app: (upstream URL, outcome)
        self._turns = itertools.count()
        self._health_task: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        return self.upstreams[0].base_url

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        for upstream in self.upstreams:
            upstream.client = httpx.AsyncClient(
                base_url=upstream.base_url, headers=headers,
                timeout=httpx.Timeout(self.cfg.request_timeout_s, connect=10.0),
                limits=httpx.Limits(max_connections=self.cfg.max_batch + 4))
        await self.check_health()
        if not any(upstream.healthy for upstream in self.upstreams):
            raise RuntimeError("no upstream answers GET /models: " + "; ".join(
                f"{u.base_url}: {u.last_error}" for u in self.upstreams))
        self._health_task = asyncio.create_task(self._check_health_forever())

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with suppress(asyncio.CancelledError):
                await self._health_task
        for upstream in self.upstreams:
            if upstream.client is not None:
                await upstream.client.aclose()

    def ready(self) -> bool:
        return any(upstream.healthy for upstream in self.upstreams)

    def queue_depth(self) -> int:
        return self.limit.waiting

    def count_tokens(self, job: GenerationInput) -> int:
        return estimate_tokens(job)

    # --- health -------------------------------------------------------------------------------------------------

    async def check_health(self) -> None:
        """Ask every upstream for GET /models at once; the first model listed names what is served."""
        await asyncio.gather(*(self._check(upstream) for upstream in self.upstreams))

    async def _check(self, upstream: Upstream) -> None:
        try:
            response = await upstream.client.get("/models", timeout=min(5.0, self.cfg.upstream_health_s + 1.0))
            models = (response.json().get("data") or []) if response.status_code == 200 else []
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            self._mark(upstream, False, type(exc).__name__)
            return
        if response.status_code != 200 or not models:
            self._mark(upstream, False, f"GET /models answered {response.status_code}"
                                        + ("" if response.status_code != 200 else " listing no model"))
            return
        if not self.model_id:
            self.model_id = str(models[0].get("id", ""))
        self._mark(upstream, True, "")

    async def _check_health_forever(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.upstream_health_s)
            await self.check_health()

    def _mark(self, upstream: Upstream, healthy: bool, error: str) -> None:
        if healthy != upstream.healthy:
            log.warning("upstream %s is %s%s", upstream.base_url, "healthy" if healthy else "down",
                        f" ({error})" if error else "")
        upstream.healthy, upstream.last_error = healthy, error

    # --- requests -----------------------------------------------------------------------------------------------

    def pick(self, tried: set[Upstream]) -> Upstream | None:
        """The healthy, untried upstream with the fewest requests in flight (ties take turns); when every
        healthy one was tried, an untried one that is marked down (it may be back); None when all were tried."""
        turn = next(self._turns)
        order = self.upstreams[turn % len(self.upstreams):] + self.upstreams[:turn % len(self.upstreams)]
        untried = [upstream for upstream in order if upstream not in tried]
        healthy = [upstream for upstream in untried if upstream.healthy]
        candidates = healthy or untried
        return min(candidates, key=lambda upstream: upstream.inflight) if candidates else None

    async def stream(self, job: GenerationInput) -> AsyncIterator[Delta]:
        tried: set[Upstream] = set()
        async with self.limit.slot():
            while (upstream := self.pick(tried)) is not None:
                tried.add(upstream)
                streamed = False
                upstream.inflight += 1
                answer = self._deltas_from(upstream, job)
                try:
                    if job.whole:
                        answer = _replayed([delta async for delta in answer])
                    async for delta in answer:
                        streamed = True
                        if delta.finish_reason is not None:
                            self._count(upstream, "ok")  # the caller may stop reading at the last delta
                        yield delta
                    return
                except (ServeUnavailable, BackendRejected) as exc:
                    if streamed or not _worth_retrying(exc) or len(tried) == len(self.upstreams):
                        self._count(upstream, "failed_after_streaming" if streamed else "failed")
                        raise
                    self._count(upstream, "retried")
                    log.warning("upstream %s failed (%s); retrying on another", upstream.base_url, exc)
                finally:
                    upstream.inflight -= 1
                    await answer.aclose()  # the upstream's connection goes back to its pool now
        raise ServeUnavailable("no upstream is available", retry_after_s=5.0, code="upstream_unreachable")

    def _count(self, upstream: Upstream, outcome: str) -> None:
        self.outcomes[outcome] += 1
        if self.on_outcome is not None:
            self.on_outcome(upstream.base_url, outcome)

    def _payload(self, job: GenerationInput) -> tuple[str, dict[str, Any]]:
        s = job.sampling
        payload: dict[str, Any] = {"model": self.model_id, "max_tokens": s.max_new_tokens, "temperature": s.temperature,
                                   "top_p": s.top_p, "stream": True, "stream_options": {"include_usage": True}}
        if s.stop:
            payload["stop"] = s.stop
        if s.seed is not None:
            payload["seed"] = s.seed
        # penalties go upstream only when set, so a server without the extension (repetition_penalty) is not asked
        if s.frequency_penalty:
            payload["frequency_penalty"] = s.frequency_penalty
        if s.presence_penalty:
            payload["presence_penalty"] = s.presence_penalty
        if s.repetition_penalty != 1.0:
            payload["repetition_penalty"] = s.repetition_penalty
        if job.messages is not None:
            return "/chat/completions", {**payload, "messages": job.messages}
        return "/completions", {**payload, "prompt": job.prompt or ""}

    async def _deltas_from(self, upstream: Upstream, job: GenerationInput) -> AsyncIterator[Delta]:
        path, payload = self._payload(job)
        with self._transport_errors(upstream):
            async with upstream.client.stream("POST", path, json=payload) as response:
                if response.status_code != 200:
                    body = (await response.aread()).decode("utf-8", "replace")
                    _raise_for_upstream(response.status_code, body, response.headers)
                finish, usage, pieces = None, None, 0
                async for line in response.aiter_lines():
                    if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    if chunk.get("error"):
                        raise BackendRejected(502, f"upstream: {chunk['error'].get('message', 'error mid-stream')}")
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                        finish = choice.get("finish_reason") or finish
                        if text:
                            pieces += 1
                            yield Delta(text)
        usage = usage or {}
        yield Delta("", finish or "stop", int(usage.get("prompt_tokens", estimate_tokens(job))),
                    int(usage.get("completion_tokens", pieces)))

    @contextmanager
    def _transport_errors(self, upstream: Upstream) -> Iterator[None]:
        """httpx's timeouts and connection failures as ServeUnavailable (503), naming the upstream; a connection
        failure marks it down until a health check finds it again."""
        try:
            yield
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout):  # nothing was sent: as good as unreachable
                self._mark(upstream, False, type(exc).__name__)
                raise ServeUnavailable(f"the upstream {upstream.base_url} is unreachable (ConnectTimeout)",
                                       retry_after_s=5.0, code="upstream_unreachable") from None
            raise ServeUnavailable(f"the upstream {upstream.base_url} did not answer within serve.request_timeout_s",
                                   code="timeout") from None
        except httpx.TransportError as exc:
            self._mark(upstream, False, type(exc).__name__)
            raise ServeUnavailable(f"the upstream {upstream.base_url} is unreachable ({type(exc).__name__})",
                                   retry_after_s=5.0, code="upstream_unreachable") from None


async def _replayed(deltas: list[Delta]) -> AsyncIterator[Delta]:
    for delta in deltas:
        yield delta


def _worth_retrying(exc: Exception) -> bool:
    """Another upstream may answer: this one is unreachable, busy, or failed with a 5xx (502 here)."""
    if isinstance(exc, ServeUnavailable):
        return exc.code in RETRIED_CODES
    return isinstance(exc, BackendRejected) and exc.status == 502

"""What answers the API's requests: the torch engine, an upstream OpenAI-compatible server, or llama.cpp.

Use it like this::

    backend = make_backend(ServeConfig(run="runs/r1"))            # serve.backend: torch | upstream | llamacpp
    await backend.start()                                          # loads the model / reaches the upstream
    job = GenerationInput(messages=[{"role": "user", "content": "hi"}], sampling=SamplingSettings(max_new_tokens=32))
    prompt_tokens = backend.count_tokens(job)                      # before rate limits and the context check
    completion = await complete(backend, job)                      # text, finish_reason, usage
    async for delta in backend.stream(job): ...                    # pieces; the last has finish_reason and usage
    await backend.close()

Every backend raises `Overloaded` / `ServeUnavailable` (HTTP 503) when it cannot take a request now and
`BackendRejected` when an upstream refused it (its status and message are passed on). The gateway in front of any
of them keeps auth, rate limits, metrics, logs and feedback: that is how chatforge scales past one machine (many
vLLM or llama.cpp servers behind one `upstream` URL).

- `torch` (default): `TorchEngine`, dynamic batching with a KV cache (see engine.py).
- `upstream`: forwards to `serve.upstream_url` (its `/v1`, e.g. http://gpu-box:8000/v1) with httpx, streaming
  passed through chunk by chunk. The upstream's key, if it needs one, comes from $CHATFORGE_UPSTREAM_API_KEY (a
  secret stays out of config files). Prompt tokens are estimated (characters / 4) for rate limits; the upstream
  checks its own context length and its 400 is passed on. At most max_batch requests are in flight upstream and
  max_queue wait; beyond that, 503.
- `llamacpp`: llama-cpp-python on `serve.gguf` (from `chatforge export RUN --gguf`), one request at a time; the
  optional extra: `pip install llama-cpp-python`.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from chatforge.config import ServeConfig
from chatforge.models.generate import SamplingSettings, chat_prompt_ids, context_length
from chatforge.models.run import LoadedRun, load_run
from chatforge.serve.engine import Delta, Overloaded, ServeUnavailable, TorchEngine

UPSTREAM_KEY_ENV = "CHATFORGE_UPSTREAM_API_KEY"


@dataclass
class GenerationInput:
    """One request for an answer: a chat (the chat template is applied) or a raw text prompt, and its sampling."""

    sampling: SamplingSettings
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    prompt_ids: list[int] | None = None  # the torch backend fills it in count_tokens


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class BackendRejected(Exception):
    """An upstream answered with an error; `status` and `message` go back to the client (5xx become 502)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class Backend(Protocol):
    """What the app needs from any backend; see the module docstring."""

    model_id: str
    context_length: int | None

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    def ready(self) -> bool: ...
    def queue_depth(self) -> int: ...
    def count_tokens(self, job: GenerationInput) -> int: ...
    def stream(self, job: GenerationInput) -> AsyncIterator[Delta]: ...


async def complete(backend: Backend, job: GenerationInput) -> Completion:
    """The whole answer at once: `backend.stream(job)` joined."""
    return await collect(backend.stream(job))


async def collect(deltas: AsyncIterator[Delta]) -> Completion:
    """Join a stream of deltas into one Completion."""
    pieces: list[str] = []
    async for delta in deltas:
        pieces.append(delta.text)
        if delta.finish_reason is not None:
            return Completion("".join(pieces), delta.finish_reason, delta.prompt_tokens, delta.completion_tokens)
    raise ServeUnavailable("the answer ended without a finish reason", code="incomplete")


def make_backend(cfg: ServeConfig) -> Backend:
    """The backend `cfg.backend` names, configured from `cfg` (nothing is loaded until `start`)."""
    if cfg.backend == "torch":
        if not cfg.run:
            raise ValueError("serve.run is not set: name the run dir (or base model) to serve")
        return TorchBackend(cfg, run=cfg.run)
    if cfg.backend == "upstream":
        if not cfg.upstream_url:
            raise ValueError("serve.backend is upstream but serve.upstream_url is not set (e.g. http://host:8000/v1)")
        return UpstreamBackend(cfg, cfg.upstream_url, api_key=os.environ.get(UPSTREAM_KEY_ENV))
    if not cfg.gguf:
        raise ValueError("serve.backend is llamacpp but serve.gguf is not set (make one with chatforge export --gguf)")
    return LlamaCppBackend(cfg, cfg.gguf)


class TorchBackend:
    """The in-process engine on `cfg.device` (auto: the first CUDA GPU when there is one, in bf16; else the CPU, fp32).

    Pass `loaded` to serve a model already in memory (tests share one this way).
    """

    def __init__(self, cfg: ServeConfig, run: str | Path | None = None, loaded: LoadedRun | None = None,
                 model_id: str | None = None) -> None:
        if run is None and loaded is None:
            raise ValueError("TorchBackend needs a run to load or a loaded model")
        self.cfg = cfg
        self.run = run
        self.loaded = loaded
        self.model_id = model_id or _model_id_of(run, loaded)
        self.context_length: int | None = context_length(loaded) if loaded is not None else None
        self.engine: TorchEngine | None = None
        self.on_batch: Callable[[int], None] | None = None  # set by the app: called with each batch size

    async def start(self) -> None:
        if self.loaded is None:
            self.loaded = await asyncio.to_thread(load_run, self.run, device=self.cfg.device)
            self.context_length = context_length(self.loaded)
        if self.engine is None:
            self.engine = TorchEngine(self.loaded, self.cfg.max_batch, self.cfg.max_queue, self.cfg.request_timeout_s,
                                      on_batch=lambda size: self.on_batch(size) if self.on_batch else None)
            self.engine.start()

    async def close(self) -> None:
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop)
            self.engine = None

    def ready(self) -> bool:
        return self.engine is not None and self.engine.alive

    def queue_depth(self) -> int:
        return self.engine.queue_depth if self.engine is not None else 0

    def count_tokens(self, job: GenerationInput) -> int:
        assert self.loaded is not None, "start() the backend first"
        tokenizer = self.loaded.tokenizer
        if job.messages is not None:
            job.prompt_ids = chat_prompt_ids(tokenizer, job.messages)
        else:
            job.prompt_ids = list(tokenizer(job.prompt or "", add_special_tokens=True)["input_ids"])
        if not job.prompt_ids:
            raise ValueError("the prompt is empty and this tokenizer adds no start token; send some text")
        return len(job.prompt_ids)

    async def stream(self, job: GenerationInput) -> AsyncIterator[Delta]:
        if self.engine is None:
            raise ServeUnavailable("the model is not loaded yet", retry_after_s=5.0, code="not_ready")
        if job.prompt_ids is None:
            self.count_tokens(job)
        assert job.prompt_ids is not None
        async for delta in self.engine.stream(job.prompt_ids, job.sampling):
            yield delta


def _model_id_of(run: str | Path | None, loaded: LoadedRun | None) -> str:
    if loaded is not None and loaded.run_dir is not None:
        return loaded.run_dir.name
    if run is not None:
        return Path(str(run)).name or str(run)
    return "chatforge"


class InflightLimit:
    """At most `running` requests at once and `waiting` queued behind them; past that, Overloaded."""

    def __init__(self, running: int, waiting: int) -> None:
        self.semaphore = asyncio.Semaphore(running)
        self.max_waiting = waiting
        self.waiting = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.semaphore.locked() and self.waiting >= self.max_waiting:
            raise Overloaded(f"{self.waiting} requests are already waiting (serve.max_queue); retry later")
        self.waiting += 1
        try:
            await self.semaphore.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self.semaphore.release()


def estimate_tokens(job: GenerationInput) -> int:
    """A tokenizer-free guess (4 characters a token, 4 tokens of template per message) for rate limits."""
    if job.messages is not None:
        return sum(math.ceil(len(m["content"]) / 4) + 4 for m in job.messages)
    return math.ceil(len(job.prompt or "") / 4) + 1


class UpstreamBackend:
    """Forward to an OpenAI-compatible server; see the module docstring."""

    def __init__(self, cfg: ServeConfig, base_url: str, api_key: str | None = None, model: str | None = None) -> None:
        self.cfg = cfg
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.model_id = model or ""
        self.context_length: int | None = None
        self.client: Any = None
        self.limit = InflightLimit(cfg.max_batch, cfg.max_queue)
        self._reachable = False

    async def start(self) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.client = httpx.AsyncClient(base_url=self.base_url, headers=headers,
                                        timeout=httpx.Timeout(self.cfg.request_timeout_s, connect=10.0),
                                        limits=httpx.Limits(max_connections=self.cfg.max_batch + 4))
        if not self.model_id:
            response = await self.client.get("/models")
            if response.status_code != 200:
                raise RuntimeError(f"{self.base_url}/models answered {response.status_code}: {response.text[:200]}")
            models = response.json().get("data") or []
            if not models:
                raise RuntimeError(f"{self.base_url}/models lists no model")
            self.model_id = str(models[0]["id"])
        self._reachable = True

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    def ready(self) -> bool:
        return self._reachable

    def queue_depth(self) -> int:
        return self.limit.waiting

    def count_tokens(self, job: GenerationInput) -> int:
        return estimate_tokens(job)

    def _payload(self, job: GenerationInput) -> tuple[str, dict[str, Any]]:
        s = job.sampling
        payload: dict[str, Any] = {"model": self.model_id, "max_tokens": s.max_new_tokens, "temperature": s.temperature,
                                   "top_p": s.top_p, "stream": True, "stream_options": {"include_usage": True}}
        if s.stop:
            payload["stop"] = s.stop
        if s.seed is not None:
            payload["seed"] = s.seed
        if job.messages is not None:
            return "/chat/completions", {**payload, "messages": job.messages}
        return "/completions", {**payload, "prompt": job.prompt or ""}

    async def stream(self, job: GenerationInput) -> AsyncIterator[Delta]:
        path, payload = self._payload(job)
        async with self.limit.slot():
            with self._transport_errors():
                async with self.client.stream("POST", path, json=payload) as response:
                    if response.status_code != 200:
                        body = (await response.aread()).decode("utf-8", "replace")
                        _raise_for_upstream(response.status_code, body, response.headers)
                    self._reachable = True
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
    def _transport_errors(self) -> Iterator[None]:
        """httpx's timeouts and connection failures as ServeUnavailable (503), naming the upstream."""
        import httpx

        try:
            yield
        except httpx.TimeoutException:
            raise ServeUnavailable(f"the upstream {self.base_url} did not answer within serve.request_timeout_s",
                                   code="timeout") from None
        except httpx.TransportError as exc:
            self._reachable = False
            raise ServeUnavailable(f"the upstream {self.base_url} is unreachable ({type(exc).__name__})",
                                   retry_after_s=5.0, code="upstream_unreachable") from None


def _raise_for_upstream(status: int, body: str, headers: Any) -> None:
    try:
        error = json.loads(body)["error"]
        message, code = str(error["message"]), error.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        message, code = body[:300] or f"HTTP {status}", None
    if status in (429, 503):
        retry_after = headers.get("retry-after", "1")
        retry_after_s = float(retry_after) if retry_after.replace(".", "", 1).isdigit() else 1.0
        raise ServeUnavailable(f"upstream busy: {message}", retry_after_s, "upstream_busy")
    if status in (401, 403):  # the gateway's own key was refused: a configuration problem, not the client's
        raise BackendRejected(502, f"the upstream refused the gateway's key (HTTP {status}); check {UPSTREAM_KEY_ENV}")
    raise BackendRejected(status if status < 500 else 502, f"upstream: {message}", code)


class LlamaCppBackend:
    """llama-cpp-python on a GGUF file, one request at a time (llama.cpp's context is not shared)."""

    def __init__(self, cfg: ServeConfig, gguf: str | Path, model_id: str | None = None) -> None:
        self.cfg = cfg
        self.gguf = Path(gguf)
        self.model_id = model_id or self.gguf.stem
        self.context_length: int | None = None
        self.llm: Any = None
        self.limit = InflightLimit(1, cfg.max_queue)

    async def start(self) -> None:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise RuntimeError("serve.backend llamacpp needs llama-cpp-python: pip install llama-cpp-python "
                               "(it compiles llama.cpp, several minutes)") from None
        if not self.gguf.is_file():
            raise FileNotFoundError(f"{self.gguf}: no such GGUF file; make one with chatforge export RUN --gguf")
        self.llm = await asyncio.to_thread(Llama, model_path=str(self.gguf), n_ctx=0, verbose=False)
        self.context_length = int(self.llm.n_ctx())

    async def close(self) -> None:
        self.llm = None

    def ready(self) -> bool:
        return self.llm is not None

    def queue_depth(self) -> int:
        return self.limit.waiting

    def count_tokens(self, job: GenerationInput) -> int:
        text = "".join(m["content"] for m in job.messages) if job.messages is not None else (job.prompt or "")
        overhead = 4 * len(job.messages) if job.messages is not None else 0
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=True)) + overhead

    async def stream(self, job: GenerationInput) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()
        async with self.limit.slot():
            worker = asyncio.create_task(asyncio.to_thread(self._produce, job, loop, queue, stop))
            deadline = loop.time() + self.cfg.request_timeout_s
            try:
                while (item := await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time()))) is not None:
                    if isinstance(item, Exception):
                        raise item
                    yield item
            except TimeoutError:
                raise ServeUnavailable("no answer within serve.request_timeout_s", code="timeout") from None
            finally:
                stop.set()
                await asyncio.shield(worker)

    def _produce(self, job: GenerationInput, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any],
                 stop: threading.Event) -> None:
        s = job.sampling
        options = dict(max_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, stop=s.stop or None,
                       seed=s.seed, stream=True)
        try:
            if job.messages is not None:
                chunks = self.llm.create_chat_completion(messages=job.messages, **options)
            else:
                chunks = self.llm.create_completion(prompt=job.prompt or "", **options)
            finish, pieces = "length", 0
            for chunk in chunks:
                if stop.is_set():
                    chunks.close()
                    break
                choice = chunk["choices"][0]
                text = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                finish = choice.get("finish_reason") or finish
                if text:
                    pieces += 1
                    loop.call_soon_threadsafe(queue.put_nowait, Delta(text))
            loop.call_soon_threadsafe(queue.put_nowait, Delta("", finish, self.count_tokens(job), pieces))
        except Exception as exc:  # surfaces in the request, which answers 500 without details
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

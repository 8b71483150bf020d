"""What answers the API's requests: the torch engine, an upstream OpenAI-compatible server, or llama.cpp.

Use it like this::

    backend = make_backend(ServeConfig(run="runs/r1"))            # serve.backend: auto | torch | llamaserver | upstream | llamacpp
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

- `auto` (default): `llamaserver` on a CPU when llama.cpp's server is built and the model converts to GGUF, else
  `torch` (see llamaserver.choose_backend; the reason is logged).
- `torch`: `TorchEngine`, dynamic batching with a KV cache (see engine.py).
- `upstream`: forwards to one or more OpenAI-compatible servers (`serve.upstreams`, or `serve.upstream_url`), least
  busy healthy one first, with health checks and failover: see upstream.py.
- `llamaserver`: llama.cpp's C++ `llama-server` started as a child on loopback (`--parallel max_batch`, continuous
  batching) on the run exported to GGUF, with the upstream backend in front; see llamaserver.py.
- `llamacpp`: llama-cpp-python on `serve.gguf`, or on `serve.run` exported to GGUF by itself (cached by the run's
  hash), one request at a time; see llamacpp.py. The optional extra: `pip install 'chatforge[llamacpp]'`.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from chatforge.config import ServeConfig
from chatforge.models.generate import SamplingSettings, chat_prompt_ids, context_length
from chatforge.models.quantize import quantize_int8
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
    whole: bool = False  # the client gets the answer in one piece, so it may be buffered or restarted elsewhere


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
    if cfg.backend == "auto":
        from chatforge.serve.llamaserver import choose_backend  # llamaserver.py builds on this module

        cfg = choose_backend(cfg)
    if cfg.backend == "torch":
        if not cfg.run:
            raise ValueError("serve.run is not set: name the run dir (or base model) to serve")
        return TorchBackend(cfg, run=cfg.run)
    if cfg.backend == "upstream":
        from chatforge.serve.upstream import upstream_backend  # upstream.py builds on this module

        return upstream_backend(cfg)
    if cfg.backend == "llamaserver":
        from chatforge.serve.llamaserver import LlamaServerBackend  # builds on upstream.py, which imports this module

        return LlamaServerBackend(cfg)
    from chatforge.serve.llamacpp import LlamaCppBackend  # here, not at the top: llamacpp.py imports this module

    return LlamaCppBackend(cfg)


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
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        if self.loaded is None:
            self.loaded = await asyncio.to_thread(load_run, self.run, device=self.cfg.device)
            self.context_length = context_length(self.loaded)
            if self.cfg.quantize == "int8":
                self.loaded = await asyncio.to_thread(quantize_int8, self.loaded)
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

"""The `llamacpp` backend: llama-cpp-python in-process on a GGUF, made from the run on the fly when needed.

Use it like this::

    backend = LlamaCppBackend(ServeConfig(backend="llamacpp", run="runs/r1"))   # exports RUN to GGUF (cached)
    backend = LlamaCppBackend(ServeConfig(backend="llamacpp", gguf="r1.gguf"))  # or serves a GGUF as it is
    await backend.start()
    async for delta in backend.stream(job): ...

`chatforge serve RUN --backend llamacpp` finds its GGUF with `chatforge.models.export.gguf_to_serve` (as the
`llamaserver` backend does: `serve.gguf`, a packaged model's GGUF, or the run exported with llama.cpp's
converter, `serve.gguf_quant`, q8_0 by default) under ~/.cache/chatforge/gguf/, keyed by the hash of the run's weights and tokenizer, so the
second start serves at once and a retrained run gets a new file. llama.cpp's context is not shared between
requests, so this backend answers one request at a time (`InflightLimit(1, max_queue)`); for continuous batching
put the gateway in front of llama.cpp's own `llama-server --parallel N` (`serve.backend: upstream`, see
`chatforge.models.llamacpp_build`). The extra: `pip install 'chatforge[llamacpp]'` (compiles llama.cpp, ~8 min
the first time; pip keeps the wheel in its cache).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from chatforge.config import ServeConfig
from chatforge.models.export import gguf_to_serve
from chatforge.serve.backends import GenerationInput, InflightLimit
from chatforge.serve.engine import Delta, ServeUnavailable


class LlamaCppBackend:
    """llama-cpp-python on `cfg.gguf`, or on the run `cfg.run` exported to GGUF; see the module docstring."""

    def __init__(self, cfg: ServeConfig, gguf: str | Path | None = None, model_id: str | None = None) -> None:
        gguf = gguf or cfg.gguf
        if gguf is None and not cfg.run:
            raise ValueError("serve.backend is llamacpp but neither serve.gguf nor serve.run is set")
        self.cfg = cfg
        self.gguf = Path(gguf) if gguf is not None else None
        self.model_id = model_id or (self.gguf.stem if self.gguf is not None else Path(str(cfg.run)).name)
        self.context_length: int | None = None
        self.llm: Any = None
        self.limit = InflightLimit(1, cfg.max_queue)

    async def start(self) -> None:
        try:  # the optional llamacpp extra: imported only when this backend starts
            from llama_cpp import Llama
        except ImportError:
            raise RuntimeError("serve.backend llamacpp needs llama-cpp-python: pip install 'chatforge[llamacpp]' "
                               "(it compiles llama.cpp, ~8 minutes the first time)") from None
        self.gguf = await asyncio.to_thread(gguf_to_serve, self.cfg.run, str(self.gguf) if self.gguf else None,
                                            self.cfg.gguf_quant)
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
        options = dict(max_tokens=s.max_new_tokens, temperature=0.0 if s.greedy else s.temperature, top_p=s.top_p,
                       stop=s.stop or None, seed=s.seed, stream=True, frequency_penalty=s.frequency_penalty,
                       presence_penalty=s.presence_penalty, repeat_penalty=s.repetition_penalty)
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

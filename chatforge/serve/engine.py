"""The torch serving engine: one thread owns the model and decodes waiting requests together, a batch at a time.

Use it like this (inside a running asyncio loop)::

    engine = TorchEngine(load_run("runs/r1"), max_batch=8, max_queue=64, request_timeout_s=120)
    engine.start()
    async for delta in engine.stream(prompt_ids, SamplingSettings(max_new_tokens=64, temperature=0.7)):
        print(delta.text, end="")          # the last delta carries finish_reason "stop" or "length" and the usage
    engine.stop()

Requests wait in a bounded queue: when `max_queue` are already waiting, `stream` raises `Overloaded` (the API answers
503 with Retry-After) instead of holding more memory. The engine thread takes up to `max_batch` waiting requests
(after a few milliseconds, so requests that arrive together decode together), builds one `DecodeBatch` and steps
it, handing every new piece of text to its request's asyncio queue through `loop.call_soon_threadsafe`. Requests
that arrive while a batch decodes start with the next batch: `DecodeBatch` cannot take rows mid-flight, and a batch
lasts one answer (rows that finish early leave the cache, so the batch only shrinks).

A request that passes `request_timeout_s` (waiting or decoding) ends with `ServeUnavailable` on the asyncio side,
even while the engine is stuck in a long step; it, or one whose consumer stops iterating (the HTTP client went
away), is cancelled: dropped from the queue at once, or from its batch (`DecodeBatch.cancel`) at the next step.

Text is handed out incrementally: all generated tokens are decoded and the new suffix is emitted, except a trailing
U+FFFD (half of a multi-byte character) and a trailing piece that could be the start of a stop string; both follow
once they are settled, so the pieces always add up to the final answer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from chatforge.models.generate import DecodeBatch, Generation, SamplingSettings
from chatforge.models.run import LoadedRun

logger = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"


class ServeUnavailable(Exception):
    """The request cannot be served now (timed out, shutting down, upstream down): HTTP 503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: float = 1.0, code: str = "unavailable") -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.code = code


class Overloaded(ServeUnavailable):
    """The waiting queue is full: HTTP 503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message, retry_after_s, code="overloaded")


class EngineFailure(Exception):
    """Decoding itself failed (a bug or a broken model): HTTP 500, details only in the server log."""


@dataclass
class Delta:
    """A piece of an answer. The last one of a request has finish_reason ("stop" | "length") and the usage."""

    text: str
    finish_reason: str | None = None  # also "shutdown" / "error" between the engine thread and `stream`
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class EngineStats:
    """Counters since start (written by the engine thread, read by anyone)."""

    batches: int = 0
    rows: int = 0
    largest_batch: int = 0
    completed: int = 0
    cancelled: int = 0
    timed_out: int = 0
    tokens_out: int = 0


@dataclass
class EngineRequest:
    """One submitted request: what to decode, where its deltas go, and whether it is still wanted."""

    prompt_ids: list[int]
    settings: SamplingSettings
    loop: asyncio.AbstractEventLoop
    deadline: float
    events: asyncio.Queue[Delta] = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    finished: bool = False


class IncrementalText:
    """The text of a growing token list, handed out in pieces that are safe to show (see the module docstring)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.emitted_chars = 0

    def update(self, token_ids: Sequence[int]) -> str:
        """The new settled text after `token_ids` (all generated so far) or "" when nothing new is settled."""
        text = self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
        settled = len(text.rstrip(REPLACEMENT_CHAR)) if text.endswith(REPLACEMENT_CHAR) else len(text)
        settled -= self._stop_prefix_length(text[:settled])
        return self._take(text, settled)

    def finish(self, final_text: str) -> str:
        """Whatever of the final (stop-string-cut) answer has not been handed out yet."""
        return self._take(final_text, len(final_text))

    def _take(self, text: str, end: int) -> str:
        if end <= self.emitted_chars:
            return ""
        piece = text[self.emitted_chars:end]
        self.emitted_chars = end
        return piece

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the end of `text` that is, or may yet become, a stop string (from its first whole stop on)."""
        whole = [text.find(stop) for stop in self.stop if stop in text]
        if whole:
            return len(text) - min(whole)
        longest = 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest


class TorchEngine:
    """Dynamic batching over `DecodeBatch` in one background thread; see the module docstring."""

    def __init__(
        self,
        loaded: LoadedRun,
        max_batch: int = 8,
        max_queue: int = 64,
        request_timeout_s: float = 120.0,
        batch_wait_s: float = 0.005,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch={max_batch} and max_queue={max_queue} must both be >= 1")
        self.loaded = loaded
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self.batch_wait_s = batch_wait_s
        self.on_batch = on_batch
        self.stats = EngineStats()
        self._waiting: deque[EngineRequest] = deque()
        self._condition = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._batch_seconds = 1.0  # moving average of a batch's duration: what Retry-After suggests
        self._outbox: list[tuple[EngineRequest, Delta]] = []  # deliveries of this step (engine thread only)

    # --- the asyncio side -------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="chatforge-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the thread; requests waiting or decoding end with ServeUnavailable."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def submit(self, prompt_ids: Sequence[int], settings: SamplingSettings) -> EngineRequest:
        """Queue a request (call from the event loop that will read its deltas); Overloaded when the queue is full."""
        request = EngineRequest(list(prompt_ids), settings, asyncio.get_running_loop(),
                                time.monotonic() + self.request_timeout_s)
        with self._condition:
            if self._stopping:
                raise ServeUnavailable("the server is shutting down", retry_after_s=5.0, code="shutting_down")
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(f"{len(self._waiting)} requests are already waiting (serve.max_queue); retry later",
                                 retry_after_s=self._retry_after())
            self._waiting.append(request)
            self._condition.notify()
        return request

    def cancel(self, request: EngineRequest) -> None:
        """Give up on `request`: dropped from the queue now, or from its batch at the next step."""
        request.cancelled = True
        with self._condition:
            if request in self._waiting:
                self._waiting.remove(request)
                request.finished = True
                self.stats.cancelled += 1

    async def stream(self, prompt_ids: Sequence[int], settings: SamplingSettings) -> AsyncIterator[Delta]:
        """Submit and yield the request's deltas; leaving the loop early (or being cancelled) cancels the request."""
        request = self.submit(prompt_ids, settings)
        try:
            while True:
                try:
                    delta = await asyncio.wait_for(request.events.get(), max(0.0, request.deadline - time.monotonic()))
                except TimeoutError:
                    self.stats.timed_out += 1
                    raise ServeUnavailable(f"no answer within serve.request_timeout_s={self.request_timeout_s:g} s",
                                           retry_after_s=self._retry_after(), code="timeout") from None
                if delta.finish_reason == "shutdown":
                    raise ServeUnavailable("the server is shutting down", retry_after_s=5.0, code="shutting_down")
                if delta.finish_reason == "error":
                    raise EngineFailure("decoding failed; see the server log")
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            if not request.finished:
                self.cancel(request)

    def _retry_after(self) -> float:
        return float(min(30, max(1, math.ceil(self._batch_seconds * (1 + len(self._waiting) // self.max_batch)))))

    # --- the engine thread ------------------------------------------------------------------------------------
    def _deliver(self, request: EngineRequest, delta: Delta) -> None:
        """Queue `delta` for its request; `_flush` hands them over, one event-loop wake-up per step, not per row."""
        if delta.finish_reason is not None:
            request.finished = True
        self._outbox.append((request, delta))

    def _flush(self) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[EngineRequest, Delta]]] = defaultdict(list)
        for request, delta in self._outbox:
            by_loop[request.loop].append((request, delta))
        self._outbox = []
        for loop, deliveries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, deliveries)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                pass

    def _run(self) -> None:
        while True:
            requests = self._take_batch()
            if requests is None:
                return
            if requests:
                started = time.monotonic()
                self._decode(requests)
                self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.monotonic() - started)

    def _take_batch(self) -> list[EngineRequest] | None:
        """Up to max_batch waiting requests ([] if all were cancelled meanwhile), or None when stopping."""
        with self._condition:
            while not self._waiting and not self._stopping:
                self._condition.wait()
            if self._stopping:
                self._end_waiting("shutdown")
                self._flush()
                return None
            short = len(self._waiting) < self.max_batch
        if short and self.batch_wait_s > 0:
            time.sleep(self.batch_wait_s)  # requests sent together arrive a few hundred microseconds apart
        with self._condition:  # cancelled requests were removed from the queue by `cancel`
            return [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]

    def _end_waiting(self, reason: str) -> None:
        while self._waiting:
            self._deliver(self._waiting.popleft(), Delta("", reason))

    def _decode(self, requests: list[EngineRequest]) -> None:
        self.stats.batches += 1
        self.stats.rows += len(requests)
        self.stats.largest_batch = max(self.stats.largest_batch, len(requests))
        if self.on_batch is not None:
            self.on_batch(len(requests))
        open_rows = set(range(len(requests)))
        try:
            batch = DecodeBatch(self.loaded, [r.prompt_ids for r in requests], [r.settings for r in requests])
            texts = [IncrementalText(self.loaded.tokenizer, r.settings.stop) for r in requests]
            while open_rows:
                self._drop_abandoned_rows(batch, requests, open_rows)
                if batch.done:
                    break
                finished_now = []
                for row, _token_id in batch.step():
                    if batch.finish_reasons[row] is None:
                        piece = texts[row].update(batch.generated[row])
                        if piece:
                            self._deliver(requests[row], Delta(piece))
                    else:
                        finished_now.append(row)
                if finished_now:
                    self._finish_rows(batch.results(), finished_now, requests, texts, open_rows)
                if self._stopping:
                    for row in list(open_rows):
                        self._close_row(batch, requests, open_rows, row, "shutdown")
                self._flush()
        except Exception:
            logger.exception("decoding a batch of %d requests failed", len(requests))
            for row in open_rows:
                self._deliver(requests[row], Delta("", "error"))
        finally:
            self._flush()

    def _drop_abandoned_rows(self, batch: DecodeBatch, requests: list[EngineRequest], open_rows: set[int]) -> None:
        for row in [row for row in open_rows if requests[row].cancelled]:
            self._close_row(batch, requests, open_rows, row, None)
            self.stats.cancelled += 1

    def _close_row(self, batch: DecodeBatch, requests: list[EngineRequest], open_rows: set[int], row: int,
                   reason: str | None) -> None:
        batch.cancel(row)
        open_rows.discard(row)
        requests[row].finished = True
        if reason is not None:
            self._deliver(requests[row], Delta("", reason))

    def _finish_rows(self, results: list[Generation], rows: list[int], requests: list[EngineRequest],
                     texts: list[IncrementalText], open_rows: set[int]) -> None:
        for row in rows:
            generation = results[row]
            open_rows.discard(row)
            self.stats.completed += 1
            self.stats.tokens_out += len(generation.token_ids)
            self._deliver(requests[row], Delta(texts[row].finish(generation.text), generation.finish_reason,
                                               generation.prompt_tokens, len(generation.token_ids)))


def _put_all(deliveries: list[tuple[EngineRequest, Delta]]) -> None:
    for request, delta in deliveries:
        request.events.put_nowait(delta)

"""The torch serving engine: one thread owns the model and decodes every running request together, with
continuous batching.

Use it like this (inside a running asyncio loop)::

    engine = TorchEngine(load_run("runs/r1"), max_batch=8, max_queue=64, request_timeout_s=120)
    engine.start()
    async for delta in engine.stream(prompt_ids, SamplingSettings(max_new_tokens=64, temperature=0.7)):
        print(delta.text, end="")          # the last delta carries finish_reason "stop" or "length" and the usage
    engine.stop()

Requests wait in a bounded queue: when `max_queue` are already waiting, `stream` raises `Overloaded` (the API answers
503 with Retry-After) instead of holding more memory. Between two decode steps the engine thread moves waiting
requests into the running `DecodeBatch` (up to `max_batch` rows): they are prefilled and decode with the others
from the next step on, so a request's first token waits for one prefill and one step, not for the batch in flight;
a row that finishes leaves at once and its place is free for the next request. When nothing runs, the thread waits
a few milliseconds after the first request so that requests sent together prefill together. Every new piece of
text goes to its request's asyncio queue through `loop.call_soon_threadsafe`, one wake-up per step.

One bad request never fails another: a prefill that fails is retried request by request and only the culprit
ends with an error (HTTP 500); a row whose sampling fails ends alone (`DecodeBatch`); only a failed forward pass
of the whole batch fails the rows in it (they share that computation), and the engine goes on with a fresh batch.

A request that passes `request_timeout_s` (waiting or decoding) ends with `ServeUnavailable` on the asyncio side,
even while the engine is stuck in a long step; it, or one whose consumer stops iterating (the HTTP client went
away), is cancelled: dropped from the queue at once, or from the batch (`DecodeBatch.cancel`) before the next step.

Text is handed out as `DecodeBatch` settles it (incremental detokenisation: no half characters), except a trailing
piece that could be the start of a stop string, which follows once it is settled, so the pieces always add up to
the final answer.
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

from chatforge.models.generate import DecodeBatch, SamplingSettings
from chatforge.models.run import LoadedRun

logger = logging.getLogger(__name__)

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


def stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the start of a stop string (to hold back until it is settled);
    looks at the last characters only, so it costs the same however long the answer is."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest


@dataclass
class LiveRow:
    """A request decoding in the running batch, and how much of its text has been handed out."""

    request: EngineRequest
    shown_chars: int = 0


class TorchEngine:
    """Continuous batching over one `DecodeBatch` in a background thread; see the module docstring."""

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
        self._step_seconds = 0.1  # moving average of a decode step's duration: what Retry-After is estimated from
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
        """Seconds until a place is likely free: an average answer's steps, once per full batch waiting ahead."""
        answer_tokens = self.stats.tokens_out / self.stats.completed if self.stats.completed else 32
        batches_ahead = 1 + len(self._waiting) // self.max_batch
        return float(min(30, max(1, math.ceil(self._step_seconds * answer_tokens * batches_ahead))))

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
        batch = DecodeBatch(self.loaded)
        live: dict[int, LiveRow] = {}
        while True:
            joining = self._admit(len(live))
            if joining is None:
                for row in list(live):
                    batch.cancel(row, "shutdown")
                    self._deliver(live.pop(row).request, Delta("", "shutdown"))
                self._flush()
                return
            if joining:
                self._join(batch, joining, live)
            self._drop_abandoned_rows(batch, live)
            if not batch.done:
                started = time.monotonic()
                batch = self._step(batch, live)
                self._step_seconds = 0.9 * self._step_seconds + 0.1 * (time.monotonic() - started)
            self._flush()

    def _admit(self, running: int) -> list[EngineRequest] | None:
        """Waiting requests that join the running batch now ([] if none or no room), or None when stopping.
        With nothing running it blocks until a request comes (and waits a few ms for the ones sent with it)."""
        with self._condition:
            while not running and not self._waiting and not self._stopping:
                self._condition.wait()
            if self._stopping:
                self._end_waiting("shutdown")
                return None
            if not self._waiting or running >= self.max_batch:
                return []
            gather = not running and len(self._waiting) < self.max_batch
        if gather and self.batch_wait_s > 0:
            time.sleep(self.batch_wait_s)  # requests sent together arrive a few hundred microseconds apart
        with self._condition:  # cancelled requests were removed from the queue by `cancel`
            return [self._waiting.popleft() for _ in range(min(self.max_batch - running, len(self._waiting)))]

    def _end_waiting(self, reason: str) -> None:
        while self._waiting:
            self._deliver(self._waiting.popleft(), Delta("", reason))

    def _join(self, batch: DecodeBatch, requests: list[EngineRequest], live: dict[int, LiveRow]) -> None:
        """Prefill `requests` into the running batch; if that fails, one by one, so only a culprit fails."""
        self.stats.batches += 1
        self.stats.rows += len(requests)
        try:
            rows = batch.add([r.prompt_ids for r in requests], [r.settings for r in requests])
            live.update((row, LiveRow(request)) for row, request in zip(rows, requests))
        except Exception:
            logger.exception("prefilling %d requests failed; trying them one by one", len(requests))
            for request in requests:
                try:
                    live[batch.add([request.prompt_ids], [request.settings])[0]] = LiveRow(request)
                except Exception:
                    logger.exception("prefilling a request of %d prompt tokens failed", len(request.prompt_ids))
                    self._deliver(request, Delta("", "error"))
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch.active))
        if self.on_batch is not None:
            self.on_batch(len(batch.active))

    def _step(self, batch: DecodeBatch, live: dict[int, LiveRow]) -> DecodeBatch:
        """One decode step of the running batch; hands out the new text and ends the rows that finished.
        Returns the batch to go on with (a fresh one if this one's forward pass failed)."""
        try:
            emitted = batch.step()
        except Exception:
            logger.exception("a decode step of %d requests failed", len(batch.active))
            for row in batch.fail_all():
                self._deliver(live.pop(row).request, Delta("", "error"))
            return DecodeBatch(self.loaded)
        for row, _token_id, _piece in emitted:
            if batch.finish_reason(row) is None:
                self._show_settled_text(batch, row, live[row])
            else:
                self._finish_row(batch, row, live.pop(row))
        return batch

    def _show_settled_text(self, batch: DecodeBatch, row: int, state: LiveRow) -> None:
        text = batch.text_so_far(row)
        if len(text) > state.shown_chars:
            stops = [s for s in state.request.settings.stop if s]
            settled = len(text) - stop_prefix_length(text[-max(map(len, stops), default=1):], stops)
            if settled > state.shown_chars:
                self._deliver(state.request, Delta(text[state.shown_chars:settled]))
                state.shown_chars = settled

    def _finish_row(self, batch: DecodeBatch, row: int, state: LiveRow) -> None:
        generation = batch.release(row)
        if generation.finish_reason == "error":
            self._deliver(state.request, Delta("", "error"))
            return
        self.stats.completed += 1
        self.stats.tokens_out += len(generation.token_ids)
        self._deliver(state.request, Delta(generation.text[state.shown_chars:], generation.finish_reason,
                                           generation.prompt_tokens, len(generation.token_ids)))

    def _drop_abandoned_rows(self, batch: DecodeBatch, live: dict[int, LiveRow]) -> None:
        for row in [row for row, state in live.items() if state.request.cancelled]:
            batch.cancel(row)
            batch.release(row)
            live.pop(row).request.finished = True
            self.stats.cancelled += 1


def _put_all(deliveries: list[tuple[EngineRequest, Delta]]) -> None:
    for request, delta in deliveries:
        request.events.put_nowait(delta)

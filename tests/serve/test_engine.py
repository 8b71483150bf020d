"""The torch engine: requests sent together decode in one batch with the answers they get alone, text comes out in
settled pieces (no half characters, no half stop strings), and timeouts, cancels and shutdown free the engine."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from chatforge.models.generate import SamplingSettings, chat_prompt_ids, generate_batch
from chatforge.models.run import LoadedRun
from chatforge.models.detokenize import TextDecoder
from chatforge.serve.engine import Delta, EngineFailure, ServeUnavailable, TorchEngine, stop_prefix_length
from tests.serve.conftest import gated

QUESTIONS = ["How do I reset my password?", "Do you ship internationally?", "hi", "Tell me a short joke."]


def prompt_of(loaded: LoadedRun, question: str) -> list[int]:
    return chat_prompt_ids(loaded.tokenizer, [{"role": "user", "content": question}])


async def collect(deltas: AsyncIterator[Delta]) -> tuple[list[str], Delta]:
    pieces = []
    async for delta in deltas:
        pieces.append(delta.text)
        if delta.finish_reason is not None:
            return pieces, delta
    raise AssertionError("the stream ended without a finish reason")


def run_with_engine(engine: TorchEngine, scenario: Callable[[TorchEngine], Any]) -> Any:
    engine.start()
    try:
        return asyncio.run(scenario(engine))
    finally:
        engine.stop()


def test_requests_sent_together_decode_in_one_batch_with_their_solo_answers(served_model: LoadedRun) -> None:
    batch_sizes: list[int] = []
    engine = TorchEngine(served_model, max_batch=8, max_queue=8, on_batch=batch_sizes.append)
    settings = SamplingSettings(max_new_tokens=10)  # greedy: the same tokens batched or alone
    prompts = [prompt_of(served_model, q) for q in QUESTIONS]

    async def scenario(engine: TorchEngine) -> list[tuple[list[str], Delta]]:
        return await asyncio.gather(*(collect(engine.stream(p, settings)) for p in prompts))

    outcomes = run_with_engine(engine, scenario)
    assert batch_sizes == [len(QUESTIONS)] and engine.stats.largest_batch == len(QUESTIONS)
    for prompt, (pieces, last) in zip(prompts, outcomes):
        alone = generate_batch(served_model, [prompt], settings)[0]
        assert "".join(pieces) == alone.text
        assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == (
            alone.finish_reason, len(prompt), len(alone.token_ids))
    assert engine.stats.completed == len(QUESTIONS) and engine.stats.tokens_out == sum(
        o[1].completion_tokens for o in outcomes)


def test_text_decoder_holds_back_half_characters(served_model: LoadedRun) -> None:
    tokenizer = served_model.tokenizer
    text = "Café au lait ☕ costs 3 € 😀 today"
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    assert "\ufffd" in "".join(tokenizer.decode([t]) for t in token_ids)  # some tokens hold half a character
    decoder = TextDecoder(tokenizer)
    pieces = [decoder.push(token_id) for token_id in token_ids]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + decoder.flush() == text == decoder.text


def test_the_start_of_a_stop_string_is_held_back() -> None:
    assert stop_prefix_length("Sure thing. Us", ["User:"]) == 2
    assert stop_prefix_length("Sure thing. User", ["User:", "r"]) == 4
    assert stop_prefix_length("Sure thing.", ["User:"]) == 0


def test_streamed_pieces_never_show_text_a_stop_string_cuts(served_model: LoadedRun) -> None:
    engine = TorchEngine(served_model, max_batch=2, max_queue=2)
    prompt = prompt_of(served_model, QUESTIONS[0])
    free = generate_batch(served_model, [prompt], SamplingSettings(max_new_tokens=12))[0]
    assert len(free.text) >= 4, "the tiny run should answer a few characters to cut"
    stop = free.text[-3:]
    expected = free.text[: free.text.find(stop)]

    async def scenario(engine: TorchEngine) -> tuple[list[str], Delta]:
        return await collect(engine.stream(prompt, SamplingSettings(max_new_tokens=12, stop=[stop])))

    pieces, last = run_with_engine(engine, scenario)
    assert "".join(pieces) == expected and last.finish_reason == "stop"  # nothing shown was taken back


def test_a_request_past_its_timeout_gets_503_and_leaves_the_queue(served_model: LoadedRun) -> None:
    gate = threading.Event()
    engine = TorchEngine(gated(served_model, gate), max_batch=1, max_queue=4, request_timeout_s=0.3)

    async def scenario(engine: TorchEngine) -> None:
        prompt = prompt_of(served_model, "hi")
        stuck, waiting = engine.stream(prompt, SamplingSettings(max_new_tokens=3)), engine.stream(
            prompt, SamplingSettings(max_new_tokens=3))
        for deltas in (stuck, waiting):  # one is stuck in its first step, one waits behind it
            with pytest.raises(ServeUnavailable) as caught:
                await anext(deltas)
            assert caught.value.code == "timeout" and caught.value.retry_after_s >= 1
        assert engine.queue_depth == 0 and engine.stats.timed_out == 2
        gate.set()

    try:
        run_with_engine(engine, scenario)
    finally:
        gate.set()


def test_a_cancelled_waiting_request_leaves_the_queue_at_once(served_model: LoadedRun) -> None:
    gate = threading.Event()
    engine = TorchEngine(gated(served_model, gate), max_batch=1, max_queue=1)

    async def scenario(engine: TorchEngine) -> None:
        prompt = prompt_of(served_model, "hi")
        first = engine.submit(prompt, SamplingSettings(max_new_tokens=2))
        while engine.stats.batches == 0:
            await asyncio.sleep(0.005)
        second = engine.submit(prompt, SamplingSettings(max_new_tokens=2))
        assert engine.queue_depth == 1
        engine.cancel(second)
        assert engine.queue_depth == 0 and engine.stats.cancelled == 1
        engine.submit(prompt, SamplingSettings(max_new_tokens=2))  # the freed slot takes a new request
        gate.set()
        while not first.finished:
            await asyncio.sleep(0.005)

    try:
        run_with_engine(engine, scenario)
    finally:
        gate.set()


def test_stopping_the_engine_ends_waiting_requests_with_503(served_model: LoadedRun) -> None:
    engine = TorchEngine(served_model, max_batch=1, max_queue=4)

    async def scenario(engine: TorchEngine) -> None:
        engine.stop()
        with pytest.raises(ServeUnavailable) as caught:
            await anext(engine.stream(prompt_of(served_model, "hi"), SamplingSettings(max_new_tokens=2)))
        assert caught.value.code == "shutting_down"

    run_with_engine(engine, scenario)


def test_a_request_arriving_mid_batch_gets_its_first_token_before_the_batch_in_flight_finishes(
        served_model: LoadedRun) -> None:
    gate = threading.Event()
    gate.set()
    slow = gated(served_model, gate, delay_s=0.02, stop_tokens=False)  # every step takes >= 20 ms
    engine = TorchEngine(slow, max_batch=4, max_queue=4)
    long_settings, short_settings = SamplingSettings(max_new_tokens=40), SamplingSettings(max_new_tokens=4)
    long_prompt, short_prompt = prompt_of(served_model, QUESTIONS[0]), prompt_of(served_model, QUESTIONS[2])
    events: list[str] = []

    async def scenario(engine: TorchEngine) -> tuple[tuple[list[str], Delta], tuple[list[str], Delta]]:
        long_stream = engine.stream(long_prompt, long_settings)
        first = await anext(long_stream)  # the long request is decoding now
        long_task = asyncio.create_task(collect_after(first, long_stream, "long", events))
        short = await collect_after(None, engine.stream(short_prompt, short_settings), "short", events)
        return await long_task, short

    (long_pieces, long_last), (short_pieces, short_last) = run_with_engine(engine, scenario)
    assert events.index("short first token") < events.index("long done")
    assert events.index("short done") < events.index("long done")
    assert engine.stats.batches == 2 and engine.stats.largest_batch == 2
    for pieces, last, prompt, settings in [(long_pieces, long_last, long_prompt, long_settings),
                                           (short_pieces, short_last, short_prompt, short_settings)]:
        alone = generate_batch(slow, [prompt], settings)[0]
        assert "".join(pieces) == alone.text and last.completion_tokens == len(alone.token_ids) == settings.max_new_tokens


async def collect_after(first: Delta | None, deltas: AsyncIterator[Delta], name: str,
                        events: list[str]) -> tuple[list[str], Delta]:
    pieces = [first.text] if first is not None else []
    async for delta in deltas:
        if not pieces:
            events.append(f"{name} first token")
        pieces.append(delta.text)
        if delta.finish_reason is not None:
            events.append(f"{name} done")
            return pieces, delta
    raise AssertionError("the stream ended without a finish reason")


def test_a_request_whose_prefill_fails_fails_alone(served_model: LoadedRun) -> None:
    engine = TorchEngine(served_model, max_batch=4, max_queue=4, batch_wait_s=0.2)
    good = prompt_of(served_model, QUESTIONS[0])
    broken = good[:-1] + [len(served_model.tokenizer) + 10_000]  # no such token: the embedding lookup fails
    settings = SamplingSettings(max_new_tokens=5)

    async def scenario(engine: TorchEngine) -> list[Any]:
        return await asyncio.gather(collect(engine.stream(good, settings)), collect(engine.stream(broken, settings)),
                                    collect(engine.stream(good, SamplingSettings(max_new_tokens=5, temperature=1e-300))),
                                    return_exceptions=True)

    ok, failed, tiny_temperature = run_with_engine(engine, scenario)
    assert isinstance(failed, EngineFailure)
    alone = generate_batch(served_model, [good], settings)[0]
    assert "".join(ok[0]) == alone.text == "".join(tiny_temperature[0])

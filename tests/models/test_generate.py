"""Batched generation: greedy answers equal one-prompt-at-a-time `model.generate`, rows stop on their own stop
token, stop strings cut the text, and seeded sampling does not depend on what a row is batched with."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chatforge.models.generate import DecodeBatch, SamplingSettings, chat_prompt_ids, generate_batch
from chatforge.models.run import LoadedRun, load_run

QUESTIONS = ["My router light is red.", "Refund please", "How do I reset the password of my account today?",
             "hi", "The modem keeps dropping the line every evening after six; what now?"]


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> LoadedRun:
    torch.manual_seed(0)
    return load_run(tiny_model_dir)


def prompts_of(loaded: LoadedRun) -> list[list[int]]:
    return [chat_prompt_ids(loaded.tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]


def reference_greedy(loaded: LoadedRun, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = loaded.model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=loaded.stop_token_ids, pad_token_id=0)
    tokens = out[0, len(prompt):].tolist()
    return [t for t in tokens if t not in loaded.stop_token_ids][: max_new_tokens]


def test_batched_greedy_matches_generate_one_at_a_time(base: LoadedRun) -> None:
    prompts = prompts_of(base)
    batched = generate_batch(base, prompts, SamplingSettings(max_new_tokens=12), batch_size=3)
    for prompt, answer in zip(prompts, batched):
        assert answer.token_ids == reference_greedy(base, prompt, 12)
        assert answer.prompt_tokens == len(prompt)
        assert answer.finish_reason in {"stop", "length"}


def test_a_row_that_emits_its_stop_token_finishes_while_others_go_on(base: LoadedRun) -> None:
    prompts = prompts_of(base)[:2]
    batch = DecodeBatch(base, prompts, [SamplingSettings(max_new_tokens=2), SamplingSettings(max_new_tokens=6)])
    steps = 0
    while not batch.done:
        batch.step()
        steps += 1
    first, second = batch.results()
    assert len(first.token_ids) <= 2 and len(second.token_ids) <= 6
    assert steps == max(len(first.token_ids) + (first.finish_reason == "stop"),
                        len(second.token_ids) + (second.finish_reason == "stop"))


def test_stop_string_cuts_the_text(base: LoadedRun) -> None:
    prompt = prompts_of(base)[0]
    free = generate_batch(base, [prompt], SamplingSettings(max_new_tokens=10))[0]
    assert len(free.text) >= 3, "the seeded tiny model should answer at least a few characters to cut"
    stop = free.text[1:3]
    cut = generate_batch(base, [prompt], SamplingSettings(max_new_tokens=10, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert stop not in cut.text and free.text.startswith(cut.text)


def test_seeded_sampling_is_independent_of_batch_neighbours(base: LoadedRun) -> None:
    prompts = prompts_of(base)
    settings = SamplingSettings(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    alone = generate_batch(base, [prompts[0]], settings)[0]
    together = generate_batch(base, prompts, [settings] + [SamplingSettings(max_new_tokens=8, temperature=1.0)] * 4)[0]
    assert alone.token_ids == together.token_ids


def test_cancel_keeps_what_was_generated(base: LoadedRun) -> None:
    batch = DecodeBatch(base, prompts_of(base)[:2], [SamplingSettings(max_new_tokens=50)] * 2)
    batch.step()
    batch.cancel(0)
    while not batch.done:
        batch.step()
    assert batch.results()[0].finish_reason in {"cancelled", "stop"}


def test_a_vanishing_top_p_keeps_the_most_likely_token(base: LoadedRun) -> None:
    """Found by schemathesis: top_p=5e-324 underflows to 0 in float32 and used to leave nothing to sample."""
    prompt = prompts_of(base)[0]
    greedy = generate_batch(base, [prompt], SamplingSettings(max_new_tokens=6))[0]
    tiny_p = generate_batch(base, [prompt], SamplingSettings(max_new_tokens=6, temperature=1.0, top_p=5e-324, seed=1))[0]
    assert tiny_p.token_ids == greedy.token_ids
